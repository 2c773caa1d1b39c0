//! Hostile and malformed input, generated: more than a thousand requests that must each get a
//! 4xx OpenAI-shaped error (or, for broken HTTP framing, a 400 or a closed connection), while the
//! gateway keeps serving and its memory stays bounded.

mod support;

use std::time::Duration;

use bytes::Bytes;
use fuke::app::Settings;
use http::Method;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_BODY: usize = 64 << 10;

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const VALID: &str = r#"{"model":"gpt-test","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello there, how are you?"}],"temperature":0.2}"#;

/// Bodies that are not acceptable chat requests, each with what makes them so.
fn hostile_bodies() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let valid = VALID.as_bytes();
    // Truncated JSON: every proper prefix.
    for i in 0..valid.len() {
        out.push((format!("truncated at {i}"), valid[..i].to_vec()));
    }
    // Deep nesting inside an otherwise valid request.
    for depth in [129usize, 130, 200, 1000, 10_000, 30_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let nested = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let body = format!(
                r#"{{"model":"gpt-test","messages":[{{"role":"user","content":"x"}}],"extra":{nested}}}"#
            );
            out.push((format!("nesting {depth} {open}"), body.into_bytes()));
        }
    }
    // Wrong types for every field the gateway reads.
    let values = [
        "1",
        "-1.5e300",
        "true",
        "null",
        "\"text\"",
        "[]",
        "[1,2]",
        "{}",
        "{\"a\":1}",
    ];
    for v in values {
        if v != "\"text\"" {
            out.push((
                format!("model = {v}"),
                format!(r#"{{"model":{v},"messages":[{{"role":"user","content":"x"}}]}}"#)
                    .into_bytes(),
            ));
        }
        if v != "[]" && v != "[1,2]" {
            out.push((
                format!("messages = {v}"),
                format!(r#"{{"model":"gpt-test","messages":{v}}}"#).into_bytes(),
            ));
        }
        out.push((
            format!("message element = {v}"),
            format!(r#"{{"model":"gpt-test","messages":[{v}]}}"#).into_bytes(),
        ));
        out.push((
            format!("role = {v}"),
            format!(r#"{{"model":"gpt-test","messages":[{{"role":{v},"content":"x"}}]}}"#)
                .into_bytes(),
        ));
        if v != "true" && v != "null" {
            out.push((
                format!("stream = {v}"),
                format!(
                    r#"{{"model":"gpt-test","stream":{v},"messages":[{{"role":"user","content":"x"}}]}}"#
                )
                .into_bytes(),
            ));
        }
        if v != "null" && v != "{}" && v != "{\"a\":1}" {
            out.push((
                format!("stream_options = {v}"),
                format!(
                    r#"{{"model":"gpt-test","stream":true,"stream_options":{v},"messages":[{{"role":"user","content":"x"}}]}}"#
                )
                .into_bytes(),
            ));
        }
    }
    // Not an object at all, or missing what is required.
    for body in [
        "",
        " ",
        "null",
        "0",
        "\"x\"",
        "[]",
        "[{}]",
        "{}",
        "{\"model\":\"\"}",
        "{\"model\":\"gpt-test\"}",
        "{\"messages\":[]}",
        "{\"model\":\"gpt-test\",\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}",
        "{\"model\":\"gpt-test\",\"messages\":[{\"content\":\"x\"}]}",
        "\u{feff}",
        "{,}",
        "{\"a\" 1}",
        "{\"model\":\"gpt-test\",}",
        "NaN",
        "{\"model\":\"gpt-test\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}garbage",
    ] {
        out.push((format!("shape {body:?}"), body.as_bytes().to_vec()));
    }
    // Invalid UTF-8 at random places inside strings, and lone surrogate escapes.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let bad_sequences: [&[u8]; 6] = [
        b"\xff",
        b"\xc3\x28",
        b"\xe2\x82",
        b"\xf0\x28\x8c\xbc",
        b"\xed\xa0\x80",
        b"\xc0\xaf",
    ];
    // Just after each opening quote: inside a string.
    let mut quote_positions = Vec::new();
    let mut inside = false;
    for (i, b) in valid.iter().enumerate() {
        if *b == b'"' {
            if !inside {
                quote_positions.push(i + 1);
            }
            inside = !inside;
        }
    }
    for i in 0..300 {
        let at = quote_positions[rng.below(quote_positions.len())];
        let seq = bad_sequences[rng.below(bad_sequences.len())];
        let mut body = valid[..at].to_vec();
        body.extend_from_slice(seq);
        body.extend_from_slice(&valid[at..]);
        out.push((format!("invalid UTF-8 #{i} at {at}"), body));
    }
    for esc in [
        r"\ud800",
        r"\udfff",
        r"\ud800\u0041",
        r"\uZZZZ",
        r"\x41",
        r"\",
    ] {
        out.push((
            format!("escape {esc}"),
            format!(r#"{{"model":"gpt-test","messages":[{{"role":"user","content":"a{esc}"}}]}}"#)
                .into_bytes(),
        ));
    }
    // A raw control character inside a string (JSON requires it escaped).
    for i in 0..300 {
        let at = quote_positions[rng.below(quote_positions.len())];
        let mut body = valid[..at].to_vec();
        body.push((rng.below(0x20)) as u8);
        body.extend_from_slice(&valid[at..]);
        out.push((format!("control byte #{i} at {at}"), body));
    }
    out
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Writes raw bytes on a fresh connection; the status of the answer, or `None` when the server
/// closed the connection without one.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer and no close within 5 s");
    let line = String::from_utf8_lossy(&buf);
    line.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hostile_requests_get_errors_and_the_gateway_keeps_serving() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start_with(
        &policy_yaml(&upstream.base_url()),
        Options {
            settings: Settings {
                max_body_bytes: MAX_BODY,
                max_upload_bytes: 256 << 10,
                ..Settings::default()
            },
            ..Options::default()
        },
    )
    .await;
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let ok = post(&c, &url, KEY_ACME, VALID).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let rss_before = rss_kib();

    let mut count = 0;
    for (what, body) in hostile_bodies() {
        let expected = if body.len() > MAX_BODY { 413 } else { 400 };
        let r = send(
            &c,
            Method::POST,
            &url,
            Some(KEY_ACME),
            &[("content-type", "application/json")],
            Bytes::from(body),
        )
        .await;
        assert_eq!(r.status, expected, "{what}: {}", r.text());
        let e = r.openai_error();
        assert_eq!(e["type"], "invalid_request_error", "{what}");
        count += 1;
    }

    // Bodies over the limit, with and without a declared length: 413, nothing buffered past it.
    for size in [MAX_BODY + 1, MAX_BODY * 2, MAX_BODY * 16, 8 << 20] {
        let big = format!(
            r#"{{"model":"gpt-test","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "a".repeat(size)
        );
        // The gateway may answer 413 from the declared length and close before the client has
        // written everything: a 413 or a closed connection.
        let declared = raw(
            gw.addr,
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_ACME}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{big}",
                big.len()
            )
            .as_bytes(),
        )
        .await;
        assert!(
            matches!(declared, Some(413) | None),
            "declared {size}: {declared:?}"
        );
        count += 1;
        let chunked = raw(
            gw.addr,
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_ACME}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
                big.len()
            )
            .as_bytes(),
        )
        .await;
        assert!(
            matches!(chunked, Some(413) | None),
            "chunked {size}: {chunked:?}"
        );
        count += 1;
    }
    // An oversized multipart upload.
    let boundary = "XyZ";
    let mut multipart = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
    )
    .into_bytes();
    multipart.extend(std::iter::repeat_n(b'R', 1 << 20));
    let mut request = format!(
        "POST /v1/audio/transcriptions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_ACME}\r\ncontent-type: multipart/form-data; boundary=XyZ\r\ncontent-length: {}\r\n\r\n",
        multipart.len()
    )
    .into_bytes();
    request.extend_from_slice(&multipart);
    let status = raw(gw.addr, &request).await;
    assert!(matches!(status, Some(413) | None), "multipart: {status:?}");
    count += 1;

    // Broken HTTP framing and header smuggling: a 400 from the HTTP layer or a closed
    // connection, never a request that reaches a model.
    let body = VALID;
    let len = body.len();
    let auth = format!("authorization: Bearer {KEY_ACME}\r\n");
    let smuggling = [
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}content-length: {len}\r\ncontent-length: {}\r\n\r\n{body}",
            len + 5
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}content-length: -1\r\n\r\n{body}"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}content-length: 1e3\r\n\r\n{body}"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}transfer-encoding: chunked, identity\r\n\r\n{body}"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}transfer-encoding: chunked\r\n\r\nzz\r\n{body}\r\n0\r\n\r\n"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}x-folded: a\r\n b\r\ncontent-length: {len}\r\n\r\n{body}"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}bad header: 1\r\ncontent-length: {len}\r\n\r\n{body}"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}content-length : {len}\r\n\r\n{body}"
        ),
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}x-big: {}\r\ncontent-length: {len}\r\n\r\n{body}",
            "h".repeat(1 << 20)
        ),
        format!(
            "POST /v1/chat/completions HTTP/9.9\r\nhost: x\r\n{auth}content-length: {len}\r\n\r\n{body}"
        ),
        format!("POST  /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}\r\n"),
        "\x00\x01\x02\x03garbage\r\n\r\n".to_string(),
        format!("POST /v1/chat/completions\x00 HTTP/1.1\r\nhost: x\r\n{auth}\r\n"),
    ];
    for (i, req) in smuggling.iter().enumerate() {
        let status = raw(gw.addr, req.as_bytes()).await;
        assert!(
            matches!(status, Some(400..=499) | None),
            "smuggling case {i}: {status:?}"
        );
        count += 1;
    }

    // Slowloris: connections that send half a header and stall do not stop anyone else.
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await
            .unwrap();
        stalled.push(s);
    }
    let served = post(&c, &url, KEY_ACME, VALID).await;
    assert_eq!(served.status, 200);
    count += 200;
    drop(stalled);

    assert!(count >= 1000, "only {count} hostile requests");
    // Still serving, and the hostile traffic left no lasting memory behind.
    let after = post(&c, &url, KEY_ACME, VALID).await;
    assert_eq!(after.status, 200);
    assert!(gw.task.as_ref().is_some_and(|t| !t.is_finished()));
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 << 10, "RSS grew by {grown} KiB");
    eprintln!("{count} hostile requests; RSS grew by {grown} KiB");
}
