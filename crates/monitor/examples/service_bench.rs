//! The monitoring service's store and query engine measured in-process, on the calling
//! thread (run it pinned to one core: `bench/monitor-service.sh`):
//!
//! 1. ingest: agent-shaped pushes (text exposition, 3 hosts x `SERIES` series, one push a
//!    second each) parsed and stored, samples per second of CPU; and the store alone with
//!    the samples already parsed;
//! 2. bytes per stored sample of that data (compressed chunk payloads / samples);
//! 3. a 24 h QPS range query at 1 s resolution, `sum(rate(rampart_http_requests_total[1m]))`
//!    over 86 401 steps of a day of one-second history, evaluated by the engine (the HTTP
//!    API refuses more than 11 000 points per series, as Prometheus does).
//!
//! Prints a table with the goals.

use std::time::Instant;

use monitor::exposition;
use monitor::promql::{self, Range, Value};
use monitor::store::Store;

const SERIES: usize = 500;
const HOSTS: [&str; 3] = ["lb-01", "web-01", "web-02"];

/// A deterministic pseudo-random sequence (xorshift64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One push of `host` at second `i`: a mix like an agent's — request counters by code,
/// latency histogram buckets, CPU seconds, byte counters, and gauges (memory, up flags).
fn push_text(rng: &mut Rng, state: &mut [f64], i: u64) -> String {
    let mut out = String::with_capacity(SERIES * 64);
    for (k, v) in state.iter_mut().enumerate() {
        let (name, step) = match k % 10 {
            0 | 1 => ("rampart_http_requests_total", (rng.next() % 40) as f64),
            2 | 3 => (
                "rampart_http_request_duration_seconds_bucket",
                (rng.next() % 20) as f64,
            ),
            4 => (
                "rampart_host_cpu_seconds_total",
                (rng.next() % 100) as f64 / 100.0,
            ),
            5 => (
                "rampart_host_network_receive_bytes_total",
                (rng.next() % 100_000) as f64,
            ),
            6 => ("rampart_host_memory_available_bytes", 0.0),
            7 => ("rampart_backend_up", 0.0),
            _ => ("rampart_listener_open_connections", 0.0),
        };
        if k % 10 == 6 && rng.next().is_multiple_of(10) {
            *v = 1.5e9 + (rng.next() % 1_000_000) as f64 * 4096.0;
        } else if k % 10 == 7 {
            *v = 1.0;
        } else if k % 10 >= 8 {
            *v = (rng.next() % 8) as f64;
        } else {
            *v += step;
        }
        out.push_str(&format!("{name}{{series=\"{k}\"}} {v}\n"));
    }
    let _ = i;
    out
}

fn cpu_seconds() -> f64 {
    // this thread's CPU time (the bench is single-threaded)
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let pushes: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3_600);
    let t0 = 1_700_000_000.0;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut states: Vec<Vec<f64>> = HOSTS.iter().map(|_| vec![0.0; SERIES]).collect();
    // Pre-render the pushes so text generation is not timed.
    let texts: Vec<Vec<String>> = (0..pushes)
        .map(|i| {
            states
                .iter_mut()
                .map(|s| push_text(&mut rng, s, i))
                .collect()
        })
        .collect();

    // 1a. parse + store
    let mut store = Store::new();
    let (wall, cpu) = (Instant::now(), cpu_seconds());
    for (i, per_host) in texts.iter().enumerate() {
        let now = t0 + i as f64;
        for (h, text) in HOSTS.iter().zip(per_host) {
            let samples = exposition::parse(text).expect("valid exposition");
            store.ingest(h, now, samples).expect("stored");
        }
    }
    let wall_parse = wall.elapsed().as_secs_f64();
    let cpu_parse = (cpu_seconds() - cpu).max(1e-9);
    let n = pushes as f64 * (HOSTS.len() * SERIES) as f64;
    let (samples, bytes) = store.footprint();

    // 1b. store only (pre-parsed)
    let parsed: Vec<Vec<_>> = texts
        .iter()
        .map(|per_host| {
            per_host
                .iter()
                .map(|t| exposition::parse(t).expect("valid exposition"))
                .collect()
        })
        .collect();
    drop(texts);
    let mut store2 = Store::new();
    let wall = Instant::now();
    for (i, per_host) in parsed.into_iter().enumerate() {
        let now = t0 + i as f64;
        for (h, samples) in HOSTS.iter().zip(per_host) {
            store2.ingest(h, now, samples).expect("stored");
        }
    }
    let wall_store = wall.elapsed().as_secs_f64();

    // 3. a day of one-second history for lb-01's request counters (2xx, 4xx, 5xx)
    let mut day = Store::new();
    let mut counts = [0.0f64; 3];
    let mut r = Rng(42);
    for i in 0..86_400u32 {
        let mut text = String::new();
        for (c, code) in ["2xx", "4xx", "5xx"].iter().enumerate() {
            counts[c] += (r.next() % [200, 10, 3][c]) as f64;
            text.push_str(&format!(
                "rampart_http_requests_total{{role=\"lb\",code=\"{code}\"}} {}\n",
                counts[c]
            ));
        }
        day.ingest(
            "lb-01",
            t0 + f64::from(i),
            exposition::parse(&text).expect("valid exposition"),
        )
        .expect("stored");
    }
    let end = t0 + 86_399.0;
    let range = Range {
        start: end - 86_400.0,
        end,
        step: 1.0,
    };
    let q = "sum(rate(rampart_http_requests_total[1m]))";
    let mut times = Vec::new();
    let mut points = 0;
    for _ in 0..7 {
        let w = Instant::now();
        let (v, _) = promql::query(&day, q, range).expect("query");
        times.push(w.elapsed().as_secs_f64() * 1000.0);
        if let Value::Vector(v) = v {
            points = v.iter().map(|s| s.values.iter().flatten().count()).sum();
        }
    }
    times.sort_by(f64::total_cmp);
    let median_ms = times[times.len() / 2];

    let ingest_rate = n / cpu_parse;
    let bps = bytes as f64 / samples as f64;
    println!(
        "monitoring service, {} pushes x {} hosts x {SERIES} series ({} samples)",
        pushes,
        HOSTS.len(),
        n
    );
    println!(
        "{:<52} {:>14} {:>14} {:>6}",
        "measure", "result", "goal", "met"
    );
    let row = |name: &str, v: String, goal: &str, ok: bool| {
        println!(
            "{name:<52} {v:>14} {goal:>14} {:>6}",
            if ok { "yes" } else { "NO" }
        );
    };
    row(
        "ingest, parse + store (samples/s of CPU)",
        format!("{ingest_rate:.0}"),
        ">= 1000000",
        ingest_rate >= 1e6,
    );
    row(
        "ingest, parse + store (samples/s wall)",
        format!("{:.0}", n / wall_parse),
        "",
        true,
    );
    row(
        "ingest, store only (samples/s wall)",
        format!("{:.0}", n / wall_store),
        "",
        true,
    );
    row(
        "bytes per stored sample (chunk payload)",
        format!("{bps:.3}"),
        "<= 1.37",
        bps <= 1.37,
    );
    row(
        &format!("24 h range query, 1 s step, median of 7 (ms; {points} pts)"),
        format!("{median_ms:.1}"),
        "< 50",
        median_ms < 50.0,
    );
}
