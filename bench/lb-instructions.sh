#!/usr/bin/env bash
# User-space instructions per request of the load balancers, counted by valgrind's callgrind:
# `rampart lb`, HAProxy (nbthread 1) and nginx (one process) in front of the same two
# static backends, each run under callgrind in turn. Instruction counts do not depend on
# what else the machine is doing, so this measure stays comparable on a busy machine,
# where CPU time per request (bench/lb-standalone.sh) moves by ±20 % between runs. It
# leaves out the kernel: per request all three make the same few system calls (read and
# write on each side; `strace -c` shows Rampart with 4, HAProxy with 6), so the user-space
# count is where they differ.
#
# Method, per load balancer and mode: start it under callgrind, drive it with a
# keep-alive load (wrk -c10 for HTTP/1.1, h2load -c10 -m10 for HTTP/2) so that every
# connection and TLS handshake is made before the window; zero the counters
# (callgrind_control -z), wait WINDOW seconds, dump them (callgrind_control -d). The
# requests in the window are counted in the backends' access log (the load's path only;
# health checks use another path). Instructions per request = the dump's total / those
# requests (±1 % from requests in flight at the window's edges).
#
# Modes: keepalive (HTTPS, HTTP/1.1), plain (HTTP), h2 (HTTPS, HTTP/2). Access logs off
# in the load balancers; site certificate ECDSA P-256; TLS 1.3.
#
# Usage: bench/lb-instructions.sh [window seconds, default 20]
# Env: BENCH_MODES (subset of "keepalive plain h2"), BENCH_LBS (subset of "rampart haproxy
# nginx"; ratios are printed when all three ran), BENCH_KEEP (a directory: each run's
# callgrind profile is kept there as callgrind.LB.MODE, for callgrind_annotate --inclusive=yes),
# RAMPART_BIN (a rampart binary instead of building this checkout).
# Addresses: 127.88.6.0/24 (load balancers .10-.12, backends .21/.22).
# Needs: valgrind, haproxy, nginx (nginx-light), wrk, h2load (nghttp2-client), openssl,
# curl (apt-installed when missing, as root) and a release build (made here).
set -euo pipefail
cd "$(dirname "$0")/.."
window=${1:-20}
modes=${BENCH_MODES:-keepalive plain h2}
lbs=${BENCH_LBS:-rampart haproxy nginx}
keep=${BENCH_KEEP:-}
ip=127.88.6
for m in $modes; do
  case $m in keepalive|plain|h2) ;;
    *) echo "bench: unknown mode '$m' (keepalive plain h2)" >&2; exit 64;;
  esac
done
for l in $lbs; do
  case $l in rampart|haproxy|nginx) ;;
    *) echo "bench: unknown load balancer '$l' (rampart haproxy nginx)" >&2; exit 64;;
  esac
done
[ -z "$keep" ] || mkdir -p "$keep" || { echo "bench: cannot create BENCH_KEEP $keep" >&2; exit 64; }
[ "$window" -ge 5 ] && [ "$window" -le 600 ] || { echo "bench: window must be 5..600 s" >&2; exit 64; }
. bench/lib.sh
require valgrind:valgrind callgrind_control:valgrind haproxy:haproxy nginx:nginx-light wrk:wrk h2load:nghttp2-client openssl:openssl curl:curl
if [ -n "${RAMPART_BIN:-}" ]; then
  rampart=$(realpath "$RAMPART_BIN")
else
  cargo build --release -q -p rampart
  rampart=$PWD/target/release/rampart
fi
work=$(mktemp -d /tmp/lb-instr.XXXXXX)
lb_pid=""
cleanup() {
  trap - EXIT INT TERM
  [ -z "$lb_pid" ] || { kill "$lb_pid" 2>/dev/null; sleep 1; kill -9 "$lb_pid" 2>/dev/null || true; }
  [ -f "$work/backends.pid" ] && kill "$(cat "$work/backends.pid")" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "bench: interrupted" >&2; exit 130' INT TERM

bench_ca "$work"
bench_leaf "$work" site bench.test DNS:bench.test
cat "$work/site.pem" "$work/site.key" > "$work/haproxy.pem"
mkdir -p "$work/www" && chmod 755 "$work" "$work/www"
head -c 612 /dev/zero | tr '\0' 'x' > "$work/www/index.html"
echo ok > "$work/www/check.html"
chmod 644 "$work/www/"*.html

# The backends: one nginx worker, two plain servers, each request logged (path only).
cat > "$work/backends.conf" <<CFG
worker_processes 1;
pid $work/backends.pid;
error_log $work/backends.err;
events { worker_connections 4096; }
http {
  log_format path '\$uri';
  access_log $work/backends.log path;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server { listen $ip.21:8081; root $work/www; }
  server { listen $ip.22:8082; root $work/www; }
}
CFG
nginx -c "$work/backends.conf" -p "$work"

cat > "$work/haproxy.cfg" <<CFG
global
    nbthread 1
    maxconn 1000
defaults
    mode http
    timeout connect 3s
    timeout client 120s
    timeout http-keep-alive 120s
    timeout server 30s
    option http-keep-alive
frontend site
    bind $ip.11:8443 ssl crt $work/haproxy.pem alpn h2,http/1.1
    default_backend web
frontend plain
    bind $ip.11:8080
    default_backend web
backend web
    balance roundrobin
    http-reuse always
    option httpchk GET /check.html
    server b1 $ip.21:8081 check inter 1s
    server b2 $ip.22:8082 check inter 1s
CFG
# nginx as one process (master_process off): the same work its worker does.
cat > "$work/nginx.conf" <<CFG
daemon off;
master_process off;
worker_processes 1;
error_log $work/nginx.err;
pid $work/nginx.pid;
events { worker_connections 1000; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  ssl_certificate $work/site.pem; ssl_certificate_key $work/site.key;
  ssl_protocols TLSv1.2 TLSv1.3;
  upstream web { server $ip.21:8081; server $ip.22:8082; keepalive 64; }
  server { listen $ip.12:8443 ssl http2; location / { proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection ""; } }
  server { listen $ip.12:8080; location / { proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
CFG

# start LB: under callgrind (zeroed before the window); sets lb_pid and lb_addr.
lb_addr=""
start() {
  local out=$work/cg.$1
  local vg=(valgrind -q --tool=callgrind "--callgrind-out-file=$out")
  case $1 in
    rampart)
      rm -rf "$work/state"; mkdir -p "$work/state"
      "${vg[@]}" "$rampart" lb --state-dir "$work/state" --listen "$ip.10:8443" \
        --tls-cert "$work/site.pem" --tls-key "$work/site.key" --health-path /check.html \
        --threads 1 --http-listen "$ip.10:8080" --http-proxy \
        --backend "$ip.21:8081" --backend "$ip.22:8082" 2>"$work/rampart.err" &;;
    haproxy) "${vg[@]}" haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.err" 2>&1 &;;
    nginx) "${vg[@]}" nginx -c "$work/nginx.conf" -p "$work" 2>"$work/nginx.out" &;;
  esac
  lb_pid=$!
  local addr i
  case $1 in rampart) addr=$ip.10;; haproxy) addr=$ip.11;; nginx) addr=$ip.12;; esac
  for i in $(seq 300); do
    curl -s -o /dev/null -f --max-time 5 --cacert "$work/ca.pem" \
      --resolve "bench.test:8443:$addr" https://bench.test:8443/index.html && { lb_addr=$addr; return 0; }
    sleep 0.2
  done
  echo "bench: $1 does not answer under valgrind" >&2; cat "$work"/*.err >&2; exit 1
}
stop_lb() { kill "$lb_pid" 2>/dev/null || true; wait "$lb_pid" 2>/dev/null || true; lb_pid=""; }
served() { grep -c '^/index.html$' "$work/backends.log" || true; }

# measure LB MODE -> "instructions requests" in $work/line
measure() {
  local lb=$1 mode=$2 addr load before after total
  start "$lb"
  addr=$lb_addr
  local url="https://$addr:8443/index.html"
  [ "$mode" = plain ] && url="http://$addr:8080/index.html"
  local secs=$((window + 30))
  case $mode in
    h2) h2load -t1 -c10 -m10 -D"$secs" -H ":authority: bench.test" "$url" >"$work/load.out" 2>&1 & load=$!;;
    *) wrk -t1 -c10 -d"${secs}s" -H "Host: bench.test" "$url" >"$work/load.out" 2>&1 & load=$!;;
  esac
  sleep 10   # every connection (and TLS handshake) made, pools warm
  rm -f "$work/cg.$lb".*
  callgrind_control -z "$lb_pid" >/dev/null 2>&1
  before=$(served)
  sleep "$window"
  callgrind_control -d "$lb_pid" >/dev/null 2>&1
  after=$(served)
  kill "$load" 2>/dev/null || true; wait "$load" 2>/dev/null || true
  stop_lb
  local profile
  profile=$(ls "$work/cg.$lb".* | sort | head -1)
  [ -z "$keep" ] || cp "$profile" "$keep/callgrind.$lb.$mode"
  total=$(callgrind_annotate "$profile" 2>/dev/null \
    | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
  echo "$total $((after - before))" > "$work/line"
}

echo "rampart $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3), $(valgrind --version)"
echo "user-space instructions per request (callgrind), ${window} s window, access logs off"
printf '%-10s %-8s %14s %9s %12s\n' mode lb instructions requests "instr/req"
declare -A per=()
for mode in $modes; do
  for lb in $lbs; do
    measure "$lb" "$mode"
    read -r total reqs < "$work/line"
    [ "${reqs:-0}" -gt 0 ] || { echo "bench: no request reached the backends ($lb, $mode)" >&2; exit 1; }
    per[$mode.$lb]=$((total / reqs))
    printf '%-10s %-8s %14s %9s %12s\n' "$mode" "$lb" "$total" "$reqs" "${per[$mode.$lb]}"
  done
done
for l in rampart haproxy nginx; do case " $lbs " in *" $l "*) ;; *) exit 0;; esac; done
echo
for mode in $modes; do
  awk -v m="$mode" -v r="${per[$mode.rampart]}" -v h="${per[$mode.haproxy]}" -v n="${per[$mode.nginx]}" \
    'BEGIN { printf "%-10s rampart/haproxy %.2f   rampart/nginx %.2f\n", m, r / h, r / n }'
done
