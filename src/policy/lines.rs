//! Maps key paths (`tenants.acme.keys[0].sha256`) to the line they are written on, so that
//! problems found after parsing still point at `file:line`.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Debug, Default)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct Collector {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

impl Collector {
    /// Path of the node that comes next in the innermost container.
    fn child_path(&self) -> Option<String> {
        match self.stack.last()? {
            Frame::Map { path, key: Some(k) } if path.is_empty() => Some(k.clone()),
            Frame::Map { path, key: Some(k) } => Some(format!("{path}.{k}")),
            Frame::Map { key: None, .. } => None,
            Frame::Seq { path, index } => Some(format!("{path}[{index}]")),
        }
    }

    /// A value node finished: the map waits for its next key, the sequence moves on.
    fn advance(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { index, .. }) => *index += 1,
            None => {}
        }
    }

    fn open(&mut self, line: usize, seq: bool) {
        let path = self.child_path().unwrap_or_default();
        self.lines.entry(path.clone()).or_insert(line);
        self.stack.push(if seq {
            Frame::Seq { path, index: 0 }
        } else {
            Frame::Map { path, key: None }
        });
    }
}

impl MarkedEventReceiver for Collector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::MappingStart(..) => self.open(line, false),
            Event::SequenceStart(..) => self.open(line, true),
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.advance();
            }
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map {
                    key: key @ None, ..
                }) = self.stack.last_mut()
                {
                    *key = Some(value);
                    if let Some(path) = self.child_path() {
                        self.lines.entry(path).or_insert(line);
                    }
                } else {
                    if let Some(path) = self.child_path() {
                        self.lines.entry(path).or_insert(line);
                    }
                    self.advance();
                }
            }
            Event::Alias(_) => self.advance(),
            _ => {}
        }
    }
}

impl LineIndex {
    /// Builds the index; a document that does not parse yields an empty index (the serde pass
    /// reports that problem with its own location).
    pub fn build(text: &str) -> Self {
        let mut collector = Collector::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut collector, false).is_err() {
            return LineIndex::default();
        }
        LineIndex {
            lines: collector.lines,
        }
    }

    /// The line of `path`, or of its nearest written ancestor.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_lines() {
        let text = "tenants:\n  acme:\n    models: [a, b]\n    keys:\n      - id: k1\n        sha256: abc\n      - id: k2\n        sha256: def\n";
        let idx = LineIndex::build(text);
        assert_eq!(idx.line_of("tenants.acme"), Some(2));
        assert_eq!(idx.line_of("tenants.acme.models[1]"), Some(3));
        assert_eq!(idx.line_of("tenants.acme.keys[1].sha256"), Some(8));
        assert_eq!(idx.line_of("tenants.acme.keys[0].id"), Some(5));
        assert_eq!(idx.line_of("tenants.acme.limits.x"), Some(2));
    }
}
