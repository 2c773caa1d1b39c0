//! OTLP tracing end to end: a real OTLP receiver written here (HTTP/protobuf with hyper, gRPC with
//! the generated tonic service over hyper's HTTP/2), the gateway exporting to it, and the test
//! upstream seeing the propagated `traceparent`.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fuke::trace::{OtlpProtocol, TraceConfig, Tracing};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::*;

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

type Spans = Arc<Mutex<Vec<Span>>>;

fn keep(spans: &Spans, req: ExportTraceServiceRequest) {
    let mut out = spans.lock().unwrap();
    for rs in req.resource_spans {
        for ss in rs.scope_spans {
            out.extend(ss.spans);
        }
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body.
async fn http_receiver() -> (SocketAddr, Spans) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Spans = Arc::default();
    let kept = spans.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let kept = kept.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            keep(&kept, ExportTraceServiceRequest::decode(body).unwrap());
                            let mut resp = http::Response::new(Full::new(Bytes::from(
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )));
                            resp.headers_mut().insert(
                                "content-type",
                                http::HeaderValue::from_static("application/x-protobuf"),
                            );
                            Ok::<_, Infallible>(resp)
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, spans)
}

struct Collector(Spans);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver: the generated service, served over HTTP/2 by hyper.
async fn grpc_receiver() -> (SocketAddr, Spans) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Spans = Arc::default();
    let service = TraceServiceServer::new(Collector(spans.clone()));
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, spans)
}

fn config(endpoint: String, protocol: OtlpProtocol) -> TraceConfig {
    TraceConfig {
        endpoint: Some(endpoint),
        protocol,
        service_name: "fuke-test".into(),
        sample_ratio: 1.0,
        queue: 1024,
        batch: 512,
        delay: Duration::from_millis(50),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        panic!("no span {name:?} among {names:?}")
    })
}

/// Sends one traced chat request and returns the reply and the spans of its trace.
async fn traced_request(protocol: OtlpProtocol) -> (Upstream, Reply, Vec<Span>, Arc<Tracing>) {
    let (addr, received) = match protocol {
        OtlpProtocol::HttpProtobuf => http_receiver().await,
        OtlpProtocol::Grpc => grpc_receiver().await,
    };
    let endpoint = match protocol {
        OtlpProtocol::HttpProtobuf => format!("http://{addr}/v1/traces"),
        OtlpProtocol::Grpc => format!("http://{addr}"),
    };
    let tracing = Tracing::start(&config(endpoint, protocol)).unwrap();
    let up = Upstream::start().await;
    let gw = Gateway::start_with(
        &policy_yaml(&up.base_url()),
        Options {
            tracing: Some(tracing.clone()),
            ..Options::default()
        },
    )
    .await;
    let reply = send(
        &client(),
        http::Method::POST,
        &gw.url("/v1/chat/completions"),
        Some(KEY_ACME),
        &[
            ("content-type", "application/json"),
            ("traceparent", &format!("00-{TRACE_ID}-{CALLER_SPAN}-01")),
        ],
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"trace me please"}]}"#,
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::OK, "{}", reply.text());
    let ours = |received: &Spans| -> Vec<Span> {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|s| hex(&s.trace_id) == TRACE_ID)
            .cloned()
            .collect()
    };
    eventually("the request's six spans reach the collector", || {
        let tracing = tracing.clone();
        let received = received.clone();
        async move {
            tracing.flush().await;
            ours(&received).len() >= 6
        }
    })
    .await;
    let spans = ours(&received);
    (up, reply, spans, tracing)
}

#[tokio::test]
async fn spans_of_one_request_reach_an_otlp_http_collector_with_structure_and_attributes() {
    let (up, reply, spans, _t) = traced_request(OtlpProtocol::HttpProtobuf).await;

    let server = named(&spans, "POST /v1/chat/completions");
    assert_eq!(
        hex(&server.parent_span_id),
        CALLER_SPAN,
        "continues the caller's trace"
    );
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(
        attr(server, "gen_ai.request.model"),
        Some(AnyValue::StringValue("gpt-test".into()))
    );
    assert_eq!(
        attr(server, "fuke.tenant"),
        Some(AnyValue::StringValue("acme".into()))
    );
    assert_eq!(
        attr(server, "http.response.status_code"),
        Some(AnyValue::IntValue(200))
    );
    let server_id = hex(&server.span_id);
    for stage in ["auth", "policy", "route attempt", "usage commit"] {
        assert_eq!(
            hex(&named(&spans, stage).parent_span_id),
            server_id,
            "{stage} is a child of the server span"
        );
    }
    let attempt = named(&spans, "route attempt");
    assert_eq!(
        attr(attempt, "fuke.candidate"),
        Some(AnyValue::StringValue("test/echo-model".into()))
    );
    let call = named(&spans, "chat echo-model");
    assert_eq!(call.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(hex(&call.parent_span_id), hex(&attempt.span_id));
    let usage = &reply.json()["usage"];
    assert_eq!(
        attr(call, "gen_ai.usage.input_tokens"),
        Some(AnyValue::IntValue(usage["prompt_tokens"].as_i64().unwrap()))
    );
    assert_eq!(
        attr(call, "gen_ai.usage.output_tokens"),
        Some(AnyValue::IntValue(
            usage["completion_tokens"].as_i64().unwrap()
        ))
    );
    assert_eq!(
        attr(call, "gen_ai.request.model"),
        Some(AnyValue::StringValue("echo-model".into()))
    );

    // The upstream call carries the trace on, from the client span.
    let sent = up.last_received();
    assert_eq!(
        sent.headers["traceparent"].to_str().unwrap(),
        format!("00-{TRACE_ID}-{}-01", hex(&call.span_id))
    );

    // The gateway's own time is returned and exported.
    let overhead: f64 = reply.headers["x-fuke-overhead-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(overhead >= 0.0);
}

#[tokio::test]
async fn spans_reach_an_otlp_grpc_collector() {
    let (_up, _reply, spans, _t) = traced_request(OtlpProtocol::Grpc).await;
    let server = named(&spans, "POST /v1/chat/completions");
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN);
    let attempt = named(&spans, "route attempt");
    assert_eq!(hex(&attempt.parent_span_id), hex(&server.span_id));
    assert_eq!(
        hex(&named(&spans, "chat echo-model").parent_span_id),
        hex(&attempt.span_id)
    );
}

#[tokio::test]
async fn without_tracing_nothing_is_traced_and_overhead_is_still_measured() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&policy_yaml(&up.base_url())).await;
    let reply = send(
        &client(),
        http::Method::POST,
        &gw.url("/v1/chat/completions"),
        Some(KEY_ACME),
        &[
            ("content-type", "application/json"),
            ("traceparent", &format!("00-{TRACE_ID}-{CALLER_SPAN}-01")),
        ],
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::OK);
    assert!(reply.headers.contains_key("x-fuke-overhead-ms"));
    assert!(
        !up.last_received().headers.contains_key("traceparent"),
        "tracing off: nothing is added upstream"
    );
    let metrics = get(&client(), &gw.url("/metrics"), None).await.text();
    assert!(
        metrics.contains(r#"fuke_overhead_seconds_count{endpoint="chat.completions"} 1"#),
        "{metrics}"
    );
}
