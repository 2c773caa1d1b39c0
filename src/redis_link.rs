//! One Redis connection a feature shares with other replicas (the cache's second level, shared
//! rate limits): made in the background and remade until it works, so start-up never waits
//! for Redis; every command bounded by a timeout; a failure logged once per outage.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::FromRedisValue;
use redis::aio::ConnectionManager;

const RECONNECT_EVERY: Duration = Duration::from_secs(2);

pub struct RedisLink {
    /// Who uses it, for logs (`cache`, `limits`).
    name: &'static str,
    /// What happens while Redis is missing, for logs.
    without: &'static str,
    conn: Arc<ArcSwapOption<ConnectionManager>>,
    healthy: Arc<AtomicBool>,
}

impl RedisLink {
    /// Starts connecting to `url` in the background; commands fail fast until it is up.
    pub fn start(
        url: &str,
        name: &'static str,
        without: &'static str,
    ) -> Result<RedisLink, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let conn: Arc<ArcSwapOption<ConnectionManager>> = Arc::default();
        let healthy = Arc::new(AtomicBool::new(true));
        let (slot, health) = (conn.clone(), healthy.clone());
        tokio::spawn(async move {
            loop {
                match ConnectionManager::new(client.clone()).await {
                    Ok(c) => {
                        slot.store(Some(Arc::new(c)));
                        health.store(true, Ordering::Relaxed);
                        tracing::info!("{name}: Redis connected");
                        return;
                    }
                    Err(e) => {
                        if health.swap(false, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "{name}: Redis unreachable; {without}");
                        }
                        tokio::time::sleep(RECONNECT_EVERY).await;
                    }
                }
            }
        });
        Ok(RedisLink {
            name,
            without,
            conn,
            healthy,
        })
    }

    /// Whether the connection has been made.
    pub fn connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Runs `cmd` within `timeout`. `None` when there is no connection yet or the command
    /// failed or timed out (`what` names it in the log line of the first failure).
    pub async fn query<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        timeout: Duration,
        what: &str,
    ) -> Option<T> {
        let mut conn = ConnectionManager::clone(self.conn.load().as_deref()?);
        let got = tokio::time::timeout(timeout, cmd.query_async::<T>(&mut conn))
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match got {
            Ok(v) => {
                self.healthy.store(true, Ordering::Relaxed);
                Some(v)
            }
            Err(e) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    let (name, without) = (self.name, self.without);
                    tracing::warn!(error = %e, "{name}: Redis {what} failed; {without}");
                }
                None
            }
        }
    }
}
