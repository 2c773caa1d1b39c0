//! Rule application: requests rewritten by the rules still parse; redaction is idempotent (what
//! it leaves, it would leave again); and a streamed answer, cut into arbitrary chunks, never lets
//! out text the rules would redact (unless one match is longer than the hold-back window, the
//! documented limit).
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use fuke::openai::{Endpoint, JsonRequest};
use fuke::policy::raw::RawRuleSet;
use fuke::rules::stream::{HOLDBACK_CHARS, StreamRedactor};
use fuke::rules::{self, Hits, RuleSet};
use libfuzzer_sys::fuzz_target;

fn sets() -> &'static Arc<[Arc<RuleSet>]> {
    static SETS: OnceLock<Arc<[Arc<RuleSet>]>> = OnceLock::new();
    SETS.get_or_init(|| {
        let raw: RawRuleSet = serde_yaml::from_str(
            "redact:
  - builtin: email
  - builtin: cn_mobile
  - builtin: phone
  - builtin: card
  - builtin: cn_id
  - builtin: iban
  - { pattern: 'ACME-[0-9]{6}', name: ticket }
block:
  - { name: words, keywords: [bomb, 炸弹] }
  - { name: re, pattern: 'ignore (all )?previous instructions' }
caps: { max_tokens: 64 }
responses: true
",
        )
        .expect("rule set parses");
        vec![Arc::new(
            RuleSet::compile("fuzz", &raw).expect("rule set compiles"),
        )]
        .into()
    })
}

fn chunk(text: &str) -> Bytes {
    let json = serde_json::to_string(text).expect("a string serializes");
    Bytes::from(format!(
        "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{json}}},\"finish_reason\":null}}]}}\n\n"
    ))
}

/// The text the client would see in a stream of `events`.
fn streamed_text(events: &[Bytes]) -> String {
    let mut text = String::new();
    for e in events {
        let data = fuke::sse::event_data(e);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data)
            && let Some(s) = v["choices"][0]["delta"]["content"].as_str()
        {
            text.push_str(s);
        }
    }
    text
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let sets = sets();
    match mode % 3 {
        0 => {
            if let Ok(req) = JsonRequest::parse(Endpoint::ChatCompletions, rest)
                && let Ok(applied) = rules::apply(sets, &req)
                && let Some(body) = applied.body
            {
                JsonRequest::parse(Endpoint::ChatCompletions, &body)
                    .expect("a rewritten request parses");
            }
        }
        1 => {
            let text = String::from_utf8_lossy(rest);
            let mut hits = Hits::default();
            if let Some(once) = rules::redact_all(sets, &text, &mut hits) {
                assert!(
                    rules::redact_all(sets, &once, &mut hits).is_none(),
                    "redaction is not idempotent: {once:?}"
                );
            }
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let pieces: Vec<&str> = text.split('\u{FFFD}').collect();
            let mut r = StreamRedactor::new(sets.clone(), true);
            let mut out: Vec<Bytes> = Vec::new();
            for p in &pieces {
                r.feed(chunk(p), &mut out);
            }
            r.finish(&mut out);
            let seen = streamed_text(&out);
            let whole: String = pieces.concat();
            let longest = sets
                .iter()
                .flat_map(|s| s.matches(&whole))
                .map(|(s, e)| whole[s..e].chars().count())
                .max()
                .unwrap_or(0);
            if longest < HOLDBACK_CHARS {
                let mut hits = Hits::default();
                assert!(
                    rules::redact_all(sets, &seen, &mut hits).is_none(),
                    "the stream let out {seen:?}"
                );
            }
        }
    }
});
