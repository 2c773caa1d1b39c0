//! Distributed tracing: OpenTelemetry spans exported over OTLP (gRPC or HTTP/protobuf).
//!
//! Off unless `fuke.yaml` has `tracing:` or `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` is set (and
//! `OTEL_SDK_DISABLED` is not `true`). Off means no tracer at all: requests carry `None` and pay
//! nothing. On, finished spans go into a bounded queue without blocking (a full queue drops the
//! span and counts it); a task batches them to the exporter.
//!
//! One server span per request (continuing an incoming `traceparent`), children per stage:
//! `auth`, `policy`, one `route attempt` per candidate tried or skipped, inside it the backend call
//! (`chat MODEL` client span for remotes, which carries `traceparent` on upstream, or
//! `local generation`), and `usage commit`. Attributes follow the GenAI semantic conventions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

/// How spans leave the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// `tracing:` in `fuke.yaml`; every field may also come from the standard `OTEL_*` variables,
/// which the file overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// Collector URL: `http://host:4317` (gRPC) or `http://host:4318/v1/traces` (HTTP).
    pub endpoint: Option<String>,
    pub protocol: Option<OtlpProtocol>,
    pub service_name: Option<String>,
    /// Share of new traces recorded (0..=1; a sampled caller's trace is always followed).
    pub sample_ratio: Option<f64>,
    /// Spans waiting for export; beyond that they are dropped and counted.
    pub queue: Option<usize>,
    /// Most spans per export call.
    pub batch: Option<usize>,
    /// Longest a finished span waits for its batch.
    pub delay_ms: Option<u64>,
}

/// Settled tracing settings.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    pub sample_ratio: f64,
    pub queue: usize,
    pub batch: usize,
    pub delay: Duration,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl TraceConfig {
    /// Tracing settings from `fuke.yaml` and the environment; `None` when tracing is off.
    pub fn resolve(raw: Option<&RawTracing>) -> Result<Option<TraceConfig>, String> {
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let env_endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
        if raw.is_none() && env_endpoint.is_none() {
            return Ok(None);
        }
        let raw = raw.cloned().unwrap_or_default();
        let protocol = match raw.protocol {
            Some(p) => p,
            None => match env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
                .as_deref()
            {
                None | Some("grpc") => OtlpProtocol::Grpc,
                Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
                Some(other) => {
                    return Err(format!(
                        "OTEL_EXPORTER_OTLP_PROTOCOL={other}: only grpc and http/protobuf are supported"
                    ));
                }
            },
        };
        let num = |name: &str| -> Result<Option<u64>, String> {
            env(name)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| format!("{name}={v} is not a number"))
                })
                .transpose()
        };
        let sample_ratio = match raw.sample_ratio {
            Some(r) => r,
            None => match env("OTEL_TRACES_SAMPLER_ARG") {
                Some(v) => v
                    .parse::<f64>()
                    .map_err(|_| format!("OTEL_TRACES_SAMPLER_ARG={v} is not a number"))?,
                None => 1.0,
            },
        };
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(format!(
                "tracing.sample_ratio: {sample_ratio} is not within 0..=1"
            ));
        }
        let queue = raw
            .queue
            .or(num("OTEL_BSP_MAX_QUEUE_SIZE")?.map(|n| n as usize))
            .unwrap_or(2048);
        let batch = raw
            .batch
            .or(num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")?.map(|n| n as usize))
            .unwrap_or(512);
        if queue == 0 || batch == 0 {
            return Err("tracing.queue and tracing.batch must be at least 1".into());
        }
        Ok(Some(TraceConfig {
            endpoint: raw.endpoint.or(env_endpoint),
            protocol,
            service_name: raw
                .service_name
                .or_else(|| env("OTEL_SERVICE_NAME"))
                .unwrap_or_else(|| "fuke".into()),
            sample_ratio,
            queue,
            batch,
            delay: Duration::from_millis(
                raw.delay_ms
                    .or(num("OTEL_BSP_SCHEDULE_DELAY")?)
                    .unwrap_or(1000),
            ),
        }))
    }
}

#[derive(Debug, Default)]
struct Counters {
    exported: AtomicU64,
    dropped: AtomicU64,
    failed_exports: AtomicU64,
}

enum Msg {
    Span(Box<SpanData>),
    Flush(oneshot::Sender<()>),
}

/// Hands finished spans to the export task without ever blocking the request.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(Msg::Span(Box::new(span))).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Export runs on the runtime; `Tracing::flush` is the awaitable form.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The process's tracer and its export task.
pub struct Tracing {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// Builds the exporter and starts the export task (call inside the tokio runtime).
    pub fn start(cfg: &TraceConfig) -> Result<Arc<Tracing>, String> {
        let timeout = Duration::from_secs(10);
        let exporter = match cfg.protocol {
            OtlpProtocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_timeout(timeout);
                if let Some(e) = &cfg.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build()
            }
            OtlpProtocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_timeout(timeout);
                if let Some(e) = &cfg.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build()
            }
        }
        .map_err(|e| format!("OTLP exporter: {e}"))?;

        let counters = Arc::new(Counters::default());
        let (tx, mut rx) = mpsc::channel::<Msg>(cfg.queue);
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor {
                tx: tx.clone(),
                counters: counters.clone(),
            })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(resource.clone())
            .build();
        let tracer = provider.tracer("fuke");

        let (batch_max, delay) = (cfg.batch, cfg.delay);
        let task_counters = counters.clone();
        tokio::spawn(async move {
            let mut exporter = exporter;
            exporter.set_resource(&resource);
            let mut batch: Vec<SpanData> = Vec::with_capacity(batch_max);
            let mut next = tokio::time::Instant::now() + delay;
            loop {
                let (flush, closed, ack) = tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(Msg::Span(s)) => {
                            batch.push(*s);
                            (batch.len() >= batch_max, false, None)
                        }
                        Some(Msg::Flush(ack)) => (true, false, Some(ack)),
                        None => (true, true, None),
                    },
                    () = tokio::time::sleep_until(next) => (true, false, None),
                };
                if flush {
                    next = tokio::time::Instant::now() + delay;
                    if !batch.is_empty() {
                        let n = batch.len() as u64;
                        let spans = std::mem::replace(&mut batch, Vec::with_capacity(batch_max));
                        match exporter.export(spans).await {
                            Ok(()) => {
                                task_counters.exported.fetch_add(n, Ordering::Relaxed);
                            }
                            Err(e) => {
                                task_counters.failed_exports.fetch_add(1, Ordering::Relaxed);
                                task_counters.dropped.fetch_add(n, Ordering::Relaxed);
                                tracing::warn!(error = %e, spans = n, "trace export failed");
                            }
                        }
                    }
                }
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
                if closed {
                    let _: Result<(), OTelSdkError> = exporter.shutdown();
                    return;
                }
            }
        });
        Ok(Arc::new(Tracing {
            tracer,
            provider,
            tx,
            counters,
        }))
    }

    /// Exports what is queued now (at shutdown, and in tests).
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
        }
    }

    /// The server span of one request, continuing the caller's `traceparent` if it sent one.
    pub fn request(&self, method: &str, path: &str, headers: &HeaderMap) -> Arc<RequestTrace> {
        let parent = TraceContextPropagator::new().extract(&HeaderRead(headers));
        let span = self
            .tracer
            .span_builder(format!("{method} {path}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
            ])
            .start_with_context(&self.tracer, &parent);
        Arc::new(RequestTrace {
            tracer: self.tracer.clone(),
            cx: parent.with_span(span),
        })
    }

    pub fn metrics(self: &Arc<Self>) -> TraceMetrics {
        TraceMetrics(self.counters.clone())
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// The spans of one request. The server span ends when the last holder lets go (the handler,
/// or the meter of a streamed answer).
pub struct RequestTrace {
    tracer: SdkTracer,
    cx: Context,
}

impl std::fmt::Debug for RequestTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestTrace").finish_non_exhaustive()
    }
}

impl RequestTrace {
    /// Starts a child of `parent` (the server span when `None`).
    pub fn child(
        &self,
        parent: Option<&Context>,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Context {
        let parent = parent.unwrap_or(&self.cx);
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }

    /// Sets attributes on the server span.
    pub fn set(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        let span = self.cx.span();
        for kv in attributes {
            span.set_attribute(kv);
        }
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// Ends a stage span, marking it failed with `error` if given.
pub fn end(cx: &Context, error: Option<&str>) {
    let span = cx.span();
    if let Some(e) = error {
        span.set_status(Status::error(e.to_string()));
    }
    span.end();
}

/// The `traceparent` header that continues `cx` on the next hop.
pub fn traceparent(cx: &Context) -> Option<HeaderValue> {
    let mut out = HeaderWrite(None);
    TraceContextPropagator::new().inject_context(cx, &mut out);
    out.0
}

struct HeaderRead<'a>(&'a HeaderMap);

impl Extractor for HeaderRead<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderWrite(Option<HeaderValue>);

impl Injector for HeaderWrite {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = HeaderValue::from_str(&value).ok();
        }
    }
}

/// `/metrics`: spans exported, dropped (queue full or export failed), failed exports.
#[derive(Debug, Clone)]
pub struct TraceMetrics(Arc<Counters>);

impl Collector for TraceMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, v) in [
            (
                "trace_spans_exported",
                "Spans sent to the OTLP collector",
                &self.0.exported,
            ),
            (
                "trace_spans_dropped",
                "Spans dropped: export queue full or export failed",
                &self.0.dropped,
            ),
            (
                "trace_export_failures",
                "OTLP export calls that failed",
                &self.0.failed_exports,
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v.load(Ordering::Relaxed)).encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuke_yaml_settings_are_checked_and_defaulted() {
        let raw = RawTracing {
            endpoint: Some("http://127.0.0.1:4318/v1/traces".into()),
            protocol: Some(OtlpProtocol::HttpProtobuf),
            ..RawTracing::default()
        };
        let cfg = TraceConfig::resolve(Some(&raw)).unwrap().expect("on");
        assert_eq!(cfg.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            cfg.endpoint.as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert!(cfg.queue >= 1 && cfg.batch >= 1);
        let bad = RawTracing {
            sample_ratio: Some(1.5),
            ..RawTracing::default()
        };
        assert!(
            TraceConfig::resolve(Some(&bad))
                .unwrap_err()
                .contains("sample_ratio")
        );
        let bad = RawTracing {
            queue: Some(0),
            ..RawTracing::default()
        };
        assert!(TraceConfig::resolve(Some(&bad)).is_err());
    }
}
