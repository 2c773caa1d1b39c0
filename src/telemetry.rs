//! Logs (`tracing`) and Prometheus metrics.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cache::CacheUse;
use crate::metering::UsageEvent;

/// A label value shared by reference count: labelling a request clones no strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(pub Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

impl From<&Arc<str>> for Label {
    fn from(s: &Arc<str>) -> Self {
        Label(s.clone())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub tenant: Label,
    pub model: Label,
    pub endpoint: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub tenant: Label,
    pub model: Label,
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub tenant: Label,
    pub model: Label,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub tenant: Label,
    pub model: Label,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantModelLabels {
    pub tenant: Label,
    pub model: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub tenant: Label,
    /// `set/rule`
    pub rule: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub model: Label,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn overhead_histogram() -> Histogram {
    // 10 µs .. ~1.3 s
    Histogram::new(exponential_buckets(0.00001, 2.0, 18))
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: HistogramFamily<LatencyLabels>,
    pub upstream_responses: Family<UpstreamLabels, Counter>,
    pub fallbacks: Family<FallbackLabels, Counter>,
    pub upstream_retries: Family<BackendLabel, Counter>,
    pub overhead: HistogramFamily<EndpointLabel>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cache_requests: Family<CacheLabels, Counter>,
    pub cache_saved_tokens: Family<TenantModelLabels, Counter>,
    /// Usage events (one per model request, as the ledger has rows).
    pub usage_events: Family<TenantModelLabels, Counter>,
    /// Cost in nano-USD, as the ledger's `cost_nanousd` column sums.
    pub cost: Family<TenantModelLabels, Counter>,
    pub rule_hits: Family<RuleLabels, Counter>,
    pub usage_missing: Counter,
    pub policy_reloads: Family<ResultLabels, Counter>,
    pub policy_version: Gauge,
    pub tls_reloads: Family<ResultLabels, Counter>,
    pub in_flight: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Adds metrics read at each scrape from their owner (e.g. the local models' gauges).
    pub fn register_collector(&mut self, collector: impl prometheus_client::collector::Collector) {
        self.registry.register_collector(Box::new(collector));
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fuke");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by tenant, model alias, endpoint and status",
            requests.clone(),
        );
        let latency: HistogramFamily<LatencyLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time until response headers, by tenant, model alias and endpoint",
            latency.clone(),
        );
        let upstream_responses = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_responses",
            "Upstream answers by upstream and HTTP status (0: no answer)",
            upstream_responses.clone(),
        );
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Route candidates passed over, by model alias and reason",
            fallbacks.clone(),
        );
        let overhead: HistogramFamily<EndpointLabel> =
            Family::new_with_constructor(overhead_histogram);
        registry.register(
            "overhead_seconds",
            "The gateway's own time per model request until response headers: total less the time waiting for backends",
            overhead.clone(),
        );
        let upstream_retries = Family::<BackendLabel, Counter>::default();
        registry.register(
            "upstream_connect_retries",
            "Connections tried again after a connect failure, by backend",
            upstream_retries.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens reported by upstreams, by tenant, model alias and kind",
            tokens.clone(),
        );
        let cache_requests = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Chat requests of tenants with a cache, by result (hit_exact, hit_semantic, miss, bypass)",
            cache_requests.clone(),
        );
        let rule_hits = Family::<RuleLabels, Counter>::default();
        registry.register(
            "rule_hits",
            "Requests on which a policy content rule fired (redaction, block, cap, residency), by tenant and rule",
            rule_hits.clone(),
        );
        let cache_saved_tokens = Family::<TenantModelLabels, Counter>::default();
        registry.register(
            "cache_saved_tokens",
            "Tokens the cached answers served had cost when they were made",
            cache_saved_tokens.clone(),
        );
        let usage_events = Family::<TenantModelLabels, Counter>::default();
        registry.register(
            "usage_events",
            "Usage events recorded (one ledger row each), per tenant and model alias",
            usage_events.clone(),
        );
        let cost = Family::<TenantModelLabels, Counter>::default();
        registry.register(
            "cost_nanousd",
            "Cost of the recorded requests in nano-USD (1e-9 USD), from the policy's pricing table",
            cost.clone(),
        );
        let usage_missing = Counter::default();
        registry.register(
            "usage_missing",
            "Successful model responses whose upstream reported no usage",
            usage_missing.clone(),
        );
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reload attempts by result",
            policy_reloads.clone(),
        );
        let policy_version = Gauge::default();
        registry.register(
            "policy_version",
            "Version number of the policy in service",
            policy_version.clone(),
        );
        let tls_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Certificate reload attempts by result",
            tls_reloads.clone(),
        );
        let in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "in_flight_requests",
            "Requests being served",
            in_flight.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            upstream_responses,
            fallbacks,
            upstream_retries,
            overhead,
            tokens,
            cache_requests,
            cache_saved_tokens,
            usage_events,
            cost,
            rule_hits,
            usage_missing,
            policy_reloads,
            policy_version,
            tls_reloads,
            in_flight,
        }
    }

    /// Token counters from one usage event (whatever sink stores the event).
    /// Counts one firing of `rule` for `tenant`.
    pub fn rule_hit(&self, tenant: &Arc<str>, rule: &Arc<str>) {
        self.rule_hits
            .get_or_create(&RuleLabels {
                tenant: Label::from(tenant),
                rule: Label(rule.clone()),
            })
            .inc();
    }

    pub fn record_usage(&self, ev: &UsageEvent) {
        for rule in &ev.rules {
            self.rule_hit(&ev.tenant, rule);
        }
        let result = match ev.cache {
            CacheUse::Off => None,
            CacheUse::Bypass(_) => Some("bypass"),
            CacheUse::Miss => Some("miss"),
            CacheUse::Hit { exact: true, .. } => Some("hit_exact"),
            CacheUse::Hit { exact: false, .. } => Some("hit_semantic"),
        };
        if let Some(result) = result {
            self.cache_requests
                .get_or_create(&CacheLabels {
                    tenant: Label::from(&ev.tenant),
                    model: Label::from(&ev.model_alias),
                    result,
                })
                .inc();
        }
        if let CacheUse::Hit {
            saved: Some(saved), ..
        } = ev.cache
        {
            self.cache_saved_tokens
                .get_or_create(&TenantModelLabels {
                    tenant: Label::from(&ev.tenant),
                    model: Label::from(&ev.model_alias),
                })
                .inc_by(saved.total_tokens);
        }
        let labels = TenantModelLabels {
            tenant: Label::from(&ev.tenant),
            model: Label::from(&ev.model_alias),
        };
        self.usage_events.get_or_create(&labels).inc();
        if let Some((nanos, _)) = ev.cost()
            && nanos > 0
        {
            self.cost.get_or_create(&labels).inc_by(nanos as u64);
        }
        if ev.usage.is_none() && ev.status < 400 {
            self.usage_missing.inc();
        }
        // The tokens billed (the ledger's), so the counters reconcile with it.
        let (usage, source) = ev.billed();
        if source == crate::metering::UsageSource::None {
            return;
        }
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        tenant: Label::from(&ev.tenant),
                        model: Label::from(&ev.model_alias),
                        kind,
                    })
                    .inc_by(n);
            }
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Installs the global `tracing` subscriber (`RUST_LOG` filters; default `info`). Lines are
/// written by a background thread in batches ([`crate::logwriter`]) so a request never waits
/// on stderr; writers wait rather than drop when it falls behind (usage lines must not
/// vanish). The writer is returned for the usage lines too. Keep the guard until exit: it
/// writes what is buffered.
pub fn init_logging(
    json: bool,
) -> std::io::Result<(crate::logwriter::BatchWriter, crate::logwriter::FlushGuard)> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let (writer, guard) = crate::logwriter::BatchWriter::spawn(std::io::stderr())?;
    // llama.cpp logs every model's metadata at info level: its warnings are what an operator needs.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,llama-cpp-2=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    Ok((writer, guard))
}
