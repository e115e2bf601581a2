#!/usr/bin/env bash
# Database failover drill: brings the default topology up in loopback mode (temporary state
# directory, release binary), runs a steady write load through the load balancer (POST
# /api/messages over HTTPS, one request at a time, every acknowledged id recorded), SIGKILLs
# the primary's mariadbd, and measures:
#   detect       kill → the controller starts changing the primary (its log line)
#   promote      kill → cluster.json names the new primary (polled every 20 ms)
#   unavailable  first failed write after the kill → the next successful write
#   lost         acknowledged writes missing on the new primary (or stored with another text)
#   dup          texts stored twice
#   2-writable   polls (every ~100 ms, @@read_only of both servers) that saw two writable
# Between repetitions it waits until the old primary has rejoined as a replica and
# semi-synchronous replication is on again, then kills the new primary.
#
# Usage: bench/db-failover-drill.sh [repetitions, default 5]
# Needs: mariadb-server (mariadbd, the mariadb client), python3, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${1:-5}
block=127.110.8
bin=${RAMPART_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -q -p rampart
  bin=$PWD/target/release/rampart
fi
command -v mariadb >/dev/null || { echo "bench: the mariadb client is needed (apt-get install mariadb-server)" >&2; exit 1; }
work=$(mktemp -d)
state=$work/state
cleanup() {
  "$bin" --state-dir "$state" down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

sed "s/127\.80\.0\./$block./" crates/topology/src/default.toml > "$work/rampart.toml"
"$bin" --state-dir "$state" up --mode loopback -d -f "$work/rampart.toml" >/dev/null 2>&1
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $0 $reps ($(nproc) cores, $(mariadbd --version | awk '{print $3}'))"

python3 - "$bin" "$state" "$reps" "$block.10" <<'PY'
import http.client, json, os, signal, ssl, statistics, subprocess, sys, threading, time
from datetime import datetime

bin_, state, reps, lb = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
creds = json.load(open(f"{state}/db/credentials.json"))
hosts = ["web-01", "web-02"]

def sql(host, query):
    sock = f"{state}/hosts/{host}/mariadb/mysqld.sock"
    r = subprocess.run(["mariadb", f"--socket={sock}", "-uroot", f"-p{creds['admin_password']}",
                        "-N", "-B", "--connect-timeout=1", "-e", query],
                       capture_output=True, text=True, timeout=5)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    return r.stdout

def cluster():
    return json.load(open(f"{state}/db/cluster.json"))

def db_status():
    out = subprocess.run([bin_, "--state-dir", state, "db", "status", "--json"],
                         capture_output=True, text=True, timeout=10).stdout
    return json.loads(out)

def wait(what, pred, seconds):
    end = time.time() + seconds
    while time.time() < end:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"drill: {what}: not within {seconds} s")

def settled():
    s = db_status()
    nodes = {n["host"]: n for n in s["nodes"]}
    p = nodes[s["primary"]]
    others = [n for h, n in nodes.items() if h != s["primary"]]
    return (p["read_only"] is False and p["semi_sync_master_status"]
            and all(n["io_running"] and n["sql_running"] for n in others))

ctx = ssl.create_default_context(cafile=f"{state}/pki/ca.pem")

class Load(threading.Thread):
    def __init__(self, tag):
        super().__init__(daemon=True)
        self.tag, self.stop, self.acked, self.events = tag, False, {}, []
    def run(self):
        n, conn = 0, None
        end = time.time() + 120
        while not self.stop and time.time() < end:
            n += 1
            text = f"{self.tag}-{n}"
            ok = False
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection(lb, 443, context=ctx, timeout=2)
                conn.request("POST", "/api/messages", body=json.dumps({"author": "drill", "text": text}),
                             headers={"Host": "www.foobar.com", "Content-Type": "application/json"})
                r = conn.getresponse()
                body = r.read()
                if r.status == 201:
                    self.acked[json.loads(body)["id"]] = text
                    ok = True
            except Exception:
                conn = None
            self.events.append((time.time(), ok))
            time.sleep(0.01)

# SNI must be www.foobar.com while connecting to the LB's address.
_orig = ssl.SSLContext.wrap_socket
def _wrap(self, sock, *a, **k):
    k["server_hostname"] = "www.foobar.com"
    return _orig(self, sock, *a, **k)
ssl.SSLContext.wrap_socket = _wrap

class Poll(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.two, self.polls = False, 0, 0
        self.epoch_at = {}
    def run(self):
        end = time.time() + 120
        last_read_only = 0.0
        while not self.stop and time.time() < end:
            now = time.time()
            try:
                e = cluster()["epoch"]
                self.epoch_at.setdefault(e, now)
            except Exception:
                pass
            if now - last_read_only >= 0.1:
                last_read_only = now
                writable = 0
                for h in hosts:
                    try:
                        if sql(h, "SELECT @@read_only").strip() == "0":
                            writable += 1
                    except Exception:
                        pass
                self.polls += 1
                if writable > 1:
                    self.two += 1
            time.sleep(0.02)

def log_time(after):
    # The controller's "changing the database primary" line in mon-01's node log.
    best = None
    for line in open(f"{state}/hosts/mon-01/node.log", errors="replace"):
        if "changing the database primary" in line:
            ts = datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
            if ts >= after and best is None:
                best = ts
    return best

rows = []
for rep in range(1, reps + 1):
    wait("replication settled with semi-sync on", settled, 180)
    c0 = cluster()
    primary = c0["primary"]
    load, poll = Load(f"r{rep}"), Poll()
    poll.start(); load.start()
    time.sleep(3)
    pid = int(open(f"{state}/hosts/{primary}/mariadb/mariadbd.pid").read().strip())
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    wait("new primary published", lambda: cluster()["epoch"] > c0["epoch"], 60)
    # Writes resumed: a success after the first failure, then 3 s more load.
    def resumed():
        ev = [e for e in load.events if e[0] > t_kill]
        fails = [i for i, e in enumerate(ev) if not e[1]]
        return (not fails and len(ev) > 50) or (fails and any(e[1] for e in ev[fails[0]:]))
    wait("writes resumed", resumed, 60)
    time.sleep(3)
    load.stop = True; load.join()
    poll.stop = True; poll.join()
    new = cluster()["primary"]
    ev = [e for e in load.events if e[0] > t_kill]
    first_fail = next((t for t, ok in ev if not ok), None)
    unavailable = 0.0
    if first_fail is not None:
        first_ok = next(t for t, ok in ev if ok and t > first_fail)
        unavailable = first_ok - first_fail
    stored = {}
    texts = {}
    for line in sql(new, "SELECT id, `text` FROM foobar.guestbook").splitlines():
        i, t = line.split("\t", 1)
        stored[int(i)] = t
        texts[t] = texts.get(t, 0) + 1
    lost = sum(1 for i, t in load.acked.items() if stored.get(i) != t)
    dup = sum(1 for t, n in texts.items() if n > 1)
    t_det = log_time(t_kill)
    promote = poll.epoch_at.get(c0["epoch"] + 1, float("nan")) - t_kill
    rows.append(dict(rep=rep, old=primary, new=new, detect=(t_det - t_kill) if t_det else float("nan"),
                     promote=promote, unavailable=unavailable, acked=len(load.acked), lost=lost,
                     dup=dup, two=poll.two, polls=poll.polls))
    r = rows[-1]
    print(f"rep {rep}: {r['old']} -> {r['new']}  detect {r['detect']:.2f} s  promote {r['promote']:.2f} s  "
          f"unavailable {r['unavailable']:.2f} s  acked {r['acked']}  lost {r['lost']}  dup {r['dup']}  "
          f"2-writable {r['two']}/{r['polls']} polls", flush=True)

med = lambda k: statistics.median(r[k] for r in rows)
print()
print("| reps | detect (median) | promote (median) | write unavailability (median / max) | acked writes | lost | duplicates | two writable |")
print("|---|---|---|---|---|---|---|---|")
print(f"| {len(rows)} | {med('detect'):.2f} s | {med('promote'):.2f} s | {med('unavailable'):.2f} s / {max(r['unavailable'] for r in rows):.2f} s "
      f"| {sum(r['acked'] for r in rows)} | {sum(r['lost'] for r in rows)} | {sum(r['dup'] for r in rows)} | {sum(r['two'] for r in rows)} of {sum(r['polls'] for r in rows)} polls |")
PY
