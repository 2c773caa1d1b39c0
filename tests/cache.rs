//! The answer cache against the real test upstream and the real embedder (all-MiniLM-L6-v2
//! through llama.cpp). Upstream request counts prove every hit and miss.

mod support;

use std::sync::LazyLock;
use std::time::Duration;

use fuke::backends::local::LocalModels;
use fuke::cache::CacheUse;
use http::Method;
use serde_json::{Value, json};
use support::*;

static MODELS: LazyLock<LocalModels> =
    LazyLock::new(|| embedding_model("minilm", "all-MiniLM-L6-v2.gguf", "", ""));

const KEY_SHORT: &str = "fk-test-short-ttl-0010";
const KEY_STRICT: &str = "fk-test-strict-0011";
const KEY_PLAIN: &str = "fk-test-no-cache-0012";

fn policy(base_url: &str) -> String {
    format!(
        r#"upstreams:
  test:
    base_url: {base_url}
models:
  gpt: {{ upstream: test, model: echo-model }}
  broken: {{ upstream: test, model: fail-500 }}
tenants:
  acme:
    models: [gpt, broken]
    cache: {{ sampled: true }}
    keys:
      - {{ id: acme-key, sha256: {acme} }}
  globex:
    models: [gpt]
    cache: {{ sampled: true }}
    keys:
      - {{ id: globex-key, sha256: {globex} }}
  short:
    models: [gpt]
    cache: {{ ttl_secs: 1, sampled: true }}
    keys:
      - {{ id: short-key, sha256: {short} }}
  strict:
    models: [gpt]
    cache: {{}}
    keys:
      - {{ id: strict-key, sha256: {strict} }}
  plain:
    models: [gpt]
    keys:
      - {{ id: plain-key, sha256: {plain} }}
"#,
        acme = hash(KEY_ACME),
        globex = hash(KEY_GLOBEX),
        short = hash(KEY_SHORT),
        strict = hash(KEY_STRICT),
        plain = hash(KEY_PLAIN),
    )
}

struct Env {
    gw: Gateway,
    up: Upstream,
    client: TestClient,
}

async fn start() -> Env {
    let up = Upstream::start().await;
    let gw = Gateway::start_with(
        &policy(&up.base_url()),
        Options {
            local: MODELS.clone(),
            embedder: Some("minilm".into()),
            ..Options::default()
        },
    )
    .await;
    Env {
        gw,
        up,
        client: client(),
    }
}

fn chat(question: &str) -> String {
    json!({"model": "gpt", "messages": [
        {"role": "system", "content": "You are the support bot of an online shop."},
        {"role": "user", "content": question}]})
    .to_string()
}

impl Env {
    async fn ask(&self, key: &str, body: &str) -> Reply {
        post(
            &self.client,
            &self.gw.url("/v1/chat/completions"),
            key,
            body,
        )
        .await
    }

    async fn ask_with(&self, key: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        send(
            &self.client,
            Method::POST,
            &self.gw.url("/v1/chat/completions"),
            Some(key),
            &h,
            body.to_string(),
        )
        .await
    }

    fn calls(&self) -> usize {
        self.up.count("echo-model")
    }

    /// Waits until `tenant`'s cache holds `n` answers (fills happen after the response).
    async fn filled(&self, tenant: &str, n: u64) {
        filled(&self.gw, tenant, n).await;
    }
}

/// Waits until `tenant`'s cache in `gw` holds `n` answers.
async fn filled(gw: &Gateway, tenant: &str, n: u64) {
    let store = gw.app.policy.backends().cache.clone();
    eventually(&format!("{tenant}'s cache holds {n}"), || {
        let store = store.clone();
        async move {
            store
                .entry_counts()
                .iter()
                .any(|(t, count, _)| t.as_ref() == tenant && *count == n)
        }
    })
    .await;
}

fn cache_header(r: &Reply) -> &str {
    r.headers
        .get("x-fuke-cache")
        .map_or("(none)", |v| v.to_str().unwrap())
}

fn content(r: &Reply) -> String {
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {}", r.text()))
        .to_string()
}

/// The content of an SSE reply, its chunks' JSON, and whether it ended with `[DONE]`.
fn sse(r: &Reply) -> (String, Vec<Value>, bool) {
    let text = r.text();
    let mut chunks = Vec::new();
    let mut done = false;
    for ev in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = ev.strip_prefix("data: ").expect("data event");
        if data == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str::<Value>(data).unwrap());
        }
    }
    let content = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    (content, chunks, done)
}

#[tokio::test]
async fn exact_hit_replays_the_answer_with_a_fresh_id_and_meters_a_hit() {
    let env = start().await;
    let body = chat("Where is my parcel?");
    let first = env.ask(KEY_ACME, &body).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(cache_header(&first), "miss");
    assert_eq!(env.gw.usage_of(&first).await.cache, CacheUse::Miss);
    env.filled("acme", 1).await;

    // The same question, written differently: still the exact level.
    let second = env
        .ask(
            KEY_ACME,
            &chat("  where is my PARCEL  ").replace("\"model\"", "\"user\":\"u-7\",\"model\""),
        )
        .await;
    assert_eq!(cache_header(&second), "hit");
    assert_eq!(second.headers["x-fuke-cache-similarity"], "1.0000");
    assert!(second.headers.contains_key("x-fuke-overhead-ms"));
    assert_eq!(env.calls(), 1, "the hit must not reach the upstream");
    let (a, b) = (first.json(), second.json());
    assert_eq!(content(&second), "echo: Where is my parcel?");
    assert_ne!(a["id"], b["id"], "a replay gets a fresh id");
    assert!(b["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(b["object"], "chat.completion");
    assert_eq!(b["choices"][0]["finish_reason"], "stop");
    assert_eq!(b["usage"], a["usage"]);

    // Greetings and thanks around it do not change the question.
    let polite = env
        .ask(KEY_ACME, &chat("Hi! Where is my parcel? Thanks"))
        .await;
    assert_eq!(cache_header(&polite), "hit");
    assert_eq!(polite.headers["x-fuke-cache-similarity"], "1.0000");

    let ev = env.gw.usage_of(&second).await;
    assert_eq!(&*ev.backend, "cache");
    assert_eq!(ev.usage.unwrap().total_tokens, 0, "no model ran");
    match ev.cache {
        CacheUse::Hit {
            exact: true,
            saved: Some(saved),
            ..
        } => assert_eq!(
            saved.total_tokens,
            a["usage"]["total_tokens"].as_u64().unwrap()
        ),
        other => panic!("expected an exact hit, got {other:?}"),
    }
    let metrics = get(&env.client, &env.gw.url("/metrics"), None).await.text();
    assert!(
        metrics.contains(
            r#"fuke_cache_requests_total{tenant="acme",model="gpt",result="hit_exact"} 2"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"fuke_cache_entries{tenant="acme"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn paraphrase_hits_and_near_miss_misses() {
    let env = start().await;
    let r = env
        .ask(KEY_ACME, &chat("How do I reset my password?"))
        .await;
    assert_eq!(cache_header(&r), "miss");
    env.filled("acme", 1).await;

    let para = env
        .ask(KEY_ACME, &chat("how can I reset my password"))
        .await;
    assert_eq!(cache_header(&para), "hit", "{}", para.text());
    let sim: f32 = para.headers["x-fuke-cache-similarity"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (fuke::cache::DEFAULT_THRESHOLD..1.0).contains(&sim),
        "{sim}"
    );
    // The cached question's answer.
    assert_eq!(content(&para), "echo: How do I reset my password?");
    assert!(matches!(
        env.gw.usage_of(&para).await.cache,
        CacheUse::Hit { exact: false, .. }
    ));
    assert_eq!(env.calls(), 1);

    // Same words, another intent: answered by the model.
    for near in [
        "How do I reset my router?",
        "Why can't I reset my password?",
        "How do I change my password?",
    ] {
        let r = env.ask(KEY_ACME, &chat(near)).await;
        assert_eq!(cache_header(&r), "miss", "{near} was served from the cache");
        assert_eq!(content(&r), format!("echo: {near}"));
    }
    assert_eq!(env.calls(), 4);
}

#[tokio::test]
async fn tenants_never_share_an_entry() {
    let env = start().await;
    let body = chat("What is your refund policy?");
    let a = env.ask(KEY_ACME, &body).await;
    env.filled("acme", 1).await;
    let b = env.ask(KEY_GLOBEX, &body).await;
    assert_eq!(cache_header(&a), "miss");
    assert_eq!(
        cache_header(&b),
        "miss",
        "globex must not see acme's answer"
    );
    assert_eq!(env.calls(), 2);
    env.filled("globex", 1).await;
    assert_eq!(cache_header(&env.ask(KEY_GLOBEX, &body).await), "hit");
    assert_eq!(env.calls(), 2);
    // A tenant without a cache block has no cache at all.
    let p = env.ask(KEY_PLAIN, &body).await;
    assert_eq!(cache_header(&p), "(none)");
    assert_eq!(env.calls(), 3);
}

#[tokio::test]
async fn another_system_prompt_or_parameter_misses() {
    let env = start().await;
    env.ask(KEY_ACME, &chat("Do you ship to Canada?")).await;
    env.filled("acme", 1).await;
    let other_system = json!({"model": "gpt", "messages": [
        {"role": "system", "content": "You are the support bot of a bank."},
        {"role": "user", "content": "Do you ship to Canada?"}]})
    .to_string();
    assert_eq!(
        cache_header(&env.ask(KEY_ACME, &other_system).await),
        "miss"
    );
    let other_param =
        chat("Do you ship to Canada?").replace("\"model\"", "\"top_p\":0.5,\"model\"");
    assert_eq!(cache_header(&env.ask(KEY_ACME, &other_param).await), "miss");
    let history = json!({"model": "gpt", "messages": [
        {"role": "system", "content": "You are the support bot of an online shop."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Do you ship to Canada?"}]})
    .to_string();
    assert_eq!(cache_header(&env.ask(KEY_ACME, &history).await), "miss");
    assert_eq!(env.calls(), 4);
}

#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let env = start().await;
    let body = chat("What are your opening hours?");
    env.ask(KEY_SHORT, &body).await;
    env.filled("short", 1).await;
    assert_eq!(cache_header(&env.ask(KEY_SHORT, &body).await), "hit");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(cache_header(&env.ask(KEY_SHORT, &body).await), "miss");
    assert_eq!(env.calls(), 2);
    // The expired entry's vector left the index with it.
    env.filled("short", 1).await;
    assert_eq!(env.gw.app.policy.backends().cache.vector_count("short"), 1);
}

#[tokio::test]
async fn no_store_and_no_cache() {
    let env = start().await;
    let body = chat("Can I change my delivery address?");
    let r = env
        .ask_with(KEY_ACME, &body, &[("cache-control", "no-store")])
        .await;
    assert_eq!(cache_header(&r), "bypass");
    assert_eq!(
        env.gw.usage_of(&r).await.cache,
        CacheUse::Bypass("no-store")
    );
    // no-store stored nothing: the next request is a miss.
    assert_eq!(cache_header(&env.ask(KEY_ACME, &body).await), "miss");
    env.filled("acme", 1).await;
    assert_eq!(env.calls(), 2);

    // no-cache: the model answers although the cache has it…
    let r = env
        .ask_with(KEY_ACME, &body, &[("cache-control", "no-cache")])
        .await;
    assert_eq!(cache_header(&r), "miss");
    assert_eq!(env.calls(), 3);
    // …and no-store on a cached question still goes to the model.
    let r = env
        .ask_with(KEY_ACME, &body, &[("cache-control", "no-store")])
        .await;
    assert_eq!(cache_header(&r), "bypass");
    assert_eq!(env.calls(), 4);
    assert_eq!(cache_header(&env.ask(KEY_ACME, &body).await), "hit");
    assert_eq!(env.calls(), 4);

    // no-cache may fill: a new question asked with no-cache is a hit afterwards.
    let fresh = chat("Do you sell gift cards?");
    env.ask_with(KEY_ACME, &fresh, &[("cache-control", "no-cache")])
        .await;
    env.filled("acme", 2).await;
    assert_eq!(cache_header(&env.ask(KEY_ACME, &fresh).await), "hit");
    assert_eq!(env.calls(), 5);
}

#[tokio::test]
async fn streamed_fill_serves_json_and_json_fill_serves_a_stream() {
    let env = start().await;
    let stream = |q: &str, usage: bool| {
        let mut v: Value = serde_json::from_str(&chat(q)).unwrap();
        v["stream"] = json!(true);
        if usage {
            v["stream_options"] = json!({"include_usage": true});
        }
        v.to_string()
    };

    // Streamed miss, then a JSON hit.
    let s = env
        .ask(KEY_ACME, &stream("Is there a warranty on laptops?", false))
        .await;
    assert_eq!(cache_header(&s), "miss");
    let (streamed, _, done) = sse(&s);
    assert!(done);
    env.filled("acme", 1).await;
    let j = env
        .ask(KEY_ACME, &chat("Is there a warranty on laptops?"))
        .await;
    assert_eq!(cache_header(&j), "hit");
    assert_eq!(content(&j), streamed);
    assert_eq!(j.json()["usage"]["completion_tokens"], 7);

    // JSON miss, then streamed hits, with and without the usage chunk.
    let j = env.ask(KEY_ACME, &chat("Can I pay by invoice?")).await;
    env.filled("acme", 2).await;
    for usage in [false, true] {
        let s = env
            .ask(KEY_ACME, &stream("Can I pay by invoice?", usage))
            .await;
        assert_eq!(cache_header(&s), "hit");
        assert_eq!(s.headers["content-type"], "text/event-stream");
        let (text, chunks, done) = sse(&s);
        assert!(done, "ends with [DONE]");
        assert_eq!(text, content(&j));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        let usage_chunks: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
        if usage {
            assert_eq!(usage_chunks.len(), 1);
            assert_eq!(usage_chunks[0]["usage"], j.json()["usage"]);
        } else {
            assert!(usage_chunks.is_empty());
            assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        }
        assert!(
            chunks
                .iter()
                .any(|c| c["choices"][0]["finish_reason"] == "stop")
        );
    }
    assert_eq!(env.calls(), 2);
}

#[tokio::test]
async fn errors_truncated_answers_and_bypassed_requests_are_never_cached() {
    let env = start().await;
    let broken =
        json!({"model": "broken", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    for _ in 0..2 {
        let r = env.ask(KEY_ACME, &broken).await;
        assert_eq!(r.status, 500);
        assert_eq!(cache_header(&r), "miss");
    }
    assert_eq!(env.up.count("fail-500"), 2);

    // Cut short by max_tokens: finish_reason "length" is not a complete answer.
    let truncated = chat("Tell me everything about your return policy please")
        .replace("\"model\"", "\"max_tokens\":3,\"model\"");
    for _ in 0..2 {
        let r = env.ask(KEY_ACME, &truncated).await;
        assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
        assert_eq!(cache_header(&r), "miss");
    }

    // Tools, n > 1: bypassed every time.
    for extra in [
        r#""tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"#,
        r#""n":2,"#,
    ] {
        let body = chat("What is the status of my order?")
            .replace("\"model\"", &format!("{extra}\"model\""));
        for _ in 0..2 {
            let r = env.ask(KEY_ACME, &body).await;
            assert_eq!(cache_header(&r), "bypass", "{body}");
        }
    }
    // Sampled requests without the tenant's opt-in; temperature 0 is cached.
    let sampled = chat("Do you have a store in Berlin?");
    assert_eq!(cache_header(&env.ask(KEY_STRICT, &sampled).await), "bypass");
    let greedy = sampled.replace("\"model\"", "\"temperature\":0,\"model\"");
    assert_eq!(cache_header(&env.ask(KEY_STRICT, &greedy).await), "miss");
    env.filled("strict", 1).await;
    assert_eq!(cache_header(&env.ask(KEY_STRICT, &greedy).await), "hit");

    // 2 truncated + 4 bypassed + 2 for the strict tenant; nothing stored for acme.
    assert_eq!(env.calls(), 8);
    let counts = env.gw.app.policy.backends().cache.entry_counts();
    assert!(
        counts
            .iter()
            .all(|(t, n, _)| t.as_ref() != "acme" || *n == 0),
        "{counts:?}"
    );
}

#[tokio::test]
async fn a_reload_that_turns_a_cache_off_frees_it_at_once() {
    let env = start().await;
    let body = chat("Where do I find my invoices?");
    env.ask(KEY_ACME, &body).await;
    env.ask(KEY_GLOBEX, &body).await;
    env.filled("acme", 1).await;
    env.filled("globex", 1).await;
    // acme's cache block goes; globex keeps its cache and its entry.
    let policy = policy(&env.up.base_url()).replacen("    cache: { sampled: true }\n", "", 1);
    std::fs::write(env.gw.policy_dir.join("main.yaml"), policy).unwrap();
    env.gw.app.reload_policy();
    let counts = env.gw.app.policy.backends().cache.entry_counts();
    assert_eq!(
        counts
            .iter()
            .map(|(t, n, _)| (t.to_string(), *n))
            .collect::<Vec<_>>(),
        vec![("globex".to_string(), 1)]
    );
    assert_eq!(cache_header(&env.ask(KEY_ACME, &body).await), "(none)");
    assert_eq!(cache_header(&env.ask(KEY_GLOBEX, &body).await), "hit");
}

#[tokio::test]
async fn a_semantic_cache_needs_an_embedder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "tenants:\n  t:\n    cache:\n      semantic: true\n      threshold: 1.5\n",
    )
    .unwrap();
    let err = fuke::policy::load_dir(dir.path(), 1, &fuke::backends::Registry::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("p.yaml:4: tenants.t.cache.semantic: the semantic level needs `embedder:`"),
        "{err}"
    );
    assert!(
        err.contains("p.yaml:5: tenants.t.cache.threshold: must be above 0 and at most 1"),
        "{err}"
    );
}

async fn with_l2(up: &Upstream, prefix: &str, url: &str) -> Gateway {
    Gateway::start_with(
        &policy(&up.base_url()),
        Options {
            local: MODELS.clone(),
            embedder: Some("minilm".into()),
            cache_l2: Some(fuke::cache::L2Config {
                url: url.into(),
                prefix: prefix.into(),
            }),
            ..Options::default()
        },
    )
    .await
}

async fn redis_keys(prefix: &str) -> Vec<String> {
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379");
    redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap()
}

/// Two replicas sharing the machine's Redis: an answer one stored is an exact hit on the other.
#[tokio::test]
async fn replicas_share_exact_answers_through_redis() {
    let prefix = format!("fuke-test-{}:", hex::encode(rand::random::<[u8; 6]>()));
    let up = Upstream::start().await;
    let a = with_l2(&up, &prefix, "redis://127.0.0.1:6379").await;
    let b = with_l2(&up, &prefix, "redis://127.0.0.1:6379").await;
    for gw in [&a, &b] {
        let store = gw.app.policy.backends().cache.clone();
        eventually("Redis connected", || {
            let store = store.clone();
            async move { store.l2_connected() }
        })
        .await;
    }
    let client = client();
    let body = chat("Which payment methods do you accept?");
    let url = |gw: &Gateway| gw.url("/v1/chat/completions");
    let first = post(&client, &url(&a), KEY_ACME, &body).await;
    assert_eq!(cache_header(&first), "miss");
    let p = prefix.clone();
    eventually("the answer reached Redis", || {
        let p = p.clone();
        async move { redis_keys(&p).await.len() == 1 }
    })
    .await;
    let key = &redis_keys(&prefix).await[0];
    assert!(key.starts_with(&format!("{prefix}acme:")), "{key}");

    let second = post(&client, &url(&b), KEY_ACME, &body).await;
    assert_eq!(
        cache_header(&second),
        "hit",
        "replica b did not see a's answer"
    );
    assert_eq!(content(&second), content(&first));
    assert_eq!(up.count("echo-model"), 1);
    assert!(matches!(
        b.usage_of(&second).await.cache,
        CacheUse::Hit { exact: true, .. }
    ));
    // Tenants stay apart in Redis too.
    let other = post(&client, &url(&b), KEY_GLOBEX, &body).await;
    assert_eq!(cache_header(&other), "miss");
    assert_eq!(up.count("echo-model"), 2);

    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    for k in redis_keys(&prefix).await {
        let _: () = redis::cmd("DEL").arg(k).query_async(&mut c).await.unwrap();
    }
}

#[tokio::test]
async fn an_unreachable_redis_makes_misses_not_errors() {
    let up = Upstream::start().await;
    // Nothing listens on port 1.
    let gw = with_l2(&up, "fuke-test-down:", "redis://127.0.0.1:1").await;
    let client = client();
    let body = chat("Do you price match?");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = post(&client, &gw.url("/v1/chat/completions"), KEY_ACME, &body).await;
        assert_eq!(r.status, 200);
        seen.push(cache_header(&r).to_string());
        filled(&gw, "acme", 1).await;
    }
    // The local level still works.
    assert_eq!(seen, ["miss", "hit"]);
    assert_eq!(up.count("echo-model"), 1);
}
