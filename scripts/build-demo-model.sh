#!/usr/bin/env bash
# Builds the demo model into .cache/models/demo-fp32/, demo-fp16/ and demo-int4/
# (the location elastic-edge looks in by default), skipping what is up to date.
#
#   scripts/build-demo-model.sh                  # fp32, fp16 and int4
#   scripts/build-demo-model.sh --variants fp32  # one variant
#   scripts/build-demo-model.sh --force          # rebuild
#
# Each variant is written into a temporary directory next to its destination and
# renamed into place only when it is complete and verified, so a half-written
# model is never left where the binary would load it.
# Also refreshes models/fixtures/demo_expected.json (greedy ids for the Rust tests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '[build-demo-model] %s\n' "$*" >&2; }

start=$(date +%s)
bash "$ROOT/scripts/setup-python.sh"

say "exporting (first build: a few minutes on 2 cores)"
cd "$ROOT/scripts"
PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 "$ROOT/.cache/venv/bin/python" -m export.demo "$@"
say "done in $(( $(date +%s) - start ))s: $(ls -d "$ROOT"/.cache/models/demo-* 2>/dev/null | grep -v '\.tmp-' | tr '\n' ' ')"
