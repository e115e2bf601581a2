//! `rampart agent`, the monitoring agent alone: the real binary serving `/metrics` on
//! 127.112.1.1 to real HTTP clients (reqwest, and curl where installed), the format
//! negotiated from `Accept`, `promtool check metrics` on the classic format, scrapers
//! outside `--allow` refused; and pushing over mutual TLS to a monitoring service started
//! in-process, which stores the pushes under the certificate's host.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use test_support::{eventually, topology_in_block, TestPki};

const BIN: &str = env!("CARGO_BIN_EXE_rampart");
const WAIT: Duration = Duration::from_secs(30);

/// Kills the child on drop, so a failing assertion leaves no process behind.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `rampart agent ARGS`, returns it and its `/metrics` address (from its first
/// stderr line).
fn start(args: &[&str]) -> (Agent, SocketAddr) {
    let mut child = Command::new(BIN)
        .arg("agent")
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The first line that is not a log line (RUST_LOG may add some before it).
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 || line.starts_with("rampart agent:") {
            break;
        }
    }
    let agent = Agent(child);
    // "rampart agent: /metrics on http://ADDR/metrics; ..."
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (agent, addr)
}

fn client(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(Some(from.parse::<IpAddr>().unwrap()))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn promtool(text: &str) -> Option<(bool, String)> {
    let Some(promtool) = test_support::find_binary("promtool") else {
        test_support::skip("promtool is not installed (apt-get install prometheus): not linted");
        return None;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Some((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_metrics_like_node_exporter() {
    let (_agent, addr) = start(&["--listen", "127.112.1.1:0", "--allow", "127.112.1.2"]);
    let url = format!("http://{addr}/metrics");
    let ok = client("127.112.1.2");

    // The classic text format by default, which promtool accepts.
    let r = ok.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    for family in [
        "# TYPE rampart_host_cpu_seconds_total counter",
        "# TYPE rampart_host_disk_io_time_seconds_total counter",
        "# TYPE rampart_host_tcp_connections gauge",
        "# TYPE process_resident_memory_bytes gauge",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    assert!(!text.contains("# EOF"));
    if let Some((passed, report)) = promtool(&text) {
        assert!(passed, "promtool check metrics:\n{report}");
    }

    // OpenMetrics for a scraper that asks as Prometheus does.
    let r = ok
        .get(&url)
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(r.text().await.unwrap().ends_with("# EOF\n"));

    // curl, where installed, gets the same.
    if test_support::have_binary("curl") {
        let out = Command::new("curl")
            .args(["-sS", "--interface", "127.112.1.2", "-D", "-", &url])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("rampart_host_load1 "), "{out}");
    } else {
        test_support::skip("curl is not installed: only reqwest scraped");
    }

    // A source outside --allow gets no answer.
    let refused = client("127.112.1.3").get(&url).send().await;
    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_over_mutual_tls_to_a_monitor() {
    let t = topology_in_block(112);
    let pki = TestPki::new(t.clone());
    // mon-01 of the test topology, its ingest open to this machine's loopback sources
    // (the standalone agent connects from 127.0.0.1), identities still checked.
    let mut policy = topology::Policy::compile(&t);
    for r in &mut policy.rules {
        if r.service == topology::Service::Ingest {
            r.sources = topology::Sources::Any;
        }
    }
    let mon_addr = t.host("mon-01").unwrap().address;
    let net = firewall::Net::loopback("mon-01", mon_addr, Arc::new(policy), t.limits.clone());
    let mut mcfg =
        monitor::MonitorConfig::from_topology(&t, "mon-01", pki.paths.clone(), net).unwrap();
    mcfg.port = 0;
    let mon = monitor::start_monitor(mcfg).await.unwrap();

    let spool = tempfile::tempdir().unwrap();
    let url = format!("https://mon-01:{}/api/v1/push", mon.addr().port());
    let connect = mon.addr().to_string();
    let p = &pki.paths;
    let (_agent, _) = start(&[
        "--listen",
        "127.112.1.1:0",
        "--push",
        &url,
        "--connect",
        &connect,
        "--cert",
        p.host_cert("web-02").to_str().unwrap(),
        "--key",
        p.host_key("web-02").to_str().unwrap(),
        "--ca",
        p.ca_cert().to_str().unwrap(),
        "--interval",
        "500ms",
        "--spool-dir",
        spool.path().to_str().unwrap(),
    ]);
    let state = mon.state();
    eventually("web-02's pushes stored at mon-01", WAIT, || async {
        let ingest = state.ingest_stats();
        let series = ingest.get("web-02")?.series;
        // Host metrics, plus the agent's own push counters.
        (series > 20).then_some(())
    })
    .await;
}

#[test]
fn monitor_export_writes_the_three_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["monitor", "export"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for f in monitor::export::FILES {
        let text = std::fs::read_to_string(dir.path().join("out").join(f)).unwrap();
        assert!(!text.is_empty(), "{f}");
    }
    let yml = std::fs::read_to_string(dir.path().join("out/prometheus.yml")).unwrap();
    // Absolute certificate paths under the state directory.
    let admin = dir.path().join("state/pki/admin.pem");
    assert!(
        yml.contains(&format!("{:?}", admin.display().to_string())),
        "{yml}"
    );
}

/// Stops the test's Prometheus on drop.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's Prometheus, started here with its remote-write receiver on a loopback port and
/// its own temporary storage, receives the agent's samples (remote-write 1.0: snappy
/// protobuf) and answers them from its query API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_write_reaches_prometheus() {
    let Some(prometheus) = test_support::find_binary("prometheus") else {
        test_support::skip("prometheus is not installed (apt-get install prometheus)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(&config, "global:\n  scrape_interval: 15s\n").unwrap();
    // A free port on this test's own address.
    let port = std::net::TcpListener::bind("127.112.3.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.112.3.1:{port}");
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prom = Prometheus(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--web.enable-remote-write-receiver")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let (_agent, _) = start(&[
        "--listen",
        "127.112.3.2:0",
        "--remote-write",
        &format!("http://{listen}/api/v1/write"),
        "--instance",
        "rw-test",
        "--interval",
        "1s",
    ]);
    let http = client("127.112.3.2");
    let query = |q: &'static str| {
        let http = http.clone();
        let listen = listen.clone();
        async move {
            let doc: serde_json::Value = http
                .get(format!("http://{listen}/api/v1/query"))
                .query(&[("query", q)])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let result = doc["data"]["result"].as_array()?.clone();
            (!result.is_empty()).then_some(result)
        }
    };
    let load = eventually(
        "the agent's samples in Prometheus",
        Duration::from_secs(60),
        || query("rampart_host_load1{instance=\"rw-test\",job=\"rampart-agent\"}"),
    )
    .await;
    assert_eq!(load.len(), 1, "{load:?}");
    // Counters with labels arrive as series too, and keep arriving: the counter's rate
    // over the samples written so far is defined.
    let cpu = eventually("CPU counters with a rate", Duration::from_secs(60), || {
        query("rate(rampart_host_cpu_seconds_total{instance=\"rw-test\",mode=\"idle\"}[1m])")
    })
    .await;
    assert_eq!(cpu.len(), 1, "{cpu:?}");
}
