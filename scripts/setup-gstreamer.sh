#!/usr/bin/env bash
# Debian 12's GStreamer, for the `gstreamer` cargo feature (the `stream`
# command's gst: sources) and its tests. Installs only when something is
# missing, and only the missing packages and their new dependencies: an
# install that would upgrade an installed package is refused (set
# ELASTIC_EDGE_ALLOW_UPGRADES=1 to allow it); needs root (CI runs as root) or sudo.
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
say() { printf 'setup-gstreamer: %s\n' "$*" >&2; }
say "missing: ${missing[*]}; installing only these with apt-get, upgrading nothing already installed"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { say "not root and no sudo; install: ${missing[*]}"; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
say "apt-get update (the package lists only)"
"${sudo[@]}" apt-get update -qq
# A simulation first: "Inst NAME [OLD] (NEW ...)" is an upgrade of an
# installed package (a -dev package pulls its library's exact version, which
# can drag systemd, mesa or glib along); those are not done here.
plan=$(apt-get install -s --no-install-recommends --no-upgrade "${missing[@]}")
upgrades=$(printf '%s\n' "$plan" | awk '/^Inst [^ ]+ \[/ {print $2}' | tr '\n' ' ')
if [ -n "$upgrades" ] && [ "${ELASTIC_EDGE_ALLOW_UPGRADES:-0}" != 1 ]; then
  say "installing ${missing[*]} would upgrade installed packages: ${upgrades}; nothing was done."
  say "install them yourself (apt-get install ${missing[*]}), or run again with ELASTIC_EDGE_ALLOW_UPGRADES=1"
  exit 1
fi
new=$(printf '%s\n' "$plan" | awk '/^Inst / {print $2}' | tr '\n' ' ')
say "installing ${new:-${missing[*]}}"
"${sudo[@]}" apt-get install -y -qq --no-install-recommends --no-upgrade "${missing[@]}"
