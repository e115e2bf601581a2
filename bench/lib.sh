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
