//! Logs (`tracing`) and Prometheus metrics.

use std::cell::{OnceCell, RefCell};
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cache::CacheUse;
use crate::metering::UsageEvent;
use crate::openai::Endpoint;

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
    pub upstream: Label,
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

/// Most (metrics, tenant, model) handles a worker thread keeps.
const MAX_CACHED_HANDLES: usize = 4096;

/// (metrics instance, tenant string's address, model string's address) → handles.
type HandleCache = crate::policy::Map<(u64, usize, usize), Rc<RequestMetrics>>;

thread_local! {
    static HANDLES: RefCell<HandleCache> = RefCell::new(HandleCache::default());
}

/// Handles of the metrics of one tenant's requests to one model alias ([`Metrics::of`]). The
/// counters are the families' own: what a scrape reads is the same either way.
pub struct RequestMetrics {
    tenant: Label,
    model: Label,
    usage_events: Counter,
    cost: OnceCell<Counter>,
    prompt_tokens: OnceCell<Counter>,
    completion_tokens: OnceCell<Counter>,
    /// By endpoint: time until response headers, and requests answered 200.
    latency: [OnceCell<Histogram>; 4],
    answered: [OnceCell<Counter>; 4],
}

impl RequestMetrics {
    fn tenant_model(&self) -> TenantModelLabels {
        TenantModelLabels {
            tenant: self.tenant.clone(),
            model: self.model.clone(),
        }
    }
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
    /// Tells this instance's handles apart in the per-thread cache ([`Metrics::of`]).
    id: u64,
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
    /// `overhead`'s histograms by endpoint, found once.
    overhead_of: [std::sync::OnceLock<Histogram>; 4],
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
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Metrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
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
            overhead_of: Default::default(),
        }
    }

    /// The metrics of `tenant`'s requests to `model`, resolved once per worker thread: every
    /// model request updates six of them, and finding each in its family costs a hash of the
    /// label set and a lock shared by all threads.
    pub fn of(&self, tenant: &Arc<str>, model: &Arc<str>) -> Rc<RequestMetrics> {
        // Keyed by the strings' addresses: the entry holds both strings, so neither address
        // can be reused for another string while the entry lives.
        let key = (
            self.id,
            Arc::as_ptr(tenant) as *const u8 as usize,
            Arc::as_ptr(model) as *const u8 as usize,
        );
        HANDLES.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(m) = cache.get(&key) {
                return m.clone();
            }
            // Each policy reload brings new strings: start over rather than grow.
            if cache.len() >= MAX_CACHED_HANDLES {
                cache.clear();
            }
            let m = Rc::new(RequestMetrics {
                tenant: Label(tenant.clone()),
                model: Label(model.clone()),
                usage_events: self
                    .usage_events
                    .get_or_create(&TenantModelLabels {
                        tenant: Label(tenant.clone()),
                        model: Label(model.clone()),
                    })
                    .clone(),
                cost: OnceCell::new(),
                prompt_tokens: OnceCell::new(),
                completion_tokens: OnceCell::new(),
                latency: Default::default(),
                answered: Default::default(),
            });
            cache.insert(key, m.clone());
            m
        })
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
        let m = self.of(&ev.tenant, &ev.model_alias);
        m.usage_events.inc();
        if let Some((nanos, _)) = ev.cost()
            && nanos > 0
        {
            m.cost
                .get_or_init(|| self.cost.get_or_create(&m.tenant_model()).clone())
                .inc_by(nanos as u64);
        }
        if ev.usage.is_none() && ev.status < 400 {
            self.usage_missing.inc();
        }
        // The tokens billed (the ledger's), so the counters reconcile with it.
        let (usage, source) = ev.billed();
        if source == crate::metering::UsageSource::None {
            return;
        }
        for (kind, n, cell) in [
            ("prompt", usage.prompt_tokens, &m.prompt_tokens),
            ("completion", usage.completion_tokens, &m.completion_tokens),
        ] {
            if n > 0 {
                cell.get_or_init(|| {
                    self.tokens
                        .get_or_create(&TokenLabels {
                            tenant: m.tenant.clone(),
                            model: m.model.clone(),
                            kind,
                        })
                        .clone()
                })
                .inc_by(n);
            }
        }
    }

    /// The gateway's own time on `endpoint`'s requests.
    pub fn overhead(&self, endpoint: Endpoint) -> &Histogram {
        self.overhead_of[endpoint as usize].get_or_init(|| {
            self.overhead
                .get_or_create(&EndpointLabel {
                    endpoint: endpoint.as_str(),
                })
                .clone()
        })
    }

    /// Counts a finished model request and observes its time until response headers.
    pub fn answered(&self, m: &RequestMetrics, endpoint: Endpoint, status: u16, secs: f64) {
        let i = endpoint as usize;
        m.latency[i]
            .get_or_init(|| {
                self.latency
                    .get_or_create(&LatencyLabels {
                        tenant: m.tenant.clone(),
                        model: m.model.clone(),
                        endpoint: endpoint.as_str(),
                    })
                    .clone()
            })
            .observe(secs);
        let labels = || RequestLabels {
            tenant: m.tenant.clone(),
            model: m.model.clone(),
            endpoint: endpoint.as_str(),
            status,
        };
        if status == 200 {
            m.answered[i]
                .get_or_init(|| self.requests.get_or_create(&labels()).clone())
                .inc();
        } else {
            self.requests.get_or_create(&labels()).inc();
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
