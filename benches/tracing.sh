#!/usr/bin/env bash
# What tracing costs: the same gateway config three times, one after another, against the same
# upstream: tracing off; on, exporting every request's spans (sample_ratio 1) over OTLP/HTTP to
# benches/otlp_sink.rs; and on with the collector down (every export fails: spans must be dropped
# and counted, requests must not wait). wrk -t2 -c16, JSON and SSE.
#   benches/tracing.sh [seconds per run, default 10]
# Needs wrk (apt-get install wrk). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release --quiet --bin fuke --example echo_upstream --example otlp_sink
ulimit -n 65536 2>/dev/null || true

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

UP=127.0.0.1:19501 SINK=127.0.0.1:19502 DEAD=127.0.0.1:19503 FUKE=127.0.0.1:19504
key=fk-tracing-bench-key
hash=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
mkdir -p "$work/policies"
cat > "$work/policies/bench.yaml" <<YAML
upstreams:
  echo: { base_url: "http://$UP/v1" }
models:
  gpt-4o-mini: { upstream: echo }
tenants:
  bench:
    models: ["*"]
    keys:
      - { id: bench-key, sha256: $hash }
YAML
config() { # name [tracing endpoint]
  {
    echo "listeners: [ { addr: \"$FUKE\", plaintext: true } ]"
    echo "policies: policies"
    if [ -n "${2:-}" ]; then
      echo "tracing: { endpoint: \"http://$2/v1/traces\", protocol: http/protobuf, delay_ms: 200 }"
    fi
  } > "$work/$1.yaml"
}
config off
config on "$SINK"
config down "$DEAD"

for mode in json sse; do
  stream=false; [ "$mode" = sse ] && stream=true
  cat > "$work/$mode.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","stream":$stream,"messages":[{"role":"user","content":"Where is my order 12345?"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
done

target/release/examples/echo_upstream "$UP" >/dev/null & pids+=($!)
target/release/examples/otlp_sink "$SINK" 2>"$work/sink.log" & pids+=($!)

rps() {
  local out
  out=$(wrk -t2 -c16 -d"${secs}s" -s "$work/$1.lua" "http://$FUKE/v1/chat/completions")
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers" >&2; echo "$out" >&2; exit 1; fi
  echo "$out" | awk '/Requests\/sec/ {print $2}'
}

declare -A result
for cfg in off on down; do
  RUST_LOG=warn target/release/fuke serve -c "$work/$cfg.yaml" >"$work/fuke-$cfg.log" 2>&1 & fpid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://$FUKE/healthz" && break; sleep 0.1; done
  for mode in json sse; do
    result[$cfg-$mode]=$(rps $mode)
  done
  sleep 1
  m=$(curl -s "http://$FUKE/metrics")
  exported=$(echo "$m" | awk '/^fuke_trace_spans_exported_total/ {print $2}')
  dropped=$(echo "$m" | awk '/^fuke_trace_spans_dropped_total/ {print $2}')
  echo "tracing $cfg: spans exported ${exported:-0}, dropped ${dropped:-0}"
  kill "$fpid"; wait "$fpid" 2>/dev/null || true
done

printf '\n%-5s %12s %12s %14s %10s %12s\n' mode off_rps on_rps collector_down on/off down/off
for mode in json sse; do
  off=${result[off-$mode]} on=${result[on-$mode]} down=${result[down-$mode]}
  printf '%-5s %12s %12s %14s %10s %12s\n' "$mode" "$off" "$on" "$down" \
    "$(awk -v a="$on" -v b="$off" 'BEGIN {printf "%.3f", a/b}')" \
    "$(awk -v a="$down" -v b="$off" 'BEGIN {printf "%.3f", a/b}')"
done
tail -1 "$work/sink.log" || true
