//! The optional Redis second level of the exact cache, shared by replicas: an answer one replica
//! stored is an exact hit on the others. Same keys (tenant, scope, normalized question), same
//! TTL as the tenant's own cache; the semantic level stays in each replica.
//!
//! Redis is never on the critical path for long: every call has a short timeout, a Redis that is
//! down or slow makes lookups plain misses (logged once per outage), writes happen after the
//! answer was sent, and the connection is (re)made in the background.

use std::time::Duration;

use super::Answer;
use crate::redis_link::RedisLink;
use serde::{Deserialize, Serialize};

/// Longest a lookup waits for Redis before it counts as a miss.
const TIMEOUT: Duration = Duration::from_millis(50);

/// Where the second level lives (fuke.yaml `cache.redis_url`, `cache.redis_prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Config {
    pub url: String,
    pub prefix: String,
}

pub struct L2 {
    prefix: String,
    link: RedisLink,
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
        let link = RedisLink::start(
            &cfg.url,
            "cache",
            "exact lookups are local misses until it answers",
        )
        .map_err(|e| format!("cache.redis_url: {e}"))?;
        Ok(L2 {
            prefix: cfg.prefix.clone(),
            link,
        })
    }

    /// Whether the connection has been made.
    pub fn connected(&self) -> bool {
        self.link.connected()
    }

    pub(super) fn key(&self, tenant: &str, scope: &[u8; 16], exact: &[u8; 16]) -> String {
        format!(
            "{}{tenant}:{}{}",
            self.prefix,
            hex::encode(scope),
            hex::encode(exact)
        )
    }

    pub(super) async fn get(&self, key: &str) -> Option<Answer> {
        let bytes: Option<Vec<u8>> = self
            .link
            .query(redis::cmd("GET").arg(key), TIMEOUT, "lookup")
            .await?;
        serde_json::from_slice::<Loaded>(&bytes?)
            .ok()
            .filter(|s| s.v == 1)
            .map(|s| s.answer)
    }

    pub(super) async fn set(&self, key: String, answer: &Answer, ttl: Duration) {
        let Ok(bytes) = serde_json::to_vec(&Stored { v: 1, answer }) else {
            return;
        };
        let secs = ttl.as_secs().max(1);
        let _: Option<()> = self
            .link
            .query(
                redis::cmd("SET").arg(&key).arg(bytes).arg("EX").arg(secs),
                TIMEOUT * 4,
                "store",
            )
            .await;
    }
}
