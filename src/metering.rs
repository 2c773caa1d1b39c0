//! Usage events: one per finished model request, handed to a [`UsageSink`]. The default sink
//! writes a JSON line to the log stream; the durable ledger implements the same trait.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::backends::BoxFuture;
use crate::cache::CacheUse;
use crate::ledger::pricing::Pricing;
use crate::openai::{Endpoint, Usage, put_json_string};

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole answer (or the upstream's error answer) reached the client.
    Completed,
    /// The client went away before the end; the upstream request was cancelled.
    ClientAborted,
    /// The upstream failed, hung or broke the stream.
    UpstreamFailed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::ClientAborted => "client_aborted",
            Outcome::UpstreamFailed => "upstream_failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UsageEvent {
    pub request_id: Arc<str>,
    pub tenant: Arc<str>,
    pub key_id: Arc<str>,
    pub endpoint: Endpoint,
    pub model_alias: Arc<str>,
    pub upstream_model: Arc<str>,
    pub backend: Arc<str>,
    /// The upstream's own counts; `None` when it reported none (never estimated).
    pub usage: Option<Usage>,
    pub status: u16,
    pub latency: Duration,
    pub streamed: bool,
    pub outcome: Outcome,
    pub finished_at: SystemTime,
    /// Why earlier route candidates did not serve (`timeout,breaker_open`), if any did not.
    pub fallback: Option<Arc<str>>,
    /// Output chunks the client received (streams): what was delivered when a stream broke
    /// before the upstream reported usage.
    pub streamed_chunks: u32,
    /// What the answer cache did. On a hit `usage` is zero (no model ran) and the tokens the
    /// cached answer cost are in `CacheUse::Hit::saved`.
    pub cache: CacheUse,
    /// Knowledge-base excerpts injected into the request.
    pub kb_chunks: u32,
    /// Content rules that fired (`set/rule`), on the request and the answer; never the text.
    pub rules: Vec<Arc<str>>,
    /// The pricing table of the policy version the request ran under.
    pub pricing: Option<Arc<Pricing>>,
}

/// Where the tokens billed for a request come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The upstream's (or local model's) own usage report.
    Upstream,
    /// A stream that ended before the upstream reported usage (client gone, upstream broke):
    /// the output chunks the client received, one token each; prompt tokens unknown (0).
    Streamed,
    /// Nothing reported and nothing streamed.
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Upstream => "upstream",
            UsageSource::Streamed => "streamed",
            UsageSource::None => "none",
        }
    }
}

impl UsageEvent {
    /// The usage billed: the upstream's report, else what a stream delivered (see
    /// [`UsageSource::Streamed`]), else nothing.
    pub fn billed(&self) -> (Usage, UsageSource) {
        match self.usage {
            Some(u) => (u, UsageSource::Upstream),
            None if self.streamed && self.streamed_chunks > 0 => (
                Usage {
                    completion_tokens: u64::from(self.streamed_chunks),
                    total_tokens: u64::from(self.streamed_chunks),
                    ..Usage::default()
                },
                UsageSource::Streamed,
            ),
            None => (Usage::default(), UsageSource::None),
        }
    }

    /// What the request cost (nano-USD) and the price version used; `None` when the served
    /// model has no price. A cache hit ran no model and costs nothing.
    pub fn cost(&self) -> Option<(i64, &Arc<str>)> {
        let pricing = self.pricing.as_ref()?;
        if matches!(self.cache, CacheUse::Hit { .. }) {
            return Some((0, &pricing.version));
        }
        let price = pricing.price(&self.backend, &self.upstream_model)?;
        Some((price.cost(&self.billed().0), &pricing.version))
    }
}

/// Hands every event to several sinks (the log line and the ledger); done when all are.
pub struct Tee(pub Vec<Arc<dyn UsageSink>>);

impl UsageSink for Tee {
    fn record(&self, event: UsageEvent) -> BoxFuture<'static, ()> {
        let mut futs = Vec::with_capacity(self.0.len());
        if let Some((last, rest)) = self.0.split_last() {
            for s in rest {
                futs.push(s.record(event.clone()));
            }
            futs.push(last.record(event));
        }
        Box::pin(async move {
            futures_util::future::join_all(futs).await;
        })
    }
}

/// Receives every usage event. `record` completes once the event is safely stored; the gateway
/// awaits it before releasing the last bytes of a response.
pub trait UsageSink: Send + Sync {
    fn record(&self, event: UsageEvent) -> BoxFuture<'static, ()>;
}

/// The default sink: one JSON line per request (`{"usage":{...}}`), written through the
/// process's non-blocking log writer. Serializing a flat record is several times cheaper than
/// formatting a 16-field `tracing` event (BENCHMARKS.md), and the line is machine-readable for
/// whoever bills from logs until the ledger is configured.
pub struct LogSink<W> {
    out: W,
}

impl<W> LogSink<W>
where
    W: Send + Sync + 'static,
    for<'a> &'a W: Write,
{
    pub fn new(out: W) -> Self {
        LogSink { out }
    }
}

thread_local! {
    /// Each worker thread's line buffer, reused from request to request.
    static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
}

impl<W> UsageSink for LogSink<W>
where
    W: Send + Sync + 'static,
    for<'a> &'a W: Write,
{
    fn record(&self, ev: UsageEvent) -> BoxFuture<'static, ()> {
        LINE.with_borrow_mut(|buf| {
            buf.clear();
            usage_line(buf, &ev);
            // One write per line, through a shared reference (no handle cloned per line): the
            // batching writer keeps lines whole.
            if let Err(e) = (&self.out).write_all(buf) {
                tracing::error!(error = %e, "usage line could not be written");
            }
            // A rare huge line (many rule names) does not stay allocated on the thread.
            if buf.capacity() > 64 << 10 {
                *buf = Vec::with_capacity(512);
            }
        });
        Box::pin(async {})
    }
}

/// `{"usage":{...}}` and a newline: the fields in a fixed order, written directly (the keys
/// are constants; only the values need escaping). The same JSON as serializing the record
/// with serde (the test below holds it to that), at a fraction of the cost: this runs once per
/// request.
fn usage_line(out: &mut Vec<u8>, ev: &UsageEvent) {
    let usage = ev.usage.unwrap_or_default();
    let ts = ev
        .finished_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(b"{\"usage\":{\"ts_unix_ms\":");
    out.extend_from_slice(n.format(ts).as_bytes());
    for (key, value) in [
        (&b",\"request_id\":"[..], &*ev.request_id),
        (b",\"tenant\":", &ev.tenant),
        (b",\"key_id\":", &ev.key_id),
        (b",\"endpoint\":", ev.endpoint.as_str()),
        (b",\"model\":", &ev.model_alias),
        (b",\"upstream_model\":", &ev.upstream_model),
        (b",\"backend\":", &ev.backend),
    ] {
        out.extend_from_slice(key);
        put_json_string(out, value);
    }
    for (key, value) in [
        (&b",\"prompt_tokens\":"[..], usage.prompt_tokens),
        (b",\"completion_tokens\":", usage.completion_tokens),
        (b",\"total_tokens\":", usage.total_tokens),
    ] {
        out.extend_from_slice(key);
        out.extend_from_slice(n.format(value).as_bytes());
    }
    out.extend_from_slice(b",\"usage_reported\":");
    out.extend_from_slice(json_bool(ev.usage.is_some()));
    out.extend_from_slice(b",\"status\":");
    out.extend_from_slice(n.format(ev.status).as_bytes());
    out.extend_from_slice(b",\"latency_ms\":");
    out.extend_from_slice(n.format(ev.latency.as_millis() as u64).as_bytes());
    out.extend_from_slice(b",\"streamed\":");
    out.extend_from_slice(json_bool(ev.streamed));
    out.extend_from_slice(b",\"outcome\":");
    put_json_string(out, ev.outcome.as_str());
    if let Some(f) = &ev.fallback {
        out.extend_from_slice(b",\"fallback\":");
        put_json_string(out, f);
    }
    out.extend_from_slice(b",\"streamed_chunks\":");
    out.extend_from_slice(n.format(ev.streamed_chunks).as_bytes());
    out.extend_from_slice(b",\"cache\":");
    put_json_string(out, ev.cache.as_str());
    if let CacheUse::Hit {
        similarity, saved, ..
    } = ev.cache
    {
        out.extend_from_slice(b",\"cache_similarity\":");
        // serde_json's own float format (null for NaN and infinities).
        let _ = serde_json::to_writer(&mut *out, &similarity);
        if let Some(saved) = saved {
            out.extend_from_slice(b",\"tokens_saved\":");
            out.extend_from_slice(n.format(saved.total_tokens).as_bytes());
        }
    }
    out.extend_from_slice(b",\"kb_chunks\":");
    out.extend_from_slice(n.format(ev.kb_chunks).as_bytes());
    if !ev.rules.is_empty() {
        let names: Vec<&str> = ev.rules.iter().map(|r| r.as_ref()).collect();
        out.extend_from_slice(b",\"rules\":");
        put_json_string(out, &names.join(","));
    }
    out.extend_from_slice(b"}}\n");
}

fn json_bool(b: bool) -> &'static [u8] {
    if b { b"true" } else { b"false" }
}

#[cfg(test)]
mod usage_line_tests {
    use super::*;
    use serde::Serialize;

    #[derive(Serialize)]
    struct UsageLine<'a> {
        usage: UsageRecord<'a>,
    }

    #[derive(Serialize)]
    struct UsageRecord<'a> {
        ts_unix_ms: u128,
        request_id: &'a str,
        tenant: &'a str,
        key_id: &'a str,
        endpoint: &'static str,
        model: &'a str,
        upstream_model: &'a str,
        backend: &'a str,
        prompt_tokens: u64,
        completion_tokens: u64,
        total_tokens: u64,
        usage_reported: bool,
        status: u16,
        latency_ms: u64,
        streamed: bool,
        outcome: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        fallback: Option<&'a str>,
        streamed_chunks: u32,
        cache: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_similarity: Option<f32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tokens_saved: Option<u64>,
        kb_chunks: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        rules: Option<String>,
    }

    /// What serde_json makes of the event: the format the hand-written line must match.
    fn by_serde(ev: &UsageEvent) -> Vec<u8> {
        let ev = ev.clone();
        let usage = ev.usage.unwrap_or_default();
        let line = UsageLine {
            usage: UsageRecord {
                ts_unix_ms: ev
                    .finished_at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis()),
                request_id: &ev.request_id,
                tenant: &ev.tenant,
                key_id: &ev.key_id,
                endpoint: ev.endpoint.as_str(),
                model: &ev.model_alias,
                upstream_model: &ev.upstream_model,
                backend: &ev.backend,
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                total_tokens: usage.total_tokens,
                usage_reported: ev.usage.is_some(),
                status: ev.status,
                latency_ms: ev.latency.as_millis() as u64,
                streamed: ev.streamed,
                outcome: ev.outcome.as_str(),
                fallback: ev.fallback.as_deref(),
                streamed_chunks: ev.streamed_chunks,
                cache: ev.cache.as_str(),
                cache_similarity: match ev.cache {
                    CacheUse::Hit { similarity, .. } => Some(similarity),
                    _ => None,
                },
                tokens_saved: match ev.cache {
                    CacheUse::Hit { saved, .. } => saved.map(|u| u.total_tokens),
                    _ => None,
                },
                kb_chunks: ev.kb_chunks,
                rules: (!ev.rules.is_empty()).then(|| {
                    let names: Vec<&str> = ev.rules.iter().map(|r| r.as_ref()).collect();
                    names.join(",")
                }),
            },
        };
        let mut buf = serde_json::to_vec(&line).unwrap();
        buf.push(b'\n');
        buf
    }

    fn event() -> UsageEvent {
        UsageEvent {
            request_id: "req_0123456789abcdef".into(),
            tenant: "acme".into(),
            key_id: "acme-key".into(),
            endpoint: Endpoint::ChatCompletions,
            model_alias: "gpt-4o-mini".into(),
            upstream_model: "gpt-4o-mini-2024-07-18".into(),
            backend: "openai".into(),
            usage: Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 34,
                total_tokens: 46,
                ..Usage::default()
            }),
            status: 200,
            latency: Duration::from_micros(12_345),
            streamed: true,
            outcome: Outcome::Completed,
            finished_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_300_000_123),
            fallback: None,
            streamed_chunks: 7,
            cache: CacheUse::Off,
            kb_chunks: 0,
            rules: Vec::new(),
            pricing: None,
        }
    }

    #[test]
    fn the_usage_line_is_what_serde_would_write() {
        let mut cases = vec![event()];
        let mut e = event();
        e.usage = None;
        e.streamed = false;
        e.outcome = Outcome::ClientAborted;
        e.status = 499;
        e.fallback = Some("timeout,breaker_open".into());
        e.rules = vec!["pii/email".into(), "caps/\"quoted\"".into()];
        e.kb_chunks = 3;
        cases.push(e);
        // Every control character, quotes, backslashes, DEL and non-ASCII in every string.
        let nasty: String = (0u8..0x20)
            .map(char::from)
            .chain("\"\\/\u{7f}é€😀 end".chars())
            .collect();
        let mut e = event();
        e.request_id = nasty.as_str().into();
        e.tenant = nasty.as_str().into();
        e.key_id = nasty.as_str().into();
        e.model_alias = nasty.as_str().into();
        e.upstream_model = nasty.as_str().into();
        e.backend = nasty.as_str().into();
        e.rules = vec![nasty.as_str().into()];
        e.fallback = Some(nasty.as_str().into());
        cases.push(e);
        for (similarity, saved) in [
            (1.0, None),
            (0.912_345_7, Some(Usage::default())),
            (
                f32::NAN,
                Some(Usage {
                    prompt_tokens: 1,
                    completion_tokens: 2,
                    total_tokens: 3,
                    ..Usage::default()
                }),
            ),
        ] {
            let mut e = event();
            e.cache = CacheUse::Hit {
                exact: false,
                similarity,
                saved,
            };
            cases.push(e);
        }
        let mut e = event();
        e.cache = CacheUse::Miss;
        e.usage = Some(Usage {
            prompt_tokens: u64::MAX,
            completion_tokens: 0,
            total_tokens: u64::MAX,
            ..Usage::default()
        });
        cases.push(e);
        for ev in &cases {
            let mut ours = Vec::new();
            usage_line(&mut ours, ev);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                String::from_utf8(by_serde(ev)).unwrap()
            );
        }
    }
}
