#!/usr/bin/env bash
# A short check for a machine with an NVIDIA GPU: caption the same pictures
# with --device cpu and --device cuda, compare the tokens, print tokens/s.
#
#   scripts/gpu-check.sh [--model DIR] [--binary PATH] [--image FILE ...]
#
# ONNX Runtime must be a CUDA build (JetPack's, or PyPI's onnxruntime-gpu):
# point ORT_DYLIB_PATH at its libonnxruntime.so. Exit status 0 only when
# CUDA ran and gave the same greedy tokens as the CPU.
# The default model is the GPU's format-2 graph (GroupQueryAttention on CUDA
# takes fp16 and gives no attention scores): build it with
#   scripts/build-demo-model.sh --variants fp16 --decoder-scores off
# (or pass --model .cache/models/demo-fp16-format1 for format 1).
set -euo pipefail
cd "$(dirname "$0")/.."

model=.cache/models/demo-fp16-noscores
binary=target/release/elastic-edge
images=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --image) images+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ ${#images[@]} -eq 0 ]; then
  for name in chelsea coffee astronaut; do
    for f in .cache/assets/skimage/data/"$name".* models/fixtures/images/"$name"-224.png; do
      [ -f "$f" ] && { images+=("$f"); break; }
    done
  done
fi
[ ${#images[@]} -gt 0 ] || images=(models/tiny/gradient.png)
[ -x "$binary" ] || { echo "gpu-check: no binary at $binary (cargo build --release)" >&2; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

args=(caption --model "$model" --json --max-new-tokens 64)
for image in "${images[@]}"; do args+=(--image "$image"); done

run() {  # device -> JSON lines on stdout
  "$binary" "${args[@]}" --device "$1"
}
cpu=$(run cpu)
cuda=$(run cuda)
# Tokens/s of a longer generation on the first picture.
long() {
  "$binary" caption --model "$model" --json --image "${images[0]}" --max-new-tokens 256 --ignore-stop --device "$1"
}
cpu_long=$(long cpu)
cuda_long=$(long cuda)

CPU="$cpu" CUDA="$cuda" CPU_LONG="$cpu_long" CUDA_LONG="$cuda_long" python3 - <<'PY'
import json, os, sys
cpu = [json.loads(l) for l in os.environ["CPU"].splitlines()]
cuda = [json.loads(l) for l in os.environ["CUDA"].splitlines()]
same = True
for a, b in zip(cpu, cuda):
    match = a["caption"] == b["caption"]
    same &= match
    print(f"{a['image']}: {'same' if match else 'DIFFERENT'}\n  cpu:  {a['caption']}\n  cuda: {b['caption']}")
for name in ("CPU_LONG", "CUDA_LONG"):
    r = json.loads(os.environ[name])
    t = r["timings_ms"]
    print(f"{name.split('_')[0].lower():5s} 256 tokens: first token {t['time_to_first_token_ms']:.1f} ms, "
          f"decode {t['decode_tokens_per_s']:.1f} tok/s, prefill {t['prefill_ms']:.1f} ms")
print("tokens agree" if same else "tokens differ")
sys.exit(0 if same else 1)
PY
