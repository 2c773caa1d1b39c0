//! The optional Redis second level of the exact cache, shared by replicas: an answer one replica
//! stored is an exact hit on the others. Same keys (tenant, scope, normalized question), same
//! TTL as the tenant's own cache; the semantic level stays in each replica.
//!
//! Redis is never on the critical path for long: every call has a short timeout, a Redis that is
//! down or slow makes lookups plain misses (logged once per outage), writes happen after the
//! answer was sent, and the connection is (re)made in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Answer;
use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// Longest a lookup waits for Redis before it counts as a miss.
const TIMEOUT: Duration = Duration::from_millis(50);
const RECONNECT_EVERY: Duration = Duration::from_secs(2);

/// Where the second level lives (fuke.yaml `cache.redis_url`, `cache.redis_prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Config {
    pub url: String,
    pub prefix: String,
}

pub struct L2 {
    prefix: String,
    conn: Arc<ArcSwapOption<ConnectionManager>>,
    healthy: Arc<AtomicBool>,
}

/// An answer as stored in Redis: JSON, with a format version.
#[derive(Serialize)]
struct Stored<'a> {
    v: u8,
    #[serde(flatten)]
    answer: &'a Answer,
}

#[derive(Deserialize)]
struct Loaded {
    v: u8,
    #[serde(flatten)]
    answer: Answer,
}

impl L2 {
    /// Starts connecting in the background; lookups miss until the connection is up.
    pub fn start(cfg: &L2Config) -> Result<L2, String> {
        let client =
            redis::Client::open(cfg.url.as_str()).map_err(|e| format!("cache.redis_url: {e}"))?;
        let conn: Arc<ArcSwapOption<ConnectionManager>> = Arc::default();
        let healthy = Arc::new(AtomicBool::new(true));
        let (slot, health) = (conn.clone(), healthy.clone());
        tokio::spawn(async move {
            loop {
                match ConnectionManager::new(client.clone()).await {
                    Ok(c) => {
                        slot.store(Some(Arc::new(c)));
                        tracing::info!("cache: Redis second level connected");
                        health.store(true, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => {
                        if health.swap(false, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "cache: Redis second level unreachable; exact lookups stay local until it is back");
                        }
                        tokio::time::sleep(RECONNECT_EVERY).await;
                    }
                }
            }
        });
        Ok(L2 {
            prefix: cfg.prefix.clone(),
            conn,
            healthy,
        })
    }

    /// Whether the connection has been made.
    pub fn connected(&self) -> bool {
        self.conn.load().is_some()
    }

    pub(super) fn key(&self, tenant: &str, scope: &[u8; 16], exact: &[u8; 16]) -> String {
        format!(
            "{}{tenant}:{}{}",
            self.prefix,
            hex::encode(scope),
            hex::encode(exact)
        )
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %e, "cache: Redis {what} failed; treated as a miss until it answers again");
        }
    }

    pub(super) async fn get(&self, key: &str) -> Option<Answer> {
        let mut conn = ConnectionManager::clone(self.conn.load().as_deref()?);
        let got: Result<Option<Vec<u8>>, String> =
            tokio::time::timeout(TIMEOUT, redis::cmd("GET").arg(key).query_async(&mut conn))
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        match got {
            Ok(bytes) => {
                self.healthy.store(true, Ordering::Relaxed);
                serde_json::from_slice::<Loaded>(&bytes?)
                    .ok()
                    .filter(|s| s.v == 1)
                    .map(|s| s.answer)
            }
            Err(e) => {
                self.failed("lookup", &e);
                None
            }
        }
    }

    pub(super) async fn set(&self, key: String, answer: &Answer, ttl: Duration) {
        let Some(conn) = self.conn.load_full() else {
            return;
        };
        let mut conn = ConnectionManager::clone(&conn);
        let Ok(bytes) = serde_json::to_vec(&Stored { v: 1, answer }) else {
            return;
        };
        let secs = ttl.as_secs().max(1);
        let done: Result<(), String> = tokio::time::timeout(
            TIMEOUT * 4,
            redis::cmd("SET")
                .arg(&key)
                .arg(bytes)
                .arg("EX")
                .arg(secs)
                .query_async::<()>(&mut conn),
        )
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = done {
            self.failed("store", &e);
        }
    }
}
