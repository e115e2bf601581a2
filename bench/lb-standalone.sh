#!/usr/bin/env bash
# The load balancer alone against its peers: `rampart lb` (one worker thread), HAProxy
# (nbthread 1) and nginx (one worker) in front of the SAME two static backends (one nginx
# worker serving a 612-byte file on two addresses, plain HTTP and TLS, so the backends are
# never the bottleneck), with the same ECDSA P-256 site certificate, each load balancer
# pinned to CPU 1 while the load generator and the backends run on CPU 0. Access logs are
# OFF for all three, or with BENCH_LOG=on ON for all three in the same line format
# (Rampart's `combined`: NCSA combined plus backend and timings) to a file: Rampart's
# batched writer thread, nginx `access_log … buffer=64k flush=1s`, HAProxy `log stdout`
# (one write per line; HAProxy has no buffered file log) redirected to a file. The figure of merit is each load balancer's own CPU time per request:
# utime+stime of its processes (/proc/PID/stat, clock ticks) over the run, divided by the
# requests completed. Also prints requests/s and p50/p99 latency.
#
# Modes (all by default; BENCH_MODES="h2 idle-rss" runs any subset), each load balancer in
# turn in every round, the same round count for every mode:
#   keepalive  HTTPS, HTTP/1.1 keep-alive, wrk -c50, p50/p99 from wrk --latency
#   newconn    a new TLS connection per request (Connection: close), wrk -c50
#   h2         HTTP/2 over TLS, h2load -c10 -m10 (10 connections x 10 streams), p50/p99
#              from h2load's per-request log
#   plain      plain HTTP to the load balancer, plain HTTP to the backends (wrk -c50;
#              Rampart's --http-listen with --http-proxy)
#   reencrypt  HTTPS keep-alive in front, TLS to the backends verified against the bench
#              CA (rampart --backend-ca, HAProxy `ssl verify required ca-file`, nginx
#              `proxy_ssl_verify on`), pooled keep-alive upstream connections
#   idle-rss   VmRSS (summed over the load balancer's processes) of a FRESH instance before
#              and after IDLE_CONNS (default 10 000) TLS connections that each finished the
#              handshake and HTTP/1.1 requests and then sit idle (keep-alive, nothing in
#              flight), held by several client processes (<= 2 500 each, from 500 per
#              source address). While the set is built each connection repeats a GET every
#              5 s (Rampart closes a keep-alive connection after 10 s idle); the repeats
#              stop 1.5 s before the measurement. KiB per connection = RSS growth / held.
# and prints the median of the rounds and the ratios Rampart / HAProxy and Rampart / nginx
# (CPU per request below 1 = Rampart spends less), next to the goals.
#
# Usage: bench/lb-standalone.sh [seconds per run, default 8] [rounds, default 3]
# TLS suites: with BENCH_SUITES=own (the default) each load balancer keeps its own order of
# preference: Rampart picks AES-128-GCM (TLS 1.3: TLS_AES_128_GCM_SHA256) whatever the
# client lists first; HAProxy and nginx (OpenSSL 3.0) pick TLS_AES_256_GCM_SHA384 for wrk and
# h2load. With BENCH_SUITES=same HAProxy and nginx are set to Rampart's order too (server
# preference, and the same offer to the TLS backends), so all three negotiate the same suite.
# The negotiated suite of each is printed before the runs.
# Env: BENCH_MODES (subset of the modes above), BENCH_LOG (off, the default, or on),
# BENCH_SUITES (own, the default, or same),
# IDLE_CONNS (default 10000), RAMPART_BIN
# (a rampart binary to measure instead of building this checkout, e.g. to compare two).
# Addresses: 127.88.2.0/24 (LBs .10-.12, backends .21/.22, idle clients from .100 up).
# Needs: haproxy, nginx (nginx-light), wrk, h2load (nghttp2-client), openssl, python3,
# curl, ss (iproute2), taskset (apt-installed when missing, as root) and a release build
# (made here).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}; rounds=${2:-3}
modes=${BENCH_MODES:-keepalive newconn h2 plain reencrypt idle-rss}
idle_n=${IDLE_CONNS:-10000}
log_on=${BENCH_LOG:-off}
suites=${BENCH_SUITES:-own}
ip=127.88.2
case $log_on in on|off) ;; *) echo "bench: BENCH_LOG must be on or off" >&2; exit 64;; esac
case $suites in own|same) ;; *) echo "bench: BENCH_SUITES must be own or same" >&2; exit 64;; esac
# Rampart's order of preference, for HAProxy and nginx with BENCH_SUITES=same.
tls13_order=TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384
tls12_order=ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384
for m in $modes; do
  case $m in keepalive|newconn|h2|plain|reencrypt|idle-rss) ;;
    *) echo "bench: unknown mode '$m' (keepalive newconn h2 plain reencrypt idle-rss)" >&2; exit 64;;
  esac
done
[ "$idle_n" -ge 1 ] && [ "$idle_n" -le 15000 ] || { echo "bench: IDLE_CONNS must be 1..15000" >&2; exit 64; }
. bench/lib.sh
require haproxy:haproxy nginx:nginx-light wrk:wrk h2load:nghttp2-client openssl:openssl python3:python3 curl:curl ss:iproute2 taskset:util-linux
if [ -n "${RAMPART_BIN:-}" ]; then
  rampart=$(realpath "$RAMPART_BIN")
else
  cargo build --release -q -p rampart
  rampart=$PWD/target/release/rampart
fi
helper=$PWD/bench/lb-standalone.py
work=$(mktemp -d /tmp/lb-bench.XXXXXX)
declare -A live=()   # pids this script started and has not stopped yet

# stop PID...: SIGTERM, then SIGKILL after 8 s (Rampart drains for up to 5 s).
stop() {
  local p i
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do
    for i in $(seq 80); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    unset "live[$p]"
  done
}
cleanup() {
  trap - EXIT INT TERM
  [ ${#live[@]} -eq 0 ] || stop "${!live[@]}"
  local f; for f in "$work"/*.pid; do [ -f "$f" ] && stop "$(cat "$f")"; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "bench: interrupted" >&2; exit 130' INT TERM

# A bench CA; the site certificate (every load balancer's, ECDSA P-256) and the backends'
# certificate (their two addresses and a name) are signed by it.
bench_ca "$work"
bench_leaf "$work" site bench.test DNS:bench.test
bench_leaf "$work" backend backend.bench.test "DNS:backend.bench.test,IP:$ip.21,IP:$ip.22"
cat "$work/site.pem" "$work/site.key" > "$work/haproxy.pem"
# The page the backends serve (nginx's default page size), readable by nginx's workers.
mkdir -p "$work/www" && chmod 755 "$work" "$work/www"
head -c 612 /dev/zero | tr '\0' 'x' > "$work/www/index.html" && chmod 644 "$work/www/index.html"

# The backends: one nginx, one worker, two servers (plain 808x, TLS 908x), on CPU 0.
cat > "$work/backends.conf" <<CFG
worker_processes 1;
pid $work/backends.pid;
error_log $work/backends.err;
events { worker_connections 4096; }
http {
  # The backends never log, whatever BENCH_LOG says: they share CPU 0 with the clients.
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  ssl_certificate $work/backend.pem; ssl_certificate_key $work/backend.key;
  ssl_session_cache shared:backends:1m;
  server { listen $ip.21:8081; listen $ip.21:9081 ssl; root $work/www; }
  server { listen $ip.22:8082; listen $ip.22:9082 ssl; root $work/www; }
}
CFG
taskset -c 0 nginx -c "$work/backends.conf" -p "$work"

# Rampart: one worker thread (it would pick one anyway, pinned to one CPU). Its limits are
# the topology defaults (standalone mode has no flags for them): https max_connections
# 10 000 (at the cap the longest-idle connection makes room), 1 024 per source address,
# 10 s for the first request after the handshake, keep-alive idle timeout 60 s on paper
# but 10 s in effect (hyper's header read timeout also runs while an HTTP/1.1 connection
# waits for its next request).
# start_rampart NAME ADDR:PORT ARGS... -> pid in pid_of[NAME]
declare -A pid_of=()
start_rampart() {
  local name=$1 listen=$2; shift 2
  mkdir -p "$work/$name.state"
  local log=()
  [ "$log_on" = off ] || log=(--access-log "$work/$name.access.log")
  taskset -c 1 "$rampart" lb --state-dir "$work/$name.state" --listen "$listen" \
    --tls-cert "$work/site.pem" --tls-key "$work/site.key" --health-path /index.html --threads 1 \
    "${log[@]}" "$@" 2>"$work/$name.err" &
  pid_of[$name]=$!; live[$!]=1
}

# HAProxy: nbthread 1, maxconn above IDLE_CONNS (no strict-limits), client/keep-alive
# timeouts 120 s.
haproxy_global() {
  cat <<CFG
global
    nbthread 1
    maxconn $((idle_n + 2000))
    # maxconn above ~9 990 needs more than the 20 000 descriptors a process may open here
    # (HAProxy reserves two per connection); without strict-limits it warns and runs.
    no strict-limits
    ssl-default-bind-options ssl-min-ver TLSv1.2
$([ "$suites" = own ] || printf '    %s\n' "ssl-default-bind-ciphersuites $tls13_order" "ssl-default-bind-ciphers $tls12_order" \
  "ssl-default-server-ciphersuites $tls13_order" "ssl-default-server-ciphers $tls12_order")
$([ "$log_on" = off ] || echo "    log stdout format raw local0")
defaults
    mode http
$([ "$log_on" = off ] || echo "    log global")
    timeout connect 3s
    timeout client 120s
    timeout http-keep-alive 120s
    timeout server 30s
    option http-keep-alive
backend web
    balance roundrobin
    http-reuse always
    option httpchk GET /index.html
    server b1 $ip.21:8081 check inter 1s
    server b2 $ip.22:8082 check inter 1s
backend webtls
    balance roundrobin
    http-reuse always
    option httpchk GET /index.html
    server b1 $ip.21:9081 ssl verify required ca-file $work/ca.pem sni str(backend.bench.test) check inter 1s
    server b2 $ip.22:9082 ssl verify required ca-file $work/ca.pem sni str(backend.bench.test) check inter 1s
CFG
}
start_haproxy() { # NAME CONFIG-FILE
  taskset -c 1 haproxy -f "$2" -db >"$work/$1.err" 2>&1 &
  pid_of[$1]=$!; live[$!]=1
}

# nginx: one worker, worker_connections above IDLE_CONNS, keepalive_timeout 120 s.
nginx_http() {
  cat <<CFG
worker_processes 1;
worker_rlimit_nofile 20000;
error_log $work/$1.err;
pid $work/$1.pid;
events { worker_connections $((idle_n + 2000)); }
http {
$(if [ "$log_on" = off ]; then echo "  access_log off;"; else
  echo "  log_format rampart '\$remote_addr - - [\$time_local] \"\$request\" \$status \$body_bytes_sent \"\$http_referer\" \"\$http_user_agent\" backend=\$upstream_addr rt=\$request_time tls=- queue=- connect=\$upstream_connect_time upstream=\$upstream_response_time listener=https';"
  echo "  access_log $work/$1.access.log rampart buffer=64k flush=1s;"; fi)
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  ssl_certificate $work/site.pem; ssl_certificate_key $work/site.key;
  ssl_protocols TLSv1.2 TLSv1.3;
$([ "$suites" = own ] || printf '  %s\n' "ssl_prefer_server_ciphers on;" "ssl_ciphers $tls12_order;" \
  "ssl_conf_command Ciphersuites $tls13_order;" "proxy_ssl_ciphers $tls12_order;" \
  "proxy_ssl_conf_command Ciphersuites $tls13_order;")
  upstream web { server $ip.21:8081; server $ip.22:8082; keepalive 64; }
  upstream webtls { server $ip.21:9081; server $ip.22:9082; keepalive 64; }
CFG
}
start_nginx() { # NAME CONFIG-FILE; the master daemonizes and writes NAME.pid
  local i
  taskset -c 1 nginx -c "$2" -p "$work"
  for i in $(seq 50); do [ -s "$work/$1.pid" ] && break; sleep 0.1; done
  pid_of[$1]=$(cat "$work/$1.pid"); live[${pid_of[$1]}]=1
}
# The processes whose CPU and memory count: nginx's master and its worker.
pids_of() {
  case $1 in *nginx*) echo "${pid_of[$1]} $(pgrep -P "${pid_of[$1]}" | tr '\n' ' ')";; *) echo "${pid_of[$1]}";; esac
}
wait_up() { # URL: up to 15 s for a 2xx/3xx
  local i
  for i in $(seq 150); do
    curl -s -o /dev/null -f --max-time 2 --cacert "$work/ca.pem" \
      --resolve "bench.test:${1##*:}:${1%:*}" "https://bench.test:${1##*:}/index.html" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: the load balancer on $1 does not answer" >&2
  cat "$work"/*.err >&2; exit 1
}

# The load balancers under test: 8443 TLS -> plain backends, 8444 TLS -> TLS backends,
# 8080 plain -> plain backends. Rampart runs one process per upstream kind (its
# standalone mode has one set of backends per process).
start_rampart rampart "$ip.10:8443" --http-listen "$ip.10:8080" --http-proxy --backend "$ip.21:8081" --backend "$ip.22:8082"
start_rampart rampart-tls "$ip.10:8444" --backend "$ip.21:9081" --backend "$ip.22:9082" --backend-ca "$work/ca.pem"
# With BENCH_LOG=on, each frontend logs Rampart's combined line.
haproxy_log() { [ "$log_on" = off ] || haproxy_combined_log; }
{ haproxy_global; cat <<CFG; } > "$work/haproxy.cfg"
frontend site
    bind $ip.11:8443 ssl crt $work/haproxy.pem alpn h2,http/1.1
$(haproxy_log)
    default_backend web
frontend reencrypt
    bind $ip.11:8444 ssl crt $work/haproxy.pem alpn h2,http/1.1
$(haproxy_log)
    default_backend webtls
frontend plain
    bind $ip.11:8080
$(haproxy_log)
    default_backend web
CFG
start_haproxy haproxy "$work/haproxy.cfg"
proxy='proxy_http_version 1.1; proxy_set_header Connection "";'
{ nginx_http nginx; cat <<CFG; } > "$work/nginx.conf"
  server { listen $ip.12:8443 ssl http2; location / { proxy_pass http://web; $proxy } }
  server {
    listen $ip.12:8444 ssl http2;
    location / {
      proxy_pass https://webtls; $proxy
      proxy_ssl_verify on; proxy_ssl_trusted_certificate $work/ca.pem;
      proxy_ssl_name backend.bench.test; proxy_ssl_server_name on; proxy_ssl_session_reuse on;
    }
  }
  server { listen $ip.12:8080; location / { proxy_pass http://web; $proxy } }
}
CFG
start_nginx nginx "$work/nginx.conf"
for a in $ip.10:8443 $ip.10:8444 $ip.11:8443 $ip.11:8444 $ip.12:8443 $ip.12:8444; do wait_up "$a"; done

echo "rampart $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3), wrk $(wrk -v 2>&1 | head -1 | cut -d' ' -f2), $(h2load --version)"
for a in $ip.10 $ip.11 $ip.12; do
  printf '%s: ' "$a"
  openssl s_client -connect "$a:8443" -servername bench.test -CAfile "$work/ca.pem" -brief </dev/null 2>&1 \
    | sed -n 's/^\(Protocol version\|Ciphersuite\|Server Temp Key\|Peer Temp Key\): */\1 /p' | paste -sd ',' | sed 's/,/, /g'
done
echo "TLS suites: $suites (own: each load balancer's own order of preference; same: HAProxy and nginx set to Rampart's)"
echo "access logs: $log_on for all three; site certificate ECDSA P-256; load balancers on CPU 1, clients and backends on CPU 0"
echo "limits for idle-rss ($idle_n connections): Rampart topology defaults (https max_connections 10000, 1024 per source, keep-alive idle 10 s in effect); HAProxy maxconn $((idle_n + 2000)) with no strict-limits (20000 descriptors), timeout client/http-keep-alive 120 s; nginx worker_connections $((idle_n + 2000)), worker_rlimit_nofile 20000, keepalive_timeout 120 s"

# utime+stime of the given pids, in clock ticks (fields 14 and 15 of /proc/PID/stat).
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
# VmRSS of the given pids, KiB.
rss() { local t=0 p; for p in "$@"; do t=$((t + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status"))); done; echo $t; }
hz=$(getconf CLK_TCK)

# run MODE LB -> "requests rps p50_ms p99_ms cpu_us_per_req errors" in $work/line
run() {
  local mode=$1 lb=$2 addr port=8443 name pids before after
  case $lb in rampart*) addr=$ip.10;; haproxy) addr=$ip.11;; nginx) addr=$ip.12;; esac
  name=$lb
  [ "$mode" = reencrypt ] && { port=8444; [ "$lb" = rampart ] && name=rampart-tls; }
  # shellcheck disable=SC2207
  pids=($(pids_of "$name"))
  before=$(ticks "${pids[@]}")
  case $mode in
    keepalive|reencrypt)
      taskset -c 0 wrk -t1 -c50 -d"${secs}s" --latency -H "Host: bench.test" \
        "https://$addr:$port/index.html" >"$work/out" 2>&1 || true;;
    newconn)
      taskset -c 0 wrk -t1 -c50 -d"${secs}s" --latency -H "Host: bench.test" -H "Connection: close" \
        "https://$addr:$port/index.html" >"$work/out" 2>&1 || true;;
    plain)
      taskset -c 0 wrk -t1 -c50 -d"${secs}s" --latency -H "Host: bench.test" \
        "http://$addr:8080/index.html" >"$work/out" 2>&1 || true;;
    h2)
      rm -f "$work/h2.log"
      taskset -c 0 h2load -t1 -c10 -m10 -D"$secs" --log-file="$work/h2.log" -H ":authority: bench.test" \
        "https://$addr:$port/index.html" >"$work/out" 2>&1 || true;;
  esac
  after=$(ticks "${pids[@]}")
  if [ "$mode" = h2 ]; then
    python3 "$helper" h2load "$before" "$after" "$hz" "$work/out" "$work/h2.log" >"$work/line"
  else
    python3 "$helper" wrk "$before" "$after" "$hz" "$work/out" >"$work/line"
  fi
}

# idle_rss LB -> "before_kib after_kib kib_per_conn held ok failed" in $work/line, measured
# on a fresh instance. Not run in a subshell, so every process it starts stays in `live`.
idle_rss() {
  local lb=$1 addr per=2500 n left=$idle_n k=0 s=100 srcs i j before after held ok=0 failed=0
  local clients=() ok_n
  case $lb in
    rampart) addr=$ip.10
      start_rampart idle-rampart "$addr:8446" --backend "$ip.21:8081" --backend "$ip.22:8082";;
    haproxy) addr=$ip.11
      { haproxy_global; printf 'frontend idle\n    bind %s:8446 ssl crt %s alpn http/1.1\n    default_backend web\n' \
          "$addr" "$work/haproxy.pem"; } > "$work/idle-haproxy.cfg"
      start_haproxy idle-haproxy "$work/idle-haproxy.cfg";;
    nginx) addr=$ip.12
      { nginx_http idle-nginx; printf '  server { listen %s:8446 ssl; location / { proxy_pass http://web; %s } }\n}\n' \
          "$addr" "$proxy"; } > "$work/idle-nginx.conf"
      start_nginx idle-nginx "$work/idle-nginx.conf";;
  esac
  wait_up "$addr:8446"
  # shellcheck disable=SC2207
  local pids=($(pids_of "idle-$lb"))
  sleep 1
  before=$(rss "${pids[@]}")
  local t0=$SECONDS
  # Clients on any CPU (building the set is what takes time; nothing is timed here): <= 2 500
  # connections per process, 500 per source address (Rampart allows 1 024 per source).
  while [ "$left" -gt 0 ]; do
    n=$((left < per ? left : per)); srcs=""
    for j in $(seq $(((n + 499) / 500))); do srcs+="${srcs:+,}$ip.$((s++))"; done
    python3 "$helper" idle "$addr" 8446 "$n" "$work/ca.pem" bench.test "$srcs" 420 5 \
      >"$work/idle.$k.out" 2>&1 &
    clients+=($!); live[$!]=1
    left=$((left - n)); k=$((k + 1))
  done
  while [ $((SECONDS - t0)) -lt 300 ]; do   # up to 300 s for every client to report
    j=0; for n in $(seq 0 $((k - 1))); do grep -q '^ready' "$work/idle.$n.out" 2>/dev/null && j=$((j + 1)); done
    [ "$j" -eq "$k" ] && break
    for n in "${clients[@]}"; do kill -0 "$n" 2>/dev/null || { cat "$work"/idle.*.out >&2; break 2; }; done
    sleep 0.1
  done
  ok_n=$(ss -Htn state established src "$addr:8446" | wc -l)
  # Stop the keep-alive repeats; 1.5 s later nothing is in flight, and every connection's
  # last request is at most 6.5 s old.
  echo "  $lb: $ok_n connections open after $((SECONDS - t0)) s" >&2
  kill -USR1 "${clients[@]}" 2>/dev/null || true
  sleep 1.5
  held=$(ss -Htn state established src "$addr:8446" | wc -l)
  after=$(rss "${pids[@]}")
  j=$(ss -Htn state established src "$addr:8446" | wc -l); [ "$j" -lt "$held" ] && held=$j
  for n in $(seq 0 $((k - 1))); do
    read -r _ a b _ < <(grep '^ready' "$work/idle.$n.out" || echo "ready 0 0")
    ok=$((ok + a)); failed=$((failed + b))
    [ "$b" -eq 0 ] || echo "  idle client $n: $(cat "$work/idle.$n.out")" >&2
  done
  stop "${clients[@]}"
  stop "${pid_of[idle-$lb]}"
  rm -f "$work/idle-$lb.pid"
  python3 -c "import sys; b,a,h,o,f=map(int,sys.argv[1:]); print(b, a, (a-b)/max(h,1), h, o, f)" \
    "$before" "$after" "$held" "$ok" "$failed" >"$work/line"
}

results=$work/results
: > "$results"
for mode in $modes; do
  lbs="rampart haproxy nginx"
  for r in $(seq "$rounds"); do
    for lb in $lbs; do
      if [ "$mode" = idle-rss ]; then idle_rss "$lb"; else run "$mode" "$lb"; fi
      echo "$mode $lb $r $(cat "$work/line")" | tee -a "$results" >&2
    done
  done
done
echo
python3 "$helper" report "$rounds" "$results"
if [ "$log_on" = on ]; then
  # Every load balancer wrote its lines (HAProxy's go to its stdout, kept in NAME.err).
  # Rampart rotates its log at 64 MiB and keeps 3 rotated files (topology defaults), so
  # after a long run its count covers only the newest 256 MiB of lines.
  echo "access log lines: rampart $(cat "$work"/rampart*.access.log* 2>/dev/null | wc -l) (newest 4 x 64 MiB)," \
    "haproxy $(grep -hc ' "[A-Z]* /' "$work"/haproxy.err 2>/dev/null || echo 0)," \
    "nginx $(cat "$work"/nginx.access.log 2>/dev/null | wc -l)"
  for f in rampart.access.log haproxy.err nginx.access.log; do
    grep -m1 ' "[A-Z]* /' "$work/$f" 2>/dev/null || echo "($f: no line)"
  done
fi
if [ -n "$(echo " $modes " | sed 's/ idle-rss / /g' | tr -d ' ')" ]; then
  echo "(requests/s and latency on a 2-core machine: the load generator and the backends share CPU 0;"
  echo " keepalive/newconn/plain/reencrypt latency from wrk --latency, h2 from h2load's per-request log)"
fi
