#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian 12 machine (idempotent, quiet when all
# is there). Needs root for apt-get; skips what is already installed.
set -euo pipefail
need=()
command -v nasm >/dev/null || need+=(nasm)
command -v cmake >/dev/null || need+=(cmake)  # SDL2 is built from source (crate sdl2, bundled)
command -v Xvfb >/dev/null || need+=(xvfb)  # the demo-in-a-window test (frontend/tests/window.rs)
command -v xwininfo >/dev/null || need+=(x11-utils)
[ -f /usr/share/seabios/bios.bin ] || need+=(seabios)  # real firmware (frontend/tests/seabios.rs)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: please install: ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
