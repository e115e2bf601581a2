#!/usr/bin/env bash
# Monitoring service benchmark: the store and query engine in-process
# (crates/monitor/examples/service_bench.rs), pinned to one core with taskset:
#   - ingest samples/s: agent-shaped text pushes (3 hosts x 500 series, one push a second)
#     parsed and stored, per second of the thread's CPU time; and the store alone;
#   - bytes per stored sample: compressed chunk payload / samples, for that data;
#   - latency of a 24 h QPS range query at 1 s resolution:
#     sum(rate(rampart_http_requests_total[1m])) over 86 401 steps of a day of history.
# Prints a table with the goals (>= 1 000 000 samples/s, <= 1.37 bytes/sample, < 50 ms).
#
# Usage: bench/monitor-service.sh [pushes, default 3600] [cpu, default 1]
# BENCH_PROFILE=release builds with the release profile (fat LTO: a long build); the
# default is the dev profile with the monitor crate at opt-level 3 and its dependencies at
# opt-level 2 (what the workspace's dev profile gives them), without debug assertions.
set -euo pipefail
cd "$(dirname "$0")/.."
pushes=${1:-3600}; cpu=${2:-1}
if [ "${BENCH_PROFILE:-dev}" = release ]; then
  cargo build -q --release --example service_bench -p monitor
  bin=target/release/examples/service_bench
else
  cargo build -q --example service_bench -p monitor \
    --config 'profile.dev.package.monitor.opt-level=3' \
    --config 'profile.dev.package.monitor.debug-assertions=false' \
    --config 'profile.dev.package.monitor.overflow-checks=false'
  bin=target/debug/examples/service_bench
fi
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')  pinned to CPU $cpu"
taskset -c "$cpu" "$bin" "$pushes"
