//! Content rules security teams put in policy (`rules:`), attached to tenants and model aliases:
//! redaction (built-in detectors and custom regexes, replaced by a token), blocking (keywords or
//! regexes, case- and width-insensitive, refused with a 400 that names the rule and never echoes
//! the text), caps (max_tokens ceiling, allowed parameters, message and prompt size) and data
//! residency (local models only). They run on the request before the cache, the knowledge base
//! and routing; rule sets with `responses: true` also redact answers, JSON and streamed
//! ([`stream`]). Every regex is compiled once, when the policy version is loaded.

pub mod detect;
pub mod stream;

use std::sync::Arc;

use aho_corasick::AhoCorasick;
use bytes::Bytes;
use regex::Regex;
use serde_json::Value;

use crate::cache::guard::narrow_char;
use crate::error::Error;
use crate::openai::{Endpoint, JsonRequest};
use crate::policy::raw::{RawRuleSet, Residency};
use detect::{Builtin, Detector};

/// One named rule set, compiled.
#[derive(Debug)]
pub struct RuleSet {
    pub name: Arc<str>,
    redact: Vec<Redaction>,
    block: Vec<BlockRule>,
    caps: Caps,
    /// Requests under this set are served by local models only.
    pub local_only: bool,
    /// Its redactions also apply to answers.
    pub responses: bool,
}

#[derive(Debug)]
struct Redaction {
    /// `set/rule`: the name in metrics and on the usage event.
    hit: Arc<str>,
    detector: Detector,
    replacement: String,
}

#[derive(Debug)]
struct BlockRule {
    hit: Arc<str>,
    keywords: Option<AhoCorasick>,
    pattern: Option<Regex>,
}

#[derive(Debug, Default)]
struct Caps {
    max_tokens: Option<u32>,
    allowed_params: Option<Vec<String>>,
    max_messages: Option<usize>,
    max_prompt_chars: Option<usize>,
}

/// Rule names seen while handling one request, each once, in the order they fired.
#[derive(Debug, Default, Clone)]
pub struct Hits(pub Vec<Arc<str>>);

impl Hits {
    pub fn add(&mut self, hit: &Arc<str>) {
        if !self.0.iter().any(|h| h == hit) {
            self.0.push(hit.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `set/rule,set/rule`: for logs and headers.
    pub fn joined(&self) -> String {
        let names: Vec<&str> = self.0.iter().map(|h| h.as_ref()).collect();
        names.join(",")
    }
}

/// Redaction passes over one text at most (see [`RuleSet::redact`]).
const MAX_PASSES: usize = 4;

/// Longest name or replacement token accepted.
const MAX_NAME: usize = 64;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Folds what should not matter to a block rule: ASCII letters written full-width (as Chinese
/// input methods produce them) become ASCII, the ideographic space a space, and every letter
/// lower case.
pub fn fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let c = narrow_char(c);
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// A block pattern as written, with full-width characters turned into their ASCII twins as
/// escaped literals (so `（` is a parenthesis to match, not a group). Case is left to the
/// regex's case-insensitive flag: lowercasing the source would turn `\D` into `\d`.
fn narrow_pattern(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        let n = narrow_char(c);
        if n == c {
            out.push(c);
        } else {
            out.push_str(&regex::escape(n.encode_utf8(&mut [0; 4])));
        }
    }
    out
}

/// `text` with full-width forms narrowed, and for each of its bytes the offset in `text` it
/// came from (plus the end); `None` when there is nothing to narrow.
fn narrowed(text: &str) -> Option<(String, Vec<usize>)> {
    if !text.chars().any(|c| narrow_char(c) != c) {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut origin = Vec::with_capacity(text.len() + 1);
    for (i, c) in text.char_indices() {
        let before = out.len();
        out.push(narrow_char(c));
        origin.resize(origin.len() + (out.len() - before), i);
    }
    origin.push(text.len());
    Some((out, origin))
}

// === impl RuleSet ===

impl RuleSet {
    /// Compiles `rules.NAME`; on failure every problem, as (key path below the set, message).
    pub fn compile(name: &str, raw: &RawRuleSet) -> Result<RuleSet, Vec<(String, String)>> {
        let mut problems = Vec::new();
        if !valid_name(name) {
            problems.push((
                String::new(),
                "rule set names use letters, digits, `_`, `-` and `.` (at most 64)".to_string(),
            ));
        }
        let mut names: Vec<String> = Vec::new();
        let mut taken = |rule: &str, at: String, problems: &mut Vec<(String, String)>| {
            if names.iter().any(|n| n == rule) {
                problems.push((at, format!("rule name `{rule}` is used twice in this set")));
            } else {
                names.push(rule.to_string());
            }
        };

        let mut redact = Vec::new();
        for (i, r) in raw.redact.iter().enumerate() {
            let at = format!("redact[{i}]");
            let (detector, default_name, token, order) = match (&r.builtin, &r.pattern) {
                (Some(b), None) => match Builtin::parse(b) {
                    Some(b) => (Detector::builtin(b), Some(b.name()), b.token(), b.order()),
                    None => {
                        let known: Vec<&str> = Builtin::ALL.iter().map(|(n, _)| *n).collect();
                        problems.push((
                            format!("{at}.builtin"),
                            format!("unknown detector `{b}` (one of {})", known.join(", ")),
                        ));
                        continue;
                    }
                },
                (None, Some(p)) => match detect::compile(p, false) {
                    Ok(re) => (Detector::custom(re), None, "[REDACTED]", u8::MAX),
                    Err(e) => {
                        problems.push((format!("{at}.pattern"), e));
                        continue;
                    }
                },
                _ => {
                    problems.push((
                        at,
                        "set exactly one of `builtin` (a detector) or `pattern` (a regex)"
                            .to_string(),
                    ));
                    continue;
                }
            };
            let Some(rule) = r.name.as_deref().or(default_name) else {
                problems.push((
                    format!("{at}.name"),
                    "a `pattern` rule needs a `name` (it is what metrics and errors show)"
                        .to_string(),
                ));
                continue;
            };
            if !valid_name(rule) {
                problems.push((
                    format!("{at}.name"),
                    "use letters, digits, `_`, `-` and `.` (at most 64)".to_string(),
                ));
                continue;
            }
            taken(rule, format!("{at}.name"), &mut problems);
            let replacement = r.replacement.clone().unwrap_or_else(|| token.to_string());
            if replacement.chars().count() > MAX_NAME {
                problems.push((
                    format!("{at}.replacement"),
                    format!("at most {MAX_NAME} characters"),
                ));
                continue;
            }
            if !detector.find(&replacement).is_empty() {
                problems.push((
                    format!("{at}.replacement"),
                    "the replacement would itself be redacted by this rule".to_string(),
                ));
                continue;
            }
            redact.push((
                order,
                Redaction {
                    hit: format!("{name}/{rule}").into(),
                    detector,
                    replacement,
                },
            ));
        }
        // Specific digit patterns first (an ID number is not a card or a phone number); custom
        // rules after the built-ins, in the order written.
        redact.sort_by_key(|(order, _)| *order);
        let redact = redact.into_iter().map(|(_, r)| r).collect();

        let mut block = Vec::new();
        for (i, b) in raw.block.iter().enumerate() {
            let at = format!("block[{i}]");
            if !valid_name(&b.name) {
                problems.push((
                    format!("{at}.name"),
                    "use letters, digits, `_`, `-` and `.` (at most 64)".to_string(),
                ));
                continue;
            }
            taken(&b.name, format!("{at}.name"), &mut problems);
            if b.keywords.is_empty() && b.pattern.is_none() {
                problems.push((
                    at,
                    "needs `keywords` (a list) or a `pattern` (a regex)".to_string(),
                ));
                continue;
            }
            let mut folded = Vec::with_capacity(b.keywords.len());
            let mut bad = false;
            for (k, word) in b.keywords.iter().enumerate() {
                let f = fold(word.trim());
                if f.is_empty() {
                    problems.push((format!("{at}.keywords[{k}]"), "must not be empty".into()));
                    bad = true;
                }
                folded.push(f);
            }
            let keywords = if folded.is_empty() {
                None
            } else {
                match AhoCorasick::new(&folded) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        problems.push((format!("{at}.keywords"), e.to_string()));
                        continue;
                    }
                }
            };
            let pattern = match &b.pattern {
                None => None,
                Some(p) => match detect::compile(&narrow_pattern(p), true) {
                    Ok(re) => Some(re),
                    Err(e) => {
                        problems.push((format!("{at}.pattern"), e));
                        continue;
                    }
                },
            };
            if bad {
                continue;
            }
            block.push(BlockRule {
                hit: format!("{name}/{}", b.name).into(),
                keywords,
                pattern,
            });
        }

        let c = &raw.caps;
        for (key, v) in [
            ("max_tokens", c.max_tokens.map(|v| v as usize)),
            ("max_messages", c.max_messages),
            ("max_prompt_chars", c.max_prompt_chars),
        ] {
            if v == Some(0) {
                problems.push((
                    format!("caps.{key}"),
                    "must be at least 1 (leave it out for no cap)".into(),
                ));
            }
        }
        if let Some(list) = &c.allowed_params {
            if list.is_empty() {
                problems.push((
                    "caps.allowed_params".into(),
                    "list the allowed parameters (leave it out to allow all)".into(),
                ));
            }
            if !list
                .iter()
                .any(|p| p == "messages" || p == "prompt" || p == "input")
            {
                problems.push((
                    "caps.allowed_params".into(),
                    "allows no request text (`messages`, `prompt` or `input`): every request would be refused".into(),
                ));
            }
        }
        if raw.responses && raw.redact.is_empty() {
            problems.push((
                "responses".into(),
                "answers are redacted by this set's `redact` rules, and it has none".into(),
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(RuleSet {
            name: name.into(),
            redact,
            block,
            caps: Caps {
                max_tokens: c.max_tokens,
                allowed_params: c.allowed_params.clone(),
                max_messages: c.max_messages,
                max_prompt_chars: c.max_prompt_chars,
            },
            local_only: raw.residency == Some(Residency::Local),
            responses: raw.responses,
        })
    }

    /// The rule's name for a cap (`set/max_tokens`).
    fn cap_hit(&self, cap: &str) -> Arc<str> {
        format!("{}/{cap}", self.name).into()
    }

    /// `text` with every redaction of this set applied, or `None` when nothing matched.
    /// Detectors see full-width digits and letters as ASCII (Chinese input methods type them).
    pub fn redact(&self, text: &str, hits: &mut Hits) -> Option<String> {
        let mut out: Option<String> = None;
        // A replacement can free a neighbour that a longer run of digits hid from an earlier
        // detector ("…650105" + "19491231001" once a custom rule took "ACME-650105"), so the
        // set runs again until nothing changes (found by fuzzing), a few passes at most.
        for _ in 0..MAX_PASSES {
            let mut changed = false;
            for r in &self.redact {
                let cur = out.as_deref().unwrap_or(text);
                let found = find(&r.detector, cur);
                if found.is_empty() {
                    continue;
                }
                let mut next = String::with_capacity(cur.len());
                let mut last = 0;
                for (s, e) in found {
                    next.push_str(&cur[last..s]);
                    next.push_str(&r.replacement);
                    last = e;
                }
                next.push_str(&cur[last..]);
                hits.add(&r.hit);
                out = Some(next);
                changed = true;
            }
            if !changed {
                break;
            }
        }
        out
    }

    /// Byte ranges of `text` that some redaction of this set matches.
    pub fn matches(&self, text: &str) -> Vec<(usize, usize)> {
        self.redact
            .iter()
            .flat_map(|r| find(&r.detector, text))
            .collect()
    }

    /// The first block rule that `folded` (see [`fold`]) trips.
    fn blocked_by(&self, folded: &str) -> Option<&Arc<str>> {
        self.block
            .iter()
            .find(|b| {
                b.keywords.as_ref().is_some_and(|k| k.is_match(folded))
                    || b.pattern.as_ref().is_some_and(|p| p.is_match(folded))
            })
            .map(|b| &b.hit)
    }
}

/// Confirmed matches of `detector` in `text`, found in its narrowed form, as ranges of `text`.
fn find(detector: &Detector, text: &str) -> Vec<(usize, usize)> {
    match narrowed(text) {
        None => detector.find(text),
        Some((n, origin)) => detector
            .find(&n)
            .into_iter()
            .map(|(s, e)| (origin[s], origin[e]))
            .collect(),
    }
}

/// The rule sets a request runs under: its tenant's, then its model alias's (each once).
pub fn for_request(tenant: &[Arc<RuleSet>], alias: &[Arc<RuleSet>]) -> Vec<Arc<RuleSet>> {
    let mut sets: Vec<Arc<RuleSet>> = tenant.to_vec();
    for s in alias {
        if !sets.iter().any(|t| Arc::ptr_eq(t, s)) {
            sets.push(s.clone());
        }
    }
    sets
}

/// The first set that keeps requests on local models (its `set/residency` hit name).
pub fn local_only(sets: &[Arc<RuleSet>]) -> Option<Arc<str>> {
    sets.iter()
        .find(|s| s.local_only)
        .map(|s| s.cap_hit("residency"))
}

/// The sets whose redactions apply to answers; `None` when there are none.
pub fn for_answers(sets: &[Arc<RuleSet>]) -> Option<Arc<[Arc<RuleSet>]>> {
    let answers: Vec<Arc<RuleSet>> = sets.iter().filter(|s| s.responses).cloned().collect();
    (!answers.is_empty()).then(|| answers.into())
}

/// What applying the rules to a request did: the body to send instead (when text was redacted
/// or a cap rewrote a parameter), and the rules that fired.
#[derive(Debug, Default)]
pub struct Applied {
    pub body: Option<Bytes>,
    pub hits: Hits,
}

/// The request fields holding text, per endpoint.
fn text_fields(endpoint: Endpoint) -> &'static [&'static str] {
    match endpoint {
        Endpoint::ChatCompletions => &["messages"],
        Endpoint::Completions => &["prompt", "suffix"],
        Endpoint::Embeddings => &["input"],
        Endpoint::AudioTranscriptions => &[],
    }
}

/// Text found in a request field, for the rules to check and rewrite.
struct Walk<'f, F: FnMut(&mut String)> {
    f: &'f mut F,
    /// Token-ID input (arrays of integers), which text rules cannot read.
    opaque: bool,
}

impl<F: FnMut(&mut String)> Walk<'_, F> {
    /// A `prompt`/`input`/`content` value: a string, or an array of strings, token IDs or
    /// content parts (every part's `text`, whatever its `type`).
    fn text(&mut self, v: &mut Value) {
        match v {
            Value::String(s) => (self.f)(s),
            Value::Number(_) => self.opaque = true,
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::Object(part) => {
                            if let Some(Value::String(s)) = part.get_mut("text") {
                                (self.f)(s);
                            }
                        }
                        other => self.text(other),
                    }
                }
            }
            _ => {}
        }
    }

    /// Chat messages: contents, refusals, reasoning, and tool-call arguments.
    fn messages(&mut self, v: &mut Value) {
        let Value::Array(messages) = v else { return };
        for m in messages {
            let Value::Object(m) = m else { continue };
            for key in ["content", "refusal", "reasoning_content"] {
                if let Some(v) = m.get_mut(key) {
                    self.text(v);
                }
            }
            if let Some(Value::String(a)) = m
                .get_mut("function_call")
                .and_then(|f| f.get_mut("arguments"))
            {
                (self.f)(a);
            }
            if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
                for call in calls {
                    if let Some(Value::String(a)) = call
                        .get_mut("function")
                        .and_then(|f| f.get_mut("arguments"))
                    {
                        (self.f)(a);
                    }
                }
            }
        }
    }
}

/// Calls `f` on every text string of request field `field`; whether the field also holds
/// token-ID input the rules cannot read.
fn for_each_text(field: &str, v: &mut Value, mut f: impl FnMut(&mut String)) -> bool {
    let mut walk = Walk {
        f: &mut f,
        opaque: false,
    };
    if field == "messages" {
        walk.messages(v);
    } else {
        walk.text(v);
    }
    walk.opaque
}

/// Whether a JSON value has an object with the same key twice, at any depth. Parsers disagree
/// on which copy wins, so a request checked by one reading could be served by the other.
fn has_duplicate_keys(json: &str) -> bool {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Dup;
    impl<'de> DeserializeSeed<'de> for Dup {
        type Value = bool;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Dup {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut keys = std::collections::HashSet::new();
            let mut dup = false;
            while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                dup |= !keys.insert(k);
                dup |= map.next_value_seed(Dup)?;
            }
            Ok(dup)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
            let mut dup = false;
            while let Some(d) = seq.next_element_seed(Dup)? {
                dup |= d;
            }
            Ok(dup)
        }
        fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_str<E>(self, _: &str) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_unit<E>(self) -> Result<bool, E> {
            Ok(false)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    Dup.deserialize(&mut de).unwrap_or(true)
}

/// A request refused by a rule: the client's error, and the rule for metrics.
#[derive(Debug)]
pub struct Refusal {
    pub rule: Option<Arc<str>>,
    pub error: Error,
}

impl From<Error> for Refusal {
    fn from(error: Error) -> Self {
        Refusal { rule: None, error }
    }
}

fn refused(rule: Arc<str>, message: String, param: &str, code: &'static str) -> Refusal {
    Refusal {
        rule: Some(rule),
        error: Error::InvalidRequest {
            message,
            param: Some(param.to_string()),
            code: Some(code),
        },
    }
}

/// Applies `sets` to a request: caps and blocks refuse it (the error names the rule, never the
/// text), redactions and the max_tokens ceiling rewrite it. Nothing is rewritten when no rule
/// fires.
pub fn apply(sets: &[Arc<RuleSet>], req: &JsonRequest<'_>) -> Result<Applied, Refusal> {
    let mut applied = Applied::default();
    if sets.is_empty() {
        return Ok(applied);
    }
    for s in sets {
        if let Some(allowed) = &s.caps.allowed_params
            && let Some((key, _)) = req
                .fields()
                .find(|(k, _)| *k != "model" && !allowed.iter().any(|a| a == k))
        {
            let rule = s.cap_hit("allowed_params");
            return Err(refused(
                rule.clone(),
                format!("The parameter '{key}' is not allowed by policy rule '{rule}'."),
                key,
                "parameter_not_allowed",
            ));
        }
    }
    // Answers redacted by rules cannot come with per-token log probabilities: those repeat
    // the text token by token, outside the redacted fields.
    if let Some(s) = sets.iter().find(|s| s.responses) {
        for key in ["logprobs", "top_logprobs"] {
            if req
                .field(key)
                .is_some_and(|v| !matches!(v.get().trim(), "null" | "false"))
            {
                let rule = s.cap_hit("responses");
                return Err(refused(
                    rule.clone(),
                    format!(
                        "The parameter '{key}' cannot be used: policy rule '{rule}' redacts answers."
                    ),
                    key,
                    "parameter_not_allowed",
                ));
            }
        }
    }

    let mut changes: Vec<(&str, Vec<u8>)> = Vec::new();
    let text_rules = sets
        .iter()
        .find(|s| !s.redact.is_empty() || !s.block.is_empty());
    let needs_text = text_rules.is_some()
        || sets
            .iter()
            .any(|s| s.caps.max_messages.is_some() || s.caps.max_prompt_chars.is_some());
    if let Some(s) = text_rules {
        // What the rules check must be what the upstream reads.
        // Top-level repeats of any key; nested ones inside the text the rules read.
        let mut seen: Vec<&str> = Vec::new();
        for (key, raw) in req.fields() {
            if seen.contains(&key)
                || (text_fields(req.endpoint).contains(&key) && has_duplicate_keys(raw.get()))
            {
                let rule = s.cap_hit("duplicate_keys");
                return Err(refused(
                    rule.clone(),
                    format!(
                        "The request repeats the key '{key}' (or a key inside it); policy rule set '{}' needs unambiguous JSON.",
                        s.name
                    ),
                    key,
                    "duplicate_keys",
                ));
            }
            seen.push(key);
        }
    }
    let mut chars = 0usize;
    for field in text_fields(req.endpoint) {
        let Some(raw) = req.field(field).filter(|_| needs_text) else {
            continue;
        };
        let mut value: Value = serde_json::from_str(raw.get())
            .map_err(|_| Error::invalid(format!("'{field}' is not valid JSON."), None))?;
        if *field == "messages" {
            let n = value.as_array().map_or(0, Vec::len);
            for s in sets {
                if let Some(max) = s.caps.max_messages
                    && n > max
                {
                    let rule = s.cap_hit("max_messages");
                    return Err(refused(
                        rule.clone(),
                        format!(
                            "The request has {n} messages; policy rule '{rule}' allows at most {max}."
                        ),
                        field,
                        "too_many_messages",
                    ));
                }
            }
        }
        let mut blocked: Option<Arc<str>> = None;
        let any_block = sets.iter().any(|s| !s.block.is_empty());
        let opaque = for_each_text(field, &mut value, |s: &mut String| {
            chars += s.chars().count();
            if any_block && blocked.is_none() {
                let folded = fold(s);
                blocked = sets.iter().find_map(|set| set.blocked_by(&folded).cloned());
            }
        });
        if let Some(rule) = blocked {
            return Err(refused(
                rule.clone(),
                format!("This request was blocked by policy rule '{rule}'."),
                field,
                "content_blocked",
            ));
        }
        if opaque && let Some(s) = text_rules {
            let rule = s.cap_hit("token_input");
            return Err(refused(
                rule.clone(),
                format!(
                    "Token-ID input cannot be checked by policy rule set '{}'; send text.",
                    s.name
                ),
                field,
                "unsupported_input",
            ));
        }
        let mut changed = false;
        let hits = &mut applied.hits;
        for_each_text(field, &mut value, |text: &mut String| {
            if let Some(new) = redact_all(sets, text, hits) {
                *text = new;
                changed = true;
            }
        });
        if changed {
            let bytes = serde_json::to_vec(&value).map_err(|e| Error::Internal(e.to_string()))?;
            changes.push((field, bytes));
        }
    }
    for s in sets {
        if let Some(max) = s.caps.max_prompt_chars
            && chars > max
        {
            let rule = s.cap_hit("max_prompt_chars");
            return Err(refused(
                rule.clone(),
                format!(
                    "The request text has {chars} characters; policy rule '{rule}' allows at most {max}."
                ),
                text_fields(req.endpoint)
                    .first()
                    .copied()
                    .unwrap_or("messages"),
                "prompt_too_long",
            ));
        }
    }

    // The max_tokens ceiling (the lowest of the sets'): every limit the request sets is
    // lowered to it, and one is added when it sets none.
    if req.endpoint != Endpoint::Embeddings
        && let Some((set, cap)) = sets
            .iter()
            .filter_map(|s| s.caps.max_tokens.map(|c| (s, c)))
            .min_by_key(|(_, c)| *c)
    {
        let mut present = false;
        for key in ["max_tokens", "max_completion_tokens"] {
            let Some(raw) = req.field(key) else { continue };
            present = true;
            let asked = serde_json::from_str::<Option<u64>>(raw.get())
                .ok()
                .flatten();
            if asked.is_none_or(|n| n > u64::from(cap)) {
                if asked.is_some() {
                    applied.hits.add(&set.cap_hit("max_tokens"));
                }
                changes.push((key, cap.to_string().into_bytes()));
            }
        }
        if !present {
            changes.push(("max_tokens", cap.to_string().into_bytes()));
        }
    }
    if !changes.is_empty() {
        let changes: Vec<(&str, &[u8])> = changes.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        applied.body = Some(req.body_with_all(&changes));
    }
    Ok(applied)
}

/// An answer the response rules could not read (so it must not be let through).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// Keys of an answer's message that carry no text of the model's own.
const NOT_TEXT: &[&str] = &["role", "id", "type", "name", "tool_call_id", "index"];

/// Every string under `v` except the values of [`NOT_TEXT`] keys.
fn for_each_string(v: &mut Value, f: &mut impl FnMut(&mut String)) {
    match v {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter_mut().for_each(|i| for_each_string(i, f)),
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if !NOT_TEXT.contains(&k.as_str()) {
                    for_each_string(v, f);
                }
            }
        }
        _ => {}
    }
}

/// An answer with the sets' redactions applied to all of its text: chat messages (content,
/// refusal, reasoning, tool-call arguments), completion texts, a transcription's text, or a
/// plain-text answer (transcriptions as `text`/`srt`/`vtt`). `Ok(None)`: nothing matched.
/// `Err`: the answer could not be read, so it must not be let through.
pub fn redact_answer(
    sets: &[Arc<RuleSet>],
    body: &[u8],
    hits: &mut Hits,
) -> Result<Option<Bytes>, Unreadable> {
    let mut changed = false;
    let mut apply = |text: &mut String| {
        if let Some(new) = redact_all(sets, text, hits) {
            *text = new;
            changed = true;
        }
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        let mut text = std::str::from_utf8(body)
            .map_err(|_| Unreadable)?
            .to_string();
        apply(&mut text);
        return Ok(changed.then(|| Bytes::from(text)));
    };
    let mut stripped = false;
    if let Some(Value::Array(choices)) = value.get_mut("choices") {
        for c in choices {
            if let Some(t) = c.get_mut("text") {
                for_each_string(t, &mut apply);
            }
            if let Some(m) = c.get_mut("message") {
                for_each_string(m, &mut apply);
            }
            if let Some(l) = c.get_mut("logprobs").filter(|l| !l.is_null()) {
                // Asked for despite the rules (they refuse `logprobs`): never let it out.
                *l = Value::Null;
                stripped = true;
            }
        }
    }
    if let Some(t) = value.get_mut("text") {
        for_each_string(t, &mut apply);
    }
    if !changed && !stripped {
        return Ok(None);
    }
    serde_json::to_vec(&value)
        .map(|v| Some(Bytes::from(v)))
        .map_err(|_| Unreadable)
}

/// `text` with every set's redactions applied (for cached answers replayed to a tenant).
pub fn redact_all(sets: &[Arc<RuleSet>], text: &str, hits: &mut Hits) -> Option<String> {
    let mut out: Option<String> = None;
    for s in sets {
        if let Some(new) = s.redact(out.as_deref().unwrap_or(text), hits) {
            out = Some(new);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::raw::RawRuleSet;

    fn set(yaml: &str) -> RuleSet {
        let raw: RawRuleSet = serde_yaml::from_str(yaml).unwrap();
        RuleSet::compile("s", &raw).unwrap()
    }

    fn problems(yaml: &str) -> Vec<(String, String)> {
        let raw: RawRuleSet = serde_yaml::from_str(yaml).unwrap();
        RuleSet::compile("s", &raw).unwrap_err()
    }

    #[test]
    fn folding_ignores_case_and_width() {
        assert_eq!(fold("ＢＯＭＢ　Bomb"), "bomb bomb");
        assert_eq!(fold("ÉCOLE 炸弹"), "école 炸弹");
    }

    #[test]
    fn redaction_replaces_with_tokens_and_records_hits() {
        let s = set(
            "redact:\n  - builtin: email\n  - builtin: card\n  - pattern: 'ACME-[0-9]{6}'\n    name: ticket\n    replacement: '<T>'\n",
        );
        let mut hits = Hits::default();
        let out = s
            .redact(
                "mail a.b@example.com, card 4111 1111 1111 1111, ticket ACME-123456",
                &mut hits,
            )
            .unwrap();
        assert_eq!(out, "mail [EMAIL], card [CARD], ticket <T>");
        assert_eq!(hits.joined(), "s/card,s/email,s/ticket");
        assert!(s.redact("nothing here", &mut hits).is_none());
    }

    fn apply_to(yaml: &str, body: &str) -> Result<Applied, Refusal> {
        let sets = vec![Arc::new(set(yaml))];
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body.as_bytes()).unwrap();
        apply(&sets, &req)
    }

    #[test]
    fn full_width_digits_are_detected_and_block_patterns_keep_their_meaning() {
        let s = set(
            "redact:\n  - builtin: cn_mobile\nblock:\n  - name: transfer\n    pattern: '请（立即）转账'\n  - name: no_digits\n    pattern: '^\\D+$'\n",
        );
        let mut hits = Hits::default();
        assert_eq!(
            s.redact("电话：１３８１２３４５６７８。", &mut hits)
                .unwrap(),
            "电话：[PHONE]。"
        );
        // `\D` stays "not a digit" (lowercasing the source would have made it `\d`).
        assert_eq!(
            s.blocked_by(&fold("ABC")).map(|h| h.as_ref()),
            Some("s/no_digits")
        );
        assert!(s.blocked_by(&fold("abc1")).is_none());
        // Full-width parentheses are literal text, not a group.
        assert_eq!(
            s.blocked_by(&fold("请(立即)转账")).map(|h| h.as_ref()),
            Some("s/transfer")
        );
    }

    #[test]
    fn requests_the_rules_cannot_read_are_refused() {
        let yaml = "redact:\n  - builtin: email\nresponses: true\n";
        let code = |body: &str| {
            apply_to(yaml, body)
                .map(|_| "ok")
                .unwrap_or_else(|r| match r.error {
                    Error::InvalidRequest { code, .. } => code.unwrap_or("?"),
                    _ => "other",
                })
        };
        assert_eq!(
            code(r#"{"model":"m","messages":[{"role":"user","content":"a"}]}"#),
            "ok"
        );
        assert_eq!(
            code(r#"{"model":"m","messages":[{"role":"user","content":"a","content":"b"}]}"#),
            "duplicate_keys"
        );
        assert_eq!(
            code(r#"{"model":"m","messages":[],"messages":[{"role":"user","content":"b"}]}"#),
            "duplicate_keys"
        );
        assert_eq!(
            code(r#"{"model":"m","logprobs":true,"messages":[{"role":"user","content":"a"}]}"#),
            "parameter_not_allowed"
        );
        assert_eq!(
            code(r#"{"model":"m","logprobs":false,"messages":[{"role":"user","content":"a"}]}"#),
            "ok"
        );
        let sets = vec![Arc::new(set(yaml))];
        let req = JsonRequest::parse(Endpoint::Embeddings, br#"{"model":"m","input":[[1,2,3]]}"#)
            .unwrap();
        let err = apply(&sets, &req).unwrap_err();
        assert_eq!(err.rule.as_deref(), Some("s/token_input"));
    }

    #[test]
    fn every_text_field_of_a_request_is_redacted() {
        let applied = apply_to(
            "redact:\n  - builtin: email\n",
            r#"{"model":"m","messages":[
                {"role":"user","content":[{"type":"input_text","text":"a@b.co"},{"text":"c@d.co"}]},
                {"role":"assistant","content":null,"tool_calls":[{"id":"t","type":"function","function":{"name":"mail","arguments":"{\"to\":\"e@f.co\"}"}}]}]}"#,
        )
        .unwrap();
        let body = String::from_utf8(applied.body.unwrap().to_vec()).unwrap();
        assert!(!body.contains("@"), "{body}");
        assert_eq!(body.matches("[EMAIL]").count(), 3, "{body}");
    }

    #[test]
    fn the_max_tokens_ceiling_applies_to_every_limit_key() {
        let yaml = "caps:\n  max_tokens: 64\n";
        let body = apply_to(
            yaml,
            r#"{"model":"m","max_completion_tokens":1,"max_tokens":100000,"messages":[{"role":"user","content":"a"}]}"#,
        )
        .unwrap()
        .body
        .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["max_tokens"], 64);
        assert_eq!(v["max_completion_tokens"], 1);
        let body = apply_to(
            yaml,
            r#"{"model":"m","messages":[{"role":"user","content":"a"}]}"#,
        )
        .unwrap()
        .body
        .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["max_tokens"], 64);
    }

    #[test]
    fn answers_are_redacted_in_every_text_field_and_unreadable_ones_refused() {
        let sets = vec![Arc::new(set(
            "redact:\n  - builtin: email\nresponses: true\n",
        ))];
        let mut hits = Hits::default();
        let answer = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"a@b.co","reasoning_content":"c@d.co","tool_calls":[{"id":"x","type":"function","function":{"name":"n","arguments":"e@f.co"}}]},"logprobs":{"content":[{"token":"a@b.co"}]}}]}"#;
        let out = redact_answer(&sets, answer, &mut hits).unwrap().unwrap();
        let out = String::from_utf8(out.to_vec()).unwrap();
        assert!(!out.contains('@'), "{out}");
        assert!(out.contains(r#""logprobs":null"#), "{out}");
        // A transcription as plain text.
        let out = redact_answer(&sets, b"1\n00:00 --> 00:01\nmail a@b.co\n", &mut hits)
            .unwrap()
            .unwrap();
        assert_eq!(out.as_ref(), b"1\n00:00 --> 00:01\nmail [EMAIL]\n");
        assert!(redact_answer(&sets, &[0xff, 0xfe], &mut hits).is_err());
    }

    #[test]
    fn bad_rules_are_reported_with_their_paths() {
        let p = problems(
            "redact:\n  - builtin: ssn\n  - pattern: '(a'\n    name: x\n  - pattern: 'b*'\n    name: y\n  - pattern: 'c'\nblock:\n  - name: z\ncaps:\n  max_tokens: 0\n  allowed_params: [model]\nresponses: false\n",
        );
        let paths: Vec<&str> = p.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(
            paths,
            [
                "redact[0].builtin",
                "redact[1].pattern",
                "redact[2].pattern",
                "redact[3].name",
                "block[0]",
                "caps.max_tokens",
                "caps.allowed_params"
            ],
            "{p:?}"
        );
    }
}
