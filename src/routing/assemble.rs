//! A streamed answer turned back into the JSON answer a non-streaming client asked for. Routing
//! streams such requests from candidates that have a fallback, so that the first-token deadline
//! means the same as for streaming clients; this puts the chunks together again the way OpenAI's
//! own non-streaming answer looks (content, refusal, reasoning and tool-call deltas merged,
//! finish reason, logprobs, usage).

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Response, header};
use http_body_util::BodyExt;
use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::backends::BackendResponse;
use crate::body::{self, Body};
use crate::cache::Fill;
use crate::error::Error;
use crate::metering::Outcome;
use crate::openai::{Endpoint, Usage};
use crate::relay::Meter;
use crate::sse::{event_data, split_event};

/// Largest assembled answer.
const MAX_ANSWER: usize = 64 << 20;

/// Reads the whole SSE answer, meters it, and answers with JSON.
pub async fn json(
    resp: BackendResponse,
    mut meter: Meter,
    endpoint: Endpoint,
    fill: Option<Fill>,
) -> Result<Response<Body>, Error> {
    let BackendResponse {
        status,
        mut headers,
        body: mut upstream,
        idle_timeout,
        deadline,
    } = resp;
    let mut answer = Answer::default();
    let mut pending = BytesMut::new();
    let mut seen = 0usize;
    let result: Result<(), String> = async {
        loop {
            let wait = match deadline {
                Some(d) => (tokio::time::Instant::now() + idle_timeout).min(d),
                None => tokio::time::Instant::now() + idle_timeout,
            };
            let frame = tokio::time::timeout_at(wait, upstream.frame())
                .await
                .map_err(|_| "upstream went silent or passed its total timeout".to_string())?;
            let data: Bytes = match frame {
                None => return Err("stream ended before [DONE]".into()),
                Some(Err(e)) => return Err(format!("stream broke: {e}")),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
            };
            seen += data.len();
            if seen > MAX_ANSWER {
                return Err(format!("answer larger than {MAX_ANSWER} bytes"));
            }
            pending.extend_from_slice(&data);
            while let Some((_, next)) = split_event(&pending) {
                let event = pending.split_to(next);
                if answer.feed(&event)? {
                    return Ok(());
                }
            }
        }
    }
    .await;
    if let Err(detail) = result {
        meter.chunks = answer.chunks;
        meter
            .record(answer.usage, 502, Outcome::UpstreamFailed)
            .await;
        return Err(Error::UpstreamProtocol {
            upstream: meter.backend.to_string(),
            detail,
        });
    }
    meter.chunks = answer.chunks;
    let usage = answer.usage;
    // Reading to the end is done; the connection goes back to the pool.
    let mut json = answer.finish(endpoint);
    // Assembled here, so always readable.
    if let Some(sets) = meter.answer_rules.clone().filter(|_| status.is_success())
        && let Ok(Some(redacted)) = crate::rules::redact_answer(&sets, &json, &mut meter.rules)
    {
        json = redacted;
    }
    meter
        .record(usage, status.as_u16(), Outcome::Completed)
        .await;
    if let Some(fill) = fill.filter(|_| status.is_success()) {
        fill.json(json.clone());
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut out = Response::new(body::full(json));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    Ok(out)
}

/// A complete SSE answer, as the frames that were relayed, put together as the JSON answer;
/// `None` when it did not reach `[DONE]` or carried an error event.
pub(crate) fn from_frames(frames: &[Bytes], endpoint: Endpoint) -> Option<Bytes> {
    let mut answer = Answer::default();
    let mut pending = BytesMut::new();
    for f in frames {
        pending.extend_from_slice(f);
        while let Some((_, next)) = split_event(&pending) {
            let event = pending.split_to(next);
            match answer.feed(&event) {
                Ok(true) => return Some(answer.finish(endpoint)),
                Ok(false) => {}
                Err(_) => return None,
            }
        }
    }
    None
}

#[derive(Default)]
struct Choice {
    role: Option<Value>,
    content: Option<String>,
    refusal: Option<String>,
    reasoning: Option<String>,
    text: Option<String>,
    tool_calls: Vec<Map<String, Value>>,
    function_call: Option<Map<String, Value>>,
    logprobs: Option<Map<String, Value>>,
    finish_reason: Value,
}

#[derive(Default)]
struct Answer {
    head: Map<String, Value>,
    choices: Vec<Choice>,
    usage: Option<Usage>,
    usage_value: Option<Value>,
    chunks: u32,
}

impl Answer {
    /// Takes one SSE event; `true` at `[DONE]`. Chunks are read into borrowed, typed fields:
    /// only tool calls, logprobs and the first chunk's head become `Value`s.
    fn feed(&mut self, event: &[u8]) -> Result<bool, String> {
        let data = event_data(event);
        let data = data.as_slice();
        if data.is_empty() {
            return Ok(false);
        }
        if data == b"[DONE]" {
            return Ok(true);
        }
        let chunk: ChunkIn<'_> =
            serde_json::from_slice(data).map_err(|e| format!("invalid SSE chunk: {e}"))?;
        if chunk.error.is_some() {
            return Err("the upstream sent an error event".into());
        }
        if let Some(u) = chunk.usage {
            self.usage = serde_json::from_str(u.get()).ok();
            self.usage_value = serde_json::from_str(u.get()).ok();
        }
        for (key, v) in [
            ("id", chunk.id),
            ("created", chunk.created),
            ("model", chunk.model),
            ("system_fingerprint", chunk.system_fingerprint),
            ("service_tier", chunk.service_tier),
        ] {
            if let Some(v) = v
                && !self.head.contains_key(key)
                && let Ok(v) = serde_json::from_str::<Value>(v.get())
            {
                self.head.insert(key.into(), v);
            }
        }
        let Some(choices) = chunk.choices else {
            return Ok(false);
        };
        if !choices.is_empty() {
            self.chunks += 1;
        }
        for c in choices {
            let index = c.index.unwrap_or(0) as usize;
            if index > 127 {
                return Err(format!("choice index {index} out of range"));
            }
            if self.choices.len() <= index {
                self.choices.resize_with(index + 1, Choice::default);
            }
            merge(&mut self.choices[index], c)?;
        }
        Ok(false)
    }

    fn finish(self, endpoint: Endpoint) -> Bytes {
        let chat = endpoint == Endpoint::ChatCompletions;
        let mut out = self.head;
        out.insert(
            "object".into(),
            Value::from(if chat {
                "chat.completion"
            } else {
                "text_completion"
            }),
        );
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let logprobs = c.logprobs.map_or(Value::Null, Value::Object);
                if !chat {
                    return json!({"index": i, "text": c.text.unwrap_or_default(),
                        "logprobs": logprobs, "finish_reason": c.finish_reason});
                }
                let mut message = Map::new();
                message.insert(
                    "role".into(),
                    c.role.unwrap_or_else(|| Value::from("assistant")),
                );
                message.insert("content".into(), c.content.map_or(Value::Null, Value::from));
                message.insert("refusal".into(), c.refusal.map_or(Value::Null, Value::from));
                if let Some(r) = c.reasoning {
                    message.insert("reasoning_content".into(), Value::from(r));
                }
                if !c.tool_calls.is_empty() {
                    let calls = c.tool_calls.into_iter().map(Value::Object).collect();
                    message.insert("tool_calls".into(), Value::Array(calls));
                }
                if let Some(f) = c.function_call {
                    message.insert("function_call".into(), Value::Object(f));
                }
                json!({"index": i, "message": message, "logprobs": logprobs,
                    "finish_reason": c.finish_reason})
            })
            .collect();
        out.insert("choices".into(), Value::Array(choices));
        if let Some(u) = self.usage_value {
            out.insert("usage".into(), u);
        }
        Bytes::from(serde_json::to_vec(&Value::Object(out)).unwrap_or_default())
    }
}

fn append(to: &mut Option<String>, v: Option<Cow<'_, str>>) {
    if let Some(s) = v {
        to.get_or_insert_with(String::new).push_str(&s);
    }
}

/// Appends string fields of `delta` onto `into` (tool-call arguments arrive in pieces).
fn merge_object(into: &mut Map<String, Value>, delta: &Map<String, Value>) {
    for (k, v) in delta {
        match (into.get_mut(k), v) {
            (Some(Value::String(have)), Value::String(more)) if k != "id" && k != "type" => {
                have.push_str(more);
            }
            (Some(Value::Object(have)), Value::Object(more)) => merge_object(have, more),
            (Some(_), Value::Null) => {}
            (_, v) => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

fn parse(raw: &RawValue) -> Result<Value, String> {
    serde_json::from_str(raw.get()).map_err(|e| format!("invalid SSE chunk: {e}"))
}

fn merge(choice: &mut Choice, c: ChoiceIn<'_>) -> Result<(), String> {
    if let Some(fr) = c.finish_reason {
        choice.finish_reason = parse(fr)?;
    }
    append(&mut choice.text, c.text);
    if let Some(lp) = c.logprobs
        && let Value::Object(lp) = parse(lp)?
    {
        let have = choice.logprobs.get_or_insert_with(Map::new);
        for (k, v) in lp {
            match (have.get_mut(&k), v) {
                (Some(Value::Array(a)), Value::Array(more)) => a.extend(more),
                (_, v) => {
                    have.insert(k, v);
                }
            }
        }
    }
    let Some(delta) = c.delta else {
        return Ok(());
    };
    if let Some(role) = delta.role
        && choice.role.is_none()
    {
        choice.role = Some(parse(role)?);
    }
    append(&mut choice.content, delta.content);
    append(&mut choice.refusal, delta.refusal);
    append(&mut choice.reasoning, delta.reasoning_content);
    append(&mut choice.reasoning, delta.reasoning);
    if let Some(f) = delta.function_call
        && let Value::Object(f) = parse(f)?
    {
        merge_object(choice.function_call.get_or_insert_with(Map::new), &f);
    }
    if let Some(calls) = delta.tool_calls
        && let Value::Array(calls) = parse(calls)?
    {
        for call in calls {
            let Value::Object(mut call) = call else {
                continue;
            };
            let index = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if index > 127 {
                continue;
            }
            if choice.tool_calls.len() <= index {
                choice.tool_calls.resize_with(index + 1, Map::new);
            }
            call.remove("index");
            merge_object(&mut choice.tool_calls[index], &call);
        }
    }
    Ok(())
}

/// One streamed chunk, borrowed from the event.
#[derive(Deserialize)]
struct ChunkIn<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    created: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    system_fingerprint: Option<&'a RawValue>,
    #[serde(borrow)]
    service_tier: Option<&'a RawValue>,
    #[serde(borrow)]
    choices: Option<Vec<ChoiceIn<'a>>>,
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChoiceIn<'a> {
    index: Option<u64>,
    #[serde(borrow)]
    delta: Option<DeltaIn<'a>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    finish_reason: Option<&'a RawValue>,
    #[serde(borrow)]
    logprobs: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct DeltaIn<'a> {
    #[serde(borrow)]
    role: Option<&'a RawValue>,
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tool_calls: Option<&'a RawValue>,
    #[serde(borrow)]
    function_call: Option<&'a RawValue>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(events: &[&str], endpoint: Endpoint) -> Value {
        let mut a = Answer::default();
        for e in events {
            assert!(!a.feed(format!("data: {e}\n\n").as_bytes()).unwrap());
        }
        assert!(a.feed(b"data: [DONE]\n\n").unwrap());
        serde_json::from_slice(&a.finish(endpoint)).unwrap()
    }

    #[test]
    fn chat_chunks_become_one_message_with_tool_calls_and_usage() {
        let v = assemble(
            &[
                r#"{"id":"c1","created":7,"model":"m","system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
                r#"{"id":"c1","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#,
                r#"{"id":"c1","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}"#,
                r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get","arguments":"{\"a\""}}]}}]}"#,
                r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}"#,
                r#"{"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
                r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
            ],
            Endpoint::ChatCompletions,
        );
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["created"], 7);
        let msg = &v["choices"][0]["message"];
        assert_eq!(msg["role"], "assistant");
        assert_eq!(msg["content"], "Hello");
        assert_eq!(msg["tool_calls"][0]["id"], "call_1");
        assert_eq!(msg["tool_calls"][0]["function"]["name"], "get");
        assert_eq!(msg["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(v["usage"]["total_tokens"], 7);
    }

    #[test]
    fn completions_text_is_joined() {
        let v = assemble(
            &[
                r#"{"id":"x","choices":[{"index":0,"text":"a b","finish_reason":null}]}"#,
                r#"{"id":"x","choices":[{"index":0,"text":" c","finish_reason":"stop"}]}"#,
            ],
            Endpoint::Completions,
        );
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "a b c");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn error_events_fail() {
        let mut a = Answer::default();
        assert!(
            a.feed(b"data: {\"error\":{\"message\":\"x\"}}\n\n")
                .is_err()
        );
    }
}
