//! The cost of content rules per request: a typical chat request (system prompt, history,
//! question; about 1 KB of text) under one set like the demo's `pii` + `safety` (plus a keyword block rule), without personal data
//! (scan only, the body is sent as it came) and with it (scan and rewrite); and streamed answer
//! redaction against the plain scanner on the same 400-chunk stream.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fuke::openai::{Endpoint, JsonRequest};
use fuke::policy::raw::RawRuleSet;
use fuke::rules::stream::StreamRedactor;
use fuke::rules::{self, RuleSet};
use fuke::sse::SseScanner;
use serde_json::json;
use std::hint::black_box;

const SETS: &str = "redact:
  - builtin: email
  - builtin: cn_mobile
  - builtin: phone
  - builtin: card
  - builtin: cn_id
  - builtin: iban
block:
  - name: jailbreak
    pattern: 'ignore (all )?(previous|prior) instructions'
  - name: weapons
    keywords: [bomb, 炸弹, explosive]
caps: { max_tokens: 2048, max_messages: 200, max_prompt_chars: 200000 }
responses: true
";

fn request(question: &str) -> Vec<u8> {
    json!({
        "model": "support-bot",
        "temperature": 0.2,
        "messages": [
            {"role": "system", "content": "You are the support assistant of an online shop. Answer briefly and politely, in the customer's language. Never promise refunds that the policy does not allow; explain the return window of 30 days and the conditions for damaged goods."},
            {"role": "user", "content": "Hello, I ordered a pair of running shoes last week and they arrived in the wrong size."},
            {"role": "assistant", "content": "I'm sorry to hear that! You can exchange them within 30 days. Would you like me to start an exchange for a different size?"},
            {"role": "user", "content": question},
        ],
    })
    .to_string()
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let raw: RawRuleSet = serde_yaml::from_str(SETS).unwrap();
    let sets: Arc<[Arc<RuleSet>]> = vec![Arc::new(RuleSet::compile("demo", &raw).unwrap())].into();
    let clean = request(
        "Yes please, size 43 instead of 42. Can you also tell me when the new one will arrive?",
    );
    let personal = request(
        "Yes please, size 43. Mail me at jane.doe@example.com or call +44 20 7946 0958; the card was 4111 1111 1111 1111.",
    );

    let mut g = c.benchmark_group("rules/request");
    g.bench_function("clean_1kb_chat (scan, no rewrite)", |b| {
        b.iter(|| {
            let req = JsonRequest::parse(Endpoint::ChatCompletions, black_box(&clean)).unwrap();
            let applied = rules::apply(&sets, &req).unwrap();
            black_box(applied.body.is_some())
        })
    });
    g.bench_function("personal_data_1kb_chat (scan + rewrite)", |b| {
        b.iter(|| {
            let req = JsonRequest::parse(Endpoint::ChatCompletions, black_box(&personal)).unwrap();
            let applied = rules::apply(&sets, &req).unwrap();
            black_box(applied.body.is_some())
        })
    });
    g.bench_function("parse_only (no rules, for reference)", |b| {
        b.iter(|| {
            let req = JsonRequest::parse(Endpoint::ChatCompletions, black_box(&clean)).unwrap();
            black_box(req.stream)
        })
    });
    g.finish();

    // A 400-chunk answer, one word per event, as the upstreams send it.
    let mut events: Vec<Bytes> = Vec::new();
    for i in 0..400 {
        let word = if i % 50 == 7 {
            "help@example.com "
        } else {
            "word "
        };
        events.push(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\"finish_reason\":null}}]}}\n\n"
        )));
    }
    events.push(Bytes::from_static(
        b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    ));
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let bytes: u64 = events.iter().map(|e| e.len() as u64).sum();
    let mut g = c.benchmark_group("rules/stream");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("scanner_only", |b| {
        b.iter(|| {
            let mut sc = SseScanner::new(true);
            let mut out: Vec<Bytes> = Vec::with_capacity(events.len());
            for e in &events {
                sc.feed(e.clone(), &mut out).unwrap();
            }
            black_box(out.len())
        })
    });
    g.bench_function("scanner_and_redactor", |b| {
        b.iter(|| {
            let mut sc = SseScanner::new(true);
            let mut r = StreamRedactor::new(sets.clone(), true);
            let mut scanned: Vec<Bytes> = Vec::new();
            let mut out: Vec<Bytes> = Vec::with_capacity(events.len());
            for e in &events {
                scanned.clear();
                sc.feed(e.clone(), &mut scanned).unwrap();
                for s in scanned.drain(..) {
                    r.feed(s, &mut out);
                }
            }
            r.finish(&mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
