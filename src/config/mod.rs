//! `fuke.yaml`: what needs a restart to change (listeners, TLS file paths, body limits, where the
//! policies live). Strict raw types, then one validated [`Config`]; problems are reported together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;
use serde::Deserialize;

use crate::app::Settings;
use crate::backends::local::{LocalKind, LocalModelConfig};
use crate::policy::lines::LineIndex;
use crate::policy::{Problem, Problems};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listeners: Vec<RawListener>,
    #[serde(default)]
    policies: Option<PathBuf>,
    max_body_bytes: Option<usize>,
    max_upload_bytes: Option<usize>,
    shutdown_grace_secs: Option<u64>,
    #[serde(default)]
    log_format: LogFormat,
    /// GGUF models run in-process by llama.cpp, by the name policies use (`local: NAME`).
    #[serde(default)]
    local_models: IndexMap<String, RawLocalModel>,
    /// The local embedding model the rest of Fuke (cache, knowledge base) embeds with.
    embedder: Option<String>,
    /// OpenTelemetry export (OTLP); the `OTEL_*` variables work without it.
    tracing: Option<crate::trace::RawTracing>,
    /// The answer cache's shared second level.
    cache: Option<RawCacheConfig>,
    /// Where Fuke keeps its state (the knowledge-base index). Default `data`.
    data_dir: Option<PathBuf>,
    /// The knowledge base.
    kb: Option<RawKbConfig>,
    /// The usage ledger; default: a SQLite file in the data directory.
    ledger: Option<RawLedger>,
    /// Where rate limits are counted; default: in process.
    limits: Option<RawLimitsConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimitsConfig {
    /// Share request and token limits between replicas through Redis.
    redis_url: Option<String>,
    /// Key prefix (default `fuke:limits:`).
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    /// `sqlite://PATH` (relative to this file), `postgres://…`, or `off`. The environment
    /// variable `FUKE_LEDGER_URL` overrides it.
    url: Option<String>,
    /// Where rows wait when the database is down. Default `DATA_DIR/ledger-spool.jsonl`.
    spool: Option<PathBuf>,
    /// `false`: commits do not wait for the disk (rows survive a killed gateway, not a power
    /// loss). Default `true`.
    fsync: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKbConfig {
    /// One directory per collection below it. Default `kb`.
    dir: Option<PathBuf>,
    /// Most tokens per chunk (default 200).
    chunk_tokens: Option<usize>,
    /// Tokens repeated from the end of one chunk at the start of the next (default 40).
    chunk_overlap: Option<usize>,
    /// Weight of the keyword (BM25) score against vector similarity, 0..=1 (default 0.3).
    keyword_weight: Option<f32>,
    /// The same for Chinese, Japanese and Korean questions (default 0.7).
    keyword_weight_cjk: Option<f32>,
    /// The embedding model of the knowledge base (default: the top-level `embedder`).
    embedder: Option<String>,
    /// Re-index a collection when its files change (default true).
    watch: Option<bool>,
    /// Keep vectors in Qdrant (gRPC URL, e.g. http://127.0.0.1:6334).
    qdrant_url: Option<String>,
    /// Name of the variable that holds Qdrant's API key.
    qdrant_api_key_env: Option<String>,
    /// Prefix of the Qdrant collection names (default `fuke_`).
    qdrant_prefix: Option<String>,
}

/// What is wrong with naming `name` as an embedding model, if anything.
fn embedder_problem(local_models: &[LocalModelConfig], name: &str) -> Option<String> {
    match local_models.iter().find(|m| m.name == name) {
        Some(m) if m.kind == LocalKind::Embedding => None,
        Some(_) => Some(format!("local model `{name}` is not of kind `embedding`")),
        None => Some(format!("no local model `{name}` under local_models")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCacheConfig {
    /// `redis://host:port[/db]`: the exact level is also kept in Redis, shared by replicas.
    redis_url: Option<String>,
    /// Key prefix in Redis (default `fuke:cache:`).
    redis_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocalModel {
    path: PathBuf,
    kind: LocalKind,
    /// Tokens of context per sequence (prompt + answer).
    context: Option<u32>,
    /// Sequences decoded together (continuous batching).
    parallel: Option<u32>,
    /// Requests that may wait for a free sequence; beyond that, 429.
    queue: Option<u32>,
    /// CPU threads for llama.cpp.
    threads: Option<u32>,
    /// Layers offloaded to the GPU (builds with the `cuda` feature).
    gpu_layers: Option<u32>,
    /// Embedding models: text put before questions (E5: "query: ").
    query_prefix: Option<String>,
    /// Embedding models: text put before documents (E5: "passage: ").
    document_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    addr: String,
    /// Plain HTTP must be asked for by name.
    #[serde(default)]
    plaintext: bool,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    /// With a CA, clients must present a certificate it signed (mTLS).
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    /// `None`: plain HTTP (explicitly configured).
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub policies_dir: PathBuf,
    pub settings: Settings,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub local_models: Vec<LocalModelConfig>,
    pub embedder: Option<String>,
    /// The answer cache's Redis second level, when configured.
    pub cache_l2: Option<crate::cache::L2Config>,
    /// OTLP tracing, from `tracing:` and the `OTEL_*` variables; `None` when off.
    pub tracing: Option<crate::trace::TraceConfig>,
    pub data_dir: PathBuf,
    /// The knowledge base, when `kb:` is configured.
    pub kb: Option<crate::kb::KbConfig>,
    /// The usage ledger; `None` when `ledger.url` is `off`.
    pub ledger: Option<crate::ledger::LedgerConfig>,
    /// The file, and the line of each local model's `path`, for `fuke check`'s reports.
    source: PathBuf,
    local_model_lines: Vec<Option<usize>>,
}

impl Config {
    /// Problems of the local model files (missing, not GGUF, wrong kind), without loading them.
    /// `serve` starts anyway and answers 503 for such a model; `fuke check` reports them.
    pub fn local_model_problems(&self) -> Vec<Problem> {
        self.local_models
            .iter()
            .zip(&self.local_model_lines)
            .filter_map(|(m, line)| {
                crate::backends::local::check_file(m)
                    .err()
                    .map(|message| Problem {
                        file: self.source.clone(),
                        line: *line,
                        path: format!("local_models.{}.path", m.name),
                        message,
                    })
            })
            .collect()
    }

    pub fn load(path: &Path) -> Result<Config, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem {
                file: path.to_path_buf(),
                line: None,
                path: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let raw: RawConfig =
            crate::policy::load::deserialize_yaml(&text).map_err(|(line, key, message)| {
                Problems(vec![Problem {
                    file: path.to_path_buf(),
                    line,
                    path: key,
                    message,
                }])
            })?;
        let lines = LineIndex::build(&text);
        let base = path.parent().unwrap_or(Path::new("."));
        let mut problems = Vec::new();
        let mut add = |key: String, message: String| {
            problems.push(Problem {
                file: path.to_path_buf(),
                line: lines.line_of(&key),
                path: key,
                message,
            })
        };

        let mut listeners = Vec::new();
        if raw.listeners.is_empty() {
            add("listeners".into(), "at least one listener is needed".into());
        }
        for (i, l) in raw.listeners.iter().enumerate() {
            let key = format!("listeners[{i}]");
            let addr = match l.addr.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    add(
                        format!("{key}.addr"),
                        format!("`{}` is not an IP:port address", l.addr),
                    );
                    continue;
                }
            };
            let tls = match (&l.tls, l.plaintext) {
                (Some(_), true) => {
                    add(
                        key.clone(),
                        "set either `tls` or `plaintext: true`, not both".into(),
                    );
                    continue;
                }
                (None, false) => {
                    add(
                        key.clone(),
                        "needs `tls` (cert and key), or `plaintext: true` to serve plain HTTP"
                            .into(),
                    );
                    continue;
                }
                (None, true) => None,
                (Some(t), false) => {
                    let files = TlsFiles {
                        cert: base.join(&t.cert),
                        key: base.join(&t.key),
                        client_ca: t.client_ca.as_ref().map(|c| base.join(c)),
                    };
                    for (field, p) in [
                        ("cert", Some(&files.cert)),
                        ("key", Some(&files.key)),
                        ("client_ca", files.client_ca.as_ref()),
                    ] {
                        if let Some(p) = p
                            && !p.is_file()
                        {
                            add(
                                format!("{key}.tls.{field}"),
                                format!(
                                    "{} does not exist (run `fuke certs dev` for development certificates)",
                                    p.display()
                                ),
                            );
                        }
                    }
                    Some(files)
                }
            };
            listeners.push(Listener { addr, tls });
        }
        let defaults = Settings::default();
        let settings = Settings {
            max_body_bytes: raw.max_body_bytes.unwrap_or(defaults.max_body_bytes),
            max_upload_bytes: raw.max_upload_bytes.unwrap_or(defaults.max_upload_bytes),
            limits_redis: match raw.limits.as_ref().and_then(|l| l.redis_url.as_ref()) {
                None => None,
                Some(url) => match redis::Client::open(url.as_str()) {
                    Ok(_) => Some(crate::limits::RedisLimits {
                        url: url.clone(),
                        prefix: raw
                            .limits
                            .as_ref()
                            .and_then(|l| l.prefix.clone())
                            .unwrap_or_else(|| "fuke:limits:".into()),
                    }),
                    Err(e) => {
                        add("limits.redis_url".into(), format!("not a Redis URL: {e}"));
                        None
                    }
                },
            },
        };
        if settings.max_body_bytes == 0 {
            add("max_body_bytes".into(), "must be greater than 0".into());
        }
        let mut local_models = Vec::new();
        let mut local_model_lines = Vec::new();
        for (name, m) in &raw.local_models {
            let key = format!("local_models.{name}");
            let defaults = LocalModelConfig::defaults(name, base.join(&m.path), m.kind);
            let model = LocalModelConfig {
                context: m.context.unwrap_or(defaults.context),
                parallel: m.parallel.unwrap_or(defaults.parallel),
                queue: m.queue.unwrap_or(defaults.queue),
                threads: m.threads.unwrap_or(defaults.threads),
                gpu_layers: m.gpu_layers.unwrap_or(defaults.gpu_layers),
                query_prefix: m.query_prefix.clone().unwrap_or_default(),
                document_prefix: m.document_prefix.clone().unwrap_or_default(),
                ..defaults
            };
            for (field, value, min, max) in [
                ("context", model.context, 16, 1 << 20),
                ("parallel", model.parallel, 1, 256),
                ("queue", model.queue, 1, 1 << 20),
                ("threads", model.threads, 1, 1024),
            ] {
                if !(min..=max).contains(&value) {
                    add(
                        format!("{key}.{field}"),
                        format!("must be between {min} and {max}"),
                    );
                }
            }
            local_models.push(model);
            local_model_lines.push(lines.line_of(&format!("{key}.path")));
        }
        let tracing = match crate::trace::TraceConfig::resolve(raw.tracing.as_ref()) {
            Ok(t) => t,
            Err(e) => {
                add("tracing".into(), e);
                None
            }
        };
        if let Some(name) = &raw.embedder
            && let Some(problem) = embedder_problem(&local_models, name)
        {
            add("embedder".into(), problem);
        }
        let cache_l2 = match raw.cache.as_ref().and_then(|c| c.redis_url.as_ref()) {
            None => None,
            Some(url) if url.starts_with("redis://") || url.starts_with("unix://") => {
                match redis::Client::open(url.as_str()) {
                    Ok(_) => Some(crate::cache::L2Config {
                        url: url.clone(),
                        prefix: raw
                            .cache
                            .as_ref()
                            .and_then(|c| c.redis_prefix.clone())
                            .unwrap_or_else(|| "fuke:cache:".into()),
                    }),
                    Err(e) => {
                        add("cache.redis_url".into(), format!("not a Redis URL: {e}"));
                        None
                    }
                }
            }
            Some(_) => {
                add(
                    "cache.redis_url".into(),
                    "must be a redis:// (or unix://) URL".into(),
                );
                None
            }
        };
        let data_dir = base.join(raw.data_dir.clone().unwrap_or_else(|| "data".into()));
        let ledger = {
            let raw_url = std::env::var("FUKE_LEDGER_URL")
                .ok()
                .filter(|u| !u.is_empty())
                .or_else(|| raw.ledger.as_ref().and_then(|l| l.url.clone()));
            let spool = raw
                .ledger
                .as_ref()
                .and_then(|l| l.spool.as_ref())
                .map(|s| base.join(s))
                .unwrap_or_else(|| data_dir.join("ledger-spool.jsonl"));
            let fsync = raw.ledger.as_ref().and_then(|l| l.fsync).unwrap_or(true);
            match raw_url.as_deref() {
                None => Some(crate::ledger::LedgerConfig {
                    spool,
                    fsync,
                    ..crate::ledger::LedgerConfig::embedded(&data_dir)
                }),
                Some("off") => None,
                Some(url) => match crate::ledger::Kind::of_url(url) {
                    Some(crate::ledger::Kind::Sqlite) => {
                        let path = crate::ledger::sqlite_path(url).unwrap_or_default();
                        Some(crate::ledger::LedgerConfig {
                            url: format!("sqlite://{}", base.join(path).display()),
                            spool,
                            fsync,
                        })
                    }
                    Some(crate::ledger::Kind::Postgres) => Some(crate::ledger::LedgerConfig {
                        url: url.to_string(),
                        spool,
                        fsync,
                    }),
                    None => {
                        add(
                            "ledger.url".into(),
                            "must be sqlite://PATH, postgres://… or off".into(),
                        );
                        None
                    }
                },
            }
        };
        let kb = raw.kb.as_ref().map(|k| {
            let defaults = crate::kb::chunk::Budget::default();
            crate::kb::KbConfig {
                dir: base.join(k.dir.clone().unwrap_or_else(|| "kb".into())),
                data_dir: data_dir.clone(),
                budget: crate::kb::chunk::Budget {
                    max_tokens: k.chunk_tokens.unwrap_or(defaults.max_tokens),
                    overlap_tokens: k.chunk_overlap.unwrap_or(defaults.overlap_tokens),
                },
                keyword_weight: k
                    .keyword_weight
                    .unwrap_or(crate::kb::DEFAULT_KEYWORD_WEIGHT),
                keyword_weight_cjk: k
                    .keyword_weight_cjk
                    .unwrap_or(crate::kb::DEFAULT_KEYWORD_WEIGHT_CJK),
                watch: k.watch.unwrap_or(true),
                embedder: k
                    .embedder
                    .clone()
                    .or_else(|| raw.embedder.clone())
                    .unwrap_or_default(),
                qdrant_url: k.qdrant_url.clone(),
                qdrant_api_key_env: k.qdrant_api_key_env.clone(),
                qdrant_prefix: k.qdrant_prefix.clone().unwrap_or_else(|| "fuke_".into()),
            }
        });
        if let Some(k) = &kb {
            if k.embedder.is_empty() {
                add(
                    "kb".into(),
                    "the knowledge base needs an embedding model: `kb.embedder` or `embedder`"
                        .into(),
                );
            } else if let Some(problem) = embedder_problem(&local_models, &k.embedder) {
                add("kb.embedder".into(), problem);
            }
            if !k.dir.is_dir() {
                add(
                    "kb.dir".into(),
                    format!("{} is not a directory", k.dir.display()),
                );
            }
            if !(32..=4096).contains(&k.budget.max_tokens) {
                add(
                    "kb.chunk_tokens".into(),
                    "must be between 32 and 4096".into(),
                );
            }
            if k.budget.overlap_tokens * 2 > k.budget.max_tokens {
                add(
                    "kb.chunk_overlap".into(),
                    "must be at most half of chunk_tokens".into(),
                );
            }
            for (key, w) in [
                ("kb.keyword_weight", k.keyword_weight),
                ("kb.keyword_weight_cjk", k.keyword_weight_cjk),
            ] {
                if !(0.0..=1.0).contains(&w) {
                    add(key.into(), "must be between 0 and 1".into());
                }
            }
            if let Some(url) = &k.qdrant_url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                add(
                    "kb.qdrant_url".into(),
                    "must be an http:// or https:// URL (Qdrant's gRPC port, usually 6334)".into(),
                );
            }
        }
        if problems.is_empty() {
            Ok(Config {
                data_dir,
                ledger,
                kb,
                cache_l2,
                local_models,
                embedder: raw.embedder,
                tracing,
                source: path.to_path_buf(),
                local_model_lines,
                listeners,
                policies_dir: base.join(raw.policies.unwrap_or_else(|| "policies".into())),
                settings,
                shutdown_grace: Duration::from_secs(raw.shutdown_grace_secs.unwrap_or(30)),
                log_format: raw.log_format,
            })
        } else {
            Err(Problems(problems))
        }
    }
}
