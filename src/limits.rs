//! Request and token rate limits per tenant and per key (GCRA: one timestamp per scope, no
//! timers), in process by default or in Redis when replicas must share them.
//!
//! Requests are counted when admitted. Tokens are known only when the answer ends, so a token
//! limit admits a request while the scope's bucket is not in debt by more than a minute's
//! allowance, and the tokens the upstream reported are debited afterwards: a scope overshoots
//! by at most the requests it has in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::redis_link::RedisLink;

const MINUTE: Duration = Duration::from_secs(60);
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// How long the in-process limits stand in after Redis failed, before it is tried again.
const REDIS_PAUSE: Duration = Duration::from_secs(5);

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Requests,
    Tokens,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
        }
    }
}

/// Whose limit: a tenant's (all its keys together) or one key's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Tenant(Arc<str>),
    Key(Arc<str>),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Tenant(t) => write!(f, "t:{t}"),
            Scope::Key(k) => write!(f, "k:{k}"),
        }
    }
}

/// A refusal: how long until the scope is admitted again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

/// The shared store of `fuke.yaml` `limits.redis_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisLimits {
    pub url: String,
    pub prefix: String,
}

/// One GCRA step, atomic in Redis, on Redis's clock (replicas' clocks may differ).
/// ARGV: units per minute, tolerance µs, units to add, 1 to refuse when over tolerance.
/// Returns 0 when admitted, else the µs to wait. The interval is a fraction of a µs for limits
/// above 60 M per minute (Lua numbers are doubles); the schedule is kept in whole µs.
const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = 60000000 / tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if ARGV[4] == '1' and tat - now > tolerance then
  return math.floor(tat - now - tolerance) + 1
end
local new = math.floor(tat + interval * cost + 0.5)
if new > now then
  redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.floor((new - now) / 1000) + 1000)
end
return 0
";

struct Shared {
    prefix: String,
    link: RedisLink,
    /// After a failure, Redis is left alone until then (requests do not each wait out a
    /// timeout while it is down).
    pause_until: Mutex<Option<Instant>>,
}

#[derive(Default)]
pub struct RateLimiter {
    /// Theoretical arrival time of the next unit, per scope and unit.
    tat: Mutex<HashMap<(Scope, Unit), Instant>>,
    shared: Option<Shared>,
}

/// GCRA parameters of `per_minute`: the interval per unit, and how far ahead of now the
/// schedule may run (a minute's worth of burst).
fn params(unit: Unit, per_minute: u32) -> (Duration, Duration) {
    let interval = MINUTE / per_minute.max(1);
    let tolerance = match unit {
        // The request being admitted takes one interval of the minute.
        Unit::Requests => MINUTE.saturating_sub(interval),
        // Tokens are debited after the answer: admit while less than a minute in debt.
        Unit::Tokens => MINUTE,
    };
    (interval, tolerance)
}

impl RateLimiter {
    /// Limits kept in Redis (shared by replicas). Until Redis answers, and whenever it fails,
    /// the in-process limits apply (a Redis outage never stops traffic; it is logged).
    pub fn with_redis(cfg: &RedisLimits) -> Result<RateLimiter, String> {
        let link = RedisLink::start(
            &cfg.url,
            "limits",
            "limits are per replica until it answers",
        )
        .map_err(|e| format!("limits.redis_url: {e}"))?;
        Ok(RateLimiter {
            tat: Mutex::default(),
            shared: Some(Shared {
                prefix: cfg.prefix.clone(),
                link,
                pause_until: Mutex::new(None),
            }),
        })
    }

    /// Whether limits are shared through a connected Redis.
    pub fn shared(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.link.connected())
    }

    /// Admits one request of `scope`: counts it against a requests limit, or checks that a
    /// tokens limit is not in debt.
    pub async fn admit(
        &self,
        scope: &Scope,
        unit: Unit,
        per_minute: u32,
    ) -> Result<(), RetryAfter> {
        let cost = u64::from(unit == Unit::Requests);
        if let Some(r) = self.redis_step(scope, unit, per_minute, cost, true).await {
            return r;
        }
        self.step_at(scope, unit, per_minute, cost, true, Instant::now())
    }

    /// Debits the tokens an answer used.
    pub async fn debit(&self, scope: &Scope, per_minute: u32, tokens: u64) {
        if tokens == 0 {
            return;
        }
        if self
            .redis_step(scope, Unit::Tokens, per_minute, tokens, false)
            .await
            .is_none()
        {
            let _ = self.step_at(
                scope,
                Unit::Tokens,
                per_minute,
                tokens,
                false,
                Instant::now(),
            );
        }
    }

    fn step_at(
        &self,
        scope: &Scope,
        unit: Unit,
        per_minute: u32,
        cost: u64,
        check: bool,
        now: Instant,
    ) -> Result<(), RetryAfter> {
        let (interval, tolerance) = params(unit, per_minute);
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let entry = tat.entry((scope.clone(), unit)).or_insert(now);
        let t = (*entry).max(now);
        let ahead = t - now;
        if check && ahead > tolerance {
            return Err(RetryAfter(ahead - tolerance));
        }
        let add = interval.saturating_mul(u32::try_from(cost).unwrap_or(u32::MAX));
        *entry = t + add.min(Duration::from_secs(86_400 * 365));
        Ok(())
    }

    /// The same step in Redis; `None` when Redis is not configured or did not answer.
    async fn redis_step(
        &self,
        scope: &Scope,
        unit: Unit,
        per_minute: u32,
        cost: u64,
        check: bool,
    ) -> Option<Result<(), RetryAfter>> {
        let shared = self.shared.as_ref()?;
        {
            let mut pause = shared.pause_until.lock().unwrap_or_else(|e| e.into_inner());
            match *pause {
                Some(until) if Instant::now() < until => return None,
                Some(_) => *pause = None,
                None => {}
            }
        }
        let (_, tolerance) = params(unit, per_minute);
        let key = format!("{}{}:{scope}", shared.prefix, unit.as_str());
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GCRA_LUA)
            .arg(1)
            .arg(key)
            .arg(per_minute.max(1))
            .arg(tolerance.as_micros() as u64)
            .arg(cost)
            .arg(if check { "1" } else { "0" });
        let Some(wait_us) = shared
            .link
            .query::<i64>(&cmd, REDIS_TIMEOUT, "limit check")
            .await
        else {
            *shared.pause_until.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Instant::now() + REDIS_PAUSE);
            return None;
        };
        Some(if wait_us > 0 {
            Err(RetryAfter(Duration::from_micros(wait_us as u64)))
        } else {
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_minute_of_burst_then_refuses() {
        let rl = RateLimiter::default();
        let t = Scope::Tenant("acme".into());
        let now = Instant::now();
        for _ in 0..5 {
            assert!(rl.step_at(&t, Unit::Requests, 5, 1, true, now).is_ok());
        }
        let RetryAfter(wait) = rl.step_at(&t, Unit::Requests, 5, 1, true, now).unwrap_err();
        assert!(wait > Duration::from_secs(11) && wait <= Duration::from_secs(12));
        assert!(
            rl.step_at(
                &t,
                Unit::Requests,
                5,
                1,
                true,
                now + Duration::from_secs(12)
            )
            .is_ok()
        );
        // Another scope (a key named like the tenant) is not affected.
        assert!(
            rl.step_at(&Scope::Key("acme".into()), Unit::Requests, 5, 1, true, now)
                .is_ok()
        );
    }

    #[test]
    fn tokens_admit_until_a_minute_in_debt() {
        let rl = RateLimiter::default();
        let t = Scope::Tenant("acme".into());
        let now = Instant::now();
        // 600 tokens per minute: 100 ms per token.
        assert!(rl.step_at(&t, Unit::Tokens, 600, 0, true, now).is_ok());
        rl.step_at(&t, Unit::Tokens, 600, 500, false, now).unwrap();
        // 50 s in debt: still admitted.
        assert!(rl.step_at(&t, Unit::Tokens, 600, 0, true, now).is_ok());
        rl.step_at(&t, Unit::Tokens, 600, 200, false, now).unwrap();
        // 70 s in debt: refused for 10 s.
        let RetryAfter(wait) = rl.step_at(&t, Unit::Tokens, 600, 0, true, now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
        assert!(
            rl.step_at(
                &t,
                Unit::Tokens,
                600,
                0,
                true,
                now + Duration::from_secs(10)
            )
            .is_ok()
        );
        // Requests and tokens of one scope are separate.
        assert!(rl.step_at(&t, Unit::Requests, 600, 1, true, now).is_ok());
    }
}
