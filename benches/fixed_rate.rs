//! Open-loop load at a fixed rate (like wrk2): requests are scheduled every 1/RATE seconds and
//! each latency is measured from its scheduled time, so a slow answer cannot hide the queueing it
//! causes. At most CONNS requests are in flight (the concurrency of the closed-loop runs).
//! `fixed_rate URL KEY json|sse RATE SECONDS CONNS` prints p50/p90/p99/p99.9 in ms.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Mutex, Semaphore};

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (url, key, mode) = (a[0].clone(), a[1].clone(), a[2].clone());
    let rate: f64 = a[3].parse().unwrap();
    let secs: f64 = a[4].parse().unwrap();
    let conns: usize = a[5].parse().unwrap();
    let body = Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","stream":{},"messages":[{{"role":"system","content":"You are a helpful customer-service assistant."}},{{"role":"user","content":"Where is my order 12345? It was due yesterday."}}]}}"#,
        mode == "sse"
    ));
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(conns)
        .build(connector);
    let slots = Arc::new(Semaphore::new(conns));
    let samples = Arc::new(Mutex::new(Vec::<u32>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let total = (rate * secs) as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let scheduled = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(scheduled.into()).await;
        let permit = slots.clone().acquire_owned().await.unwrap();
        let (client, url, key, body) = (client.clone(), url.clone(), key.clone(), body.clone());
        let (samples, errors) = (samples.clone(), errors.clone());
        tasks.spawn(async move {
            let req = hyper::Request::post(&url)
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Full::new(body))
                .unwrap();
            let ok = match client.request(req).await {
                Ok(resp) if resp.status().is_success() => resp.into_body().collect().await.is_ok(),
                _ => false,
            };
            drop(permit);
            if ok {
                samples
                    .lock()
                    .await
                    .push(scheduled.elapsed().as_micros() as u32);
            } else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut s = samples.lock().await.clone();
    s.sort_unstable();
    let q = |p: f64| s[((s.len() as f64 * p) as usize).min(s.len() - 1)] as f64 / 1000.0;
    println!(
        "rate={rate} sent={total} ok={} errors={} p50={:.3} p90={:.3} p99={:.3} p99.9={:.3}",
        s.len(),
        errors.load(std::sync::atomic::Ordering::Relaxed),
        q(0.50),
        q(0.90),
        q(0.99),
        q(0.999)
    );
}
