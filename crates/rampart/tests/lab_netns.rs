//! End to end in netns mode (root with `ip` and `nft`; skipped with a reason otherwise):
//! `rampart up` picks netns mode by itself, every host is a network namespace with its own
//! nftables ruleset, the site answers the client namespace and this machine, the probe
//! matrix matches the policy, a blocked address gets nothing until its block expires, drop
//! counters reach the monitor, and `down` (or the next `up` after a crash) leaves no
//! namespace, interface, `/etc/netns` entry or table behind.
//!
//! Each test has its own namespace prefix, subnet and 127.x block.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_rampart");

fn rampart(state: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run rampart")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn netns_possible() -> bool {
    let ok = test_support::is_root()
        && test_support::have_binary("ip")
        && test_support::have_binary("nft")
        && test_support::have_binary("curl");
    if !ok {
        test_support::skip(
            "netns mode needs root, ip, nft and curl (apt-get install iproute2 nftables curl)",
        );
    }
    ok
}

/// A netns lab of the test's own; dropping it runs `rampart down`.
struct Lab {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    file: PathBuf,
    prefix: String,
}

impl Lab {
    fn new(prefix: &str, subnet: &str, block: &str) -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let file = tmp.path().join("rampart.toml");
        let topology = topology::DEFAULT_TOML
            .replace("127.80.0.", block)
            .replace("prefix = \"rampart\"", &format!("prefix = \"{prefix}\""))
            .replace(
                "subnet = \"10.80.0.0/24\"",
                &format!("subnet = \"{subnet}\""),
            );
        assert!(topology.contains(prefix) && topology.contains(subnet));
        // A low edge rate limit, so a short burst from one source crosses it for sure.
        let topology = topology
            .replace(
                "edge_new_connections_per_second = 200",
                "edge_new_connections_per_second = 20",
            )
            .replace(
                "edge_new_connections_burst = 400",
                "edge_new_connections_burst = 40",
            );
        std::fs::write(&file, topology).unwrap();
        Lab {
            _tmp: tmp,
            state,
            file,
            prefix: prefix.to_string(),
        }
    }

    /// `rampart up -d -f FILE` with no `--mode`: as root with ip and nft, netns.
    fn up(&self) -> Output {
        rampart(
            &self.state,
            &["up", "-d", "-f", self.file.to_str().unwrap()],
        )
    }

    fn run(&self, args: &[&str]) -> Output {
        rampart(&self.state, args)
    }

    fn status(&self) -> Value {
        let out = self.run(&["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// curl from the client namespace; returns the HTTP code ("000" when no connection).
    fn client_curl(&self, url: &str, ca: &str, max_seconds: u32) -> String {
        let out = self.run(&[
            "exec",
            "client",
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            &max_seconds.to_string(),
            "--cacert",
            ca,
            url,
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// What is left of this lab's network: namespaces, the operator interface,
    /// `/etc/netns` entries.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for l in String::from_utf8_lossy(&list.stdout).lines() {
            if l.starts_with(&format!("{}-", self.prefix)) {
                left.push(format!("namespace {l}"));
            }
        }
        let link = Command::new("ip")
            .args(["link", "show", "dev", &format!("{}0", self.prefix)])
            .output()
            .unwrap();
        if link.status.success() {
            left.push(format!("interface {}0", self.prefix));
        }
        if let Ok(rd) = std::fs::read_dir("/etc/netns") {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&format!("{}-", self.prefix)) {
                    left.push(format!("/etc/netns/{n}"));
                }
            }
        }
        left
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

/// The packet count of the named counter in `nft list table` output (0 when absent).
fn counter_packets(listing: &str, counter: &str) -> u64 {
    listing
        .split(&format!("counter {counter} {{"))
        .nth(1)
        .and_then(|s| s.split('}').next())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.trim().strip_prefix("packets "))
                .and_then(|rest| rest.split_whitespace().next())
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
}

fn host(status: &Value, name: &str) -> Value {
    status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no host {name} in {status}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_lab_serves_the_site_proves_its_firewalls_and_cleans_up() {
    if !netns_possible() {
        return;
    }
    let lab = Lab::new("rpt-e2e", "10.97.0.0/24", "127.97.0.");
    let started = Instant::now();
    let out = lab.up();
    let took = started.elapsed();
    assert!(out.status.success(), "up failed: {}", text(&out));
    eprintln!("rampart up (netns mode) took {:.1} s", took.as_secs_f64());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in netns mode"),
        "up says the mode: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("rampart exec client -- curl"), "{stdout}");

    // 1. status: netns mode, each host in its namespace at its subnet address.
    let status = lab.status();
    assert_eq!(status["mode"], "netns");
    for (name, addr) in [
        ("lb-01", "10.97.0.10"),
        ("web-01", "10.97.0.11"),
        ("web-02", "10.97.0.12"),
        ("mon-01", "10.97.0.20"),
    ] {
        let h = host(&status, name);
        assert_eq!(h["netns"], format!("rpt-e2e-{name}"), "{h}");
        assert_eq!(h["address"], addr, "{h}");
        assert_eq!(h["healthy"], true, "{h}");
    }
    let ca = status["ca_cert"].as_str().unwrap().to_string();
    let base = status["endpoints"]["https"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    assert_eq!(base, "https://www.foobar.com");

    // 2. The site from the client namespace (the Internet: names from its hosts file) ...
    assert_eq!(lab.client_curl(&format!("{base}/"), &ca, 5), "200");
    assert_eq!(
        lab.client_curl("http://www.foobar.com/x", &ca, 5),
        "301",
        "the HTTP listener redirects"
    );
    // ... and from this machine (the operator), verifying the chain, round robin.
    let ca_pem = std::fs::read(&ca).unwrap();
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .resolve(
            "www.foobar.com",
            SocketAddr::new("10.97.0.10".parse().unwrap(), 443),
        )
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut served_by = BTreeSet::new();
    for _ in 0..10 {
        let r = client.get(format!("{base}/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        served_by.insert(r.headers()["x-served-by"].to_str().unwrap().to_string());
    }
    assert_eq!(served_by.len(), 2, "{served_by:?}");
    // The guestbook writes through the primary across namespaces and firewalls.
    let r = client
        .post(format!("{base}/api/messages"))
        .json(&serde_json::json!({"author": "netns", "text": "across namespaces"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_u64().unwrap();
    let r = client
        .get(format!("{base}/api/messages/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // 3. The full probe matrix matches the policy.
    let out = lab.run(&["fw", "probe", "--json"]);
    assert!(out.status.success(), "probe: {}", text(&out));
    let probe: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(probe["unexpected_allowed"], 0, "{probe}");
    assert_eq!(probe["unexpected_denied"], 0, "{probe}");
    let rows = probe["results"].as_array().unwrap();
    assert!(rows.len() >= 100, "a full matrix: {}", rows.len());
    for r in rows {
        let (from, to, port) = (
            r["from"].as_str().unwrap(),
            r["to"].as_str().unwrap(),
            r["port"].as_u64().unwrap(),
        );
        let allowed = r["observed_allowed"].as_bool().unwrap();
        if from == "client" {
            // lb-01's 443 and 80 only; nothing of web-01, web-02, mon-01
            assert_eq!(allowed, to == "lb-01" && (port == 443 || port == 80), "{r}");
        }
        if port == 3306 && (to == "web-01" || to == "web-02") {
            // the application and database hosts, and the failover controller (mon-01)
            assert_eq!(
                allowed,
                from == "web-01" || from == "web-02" || from == "mon-01",
                "{r}"
            );
        }
    }
    // The same through the table output: a summary line.
    let out = lab.run(&["fw", "probe"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 unexpected allowed, 0 unexpected denied"),
        "{}",
        text(&out)
    );

    // 4. show / check / export.
    let out = lab.run(&["fw", "show", "web-01"]);
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && shown.contains("table inet rampart"),
        "{}",
        text(&out)
    );
    assert!(shown.contains("counter dropped_policy"), "{shown}");
    let out = lab.run(&["fw", "check"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = lab.run(&["fw", "export", "web-01"]);
    let exported = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        exported.contains("ip saddr { 10.97.0.10 } tcp dport 9443 accept"),
        "{exported}"
    );
    assert!(exported.starts_with("#!/usr/sbin/nft -f"), "{exported}");

    // 5. Drop counters rose on the denied probes and reach the monitor.
    let mut identity = std::fs::read(status["admin_cert"].as_str().unwrap()).unwrap();
    identity.extend(std::fs::read(status["admin_key"].as_str().unwrap()).unwrap());
    let admin = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let dashboard = status["endpoints"]["dashboard"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let doc: Value = admin
            .get(format!(
                "{dashboard}/api/v1/series?name=rampart_firewall_dropped_packets_total&host=web-01"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let dropped = doc["series"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["labels"]["reason"] == "policy")
            .filter_map(|s| s["samples"].as_array()?.last()?.get(1)?.as_f64())
            .fold(0.0, f64::max);
        if dropped > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web-01's policy drops never reached the monitor: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 6. A blocked address gets no connection to the edge until the block expires.
    let out = lab.run(&["fw", "block", "10.97.0.254", "--for", "4s"]);
    assert!(out.status.success(), "{}", text(&out));
    let blocked_at = Instant::now();
    assert_eq!(lab.client_curl(&format!("{base}/"), &ca, 2), "000");
    assert!(
        blocked_at.elapsed() < Duration::from_secs(4),
        "probe ran past the block"
    );
    // the operator is not blocked
    assert_eq!(
        client
            .get(format!("{base}/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab.client_curl(&format!("{base}/"), &ca, 2) != "200" {
        assert!(Instant::now() < deadline, "the block never expired");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        blocked_at.elapsed() >= Duration::from_secs(3),
        "expired too early"
    );
    let out = lab.run(&["fw", "show", "lb-01"]);
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    let blocked_packets = counter_packets(&shown, "dropped_blocked");
    assert!(blocked_packets > 0, "{shown}");

    // The per-source rate limit: 300 new connections at once from the client; SYNs past
    // 20/s (burst 40) are dropped and counted, and the client gets through again after.
    let flood = lab.run(&[
        "exec",
        "client",
        "--",
        "timeout",
        "4",
        "bash",
        "-c",
        "for i in $(seq 300); do (exec 3<>/dev/tcp/10.97.0.10/80) 2>/dev/null & done; wait",
    ]);
    let _ = flood; // `timeout` ends the connections that were dropped: its exit is 124
    let shown = String::from_utf8_lossy(&lab.run(&["fw", "show", "lb-01"]).stdout).to_string();
    let rate_drops = counter_packets(&shown, "dropped_rate");
    assert!(
        rate_drops > 0,
        "no SYN over the rate limit was dropped: {shown}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab.client_curl(&format!("{base}/"), &ca, 2) != "200" {
        assert!(Instant::now() < deadline, "the client stayed limited");
        std::thread::sleep(Duration::from_millis(300));
    }

    // 7. kill -9 web-01's node: the site keeps answering through web-02.
    let pid = host(&status, "web-01")["pid"].as_u64().unwrap();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_secs(5)).await;
    for _ in 0..10 {
        let r = client.get(format!("{base}/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-served-by"], "web-02");
    }
    // ... and the monitor raises HostDown for web-01 and BackendDown for lb-01.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let doc: Value = admin
            .get(format!("{dashboard}/api/v1/alerts"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let firing = |alert: &str, host: &str| {
            doc["active"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["alert"] == alert && a["host"] == host && a["state"] == "firing")
        };
        if firing("HostDown", "web-01") && firing("BackendDown", "lb-01") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "HostDown web-01 and BackendDown lb-01 did not fire: {}",
            doc["active"]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 8. down leaves no namespace, interface, /etc/netns entry or process.
    let out = lab.run(&["down"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    let procs = Command::new("pgrep")
        .args(["-f", lab.state.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&procs.stdout).trim().is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}

/// A crashed run (every process killed, nothing cleaned) leaves namespaces behind; the next
/// `up` sweeps them and comes up, and a namespace still in use is never swept.
#[test]
fn the_next_up_sweeps_a_crashed_run() {
    if !netns_possible() {
        return;
    }
    let lab = Lab::new("rpt-crash", "10.98.0.0/24", "127.98.0.");
    let out = lab.up();
    assert!(out.status.success(), "{}", text(&out));
    let status = lab.status();
    // The crash: SIGKILL every process of the lab, then forget its state directory.
    let pids = Command::new("pgrep")
        .args(["-f", lab.state.to_str().unwrap()])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(!lab.leftovers().is_empty(), "the crash leaves namespaces");
    std::fs::remove_dir_all(&lab.state).unwrap();

    let out = lab.up();
    assert!(out.status.success(), "up after a crash: {}", text(&out));
    assert_eq!(lab.status()["mode"], "netns");
    assert_ne!(
        host(&lab.status(), "lb-01")["pid"],
        host(&status, "lb-01")["pid"]
    );

    // Another lab with the same prefix must not sweep namespaces that are in use.
    let other = Lab::new("rpt-crash", "10.98.0.0/24", "127.98.0.");
    let out = other.up();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still has processes"),
        "{}",
        text(&out)
    );
    assert_eq!(lab.status()["hosts"][0]["healthy"], true);
    drop(other);
    let out = lab.run(&["down"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}
