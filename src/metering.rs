//! Usage events: one per finished model request, handed to a [`UsageSink`]. The default sink
//! writes a log line; the durable ledger implements the same trait.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::backends::BoxFuture;
use crate::openai::{Endpoint, Usage};

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole answer (or the upstream's error answer) reached the client.
    Completed,
    /// The client went away before the end; the upstream request was cancelled.
    ClientAborted,
    /// The upstream failed, hung or broke the stream.
    UpstreamFailed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::ClientAborted => "client_aborted",
            Outcome::UpstreamFailed => "upstream_failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UsageEvent {
    pub request_id: String,
    pub tenant: Arc<str>,
    pub key_id: Arc<str>,
    pub endpoint: Endpoint,
    pub model_alias: Arc<str>,
    pub upstream_model: String,
    pub backend: String,
    /// The upstream's own counts; `None` when it reported none (never estimated).
    pub usage: Option<Usage>,
    pub status: u16,
    pub latency: Duration,
    pub streamed: bool,
    pub outcome: Outcome,
    pub finished_at: SystemTime,
}

/// Receives every usage event. `record` completes once the event is safely stored; the gateway
/// awaits it before releasing the last bytes of a response.
pub trait UsageSink: Send + Sync {
    fn record(&self, event: UsageEvent) -> BoxFuture<'static, ()>;
}

/// The default sink: one structured log line per request (the counters are fed for every
/// sink, by [`Metrics::record_usage`]).
#[derive(Default)]
pub struct LogSink;

impl UsageSink for LogSink {
    fn record(&self, ev: UsageEvent) -> BoxFuture<'static, ()> {
        let usage = ev.usage.unwrap_or_default();
        tracing::info!(
            target: "fuke::usage",
            request_id = %ev.request_id,
            tenant = %ev.tenant,
            key_id = %ev.key_id,
            endpoint = ev.endpoint.as_str(),
            model = %ev.model_alias,
            upstream_model = %ev.upstream_model,
            backend = %ev.backend,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            total_tokens = usage.total_tokens,
            usage_reported = ev.usage.is_some(),
            status = ev.status,
            latency_ms = ev.latency.as_millis() as u64,
            streamed = ev.streamed,
            outcome = ev.outcome.as_str(),
            "usage"
        );
        Box::pin(async {})
    }
}
