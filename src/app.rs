//! The gateway as one tower service. The order of layers and stages is written here, once.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use std::panic::AssertUnwindSafe;

use crate::auth;
use crate::body::{self, Body};
use crate::error::Error;
use crate::limits::RateLimiter;
use crate::metering::UsageSink;
use crate::openai::Endpoint;
use crate::policy::{Policy, PolicyStore, Principal, Role};
use crate::proxy;
use crate::telemetry::{Label, LatencyLabels, Metrics, RequestLabels};
use crate::trace::{self, RequestTrace, Tracing};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

/// Settings from `fuke.yaml` that the request path reads.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest JSON request body.
    pub max_body_bytes: usize,
    /// Largest multipart upload (audio transcriptions).
    pub max_upload_bytes: usize,
    /// Rate limits shared through Redis (`limits.redis_url`); in process when `None`.
    pub limits_redis: Option<crate::limits::RedisLimits>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_body_bytes: 4 << 20,
            max_upload_bytes: 25 << 20,
            limits_redis: None,
        }
    }
}

/// Shared state of the gateway.
pub struct App {
    pub policy: Arc<PolicyStore>,
    pub sink: Arc<dyn UsageSink>,
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<RateLimiter>,
    pub settings: Settings,
    /// OTLP tracing; `None` when off.
    pub tracing: Option<Arc<Tracing>>,
    /// The usage ledger's database (reports read it); unset when the ledger is off.
    pub ledger: std::sync::OnceLock<crate::ledger::Reader>,
    shutting_down: AtomicBool,
}

impl App {
    pub fn new(
        policy: Arc<PolicyStore>,
        sink: Arc<dyn UsageSink>,
        metrics: Arc<Metrics>,
        settings: Settings,
        tracing: Option<Arc<Tracing>>,
    ) -> Arc<Self> {
        metrics.policy_version.set(policy.current().version as i64);
        let limiter = Arc::new(match &settings.limits_redis {
            Some(cfg) => RateLimiter::with_redis(cfg).unwrap_or_else(|e| {
                tracing::error!(error = %e, "limits: Redis not usable; limits are per replica");
                RateLimiter::default()
            }),
            None => RateLimiter::default(),
        });
        // Token limits are debited with the tokens each answer used, as it is recorded.
        let sink: Arc<dyn UsageSink> = Arc::new(TokenDebit {
            inner: sink,
            limiter: limiter.clone(),
            policy: policy.clone(),
        });
        Arc::new(App {
            policy,
            sink,
            metrics,
            limiter,
            settings,
            tracing,
            ledger: std::sync::OnceLock::new(),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Readiness goes red so load balancers stop sending; in-flight work continues.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Re-reads the policy directory; what the watcher calls.
    pub fn reload_policy(&self) {
        let result = match self.policy.reload() {
            Ok(version) => {
                self.metrics.policy_version.set(version as i64);
                // Caches of tenants that no longer have one go now.
                let policy = self.policy.current();
                self.policy
                    .backends()
                    .cache
                    .retain(|t| policy.tenant(t).is_some_and(|t| t.cache.is_some()));
                "ok"
            }
            Err(_) => "rejected",
        };
        self.metrics
            .policy_reloads
            .get_or_create(&crate::telemetry::ResultLabels { result })
            .inc();
    }
}

/// Debits token limits (tenant's and key's) with each recorded answer's tokens, then hands
/// the event on.
struct TokenDebit {
    inner: Arc<dyn UsageSink>,
    limiter: Arc<RateLimiter>,
    policy: Arc<PolicyStore>,
}

impl UsageSink for TokenDebit {
    fn record(
        &self,
        event: crate::metering::UsageEvent,
    ) -> crate::backends::BoxFuture<'static, ()> {
        use crate::limits::Scope;
        // What the ledger bills: also a stream cut short before the upstream's usage report.
        let billed = event.billed().0;
        let tokens = billed
            .prompt_tokens
            .saturating_add(billed.completion_tokens);
        let mut debits = Vec::new();
        if tokens > 0 {
            let policy = self.policy.peek();
            if let Some(t) = policy.tenant(&event.tenant) {
                if let Some(tpm) = t.limits.tokens_per_minute {
                    debits.push((Scope::Tenant(t.name.clone()), tpm));
                }
                if let Some(tpm) = t
                    .key_limits
                    .get(&event.key_id)
                    .and_then(|l| l.tokens_per_minute)
                {
                    debits.push((Scope::Key(event.key_id.clone()), tpm));
                }
            }
        }
        // Handed on now: sinks take events in the order they are recorded.
        let inner = self.inner.record(event);
        if debits.is_empty() {
            return inner;
        }
        let limiter = self.limiter.clone();
        Box::pin(async move {
            for (scope, tpm) in &debits {
                limiter.debit(scope, *tpm, tokens).await;
            }
            inner.await;
        })
    }
}

/// The gateway's HTTP service: request id, then the panic guard, then [`handle`]. One tower
/// service rather than a stack of tower-http layers: each layer added a future wrapper, and the
/// stack was cloned into a new box per request and moved the handler's (large) future again;
/// `perf` put about 3 % of the gateway's samples there under load (BENCHMARKS.md, "Load",
/// run 6).
#[derive(Clone)]
pub struct Gateway {
    app: Arc<App>,
}

/// The service a connection serves.
pub fn service(app: Arc<App>) -> Gateway {
    Gateway { app }
}

/// The request id every request and response carries, and every upstream call.
pub const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

type ResponseFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl tower::Service<Request<Incoming>> for Gateway {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        // Every response, even a panic's, carries x-request-id: the caller's, or a new
        // `req_<hex>` that the request carries on from here.
        let id = match req.headers().get(X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = new_request_id();
                req.headers_mut().insert(X_REQUEST_ID, id.clone());
                id
            }
        };
        let app = self.app.clone();
        crate::backends::pin_in_place(move || async move {
            // A bug in one request becomes a 500 for that request, not a dead connection.
            let mut resp = AssertUnwindSafe(handle(app, req))
                .catch_unwind()
                .await
                .unwrap_or_else(|_panic| {
                    Error::Internal("handler panicked".into()).into_response()
                });
            if !resp.headers().contains_key(X_REQUEST_ID) {
                resp.headers_mut().insert(X_REQUEST_ID, id);
            }
            Ok(resp)
        })
    }
}

/// Request ids in OpenAI's style, `req_` and 32 hex digits, built without formatting machinery
/// (one per request): 48 bits of milliseconds, then 80 random bits, so the ledger's index on
/// request ids grows at its end instead of taking writes all over (BENCHMARKS.md, "Usage
/// ledger").
fn new_request_id() -> HeaderValue {
    let mut id = *b"req_00000000000000000000000000000000";
    let _ = hex::encode_to_slice(crate::ledger::time_ordered_id(), &mut id[4..]);
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("req_0"))
}

/// What the metrics say about one request.
struct Labels {
    tenant: Option<Arc<str>>,
    model: Option<Arc<str>>,
    endpoint: &'static str,
    /// Set for the model endpoints.
    model_endpoint: Option<Endpoint>,
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    app.metrics.in_flight.inc();
    let mut labels = Labels {
        tenant: None,
        model: None,
        endpoint: "other",
        model_endpoint: None,
    };
    let trace = app
        .tracing
        .as_ref()
        .map(|t| t.request(req.method().as_str(), req.uri().path(), req.headers()));
    let resp = match dispatch(&app, req, &mut labels, trace.as_ref(), started).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    };
    if let Some(t) = &trace {
        t.set([KeyValue::new(
            "http.response.status_code",
            i64::from(resp.status().as_u16()),
        )]);
        if let Some(tenant) = &labels.tenant {
            t.set([KeyValue::new("fuke.tenant", tenant.to_string())]);
        }
        if let Some(model) = &labels.model {
            t.set([KeyValue::new("gen_ai.request.model", model.to_string())]);
        }
    }
    app.metrics.in_flight.dec();
    let secs = started.elapsed().as_secs_f64();
    if let (Some(tenant), Some(model), Some(endpoint)) =
        (&labels.tenant, &labels.model, labels.model_endpoint)
    {
        let m = app.metrics.of(tenant, model);
        app.metrics
            .answered(&m, endpoint, resp.status().as_u16(), secs);
        return resp;
    }
    let none = || Label(Arc::from("-"));
    let tenant = labels.tenant.as_ref().map_or_else(none, Label::from);
    let model = labels.model.as_ref().map_or_else(none, Label::from);
    app.metrics
        .latency
        .get_or_create(&LatencyLabels {
            tenant: tenant.clone(),
            model: model.clone(),
            endpoint: labels.endpoint,
        })
        .observe(secs);
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            tenant,
            model,
            endpoint: labels.endpoint,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

fn endpoint_of(path: &str) -> Option<Endpoint> {
    Some(match path {
        "/v1/chat/completions" => Endpoint::ChatCompletions,
        "/v1/completions" => Endpoint::Completions,
        "/v1/embeddings" => Endpoint::Embeddings,
        "/v1/audio/transcriptions" => Endpoint::AudioTranscriptions,
        _ => return None,
    })
}

/// The request stages, in order: edge routes, auth, policy checks, then the model call.
async fn dispatch(
    app: &Arc<App>,
    req: Request<Incoming>,
    labels: &mut Labels,
    trace: Option<&Arc<RequestTrace>>,
    started: Instant,
) -> Result<Response<Body>, Error> {
    let path = req.uri().path();
    let method = req.method();

    // Edge routes: no key needed.
    match (method, path) {
        (&Method::GET, "/healthz") => return Ok(text(StatusCode::OK, "ok\n")),
        (&Method::GET, "/readyz") => {
            return if app.is_shutting_down() {
                Err(Error::ShuttingDown)
            } else {
                Ok(text(
                    StatusCode::OK,
                    format!("ready policy_version={}\n", app.policy.current().version),
                ))
            };
        }
        (&Method::GET, p) if p.starts_with("/dashboard") => {
            if let Some(resp) = crate::dashboard::asset(p) {
                return Ok(resp);
            }
        }
        (&Method::GET, "/metrics") => {
            let mut resp = text(StatusCode::OK, app.metrics.encode());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return Ok(resp);
        }
        _ => {}
    }

    let endpoint = endpoint_of(path);
    let is_models = path == "/v1/models" || path.starts_with("/v1/models/");
    let is_admin = path == "/admin/breakers";
    let is_usage = path == "/v1/usage";
    let is_budgets = path == "/v1/usage/budgets";
    let method_ok = match (&endpoint, is_models || is_admin || is_usage || is_budgets) {
        (Some(_), _) => method == Method::POST,
        (None, true) => method == Method::GET,
        (None, false) => {
            return Err(Error::UnknownRoute {
                method: method.to_string(),
                path: path.to_owned(),
            });
        }
    };
    if !method_ok {
        return Err(Error::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
        });
    }
    labels.model_endpoint = endpoint;
    labels.endpoint = match endpoint {
        Some(e) => e.as_str(),
        None if is_admin => "admin",
        None if is_usage || is_budgets => "usage",
        None => "models",
    };

    // One policy version for the whole request.
    let policy: Arc<Policy> = app.policy.current();
    let stage = trace.map(|t| t.child(None, "auth", SpanKind::Internal, Vec::new()));
    let principal = auth::authenticate(req.headers(), &policy);
    if let Some(cx) = &stage {
        trace::end(cx, principal.as_ref().err().map(|_| "invalid API key"));
    }
    let principal: Principal = principal?.clone();
    labels.tenant = Some(principal.tenant.clone());
    let tenant = policy
        .tenant(&principal.tenant)
        .ok_or_else(|| Error::Internal("key without tenant".into()))?;

    if is_models {
        return proxy::models(&policy, tenant, path);
    }
    if is_admin {
        return breakers(app, &principal);
    }
    if is_usage {
        return usage_report(app, &principal, &req).await;
    }
    if is_budgets {
        return budgets(app, &principal, &policy).await;
    }

    let stage = trace.map(|t| {
        t.child(
            None,
            "policy",
            SpanKind::Internal,
            vec![
                KeyValue::new("fuke.tenant", principal.tenant.to_string()),
                KeyValue::new("fuke.policy_version", policy.version as i64),
            ],
        )
    });
    let checked = check_limits(app, tenant, &principal).await;
    if let Some(cx) = &stage {
        trace::end(cx, checked.as_ref().err().map(|_| "rate limited"));
    }
    checked?;

    let Some(endpoint) = endpoint else {
        return Err(Error::Internal("unreachable route".into()));
    };
    let caller = proxy::Caller {
        policy: &policy,
        principal: &principal,
        tenant,
        started,
    };
    proxy::model_call(app, caller, endpoint, req, &mut labels.model, trace).await
}

/// The tenant's and the key's limits and budgets, before any body is read.
async fn check_limits(
    app: &App,
    tenant: &crate::policy::Tenant,
    principal: &Principal,
) -> Result<(), Error> {
    use crate::limits::{RetryAfter, Scope, Unit};
    if tenant.limits.is_empty() && principal.limits.is_empty() {
        return Ok(());
    }
    let scopes = [
        (
            Scope::Key(principal.key_id.clone()),
            &principal.limits,
            "key",
        ),
        (Scope::Tenant(tenant.name.clone()), &tenant.limits, "tenant"),
    ];
    let refuse = |scope: &Scope, whose: &str, unit: Unit, per_minute: u32, wait: RetryAfter| {
        let secs = wait.0.as_secs() + u64::from(wait.0.subsec_nanos() > 0);
        let (Scope::Tenant(name) | Scope::Key(name)) = scope;
        Error::RateLimited {
            message: format!(
                "Rate limit reached for {whose} {name}: {per_minute} {} per minute. Retry in {secs}s.",
                unit.as_str()
            ),
            retry_after_secs: secs.max(1),
            unit: unit.as_str(),
            limit: Some(u64::from(per_minute)),
        }
    };
    // What only looks comes first (token debt, then budgets), and what counts last (requests,
    // the key's before its tenant's): a refused request uses up no allowance it did not need.
    for (scope, limits, whose) in &scopes {
        if let Some(tpm) = limits.tokens_per_minute
            && let Err(wait) = app.limiter.admit(scope, Unit::Tokens, tpm).await
        {
            return Err(refuse(scope, whose, Unit::Tokens, tpm, wait));
        }
    }
    check_budgets(app, tenant, principal).await?;
    for (scope, limits, whose) in &scopes {
        if let Some(rpm) = limits.requests_per_minute
            && let Err(wait) = app.limiter.admit(scope, Unit::Requests, rpm).await
        {
            return Err(refuse(scope, whose, Unit::Requests, rpm, wait));
        }
    }
    Ok(())
}

/// Daily and monthly budgets of the tenant and the key, against the ledger's running totals.
async fn check_budgets(
    app: &App,
    tenant: &crate::policy::Tenant,
    principal: &Principal,
) -> Result<(), Error> {
    use crate::ledger::{Period, Scope as Spender};
    if !tenant.limits.has_budget() && !principal.limits.has_budget() {
        return Ok(());
    }
    // Budgets: the ledger's running totals, shared by every replica on the same database.
    let db = ledger_db(app)?;
    let now = crate::ledger::now_ms();
    let mut asked = Vec::new();
    let mut budgets = Vec::new();
    for (spender, limits, whose, name) in [
        (
            Spender::Tenant(&tenant.name),
            &tenant.limits,
            "tenant",
            &tenant.name,
        ),
        (
            Spender::Key(&principal.key_id),
            &principal.limits,
            "key",
            &principal.key_id,
        ),
    ] {
        for (period, budget, label) in [
            (Period::Day, limits.daily_budget, "daily"),
            (Period::Month, limits.monthly_budget, "monthly"),
        ] {
            if let Some(b) = budget {
                asked.push((spender.key(), period.of(now)));
                budgets.push((b, period, label, whose, name));
            }
        }
    }
    let spent = db.spent(&asked).await.map_err(ledger_error)?;
    for (spent, (budget, period, label, whose, name)) in spent.into_iter().zip(budgets) {
        if spent >= budget {
            let secs = ((period.end(now) - now) / 1000).max(1) as u64;
            return Err(Error::RateLimited {
                message: format!(
                    "The {label} budget of {whose} {name} (${}) is spent (${} so far). It renews in {secs}s.",
                    crate::ledger::pricing::format_usd(budget),
                    crate::ledger::pricing::format_usd(spent),
                ),
                retry_after_secs: secs,
                unit: "budget",
                limit: None,
            });
        }
    }
    Ok(())
}

/// The ledger's database for reading, or why there is none.
fn ledger_db(app: &App) -> Result<&crate::ledger::Db, Error> {
    ledger_reader(app)?
        .db()
        .ok_or_else(|| Error::LedgerUnavailable {
            message: "The usage ledger's database cannot be reached; retry shortly.".into(),
            detail: "not connected yet".into(),
        })
}

fn ledger_reader(app: &App) -> Result<&crate::ledger::Reader, Error> {
    app.ledger.get().ok_or_else(|| Error::LedgerUnavailable {
        message: "The usage ledger is off on this gateway.".into(),
        detail: "ledger.url is `off` in fuke.yaml".into(),
    })
}

fn ledger_error(e: sqlx::Error) -> Error {
    Error::LedgerUnavailable {
        message: "The usage ledger's database cannot be read; retry shortly.".into(),
        detail: e.to_string(),
    }
}

/// How long a usage report waits for one of the reader connections reports may use.
const REPORT_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /v1/usage?from=&to=&tenant=&group_by=day|model|key&format=json|csv`: ledger totals.
/// Finance and admin keys see every tenant; a tenant key sees its own tenant only.
async fn usage_report<B>(
    app: &App,
    principal: &Principal,
    req: &Request<B>,
) -> Result<Response<Body>, Error> {
    use crate::ledger::report::{self, GroupBy};
    let bad = |param: &str, message: String| Error::InvalidRequest {
        message,
        param: Some(param.to_string()),
        code: None,
    };
    let mut from = None;
    let mut to = None;
    let mut tenant = None;
    let mut group_by = GroupBy::Tenant;
    let mut csv = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/csv"));
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)
            .ok_or_else(|| bad(k, format!("`{k}` is not valid percent-encoded UTF-8")))?;
        match k {
            "from" => from = Some(v),
            "to" => to = Some(v),
            "tenant" => tenant = Some(v),
            "group_by" => {
                group_by = GroupBy::parse(&v).ok_or_else(|| {
                    bad(
                        "group_by",
                        format!("`{v}` is not one of day, model, key, tenant"),
                    )
                })?
            }
            "format" => {
                csv = match v.as_str() {
                    "csv" => true,
                    "json" => false,
                    _ => return Err(bad("format", format!("`{v}` is not one of json, csv"))),
                }
            }
            _ => return Err(bad(k, format!("unknown parameter `{k}`"))),
        }
    }
    if principal.role == Role::Tenant {
        match &tenant {
            Some(t) if **t != *principal.tenant => {
                return Err(Error::Forbidden {
                    role: principal.role.as_str(),
                    what: format!("the usage of tenant {t}"),
                });
            }
            _ => tenant = Some(principal.tenant.to_string()),
        }
    }
    let (from, to) =
        report::range(from.as_deref(), to.as_deref()).map_err(|(param, m)| bad(param, m))?;
    let db = ledger_db(app)?;
    // Reports take at most `REPORTS_AT_ONCE` of the reader's connections, queueing for a few
    // seconds when they are taken; budget checks keep the rest.
    let Some(_slot) = ledger_reader(app)?.report_slot(REPORT_QUEUE_WAIT).await else {
        return Err(Error::RateLimited {
            message: format!(
                "{} usage reports are running on this gateway and none finished within {}s; retry shortly.",
                crate::ledger::REPORTS_AT_ONCE,
                REPORT_QUEUE_WAIT.as_secs()
            ),
            retry_after_secs: 2,
            unit: "requests",
            limit: None,
        });
    };
    let q = report::Query {
        from_ms: from,
        to_ms: to,
        tenant,
        group_by,
    };
    let rep = report::run(db, &q).await.map_err(ledger_error)?;
    if !csv {
        return json(&rep);
    }
    let mut resp = Response::new(body::full(report::csv(&rep)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    Ok(resp)
}

/// `GET /v1/usage/budgets` (finance and admin keys): every tenant's and key's budgets, with
/// what has been spent in the current period (the ledger's running totals).
async fn budgets(
    app: &App,
    principal: &Principal,
    policy: &Policy,
) -> Result<Response<Body>, Error> {
    use crate::ledger::pricing::format_usd;
    use crate::ledger::{Period, Scope};
    if principal.role == Role::Tenant {
        return Err(Error::Forbidden {
            role: principal.role.as_str(),
            what: "/v1/usage/budgets".into(),
        });
    }
    let db = ledger_db(app)?;
    #[derive(serde::Serialize)]
    struct Line {
        scope: &'static str,
        name: String,
        tenant: String,
        period: &'static str,
        budget_usd: String,
        budget_nanousd: i64,
        spent_usd: String,
        spent_nanousd: i64,
        renews_at: String,
    }
    let now = crate::ledger::now_ms();
    let mut asked = Vec::new();
    let mut lines = Vec::new();
    for t in policy.tenants() {
        let mut keys: Vec<_> = t.key_limits.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        let owners = std::iter::once(("tenant", Scope::Tenant(&t.name), &*t.name, &t.limits))
            .chain(keys.iter().map(|(k, l)| ("key", Scope::Key(k), &***k, *l)));
        for (scope, spender, name, limits) in owners {
            for (period, budget, label) in [
                (Period::Day, limits.daily_budget, "day"),
                (Period::Month, limits.monthly_budget, "month"),
            ] {
                let Some(budget) = budget else { continue };
                asked.push((spender.key(), period.of(now)));
                lines.push(Line {
                    scope,
                    name: name.to_string(),
                    tenant: t.name.to_string(),
                    period: label,
                    budget_usd: format_usd(budget),
                    budget_nanousd: budget,
                    spent_usd: String::new(),
                    spent_nanousd: 0,
                    renews_at: crate::ledger::report::format_time(period.end(now)),
                });
            }
        }
    }
    let spent = db.spent(&asked).await.map_err(ledger_error)?;
    for (line, spent) in lines.iter_mut().zip(spent) {
        line.spent_nanousd = spent;
        line.spent_usd = format_usd(spent);
    }
    json(&serde_json::json!({"object": "list", "data": lines}))
}

/// `%XX` and `+` decoding of one query value.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `GET /admin/breakers` (admin keys): every backend + model's breaker state.
fn breakers(app: &App, principal: &Principal) -> Result<Response<Body>, Error> {
    if principal.role != Role::Admin {
        return Err(Error::Forbidden {
            role: principal.role.as_str(),
            what: "/admin/breakers".into(),
        });
    }
    #[derive(serde::Serialize)]
    struct Breakers {
        breakers: Vec<crate::routing::HealthSnapshot>,
    }
    json(&Breakers {
        breakers: app.policy.backends().health.snapshot(),
    })
}

/// A 200 with `value` as JSON.
fn json(value: &impl serde::Serialize) -> Result<Response<Body>, Error> {
    let bytes = serde_json::to_vec(value).map_err(|e| Error::Internal(e.to_string()))?;
    let mut resp = Response::new(body::full(bytes));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
