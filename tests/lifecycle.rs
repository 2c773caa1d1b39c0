//! Graceful shutdown drains streams; h2 without TLS (prior knowledge) works on a plain listener.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::*;

#[tokio::test]
async fn shutdown_drains_an_open_stream_and_turns_readiness_red() {
    let up = Upstream::start().await;
    let mut gw = Gateway::start(&policy_yaml(&up.base_url())).await;
    let c = client();
    let req = slow_stream_request(&gw.url(""));
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());

    let server = gw.shutdown();
    eventually("readiness to turn red", || async {
        gw.app.is_shutting_down()
    })
    .await;

    // The open stream runs to its end, [DONE] included.
    drain_to_done(body).await;
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server did not stop after draining")
        .unwrap()
        .unwrap();
    // New connections are refused once the listener is closed.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}

#[tokio::test]
async fn plain_listener_speaks_h2_with_prior_knowledge() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&policy_yaml(&up.base_url())).await;
    let c: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let req = Request::builder()
        .method(Method::POST)
        .uri(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY_ACME}"))
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"over h2"}]}"#,
        )))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("\"content\":\" h2\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
}
