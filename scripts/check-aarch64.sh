#!/usr/bin/env bash
# The emulated aarch64 check: cross-builds the Jetson binary, runs it under
# qemu-user with the aarch64 ONNX Runtime (PyPI's `onnxruntime` wheel),
# captions with the committed tiny model, and compares the result with the
# x86_64 binary's: same caption, token count, cache counts and pool sizes
# (everything in the --json output but the timings). Prints MATCH or
# MISMATCH per case; exits non-zero on any mismatch.
#
# Usage: scripts/check-aarch64.sh [--glibc 2.31|2.35]
#
# Installs what is missing (Debian 12, as root; each step skipped when done):
#   - qemu-user 10 from bookworm-backports (Debian 12's own qemu-user 7.2
#     segfaults inside ONNX Runtime's CPU detection), adding that source;
#   - an aarch64 glibc, libstdc++ and libgcc for qemu's -L, from Debian's
#     libc6-arm64-cross, libstdc++6-arm64-cross, libgcc-s1-arm64-cross
#     (they install into /usr/aarch64-linux-gnu);
#   - ONNX Runtime for aarch64 and x86_64: scripts/setup.sh;
#   - the binaries: scripts/cross-build.sh --release, cargo build --release.
# QEMU_AARCH64=/path/to/qemu-aarch64 uses that qemu whatever its version.
set -euo pipefail
cd "$(dirname "$0")/.."

MIN_QEMU_MAJOR=10
SYSROOT=/usr/aarch64-linux-gnu
SYSROOT_PACKAGES=(libc6-arm64-cross libstdc++6-arm64-cross libgcc-s1-arm64-cross)
ORT_VERSION=1.31.1
ORT_AARCH64=$PWD/.cache/onnxruntime/$ORT_VERSION-aarch64/libonnxruntime.so.$ORT_VERSION
ORT_X86_64=$PWD/.cache/onnxruntime/lib/libonnxruntime.so
CASES=("" "--policy elastic --keep 0.5")
CAPTION_ARGS=(caption --model models/tiny --image models/tiny/gradient.png --json --max-new-tokens 16)

glibc=2.31
while [ $# -gt 0 ]; do
  case "$1" in
    --glibc) glibc=${2:?--glibc needs 2.31 or 2.35}; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-aarch64.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'check-aarch64: %s\n' "$*" >&2; }
missing() { say "MISSING: $1"; say "  $2"; exit 1; }
start=$SECONDS
step() { say "[$1] $2 (at ${SECONDS}s)"; }

is_bookworm() { [ -r /etc/os-release ] && grep -q '^VERSION_CODENAME=bookworm' /etc/os-release; }
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_updated=
apt_update() { [ -n "$apt_updated" ] || { apt-get update -qq >&2; apt_updated=1; }; }
# apt-get install, its chatter kept out of sight unless it fails.
apt_install() {
  local log rc=0
  log=$(mktemp)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || tail -20 "$log" >&2
  rm -f "$log"
  return "$rc"
}

# The major version of the qemu at $1 (empty: none there), 0 when unknown.
qemu_major() {
  [ -n "$1" ] || return 0
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
  echo "${v:-0}"
}

# 1. qemu-user, new enough.
step 1/5 "qemu-user >= $MIN_QEMU_MAJOR"
qemu=${QEMU_AARCH64:-}
if [ -z "$qemu" ]; then
  qemu=$(command -v qemu-aarch64 || true)
  major=$(qemu_major "$qemu")
  if [ -z "$qemu" ] || [ "${major:-0}" -lt "$MIN_QEMU_MAJOR" ]; then
    have=${qemu:+qemu-aarch64 ${major:-?}.x at $qemu}
    how="Debian 12: add bookworm-backports to apt's sources, then apt-get install -t bookworm-backports qemu-user; elsewhere qemu-user $MIN_QEMU_MAJOR+ from your distribution (or QEMU_AARCH64=/path/to/qemu-aarch64)"
    if ! is_bookworm || ! can_apt; then
      missing "qemu-user $MIN_QEMU_MAJOR or newer (${have:-none installed}; older ones crash in ONNX Runtime's CPU detection)" "$how"
    fi
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      say "      adding bookworm-backports to /etc/apt/sources.list.d/bookworm-backports.sources"
      cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
      apt_updated=
    fi
    if ! apt-cache policy qemu-user 2>/dev/null | grep -q 'bookworm-backports'; then
      apt_update
    fi
    say "      apt-get install -t bookworm-backports qemu-user"
    if ! apt_install -t bookworm-backports qemu-user; then
      missing "qemu-user $MIN_QEMU_MAJOR or newer: installing it from bookworm-backports failed" "$how"
    fi
    qemu=$(command -v qemu-aarch64 || true)
    major=$(qemu_major "$qemu")
    [ "${major:-0}" -ge "$MIN_QEMU_MAJOR" ] ||
      missing "qemu-user $MIN_QEMU_MAJOR or newer (installed: ${major:-none})" "$how"
  fi
fi
say "      $("$qemu" --version | head -1) ($qemu)"

# 2. The aarch64 dynamic loader and libraries the binary and ONNX Runtime load.
step 2/5 "aarch64 libraries for qemu -L in $SYSROOT"
need=()
for f in ld-linux-aarch64.so.1 libc.so.6 libm.so.6 libstdc++.so.6 libgcc_s.so.1; do
  [ -e "$SYSROOT/lib/$f" ] || need+=("$f")
done
if [ ${#need[@]} -gt 0 ]; then
  how="Debian/Ubuntu: apt-get install ${SYSROOT_PACKAGES[*]}"
  can_apt || missing "${need[*]} for aarch64 in $SYSROOT" "$how"
  say "      apt-get install ${SYSROOT_PACKAGES[*]}"
  apt-cache policy "${SYSROOT_PACKAGES[0]}" 2>/dev/null | grep -q 'Candidate: [0-9]' || apt_update
  apt_install "${SYSROOT_PACKAGES[@]}" ||
    missing "${need[*]} for aarch64 in $SYSROOT: apt-get install failed" "$how"
else
  say "      already there"
fi

# 3. ONNX Runtime for both architectures.
step 3/5 "ONNX Runtime $ORT_VERSION for aarch64 and $(uname -m)"
scripts/setup.sh --arch aarch64
scripts/setup.sh

# 4. The two binaries.
step 4/5 "binaries: aarch64 (glibc $glibc) and $(uname -m)"
scripts/cross-build.sh --release --glibc "$glibc"
if [ "$glibc" = 2.31 ]; then
  arm_bin=${CARGO_TARGET_DIR:-target}/aarch64-unknown-linux-gnu/release/elastic-edge
else
  arm_bin=${CARGO_TARGET_DIR:-target}/glibc-$glibc/aarch64-unknown-linux-gnu/release/elastic-edge
fi
cargo build --release --locked --bin elastic-edge
host_bin=${CARGO_TARGET_DIR:-target}/release/elastic-edge

# 5. Caption on both, compare.
step 5/5 "captioning models/tiny on both"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The --json object without its timings, keys sorted.
strip() { python3 -c 'import json,sys
for line in sys.stdin:
    line=line.strip()
    if line:
        o=json.loads(line); o.pop("timings_ms",None); print(json.dumps(o,sort_keys=True,ensure_ascii=False))'; }
failed=0
n=0
for extra in "${CASES[@]}"; do
  n=$((n + 1))
  # shellcheck disable=SC2206  # the case's flags, split on purpose
  args=("${CAPTION_ARGS[@]}" $extra)
  label="caption${extra:+ $extra}"
  t0=$SECONDS
  if ! ORT_DYLIB_PATH=$ORT_X86_64 "$host_bin" "${args[@]}" >"$out/host$n.json" 2>"$out/host$n.err"; then
    say "FAILED: $(uname -m) run of $label"; cat "$out/host$n.err" >&2; exit 1
  fi
  t1=$SECONDS
  if ! ORT_DYLIB_PATH=$ORT_AARCH64 "$qemu" -L "$SYSROOT" "$arm_bin" "${args[@]}" >"$out/arm$n.json" 2>"$out/arm$n.err"; then
    say "FAILED: aarch64 run of $label under qemu"; cat "$out/arm$n.err" >&2; exit 1
  fi
  t2=$SECONDS
  host=$(strip <"$out/host$n.json")
  arm=$(strip <"$out/arm$n.json")
  if [ -z "$host" ]; then
    say "FAILED: the $(uname -m) run of $label printed nothing"; exit 1
  elif [ "$host" = "$arm" ]; then
    echo "MATCH    $label  ($(uname -m) $((t1 - t0))s, aarch64 under qemu $((t2 - t1))s)"
    echo "         $arm"
  else
    echo "MISMATCH $label"
    echo "  $(uname -m): $host"
    echo "  aarch64: $arm"
    failed=1
  fi
done
say "done in $((SECONDS - start))s"
exit $failed
