#!/bin/sh
# Rebuilds the built-in demo guest (roms/demo/demo.bin) from its source with NASM.
# The binary is committed, so a plain `cargo build` needs no assembler; roms/check.sh
# verifies that the committed binary is what this script produces.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/demo/demo.bin"}
command -v nasm >/dev/null 2>&1 || { echo "roms/build.sh: nasm not found (apt-get install nasm)" >&2; exit 1; }
nasm -f bin -Werror -o "$out" "$here/demo/demo.asm"
