#!/usr/bin/env bash
# Builds the model families' tiny random-weight exports and checks each
# against transformers (python -m export.families --selftest): LLaVA-1.5 and
# Idefics3/SmolVLM in both decoder formats, Qwen2.5-VL with one and two
# pictures, each through its own Hugging Face processor. Leaves
# .cache/models/tiny-{llava,idefics3,qwen2_5_vl,qwen2_vl}/ (with expected.json: the
# processor's prompt ids, transformers' answers) for tests/families.rs. Skipped when the exporter's
# sources and the fixture pictures are unchanged since the last good run.
#
#   scripts/build-family-models.sh           # build or skip
#   scripts/build-family-models.sh --force   # build again
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODELS="$ROOT/.cache/models"
STAMP="$MODELS/tiny-families.key"
say() { printf '[build-family-models] %s\n' "$*" >&2; }

bash "$ROOT/scripts/setup-python.sh"
key=$(cd "$ROOT" && cat scripts/export/*.py models/fixtures/qwen2vl/*.png scripts/export/requirements.txt \
  | sha256sum | cut -d' ' -f1)
if [[ "${1:-}" != --force && -f "$STAMP" && "$(cat "$STAMP")" == "$key" \
      && -f "$MODELS/tiny-qwen2_5_vl/expected.json" && -f "$MODELS/tiny-llava/expected.json" \
      && -f "$MODELS/tiny-idefics3/expected.json" && -f "$MODELS/tiny-qwen2_vl/expected.json" ]]; then
  say "up to date ($MODELS/tiny-{llava,idefics3,qwen2_5_vl,qwen2_vl})"
  exit 0
fi
start=$(date +%s)
mkdir -p "$MODELS"
rm -f "$STAMP"
say "exporting and checking the tiny family models against transformers (a minute or two)"
cd "$ROOT/scripts"
PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 "$ROOT/.cache/venv/bin/python" -m export.families \
  --selftest --keep "$MODELS" >"$MODELS/tiny-families.log"
echo "$key" >"$STAMP"
say "done in $(( $(date +%s) - start ))s: every family matches transformers ($MODELS/tiny-families.log: the figures)"
