# Sourced by the load scripts: one wrk run against a chat endpoint.
# wrk_chat ADDR LUA CONNS SECS prints "requests/s p99_ms"; any non-2xx answer fails the run.
wrk_chat() {
  local addr=$1 lua=$2 conns=$3 secs=$4 out
  out=$(wrk -t2 -c"$conns" -d"${secs}s" --latency -s "$lua" "http://$addr/v1/chat/completions")
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers from $addr" >&2; echo "$out" >&2; exit 1; fi
  local rps p99
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}')
  echo "$rps $p99"
}
