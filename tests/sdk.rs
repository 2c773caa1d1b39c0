//! The official OpenAI Python SDK against the gateway (only base_url and api_key changed).
//! `scripts/test.sh` installs the pinned SDK; without it this test fails and says so.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_works_unchanged() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&policy_yaml(&up.base_url())).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(gw.url("/v1"))
        .arg(KEY_ACME)
        .output()
        .await
        .expect("python3 is needed (scripts/test.sh installs the test prerequisites)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK script failed (is the `openai` package installed? scripts/test.sh does it):\n{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["chat"], "echo: hello sdk");
    assert_eq!(v["chat_usage"], 2 + 3);
    assert_eq!(v["stream_text"], "echo: hello sdk");
    assert_eq!(
        v["stream_usage_chunks"], 0,
        "usage chunk leaked to a client that did not ask"
    );
    assert_eq!(v["stream_usage"], serde_json::json!([5]));
    assert_eq!(v["model"], "gpt-test");
    assert!(
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "gpt-test")
    );
    assert!(
        !v["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "secret-model")
    );
    assert_eq!(v["embeddings"], 2);
    assert_eq!(v["completion"], "echo: complete me");
    let e = &v["errors"];
    assert_eq!(e["auth"], 401, "{e}");
    assert_eq!(e["not_found"], 404, "{e}");
    assert_eq!(e["forbidden"], 403, "{e}");
    assert_eq!(e["bad_request"], 400, "{e}");
    assert_eq!(e["rate_limited"], 429, "{e}");
    assert_eq!(e["server_error"], 500, "{e}");
}
