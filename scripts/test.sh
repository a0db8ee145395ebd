#!/usr/bin/env bash
# The project's test command (README.md): installs what it needs, builds, and runs every
# test layer in turn. Ends with the host-CPU fuzzer's "N passed, M failed" line.
#
#   scripts/test.sh            full run (as CI does)
#   HOSTDIFF_COUNT=1000000 scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${MORPH86_SHARED:-$(cd .. && pwd)/shared}
scripts/setup.sh
# Guest images for the Linux tests (Debian packages, cached in ~/.cache/morph86/guests).
if ! bash "$SHARED/guests/make-guests.sh" >/tmp/morph86-guests.log 2>&1; then
  echo "warning: make-guests.sh failed (see /tmp/morph86-guests.log); the Linux tests will skip"
fi

# Where cargo puts the binaries (CARGO_TARGET_DIR is honoured, as cargo does).
BIN=${CARGO_TARGET_DIR:-target}/release

echo "== format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -q -- -D warnings

echo "== build"
cargo build --workspace --release -q

echo "== unit and integration tests"
cargo test --workspace --release -q

echo "== SingleStepTests 80286 real mode"
# Every failure must be a documented 80286-vs-386 difference; 97.8% is today's floor.
"$BIN/singlestep" "$SHARED/conformance/80286/real_mode" --verbose 5 --no-list \
  --no-unexplained --min-pass 97.8

echo "== host-CPU differential fuzzer"
"$BIN/hostdiff" --count "${HOSTDIFF_COUNT:-100000}" --seed "${HOSTDIFF_SEED:-20261121}"

echo "== host-CPU differential fuzzer through the JIT (one-instruction blocks)"
"$BIN/hostdiff" --engine jit --count "${HOSTDIFF_JIT_COUNT:-100000}" \
  --seed "${HOSTDIFF_SEED:-20261121}"
