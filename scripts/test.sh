#!/usr/bin/env bash
# Runs every check and test: installs what the tests need (MariaDB, so the database tests
# run instead of skipping), then formatting, clippy with warnings as errors, and the whole
# test suite (cargo-nextest when installed, cargo test otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast
fi
