//! The `fuke` binary end to end: `fuke serve` from a config file serves traffic, and SIGTERM
//! drains an open stream before the process exits cleanly.

mod support;

use std::process::Command;

use http::StatusCode;
use http_body_util::BodyExt;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_then_sigterm_drains_the_open_stream() {
    let up = Upstream::start().await;
    let dir = binary_dir(&policy_yaml(&up.base_url()), "");
    let (mut child, addr, rx) = spawn_fuke(dir.path());

    let c = client();
    let req = slow_stream_request(&format!("http://{addr}"));
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    drain_to_done(body).await;

    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "fuke exited with {exit}");
    // The usage line of the drained request was written before exit, and no key leaked.
    let logs: Vec<String> = rx.try_iter().collect();
    let usage: Vec<serde_json::Value> = logs
        .iter()
        .filter(|l| l.starts_with(r#"{"usage":"#))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        usage.iter().any(|u| u["usage"]["model"] == "slow"
            && u["usage"]["outcome"] == "completed"
            && u["usage"]["completion_tokens"] == 150),
        "{logs:?}"
    );
    assert!(logs.iter().all(|l| !l.contains(KEY_ACME)));
}
