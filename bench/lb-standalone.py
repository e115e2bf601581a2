#!/usr/bin/env python3
"""Helper of bench/lb-standalone.sh (standard library only).

Subcommands:
  wrk BEFORE AFTER HZ OUTFILE
      Parses wrk's output (with --latency) and prints one result line:
      "requests req_per_s p50_ms p99_ms cpu_us_per_request errors", where the CPU time is
      (AFTER - BEFORE) clock ticks at HZ ticks/s divided by the requests completed, and
      errors are wrk's socket errors plus its "Non-2xx or 3xx responses".
  h2load BEFORE AFTER HZ OUTFILE LOGFILE
      The same from h2load's output; p50/p99 come from its per-request log (--log-file:
      start time µs, status, elapsed µs, tab separated); errors are failed + errored +
      timed-out requests plus 4xx/5xx responses.
  idle HOST PORT COUNT CAFILE NAME SRC[,SRC...] HOLD_S REFRESH_S
      Opens COUNT TLS connections to HOST:PORT from the given source addresses (round
      robin), each verified against CAFILE with SNI NAME, and sends one HTTP/1.1 GET / on
      each, its response read in full. Prints "ready OK FAILED [first error]" once every
      connection was tried. Until SIGUSR1 every connection repeats its GET every REFRESH_S
      seconds (Rampart closes a keep-alive connection idle for 10 s, and building 10 000
      connections takes longer); after SIGUSR1 no more requests, so all connections sit
      idle (handshake done, keep-alive, nothing in flight). Holds them until
      SIGTERM/SIGINT or HOLD_S seconds, then closes them.
  report ROUNDS RESULTS
      Prints the medians over rounds and the ratios Rampart / HAProxy and Rampart / nginx
      from the result lines the shell script collected.
"""

import asyncio
import re
import signal
import ssl
import statistics
import sys


def _ms(value, unit):
    v = float(value)
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60000}[unit]


def _cpu_us(before, after, hz, requests):
    return (int(after) - int(before)) / int(hz) * 1e6 / max(requests, 1)


def parse_wrk(before, after, hz, outfile):
    out = open(outfile, encoding="utf-8", errors="replace").read()
    m = re.search(r"(\d+) requests in", out)
    if not m:
        sys.exit("wrk gave no result:\n" + out)
    req = int(m.group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s|m)\b" % p, out, re.M)
        return _ms(m.group(1), m.group(2)) if m else float("nan")

    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    print(req, rps, pct(50), pct(99), _cpu_us(before, after, hz, req), errors)


def parse_h2load(before, after, hz, outfile, logfile):
    out = open(outfile, encoding="utf-8", errors="replace").read()
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    f = re.search(r"finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req/s", out)
    if not m or not f:
        sys.exit("h2load gave no result:\n" + out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if not proto or proto.group(1) != "h2":
        sys.exit("h2load did not speak HTTP/2:\n" + out)
    succeeded = int(m.group(4))
    errors = int(m.group(5)) + int(m.group(6)) + int(m.group(7))
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if s:
        errors += int(s.group(3)) + int(s.group(4))
    rps = float(f.group(3))
    lat = []
    with open(logfile, encoding="utf-8", errors="replace") as log:
        for line in log:
            cols = line.split("\t")
            if len(cols) >= 3:
                lat.append(int(cols[2]) / 1000)
    lat.sort()

    def pct(p):
        if not lat:
            return float("nan")
        return lat[min(len(lat) - 1, int(len(lat) * p / 100))]

    print(succeeded, rps, pct(50), pct(99), _cpu_us(before, after, hz, succeeded), errors)


async def _get(reader, writer, name, timeout):
    """One HTTP/1.1 keep-alive GET / on an open connection, its response read in full."""
    writer.write(b"GET / HTTP/1.1\r\nHost: " + name.encode() + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = head.split(b" ", 2)[1]
    if not status.startswith(b"2"):
        raise RuntimeError("status " + status.decode())
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if m:
        await asyncio.wait_for(reader.readexactly(int(m.group(1))), timeout)
    elif re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
        await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), timeout)


async def idle(host, port, count, cafile, name, sources, hold, refresh):
    """See the module docstring (`idle`). While the set is being built every connection
    repeats its GET every `refresh` seconds (so a server that closes connections idle for
    10 s keeps them all); SIGUSR1 stops those repeats, so that from then on nothing is in
    flight."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    sem = asyncio.Semaphore(64)
    conns, errors, lost = [], [], [0]
    paused, stop = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, paused.set)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def keep(reader, writer):
        try:
            while True:
                try:
                    await asyncio.wait_for(paused.wait(), refresh)
                    return
                except asyncio.TimeoutError:
                    await _get(reader, writer, name, 10)
        except Exception:  # the server closed it: the controller counts what is held
            lost[0] += 1

    async def open_one(i):
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=ctx, server_hostname=name,
                                            local_addr=(sources[i % len(sources)], 0)),
                    30,
                )
                await _get(reader, writer, name, 30)
                conns.append(writer)
                tasks.append(asyncio.create_task(keep(reader, writer)))
            except Exception as e:  # counted and reported; one failure must not stop the rest
                errors.append(repr(e))

    tasks = []
    await asyncio.gather(*(open_one(i) for i in range(count)))
    print("ready", len(conns), len(errors), errors[0] if errors else "", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), hold)
    except asyncio.TimeoutError:
        pass
    for w in conns:
        w.transport.abort()
    for t in tasks:
        t.cancel()


def report(rounds, results):
    runs, idle_runs = {}, {}
    for line in open(results, encoding="utf-8"):
        f = line.split()
        if not f:
            continue
        if f[0] == "idle-rss":
            idle_runs.setdefault(f[1], []).append([float(x) for x in f[3:]])
        else:
            runs.setdefault((f[0], f[1]), []).append([float(x) for x in f[3:]])
    order = ["keepalive", "newconn", "h2", "plain", "reencrypt"]
    lbs = ["rampart", "haproxy", "nginx"]
    med = {}
    if runs:
        print(f"{'mode':10} {'lb':16} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11} {'errors':>7}")
        for mode in order:
            for lb in lbs:
                r = runs.get((mode, lb))
                if not r:
                    continue
                m = [statistics.median(col) for col in zip(*r)]
                med[(mode, lb)] = m
                errs = int(sum(x[5] for x in r))
                print(f"{mode:10} {lb:16} {m[1]:9.0f} {m[2]:8.2f} {m[3]:8.2f} {m[4]:11.1f} {errs:7d}")
        print()
        print("ratios (goals: CPU/req <= 0.75, req/s >= 1.3 where the load balancer is the bottleneck, p99 <= 1.00)")
        for mode in order:
            r = med.get((mode, "rampart"))
            if not r:
                continue
            for peer in ("haproxy", "nginx"):
                p = med.get((mode, peer))
                if not p:
                    continue

                def mark(ok):
                    return "ok" if ok else "MISS"

                cpu, rps, p99 = r[4] / p[4], r[1] / p[1], r[3] / p[3]
                print(f"{mode:10} rampart/{peer:8} req/s {rps:5.2f}  p50 {r[2]/p[2]:5.2f}  "
                      f"p99 {p99:5.2f} {mark(p99 <= 1.0):4}  CPU/req {cpu:5.2f} {mark(cpu <= 0.75)}")
    if idle_runs:
        print()
        print(f"{'idle TLS':10} {'lb':16} {'RSS before MiB':>14} {'after MiB':>10} {'KiB/conn':>9} {'held':>6} {'failed':>7}")
        im = {}
        for lb in lbs:
            r = idle_runs.get(lb)
            if not r:
                continue
            m = [statistics.median(col) for col in zip(*r)]
            im[lb] = m
            print(f"{'idle-rss':10} {lb:16} {m[0]/1024:14.1f} {m[1]/1024:10.1f} {m[2]:9.1f} {min(x[3] for x in r):6.0f} {int(sum(x[5] for x in r)):7d}")
        if "rampart" in im:
            for peer in ("haproxy", "nginx"):
                if peer in im and im[peer][2] > 0:
                    ratio = im["rampart"][2] / im[peer][2]
                    goal = ("ok" if ratio <= 1.0 else "MISS") if peer == "haproxy" else ""
                    print(f"{'idle-rss':10} rampart/{peer:8} RSS per idle TLS connection {ratio:5.2f} {goal}")
    print()
    print(f"(median of {rounds} round(s) per load balancer" + (
        "; idle-rss: 'held' is the fewest connections still established at measurement over the rounds,"
        " KiB/conn = (after - before) / held)" if idle_runs else ")"))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "wrk":
        parse_wrk(*args)
    elif cmd == "h2load":
        parse_h2load(*args)
    elif cmd == "idle":
        host, port, count, cafile, name, sources, hold, refresh = args
        asyncio.run(idle(host, int(port), int(count), cafile, name, sources.split(","), float(hold),
                         float(refresh)))
    elif cmd == "report":
        report(int(args[0]), args[1])
    else:
        sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main()
