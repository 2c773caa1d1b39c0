//! Per-request policy work: pin the policy snapshot, resolve the bearer key among 10,000 keys,
//! and check the model route.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use fuke::backends::Registry;
use fuke::policy::PolicyStore;
use http::HeaderMap;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::from(
        "upstreams:\n  up: { base_url: \"http://127.0.0.1:9/v1\" }\nmodels:\n  gpt-4o-mini: { upstream: up }\n  other: { upstream: up }\ntenants:\n",
    );
    for t in 0..1000 {
        yaml.push_str(&format!("  t{t}:\n    models: [gpt-4o-mini]\n    keys:\n"));
        for k in 0..10 {
            let key = format!("fk-bench-{t}-{k}");
            let h = hex::encode(fuke::policy::sha256(key.as_bytes()));
            yaml.push_str(&format!("      - {{ id: k{t}-{k}, sha256: {h} }}\n"));
        }
    }
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let store = PolicyStore::open(dir.path(), Arc::new(Registry::default())).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("authorization", "Bearer fk-bench-517-3".parse().unwrap());

    c.bench_function("auth+policy/key_among_10k_and_route", |b| {
        b.iter(|| {
            let policy = store.current();
            let p = fuke::auth::authenticate(black_box(&headers), &policy).unwrap();
            let tenant = policy.tenant(&p.tenant).unwrap();
            black_box(policy.route_for(tenant, black_box("gpt-4o-mini")).is_ok())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
