//! The knowledge base with the real embedder (all-MiniLM-L6-v2 through llama.cpp), real files
//! in a temporary directory, and the real test upstream recording what reaches it.

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use fuke::backends::local::LocalModels;
use fuke::kb::chunk::Budget;
use fuke::kb::{KbConfig, KnowledgeBase};
use serde_json::{Value, json};
use support::*;

static MODELS: LazyLock<LocalModels> =
    LazyLock::new(|| embedding_model("minilm", "all-MiniLM-L6-v2.gguf", "", ""));

/// multilingual-e5-small (scripts/models.sh), with the prefixes E5 was trained with.
static E5: LazyLock<LocalModels> = LazyLock::new(|| {
    embedding_model(
        "e5",
        "multilingual-e5-small.Q4_0.gguf",
        "query: ",
        "passage: ",
    )
});

const ORDERS: &str = "# Orders\n\n## Cancelling an order\nYou can cancel an order within 2 hours of placing it from the Orders page. After it ships, return it instead.\n\n## Order status\nThe Orders page shows each order as processing, shipped or delivered.\n";
const REFUNDS: &str = "# Refunds\n\n## Refund timing\nRefunds reach credit cards within 5 to 7 business days after we receive the return.\n\n## Damaged items\nSend a photo of the damage within 48 hours and we replace the item for free.\n";
const INTERNAL: &str = "# Internal\n\n## Staff discount code\nEmployees use the code STAFF-7788 for forty percent off refunds processing fees.\n";

struct Fixture {
    qdrant_prefix: String,
    _dir: tempfile::TempDir,
    kb_dir: PathBuf,
    data_dir: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let kb_dir = dir.path().join("kb");
        write(&kb_dir.join("faq/orders.md"), ORDERS);
        write(&kb_dir.join("faq/refunds.md"), REFUNDS);
        write(&kb_dir.join("internal/staff.md"), INTERNAL);
        Fixture {
            qdrant_prefix: format!("fuke_test_{}_", rand::random::<u32>()),
            kb_dir,
            data_dir: dir.path().join("data"),
            _dir: dir,
        }
    }

    fn config(&self) -> KbConfig {
        KbConfig {
            dir: self.kb_dir.clone(),
            data_dir: self.data_dir.clone(),
            budget: Budget::default(),
            // MiniLM's weights (BENCHMARKS.md, "Knowledge base").
            keyword_weight: 0.3,
            keyword_weight_cjk: 0.7,
            embedder: "minilm".into(),
            watch: true,
            // With QDRANT_URL set (a real Qdrant's gRPC URL), every test of the fixture runs
            // with the vectors in Qdrant, each in collections of its own.
            qdrant_url: std::env::var("QDRANT_URL").ok(),
            qdrant_api_key_env: None,
            qdrant_prefix: self.qdrant_prefix.clone(),
        }
    }

    async fn open(&self) -> Arc<KnowledgeBase> {
        KnowledgeBase::open(self.config(), MODELS.embedder("minilm").unwrap())
            .await
            .unwrap()
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn names(list: &[&str]) -> Vec<Arc<str>> {
    list.iter().map(|s| Arc::from(*s)).collect()
}

async fn top(kb: &KnowledgeBase, collections: &[&str], q: &str) -> Vec<String> {
    kb.search(&names(collections), q, 3, 0.3)
        .await
        .unwrap()
        .iter()
        .map(|h| h.id())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_reindex_embeds_only_what_changed_and_forgets_deleted_files() {
    let f = Fixture::new();
    let kb = f.open().await;
    let s = kb.index("faq", &|_| {}).await.unwrap();
    assert_eq!(
        (s.files_added, s.chunks, s.embedded, s.reused),
        (2, 4, 4, 0)
    );
    assert_eq!(
        top(&kb, &["faq"], "how long until my money is back on my card").await[0],
        "faq/refunds.md#0"
    );

    // Nothing changed: nothing embedded, same generation.
    let again = kb.index("faq", &|_| {}).await.unwrap();
    assert_eq!((again.embedded, again.reused), (0, 4));
    assert_eq!(again.generation, s.generation);

    // One section of one file edited: exactly that chunk is embedded again.
    write(
        &f.kb_dir.join("faq/refunds.md"),
        &REFUNDS.replace("5 to 7 business days", "3 business days"),
    );
    let edited = kb.index("faq", &|_| {}).await.unwrap();
    assert_eq!(
        (
            edited.files_changed,
            edited.files_unchanged,
            edited.embedded,
            edited.reused
        ),
        (1, 1, 1, 3)
    );
    assert_ne!(edited.generation, s.generation);
    let hits = kb
        .search(&names(&["faq"]), "refund to credit card timing", 1, 0.0)
        .await
        .unwrap();
    assert!(hits[0].chunk.text.contains("3 business days"));

    // A deleted file disappears from the index.
    std::fs::remove_file(f.kb_dir.join("faq/orders.md")).unwrap();
    let deleted = kb.index("faq", &|_| {}).await.unwrap();
    assert_eq!(
        (deleted.files_removed, deleted.chunks, deleted.embedded),
        (1, 2, 0)
    );
    let hits = kb
        .search(&names(&["faq"]), "cancel my order", 5, 0.0)
        .await
        .unwrap();
    assert!(
        hits.iter().all(|h| h.chunk.source != "orders.md"),
        "{hits:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_the_stored_index_without_embedding() {
    let f = Fixture::new();
    let first = f.open().await;
    let all = first.index_all(&|_, _| {}).await;
    assert_eq!(all.iter().map(|s| s.embedded).sum::<usize>(), 5);
    let gen_before = first.generation("faq").unwrap().id;
    drop(first);

    let second = f.open().await;
    // Served straight from disk, before any index run.
    let g = second.generation("faq").unwrap();
    assert_eq!((g.id, g.chunks.len()), (gen_before, 4));
    assert_eq!(
        top(&second, &["faq"], "my parcel arrived broken").await[0],
        "faq/refunds.md#1"
    );
    let sync = second.index_all(&|_, _| {}).await;
    assert_eq!(sync.iter().map(|s| s.embedded).sum::<usize>(), 0);
    assert_eq!(
        second
            .counters
            .embedded
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // A damaged index file is not trusted: the collection is rebuilt from the documents.
    drop(second);
    std::fs::write(f.data_dir.join("kb/faq.json"), b"{ not json").unwrap();
    let third = f.open().await;
    assert_eq!(third.generation("faq").unwrap().chunks.len(), 0);
    let rebuilt = third.index("faq", &|_| {}).await.unwrap();
    assert_eq!((rebuilt.embedded, rebuilt.generation), (4, gen_before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_see_one_whole_generation_while_an_index_run_builds_the_next() {
    let f = Fixture::new();
    let kb = f.open().await;
    kb.index("faq", &|_| {}).await.unwrap();
    let old = kb.generation("faq").unwrap();
    // Twenty new sections: the run embeds for a while.
    let mut big = String::from("# Catalogue\n");
    for i in 0..20 {
        big.push_str(&format!(
            "\n## Product {i}\nThe model {i} kettle boils water in {i} minutes.\n"
        ));
    }
    write(&f.kb_dir.join("faq/catalogue.md"), &big);
    let runner = {
        let kb = kb.clone();
        tokio::spawn(async move { kb.index("faq", &|_| {}).await.unwrap() })
    };
    let mut seen_old = 0;
    while !runner.is_finished() {
        let g = kb.generation("faq").unwrap();
        if g.id == old.id {
            assert_eq!(g.chunks.len(), old.chunks.len());
            seen_old += 1;
        } else {
            assert_eq!(g.chunks.len(), old.chunks.len() + 20);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let s = runner.await.unwrap();
    assert_eq!(s.embedded, 20);
    assert!(seen_old > 0, "the old generation served during the run");
    assert_eq!(kb.generation("faq").unwrap().id, s.generation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_reindexes_a_changed_collection_while_serving() {
    let f = Fixture::new();
    let kb = f.open().await;
    kb.index_all(&|_, _| {}).await;
    let _watch = kb.watch().unwrap();
    write(
        &f.kb_dir.join("faq/gift-cards.md"),
        "# Gift cards\n\n## Gift card expiry\nGift cards never expire and can be combined with coupons.\n",
    );
    eventually("the new file is searchable", || {
        let kb = kb.clone();
        async move {
            top(&kb, &["faq"], "do gift cards expire")
                .await
                .first()
                .is_some_and(|id| id == "faq/gift-cards.md#0")
        }
    })
    .await;
}

fn policy(base_url: &str, extra: &str) -> String {
    format!(
        r#"upstreams:
  test:
    base_url: {base_url}
models:
  gpt: {{ upstream: test, model: echo-model }}
tenants:
  acme:
    models: [gpt]
    kb: {{ collections: [faq], top_k: 2, min_score: 0.3 }}
    cache: {{ sampled: true }}
    keys:
      - {{ id: acme-key, sha256: {acme} }}
  globex:
    models: [gpt]
    keys:
      - {{ id: globex-key, sha256: {globex} }}
{extra}"#,
        acme = hash(KEY_ACME),
        globex = hash(KEY_GLOBEX),
    )
}

async fn gateway(kb: &Arc<KnowledgeBase>, upstream: &Upstream) -> Gateway {
    Gateway::start_with(
        &policy(&upstream.base_url(), ""),
        Options {
            local: MODELS.clone(),
            embedder: Some("minilm".into()),
            kb: Some(kb.clone()),
            ..Options::default()
        },
    )
    .await
}

fn chat(q: &str) -> String {
    json!({"model": "gpt", "temperature": 0,
           "messages": [{"role": "system", "content": "You are Fuke Shop's assistant."},
                        {"role": "user", "content": q}]})
    .to_string()
}

fn sent_messages(upstream: &Upstream) -> Vec<Value> {
    let body: Value = serde_json::from_slice(&upstream.last_received().body).unwrap();
    body["messages"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injected_context_reaches_the_upstream_with_its_sources() {
    let f = Fixture::new();
    let kb = f.open().await;
    kb.index_all(&|_, _| {}).await;
    let upstream = Upstream::start().await;
    let gw = gateway(&kb, &upstream).await;
    let c = client();

    let reply = post(
        &c,
        &gw.url("/v1/chat/completions"),
        KEY_ACME,
        &chat("my package came smashed, what now?"),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let sources = reply.headers["x-fuke-kb-sources"].to_str().unwrap();
    assert!(sources.starts_with("faq/refunds.md#1"), "{sources}");
    let messages = sent_messages(&upstream);
    // The tenant's system prompt stays first; the excerpts follow it; the question is last.
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert_eq!(messages[0]["content"], "You are Fuke Shop's assistant.");
    assert_eq!(messages[1]["role"], "system");
    let context = messages[1]["content"].as_str().unwrap();
    assert!(
        context.contains("[1] faq/refunds.md (Refunds > Damaged items)"),
        "{context}"
    );
    assert!(context.contains("Send a photo of the damage within 48 hours"));
    assert!(context.contains("say that you do not know"));
    assert_eq!(messages[2]["content"], "my package came smashed, what now?");
    let n = sources.split(", ").count();
    assert_eq!(gw.usage_of(&reply).await.kb_chunks as usize, n);

    // A question the documents do not cover gets no context at all.
    let reply = post(
        &c,
        &gw.url("/v1/chat/completions"),
        KEY_ACME,
        &chat("what is the capital of mongolia"),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert!(reply.headers.get("x-fuke-kb-sources").is_none());
    assert_eq!(sent_messages(&upstream).len(), 2);
    assert_eq!(gw.usage_of(&reply).await.kb_chunks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_never_retrieves_a_collection_it_is_not_granted() {
    let f = Fixture::new();
    let kb = f.open().await;
    kb.index_all(&|_, _| {}).await;
    let upstream = Upstream::start().await;
    let gw = gateway(&kb, &upstream).await;
    let c = client();
    let q = "what is the staff discount code for employees";

    // globex has no knowledge base: the request goes upstream untouched.
    let body = chat(q);
    let reply = post(&c, &gw.url("/v1/chat/completions"), KEY_GLOBEX, &body).await;
    assert_eq!(reply.status, 200);
    assert!(reply.headers.get("x-fuke-kb-sources").is_none());
    let raw = upstream.last_received().body;
    assert_eq!(
        serde_json::from_slice::<Value>(&raw).unwrap()["messages"],
        serde_json::from_str::<Value>(&body).unwrap()["messages"]
    );

    // acme reads `faq` only: the internal document never reaches its requests.
    let reply = post(&c, &gw.url("/v1/chat/completions"), KEY_ACME, &chat(q)).await;
    assert_eq!(reply.status, 200);
    let sources = reply
        .headers
        .get("x-fuke-kb-sources")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    assert!(!sources.contains("internal/"), "{sources}");
    let sent = String::from_utf8_lossy(&upstream.last_received().body).into_owned();
    assert!(!sent.contains("STAFF-7788"), "{sent}");
    // While the same search over `internal` finds it: the grant is what keeps it out.
    assert_eq!(top(&kb, &["internal"], q).await[0], "internal/staff.md#0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_are_scoped_to_the_knowledge_base_generation() {
    let f = Fixture::new();
    let kb = f.open().await;
    kb.index_all(&|_, _| {}).await;
    let upstream = Upstream::start().await;
    let gw = gateway(&kb, &upstream).await;
    let c = client();
    let body = chat("how long do refunds take to reach my card");
    let url = gw.url("/v1/chat/completions");

    let first = post(&c, &url, KEY_ACME, &body).await;
    assert_eq!(first.headers["x-fuke-cache"], "miss");
    eventually("the answer is stored", || {
        let (c, url, body) = (c.clone(), url.clone(), body.clone());
        async move { post(&c, &url, KEY_ACME, &body).await.headers["x-fuke-cache"] == "hit" }
    })
    .await;
    // (A repeat that came before the answer was stored also went upstream.)
    let before = upstream.count("echo-model");
    let hit = post(&c, &url, KEY_ACME, &body).await;
    assert_eq!(hit.headers["x-fuke-cache"], "hit");
    assert_eq!(upstream.count("echo-model"), before);

    // The documents change: answers given from the old generation are not served again.
    write(
        &f.kb_dir.join("faq/refunds.md"),
        &REFUNDS.replace("5 to 7 business days", "10 business days"),
    );
    kb.index("faq", &|_| {}).await.unwrap();
    let after = post(&c, &url, KEY_ACME, &body).await;
    assert_eq!(after.headers["x-fuke-cache"], "miss");
    assert_eq!(upstream.count("echo-model"), before + 1);
    let context = sent_messages(&upstream)[1]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(context.contains("10 business days"), "{context}");
}

#[test]
fn policy_checks_collections_and_settings() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"upstreams:
  test: { base_url: "http://127.0.0.1:9/v1" }
models:
  gpt: { upstream: test }
tenants:
  acme:
    models: [gpt]
    kb:
      collections: [faq, nosuch]
      top_k: 0
      min_score: 1.5
      template: "{% for e in excerpts %}"
"#;
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let registry = fuke::backends::Registry {
        kb_collections: Some(vec!["faq".into()]),
        ..Default::default()
    };
    let problems = fuke::policy::load_dir(dir.path(), 0, &registry)
        .unwrap_err()
        .to_string();
    for want in [
        "p.yaml:9: tenants.acme.kb.collections[1]: no collection `nosuch`",
        "p.yaml:10: tenants.acme.kb.top_k: must be between 1 and 20",
        "p.yaml:11: tenants.acme.kb.min_score: must be between 0 and 1",
        "p.yaml:12: tenants.acme.kb.template: template does not compile",
    ] {
        assert!(problems.contains(want), "missing {want:?} in:\n{problems}");
    }
    // Without `kb:` in fuke.yaml, a tenant's kb block is an error too.
    let problems = fuke::policy::load_dir(dir.path(), 0, &fuke::backends::Registry::default())
        .unwrap_err()
        .to_string();
    assert!(
        problems.contains("needs `kb:` and `embedder:` in fuke.yaml"),
        "{problems}"
    );
}

#[test]
fn the_cli_indexes_searches_and_reports() {
    let f = Fixture::new();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = f.kb_dir.parent().unwrap().join("fuke.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners: [{{ addr: \"127.0.0.1:0\", plaintext: true }}]\npolicies: {}\nlocal_models:\n  minilm: {{ path: {}, kind: embedding, threads: 1 }}\nembedder: minilm\ndata_dir: data\nkb: {{ dir: kb }}\n",
            root.join("policies").display(),
            root.join("models/all-MiniLM-L6-v2.gguf").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fuke"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = run(&["kb", "index"]);
    assert!(
        out.contains(
            "faq: 2 files added, 0 changed, 0 removed, 0 unchanged; 4 chunks (4 embedded, 0 reused)"
        ),
        "{out}"
    );
    assert!(out.contains("internal: 1 files added"), "{out}");
    let out = run(&["kb", "index", "faq"]);
    assert!(out.contains("4 chunks (0 embedded, 4 reused)"), "{out}");
    let out = run(&[
        "kb",
        "search",
        "parcel arrived broken",
        "--collection",
        "faq",
    ]);
    let first = out.lines().next().unwrap();
    assert!(
        first.starts_with("1. ") && first.contains("faq/refunds.md#1"),
        "{out}"
    );
    assert!(out.contains("Send a photo of the damage"), "{out}");
    let out = run(&["kb", "stats"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("faq") && l.contains(" 2 ") && l.contains(" 4 ")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_multilingual_embedder_finds_chinese_paraphrases_without_shared_words() {
    let dir = tempfile::tempdir().unwrap();
    let kb_dir = dir.path().join("kb");
    write(
        &kb_dir.join("zh/账户.md"),
        "# 账户帮助\n\n## 注销账户\n在“账户设置”里选择“注销”，确认后三十天内所有数据会被永久清除。\n\n## 找回密码\n在登录页点“忘记密码”，用短信验证码设置新密码。\n\n## 申请发票\n订单完成后可在订单详情页开具电子发票。\n",
    );
    let cfg = KbConfig {
        dir: kb_dir,
        data_dir: dir.path().join("data"),
        budget: Budget::default(),
        // Vectors only: the keyword signal cannot help here, no words are shared.
        keyword_weight: 0.0,
        keyword_weight_cjk: 0.0,
        embedder: "e5".into(),
        watch: false,
        qdrant_url: None,
        qdrant_api_key_env: None,
        qdrant_prefix: String::new(),
    };
    let kb = KnowledgeBase::open(cfg, E5.embedder("e5").unwrap())
        .await
        .unwrap();
    let s = kb.index("zh", &|_| {}).await.unwrap();
    assert_eq!(s.embedded, 3);
    for (q, want) in [
        ("我要把账号彻底删掉", "注销账户"),
        ("登录时想不起来口令了", "找回密码"),
        ("买完东西怎么要报销凭证", "申请发票"),
    ] {
        let hits = kb.search(&names(&["zh"]), q, 1, 0.0).await.unwrap();
        assert_eq!(hits[0].chunk.headings.last().unwrap(), want, "{q}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_qdrant_leaves_the_local_copy_answering() {
    let f = Fixture::new();
    let mut cfg = f.config();
    // Nothing listens on the discard port: every Qdrant call fails.
    cfg.qdrant_url = Some("http://127.0.0.1:9".into());
    let kb = KnowledgeBase::open(cfg, MODELS.embedder("minilm").unwrap())
        .await
        .unwrap();
    let s = kb.index("faq", &|_| {}).await.unwrap();
    assert_eq!((s.chunks, s.embedded), (4, 4));
    assert_eq!(kb.generation("faq").unwrap().id, s.generation);
    assert_eq!(
        top(&kb, &["faq"], "my parcel arrived broken").await[0],
        "faq/refunds.md#1"
    );
}
