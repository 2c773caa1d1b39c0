//! Routing: a model alias names ordered candidates (remote upstream + model, or a local model),
//! grouped in tiers with weights. Each request tries them in order until one starts answering:
//! a candidate is skipped when its breaker is open or it is at `max_in_flight`, and abandoned
//! (its request cancelled) when it fails before a byte reached the client: connect errors, 5xx,
//! 429, a broken stream, or no first token within `first_token_timeout`. Once a byte has been
//! sent, the answer is that candidate's to the end; a failure then ends the stream with an
//! error event, never with a second answer spliced on.

pub(crate) mod assemble;
pub mod breaker;
mod first_token;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, Response, StatusCode, header};

use crate::app::App;
use crate::backends::{Backend, BackendRequest, BackendResponse};
use crate::body::{self, Body};
use crate::cache::{self, Answer, CacheUse, Fill};
use crate::error::Error;
use crate::metering::Outcome;
use crate::openai::{Endpoint, JsonRequest, Usage};
use crate::policy::{ModelRoute, Principal};
use crate::relay::{Meter, MeterTrace, relay};
use crate::telemetry::{FallbackLabels, Label, UpstreamLabels};
use crate::trace::{self, RequestTrace};
use breaker::{Health, Permit, Refusal, Verdict};
use opentelemetry::trace::{SpanKind, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};

pub use breaker::{Board, BoardMetrics, BreakerSettings, HealthSnapshot};

/// Default first-token deadline of a candidate that has a fallback after it.
pub const DEFAULT_FIRST_TOKEN_TIMEOUT: Duration = Duration::from_millis(200);

/// Attempts to connect again after a refused or failed connection, per candidate.
const CONNECT_RETRIES: u32 = 2;
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(10);

const X_FUKE_BACKEND: HeaderName = HeaderName::from_static("x-fuke-backend");
const X_FUKE_FALLBACK: HeaderName = HeaderName::from_static("x-fuke-fallback");
const X_FUKE_FALLBACK_FROM: HeaderName = HeaderName::from_static("x-fuke-fallback-from");
const X_FUKE_OVERHEAD_MS: HeaderName = HeaderName::from_static("x-fuke-overhead-ms");

/// One place a model alias may be served from.
pub struct Candidate {
    /// What `x-fuke-backend` says: `upstream/model` or `local/name` unless policy names it.
    pub name: Arc<str>,
    /// `name` as the `x-fuke-backend` value, built once: each answer clones it instead of
    /// allocating and checking a new one.
    pub header: HeaderValue,
    pub backend: Arc<dyn Backend>,
    /// The model name the backend knows.
    pub model: Arc<str>,
    /// The backend's name, shared by the metrics and usage events of every call.
    pub backend_name: Arc<str>,
    pub tier: u32,
    pub weight: u32,
    /// Abandon the candidate when no content token came within this (not applied to the last
    /// candidate of an attempt: nothing would come after it). `None`: wait.
    pub first_token_timeout: Option<Duration>,
    /// Longest a whole answer may take.
    pub timeout: Option<Duration>,
    pub max_in_flight: Option<u32>,
    /// Thresholds of this candidate's breaker (its upstream's `breaker` settings).
    pub breaker: BreakerSettings,
    /// Breaker and in-flight count of backend + model, shared across policy versions.
    pub health: Arc<Health>,
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate")
            .field("name", &self.name)
            .field("tier", &self.tier)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

/// Why a candidate did not serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// No first token within the deadline (or the candidate's total timeout).
    Timeout,
    BreakerOpen,
    Busy,
    ConnectError,
    Error5xx,
    RateLimited,
    /// The answer broke (or was invalid) before any byte reached the client.
    StreamBroken,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Timeout => "timeout",
            Fallback::BreakerOpen => "breaker_open",
            Fallback::Busy => "busy",
            Fallback::ConnectError => "connect_error",
            Fallback::Error5xx => "error_5xx",
            Fallback::RateLimited => "rate_limited",
            Fallback::StreamBroken => "stream_broken",
        }
    }

    /// The reason to move on after a backend error, if it is one (a 400 is the caller's).
    fn of_error(e: &Error) -> Option<Fallback> {
        Some(match e {
            Error::UpstreamConnect { .. } => Fallback::ConnectError,
            Error::UpstreamTimeout { .. } => Fallback::Timeout,
            Error::UpstreamProtocol { .. } => Fallback::StreamBroken,
            Error::Unavailable { .. } | Error::ShuttingDown | Error::Internal(_) => {
                Fallback::Error5xx
            }
            Error::RateLimited { .. } => Fallback::RateLimited,
            _ => return None,
        })
    }

    fn of_status(status: StatusCode) -> Option<Fallback> {
        if status == StatusCode::TOO_MANY_REQUESTS {
            Some(Fallback::RateLimited)
        } else if status.is_server_error() {
            Some(Fallback::Error5xx)
        } else {
            None
        }
    }
}

/// The order in which one request tries `candidates` (sorted by tier): tier by tier, and inside
/// a tier a weighted random permutation, so that healthy equals share the load by weight and a
/// failing one is followed by its peers before the next tier.
pub fn attempt_order(candidates: &[Candidate]) -> Vec<&Candidate> {
    if let [only] = candidates {
        return vec![only];
    }
    let mut out = Vec::with_capacity(candidates.len());
    for tier in candidates.chunk_by(|a, b| a.tier == b.tier) {
        if tier.len() == 1 {
            out.push(&tier[0]);
            continue;
        }
        // Efraimidis–Spirakis: sorting by Exp(1)/weight draws without replacement by weight.
        let mut keyed: Vec<(f64, &Candidate)> = tier
            .iter()
            .map(|c| {
                let u: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
                (-u.ln() / f64::from(c.weight.max(1)), c)
            })
            .collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
        out.extend(keyed.into_iter().map(|(_, c)| c));
    }
    out
}

/// The request body, in the form the candidates need.
pub enum Payload<'a> {
    /// A JSON request: rewritten for each candidate, so it can be sent again.
    Json(&'a JsonRequest<'a>),
    /// A streamed upload: sent to one candidate only.
    Upload {
        body: Option<Body>,
        content_type: HeaderValue,
        length: Option<u64>,
    },
}

/// One model request on its way to a candidate.
pub struct Call<'a> {
    pub app: &'a App,
    pub principal: &'a Principal,
    pub route: &'a ModelRoute,
    pub endpoint: Endpoint,
    pub request_id: HeaderValue,
    pub started: Instant,
    /// The client asked for SSE.
    pub stream: bool,
    /// The client asked for the usage chunk.
    pub include_usage: bool,
    /// The request's spans, when tracing is on.
    pub trace: Option<Arc<RequestTrace>>,
    /// What the answer cache did (a miss or bypass, here).
    pub cache: CacheUse,
    /// Where the served answer goes for the cache: taken by the candidate that answers.
    pub fill: std::sync::Mutex<Option<Fill>>,
    /// Knowledge-base excerpts injected into the request.
    pub kb_chunks: u32,
    /// Content rules that fired on the request.
    pub rules: crate::rules::Hits,
    /// Rule sets that redact the answer.
    pub answer_rules: Option<Arc<[Arc<crate::rules::RuleSet>]>>,
    /// A data-residency rule (its name) keeps this request on local candidates.
    pub local_only: Option<Arc<str>>,
    /// The policy's pricing table (the ledger's cost column).
    pub pricing: Option<Arc<crate::ledger::pricing::Pricing>>,
    /// A [`Meter`] has been made for this request: from then on it owns the usage event.
    pub metered: std::sync::atomic::AtomicBool,
}

/// Records a client abort for a call dropped while its candidates were being tried (the
/// client went away before any answer was metered): without it, a JSON request cancelled while
/// waiting for a backend left no usage event.
struct AbortGuard<'c, 'a> {
    call: &'c Call<'a>,
    armed: bool,
}

impl Drop for AbortGuard<'_, '_> {
    fn drop(&mut self) {
        if self.armed && !self.call.metered.load(std::sync::atomic::Ordering::Acquire) {
            meter(self.call, None, None, &[], None).record_detached(
                None,
                499,
                Outcome::ClientAborted,
            );
        }
    }
}

/// Tries the route's candidates until one answers; relays and meters that answer.
pub async fn serve(call: Call<'_>, payload: Payload<'_>) -> Result<Response<Body>, Error> {
    let mut waited = Duration::ZERO;
    let mut guard = AbortGuard {
        call: &call,
        armed: true,
    };
    let result = crate::backends::pin_in_place(|| attempts(&call, payload, &mut waited)).await;
    guard.armed = false;
    drop(guard);
    let mut resp = result?;
    // The gateway's own time: until response headers, less the time spent waiting for
    // backends (answers, first tokens, JSON bodies).
    report_overhead(
        &call,
        &mut resp,
        call.started.elapsed().saturating_sub(waited),
    );
    Ok(resp)
}

/// A request refused by a content rule before any backend: metered (no tokens; the rule on
/// the usage event and in `fuke_rule_hits_total`), then answered with `e`.
pub async fn refuse(call: &Call<'_>, rule: Option<&Arc<str>>, e: Error) -> Error {
    let mut m = meter(call, None, None, &[], None);
    if let Some(rule) = rule {
        m.rules.add(rule);
    }
    m.record(None, e.status().as_u16(), Outcome::Completed)
        .await;
    e
}

/// Answers from the cache: metered first (no backend ran; the tokens the answer saved are on
/// the event), then replayed as the client asked. All of its time is the gateway's own.
pub async fn serve_cached(call: &Call<'_>, answer: &Answer, used: CacheUse) -> Response<Body> {
    let mut meter = meter(call, None, None, &[], None);
    // Stored as the backend answered; the tenant's response rules apply on the way out.
    let redacted = call.answer_rules.as_ref().and_then(|sets| {
        answer.redacted(|text| crate::rules::redact_all(sets, text, &mut meter.rules))
    });
    let answer = redacted.as_ref().unwrap_or(answer);
    let mut resp = cache::replay(answer, call.stream, call.include_usage);
    meter.backend = Arc::from("cache");
    meter.upstream_model = Arc::from(answer.model.as_str());
    meter.cache = used;
    meter.chunks = if call.stream { 3 } else { 0 };
    meter
        .record(Some(Usage::default()), 200, Outcome::Completed)
        .await;
    report_overhead(call, &mut resp, call.started.elapsed());
    resp
}

/// Observes the gateway's own time and says it in `x-fuke-overhead-ms`.
fn report_overhead(call: &Call<'_>, resp: &mut Response<Body>, overhead: Duration) {
    call.app
        .metrics
        .overhead(call.endpoint)
        .observe(overhead.as_secs_f64());
    resp.headers_mut()
        .insert(X_FUKE_OVERHEAD_MS, millis_header(overhead));
}

/// `d` in milliseconds with three decimals (`0.042`), written without formatting machinery.
fn millis_header(d: Duration) -> HeaderValue {
    let us = d.as_micros();
    let mut buf = itoa::Buffer::new();
    let ms = buf.format(us / 1000);
    let mut out = [0u8; 48];
    out[..ms.len()].copy_from_slice(ms.as_bytes());
    let frac = (us % 1000) as u16;
    out[ms.len()..ms.len() + 4].copy_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
    HeaderValue::from_bytes(&out[..ms.len() + 4]).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The stage spans of one attempt, when tracing is on.
struct AttemptSpans {
    request: Arc<RequestTrace>,
    attempt: Context,
    backend: Option<Context>,
}

impl AttemptSpans {
    fn fail(self, reason: &str) {
        if let Some(b) = &self.backend {
            trace::end(b, Some(reason));
        }
        self.attempt
            .span()
            .set_attribute(KeyValue::new("fuke.fallback.reason", reason.to_string()));
        trace::end(&self.attempt, None);
    }
}

async fn attempts(
    call: &Call<'_>,
    mut payload: Payload<'_>,
    waited: &mut Duration,
) -> Result<Response<Body>, Error> {
    let route = call.route;
    let mut order = attempt_order(&route.candidates);
    if let Some(rule) = &call.local_only {
        order.retain(|c| c.backend.is_local());
        if order.is_empty() {
            return Err(Error::Residency {
                model: route.alias.to_string(),
                rule: rule.to_string(),
            });
        }
    }
    let replayable = matches!(payload, Payload::Json(_));
    let mut skipped: Vec<(&Candidate, Fallback)> = Vec::new();
    let mut failure: Option<(&Candidate, Permit, Error)> = None;

    for (i, cand) in order.iter().copied().enumerate() {
        let last = i + 1 == order.len();
        let attempt_span = call.trace.as_ref().map(|t| {
            t.child(
                None,
                "route attempt",
                SpanKind::Internal,
                vec![
                    KeyValue::new("fuke.candidate", cand.name.to_string()),
                    KeyValue::new("fuke.attempt", i as i64),
                ],
            )
        });
        let permit = match cand.health.admit(cand.max_in_flight) {
            Ok(p) => p,
            Err(refusal) => {
                let reason = match refusal {
                    Refusal::Open => Fallback::BreakerOpen,
                    Refusal::Busy => Fallback::Busy,
                };
                if let Some(cx) = &attempt_span {
                    cx.span()
                        .set_attribute(KeyValue::new("fuke.fallback.reason", reason.as_str()));
                    trace::end(cx, None);
                }
                skipped.push((cand, reason));
                continue;
            }
        };
        let spans = match (&call.trace, attempt_span) {
            (Some(t), Some(attempt)) => {
                let local = cand.backend.name().starts_with("local:");
                let op = match call.endpoint {
                    Endpoint::ChatCompletions => "chat",
                    Endpoint::Completions => "text_completion",
                    Endpoint::Embeddings => "embeddings",
                    Endpoint::AudioTranscriptions => "transcription",
                };
                let name = if local {
                    "local generation".to_string()
                } else {
                    format!("{op} {}", cand.model)
                };
                let backend = t.child(
                    Some(&attempt),
                    name,
                    if local {
                        SpanKind::Internal
                    } else {
                        SpanKind::Client
                    },
                    vec![
                        KeyValue::new("gen_ai.operation.name", op),
                        KeyValue::new("gen_ai.request.model", cand.model.clone()),
                        KeyValue::new(
                            "gen_ai.provider.name",
                            if local { "llama.cpp" } else { "openai" },
                        ),
                        KeyValue::new("fuke.backend", cand.backend.name().to_string()),
                    ],
                );
                Some(AttemptSpans {
                    request: t.clone(),
                    attempt,
                    backend: Some(backend),
                })
            }
            _ => None,
        };
        let traceparent = spans
            .as_ref()
            .and_then(|s| s.backend.as_ref())
            .and_then(trace::traceparent);
        // A failure here may still move on only if the body can be sent again.
        let can_move_on = !last && replayable;
        // With a candidate after it, a stream is held back until its first token: a failure
        // before then can still move on, and the deadline (if any) applies.
        let hold_back = can_move_on && streams_tokens(call.endpoint);
        let first_token = cand.first_token_timeout.filter(|_| hold_back);
        let upstream_stream = call.stream || hold_back;
        // JSON bodies are kept to be sent again after a connect failure; an upload goes once.
        let (json, mut upload) = match &mut payload {
            Payload::Json(req) => (
                Some(req.upstream_body_as(&cand.model, upstream_stream)),
                None,
            ),
            Payload::Upload {
                body,
                content_type,
                length,
            } => match body.take() {
                Some(b) => (None, Some((b, content_type.clone(), *length))),
                None => break,
            },
        };
        let request = |upload: &mut Option<(Body, HeaderValue, Option<u64>)>| {
            let (body, content_type, content_length) = match (&json, upload.take()) {
                (Some(b), _) => (
                    body::full(b.clone()),
                    HeaderValue::from_static("application/json"),
                    Some(b.len() as u64),
                ),
                (None, Some(u)) => u,
                (None, None) => (
                    body::empty(),
                    HeaderValue::from_static("application/json"),
                    Some(0),
                ),
            };
            BackendRequest {
                endpoint: call.endpoint,
                body,
                content_type,
                content_length,
                request_id: call.request_id.clone(),
                traceparent: traceparent.clone(),
            }
        };
        let total_deadline = cand.timeout.map(|t| tokio::time::Instant::now() + t);
        let attempt = async {
            // A connection that could not be made carried no request: trying again is safe.
            // The deadline below bounds the retries with everything else.
            let mut retries = 0;
            let resp = loop {
                match cand.backend.send(request(&mut upload)).await {
                    Err(Error::UpstreamConnect { .. })
                        if json.is_some() && retries < CONNECT_RETRIES =>
                    {
                        retries += 1;
                        call.app
                            .metrics
                            .upstream_retries
                            .get_or_create(&crate::telemetry::BackendLabel {
                                backend: cand.backend.name().to_string(),
                            })
                            .inc();
                        tokio::time::sleep(CONNECT_RETRY_PAUSE * retries).await;
                    }
                    other => break other?,
                }
            };
            if hold_back && resp.status.is_success() && is_sse(&resp) {
                first_token::wait(resp, &cand.name).await
            } else {
                Ok(resp)
            }
        };
        // The earlier of the first-token deadline and the total timeout bounds the start.
        let limit = match (first_token, total_deadline) {
            (Some(d), Some(t)) => Some((tokio::time::Instant::now() + d).min(t)),
            (Some(d), None) => Some(tokio::time::Instant::now() + d),
            (None, t) => t,
        };
        let began = Instant::now();
        let result = match limit {
            Some(at) => tokio::time::timeout_at(at, attempt)
                .await
                .unwrap_or_else(|_| Err(deadline_error(cand))),
            None => attempt.await,
        };
        *waited += began.elapsed();
        count_attempt(call.app, cand, &result);

        match result {
            Err(e) => match Fallback::of_error(&e) {
                Some(reason) if can_move_on => {
                    permit.settle(Verdict::Failure);
                    if let Some(s) = spans {
                        s.fail(reason.as_str());
                    }
                    skipped.push((cand, reason));
                    failure = Some((cand, permit, e));
                }
                _ => return Ok(fail(call, cand, permit, &skipped, e, spans).await),
            },
            Ok(resp) => match Fallback::of_status(resp.status) {
                Some(reason) if can_move_on => {
                    // Dropping the answer closes its connection.
                    permit.settle(Verdict::Failure);
                    if let Some(s) = spans {
                        s.fail(reason.as_str());
                    }
                    skipped.push((cand, reason));
                }
                _ => {
                    let mut resp = resp;
                    resp.deadline = total_deadline;
                    let began = Instant::now();
                    let streamed_to_client = call.stream && is_sse(&resp);
                    let out =
                        commit(call, cand, permit, &skipped, resp, upstream_stream, spans).await;
                    if !streamed_to_client {
                        // A JSON answer was read whole before its headers.
                        *waited += began.elapsed();
                    }
                    return out;
                }
            },
        }
    }

    // Nobody answered.
    if let Some((cand, permit, e)) = failure {
        return Ok(fail(call, cand, permit, &skipped, e, None).await);
    }
    let retry_after = route
        .candidates
        .iter()
        .map(|c| c.health.retry_in())
        .min()
        .unwrap_or_default();
    let e = Error::NoBackend {
        model: route.alias.to_string(),
        retry_after_secs: retry_after.as_secs().max(1),
    };
    let meter = meter(call, None, None, &skipped, None);
    meter
        .record(None, e.status().as_u16(), Outcome::UpstreamFailed)
        .await;
    let mut resp = e.into_response();
    label(&mut resp, None, &skipped);
    Ok(resp)
}

fn streams_tokens(endpoint: Endpoint) -> bool {
    matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
}

fn is_sse(resp: &BackendResponse) -> bool {
    resp.headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// The first-token deadline (or the candidate's total timeout) passed before the answer began.
fn deadline_error(cand: &Candidate) -> Error {
    Error::UpstreamTimeout {
        upstream: cand.name.to_string(),
        after_ms: cand
            .first_token_timeout
            .or(cand.timeout)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

fn count_attempt(app: &App, cand: &Candidate, result: &Result<BackendResponse, Error>) {
    let status = result.as_ref().map_or(0, |a| a.status.as_u16());
    app.metrics
        .upstream_responses
        .get_or_create(&UpstreamLabels {
            upstream: Label(cand.backend_name.clone()),
            status,
        })
        .inc();
}

fn meter(
    call: &Call<'_>,
    cand: Option<&Candidate>,
    permit: Option<Permit>,
    skipped: &[(&Candidate, Fallback)],
    spans: Option<AttemptSpans>,
) -> Meter {
    call.metered
        .store(true, std::sync::atomic::Ordering::Release);
    for (_, reason) in skipped {
        call.app
            .metrics
            .fallbacks
            .get_or_create(&FallbackLabels {
                model: Label(call.route.alias.clone()),
                reason: reason.as_str(),
            })
            .inc();
    }
    Meter {
        sink: call.app.sink.clone(),
        metrics: call.app.metrics.clone(),
        // from_utf8 checks ASCII a word at a time; the lossy reading only when it must.
        request_id: std::str::from_utf8(call.request_id.as_bytes()).map_or_else(
            |_| Arc::from(String::from_utf8_lossy(call.request_id.as_bytes())),
            Arc::from,
        ),
        tenant: call.principal.tenant.clone(),
        key_id: call.principal.key_id.clone(),
        endpoint: call.endpoint,
        model_alias: call.route.alias.clone(),
        upstream_model: cand.map_or_else(|| Arc::from(""), |c| c.model.clone()),
        backend: cand.map_or_else(|| Arc::from("-"), |c| c.backend_name.clone()),
        started: call.started,
        streamed: call.stream,
        fallback: reasons(skipped).map(Arc::from),
        chunks: 0,
        cache: call.cache,
        kb_chunks: call.kb_chunks,
        rules: call.rules.clone(),
        answer_rules: call.answer_rules.clone(),
        pricing: call.pricing.clone(),
        recorded: std::sync::atomic::AtomicBool::new(false),
        permit,
        trace: match spans {
            Some(s) => Some(MeterTrace {
                request: s.request,
                spans: [Some(s.attempt), s.backend].into_iter().flatten().collect(),
            }),
            None => call.trace.clone().map(|request| MeterTrace {
                request,
                spans: Vec::new(),
            }),
        },
    }
}

/// `timeout,breaker_open`: why each skipped candidate was skipped, in order.
fn reasons(skipped: &[(&Candidate, Fallback)]) -> Option<String> {
    let reasons: Vec<&str> = skipped.iter().map(|(_, r)| r.as_str()).collect();
    (!reasons.is_empty()).then(|| reasons.join(","))
}

/// Says on the response who served it and why others did not.
fn label(
    resp: &mut Response<Body>,
    served: Option<&Candidate>,
    skipped: &[(&Candidate, Fallback)],
) {
    let headers = resp.headers_mut();
    if let Some(c) = served {
        headers.insert(X_FUKE_BACKEND, c.header.clone());
    }
    if let Some(r) = reasons(skipped)
        && let Ok(v) = HeaderValue::from_str(&r)
    {
        headers.insert(X_FUKE_FALLBACK, v);
        let from: Vec<&str> = skipped.iter().map(|(c, _)| c.name.as_ref()).collect();
        if let Ok(v) = HeaderValue::from_str(&from.join(",")) {
            headers.insert(X_FUKE_FALLBACK_FROM, v);
        }
    }
}

/// The last candidate failed (or failed in a way no other candidate can fix): meter it and answer
/// with its error.
async fn fail(
    call: &Call<'_>,
    cand: &Candidate,
    permit: Permit,
    skipped: &[(&Candidate, Fallback)],
    e: Error,
    spans: Option<AttemptSpans>,
) -> Response<Body> {
    let outcome = if Fallback::of_error(&e).is_some() {
        Outcome::UpstreamFailed
    } else {
        // The backend refused the request itself (e.g. a parameter a local model lacks).
        Outcome::Completed
    };
    let meter = meter(call, Some(cand), Some(permit), skipped, spans);
    meter.record(None, e.status().as_u16(), outcome).await;
    let mut resp = e.into_response();
    label(&mut resp, Some(cand), skipped);
    resp
}

/// `cand` answers: relay its answer (SSE or JSON as the client asked), metered.
async fn commit(
    call: &Call<'_>,
    cand: &Candidate,
    permit: Permit,
    skipped: &[(&Candidate, Fallback)],
    resp: BackendResponse,
    upstream_stream: bool,
    spans: Option<AttemptSpans>,
) -> Result<Response<Body>, Error> {
    let meter = meter(call, Some(cand), Some(permit), skipped, spans);
    let fill = call.fill.lock().ok().and_then(|mut f| f.take());
    let mut out = if upstream_stream && !call.stream && is_sse(&resp) && resp.status.is_success() {
        assemble::json(resp, meter, call.endpoint, fill).await?
    } else {
        relay(resp, meter, call.stream && !call.include_usage, fill).await?
    };
    label(&mut out, Some(cand), skipped);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_header_has_three_decimals() {
        for (us, want) in [
            (0, "0.000"),
            (42, "0.042"),
            (1_000, "1.000"),
            (12_345, "12.345"),
            (999_999_999, "999999.999"),
        ] {
            assert_eq!(millis_header(Duration::from_micros(us)), want);
        }
        assert_eq!(millis_header(Duration::from_nanos(1_999)), "0.001");
    }
}
