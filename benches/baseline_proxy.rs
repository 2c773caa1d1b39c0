//! The load test's baseline: a minimal hyper pass-through proxy (pooled client, nothing else).
//! `baseline_proxy LISTEN_ADDR UPSTREAM_ORIGIN`, e.g. `127.0.0.1:9100 http://127.0.0.1:9001`.

use bytes::Bytes;
use http_body_util::{BodyExt, combinators::UnsyncBoxBody};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:9100".into());
    let origin = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:9001".into());
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector);
    let listener = tokio::net::TcpListener::bind(&listen).await.unwrap();
    println!("baseline proxy on {listen} -> {origin}");
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let _ = stream.set_nodelay(true);
        let (client, origin) = (client.clone(), origin.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let (client, origin) = (client.clone(), origin.clone());
                async move {
                    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    *req.uri_mut() = format!("{origin}{pq}").parse().unwrap();
                    req.headers_mut().remove("host");
                    let resp = client.request(req).await.unwrap();
                    Ok::<_, hyper::Error>(resp.map(|b| -> Body { b.boxed_unsync() }))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
