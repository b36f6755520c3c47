#!/usr/bin/env bash
# Debian 12's GStreamer, for the `gstreamer` cargo feature (the `stream`
# command's gst: sources) and its tests. Installs only when something is
# missing; needs root (CI runs as root) or sudo.
#
#   libgstreamer1.0-dev, libgstreamer-plugins-base1.0-dev: headers and .pc
#       files that gstreamer-rs links against (gstreamer, gstreamer-app)
#   gstreamer1.0-plugins-base: appsink, videoconvert, videotestsrc, decodebin
#   gstreamer1.0-plugins-good: v4l2src, rtspsrc, jpegenc/jpegdec, avimux/avidemux
#
# RTSP cameras usually send H.264 or H.265: decodebin then needs a decoder,
# e.g. gstreamer1.0-libav (not installed here: the tests do not need it).
set -euo pipefail

packages=(libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base gstreamer1.0-plugins-good)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup-gstreamer: installing ${missing[*]}" >&2
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup-gstreamer: not root and no sudo; install: ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
