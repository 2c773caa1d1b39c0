#!/usr/bin/env bash
# The answer cache under load, in one run against one gateway and the same upstream:
#  - the echo upstream called directly (the baseline rps);
#  - exact hits (the same question every time) and semantic hits (a paraphrase of the cached
#    question every time, so each request embeds its question with all-MiniLM-L6-v2 and scans
#    the scope's vectors): latency p50/p99 at 1 client, rps at 16;
#  - misses (a new question every time) with the semantic level on (embedding + upstream + fill)
#    and for a tenant without a cache: what the cache costs when it cannot help.
#   benches/cache.sh [seconds per run, default 10]
# Needs wrk (apt-get install wrk). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk" >&2; exit 1; }
scripts/setup.sh >/dev/null
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release --quiet --bin fuke --example echo_upstream
ulimit -n 65536 2>/dev/null || true

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

UP=127.0.0.1:19501 FUKE=127.0.0.1:19502
key=fk-cache-bench-key nokey=fk-cache-bench-nocache
hash=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
nohash=$(printf '%s' "$nokey" | sha256sum | cut -d' ' -f1)
mkdir -p "$work/policies"
cat > "$work/fuke.yaml" <<YAML
listeners:
  - addr: $FUKE
    plaintext: true
policies: policies
local_models:
  minilm: { path: $PWD/models/all-MiniLM-L6-v2.gguf, kind: embedding, threads: 1 }
embedder: minilm
YAML
cat > "$work/policies/bench.yaml" <<YAML
upstreams:
  echo: { base_url: "http://$UP/v1" }
models:
  gpt: { upstream: echo, model: echo-model }
tenants:
  cached:
    models: ["*"]
    cache: { sampled: true }
    keys:
      - { id: bench-key, sha256: $hash }
  uncached:
    models: ["*"]
    keys:
      - { id: nocache-key, sha256: $nohash }
YAML

target/release/examples/echo_upstream "$UP" >/dev/null & pids+=($!)
RUST_LOG=warn target/release/fuke serve -c "$work/fuke.yaml" >"$work/fuke.log" 2>&1 & pids+=($!)
for a in $UP $FUKE; do
  for _ in $(seq 300); do curl -s -o /dev/null "http://$a/" && break; sleep 0.1; done
done

system='{"role":"system","content":"You are the support bot of an online shop."}'
body() { printf '{"model":"gpt","messages":[%s,{"role":"user","content":"%s"}]}' "$system" "$1"; }
fixed() { # name key question
  cat > "$work/$1.lua" <<LUA
wrk.method = "POST"
wrk.body = '$(body "$3")'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $2"
LUA
}
fresh() { # name key: a new question every request
  cat > "$work/$1.lua" <<LUA
counter = 0
prefix = tostring(math.random(1, 1000000000))
request = function()
  counter = counter + 1
  local q = "Question " .. prefix .. "-" .. counter .. ": can you explain item " .. counter .. " on my invoice?"
  local body = '{"model":"gpt","messages":[$system,{"role":"user","content":"' .. q .. '"}]}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer $2"}, body)
end
LUA
}
fixed exact "$key" "How do I reset my password?"
fixed semantic "$key" "how can I reset my password"
fixed direct "$key" "How do I reset my password?"
fresh miss "$key"
fresh uncached "$nokey"

# Prime the cache and check what each script will get.
post() { curl -s -D - -o /dev/null "http://$FUKE/v1/chat/completions" -H "Authorization: Bearer $1" \
  -H 'Content-Type: application/json' -d "$(body "$2")" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-fuke-cache" {print $2}'; }
[ "$(post "$key" "How do I reset my password?")" = miss ] || { echo "priming failed" >&2; exit 1; }
for _ in $(seq 50); do [ "$(post "$key" "How do I reset my password?")" = hit ] && break; sleep 0.1; done
[ "$(post "$key" "how can I reset my password")" = hit ] || { echo "the paraphrase does not hit" >&2; exit 1; }

# Prints "rps p50_ms p99_ms" for one run.
ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; printf "%.3f", v }'; }
run() { # addr script connections
  local out
  out=$(wrk -t"$(( $3 < 2 ? 1 : 2 ))" -c"$3" -d"${secs}s" --latency -s "$work/$2.lua" "http://$1/v1/chat/completions")
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers ($2)" >&2; echo "$out" >&2; exit 1; fi
  echo "$(echo "$out" | awk '/Requests\/sec/ {print $2}') $(ms "$(echo "$out" | awk '$1=="50%" {print $2}')") $(ms "$(echo "$out" | awk '$1=="99%" {print $2}')")"
}

printf '%-22s %10s %10s %10s %10s %12s\n' case "rps(c16)" "p50(c1)" "p99(c1)" "rps(c1)" "rps/direct"
read -r d16 _ _ < <(run $UP direct 16)
read -r d1 dp50 dp99 < <(run $UP direct 1)
printf '%-22s %10s %10s %10s %10s %12s\n' "upstream direct" "$d16" "$dp50" "$dp99" "$d1" 1.000
for case in exact semantic miss uncached; do
  read -r r16 _ _ < <(run $FUKE $case 16)
  read -r r1 p50 p99 < <(run $FUKE $case 1)
  printf '%-22s %10s %10s %10s %10s %12s\n' "$case" "$r16" "$p50" "$p99" "$r1" \
    "$(awk -v a="$r16" -v b="$d16" 'BEGIN {printf "%.3f", a/b}')"
done
curl -s "http://$FUKE/metrics" | grep -E '^fuke_cache_(requests_total|entries|bytes)' || true
