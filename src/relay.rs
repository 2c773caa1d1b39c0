//! Relays a backend's answer to the client and meters it: JSON answers are read whole (they are
//! small) and released after metering; SSE answers flow through [`SseScanner`] frame by frame,
//! with `data: [DONE]` held until the usage event is recorded.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::{Instant, Sleep};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt as _;
use http::{HeaderValue, Response, header};
use http_body::Body as _;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use crate::backends::BackendResponse;
use crate::body::{self, Body, BoxError};
use crate::cache::{CacheUse, Capture, Fill};
use crate::error::Error;
use crate::metering::{Outcome, UsageEvent, UsageSink};
use crate::openai::{Endpoint, Usage, usage_of_response};
use crate::routing::breaker::{Permit, Verdict};
use crate::sse::SseScanner;
use crate::telemetry::Metrics;
use crate::trace::{self, RequestTrace};
use opentelemetry::trace::{SpanKind, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};

/// How long to keep reading an upstream after its `[DONE]` for connection reuse.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Largest non-streamed upstream answer accepted.
const MAX_JSON_ANSWER: usize = 64 << 20;

/// Everything needed to write the usage event of one request.
pub struct Meter {
    pub sink: Arc<dyn UsageSink>,
    pub metrics: Arc<Metrics>,
    pub request_id: Arc<str>,
    pub tenant: Arc<str>,
    pub key_id: Arc<str>,
    pub endpoint: Endpoint,
    pub model_alias: Arc<str>,
    pub upstream_model: Arc<str>,
    pub backend: Arc<str>,
    pub started: std::time::Instant,
    pub streamed: bool,
    /// Why earlier candidates did not serve (`timeout,breaker_open`), if any did not.
    pub fallback: Option<Arc<str>>,
    /// Output chunks the client received (SSE).
    pub chunks: u32,
    /// The breaker's admission of this call: settled by how the answer ends.
    pub permit: Option<Permit>,
    /// The request's spans, ended when the answer is metered.
    pub trace: Option<MeterTrace>,
    /// What the answer cache did.
    pub cache: CacheUse,
    /// Knowledge-base excerpts injected.
    pub kb_chunks: u32,
    /// Content rules that fired (on the request, then on the answer).
    pub rules: crate::rules::Hits,
    /// Rule sets that redact the answer.
    pub answer_rules: Option<Arc<[Arc<crate::rules::RuleSet>]>>,
    /// Prices of the policy version the request runs under.
    pub pricing: Option<Arc<crate::ledger::pricing::Pricing>>,
    /// Whether the usage event has been recorded; a meter dropped before that records a
    /// client abort (the request was cancelled mid-answer).
    pub recorded: std::sync::atomic::AtomicBool,
}

impl Drop for Meter {
    fn drop(&mut self) {
        if !self.recorded.load(std::sync::atomic::Ordering::Acquire) {
            self.record_detached(None, 499, Outcome::ClientAborted);
        }
    }
}

/// Spans a meter ends: the request's (its server span ends when the last holder drops it) and
/// the served attempt's (attempt, backend call).
pub struct MeterTrace {
    pub request: Arc<RequestTrace>,
    pub spans: Vec<Context>,
}

impl MeterTrace {
    fn finish(&self, event: &UsageEvent) {
        let mut attrs = vec![KeyValue::new("fuke.outcome", event.outcome.as_str())];
        if let Some(u) = &event.usage {
            attrs.push(KeyValue::new(
                "gen_ai.usage.input_tokens",
                u.prompt_tokens as i64,
            ));
            attrs.push(KeyValue::new(
                "gen_ai.usage.output_tokens",
                u.completion_tokens as i64,
            ));
        }
        if !event.upstream_model.is_empty() {
            attrs.push(KeyValue::new(
                "gen_ai.response.model",
                event.upstream_model.clone(),
            ));
        }
        attrs.push(KeyValue::new("fuke.backend", event.backend.clone()));
        if let Some(f) = &event.fallback {
            attrs.push(KeyValue::new("fuke.fallback", f.to_string()));
        }
        self.request.set(attrs.iter().cloned());
        let failed = event.outcome != Outcome::Completed || event.status >= 500;
        // Innermost first: the backend call, then its attempt.
        for cx in self.spans.iter().rev() {
            let span = cx.span();
            for kv in &attrs {
                span.set_attribute(kv.clone());
            }
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(event.status),
            ));
            trace::end(cx, failed.then_some(event.outcome.as_str()));
        }
    }
}

impl Meter {
    fn event(&self, usage: Option<Usage>, status: u16, outcome: Outcome) -> UsageEvent {
        UsageEvent {
            request_id: self.request_id.clone(),
            tenant: self.tenant.clone(),
            key_id: self.key_id.clone(),
            endpoint: self.endpoint,
            model_alias: self.model_alias.clone(),
            upstream_model: self.upstream_model.clone(),
            backend: self.backend.clone(),
            usage,
            status,
            latency: self.started.elapsed(),
            streamed: self.streamed,
            outcome,
            finished_at: SystemTime::now(),
            fallback: self.fallback.clone(),
            streamed_chunks: self.chunks,
            cache: self.cache,
            kb_chunks: self.kb_chunks,
            rules: self.rules.0.clone(),
            pricing: self.pricing.clone(),
        }
    }

    /// Tells the backend's breaker how the call went.
    fn settle(&self, status: u16, outcome: Outcome) {
        let Some(permit) = &self.permit else { return };
        let verdict = match outcome {
            Outcome::ClientAborted => Verdict::Neutral,
            Outcome::UpstreamFailed => Verdict::Failure,
            Outcome::Completed if status >= 500 || status == 429 => Verdict::Failure,
            // A 4xx is about the request, not the backend's health.
            Outcome::Completed if status >= 400 => Verdict::Neutral,
            Outcome::Completed => Verdict::Success,
        };
        permit.settle(verdict);
    }

    pub async fn record(&self, usage: Option<Usage>, status: u16, outcome: Outcome) {
        if self
            .recorded
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        self.settle(status, outcome);
        let event = self.event(usage, status, outcome);
        self.metrics.record_usage(&event);
        let Some(t) = &self.trace else {
            self.sink.record(event).await;
            return;
        };
        t.finish(&event);
        let commit = t
            .request
            .child(None, "usage commit", SpanKind::Internal, Vec::new());
        self.sink.record(event).await;
        trace::end(&commit, None);
    }

    /// Records from a destructor: the request is gone, the event must not be.
    pub fn record_detached(&self, usage: Option<Usage>, status: u16, outcome: Outcome) {
        if self
            .recorded
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        self.settle(status, outcome);
        let event = self.event(usage, status, outcome);
        self.metrics.record_usage(&event);
        if let Some(t) = &self.trace {
            t.finish(&event);
        }
        let fut = self.sink.record(event);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(fut);
        }
    }
}

/// Turns the backend's answer into the client's response. `strip_usage_chunk`: the client did
/// not ask for `stream_options.include_usage`.
/// `fill`: where a complete, successful answer is stored for the cache.
pub async fn relay(
    answer: BackendResponse,
    meter: Meter,
    strip_usage_chunk: bool,
    fill: Option<Fill>,
) -> Result<Response<Body>, Error> {
    let BackendResponse {
        status,
        headers,
        body: upstream,
        idle_timeout,
        deadline,
    } = answer;
    let is_sse = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));

    let body = if is_sse && status.is_success() {
        let chat = meter.endpoint == Endpoint::ChatCompletions;
        let redactor = meter
            .answer_rules
            .clone()
            .map(|sets| crate::rules::stream::StreamRedactor::new(sets, chat));
        let relay = SseRelay {
            redactor,
            upstream,
            scanner: SseScanner::new(strip_usage_chunk),
            queue: VecDeque::new(),
            idle: idle_timeout,
            deadline,
            idle_timer: Box::pin(tokio::time::sleep(idle_timeout)),
            last_frame: Instant::now(),
            phase: Phase::Streaming,
            meter: Some(meter),
            status: status.as_u16(),
            capture: fill.map(Capture::new),
        };
        let stream = futures_util::stream::unfold(relay, |mut r| async move {
            r.next().await.map(|item| (item.map(Frame::data), r))
        });
        StreamBody::new(stream).boxed_unsync()
    } else {
        let mut meter = meter;
        let mut bytes = read_answer(upstream, idle_timeout, deadline, &meter).await?;
        if let Some(sets) = meter.answer_rules.clone().filter(|_| status.is_success()) {
            match crate::rules::redact_answer(&sets, &bytes, &mut meter.rules) {
                Ok(Some(redacted)) => bytes = redacted,
                Ok(None) => {}
                Err(crate::rules::Unreadable) => {
                    let e = Error::UpstreamProtocol {
                        upstream: meter.backend.to_string(),
                        detail: "the answer could not be read to apply response rules".into(),
                    };
                    meter.record(None, 502, Outcome::UpstreamFailed).await;
                    return Err(e);
                }
            }
        }
        let usage = if status.is_success() {
            usage_of_response(&bytes)
        } else {
            None
        };
        meter
            .record(usage, status.as_u16(), Outcome::Completed)
            .await;
        if let Some(fill) = fill.filter(|_| status.is_success()) {
            fill.json(bytes.clone());
        }
        body::full(bytes)
    };

    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if is_sse {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    Ok(resp)
}

async fn read_answer(
    mut body: Body,
    idle: std::time::Duration,
    deadline: Option<Instant>,
    meter: &Meter,
) -> Result<Bytes, Error> {
    let result = async {
        let mut buf = BytesMut::new();
        loop {
            // A frame already there (a small answer usually arrives with its headers) needs no
            // timer: each timer costs a clock read and writes to the runtime's shared counts.
            let frame = match body.frame().now_or_never() {
                Some(frame) => frame,
                None => {
                    let wait = Instant::now() + idle;
                    let wait = deadline.map_or(wait, |d| d.min(wait));
                    tokio::time::timeout_at(wait, body.frame())
                        .await
                        .map_err(|_| Error::UpstreamTimeout {
                            upstream: meter.backend.to_string(),
                            after_ms: idle.as_millis() as u64,
                        })?
                }
            };
            let frame = match frame {
                None => return Ok(buf.freeze()),
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    return Err(Error::UpstreamProtocol {
                        upstream: meter.backend.to_string(),
                        detail: format!("reading answer: {e}"),
                    });
                }
            };
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > MAX_JSON_ANSWER {
                    return Err(Error::UpstreamProtocol {
                        upstream: meter.backend.to_string(),
                        detail: format!("answer larger than {MAX_JSON_ANSWER} bytes"),
                    });
                }
                if buf.is_empty() && body.is_end_stream() {
                    // The common case: one frame holds the whole answer; keep it uncopied.
                    return Ok(data);
                }
                buf.extend_from_slice(&data);
            }
        }
    }
    .await;
    if let Err(e) = &result {
        meter
            .record(None, e.status().as_u16(), Outcome::UpstreamFailed)
            .await;
    }
    result
}

enum Phase {
    Streaming,
    /// `[DONE]` is out; the client's stream ends next.
    Draining,
    Finished,
}

/// No frame within the idle timeout.
struct Silent;

struct SseRelay {
    upstream: Body,
    scanner: SseScanner,
    queue: VecDeque<Bytes>,
    idle: std::time::Duration,
    /// The candidate's total timeout.
    deadline: Option<Instant>,
    idle_timer: Pin<Box<Sleep>>,
    last_frame: Instant,
    phase: Phase,
    /// Present until the usage event is recorded.
    meter: Option<Meter>,
    status: u16,
    /// The frames kept for the cache, when the answer may be stored.
    capture: Option<Capture>,
    /// Response redaction, for tenants with response rules.
    redactor: Option<crate::rules::stream::StreamRedactor>,
}

impl SseRelay {
    async fn next(&mut self) -> Option<Result<Bytes, BoxError>> {
        loop {
            if let Some(b) = self.queue.pop_front() {
                return Some(Ok(b));
            }
            match self.phase {
                Phase::Finished => return None,
                Phase::Draining => {
                    // The client's answer is complete: end it now. Reading the upstream to its
                    // end (normally nothing is left) lets its connection go back to the pool.
                    let mut rest = std::mem::replace(&mut self.upstream, body::empty());
                    if !rest.is_end_stream() {
                        tokio::spawn(async move {
                            let drain = async { while let Some(Ok(_)) = rest.frame().await {} };
                            let _ = tokio::time::timeout(DRAIN_LIMIT, drain).await;
                        });
                    }
                    self.phase = Phase::Finished;
                    return None;
                }
                Phase::Streaming => {}
            }
            let frame = match self.next_frame().await {
                Err(Silent) => {
                    self.fail("upstream went silent mid-stream or passed its total timeout")
                        .await;
                    continue;
                }
                Ok(None) => {
                    self.fail("upstream closed the stream before [DONE]").await;
                    continue;
                }
                Ok(Some(Err(e))) => {
                    self.fail(&format!("upstream stream broke: {e}")).await;
                    continue;
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers carry nothing for the client
            };
            let fed = match &mut self.redactor {
                None => {
                    if let Some(c) = &mut self.capture {
                        c.push(&data);
                    }
                    self.scanner.feed(data, &mut self.queue)
                }
                Some(r) => {
                    // The cache keeps what the client got: the redacted events.
                    let mut events = Vec::new();
                    let fed = self.scanner.feed(data, &mut events);
                    let mut redacted = Vec::new();
                    for e in events {
                        r.feed(e, &mut redacted);
                    }
                    if self.scanner.is_done() {
                        r.finish(&mut redacted);
                    }
                    for e in redacted {
                        if let Some(c) = &mut self.capture {
                            c.push(&e);
                        }
                        self.queue.push_back(e);
                    }
                    fed
                }
            };
            if let Err(e) = fed {
                self.fail(&e.to_string()).await;
                continue;
            }
            if self.scanner.is_done() {
                if let Some(mut meter) = self.meter.take() {
                    meter.chunks = self.scanner.output_events();
                    self.add_rule_hits(&mut meter);
                    meter
                        .record(self.scanner.usage(), self.status, Outcome::Completed)
                        .await;
                }
                if let Some(c) = &mut self.capture {
                    c.complete();
                }
                if let Some(done) = self.scanner.take_held() {
                    self.queue.push_back(done);
                }
                self.phase = Phase::Draining;
            }
        }
    }

    /// Response rules that fired on this stream, onto its usage event.
    fn add_rule_hits(&self, meter: &mut Meter) {
        if let Some(r) = &self.redactor {
            for h in &r.hits.0 {
                meter.rules.add(h);
            }
        }
    }

    /// The next upstream frame, or `Silent` after `idle` without one. The timer is re-armed only
    /// when it fires, not per frame: a frame just records when it came.
    async fn next_frame(&mut self) -> Result<Option<Result<Frame<Bytes>, BoxError>>, Silent> {
        loop {
            tokio::select! {
                biased;
                frame = self.upstream.frame() => {
                    self.last_frame = Instant::now();
                    return Ok(frame);
                }
                () = &mut self.idle_timer => {
                    let idle_end = self.last_frame + self.idle;
                    let deadline = self.deadline.map_or(idle_end, |d| d.min(idle_end));
                    if Instant::now() >= deadline {
                        return Err(Silent);
                    }
                    self.idle_timer.as_mut().reset(deadline);
                }
            }
        }
    }

    /// Ends the client's stream with an OpenAI-shaped error event; never splices another answer.
    async fn fail(&mut self, detail: &str) {
        let backend = self
            .meter
            .as_ref()
            .map(|m| m.backend.to_string())
            .unwrap_or_default();
        let error = Error::UpstreamProtocol {
            upstream: backend,
            detail: detail.to_string(),
        };
        tracing::warn!(error = %error, "stream ended abnormally");
        self.capture = None;
        if let Some(mut meter) = self.meter.take() {
            meter.chunks = self.scanner.output_events();
            self.add_rule_hits(&mut meter);
            meter
                .record(self.scanner.usage(), 502, Outcome::UpstreamFailed)
                .await;
        }
        let payload = error.body_bytes();
        let mut ev = BytesMut::with_capacity(payload.len() + 8);
        ev.put_slice(b"data: ");
        ev.put_slice(&payload);
        ev.put_slice(b"\n\n");
        self.queue.push_back(ev.freeze());
        self.phase = Phase::Finished;
    }
}

impl Drop for SseRelay {
    fn drop(&mut self) {
        // Dropped before the usage event: the client disconnected. Dropping `upstream` here
        // closes the upstream connection, which cancels the generation there.
        if let Some(mut meter) = self.meter.take() {
            meter.chunks = self.scanner.output_events();
            self.add_rule_hits(&mut meter);
            meter.record_detached(self.scanner.usage(), 499, Outcome::ClientAborted);
        }
    }
}
