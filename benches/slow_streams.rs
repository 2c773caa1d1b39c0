//! Holds N slow SSE streams open through the gateway at once and reports the gateway's peak RSS.
//! `slow_streams URL KEY N GATEWAY_PID` (the model alias `slow` streams for about 3 s).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (url, key, n, pid) = (
        a[0].clone(),
        a[1].clone(),
        a[2].parse::<usize>().unwrap(),
        a[3].clone(),
    );
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(n)
        .build(HttpConnector::new());
    let before = rss_kib(&pid);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        tasks.spawn(async move {
            let req = hyper::Request::post(&url)
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"model":"slow","stream":true,"messages":[{"role":"user","content":"hold"}]}"#,
                )))
                .unwrap();
            let resp = client.request(req).await.ok()?;
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            body.ends_with(b"data: [DONE]\n\n").then_some(())
        });
    }
    let mut peak = before;
    let mut done = 0;
    let mut ok = 0;
    while done < n {
        tokio::select! {
            r = tasks.join_next() => {
                done += 1;
                if matches!(r, Some(Ok(Some(())))) { ok += 1; }
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        peak = peak.max(rss_kib(&pid));
    }
    println!(
        "streams={n} completed={ok} seconds={:.1} rss_before_mib={:.1} rss_peak_mib={:.1}",
        started.elapsed().as_secs_f64(),
        before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}
