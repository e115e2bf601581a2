# Shared by the benchmark scripts (sourced, not run).

# require BIN:PACKAGE... — makes every BIN available on PATH: a missing one is installed
# from its Debian PACKAGE (as root; never starting the package's own services, through a
# temporary policy-rc.d, as scripts/install-deps.sh does). Exits 1 naming the package when a
# BIN is still missing.
require() {
  local p bin pkg updated=0 made=0
  for p in "$@"; do
    bin=${p%%:*}; pkg=${p#*:}
    command -v "$bin" >/dev/null 2>&1 && continue
    if [ "$(id -u)" -eq 0 ]; then
      made=0
      [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made=1; }
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" </dev/null >/dev/null 2>&1 \
        || { [ $updated -eq 1 ] || { apt-get update -q </dev/null >/dev/null 2>&1 || true; updated=1; }
             DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" </dev/null >/dev/null || true; }
      [ "$made" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    fi
    command -v "$bin" >/dev/null 2>&1 || { echo "bench: $bin is needed (apt-get install $pkg)" >&2; exit 1; }
  done
  return 0
}

# bench_ca DIR — a bench certificate authority, DIR/ca.pem and DIR/ca.key (ECDSA P-256,
# valid 2 days).
bench_ca() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$1/ca.key" -out "$1/ca.pem" -subj "/CN=Rampart bench CA" 2>/dev/null
}

# bench_leaf DIR NAME CN SAN — a server certificate DIR/NAME.pem with its key DIR/NAME.key
# (ECDSA P-256, subject CN, subjectAltName SAN such as "DNS:bench.test,IP:127.0.0.1"),
# signed by DIR's bench CA.
bench_leaf() {
  local d=$1 n=$2
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/$n.key" \
    -out "$d/$n.csr" -subj "/CN=$3" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$4" > "$d/$n.ext"
  openssl x509 -req -in "$d/$n.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
    -extfile "$d/$n.ext" -out "$d/$n.pem" 2>/dev/null
}

# haproxy_combined_log — the lines of an HAProxy frontend that log Rampart's `combined`
# access log line (NCSA combined plus backend and timings; HAProxy's timers in ms,
# Rampart's in s; `listener` is the frontend's name), to a `log` set in `global`.
haproxy_combined_log() {
  cat <<'CFG'
    http-request capture req.hdr(Referer) len 128
    http-request capture req.hdr(User-Agent) len 128
    log-format "%ci - - [%trl] \"%r\" %ST %B \"%[capture.req.hdr(0)]\" \"%[capture.req.hdr(1)]\" backend=%s rt=%Tr tls=- queue=%Tw connect=%Tc upstream=%Tr listener=%f"
CFG
}
