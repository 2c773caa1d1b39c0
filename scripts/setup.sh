#!/usr/bin/env bash
# Installs, once, what building and testing Fuke needs on a fresh Debian machine:
#  - cmake and libclang-dev: llama-cpp-2 builds llama.cpp from source (cmake) and generates its
#    bindings with bindgen (libclang);
#  - chromium and a font: the finance dashboard's test renders it headless and reads the
#    screenshot (tests/ledger.rs);
#  - wrk and the PostgreSQL client, for the load scripts in benches/ (not for the tests);
#  - the local models (scripts/models.sh).
# Called by scripts/demo.sh, scripts/test.sh and .ci/run; cheap when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cmake >/dev/null || missing+=(cmake)
# libclang itself (libclang.so / libclang-14.so.1), not libclang-cpp, which bindgen cannot use.
compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null \
  || compgen -G "/usr/lib/llvm-*/lib/libclang-[0-9]*.so*" >/dev/null \
  || missing+=(libclang-dev)
command -v chromium >/dev/null || missing+=(chromium)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
command -v wrk >/dev/null || missing+=(wrk)
command -v psql >/dev/null || missing+=(postgresql-client)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} (Debian packages)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

scripts/models.sh
