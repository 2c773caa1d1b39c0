//! An OpenAI-protocol server for tests and the demo: answers chat, completions, embeddings and
//! transcriptions deterministically, and misbehaves on request. The upstream model name picks
//! the behaviour:
//! - anything else: echo the last user message (JSON, or SSE one word per frame)
//! - `slow`: SSE, one word every 20 ms for 150 words (client-disconnect tests)
//! - `hang`: never answers
//! - `drop`: SSE, two chunks, then the connection is cut
//! - `cut`: SSE headers, then the connection is cut before any event
//! - `no-usage`: SSE without a usage chunk even when asked
//! - `linger`: SSE that stays open after `data: [DONE]` until the reader leaves
//! - `stall`: SSE, two chunks, then silence with the connection open
//! - `fail-400`, `fail-500`, `fail-429`: OpenAI-shaped errors with those statuses
//! - `delay`: SSE; a role-only chunk at once, the first word 2 s later (first-token deadlines)
//! - `wait-N`: the echo, after N ms (a model's latency, for load runs)
//! - a prompt word `cached` is reported as one cached prompt token (`prompt_tokens_details`)
//! - `flaky`: a 500 while [`UpstreamState::failing`] is set, an echo otherwise
//!
//! It records every request body it receives, counts streams cut short by the client, and can
//! serve over TLS.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
pub struct UpstreamState {
    pub received: Mutex<Vec<Received>>,
    /// Streams whose reader went away before the end.
    pub cancelled: AtomicUsize,
    pub cancel_notify: Notify,
    /// Exact bytes of the last streamed answer, as sent.
    pub last_stream: Mutex<Vec<u8>>,
    /// Exact bytes of the last JSON answer, as sent.
    pub last_json: Mutex<Bytes>,
    /// Makes the `flaky` model fail.
    pub failing: AtomicBool,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
}

impl Upstream {
    /// Starts on 127.0.0.1 (port 0 = any free port).
    pub async fn start() -> Upstream {
        Self::start_on("127.0.0.1:0", None).await
    }

    pub async fn start_on(addr: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState::default());
        let st = state.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let st = st.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Upstream { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Requests received for upstream model `model`.
    pub fn count(&self, model: &str) -> usize {
        self.received()
            .iter()
            .filter(|r| {
                serde_json::from_slice::<Value>(&r.body)
                    .is_ok_and(|v| v["model"].as_str() == Some(model))
            })
            .count()
    }

    pub fn last_received(&self) -> Received {
        self.received().pop().expect("upstream received nothing")
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, content_type.parse().unwrap());
    r
}

fn error(status: StatusCode, code: &str) -> Response<Body> {
    let body = json!({"error": {"message": format!("upstream refused: {code}"), "type": "invalid_request_error", "param": "temperature", "code": code}});
    let mut r = full(status, "application/json", body.to_string());
    if status == StatusCode::TOO_MANY_REQUESTS {
        let h = r.headers_mut();
        h.insert(header::RETRY_AFTER, "7".parse().unwrap());
        h.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
        // Not one of the headers a client is shown.
        h.insert("x-upstream-region", "eu-internal-3".parse().unwrap());
    }
    r
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

async fn handle(st: Arc<UpstreamState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "unreadable"),
    };
    st.received.lock().unwrap().push(Received {
        path: path.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });

    if path == "/v1/audio/transcriptions" {
        use sha2::Digest;
        let text = format!(
            "{} bytes sha256 {}",
            body.len(),
            hex::encode(sha2::Sha256::digest(&body))
        );
        return full(
            StatusCode::OK,
            "application/json",
            json!({ "text": text }).to_string(),
        );
    }

    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_json");
    };
    let model = v["model"].as_str().unwrap_or("").to_string();
    // `wait-N`: a model that thinks N ms before it answers (load runs with a model's latency).
    if let Some(ms) = model
        .strip_prefix("wait-")
        .and_then(|n| n.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    match model.as_str() {
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return error(StatusCode::INTERNAL_SERVER_ERROR, "late");
        }
        "fail-400" => return error(StatusCode::BAD_REQUEST, "bad_temperature"),
        "fail-500" => return error(StatusCode::INTERNAL_SERVER_ERROR, "boom"),
        "fail-429" => return error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
        "flaky" if st.failing.load(Ordering::SeqCst) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "flaky");
        }
        _ => {}
    }

    match path.as_str() {
        "/v1/embeddings" => {
            let inputs = match &v["input"] {
                Value::Array(a) => a.len(),
                _ => 1,
            };
            let data: Vec<Value> = (0..inputs)
                .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.25, -0.5, i as f64]}))
                .collect();
            let tokens: u64 = match &v["input"] {
                Value::Array(a) => a.iter().filter_map(Value::as_str).map(words).sum(),
                other => words(other.as_str().unwrap_or("")),
            };
            let body = json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
            return full(StatusCode::OK, "application/json", body.to_string());
        }
        "/v1/chat/completions" | "/v1/completions" => {}
        _ => return error(StatusCode::NOT_FOUND, "unknown_path"),
    }

    let chat = path == "/v1/chat/completions";
    let prompt = if chat {
        v["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|m| m["content"].as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    } else {
        v["prompt"].as_str().unwrap_or("").to_string()
    };
    let last = if chat {
        v["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or("")
            .to_string()
    } else {
        prompt.clone()
    };
    let mut answer = format!("echo: {last}");
    if model == "slow" {
        answer = vec!["tick"; 150].join(" ");
    }
    // `max_tokens` (one token per word here) cuts the answer short, as models do.
    let mut finish_reason = "stop";
    if let Some(n) = v["max_tokens"]
        .as_u64()
        .or(v["max_completion_tokens"].as_u64())
        && words(&answer) > n
    {
        answer = answer
            .split(' ')
            .take(n as usize)
            .collect::<Vec<_>>()
            .join(" ");
        finish_reason = "length";
    }
    let mut usage = json!({"prompt_tokens": words(&prompt), "completion_tokens": words(&answer),
        "total_tokens": words(&prompt) + words(&answer)});
    // Prompt caching as providers report it: here, each word `cached` in the prompt counts as
    // one prompt token served from the provider's cache.
    let cached = prompt.split_whitespace().filter(|w| *w == "cached").count();
    if cached > 0 {
        usage["prompt_tokens_details"] = json!({"cached_tokens": cached, "audio_tokens": 0});
    }

    if v["stream"] != Value::Bool(true) {
        let body = if chat {
            json!({"id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish_reason}],
                "usage": usage})
        } else {
            json!({"id": "cmpl-test", "object": "text_completion", "created": 1, "model": model,
                "choices": [{"index": 0, "text": answer, "finish_reason": finish_reason}], "usage": usage})
        };
        let bytes = Bytes::from(body.to_string());
        *st.last_json.lock().unwrap() = bytes.clone();
        return full(StatusCode::OK, "application/json", bytes);
    }

    let include_usage =
        v["stream_options"]["include_usage"] == Value::Bool(true) && model != "no-usage";
    let usage_null = if include_usage { ",\"usage\":null" } else { "" };
    let mut events: Vec<String> = Vec::new();
    for (i, w) in answer.split(' ').enumerate() {
        let piece = if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        };
        let piece = serde_json::to_string(&piece).unwrap();
        let ev = if chat {
            format!(
                "data: {{\"id\":\"chatcmpl-test\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{piece}}},\"finish_reason\":null}}]{usage_null}}}\n\n"
            )
        } else {
            format!(
                "data: {{\"id\":\"cmpl-test\",\"object\":\"text_completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":{piece},\"finish_reason\":null}}]{usage_null}}}\n\n"
            )
        };
        events.push(ev);
    }
    // The closing chunk: an empty delta with the finish reason.
    events.push(if chat {
        format!("data: {{\"id\":\"chatcmpl-test\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"{finish_reason}\"}}]{usage_null}}}\n\n")
    } else {
        format!("data: {{\"id\":\"cmpl-test\",\"object\":\"text_completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"text\":\"\",\"finish_reason\":\"{finish_reason}\"}}]{usage_null}}}\n\n")
    });
    if include_usage {
        events.push(format!("data: {{\"id\":\"chatcmpl-test\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{model}\",\"choices\":[],\"usage\":{usage}}}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_string());

    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let delay = if model == "slow" {
        Duration::from_millis(20)
    } else {
        Duration::ZERO
    };
    let drop_after = match model.as_str() {
        "drop" => Some(2),
        "cut" => Some(0),
        _ => None,
    };
    let linger = model == "linger";
    let stall_after = if model == "stall" { Some(2) } else { None };
    if model == "delay" && chat {
        events.insert(0, format!("data: {{\"id\":\"chatcmpl-test\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]{usage_null}}}\n\n"));
    }
    let delay_first = model == "delay";
    let st2 = st.clone();
    tokio::spawn(async move {
        let mut sent = Vec::new();
        for (i, ev) in events.into_iter().enumerate() {
            if delay_first && i == 1 {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    () = tx.closed() => {
                        st2.cancelled.fetch_add(1, Ordering::SeqCst);
                        st2.cancel_notify.notify_waiters();
                        return;
                    }
                }
            }
            if stall_after == Some(i) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            if drop_after == Some(i) {
                // Let what was sent reach the wire, then die like a crashed server.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err(std::io::Error::other("cut"))).await;
                *st2.last_stream.lock().unwrap() = sent;
                return;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            sent.extend_from_slice(ev.as_bytes());
            if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                st2.cancelled.fetch_add(1, Ordering::SeqCst);
                st2.cancel_notify.notify_waiters();
                return;
            }
        }
        *st2.last_stream.lock().unwrap() = sent;
        if linger {
            tx.closed().await;
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, "text/event-stream".parse().unwrap());
    r
}
