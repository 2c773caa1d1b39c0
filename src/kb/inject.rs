//! Putting retrieved chunks into a chat request: the question comes from the last user
//! message(s); the excerpts go into one system message rendered from the tenant's template and
//! placed after the request's own leading system messages. The other messages keep their bytes.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::Hit;
use crate::error::Error;
use crate::openai::JsonRequest;

/// The default injection template (minijinja). It sees `excerpts` (each with `n`, `source`,
/// `heading`, `text`, `score`) and `question`.
pub const DEFAULT_TEMPLATE: &str = "Answer the user's question using only the numbered excerpts below from our documentation. \
If they do not contain the answer, say that you do not know instead of guessing. \
Cite the excerpts you use by number, like [1].\n\
{% for e in excerpts %}\n[{{ e.n }}] {{ e.source }}{% if e.heading %} ({{ e.heading }}){% endif %}\n{{ e.text }}\n{% endfor %}";

/// Compiles a template; the error is for `fuke check`.
pub fn compile(source: &str) -> Result<minijinja::Environment<'static>, String> {
    let mut env = minijinja::Environment::new();
    env.add_template_owned("kb", source.to_string())
        .map_err(|e| format!("template does not compile: {e}"))?;
    // Rendered once with sample data, so that a template that cannot render fails here.
    render(&env, "sample question", &[]).map_err(|e| format!("template does not render: {e}"))?;
    Ok(env)
}

pub fn render(
    env: &minijinja::Environment<'static>,
    question: &str,
    hits: &[Hit],
) -> Result<String, minijinja::Error> {
    use minijinja::Value;
    let excerpts: Vec<Value> = hits
        .iter()
        .enumerate()
        .map(|(i, h)| {
            Value::from_pairs([
                ("n", Value::from(i + 1)),
                (
                    "source",
                    Value::from(format!("{}/{}", h.collection, h.chunk.source)),
                ),
                ("heading", Value::from(h.chunk.headings.join(" > "))),
                ("text", Value::from(h.chunk.text.as_str())),
                (
                    "score",
                    Value::from((f64::from(h.score) * 1000.0).round() / 1000.0),
                ),
            ])
        })
        .collect();
    env.get_template("kb")?
        .render(minijinja::context! { excerpts => excerpts, question => question })
}

#[derive(Deserialize)]
struct Message {
    role: Option<String>,
    content: Option<Value>,
}

fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

/// The retrieval question: the text of the last `turns` user messages, oldest first. `None`
/// when the last message is not a user message with text.
pub fn question(req: &JsonRequest<'_>, turns: usize) -> Option<String> {
    let raw = req.field("messages")?;
    let messages: Vec<Message> = serde_json::from_str(raw.get()).ok()?;
    let last = messages.last()?;
    if last.role.as_deref() != Some("user") {
        return None;
    }
    let mut parts: Vec<String> = messages
        .iter()
        .rev()
        .filter(|m| m.role.as_deref() == Some("user"))
        .take(turns.max(1))
        .filter_map(|m| m.content.as_ref().and_then(text_of))
        .collect();
    parts.reverse();
    let q = parts.join("\n");
    (!q.trim().is_empty()).then_some(q)
}

/// The request body with `system` inserted as a system message after the leading
/// system/developer messages. Every other byte of the request is kept.
pub fn with_context(req: &JsonRequest<'_>, system: &str) -> Result<Bytes, Error> {
    let raw = req
        .field("messages")
        .ok_or_else(|| Error::Internal("messages vanished".into()))?;
    let messages: Vec<&RawValue> =
        serde_json::from_str(raw.get()).map_err(|e| Error::Internal(e.to_string()))?;
    #[derive(Deserialize)]
    struct Role<'a> {
        #[serde(borrow)]
        role: Option<&'a str>,
    }
    let at = messages
        .iter()
        .take_while(|m| {
            serde_json::from_str::<Role>(m.get())
                .ok()
                .and_then(|r| r.role)
                .is_some_and(|r| r == "system" || r == "developer")
        })
        .count();
    let injected = format!(
        "{{\"role\":\"system\",\"content\":{}}}",
        serde_json::to_string(system).map_err(|e| Error::Internal(e.to_string()))?
    );
    let mut out = String::with_capacity(raw.get().len() + injected.len() + 2);
    out.push('[');
    for (i, m) in messages.iter().enumerate() {
        if i == at {
            out.push_str(&injected);
            out.push(',');
        }
        out.push_str(m.get());
        if i + 1 < messages.len() {
            out.push(',');
        }
    }
    if at == messages.len() {
        if !messages.is_empty() {
            out.push(',');
        }
        out.push_str(&injected);
    }
    out.push(']');
    Ok(req.body_with("messages", out.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Endpoint;

    #[test]
    fn question_is_the_last_user_turns() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"first"},{"role":"assistant","content":"a"},{"role":"user","content":[{"type":"text","text":"second"}]}]}"#;
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body).unwrap();
        assert_eq!(question(&req, 1).as_deref(), Some("second"));
        assert_eq!(question(&req, 2).as_deref(), Some("first\nsecond"));
        let body = br#"{"model":"m","messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#;
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body).unwrap();
        assert_eq!(question(&req, 1), None);
    }

    #[test]
    fn context_goes_after_leading_system_messages_and_keeps_other_bytes() {
        let body = br#"{"model":"m","temperature":0.5,"messages":[{"role":"system","content":"be nice"},{"role":"user",  "content":"q"}],"x":{"y":1}}"#;
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body).unwrap();
        let out = with_context(&req, "CTX \"quoted\"").unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            s,
            r#"{"model":"m","temperature":0.5,"messages":[{"role":"system","content":"be nice"},{"role":"system","content":"CTX \"quoted\""},{"role":"user",  "content":"q"}],"x":{"y":1}}"#
        );
        let body = br#"{"model":"m","messages":[{"role":"user","content":"q"}]}"#;
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body).unwrap();
        let out = with_context(&req, "C").unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m","messages":[{"role":"system","content":"C"},{"role":"user","content":"q"}]}"#
        );
    }

    #[test]
    fn default_template_lists_numbered_excerpts() {
        let env = compile(DEFAULT_TEMPLATE).unwrap();
        let hit = Hit {
            collection: "support".into(),
            chunk: super::super::chunk::Chunk {
                source: "en/refunds.md".into(),
                ordinal: 2,
                headings: vec!["Refunds".into(), "Timing".into()],
                text: "Cards take 5 days.".into(),
                hash: [0; 32],
            },
            score: 0.71234,
            vector: 0.7,
            keyword: 0.5,
        };
        let s = render(&env, "q", &[hit]).unwrap();
        assert!(
            s.starts_with("Answer the user's question using only"),
            "{s}"
        );
        assert!(
            s.contains("[1] support/en/refunds.md (Refunds > Timing)\nCards take 5 days."),
            "{s}"
        );
        assert!(compile("{% for %}").is_err());
        assert!(compile("{{ excerpts | nosuchfilter }}").is_err());
    }
}
