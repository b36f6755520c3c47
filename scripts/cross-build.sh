#!/usr/bin/env bash
# Builds the aarch64 (NVIDIA Jetson) binary on an x86_64 (or any) Linux
# machine, for the glibc of a JetPack release:
#   --glibc 2.31   JetPack 5 (L4T r35, Ubuntu 20.04)   [default]
#   --glibc 2.35   JetPack 6 (L4T r36, Ubuntu 22.04)
# The binary then runs on that JetPack and on anything newer.
#
# Usage: scripts/cross-build.sh [--glibc 2.31|2.35] [--release]
#   --release  the release profile; without it, the debug profile, as with cargo.
# The binary: target/aarch64-unknown-linux-gnu/{release,debug}/elastic-edge
# for glibc 2.31, target/glibc-2.35/aarch64-unknown-linux-gnu/... for 2.35.
#
# What it uses, installing what is missing (each step is skipped when done):
#   - the aarch64 Rust standard library: rustup target add aarch64-unknown-linux-gnu
#   - cargo-zigbuild and zig (PyPI wheels `cargo-zigbuild`, `ziglang`, pinned
#     by version and sha256 in cross/requirements.txt) in .cache/cross-venv;
#     zig is the linker and supplies the glibc symbol versions of the target.
# No C cross-compiler is needed: no dependency compiles C, and ONNX Runtime
# is loaded at run time (fetch the aarch64 one: scripts/setup.sh --arch aarch64).
# Alternative with Docker, building natively on an L4T image: cross/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
VENV=.cache/cross-venv
REQUIREMENTS=cross/requirements.txt

glibc=2.31
profile=debug
while [ $# -gt 0 ]; do
  case "$1" in
    --glibc) glibc=${2:?--glibc needs 2.31 or 2.35}; shift 2 ;;
    --glibc=*) glibc=${1#--glibc=}; shift ;;
    --release) profile=release; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "cross-build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$glibc" in
  2.31) jetpack="JetPack 5" ;;
  2.35) jetpack="JetPack 6" ;;
  *) echo "cross-build.sh: --glibc must be 2.31 (JetPack 5) or 2.35 (JetPack 6), not '$glibc'" >&2; exit 2 ;;
esac

say() { printf 'cross-build: %s\n' "$*" >&2; }
ALTERNATIVE="alternatives: build on the Jetson itself (cargo build --release), or natively on aarch64 with Docker (cross/README.md)"
missing() {
  # One message naming what is missing and how to get it, then exit.
  say "MISSING: $1"
  say "  $2"
  say "  $ALTERNATIVE"
  exit 1
}
# Runs a command with its output kept aside; on failure, $reason is its
# first error line (the whole output is in .cache/cross-build.log).
reason=
quietly() {
  mkdir -p .cache
  if "$@" >.cache/cross-build.log 2>&1; then return 0; fi
  reason=$(grep -m1 -i 'error' .cache/cross-build.log || tail -1 .cache/cross-build.log)
  reason="${reason:-no output} (full output: .cache/cross-build.log)"
  return 1
}

# 1. The aarch64 Rust standard library.
say "[1/4] aarch64 Rust standard library ($TARGET)"
if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
  missing "Rust (cargo and rustc)" "install Rust 1.92 or newer with rustup (https://rustup.rs)."
fi
sysroot=$(rustc --print sysroot)
if [ -d "$sysroot/lib/rustlib/$TARGET/lib" ]; then
  say "      already installed ($(rustc -V))"
elif command -v rustup >/dev/null; then
  say "      rustup target add $TARGET"
  if ! quietly rustup target add "$TARGET"; then
    missing "the Rust standard library for $TARGET: 'rustup target add $TARGET' failed: $reason" \
      "check that rustup can reach its server (static.rust-lang.org, or RUSTUP_DIST_SERVER) and rerun; or install rust-std for $TARGET for $(rustc -V) from an offline rustup mirror."
  fi
else
  missing "the Rust standard library for $TARGET, and rustup is not installed to fetch it" \
    "install Rust with rustup (https://rustup.rs), then: rustup target add $TARGET."
fi

# 2. cargo-zigbuild and zig, pinned, in a venv of their own.
say "[2/4] cargo-zigbuild and zig in $VENV"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [ -x "$VENV/bin/cargo-zigbuild" ] && [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" = "$want" ]; then
  say "      already installed"
else
  command -v python3 >/dev/null || missing "python3, to install cargo-zigbuild and ziglang from PyPI" \
    "install python3 with venv and pip (Debian: apt-get install python3-venv python3-pip)."
  if [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV" >&2 || { rm -rf "$VENV"; missing "python3's venv module, to hold cargo-zigbuild and ziglang" \
      "Debian/Ubuntu: apt-get install python3-venv."; }
  fi
  say "      pip install cargo-zigbuild, ziglang (pinned in $REQUIREMENTS; about 95 MB)"
  if ! quietly "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
      --require-hashes -r "$REQUIREMENTS"; then
    missing "cargo-zigbuild and ziglang: pip could not install them from PyPI: $reason" \
      "check that PyPI is reachable and rerun; or install cargo-zigbuild (cargo install cargo-zigbuild) and zig 0.15 yourself and put both on PATH."
  fi
  echo "$want" > "$VENV/.requirements.sha256"
fi
# cargo-zigbuild finds zig through `python3 -m ziglang` (the venv's python).
export PATH="$PWD/$VENV/bin:$PATH"
say "      $(cargo-zigbuild --version), zig $(python3 -m ziglang version)"

# 3. Build. cargo-zigbuild reads the glibc version from the target's suffix;
# the output lands in <target dir>/$TARGET/. Cargo rebuilds every crate when
# the glibc changes, so 2.35 gets a target dir of its own (target/glibc-2.35)
# and switching between the two costs nothing.
target_dir=${CARGO_TARGET_DIR:-target}
[ "$glibc" = 2.31 ] || target_dir=$target_dir/glibc-$glibc
say "[3/4] cargo zigbuild --target $TARGET.$glibc ($profile, for $jetpack)"
args=(zigbuild --locked --bin elastic-edge --target "$TARGET.$glibc")
[ "$profile" = release ] && args+=(--release)
CARGO_TARGET_DIR=$target_dir cargo-zigbuild "${args[@]}"
bin=$target_dir/$TARGET/$profile/elastic-edge

# 4. Check what was built: an aarch64 ELF whose glibc symbol versions are
# all at most the one asked for.
say "[4/4] checking $bin"
command -v readelf >/dev/null || missing "readelf, to check the binary's glibc symbol versions" "Debian/Ubuntu: apt-get install binutils."
machine=$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')
[ "$machine" = AArch64 ] || { say "FAILED: $bin is not an aarch64 binary (ELF machine: $machine)"; exit 1; }
interp=$(readelf -l -W "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
max=$(readelf -V -W "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -u -V | tail -1)
if [ -z "$max" ]; then
  say "FAILED: found no GLIBC symbol versions in $bin"
  exit 1
fi
if [ "$(printf '%s\n%s\n' "$max" "$glibc" | sort -V | tail -1)" != "$glibc" ]; then
  say "FAILED: $bin needs GLIBC_$max, newer than the $glibc asked for ($jetpack)"
  exit 1
fi
say "built $bin"
say "  aarch64 ELF, interpreter $interp, $(du -h "$bin" | cut -f1)"
say "  needs at most GLIBC_$max (target glibc $glibc: $jetpack and newer)"
say "  copy it to the Jetson with an ONNX Runtime (JetPack's, or: scripts/setup.sh --arch aarch64)"
