#!/usr/bin/env bash
# Routing: what a route with a fallback costs while the remote is healthy, and how fast a slow
# remote is left for the local model. One run, one gateway:
#  - rps at concurrency 16 (wrk), JSON and SSE: the baseline hyper proxy, Fuke on a one-candidate
#    alias (`single`), and Fuke on a two-candidate alias (`routed`: the same remote first, the local
#    model behind it, so the 200 ms first-token deadline is armed: SSE is scanned for its first
#    token, JSON is streamed from the remote and reassembled);
#  - time to first token (benches/ttft.rs): the local model called directly (`local`) and through a
#    route whose remote holds its first token for 2 s, at 1 and 4 clients: `fallback` (its breaker
#    never opens, so every request waits out the 200 ms deadline) and `fallback-breaker` (default
#    breaker: after 5 misses the remote is skipped at once for the 5 s cooldown).
#   benches/routing.sh [seconds per run, default 10]
# Needs wrk (apt-get install wrk). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }
scripts/setup.sh >/dev/null
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release --quiet --bin fuke --example echo_upstream --example baseline_proxy --example ttft
ulimit -n 65536 2>/dev/null || true

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

UP=127.0.0.1:19401 BASE=127.0.0.1:19402 FUKE=127.0.0.1:19403
key=fk-routing-bench-key
hash=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
mkdir -p "$work/policies"
cat > "$work/fuke.yaml" <<YAML
listeners:
  - addr: $FUKE
    plaintext: true
policies: policies
local_models:
  smollm2: { path: $PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf, kind: chat, context: 2048, parallel: 4, threads: 1 }
YAML
cat > "$work/policies/bench.yaml" <<YAML
upstreams:
  echo: { base_url: "http://$UP/v1" }
  # The same server, its breaker never opening: every fallback waits for the deadline.
  echo-nobreaker:
    base_url: "http://$UP/v1"
    breaker: { consecutive_failures: 1000000000, min_calls: 1000000000 }
models:
  single: { upstream: echo, model: echo-model }
  routed:
    candidates:
      - { upstream: echo, model: echo-model }
      - { local: smollm2 }
  fallback:
    candidates:
      - { upstream: echo-nobreaker, model: delay }
      - { local: smollm2 }
  fallback-breaker:
    candidates:
      - { upstream: echo, model: delay }
      - { local: smollm2 }
  local: { local: smollm2 }
tenants:
  bench:
    models: ["*"]
    keys:
      - { id: bench-key, sha256: $hash }
YAML

target/release/examples/echo_upstream "$UP" >/dev/null & pids+=($!)
target/release/examples/baseline_proxy "$BASE" "http://$UP" >/dev/null & pids+=($!)
RUST_LOG=warn target/release/fuke serve -c "$work/fuke.yaml" >"$work/fuke.log" 2>&1 & pids+=($!)
for a in $UP $BASE $FUKE; do
  for _ in $(seq 300); do curl -s -o /dev/null "http://$a/" && break; sleep 0.1; done
done

for model in single routed; do
  for mode in json sse; do
    stream=false; [ "$mode" = sse ] && stream=true
    cat > "$work/$model-$mode.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"$model","stream":$stream,"messages":[{"role":"system","content":"You are a helpful customer-service assistant."},{"role":"user","content":"Where is my order 12345? It was due yesterday."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
  done
done

# Prints "rps p99_ms" for one run.
run() {
  local addr=$1 script=$2 out
  out=$(wrk -t2 -c16 -d"${secs}s" --latency -s "$work/$script.lua" "http://$addr/v1/chat/completions")
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers from $addr ($script)" >&2; echo "$out" >&2; exit 1; fi
  local rps p99
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}')
  echo "$rps $p99"
}

printf '%-5s %12s %12s %12s %12s %12s %14s\n' mode baseline_rps single_rps routed_rps single/base routed/base routed/single
for mode in json sse; do
  read -r b_rps _ < <(run $BASE single-$mode)
  read -r s_rps _ < <(run $FUKE single-$mode)
  read -r r_rps _ < <(run $FUKE routed-$mode)
  printf '%-5s %12s %12s %12s %12s %12s %14s\n' "$mode" "$b_rps" "$s_rps" "$r_rps" \
    "$(awk -v a="$s_rps" -v b="$b_rps" 'BEGIN {printf "%.3f", a/b}')" \
    "$(awk -v a="$r_rps" -v b="$b_rps" 'BEGIN {printf "%.3f", a/b}')" \
    "$(awk -v a="$r_rps" -v b="$s_rps" 'BEGIN {printf "%.3f", a/b}')"
done

echo
for conns in 1 4; do
  echo "clients: $conns"
  for model in local fallback fallback-breaker; do
    target/release/examples/ttft "http://$FUKE/v1/chat/completions" "$key" $model "$secs" "$conns" 16
  done
done
