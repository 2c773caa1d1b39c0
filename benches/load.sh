#!/usr/bin/env bash
# Load test: the same upstream called directly, through a minimal hyper proxy (the baseline),
# and through Fuke (auth, policy, metering and usage log on), in one run; JSON and SSE at
# concurrency 16 and 64; and the gateway's RSS while it holds N slow streams (on the fresh
# process, and again after the load runs); latency on one connection (no queueing); and latency
# at concurrency 16 under a fixed request rate below saturation.
#   benches/load.sh [seconds per run, default 10] [slow streams, default 1000]
# ROUNDS (default 3): the baseline and Fuke are measured in that many alternating rounds
# (baseline first in odd rounds, Fuke first in even ones) and the median of the per-round ratios
# is reported, so that a slow spell of a shared machine weighs on both sides alike.
# Needs wrk (apt-get install wrk). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
streams="${2:-1000}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release --quiet --bin fuke --example echo_upstream --example baseline_proxy --example slow_streams --example fixed_rate
ulimit -n 65536 2>/dev/null || true

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

UP=127.0.0.1:19001 BASE=127.0.0.1:19100 FUKE=127.0.0.1:19200
key=fk-load-test-key
hash=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
mkdir -p "$work/policies"
# The ledger is off here: these runs compare the relay path with the baseline across sessions;
# benches/ledger.sh measures the ledger on against off.
cat > "$work/fuke.yaml" <<YAML
listeners:
  - addr: $FUKE
    plaintext: true
policies: policies
ledger:
  url: "off"
YAML
cat > "$work/policies/load.yaml" <<YAML
upstreams:
  echo: { base_url: "http://$UP/v1" }
models:
  gpt-4o-mini: { upstream: echo }
  slow: { upstream: echo }
tenants:
  bench:
    models: ["*"]
    keys:
      - { id: bench-key, sha256: $hash }
YAML

target/release/examples/echo_upstream "$UP" >/dev/null & pids+=($!)
target/release/examples/baseline_proxy "$BASE" "http://$UP" >/dev/null & pids+=($!)
RUST_LOG=info target/release/fuke serve -c "$work/fuke.yaml" >"$work/fuke.log" 2>&1 & fuke_pid=$!; pids+=($fuke_pid)
for a in $UP $BASE $FUKE; do
  for _ in $(seq 100); do curl -s -o /dev/null "http://$a/" && break; sleep 0.1; done
done

for mode in json sse; do
  stream=false; [ "$mode" = sse ] && stream=true
  cat > "$work/$mode.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","stream":$stream,"messages":[{"role":"system","content":"You are a helpful customer-service assistant."},{"role":"user","content":"Where is my order 12345? It was due yesterday."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
done

# Prints "rps p99_ms" for one run.
# shellcheck source=benches/wrk.sh
source benches/wrk.sh
run() { wrk_chat "$1" "$work/$2.lua" "$3" "$secs"; }

echo "slow streams on the fresh gateway:"
target/release/examples/slow_streams "http://$FUKE/v1/chat/completions" "$key" "$streams" "$fuke_pid"

rounds="${ROUNDS:-3}"
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
echo "baseline and Fuke in $rounds alternating rounds each; medians (per-round ratios in brackets)"
printf '%-5s %-5s %12s %12s %12s %10s %10s %10s %12s  %s\n' mode conc direct_rps baseline_rps fuke_rps fuke/base direct_p99 base_p99 fuke_p99_ms rounds
for mode in json sse; do
  for c in 16 64; do
    read -r d_rps d_p99 < <(run $UP $mode $c)
    b_all="" f_all="" bp_all="" fp_all="" r_all=""
    for r in $(seq "$rounds"); do
      if [ $((r % 2)) = 1 ]; then
        read -r b_rps b_p99 < <(run $BASE $mode $c)
        read -r f_rps f_p99 < <(run $FUKE $mode $c)
      else
        read -r f_rps f_p99 < <(run $FUKE $mode $c)
        read -r b_rps b_p99 < <(run $BASE $mode $c)
      fi
      b_all+=" $b_rps" f_all+=" $f_rps" bp_all+=" $b_p99" fp_all+=" $f_p99"
      r_all+=" $(awk -v f="$f_rps" -v b="$b_rps" 'BEGIN {printf "%.3f", f/b}')"
    done
    ratio=$(echo "$r_all" | median)
    printf '%-5s %-5s %12s %12s %12s %10.3f %10s %10s %12s  [%s ]\n' "$mode" "$c" "$d_rps" \
      "$(echo "$b_all" | median)" "$(echo "$f_all" | median)" "$ratio" "$d_p99" \
      "$(echo "$bp_all" | median)" "$(echo "$fp_all" | median)" "$r_all"
  done
done

# Added latency without queueing: one connection, so no request waits for CPU behind another.
lat() {
  wrk -t1 -c1 -d"${secs}s" --latency -s "$work/$2.lua" "http://$1/v1/chat/completions" |
    awk '$1=="50%" || $1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; printf "%s ", v}'
}
printf '\n%-5s %-26s %-26s %-26s\n' mode "direct p50/p99 ms" "baseline p50/p99 ms" "fuke p50/p99 ms"
for mode in json sse; do
  printf '%-5s %-26s %-26s %-26s\n' "$mode" "$(lat $UP $mode)" "$(lat $BASE $mode)" "$(lat $FUKE $mode)"
done

# Added latency at concurrency 16 without saturation: open loop at a fixed rate (see
# benches/fixed_rate.rs), well below every path's capacity.
echo
for run in "json 5000" "sse 2000"; do
  set -- $run
  for target in "direct $UP" "baseline $BASE" "fuke $FUKE"; do
    set -- $run $target
    echo "fixed-rate $1 $3: $(target/release/examples/fixed_rate "http://$4/v1/chat/completions" "$key" "$1" "$2" "$secs" 16)"
  done
done

echo "usage lines logged: $(grep -c '^{"usage":' "$work/fuke.log" || true)"
echo "slow streams after the load runs:"
target/release/examples/slow_streams "http://$FUKE/v1/chat/completions" "$key" "$streams" "$fuke_pid"
