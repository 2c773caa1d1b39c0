//! Policy hot reload (all-or-nothing, traffic keeps flowing), `fuke check` diagnostics and
//! `fuke keygen`.

mod support;

use std::process::Command;

use http::StatusCode;
use support::*;

const CHAT: &str = "/v1/chat/completions";

async fn model_ids(c: &TestClient, gw: &Gateway, key: &str) -> Vec<String> {
    let r = get(c, &gw.url("/v1/models"), Some(key)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn valid_change_applies_and_broken_file_is_rejected_while_serving() {
    let up = Upstream::start().await;
    let policy = policy_yaml(&up.base_url());
    let gw = Gateway::start(&policy).await;
    let app = gw.app.clone();
    let _watch = fuke::reload::watch_dirs("policies", vec![gw.policy_dir.clone()], move || {
        app.reload_policy()
    })
    .unwrap();
    let c = client();
    assert_eq!(model_ids(&c, &gw, KEY_GLOBEX).await, vec!["secret-model"]);

    // A valid edit: globex gains gpt-test, and a new key appears.
    let new_key = "fk-test-new-key-0009";
    let edited = policy
        .replace("models: [secret-model]", "models: [secret-model, gpt-test]")
        .replace(
            "      - { id: globex-key,",
            &format!(
                "      - {{ id: globex-2, sha256: {} }}\n      - {{ id: globex-key,",
                hash(new_key)
            ),
        );
    std::fs::write(gw.policy_dir.join("main.yaml"), &edited).unwrap();
    eventually("the edit to apply", || async {
        model_ids(&c, &gw, KEY_GLOBEX).await.len() == 2
    })
    .await;
    let r = post(
        &c,
        &gw.url(CHAT),
        new_key,
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let version = gw.app.policy.current().version;

    // A broken edit in a second file: unknown field, bad hash, unknown alias. Nothing of it
    // applies, not even the valid parts; the previous version keeps serving.
    std::fs::write(
        gw.policy_dir.join("extra.yaml"),
        "tenants:\n  initech:\n    models: [gpt-test, nope]\n    keys:\n      - { id: i1, sha256: zz }\n    colour: blue\n",
    )
    .unwrap();
    eventually("the broken edit to be rejected", || async {
        let m = get(&c, &gw.url("/metrics"), None).await.text();
        m.contains(r#"fuke_policy_reloads_total{result="rejected"}"#)
    })
    .await;
    assert_eq!(gw.app.policy.current().version, version);
    assert!(gw.app.policy.current().tenant("initech").is_none());
    let r = post(
        &c,
        &gw.url(CHAT),
        new_key,
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);

    // Fixing the file applies it.
    let good = format!(
        "tenants:\n  initech:\n    models: [gpt-test]\n    keys:\n      - {{ id: i1, sha256: {} }}\n",
        hash("fk-initech")
    );
    std::fs::write(gw.policy_dir.join("extra.yaml"), good).unwrap();
    eventually("the fixed file to apply", || async {
        gw.app.policy.current().tenant("initech").is_some()
    })
    .await;
    let r = post(
        &c,
        &gw.url(CHAT),
        "fk-initech",
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"x"}]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn kubernetes_style_symlink_swap_is_seen() {
    // ConfigMap volumes: policies/main.yaml -> ..data/main.yaml, ..data -> ..<timestamp>/
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("policies");
    std::fs::create_dir_all(mount.join("..v1")).unwrap();
    std::fs::write(mount.join("..v1/main.yaml"), policy_yaml(&up.base_url())).unwrap();
    std::os::unix::fs::symlink("..v1", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/main.yaml", mount.join("main.yaml")).unwrap();

    let store = fuke::policy::PolicyStore::open(&mount, Default::default()).unwrap();
    let app = fuke::app::App::new(
        std::sync::Arc::new(store),
        std::sync::Arc::new(fuke::metering::LogSink::new(std::io::sink())),
        Default::default(),
        Default::default(),
        None,
    );
    let a = app.clone();
    let _watch =
        fuke::reload::watch_dirs("policies", vec![mount.clone()], move || a.reload_policy())
            .unwrap();
    assert!(app.policy.current().tenant("newco").is_none());

    std::fs::create_dir_all(mount.join("..v2")).unwrap();
    let v2 = policy_yaml(&up.base_url()) + "  newco:\n    models: [gpt-test]\n";
    std::fs::write(mount.join("..v2/main.yaml"), v2).unwrap();
    std::os::unix::fs::symlink("..v2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    eventually("the swapped ConfigMap to apply", || async {
        app.policy.current().tenant("newco").is_some()
    })
    .await;
}

fn fuke() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fuke"))
}

/// The binary defines `malloc` and its kin itself: mimalloc's `override` feature. Rust allocates
/// through `System` (plain `malloc`), so without the override every allocation of the gateway
/// would silently go to glibc's allocator instead (BENCHMARKS.md, run 9).
#[test]
fn the_binary_brings_its_own_malloc() {
    let out = Command::new("nm")
        .args(["-D", "--defined-only", env!("CARGO_BIN_EXE_fuke")])
        .output()
        .expect("nm (binutils, installed with gcc) runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let symbols = String::from_utf8_lossy(&out.stdout);
    for name in ["malloc", "free", "realloc", "calloc", "posix_memalign"] {
        assert!(
            symbols
                .lines()
                .any(|l| l.split_whitespace().last() == Some(name)),
            "the fuke binary does not define {name}"
        );
    }
}

/// `fuke check -c DIR/fuke.yaml`.
fn check(dir: &std::path::Path) -> std::process::Output {
    fuke()
        .arg("check")
        .arg("-c")
        .arg(dir.join("fuke.yaml"))
        .output()
        .unwrap()
}

#[test]
fn check_lists_every_problem_with_file_line_and_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).unwrap();
    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\npolicies: policies\n",
    )
    .unwrap();
    std::fs::write(
        p.join("policies/a.yaml"),
        "upstreams:\n  up:\n    base_url: ftp://x\nmodels:\n  m1: { upstream: nowhere }\ntenants:\n  t:\n    models: [m1, ghost]\n    keys:\n      - { id: k, sha256: abc }\n",
    )
    .unwrap();
    std::fs::write(
        p.join("policies/b.yaml"),
        "tenants:\n  u:\n    modles: [m1]\n",
    )
    .unwrap();

    let out = check(p);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let a = p.join("policies/a.yaml").display().to_string();
    let b = p.join("policies/b.yaml").display().to_string();
    for expected in [
        format!("{a}:3: upstreams.up.base_url: must be an http:// or https:// URL with a host"),
        format!("{a}:5: models.m1.upstream: unknown upstream `nowhere`"),
        format!("{a}:8: tenants.t.models[1]: unknown model alias `ghost`"),
        format!("{a}:10: tenants.t.keys[0].sha256: must be 64 hex digits"),
        format!("{b}:3: tenants.u.modles: unknown field `modles`"),
    ] {
        assert!(err.contains(&expected), "missing `{expected}` in:\n{err}");
    }

    // And a good setup passes.
    std::fs::write(
        p.join("policies/a.yaml"),
        "upstreams:\n  up:\n    base_url: http://127.0.0.1:9/v1\nmodels:\n  m1: { upstream: up }\n",
    )
    .unwrap();
    std::fs::remove_file(p.join("policies/b.yaml")).unwrap();
    let out = check(p);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_reports_config_problems_and_missing_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: nowhere\n  - addr: 0.0.0.0:8443\n    tls: { cert: certs/none.pem, key: certs/none.key }\n  - addr: 127.0.0.1:8080\n",
    )
    .unwrap();
    let out = check(p);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(":2: listeners[0].addr: `nowhere` is not an IP:port address"),
        "{err}"
    );
    assert!(err.contains(":4: listeners[1].tls.cert:"), "{err}");
    assert!(err.contains(":5: listeners[2]: needs `tls`"), "{err}");
}

#[test]
fn keygen_prints_a_key_whose_hash_is_the_policy_line() {
    let out = fuke()
        .args(["keygen", "--tenant", "acme", "--id", "acme-ci"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .split_whitespace()
        .find(|w| w.starts_with("fk-"))
        .expect("a key");
    assert_eq!(key.len(), 3 + 64);
    let line = text.lines().find(|l| l.contains("sha256:")).unwrap();
    assert!(line.contains("id: acme-ci"));
    assert!(line.contains(&format!("sha256: {}", hash(key))), "{line}");
    assert!(
        !line.contains(key),
        "the key itself must not be in the policy line"
    );
}

#[test]
fn certs_dev_writes_a_usable_set_and_check_accepts_a_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let out = fuke()
        .args(["certs", "dev", "--dir"])
        .arg(p.join("certs"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ] {
        let text = std::fs::read_to_string(p.join("certs").join(f)).unwrap();
        assert!(text.starts_with("-----BEGIN "), "{f}");
    }
    std::fs::create_dir_all(p.join("policies")).unwrap();
    std::fs::write(
        p.join("policies/a.yaml"),
        "upstreams:\n  up:\n    base_url: http://127.0.0.1:9/v1\n",
    )
    .unwrap();
    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: 127.0.0.1:0\n    tls: { cert: certs/server.pem, key: certs/server.key, client_ca: certs/ca.pem }\n",
    )
    .unwrap();
    let out = check(p);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A key that does not belong to the certificate is caught by `fuke check`.
    std::fs::copy(p.join("certs/client.key"), p.join("certs/server.key")).unwrap();
    let out = check(p);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("do not match"));
}

#[test]
fn check_reports_bad_tracing_settings() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).unwrap();
    std::fs::write(p.join("policies/a.yaml"), "").unwrap();
    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\ntracing:\n  endpoint: http://127.0.0.1:4317\n  sample_ratio: 2\n",
    )
    .unwrap();
    let out = check(p);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let y = p.join("fuke.yaml").display().to_string();
    assert!(
        err.contains(&format!(
            "{y}:4: tracing: tracing.sample_ratio: 2 is not within 0..=1"
        )),
        "{err}"
    );

    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\ntracing:\n  protocol: http/json\n",
    )
    .unwrap();
    let err = String::from_utf8(check(p).stderr).unwrap();
    assert!(
        err.contains("tracing.protocol: unknown variant `http/json`"),
        "{err}"
    );
}

#[test]
fn check_reports_a_bad_cache_redis_url_and_cache_settings() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).unwrap();
    std::fs::write(
        p.join("policies/a.yaml"),
        "tenants:\n  t:\n    cache: { ttl_secs: 0, capacity_bytes: 10, colour: red }\n",
    )
    .unwrap();
    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\ncache:\n  redis_url: http://127.0.0.1:6379\n",
    )
    .unwrap();
    let out = check(p);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let y = p.join("fuke.yaml").display().to_string();
    assert!(
        err.contains(&format!(
            "{y}:5: cache.redis_url: must be a redis:// (or unix://) URL"
        )),
        "{err}"
    );
    // The policy is reported too once the config is valid.
    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\ncache:\n  redis_url: redis://127.0.0.1:6379\n",
    )
    .unwrap();
    let err = String::from_utf8(check(p).stderr).unwrap();
    assert!(
        err.contains("tenants.t.cache.colour: unknown field `colour`"),
        "{err}"
    );
    std::fs::write(
        p.join("policies/a.yaml"),
        "tenants:\n  t:\n    cache: { ttl_secs: 0, capacity_bytes: 10 }\n",
    )
    .unwrap();
    let err = String::from_utf8(check(p).stderr).unwrap();
    assert!(
        err.contains("a.yaml:3: tenants.t.cache.ttl_secs: must be at least 1"),
        "{err}"
    );
    assert!(
        err.contains("a.yaml:3: tenants.t.cache.capacity_bytes: must be at least 4096"),
        "{err}"
    );
}

#[test]
fn check_reports_local_model_files_and_references() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).unwrap();
    std::fs::write(p.join("notes.txt"), "not a model").unwrap();
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    std::fs::write(
        p.join("fuke.yaml"),
        format!(
            "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\nlocal_models:\n  text:\n    path: notes.txt\n    kind: chat\n  gone:\n    path: nowhere.gguf\n    kind: chat\n  bert-as-chat:\n    path: {}\n    kind: chat\n  ok:\n    path: {}\n    kind: chat\n",
            models.join("all-MiniLM-L6-v2.gguf").display(),
            models.join("SmolLM2-135M-Instruct.Q4_1.gguf").display(),
        ),
    )
    .unwrap();
    std::fs::write(
        p.join("policies/a.yaml"),
        "models:\n  m1: { local: ghost }\n  m2: { local: ok, upstream: up }\n  m3: { local: ok }\n",
    )
    .unwrap();
    let out = check(p);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let y = p.join("fuke.yaml").display().to_string();
    let a = p.join("policies/a.yaml").display().to_string();
    for expected in [
        format!("{y}:6: local_models.text.path: "),
        "notes.txt is not a GGUF file".to_string(),
        format!("{y}:9: local_models.gone.path: cannot open"),
        format!("{y}:12: local_models.bert-as-chat.path: "),
        "has architecture `bert`, an embedding model; set `kind: embedding`".to_string(),
        format!("{a}:2: models.m1.local: unknown local model `ghost`"),
        format!("{a}:3: models.m2: set either `upstream` or `local`, not both"),
    ] {
        assert!(err.contains(&expected), "missing `{expected}` in:\n{err}");
    }
    assert!(!err.contains("local_models.ok"), "{err}");
    assert!(!err.contains("models.m3"), "{err}");

    // The embedder must name an embedding model.
    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\nlocal_models:\n  c: { path: x.gguf, kind: chat }\nembedder: c\n",
    )
    .unwrap();
    let err = String::from_utf8(check(p).stderr).unwrap();
    assert!(
        err.contains("embedder: local model `c` is not of kind `embedding`"),
        "{err}"
    );
}

#[test]
fn check_reports_bad_content_rules_with_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).unwrap();
    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\n",
    )
    .unwrap();
    std::fs::write(
        p.join("policies/a.yaml"),
        "rules:
  pii:
    redact:
      - builtin: ssn
      - pattern: '(a)\\1'
        name: backref
      - pattern: 'x*'
        name: empty
      - pattern: '(?:[a-z]{1000}){1000}'
        name: huge
    block:
      - name: nothing
    caps:
      max_tokens: 0
    residency: abroad
tenants:
  t:
    rules: [pii, nope]
",
    )
    .unwrap();
    let out = check(p);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    // serde stops at the first type error (`residency`), so fix it and look at the rest.
    assert!(
        err.contains("a.yaml:15: rules.pii.residency: unknown variant `abroad`"),
        "{err}"
    );
    let text = std::fs::read_to_string(p.join("policies/a.yaml"))
        .unwrap()
        .replace("    residency: abroad\n", "");
    std::fs::write(p.join("policies/a.yaml"), text).unwrap();
    let err = String::from_utf8(check(p).stderr).unwrap();
    for want in [
        "a.yaml:4: rules.pii.redact[0].builtin: unknown detector `ssn`",
        "a.yaml:5: rules.pii.redact[1].pattern: not a valid regex",
        "a.yaml:7: rules.pii.redact[2].pattern: the pattern matches the empty string",
        "a.yaml:9: rules.pii.redact[3].pattern: the pattern compiles to more than",
        "a.yaml:12: rules.pii.block[0]: needs `keywords`",
        "a.yaml:14: rules.pii.caps.max_tokens: must be at least 1",
        "a.yaml:17: tenants.t.rules[1]: unknown rule set `nope`",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn check_reports_bad_prices_and_ledger_urls_with_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("policies")).unwrap();
    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\nledger:\n  url: mysql://db/fuke\n",
    )
    .unwrap();
    std::fs::write(
        p.join("policies/a.yaml"),
        "pricing:
  version: ''
  models:
    gpt-4o-mini: { input: \"0.15\", output: \"0.6\" }
    odd: { input: \"0.0375\", output: -1 }
    words: { input: cheap, output: \"1\", cached_input: \"1.5.0\" }
tenants:
  t:
    limits: { tokens_per_minute: 0, budget: { daily_usd: \"1.2345678901\" } }
    keys:
      - { id: k, sha256: 0000000000000000000000000000000000000000000000000000000000000000, limits: { budget: { monthly_usd: \"0\" } } }
",
    )
    .unwrap();
    std::fs::write(p.join("policies/b.yaml"), "pricing:\n  models: {}\n").unwrap();
    let err = String::from_utf8(check(p).stderr).unwrap();
    assert!(
        err.contains("fuke.yaml:5: ledger.url: must be sqlite://PATH, postgres://… or off"),
        "{err}"
    );
    std::fs::write(
        p.join("fuke.yaml"),
        "listeners:\n  - addr: 127.0.0.1:0\n    plaintext: true\nledger:\n  url: sqlite://ledger.db\n",
    )
    .unwrap();
    let err = String::from_utf8(check(p).stderr).unwrap();
    for want in [
        "a.yaml:2: pricing.version: must not be empty",
        "a.yaml:5: pricing.models.odd.input: `0.0375` has more than 3 decimal places",
        "a.yaml:5: pricing.models.odd.output: `-1` is not a price",
        "a.yaml:6: pricing.models.words.input: `cheap` is not a price",
        "a.yaml:6: pricing.models.words.cached_input: `1.5.0` is not a price",
        "b.yaml:1: pricing: defined in more than one policy file",
        "a.yaml:9: tenants.t.limits.tokens_per_minute: must be at least 1",
        "a.yaml:9: tenants.t.limits.budget.daily_usd: `1.2345678901` is not an amount",
        "a.yaml:11: tenants.t.keys[0].limits.budget.monthly_usd: must be more than 0",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(!err.contains("gpt-4o-mini"), "{err}");
}
