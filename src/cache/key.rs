//! What a chat request is cached under: its scope (everything that must be identical for an
//! answer to be reusable) and its question (the last user message), plus the reasons a request
//! bypasses the cache.

use http::HeaderValue;
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::openai::JsonRequest;

/// 128 bits of SHA-256.
pub type Hash = [u8; 16];

/// Top-level fields that cannot change the answer. Every other field (temperature, top_p,
/// max_tokens, response_format, seed, stop, penalties, reasoning effort, fields Fuke does not
/// know yet…) is part of the scope, so an unknown parameter can only cause a miss, never a wrong hit.
const NEUTRAL_FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// A request the cache may serve or fill.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Tenant, alias, KB generation, parameters, history and the last message's non-content fields.
    pub scope: Hash,
    /// The scope plus the normalized question (or the whole last message when it is not text).
    pub exact: Hash,
    /// The last user message's text, when the request ends with one (semantic level).
    pub question: Option<String>,
    /// `normalize(question)`, compared by the semantic level's guards.
    pub normalized: Option<String>,
    /// `Cache-Control: no-cache` turns this off (fill still allowed).
    pub lookup: bool,
}

/// Why a request neither reads nor fills the cache.
pub type Bypass = &'static str;

/// What the request is cached under, or why it is not. `sampled_ok`: the tenant caches
/// answers to sampled requests (temperature absent or above 0).
pub fn plan(
    req: &JsonRequest<'_>,
    tenant: &str,
    alias: &str,
    kb_generation: u64,
    sampled_ok: bool,
    cache_control: Option<&HeaderValue>,
) -> Result<Plan, Bypass> {
    let mut lookup = true;
    if let Some(cc) = cache_control.and_then(|v| v.to_str().ok()) {
        for directive in cc.split(',').map(|d| d.trim().to_ascii_lowercase()) {
            match directive.as_str() {
                "no-store" => return Err("no-store"),
                "no-cache" => lookup = false,
                _ => {}
            }
        }
    }
    let field = |name: &str| req.field(name).filter(|v| v.get() != "null");
    if ["tools", "tool_choice", "functions", "function_call"]
        .iter()
        .any(|f| field(f).is_some())
    {
        return Err("tools");
    }
    if field("n").is_some_and(|n| n.get().trim() != "1") {
        return Err("n");
    }
    if field("logprobs").is_some_and(|v| v.get().trim() != "false")
        || field("top_logprobs").is_some()
    {
        return Err("logprobs");
    }
    if field("audio").is_some() || field("modalities").is_some_and(|v| v.get().contains("audio")) {
        return Err("audio");
    }
    let deterministic = field("temperature")
        .and_then(|t| t.get().trim().parse::<f64>().ok())
        .is_some_and(|t| t == 0.0);
    if !deterministic && !sampled_ok {
        return Err("sampled");
    }

    let messages: Vec<&RawValue> = req
        .field("messages")
        .and_then(|m| serde_json::from_str(m.get()).ok())
        .ok_or("messages")?;
    let mut h = Sha256::new();
    h.update(b"fuke-cache-v1\0");
    put_str(&mut h, tenant);
    put_str(&mut h, alias);
    h.update(kb_generation.to_le_bytes());
    // Parameters, sorted by name (the last occurrence wins, as in JSON parsers).
    let mut params: Vec<(&str, &RawValue)> = req
        .fields()
        .filter(|(k, _)| !NEUTRAL_FIELDS.contains(k))
        .collect();
    params.reverse();
    params.sort_by(|a, b| a.0.cmp(b.0));
    params.dedup_by(|a, b| a.0 == b.0);
    for (k, v) in params {
        put_str(&mut h, k);
        put_json(&mut h, v);
    }
    let (last, history) = messages.split_last().ok_or("messages")?;
    h.update(b"history\0");
    h.update((history.len() as u64).to_le_bytes());
    for m in history {
        put_json(&mut h, m);
    }
    let last: Value = serde_json::from_str(last.get()).map_err(|_| "messages")?;
    let Value::Object(mut last) = last else {
        return Err("messages");
    };
    let content = last.remove("content");
    let is_user = last.get("role").and_then(Value::as_str) == Some("user");
    let question = match (&content, is_user) {
        (Some(c), true) => text_of(c),
        _ => None,
    };
    h.update(b"last\0");
    canonical(&Value::Object(last), &mut h);
    if question.is_none() {
        // Not a text question: the exact level keys the whole message.
        h.update(b"content\0");
        canonical(content.as_ref().unwrap_or(&Value::Null), &mut h);
    }
    let scope = finish(h.clone());
    let normalized = question.as_deref().map(normalize);
    if let Some(n) = &normalized {
        h.update(b"question\0");
        put_str(&mut h, n);
    }
    Ok(Plan {
        scope,
        exact: finish(h),
        question,
        normalized,
        lookup,
    })
}

fn finish(h: Sha256) -> Hash {
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// Hashes a raw JSON value canonically (sorted keys, no insignificant whitespace), so that the
/// same request serialized differently keys the same.
fn put_json(h: &mut Sha256, raw: &RawValue) {
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(v) => canonical(&v, h),
        Err(_) => put_str(h, raw.get()),
    }
}

fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            h.update(b"{");
            for k in keys {
                put_str(h, k);
                canonical(&m[k], h);
            }
            h.update(b"}");
        }
        Value::Array(a) => {
            h.update(b"[");
            h.update((a.len() as u64).to_le_bytes());
            for x in a {
                canonical(x, h);
            }
            h.update(b"]");
        }
        Value::String(s) => {
            h.update(b"s");
            put_str(h, s);
        }
        // Numbers and literals: serde_json's own formatting is canonical for parsed values.
        other => {
            h.update(b"v");
            put_str(h, &other.to_string());
        }
    }
}

/// The text of a user message: a string, or text parts only (anything else: `None`).
fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                let p = p.as_object()?;
                if p.get("type").and_then(Value::as_str) != Some("text") {
                    return None;
                }
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(p.get("text")?.as_str()?);
            }
            Some(out)
        }
        _ => None,
    }
}

/// Greetings that open a question; the ones marked `true` need no separator after them.
const OPENERS: &[(&str, bool)] = &[
    ("quick question", false),
    ("good morning", false),
    ("good afternoon", false),
    ("good evening", false),
    ("excuse me", false),
    ("hello", false),
    ("hiya", false),
    ("hey", false),
    ("hi", false),
    ("sorry", false),
    ("please", false),
    ("麻烦问一下", true),
    ("打扰一下", true),
    ("请问一下", true),
    ("请问", true),
    ("您好", true),
    ("你好", true),
    ("在吗", true),
    ("亲亲", false),
    ("亲", false),
];

/// Thanks and pleas that close a question; the Chinese ones need no separator before them.
const CLOSERS: &[(&str, bool)] = &[
    ("thanks in advance", false),
    ("thanks a lot", false),
    ("thank you", false),
    ("thanks", false),
    ("cheers", false),
    ("please", false),
    ("thx", false),
    ("谢谢你", true),
    ("谢谢啦", true),
    ("谢谢", true),
    ("多谢", true),
    ("麻烦了", true),
];

const SEPARATORS: &[char] = &[
    ' ', ',', '.', '!', '?', ':', ';', '~', '-', '，', '。', '、', '…', '！', '？', '：',
];

/// The question without the greetings and thanks around it ("Hi, … Thanks!", "亲，请问…谢谢"):
/// they never change what is asked. A question that is nothing but courtesy stays as it is.
fn strip_courtesy(q: &str) -> &str {
    let mut s = q;
    loop {
        let before = s.len();
        s = s.trim_matches(SEPARATORS);
        for (p, free) in OPENERS {
            if let Some(rest) = s.strip_prefix(p)
                && (*free || rest.starts_with(SEPARATORS))
                && !rest.trim_start_matches(SEPARATORS).is_empty()
            {
                s = rest;
                break;
            }
        }
        s = s.trim_matches(SEPARATORS);
        for (c, free) in CLOSERS {
            if let Some(rest) = s.strip_suffix(c)
                && (*free || rest.ends_with(SEPARATORS))
                && !rest.trim_end_matches(SEPARATORS).is_empty()
            {
                s = rest;
                break;
            }
        }
        if s.len() == before {
            return s;
        }
    }
}

/// The question as the exact level compares it: full-width ASCII folded, lower case, runs of
/// white space as one space, greetings and thanks around it removed, no surrounding space or
/// closing punctuation.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        let c = super::guard::narrow_char(c);
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.extend(c.to_lowercase());
    }
    let trimmed = strip_courtesy(&out);
    let trimmed = trimmed.trim_end_matches(['?', '!', '.', '。', '？', '！', '~', '…']);
    trimmed.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Endpoint;

    fn plan_of(body: &str) -> Result<Plan, Bypass> {
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body.as_bytes()).unwrap();
        plan(&req, "acme", "gpt", 0, true, None)
    }

    #[test]
    fn normalizes_case_space_width_and_closing_punctuation() {
        assert_eq!(
            normalize("  Where IS   my\tparcel?? "),
            normalize("where is my parcel")
        );
        assert_eq!(normalize("ＡＢＣ　退款？"), "abc 退款");
    }

    #[test]
    fn greetings_and_thanks_around_a_question_are_dropped() {
        let plain = normalize("Where is my parcel?");
        for q in [
            "Hi, where is my parcel? Thanks!",
            "hello where is my parcel please",
            "Quick question: where is my parcel? Thanks in advance",
        ] {
            assert_eq!(normalize(q), plain, "{q}");
        }
        assert_eq!(normalize("亲，请问怎么退款？谢谢"), normalize("怎么退款"));
        assert_eq!(normalize("您好请问怎么退款"), "怎么退款");
        // Only whole greetings: these are questions, not courtesy.
        assert_eq!(normalize("亲子套餐怎么退"), "亲子套餐怎么退");
        assert_eq!(normalize("history of my orders"), "history of my orders");
        assert_eq!(normalize("is there a warranty"), "is there a warranty");
        assert_eq!(normalize("Thanks!"), "thanks");
        assert_eq!(normalize("please cancel my order"), "cancel my order");
    }

    #[test]
    fn same_request_formatted_differently_keys_the_same() {
        let a = plan_of(
            r#"{"model":"gpt","temperature":0,"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Where is my parcel?"}]}"#,
        )
        .unwrap();
        let b = plan_of(
            r#"{ "messages": [ {"content":"Be brief.", "role":"system"}, {"role":"user","content":"where is my parcel"} ], "temperature": 0, "model":"gpt", "stream": true, "user": "u1" }"#,
        )
        .unwrap();
        assert_eq!(a.scope, b.scope);
        assert_eq!(a.exact, b.exact);
        assert_eq!(a.question.as_deref(), Some("Where is my parcel?"));
    }

    #[test]
    fn scope_changes_with_history_parameters_tenant_and_kb_generation() {
        let base = r#"{"model":"gpt","temperature":0,"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"}]}"#;
        let p = plan_of(base).unwrap();
        let other_system = plan_of(&base.replace("Be brief.", "Be long.")).unwrap();
        assert_ne!(p.scope, other_system.scope);
        let other_param =
            plan_of(&base.replace("\"temperature\":0", "\"temperature\":0,\"max_tokens\":5"))
                .unwrap();
        assert_ne!(p.scope, other_param.scope);
        let other_question = plan_of(&base.replace("hi", "hello")).unwrap();
        assert_eq!(p.scope, other_question.scope);
        assert_ne!(p.exact, other_question.exact);
        let req = JsonRequest::parse(Endpoint::ChatCompletions, base.as_bytes()).unwrap();
        let other_tenant = plan(&req, "globex", "gpt", 0, true, None).unwrap();
        assert_ne!(p.scope, other_tenant.scope);
        let other_kb = plan(&req, "acme", "gpt", 1, true, None).unwrap();
        assert_ne!(p.scope, other_kb.scope);
    }

    #[test]
    fn bypasses() {
        let with = |extra: &str| {
            plan_of(&format!(
                r#"{{"model":"gpt","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#
            ))
            .err()
        };
        assert_eq!(with(r#","tools":[{"type":"function"}]"#), Some("tools"));
        assert_eq!(with(r#","n":2"#), Some("n"));
        assert_eq!(with(r#","n":1"#), None);
        assert_eq!(with(r#","logprobs":true"#), Some("logprobs"));
        assert_eq!(with(r#","tools":null"#), None);
        let req = JsonRequest::parse(
            Endpoint::ChatCompletions,
            br#"{"model":"gpt","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        // Sampling (no temperature means 1) only when the tenant opts in.
        assert_eq!(
            plan(&req, "t", "gpt", 0, false, None).err(),
            Some("sampled")
        );
        let cc = HeaderValue::from_static("no-store");
        assert_eq!(
            plan(&req, "t", "gpt", 0, true, Some(&cc)).err(),
            Some("no-store")
        );
        let cc = HeaderValue::from_static("max-age=0, No-Cache");
        assert!(!plan(&req, "t", "gpt", 0, true, Some(&cc)).unwrap().lookup);
    }

    #[test]
    fn non_text_questions_have_only_an_exact_key() {
        let p = plan_of(r#"{"model":"gpt","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/a.png"}}]}]}"#).unwrap();
        assert!(p.question.is_none());
        let q = plan_of(r#"{"model":"gpt","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/b.png"}}]}]}"#).unwrap();
        assert_ne!(p.exact, q.exact);
        let text_parts = plan_of(r#"{"model":"gpt","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#).unwrap();
        assert_eq!(text_parts.question.as_deref(), Some("hi"));
    }
}
