#!/usr/bin/env bash
# Runs every test. On a fresh machine it first installs what the tests need: build tools and the
# local models (scripts/setup.sh), starts PostgreSQL and Redis if they are down
# (scripts/services.sh), and the pinned official OpenAI Python SDK
# (tests/sdk/requirements.txt), used to prove SDK compatibility.
# Ends with one summary line: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
scripts/setup.sh
# PostgreSQL and Redis, which the ledger, limit and cache tests use for real.
scripts/services.sh
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r tests/sdk/requirements.txt
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$log"
exit "$status"
