//! The OpenAI-protocol echo server used by the tests, as a program: the demo's upstream when no
//! real model is configured. `cargo run --example echo_upstream -- 127.0.0.1:8081`

#[path = "../tests/support/upstream.rs"]
mod upstream;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".to_string());
    let up = upstream::Upstream::start_on(&addr, None).await;
    println!("echo upstream listening on {}", up.base_url());
    // Keep memory flat in long runs: the request log is for tests.
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        up.state.received.lock().unwrap().clear();
    }
}
