//! Redaction of streamed answers. A match can be split across chunks ("4111 1111" then
//! " 1111 1111"), so each choice's text is held back by a bounded window: a chunk releases the
//! text that lies more than [`HOLDBACK_CHARS`] characters before the end of what has arrived,
//! moved back to the start of any match that straddles that point, redacted. The rest follows
//! with later chunks, and all of it with the chunk that carries `finish_reason` (or, if none
//! does, in one extra chunk before `[DONE]`). A match longer than the window (only a custom
//! pattern could be) is caught only when it arrives within one window.
//!
//! Only tenants with response rules take this path: their events are parsed and re-serialized;
//! everyone else's stream stays the zero-copy relay.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value, json};

use super::{Hits, RuleSet, redact_all};
use crate::sse::{event_data, split_event};

/// Characters of each choice's text held back until more has arrived.
pub const HOLDBACK_CHARS: usize = 128;

/// Rewrites a chat or completion SSE stream with the rule sets' redactions.
#[derive(Debug)]
pub struct StreamRedactor {
    sets: Arc<[Arc<RuleSet>]>,
    /// Bytes of an event whose end has not arrived yet.
    pending: BytesMut,
    /// Text held back, per choice index.
    held: Vec<(u64, String)>,
    /// The last chunk with choices, to dress the flush chunk like the others (id, model…).
    template: Option<Map<String, Value>>,
    /// Whether the held text belongs in `delta.content` (chat) or `text` (completions).
    chat: bool,
    pub hits: Hits,
}

impl StreamRedactor {
    pub fn new(sets: Arc<[Arc<RuleSet>]>) -> Self {
        StreamRedactor {
            sets,
            pending: BytesMut::new(),
            held: Vec::new(),
            template: None,
            chat: true,
            hits: Hits::default(),
        }
    }

    /// Rewrites the events completed by `frame` onto `out`.
    pub fn feed(&mut self, frame: Bytes, out: &mut impl Extend<Bytes>) {
        self.pending.extend_from_slice(&frame);
        while let Some((_, next)) = split_event(&self.pending) {
            let event = self.pending.split_to(next).freeze();
            out.extend(Some(self.event(event)));
        }
    }

    /// Before `[DONE]`: whatever is still held, as one more chunk per choice, and any partial
    /// event left as it came.
    pub fn finish(&mut self, out: &mut impl Extend<Bytes>) {
        let held = std::mem::take(&mut self.held);
        for (index, text) in held {
            if text.is_empty() {
                continue;
            }
            let text = redact_all(&self.sets, &text, &mut self.hits).unwrap_or(text);
            let mut chunk = self.template.clone().unwrap_or_default();
            let choice = if self.chat {
                json!({"index": index, "delta": {"content": text}, "finish_reason": null})
            } else {
                json!({"index": index, "text": text, "finish_reason": null})
            };
            chunk.insert("choices".into(), Value::Array(vec![choice]));
            out.extend(Some(data_event(&Value::Object(chunk))));
        }
        if !self.pending.is_empty() {
            out.extend(Some(self.pending.split().freeze()));
        }
    }

    fn event(&mut self, event: Bytes) -> Bytes {
        let data = event_data(&event);
        if data.first() != Some(&b'{') {
            return event; // comments, keep-alives, [DONE]
        }
        let Ok(mut value) = serde_json::from_slice::<Value>(&data) else {
            return event;
        };
        if !self.rewrite(&mut value) {
            return event;
        }
        data_event(&value)
    }

    /// Holds back and releases the text of each choice of one chunk; whether it changed.
    fn rewrite(&mut self, value: &mut Value) -> bool {
        let Some(Value::Array(choices)) = value.get_mut("choices") else {
            return false;
        };
        if choices.is_empty() {
            return false; // the usage chunk
        }
        let mut changed = false;
        for c in choices.iter_mut() {
            let Value::Object(c) = c else { continue };
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let finished = c.get("finish_reason").is_some_and(|f| !f.is_null());
            self.chat = !c.contains_key("text");
            let slot = if self.chat {
                c.get_mut("delta").and_then(|d| d.get_mut("content"))
            } else {
                c.get_mut("text")
            };
            let incoming = match slot {
                Some(Value::String(s)) => Some(std::mem::take(s)),
                _ => None,
            };
            if incoming.is_none() && !finished {
                continue;
            }
            let at = match self.held.iter().position(|(i, _)| *i == index) {
                Some(at) => at,
                None => {
                    self.held.push((index, String::new()));
                    self.held.len() - 1
                }
            };
            let buf = &mut self.held[at].1;
            if let Some(s) = &incoming {
                buf.push_str(s);
            }
            let release = release(&self.sets, buf, finished, &mut self.hits);
            if incoming.is_none() && release.is_empty() {
                continue;
            }
            changed = true;
            if self.chat {
                let delta = c
                    .entry("delta")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(d) = delta {
                    d.insert("content".into(), Value::String(release));
                }
            } else {
                c.insert("text".into(), Value::String(release));
            }
        }
        if changed && let Value::Object(map) = value {
            let mut template = map.clone();
            template.remove("usage");
            self.template = Some(template);
        }
        changed
    }
}

/// The part of `buf` that may go out now (all of it when `all`), redacted; it leaves `buf`.
fn release(sets: &[Arc<RuleSet>], buf: &mut String, all: bool, hits: &mut Hits) -> String {
    let cut = if all {
        buf.len()
    } else {
        let n = buf.chars().count();
        if n <= HOLDBACK_CHARS {
            return String::new();
        }
        let mut cut = buf
            .char_indices()
            .nth(n - HOLDBACK_CHARS)
            .map_or(buf.len(), |(i, _)| i);
        // Never cut through a match: move back to its start, until nothing straddles the cut.
        let found: Vec<(usize, usize)> = sets.iter().flat_map(|s| s.matches(buf)).collect();
        loop {
            let before = cut;
            for &(s, e) in &found {
                if s < cut && e > cut {
                    cut = s;
                }
            }
            if cut == before {
                break;
            }
        }
        cut
    };
    let rest = buf.split_off(cut);
    let head = std::mem::replace(buf, rest);
    redact_all(sets, &head, hits).unwrap_or(head)
}

fn data_event(value: &Value) -> Bytes {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let mut out = BytesMut::with_capacity(json.len() + 8);
    out.put_slice(b"data: ");
    out.put_slice(&json);
    out.put_slice(b"\n\n");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::raw::RawRuleSet;

    fn redactor() -> StreamRedactor {
        let raw: RawRuleSet = serde_yaml::from_str(
            "redact:\n  - builtin: card\n  - builtin: email\nresponses: true\n",
        )
        .unwrap();
        let set = Arc::new(RuleSet::compile("out", &raw).unwrap());
        StreamRedactor::new(vec![set].into())
    }

    fn chunk(content: &str, finish: Option<&str>) -> Bytes {
        let v = json!({"id": "c1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]});
        data_event(&v)
    }

    fn text_of(events: &[Bytes]) -> String {
        let mut text = String::new();
        for e in events {
            let data = event_data(e);
            if let Ok(v) = serde_json::from_slice::<Value>(&data)
                && let Some(s) = v["choices"][0]["delta"]["content"].as_str()
            {
                text.push_str(s);
            }
        }
        text
    }

    #[test]
    fn a_match_split_across_chunks_is_redacted() {
        let mut r = redactor();
        let mut out: Vec<Bytes> = Vec::new();
        let answer =
            "Your card 4111 1111 1111 1111 is on file; write to help@example.com for more.";
        // Two characters per chunk, and one frame holding half an event.
        let chars: Vec<char> = answer.chars().collect();
        for pair in chars.chunks(2) {
            let s: String = pair.iter().collect();
            let ev = chunk(&s, None);
            let (a, b) = ev.split_at(ev.len() / 2);
            r.feed(Bytes::copy_from_slice(a), &mut out);
            r.feed(Bytes::copy_from_slice(b), &mut out);
        }
        r.feed(chunk("", Some("stop")), &mut out);
        let text = text_of(&out);
        assert_eq!(
            text,
            "Your card [CARD] is on file; write to [EMAIL] for more."
        );
        assert_eq!(r.hits.joined(), "out/card,out/email");
    }

    #[test]
    fn held_text_is_flushed_before_done_without_a_finish_chunk() {
        let mut r = redactor();
        let mut out: Vec<Bytes> = Vec::new();
        r.feed(chunk("mail me at a@example.org", None), &mut out);
        r.feed(Bytes::from_static(b": keep-alive\n\n"), &mut out);
        r.finish(&mut out);
        assert_eq!(text_of(&out), "mail me at [EMAIL]");
        assert_eq!(out[1].as_ref(), b": keep-alive\n\n");
    }

    #[test]
    fn long_answers_flow_with_a_bounded_lag() {
        let mut r = redactor();
        let mut out: Vec<Bytes> = Vec::new();
        for _ in 0..100 {
            r.feed(chunk("word ", None), &mut out);
        }
        let released = text_of(&out).chars().count();
        assert!(released >= 500 - HOLDBACK_CHARS - 5, "{released}");
        r.feed(chunk("", Some("stop")), &mut out);
        assert_eq!(text_of(&out), "word ".repeat(100));
    }
}
