//! Routing with the test upstream's delay/error/abort modes and the real local model
//! (SmolLM2-135M through llama.cpp): first-token deadline, fallback, circuit breakers, weights.

mod support;

use std::sync::LazyLock;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use fuke::backends::local::LocalModels;
use fuke::metering::Outcome;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::*;

static MODELS: LazyLock<LocalModels> = LazyLock::new(|| smollm2(4, 16));

const KEY_ADMIN: &str = "fk-test-admin-0009";

fn policy(base_url: &str, dead_port: u16) -> String {
    format!(
        r#"upstreams:
  dead:
    base_url: http://127.0.0.1:{dead_port}/v1
  test:
    base_url: {base_url}
    first_byte_timeout_ms: 5000
  flaky-up:
    base_url: {base_url}
    breaker: {{ consecutive_failures: 3, cooldown_ms: 400, probes: 1 }}
  a:
    base_url: {base_url}
  b:
    base_url: {base_url}
models:
  # Remote first, the local model when it is slow or failing.
  chat:
    candidates:
      - {{ upstream: test, model: delay }}
      - {{ local: smol }}
  healthy:
    candidates:
      - {{ upstream: test, model: echo-model }}
      - {{ local: smol }}
  flaky:
    candidates:
      - {{ upstream: flaky-up, model: flaky }}
      - {{ local: smol }}
  broken-mid-stream:
    candidates:
      - {{ upstream: test, model: drop }}
      - {{ local: smol }}
  weighted:
    candidates:
      - {{ upstream: a, model: w-a, weight: 3, tier: 0 }}
      - {{ upstream: b, model: w-b, weight: 1, tier: 0 }}
  cut-first:
    candidates:
      - {{ upstream: test, model: cut, first_token_timeout_ms: 0 }}
      - {{ local: smol }}
  unreachable:
    candidates:
      - {{ upstream: dead, model: echo-model }}
      - {{ local: smol }}
  capped:
    candidates:
      - {{ upstream: test, model: slow, max_in_flight: 1 }}
tenants:
  acme:
    models: ["*"]
    keys:
      - {{ id: acme-key, sha256: {acme} }}
  ops:
    models: []
    keys:
      - {{ id: ops-key, sha256: {admin}, role: admin }}
"#,
        acme = hash(KEY_ACME),
        admin = hash(KEY_ADMIN),
    )
}

async fn start() -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    // A port nothing listens on: connections are refused.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = Gateway::start_with(
        &policy(&up.base_url(), dead_port),
        Options {
            local: MODELS.clone(),
            ..Options::default()
        },
    )
    .await;
    (up, gw)
}

async fn chat(gw: &Gateway, body: Value) -> Reply {
    post(
        &client(),
        &gw.url("/v1/chat/completions"),
        KEY_ACME,
        &body.to_string(),
    )
    .await
}

fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
    r.headers.get(name).map(|v| v.to_str().unwrap())
}

/// The content of an SSE answer's chunks, joined, and whether it ended with `[DONE]`.
fn sse_content(body: &str) -> (String, bool) {
    let mut text = String::new();
    let mut done = false;
    for data in body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
    }
    (text, done)
}

#[tokio::test]
async fn slow_remote_falls_back_to_local_and_is_cancelled() {
    let (up, gw) = start().await;

    // Streaming: the remote sends its role chunk at once but no token for 2 s.
    let r = chat(
        &gw,
        json!({"model": "chat", "stream": true, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hi"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(header(&r, "x-fuke-backend"), Some("local/smol"));
    assert_eq!(header(&r, "x-fuke-fallback"), Some("timeout"));
    assert_eq!(header(&r, "x-fuke-fallback-from"), Some("test/delay"));
    let (text, done) = sse_content(&r.text());
    assert!(done && !text.is_empty(), "{}", r.text());
    assert!(
        !r.text().contains("echo:"),
        "nothing of the remote's answer"
    );
    // The remote's request was cancelled, not left running.
    eventually("the remote sees the disconnect", || async {
        up.state.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    let ev = gw.usage_of(&r).await;
    assert_eq!(&*ev.backend, "local:smol");
    assert_eq!(&*ev.upstream_model, "smol");
    assert_eq!(ev.fallback.as_deref(), Some("timeout"));
    assert_eq!(ev.outcome, Outcome::Completed);
    let usage = ev.usage.expect("the local model's exact usage");
    assert!(usage.completion_tokens > 0 && usage.completion_tokens <= 8);

    // Not streaming: the deadline means the same (the remote is streamed internally).
    let r = chat(
        &gw,
        json!({"model": "chat", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hi"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(header(&r, "x-fuke-fallback"), Some("timeout"));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "smol");
    assert!(v["choices"][0]["message"]["content"].is_string());
    let sent = up.received();
    let last = serde_json::from_slice::<Value>(&sent.last().unwrap().body).unwrap();
    assert_eq!(last["stream"], true, "asked upstream as a stream");
    eventually("the second remote request is cancelled too", || async {
        up.state.cancelled.load(Ordering::SeqCst) == 2
    })
    .await;
}

#[tokio::test]
async fn healthy_remote_serves_json_assembled_from_its_stream() {
    let (up, gw) = start().await;
    let r = chat(
        &gw,
        json!({"model": "healthy", "messages": [{"role": "user", "content": "one two three"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(header(&r, "x-fuke-backend"), Some("test/echo-model"));
    assert_eq!(header(&r, "x-fuke-fallback"), None);
    let v = r.json();
    // What the upstream would have answered as JSON, rebuilt from its chunks.
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["id"], "chatcmpl-test");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: one two three");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert!(r.text().find("\"usage\"").is_some());
    let ev = gw.usage_of(&r).await;
    assert_eq!(ev.usage.unwrap().total_tokens, 7);
    assert_eq!(ev.fallback, None);
    assert_eq!(up.count("echo-model"), 1);

    // The stream the client asked for passes through; the usage chunk it did not ask for is
    // removed.
    let r = chat(
        &gw,
        json!({"model": "healthy", "stream": true,
            "messages": [{"role": "user", "content": "a b"}]}),
    )
    .await;
    let (text, done) = sse_content(&r.text());
    assert_eq!(text, "echo: a b");
    assert!(done);
    assert!(!r.text().contains("\"choices\":[]"));
}

#[tokio::test]
async fn breaker_opens_skips_the_remote_and_a_probe_closes_it() {
    let (up, gw) = start().await;
    up.state.failing.store(true, Ordering::SeqCst);
    let ask = || {
        chat(
            &gw,
            json!({"model": "flaky", "max_tokens": 4,
                "messages": [{"role": "user", "content": "hello"}]}),
        )
    };

    // Three 500s in a row: each request still gets the local model's answer.
    for _ in 0..3 {
        let r = ask().await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(header(&r, "x-fuke-backend"), Some("local/smol"));
        assert_eq!(header(&r, "x-fuke-fallback"), Some("error_5xx"));
    }
    assert_eq!(up.count("flaky"), 3);

    // Open: straight to local, the remote untouched.
    let r = ask().await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(header(&r, "x-fuke-fallback"), Some("breaker_open"));
    assert_eq!(up.count("flaky"), 3, "an open breaker sends nothing");
    assert_eq!(
        gw.usage_of(&r).await.fallback.as_deref(),
        Some("breaker_open")
    );

    let admin = get(&client(), &gw.url("/admin/breakers"), Some(KEY_ADMIN)).await;
    assert_eq!(admin.status, StatusCode::OK, "{}", admin.text());
    let v = admin.json();
    let flaky = v["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"] == "flaky-up" && b["model"] == "flaky")
        .expect("flaky's breaker listed")
        .clone();
    assert_eq!(flaky["state"], "open");
    assert_eq!(flaky["opened_total"], 1);
    let metrics = get(&client(), &gw.url("/metrics"), None).await.text();
    assert!(
        metrics.contains(r#"fuke_breaker_state{backend="flaky-up",model="flaky"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"fuke_fallbacks_total{model="flaky",reason="breaker_open"} 1"#));
    // Tenants do not see the admin view.
    let denied = get(&client(), &gw.url("/admin/breakers"), Some(KEY_ACME)).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.openai_error()["code"], "permission_denied");

    // The remote recovers; after the cooldown one probe reaches it and closes the breaker.
    up.state.failing.store(false, Ordering::SeqCst);
    eventually("the breaker half-opens and the probe succeeds", || async {
        let r = ask().await;
        header(&r, "x-fuke-backend") == Some("flaky-up/flaky")
    })
    .await;
    assert_eq!(up.count("flaky"), 4, "exactly one probe went out");
    let v = get(&client(), &gw.url("/admin/breakers"), Some(KEY_ADMIN))
        .await
        .json();
    let state = v["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"] == "flaky-up")
        .unwrap()["state"]
        .clone();
    assert_eq!(state, "closed");
    let r = ask().await;
    assert_eq!(header(&r, "x-fuke-backend"), Some("flaky-up/flaky"));
    assert_eq!(header(&r, "x-fuke-fallback"), None);
}

#[tokio::test]
async fn a_break_after_bytes_were_sent_ends_the_stream_without_splicing() {
    let (_up, gw) = start().await;
    let r = chat(
        &gw,
        json!({"model": "broken-mid-stream", "stream": true,
            "messages": [{"role": "user", "content": "one two three four"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(header(&r, "x-fuke-backend"), Some("test/drop"));
    let body = r.text();
    let events: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    // Two chunks of the remote's answer, then an error event; no [DONE], no local answer.
    assert_eq!(events.len(), 3, "{body}");
    for chunk in &events[..2] {
        let v: Value = serde_json::from_str(chunk).unwrap();
        assert_eq!(v["model"], "drop", "only the remote's chunks: {chunk}");
        assert!(v["choices"][0]["delta"]["content"].is_string());
    }
    let err: Value = serde_json::from_str(events[2]).unwrap();
    assert_eq!(err["error"]["type"], "server_error");
    assert!(!body.contains("[DONE]"));
    let ev = gw.usage_of(&r).await;
    assert_eq!(ev.outcome, Outcome::UpstreamFailed);
    assert_eq!(&*ev.backend, "test");
    assert_eq!(
        ev.streamed_chunks, 2,
        "what the client received is recorded"
    );
}

#[tokio::test]
async fn a_stream_that_breaks_before_its_first_token_is_left_for_the_next_candidate() {
    let (up, gw) = start().await;
    // No deadline on this candidate: the stream is still held back until its first token.
    let r = chat(
        &gw,
        json!({"model": "cut-first", "stream": true, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(header(&r, "x-fuke-backend"), Some("local/smol"));
    assert_eq!(header(&r, "x-fuke-fallback"), Some("stream_broken"));
    let (text, done) = sse_content(&r.text());
    assert!(done && !text.is_empty(), "{}", r.text());
    assert_eq!(up.count("cut"), 1);
}

#[tokio::test]
async fn weighted_choice_converges_to_the_weights() {
    let (up, gw) = start().await;
    let c = client();
    let n = 400;
    let mut to_a = 0;
    for _ in 0..n {
        let r = post(
            &c,
            &gw.url("/v1/chat/completions"),
            KEY_ACME,
            r#"{"model":"weighted","messages":[{"role":"user","content":"x"}]}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        match header(&r, "x-fuke-backend") {
            Some("a/w-a") => to_a += 1,
            Some("b/w-b") => {}
            other => panic!("unexpected backend {other:?}"),
        }
    }
    // Weights 3:1 → 300 expected; 4.6 standard deviations either side.
    assert!((260..=340).contains(&to_a), "a served {to_a} of {n}");
    assert_eq!(up.count("w-a"), to_a);
    assert_eq!(up.count("w-b"), n - to_a);
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_left_for_the_next_candidate() {
    let (_up, gw) = start().await;
    let r = chat(
        &gw,
        json!({"model": "unreachable", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(header(&r, "x-fuke-backend"), Some("local/smol"));
    assert_eq!(header(&r, "x-fuke-fallback"), Some("connect_error"));
    assert_eq!(header(&r, "x-fuke-fallback-from"), Some("dead/echo-model"));
    let metrics = get(&client(), &gw.url("/metrics"), None).await.text();
    assert!(
        metrics.contains(r#"fuke_upstream_connect_retries_total{backend="dead"} 2"#),
        "two safe retries before moving on:\n{metrics}"
    );
}

#[tokio::test]
async fn a_candidate_at_max_in_flight_is_passed_over() {
    let (_up, gw) = start().await;
    let c = client();
    // One slow stream holds the only slot.
    let held = c
        .request(
            Request::builder()
                .method(Method::POST)
                .uri(gw.url("/v1/chat/completions"))
                .header("authorization", format!("Bearer {KEY_ACME}"))
                .body(Full::new(Bytes::from_static(
                    br#"{"model":"capped","stream":true,"messages":[{"role":"user","content":"go"}]}"#,
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    let r = post(
        &c,
        &gw.url("/v1/chat/completions"),
        KEY_ACME,
        r#"{"model":"capped","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.openai_error()["code"], "backends_unavailable");
    assert_eq!(header(&r, "x-fuke-fallback"), Some("busy"));
    assert!(r.headers.contains_key("retry-after"));
    drop(held.into_body().collect());
}

#[tokio::test]
async fn routes_are_checked_when_policy_loads() {
    let dir = tempfile::tempdir().unwrap();
    let bad = r#"upstreams:
  bad:
    base_url: http://127.0.0.1:9/v1
    breaker: { failure_rate: 1.5, probes: 0 }
  u:
    base_url: http://127.0.0.1:9/v1
models:
  both: { upstream: u, candidates: [{ upstream: u }] }
  down:
    candidates:
      - { upstream: u, model: x, tier: 2 }
      - { upstream: u, model: y, tier: 1 }
  zero:
    candidates:
      - { upstream: u, weight: 0 }
  twice:
    candidates:
      - { upstream: u, model: m }
      - { upstream: u, model: m }
"#;
    std::fs::write(dir.path().join("p.yaml"), bad).unwrap();
    let problems =
        fuke::policy::load_dir(dir.path(), 1, &fuke::backends::Registry::default()).unwrap_err();
    let text = problems.to_string();
    for expected in [
        "p.yaml:4: upstreams.bad.breaker.failure_rate: must be above 0 and at most 1",
        "upstreams.bad.breaker.probes: must be at least 1",
        "p.yaml:8: models.both: set either `candidates` or one `upstream`/`local`, not both",
        "p.yaml:12: models.down.candidates[1].tier: tiers must not decrease",
        "p.yaml:15: models.zero.candidates[0].weight: must be at least 1",
        "models.twice.candidates[1]: candidate name `u/m` is used twice",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}
