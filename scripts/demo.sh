#!/usr/bin/env bash
# Runs the demo: installs build tools and local models if missing (scripts/setup.sh), builds
# Fuke, creates development certificates if missing, starts the echo upstream on 127.0.0.1:8081
# and serves fuke.yaml (HTTP :8080, HTTPS :8443) with the local SmolLM2 and MiniLM models.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
scripts/setup.sh
cargo build --release --bin fuke --example echo_upstream
bin=target/release/fuke
[ -f certs/server.pem ] || "$bin" certs dev --dir certs
"$bin" check -c fuke.yaml
target/release/examples/echo_upstream 127.0.0.1:8081 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT
cat <<'MSG'

Fuke demo: http://127.0.0.1:8080/v1 and https://127.0.0.1:8443/v1 (CA: certs/ca.pem)
  curl -s http://127.0.0.1:8080/v1/chat/completions \
    -H 'Authorization: Bearer fk-demo-local-only-change-me' -H 'Content-Type: application/json' \
    -d '{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}],"stream":true}'
  (model "smollm2" is the local llama.cpp model; "gpt-4o-mini" goes to the echo upstream;
   "support-bot" tries the echo upstream first and falls back to smollm2: see x-fuke-backend)
Usage and spend (ledger: data/ledger.db): http://127.0.0.1:8080/dashboard
  with the finance key fk-demo-finance-change-me, or target/release/fuke usage --group-by model
MSG
"$bin" serve -c fuke.yaml
