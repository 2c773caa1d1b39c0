//! Property tests (proptest) for the two parsers that see hostile bytes: the request parser and
//! the SSE scanner. They must never panic, and must be exact on valid input.

use bytes::Bytes;
use fuke::openai::{Endpoint, JsonRequest};
use fuke::sse::SseScanner;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn request_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        for ep in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
            let _ = JsonRequest::parse(ep, &body);
        }
    }

    #[test]
    fn request_parser_never_panics_on_near_json(s in r#"\{("(model|messages|stream|stream_options|role|content|x)"\s*:\s*(\[|\{|"[a-z]*"|true|null|-?[0-9]{1,3}|\]|\}|,)\s*,?){0,12}\}?"#) {
        let _ = JsonRequest::parse(Endpoint::ChatCompletions, s.as_bytes());
    }

    /// Unknown fields come out byte-for-byte, whatever their JSON; the output is valid JSON.
    #[test]
    fn unknown_fields_survive_exactly(
        extra in proptest::collection::vec(("[a-z_]{1,10}", r#"(-?[1-9][0-9]{0,4}(\.[0-9]{1,3})?|0|"[a-z \u4e00-\u4e09]{0,12}"|\[ ?1 , 2 \]|\{"k" : null\}|true)"#), 0..6),
        stream in any::<bool>(),
    ) {
        let mut body = String::from(r#"{"model":"alias","messages":[{"role":"user","content":"hi"}]"#);
        let mut seen = std::collections::HashSet::new();
        let mut kept = Vec::new();
        for (k, v) in &extra {
            if ["model", "messages", "stream", "stream_options"].contains(&k.as_str()) || !seen.insert(k.clone()) {
                continue;
            }
            body.push_str(&format!(",\"{k}\":{v}"));
            kept.push(format!("\"{k}\":{v}"));
        }
        body.push_str(&format!(",\"stream\":{stream}}}"));
        let req = JsonRequest::parse(Endpoint::ChatCompletions, body.as_bytes()).unwrap();
        let out = req.upstream_body("upstream-model");
        let text = std::str::from_utf8(&out).unwrap();
        for field in kept {
            prop_assert!(text.contains(&field), "{field} not in {text}");
        }
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(&v["model"], "upstream-model");
        prop_assert_eq!(v["stream_options"]["include_usage"] == true, stream);
    }

    #[test]
    fn sse_scanner_never_panics(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16), strip in any::<bool>()) {
        let mut sc = SseScanner::new(strip).with_max_event(256);
        let mut out = Vec::new();
        for f in frames {
            if sc.feed(Bytes::from(f), &mut out).is_err() {
                break;
            }
        }
    }

    /// However the stream is cut into frames, the client receives the same bytes: every event
    /// but the usage chunk (when stripped), then [DONE].
    #[test]
    fn sse_output_is_independent_of_framing(
        contents in proptest::collection::vec("[a-zA-Z0-9 ]{0,20}", 1..12),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        crlf in any::<bool>(),
        strip in any::<bool>(),
    ) {
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut expected = String::new();
        let mut all = String::new();
        for c in &contents {
            let ev = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{c}\"}}}}],\"usage\":null}}{nl}{nl}");
            expected.push_str(&ev);
            all.push_str(&ev);
        }
        let usage = format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":{},\"total_tokens\":9}}}}{nl}{nl}", contents.len());
        all.push_str(&usage);
        if !strip {
            expected.push_str(&usage);
        }
        let done = format!("data: [DONE]{nl}{nl}");
        all.push_str(&done);
        expected.push_str(&done);

        let bytes = all.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len())).collect();
        points.sort_unstable();
        points.dedup();
        let mut sc = SseScanner::new(strip);
        let mut out = Vec::new();
        let mut start = 0;
        for p in points.into_iter().chain([bytes.len()]) {
            sc.feed(Bytes::copy_from_slice(&bytes[start..p]), &mut out).unwrap();
            start = p;
        }
        let mut got: Vec<u8> = out.concat();
        got.extend_from_slice(&sc.take_held().expect("[DONE] held"));
        prop_assert_eq!(String::from_utf8(got).unwrap(), expected);
        prop_assert_eq!(sc.usage().unwrap().completion_tokens, contents.len() as u64);
    }
}
