//! The usage ledger against real databases: the same suite on a SQLite file and on the
//! machine's PostgreSQL (a fresh database per run), the gateway committing rows before the last
//! byte, reports (`GET /v1/usage`, `fuke usage`), metrics that reconcile with the ledger, and
//! `kill -9` of a loaded gateway losing and duplicating nothing.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuke::cache::CacheUse;
use fuke::ledger::pricing::{Price, Pricing};
use fuke::ledger::{Db, Ledger, LedgerConfig, Row};
use fuke::metering::{Outcome, UsageEvent, UsageSink};
use fuke::openai::{Endpoint, PromptTokensDetails, Usage};
use http::StatusCode;
use http_body_util::BodyExt;
use sqlx::Row as _;
use support::*;

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh PostgreSQL database, dropped when the guard goes.
struct PgDb {
    name: String,
    url: String,
}

impl PgDb {
    async fn create() -> PgDb {
        sqlx::any::install_default_drivers();
        let name = format!("fuke_ledger_{}", hex::encode(rand::random::<[u8; 6]>()));
        let admin = sqlx::AnyPool::connect(PG_ADMIN)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (the machine's; see README)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        PgDb { name, url }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Its own runtime: the test's may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = sqlx::AnyPool::connect(PG_ADMIN).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&admin)
                    .await;
                }
            });
        })
        .join();
    }
}

fn pricing() -> Arc<Pricing> {
    Arc::new(Pricing::new(
        Some("test-1".into()),
        vec![
            (
                "echo-model".into(),
                Price {
                    input: 2500,        // $2.50 per 1M
                    cached_input: 1250, // $1.25
                    output: 10_000,     // $10
                },
            ),
            (
                "cheap".into(),
                Price {
                    input: 150,
                    cached_input: 150,
                    output: 600,
                },
            ),
        ],
    ))
}

fn event(i: usize, tenant: &str, model: &str, usage: Option<Usage>) -> UsageEvent {
    UsageEvent {
        request_id: format!("req-{i}").into(),
        tenant: tenant.into(),
        key_id: format!("{tenant}-key").into(),
        endpoint: Endpoint::ChatCompletions,
        model_alias: format!("alias-{model}").into(),
        upstream_model: model.into(),
        backend: "test".into(),
        usage,
        status: 200,
        latency: Duration::from_millis(5 + i as u64),
        streamed: i.is_multiple_of(2),
        outcome: Outcome::Completed,
        finished_at: SystemTime::now(),
        fallback: i.is_multiple_of(5).then(|| Arc::from("timeout")),
        streamed_chunks: i as u32,
        cache: CacheUse::Miss,
        kb_chunks: (i % 3) as u32,
        rules: if i.is_multiple_of(4) {
            vec![Arc::from("pii/email")]
        } else {
            Vec::new()
        },
        pricing: Some(pricing()),
    }
}

fn usage(prompt: u64, completion: u64, cached: u64) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: (cached > 0).then_some(PromptTokensDetails {
            cached_tokens: cached,
        }),
    }
}

async fn rows(db: &Db) -> Vec<Row> {
    let rs = sqlx::query(
        "SELECT id, request_id, ts_ms, tenant, key_id, endpoint, model, served_model, backend,
            prompt_tokens, completion_tokens, cached_tokens, usage_source, cache, tokens_saved,
            kb_chunks, fallback, status, outcome, streamed, streamed_chunks, latency_ms,
            cost_nanousd, price_version, rules FROM usage_ledger ORDER BY request_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rs.iter()
        .map(|r| Row {
            id: r.get(0),
            request_id: r.get(1),
            ts_ms: r.get(2),
            tenant: r.get(3),
            key_id: r.get(4),
            endpoint: r.get(5),
            model: r.get(6),
            served_model: r.get(7),
            backend: r.get(8),
            prompt_tokens: r.get(9),
            completion_tokens: r.get(10),
            cached_tokens: r.get(11),
            usage_source: r.get(12),
            cache: r.get(13),
            tokens_saved: r.get(14),
            kb_chunks: r.get(15),
            fallback: r.get(16),
            status: r.get(17),
            outcome: r.get(18),
            streamed: r.get::<i64, _>(19) != 0,
            streamed_chunks: r.get(20),
            latency_ms: r.get(21),
            cost_nanousd: r.get(22),
            price_version: r.get(23),
            rules: r.get(24),
        })
        .collect()
}

async fn count(db: &Db) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM usage_ledger")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Every running total: (scope, period, cost, requests), in key order.
async fn totals(db: &Db) -> Vec<(String, String, i64, i64)> {
    sqlx::query_as("SELECT scope, period, cost_nanousd, requests FROM usage_totals ORDER BY 1, 2")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// `usage_totals` (kept by the writer on SQLite, by a trigger on PostgreSQL) holds exactly
/// what the rows add up to, per scope and UTC period as the gateway names them.
async fn assert_totals_match_rows(db: &Db) {
    use fuke::ledger::{Period, Scope};
    let mut want: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for r in rows(db).await {
        for (scope, period) in [
            (Scope::Tenant(&r.tenant), Period::Day),
            (Scope::Tenant(&r.tenant), Period::Month),
            (Scope::Key(&r.key_id), Period::Day),
            (Scope::Key(&r.key_id), Period::Month),
        ] {
            let t = want.entry((scope.key(), period.of(r.ts_ms))).or_default();
            t.0 += r.cost_nanousd.unwrap_or(0);
            t.1 += 1;
        }
    }
    let got: BTreeMap<(String, String), (i64, i64)> = totals(db)
        .await
        .into_iter()
        .map(|(s, p, c, n)| ((s, p), (c, n)))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want, "running totals against the rows");
}

/// The suite both databases pass.
async fn suite(url: String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LedgerConfig {
        url,
        spool: dir.path().join("spool.jsonl"),
        fsync: true,
    };
    let ledger = Ledger::open(&cfg).await.unwrap();
    let db = ledger.reader().db().unwrap().clone();

    // 60 requests finish at once: every one is stored, and they share transactions.
    let mut events = Vec::new();
    for i in 0..60 {
        let (tenant, model) = if i % 3 == 0 {
            ("globex", "cheap")
        } else {
            ("acme", "echo-model")
        };
        let u = match i % 4 {
            0 => None,
            1 => Some(usage(1000, 200, 400)),
            _ => Some(usage(10 + i as u64, 5, 0)),
        };
        let model = if i == 7 { "unpriced" } else { model };
        events.push(event(i, tenant, model, u));
    }
    let futs: Vec<_> = events.iter().cloned().map(|e| ledger.record(e)).collect();
    futures_util::future::join_all(futs).await;
    let stats = &ledger.stats;
    assert_eq!(
        stats.committed.load(std::sync::atomic::Ordering::Relaxed),
        60
    );
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        batches < 10,
        "group commit: 60 rows took {batches} transactions"
    );

    // Every field as the event said, and the cost exact.
    let stored = rows(&db).await;
    assert_eq!(stored.len(), 60);
    let by_id: HashMap<&str, &Row> = stored.iter().map(|r| (r.request_id.as_str(), r)).collect();
    for e in &events {
        let r = by_id[&*e.request_id];
        let want = Row {
            id: r.id.clone(),
            ..Row::of(e)
        };
        assert_eq!(*r, want);
    }
    // 600 × 2.5 + 400 × 1.25 + 200 × 10 per 1M tokens = $0.004.
    assert_eq!(by_id["req-1"].cost_nanousd, Some(4_000_000));
    assert_eq!(by_id["req-1"].cached_tokens, 400);
    assert_eq!(by_id["req-1"].price_version.as_deref(), Some("test-1"));
    assert_eq!(by_id["req-7"].cost_nanousd, None, "unpriced model");
    // req-0: a stream with no usage report: billed by the 0 chunks it delivered (none).
    assert_eq!(by_id["req-0"].usage_source, "none");
    assert_eq!(by_id["req-1"].usage_source, "upstream");

    // Idempotent: the same row again (a spool replay) inserts nothing.
    let again = by_id["req-2"];
    db.insert(&[again, again]).await.unwrap();
    assert_eq!(count(&db).await, 60);
    assert_totals_match_rows(&db).await;

    // Reports: totals per tenant, and per model, match the events.
    let q = |tenant: Option<&str>, group_by| fuke::ledger::report::Query {
        from_ms: 0,
        to_ms: i64::MAX / 2,
        tenant: tenant.map(str::to_string),
        group_by,
    };
    use fuke::ledger::report::{self, GroupBy};
    let rep = report::run(&db, &q(None, GroupBy::Tenant)).await.unwrap();
    assert_eq!(rep.data.len(), 2);
    let expect_cost: i64 = events.iter().filter_map(|e| e.cost()).map(|(c, _)| c).sum();
    assert_eq!(rep.total.cost_nanousd, expect_cost);
    assert_eq!(rep.total.requests, 60);
    let expect_prompt: u64 = events
        .iter()
        .filter_map(|e| e.usage)
        .map(|u| u.prompt_tokens)
        .sum();
    assert_eq!(rep.total.prompt_tokens as u64, expect_prompt);
    assert_eq!(rep.total.unpriced_requests, 1);
    let acme = report::run(&db, &q(Some("acme"), GroupBy::Model))
        .await
        .unwrap();
    assert!(acme.data.iter().all(|l| l.tenant == "acme"));
    assert_eq!(acme.total.requests, 40);
    let day = report::run(&db, &q(None, GroupBy::Day)).await.unwrap();
    assert_eq!(day.total.cost_nanousd, expect_cost);
    assert!(day.data[0].group.as_ref().unwrap().starts_with("20"));

    // The database refuses rows: they go to the spool, the requests still end, and the rows
    // reach the database once it takes them again (here: at the next start), once each.
    sqlx::query("ALTER TABLE usage_ledger RENAME TO usage_ledger_away")
        .execute(&db.pool)
        .await
        .unwrap();
    let late: Vec<UsageEvent> = (100..103)
        .map(|i| event(i, "acme", "echo-model", Some(usage(3, 4, 0))))
        .collect();
    let futs: Vec<_> = late.iter().cloned().map(|e| ledger.record(e)).collect();
    futures_util::future::join_all(futs).await;
    assert_eq!(stats.spooled.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert!(std::fs::metadata(&cfg.spool).unwrap().len() > 0);
    sqlx::query("ALTER TABLE usage_ledger_away RENAME TO usage_ledger")
        .execute(&db.pool)
        .await
        .unwrap();
    drop(ledger);
    db.pool.close().await;
    let reopened = Ledger::open(&cfg).await.unwrap();
    assert_eq!(count(reopened.reader().db().unwrap()).await, 63);
    assert_eq!(std::fs::metadata(&cfg.spool).unwrap().len(), 0);
    drop(reopened);
    let third = Ledger::open(&cfg).await.unwrap();
    assert_eq!(
        count(third.reader().db().unwrap()).await,
        63,
        "a replay never duplicates"
    );
    let db3 = &third.reader().db().unwrap().clone();
    assert_totals_match_rows(db3).await;
    // A batch mixing a present row with a new one adds only the new one.
    let present = rows(db3).await.remove(0);
    let extra = Row {
        id: "00ff".repeat(8),
        request_id: "req-extra".into(),
        ..present.clone()
    };
    db3.insert(&[&present, &extra]).await.unwrap();
    assert_eq!(count(db3).await, 64);
    assert_totals_match_rows(db3).await;
    third.reader().db().unwrap().pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ledger() {
    let dir = tempfile::tempdir().unwrap();
    suite(format!(
        "sqlite://{}",
        dir.path().join("ledger.db").display()
    ))
    .await;
}

/// A SQLite ledger migrated by the builds whose version 3 created a row trigger keeping the
/// totals (later dropped for SQLite, where the writer sums each batch) counted every row twice
/// in its totals. Version 4 rebuilds the totals from the rows and drops the trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_sqlite_totals_trigger_is_dropped_and_the_totals_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let db = Db::connect(&url).await.unwrap();
    // The state those builds left: versions 1-3 applied, the row trigger in place.
    sqlx::query("DELETE FROM fuke_schema WHERE version > 3")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TRIGGER usage_ledger_totals AFTER INSERT ON usage_ledger
        BEGIN
            INSERT INTO usage_totals (scope, period, cost_nanousd, requests) VALUES
                ('k:' || NEW.key_id, 'd' || strftime('%Y-%m-%d', NEW.ts_ms / 1000, 'unixepoch'),
                 COALESCE(NEW.cost_nanousd, 0), 1),
                ('k:' || NEW.key_id, 'm' || strftime('%Y-%m', NEW.ts_ms / 1000, 'unixepoch'),
                 COALESCE(NEW.cost_nanousd, 0), 1),
                ('t:' || NEW.tenant, 'd' || strftime('%Y-%m-%d', NEW.ts_ms / 1000, 'unixepoch'),
                 COALESCE(NEW.cost_nanousd, 0), 1),
                ('t:' || NEW.tenant, 'm' || strftime('%Y-%m', NEW.ts_ms / 1000, 'unixepoch'),
                 COALESCE(NEW.cost_nanousd, 0), 1)
            ON CONFLICT (scope, period) DO UPDATE SET
                cost_nanousd = cost_nanousd + excluded.cost_nanousd,
                requests = requests + excluded.requests;
        END",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let first: Vec<Row> = (0..12)
        .map(|i| {
            let tenant = if i % 3 == 0 { "globex" } else { "acme" };
            Row::of(&event(
                i,
                tenant,
                "echo-model",
                Some(usage(100 + i as u64, 7, 0)),
            ))
        })
        .collect();
    db.insert(&first.iter().collect::<Vec<_>>()).await.unwrap();
    let acme_month = [(
        "t:acme".to_string(),
        fuke::ledger::Period::Month.of(first[1].ts_ms),
    )];
    let acme_requests: i64 = sqlx::query_scalar(
        "SELECT requests FROM usage_totals WHERE scope = 't:acme' AND period LIKE 'm%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(acme_requests, 16, "the hazard: 8 rows counted twice");
    let spent_before = db.spent(&acme_month).await.unwrap();
    db.pool.close().await;

    // The next start applies version 4.
    let db = Db::connect(&url).await.unwrap();
    assert_totals_match_rows(&db).await;
    let spent_after = db.spent(&acme_month).await.unwrap();
    assert!(spent_after[0] > 0);
    assert_eq!(
        spent_before[0],
        2 * spent_after[0],
        "spend was doubled, now exact"
    );
    let triggers: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(triggers, 0);
    // New rows count once.
    let more: Vec<Row> = (12..20)
        .map(|i| Row::of(&event(i, "acme", "echo-model", Some(usage(50, 5, 0)))))
        .collect();
    db.insert(&more.iter().collect::<Vec<_>>()).await.unwrap();
    assert_totals_match_rows(&db).await;
    assert_eq!(count(&db).await, 20);

    // On a ledger without the trigger, version 4 leaves the totals as they are.
    let before = totals(&db).await;
    sqlx::query("DELETE FROM fuke_schema WHERE version = 4")
        .execute(&db.pool)
        .await
        .unwrap();
    db.pool.close().await;
    let db = Db::connect(&url).await.unwrap();
    let after = totals(&db).await;
    assert!(!after.is_empty());
    assert_eq!(before, after);
}

/// The writer keeps its connection between batches. When the database drops it (a restart,
/// an operator's `pg_terminate_backend`), the next batch goes again on a new connection and
/// is committed, not spooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_database_connection_costs_a_retry_not_the_spool() {
    let pg = PgDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig {
        url: pg.url.clone(),
        spool: dir.path().join("spool.jsonl"),
        fsync: true,
    })
    .await
    .unwrap();
    ledger.record(event(0, "acme", "echo-model", None)).await;
    let admin = sqlx::AnyPool::connect(PG_ADMIN).await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&pg.name)
    .fetch_all(&admin)
    .await
    .unwrap();
    admin.close().await;
    assert!(killed.contains(&true), "the writer's connection was open");
    ledger.record(event(1, "acme", "echo-model", None)).await;
    let stats = &ledger.stats;
    assert_eq!(stats.spooled.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(
        stats.committed.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    let db = Db::open(&pg.url, fuke::ledger::Role::Reader).await.unwrap();
    assert_eq!(count(&db).await, 2);
    db.pool.close().await;
    ledger.reader().db().unwrap().pool.close().await;
}

/// `fsync: false` reaches the writer's connection, and only the writer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_off_relaxes_only_the_writers_commits() {
    use fuke::ledger::Role;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    for (fsync, want) in [(true, 2i64), (false, 1)] {
        let db = Db::open_with(&url, Role::Writer, fsync).await.unwrap();
        let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(level, want, "sqlite synchronous with fsync={fsync}");
        db.pool.close().await;
    }
    let pg = PgDb::create().await;
    for (fsync, want) in [(true, "on"), (false, "off")] {
        let db = Db::open_with(&pg.url, Role::Writer, fsync).await.unwrap();
        let got: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(got, want, "postgres synchronous_commit with fsync={fsync}");
        db.pool.close().await;
    }
    let reader = Db::open_with(&pg.url, Role::Reader, false).await.unwrap();
    let got: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&reader.pool)
        .await
        .unwrap();
    assert_eq!(
        got, "on",
        "readers write nothing and keep the server's default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ledger() {
    let pg = PgDb::create().await;
    suite(pg.url.clone()).await;
}

const KEY_FINANCE: &str = "fk-test-finance-0009";

/// The usual test policy plus a finance key, prices for the test upstream's models, and
/// tenants with token limits, key limits and budgets.
fn billing_policy(base_url: &str) -> String {
    format!(
        r#"{}  finance:
    models: []
    keys:
      - {{ id: fin-key, sha256: {}, role: finance }}
  tokens:
    models: [gpt-test]
    limits: {{ tokens_per_minute: 20 }}
    keys:
      - {{ id: tokens-key, sha256: {} }}
  keyed:
    models: [gpt-test]
    keys:
      - {{ id: keyed-1, sha256: {}, limits: {{ requests_per_minute: 1 }} }}
      - {{ id: keyed-2, sha256: {} }}
  budgeted:
    models: [gpt-test]
    limits: {{ budget: {{ daily_usd: "0.0001", monthly_usd: "100" }} }}
    keys:
      - {{ id: budgeted-key, sha256: {} }}
  shared:
    models: [gpt-test]
    limits: {{ requests_per_minute: 10 }}
    keys:
      - {{ id: shared-key, sha256: {} }}
  pooled:
    models: [gpt-test]
    limits: {{ budget: {{ monthly_usd: "0.001" }} }}
    keys:
      - {{ id: pooled-key, sha256: {} }}
pricing:
  version: v7
  models:
    echo-model: {{ input: "2.5", output: "10", cached_input: "1.25" }}
    slow: {{ input: "1", output: "2" }}
    drop: {{ input: "1", output: "3" }}
"#,
        policy_yaml(base_url),
        hash(KEY_FINANCE),
        hash(KEY_TOKENS),
        hash(KEY_KEYED_1),
        hash(KEY_KEYED_2),
        hash(KEY_BUDGETED),
        hash(KEY_SHARED),
        hash(KEY_POOLED),
    )
}

/// The test upstream and a gateway on it under [`billing_policy`], with a SQLite ledger in the
/// returned directory (which must outlive the gateway).
async fn billing_gateway() -> (Upstream, tempfile::TempDir, Gateway) {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start_with(
        &billing_policy(&up.base_url()),
        Options {
            ledger: Some(LedgerConfig::embedded(dir.path())),
            ..Options::default()
        },
    )
    .await;
    (up, dir, gw)
}

const KEY_TOKENS: &str = "fk-test-tokens-0010";
const KEY_KEYED_1: &str = "fk-test-keyed-0011";
const KEY_KEYED_2: &str = "fk-test-keyed-0012";
const KEY_BUDGETED: &str = "fk-test-budgeted-0013";
const KEY_SHARED: &str = "fk-test-shared-0014";
const KEY_POOLED: &str = "fk-test-pooled-0015";

/// "one two three": 3 prompt tokens, 4 completion tokens ("echo: one two three"); at the
/// test prices 3 × 2.5 + 4 × 10 per 1M = 47,500 nano-USD.
const SMALL_CHAT: &str =
    r#"{"model":"gpt-test","messages":[{"role":"user","content":"one two three"}]}"#;
const SMALL_COST: i64 = 47_500;

fn metric(text: &str, name: &str, tenant: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("tenant=\"{tenant}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_commits_before_the_last_byte_and_reports_match_metrics() {
    let (_up, _dir, gw) = billing_gateway().await;
    let db = gw.app.ledger.get().unwrap().db().unwrap().clone();
    let c = client();
    let row_of = |id: String| {
        let db = db.clone();
        async move {
            sqlx::query_as::<_, (i64, i64, i64, Option<i64>, String)>(
                "SELECT prompt_tokens, completion_tokens, cached_tokens, cost_nanousd, price_version
                 FROM usage_ledger WHERE request_id = $1",
            )
            .bind(id)
            .fetch_optional(&db.pool)
            .await
            .unwrap()
        }
    };

    // JSON: the row exists as soon as the body is complete (no waiting, no retry).
    let r = post(
        &c,
        &gw.url("/v1/chat/completions"),
        KEY_ACME,
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"cached cached hello there"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    // prompt 4 words (2 cached), answer "echo: cached cached hello there" 5 words.
    let expect = 2 * 2500 + 2 * 1250 + 5 * 10_000;
    assert_eq!(
        row_of(id).await,
        Some((4, 5, 2, Some(expect), "v7".to_string()))
    );

    // SSE: the row exists before `data: [DONE]` reaches the client, also when the client did
    // not ask for usage (the gateway always does).
    for include in [true, false] {
        let body = format!(
            r#"{{"model":"gpt-test","stream":true,"stream_options":{{"include_usage":{include}}},"messages":[{{"role":"user","content":"one two three"}}]}}"#
        );
        let req = http::Request::post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {KEY_ACME}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let mut body = resp.into_body();
        let mut seen = Vec::new();
        let mut row_before_done = None;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.unwrap().into_data() else {
                continue;
            };
            let done = memchr::memmem::find(&data, b"data: [DONE]").is_some();
            if done && row_before_done.is_none() {
                // Checked while holding the frame that carries [DONE]: it was released only
                // after the commit.
                row_before_done = Some(row_of(id.clone()).await);
            }
            seen.extend_from_slice(&data);
        }
        assert!(String::from_utf8_lossy(&seen).ends_with("data: [DONE]\n\n"));
        let (p, comp, cached, cost, _) = row_before_done
            .unwrap()
            .expect("row committed before [DONE]");
        // "one two three" → "echo: one two three".
        assert_eq!((p, comp, cached), (3, 4, 0));
        assert_eq!(cost, Some(3 * 2500 + 4 * 10_000));
    }

    // Reports. A tenant key sees its own tenant only.
    let r = get(&c, &gw.url("/v1/usage?from=2020-01-01"), Some(KEY_ACME)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let rep = r.json();
    assert_eq!(rep["data"].as_array().unwrap().len(), 1);
    assert_eq!(rep["data"][0]["tenant"], "acme");
    assert_eq!(rep["total"]["requests"], 3);
    let r = get(&c, &gw.url("/v1/usage?tenant=globex"), Some(KEY_ACME)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Finance sees all, as CSV too.
    let r = get(
        &c,
        &gw.url("/v1/usage?group_by=model&format=csv&from=2020-01-01T00%3A00%3A00Z"),
        Some(KEY_FINANCE),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers["content-type"], "text/csv; charset=utf-8");
    let csv = r.text();
    assert!(
        csv.starts_with("tenant,model,requests,prompt_tokens,"),
        "{csv}"
    );
    let total_cost = expect + 2 * (3 * 2500 + 4 * 10_000);
    assert!(
        csv.contains(&format!(
            "acme,gpt-test,3,10,13,2,23,0,0,{},0",
            fuke::ledger::pricing::format_usd(total_cost)
        )),
        "{csv}"
    );
    // Bad parameters are 400s that name the parameter.
    for (q, param) in [
        ("from=yesterday", "from"),
        ("group_by=week", "group_by"),
        ("format=xml", "format"),
        ("frm=2020-01-01", "frm"),
        ("from=2026-01-02&to=2026-01-01", "from"),
    ] {
        let r = get(&c, &gw.url(&format!("/v1/usage?{q}")), Some(KEY_FINANCE)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(r.openai_error()["param"], param, "{q}");
    }
    let r = get(&c, &gw.url("/v1/usage"), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Prometheus counters reconcile with the ledger.
    let rep = report::run(&db, &all_time()).await.unwrap();
    let m = get(&c, &gw.url("/metrics"), None).await.text();
    assert_eq!(
        metric(&m, "fuke_cost_nanousd_total", "acme"),
        rep.total.cost_nanousd as u64,
        "{m}"
    );
    assert_eq!(metric(&m, "fuke_usage_events_total", "acme"), 3);
    assert_eq!(
        metric(&m, "fuke_tokens_total", "acme"),
        rep.total.total_tokens as u64
    );

    // Reports hold at most two of the reader's connections: a third waits for a slot, and
    // budget checks (which fail closed without a connection) never wait behind reports.
    let reader = gw.app.ledger.get().unwrap().clone();
    let wait = Duration::from_millis(100);
    let slots = [
        reader.report_slot(wait).await.unwrap(),
        reader.report_slot(wait).await.unwrap(),
    ];
    assert!(reader.report_slot(wait).await.is_none());
    let r = post(&c, &gw.url("/v1/chat/completions"), KEY_POOLED, SMALL_CHAT).await;
    assert_eq!(r.status, StatusCode::OK, "a budgeted request: {}", r.text());
    let queued = {
        let (c, url) = (c.clone(), gw.url("/v1/usage"));
        tokio::spawn(async move { get(&c, &url, Some(KEY_FINANCE)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "a third report waits for a slot");
    let [first, second] = slots;
    drop(first);
    let r = queued.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // A report that finds no slot for 5 s is a 429 to retry, in OpenAI's shape.
    let third = reader.report_slot(wait).await.unwrap();
    let r = get(&c, &gw.url("/v1/usage"), Some(KEY_FINANCE)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.openai_error()["code"], "rate_limit_exceeded");
    assert_eq!(r.headers["retry-after"], "2");
    drop((second, third));
    let r = get(&c, &gw.url("/v1/usage"), Some(KEY_FINANCE)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

use fuke::ledger::report;

fn all_time() -> report::Query {
    report::Query {
        from_ms: 0,
        to_ms: i64::MAX / 2,
        tenant: None,
        group_by: report::GroupBy::Tenant,
    }
}

/// One client's request; `Some(id)` when the whole answer arrived.
async fn one_request(c: &TestClient, addr: &str, n: usize) -> Option<String> {
    let stream = n.is_multiple_of(2);
    let body = format!(
        r#"{{"model":"gpt-test","stream":{stream},"messages":[{{"role":"user","content":"request number {n}"}}]}}"#
    );
    let id = format!("crash-{n}");
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY_ACME}"))
        .header("content-type", "application/json")
        .header("x-request-id", &id)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .ok()?;
    let resp = c.request(req).await.ok()?;
    if resp.status() != StatusCode::OK {
        return None;
    }
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    let complete = if stream {
        bytes.ends_with(b"data: [DONE]\n\n")
    } else {
        serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|v| v["usage"].is_object())
    };
    complete.then_some(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_and_duplicates_no_completed_request() {
    let up = Upstream::start().await;
    let dir = binary_dir(
        &billing_policy(&up.base_url()),
        "ledger:\n  url: sqlite://data/ledger.db\n",
    );

    let mut completed: HashSet<String> = HashSet::new();
    let mut next = 0usize;
    for round in 0..3 {
        if round == 2 {
            // `fsync: false` must survive a killed process too (it gives up only power loss).
            let yaml = dir.path().join("fuke.yaml");
            let text = std::fs::read_to_string(&yaml).unwrap();
            std::fs::write(&yaml, format!("{text}  fsync: false\n")).unwrap();
            let cfg = fuke::config::Config::load(&yaml).unwrap();
            assert!(!cfg.ledger.unwrap().fsync, "ledger.fsync: false is read");
        }
        let (mut child, addr, _logs) = spawn_fuke(dir.path());
        let c = client();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut clients = Vec::new();
        for w in 0..16 {
            let (c, addr, stop) = (c.clone(), addr.clone(), stop.clone());
            let start = next + w * 100_000;
            clients.push(tokio::spawn(async move {
                let mut done = Vec::new();
                let mut n = start;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match one_request(&c, &addr, n).await {
                        Some(id) => done.push(id),
                        None => break, // the gateway is gone
                    }
                    n += 1;
                }
                done
            }));
        }
        next += 16 * 100_000;
        // A moment chosen at random, with requests in every state.
        let wait = 300 + u64::from(rand::random::<u16>() % 900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let before = completed.len();
        for h in clients {
            completed.extend(h.await.unwrap());
        }
        assert!(
            completed.len() > before + 10,
            "round {round}: only {} requests completed",
            completed.len() - before
        );
    }

    // Restart (replaying whatever was spooled), then compare with what clients saw.
    let (mut child, _addr, _logs) = spawn_fuke(dir.path());
    let db = Db::connect(&format!(
        "sqlite://{}",
        dir.path().join("data/ledger.db").display()
    ))
    .await
    .unwrap();
    let ids: Vec<String> = sqlx::query_scalar("SELECT request_id FROM usage_ledger")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = completed
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    let duplicated: Vec<(&&str, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "crash test: {} requests completed across 3 kills, {} ledger rows, {} missing, {} duplicated",
        completed.len(),
        ids.len(),
        missing.len(),
        duplicated.len()
    );
    assert!(
        missing.is_empty(),
        "completed but not in the ledger: {missing:?}"
    );
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");

    // `fuke usage` reads the same ledger.
    let out = Command::new(env!("CARGO_BIN_EXE_fuke"))
        .args(["usage", "--format", "json", "--tenant", "acme", "-c"])
        .arg(dir.path().join("fuke.yaml"))
        .env_remove("FUKE_LEDGER_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let completed_rows = ids.len() as u64;
    assert_eq!(rep["total"]["requests"].as_u64(), Some(completed_rows));
    let out = Command::new(env!("CARGO_BIN_EXE_fuke"))
        .args(["usage", "--group-by", "day", "-c"])
        .arg(dir.path().join("fuke.yaml"))
        .env_remove("FUKE_LEDGER_URL")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("TOTAL") && table.contains("acme"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limits_key_limits_and_budgets_refuse_with_openai_429s() {
    let (up, _dir, gw) = billing_gateway().await;
    let c = client();
    let url = gw.url("/v1/chat/completions");

    // 20 tokens per minute, 7 tokens per answer: admitted while less than a minute in debt
    // (three answers are 63 s of tokens), then refused until the debt is paid down.
    for i in 0..3 {
        let r = post(&c, &url, KEY_TOKENS, SMALL_CHAT).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
    }
    let r = post(&c, &url, KEY_TOKENS, SMALL_CHAT).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    let e = r.openai_error();
    assert_eq!(e["type"], "tokens");
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert_eq!(r.headers["x-ratelimit-limit-tokens"], "20");
    assert_eq!(r.headers["x-ratelimit-remaining-tokens"], "0");
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=4).contains(&wait), "retry-after {wait}");
    assert_eq!(up.count("echo-model"), 3);

    // A key's own limit applies on top of its tenant's; the tenant's other key is unaffected.
    assert_eq!(
        post(&c, &url, KEY_KEYED_1, SMALL_CHAT).await.status,
        StatusCode::OK
    );
    let r = post(&c, &url, KEY_KEYED_1, SMALL_CHAT).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.openai_error()["type"], "requests");
    assert_eq!(r.headers["x-ratelimit-limit-requests"], "1");
    assert!(
        r.openai_error()["message"]
            .as_str()
            .unwrap()
            .contains("key keyed-1")
    );
    for _ in 0..3 {
        assert_eq!(
            post(&c, &url, KEY_KEYED_2, SMALL_CHAT).await.status,
            StatusCode::OK
        );
    }

    // A daily budget of $0.0001 at $0.0000475 per answer: the third is admitted (spent
    // $0.000095), the fourth is refused as OpenAI refuses an exhausted quota.
    for i in 0..3 {
        let r = post(&c, &url, KEY_BUDGETED, SMALL_CHAT).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
    }
    let before = up.count("echo-model");
    let r = post(&c, &url, KEY_BUDGETED, SMALL_CHAT).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    let e = r.openai_error();
    assert_eq!(e["type"], "insufficient_quota");
    assert_eq!(e["code"], "insufficient_quota");
    assert_eq!(
        r.headers["x-should-retry"], "false",
        "SDKs must not retry a spent budget"
    );
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("daily budget of tenant budgeted ($0.000100000)"),
        "{msg}"
    );
    assert!(msg.contains("$0.000142500 so far"), "{msg}");
    let renew: i64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    let now = fuke::ledger::now_ms();
    let midnight = fuke::ledger::Period::Day.end(now);
    assert!(
        (renew - (midnight - now) / 1000).abs() <= 2,
        "retry-after {renew}"
    );
    assert_eq!(
        up.count("echo-model"),
        before,
        "refused before the upstream"
    );
}

/// Two gateways on one PostgreSQL ledger and one Redis: a budget is not overshot by more than
/// the requests in flight, and a request limit holds across both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_budgets_through_postgres_and_rate_limits_through_redis() {
    let pg = PgDb::create().await;
    let up = Upstream::start().await;
    let prefix = format!("fuke:test:{}:", hex::encode(rand::random::<[u8; 6]>()));
    let mut gws = Vec::new();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for dir in &dirs {
        gws.push(
            Gateway::start_with(
                &billing_policy(&up.base_url()),
                Options {
                    ledger: Some(LedgerConfig {
                        url: pg.url.clone(),
                        spool: dir.path().join("spool.jsonl"),
                        fsync: true,
                    }),
                    settings: fuke::app::Settings {
                        limits_redis: Some(fuke::limits::RedisLimits {
                            url: "redis://127.0.0.1:6379".into(),
                            prefix: prefix.clone(),
                        }),
                        ..Default::default()
                    },
                    ..Options::default()
                },
            )
            .await,
        );
    }
    for gw in &gws {
        eventually("limits shared through Redis", || async {
            gw.app.limiter.shared()
        })
        .await;
    }
    let c = client();

    // 10 requests per minute for the tenant, 8 sent to each replica at once: 10 pass in all.
    let mut sent = Vec::new();
    for gw in &gws {
        for _ in 0..8 {
            let (c, url) = (c.clone(), gw.url("/v1/chat/completions"));
            sent.push(tokio::spawn(async move {
                post(&c, &url, KEY_SHARED, SMALL_CHAT).await.status
            }));
        }
    }
    let mut ok = 0;
    for h in sent {
        match h.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(ok, 10, "the request limit is shared, not per replica");

    // A monthly budget of $0.001 (21 answers and a bit) with 8 clients per replica, each
    // sending until refused: the ledger may pass the budget only by the requests in flight.
    let mut clients = Vec::new();
    for gw in &gws {
        for _ in 0..8 {
            let (c, url) = (c.clone(), gw.url("/v1/chat/completions"));
            clients.push(tokio::spawn(async move {
                let mut served = 0i64;
                for _ in 0..200 {
                    let r = post(&c, &url, KEY_POOLED, SMALL_CHAT).await;
                    match r.status {
                        StatusCode::OK => served += 1,
                        StatusCode::TOO_MANY_REQUESTS => {
                            assert_eq!(r.openai_error()["type"], "insufficient_quota");
                            return served;
                        }
                        s => panic!("unexpected {s}: {}", r.text()),
                    }
                }
                panic!("the budget never ran out");
            }));
        }
    }
    let mut served = 0;
    for h in clients {
        served += h.await.unwrap();
    }
    let db = Db::connect(&pg.url).await.unwrap();
    let spent: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(cost_nanousd), 0) AS BIGINT) FROM usage_ledger WHERE tenant = 'pooled'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let budget = 1_000_000;
    eprintln!(
        "shared budget: {served} served, ${} spent of ${}",
        spent as f64 / 1e9,
        budget as f64 / 1e9
    );
    assert_eq!(
        spent,
        served * SMALL_COST,
        "every served answer is in the ledger, once"
    );
    assert!(
        spent >= budget,
        "refused before the budget was spent: {spent}"
    );
    assert!(
        spent < budget + 16 * SMALL_COST,
        "overshot by more than the 16 requests in flight: {spent}"
    );
    for gw in &gws {
        let r = post(&c, &gw.url("/v1/chat/completions"), KEY_POOLED, SMALL_CHAT).await;
        assert_eq!(r.openai_error()["type"], "insufficient_quota");
    }
}

/// Runs headless Chromium on `url`; `what` is `--dump-dom` or `--screenshot=PATH`.
fn chromium(url: &str, what: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "--window-size=1000,1700",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(what)
        .arg(url)
        .output()
        .expect("chromium (scripts/setup.sh installs Debian's package)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finance_dashboard_renders_the_ledger_in_headless_chromium() {
    let (_up, dir, gw) = billing_gateway().await;
    let c = client();
    let url = gw.url("/v1/chat/completions");
    // acme spends twice what budgeted spends, in tokens and in money.
    for key in [KEY_ACME, KEY_ACME, KEY_BUDGETED] {
        assert_eq!(post(&c, &url, key, SMALL_CHAT).await.status, StatusCode::OK);
    }

    // The page and its assets are served from the binary, locked down.
    let page = get(&c, &gw.url("/dashboard"), None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    assert_eq!(
        get(&c, &gw.url("/dashboard/app.js"), None).await.status,
        StatusCode::OK
    );
    // Budgets need a finance key.
    let r = get(&c, &gw.url("/v1/usage/budgets"), Some(KEY_ACME)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let b = get(&c, &gw.url("/v1/usage/budgets"), Some(KEY_FINANCE))
        .await
        .json();
    let day = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "budgeted" && l["period"] == "day")
        .unwrap()
        .clone();
    assert_eq!(day["spent_nanousd"], SMALL_COST);
    assert_eq!(day["budget_usd"], "0.000100000");

    let signed_in = format!("{}#key={KEY_FINANCE}", gw.url("/dashboard"));
    let dom = chromium(&signed_in, "--dump-dom");
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the script did not finish:\n{dom}"
    );
    // The numbers are the ledger's.
    assert!(
        dom.contains(&format!(
            r#"id="total-spend">${}<"#,
            fuke::ledger::pricing::format_usd(3 * SMALL_COST)
        )),
        "{dom}"
    );
    assert!(
        dom.contains("$0.000047500 of $0.000100000 (47.5%)"),
        "{dom}"
    );
    // The spend bars are drawn to scale: acme's is twice budgeted's.
    let width = |tenant: &str| -> f64 {
        let at = dom
            .find(&format!(r#"data-kind="tenant-spend" data-name="{tenant}""#))
            .unwrap_or_else(|| panic!("no bar for {tenant}:\n{dom}"));
        let tag_start = dom[..at].rfind("<rect").unwrap();
        let tag = &dom[tag_start..at];
        let w = tag.split("width=\"").nth(1).unwrap();
        w[..w.find('"').unwrap()].parse().unwrap()
    };
    let ratio = width("acme") / width("budgeted");
    assert!((ratio - 2.0).abs() < 0.01, "bar ratio {ratio}");

    // What a person sees: the screenshot has acme's colour about twice as much as budgeted's
    // (spend bars, spend and token columns all scale 2:1).
    let shot = std::env::var_os("FUKE_DASHBOARD_PNG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("dashboard.png"));
    chromium(&signed_in, &format!("--screenshot={}", shot.display()));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let count = |rgb: [u8; 3]| {
        buf[..info.buffer_size()]
            .chunks(channels)
            .filter(|p| p[..3] == rgb)
            .count()
    };
    let (blue, orange) = (count([0x25, 0x63, 0xeb]), count([0xea, 0x58, 0x0c]));
    eprintln!("dashboard screenshot: {blue} px acme, {orange} px budgeted");
    assert!(orange > 500, "budgeted's bars are not on the screenshot");
    let ratio = blue as f64 / orange as f64;
    assert!((1.7..2.3).contains(&ratio), "pixel ratio {ratio}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_short_are_billed_for_the_chunks_delivered() {
    let (_up, _dir, gw) = billing_gateway().await;
    let db = gw.app.ledger.get().unwrap().db().unwrap().clone();
    let row = |id: String| {
        let db = db.clone();
        async move {
            sqlx::query_as::<_, (String, String, i64, i64, Option<i64>)>(
                "SELECT outcome, usage_source, prompt_tokens, completion_tokens, cost_nanousd
                 FROM usage_ledger WHERE request_id = $1",
            )
            .bind(id)
            .fetch_optional(&db.pool)
            .await
            .unwrap()
        }
    };
    let c = client();

    // The client reads 5 chunks of a 150-word stream and leaves.
    let resp = c.request(slow_stream_request(&gw.url(""))).await.unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut body = resp.into_body();
    let mut got = 0;
    while got < 5 {
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        got += data.windows(6).filter(|w| w == b"data: ").count();
    }
    drop(body);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let found = loop {
        if let Some(r) = row(id.clone()).await {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no row for the aborted stream"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let (outcome, source, prompt, completion, cost) = found;
    assert_eq!(
        (outcome.as_str(), source.as_str(), prompt),
        ("client_aborted", "streamed", 0)
    );
    // What reached the client's connection: at least what it read, far less than the answer.
    assert!((5..60).contains(&completion), "{completion} chunks billed");
    assert_eq!(cost, Some(completion * 2000));

    // The upstream breaks after two chunks: those two are billed.
    let r = post(
        &c,
        &gw.url("/v1/chat/completions"),
        KEY_ACME,
        r#"{"model":"drop","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        row(id).await,
        Some((
            "upstream_failed".into(),
            "streamed".into(),
            0,
            2,
            Some(2 * 3000)
        ))
    );
}

/// A PostgreSQL that cannot be reached does not stop the gateway: rows go to the spool at
/// once (requests are not held), and a later start on a reachable database replays them. A
/// spool line cut short by a crash, even mid-character, costs only that line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_spools_and_a_torn_spool_replays_what_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.jsonl");
    let down = LedgerConfig {
        url: "postgres://postgres@127.0.0.1:1/nowhere".into(),
        spool: spool.clone(),
        fsync: true,
    };
    let ledger = Ledger::open(&down)
        .await
        .expect("starts without its database");
    assert!(ledger.reader().db().is_none());
    let started = std::time::Instant::now();
    let events: Vec<UsageEvent> = (0..3)
        .map(|i| event(200 + i, "acme", "echo-model", Some(usage(3, 4, 0))))
        .collect();
    let futs: Vec<_> = events.iter().cloned().map(|e| ledger.record(e)).collect();
    futures_util::future::join_all(futs).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        ledger
            .stats
            .spooled
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    drop(ledger);

    // A crash cut the last write short in the middle of a multi-byte character.
    let mut torn = std::fs::read(&spool).unwrap();
    torn.extend_from_slice("{\"id\":\"x\",\"tenant\":\"é".as_bytes());
    torn.pop();
    std::fs::write(&spool, &torn).unwrap();

    let pg = PgDb::create().await;
    let up = LedgerConfig {
        url: pg.url.clone(),
        spool: spool.clone(),
        fsync: true,
    };
    let ledger = Ledger::open(&up).await.unwrap();
    let db = ledger.reader().db().unwrap().clone();
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT request_id FROM usage_ledger ORDER BY request_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(ids, ["req-200", "req-201", "req-202"]);
    assert_eq!(std::fs::metadata(&spool).unwrap().len(), 0);
    // The running totals count the replayed rows.
    let spent = db
        .spent(&[(
            "t:acme".to_string(),
            fuke::ledger::Period::Day.of(fuke::ledger::now_ms()),
        )])
        .await
        .unwrap();
    assert_eq!(spent, [3 * SMALL_COST]);
    db.pool.close().await;
}
