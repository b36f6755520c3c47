#!/usr/bin/env bash
# Checks the systemd unit as scripts/install-service.sh installs it (binary,
# ONNX Runtime, model, config, unit and drop-ins) into a scratch root:
# `systemd-analyze verify` (unknown keys, bad values, a missing ExecStart
# binary all fail it), with and without each --gpu drop-in, that --dry-run
# changes nothing, and prints `systemd-analyze security`'s exposure score.
# Installs Debian's systemd package when systemd-analyze is missing: this
# machine need not run systemd, verify works offline.
#
# Usage: scripts/verify-service.sh [--binary PATH]   (default: target/debug/elastic-edge, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."

binary=target/debug/elastic-edge
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "verify-service: unknown argument $1" >&2; exit 2 ;;
  esac
done
say() { printf 'verify-service: %s\n' "$*" >&2; }

if ! command -v systemd-analyze >/dev/null; then
  say "installing Debian's systemd package (for systemd-analyze)"
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
[ -x "$binary" ] || cargo build --locked
[ -f .cache/onnxruntime/lib/libonnxruntime.so ] || scripts/setup.sh

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# A config whose source exists here (serve --check opens it).
cat >"$scratch/serve.toml" <<TOML
[model]
dir = "placeholder: install-service.sh points it at the installed model"
threads = 2
[cache]
kv_budget = "64KiB"
keep = 0.5
[stream]
source = "file:$PWD/models/tiny/gradient.png"
loop = true
interval = "2s"
jsonl = "/var/lib/elastic-edge/captions.jsonl"
TOML

install() {  # root, extra args...
  local root=$1; shift
  mkdir -p "$root/usr/lib/systemd"
  # The units the default dependencies name (sysinit.target, ...).
  [ -d "$root/usr/lib/systemd/system" ] || cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
  scripts/install-service.sh --root "$root" --binary "$binary" --model models/tiny \
    --config "$scratch/serve.toml" "$@"
}

root=$scratch/root
install "$root"
unit=$root/etc/systemd/system/elastic-edge.service
cmp -s scripts/elastic-edge.service "$unit" || { say "the installed unit differs from scripts/elastic-edge.service"; exit 1; }
grep -q '^MemoryMax=[0-9]*M$' "$root/etc/systemd/system/elastic-edge.service.d/10-memory.conf" \
  || { say "no MemoryMax in the memory drop-in"; exit 1; }
grep -q '^dir = "/usr/local/share/elastic-edge/model"$' "$root/etc/elastic-edge/elastic-edge.toml" \
  || { say "the installed config does not point at the installed model"; exit 1; }
say "systemd-analyze verify: ok ($(systemd-analyze --version | head -1))"
for gpu in jetson nvidia; do
  install "$root" --gpu "$gpu" >/dev/null 2>&1 || { install "$root" --gpu "$gpu"; exit 1; }
  grep -q '^DeviceAllow=/dev/nv' "$root/etc/systemd/system/elastic-edge.service.d/20-gpu.conf"
  say "systemd-analyze verify with --gpu $gpu: ok"
done
install "$root" >/dev/null 2>&1
[ ! -e "$root/etc/systemd/system/elastic-edge.service.d/20-gpu.conf" ] || { say "--gpu drop-in left behind"; exit 1; }

# A dry run changes nothing.
empty=$scratch/empty
mkdir -p "$empty"
out=$(scripts/install-service.sh --dry-run --root "$empty" --binary "$binary" --model models/tiny --config "$scratch/serve.toml" 2>&1)
[ -z "$(ls -A "$empty")" ] || { say "--dry-run wrote into its root"; exit 1; }
grep -q 'would run: install -m 0755' <<<"$out" || { say "--dry-run printed no plan:"; echo "$out" >&2; exit 1; }
say "install-service.sh --dry-run: prints the plan, writes nothing"

systemd-analyze security --offline=true --root="$root" /etc/systemd/system/elastic-edge.service 2>/dev/null \
  | tail -1 | sed 's/^→ /verify-service: systemd-analyze security: /' >&2 || true
say "ok"
