//! A minimal OTLP/HTTP collector for load runs: accepts `POST /v1/traces` (protobuf), counts the
//! spans, answers success, keeps nothing. `otlp_sink ADDR` prints the span count every second to
//! stderr when it changes.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4318".into());
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    let spans = Arc::new(AtomicU64::new(0));
    let counted = spans.clone();
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let n = counted.load(Ordering::Relaxed);
            if n != last {
                eprintln!("otlp_sink: {n} spans");
                last = n;
            }
        }
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let spans = spans.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let spans = spans.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        if let Ok(req) = body.map(ExportTraceServiceRequest::decode) {
                            let n: usize = req
                                .map(|r| {
                                    r.resource_spans
                                        .iter()
                                        .flat_map(|rs| &rs.scope_spans)
                                        .map(|ss| ss.spans.len())
                                        .sum()
                                })
                                .unwrap_or(0);
                            spans.fetch_add(n as u64, Ordering::Relaxed);
                        }
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
}
