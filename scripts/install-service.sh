#!/usr/bin/env bash
# Installs elastic-edge as a systemd service (scripts/elastic-edge.service):
#
#   /usr/local/bin/elastic-edge                         the binary
#   /usr/local/lib/elastic-edge/libonnxruntime.so       ONNX Runtime (ORT_DYLIB_PATH in the unit)
#   /usr/local/share/elastic-edge/model/                the model's files
#   /etc/elastic-edge/elastic-edge.toml                 the config (kept if it exists; the new one goes to .new)
#   /etc/systemd/system/elastic-edge.service            the unit
#   /etc/systemd/system/elastic-edge.service.d/10-memory.conf   MemoryMax= for this model and budget
#   /etc/systemd/system/elastic-edge.service.d/20-gpu.conf      with --gpu: the GPU's device nodes
#
# MemoryMax is computed by `elastic-edge serve --check` from the model's files
# and the KV pool the config's budget sizes: 2 x files + pool + 512 MiB.
# The config is checked before anything is installed.
#
# Usage: scripts/install-service.sh [--dry-run] [--root DIR] [--binary PATH]
#          [--onnxruntime LIB] [--model DIR] [--config FILE] [--gpu jetson|nvidia]
#          [--no-start]
#   --dry-run      print what would be done, change nothing
#   --root DIR     install under DIR instead of / (an image being built); no systemctl
#   --binary       default target/release/elastic-edge
#   --onnxruntime  default .cache/onnxruntime/lib/libonnxruntime.so (on a Jetson: JetPack's)
#   --model        default .cache/models/demo-fp16
#   --config       default scripts/elastic-edge.toml; its [model] dir is set to the installed model
#   --gpu          jetson: the Jetson iGPU's nodes (and nvargus' socket for CSI cameras),
#                  MemoryDenyWriteExecute off (not checked with Jetson's driver);
#                  nvidia: a discrete GPU's nodes.
#   --no-start     install and enable, but do not (re)start
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
root=/
binary=target/release/elastic-edge
onnxruntime=.cache/onnxruntime/lib/libonnxruntime.so
model=.cache/models/demo-fp16
config=scripts/elastic-edge.toml
gpu=
start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --root) root=${2:?--root needs a folder}; shift 2 ;;
    --binary) binary=${2:?}; shift 2 ;;
    --onnxruntime) onnxruntime=${2:?}; shift 2 ;;
    --model) model=${2:?}; shift 2 ;;
    --config) config=${2:?}; shift 2 ;;
    --gpu) gpu=${2:?--gpu needs jetson or nvidia}; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-service: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$gpu" in ""|jetson|nvidia) ;; *) echo "install-service: --gpu is jetson or nvidia, not $gpu" >&2; exit 2 ;; esac

die() { echo "install-service: $*" >&2; exit 1; }
[ -x "$binary" ] || die "no binary at $binary (cargo build --release, or --binary PATH)"
[ -f "$onnxruntime" ] || die "no ONNX Runtime library at $onnxruntime (scripts/setup.sh, or --onnxruntime LIB)"
[ -f "$model/manifest.json" ] || die "no model at $model (scripts/build-demo-model.sh, or --model DIR)"
[ -f "$config" ] || die "no config at $config"

root=${root%/}
prefix=/usr/local
unit_dir=/etc/systemd/system
dropins=$unit_dir/elastic-edge.service.d
model_dest=$prefix/share/elastic-edge/model
ort_dest=$prefix/lib/elastic-edge/libonnxruntime.so
config_dest=/etc/elastic-edge/elastic-edge.toml

# The config as it will be installed: [model] dir pointing at the installed
# model. Checked here against the model being installed (same files).
staged=$(mktemp -d)
trap 'rm -rf "$staged"' EXIT
set_model_dir() {  # config, dir -> stdout: `dir = ...` in [model] replaced
  awk -v dir="$2" '
    /^\[/ { table = $0 }
    table == "[model]" && /^[[:space:]]*dir[[:space:]]*=/ { print "dir = \"" dir "\""; next }
    { print }' "$1"
}
set_model_dir "$config" "$model_dest" >"$staged/elastic-edge.toml"
grep -q "^dir = \"$model_dest\"" "$staged/elastic-edge.toml" || die "$config has no [model] dir = ... line to point at $model_dest"
set_model_dir "$config" "$(cd "$model" && pwd)" >"$staged/check.toml"
check=$(ORT_DYLIB_PATH=$onnxruntime "$binary" serve --config "$staged/check.toml" --check) \
  || die "the config does not check out (above)"
memory_max=$(printf '%s\n' "$check" | sed -n 's/^memory_max_bytes=//p')
[ -n "$memory_max" ] || die "serve --check printed no memory_max_bytes"
memory_max_mib=$(( (memory_max + (1 << 20) - 1) >> 20 ))

cat >"$staged/10-memory.conf" <<EOF
# Written by scripts/install-service.sh from \`elastic-edge serve --check\`:
$(printf '%s\n' "$check" | grep -v '^config ok' | sed 's/^/#   /')
# 2 x the model's files + the KV pool + 512 MiB.
[Service]
MemoryMax=${memory_max_mib}M
EOF

case "$gpu" in
  jetson) cat >"$staged/20-gpu.conf" <<'EOF'
# Written by scripts/install-service.sh --gpu jetson: the integrated GPU's
# nodes for ONNX Runtime's CUDA and TensorRT providers (JetPack 5 names the
# /dev/nvhost-* ones, JetPack 6 the /dev/nvgpu/igpu0/* ones; a node that is
# not there is skipped). Compare with `ls /dev/nv*` on the board.
[Service]
DeviceAllow=/dev/nvmap rw
DeviceAllow=/dev/nvhost-ctrl rw
DeviceAllow=/dev/nvhost-ctrl-gpu rw
DeviceAllow=/dev/nvhost-gpu rw
DeviceAllow=/dev/nvhost-as-gpu rw
DeviceAllow=/dev/nvhost-prof-gpu rw
DeviceAllow=/dev/nvhost-dbg-gpu rw
DeviceAllow=/dev/nvhost-sched-gpu rw
DeviceAllow=/dev/nvhost-ctxsw-gpu rw
DeviceAllow=/dev/nvhost-nvsched-gpu rw
DeviceAllow=/dev/nvhost-vic rw
DeviceAllow=/dev/nvhost-nvdla0 rw
DeviceAllow=/dev/nvhost-nvdla1 rw
DeviceAllow=/dev/nvhost-ctrl-nvdla0 rw
DeviceAllow=/dev/nvhost-ctrl-nvdla1 rw
DeviceAllow=/dev/nvgpu/igpu0/ctrl rw
DeviceAllow=/dev/nvgpu/igpu0/as rw
DeviceAllow=/dev/nvgpu/igpu0/channel rw
DeviceAllow=/dev/nvgpu/igpu0/tsg rw
DeviceAllow=/dev/nvgpu/igpu0/prof rw
DeviceAllow=/dev/nvgpu/igpu0/prof-ctx rw
DeviceAllow=/dev/nvgpu/igpu0/prof-dev rw
DeviceAllow=/dev/nvgpu/igpu0/sched rw
DeviceAllow=/dev/nvgpu/igpu0/dbg rw
DeviceAllow=/dev/nvgpu/igpu0/nvsched rw
DeviceAllow=/dev/nvgpu/igpu0/power rw
# A CSI camera (nvarguscamerasrc) talks to nvargus-daemon through a socket
# in /tmp.
PrivateTmp=no
# Jetson's GPU driver and TensorRT were not checked under it (a discrete
# GPU's CUDA was: see --gpu nvidia).
MemoryDenyWriteExecute=no
EOF
  ;;
  nvidia) cat >"$staged/20-gpu.conf" <<'EOF'
# Written by scripts/install-service.sh --gpu nvidia: a discrete GPU's nodes
# for ONNX Runtime's CUDA and TensorRT providers.
[Service]
DeviceAllow=/dev/nvidiactl rw
DeviceAllow=/dev/nvidia0 rw
DeviceAllow=/dev/nvidia-uvm rw
DeviceAllow=/dev/nvidia-uvm-tools rw
# MemoryDenyWriteExecute stays on: CUDA 13 on driver 580 (cuBLAS, cuDNN,
# an NVRTC-compiled kernel) ran under PR_SET_MDWE on an H100; ONNX
# Runtime's CUDA provider itself was not run there. If it fails to
# register, add MemoryDenyWriteExecute=no here.
EOF
  ;;
esac

say() { printf 'install-service: %s\n' "$*" >&2; }
run() {
  if [ "$dry_run" = 1 ]; then
    printf '  would run:'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
show() {  # file: print a staged file's content in a dry run
  if [ "$dry_run" = 1 ]; then
    printf '  --- %s\n' "$1"; sed 's/^/  | /' "$staged/$(basename "$1")"
  fi
}

r=$root
[ "$r" = "" ] || [ "$r" = / ] && r=
say "installing into ${root:-/}$([ "$dry_run" = 1 ] && echo ' (dry run: nothing is changed)')"
say "model $(printf '%s\n' "$check" | sed -n 's/^model //p'); MemoryMax=${memory_max_mib}M"
run install -d -m 0755 "$r$prefix/bin" "$r$prefix/lib/elastic-edge" "$r$model_dest" "$r/etc/elastic-edge" "$r$dropins"
run install -m 0755 "$binary" "$r$prefix/bin/elastic-edge"
# The library itself, not the checkout's symlink to it.
run install -m 0644 "$(readlink -f "$onnxruntime")" "$r$ort_dest"
providers_shared=$(dirname "$(readlink -f "$onnxruntime")")/libonnxruntime_providers_shared.so
if [ -f "$providers_shared" ]; then
  run install -m 0644 "$providers_shared" "$r$prefix/lib/elastic-edge/libonnxruntime_providers_shared.so"
fi
for file in "$model"/*; do
  [ -f "$file" ] && run install -m 0644 "$(readlink -f "$file")" "$r$model_dest/$(basename "$file")"
done
if [ -f "$r$config_dest" ] && ! cmp -s "$staged/elastic-edge.toml" "$r$config_dest"; then
  say "$config_dest exists and differs: keeping it, the new one goes to $config_dest.new"
  run install -m 0644 "$staged/elastic-edge.toml" "$r$config_dest.new"
else
  run install -m 0644 "$staged/elastic-edge.toml" "$r$config_dest"
  show "$config_dest"
fi
run install -m 0644 scripts/elastic-edge.service "$r$unit_dir/elastic-edge.service"
run install -m 0644 "$staged/10-memory.conf" "$r$dropins/10-memory.conf"
show "$dropins/10-memory.conf"
if [ -n "$gpu" ]; then
  run install -m 0644 "$staged/20-gpu.conf" "$r$dropins/20-gpu.conf"
  show "$dropins/20-gpu.conf"
elif [ -f "$r$dropins/20-gpu.conf" ]; then
  run rm -f "$r$dropins/20-gpu.conf"
fi

if command -v systemd-analyze >/dev/null; then
  if [ "$dry_run" = 1 ]; then
    run systemd-analyze verify "$r$unit_dir/elastic-edge.service"
  else
    # --root: the unit's ExecStart and drop-ins as installed there.
    systemd-analyze verify --root="${root:-/}" "$unit_dir/elastic-edge.service"
  fi
fi

if [ -z "$r" ] && [ -d /run/systemd/system ]; then
  run systemctl daemon-reload
  run systemctl enable elastic-edge.service
  if [ "$start" = 1 ]; then
    run systemctl restart elastic-edge.service
    say "started: systemctl status elastic-edge; journalctl -u elastic-edge -f; curl http://127.0.0.1:8080/healthz"
  fi
elif [ -z "$r" ]; then
  say "systemd is not running here: enable it on the robot with systemctl enable --now elastic-edge"
fi
