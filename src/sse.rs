//! Server-sent events from a remote, moved as `Bytes`: finds event boundaries, the usage chunk and
//! `data: [DONE]` by scanning, without parsing ordinary events. Frames that hold only whole events
//! leave as the very `Bytes` they arrived in; only an event split across frames is copied once.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::openai::Usage;

/// An event larger than this (no blank line in sight) means the upstream is not speaking SSE.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    #[error("upstream SSE event exceeds {0} bytes")]
    EventTooLarge(usize),
}

#[derive(Debug)]
pub struct SseScanner {
    /// Start of an event whose end has not arrived yet.
    pending: BytesMut,
    /// Where the current line starts inside `pending`.
    pending_line_start: usize,
    strip_usage_chunk: bool,
    max_event: usize,
    usage: Option<Usage>,
    /// Ordinary (output) events seen.
    events: u32,
    /// 1 when the first event only announced the role (`"role":"assistant","content":""`).
    preamble: u32,
    done: bool,
    /// The `data: [DONE]` event, released only after metering.
    held: Option<Bytes>,
}

/// What one complete event is, as far as the gateway cares.
enum EventKind {
    Plain,
    /// A comment or keep-alive (`: ping`): passed on, not output.
    Comment,
    UsageOnly,
    Done,
}

// === impl SseScanner ===

impl SseScanner {
    /// `strip_usage_chunk`: drop the `choices: []` usage chunk (the client did not ask for it).
    pub fn new(strip_usage_chunk: bool) -> Self {
        SseScanner {
            pending: BytesMut::new(),
            pending_line_start: 0,
            strip_usage_chunk,
            max_event: DEFAULT_MAX_EVENT_BYTES,
            usage: None,
            events: 0,
            preamble: 0,
            done: false,
            held: None,
        }
    }

    pub fn with_max_event(mut self, max: usize) -> Self {
        self.max_event = max;
        self
    }

    /// The upstream's usage, once its usage chunk has been seen.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Ordinary events (chunks) seen so far, usage chunk and `[DONE]` not counted.
    pub fn events(&self) -> u32 {
        self.events
    }

    /// Events that carried output: the ordinary events less a first one that only announced
    /// the role. OpenAI-compatible servers stream one token per such event, so this is what a
    /// client received of an answer whose upstream never reported usage.
    pub fn output_events(&self) -> u32 {
        self.events - self.preamble
    }

    /// Whether `data: [DONE]` has been seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The `[DONE]` event, held back until the caller has metered the request.
    pub fn take_held(&mut self) -> Option<Bytes> {
        self.held.take()
    }

    /// Scans one upstream frame and pushes what may be released now onto `out`.
    pub fn feed(&mut self, frame: Bytes, out: &mut impl Extend<Bytes>) -> Result<(), SseError> {
        if self.done {
            // Nothing valid follows `[DONE]`; keep it away from the client.
            return Ok(());
        }
        let (data, mut line_start) = if self.pending.is_empty() {
            (frame, 0)
        } else {
            let line_start = self.pending_line_start;
            self.pending.extend_from_slice(&frame);
            (self.pending.split().freeze(), line_start)
        };

        let mut event_start = 0;
        // Start of the run of events that will leave as one slice.
        let mut run_start = 0;
        let scan_from = line_start;
        for nl in memchr::memchr_iter(b'\n', &data[scan_from..]).map(|i| i + scan_from) {
            let line = &data[line_start..nl];
            let blank = line.is_empty() || line == b"\r";
            line_start = nl + 1;
            if !blank {
                continue;
            }
            if nl == event_start || (nl == event_start + 1 && data[event_start] == b'\r') {
                // Blank line with no event before it: belongs to the run, nothing to inspect.
                event_start = line_start;
                continue;
            }
            let event = &data[event_start..line_start];
            match self.classify(event) {
                EventKind::Plain => self.events += 1,
                EventKind::Comment => {}
                EventKind::UsageOnly if self.strip_usage_chunk => {
                    if event_start > run_start {
                        out.extend([data.slice(run_start..event_start)]);
                    }
                    run_start = line_start;
                }
                EventKind::UsageOnly => {}
                EventKind::Done => {
                    if event_start > run_start {
                        out.extend([data.slice(run_start..event_start)]);
                    }
                    self.done = true;
                    // The [DONE] event alone: nothing valid follows it, in this frame or a
                    // later one (found by fuzzing: what followed in the same frame used to
                    // reach the client, so the output depended on framing).
                    self.held = Some(data.slice(event_start..line_start));
                    return Ok(());
                }
            }
            event_start = line_start;
        }

        if event_start > run_start {
            out.extend([data.slice(run_start..event_start)]);
        }
        if event_start < data.len() {
            let rest = data.len() - event_start;
            if rest > self.max_event {
                return Err(SseError::EventTooLarge(self.max_event));
            }
            self.pending.extend_from_slice(&data[event_start..]);
            self.pending_line_start = line_start - event_start;
        } else {
            self.pending_line_start = 0;
        }
        Ok(())
    }

    fn classify(&mut self, event: &[u8]) -> EventKind {
        let payload = data_payload(event);
        if payload.trim_ascii() == b"[DONE]" {
            return EventKind::Done;
        }
        if payload.is_empty() {
            return EventKind::Comment;
        }
        if crate::openai::find_usage_object(payload).is_none() {
            // The first event often only announces the role: not output.
            if self.events == 0 && has_output(event) == Ok(false) {
                self.preamble = 1;
            }
            return EventKind::Plain;
        }
        #[derive(Deserialize)]
        struct Chunk {
            choices: Option<Vec<IgnoredAny>>,
            usage: Option<Usage>,
        }
        match serde_json::from_slice::<Chunk>(payload) {
            Ok(chunk) => {
                if chunk.usage.is_some() {
                    self.usage = chunk.usage;
                }
                match chunk.choices {
                    Some(c) if c.is_empty() => EventKind::UsageOnly,
                    _ => EventKind::Plain,
                }
            }
            Err(_) => EventKind::Plain,
        }
    }
}

/// Whether one SSE event carries output: content, a tool call, a refusal, reasoning, or a
/// finish reason (not a role announcement, a comment or a keep-alive). An error event is an
/// error. Parses the event: for the first few events of a stream only.
pub fn has_output(event: &[u8]) -> Result<bool, String> {
    let data = event_data(event);
    let data = data.as_slice();
    if data.is_empty() {
        return Ok(false); // comments, keep-alives, `event:` lines alone
    }
    if data == b"[DONE]" {
        return Ok(true);
    }
    let event = serde_json::from_slice::<output::Event>(data)
        .map_err(|e| format!("invalid JSON in SSE event: {e}"))?;
    if event.error {
        return Err("error event before the first token".into());
    }
    Ok(event.output)
}

/// [`has_output`]'s reading of an event, as the parser goes: nothing is allocated and nothing
/// kept but a few flags. It means what reading the event into a `serde_json::Value` and looking
/// members up would (a test holds it to that): a repeated key counts by its last occurrence,
/// a member of the wrong type counts as absent, and every value is parsed as a `Value` would
/// be (a number out of range is invalid), not merely skipped.
mod output {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::Deserialize;
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};

    /// The whole event.
    #[derive(Default)]
    pub(super) struct Event {
        /// A non-null top-level `error`.
        pub error: bool,
        /// `choices` is an array and some choice in it carries output.
        pub output: bool,
    }

    /// One choice.
    #[derive(Default)]
    struct Choice {
        /// Its `delta`'s output members.
        delta: bool,
        text: bool,
        finish_reason: bool,
    }

    /// A choice's `delta`: one flag per output member, each by its last occurrence.
    #[derive(Default)]
    struct Delta([bool; DELTA_OUTPUT.len()]);

    const DELTA_OUTPUT: [&str; 6] = [
        "content",
        "tool_calls",
        "function_call",
        "refusal",
        "reasoning_content",
        "reasoning",
    ];

    /// What kind of value was read; compound values are consumed element by element.
    #[derive(PartialEq)]
    enum Kind {
        Null,
        /// A non-empty string or array, or any object.
        NonEmpty,
        /// A boolean, a number, an empty string or an empty array.
        Other,
    }

    impl Kind {
        fn non_empty(self) -> bool {
            self == Kind::NonEmpty
        }
        fn not_null(self) -> bool {
            self != Kind::Null
        }
    }

    struct KindOf;

    impl<'de> Visitor<'de> for KindOf {
        type Value = Kind;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_unit<E>(self) -> Result<Kind, E> {
            Ok(Kind::Null)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_str<E>(self, v: &str) -> Result<Kind, E> {
            Ok(if v.is_empty() {
                Kind::Other
            } else {
                Kind::NonEmpty
            })
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
            let mut kind = Kind::Other;
            while seq.next_element::<Any>()?.is_some() {
                kind = Kind::NonEmpty;
            }
            Ok(kind)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
            while map.next_entry::<Key, Any>()?.is_some() {}
            Ok(Kind::NonEmpty)
        }
    }

    /// Any value, parsed as a `Value` would be, and dropped.
    struct Any(Kind);

    impl<'de> Deserialize<'de> for Any {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(KindOf).map(Any)
        }
    }

    /// An object key, unescaped; only whether it is one of the keys read here is kept.
    struct Key(Option<&'static str>);

    const KEYS: [&str; 11] = [
        "error",
        "choices",
        "delta",
        "text",
        "finish_reason",
        "content",
        "tool_calls",
        "function_call",
        "refusal",
        "reasoning_content",
        "reasoning",
    ];

    impl<'de> Deserialize<'de> for Key {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Key;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an object key")
                }
                fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                    Ok(Key(KEYS.iter().copied().find(|k| *k == v)))
                }
            }
            d.deserialize_str(V)
        }
    }

    /// A value read by the parts it is made of: an object member by member, an array element by
    /// element; anything a type does not look at is parsed and dropped, and a value of another
    /// kind reads as `Default` (a `Value` lookup in a non-object or non-array finds nothing).
    trait Parts: Default {
        /// Reads the value of a member this module knows the key of.
        fn member<'de, A: MapAccess<'de>>(
            &mut self,
            _key: &'static str,
            map: &mut A,
        ) -> Result<(), A::Error> {
            map.next_value::<Any>().map(drop)
        }
        /// Reads the next element; `false` at the end of the array.
        fn element<'de, A: SeqAccess<'de>>(&mut self, seq: &mut A) -> Result<bool, A::Error> {
            Ok(seq.next_element::<Any>()?.is_some())
        }
    }

    struct PartsOf<T>(PhantomData<T>);

    impl<'de, T: Parts> Visitor<'de> for PartsOf<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
            let mut out = T::default();
            while let Some(Key(key)) = map.next_key::<Key>()? {
                match key {
                    Some(key) => out.member(key, &mut map)?,
                    None => map.next_value::<Any>().map(drop)?,
                }
            }
            Ok(out)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
            let mut out = T::default();
            while out.element(&mut seq)? {}
            Ok(out)
        }
        fn visit_unit<E>(self) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_bool<E>(self, _: bool) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_u64<E>(self, _: u64) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_f64<E>(self, _: f64) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_str<E>(self, _: &str) -> Result<T, E> {
            Ok(T::default())
        }
    }

    macro_rules! deserialize_parts {
        ($($t:ty),*) => {$(
            impl<'de> Deserialize<'de> for $t {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    d.deserialize_any(PartsOf(PhantomData))
                }
            }
        )*};
    }
    deserialize_parts!(Event, Choices, Choice, Delta);

    impl Parts for Event {
        fn member<'de, A: MapAccess<'de>>(
            &mut self,
            key: &'static str,
            map: &mut A,
        ) -> Result<(), A::Error> {
            match key {
                "error" => self.error = map.next_value::<Any>()?.0.not_null(),
                "choices" => self.output = map.next_value::<Choices>()?.0,
                _ => map.next_value::<Any>().map(drop)?,
            }
            Ok(())
        }
    }

    /// `choices`: whether it is an array with some choice that carries output (anything else
    /// carries none).
    #[derive(Default)]
    struct Choices(bool);

    impl Parts for Choices {
        fn element<'de, A: SeqAccess<'de>>(&mut self, seq: &mut A) -> Result<bool, A::Error> {
            let Some(c) = seq.next_element::<Choice>()? else {
                return Ok(false);
            };
            self.0 |= c.delta || c.text || c.finish_reason;
            Ok(true)
        }
    }

    impl Parts for Choice {
        fn member<'de, A: MapAccess<'de>>(
            &mut self,
            key: &'static str,
            map: &mut A,
        ) -> Result<(), A::Error> {
            match key {
                "delta" => self.delta = map.next_value::<Delta>()?.0.contains(&true),
                "text" => self.text = map.next_value::<Any>()?.0.non_empty(),
                "finish_reason" => self.finish_reason = map.next_value::<Any>()?.0.not_null(),
                _ => map.next_value::<Any>().map(drop)?,
            }
            Ok(())
        }
    }

    impl Parts for Delta {
        fn member<'de, A: MapAccess<'de>>(
            &mut self,
            key: &'static str,
            map: &mut A,
        ) -> Result<(), A::Error> {
            let value = map.next_value::<Any>()?.0;
            if let Some(i) = DELTA_OUTPUT.iter().position(|k| *k == key) {
                self.0[i] = value.non_empty();
            }
            Ok(())
        }
    }
}

/// The `data:` field of an event (the first one; OpenAI-compatible servers send one per event).
fn data_payload(event: &[u8]) -> &[u8] {
    let mut rest = event;
    loop {
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            return v.strip_suffix(b"\r").unwrap_or(v);
        }
        if end >= rest.len() {
            return b"";
        }
        rest = &rest[end + 1..];
    }
}

/// The end of the first complete event in `buf` (just past its last line's newline) and where
/// the next event starts (past the blank line), with LF or CRLF line ends.
pub fn split_event(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| (i + 1, i + 2));
    let crlf = memchr::memmem::find(buf, b"\n\r\n").map(|i| (i + 1, i + 3));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The data of one event: its `data:` lines joined by newlines, trimmed (empty for comments,
/// keep-alives and events without data).
pub fn event_data(event: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
        }
    }
    let trimmed = data.trim_ascii();
    if trimmed.len() != data.len() {
        data = trimmed.to_vec();
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: &str =
        "data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"he\"}}],\"usage\":null}\n\n";
    const C2: &str = "data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"llo\"}}]}\n\n";
    const U: &str = "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const D: &str = "data: [DONE]\n\n";

    fn run(frames: &[&[u8]], strip: bool) -> (Vec<u8>, Vec<Bytes>, SseScanner) {
        let mut sc = SseScanner::new(strip);
        let mut out = Vec::new();
        for f in frames {
            sc.feed(Bytes::copy_from_slice(f), &mut out).unwrap();
        }
        let mut all: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
        if let Some(h) = sc.take_held() {
            all.extend_from_slice(&h);
        }
        (all, out, sc)
    }

    #[test]
    fn whole_frames_leave_untouched() {
        let f = Bytes::from(format!("{C1}{C2}"));
        let mut sc = SseScanner::new(true);
        let mut out = Vec::new();
        sc.feed(f.clone(), &mut out).unwrap();
        assert_eq!(out.len(), 1);
        // Same allocation: a refcount clone, not a copy.
        assert_eq!(out[0].as_ptr(), f.as_ptr());
    }

    #[test]
    fn strips_usage_chunk_and_holds_done() {
        let all = format!("{C1}{C2}{U}{D}");
        let (bytes, _, sc) = run(&[all.as_bytes()], true);
        assert_eq!(String::from_utf8(bytes).unwrap(), format!("{C1}{C2}{D}"));
        assert_eq!(sc.usage().unwrap().total_tokens, 5);
        assert!(sc.is_done());
    }

    #[test]
    fn output_events_leave_out_a_role_announcement() {
        let role =
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        let (_, _, sc) = run(&[format!("{role}{C1}{C2}").as_bytes()], true);
        assert_eq!((sc.events(), sc.output_events()), (3, 2));
        // A first chunk with the role and real content is output.
        let both =
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n";
        let (_, _, sc) = run(&[format!("{both}{C2}").as_bytes()], true);
        assert_eq!(sc.output_events(), 2);
        // Only the first event is looked at.
        let (_, _, sc) = run(&[format!("{C1}{role}").as_bytes()], true);
        assert_eq!(sc.output_events(), 2);
        // Comments and keep-alives pass through and are not output.
        let (bytes, _, sc) = run(&[format!(": ping\n\n{C1}: ping\n\n").as_bytes()], true);
        assert_eq!(sc.output_events(), 1);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            format!(": ping\n\n{C1}: ping\n\n")
        );
    }

    #[test]
    fn keeps_usage_chunk_when_asked() {
        let all = format!("{C1}{U}{D}");
        let (bytes, _, sc) = run(&[all.as_bytes()], false);
        assert_eq!(String::from_utf8(bytes).unwrap(), all);
        assert_eq!(sc.usage().unwrap().prompt_tokens, 3);
    }

    #[test]
    fn every_split_point_gives_the_same_result() {
        let all = format!("{C1}{C2}{U}{D}");
        let b = all.as_bytes();
        for i in 0..b.len() {
            for j in i..b.len() {
                let (bytes, _, sc) = run(&[&b[..i], &b[i..j], &b[j..]], true);
                assert_eq!(String::from_utf8(bytes).unwrap(), format!("{C1}{C2}{D}"));
                assert_eq!(sc.usage().unwrap().completion_tokens, 2);
            }
        }
    }

    #[test]
    fn crlf_events() {
        let all =
            "data: {\"choices\":[],\"usage\":{\"total_tokens\":9}}\r\n\r\ndata: [DONE]\r\n\r\n";
        let (bytes, _, sc) = run(&[all.as_bytes()], true);
        assert_eq!(bytes, b"data: [DONE]\r\n\r\n");
        assert_eq!(sc.usage().unwrap().total_tokens, 9);
    }

    #[test]
    fn oversized_event_is_an_error() {
        let mut sc = SseScanner::new(true).with_max_event(16);
        let mut out = Vec::new();
        let r = sc.feed(Bytes::from_static(b"data: 0123456789abcdefghij"), &mut out);
        assert_eq!(r, Err(SseError::EventTooLarge(16)));
    }

    #[test]
    fn events_split_on_lf_and_crlf_blank_lines() {
        assert_eq!(split_event(b"data: a\n\ndata: b"), Some((8, 9)));
        assert_eq!(split_event(b"data: a\r\n\r\ndata: b"), Some((9, 11)));
        assert_eq!(split_event(b"data: a\n"), None);
    }

    #[test]
    fn event_data_joins_data_lines() {
        assert_eq!(
            event_data(b"event: x\r\ndata: {\"a\":\r\ndata: 1}\r\n"),
            b"{\"a\":\n1}"
        );
        assert_eq!(event_data(b": keep-alive\n"), b"");
    }

    #[test]
    fn role_chunks_and_comments_are_not_output() {
        let role = br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        assert_eq!(has_output(role), Ok(false));
        assert_eq!(has_output(b": keep-alive"), Ok(false));
        let word =
            br#"data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        assert_eq!(has_output(word), Ok(true));
        let tool =
            br#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c"}]}}]}"#;
        assert_eq!(has_output(tool), Ok(true));
        let text = br#"data: {"choices":[{"index":0,"text":"x","finish_reason":null}]}"#;
        assert_eq!(has_output(text), Ok(true));
        let stop = br#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#;
        assert_eq!(has_output(stop), Ok(true));
        assert_eq!(has_output(b"data: [DONE]"), Ok(true));
        assert!(has_output(br#"data: {"error":{"message":"overloaded"}}"#).is_err());
        assert!(has_output(b"data: {not json").is_err());
    }

    /// The definition [`has_output`] must agree with: the event read into a `Value`.
    fn has_output_by_value(event: &[u8]) -> Result<bool, String> {
        let data = event_data(event);
        let data = data.as_slice();
        if data.is_empty() {
            return Ok(false);
        }
        if data == b"[DONE]" {
            return Ok(true);
        }
        let v = serde_json::from_slice::<serde_json::Value>(data)
            .map_err(|e| format!("invalid JSON in SSE event: {e}"))?;
        if v.get("error").is_some_and(|e| !e.is_null()) {
            return Err("error event before the first token".into());
        }
        let non_empty = |v: Option<&serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) => !s.is_empty(),
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(serde_json::Value::Object(_)) => true,
            _ => false,
        };
        let choices = v.get("choices").and_then(serde_json::Value::as_array);
        Ok(choices.is_some_and(|cs| {
            cs.iter().any(|c| {
                let delta = c.get("delta");
                let d = |k: &str| delta.and_then(|d| d.get(k));
                non_empty(d("content"))
                    || non_empty(d("tool_calls"))
                    || non_empty(d("function_call"))
                    || non_empty(d("refusal"))
                    || non_empty(d("reasoning_content"))
                    || non_empty(d("reasoning"))
                    || non_empty(c.get("text"))
                    || c.get("finish_reason").is_some_and(|f| !f.is_null())
            })
        }))
    }

    /// A random JSON value over the keys `has_output` reads (and some it does not), nested
    /// where the event's shape nests, with escaped keys and numbers out of range now and then.
    fn random_value(next: &mut impl FnMut() -> u64, depth: u32, out: &mut String) {
        const KEYS: &[&str] = &[
            "error",
            "choices",
            "delta",
            "text",
            "finish_reason",
            "content",
            "tool_calls",
            "function_call",
            "refusal",
            "reasoning_content",
            "reasoning",
            "role",
            "id",
            "index",
            "\\u0063ontent",
            "err\\u006fr",
            "choice",
        ];
        const SCALARS: &[&str] = &[
            "null",
            "\"\"",
            "\"x\"",
            "\"stop\"",
            "true",
            "false",
            "0",
            "-1.5e3",
            "1e400",
            "18446744073709551616",
            "\"\\n\"",
            "\"\\ud83d\\ude00\"",
        ];
        let pick = next() % if depth > 3 { 3 } else { 10 };
        match pick {
            0..=2 => out.push_str(SCALARS[(next() % SCALARS.len() as u64) as usize]),
            3..=5 => {
                out.push('{');
                for i in 0..next() % 4 {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push('"');
                    out.push_str(KEYS[(next() % KEYS.len() as u64) as usize]);
                    out.push_str("\":");
                    random_value(next, depth + 1, out);
                }
                out.push('}');
            }
            _ => {
                out.push('[');
                for i in 0..next() % 3 {
                    if i > 0 {
                        out.push(',');
                    }
                    random_value(next, depth + 1, out);
                }
                out.push(']');
            }
        }
    }

    #[test]
    fn has_output_agrees_with_reading_the_event_into_a_value() {
        let mut next = crate::openai::tests::xorshift(0x5eed_cafe);
        let mut events = 0;
        let mut outputs = 0;
        let mut errors = 0;
        for _ in 0..60_000 {
            let mut json = String::new();
            if next().is_multiple_of(2) {
                random_value(&mut next, 0, &mut json);
            } else {
                // Shaped like a chunk: choices of objects with a delta, members random.
                json.push_str(r#"{"id":"x","#);
                if next().is_multiple_of(4) {
                    json.push_str(r#""error":"#);
                    random_value(&mut next, 3, &mut json);
                    json.push(',');
                }
                json.push_str(r#""choices":["#);
                for i in 0..next() % 3 {
                    if i > 0 {
                        json.push(',');
                    }
                    json.push_str(r#"{"index":0,"delta":{"#);
                    for j in 0..next() % 3 {
                        if j > 0 {
                            json.push(',');
                        }
                        let k = ["role", "content", "tool_calls", "refusal", "reasoning"];
                        json.push_str(&format!("\"{}\":", k[(next() % 5) as usize]));
                        random_value(&mut next, 3, &mut json);
                    }
                    json.push_str(r#"},"finish_reason":"#);
                    random_value(&mut next, 4, &mut json);
                    json.push('}');
                }
                json.push_str("]}");
            }
            // Now and then broken: cut short, or a stray byte in it.
            let mut bytes = json.into_bytes();
            match next() % 16 {
                0 if !bytes.is_empty() => bytes.truncate((next() % bytes.len() as u64) as usize),
                1 => {
                    let at = (next() % (bytes.len() as u64 + 1)) as usize;
                    bytes.insert(at, b"{}[],:\"\\x"[(next() % 9) as usize]);
                }
                _ => {}
            }
            let mut event = b"data: ".to_vec();
            event.extend_from_slice(&bytes);
            let ours = has_output(&event);
            assert_eq!(
                ours,
                has_output_by_value(&event),
                "{}",
                String::from_utf8_lossy(&event)
            );
            events += 1;
            outputs += usize::from(ours == Ok(true));
            errors += usize::from(ours.is_err());
        }
        // The generator reaches every answer.
        assert!(
            outputs > events / 50 && errors > events / 50,
            "{outputs} {errors}"
        );
        for event in [
            &br#"data: {"choices":[{"delta":{"content":"x","content":""}}]}"#[..],
            br#"data: {"choices":[{"delta":{"content":""},"delta":{"refusal":"no"}}]}"#,
            br#"data: {"choices":[{"text":"a"}],"choices":{}}"#,
            br#"data: {"error":{"m":1},"error":null,"choices":[{"finish_reason":"stop"}]}"#,
            br#"data: {"choices":[{"delta":{"tool_calls":[{}]}}],"x":1e400}"#,
            br#"data: [{"choices":[{"text":"a"}]}]"#,
        ] {
            assert_eq!(has_output(event), has_output_by_value(event));
        }
    }
}
