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
        let c = match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            '\u{3000}' => ' ',
            c => c,
        };
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
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
                Some(p) => match detect::compile(&fold(p), true) {
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
    pub fn redact(&self, text: &str, hits: &mut Hits) -> Option<String> {
        let mut out: Option<String> = None;
        for r in &self.redact {
            let cur = out.as_deref().unwrap_or(text);
            let found = r.detector.find(cur);
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
        }
        out
    }

    /// Byte ranges of `text` that some redaction of this set matches.
    fn matches(&self, text: &str) -> Vec<(usize, usize)> {
        self.redact
            .iter()
            .flat_map(|r| r.detector.find(text))
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

/// The request field holding its text, per endpoint.
fn text_field(endpoint: Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::ChatCompletions => Some("messages"),
        Endpoint::Completions => Some("prompt"),
        Endpoint::Embeddings => Some("input"),
        Endpoint::AudioTranscriptions => None,
    }
}

/// Calls `f` on every text string of a request field: message contents (strings and `text`
/// parts) for chat, strings of `prompt` and `input` otherwise.
fn for_each_text(endpoint: Endpoint, v: &mut Value, f: &mut impl FnMut(&mut String)) {
    let text_of = |v: &mut Value, f: &mut dyn FnMut(&mut String)| match v {
        Value::String(s) => f(s),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => f(s),
                    Value::Object(part) => {
                        if part.get("type").and_then(Value::as_str) == Some("text")
                            && let Some(Value::String(s)) = part.get_mut("text")
                        {
                            f(s);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    };
    match endpoint {
        Endpoint::ChatCompletions => {
            if let Value::Array(messages) = v {
                for m in messages {
                    if let Some(content) = m.get_mut("content") {
                        text_of(content, f);
                    }
                }
            }
        }
        _ => text_of(v, f),
    }
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

    let mut changes: Vec<(&str, Vec<u8>)> = Vec::new();
    let field = text_field(req.endpoint);
    let needs_text = sets.iter().any(|s| {
        !s.redact.is_empty()
            || !s.block.is_empty()
            || s.caps.max_messages.is_some()
            || s.caps.max_prompt_chars.is_some()
    });
    if let (Some(field), true) = (field, needs_text)
        && let Some(raw) = req.field(field)
    {
        let mut value: Value = serde_json::from_str(raw.get())
            .map_err(|_| Error::invalid(format!("'{field}' is not valid JSON."), None))?;
        if req.endpoint == Endpoint::ChatCompletions {
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
        let mut chars = 0usize;
        let mut blocked: Option<Arc<str>> = None;
        let any_block = sets.iter().any(|s| !s.block.is_empty());
        for_each_text(req.endpoint, &mut value, &mut |s: &mut String| {
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
                    field,
                    "prompt_too_long",
                ));
            }
        }
        let mut changed = false;
        let hits = &mut applied.hits;
        for_each_text(req.endpoint, &mut value, &mut |text: &mut String| {
            for s in sets {
                if let Some(new) = s.redact(text, hits) {
                    *text = new;
                    changed = true;
                }
            }
        });
        if changed {
            let bytes = serde_json::to_vec(&value).map_err(|e| Error::Internal(e.to_string()))?;
            changes.push((field, bytes));
        }
    }

    // The max_tokens ceiling: the lowest of the sets'.
    if req.endpoint != Endpoint::Embeddings
        && let Some((set, cap)) = sets
            .iter()
            .filter_map(|s| s.caps.max_tokens.map(|c| (s, c)))
            .min_by_key(|(_, c)| *c)
    {
        let key = if req.field("max_completion_tokens").is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let asked = req
            .field(key)
            .and_then(|raw| serde_json::from_str::<Option<u64>>(raw.get()).ok())
            .flatten();
        match asked {
            Some(n) if n <= u64::from(cap) => {}
            _ => {
                if asked.is_some() {
                    applied.hits.add(&set.cap_hit("max_tokens"));
                }
                changes.push((key, cap.to_string().into_bytes()));
            }
        }
    }
    if !changes.is_empty() {
        applied.body = Some(req.body_with_all(&changes));
    }
    Ok(applied)
}

/// An answer's text fields: chat message contents (strings and text parts), completion texts.
fn for_each_answer_text(v: &mut Value, f: &mut impl FnMut(&mut String)) {
    let Some(Value::Array(choices)) = v.get_mut("choices") else {
        return;
    };
    for c in choices {
        if let Some(Value::String(s)) = c.get_mut("text") {
            f(s);
        }
        if let Some(m) = c.get_mut("message") {
            match m.get_mut("content") {
                Some(Value::String(s)) => f(s),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(Value::String(s)) = p.get_mut("text") {
                            f(s);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// A JSON answer with the sets' redactions applied to its text, or `None` when nothing matched
/// (or it is not a JSON answer).
pub fn redact_answer(sets: &[Arc<RuleSet>], body: &[u8], hits: &mut Hits) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let mut changed = false;
    for_each_answer_text(&mut value, &mut |text: &mut String| {
        for s in sets {
            if let Some(new) = s.redact(text, hits) {
                *text = new;
                changed = true;
            }
        }
    });
    if !changed {
        return None;
    }
    serde_json::to_vec(&value).ok().map(Bytes::from)
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
