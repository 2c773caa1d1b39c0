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
use sqlx::{AnyConnection, AnyPool, Connection as _, Executor as _, Row as _};
use tokio::sync::{mpsc, oneshot};

use crate::backends::BoxFuture;
use crate::cache::CacheUse;
use crate::metering::{UsageEvent, UsageSink};

/// Most rows committed in one transaction (and one INSERT statement: 25 columns × 400 rows stays
/// under SQLite's 32,766 bound parameters).
const MAX_BATCH: usize = 400;

/// Rows per INSERT statement, and the most bytes of values one carries. A transaction holds as
/// many statements as its batch needs. sqlx does not set TCP_NODELAY, and a statement much
/// larger than this (measured: 62 rows, about 20 KB) waited 40–90 ms on PostgreSQL for a
/// delayed ACK; chunks of 32 rows never did (BENCHMARKS.md, "Usage ledger").
const MAX_ROWS_PER_INSERT: usize = 32;
const MAX_BYTES_PER_INSERT: usize = 8 << 10;
/// SQLite's statement size: 2,500 bound values, well under its 32,766.
const MAX_ROWS_PER_INSERT_SQLITE: usize = 100;

/// The longest a commit may hold the requests waiting on it before they are spooled instead.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(3);

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

/// Schema migrations, applied in order at start; each runs once (table `fuke_schema`): the
/// version, then its statements for SQLite and for PostgreSQL. Tables use only TEXT and BIGINT
/// columns (SQLite has no BOOLEAN, and money is integer nano-USD: no floats, no NUMERIC the
/// `Any` driver cannot read).
type Migration = (i64, &'static [&'static str], &'static [&'static str]);

const V1_LEDGER: &[&str] = &[
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
    )",
    "CREATE INDEX IF NOT EXISTS usage_ledger_tenant_ts ON usage_ledger (tenant, ts_ms)",
    "CREATE INDEX IF NOT EXISTS usage_ledger_ts ON usage_ledger (ts_ms)",
    "CREATE INDEX IF NOT EXISTS usage_ledger_request_id ON usage_ledger (request_id)",
];

// Running totals per scope (`t:TENANT`, `k:KEY_ID`) and period (`d2026-11-27`, `m2026-11`,
// UTC): budgets read one row, and every replica sharing the database sees the same total.
const V2_TOTALS: &[&str] = &["CREATE TABLE IF NOT EXISTS usage_totals (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        cost_nanousd BIGINT NOT NULL,
        requests BIGINT NOT NULL,
        PRIMARY KEY (scope, period)
    )"];

/// Version 3, PostgreSQL only: a statement-level trigger keeps the totals from the rows each
/// INSERT actually inserted (an id already present adds nothing), upserting in sorted order
/// (replicas lock total rows in one order). A batch is then one statement: no `RETURNING` rows
/// back, no second statement, no explicit transaction. SQLite has only row-level triggers,
/// whose four upserts per row doubled the cost of a row (measured), so there the writer sends
/// the batch and its totals as one multi-statement transaction instead ([`Db::insert_on`]).
const V3_TOTALS_TRIGGER_POSTGRES: &[&str] = &[
    "CREATE OR REPLACE FUNCTION fuke_usage_totals() RETURNS trigger LANGUAGE plpgsql AS $fuke$
    BEGIN
        INSERT INTO usage_totals (scope, period, cost_nanousd, requests)
        SELECT s.scope, s.period, SUM(COALESCE(n.cost_nanousd, 0)), COUNT(*)
        FROM fuke_new_rows AS n
        CROSS JOIN LATERAL (VALUES
            ('k:' || n.key_id, 'd' || to_char(to_timestamp(n.ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
            ('k:' || n.key_id, 'm' || to_char(to_timestamp(n.ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM')),
            ('t:' || n.tenant, 'd' || to_char(to_timestamp(n.ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
            ('t:' || n.tenant, 'm' || to_char(to_timestamp(n.ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM'))
        ) AS s(scope, period)
        GROUP BY s.scope, s.period
        ORDER BY s.scope, s.period
        ON CONFLICT (scope, period) DO UPDATE SET
            cost_nanousd = usage_totals.cost_nanousd + excluded.cost_nanousd,
            requests = usage_totals.requests + excluded.requests;
        RETURN NULL;
    END
    $fuke$",
    "DROP TRIGGER IF EXISTS usage_ledger_totals ON usage_ledger",
    "CREATE TRIGGER usage_ledger_totals AFTER INSERT ON usage_ledger
        REFERENCING NEW TABLE AS fuke_new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION fuke_usage_totals()",
];

/// Version 4, SQLite only: builds between two commits of 2026-11-27 applied a version 3 on
/// SQLite that created a row trigger, `usage_ledger_totals`, keeping the totals; version 3 was
/// then emptied for SQLite (the writer sums each batch itself), so a database those builds
/// migrated kept the trigger and counted every row twice in its totals, and budgets ran out at
/// half the spend. Where that trigger is present, this rebuilds the totals from the rows (the
/// rows, and so the bills, were always right) and drops it; elsewhere it changes nothing.
const V4_DROP_SQLITE_ROW_TRIGGER: &[&str] = &[
    "DELETE FROM usage_totals WHERE EXISTS
        (SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'usage_ledger_totals')",
    "INSERT INTO usage_totals (scope, period, cost_nanousd, requests)
    SELECT scope, period, SUM(cost), COUNT(*) FROM (
        SELECT 'k:' || key_id AS scope,
            'd' || strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch') AS period,
            COALESCE(cost_nanousd, 0) AS cost FROM usage_ledger
        UNION ALL SELECT 'k:' || key_id, 'm' || strftime('%Y-%m', ts_ms / 1000, 'unixepoch'),
            COALESCE(cost_nanousd, 0) FROM usage_ledger
        UNION ALL SELECT 't:' || tenant, 'd' || strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch'),
            COALESCE(cost_nanousd, 0) FROM usage_ledger
        UNION ALL SELECT 't:' || tenant, 'm' || strftime('%Y-%m', ts_ms / 1000, 'unixepoch'),
            COALESCE(cost_nanousd, 0) FROM usage_ledger
    )
    WHERE EXISTS
        (SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'usage_ledger_totals')
    GROUP BY scope, period",
    "DROP TRIGGER IF EXISTS usage_ledger_totals",
];

const MIGRATIONS: &[Migration] = &[
    (1, V1_LEDGER, V1_LEDGER),
    (2, V2_TOTALS, V2_TOTALS),
    (3, &[], V3_TOTALS_TRIGGER_POSTGRES),
    (4, V4_DROP_SQLITE_ROW_TRIGGER, &[]),
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

/// Most tokens one row records, and most nano-USD ($1M) one row costs: an upstream that
/// reports absurd usage cannot make sums overflow (which would fail every report and budget
/// check over that row, and the batch holding it).
const MAX_TOKENS: i64 = 1_000_000_000_000;
const MAX_COST: i64 = 1_000_000_000_000_000;

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX).min(MAX_TOKENS)
}

impl Row {
    /// About how many bytes its values take in a Bind message.
    fn approx_bytes(&self) -> usize {
        let text = self.id.len()
            + self.request_id.len()
            + self.tenant.len()
            + self.key_id.len()
            + self.endpoint.len()
            + self.model.len()
            + self.served_model.len()
            + self.backend.len()
            + self.usage_source.len()
            + self.cache.len()
            + self.fallback.as_ref().map_or(0, String::len)
            + self.outcome.len()
            + self.price_version.as_ref().map_or(0, String::len)
            + self.rules.as_ref().map_or(0, String::len);
        text + COLUMNS.len() * 4 + 14 * 8
    }

    /// The row of one usage event; `id` is minted here, once per event.
    pub fn of(ev: &UsageEvent) -> Row {
        let (usage, source) = ev.billed();
        let (cost, version) = match ev.cost() {
            Some((c, v)) => (Some(c.clamp(0, MAX_COST)), Some(v.to_string())),
            None => (None, None),
        };
        Row {
            id: hex::encode(time_ordered_id()),
            request_id: ev.request_id.to_string(),
            ts_ms: ev
                .finished_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            tenant: ev.tenant.to_string(),
            key_id: ev.key_id.to_string(),
            endpoint: ev.endpoint.as_str().to_string(),
            model: ev.model_alias.to_string(),
            served_model: ev.upstream_model.to_string(),
            backend: ev.backend.to_string(),
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

/// The file a `sqlite:` URL names (without its `?` options); `None` for other URLs.
pub fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    rest.split('?').next()
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
    /// Whether a commit waits for the disk (default). Off, a committed row survives the
    /// gateway being killed but not the database machine losing power: SQLite runs
    /// `synchronous=NORMAL` (WAL appended, fsynced at checkpoints), PostgreSQL
    /// `synchronous_commit=off` for the writer.
    pub fsync: bool,
}

impl LedgerConfig {
    /// The embedded default: `<data_dir>/ledger.db`, spool beside it.
    pub fn embedded(data_dir: &Path) -> LedgerConfig {
        LedgerConfig {
            url: format!("sqlite://{}", data_dir.join("ledger.db").display()),
            spool: data_dir.join("ledger-spool.jsonl"),
            fsync: true,
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
    /// Rows written to the spool because the database refused them or was down.
    pub spooled: AtomicU64,
    /// Rows that neither the database nor the spool would take (logged in full).
    pub lost: AtomicU64,
}

struct Job {
    row: Row,
    done: oneshot::Sender<()>,
}

/// A connection pool and what it talks to.
#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub kind: Kind,
}

/// What a pool is for: the writer's one connection, or the readers' (reports, budgets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// One connection, migrations applied, short waits: a stuck database must send rows to
    /// the spool quickly, not hold every response.
    Writer,
    /// A few connections for reports and budget checks, which never take the writer's.
    Reader,
    /// Reading only (`fuke usage`): SQLite opened read-only, no migrations, nothing created.
    ReadOnly,
}

impl Db {
    /// Connects as the writer: creates a SQLite file and its directory if needed, and applies
    /// migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        Db::open(url, Role::Writer).await
    }

    pub async fn open(url: &str, role: Role) -> anyhow::Result<Db> {
        Db::open_with(url, role, true).await
    }

    /// [`Db::open`], choosing whether the writer's commits wait for the disk
    /// ([`LedgerConfig::fsync`]).
    pub async fn open_with(url: &str, role: Role, fsync: bool) -> anyhow::Result<Db> {
        let kind = Kind::of_url(url).ok_or_else(|| {
            anyhow::anyhow!("ledger url must start with sqlite:// or postgres://")
        })?;
        install_default_drivers();
        let mut url = url.to_string();
        if let Some(path) = sqlite_path(&url).map(str::to_string) {
            if role == Role::ReadOnly {
                anyhow::ensure!(Path::new(&path).exists(), "no ledger at {path}");
            } else if let Some(dir) = Path::new(&path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir)?;
            }
            if !url.contains('?') {
                url.push_str(if role == Role::ReadOnly {
                    "?mode=ro"
                } else {
                    "?mode=rwc"
                });
            }
        }
        let (max, wait) = match role {
            Role::Writer => (1, Duration::from_secs(2)),
            Role::Reader | Role::ReadOnly => (READER_CONNECTIONS, Duration::from_secs(5)),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(wait)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    match kind {
                        Kind::Sqlite => {
                            // WAL: readers never block the writer. FULL: a commit survives
                            // power loss, not only a killed process; group commit pays for
                            // the fsync.
                            if role != Role::ReadOnly {
                                conn.execute("PRAGMA journal_mode = WAL").await?;
                                conn.execute(if fsync {
                                    "PRAGMA synchronous = FULL"
                                } else {
                                    "PRAGMA synchronous = NORMAL"
                                })
                                .await?;
                            }
                            conn.execute("PRAGMA busy_timeout = 5000").await?;
                        }
                        // A statement stuck on a lock or a slow disk ends in an error (the
                        // rows are spooled); it never holds responses indefinitely.
                        Kind::Postgres if role == Role::Writer => {
                            conn.execute("SET statement_timeout = 10000").await?;
                            conn.execute("SET lock_timeout = 5000").await?;
                            if !fsync {
                                conn.execute("SET synchronous_commit = off").await?;
                            }
                        }
                        Kind::Postgres => {
                            conn.execute("SET statement_timeout = 30000").await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        let db = Db { pool, kind };
        if role == Role::Writer {
            db.migrate().await?;
        }
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
        for (version, sqlite, postgres) in MIGRATIONS {
            if done.contains(version) {
                continue;
            }
            let stmts = match self.kind {
                Kind::Sqlite => sqlite,
                Kind::Postgres => postgres,
            };
            for stmt in stmts.iter() {
                tx.execute(*stmt).await?;
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

    /// The `n`th (1-based) bind parameter: `$n` for PostgreSQL, `?` for SQLite, where sqlx
    /// looks up every named parameter by name (measured: a quarter of a batch's instructions
    /// went to `sqlite3_bind_parameter_name` with `$n`).
    fn placeholder(&self, sql: &mut String, n: usize) {
        match self.kind {
            Kind::Sqlite => sql.push('?'),
            Kind::Postgres => {
                sql.push('$');
                sql.push_str(&n.to_string());
            }
        }
    }

    /// Inserts rows; an id already present is left as it is. Rows inserted, and only those,
    /// are added to the running totals in the same transaction.
    pub async fn insert(&self, rows: &[&Row]) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.insert_on(&mut conn, rows).await
    }

    /// [`Db::insert`] on a connection the caller holds (the writer keeps one: no pool
    /// round trip, liveness ping or return task per batch). Each round trip to sqlx's SQLite
    /// thread or to PostgreSQL cost 0.2–0.7 ms of waiting under load (measured), so a batch
    /// is one:
    /// - PostgreSQL: one `INSERT … ON CONFLICT (id) DO NOTHING` per 32 rows, alone and
    ///   committed by itself when the batch fits one; migration 3's trigger keeps the totals.
    /// - SQLite: `BEGIN IMMEDIATE; INSERT OR ROLLBACK …; <totals upsert>; COMMIT` as one multi-statement
    ///   call. The totals count every row, so an id already present must not be inserted
    ///   over: it rolls the transaction back, and the batch goes again with `RETURNING`,
    ///   counting only the rows that went in.
    pub async fn insert_on(
        &self,
        conn: &mut AnyConnection,
        rows: &[&Row],
    ) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        match self.kind {
            Kind::Postgres => {
                let mut chunks = insert_chunks(rows, self.kind).peekable();
                let Some(first) = chunks.next() else {
                    return Ok(());
                };
                if chunks.peek().is_none() {
                    return self.insert_rows(conn, first, false).await.map(|_| ());
                }
                let mut tx = conn.begin().await?;
                self.insert_rows(&mut tx, first, false).await?;
                for chunk in chunks {
                    self.insert_rows(&mut tx, chunk, false).await?;
                }
                tx.commit().await
            }
            Kind::Sqlite => match self.insert_sqlite_batch(conn, rows).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    // No transaction may stay open on this connection, whatever failed.
                    let _ = conn.execute("ROLLBACK").await;
                    match &e {
                        sqlx::Error::Database(d) if d.is_unique_violation() => {
                            self.insert_returning(conn, rows).await
                        }
                        _ => Err(e),
                    }
                }
            },
        }
    }

    /// SQLite's one-call batch (see [`Db::insert_on`]).
    async fn insert_sqlite_batch(
        &self,
        conn: &mut AnyConnection,
        rows: &[&Row],
    ) -> Result<(), sqlx::Error> {
        let mut totals = Totals::default();
        for r in rows {
            totals.add(&r.tenant, &r.key_id, r.ts_ms, r.cost_nanousd);
        }
        let mut sql = String::with_capacity(256 + rows.len() * 160);
        sql.push_str("BEGIN IMMEDIATE; ");
        let mut n = 0;
        for chunk in insert_chunks(rows, self.kind) {
            self.insert_sql(&mut sql, "INSERT OR ROLLBACK", chunk.len(), &mut n);
            sql.push_str("; ");
        }
        self.totals_sql(&mut sql, totals.0.len(), &mut n);
        sql.push_str("; COMMIT");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
        for r in rows {
            q = bind_row(q, r);
        }
        totals.bind(q).execute(conn).await.map(|_| ())
    }

    /// Rows some of which may be present already (SQLite): one transaction, inserts with
    /// `RETURNING`, and totals from what came back.
    async fn insert_returning(
        &self,
        conn: &mut AnyConnection,
        rows: &[&Row],
    ) -> Result<(), sqlx::Error> {
        let mut tx = conn.begin().await?;
        let mut totals = Totals::default();
        for chunk in insert_chunks(rows, self.kind) {
            for r in self.insert_rows(&mut tx, chunk, true).await? {
                let tenant: String = r.try_get(0)?;
                let key: String = r.try_get(1)?;
                totals.add(&tenant, &key, r.try_get(2)?, r.try_get(3)?);
            }
        }
        if !totals.0.is_empty() {
            let mut sql = String::new();
            let mut n = 0;
            self.totals_sql(&mut sql, totals.0.len(), &mut n);
            totals
                .bind(sqlx::query(sqlx::AssertSqlSafe(sql.as_str())))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// One multi-row `INSERT … ON CONFLICT (id) DO NOTHING`, with `RETURNING` the inserted
    /// rows' tenant, key, time and cost when asked.
    async fn insert_rows(
        &self,
        conn: &mut AnyConnection,
        chunk: &[&Row],
        returning: bool,
    ) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
        let mut sql = String::with_capacity(128 + chunk.len() * 160);
        let mut n = 0;
        self.insert_sql(&mut sql, "INSERT", chunk.len(), &mut n);
        sql.push_str(" ON CONFLICT (id) DO NOTHING");
        if returning {
            sql.push_str(" RETURNING tenant, key_id, ts_ms, cost_nanousd");
        }
        // Column names and placeholders only; every value is bound. Kept prepared (one
        // statement per chunk size).
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
        for r in chunk {
            q = bind_row(q, r);
        }
        if returning {
            q.fetch_all(conn).await
        } else {
            q.execute(conn).await.map(|_| Vec::new())
        }
    }

    /// `VERB INTO usage_ledger (…) VALUES (…), …` for `rows` rows, numbering placeholders
    /// after `n`.
    fn insert_sql(&self, sql: &mut String, verb: &str, rows: usize, n: &mut usize) {
        sql.push_str(verb);
        sql.push_str(" INTO usage_ledger (");
        sql.push_str(&COLUMNS.join(", "));
        sql.push_str(") VALUES ");
        self.tuples(sql, rows, COLUMNS.len(), n);
    }

    /// `(…), (…)`: `rows` tuples of `width` placeholders, numbered after `n`.
    fn tuples(&self, sql: &mut String, rows: usize, width: usize, n: &mut usize) {
        for i in 0..rows {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..width {
                if c > 0 {
                    sql.push_str(", ");
                }
                *n += 1;
                self.placeholder(sql, *n);
            }
            sql.push(')');
        }
    }

    /// The running-totals upsert for `pairs` (scope, period) rows.
    fn totals_sql(&self, sql: &mut String, pairs: usize, n: &mut usize) {
        sql.push_str("INSERT INTO usage_totals (scope, period, cost_nanousd, requests) VALUES ");
        self.tuples(sql, pairs, 4, n);
        sql.push_str(
            " ON CONFLICT (scope, period) DO UPDATE SET \
             cost_nanousd = usage_totals.cost_nanousd + excluded.cost_nanousd, \
             requests = usage_totals.requests + excluded.requests",
        );
    }

    /// Nano-USD spent in each `(scope, period)` asked for (0 where nothing was recorded).
    pub async fn spent(&self, keys: &[(String, String)]) -> Result<Vec<i64>, sqlx::Error> {
        let mut out = vec![0; keys.len()];
        let mut index: HashMap<(&str, &str), usize> = HashMap::with_capacity(keys.len());
        for (i, (s, p)) in keys.iter().enumerate() {
            index.insert((s.as_str(), p.as_str()), i);
        }
        // 100 pairs (200 parameters) per query: far below every bound-parameter limit.
        for chunk in keys.chunks(100) {
            let mut sql =
                String::from("SELECT scope, period, cost_nanousd FROM usage_totals WHERE ");
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(" OR ");
                }
                sql.push_str("(scope = ");
                self.placeholder(&mut sql, 2 * i + 1);
                sql.push_str(" AND period = ");
                self.placeholder(&mut sql, 2 * i + 2);
                sql.push(')');
            }
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
            for (s, p) in chunk {
                q = q.bind(s.as_str()).bind(p.as_str());
            }
            for r in q.fetch_all(&self.pool).await? {
                let (s, p, c): (String, String, i64) =
                    (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
                if let Some(&i) = index.get(&(s.as_str(), p.as_str())) {
                    out[i] = c;
                }
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

/// Splits rows into INSERT statements: for PostgreSQL at most [`MAX_ROWS_PER_INSERT`] rows
/// and about [`MAX_BYTES_PER_INSERT`] bytes of values; for SQLite, in process, with no network
/// to wait on, up to [`MAX_ROWS_PER_INSERT_SQLITE`] rows (each statement is one round trip
/// to sqlx's worker thread).
fn insert_chunks<'a, 'r>(rows: &'a [&'r Row], kind: Kind) -> impl Iterator<Item = &'a [&'r Row]> {
    let (max_rows, max_bytes) = match kind {
        Kind::Postgres => (MAX_ROWS_PER_INSERT, MAX_BYTES_PER_INSERT),
        Kind::Sqlite => (MAX_ROWS_PER_INSERT_SQLITE, usize::MAX),
    };
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len() && n < max_rows {
            bytes += rest[n].approx_bytes();
            if n > 0 && bytes > max_bytes {
                break;
            }
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// Cost and request count per (scope, period), sorted: writers that share a database lock
/// total rows in one order.
#[derive(Default)]
struct Totals(std::collections::BTreeMap<(String, String), (i64, i64)>);

impl Totals {
    fn add(&mut self, tenant: &str, key: &str, ts_ms: i64, cost: Option<i64>) {
        for (scope, period) in [
            (Scope::Tenant(tenant), Period::Day),
            (Scope::Tenant(tenant), Period::Month),
            (Scope::Key(key), Period::Day),
            (Scope::Key(key), Period::Month),
        ] {
            let t = self.0.entry((scope.key(), period.of(ts_ms))).or_default();
            t.0 = t.0.saturating_add(cost.unwrap_or(0));
            t.1 += 1;
        }
    }

    /// Binds the values of [`Db::totals_sql`]'s rows, in order.
    fn bind<'q>(&'q self, mut q: AnyQuery<'q>) -> AnyQuery<'q> {
        for ((scope, period), (cost, count)) in &self.0 {
            q = q
                .bind(scope.as_str())
                .bind(period.as_str())
                .bind(*cost)
                .bind(*count);
        }
        q
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// Binds one row's values, in [`COLUMNS`] order.
fn bind_row<'q>(q: AnyQuery<'q>, r: &'q Row) -> AnyQuery<'q> {
    q.bind(r.id.as_str())
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
        .bind(r.rules.as_deref())
}

/// 128 bits: milliseconds since the epoch (48), then 80 random bits. Ids minted this way grow,
/// so new rows land at the end of an index on them instead of at random places in it
/// (measured: a third of the insert cost for row ids; gateway-minted request ids use it too).
pub fn time_ordered_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..6].copy_from_slice(&now_ms().to_be_bytes()[2..]);
    id[6..].copy_from_slice(&rand::random::<[u8; 10]>());
    id
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Reader connections (of [`READER_CONNECTIONS`]) that usage reports may hold at once: the
/// rest stay free for the budget checks on the request path, which fail closed when they
/// cannot read the totals, so a burst of wide reports never refuses model traffic.
pub const REPORTS_AT_ONCE: usize = 2;

/// Connections in the pool of a reader ([`Role::Reader`]).
const READER_CONNECTIONS: u32 = 4;

/// The ledger's database for reports and budget checks; empty while it has not been reached.
#[derive(Clone)]
pub struct Reader {
    db: Arc<std::sync::OnceLock<Db>>,
    reports: Arc<tokio::sync::Semaphore>,
}

impl Default for Reader {
    fn default() -> Reader {
        Reader {
            db: Arc::default(),
            reports: Arc::new(tokio::sync::Semaphore::new(REPORTS_AT_ONCE)),
        }
    }
}

impl Reader {
    pub fn db(&self) -> Option<&Db> {
        self.db.get()
    }

    /// A reader already connected (tests, tools).
    pub fn of(db: Db) -> Reader {
        let r = Reader::default();
        let _ = r.db.set(db);
        r
    }

    /// A place for one usage report, held while it runs: waits up to `wait` while
    /// [`REPORTS_AT_ONCE`] reports are running, then `None`.
    pub async fn report_slot(&self, wait: Duration) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(wait, self.reports.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

/// The durable usage sink (see the module docs).
pub struct Ledger {
    reader: Reader,
    queue: mpsc::UnboundedSender<Job>,
    pub stats: Arc<LedgerStats>,
}

impl Ledger {
    /// Connects, migrates, replays a spool left by an earlier run, and starts the writer. A
    /// PostgreSQL that cannot be reached does not stop the start: rows are spooled until it
    /// answers. A SQLite file that cannot be opened does (that is a local configuration error).
    pub async fn open(cfg: &LedgerConfig) -> anyhow::Result<Ledger> {
        let kind = Kind::of_url(&cfg.url).ok_or_else(|| {
            anyhow::anyhow!("ledger url must start with sqlite:// or postgres://")
        })?;
        let stats = Arc::new(LedgerStats::default());
        let reader = Reader::default();
        let mut spool = Spool::new(cfg.spool.clone());
        let db = match connect_both(&cfg.url, cfg.fsync, &reader).await {
            Ok(db) => {
                spool.replay(&db, &stats).await;
                Some(db)
            }
            Err(e) if kind == Kind::Sqlite => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, "usage ledger database unreachable; rows are spooled until it answers");
                None
            }
        };
        // Without its database the writer spools; a task keeps trying to reach it and hands
        // the connection over, so no request waits on a connection attempt.
        let (found, db_later) = oneshot::channel();
        if db.is_none() {
            let (url, fsync, reader) = (cfg.url.clone(), cfg.fsync, reader.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SPOOL_RETRY).await;
                    match connect_both(&url, fsync, &reader).await {
                        Ok(d) => {
                            tracing::info!("usage ledger database reached");
                            let _ = found.send(d);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "usage ledger database still unreachable")
                        }
                    }
                }
            });
        }
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(db, db_later, rx, spool, stats.clone()));
        Ok(Ledger {
            reader,
            queue,
            stats,
        })
    }

    /// Reports and budgets read through this.
    pub fn reader(&self) -> Reader {
        self.reader.clone()
    }
}

/// The writer's pool (migrated), then the readers' pool, published to `reader`.
async fn connect_both(url: &str, fsync: bool, reader: &Reader) -> anyhow::Result<Db> {
    let writer = Db::open_with(url, Role::Writer, fsync).await?;
    let readers = Db::open(url, Role::Reader).await?;
    let _ = reader.db.set(readers);
    Ok(writer)
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

/// Commits queued rows, a batch per transaction. While the spool holds rows (the database
/// failed) or the database has not been reached, new rows go straight to the spool, and the
/// database is tried again every [`SPOOL_RETRY`]: a failing database costs each request one
/// fsync, not a timeout.
async fn writer(
    mut db: Option<Db>,
    mut db_later: oneshot::Receiver<Db>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    mut spool: Spool,
    stats: Arc<LedgerStats>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    // The writer's connection, held across batches; dropped (closed) after any failure.
    let mut conn: Option<sqlx::pool::PoolConnection<sqlx::Any>> = None;
    loop {
        let got = if spool.pending || db.is_none() {
            tokio::time::timeout(SPOOL_RETRY, rx.recv_many(&mut jobs, MAX_BATCH))
                .await
                .ok()
        } else {
            Some(rx.recv_many(&mut jobs, MAX_BATCH).await)
        };
        if db.is_none()
            && let Ok(d) = db_later.try_recv()
        {
            db = Some(d);
        }
        if let Some(d) = &db
            && spool.pending
            && spool.due()
        {
            // The writer's pool has one connection; the replay takes it from there.
            conn = None;
            spool.replay(d, &stats).await;
        }
        match got {
            Some(0) => return,
            None => continue,
            Some(_) => {}
        }
        let rows: Vec<&Row> = jobs.iter().map(|j| &j.row).collect();
        let committed = match &db {
            // Bounded: a database that hangs sends the batch to the spool (if it commits
            // after all, the replay finds the ids there and inserts nothing twice).
            Some(d) if !spool.pending => {
                let done = tokio::time::timeout(COMMIT_TIMEOUT, async {
                    // A held connection the database has since dropped (a restart, an idle
                    // timeout, an operator's pg_terminate_backend) fails once; the batch goes
                    // again on a fresh one before anything is spooled. Safe to repeat: ids
                    // that landed are skipped, and only inserted rows reach the totals.
                    if let Some(c) = &mut conn {
                        match d.insert_on(c, &rows).await {
                            Ok(()) => return Ok(()),
                            Err(e) => {
                                tracing::warn!(error = %e, "usage ledger connection failed; retrying on a new one");
                                discard(&mut conn);
                            }
                        }
                    }
                    let c = conn.insert(d.pool.acquire().await?);
                    d.insert_on(c, &rows).await
                })
                .await;
                if !matches!(done, Ok(Ok(()))) {
                    // It may be broken, or left mid-transaction by the timeout.
                    discard(&mut conn);
                }
                match done {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, rows = rows.len(), "usage ledger commit failed; spooling");
                        false
                    }
                    Err(_) => {
                        tracing::error!(
                            rows = rows.len(),
                            "usage ledger commit timed out; spooling"
                        );
                        false
                    }
                }
            }
            _ => false,
        };
        if committed {
            stats
                .committed
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            stats.batches.fetch_add(1, Ordering::Relaxed);
        } else {
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
        for job in jobs.drain(..) {
            let _ = job.done.send(());
        }
    }
}

/// Closes the writer's connection instead of returning it to the pool.
fn discard(conn: &mut Option<sqlx::pool::PoolConnection<sqlx::Any>>) {
    if let Some(mut c) = conn.take() {
        c.close_on_drop();
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
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf);
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir)?;
        }
        let created = !self.path.exists();
        // Each batch starts on a new line: a line a crash cut short stays alone (and is
        // skipped), it never swallows the next row.
        let mut buf = Vec::with_capacity(1 + rows.len() * 512);
        buf.push(b'\n');
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
        if created && let Some(dir) = &dir {
            // The new file's name must survive a crash too.
            std::fs::File::open(dir)?.sync_all()?;
        }
        if !self.pending {
            self.last_try = Some(std::time::Instant::now());
        }
        self.pending = true;
        Ok(())
    }

    /// Moves spooled rows into the database, [`MAX_BATCH`] rows per transaction. What is left
    /// after a failure is rewritten as the new spool (a crash in between replays rows again,
    /// which inserts nothing twice: ids are unique).
    async fn replay(&mut self, db: &Db, stats: &LedgerStats) {
        if !self.pending {
            return;
        }
        self.last_try = Some(std::time::Instant::now());
        // A database still down costs the writer a short probe, not a connection timeout.
        if tokio::time::timeout(Duration::from_millis(300), db.pool.acquire())
            .await
            .map_or(true, |c| c.is_err())
        {
            return;
        }
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "cannot read the usage spool");
                return;
            }
        };
        let mut lines = std::io::BufReader::new(f).split(b'\n');
        let mut moved = 0u64;
        loop {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            let mut read_error = None;
            while batch.len() < MAX_BATCH {
                match lines.next() {
                    None => break,
                    Some(Err(e)) => {
                        read_error = Some(e);
                        break;
                    }
                    Some(Ok(line)) => {
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        match serde_json::from_slice::<Row>(&line) {
                            Ok(r) => batch.push(r),
                            Err(e) => {
                                tracing::warn!(error = %e, "skipping an unreadable usage spool line")
                            }
                        }
                    }
                }
            }
            if let Some(e) = read_error {
                tracing::error!(error = %e, "cannot read the usage spool");
                return;
            }
            if batch.is_empty() {
                break;
            }
            let refs: Vec<&Row> = batch.iter().collect();
            let done = match tokio::time::timeout(COMMIT_TIMEOUT, db.insert(&refs)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("timed out".to_string()),
            };
            if let Err(e) = done {
                tracing::warn!(error = %e, moved, "usage spool not fully replayed yet");
                stats.committed.fetch_add(moved, Ordering::Relaxed);
                // Keep this batch and everything after it.
                let rest: Vec<Row> = lines
                    .by_ref()
                    .filter_map(Result::ok)
                    .filter_map(|l| serde_json::from_slice::<Row>(&l).ok())
                    .collect();
                let keep: Vec<&Row> = batch.iter().chain(rest.iter()).collect();
                if let Err(e) = self.rewrite(&keep) {
                    tracing::error!(error = %e, "usage spool not rewritten; it will be replayed whole");
                }
                return;
            }
            moved += batch.len() as u64;
        }
        match self.rewrite(&[]) {
            Ok(()) => {
                self.pending = false;
                stats.committed.fetch_add(moved, Ordering::Relaxed);
                tracing::info!(rows = moved, "usage spool replayed into the ledger");
            }
            Err(e) => tracing::error!(error = %e, "usage spool replayed but not emptied"),
        }
    }

    /// Replaces the spool with `rows`, atomically (write, fsync, rename, fsync the directory).
    fn rewrite(&self, rows: &[&Row]) -> std::io::Result<()> {
        if rows.is_empty() {
            let f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
            f.set_len(0)?;
            return f.sync_all();
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut buf = Vec::with_capacity(rows.len() * 512);
        for r in rows {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}
