//! The local backend with the real models (scripts/models.sh fetches them): SmolLM2-135M-Instruct
//! (chat) and all-MiniLM-L6-v2 (embeddings) in-process through llama.cpp, one thread each.
//! Models are loaded once per test binary and shared; tests whose timing or determinism would
//! suffer from others' load get an engine of their own.

mod support;

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Instant;

use base64::Engine as _;
use fuke::backends::local::{LocalKind, LocalModelConfig, LocalModels};
use futures_util::StreamExt;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::*;

fn model_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file)
}

fn chat(name: &str, parallel: u32, queue: u32) -> LocalModelConfig {
    LocalModelConfig {
        context: 1024,
        parallel,
        queue,
        threads: 1,
        ..LocalModelConfig::defaults(
            name,
            model_path("SmolLM2-135M-Instruct.Q4_1.gguf"),
            LocalKind::Chat,
        )
    }
}

static MODELS: LazyLock<LocalModels> = LazyLock::new(|| {
    let configs = vec![
        // Shared by most tests.
        chat("smol", 4, 16),
        // Only the determinism test: nothing else shares its batches.
        chat("solo", 1, 4),
        // Only the concurrency test: 8 sequences at once.
        chat("wide", 8, 8),
        // Only the queue test: one sequence, one waiting request.
        chat("tiny", 1, 1),
        // Only the disconnect test, which watches the engine go idle.
        chat("gone", 1, 2),
        LocalModelConfig {
            threads: 1,
            ..LocalModelConfig::defaults(
                "mini",
                model_path("all-MiniLM-L6-v2.gguf"),
                LocalKind::Embedding,
            )
        },
        // Not a GGUF file: fails to load, and must not take the others down.
        LocalModelConfig::defaults(
            "broken",
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"),
            LocalKind::Chat,
        ),
    ];
    for c in &configs[..6] {
        assert!(
            c.path.is_file(),
            "{} missing: run scripts/models.sh",
            c.path.display()
        );
    }
    LocalModels::load(&configs)
});

fn policy() -> String {
    format!(
        r#"models:
  smol: {{ local: smol }}
  solo: {{ local: solo }}
  wide: {{ local: wide }}
  tiny: {{ local: tiny }}
  gone: {{ local: gone }}
  mini: {{ local: mini }}
  broken: {{ local: broken }}
tenants:
  acme:
    models: ["*"]
    keys:
      - {{ id: acme-key, sha256: {} }}
"#,
        hash(KEY_ACME)
    )
}

async fn gateway() -> Gateway {
    Gateway::start_with(
        &policy(),
        Options {
            local: MODELS.clone(),
            ..Options::default()
        },
    )
    .await
}

/// POSTs `body` to `path` with acme's key.
async fn call(gw: &Gateway, path: &str, body: Value) -> Reply {
    post(&client(), &gw.url(path), KEY_ACME, &body.to_string()).await
}

async fn chat_call(gw: &Gateway, body: Value) -> Reply {
    call(gw, "/v1/chat/completions", body).await
}

async fn embeddings_call(gw: &Gateway, body: Value) -> Reply {
    call(gw, "/v1/embeddings", body).await
}

fn greedy(model: &str, question: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": question}
        ],
        "temperature": 0,
        "seed": 7,
        "max_tokens": max_tokens
    })
}

/// The content deltas, finish reason and usage chunk of an SSE answer.
fn parse_sse(text: &str) -> (String, Option<String>, Option<Value>, bool) {
    let (mut content, mut finish, mut usage, mut done) = (String::new(), None, None, false);
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
    }
    (content, finish, usage, done)
}

#[tokio::test]
async fn deterministic_answer_is_stable_and_stream_agrees_with_json() {
    let gw = gateway().await;
    let body = greedy("solo", "Name three colours of the rainbow.", 40);
    let a = chat_call(&gw, body.clone()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let a = a.json();
    // The same prompt again: all but its last token come from the sequence's cache, and the
    // answer is the same.
    let reused = MODELS.reused_prompt_tokens("solo");
    let b = chat_call(&gw, body.clone()).await.json();
    assert_eq!(
        MODELS.reused_prompt_tokens("solo") - reused,
        a["usage"]["prompt_tokens"].as_u64().unwrap() - 1
    );
    let text = a["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "empty answer: {a}");
    assert_eq!(text, b["choices"][0]["message"]["content"], "not stable");
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["model"], "solo");
    assert_eq!(a["choices"][0]["message"]["role"], "assistant");
    assert_eq!(a["usage"], b["usage"]);
    let usage = &a["usage"];
    let (p, c) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 10 && c > 0 && c <= 40, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);

    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let s = chat_call(&gw, stream_body).await;
    assert_eq!(s.headers["content-type"], "text/event-stream");
    let (content, finish, stream_usage, done) = parse_sse(&s.text());
    assert!(done, "no [DONE]: {}", s.text());
    assert_eq!(content, text, "stream and JSON differ");
    assert_eq!(finish.as_deref(), a["choices"][0]["finish_reason"].as_str());
    assert_eq!(stream_usage.as_ref(), Some(usage));

    // Metered with the tokenizer's exact counts.
    let event = gw.usage_of(&s).await;
    assert_eq!(event.usage.map(|u| u.prompt_tokens), Some(p));
    assert_eq!(event.usage.map(|u| u.completion_tokens), Some(c));
    assert_eq!(&*event.backend, "local:solo");
}

#[tokio::test]
async fn the_gguf_jinja_template_is_applied() {
    // SmolLM2's template adds its default system prompt when a conversation has none: with the
    // template applied as written, leaving it out and writing it out give the same prompt.
    let gw = gateway().await;
    let prompt_tokens = |messages: Value| {
        let body = json!({"model": "smol", "messages": messages, "max_tokens": 1});
        let gw = &gw;
        async move {
            let r = chat_call(gw, body).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
        }
    };
    let implicit = prompt_tokens(json!([{"role": "user", "content": "hi"}])).await;
    let explicit = prompt_tokens(json!([
        {"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
        {"role": "user", "content": "hi"}
    ]))
    .await;
    assert_eq!(implicit, explicit);
}

#[tokio::test]
async fn max_tokens_and_stop_sequences_cut_the_answer() {
    let gw = gateway().await;
    let question = "Write one sentence about the sea.";
    let r = chat_call(&gw, greedy("smol", question, 5)).await.json();
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 5);

    let full = chat_call(&gw, greedy("smol", question, 60)).await.json();
    let text = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop at a word in the middle of the greedy answer: the answer ends right before it.
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 4, "answer too short to test stop: {text:?}");
    let stop = format!(" {}", words[words.len() / 2]);
    let cut = text.find(&stop).unwrap();
    for stream in [false, true] {
        let mut body = greedy("smol", question, 60);
        body["stop"] = json!([stop, "\u{1F600}never"]);
        body["stream"] = json!(stream);
        let r = chat_call(&gw, body).await;
        let (content, finish) = if stream {
            let (content, finish, usage, _) = parse_sse(&r.text());
            assert!(usage.is_none(), "usage chunk sent without include_usage");
            (content, finish.unwrap())
        } else {
            let v = r.json();
            (
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                v["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        };
        assert_eq!(content, &text[..cut], "stream={stream}");
        assert_eq!(finish, "stop");
    }
}

/// Arrival times of the content chunks of one streamed answer.
async fn timed_stream(url: String, body: Value) -> Vec<Instant> {
    let req = http::Request::post(url)
        .header("authorization", format!("Bearer {KEY_ACME}"))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut frames = resp.into_body().into_data_stream();
    let mut times = Vec::new();
    let mut all = Vec::new();
    while let Some(f) = frames.next().await {
        let f = f.unwrap();
        if f.windows(9).any(|w| w == b"\"content\"") {
            times.push(Instant::now());
        }
        all.extend_from_slice(&f);
    }
    assert!(all.ends_with(b"data: [DONE]\n\n"));
    times
}

#[tokio::test]
async fn eight_concurrent_streams_are_decoded_together() {
    let gw = gateway().await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let mut body = greedy("wide", &format!("Count from {i} to {}.", i + 40), 32);
            body["stream"] = json!(true);
            body["ignore_eos"] = json!(true);
            tokio::spawn(timed_stream(gw.url("/v1/chat/completions"), body))
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.unwrap());
    }
    for s in &streams {
        // Role chunk + 32 tokens (a token may hold back no text, never more chunks).
        assert!(s.len() >= 16, "stream too short: {}", s.len());
    }
    // Interleaved, not one after another: every stream had started before any stream ended.
    let last_start = streams.iter().map(|s| s[1]).max().unwrap();
    let first_end = streams.iter().map(|s| *s.last().unwrap()).min().unwrap();
    assert!(
        last_start < first_end,
        "streams were served one after another ({:?} after the first ended)",
        last_start - first_end
    );
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_sequence() {
    let gw = gateway().await;
    let mut body = greedy("gone", "Tell me a very long story.", 900);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY_ACME}"))
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut frames = resp.into_body().into_data_stream();
    for _ in 0..4 {
        frames.next().await.unwrap().unwrap();
    }
    assert_eq!(MODELS.active_sequences("gone"), 1);
    let metrics = send(&client(), Method::GET, &gw.url("/metrics"), None, &[], "")
        .await
        .text();
    assert!(
        metrics.contains("fuke_local_active_sequences{model=\"gone\"} 1"),
        "{metrics}"
    );
    drop(frames);
    // Generating the remaining ~900 tokens on one thread takes longer than `eventually` waits;
    // the sequence is freed at the next decode step instead.
    eventually("the sequence to be freed", || async {
        MODELS.active_sequences("gone") == 0
    })
    .await;
    let event = gw.sink.wait_for(&id).await;
    assert_eq!(event.outcome.as_str(), "client_aborted");
}

#[tokio::test]
async fn a_full_queue_answers_429() {
    let gw = gateway().await;
    let long = || {
        let mut b = greedy("tiny", "Tell me a story.", 200);
        b["ignore_eos"] = json!(true);
        b
    };
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let url = gw.url("/v1/chat/completions");
            let body = long().to_string();
            tokio::spawn(async move { post(&client(), &url, KEY_ACME, &body).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in calls {
        let r = c.await.unwrap();
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(r.headers.contains_key("retry-after"));
            assert_eq!(r.openai_error()["code"], "rate_limit_exceeded");
        }
        statuses.push(r.status);
    }
    // One decoding + one waiting at most: the others are refused at once, not queued unbounded.
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!((1..=2).contains(&ok) && ok + refused == 4, "{statuses:?}");
}

#[tokio::test]
async fn what_a_local_model_cannot_do_is_refused_clearly() {
    let gw = gateway().await;
    let base = greedy("smol", "hi", 4);
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
            "unsupported_parameter",
        ),
        (json!({"n": 2}), "n", "unsupported_parameter"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}),
            "messages[0].content[0]",
            "unsupported_parameter",
        ),
        (
            json!({"response_format": {"type": "json_schema"}}),
            "response_format",
            "unsupported_parameter",
        ),
        (
            json!({"messages": [{"role": "user", "content": "word ".repeat(1500)}]}),
            "messages",
            "context_length_exceeded",
        ),
        (json!({"temperature": 3}), "temperature", ""),
    ];
    for (patch, param, code) in cases {
        let mut body = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = chat_call(&gw, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{patch}: {}", r.text());
        let e = r.openai_error();
        assert_eq!(e["param"], param, "{e}");
        if !code.is_empty() {
            assert_eq!(e["code"], code, "{e}");
        }
    }
    // Each kind serves its own endpoint only.
    let r = embeddings_call(&gw, json!({"model": "smol", "input": "x"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.openai_error()["code"], "unsupported_endpoint");
    let r = chat_call(&gw, greedy("mini", "hi", 4)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_model_that_failed_to_load_answers_503_and_the_rest_serve() {
    let why = MODELS.failure("broken").expect("broken model loaded");
    assert!(why.contains("not a GGUF file"), "{why}");
    let gw = gateway().await;
    let r = chat_call(&gw, greedy("broken", "hi", 4)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let e = r.openai_error();
    assert_eq!(e["code"], "model_unavailable");
    assert!(!e["message"].as_str().unwrap().contains("Cargo.toml"));
    let r = chat_call(&gw, greedy("smol", "hi", 4)).await;
    assert_eq!(r.status, StatusCode::OK);

    let metrics = send(&client(), Method::GET, &gw.url("/metrics"), None, &[], "")
        .await
        .text();
    assert!(
        metrics.contains("fuke_local_model_up{model=\"broken\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fuke_local_model_up{model=\"smol\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fuke_local_queued_requests{model=\"smol\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fuke_local_prompt_tokens_reused_total{model=\"smol\"}"),
        "{metrics}"
    );
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[tokio::test]
async fn embeddings_match_the_reference_model() {
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/minilm_reference.json")).unwrap();
    let sentences: Vec<&str> = fixture["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let reference: Vec<Vec<f32>> = serde_json::from_value(fixture["embeddings"].clone()).unwrap();
    let embedder = MODELS.embedder("mini").unwrap();
    assert_eq!(embedder.dims(), 384);
    let got = embedder.embed(&sentences).await.unwrap();
    for ((s, g), r) in sentences.iter().zip(&got).zip(&reference) {
        let c = cosine(g, r);
        assert!(c >= 0.999, "{s}: cosine {c} with the reference");
        let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not normalised: {norm}");
    }

    // Over HTTP, float and base64, several inputs in one request.
    let gw = gateway().await;
    let input = json!([
        "How do I get a refund?",
        "How can I get my money back?",
        "The weather is lovely today."
    ]);
    let float = embeddings_call(&gw, json!({"model": "mini", "input": input})).await;
    assert_eq!(float.status, StatusCode::OK, "{}", float.text());
    let float = float.json();
    assert_eq!(float["object"], "list");
    let vecs: Vec<Vec<f32>> = (0..3)
        .map(|i| serde_json::from_value(float["data"][i]["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(float["data"][2]["index"], 2);
    assert!(float["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    // Paraphrases are closer than unrelated sentences.
    assert!(cosine(&vecs[0], &vecs[1]) > 0.6);
    assert!(cosine(&vecs[0], &vecs[2]) < 0.3);

    let b64 = embeddings_call(
        &gw,
        json!({"model": "mini", "input": "How do I get a refund?", "encoding_format": "base64"}),
    )
    .await
    .json();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // The same vector (embedded alone here, in a batch of three above: llama.cpp's float sums
    // differ in the last bits with the batch's shape).
    assert!(cosine(&decoded, &vecs[0]) > 0.99999);

    let r = embeddings_call(
        &gw,
        json!({"model": "mini", "input": "x", "dimensions": 64}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.openai_error()["param"], "dimensions");
}

#[tokio::test]
async fn models_list_shows_local_aliases() {
    let gw = gateway().await;
    let r = send(
        &client(),
        Method::GET,
        &gw.url("/v1/models/smol"),
        Some(KEY_ACME),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["id"], "smol");
}

#[tokio::test]
async fn the_openai_sdk_gets_answers_and_embeddings_from_local_models() {
    let gw = gateway().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk_local.py");
    let out = tokio::process::Command::new("python3")
        .args([script, &gw.url("/v1"), KEY_ACME, "smol", "mini"])
        .output()
        .await
        .expect("python3 is needed (scripts/test.sh installs the test prerequisites)");
    assert!(
        out.status.success(),
        "SDK script failed (is the `openai` package installed? scripts/test.sh does it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["json_text"].as_str().unwrap().contains("Paris"), "{v}");
    assert!(v["stream_text"].as_str().unwrap().contains("Paris"), "{v}");
    let u = &v["json_usage"];
    assert_eq!(
        u[2].as_u64().unwrap(),
        u[0].as_u64().unwrap() + u[1].as_u64().unwrap()
    );
    assert_eq!(v["stream_roles"], json!(["assistant"]));
    assert_eq!(v["stream_usage"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["embedding_dims"], json!([384, 384]));
    assert_eq!(v["base64_matches"], true);
}
