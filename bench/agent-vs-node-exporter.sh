#!/usr/bin/env bash
# Monitoring agent benchmark: the standalone `rampart agent` against Prometheus'
# node_exporter on the same machine, both serving /metrics over plain HTTP on their own
# loopback address, each pinned to CPU 1 (taskset) while the client runs on CPU 0.
#
# Per run, for each exporter: RSS (VmRSS) after 100 scrapes; CPU time per scrape (utime +
# stime from /proc/<pid>/stat over N scrapes on one keep-alive connection, so the client's
# speed does not enter); the series exposed (sample lines) and so CPU per exported series.
# Then the agent's whole CPU share while it pushes every second (remote-write to a sink in
# this script, which answers 204) for S seconds. Medians of the runs, compared with the goals:
# RSS <= 1/2 of node_exporter's, CPU per series <= 1/4, < 1 % of a core at a 1 s push.
#
# Usage: bench/agent-vs-node-exporter.sh [scrapes per run, default 1000] [runs, default 3]
#        [push seconds, default 60]
# RAMPART_BIN=path uses that binary instead of building the release one.
# Needs: prometheus-node-exporter (apt-installed when missing, as root), python3, taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
scrapes=${1:-1000}; runs=${2:-3}; push_seconds=${3:-60}
exporter=$(command -v prometheus-node-exporter || command -v node_exporter || true)
if [ -z "$exporter" ] && [ "$(id -u)" -eq 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus-node-exporter </dev/null >/dev/null
  exporter=$(command -v prometheus-node-exporter)
fi
[ -n "$exporter" ] || { echo "bench: node_exporter is needed (apt-get install prometheus-node-exporter)" >&2; exit 1; }
if [ -z "${RAMPART_BIN:-}" ]; then
  cargo build --release -q -p rampart
  bin=$PWD/target/release/rampart
else
  bin=$RAMPART_BIN
fi

exec taskset -c 0 python3 - "$bin" "$exporter" "$scrapes" "$runs" "$push_seconds" <<'PY'
import http.client, http.server, os, socket, statistics, subprocess, sys, threading, time

bin, exporter, scrapes, runs, push_seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tick = os.sysconf("SC_CLK_TCK")
block = "127.87.1"

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick

def rss_bytes(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0

def free_port(addr):
    s = socket.socket(); s.bind((addr, 0)); p = s.getsockname()[1]; s.close(); return p

def start(cmd):
    return subprocess.Popen(["taskset", "-c", "1"] + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def connect(addr, port):
    for _ in range(100):
        try:
            c = http.client.HTTPConnection(addr, port, timeout=10)
            c.request("GET", "/metrics"); r = c.getresponse(); r.read()
            if r.status == 200:
                return c
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"bench: nothing answers on {addr}:{port}")

def measure(cmd, addr, port):
    p = start(cmd)
    try:
        c = connect(addr, port)
        body = b""
        for _ in range(99):
            c.request("GET", "/metrics"); body = c.getresponse().read()
        rss = rss_bytes(p.pid)
        series = sum(1 for l in body.decode().splitlines() if l and not l.startswith("#"))
        before = cpu_seconds(p.pid)
        for _ in range(scrapes):
            c.request("GET", "/metrics"); c.getresponse().read()
        cpu = (cpu_seconds(p.pid) - before) / scrapes
        return rss, cpu, series
    finally:
        p.terminate(); p.wait()

class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204); self.end_headers()
    def log_message(self, *a):
        pass

def push_share():
    sink = http.server.ThreadingHTTPServer((f"{block}.3", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    url = f"http://{block}.3:{sink.server_address[1]}/api/v1/write"
    port = free_port(f"{block}.2")
    p = start([bin, "agent", "--listen", f"{block}.2:{port}", "--remote-write", url,
               "--instance", "bench", "--interval", "1s"])
    try:
        time.sleep(2)
        t0, c0 = time.monotonic(), cpu_seconds(p.pid)
        time.sleep(push_seconds)
        return (cpu_seconds(p.pid) - c0) / (time.monotonic() - t0)
    finally:
        p.terminate(); p.wait(); sink.shutdown()

res = {"rampart": [], "node_exporter": []}
shares = []
for _ in range(runs):
    port = free_port(f"{block}.1")
    res["node_exporter"].append(measure([exporter, f"--web.listen-address={block}.1:{port}"], f"{block}.1", port))
    port = free_port(f"{block}.2")
    res["rampart"].append(measure([bin, "agent", "--listen", f"{block}.2:{port}"], f"{block}.2", port))
    shares.append(push_share())

med = lambda xs: statistics.median(xs)
row = {}
for name, rs in res.items():
    rss, cpu, series = med([r[0] for r in rs]), med([r[1] for r in rs]), med([r[2] for r in rs])
    row[name] = (rss, cpu, series, cpu / series)
share = med(shares)
r, n = row["rampart"], row["node_exporter"]
print(f"scrapes per run: {scrapes}, runs: {runs}, push: {push_seconds} s at 1 s; medians")
print(f"{'':16}{'RSS after 100 (MB)':>20}{'CPU/scrape (ms)':>17}{'series':>8}{'CPU/series (us)':>17}")
for name, (rss, cpu, series, per) in row.items():
    print(f"{name:16}{rss/1e6:>20.1f}{cpu*1e3:>17.3f}{series:>8.0f}{per*1e6:>17.2f}")
print(f"agent CPU share at a 1 s push interval: {share*100:.2f} % of a core")
print()
print("| goal | measured | met |")
print("|---|---|---|")
print(f"| RSS <= 1/2 of node_exporter | {r[0]/n[0]:.2f}x | {'yes' if r[0] <= n[0]/2 else 'no'} |")
print(f"| CPU per series <= 1/4 of node_exporter | {r[3]/n[3]:.2f}x | {'yes' if r[3] <= n[3]/4 else 'no'} |")
print(f"| < 1 % of a core at a 1 s push | {share*100:.2f} % | {'yes' if share < 0.01 else 'no'} |")
PY
