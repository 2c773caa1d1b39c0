//! Usage events: one per finished model request, handed to a [`UsageSink`]. The default sink
//! feeds `/metrics` and a log line; the durable ledger implements the same trait.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::backends::BoxFuture;
use crate::openai::{Endpoint, Usage};
use crate::telemetry::{Metrics, TokenLabels};

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

/// The default sink: Prometheus counters and one structured log line per request.
pub struct MetricsSink {
    metrics: Arc<Metrics>,
}

impl MetricsSink {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsSink { metrics }
    }
}

impl UsageSink for MetricsSink {
    fn record(&self, ev: UsageEvent) -> BoxFuture<'static, ()> {
        let usage = ev.usage.unwrap_or_default();
        if ev.usage.is_none() && ev.status < 400 {
            self.metrics.usage_missing.inc();
        }
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            if n > 0 {
                self.metrics
                    .tokens
                    .get_or_create(&TokenLabels {
                        tenant: ev.tenant.to_string(),
                        model: ev.model_alias.to_string(),
                        kind,
                    })
                    .inc_by(n);
            }
        }
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
