//! The SSE scanner: arbitrary upstream bytes, cut into frames at arbitrary points, never panic,
//! and the client receives the same bytes however the stream was framed.
#![no_main]

use bytes::Bytes;
use fuke::sse::SseScanner;
use libfuzzer_sys::fuzz_target;

fn run(frames: &[&[u8]], strip: bool) -> (Vec<u8>, bool) {
    let mut sc = SseScanner::new(strip).with_max_event(4096);
    let mut out: Vec<Bytes> = Vec::new();
    let mut failed = false;
    for f in frames {
        if sc.feed(Bytes::copy_from_slice(f), &mut out).is_err() {
            failed = true;
            break;
        }
    }
    let mut got = out.concat();
    if let Some(done) = sc.take_held() {
        got.extend_from_slice(&done);
    }
    (got, failed)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let strip = flags & 1 == 1;
    // 0xFF never occurs in UTF-8 text: use it to cut frames.
    let frames: Vec<&[u8]> = rest.split(|&b| b == 0xFF).collect();
    let whole: Vec<u8> = frames.concat();
    let (framed, framed_failed) = run(&frames, strip);
    let (single, single_failed) = run(&[&whole], strip);
    if !framed_failed && !single_failed {
        assert_eq!(framed, single, "output depends on framing");
    }
    assert!(framed.len() <= whole.len());
});
