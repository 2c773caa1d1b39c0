//! Test harness: the gateway in-process on 127.0.0.1:0 with a real policy directory, a real
//! upstream (`upstream.rs`), and a sink that keeps usage events for assertions.
#![allow(dead_code, unused_imports)]

pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fuke::app::{App, Settings};
use fuke::backends::BoxFuture;
use fuke::backends::Registry;
use fuke::backends::local::LocalModels;
use fuke::metering::{UsageEvent, UsageSink};
use fuke::policy::PolicyStore;
use fuke::server::{self, Transport};
use fuke::telemetry::Metrics;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

pub use upstream::Upstream;

/// Keeps every usage event; the assertion side of metering.
#[derive(Default)]
pub struct CollectingSink {
    pub events: Mutex<Vec<UsageEvent>>,
    pub notify: Notify,
}

impl UsageSink for CollectingSink {
    fn record(&self, event: UsageEvent) -> BoxFuture<'static, ()> {
        self.events.lock().unwrap().push(event);
        self.notify.notify_waiters();
        Box::pin(async {})
    }
}

impl CollectingSink {
    pub async fn wait_for(&self, request_id: &str) -> UsageEvent {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.notify.notified();
            if let Some(e) = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|e| &*e.request_id == request_id)
            {
                return e.clone();
            }
            tokio::time::timeout_at(deadline, notified)
                .await
                .expect("usage event never recorded");
        }
    }
}

/// A local embedding model from `models/` (scripts/models.sh), on one thread, with the prefixes
/// it was trained with (E5: "query: ", "passage: ").
pub fn embedding_model(
    name: &str,
    file: &str,
    query_prefix: &str,
    document_prefix: &str,
) -> LocalModels {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    assert!(
        path.is_file(),
        "{} missing: run scripts/models.sh",
        path.display()
    );
    LocalModels::load(&[fuke::backends::local::LocalModelConfig {
        threads: 1,
        query_prefix: query_prefix.into(),
        document_prefix: document_prefix.into(),
        ..fuke::backends::local::LocalModelConfig::defaults(
            name,
            path,
            fuke::backends::local::LocalKind::Embedding,
        )
    }])
}

/// SmolLM2-135M (scripts/models.sh) as local chat model `smol`, on one thread.
pub fn smollm2(parallel: u32, queue: u32) -> LocalModels {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} missing: run scripts/models.sh",
        path.display()
    );
    LocalModels::load(&[fuke::backends::local::LocalModelConfig {
        context: 1024,
        parallel,
        queue,
        threads: 1,
        ..fuke::backends::local::LocalModelConfig::defaults(
            "smol",
            path,
            fuke::backends::local::LocalKind::Chat,
        )
    }])
}

pub const KEY_ACME: &str = "fk-test-acme-0001";
pub const KEY_GLOBEX: &str = "fk-test-globex-0002";
pub const KEY_LIMITED: &str = "fk-test-limited-0003";

pub fn hash(key: &str) -> String {
    hex::encode(fuke::policy::sha256(key.as_bytes()))
}

/// A policy with one upstream and aliases for every behaviour of the test upstream.
pub fn policy_yaml(base_url: &str) -> String {
    format!(
        r#"upstreams:
  test:
    base_url: {base_url}
    first_byte_timeout_ms: 1500
    idle_timeout_ms: 3000
  test-quick:
    base_url: {base_url}
    idle_timeout_ms: 400
models:
  gpt-test: {{ upstream: test, model: echo-model }}
  slow: {{ upstream: test }}
  hang: {{ upstream: test }}
  drop: {{ upstream: test }}
  no-usage: {{ upstream: test }}
  linger: {{ upstream: test }}
  stall: {{ upstream: test-quick }}
  fail-400: {{ upstream: test }}
  fail-500: {{ upstream: test }}
  fail-429: {{ upstream: test }}
  secret-model: {{ upstream: test }}
  whisper-1: {{ upstream: test }}
tenants:
  acme:
    models: [gpt-test, slow, hang, drop, no-usage, linger, stall, fail-400, fail-500, fail-429, whisper-1]
    keys:
      - {{ id: acme-key, sha256: {acme} }}
  globex:
    models: [secret-model]
    keys:
      - {{ id: globex-key, sha256: {globex} }}
  limited:
    models: [gpt-test]
    limits: {{ requests_per_minute: 2 }}
    keys:
      - {{ id: limited-key, sha256: {limited} }}
"#,
        acme = hash(KEY_ACME),
        globex = hash(KEY_GLOBEX),
        limited = hash(KEY_LIMITED),
    )
}

pub struct Gateway {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    pub sink: Arc<CollectingSink>,
    pub dir: tempfile::TempDir,
    pub policy_dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

pub struct Options {
    pub transport: Transport,
    pub settings: Settings,
    /// Local models the policy may route to (`local: NAME`).
    pub local: LocalModels,
    /// OTLP tracing (started by the test).
    pub tracing: Option<Arc<fuke::trace::Tracing>>,
    /// The local embedding model of `local` the cache uses (fuke.yaml `embedder:`).
    pub embedder: Option<String>,
    /// The answer cache's Redis second level.
    pub cache_l2: Option<fuke::cache::L2Config>,
    /// The knowledge base (opened by the test).
    pub kb: Option<Arc<fuke::kb::KnowledgeBase>>,
    /// A real usage ledger beside the collecting sink.
    pub ledger: Option<fuke::ledger::LedgerConfig>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            transport: Transport::Plain,
            settings: Settings::default(),
            local: LocalModels::default(),
            tracing: None,
            embedder: None,
            cache_l2: None,
            kb: None,
            ledger: None,
        }
    }
}

impl Gateway {
    pub async fn start(policy: &str) -> Gateway {
        Self::start_with(policy, Options::default()).await
    }

    pub async fn start_with(policy: &str, opts: Options) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("main.yaml"), policy).unwrap();
        let health = Arc::new(fuke::routing::Board::default());
        let mut metrics = Metrics::new();
        metrics.register_collector(opts.local.clone());
        metrics.register_collector(fuke::routing::BoardMetrics(health.clone()));
        let cache = Arc::new(match &opts.cache_l2 {
            Some(l2) => fuke::cache::Store::with_l2(l2).unwrap(),
            None => fuke::cache::Store::default(),
        });
        metrics.register_collector(fuke::cache::StoreMetrics(cache.clone()));
        if let Some(t) = &opts.tracing {
            metrics.register_collector(t.metrics());
        }
        let metrics = Arc::new(metrics);
        let store = PolicyStore::open(
            &policy_dir,
            Arc::new(Registry {
                local: opts.local,
                health,
                embedder: opts.embedder,
                cache,
                kb_collections: opts.kb.as_ref().map(|k| k.collections()),
                kb: opts.kb,
                ..Registry::default()
            }),
        )
        .unwrap_or_else(|p| panic!("test policy invalid:\n{p}"));
        let sink = Arc::new(CollectingSink::default());
        let (usage_sink, ledger_db): (Arc<dyn UsageSink>, _) = match &opts.ledger {
            Some(cfg) => {
                let ledger = fuke::ledger::Ledger::open(cfg).await.unwrap();
                let db = ledger.reader();
                (
                    Arc::new(fuke::metering::Tee(vec![sink.clone(), Arc::new(ledger)])),
                    Some(db),
                )
            }
            None => (sink.clone(), None),
        };
        let app = App::new(
            Arc::new(store),
            usage_sink,
            metrics,
            opts.settings,
            opts.tracing,
        );
        if let Some(db) = ledger_db {
            let _ = app.ledger.set(db);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            listener,
            opts.transport,
            app.clone(),
            async {
                let _ = rx.await;
            },
            Duration::from_secs(10),
        ));
        Gateway {
            addr,
            app,
            sink,
            dir,
            policy_dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The usage event recorded for a reply (waits for it).
    pub async fn usage_of(&self, reply: &Reply) -> UsageEvent {
        let id = reply.headers["x-request-id"].to_str().unwrap();
        self.sink.wait_for(id).await
    }

    /// Begins graceful shutdown; returns the server task to await.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<std::io::Result<()>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap()
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an OpenAI error body and returns its `error` object.
    pub fn openai_error(&self) -> serde_json::Value {
        let v = self.json();
        let e = v["error"].clone();
        assert!(e["message"].is_string(), "no error.message in {v}");
        assert!(e["type"].is_string(), "no error.type in {v}");
        assert!(
            e.get("param").is_some() && e.get("code").is_some(),
            "param/code missing in {v}"
        );
        e
    }
}

pub async fn send(
    client: &TestClient,
    method: Method,
    url: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut b = Request::builder().method(method).uri(url);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client
        .request(b.body(Full::new(body.into())).unwrap())
        .await
        .expect("gateway unreachable");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(client: &TestClient, url: &str, key: Option<&str>) -> Reply {
    send(client, Method::GET, url, key, &[], Bytes::new()).await
}

pub async fn post(client: &TestClient, url: &str, key: &str, body: &str) -> Reply {
    send(
        client,
        Method::POST,
        url,
        Some(key),
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

/// A streaming request for the `slow` model (150 chunks, 20 ms apart) to `base` (`http://host`).
pub fn slow_stream_request(base: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("{base}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY_ACME}"))
        .body(Full::new(Bytes::from_static(
            br#"{"model":"slow","stream":true,"messages":[{"role":"user","content":"go"}]}"#,
        )))
        .unwrap()
}

/// Polls `check` until it is true (or fails after 10 s): waiting for effects, never sleeping
/// a fixed time.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reads the rest of a streamed answer (30 s at most) and asserts it ended with `[DONE]`.
pub async fn drain_to_done(body: hyper::body::Incoming) {
    let rest = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .expect("stream not drained")
        .unwrap()
        .to_bytes();
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
}

/// A directory with `policies/main.yaml` (`policy`) and `fuke.yaml` (plaintext on a free
/// loopback port, JSON logs, then `extra` config lines) for running the `fuke` binary.
pub fn binary_dir(policy: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/main.yaml"), policy).unwrap();
    std::fs::write(
        dir.path().join("fuke.yaml"),
        format!(
            "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\npolicies: policies\nlog_format: json\n{extra}"
        ),
    )
    .unwrap();
    dir
}

/// `fuke serve -c DIR/fuke.yaml`; returns the process, its address (from the `listening` log
/// line) and the rest of its log lines.
pub fn spawn_fuke(
    dir: &std::path::Path,
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fuke"))
        .args(["serve", "-c"])
        .arg(dir.join("fuke.yaml"))
        .env("RUST_LOG", "info")
        .env_remove("FUKE_LEDGER_URL")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no 'listening' log line");
        };
        if line.contains("\"listening\"") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let addr = v["fields"]["addr"].as_str().unwrap().to_string();
            return (child, addr, rx);
        }
    }
}
