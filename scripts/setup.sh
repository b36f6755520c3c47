#!/usr/bin/env bash
# Brings a checkout what the binary and the tests need, skipping what is
# already there:
#   - ONNX Runtime's shared library, from the `onnxruntime` wheel on PyPI,
#     pinned by version and sha256, into .cache/onnxruntime/ (git-ignored).
# The binary and `cargo test` find it there without any variable set.
#
# Usage: scripts/setup.sh [--arch x86_64|aarch64]
#   --arch  fetch the library for another architecture (cross builds).
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.31.1
# sha256 of the cp312 manylinux_2_28 wheels of onnxruntime==$ORT_VERSION.
declare -A ORT_WHEEL_SHA256=(
  [x86_64]=1f3dea47f2f0e5117c2404cea7d21fd253ae7836a3bf167a501cdfbb2600d536
  [aarch64]=0b9a492176886992e0e875f06bc0367e333f5fff11711a2d642e18b02f3009cc
)

arch=$(uname -m)
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=${2:?--arch needs x86_64 or aarch64}; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
expected=${ORT_WHEEL_SHA256[$arch]:-}
if [ -z "$expected" ]; then
  echo "setup.sh: no ONNX Runtime wheel pinned for architecture '$arch' (have: ${!ORT_WHEEL_SHA256[*]})" >&2
  exit 2
fi

say() { printf 'setup: %s\n' "$*" >&2; }

fetch_onnxruntime() {
  local dest=.cache/onnxruntime/$ORT_VERSION-$arch
  local lib=$dest/libonnxruntime.so.$ORT_VERSION
  if [ -f "$dest/.complete" ] && [ -f "$lib" ]; then
    say "ONNX Runtime $ORT_VERSION ($arch) already in $dest"
  else
    command -v python3 >/dev/null || { say "python3 is needed to download the onnxruntime wheel (apt-get install python3-pip)"; exit 1; }
    command -v unzip >/dev/null || { say "unzip is needed (apt-get install unzip)"; exit 1; }
    local downloads=.cache/downloads
    mkdir -p "$downloads"
    local wheel=$downloads/onnxruntime-$ORT_VERSION-cp312-cp312-manylinux_2_28_$arch.whl
    if [ ! -f "$wheel" ]; then
      say "downloading onnxruntime==$ORT_VERSION for $arch (24 MB) from PyPI"
      python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform "manylinux_2_28_$arch" \
        -d "$downloads" "onnxruntime==$ORT_VERSION" || {
          say "pip could not download onnxruntime==$ORT_VERSION; check that PyPI is reachable"; exit 1; }
    fi
    local actual
    actual=$(sha256sum "$wheel" | cut -d' ' -f1)
    if [ "$actual" != "$expected" ]; then
      rm -f "$wheel"
      say "sha256 mismatch for $wheel: expected $expected, got $actual; the file was removed, run setup again"
      exit 1
    fi
    local tmp
    tmp=$(mktemp -d .cache/onnxruntime.XXXXXX)
    unzip -q -j "$wheel" "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" \
      "onnxruntime/capi/libonnxruntime_providers_shared.so" -d "$tmp"
    chmod 755 "$tmp"
    touch "$tmp/.complete"
    rm -rf "$dest"
    mkdir -p "$(dirname "$dest")"
    mv "$tmp" "$dest"
    say "ONNX Runtime $ORT_VERSION ($arch) installed in $dest"
  fi
  # A stable name for the native architecture: .cargo/config.toml and the
  # binary's search both look here.
  if [ "$arch" = "$(uname -m)" ]; then
    mkdir -p .cache/onnxruntime/lib
    ln -sfn "../$ORT_VERSION-$arch/libonnxruntime.so.$ORT_VERSION" .cache/onnxruntime/lib/libonnxruntime.so
    ln -sfn "../$ORT_VERSION-$arch/libonnxruntime_providers_shared.so" .cache/onnxruntime/lib/libonnxruntime_providers_shared.so
  fi
}

fetch_onnxruntime
