#!/usr/bin/env bash
# The load balancer alone against its peers: `rampart lb` (one worker thread), HAProxy
# (nbthread 1) and nginx (one worker) in front of the SAME two static backends (nginx serving
# a small file, so the backends are never the bottleneck), with the same ECDSA P-256
# certificate, each pinned to CPU 1 while wrk runs on CPU 0. Access logs are OFF for all
# three. The figure of merit is each load balancer's own CPU time per request: utime+stime
# of its processes (/proc/PID/stat, clock ticks) over the run, divided by the requests wrk
# completed. Also prints requests/s and wrk's p50/p99 latency.
#
# Measures, alternating the three load balancers in every round:
#   keepalive  HTTPS, HTTP/1.1 keep-alive, 50 connections
#   newconn    a new TLS connection per request (Connection: close), 50 connections
# and prints the median of the rounds and the ratios Rampart / HAProxy and Rampart / nginx
# (CPU per request below 1 = Rampart spends less).
#
# Usage: bench/lb-standalone.sh [seconds per run, default 8] [rounds, default 3]
# BENCH_MODES="keepalive" runs a subset of the modes (default: all).
# Needs: haproxy, nginx (nginx-light), wrk, openssl, taskset (apt-installed when missing,
# as root) and a release build (made here).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}; rounds=${2:-3}
modes=${BENCH_MODES:-keepalive newconn}
ip=127.88.2
need() { command -v "$1" >/dev/null 2>&1; }
# Installed packages' own services are never started (policy-rc.d), as in install-deps.sh.
install() {
  [ "$(id -u)" -eq 0 ] || return 0
  local made=0
  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$1" </dev/null >/dev/null || true
  [ "$made" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}
for p in haproxy:haproxy nginx:nginx-light wrk:wrk openssl:openssl; do
  bin=${p%%:*}; pkg=${p#*:}
  need "$bin" || install "$pkg"
  need "$bin" || { echo "bench: $bin is needed (apt-get install $pkg)" >&2; exit 1; }
done
cargo build --release -q -p rampart
rampart=$PWD/target/release/rampart
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/backends.pid" ] && kill "$(cat "$work/backends.pid")" 2>/dev/null || true
  [ -f "$work/nginx-lb.pid" ] && kill "$(cat "$work/nginx-lb.pid")" 2>/dev/null || true
  sleep 0.5; rm -rf "$work"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -keyout "$work/key.pem" -out "$work/cert.pem" -subj /CN=bench.test \
  -addext "subjectAltName=DNS:bench.test" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" > "$work/haproxy.pem"
# The page the backends serve (nginx's default page size), readable by nginx's workers.
mkdir -p "$work/www" && chmod 755 "$work" "$work/www"
head -c 612 /dev/zero | tr '\0' 'x' > "$work/www/index.html" && chmod 644 "$work/www/index.html"

# The backends: one nginx, one worker, two servers, on CPU 0 with wrk.
cat > "$work/backends.conf" <<CFG
worker_processes 1;
pid $work/backends.pid;
error_log $work/backends.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen $ip.21:8081; root $work/www; }
  server { listen $ip.22:8082; root $work/www; }
}
CFG
taskset -c 0 nginx -c "$work/backends.conf" -p "$work"

# Rampart: one worker thread (it would pick one anyway, pinned to one CPU).
taskset -c 1 "$rampart" lb --listen $ip.10:8443 --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" \
  --backend $ip.21:8081 --backend $ip.22:8082 --health-path /index.html --threads 1 \
  2>"$work/rampart.err" &
pids+=($!); rampart_pid=$!

cat > "$work/haproxy.cfg" <<CFG
global
    nbthread 1
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    timeout connect 3s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend site
    bind $ip.11:8443 ssl crt $work/haproxy.pem alpn h2,http/1.1
    default_backend web
backend web
    balance roundrobin
    http-reuse always
    option httpchk GET /index.html
    server b1 $ip.21:8081 check inter 1s
    server b2 $ip.22:8082 check inter 1s
CFG
taskset -c 1 haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.err" 2>&1 &
pids+=($!); haproxy_pid=$!

cat > "$work/nginx-lb.conf" <<CFG
worker_processes 1;
pid $work/nginx-lb.pid;
error_log $work/nginx-lb.err;
events { worker_connections 8000; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream web { server $ip.21:8081; server $ip.22:8082; keepalive 64; }
  server {
    listen $ip.12:8443 ssl http2;
    ssl_certificate $work/cert.pem; ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / { proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CFG
taskset -c 1 nginx -c "$work/nginx-lb.conf" -p "$work"

sleep 3
for a in $ip.10 $ip.11 $ip.12; do
  curl -sf -o /dev/null --resolve bench.test:8443:$a --cacert "$work/cert.pem" https://bench.test:8443/index.html \
    || { echo "bench: the load balancer on $a does not answer" >&2; cat "$work/rampart.err" "$work/backends.err" "$work/haproxy.err" >&2; exit 1; }
done
# nginx's master and its worker (the worker's command line does not name the file).
nginx_lb_pids() { local m; m=$(cat "$work/nginx-lb.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')"; }

# utime+stime of the given pids, in clock ticks (fields 14 and 15 of /proc/PID/stat).
ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
hz=$(getconf CLK_TCK)

# run NAME ADDR MODE -> "requests rps p50_ms p99_ms cpu_us_per_req"
run() {
  local addr=$1 mode=$2; shift 2
  local extra=()
  [ "$mode" = newconn ] && extra=(-H "Connection: close")
  local before after out
  before=$(ticks "$@")
  out=$(taskset -c 0 wrk -t1 -c50 -d"${secs}s" --latency "${extra[@]}" \
        -H "Host: bench.test" "https://$addr:8443/index.html" 2>&1)
  after=$(ticks "$@")
  python3 - "$before" "$after" "$hz" <<PY "$out"
import re, sys
before, after, hz = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out = sys.argv[4]
req = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
def ms(p):
    m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)" % p, out, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
cpu_us = (after - before) / hz * 1e6 / max(req, 1)
print(req, rps, ms(50), ms(99), cpu_us)
PY
}

declare -A res
for mode in $modes; do
  for r in $(seq "$rounds"); do
    res[$mode,rampart,$r]=$(run $ip.10 $mode $rampart_pid)
    res[$mode,haproxy,$r]=$(run $ip.11 $mode $haproxy_pid)
    # shellcheck disable=SC2046
    res[$mode,nginx,$r]=$(run $ip.12 $mode $(nginx_lb_pids))
  done
done

python3 - "$rounds" <<PY
import statistics, sys
rounds = int(sys.argv[1])
raw = """$(for k in "${!res[@]}"; do echo "$k ${res[$k]}"; done)"""
data = {}
for line in raw.strip().splitlines():
    key, *vals = line.split()
    mode, lb, r = key.split(",")
    data.setdefault((mode, lb), []).append([float(v) for v in vals])
print(f"{'mode':10} {'lb':8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11}")
med = {}
for (mode, lb), runs in sorted(data.items()):
    m = [statistics.median(col) for col in zip(*runs)]
    med[(mode, lb)] = m
    print(f"{mode:10} {lb:8} {m[1]:9.0f} {m[2]:8.2f} {m[3]:8.2f} {m[4]:11.1f}")
print()
for mode in sorted({m for m, _ in med}):
    r = med[(mode, "rampart")]
    for peer in ("haproxy", "nginx"):
        p = med[(mode, peer)]
        print(f"{mode:10} rampart/{peer:8} req/s {r[1]/p[1]:.2f}  p99 {r[3]/p[3]:.2f}  CPU/req {r[4]/p[4]:.2f}")
print(f"(median of {rounds} rounds; load balancers pinned to CPU 1, wrk and the backends to CPU 0; access logs off)")
PY
