#!/usr/bin/env bash
# Installs the official `openai` Python client (pinned by version and sha256
# in scripts/openai-client/requirements.txt) into its own virtualenv,
# .cache/venv-openai, for tests/openai.rs. Skipped when the venv was made
# from the same requirements and Python (its stamp matches).
# Environment: PYTHON (default: python3.11 if present, else python3; 3.11 or 3.12).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.cache/venv-openai"
REQ="$ROOT/scripts/openai-client/requirements.txt"

say() { printf '[setup-openai-client] %s\n' "$*" >&2; }
fail() { printf '[setup-openai-client] error: %s\n' "$*" >&2; exit 1; }

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || fail "no $PYTHON on PATH: install Python 3.11 or 3.12 (with venv), or set PYTHON"
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$PYVER" in
  3.11|3.12) ;;
  *) fail "$PYTHON is Python $PYVER; the pinned wheels are for 3.11 and 3.12: set PYTHON=/path/to/python3.11" ;;
esac

STAMP="$VENV/.elastic-edge-stamp"
WANT="$( (cat "$REQ"; echo "$PYVER") | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  say "up to date ($VENV)"
  exit 0
fi

say "creating $VENV (Python $PYVER) with the pinned openai client"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  --require-hashes --only-binary=:all: -r "$REQ"
"$VENV/bin/python" -c 'import openai; print("[setup-openai-client] openai", openai.__version__)' >&2
echo "$WANT" > "$STAMP"
