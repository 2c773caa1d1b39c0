//! In-process request rate limits per tenant (GCRA: one timestamp per tenant, no timers).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct RateLimiter {
    /// Theoretical arrival time of the next request, per tenant.
    tat: Mutex<HashMap<Arc<str>, Instant>>,
}

/// A refusal: how long until one more request would be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RateLimiter {
    /// Admits one request for `tenant` under `per_minute`, allowing a burst of a minute's worth.
    pub fn check(&self, tenant: &Arc<str>, per_minute: u32) -> Result<(), RetryAfter> {
        self.check_at(tenant, per_minute, Instant::now())
    }

    fn check_at(&self, tenant: &Arc<str>, per_minute: u32, now: Instant) -> Result<(), RetryAfter> {
        let interval = Duration::from_secs(60) / per_minute.max(1);
        let tolerance = Duration::from_secs(60).saturating_sub(interval);
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let entry = tat.entry(tenant.clone()).or_insert(now);
        let t = (*entry).max(now);
        let ahead = t - now;
        if ahead > tolerance {
            return Err(RetryAfter(ahead - tolerance));
        }
        *entry = t + interval;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_minute_of_burst_then_refuses() {
        let rl = RateLimiter::default();
        let t: Arc<str> = "acme".into();
        let now = Instant::now();
        for _ in 0..5 {
            assert!(rl.check_at(&t, 5, now).is_ok());
        }
        let RetryAfter(wait) = rl.check_at(&t, 5, now).unwrap_err();
        assert!(wait > Duration::from_secs(11) && wait <= Duration::from_secs(12));
        assert!(rl.check_at(&t, 5, now + Duration::from_secs(12)).is_ok());
        // Another tenant is not affected.
        assert!(rl.check_at(&"other".into(), 5, now).is_ok());
    }
}
