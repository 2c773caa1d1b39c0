//! Waiting for a candidate's first content token: SSE events are read (and kept) until one
//! carries output (content, a tool call, a refusal, reasoning, or a finish reason). Only these
//! first few events are parsed; the answer then flows on as the frames it arrived in.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};

use crate::backends::BackendResponse;
use crate::error::Error;
use crate::sse::{has_output, split_event};

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
