#!/bin/sh
# Verifies that roms/demo/demo.bin is exactly what roms/build.sh makes from demo.asm
# (NASM output is deterministic: no timestamps). Exit status 0 when they match.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$here/build.sh" "$tmp"
if cmp -s "$tmp" "$here/demo/demo.bin"; then
    echo "roms: demo.bin is reproducible from demo.asm"
else
    echo "roms: demo.bin differs from a fresh build of demo.asm: run roms/build.sh and commit" >&2
    exit 1
fi
