#!/usr/bin/env bash
# Load balancer benchmark: Rampart's lb-01 against HAProxy, side by side on one machine,
# in front of the SAME two Rampart web servers (mutual TLS to them, from lb-01's address so
# both pass the web servers' firewall, presenting lb-01's certificate).
#
# Both load balancers terminate TLS with the site certificate and the same order of TLS
# suites (lb-01's: AES-128-GCM first; HAProxy is set to it, each run prints what was
# negotiated), forward HTTP/1.1 over pooled
# mutual-TLS connections and write an access log line per request in the same format
# (lb-01's `combined`: NCSA combined plus backend and timings; HAProxy's `log-format` to
# stdout, redirected to a file). The lab is started on CPU 0 (every node then runs one
# thread), lb-01 is then moved to CPU 1, where HAProxy (`nbthread 1`) also runs; wrk and the
# web servers stay on CPU 0. Runs alternate between the two load balancers and medians are
# compared, once with keep-alive and once with a new TLS connection per request. The figure
# of merit is each load balancer's own CPU time per request: utime+stime of the process
# (every thread, the access-log writer's included) over the run ÷ requests served. Prints
# requests/s, latency percentiles, CPU µs per request and the ratio Rampart / HAProxy (below
# 1 = Rampart spends less CPU or answers faster).
#
# Usage: bench/lb-vs-haproxy.sh [seconds per run, default 10] [runs, default 3] [connections, default 16]
# Needs: haproxy, wrk (apt-installed when missing, as root), taskset, a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; runs=${2:-3}; conns=${3:-16}
block=127.88.0
. bench/lib.sh
require haproxy:haproxy wrk:wrk taskset:util-linux curl:curl python3:python3
cargo build --release -q -p rampart
bin=$PWD/target/release/rampart
work=$(mktemp -d)
state=$work/state
haproxy_pid=""
cleanup() {
  [ -z "$haproxy_pid" ] || kill "$haproxy_pid" 2>/dev/null || true
  "$bin" --state-dir "$state" down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

sed "s/127\.80\.0\./$block./" crates/topology/src/default.toml > "$work/rampart.toml"
# Started on CPU 0, every node's runtime has one worker thread (its affinity mask's size).
taskset -c 0 "$bin" --state-dir "$state" up --mode loopback -d -f "$work/rampart.toml" >/dev/null
pki=$state/pki
https_port=$("$bin" --state-dir "$state" status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print([h for h in s["hosts"] if h["name"]=="lb-01"][0]["ports"]["https"])')
lb_pid=$("$bin" --state-dir "$state" status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print([h for h in s["hosts"] if h["name"]=="lb-01"][0]["pid"])')

cat "$pki/site.pem" "$pki/site.key" > "$work/site.pem"
cat "$pki/hosts/lb-01.pem" "$pki/hosts/lb-01.key" > "$work/lb-01.pem"
cat > "$work/haproxy.cfg" <<CFG
global
    nbthread 1
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.2
    # lb-01's order of TLS suites (AES-128-GCM first, the server's choice), so both
    # negotiate the same suite with wrk; OpenSSL's own order starts with AES-256-GCM.
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384
    ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384
    log stdout format raw local0
defaults
    mode http
    log global
    timeout connect 3s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
# The frontend is named like lb-01's listener, which its log lines name.
frontend https
    bind $block.30:8443 ssl crt $work/site.pem alpn h2,http/1.1
$(haproxy_combined_log)
    http-response set-header Strict-Transport-Security "max-age=31536000"
    default_backend web
backend web
    balance roundrobin
    option httpchk GET /healthz
    http-reuse always
    default-server ssl verify required ca-file $pki/ca.pem crt $work/lb-01.pem source $block.10 check inter 1s rise 2 fall 3
    server web-01 $block.11:9443 sni str(web-01) verifyhost web-01
    server web-02 $block.12:9443 sni str(web-02) verifyhost web-02
CFG
haproxy -c -q -f "$work/haproxy.cfg"
taskset -c 1 haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
taskset -a -p -c 1 "$lb_pid" >/dev/null

# Both must answer, verified against the lab's CA, before measuring.
ready() { # port address
  for _ in $(seq 50); do
    curl -sf --cacert "$pki/ca.pem" --resolve "www.foobar.com:$1:$2" -o /dev/null "https://www.foobar.com:$1/" && return 0
    sleep 0.2
  done
  echo "bench: nothing answers on $2:$1" >&2; return 1
}
ready "$https_port" "$block.10"
ready 8443 "$block.30"
for a in "$block.10:$https_port" "$block.30:8443"; do
  printf '%s: ' "$a"
  openssl s_client -connect "$a" -servername www.foobar.com -CAfile "$pki/ca.pem" -brief </dev/null 2>&1 \
    | sed -n 's/^Ciphersuite: *//p'
done

# utime+stime of a process (all its threads), in clock ticks (fields 14 and 15 of /proc/PID/stat).
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

measure() { # mode name pid url -> one line "mode name rps p50_ms p99_ms cpu_us_per_req non2xx"
  local mode=$1 name=$2 pid=$3 url=$4 extra=() before after
  # handshake: every request on a new connection, so each pays a full TLS handshake.
  [ "$mode" = handshake ] && extra=(-H "Connection: close")
  before=$(ticks "$pid")
  taskset -c 0 wrk -t1 -c"$conns" -d"${secs}s" --latency -H "Host: www.foobar.com" "${extra[@]}" "$url" > "$work/wrk.out"
  after=$(ticks "$pid")
  python3 - "$mode" "$name" "$work/wrk.out" "$before" "$after" "$hz" <<'PY'
import re, sys
mode, name, text = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
before, after, hz = (int(x) for x in sys.argv[4:7])
def ms(v):
    n, unit = float(re.match(r"[\d.]+", v).group()), re.sub(r"[\d.]", "", v)
    return n * {"us": 0.001, "ms": 1, "s": 1000}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
requests = int(re.search(r"(\d+) requests in", text).group(1))
# Only the "Latency Distribution" lines: "50%" also ends the Thread Stats' "+/- Stdev" column.
def pct(p):
    return ms(re.search(r"^\s+%s%%\s+(\S+)" % p, text, re.M).group(1))
p50, p99 = pct(50), pct(99)
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
cpu_us = (after - before) / hz * 1e6 / max(requests, 1)
print(mode, name, rps, p50, p99, cpu_us, errs.group(1) if errs else 0)
PY
}
# Runs alternate between the two load balancers so drift on the machine hits both alike.
for _ in $(seq "$runs"); do
  for mode in keepalive handshake; do
    measure "$mode" rampart "$lb_pid" "https://$block.10:$https_port/"
    measure "$mode" haproxy "$haproxy_pid" "https://$block.30:8443/"
  done
done > "$work/results"
lines() { wc -l < "$1"; }
echo "access log lines: lb-01 $(cat "$state"/hosts/lb-01/access.log* 2>/dev/null | wc -l), HAProxy $(lines "$work/haproxy.log")"
echo "one of each:"
tail -n1 "$state/hosts/lb-01/access.log" 2>/dev/null || echo "(lb-01: no access log at $state/hosts/lb-01/access.log)"
grep -m1 ' "GET ' "$work/haproxy.log" || echo "(HAProxy: no log line)"

python3 - "$work/results" "$secs" "$runs" "$conns" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
secs, runs, conns = sys.argv[2:5]
print(f"\nGET / (1.7 kB page) through the load balancer, TLS 1.3, {conns} connections, wrk on CPU 0,")
print(f"load balancer on CPU 1 (one thread each), access logs on, median of {runs} runs x {secs} s")
titles = {"keepalive": "keep-alive (many requests per TLS connection)", "handshake": "Connection: close (a new TLS connection per request)"}
for mode in ("keepalive", "handshake"):
    med = {}
    for name in ("rampart", "haproxy"):
        r = [list(map(float, x[2:])) for x in rows if x[0] == mode and x[1] == name]
        med[name] = [statistics.median(c) for c in zip(*r)]
    print(f"\n{titles[mode]}")
    print(f"{'':10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU µs/req':>12}{'non-2xx':>9}")
    for name in ("rampart", "haproxy"):
        rps, p50, p99, cpu, errs = med[name]
        print(f"{name:10}{rps:10.0f}{p50:9.2f}{p99:9.2f}{cpu:12.1f}{errs:9.0f}")
    r, h = med["rampart"], med["haproxy"]
    print(f"{'ratio':10}{r[0]/h[0]:10.2f}{r[1]/h[1]:9.2f}{r[2]/h[2]:9.2f}{r[3]/h[3]:12.2f}   (rampart / haproxy)")
PY
