#!/usr/bin/env bash
# The main job on a fresh machine: fetch ONNX Runtime, build the demo model
# and the release binary (each skipped when already there), then caption
# scikit-image's sample pictures. Extra arguments go to `elastic-edge
# caption` (e.g. --policy h2o --keep 0.3, --json, --prompt "...").
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/build-demo-model.sh --variants fp32
cargo build --release --locked --quiet

args=()
for name in chelsea coffee astronaut rocket motorcycle_left; do
  for file in .cache/assets/skimage/data/"$name".*; do
    [ -f "$file" ] && args+=(--image "$file")
  done
done
[ ${#args[@]} -gt 0 ] || { echo "caption-samples: no sample images in .cache/assets/skimage/data (scripts/setup-python.sh extracts them)" >&2; exit 1; }
exec target/release/elastic-edge caption --model .cache/models/demo-fp32 "${args[@]}" "$@"
