#!/usr/bin/env bash
# One command from a fresh clone to the running site: installs what is missing, builds
# rampart, and runs `rampart up` on the default topology (extra arguments are passed on,
# e.g. `./scripts/up.sh -d` to return once healthy).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
command -v cargo >/dev/null || { echo "up: cargo is needed to build rampart (install a Rust toolchain, 1.85 or newer)" >&2; exit 1; }
cargo build --release -p rampart
exec ./target/release/rampart up "$@"
