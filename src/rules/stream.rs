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

/// Characters of each text field held back until more has arrived.
pub const HOLDBACK_CHARS: usize = 128;

/// The most a cut may move back to keep a match whole: a longer match (only an unbounded custom
/// pattern) is released in pieces, each redacted as far as it matches.
pub const MAX_HOLD_CHARS: usize = 1024;

/// Choices per answer a redacted stream may carry (as the JSON assembler allows).
const MAX_CHOICES: u64 = 128;

/// The text fields of a chat delta that are held back and redacted.
const DELTA_FIELDS: [&str; 4] = ["content", "reasoning_content", "reasoning", "refusal"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A text field of a chat delta (index into [`DELTA_FIELDS`]).
    Field(usize),
    /// The `function.arguments` of a streamed tool call, by tool-call index.
    Tool(u64),
    /// A completion's `text`.
    Text,
}

/// Rewrites a chat or completion SSE stream with the rule sets' redactions.
#[derive(Debug)]
pub struct StreamRedactor {
    sets: Arc<[Arc<RuleSet>]>,
    /// Bytes of an event whose end has not arrived yet.
    pending: BytesMut,
    /// Text held back, per choice index and field.
    held: Vec<(u64, Slot, String)>,
    /// The last chunk with choices, to dress the flush chunk like the others (id, model…).
    template: Option<Map<String, Value>>,
    /// Chat (`delta`) or completions (`text`).
    chat: bool,
    pub hits: Hits,
}

impl StreamRedactor {
    /// `chat`: the stream answers `/v1/chat/completions` (else `/v1/completions`).
    pub fn new(sets: Arc<[Arc<RuleSet>]>, chat: bool) -> Self {
        StreamRedactor {
            sets,
            pending: BytesMut::new(),
            held: Vec::new(),
            template: None,
            chat,
            hits: Hits::default(),
        }
    }

    /// Rewrites the events completed by `frame` onto `out`. Events that cannot be checked
    /// (data that is not a JSON object) are dropped rather than let through.
    pub fn feed(&mut self, frame: Bytes, out: &mut impl Extend<Bytes>) {
        self.pending.extend_from_slice(&frame);
        while let Some((_, next)) = split_event(&self.pending) {
            let event = self.pending.split_to(next).freeze();
            out.extend(self.event(event));
        }
    }

    /// Before `[DONE]`: whatever is still held, as one more chunk per choice. A partial event
    /// left over is dropped (it cannot be checked).
    pub fn finish(&mut self, out: &mut impl Extend<Bytes>) {
        self.pending.clear();
        let mut indexes: Vec<u64> = self.held.iter().map(|(i, _, _)| *i).collect();
        indexes.sort_unstable();
        indexes.dedup();
        for index in indexes {
            let mut choice = Map::new();
            choice.insert("index".into(), json!(index));
            if self.chat {
                choice.insert("delta".into(), Value::Object(Map::new()));
            }
            choice.insert("finish_reason".into(), Value::Null);
            if !self.flush(index, &mut choice) {
                continue;
            }
            let mut chunk = self.template.clone().unwrap_or_default();
            chunk.insert("choices".into(), Value::Array(vec![Value::Object(choice)]));
            out.extend(Some(data_event(&Value::Object(chunk))));
        }
        self.held.clear();
    }

    fn event(&mut self, event: Bytes) -> Option<Bytes> {
        let data = event_data(&event);
        if data.is_empty() || data.as_slice() == b"[DONE]" {
            return Some(event); // comments, keep-alives, [DONE]
        }
        let mut value = serde_json::from_slice::<Value>(&data).ok()?;
        if !value.is_object() {
            return None;
        }
        match self.rewrite(&mut value)? {
            false => Some(event),
            true => Some(data_event(&value)),
        }
    }

    /// Holds back and releases the text of one chunk: `Some(changed)`, or `None` when the chunk
    /// must be dropped.
    fn rewrite(&mut self, value: &mut Value) -> Option<bool> {
        let Some(Value::Array(choices)) = value.get_mut("choices") else {
            return Some(false);
        };
        if choices.is_empty() {
            return Some(false); // the usage chunk
        }
        let mut changed = false;
        for c in choices.iter_mut() {
            let Value::Object(c) = c else { return None };
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            if index >= MAX_CHOICES {
                return None;
            }
            let finished = c.get("finish_reason").is_some_and(|f| !f.is_null());
            if self.chat {
                if let Some(Value::Object(delta)) = c.get_mut("delta") {
                    for (fi, field) in DELTA_FIELDS.iter().enumerate() {
                        if let Some(Value::String(s)) = delta.get_mut(*field) {
                            let incoming = std::mem::take(s);
                            *s = self.pass(index, Slot::Field(fi), &incoming, finished);
                            changed = true;
                        }
                    }
                    if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
                        for call in calls {
                            let ti = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                            if let Some(Value::String(a)) = call
                                .get_mut("function")
                                .and_then(|f| f.get_mut("arguments"))
                            {
                                let incoming = std::mem::take(a);
                                *a = self.pass(index, Slot::Tool(ti), &incoming, finished);
                                changed = true;
                            }
                        }
                    }
                }
            } else if let Some(Value::String(s)) = c.get_mut("text") {
                let incoming = std::mem::take(s);
                *s = self.pass(index, Slot::Text, &incoming, finished);
                changed = true;
            }
            if finished {
                if self.chat && !c.contains_key("delta") {
                    c.insert("delta".into(), Value::Object(Map::new()));
                }
                changed |= self.flush(index, c);
            }
        }
        if changed && let Value::Object(map) = value {
            let mut template = map.clone();
            template.remove("usage");
            template.remove("choices");
            self.template = Some(template);
        }
        Some(changed)
    }

    /// Adds `text` to the slot's held text and returns what may go out now.
    fn pass(&mut self, index: u64, slot: Slot, text: &str, all: bool) -> String {
        let at = match self
            .held
            .iter()
            .position(|(i, s, _)| *i == index && *s == slot)
        {
            Some(at) => at,
            None => {
                self.held.push((index, slot, String::new()));
                self.held.len() - 1
            }
        };
        let buf = &mut self.held[at].2;
        buf.push_str(text);
        release(&self.sets, buf, all, &mut self.hits)
    }

    /// Releases everything still held for choice `index` into `choice` (its `delta`, or `text`);
    /// whether anything was added.
    fn flush(&mut self, index: u64, choice: &mut Map<String, Value>) -> bool {
        let mut added = false;
        for (i, slot, buf) in self.held.iter_mut() {
            if *i != index || buf.is_empty() {
                continue;
            }
            let text = release(&self.sets, buf, true, &mut self.hits);
            added = true;
            match *slot {
                Slot::Text => append(choice, "text", &text),
                Slot::Field(fi) => {
                    if let Some(Value::Object(delta)) = choice.get_mut("delta") {
                        append(delta, DELTA_FIELDS[fi], &text);
                    }
                }
                Slot::Tool(ti) => {
                    if let Some(Value::Object(delta)) = choice.get_mut("delta") {
                        let calls = delta
                            .entry("tool_calls")
                            .or_insert_with(|| Value::Array(Vec::new()));
                        if let Value::Array(calls) = calls {
                            calls.push(json!({"index": ti, "function": {"arguments": text}}));
                        }
                    }
                }
            }
        }
        self.held
            .retain(|(i, _, buf)| *i != index || !buf.is_empty());
        added
    }
}

/// Appends `text` to the string field `key` (created when absent).
fn append(map: &mut Map<String, Value>, key: &str, text: &str) {
    match map.get_mut(key) {
        Some(Value::String(s)) => s.push_str(text),
        _ => {
            map.insert(key.into(), Value::String(text.to_string()));
        }
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
        let at_char = |k: usize| buf.char_indices().nth(k).map_or(buf.len(), |(i, _)| i);
        let mut cut = at_char(n - HOLDBACK_CHARS);
        let floor = at_char(n.saturating_sub(MAX_HOLD_CHARS));
        // Never cut through a match: move back to its start, until nothing straddles the cut.
        let found: Vec<(usize, usize)> = sets.iter().flat_map(|s| s.matches(buf)).collect();
        loop {
            let before = cut;
            for &(s, e) in &found {
                if s < cut && e > cut {
                    cut = s.max(floor);
                }
            }
            // Nor next to a digit: whether digits form a card, an ID or a phone number depends
            // on their neighbours, so a run of them is released whole (found by fuzzing).
            while cut > floor && near_digit(buf.as_bytes(), cut) {
                cut = buf[..cut].char_indices().next_back().map_or(0, |(i, _)| i);
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

/// Whether an ASCII digit lies within two bytes of `at`, on either side.
fn near_digit(bytes: &[u8], at: usize) -> bool {
    bytes[at.saturating_sub(2)..(at + 2).min(bytes.len())]
        .iter()
        .any(u8::is_ascii_digit)
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
        StreamRedactor::new(vec![set].into(), true)
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
    fn tool_call_arguments_and_reasoning_are_held_and_redacted_too() {
        let mut r = redactor();
        let mut out: Vec<Bytes> = Vec::new();
        let tool = |args: &str| {
            data_event(&json!({"id": "c1", "choices": [{"index": 0, "delta": {
                "tool_calls": [{"index": 0, "function": {"arguments": args}}]}, "finish_reason": null}]}))
        };
        r.feed(tool("{\"to\":\"jane.d"), &mut out);
        r.feed(tool("oe@example.com\"}"), &mut out);
        r.feed(
            data_event(&json!({"id": "c1", "choices": [{"index": 0, "delta": {
                "reasoning_content": "card 4111 1111 "}, "finish_reason": null}]})),
            &mut out,
        );
        r.feed(
            data_event(&json!({"id": "c1", "choices": [{"index": 0, "delta": {
                "reasoning_content": "1111 1111"}, "finish_reason": "tool_calls"}]})),
            &mut out,
        );
        let all: String = out
            .iter()
            .map(|e| String::from_utf8(e.to_vec()).unwrap())
            .collect();
        assert!(!all.contains("jane") && !all.contains("4111"), "{all}");
        assert!(all.contains("[EMAIL]") && all.contains("[CARD]"), "{all}");
    }

    #[test]
    fn events_that_cannot_be_checked_are_dropped() {
        let mut r = redactor();
        let mut out: Vec<Bytes> = Vec::new();
        r.feed(
            Bytes::from_static(b"data: card 4111 1111 1111 1111\n\n"),
            &mut out,
        );
        r.feed(
            Bytes::from_static(b"data: {\"choices\": \"\\ud800\"}\n\n"),
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        // A completions stream keeps its shape when text is flushed.
        let mut r = StreamRedactor::new(r.sets.clone(), false);
        r.feed(
            data_event(&json!({"id": "c", "choices": [{"index": 0, "text": "mail a@b.co", "finish_reason": null}]})),
            &mut out,
        );
        r.finish(&mut out);
        let last: Value = serde_json::from_slice(&event_data(out.last().unwrap())).unwrap();
        assert_eq!(last["choices"][0]["text"], "mail [EMAIL]");
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
