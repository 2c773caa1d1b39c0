//! The answer cache: exact, then semantic, always inside one scope (see [`key`]).
//!
//! - Each tenant has its own `moka` cache (TTL, capacity weighed in bytes) and its own vector
//!   index: two tenants never share an entry, whatever they ask.
//! - Exact level: the scope plus the normalized last user message.
//! - Semantic level: inside the same scope only, the last user message's embedding against those
//!   of cached questions ([`crate::vectors::FlatIndex`]), above the tenant's threshold, and only
//!   when both questions agree on numbers, negation and time words ([`guard`]).
//! - moka's eviction listener removes an entry's vector when the entry leaves (TTL, size,
//!   replacement), so the index never points at answers that are gone.
//! - Only complete answers are stored: one choice, `finish_reason: "stop"`, no tool calls, a
//!   success status. Streamed answers are kept as the frames that were relayed and put together
//!   after the stream has ended, off the client's path.

pub mod guard;
pub mod key;
pub mod l2;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Response, header};
use moka::notification::RemovalCause;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::body::{self, Body};
use crate::embed::Embedder;
use crate::openai::{Endpoint, Usage};
use crate::vectors::FlatIndex;

pub use key::{Bypass, Plan, plan};
pub use l2::{L2, L2Config};

pub const X_FUKE_CACHE: &str = "x-fuke-cache";
pub const X_FUKE_CACHE_SIMILARITY: &str = "x-fuke-cache-similarity";

/// Largest streamed answer kept for the cache (bigger ones are relayed, not cached).
const MAX_CAPTURE: usize = 1 << 20;
/// Semantic candidates checked against the guards, best first.
const SEMANTIC_CANDIDATES: usize = 4;
/// Least similarity of a cached question checked as a near repeat (the same words up to typos
/// and courtesy, which embeddings score low: "reqest a repeat perscription" scores 0.42).
const NEAR_REPEAT_FLOOR: f32 = 0.35;

/// A tenant's cache settings, from policy (`tenants.NAME.cache`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Semantic level on (needs `embedder:` in fuke.yaml); the exact level is always on.
    pub semantic: bool,
    /// Least cosine similarity of two questions for a semantic hit.
    pub threshold: f32,
    pub ttl: Duration,
    /// Bytes of answers, questions and vectors kept for the tenant.
    pub capacity_bytes: u64,
    /// Also cache answers to sampled requests (temperature absent or above 0).
    pub sampled: bool,
    /// Semantic matching of Chinese, Japanese and Korean questions too (only with an embedder
    /// that separates them; the default MiniLM does not). Off: such questions use the exact level.
    pub semantic_cjk: bool,
}

/// Defaults chosen from `benches/cache_eval` (BENCHMARKS.md, "Semantic cache").
pub const DEFAULT_THRESHOLD: f32 = 0.86;
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_CAPACITY_BYTES: u64 = 64 << 20;

/// What the cache did for one request; recorded on its usage event.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum CacheUse {
    /// The tenant has no cache, or the endpoint is not cached.
    #[default]
    Off,
    /// The request may not use the cache (the reason: `no-store`, `tools`, `n`, `sampled`…).
    Bypass(Bypass),
    Miss,
    Hit {
        exact: bool,
        similarity: f32,
        /// The tokens the cached answer cost when it was made (what this hit saved).
        saved: Option<Usage>,
    },
}

impl CacheUse {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheUse::Off => "off",
            CacheUse::Bypass(_) => "bypass",
            CacheUse::Miss => "miss",
            CacheUse::Hit { .. } => "hit",
        }
    }
}

/// A cached answer: what replays it, and what the Redis level stores (as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// The normalized question it answered (for the semantic guards).
    question: Option<String>,
    /// The model that made it, as its upstream named it.
    pub model: String,
    /// The assistant message (`role`, `content`, `refusal`, annotations…).
    message: Map<String, Value>,
    system_fingerprint: Option<String>,
    /// The tokens it cost when it was made.
    pub usage: Option<Usage>,
}

impl Answer {
    /// A copy with `redact` applied to the message text, or `None` when it changed nothing
    /// (response rules of the tenant replaying it).
    pub fn redacted(&self, mut redact: impl FnMut(&str) -> Option<String>) -> Option<Answer> {
        let mut copy: Option<Answer> = None;
        for (key, value) in &self.message {
            let Value::String(text) = value else { continue };
            if key == "role" {
                continue;
            }
            if let Some(new) = redact(text) {
                copy.get_or_insert_with(|| self.clone())
                    .message
                    .insert(key.clone(), Value::String(new));
            }
        }
        copy
    }
}

/// An answer in a tenant's cache.
#[derive(Debug)]
pub struct Entry {
    id: u64,
    weight: u32,
    pub answer: Answer,
}

impl Entry {
    /// `answer` under a new id, weighed with its question's vector.
    fn new(answer: Answer, vector: Option<&[f32]>) -> Entry {
        let message: usize = answer
            .message
            .iter()
            .map(|(k, v)| k.len() + v.as_str().map_or(32, str::len))
            .sum();
        let total = 256
            + answer.model.len()
            + message
            + answer.question.as_ref().map_or(0, String::len)
            + vector.map_or(0, |v| v.len() * 4);
        Entry {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            weight: total.min(u32::MAX as usize) as u32,
            answer,
        }
    }
}

/// The cache's key: scope and exact hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    scope: key::Hash,
    exact: key::Hash,
}

/// Vectors of one scope's cached questions, by entry id.
struct ScopeIndex {
    vectors: FlatIndex,
    keys: HashMap<u64, Key>,
}

type Index = RwLock<HashMap<key::Hash, ScopeIndex>>;

struct TenantCache {
    ttl: Duration,
    capacity: u64,
    entries: moka::sync::Cache<Key, Arc<Entry>>,
    index: Arc<Index>,
}

impl TenantCache {
    fn new(ttl: Duration, capacity: u64) -> Self {
        let index: Arc<Index> = Arc::default();
        let listener_index = index.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_: &Key, e: &Arc<Entry>| e.weight)
            .time_to_live(ttl)
            .eviction_listener(move |k: Arc<Key>, e: Arc<Entry>, _cause: RemovalCause| {
                // By entry id: a replacement's own vector (a new id) stays.
                let mut index = listener_index.write().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = index.get_mut(&k.scope) {
                    s.vectors.remove(e.id);
                    s.keys.remove(&e.id);
                    if s.keys.is_empty() {
                        index.remove(&k.scope);
                    }
                }
            })
            .build();
        TenantCache {
            ttl,
            capacity,
            entries,
            index,
        }
    }

    fn insert(&self, key: Key, entry: Entry, vector: Option<&[f32]>) -> Arc<Entry> {
        let id = entry.id;
        let entry = Arc::new(entry);
        if let Some(v) = vector {
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            let scope = index.entry(key.scope).or_insert_with(|| ScopeIndex {
                vectors: FlatIndex::new(v.len()),
                keys: HashMap::new(),
            });
            if scope.vectors.dims() == v.len() {
                scope.vectors.insert(id, v);
                scope.keys.insert(id, key);
            }
        }
        self.entries.insert(key, entry.clone());
        entry
    }

    /// Whether `scope` holds any question's vector (empty scopes are removed).
    fn has_vectors(&self, scope: &key::Hash) -> bool {
        self.index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(scope)
    }

    /// Semantic candidates in `scope`, best first.
    fn similar(&self, scope: &key::Hash, v: &[f32], threshold: f32) -> Vec<(Key, f32)> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let Some(s) = index.get(scope) else {
            return Vec::new();
        };
        s.vectors
            .search(v, SEMANTIC_CANDIDATES, threshold)
            .into_iter()
            .filter_map(|(id, score)| s.keys.get(&id).map(|k| (*k, score)))
            .collect()
    }
}

/// Every tenant's cache. Outlives policy versions: a reload that leaves a tenant's TTL and
/// capacity alone keeps its entries.
#[derive(Default)]
pub struct Store {
    tenants: RwLock<HashMap<Arc<str>, Arc<TenantCache>>>,
    /// The Redis second level of the exact cache, when configured.
    l2: Option<Arc<L2>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The result of a lookup.
pub enum Lookup {
    Hit {
        entry: Arc<Entry>,
        exact: bool,
        similarity: f32,
    },
    /// Not found; the fill to complete once the answer is known (none for `no-store`).
    Miss(Fill),
}

impl Store {
    /// A store whose exact level is backed by Redis (shared by replicas). Needs a Tokio runtime.
    pub fn with_l2(cfg: &L2Config) -> Result<Store, String> {
        Ok(Store {
            tenants: RwLock::default(),
            l2: Some(Arc::new(L2::start(cfg)?)),
        })
    }

    /// Drops the caches of tenants `keep` rejects (removed from policy, or cache turned off), so
    /// that their memory is returned at once rather than at restart.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| keep(name));
    }

    /// Whether the Redis second level is configured and connected.
    pub fn l2_connected(&self) -> bool {
        self.l2.as_ref().is_some_and(|l| l.connected())
    }

    fn tenant(&self, name: &Arc<str>, s: &Settings) -> Arc<TenantCache> {
        if let Some(t) = self
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .filter(|t| t.ttl == s.ttl && t.capacity == s.capacity_bytes)
        {
            return t.clone();
        }
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        match tenants.get(name) {
            Some(t) if t.ttl == s.ttl && t.capacity == s.capacity_bytes => t.clone(),
            _ => {
                // New tenant, or its TTL/capacity changed: start afresh with the new settings.
                let t = Arc::new(TenantCache::new(s.ttl, s.capacity_bytes));
                tenants.insert(name.clone(), t.clone());
                t
            }
        }
    }

    /// Exact, then semantic lookup of `plan` in `tenant`'s cache.
    pub async fn lookup(
        &self,
        tenant: &Arc<str>,
        settings: &Settings,
        plan: Plan,
        embedder: Option<Arc<Embedder>>,
    ) -> Lookup {
        let cache = self.tenant(tenant, settings);
        let key = Key {
            scope: plan.scope,
            exact: plan.exact,
        };
        if plan.lookup
            && let Some(entry) = cache.entries.get(&key)
        {
            return Lookup::Hit {
                entry,
                exact: true,
                similarity: 1.0,
            };
        }
        let l2 = self.l2.as_ref().map(|l2| {
            (
                l2.clone(),
                l2.key(tenant, &key.scope, &key.exact),
                settings.ttl,
            )
        });
        if plan.lookup
            && let Some((l2, l2_key, _)) = &l2
            && let Some(answer) = l2.get(l2_key).await
        {
            // Another replica's answer: kept here too (exact level only: no vector).
            let entry = cache.insert(key, Entry::new(answer, None), None);
            return Lookup::Hit {
                entry,
                exact: true,
                similarity: 1.0,
            };
        }
        let semantic = settings.semantic
            && plan
                .question
                .as_deref()
                .is_some_and(|q| settings.semantic_cjk || !guard::is_cjk(q));
        let embedder = embedder.filter(|_| semantic);
        // Embedding is the semantic level's whole cost: not paid on the request's path when the
        // scope holds no vector to compare with (the fill embeds after the answer is sent).
        let mut vector = None;
        if plan.lookup
            && cache.has_vectors(&plan.scope)
            && let (Some(e), Some(q)) = (&embedder, &plan.question)
        {
            match e.embed_queries(&[q.as_str()]).await {
                Ok(mut v) => vector = v.pop(),
                Err(err) => {
                    tracing::warn!(error = %err, "cache: question not embedded; exact level only")
                }
            }
        }
        if let (Some(v), Some(normalized)) = (&vector, &plan.normalized) {
            let floor = settings.threshold.min(NEAR_REPEAT_FLOOR);
            for (k, score) in cache.similar(&plan.scope, v, floor) {
                let Some(entry) = cache.entries.get(&k) else {
                    continue;
                };
                if entry.answer.question.as_deref().is_some_and(|q| {
                    score >= settings.threshold && guard::agree(q, normalized)
                        || guard::near_repeat(q, normalized)
                }) {
                    return Lookup::Hit {
                        entry,
                        exact: false,
                        similarity: score,
                    };
                }
            }
        }
        Lookup::Miss(Fill {
            cache,
            l2,
            key,
            question: plan.question,
            normalized: plan.normalized,
            vector,
            embedder,
        })
    }

    /// Entries per tenant (after pending evictions), for metrics and tests.
    pub fn entry_counts(&self) -> Vec<(Arc<str>, u64, u64)> {
        let tenants = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = tenants
            .iter()
            .map(|(n, t)| {
                t.entries.run_pending_tasks();
                (
                    n.clone(),
                    t.entries.entry_count(),
                    t.entries.weighted_size(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Vectors held for `tenant` (all scopes).
    pub fn vector_count(&self, tenant: &str) -> usize {
        let tenants = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        tenants.get(tenant).map_or(0, |t| {
            t.entries.run_pending_tasks();
            let index = t.index.read().unwrap_or_else(|p| p.into_inner());
            index.values().map(|s| s.vectors.len()).sum()
        })
    }
}

/// Metrics read at scrape time: entries and bytes per tenant.
#[derive(Clone)]
pub struct StoreMetrics(pub Arc<Store>);

impl std::fmt::Debug for StoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreMetrics")
    }
}

impl Collector for StoreMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.0.entry_counts();
        for (name, help, pick) in [
            (
                "cache_entries",
                "Answers in a tenant's cache",
                (|c: &(Arc<str>, u64, u64)| c.1) as fn(&(Arc<str>, u64, u64)) -> u64,
            ),
            ("cache_bytes", "Bytes held by a tenant's cache", |c| c.2),
        ] {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for c in &counts {
                let labels = [("tenant", c.0.as_ref())];
                ConstGauge::new(pick(c) as i64).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Stores the answer of a missed request once it is complete.
pub struct Fill {
    cache: Arc<TenantCache>,
    /// The second level, the entry's key there, and its TTL.
    l2: Option<(Arc<L2>, String, Duration)>,
    key: Key,
    question: Option<String>,
    normalized: Option<String>,
    /// The question's embedding, when the lookup computed it (else the fill embeds it).
    vector: Option<Vec<f32>>,
    /// Present when the semantic level is on.
    embedder: Option<Arc<Embedder>>,
}

impl Fill {
    /// A complete JSON answer (status 2xx) to store.
    pub fn json(self, body: Bytes) {
        tokio::spawn(async move { self.store(&body).await });
    }

    /// The frames of a complete SSE answer (up to and including `[DONE]`).
    pub fn sse(self, frames: Vec<Bytes>) {
        tokio::spawn(async move {
            if let Some(json) =
                crate::routing::assemble::from_frames(&frames, Endpoint::ChatCompletions)
            {
                self.store(&json).await;
            }
        });
    }

    async fn store(self, body: &[u8]) {
        let Some(mut answer) = answer_of(body) else {
            return;
        };
        let mut vector = self.vector;
        if vector.is_none()
            && let (Some(e), Some(q)) = (&self.embedder, &self.question)
        {
            vector = e
                .embed_queries(&[q.as_str()])
                .await
                .ok()
                .and_then(|mut v| v.pop());
        }
        answer.question = self.normalized;
        let entry = Entry::new(answer, vector.as_deref());
        let entry = self.cache.insert(self.key, entry, vector.as_deref());
        if let Some((l2, key, ttl)) = self.l2 {
            l2.set(key, &entry.answer, ttl).await;
        }
    }
}

/// Collects relayed SSE frames for a fill, giving up past [`MAX_CAPTURE`] bytes.
pub struct Capture {
    fill: Option<Fill>,
    frames: Vec<Bytes>,
    bytes: usize,
}

impl Capture {
    pub fn new(fill: Fill) -> Self {
        Capture {
            fill: Some(fill),
            frames: Vec::new(),
            bytes: 0,
        }
    }

    /// Keeps a frame (a reference-counted handle, not a copy).
    pub fn push(&mut self, frame: &Bytes) {
        if self.fill.is_none() {
            return;
        }
        self.bytes += frame.len();
        if self.bytes > MAX_CAPTURE {
            self.fill = None;
            self.frames = Vec::new();
        } else {
            self.frames.push(frame.clone());
        }
    }

    /// The stream completed: store it.
    pub fn complete(&mut self) {
        if let Some(fill) = self.fill.take() {
            fill.sse(std::mem::take(&mut self.frames));
        }
    }
}

#[derive(Deserialize)]
struct AnswerIn {
    #[serde(default)]
    model: String,
    choices: Vec<ChoiceIn>,
    usage: Option<Usage>,
    system_fingerprint: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceIn {
    message: Map<String, Value>,
    finish_reason: Option<String>,
}

/// A storable answer: one choice that stopped by itself, with text content and no tool calls.
fn answer_of(body: &[u8]) -> Option<Answer> {
    let a: AnswerIn = serde_json::from_slice(body).ok()?;
    let [choice] = <[ChoiceIn; 1]>::try_from(a.choices).ok()?;
    if choice.finish_reason.as_deref() != Some("stop") {
        return None;
    }
    let m = choice.message;
    let present = |k: &str| m.get(k).is_some_and(|v| !v.is_null());
    if present("tool_calls") || present("function_call") || present("audio") {
        return None;
    }
    if !m.get("content").is_some_and(Value::is_string) {
        return None;
    }
    Some(Answer {
        question: None,
        model: a.model,
        message: m,
        system_fingerprint: a.system_fingerprint,
        usage: a.usage,
    })
}

fn fresh_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let random: [u8; 24] = rand::random();
    let mut id = String::with_capacity(33);
    id.push_str("chatcmpl-");
    id.extend(
        random
            .iter()
            .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char),
    );
    id
}

/// The cached answer as the client asked for it: JSON, or SSE chunks (with the usage chunk when
/// `include_usage`), under a fresh `id` and `created`.
pub fn replay(answer: &Answer, stream: bool, include_usage: bool) -> Response<Body> {
    let id = fresh_id();
    let created = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let usage = answer.usage.map(|u| json!(u));
    let (body, content_type) = if !stream {
        let mut out = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": answer.model,
            "choices": [{"index": 0, "message": answer.message, "logprobs": null,
                "finish_reason": "stop"}],
        });
        if let Some(u) = usage {
            out["usage"] = u;
        }
        if let Some(f) = &answer.system_fingerprint {
            out["system_fingerprint"] = Value::from(f.as_str());
        }
        (
            Bytes::from(serde_json::to_vec(&out).unwrap_or_default()),
            "application/json",
        )
    } else {
        let chunk = |choices: Value, usage: Option<&Value>| {
            let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                "model": answer.model, "choices": choices});
            if let Some(f) = &answer.system_fingerprint {
                c["system_fingerprint"] = Value::from(f.as_str());
            }
            if include_usage {
                c["usage"] = usage.cloned().unwrap_or(Value::Null);
            }
            c
        };
        let mut delta = Map::new();
        for (k, v) in &answer.message {
            if k != "role" {
                delta.insert(k.clone(), v.clone());
            }
        }
        let mut events = vec![
            chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}]),
                None,
            ),
            chunk(
                json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]),
                None,
            ),
            chunk(
                json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]),
                None,
            ),
        ];
        if include_usage {
            events.push(chunk(
                json!([]),
                Some(usage.as_ref().unwrap_or(&Value::Null)),
            ));
        }
        let mut buf = BytesMut::with_capacity(1024);
        for e in events {
            buf.put_slice(b"data: ");
            buf.put_slice(&serde_json::to_vec(&e).unwrap_or_default());
            buf.put_slice(b"\n\n");
        }
        buf.put_slice(b"data: [DONE]\n\n");
        (buf.freeze(), "text/event-stream")
    };
    let mut resp = Response::new(body::full(body));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if stream {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    resp
}

/// Sets `x-fuke-cache` (and the similarity on hits) on a response.
pub fn label(resp: &mut Response<Body>, used: CacheUse) {
    if used == CacheUse::Off {
        return;
    }
    let h = resp.headers_mut();
    h.insert(X_FUKE_CACHE, HeaderValue::from_static(used.as_str()));
    if let CacheUse::Hit { similarity, .. } = used
        && let Ok(v) = HeaderValue::from_str(&format!("{similarity:.4}"))
    {
        h.insert(X_FUKE_CACHE_SIMILARITY, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_text_answers_are_stored() {
        let ok = br#"{"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let e = answer_of(ok).unwrap();
        assert_eq!(e.usage.unwrap().total_tokens, 4);
        let truncated = String::from_utf8_lossy(ok).replace("\"stop\"", "\"length\"");
        assert!(answer_of(truncated.as_bytes()).is_none());
        let tools = String::from_utf8_lossy(ok).replace(
            "\"content\":\"hi\"",
            "\"content\":null,\"tool_calls\":[{\"id\":\"c\"}]",
        );
        assert!(answer_of(tools.as_bytes()).is_none());
        let two = String::from_utf8_lossy(ok).replace(
            "\"choices\":[{",
            "\"choices\":[{\"index\":1,\"message\":{\"role\":\"assistant\",\"content\":\"x\"},\"finish_reason\":\"stop\"},{",
        );
        assert!(answer_of(two.as_bytes()).is_none());
        assert!(answer_of(br#"{"error":{"message":"x"}}"#).is_none());
    }

    #[test]
    fn eviction_removes_the_vector() {
        let cache = TenantCache::new(Duration::from_secs(60), 1 << 20);
        let key = Key {
            scope: [1; 16],
            exact: [2; 16],
        };
        let v = [1.0f32, 0.0, 0.0];
        let entry = || {
            let answer = Answer {
                question: Some("q".into()),
                model: "m".into(),
                message: Map::new(),
                system_fingerprint: None,
                usage: None,
            };
            Entry::new(answer, Some(&v))
        };
        cache.insert(key, entry(), Some(&v));
        // A replacement keeps exactly one vector: its own.
        cache.insert(key, entry(), Some(&v));
        cache.entries.run_pending_tasks();
        assert_eq!(cache.similar(&key.scope, &v, 0.5).len(), 1);
        cache.entries.invalidate(&key);
        cache.entries.run_pending_tasks();
        assert!(cache.similar(&key.scope, &v, 0.5).is_empty());
        assert!(cache.index.read().unwrap().is_empty());
    }
}
