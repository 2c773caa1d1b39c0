//! Time to first token of streamed chat answers: `CONNS` clients each send requests one after
//! another for `SECONDS`; each time is measured from sending the request to the first chunk
//! that carries content. Prints count, p50/p90/p99/max in ms and the `x-fuke-backend` /
//! `x-fuke-fallback` headers seen.
//! `ttft URL KEY MODEL SECONDS CONNS MAX_TOKENS`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (url, key, model) = (a[0].clone(), a[1].clone(), a[2].clone());
    let secs: f64 = a[3].parse().unwrap();
    let conns: usize = a[4].parse().unwrap();
    let max_tokens: u32 = a[5].parse().unwrap();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let times = Arc::new(Mutex::new(BTreeMap::<String, Vec<f64>>::new()));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (client, url, key, model) = (client.clone(), url.clone(), key.clone(), model.clone());
        let times = times.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < end {
                i += 1;
                // A different question each time: no prefix cache makes one request cheaper.
                let body = format!(
                    r#"{{"model":"{model}","stream":true,"max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Client {c} question {i}: where is my order?"}}]}}"#
                );
                let req = http::Request::post(&url)
                    .header("authorization", format!("Bearer {key}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let t0 = Instant::now();
                let resp = client.request(req).await.expect("request");
                let label = format!(
                    "{} fallback={}",
                    resp.headers()
                        .get("x-fuke-backend")
                        .map_or("-", |v| v.to_str().unwrap_or("?")),
                    resp.headers()
                        .get("x-fuke-fallback")
                        .map_or("-", |v| v.to_str().unwrap_or("?"))
                );
                let mut body = resp.into_body();
                let mut first = None;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { break };
                    if let Ok(data) = frame.into_data()
                        && first.is_none()
                        && memchr_content(&data)
                    {
                        first = Some(t0.elapsed());
                    }
                }
                if let Some(t) = first {
                    times
                        .lock()
                        .unwrap()
                        .entry(label)
                        .or_default()
                        .push(t.as_secs_f64() * 1e3);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut all: Vec<f64> = Vec::new();
    let times = times.lock().unwrap().clone();
    for (label, mut t) in times {
        all.extend(&t);
        println!("  {}  ({label})", summary(&mut t));
    }
    println!("{model}: {}", summary(&mut all));
}

/// `n=… p50=… p90=… p99=… max=…` in ms.
fn summary(t: &mut [f64]) -> String {
    if t.is_empty() {
        return "n=0".into();
    }
    t.sort_by(f64::total_cmp);
    let q = |p: f64| t[((t.len() as f64 * p) as usize).min(t.len() - 1)];
    format!(
        "n={} ttft_ms p50={:.1} p90={:.1} p99={:.1} max={:.1}",
        t.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        t[t.len() - 1]
    )
}

/// Whether a frame holds a chunk with non-empty `content`.
fn memchr_content(data: &[u8]) -> bool {
    let s = String::from_utf8_lossy(data);
    s.split("\"content\":\"")
        .skip(1)
        .any(|rest| !rest.starts_with('"'))
}
