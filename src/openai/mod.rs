//! OpenAI wire types: requests parsed only as far as Fuke acts on them (the other fields are kept
//! as raw JSON and re-emitted byte-for-byte), usage objects, and model listings.

use bytes::{BufMut, Bytes, BytesMut};

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::Error;

/// Deepest JSON nesting accepted. serde_json skips raw values without recursion, so depth is
/// no danger to Fuke itself; the limit protects upstreams from bodies no real request needs.
pub const MAX_JSON_DEPTH: usize = 128;

/// Whether `json` nests arrays/objects deeper than `max` (strings are skipped correctly).
fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        match b {
            // Strings hold most of a request's bytes: jump from quote or backslash to the next.
            b'"' => {
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', json.get(i..).unwrap_or_default()) {
                        None => return false,
                        Some(j) if json[i + j] == b'\\' => i += j + 2,
                        Some(j) => {
                            i += j + 1;
                            break;
                        }
                    }
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    false
}

/// The JSON endpoints Fuke routes by `model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    AudioTranscriptions,
}

impl Endpoint {
    /// Path below the upstream's base URL (which ends in `/v1`).
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::AudioTranscriptions => "/audio/transcriptions",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::AudioTranscriptions => "audio.transcriptions",
        }
    }

    fn can_stream(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }
}

/// A JSON request body: every top-level field as the raw bytes it arrived in (borrowed from the
/// body, in order), plus the few fields the gateway acts on, validated.
#[derive(Debug)]
pub struct JsonRequest<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    pub endpoint: Endpoint,
    /// Borrowed from the body unless it was written with escapes.
    pub model: Cow<'a, str>,
    pub stream: bool,
    /// Whether the client itself asked for the usage chunk.
    pub include_usage: bool,
}

#[derive(Deserialize)]
struct MessageShape<'a> {
    #[serde(borrow)]
    role: Option<&'a RawValue>,
}

/// A JSON string borrowed from the body when it has no escapes, owned otherwise.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The top-level object as (key, raw value) pairs in order.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((key, value));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// The fast check of `messages`: every element an object whose `role` is a known string.
#[derive(Deserialize)]
struct RoleOnly<'a> {
    #[serde(borrow)]
    role: Text<'a>,
}

/// Whether `messages` is a non-empty array of objects whose every `role` is a known string,
/// checked element by element as the parser reads them (nothing collected).
struct RolesKnown(bool);

impl<'de> Deserialize<'de> for RolesKnown {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RolesKnown;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RolesKnown, A::Error> {
                let mut any = false;
                let mut known = true;
                while let Some(m) = seq.next_element::<RoleOnly<'de>>()? {
                    any = true;
                    known &= ROLES.contains(&m.role.0.as_ref());
                }
                Ok(RolesKnown(any && known))
            }
        }
        d.deserialize_seq(V)
    }
}

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

fn type_error(param: &str, expected: &str) -> Error {
    Error::invalid(
        format!("Invalid type for '{param}': expected {expected}."),
        Some(param.to_owned()),
    )
}

fn missing(param: &str) -> Error {
    Error::invalid(
        format!("Missing required parameter: '{param}'."),
        Some(param.to_owned()),
    )
}

// === impl JsonRequest ===

impl<'a> JsonRequest<'a> {
    /// A top-level field as it arrived (the last occurrence, as JSON parsers agree).
    pub fn field(&self, key: &str) -> Option<&'a RawValue> {
        self.get(key)
    }

    /// Every top-level field in order, duplicates included.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.fields.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    /// The last occurrence of a top-level field (JSON parsers agree that the last one wins).
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    pub fn parse(endpoint: Endpoint, body: &'a [u8]) -> Result<Self, Error> {
        if nests_deeper_than(body, MAX_JSON_DEPTH) {
            return Err(Error::invalid(
                format!("The request body nests JSON deeper than {MAX_JSON_DEPTH} levels."),
                None,
            ));
        }
        // A body that is UTF-8 (every valid request) is read as a `str`: serde_json then
        // checks no string and no raw value again. Anything else is read as bytes, which
        // fails with the error (and position) it always did.
        let fields = match std::str::from_utf8(body) {
            Ok(text) => serde_json::from_str::<Fields<'a>>(text),
            Err(_) => serde_json::from_slice::<Fields<'a>>(body),
        };
        let fields: Vec<(Cow<'a, str>, &'a RawValue)> = fields
            .map(|f| f.0)
            .map_err(|e| {
                let what = if e.is_data() {
                    "the body must be a JSON object"
                } else {
                    "the body is not valid JSON"
                };
                Error::invalid(
                    format!(
                        "We could not parse the JSON body of your request: {what} (line {}, column {}).",
                        e.line(),
                        e.column()
                    ),
                    None,
                )
            })?;
        let mut req = JsonRequest {
            fields,
            endpoint,
            model: Cow::Borrowed(""),
            stream: false,
            include_usage: false,
        };

        let model = match req.get("model") {
            None => return Err(missing("model")),
            Some(raw) => {
                serde_json::from_str::<Text<'a>>(raw.get())
                    .map_err(|_| type_error("model", "a string"))?
                    .0
            }
        };
        if model.is_empty() {
            return Err(missing("model"));
        }

        match endpoint {
            Endpoint::ChatCompletions => validate_messages(req.get("messages"))?,
            Endpoint::Completions => {
                if req.get("prompt").is_none() {
                    return Err(missing("prompt"));
                }
            }
            Endpoint::Embeddings => {
                if req.get("input").is_none() {
                    return Err(missing("input"));
                }
            }
            Endpoint::AudioTranscriptions => {}
        }

        let stream = match req.get("stream") {
            None => false,
            Some(raw) => serde_json::from_str::<Option<bool>>(raw.get())
                .map_err(|_| type_error("stream", "a boolean"))?
                .unwrap_or(false),
        };
        if stream && !endpoint.can_stream() {
            return Err(Error::invalid(
                "This endpoint does not support 'stream'.",
                Some("stream".to_owned()),
            ));
        }
        let include_usage = match req.get("stream_options") {
            None => false,
            Some(raw) => {
                #[derive(Deserialize)]
                struct StreamOptions {
                    include_usage: Option<bool>,
                }
                serde_json::from_str::<Option<StreamOptions>>(raw.get())
                    .map_err(|_| {
                        type_error("stream_options", "an object with a boolean 'include_usage'")
                    })?
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false)
            }
        };

        req.model = model;
        req.stream = stream;
        req.include_usage = include_usage;
        Ok(req)
    }

    /// The body with top-level field `key` set to the JSON `value` (in place of its last
    /// occurrence; earlier duplicates dropped), every other field as it arrived.
    pub fn body_with(&self, key: &str, value: &[u8]) -> Bytes {
        self.body_with_all(&[(key, value)])
    }

    /// The body with each `(key, JSON value)` set as [`body_with`](Self::body_with) does; keys
    /// the body lacks are appended in the order given.
    pub fn body_with_all(&self, changes: &[(&str, &[u8])]) -> Bytes {
        let last = |key: &str| self.fields.iter().rposition(|(k, _)| k == key);
        let lasts: Vec<Option<usize>> = changes.iter().map(|(k, _)| last(k)).collect();
        let mut out = BytesMut::with_capacity(
            self.fields
                .iter()
                .map(|(k, v)| k.len() + v.get().len() + 4)
                .sum::<usize>()
                + changes
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 4)
                    .sum::<usize>()
                + 2,
        );
        let mut first = true;
        let mut put = |out: &mut BytesMut, k: &str, v: &[u8]| {
            out.put_u8(if first { b'{' } else { b',' });
            first = false;
            put_json_string(out, k);
            out.put_u8(b':');
            out.put_slice(v);
        };
        for (i, (k, raw)) in self.fields.iter().enumerate() {
            let v: &[u8] = match changes.iter().position(|(c, _)| c == k) {
                Some(ci) if lasts[ci] != Some(i) => continue,
                Some(ci) => changes[ci].1,
                None => raw.get().as_bytes(),
            };
            put(&mut out, k, v);
        }
        for ((k, v), at) in changes.iter().zip(&lasts) {
            if at.is_none() {
                put(&mut out, k, v);
            }
        }
        if first {
            out.put_u8(b'{');
        }
        out.put_u8(b'}');
        out.freeze()
    }

    /// The body sent upstream: the client's fields in their order and bytes, with `model`
    /// replaced by the upstream's name and, for streams, `stream_options.include_usage`
    /// forced on so the gateway always learns the real token counts.
    pub fn upstream_body(&self, upstream_model: &str) -> Bytes {
        self.upstream_body_as(upstream_model, self.stream)
    }

    /// [`Self::upstream_body`], streamed or not as `stream` says: routing streams a
    /// non-streaming request from a candidate internally, so that its first-token deadline means
    /// the same for both, and assembles the JSON answer itself.
    pub fn upstream_body_as(&self, upstream_model: &str, stream: bool) -> Bytes {
        let size: usize = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let mut out = BytesMut::with_capacity(size + upstream_model.len() + 48);
        out.put_u8(b'{');
        let mut first = true;
        // Writes `"key":`; the caller writes the value.
        let mut put_key = |out: &mut BytesMut, key: &str| {
            if !first {
                out.put_u8(b',');
            }
            first = false;
            put_json_string(out, key);
            out.put_u8(b':');
        };
        let mut saw_stream_options = false;
        let mut saw_stream = false;
        for (key, raw) in &self.fields {
            put_key(&mut out, key);
            match key.as_ref() {
                "model" => put_json_string(&mut out, upstream_model),
                "stream" if stream != self.stream => {
                    saw_stream = true;
                    out.put_slice(if stream { b"true" } else { b"false" });
                }
                "stream_options" if stream => {
                    saw_stream_options = true;
                    out.put_slice(&forced_stream_options(raw));
                }
                _ => out.put_slice(raw.get().as_bytes()),
            }
        }
        if stream && !self.stream && !saw_stream {
            put_key(&mut out, "stream");
            out.put_slice(b"true");
        }
        if stream && !saw_stream_options {
            put_key(&mut out, "stream_options");
            out.put_slice(br#"{"include_usage":true}"#);
        }
        out.put_u8(b'}');
        out.freeze()
    }
}

/// `s` as a JSON string, escaped exactly as serde_json escapes; the common case (nothing to
/// escape: keys, model names, ids) copies it as it is.
pub fn put_json_string(out: &mut impl BufMut, s: &str) {
    if !needs_escape(s.as_bytes()) {
        out.put_u8(b'"');
        out.put_slice(s.as_bytes());
        out.put_u8(b'"');
    } else {
        out.put_slice(&serde_json::to_vec(s).unwrap_or_default());
    }
}

/// Whether JSON escapes any byte of `s` (a control byte, `"` or `\`; serde_json escapes
/// nothing else), eight bytes at a time: this runs on every id and name the gateway writes.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // The high bit of some byte is set iff a byte of `v` is below `n` (exact for n <= 0x80).
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH;
    let zero = |v: u64| below(v, 1);
    let mut words = s.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let v = u64::from_ne_bytes(b);
        if below(v, 0x20) | zero(v ^ (ONES * u64::from(b'"'))) | zero(v ^ (ONES * u64::from(b'\\')))
            != 0
        {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

fn forced_stream_options(raw: &RawValue) -> Vec<u8> {
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(raw.get()).unwrap_or_default();
    map.insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&map).unwrap_or_else(|_| br#"{"include_usage":true}"#.to_vec())
}

fn validate_messages(raw: Option<&RawValue>) -> Result<(), Error> {
    let raw = raw.ok_or_else(|| missing("messages"))?;
    // Fast path: one pass that touches only `role`; the precise error needs the slow one.
    if serde_json::from_str::<RolesKnown>(raw.get()).is_ok_and(|ok| ok.0) {
        return Ok(());
    }
    let messages: Vec<&RawValue> =
        serde_json::from_str(raw.get()).map_err(|_| type_error("messages", "an array"))?;
    if messages.is_empty() {
        return Err(Error::invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            Some("messages".to_owned()),
        ));
    }
    for (i, message) in messages.iter().enumerate() {
        let shape: MessageShape = serde_json::from_str(message.get())
            .map_err(|_| type_error(&format!("messages[{i}]"), "an object"))?;
        let param = format!("messages[{i}].role");
        let role = shape.role.ok_or_else(|| missing(&param))?;
        let role: &str =
            serde_json::from_str(role.get()).map_err(|_| type_error(&param, "a string"))?;
        if !ROLES.contains(&role) {
            return Err(Error::invalid(
                format!(
                    "Invalid value: '{role}'. Supported values are: 'system', 'developer', 'user', 'assistant', 'tool' and 'function'."
                ),
                Some(param),
            ));
        }
    }
    Ok(())
}

/// Token counts as OpenAI reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    /// `prompt_tokens_details`: of which `cached_tokens` the provider served from its prompt
    /// cache (billed at its cached-input price). Absent or `null` when it reported none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`; only the field billing needs is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// `null` reads as 0: one odd field must not cost the whole usage record.
    #[serde(default, deserialize_with = "zero_if_null")]
    pub cached_tokens: u64,
}

fn zero_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or(0))
}

impl Usage {
    /// Prompt tokens the provider served from its prompt cache (never more than the prompt).
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details
            .map_or(0, |d| d.cached_tokens.min(self.prompt_tokens))
    }
}

/// Reads `usage` out of a complete JSON response without parsing the rest: finds the `"usage"`
/// key (an unescaped `"usage"` can only be a key; inside strings its quotes are escaped) and
/// parses the object after it.
pub fn usage_of_response(body: &[u8]) -> Option<Usage> {
    let at = find_usage_object(body)?;
    let mut de = serde_json::Deserializer::from_slice(&body[at..]);
    Usage::deserialize(&mut de).ok()
}

/// Offset of the `{` that opens the value of the last `"usage"` key whose value is an object.
/// Runs on every SSE event: a forward search (vectorized, built once) over occurrences, keeping
/// the last that qualifies; a reverse search has only the scalar two-way algorithm, which cost
/// ~7 % of a streamed request's instructions.
pub fn find_usage_object(json: &[u8]) -> Option<usize> {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    FINDER
        .find_iter(json)
        .filter_map(|i| usage_object_at(json, i))
        .last()
}

/// Where the object value of the `"usage"` key at `i` opens, if that is a key with an object.
fn usage_object_at(json: &[u8], i: usize) -> Option<usize> {
    if i > 0 && json[i - 1] == b'\\' {
        return None;
    }
    let after = &json[i + 7..];
    let ws = after.len() - after.trim_ascii_start().len();
    let rest = after.trim_ascii_start().strip_prefix(b":")?;
    let ws2 = rest.len() - rest.trim_ascii_start().len();
    (rest.trim_ascii_start().first() == Some(&b'{')).then_some(i + 7 + ws + 1 + ws2)
}

#[derive(Serialize)]
pub struct ModelObject<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelObject<'a>>,
}

impl<'a> ModelObject<'a> {
    pub fn new(id: &'a str) -> Self {
        ModelObject {
            id,
            object: "model",
            created: 0,
            owned_by: "fuke",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #[test]
    fn json_strings_are_written_as_serde_json_writes_them() {
        use super::*;
        // Every byte class the escape check tells apart, at every offset in and after a word.
        let alphabet = [
            "a", "Z", " ", "~", "\u{7f}", "\u{0}", "\u{1f}", "\n", "\t", "\"", "\\", "/", "é",
            "中", "\u{2028}", "😀",
        ];
        let mut next = xorshift(0x5eed_1234);
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let mut out = Vec::new();
            put_json_string(&mut out, &s);
            assert_eq!(out, serde_json::to_vec(&s).unwrap(), "{s:?}");
        }
        // Long clean runs with one byte to escape at each position.
        for special in ["\"", "\\", "\u{0}", "\u{1f}"] {
            for at in 0..40 {
                let s = format!("{}{special}{}", "x".repeat(at), "y".repeat(40 - at));
                let mut out = Vec::new();
                put_json_string(&mut out, &s);
                assert_eq!(out, serde_json::to_vec(&s).unwrap(), "{s:?}");
            }
        }
    }

    /// The byte-at-a-time definition [`nests_deeper_than`] must agree with.
    fn nests_deeper_than_bytewise(json: &[u8], max: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &b in json {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > max {
                        return true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }

    /// A repeatable stream of pseudo-random numbers for the equivalence tests.
    pub(crate) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// The reverse-search definition [`find_usage_object`] must agree with.
    fn find_usage_object_rev(json: &[u8]) -> Option<usize> {
        let finder = memchr::memmem::FinderRev::new(b"\"usage\"");
        let mut end = json.len();
        while let Some(i) = finder.rfind(&json[..end]) {
            end = i;
            if let Some(at) = usage_object_at(json, i) {
                return Some(at);
            }
        }
        None
    }

    #[test]
    fn usage_search_agrees_with_the_reverse_definition() {
        const PARTS: &[&[u8]] = &[
            b"\"usage\"",
            b"\\\"usage\"",
            b":",
            b" ",
            b"{",
            b"}",
            b"\"x\"",
            b"1",
            b",",
            b"\"usage\":{\"total_tokens\":3}",
            b"\"usage\": null",
        ];
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..100_000 {
            let n = (next() % 10) as usize;
            let json: Vec<u8> = (0..n)
                .flat_map(|_| {
                    PARTS[(next() % PARTS.len() as u64) as usize]
                        .iter()
                        .copied()
                })
                .collect();
            assert_eq!(
                find_usage_object(&json),
                find_usage_object_rev(&json),
                "{:?}",
                String::from_utf8_lossy(&json)
            );
        }
    }

    #[test]
    fn depth_scan_agrees_with_the_bytewise_definition() {
        const ALPHABET: &[u8] = b"\"\\[]{}a:,";
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..200_000 {
            let len = (next() % 24) as usize;
            let json: Vec<u8> = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            for max in [0, 1, 2, 3] {
                assert_eq!(
                    nests_deeper_than(&json, max),
                    nests_deeper_than_bytewise(&json, max),
                    "{:?} max {max}",
                    String::from_utf8_lossy(&json)
                );
            }
        }
    }

    use super::*;

    #[test]
    fn unknown_fields_pass_through_byte_for_byte() {
        let body = br#"{"model":"alias","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"a" : 1.50}}}],"seed":7}"#;
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body).unwrap();
        let out = req.upstream_body("gpt-x");
        let s = std::str::from_utf8(&out).unwrap();
        assert!(s.starts_with(r#"{"model":"gpt-x","messages":[{"role":"user","content":"hi"}],"#));
        assert!(s.contains(r#""parameters":{"a" : 1.50}"#));
        assert!(!s.contains("stream_options"));
    }

    #[test]
    fn a_json_request_can_be_asked_for_as_a_stream() {
        let body = br#"{"model":"a","messages":[{"role":"user","content":"x"}],"temperature":0.5}"#;
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body).unwrap();
        assert!(!req.stream);
        let v: serde_json::Value =
            serde_json::from_slice(&req.upstream_body_as("m", true)).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        assert_eq!(v["temperature"], 0.5);
        let explicit =
            br#"{"model":"a","stream":false,"messages":[{"role":"user","content":"x"}]}"#;
        let req = JsonRequest::parse(Endpoint::ChatCompletions, explicit).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&req.upstream_body_as("m", true)).unwrap();
        assert_eq!(
            v["stream"], true,
            "an explicit false is turned, not duplicated"
        );
        let text = String::from_utf8(req.upstream_body_as("m", true).to_vec()).unwrap();
        assert_eq!(text.matches("\"stream\"").count(), 1, "{text}");
    }

    #[test]
    fn stream_forces_include_usage_and_keeps_other_options() {
        let body = br#"{"model":"a","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":false,"other":1}}"#;
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body).unwrap();
        assert!(req.stream && !req.include_usage);
        let v: serde_json::Value = serde_json::from_slice(&req.upstream_body("m")).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["other"], 1);
    }

    #[test]
    fn usage_is_found_without_parsing_the_rest() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"the \"usage\": {\"prompt_tokens\":99}"}}],"usage" : {"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let u = usage_of_response(body).unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (3, 4, 7)
        );
        assert_eq!(usage_of_response(br#"{"usage":null}"#), None);
        assert_eq!(usage_of_response(br#"{"choices":[]}"#), None);
    }

    #[test]
    fn depth_is_limited_but_brackets_in_strings_do_not_count() {
        let ok = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "[".repeat(500)
        );
        assert!(JsonRequest::parse(Endpoint::ChatCompletions, ok.as_bytes()).is_ok());
        let deep = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"x":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(JsonRequest::parse(Endpoint::ChatCompletions, deep.as_bytes()).is_err());
    }

    #[test]
    fn escaped_keys_and_duplicates() {
        let body = br#"{"mod\u0065l":"a","messages":[{"role":"user","content":"x"}],"model":"b"}"#;
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body).unwrap();
        assert_eq!(req.model, "b");
    }

    #[test]
    fn errors_name_the_param() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"{", None),
            (b"[1]", None),
            (br#"{"messages":[]}"#, Some("model")),
            (br#"{"model":3,"messages":[]}"#, Some("model")),
            (br#"{"model":"m"}"#, Some("messages")),
            (br#"{"model":"m","messages":{}}"#, Some("messages")),
            (br#"{"model":"m","messages":[]}"#, Some("messages")),
            (br#"{"model":"m","messages":[1]}"#, Some("messages[0]")),
            (
                br#"{"model":"m","messages":[{"role":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                br#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#,
                Some("stream"),
            ),
        ];
        for (body, param) in cases {
            match JsonRequest::parse(Endpoint::ChatCompletions, body) {
                Err(Error::InvalidRequest { param: p, .. }) => {
                    assert_eq!(p.as_deref(), *param, "{}", String::from_utf8_lossy(body))
                }
                other => panic!("{:?} for {}", other, String::from_utf8_lossy(body)),
            }
        }
    }
}
