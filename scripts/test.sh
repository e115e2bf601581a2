#!/usr/bin/env bash
# Runs every check and test: installs what the tests need (MariaDB, so the database tests
# run instead of skipping), then formatting, clippy with warnings as errors, and the whole
# test suite (cargo-nextest when installed, cargo test otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The attack suite (tests/) saturates the machine on purpose; it runs after the rest, alone,
# so the other suites neither disturb it nor are disturbed by it.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast -E 'not package(rampart-edge-tests)'
  cargo test --workspace --doc
  cargo nextest run -p rampart-edge-tests --no-fail-fast --test-threads 1
else
  cargo test --workspace --no-fail-fast --exclude rampart-edge-tests
  cargo test -p rampart-edge-tests --no-fail-fast -- --test-threads 1
fi
