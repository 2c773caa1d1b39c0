//! The `fuke` command: parses the CLI, sets up logging and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use fuke::app::App;
use fuke::backends::Registry;
use fuke::backends::local::LocalModels;
use fuke::config::{Config, LogFormat};
use fuke::metering::{LogSink, Tee, UsageSink};
use fuke::policy::PolicyStore;
use fuke::server::{self, Transport};
use fuke::telemetry::{self, Metrics, ResultLabels};
use fuke::tls::{CertStore, server_config};

// mimalloc: measurably fewer cycles per request than glibc malloc on the relay path
// (BENCHMARKS.md), and no fragmentation growth under many concurrent streams. It is linked with
// its `override` feature, so it *is* the process's malloc (for llama.cpp and SQLite too), and
// Rust allocates through `System`, i.e. plain `malloc`. `mimalloc::MiMalloc` as the global
// allocator would send every allocation through `mi_malloc_aligned`, whose fast path ends at
// 1 KiB: larger blocks (buffers, futures) took its slow over-allocating path, about 1.9k
// instructions per request (BENCHMARKS.md, run 9).
#[global_allocator]
static ALLOCATOR: std::alloc::System = std::alloc::System;

#[derive(Parser)]
#[command(name = "fuke", version, about = "OpenAI-compatible inference gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gateway.
    Serve {
        #[arg(long, short, default_value = "fuke.yaml", env = "FUKE_CONFIG")]
        config: PathBuf,
    },
    /// Validate fuke.yaml and every policy file; list all problems as file:line: key: message.
    Check {
        #[arg(long, short, default_value = "fuke.yaml", env = "FUKE_CONFIG")]
        config: PathBuf,
    },
    /// Print a new API key (once) and the policy line holding its SHA-256.
    Keygen {
        #[arg(long)]
        tenant: String,
        /// Key id shown in logs and usage (default: <tenant>-<random>).
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value = "tenant", value_parser = ["tenant", "finance", "admin"])]
        role: String,
    },
    /// Usage and cost from the ledger, per tenant (and day, model or key).
    Usage {
        #[arg(long, short, default_value = "fuke.yaml", env = "FUKE_CONFIG")]
        config: PathBuf,
        /// One tenant (default: all).
        #[arg(long)]
        tenant: Option<String>,
        /// Start (2026-11-01, 2026-11-01T08:00:00Z or unix seconds; default: 30 days before --to).
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive (a bare date includes that whole day; default: now).
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value = "tenant", value_parser = ["tenant", "day", "model", "key"])]
        group_by: String,
        #[arg(long, default_value = "table", value_parser = ["table", "csv", "json"])]
        format: String,
    },
    /// Certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// The knowledge base (fuke.yaml `kb:`).
    Kb {
        #[arg(
            long,
            short,
            default_value = "fuke.yaml",
            env = "FUKE_CONFIG",
            global = true
        )]
        config: PathBuf,
        #[command(subcommand)]
        command: KbCommand,
    },
}

#[derive(Subcommand)]
enum KbCommand {
    /// Index one collection (or all): only new or changed chunks are embedded.
    Index { collection: Option<String> },
    /// Print the chunks a question retrieves, with their scores and sources.
    Search {
        question: String,
        /// Collections to search (default: all).
        #[arg(long = "collection")]
        collections: Vec<String>,
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        #[arg(long, default_value_t = 0.0)]
        min_score: f32,
    },
    /// Collections, chunks, files and generations of the stored index.
    Stats,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a development CA, a localhost server certificate and a client certificate.
    Dev {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config } => return check(config),
        Command::Keygen { tenant, id, role } => keygen(&tenant, id, &role),
        Command::Kb { config, command } => kb_command(config, command),
        Command::Usage {
            config,
            tenant,
            from,
            to,
            group_by,
            format,
        } => usage_command(config, tenant, from, to, group_by, format),
        Command::Certs {
            command: CertsCommand::Dev { dir },
        } => fuke::devcerts::generate(&["localhost", "127.0.0.1", "::1"])
            .and_then(|c| fuke::devcerts::write(&dir, &c))
            .map(|()| {
                println!(
                    "wrote ca.pem, server.pem, client.pem and their keys to {}",
                    dir.display()
                )
            })
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(config_path: PathBuf) -> ExitCode {
    let mut problems = Vec::new();
    match Config::load(&config_path) {
        Ok(config) => {
            for l in &config.listeners {
                if let Some(t) = &l.tls
                    && let Err(e) = CertStore::open(&t.cert, &t.key).and_then(|store| {
                        server_config(Arc::new(store), t.client_ca.as_deref()).map(|_| ())
                    })
                {
                    problems.push(e.to_string());
                }
            }
            problems.extend(
                config
                    .local_model_problems()
                    .iter()
                    .map(ToString::to_string),
            );
            let backends = Registry {
                local: LocalModels::configured(&config.local_models),
                embedder: config.embedder.clone(),
                kb_collections: config
                    .kb
                    .as_ref()
                    .map(|k| fuke::kb::collection_names(&k.dir)),
                ..Registry::default()
            };
            if let Err(p) = fuke::policy::load_dir(&config.policies_dir, 0, &backends) {
                problems.extend(p.0.iter().map(ToString::to_string));
            }
        }
        Err(p) => problems.extend(p.0.iter().map(ToString::to_string)),
    }
    if problems.is_empty() {
        println!("ok: {} and its policies are valid", config_path.display());
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{} problem(s)", problems.len());
        ExitCode::FAILURE
    }
}

/// Opens the knowledge base of `config` with only its embedding model loaded.
async fn open_kb(config: &Config) -> anyhow::Result<Arc<fuke::kb::KnowledgeBase>> {
    let kb_cfg = config
        .kb
        .clone()
        .context("fuke.yaml has no `kb:` section")?;
    let name = kb_cfg.embedder.clone();
    let configs: Vec<_> = config
        .local_models
        .iter()
        .filter(|m| m.name == name)
        .cloned()
        .collect();
    let local = tokio::task::spawn_blocking(move || LocalModels::load(&configs)).await?;
    open_kb_with(kb_cfg, &local).await
}

/// Opens the knowledge base with its embedding model from `local`.
async fn open_kb_with(
    kb_cfg: fuke::kb::KbConfig,
    local: &LocalModels,
) -> anyhow::Result<Arc<fuke::kb::KnowledgeBase>> {
    let name = kb_cfg.embedder.clone();
    let embedder = local.embedder(&name).with_context(|| {
        format!("the knowledge base needs the embedding model `{name}`, which did not load")
    })?;
    fuke::kb::KnowledgeBase::open(kb_cfg, embedder)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}

fn kb_command(config_path: PathBuf, command: KbCommand) -> anyhow::Result<()> {
    let config = Config::load(&config_path).map_err(|p| anyhow::anyhow!("{p}"))?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let kb = open_kb(&config).await?;
        match command {
            KbCommand::Index { collection } => {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix:>12} [{bar:30}] {pos}/{len} chunks embedded ({elapsed})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                let progress = |name: &str, p: fuke::kb::Progress| match p {
                    fuke::kb::Progress::Embedding { total } => {
                        bar.set_prefix(name.to_string());
                        bar.set_length(total as u64);
                        bar.set_position(0);
                    }
                    fuke::kb::Progress::Embedded { done } => bar.set_position(done as u64),
                };
                let summaries = match collection {
                    Some(c) => {
                        if !config.kb.as_ref().is_some_and(|k| k.dir.join(&c).is_dir()) {
                            anyhow::bail!("no collection `{c}` (a directory under the knowledge-base directory)");
                        }
                        vec![kb.index(&c, &|p| progress(&c, p)).await.map_err(|e| anyhow::anyhow!(e))?]
                    }
                    None => kb.index_all(&progress).await,
                };
                bar.finish_and_clear();
                for s in summaries {
                    println!("{s}");
                }
            }
            KbCommand::Search {
                question,
                collections,
                top_k,
                min_score,
            } => {
                let names: Vec<Arc<str>> = if collections.is_empty() {
                    kb.collections().into_iter().map(Arc::from).collect()
                } else {
                    collections.into_iter().map(Arc::from).collect()
                };
                let hits = kb
                    .search(&names, &question, top_k, min_score)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                if hits.is_empty() {
                    println!("no chunk scored {min_score} or more");
                }
                for (i, h) in hits.iter().enumerate() {
                    println!(
                        "{}. {:.3} (vector {:.3}, keyword {:.3})  {}  [{}]",
                        i + 1,
                        h.score,
                        h.vector,
                        h.keyword,
                        h.id(),
                        h.chunk.headings.join(" > ")
                    );
                    for line in h.chunk.text.lines() {
                        println!("      {line}");
                    }
                }
            }
            KbCommand::Stats => {
                println!("{:<20} {:>8} {:>8}  generation", "collection", "files", "chunks");
                for (name, chunks, files, generation) in kb.stats() {
                    println!("{name:<20} {files:>8} {chunks:>8}  {generation:016x}");
                }
            }
        }
        Ok(())
    })
}

/// A database URL without its password, for logs and errors.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `fuke usage`: a report from the ledger fuke.yaml names.
fn usage_command(
    config_path: PathBuf,
    tenant: Option<String>,
    from: Option<String>,
    to: Option<String>,
    group_by: String,
    format: String,
) -> anyhow::Result<()> {
    use fuke::ledger::report::{self, GroupBy};
    let config = Config::load(&config_path).map_err(|p| anyhow::anyhow!("{p}"))?;
    let cfg = config
        .ledger
        .clone()
        .context("the usage ledger is off (ledger.url: off in fuke.yaml)")?;
    let group_by = GroupBy::parse(&group_by).with_context(|| {
        format!("--group-by `{group_by}` is not one of tenant, day, model, key")
    })?;
    let (from, to) = report::range(from.as_deref(), to.as_deref())
        .map_err(|(param, e)| anyhow::anyhow!("--{param}: {e}"))?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let db = fuke::ledger::Db::open(&cfg.url, fuke::ledger::Role::ReadOnly)
            .await
            .with_context(|| format!("opening the usage ledger {}", redact_url(&cfg.url)))?;
        let q = report::Query {
            from_ms: from,
            to_ms: to,
            tenant,
            group_by,
        };
        let rep = report::run(&db, &q).await?;
        match format.as_str() {
            "csv" => print!("{}", report::csv(&rep)),
            "json" => println!("{}", serde_json::to_string_pretty(&rep)?),
            _ => print!("{}", report::table(&rep)),
        }
        Ok(())
    })
}

fn keygen(tenant: &str, id: Option<String>, role: &str) -> anyhow::Result<()> {
    let secret: [u8; 32] = rand::random();
    let key = format!("fk-{}", hex::encode(secret));
    let hash = hex::encode(fuke::policy::sha256(key.as_bytes()));
    let suffix: [u8; 3] = rand::random();
    let id = id.unwrap_or_else(|| format!("{tenant}-{}", hex::encode(suffix)));
    println!("API key (shown once; store it now):\n  {key}\n");
    println!("Add under tenants.{tenant}.keys in a policy file:");
    println!("      - {{ id: {id}, sha256: {hash}, role: {role} }}");
    Ok(())
}

fn serve(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path).map_err(|p| anyhow::anyhow!("{p}"))?;
    let (log_writer, _log_flush) = telemetry::init_logging(config.log_format == LogFormat::Json)?;
    // Also keeps mimalloc linked in: its `malloc` is the process's (see ALLOCATOR).
    tracing::info!(
        mimalloc = mimalloc::MiMalloc.version(),
        "allocator: mimalloc"
    );
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(serve_async(config, log_writer))
}

async fn serve_async(
    config: Config,
    log_writer: fuke::logwriter::BatchWriter,
) -> anyhow::Result<()> {
    let configs = config.local_models.clone();
    let local = tokio::task::spawn_blocking(move || LocalModels::load(&configs)).await?;
    let health = Arc::new(fuke::routing::Board::default());
    let mut metrics = Metrics::new();
    metrics.register_collector(local.clone());
    metrics.register_collector(fuke::routing::BoardMetrics(health.clone()));
    let cache = Arc::new(match &config.cache_l2 {
        Some(l2) => fuke::cache::Store::with_l2(l2).map_err(|e| anyhow::anyhow!(e))?,
        None => fuke::cache::Store::default(),
    });
    metrics.register_collector(fuke::cache::StoreMetrics(cache.clone()));
    let tracing_export = match &config.tracing {
        Some(cfg) => {
            let t = fuke::trace::Tracing::start(cfg).map_err(|e| anyhow::anyhow!(e))?;
            metrics.register_collector(t.metrics());
            tracing::info!(endpoint = ?cfg.endpoint, protocol = ?cfg.protocol, "OTLP tracing on");
            Some(t)
        }
        None => None,
    };
    let kb = match &config.kb {
        None => None,
        Some(kb_cfg) => {
            let kb = open_kb_with(kb_cfg.clone(), &local).await?;
            metrics.register_collector(fuke::kb::KbMetrics(kb.clone()));
            Some(kb)
        }
    };
    let metrics = Arc::new(metrics);
    let backends = Arc::new(Registry {
        local,
        health,
        embedder: config.embedder.clone(),
        cache,
        kb_collections: kb.as_ref().map(|k| k.collections()),
        kb: kb.clone(),
        ..Registry::default()
    });
    let policy = Arc::new(
        PolicyStore::open(&config.policies_dir, backends).map_err(|p| anyhow::anyhow!("{p}"))?,
    );
    let log_sink: Arc<dyn UsageSink> = Arc::new(LogSink::new(log_writer));
    let (sink, ledger_db): (Arc<dyn UsageSink>, _) = match &config.ledger {
        Some(cfg) => {
            let ledger = fuke::ledger::Ledger::open(cfg)
                .await
                .with_context(|| format!("opening the usage ledger {}", redact_url(&cfg.url)))?;
            tracing::info!(ledger = %redact_url(&cfg.url), "usage ledger open");
            let reader = ledger.reader();
            (
                Arc::new(Tee(vec![log_sink, Arc::new(ledger)])),
                Some(reader),
            )
        }
        None => {
            tracing::warn!("usage ledger off (ledger.url: off): usage goes to log lines only");
            (log_sink, None)
        }
    };
    let app = App::new(
        policy.clone(),
        sink,
        metrics.clone(),
        config.settings.clone(),
        tracing_export.clone(),
    );
    if let Some(db) = ledger_db {
        let _ = app.ledger.set(db);
    }

    let _policy_watch = {
        let app = app.clone();
        fuke::reload::watch_dirs("policies", vec![config.policies_dir.clone()], move || {
            app.reload_policy()
        })
        .context("watching the policy directory")?
    };

    // The stored index serves at once; an index run brings it up to date with the files (only
    // changes are embedded), then the watcher re-indexes on every change.
    let _kb_watch = match &kb {
        None => None,
        Some(kb) => {
            let k = kb.clone();
            tokio::spawn(async move {
                k.index_all(&|_, _| {}).await;
            });
            if kb.config().watch {
                Some(
                    kb.watch()
                        .context("watching the knowledge-base directory")?,
                )
            } else {
                None
            }
        }
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let mut cert_watches = Vec::new();
    for l in &config.listeners {
        let transport = match &l.tls {
            None => {
                if !l.addr.ip().is_loopback() {
                    tracing::warn!(addr = %l.addr, "plain HTTP on a non-loopback address (configured explicitly)");
                }
                Transport::Plain
            }
            Some(t) => {
                let store = Arc::new(CertStore::open(&t.cert, &t.key)?);
                let tls = server_config(store.clone(), t.client_ca.as_deref())?;
                let metrics = metrics.clone();
                let s = store.clone();
                cert_watches.push(fuke::reload::watch_dirs("certificates", store.watch_dirs(), move || {
                    let result = match s.reload() {
                        Ok(()) => {
                            tracing::info!("certificate reloaded");
                            "ok"
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "certificate reload rejected; keeping the previous one");
                            "rejected"
                        }
                    };
                    metrics.tls_reloads.get_or_create(&ResultLabels { result }).inc();
                })?);
                Transport::Tls(tls)
            }
        };
        let listener = tokio::net::TcpListener::bind(l.addr)
            .await
            .with_context(|| format!("binding {}", l.addr))?;
        tracing::info!(addr = %listener.local_addr()?, tls = l.tls.is_some(), "listening");
        let mut stop = stop_rx.clone();
        let app = app.clone();
        let grace = config.shutdown_grace;
        servers.spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            server::run(listener, transport, app, shutdown, grace).await
        });
    }

    shutdown_signal().await;
    tracing::info!("shutdown signal received");
    let _ = stop_tx.send(true);
    while let Some(r) = servers.join_next().await {
        r??;
    }
    if let Some(t) = &tracing_export {
        t.flush().await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
