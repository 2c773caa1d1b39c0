//! SSE relay hot path: the scanner against a typical chat stream, one event per frame (how
//! OpenAI-compatible servers flush) and 16 KiB frames; beside it, the naive alternative that
//! parses every event as JSON, for the ratio.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fuke::sse::SseScanner;
use std::hint::black_box;

fn stream_events() -> Vec<String> {
    let mut events: Vec<String> = (0..400)
        .map(|i| format!("data: {{\"id\":\"chatcmpl-AbCdEf0123456789\",\"object\":\"chat.completion.chunk\",\"created\":1732600000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"))
        .collect();
    events.push("data: {\"id\":\"chatcmpl-AbCdEf0123456789\",\"object\":\"chat.completion.chunk\",\"created\":1732600000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":812,\"completion_tokens\":400,\"total_tokens\":1212}}\n\n".into());
    events.push("data: [DONE]\n\n".into());
    events
}

fn bench(c: &mut Criterion) {
    let events = stream_events();
    let total: usize = events.iter().map(String::len).sum();
    let per_event: Vec<Bytes> = events.iter().map(|e| Bytes::from(e.clone())).collect();
    let joined = events.concat();
    let big: Vec<Bytes> = joined
        .as_bytes()
        .chunks(16 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();

    let mut g = c.benchmark_group("sse");
    g.throughput(Throughput::Bytes(total as u64));
    for (name, frames) in [
        ("scanner/event_frames", &per_event),
        ("scanner/16k_frames", &big),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut sc = SseScanner::new(true);
                let mut out = Vec::with_capacity(4);
                for f in frames.iter() {
                    sc.feed(f.clone(), &mut out).unwrap();
                    out.clear();
                }
                black_box(sc.usage())
            })
        });
    }
    g.bench_function("naive/parse_every_event", |b| {
        b.iter(|| {
            let mut usage = None;
            for f in &per_event {
                let payload = &f[6..f.len() - 2];
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload)
                    && !v["usage"].is_null()
                {
                    usage = Some(v["usage"].clone());
                }
            }
            black_box(usage)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
