//! The request parser: any bytes are accepted or refused with an error, never a panic, and an
//! accepted request re-emitted for an upstream parses again with the same model and flags.
#![no_main]

use fuke::openai::{Endpoint, JsonRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for endpoint in [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ] {
        let Ok(req) = JsonRequest::parse(endpoint, data) else {
            continue;
        };
        let body = req.upstream_body_as("upstream-model", req.stream);
        let again = JsonRequest::parse(endpoint, &body).expect("a re-emitted request parses");
        assert_eq!(again.model, "upstream-model");
        assert_eq!(again.stream, req.stream);
    }
});
