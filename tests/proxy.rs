//! The OpenAI surface through the gateway against a real upstream: byte-exact JSON and SSE
//! passthrough, include_usage handling, usage events, every error status, cancellation.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::*;

const CHAT: &str = "/v1/chat/completions";

async fn setup() -> (Upstream, Gateway, TestClient) {
    let up = Upstream::start().await;
    let gw = Gateway::start(&policy_yaml(&up.base_url())).await;
    (up, gw, client())
}

#[tokio::test]
async fn json_request_and_answer_pass_through_byte_for_byte() {
    let (up, gw, c) = setup().await;
    let body = r#"{"model":"gpt-test","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello there"}],"tools":[{"type":"function","function":{"name":"lookup","parameters":{"type":"object","properties":{"q":{"type":"string"}}}}}],"response_format":{"type":"json_object"},"logprobs":true,"seed":42,"user":"u-1","temperature":0.70}"#;
    let r = post(&c, &gw.url(CHAT), KEY_ACME, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // The upstream saw the client's fields as they were sent, with only `model` rewritten.
    let sent = up.last_received();
    let expected = body.replace(r#""model":"gpt-test""#, r#""model":"echo-model""#);
    assert_eq!(std::str::from_utf8(&sent.body).unwrap(), expected);
    assert!(
        sent.headers.get("authorization").is_none(),
        "client key leaked upstream"
    );

    // The client got the upstream's answer unchanged.
    assert_eq!(r.body, *up.state.last_json.lock().unwrap());
    assert_eq!(r.headers["content-type"], "application/json");
    let rid = r.headers["x-request-id"].to_str().unwrap().to_string();

    let ev = gw.sink.wait_for(&rid).await;
    assert_eq!(&*ev.tenant, "acme");
    assert_eq!(&*ev.key_id, "acme-key");
    assert_eq!(&*ev.model_alias, "gpt-test");
    assert_eq!(&*ev.upstream_model, "echo-model");
    assert_eq!(ev.status, 200);
    assert!(!ev.streamed);
    let usage = ev.usage.expect("usage recorded");
    assert_eq!(usage.prompt_tokens, 4);
    assert_eq!(usage.completion_tokens, 3);
    assert_eq!(usage.total_tokens, 7);
}

#[tokio::test]
async fn caller_request_id_is_kept_and_forwarded() {
    let (up, gw, c) = setup().await;
    let r = send(
        &c,
        Method::POST,
        &gw.url(CHAT),
        Some(KEY_ACME),
        &[("x-request-id", "trace-me-123")],
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-request-id"], "trace-me-123");
    assert_eq!(up.last_received().headers["x-request-id"], "trace-me-123");
}

#[tokio::test]
async fn stream_without_include_usage_drops_only_the_usage_chunk() {
    let (up, gw, c) = setup().await;
    let body = r#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"one two three"}]}"#;
    let r = post(&c, &gw.url(CHAT), KEY_ACME, body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "text/event-stream");

    // Fuke asked the upstream for usage although the client did not.
    let sent: serde_json::Value = serde_json::from_slice(&up.last_received().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);

    let upstream_bytes = String::from_utf8(up.state.last_stream.lock().unwrap().clone()).unwrap();
    let events: Vec<&str> = upstream_bytes.split_inclusive("\n\n").collect();
    let usage_event = events
        .iter()
        .find(|e| e.contains("\"choices\":[]"))
        .expect("upstream sent a usage chunk");
    let expected = upstream_bytes.replace(usage_event, "");
    assert_eq!(r.text(), expected);
    assert!(r.text().ends_with("data: [DONE]\n\n"));

    let ev = gw.usage_of(&r).await;
    assert!(ev.streamed);
    assert_eq!(ev.usage.unwrap().prompt_tokens, 3);
    assert_eq!(ev.usage.unwrap().completion_tokens, 4);
}

#[tokio::test]
async fn stream_with_include_usage_is_passed_through_unchanged() {
    let (up, gw, c) = setup().await;
    let body = r#"{"model":"gpt-test","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"a b"}]}"#;
    let r = post(&c, &gw.url(CHAT), KEY_ACME, body).await;
    assert_eq!(r.status, StatusCode::OK);
    let upstream_bytes = up.state.last_stream.lock().unwrap().clone();
    assert_eq!(r.body.as_ref(), upstream_bytes.as_slice());
    assert!(r.text().contains("\"choices\":[],\"usage\":{"));
    let ev = gw.usage_of(&r).await;
    assert_eq!(ev.usage.unwrap().total_tokens, 2 + 3);
}

#[tokio::test]
async fn completions_stream_and_embeddings_route_the_same_way() {
    let (up, gw, c) = setup().await;
    let r = post(
        &c,
        &gw.url("/v1/completions"),
        KEY_ACME,
        r#"{"model":"gpt-test","prompt":"say this","stream":true}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.last_received().path, "/v1/completions");
    assert!(r.text().contains("\"text\":\"echo:\""));
    assert!(!r.text().contains("\"usage\":{"));

    let r = post(
        &c,
        &gw.url("/v1/embeddings"),
        KEY_ACME,
        r#"{"model":"gpt-test","input":["alpha beta","gamma"]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.last_received().path, "/v1/embeddings");
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 2);
    let ev = gw.usage_of(&r).await;
    assert_eq!(ev.usage.unwrap().prompt_tokens, 3);
}

#[tokio::test]
async fn audio_transcription_multipart_is_relayed_unchanged() {
    let (up, gw, c) = setup().await;
    let boundary = "----fukeboundary42";
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes());
    body.extend((0..200_000u32).map(|i| (i % 251) as u8));
    body.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/form-data; boundary={boundary}");
    let r = send(
        &c,
        Method::POST,
        &gw.url("/v1/audio/transcriptions"),
        Some(KEY_ACME),
        &[("content-type", &ct)],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let got = up.last_received();
    assert_eq!(got.path, "/v1/audio/transcriptions");
    assert_eq!(got.body.as_ref(), body.as_slice());
    assert_eq!(got.headers["content-type"], ct.as_str());
}

#[tokio::test]
async fn models_lists_only_the_tenants_aliases() {
    let (_up, gw, c) = setup().await;
    let r = get(&c, &gw.url("/v1/models"), Some(KEY_GLOBEX)).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["secret-model"]);

    let r = get(&c, &gw.url("/v1/models/secret-model"), Some(KEY_GLOBEX)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["id"], "secret-model");
    assert_eq!(r.json()["object"], "model");

    // acme may not see globex's model, and cannot tell it exists.
    let r = get(&c, &gw.url("/v1/models/secret-model"), Some(KEY_ACME)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.openai_error()["code"], "model_not_found");
}

#[tokio::test]
async fn client_errors_have_openai_shape_and_status() {
    let (up, gw, c) = setup().await;
    let url = gw.url(CHAT);
    let ok_body = r#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}]}"#;

    let r = send(&c, Method::POST, &url, None, &[], ok_body).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.openai_error()["code"], "invalid_api_key");
    assert!(r.headers.contains_key("x-request-id"));

    let r = post(&c, &url, "fk-wrong", ok_body).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.openai_error()["code"], "invalid_api_key");

    let r = post(
        &c,
        &url,
        KEY_ACME,
        r#"{"model":"secret-model","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.openai_error()["param"], "model");

    let r = post(
        &c,
        &url,
        KEY_ACME,
        r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.openai_error()["code"], "model_not_found");

    for (body, param) in [
        (
            r#"{"model":"gpt-test","messages":[{"role":"user""#,
            serde_json::Value::Null,
        ),
        (r#"{"model":"gpt-test"}"#, "messages".into()),
        (r#"{"model":"gpt-test","messages":"hi"}"#, "messages".into()),
        (r#"{"model":7,"messages":[]}"#, "model".into()),
        (
            r#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}],"stream":1}"#,
            "stream".into(),
        ),
        (
            r#"{"model":"gpt-test","messages":[{"content":"x"}]}"#,
            "messages[0].role".into(),
        ),
    ] {
        let r = post(&c, &url, KEY_ACME, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        let e = r.openai_error();
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"], param, "{body}");
    }

    // Hostile JSON: deep nesting, invalid UTF-8, a top-level array.
    let deep = format!(
        r#"{{"model":"gpt-test","messages":[{{"role":"user","content":"x"}}],"x":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut bad_utf8 = br#"{"model":"gpt-test","messages":[{"role":"user","content":""#.to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe, b'"', b'}', b']', b'}']);
    for body in [deep.into_bytes(), bad_utf8, b"[1,2,3]".to_vec()] {
        let r = send(&c, Method::POST, &url, Some(KEY_ACME), &[], body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        r.openai_error();
    }

    let huge = format!(
        r#"{{"model":"gpt-test","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(5 << 20)
    );
    let r = post(&c, &url, KEY_ACME, &huge).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.openai_error()["code"], "request_too_large");

    let r = get(&c, &gw.url("/v1/nothing"), Some(KEY_ACME)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    r.openai_error();
    let r = get(&c, &url, Some(KEY_ACME)).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    r.openai_error();

    // None of the refused requests reached the upstream.
    assert!(up.received().is_empty());
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let (_up, gw, c) = setup().await;
    let body = r#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}]}"#;
    for _ in 0..2 {
        assert_eq!(
            post(&c, &gw.url(CHAT), KEY_LIMITED, body).await.status,
            StatusCode::OK
        );
    }
    let r = post(&c, &gw.url(CHAT), KEY_LIMITED, body).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.openai_error()["code"], "rate_limit_exceeded");
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&wait), "retry-after {wait}");
    // Other tenants are unaffected.
    assert_eq!(
        post(&c, &gw.url(CHAT), KEY_ACME, body).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn upstream_errors_pass_through_with_status_and_body() {
    let (_up, gw, c) = setup().await;
    for (model, status, code) in [
        ("fail-400", StatusCode::BAD_REQUEST, "bad_temperature"),
        ("fail-500", StatusCode::INTERNAL_SERVER_ERROR, "boom"),
        (
            "fail-429",
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
        ),
    ] {
        let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"x"}}]}}"#);
        let r = post(&c, &gw.url(CHAT), KEY_ACME, &body).await;
        assert_eq!(r.status, status);
        let e = r.openai_error();
        assert_eq!(e["code"], code);
        assert_eq!(e["message"], format!("upstream refused: {code}"));
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.headers["retry-after"], "7");
            // The upstream's rate-limit headers reach the client; its other headers do not.
            assert_eq!(r.headers["x-ratelimit-remaining-requests"], "0");
            assert_eq!(r.headers["x-ratelimit-reset-tokens"], "6m0s");
            assert!(!r.headers.contains_key("x-upstream-region"));
        }
        let ev = gw.usage_of(&r).await;
        assert_eq!(ev.status, status.as_u16());
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_hung_upstream_is_504() {
    // A port that was free a moment ago: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let up = Upstream::start().await;
    let policy = policy_yaml(&up.base_url())
        .replace(
            "models:\n",
            &format!(
                "  dead:\n    base_url: http://{dead}/v1\nmodels:\n  gone: {{ upstream: dead }}\n"
            ),
        )
        .replace("models: [gpt-test,", "models: [gone, gpt-test,");
    let gw = Gateway::start(&policy).await;
    let c = client();
    let r = post(
        &c,
        &gw.url(CHAT),
        KEY_ACME,
        r#"{"model":"gone","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.openai_error()["code"], "upstream_error");
    assert!(
        !r.text().contains(&dead.to_string()),
        "internal address leaked"
    );

    let r = post(
        &c,
        &gw.url(CHAT),
        KEY_ACME,
        r#"{"model":"hang","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.openai_error()["code"], "upstream_timeout");
    let ev = gw.usage_of(&r).await;
    assert_eq!(ev.status, 504);
}

#[tokio::test]
async fn stream_cut_by_upstream_ends_with_an_error_event() {
    let (_up, gw, c) = setup().await;
    let r = post(
        &c,
        &gw.url(CHAT),
        KEY_ACME,
        r#"{"model":"drop","stream":true,"messages":[{"role":"user","content":"a b c d"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let text = r.text();
    assert!(
        text.starts_with("data: {\"id\":\"chatcmpl-test\""),
        "{text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let err: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "upstream_error");
    let ev = gw.usage_of(&r).await;
    assert_eq!(ev.outcome, fuke::metering::Outcome::UpstreamFailed);
}

#[tokio::test]
async fn stream_that_goes_silent_is_ended_after_the_idle_timeout() {
    let (_up, gw, c) = setup().await;
    // `stall` sends two chunks, then nothing; its upstream's idle timeout is 400 ms.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        post(
            &c,
            &gw.url(CHAT),
            KEY_ACME,
            r#"{"model":"stall","stream":true,"messages":[{"role":"user","content":"a b c"}]}"#,
        ),
    )
    .await
    .expect("silent upstream held the client");
    let text = r.text();
    assert_eq!(text.matches("chat.completion.chunk").count(), 2, "{text}");
    assert!(!text.contains("[DONE]"));
    assert!(
        text.trim_end().ends_with(r#""code":"upstream_error"}}"#),
        "{text}"
    );
    let ev = gw.usage_of(&r).await;
    assert_eq!(ev.outcome, fuke::metering::Outcome::UpstreamFailed);
}

#[tokio::test]
async fn stream_without_upstream_usage_is_recorded_as_missing_not_estimated() {
    let (_up, gw, c) = setup().await;
    let r = post(
        &c,
        &gw.url(CHAT),
        KEY_ACME,
        r#"{"model":"no-usage","stream":true,"messages":[{"role":"user","content":"a"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let ev = gw.usage_of(&r).await;
    assert_eq!(ev.usage, None);
    assert_eq!(ev.outcome, fuke::metering::Outcome::Completed);
}

#[tokio::test]
async fn stream_ends_at_done_even_if_the_upstream_lingers() {
    let (_up, gw, c) = setup().await;
    // The upstream keeps its response open after [DONE]; the client's stream must still end
    // (well before the 3 s idle timeout would cut it).
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        post(
            &c,
            &gw.url(CHAT),
            KEY_ACME,
            r#"{"model":"linger","stream":true,"messages":[{"role":"user","content":"a"}]}"#,
        ),
    )
    .await
    .expect("client stream held open by the upstream");
    assert!(r.text().ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let (up, gw, c) = setup().await;
    let req = slow_stream_request(&gw.url(""));
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().unwrap().starts_with(b"data: "));
    let cancelled = up.state.cancel_notify.notified();
    drop(body);
    tokio::time::timeout(Duration::from_secs(10), cancelled)
        .await
        .expect("upstream never saw the cancel");
    assert_eq!(up.state.cancelled.load(Ordering::SeqCst), 1);
    let ev = gw.sink.wait_for(&rid).await;
    assert_eq!(ev.outcome, fuke::metering::Outcome::ClientAborted);
}

/// A JSON client that gives up while the backend has not answered still leaves a usage
/// event: the request was made, and the ledger must see it.
#[tokio::test]
async fn client_that_gives_up_on_a_json_answer_is_metered() {
    let (up, gw, c) = setup().await;
    let req = Request::builder()
        .method(Method::POST)
        .uri(gw.url(CHAT))
        .header("authorization", format!("Bearer {KEY_ACME}"))
        .header("x-request-id", "gives-up-1")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"hang","messages":[{"role":"user","content":"x"}]}"#,
        )))
        .unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(300), c.request(req)).await;
    assert!(waited.is_err(), "the hanging upstream answered");
    eventually("the upstream to get the request", || async {
        up.count("hang") == 1
    })
    .await;
    let ev = gw.sink.wait_for("gives-up-1").await;
    assert_eq!(ev.outcome, fuke::metering::Outcome::ClientAborted);
    assert_eq!(ev.status, 499);
    assert!(ev.usage.is_none());
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let (_up, gw, c) = setup().await;
    let r = get(&c, &gw.url("/healthz"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get(&c, &gw.url("/readyz"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let ok = post(
        &c,
        &gw.url(CHAT),
        KEY_ACME,
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"a b"}]}"#,
    )
    .await;
    gw.sink
        .wait_for(ok.headers["x-request-id"].to_str().unwrap())
        .await;
    let _ = post(
        &c,
        &gw.url(CHAT),
        KEY_ACME,
        r#"{"model":"fail-500","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    let m = get(&c, &gw.url("/metrics"), None).await.text();
    assert!(m.contains(r#"fuke_requests_total{tenant="acme",model="gpt-test",endpoint="chat.completions",status="200"} 1"#), "{m}");
    assert!(
        m.contains(r#"fuke_upstream_responses_total{upstream="test",status="500"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"fuke_tokens_total{tenant="acme",model="gpt-test",kind="prompt"} 2"#),
        "{m}"
    );
    assert!(m.contains("fuke_request_duration_seconds_bucket"), "{m}");
}
