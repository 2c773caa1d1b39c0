//! The usage ledger: one row per request, in SQLite (embedded default, a WAL file in the data
//! directory) or PostgreSQL (shared by replicas), through one code path (sqlx's `Any` driver).
//!
//! **Nothing billed is lost.** [`Ledger::record`] enqueues the row and completes only once it is
//! durable; the gateway awaits it before releasing the last byte of the answer (`data: [DONE]`,
//! the end of a JSON body). One writer task commits whatever is queued in a single transaction
//! (group commit: many requests share one fsync). When the database fails, the batch is
//! appended to a spool file (`ledger-spool.jsonl`, fsynced) before the requests are released,
//! and replayed into the database at start and every few seconds after. Rows are keyed by an id
//! minted per event, and inserts ignore an id already present, so replays never duplicate.

pub mod pricing;
pub mod report;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor as _, Row as _};
use tokio::sync::{mpsc, oneshot};

use crate::backends::BoxFuture;
use crate::cache::CacheUse;
use crate::metering::{UsageEvent, UsageSink};

/// Most rows committed in one transaction (and one INSERT statement: 25 columns × 400 rows stays
/// under SQLite's 32,766 bound parameters).
const MAX_BATCH: usize = 400;

/// How often a non-empty spool is tried against the database again.
const SPOOL_RETRY: Duration = Duration::from_secs(5);

/// The ledger's table, its columns in insert order.
const COLUMNS: [&str; 25] = [
    "id",
    "request_id",
    "ts_ms",
    "tenant",
    "key_id",
    "endpoint",
    "model",
    "served_model",
    "backend",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "usage_source",
    "cache",
    "tokens_saved",
    "kb_chunks",
    "fallback",
    "status",
    "outcome",
    "streamed",
    "streamed_chunks",
    "latency_ms",
    "cost_nanousd",
    "price_version",
    "rules",
];

/// Schema migrations, applied in order at start; each runs once (table `fuke_schema`). The
/// same SQL serves both databases: only TEXT and BIGINT columns (SQLite has no BOOLEAN, and
/// money is integer nano-USD: no floats, no NUMERIC the `Any` driver cannot read).
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE IF NOT EXISTS usage_ledger (
        id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        ts_ms BIGINT NOT NULL,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        served_model TEXT NOT NULL,
        backend TEXT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        usage_source TEXT NOT NULL,
        cache TEXT NOT NULL,
        tokens_saved BIGINT NOT NULL,
        kb_chunks BIGINT NOT NULL,
        fallback TEXT,
        status BIGINT NOT NULL,
        outcome TEXT NOT NULL,
        streamed BIGINT NOT NULL,
        streamed_chunks BIGINT NOT NULL,
        latency_ms BIGINT NOT NULL,
        cost_nanousd BIGINT,
        price_version TEXT,
        rules TEXT
    );
    CREATE INDEX IF NOT EXISTS usage_ledger_tenant_ts ON usage_ledger (tenant, ts_ms);
    CREATE INDEX IF NOT EXISTS usage_ledger_ts ON usage_ledger (ts_ms);
    CREATE INDEX IF NOT EXISTS usage_ledger_request_id ON usage_ledger (request_id);",
    ),
    (
        2,
        // Running totals per scope (`t:TENANT`, `k:KEY_ID`) and period (`d2026-11-27`,
        // `m2026-11`, UTC), updated in the transaction that inserts the rows: budgets read one
        // row, and every replica sharing the database sees the same total.
        "CREATE TABLE IF NOT EXISTS usage_totals (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        cost_nanousd BIGINT NOT NULL,
        requests BIGINT NOT NULL,
        PRIMARY KEY (scope, period)
    )",
    ),
];

/// One ledger row. Also the spool file's line format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub request_id: String,
    pub ts_ms: i64,
    pub tenant: String,
    pub key_id: String,
    pub endpoint: String,
    pub model: String,
    pub served_model: String,
    pub backend: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    /// `upstream` (its report), `streamed` (a stream cut short: output chunks received, one
    /// token each) or `none`.
    pub usage_source: String,
    pub cache: String,
    pub tokens_saved: i64,
    pub kb_chunks: i64,
    pub fallback: Option<String>,
    pub status: i64,
    pub outcome: String,
    pub streamed: bool,
    pub streamed_chunks: i64,
    pub latency_ms: i64,
    /// `None` when the pricing table has no price for the served model.
    pub cost_nanousd: Option<i64>,
    pub price_version: Option<String>,
    pub rules: Option<String>,
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Row {
    /// The row of one usage event; `id` is minted here, once per event.
    pub fn of(ev: &UsageEvent) -> Row {
        let (usage, source) = ev.billed();
        let (cost, version) = match ev.cost() {
            Some((c, v)) => (Some(c), Some(v.to_string())),
            None => (None, None),
        };
        let random: [u8; 16] = rand::random();
        Row {
            id: hex::encode(random),
            request_id: ev.request_id.clone(),
            ts_ms: ev
                .finished_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            tenant: ev.tenant.to_string(),
            key_id: ev.key_id.to_string(),
            endpoint: ev.endpoint.as_str().to_string(),
            model: ev.model_alias.to_string(),
            served_model: ev.upstream_model.clone(),
            backend: ev.backend.clone(),
            prompt_tokens: int(usage.prompt_tokens),
            completion_tokens: int(usage.completion_tokens),
            cached_tokens: int(usage.cached_tokens()),
            usage_source: source.as_str().to_string(),
            cache: ev.cache.as_str().to_string(),
            tokens_saved: match ev.cache {
                CacheUse::Hit { saved: Some(s), .. } => int(s.total_tokens),
                _ => 0,
            },
            kb_chunks: i64::from(ev.kb_chunks),
            fallback: ev.fallback.as_deref().map(str::to_string),
            status: i64::from(ev.status),
            outcome: ev.outcome.as_str().to_string(),
            streamed: ev.streamed,
            streamed_chunks: i64::from(ev.streamed_chunks),
            latency_ms: int(ev.latency.as_millis() as u64),
            cost_nanousd: cost,
            price_version: version,
            rules: (!ev.rules.is_empty()).then(|| {
                let names: Vec<&str> = ev.rules.iter().map(|r| r.as_ref()).collect();
                names.join(",")
            }),
        }
    }
}

/// Which database a ledger URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

impl Kind {
    pub fn of_url(url: &str) -> Option<Kind> {
        if url.starts_with("sqlite:") {
            Some(Kind::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Kind::Postgres)
        } else {
            None
        }
    }
}

/// Where the ledger lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// `sqlite://PATH` or `postgres://…`.
    pub url: String,
    /// Rows that could not be committed wait here (fsynced) until the database takes them.
    pub spool: PathBuf,
}

impl LedgerConfig {
    /// The embedded default: `<data_dir>/ledger.db`, spool beside it.
    pub fn embedded(data_dir: &Path) -> LedgerConfig {
        LedgerConfig {
            url: format!("sqlite://{}", data_dir.join("ledger.db").display()),
            spool: data_dir.join("ledger-spool.jsonl"),
        }
    }
}

/// Counters the writer keeps (exported as metrics, read by tests).
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// Rows committed to the database (spool replays included).
    pub committed: AtomicU64,
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Rows written to the spool because the database refused them.
    pub spooled: AtomicU64,
    /// Rows that neither the database nor the spool would take (logged in full).
    pub lost: AtomicU64,
}

struct Job {
    row: Row,
    done: oneshot::Sender<()>,
}

/// The durable usage sink (see the module docs).
pub struct Ledger {
    db: Db,
    queue: mpsc::UnboundedSender<Job>,
    pub stats: Arc<LedgerStats>,
}

/// A connection pool and what it talks to.
#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub kind: Kind,
}

impl Db {
    /// Connects (creating a SQLite file and its directory if needed) and applies migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        let kind = Kind::of_url(url).ok_or_else(|| {
            anyhow::anyhow!("ledger url must start with sqlite:// or postgres://")
        })?;
        install_default_drivers();
        let mut url = url.to_string();
        if kind == Kind::Sqlite {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split('?').next().unwrap_or_default();
            if let Some(dir) = Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir)?;
            }
            if !url.contains('?') {
                url.push_str("?mode=rwc");
            }
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if kind == Kind::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == Kind::Sqlite {
                        // WAL: readers never block the writer. FULL: a commit survives power
                        // loss, not only a killed process; group commit pays for the fsync.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        let db = Db { pool, kind };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        if self.kind == Kind::Postgres {
            // Two replicas starting together: one migrates, the other waits and finds it done.
            tx.execute("SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock(7305104)) AS l")
                .await?;
        }
        tx.execute(
            "CREATE TABLE IF NOT EXISTS fuke_schema (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
        )
        .await?;
        let done: Vec<i64> = sqlx::query_scalar("SELECT version FROM fuke_schema")
            .fetch_all(&mut *tx)
            .await?;
        for (version, sql) in MIGRATIONS {
            if done.contains(version) {
                continue;
            }
            for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                tx.execute(stmt).await?;
            }
            sqlx::query("INSERT INTO fuke_schema (version, applied_ms) VALUES ($1, $2)")
                .bind(*version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Inserts rows in one transaction; an id already present is left as it is.
    pub async fn insert(&self, rows: &[&Row]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut totals: HashMap<(String, String), (i64, i64)> = HashMap::new();
        for chunk in rows.chunks(MAX_BATCH) {
            let mut sql = String::with_capacity(128 + chunk.len() * 160);
            sql.push_str("INSERT INTO usage_ledger (");
            sql.push_str(&COLUMNS.join(", "));
            sql.push_str(") VALUES ");
            let mut n = 0;
            for (i, _) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push('(');
                for c in 0..COLUMNS.len() {
                    if c > 0 {
                        sql.push_str(", ");
                    }
                    n += 1;
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
                sql.push(')');
            }
            // What was inserted (not rows already present) feeds the running totals.
            sql.push_str(
                " ON CONFLICT (id) DO NOTHING RETURNING tenant, key_id, ts_ms, cost_nanousd",
            );
            // Column names and placeholders only; every value is bound. Not kept prepared: the
            // text varies with the batch size.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).persistent(false);
            for r in chunk {
                q = q
                    .bind(r.id.as_str())
                    .bind(r.request_id.as_str())
                    .bind(r.ts_ms)
                    .bind(r.tenant.as_str())
                    .bind(r.key_id.as_str())
                    .bind(r.endpoint.as_str())
                    .bind(r.model.as_str())
                    .bind(r.served_model.as_str())
                    .bind(r.backend.as_str())
                    .bind(r.prompt_tokens)
                    .bind(r.completion_tokens)
                    .bind(r.cached_tokens)
                    .bind(r.usage_source.as_str())
                    .bind(r.cache.as_str())
                    .bind(r.tokens_saved)
                    .bind(r.kb_chunks)
                    .bind(r.fallback.as_deref())
                    .bind(r.status)
                    .bind(r.outcome.as_str())
                    .bind(i64::from(r.streamed))
                    .bind(r.streamed_chunks)
                    .bind(r.latency_ms)
                    .bind(r.cost_nanousd)
                    .bind(r.price_version.as_deref())
                    .bind(r.rules.as_deref());
            }
            for r in q.fetch_all(&mut *tx).await? {
                let tenant: String = r.try_get(0)?;
                let key: String = r.try_get(1)?;
                let ts: i64 = r.try_get(2)?;
                let cost: Option<i64> = r.try_get(3)?;
                for (scope, period) in [
                    (Scope::Tenant(&tenant), Period::Day),
                    (Scope::Tenant(&tenant), Period::Month),
                    (Scope::Key(&key), Period::Day),
                    (Scope::Key(&key), Period::Month),
                ] {
                    let t = totals.entry((scope.key(), period.of(ts))).or_insert((0, 0));
                    t.0 = t.0.saturating_add(cost.unwrap_or(0));
                    t.1 += 1;
                }
            }
        }
        if !totals.is_empty() {
            // Sorted: concurrent writers (replicas) lock total rows in one order.
            let mut sorted: Vec<_> = totals.into_iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for chunk in sorted.chunks(1000) {
                let mut sql = String::from(
                    "INSERT INTO usage_totals (scope, period, cost_nanousd, requests) VALUES ",
                );
                for i in 0..chunk.len() {
                    if i > 0 {
                        sql.push_str(", ");
                    }
                    let b = i * 4;
                    sql.push_str(&format!("(${}, ${}, ${}, ${})", b + 1, b + 2, b + 3, b + 4));
                }
                sql.push_str(
                    " ON CONFLICT (scope, period) DO UPDATE SET \
                     cost_nanousd = usage_totals.cost_nanousd + excluded.cost_nanousd, \
                     requests = usage_totals.requests + excluded.requests",
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str())).persistent(false);
                for ((scope, period), (cost, n)) in chunk {
                    q = q
                        .bind(scope.as_str())
                        .bind(period.as_str())
                        .bind(*cost)
                        .bind(*n);
                }
                q.execute(&mut *tx).await?;
            }
        }
        tx.commit().await
    }

    /// Nano-USD spent in each `(scope, period)` asked for (0 where nothing was recorded).
    pub async fn spent(&self, keys: &[(String, String)]) -> Result<Vec<i64>, sqlx::Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = String::from("SELECT scope, period, cost_nanousd FROM usage_totals WHERE ");
        for i in 0..keys.len() {
            if i > 0 {
                sql.push_str(" OR ");
            }
            sql.push_str(&format!(
                "(scope = ${} AND period = ${})",
                2 * i + 1,
                2 * i + 2
            ));
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
        for (s, p) in keys {
            q = q.bind(s.as_str()).bind(p.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        let mut out = vec![0; keys.len()];
        for r in rows {
            let (s, p, c): (String, String, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            if let Some(i) = keys.iter().position(|k| k.0 == s && k.1 == p) {
                out[i] = c;
            }
        }
        Ok(out)
    }
}

/// Whose spending a running total counts.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    Tenant(&'a str),
    Key(&'a str),
}

impl Scope<'_> {
    pub fn key(&self) -> String {
        match self {
            Scope::Tenant(t) => format!("t:{t}"),
            Scope::Key(k) => format!("k:{k}"),
        }
    }
}

/// The budget periods (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    /// The period holding `ts_ms`: `d2026-11-27` or `m2026-11`.
    pub fn of(self, ts_ms: i64) -> String {
        let day = report::format_day(ts_ms.div_euclid(86_400_000));
        match self {
            Period::Day => format!("d{day}"),
            Period::Month => format!("m{}", &day[..7]),
        }
    }

    /// When the period holding `ts_ms` ends (ms).
    pub fn end(self, ts_ms: i64) -> i64 {
        let day = ts_ms.div_euclid(86_400_000);
        match self {
            Period::Day => (day + 1) * 86_400_000,
            Period::Month => report::next_month_start_ms(day),
        }
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Ledger {
    /// Connects, migrates, replays a spool left by an earlier run, and starts the writer.
    pub async fn open(cfg: &LedgerConfig) -> anyhow::Result<Ledger> {
        let db = Db::connect(&cfg.url).await?;
        let stats = Arc::new(LedgerStats::default());
        let mut spool = Spool::new(cfg.spool.clone());
        spool.replay(&db, &stats).await;
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(db.clone(), rx, spool, stats.clone()));
        Ok(Ledger { db, queue, stats })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}

impl UsageSink for Ledger {
    fn record(&self, event: UsageEvent) -> BoxFuture<'static, ()> {
        let (done, wait) = oneshot::channel();
        // Enqueued now, in call order, even if the future is never polled.
        let queued = self.queue.send(Job {
            row: Row::of(&event),
            done,
        });
        let stats = self.stats.clone();
        Box::pin(async move {
            match queued {
                Ok(()) => {
                    // The writer always answers; a closed channel means it is gone.
                    if wait.await.is_err() {
                        tracing::error!("usage ledger writer stopped");
                    }
                }
                Err(mpsc::error::SendError(job)) => {
                    stats.lost.fetch_add(1, Ordering::Relaxed);
                    lost(&job.row, "the ledger writer has stopped");
                }
            }
        })
    }
}

/// The last resort: the row goes to the error log, whole, for an operator to re-enter.
fn lost(row: &Row, why: &str) {
    tracing::error!(
        row = %serde_json::to_string(row).unwrap_or_default(),
        "usage row not stored: {why}"
    );
}

async fn writer(
    db: Db,
    mut rx: mpsc::UnboundedReceiver<Job>,
    mut spool: Spool,
    stats: Arc<LedgerStats>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        let got = if spool.pending {
            tokio::time::timeout(SPOOL_RETRY, rx.recv_many(&mut jobs, MAX_BATCH))
                .await
                .ok()
        } else {
            Some(rx.recv_many(&mut jobs, MAX_BATCH).await)
        };
        if spool.pending && spool.due() {
            spool.replay(&db, &stats).await;
        }
        match got {
            Some(0) => return,
            None => continue,
            Some(_) => {}
        }
        let rows: Vec<&Row> = jobs.iter().map(|j| &j.row).collect();
        match db.insert(&rows).await {
            Ok(()) => {
                stats
                    .committed
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, rows = rows.len(), "usage ledger commit failed; spooling");
                match spool.append(&rows) {
                    Ok(()) => {
                        stats
                            .spooled
                            .fetch_add(rows.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        stats.lost.fetch_add(rows.len() as u64, Ordering::Relaxed);
                        for r in &rows {
                            lost(r, &format!("spool write failed: {e}"));
                        }
                    }
                }
            }
        }
        for job in jobs.drain(..) {
            let _ = job.done.send(());
        }
    }
}

/// Rows waiting for the database, one JSON line each, fsynced before their requests end.
struct Spool {
    path: PathBuf,
    pending: bool,
    last_try: Option<std::time::Instant>,
}

impl Spool {
    fn new(path: PathBuf) -> Spool {
        let pending = std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
        Spool {
            path,
            pending,
            last_try: None,
        }
    }

    fn due(&self) -> bool {
        self.last_try.is_none_or(|t| t.elapsed() >= SPOOL_RETRY)
    }

    fn append(&mut self, rows: &[&Row]) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut buf = Vec::with_capacity(rows.len() * 512);
        for r in rows {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&buf)?;
        f.sync_data()?;
        self.pending = true;
        self.last_try.get_or_insert_with(std::time::Instant::now);
        Ok(())
    }

    /// Moves spooled rows into the database, then empties the spool. A crash between the two
    /// replays them again next time, which inserts nothing twice (ids are unique).
    async fn replay(&mut self, db: &Db, stats: &LedgerStats) {
        if !self.pending {
            return;
        }
        self.last_try = Some(std::time::Instant::now());
        let rows = match read_spool(&self.path) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "cannot read the usage spool");
                return;
            }
        };
        let refs: Vec<&Row> = rows.iter().collect();
        if let Err(e) = db.insert(&refs).await {
            tracing::warn!(error = %e, rows = rows.len(), "usage spool not replayed yet");
            return;
        }
        let emptied = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .and_then(|f| {
                f.set_len(0)?;
                f.sync_all()
            });
        match emptied {
            Ok(()) => {
                self.pending = false;
                stats
                    .committed
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                tracing::info!(rows = rows.len(), "usage spool replayed into the ledger");
            }
            Err(e) => tracing::error!(error = %e, "usage spool replayed but not emptied"),
        }
    }
}

/// The spool's rows. A last line cut short by a crash is skipped: its requests were never
/// released (the write had not returned), and any whole copy of a row is inserted only once.
fn read_spool(path: &Path) -> std::io::Result<Vec<Row>> {
    let f = std::fs::File::open(path)?;
    let mut rows = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        match serde_json::from_str::<Row>(&line) {
            Ok(r) => rows.push(r),
            Err(e) if !line.trim().is_empty() => {
                tracing::warn!(error = %e, "skipping an unreadable usage spool line");
            }
            Err(_) => {}
        }
    }
    Ok(rows)
}
