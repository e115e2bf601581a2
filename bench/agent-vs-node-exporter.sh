#!/usr/bin/env bash
# Monitoring agent benchmark: the cost of one scrape of Rampart's agent `/metrics` against
# Prometheus' node_exporter, side by side on one machine, both over mutual TLS (node_exporter
# with its web config: our CA, client certificate required) and scraped with the same admin
# certificate over one keep-alive connection.
#
# What is compared is the server's own CPU time per scrape, read from /proc/<pid>/stat
# before and after N scrapes (minus what the process burns idle over the same time), so the
# speed of the scraping client does not enter; plus client-side latency and the size of the
# exposition. The two expose different amounts (node_exporter's default collectors export
# far more series), so CPU per series is printed too. The process under test is pinned to
# CPU 1, the client to CPU 0; medians of the runs.
#
# Usage: bench/agent-vs-node-exporter.sh [scrapes per run, default 1000] [runs, default 3]
# Needs: prometheus-node-exporter (apt-installed when missing, as root), python3, taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
scrapes=${1:-1000}; runs=${2:-3}
block=127.87.0
exporter=$(command -v prometheus-node-exporter || command -v node_exporter || true)
if [ -z "$exporter" ] && [ "$(id -u)" -eq 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus-node-exporter </dev/null >/dev/null
  exporter=$(command -v prometheus-node-exporter)
fi
[ -n "$exporter" ] || { echo "bench: node_exporter is needed (apt-get install prometheus-node-exporter)" >&2; exit 1; }
cargo build --release -q -p rampart
bin=$PWD/target/release/rampart
work=$(mktemp -d)
state=$work/state
cleanup() {
  [ -n "${ne_pid:-}" ] && kill "$ne_pid" 2>/dev/null || true
  "$bin" --state-dir "$state" down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

sed "s/127\.80\.0\./$block./" crates/topology/src/default.toml > "$work/rampart.toml"
"$bin" --state-dir "$state" up --mode loopback -d -f "$work/rampart.toml" >/dev/null 2>&1
pki=$state/pki
lb_pid=$("$bin" --state-dir "$state" status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print([h for h in s["hosts"] if h["name"]=="lb-01"][0]["pid"])')

# node_exporter on lb-01's address with lb-01's certificate, requiring a client certificate
# from the lab's CA (its TLS server config, exporter-toolkit web configuration).
cat > "$work/web.yml" <<CFG
tls_server_config:
  cert_file: $pki/hosts/lb-01.pem
  key_file: $pki/hosts/lb-01.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: $pki/ca.pem
CFG
taskset -c 1 "$exporter" --web.listen-address="$block.10:9200" --web.config.file="$work/web.yml" \
  >"$work/node_exporter.log" 2>&1 &
ne_pid=$!
taskset -a -p -c 1 "$lb_pid" >/dev/null

taskset -c 0 python3 - "$pki" "$scrapes" "$runs" "$block.10" "$lb_pid" "$ne_pid" <<'PY'
import http.client, os, ssl, statistics, sys, time

pki, scrapes, runs, addr, lb_pid, ne_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
tick = os.sysconf("SC_CLK_TCK")
ctx = ssl.create_default_context(cafile=f"{pki}/ca.pem")
ctx.load_cert_chain(f"{pki}/admin.pem", f"{pki}/admin.key")

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

def connect(port):
    for _ in range(100):
        try:
            c = http.client.HTTPSConnection(addr, port, context=ctx, timeout=10)
            c.request("GET", "/metrics"); r = c.getresponse(); r.read()
            if r.status == 200:
                return c
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"bench: nothing answers on {addr}:{port}")

def run(name, port, pid):
    c = connect(port)
    for _ in range(50):  # warm-up
        c.request("GET", "/metrics"); c.getresponse().read()
    idle_start, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(3)
    idle_rate = (cpu_seconds(pid) - idle_start) / (time.monotonic() - t0)
    lat, size = [], 0
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    for _ in range(scrapes):
        s = time.monotonic()
        c.request("GET", "/metrics"); body = c.getresponse().read()
        lat.append(time.monotonic() - s)
        size = len(body)
    wall = time.monotonic() - t0
    busy = max(cpu_seconds(pid) - cpu0 - idle_rate * wall, 0.0)
    series = sum(1 for l in body.decode().splitlines() if l and not l.startswith("#"))
    lat.sort()
    return {"cpu_ms": busy / scrapes * 1e3, "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1e3, "bytes": size, "series": series}

results = {"rampart": [], "node_exporter": []}
for _ in range(runs):  # alternate so drift on the machine hits both alike
    results["rampart"].append(run("rampart", 9100, lb_pid))
    results["node_exporter"].append(run("node_exporter", 9200, ne_pid))
med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
print(f"GET /metrics over one mutual-TLS keep-alive connection, {scrapes} scrapes, median of {runs} runs;")
print("server CPU per scrape from /proc (idle CPU subtracted), server on CPU 1, client on CPU 0")
print(f"{'':14}{'CPU ms/scrape':>14}{'CPU us/series':>14}{'p50 ms':>8}{'p99 ms':>8}{'series':>8}{'bytes':>9}")
for n in ("rampart", "node_exporter"):
    m = med[n]
    print(f"{n:14}{m['cpu_ms']:14.3f}{m['cpu_ms'] * 1e3 / m['series']:14.2f}{m['p50_ms']:8.2f}{m['p99_ms']:8.2f}{m['series']:8.0f}{m['bytes']:9.0f}")
r, e = med["rampart"], med["node_exporter"]
print(f"{'ratio':14}{r['cpu_ms'] / e['cpu_ms']:14.2f}{(r['cpu_ms'] / r['series']) / (e['cpu_ms'] / e['series']):14.2f}"
      f"{r['p50_ms'] / e['p50_ms']:8.2f}{r['p99_ms'] / e['p99_ms']:8.2f}   (rampart / node_exporter; below 1 = cheaper)")
PY
