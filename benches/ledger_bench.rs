//! The usage ledger alone: rows per second committed when `concurrency` requests record at
//! once, each awaiting its commit as the gateway does before its last byte.
//!   ledger_bench URL ROWS CONCURRENCY [nofsync]
//! URL: sqlite://PATH or postgres://…; prints rows/s, transactions, and rows per transaction.
//! `nofsync`: the ledger's `fsync: false` (commits do not wait for the disk).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use fuke::cache::CacheUse;
use fuke::ledger::pricing::{Price, Pricing};
use fuke::ledger::{Ledger, LedgerConfig};
use fuke::metering::{Outcome, UsageEvent, UsageSink};
use fuke::openai::{Endpoint, Usage};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4 || (args.len() == 5 && args[4] == "nofsync"),
        "usage: ledger_bench URL ROWS CONCURRENCY [nofsync]"
    );
    let fsync = args.len() == 4;
    let url = args[1].clone();
    let rows: usize = args[2].parse()?;
    let conc: usize = args[3].parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let dir = tempfile::tempdir()?;
        let ledger = Arc::new(
            Ledger::open(&LedgerConfig {
                url: url.clone(),
                spool: dir.path().join("spool.jsonl"),
                fsync,
            })
            .await?,
        );
        let pricing = Arc::new(Pricing::new(
            None,
            vec![(
                "gpt-4o-mini".into(),
                Price {
                    input: 150,
                    cached_input: 75,
                    output: 600,
                },
            )],
        ));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..conc {
            let (ledger, pricing) = (ledger.clone(), pricing.clone());
            let n = rows / conc + usize::from(w < rows % conc);
            tasks.push(tokio::spawn(async move {
                for i in 0..n {
                    let ev = UsageEvent {
                        request_id: format!("req_{w}_{i}").into(),
                        tenant: "bench".into(),
                        key_id: "bench-key".into(),
                        endpoint: Endpoint::ChatCompletions,
                        model_alias: "gpt-4o-mini".into(),
                        upstream_model: "gpt-4o-mini".into(),
                        backend: "openai".into(),
                        usage: Some(Usage {
                            prompt_tokens: 120,
                            completion_tokens: 40,
                            total_tokens: 160,
                            prompt_tokens_details: None,
                        }),
                        status: 200,
                        latency: Duration::from_millis(7),
                        streamed: i % 2 == 0,
                        outcome: Outcome::Completed,
                        finished_at: SystemTime::now(),
                        fallback: None,
                        streamed_chunks: 40,
                        cache: CacheUse::Miss,
                        kb_chunks: 0,
                        rules: Vec::new(),
                        pricing: Some(pricing.clone()),
                    };
                    ledger.record(ev).await;
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        let secs = started.elapsed().as_secs_f64();
        let batches = ledger.stats.batches.load(Ordering::Relaxed).max(1);
        let committed = ledger.stats.committed.load(Ordering::Relaxed);
        anyhow::ensure!(committed == rows as u64, "committed {committed} of {rows}");
        println!(
            "{} rows={rows} concurrency={conc}: {:.0} rows/s, {batches} transactions, {:.1} rows per transaction",
            if url.starts_with("sqlite") { "sqlite" } else { "postgres" },
            rows as f64 / secs,
            committed as f64 / batches as f64
        );
        Ok(())
    })
}
