#!/usr/bin/env bash
# What the usage ledger costs, in one run:
#  1. the ledger alone: rows/s committed at concurrency 1 (one transaction and fsync per row) and
#     64 (group commit), SQLite (WAL, synchronous=FULL) and PostgreSQL;
#  2. the gateway with the ledger off, on SQLite and on PostgreSQL, against the same upstream:
#     wrk JSON and SSE at concurrency 16 and 64, RPS and p99, each ratio to "off", the gateway's
#     CPU per request and the machine's idle share; once with
#     an upstream that answers at once, once with a model that takes 50 ms (`wait-50`).
#   benches/ledger.sh [seconds per run, default 10]
# A shorter run while iterating: MODES="json sse" CONCS=64 ALONE=0 benches/ledger.sh 5
# Needs wrk (apt-get install wrk) and the machine's PostgreSQL on 127.0.0.1:5432 (trust auth).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release --quiet --bin fuke --example echo_upstream --example ledger_bench
ulimit -n 65536 2>/dev/null || true

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

pg() { psql -q -h 127.0.0.1 -U postgres -d postgres -c "$1" >/dev/null; }
pg "DROP DATABASE IF EXISTS fuke_ledger_bench WITH (FORCE)"
pg "CREATE DATABASE fuke_ledger_bench"
PG_URL=postgres://postgres@127.0.0.1:5432/fuke_ledger_bench

echo "== the ledger alone (benches/ledger_bench.rs)"
[ "${ALONE:-1}" = 0 ] || for c in 1 64; do
  rows=$([ "$c" = 1 ] && echo 2000 || echo 50000)
  target/release/examples/ledger_bench "sqlite://$work/alone.db" "$rows" "$c"
  pg "DROP DATABASE IF EXISTS fuke_ledger_bench WITH (FORCE)"; pg "CREATE DATABASE fuke_ledger_bench"
  target/release/examples/ledger_bench "$PG_URL" "$rows" "$c"
done
pg "DROP DATABASE IF EXISTS fuke_ledger_bench WITH (FORCE)"; pg "CREATE DATABASE fuke_ledger_bench"

UP=127.0.0.1:19001
key=fk-load-test-key
hash=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
mkdir -p "$work/policies"
cat > "$work/policies/load.yaml" <<YAML
upstreams:
  echo: { base_url: "http://$UP/v1" }
models:
  gpt-4o-mini: { upstream: echo }
  wait-50: { upstream: echo }
tenants:
  bench:
    models: ["*"]
    keys:
      - { id: bench-key, sha256: $hash }
pricing:
  models:
    gpt-4o-mini: { input: "0.15", output: "0.6" }
    wait-50: { input: "0.15", output: "0.6" }
YAML
target/release/examples/echo_upstream "$UP" >/dev/null & pids+=($!)

declare -A PID
declare -A ADDR=([off]=127.0.0.1:19201 [sqlite]=127.0.0.1:19202 [postgres]=127.0.0.1:19203)
declare -A URL=([off]=off [sqlite]="sqlite://$work/gateway.db" [postgres]="$PG_URL")
for v in off sqlite postgres; do
  cat > "$work/$v.yaml" <<YAML
listeners:
  - addr: ${ADDR[$v]}
    plaintext: true
policies: policies
ledger:
  url: ${URL[$v]}
  spool: $work/$v-spool.jsonl
YAML
  RUST_LOG=warn target/release/fuke serve -c "$work/$v.yaml" >"$work/$v.log" 2>&1 & pids+=($!)
  PID[$v]=$!
done
for a in $UP ${ADDR[off]} ${ADDR[sqlite]} ${ADDR[postgres]}; do
  for _ in $(seq 100); do curl -s -o /dev/null "http://$a/" && break; sleep 0.1; done
done

for mode in json sse json50 sse50; do
  stream=false; [ "${mode#sse}" != "$mode" ] && stream=true
  model=gpt-4o-mini; [ "${mode%50}" != "$mode" ] && model=wait-50
  cat > "$work/$mode.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"$model","stream":$stream,"messages":[{"role":"user","content":"Where is my order 12345? It was due yesterday."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
done

# shellcheck source=benches/wrk.sh
source benches/wrk.sh
run() { wrk_chat "$1" "$work/$2.lua" "$3" "$secs"; }

# Where the time went in one run: the gateway's CPU (user + system, all its threads, the SQLite
# worker included) per request, and the share of the machine left idle (requests waiting on a
# commit while nothing else can run). Prints "rps p99 cpu_us_per_request idle_percent".
ticks=$(getconf CLK_TCK)
gw_cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
idle() { awk '$1 == "cpu" {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
measured() {
  local v=$1 mode=$2 c=$3 c0 c1 i0 t0 i1 t1 rps p99
  c0=$(gw_cpu "${PID[$v]}"); read -r i0 t0 < <(idle)
  read -r rps p99 < <(run "${ADDR[$v]}" "$mode" "$c")
  c1=$(gw_cpu "${PID[$v]}"); read -r i1 t1 < <(idle)
  awk -v r="$rps" -v p="$p99" -v c="$((c1 - c0))" -v k="$ticks" -v s="$secs" -v i="$((i1 - i0))" -v t="$((t1 - t0))" \
    'BEGIN {printf "%s %s %.0f %.0f\n", r, p, c / k * 1e6 / (r * s), 100 * i / t}'
}

echo
echo "== the gateway, ledger off / SQLite / PostgreSQL (same upstream, same run)"
echo "(cpu: the gateway's CPU µs per request; idle: % of the machine idle during the run)"
printf '%-5s %-5s %10s %10s %10s %9s %9s %9s %9s %9s %14s %14s\n' mode conc off_rps sqlite_rps pg_rps sqlite/off pg/off off_p99 sqlite_p99 pg_p99 cpu_o/s/p idle_o/s/p
# json/sse: an upstream that answers at once (the gateway's own cost dominates); json50/sse50:
# a model that takes 50 ms, as real ones do (and more).
for mode in ${MODES:-json sse json50 sse50}; do
  for c in ${CONCS:-16 64}; do
    read -r o_rps o_p99 o_cpu o_idle < <(measured off $mode $c)
    read -r s_rps s_p99 s_cpu s_idle < <(measured sqlite $mode $c)
    read -r p_rps p_p99 p_cpu p_idle < <(measured postgres $mode $c)
    printf '%-5s %-5s %10s %10s %10s %9s %9s %9s %9s %9s %14s %14s\n' "$mode" "$c" "$o_rps" "$s_rps" "$p_rps" \
      "$(awk -v a="$s_rps" -v b="$o_rps" 'BEGIN {printf "%.3f", a/b}')" \
      "$(awk -v a="$p_rps" -v b="$o_rps" 'BEGIN {printf "%.3f", a/b}')" "$o_p99" "$s_p99" "$p_p99" \
      "$o_cpu/$s_cpu/$p_cpu" "$o_idle/$s_idle/$p_idle"
  done
done

# Every request wrk completed is a row (rows are committed before the last byte).
# The report's last "requests" is its total.
rows() {
  target/release/fuke usage -c "$work/$1.yaml" --format json --from 2000-01-01 |
    awk -F: '/"requests"/ {gsub(/[ ,]/,"",$2); n=$2} END {print n}'
}
echo
echo "ledger rows: sqlite $(rows sqlite), postgres $(rows postgres)"
grep -h "spool" "$work"/*.log || echo "no rows spooled"
pg "DROP DATABASE IF EXISTS fuke_ledger_bench WITH (FORCE)" || true
