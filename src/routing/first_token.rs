//! Waiting for a candidate's first content token: SSE events are read (and kept) until one
//! carries output (content, a tool call, a refusal, reasoning, or a finish reason). Only these
//! first few events are parsed; the answer then flows on as the frames it arrived in.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use serde_json::Value;

use crate::backends::BackendResponse;
use crate::error::Error;
use crate::sse::{event_data, split_event};

/// Most bytes read while waiting for the first token.
const MAX_PREAMBLE: usize = 1 << 20;

/// Reads `resp` until its first content token; returns it with the frames read so far put back
/// in front of the rest of its body.
pub async fn wait(resp: BackendResponse, candidate: &str) -> Result<BackendResponse, Error> {
    let BackendResponse {
        status,
        headers,
        body: mut upstream,
        idle_timeout,
        deadline,
    } = resp;
    let broken = |detail: String| Error::UpstreamProtocol {
        upstream: candidate.to_string(),
        detail,
    };
    let mut frames: Vec<Bytes> = Vec::new();
    let mut pending = BytesMut::new();
    loop {
        let frame = tokio::time::timeout(idle_timeout, upstream.frame())
            .await
            .map_err(|_| Error::UpstreamTimeout {
                upstream: candidate.to_string(),
                after_ms: idle_timeout.as_millis() as u64,
            })?;
        let data = match frame {
            None => return Err(broken("stream ended before the first token".into())),
            Some(Err(e)) => {
                return Err(broken(format!("stream broke before the first token: {e}")));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        pending.extend_from_slice(&data);
        frames.push(data);
        if pending.len() > MAX_PREAMBLE {
            return Err(broken(format!(
                "no token in the first {MAX_PREAMBLE} bytes"
            )));
        }
        while let Some((event, rest)) = split_event(&pending) {
            match has_output(&pending[..event]) {
                Err(detail) => return Err(broken(detail)),
                Ok(false) => {
                    let _ = pending.split_to(rest);
                }
                Ok(true) => {
                    let head =
                        futures_util::stream::iter(frames.into_iter().map(|b| Ok(Frame::data(b))));
                    let body = StreamBody::new(head.chain(BodyStream::new(upstream)));
                    return Ok(BackendResponse {
                        status,
                        headers,
                        body: body.boxed_unsync(),
                        idle_timeout,
                        deadline,
                    });
                }
            }
        }
    }
}

/// Whether one SSE event carries output. An error event is an error.
fn has_output(event: &[u8]) -> Result<bool, String> {
    let data = event_data(event);
    let data = data.as_slice();
    if data.is_empty() {
        return Ok(false); // comments, keep-alives, `event:` lines alone
    }
    if data == b"[DONE]" {
        return Ok(true);
    }
    let v: Value =
        serde_json::from_slice(data).map_err(|e| format!("invalid JSON in SSE event: {e}"))?;
    if v.get("error").is_some_and(|e| !e.is_null()) {
        return Err("error event before the first token".into());
    }
    let non_empty = |v: Option<&Value>| match v {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(_)) => true,
        _ => false,
    };
    let choices = v.get("choices").and_then(Value::as_array);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
