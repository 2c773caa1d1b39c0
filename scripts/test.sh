#!/usr/bin/env bash
# Runs every test. On a fresh machine it first installs what the tests need: the pinned official
# OpenAI Python SDK (tests/sdk/requirements.txt), used to prove SDK compatibility.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
python3 -m pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
cargo test --locked "$@"
