#!/usr/bin/env bash
# Regenerates the committed tiny test model (models/tiny/) and its fixture
# (models/fixtures/tiny_expected.json) deterministically (seeded), with the
# pinned exporter environment. Needs scripts/setup-python.sh (run on demand).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[[ -x "$ROOT/.cache/venv/bin/python" ]] || bash "$ROOT/scripts/setup-python.sh"
cd "$ROOT/scripts"
PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 "$ROOT/.cache/venv/bin/python" -m export.tiny "$@"
