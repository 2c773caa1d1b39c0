#!/usr/bin/env bash
# Coverage-guided fuzzing of the hostile-input surfaces (fuzz/: request JSON parser, SSE scanner,
# policy parsing, rule application), each for SECONDS (default 60), on the stable toolchain:
# libFuzzer (libfuzzer-sys) with SanitizerCoverage instrumentation, as cargo-fuzz builds it but
# without AddressSanitizer (the crate forbids `unsafe`; cargo-fuzz's ASan needs nightly). Debug
# assertions and overflow checks are on, so arithmetic overflow is a finding too.
#
#   benches/fuzz.sh [SECONDS] [TARGET...]
#   benches/fuzz.sh check     # CI: build, then run every target once over fuzz/seeds only (the
#                             # seeds include every input that ever crashed it: a regression test)
#
# Prints one line per target: executions, rate, corpus size, and any crash (its input is kept
# under target/fuzz/artifacts/TARGET/; replay it with the printed command). The corpus grows in
# target/fuzz/corpus/TARGET from the seeds in fuzz/seeds/TARGET.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
check=false
if [ "$secs" = check ]; then
  check=true
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request_json sse_scanner policy_yaml rules)

triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$PWD/target/fuzz"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# --target keeps the flags off build scripts and proc macros, as cargo-fuzz does.
cargo build --locked --release --manifest-path fuzz/Cargo.toml --target "$triple" \
  -j "${FUZZ_BUILD_JOBS:-2}" --bins

if $check; then
  for t in "${targets[@]}"; do
    "$CARGO_TARGET_DIR/$triple/release/$t" -runs=0 "fuzz/seeds/$t" >"$CARGO_TARGET_DIR/$t.check.log" 2>&1 \
      || { echo "fuzz seeds: $t FAILED (see $CARGO_TARGET_DIR/$t.check.log)"; tail -n 30 "$CARGO_TARGET_DIR/$t.check.log"; exit 1; }
    echo "fuzz seeds: $t ok ($(find "fuzz/seeds/$t" -type f | wc -l) inputs)"
  done
  exit 0
fi

printf '%-12s %10s %8s %10s %8s  %s\n' target execs secs "execs/s" corpus findings
status=0
for t in "${targets[@]}"; do
  bin="$CARGO_TARGET_DIR/$triple/release/$t"
  corpus="$CARGO_TARGET_DIR/corpus/$t"
  artifacts="$CARGO_TARGET_DIR/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  log="$CARGO_TARGET_DIR/$t.log"
  set +e
  "$bin" -max_total_time="$secs" -max_len=4096 -rss_limit_mb=2048 -timeout=10 \
    -artifact_prefix="$artifacts" -print_final_stats=1 "$corpus" "fuzz/seeds/$t" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  [ -n "$took" ] || took=$secs
  rate=$(( ${execs:-0} / (took > 0 ? took : 1) ))
  size=$(find "$corpus" -type f | wc -l)
  if [ $rc -eq 0 ]; then
    finding=none
  else
    status=1
    crash=$(find "$artifacts" -type f -newer "$bin" | head -1)
    finding="CRASH (exit $rc): $bin $crash  — see $log"
  fi
  printf '%-12s %10s %8s %10s %8s  %s\n' "$t" "${execs:-?}" "$took" "$rate" "$size" "$finding"
done
exit $status
