#!/usr/bin/env bash
# The project's test command (what CI runs): fetches what is missing, then
# checks formatting, lints with warnings as errors, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== ONNX Runtime (a 24 MB download the first time)" >&2
scripts/setup.sh
# Debian's GStreamer for the `gstreamer` feature's sources and tests
# (apt-get only when a package is missing, and never an upgrade).
echo "== GStreamer's packages: only those missing are installed, nothing is upgraded" >&2
# Debian's -dev packages pin their libraries' exact versions, so after a
# point release an install can need upgrades of installed libraries (glib,
# udev); setup-gstreamer refuses those unless ELASTIC_EDGE_ALLOW_UPGRADES=1
# (what .ci/run sets on its throwaway machine). Without the packages the
# tests still run, without the `gstreamer` feature, and say so.
gstreamer=1
if ! scripts/setup-gstreamer.sh; then
  gstreamer=0
  echo "test: WARNING: GStreamer's packages are missing; clippy and the tests run WITHOUT the gstreamer feature (its gst: sources go untested)" >&2
fi
# The demo model (fp32 and fp16) for the end-to-end tests: a few minutes and
# a 7 GB torch install the first time, seconds afterwards.
echo "== the demo model (the first time: a 7 GB torch install and the export, several minutes)" >&2
scripts/build-demo-model.sh

# The model families beyond the demo's (LLaVA, Idefics3/SmolVLM, Qwen2.5-VL):
# tiny random-weight exports checked against transformers, kept for
# tests/families.rs (which then must find them).
echo "== the model families' tiny exports, checked against transformers (a minute or two the first time)" >&2
scripts/build-family-models.sh
export ELASTIC_EDGE_REQUIRE_FAMILY_MODELS=1

# The official openai Python client (pinned by sha256) for tests/openai.rs.
echo "== the openai client's virtualenv (.cache/venv-openai; seconds the first time)" >&2
scripts/setup-openai-client.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy (warnings are errors)" >&2
cargo clippy --locked --all-targets -- -D warnings
if [ "$gstreamer" = 1 ]; then
  echo "== cargo clippy --features gstreamer (warnings are errors)" >&2
  cargo clippy --locked --all-targets --features gstreamer -- -D warnings
  echo "== cargo test --features gstreamer" >&2
  cargo test --locked --features gstreamer
else
  echo "== cargo test (without the gstreamer feature: its packages are missing)" >&2
  cargo test --locked
fi
echo "== systemd unit: install into a scratch root, systemd-analyze verify" >&2
scripts/verify-service.sh
