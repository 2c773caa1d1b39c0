#!/usr/bin/env bash
# Local model throughput: Fuke's in-process llama.cpp backend against llama.cpp's own server on
# the same GGUF and thread count, one after the other in one run (never at the same time).
# The reference server is llama-cpp-python[server] (builds llama.cpp from source into
# benches/.venv-llama the first time: ~10 minutes on 2 cores).
#
#   benches/local_llm.sh [THREADS] [MAX_TOKENS]
#
# Prints a table for 1 and 8 concurrent streams (tokens/s, median per-stream decode rate, time to
# first token) and Fuke's embedding latency for a 20-word sentence.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-1}
max_tokens=${2:-128}
scripts/setup.sh
CARGO_BUILD_JOBS=2 cargo build --release --quiet --bin fuke
model=$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf

venv=benches/.venv-llama
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import llama_cpp.server, httpx' 2>/dev/null; then
  echo "building llama-cpp-python (llama.cpp from source)…"
  CMAKE_BUILD_PARALLEL_LEVEL=2 "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'llama-cpp-python[server]==0.3.36' 'httpx==0.28.1'
fi
py=$venv/bin/python

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
key=fk-bench-local
hash=$(printf %s "$key" | sha256sum | cut -d' ' -f1)
mkdir -p "$tmp/policies"
cat > "$tmp/fuke.yaml" <<YAML
listeners:
  - { addr: 127.0.0.1:19300, plaintext: true }
policies: policies
local_models:
  smollm2: { path: $model, kind: chat, context: 2048, parallel: 8, queue: 64, threads: $threads }
  minilm: { path: $PWD/models/all-MiniLM-L6-v2.gguf, kind: embedding, threads: $threads }
YAML
cat > "$tmp/policies/bench.yaml" <<YAML
models:
  smollm2: { local: smollm2 }
  minilm: { local: minilm }
tenants:
  bench: { models: ["*"], keys: [ { id: bench, sha256: $hash } ] }
YAML

wait_for() { for _ in $(seq 1 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "no answer from $1" >&2; exit 1; }
run_chat() { # name base model
  for c in 1 8; do
    rounds=$(( c == 1 ? 4 : 2 ))
    printf '%s c=%s ' "$1" "$c"
    "$py" benches/local_llm.py chat "$2" "$key" "$3" "$c" "$rounds" "$max_tokens"
  done
}

RUST_LOG=warn target/release/fuke serve -c "$tmp/fuke.yaml" >"$tmp/fuke.log" 2>&1 &
pids+=($!)
wait_for http://127.0.0.1:19300/readyz
run_chat fuke http://127.0.0.1:19300/v1 smollm2 | tee "$tmp/results"
printf 'fuke embed ' | tee -a "$tmp/results"
"$py" benches/local_llm.py embed http://127.0.0.1:19300/v1 "$key" minilm 200 | tee -a "$tmp/results"
kill "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true

"$py" -m llama_cpp.server --model "$model" --host 127.0.0.1 --port 19301 --n_ctx 2048 \
  --n_threads "$threads" --n_threads_batch "$threads" --interrupt_requests False \
  --verbose False >"$tmp/llama.log" 2>&1 &
pids+=($!)
wait_for http://127.0.0.1:19301/v1/models
run_chat llama-cpp-python http://127.0.0.1:19301/v1 smollm2 | tee -a "$tmp/results"

"$py" - "$tmp/results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[1].startswith("c="):
        rows[(parts[0], parts[1])] = json.loads(parts[2])
print("\n| streams | server | tokens/s (all streams) | per-stream decode tok/s | TTFT p50 ms | TTFT max ms |")
print("|---|---|---|---|---|---|")
for c in ("c=1", "c=8"):
    for name in ("fuke", "llama-cpp-python"):
        r = rows.get((name, c))
        if r:
            print(f"| {c[2:]} | {name} | {r['tokens_per_s']:.1f} | {r['per_stream_decode_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_max_ms']:.0f} |")
    f, l = rows.get(("fuke", c)), rows.get(("llama-cpp-python", c))
    if f and l:
        print(f"|   | ratio fuke/llama | {f['tokens_per_s'] / l['tokens_per_s']:.2f}× | | {f['ttft_p50_ms'] / l['ttft_p50_ms']:.2f}× | |")
PY
