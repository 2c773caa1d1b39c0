//! Circuit breakers, one per backend + model. They live in a [`Board`] that outlives policy
//! versions: a reload changes a breaker's settings, never its state.
//!
//! Closed: calls flow; failures are counted in a rolling window of ten buckets and as a run of
//! consecutive failures. Either threshold opens the breaker. Open: every call is refused at once
//! until the cooldown ends. Half-open: up to `probes` calls go through; one failure opens the
//! breaker again, `probes` successes close it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Serialize;

const BUCKETS: usize = 10;

/// Thresholds of one breaker, from policy (`upstreams.NAME.breaker`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Open when failures / calls in the window reach this (0 < rate <= 1)…
    pub failure_rate: f64,
    /// …over this rolling window…
    pub window: Duration,
    /// …once the window holds at least this many calls.
    pub min_calls: u32,
    /// Open after this many failures in a row, whatever the window says.
    pub consecutive_failures: u32,
    /// How long an open breaker refuses calls before probing.
    pub cooldown: Duration,
    /// Calls let through while half-open; all must succeed to close.
    pub probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_rate: 0.5,
            window: Duration::from_secs(10),
            min_calls: 10,
            consecutive_failures: 5,
            cooldown: Duration::from_secs(5),
            probes: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    fn index(self) -> usize {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

/// Why a backend took no call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The breaker is open (or half-open with all probes out).
    Open,
    /// The candidate's `max_in_flight` is reached.
    Busy,
}

/// How a call went, as far as the backend's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failure,
    /// Says nothing about the backend (the client left, the request was refused as invalid).
    Neutral,
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    tick: u64,
    calls: u32,
    failures: u32,
}

struct Inner {
    settings: BreakerSettings,
    state: State,
    /// When an open breaker may probe.
    open_until: Instant,
    probes_out: u32,
    probes_passed: u32,
    consecutive: u32,
    buckets: [Bucket; BUCKETS],
}

/// The health of one backend + model: its breaker and its calls in flight.
pub struct Health {
    pub backend: String,
    pub model: String,
    inner: Mutex<Inner>,
    origin: Instant,
    in_flight: AtomicU32,
    /// Transitions into each state, by [`State::index`].
    transitions: [AtomicU64; 3],
}

// === impl Health ===

impl Health {
    fn new(backend: &str, model: &str, settings: BreakerSettings) -> Self {
        let now = Instant::now();
        Health {
            backend: backend.to_string(),
            model: model.to_string(),
            inner: Mutex::new(Inner {
                settings,
                state: State::Closed,
                open_until: now,
                probes_out: 0,
                probes_passed: 0,
                consecutive: 0,
                buckets: [Bucket::default(); BUCKETS],
            }),
            origin: now,
            in_flight: AtomicU32::new(0),
            transitions: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New thresholds (a policy reload); the state stays.
    pub fn configure(&self, settings: BreakerSettings) {
        self.lock().settings = settings;
    }

    pub fn state(&self) -> State {
        self.lock().state
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Time until an open breaker probes again (zero unless open).
    pub fn retry_in(&self) -> Duration {
        let inner = self.lock();
        match inner.state {
            State::Open => inner.open_until.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }

    /// Takes a call if the breaker and `max_in_flight` allow it.
    pub fn admit(self: &Arc<Self>, max_in_flight: Option<u32>) -> Result<Permit, Refusal> {
        let now_in_flight = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        let release = || {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        };
        if max_in_flight.is_some_and(|max| now_in_flight > max) {
            release();
            return Err(Refusal::Busy);
        }
        let probe = {
            let mut inner = self.lock();
            match inner.state {
                State::Closed => false,
                State::Open if Instant::now() < inner.open_until => {
                    drop(inner);
                    release();
                    return Err(Refusal::Open);
                }
                State::Open => {
                    self.transition(&mut inner, State::HalfOpen);
                    inner.probes_out = 1;
                    true
                }
                State::HalfOpen
                    if inner.probes_out + inner.probes_passed < inner.settings.probes =>
                {
                    inner.probes_out += 1;
                    true
                }
                State::HalfOpen => {
                    drop(inner);
                    release();
                    return Err(Refusal::Open);
                }
            }
        };
        Ok(Permit {
            health: self.clone(),
            probe,
            done: AtomicBool::new(false),
        })
    }

    fn settle(&self, probe: bool, verdict: Verdict) {
        let mut inner = self.lock();
        match inner.state {
            State::Closed if !probe => self.count(&mut inner, verdict),
            State::HalfOpen if probe => {
                inner.probes_out = inner.probes_out.saturating_sub(1);
                match verdict {
                    Verdict::Failure => self.open(&mut inner),
                    Verdict::Success => {
                        inner.probes_passed += 1;
                        if inner.probes_passed >= inner.settings.probes {
                            self.transition(&mut inner, State::Closed);
                        }
                    }
                    Verdict::Neutral => {}
                }
            }
            // Calls admitted under an earlier state: their verdict is stale.
            _ => {}
        }
    }

    fn count(&self, inner: &mut Inner, verdict: Verdict) {
        let failed = match verdict {
            Verdict::Success => false,
            Verdict::Failure => true,
            Verdict::Neutral => return,
        };
        let bucket_len = (inner.settings.window / BUCKETS as u32).max(Duration::from_millis(1));
        let tick = (self.origin.elapsed().as_nanos() / bucket_len.as_nanos()) as u64;
        let b = &mut inner.buckets[(tick % BUCKETS as u64) as usize];
        if b.tick != tick {
            *b = Bucket {
                tick,
                ..Bucket::default()
            };
        }
        b.calls += 1;
        if failed {
            b.failures += 1;
            inner.consecutive += 1;
        } else {
            inner.consecutive = 0;
        }
        let (calls, failures) = inner
            .buckets
            .iter()
            .filter(|b| b.tick + BUCKETS as u64 > tick)
            .fold((0u32, 0u32), |(c, f), b| (c + b.calls, f + b.failures));
        let s = inner.settings;
        let rate_tripped = calls >= s.min_calls
            && calls > 0
            && f64::from(failures) / f64::from(calls) >= s.failure_rate;
        if failed && (inner.consecutive >= s.consecutive_failures || rate_tripped) {
            self.open(inner);
        }
    }

    fn open(&self, inner: &mut Inner) {
        inner.open_until = Instant::now() + inner.settings.cooldown;
        self.transition(inner, State::Open);
    }

    fn transition(&self, inner: &mut Inner, to: State) {
        let from = inner.state;
        inner.state = to;
        inner.probes_out = 0;
        inner.probes_passed = 0;
        if to == State::Closed {
            inner.consecutive = 0;
            inner.buckets = [Bucket::default(); BUCKETS];
        }
        self.transitions[to.index()].fetch_add(1, Ordering::Relaxed);
        let (backend, model) = (&self.backend, &self.model);
        match to {
            State::Open => tracing::warn!(
                backend,
                model,
                from = from.as_str(),
                cooldown_ms = inner.settings.cooldown.as_millis() as u64,
                "circuit breaker opened"
            ),
            _ => tracing::info!(
                backend,
                model,
                from = from.as_str(),
                to = to.as_str(),
                "circuit breaker state changed"
            ),
        }
    }

    fn snapshot(&self) -> HealthSnapshot {
        let inner = self.lock();
        let now = Instant::now();
        let bucket_len = (inner.settings.window / BUCKETS as u32).max(Duration::from_millis(1));
        let tick = (self.origin.elapsed().as_nanos() / bucket_len.as_nanos()) as u64;
        let (calls, failures) = inner
            .buckets
            .iter()
            .filter(|b| b.tick + BUCKETS as u64 > tick)
            .fold((0u32, 0u32), |(c, f), b| (c + b.calls, f + b.failures));
        HealthSnapshot {
            backend: self.backend.clone(),
            model: self.model.clone(),
            state: inner.state,
            window_calls: calls,
            window_failures: failures,
            consecutive_failures: inner.consecutive,
            retry_in_ms: match inner.state {
                State::Open => inner.open_until.saturating_duration_since(now).as_millis() as u64,
                _ => 0,
            },
            in_flight: self.in_flight(),
            opened_total: self.transitions[State::Open.index()].load(Ordering::Relaxed),
        }
    }
}

/// One admitted call. Dropped without a verdict it counts as [`Verdict::Neutral`]; either way
/// it leaves the in-flight count when dropped.
pub struct Permit {
    health: Arc<Health>,
    probe: bool,
    done: AtomicBool,
}

impl Permit {
    /// Reports how the call went; only the first report counts.
    pub fn settle(&self, verdict: Verdict) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.health.settle(self.probe, verdict);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.settle(Verdict::Neutral);
        self.health.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("backend", &self.health.backend)
            .field("model", &self.health.model)
            .field("probe", &self.probe)
            .finish()
    }
}

/// What `/admin/breakers` shows for one backend + model.
#[derive(Debug, Clone, Serialize)]
pub struct HealthSnapshot {
    pub backend: String,
    pub model: String,
    pub state: State,
    pub window_calls: u32,
    pub window_failures: u32,
    pub consecutive_failures: u32,
    pub retry_in_ms: u64,
    pub in_flight: u32,
    pub opened_total: u64,
}

/// Every backend + model's health, shared by all policy versions.
#[derive(Default)]
pub struct Board {
    entries: Mutex<HashMap<(String, String), Arc<Health>>>,
}

impl Board {
    /// The health record of `backend` + `model`, created with `settings` on first use. An
    /// existing record keeps its settings until [`Health::configure`] (a policy accepted).
    pub fn entry(&self, backend: &str, model: &str, settings: BreakerSettings) -> Arc<Health> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .entry((backend.to_string(), model.to_string()))
            .or_insert_with(|| Arc::new(Health::new(backend, model, settings)))
            .clone()
    }

    /// [`Self::entry`], then `settings` applied.
    pub fn get(&self, backend: &str, model: &str, settings: BreakerSettings) -> Arc<Health> {
        let health = self.entry(backend, model, settings);
        health.configure(settings);
        health
    }

    pub fn snapshot(&self) -> Vec<HealthSnapshot> {
        let entries: Vec<Arc<Health>> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out: Vec<HealthSnapshot> = entries.iter().map(|h| h.snapshot()).collect();
        out.sort_by(|a, b| (&a.backend, &a.model).cmp(&(&b.backend, &b.model)));
        out
    }
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    backend: String,
    model: String,
    to: &'static str,
}

/// `/metrics`: breaker state (0 closed, 1 half-open, 2 open), transitions, calls in flight.
#[derive(Debug, Clone, Default)]
pub struct BoardMetrics(pub Arc<Board>);

impl Collector for BoardMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let entries: Vec<Arc<Health>> = {
            let map = self.0.entries.lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<Arc<Health>> = map.values().cloned().collect();
            v.sort_by(|a, b| (&a.backend, &a.model).cmp(&(&b.backend, &b.model)));
            v
        };
        let labels = |h: &Health| BackendLabels {
            backend: h.backend.clone(),
            model: h.model.clone(),
        };
        let mut metric = encoder.encode_descriptor(
            "breaker_state",
            "Circuit breaker state per backend and model: 0 closed, 1 half-open, 2 open",
            None,
            MetricType::Gauge,
        )?;
        for h in &entries {
            ConstGauge::new(h.state().index() as i64).encode(metric.encode_family(&labels(h))?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "backend_in_flight",
            "Calls in flight per backend and model",
            None,
            MetricType::Gauge,
        )?;
        for h in &entries {
            ConstGauge::new(i64::from(h.in_flight())).encode(metric.encode_family(&labels(h))?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "breaker_transitions",
            "Circuit breaker state changes per backend, model and new state",
            None,
            MetricType::Counter,
        )?;
        for h in &entries {
            for to in [State::Closed, State::HalfOpen, State::Open] {
                let n = h.transitions[to.index()].load(Ordering::Relaxed);
                let l = TransitionLabels {
                    backend: h.backend.clone(),
                    model: h.model.clone(),
                    to: to.as_str(),
                };
                ConstCounter::new(n).encode(metric.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_rate: 0.5,
            window: Duration::from_secs(60),
            min_calls: 4,
            consecutive_failures: 3,
            cooldown: Duration::from_millis(50),
            probes: 2,
        }
    }

    fn call(h: &Arc<Health>, v: Verdict) -> Result<(), Refusal> {
        h.admit(None)?.settle(v);
        Ok(())
    }

    #[test]
    fn consecutive_failures_open_then_probes_close() {
        let board = Board::default();
        let h = board.get("up", "m", settings());
        call(&h, Verdict::Failure).unwrap();
        call(&h, Verdict::Failure).unwrap();
        assert_eq!(h.state(), State::Closed);
        call(&h, Verdict::Failure).unwrap();
        assert_eq!(h.state(), State::Open);
        assert_eq!(call(&h, Verdict::Success), Err(Refusal::Open));

        std::thread::sleep(Duration::from_millis(60));
        // Two probes may go out at once; a third waits.
        let p1 = h.admit(None).unwrap();
        let p2 = h.admit(None).unwrap();
        assert_eq!(h.state(), State::HalfOpen);
        assert_eq!(h.admit(None).err(), Some(Refusal::Open));
        p1.settle(Verdict::Success);
        assert_eq!(h.state(), State::HalfOpen);
        p2.settle(Verdict::Success);
        assert_eq!(h.state(), State::Closed);
        let snap = &board.snapshot()[0];
        assert_eq!(snap.opened_total, 1);
        assert_eq!(snap.window_calls, 0, "closing resets the window");
    }

    #[test]
    fn failed_probe_reopens_and_neutral_probe_frees_its_slot() {
        let h = Board::default().get("up", "m", settings());
        for _ in 0..3 {
            call(&h, Verdict::Failure).unwrap();
        }
        std::thread::sleep(Duration::from_millis(60));
        drop(h.admit(None).unwrap()); // neutral: the slot comes back
        let p = h.admit(None).unwrap();
        p.settle(Verdict::Failure);
        assert_eq!(h.state(), State::Open);
        assert!(h.retry_in() > Duration::ZERO);
    }

    #[test]
    fn failure_rate_needs_min_calls() {
        let mut s = settings();
        s.consecutive_failures = 100;
        let h = Board::default().get("up", "m", s);
        call(&h, Verdict::Failure).unwrap();
        call(&h, Verdict::Success).unwrap();
        call(&h, Verdict::Failure).unwrap();
        assert_eq!(h.state(), State::Closed, "3 calls < min_calls");
        call(&h, Verdict::Failure).unwrap();
        assert_eq!(h.state(), State::Open, "3 of 4 failed");
    }

    #[test]
    fn max_in_flight_and_settings_survive_reload() {
        let board = Board::default();
        let h = board.get("up", "m", settings());
        let a = h.admit(Some(1)).unwrap();
        assert_eq!(h.admit(Some(1)).err(), Some(Refusal::Busy));
        drop(a);
        assert_eq!(h.in_flight(), 0);
        for _ in 0..3 {
            call(&h, Verdict::Failure).unwrap();
        }
        let again = board.get("up", "m", BreakerSettings::default());
        assert!(Arc::ptr_eq(&h, &again));
        assert_eq!(again.state(), State::Open, "a reload keeps the state");
    }
}
