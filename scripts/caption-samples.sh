#!/usr/bin/env bash
# The main job on a fresh machine: fetch ONNX Runtime, build the demo model
# and the release binary (each skipped when already there), then caption
# scikit-image's sample pictures. The tracked files (the demo model's
# fixture, models/fixtures/) are left as they are: git status stays clean. Extra arguments go to `elastic-edge
# caption` (e.g. --policy h2o --keep 0.3, --json, --prompt "...").
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'caption-samples: %s\n' "$*" >&2; }
say "step 1 of 4: ONNX Runtime (a 24 MB download the first time)"
scripts/setup.sh
say "step 2 of 4: the demo model (the first time: a ~7 GB Python environment with torch, then the export, several minutes)"
scripts/build-demo-model.sh --variants fp32
say "step 3 of 4: the release binary (the first time: about 4 minutes on 2 cores; cargo shows its progress)"
cargo build --release --locked
say "step 4 of 4: captioning the sample pictures"

args=()
for name in chelsea coffee astronaut rocket motorcycle_left; do
  for file in .cache/assets/skimage/data/"$name".*; do
    [ -f "$file" ] && args+=(--image "$file")
  done
done
[ ${#args[@]} -gt 0 ] || { echo "caption-samples: no sample images in .cache/assets/skimage/data (scripts/setup-python.sh extracts them)" >&2; exit 1; }
exec target/release/elastic-edge caption --model .cache/models/demo-fp32 "${args[@]}" "$@"
