#!/usr/bin/env bash
# Installs the Debian packages Rampart runs with, when they are missing:
#   mariadb-server  the primary and replica (without it the data tier falls back to SQLite)
#   nftables, iproute2  firewalls and network namespaces (netns mode)
#   curl            the README's curl line
#   prometheus      promtool, which the tests use to lint every agent's /metrics and the exported
#                   configuration; the remote-write test starts its own prometheus on a loopback port
#   chromium        headless browser for the dashboard test
#   pebble          an RFC 8555 ACME test server (and its DNS), started by the load balancer's ACME test
# Needs root for apt-get; without root it only reports what is missing.
set -euo pipefail

want=(mariadb-server nftables iproute2 curl ca-certificates prometheus pebble chromium)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-deps: missing ${missing[*]} (run as root on Debian to install them); continuing without" >&2
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Never start or restart the system's own services: Rampart runs its own mariadbd.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
cleanup() { [ "$created_policy" -eq 1 ] && rm -f "$policy"; return 0; }
trap cleanup EXIT
apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null \
  || { apt-get update -q </dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null; }
