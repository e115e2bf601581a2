//! End to end: `rampart up -d` on a topology of its own (addresses 127.96.0.0/16), then a
//! real HTTPS client that verifies the chain against the lab's CA checks the site, the
//! redirect, HSTS, round robin, the guestbook through the load balancer, the firewall,
//! the loss of web-01's node, and finally that `rampart down` leaves nothing behind. The
//! monitoring tests run labs of their own (127.97.0.0/16, 127.111.8.0/24).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_rampart");

fn rampart(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run rampart")
}

fn status_json(state: &Path) -> Value {
    let out = rampart(state, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is one JSON object")
}

/// A lab of the test's own: a temporary state directory and topology file. Dropping it
/// runs `rampart down`, so the lab stops even when an assertion fails half-way.
struct Lab {
    tmp: tempfile::TempDir,
    state: std::path::PathBuf,
    topo_path: std::path::PathBuf,
}

impl Lab {
    /// Writes `topology` and runs `rampart up -d -f` on it; returns the lab and up's output.
    fn up(topology: String) -> (Lab, std::process::Output) {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let topo_path = tmp.path().join("rampart.toml");
        std::fs::write(&topo_path, topology).unwrap();
        let lab = Lab {
            tmp,
            state,
            topo_path,
        };
        let out = lab.run_up(&lab.topo_path);
        (lab, out)
    }

    /// `rampart up -d -f FILE` on this lab's state directory.
    fn run_up(&self, file: &Path) -> std::process::Output {
        rampart(
            &self.state,
            &[
                "up",
                "--mode",
                "loopback",
                "-d",
                "-f",
                file.to_str().unwrap(),
            ],
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = rampart(&self.state, &["down"]);
    }
}

/// The host named `name` in a `status --json` object.
fn host(status: &Value, name: &str) -> Value {
    status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no host {name} in {status}"))
        .clone()
}

/// A client for the site through lb-01 as `status` describes it, trusting only the lab's CA.
fn lb_client(status: &Value) -> reqwest::Client {
    let lb = host(status, "lb-01");
    let addr = SocketAddr::new(
        lb["address"].as_str().unwrap().parse().unwrap(),
        lb["ports"]["https"].as_u64().unwrap() as u16,
    );
    let ca = std::fs::read(status["ca_cert"].as_str().unwrap()).unwrap();
    site_client(&ca, "www.foobar.com", addr)
}

fn site_client(ca_pem: &[u8], domain: &str, lb: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
        .resolve(domain, lb)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Listening TCP sockets (IPv4) on addresses inside 127.96.0.0/16, from /proc/net/tcp.
fn listeners_in_block() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, state) = (f.get(1)?, f.get(3)?);
            if *state != "0A" {
                return None;
            }
            let (ip_hex, port_hex) = local.split_once(':')?;
            let ip = u32::from_str_radix(ip_hex, 16).ok()?.to_le_bytes();
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            (ip[0] == 127 && ip[1] == 96)
                .then(|| format!("{}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3]))
        })
        .collect()
}

fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            (!zombie && cmd.contains(&needle)).then(|| format!("{pid}: {cmd}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_site_survives_a_dead_web_server_and_down_cleans_up() {
    let have_mariadb = test_support::have_binary("mariadbd");
    if !have_mariadb {
        test_support::skip("mariadbd is not installed: the data tier runs on SQLite and replica reads are not checked");
    }

    let (lab, out) = Lab::up(topology::DEFAULT_TOML.replace("127.80.0.", "127.96.0."));
    let state = lab.state.clone();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "rampart up failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("curl --cacert"),
        "up prints the curl line:\n{stdout}"
    );
    assert!(stdout.contains("--resolve www.foobar.com:"), "{stdout}");

    let status = status_json(&state);
    for key in [
        "mode",
        "state_dir",
        "ca_cert",
        "admin_cert",
        "admin_key",
        "site",
        "endpoints",
        "hosts",
        "db",
    ] {
        assert!(
            status.get(key).is_some(),
            "status --json lacks {key}: {status}"
        );
    }
    assert_eq!(status["mode"], "loopback");
    assert!(
        status["warnings"].to_string().contains("development mode"),
        "loopback mode is labelled: {status}"
    );
    assert_eq!(status["site"], "www.foobar.com");
    let hosts = status["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 4);
    for h in hosts {
        for key in [
            "name", "address", "netns", "pid", "roles", "healthy", "qps", "ports",
        ] {
            assert!(h.get(key).is_some(), "host lacks {key}: {h}");
        }
        assert!(h["netns"].is_null());
        assert_eq!(h["healthy"], true, "{h}");
    }
    assert_eq!(
        status["db"]["engine"],
        if have_mariadb { "mariadb" } else { "sqlite" }
    );
    assert_eq!(status["db"]["primary"], "web-01");
    if have_mariadb {
        let nodes = status["db"]["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 2, "{nodes:?}");
        for n in nodes {
            for key in ["host", "role", "pid", "port", "socket", "lag_seconds"] {
                assert!(n.get(key).is_some(), "db node lacks {key}: {n}");
            }
        }
    }

    // 2. The site over TLS verified against the generated CA, SNI www.foobar.com.
    let http_port = host(&status, "lb-01")["ports"]["http"].as_u64().unwrap() as u16;
    let lb_ip: std::net::IpAddr = host(&status, "lb-01")["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let client = lb_client(&status);
    let base = status["endpoints"]["https"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let mut served_by = BTreeSet::new();
    for _ in 0..20 {
        let r = client.get(format!("{base}/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let hsts = r
            .headers()
            .get("strict-transport-security")
            .expect("HSTS header");
        assert!(hsts.to_str().unwrap().contains("max-age="));
        served_by.insert(r.headers()["x-served-by"].to_str().unwrap().to_string());
        let body = r.text().await.unwrap();
        assert!(
            body.to_lowercase().contains("guestbook"),
            "the page is the guestbook"
        );
    }
    assert_eq!(
        served_by,
        BTreeSet::from(["web-01".to_string(), "web-02".to_string()])
    );
    // Every request gets an X-Request-Id (a client's own is kept) and the client sees it.
    let r = client.get(format!("{base}/")).send().await.unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let r = client
        .get(format!("{base}/"))
        .header("x-request-id", "e2e-trace-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "e2e-trace-1");

    let plain = reqwest::Client::builder()
        .resolve("www.foobar.com", SocketAddr::new(lb_ip, http_port))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let http_base = status["endpoints"]["http"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let r = plain
        .get(format!("{http_base}/some/path?q=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 301);
    let location = r.headers()["location"].to_str().unwrap();
    assert_eq!(location, format!("{base}/some/path?q=1"));

    // 3. A message posted through the LB reads back by id and in the list.
    let text = format!("hello from the end-to-end test {}", std::process::id());
    let r = client
        .post(format!("{base}/api/messages"))
        .json(&serde_json::json!({"author": "tester", "text": text}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let posted: Value = r.json().await.unwrap();
    let id = posted["id"].as_u64().expect("stored message has an id");
    let r = client
        .get(format!("{base}/api/messages/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got: Value = r.json().await.unwrap();
    assert_eq!(got["text"], text.as_str());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list: Value = client
            .get(format!("{base}/api/messages"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if list["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == id)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "message {id} never appeared in the list: {list}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bad = client
        .post(format!("{base}/api/messages"))
        .json(&serde_json::json!({"author": "", "text": "x"}))
        .send()
        .await
        .unwrap();
    assert!(
        bad.status() == 400 || bad.status() == 422,
        "empty author is rejected: {}",
        bad.status()
    );
    let whoami: Value = client
        .get(format!("{base}/api/whoami"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(whoami["db"]["write_node"], "web-01", "{whoami}");
    if have_mariadb {
        assert_eq!(whoami["db"]["read_node"], "web-02", "{whoami}");
        assert_eq!(whoami["db"]["engine"], "mariadb");
    }

    // 5. web-01's web port refuses sources other than lb-01.
    let web01_ip: std::net::IpAddr = host(&status, "web-01")["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let web_port = host(&status, "web-01")["ports"]["web"].as_u64().unwrap() as u16;
    let web01 = SocketAddr::new(web01_ip, web_port);
    for source in ["127.0.0.1", "127.96.0.12"] {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let src: SocketAddr = format!("{source}:0").parse().unwrap();
        sock.bind(&src.into()).unwrap();
        let refused = match sock.connect_timeout(&web01.into(), Duration::from_secs(2)) {
            Err(_) => true,
            Ok(()) => {
                let mut stream: TcpStream = sock.into();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut buf = [0u8; 1];
                // A TLS server waits for the ClientHello; a refused connection ends at once.
                matches!(stream.read(&mut buf), Ok(0) | Err(_))
            }
        };
        assert!(
            refused,
            "a connection from {source} to web-01's web port was not refused"
        );
    }

    // The probe matrix (every host and the operator -> every host x every port in use)
    // matches the policy in loopback mode too; loopback mode has no kernel firewall to
    // block with.
    let out = rampart(&state, &["fw", "probe", "--json"]);
    assert!(
        out.status.success(),
        "fw probe: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let probe: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(probe["mode"], "loopback");
    assert_eq!(probe["unexpected_allowed"], 0, "{probe}");
    assert_eq!(probe["unexpected_denied"], 0, "{probe}");
    assert!(probe["results"].as_array().unwrap().len() >= 100, "{probe}");
    let out = rampart(&state, &["fw", "block", "192.0.2.1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("netns mode"));

    // 4. kill -9 web-01's node: within 5 s every request succeeds through web-02.
    let web01_pid = host(&status, "web-01")["pid"].as_u64().unwrap() as i32;
    let killed = Command::new("kill")
        .args(["-9", &web01_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut early_failures = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        match client.get(format!("{base}/")).send().await {
            Ok(r) if r.status() == 200 => {}
            _ => early_failures += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("requests failed in the first 5 s after the kill: {early_failures}");
    for _ in 0..20 {
        let r = client.get(format!("{base}/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-served-by"], "web-02");
    }
    // The outage raises alerts: HostDown for web-01, BackendDown for lb-01.
    let admin = admin_client(&status);
    let api = status["endpoints"]["monitor_api"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    wait_firing(
        &admin,
        &format!("{api}/alerts"),
        &[("HostDown", "web-01"), ("BackendDown", "lb-01")],
        Duration::from_secs(30),
    )
    .await;

    // status reports the dead node, and the monitor still gives the others' QPS (web-01's
    // pushes have stopped: its QPS is unknown, not zero).
    let after = status_json(&state);
    let after_host = |name: &str| host(&after, name);
    assert_eq!(after_host("web-01")["healthy"], false, "{after}");
    assert!(after_host("web-01")["pid"].is_null(), "{after}");
    // web-02's node runs; its replica has lost the primary (web-01's relay died with the
    // node), so web-02 itself may report unhealthy until failover exists.
    assert!(after_host("web-02")["pid"].is_number(), "{after}");
    assert!(after_host("lb-01")["qps"].is_number(), "{after}");
    assert!(after_host("web-01")["qps"].is_null(), "{after}");

    // `up` again starts only what is missing: web-01 comes back, its primary takes writes.
    let out = lab.run_up(&lab.topo_path);
    assert!(
        out.status.success(),
        "up after the kill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = status_json(&state);
    for h in again["hosts"].as_array().unwrap() {
        assert_eq!(h["healthy"], true, "{h}");
    }
    let back = host(&again, "web-01");
    assert_ne!(back["pid"].as_u64(), Some(web01_pid as u64));
    let r = client
        .post(format!("{base}/api/messages"))
        .json(&serde_json::json!({"author": "tester", "text": "after the restart"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut served_by = BTreeSet::new();
    for _ in 0..4 {
        let r = client.get(format!("{base}/")).send().await.unwrap();
        served_by.insert(r.headers()["x-served-by"].to_str().unwrap().to_string());
    }
    assert_eq!(
        served_by.len(),
        2,
        "both web servers answer again: {served_by:?}"
    );
    // A different topology on top of the running lab is refused.
    let other = lab.tmp.path().join("other.toml");
    std::fs::write(
        &other,
        topology::DEFAULT_TOML.replace("127.80.0.", "127.96.1."),
    )
    .unwrap();
    let out = lab.run_up(&other);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("different topology"));

    // 8. down leaves no process of ours and no listening port in our block.
    let out = rampart(&state, &["down"]);
    assert!(
        out.status.success(),
        "down failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let procs = processes_mentioning(&state);
    assert!(procs.is_empty(), "processes left after down: {procs:?}");
    let ports = listeners_in_block();
    assert!(
        ports.is_empty(),
        "listening sockets left after down: {ports:?}"
    );
}

/// Polls the monitor's `/alerts` document at `url` every 500 ms until every
/// `(alertname, host)` of `want` is firing; panics with the last document after `timeout`.
async fn wait_firing(admin: &reqwest::Client, url: &str, want: &[(&str, &str)], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let doc: Value = admin.get(url).send().await.unwrap().json().await.unwrap();
        let firing = |alert: &str, host: &str| {
            doc["active"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["alert"] == alert && a["host"] == host && a["state"] == "firing")
        };
        if want.iter().all(|(alert, host)| firing(alert, host)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{want:?} did not all fire within {timeout:?}: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn admin_client(status: &Value) -> reqwest::Client {
    let ca = std::fs::read(status["ca_cert"].as_str().unwrap()).unwrap();
    let mut identity = std::fs::read(status["admin_cert"].as_str().unwrap()).unwrap();
    identity.extend(std::fs::read(status["admin_key"].as_str().unwrap()).unwrap());
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Sends GET `url` through the load balancer from four concurrent loops at `rate`
/// requests/s in all, until `stop` is set or `limit` passes. Returns the requests answered
/// 200 and the time taken, so callers compare against the rate really achieved.
async fn load(
    client: &reqwest::Client,
    url: &str,
    rate: u32,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> (u32, Duration) {
    const WORKERS: u32 = 4;
    let start = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (client, url, stop) = (client.clone(), url.to_string(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1) * WORKERS / rate);
                let mut ok = 0;
                while start.elapsed() < limit && !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    if let Ok(r) = client.get(&url).send().await {
                        ok += u32::from(r.status() == 200);
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for w in workers {
        ok += w.await.unwrap();
    }
    (ok, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_qps_follows_the_load_and_the_qps_alert_fires_and_resolves() {
    // A low threshold so a modest, bounded load crosses it: the load balancer sees all of
    // it (40 req/s > 30), each web server half (20 req/s, not above).
    let topo = topology::DEFAULT_TOML
        .replace("127.80.0.", "127.97.0.")
        .replace("threshold_rps = 100.0", "threshold_rps = 30.0")
        .replace("for_seconds = 10", "for_seconds = 3")
        .replace("clear_rps = 80.0", "clear_rps = 10.0")
        .replace("window_seconds = 10", "window_seconds = 5");
    let (lab, out) = Lab::up(topo);
    let state = lab.state.clone();
    assert!(
        out.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = status_json(&state);
    assert_eq!(
        status["hosts"][0]["name"], "lb-01",
        "hosts in topology order"
    );
    let ca = std::fs::read(status["ca_cert"].as_str().unwrap()).unwrap();
    let site = lb_client(&status);
    let url = status["endpoints"]["https"].as_str().unwrap().to_string();
    let admin = admin_client(&status);
    let api = status["endpoints"]["monitor_api"]
        .as_str()
        .unwrap()
        .to_string();

    // The dashboard needs the admin certificate: with it, the page; without, no access.
    let page = admin
        .get(status["endpoints"]["dashboard"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("/assets/uPlot.iife.min.js") && html.contains("/api/v1/query_range"),
        "the dashboard draws charts from the Prometheus API"
    );
    let anonymous = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let denied = anonymous
        .get(status["endpoints"]["dashboard"].as_str().unwrap())
        .send()
        .await;
    assert!(
        denied.map(|r| r.status() == 403).unwrap_or(true),
        "no client certificate, no dashboard"
    );

    // Every agent's /metrics: the classic text format 0.0.4 unless OpenMetrics is asked
    // for, and promtool accepts it.
    let promtool = test_support::find_binary("promtool");
    if promtool.is_none() {
        test_support::skip(
            "promtool is not installed (apt-get install prometheus): /metrics is not linted",
        );
    }
    for h in status["hosts"].as_array().unwrap() {
        let Some(port) = h["ports"]["agent"].as_u64() else {
            continue;
        };
        let url = format!("https://{}:{port}/metrics", h["address"].as_str().unwrap());
        let r = admin.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = r.text().await.unwrap();
        assert!(!text.contains("# EOF"), "{text}");
        if let Some(promtool) = &promtool {
            let mut child = Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics on {url}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let r = admin
            .get(&url)
            .header("accept", "application/openmetrics-text; version=1.0.0")
            .send()
            .await
            .unwrap();
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
        assert!(r.text().await.unwrap().ends_with("# EOF\n"));
    }

    // 40 req/s for 8 s: the 5 s rate window is full of it. The reference is the rate the
    // load really achieved (a busy machine may fall short of 40).
    let (answered, took) = load(&site, &url, 40, Duration::from_secs(8), Arc::default()).await;
    assert!(answered > 100, "only {answered} requests answered");
    let rate = f64::from(answered) / took.as_secs_f64();
    let status = status_json(&state);
    let qps = |name: &str| {
        host(&status, name)["qps"]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} has no qps: {status}"))
    };
    let within = |got: f64, want: f64| (got - want).abs() <= 0.2 * want;
    assert!(
        within(qps("lb-01"), rate),
        "lb-01 qps {} for {rate} req/s sent",
        qps("lb-01")
    );
    assert!(
        within(qps("web-01"), rate / 2.0),
        "web-01 qps {}",
        qps("web-01")
    );
    assert!(
        within(qps("web-02"), rate / 2.0),
        "web-02 qps {}",
        qps("web-02")
    );

    // Keep the load on until the alert fires for lb-01 (bounded), then stop and wait for it
    // to resolve.
    let alerts = |admin: reqwest::Client, api: String| async move {
        admin
            .get(format!("{api}alerts"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let fired = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (fired, admin, api) = (fired.clone(), admin.clone(), api.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let a = alerts(admin.clone(), api.clone()).await;
                let firing = a["alerts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["host"] == "lb-01" && x["state"] == "firing");
                if firing {
                    fired.store(true, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    load(&site, &url, 40, Duration::from_secs(30), fired.clone()).await;
    watcher.await.unwrap();
    assert!(
        fired.load(Ordering::SeqCst),
        "the QPS alert never fired for lb-01"
    );
    let firing = status_json(&state);
    assert_eq!(
        firing["hosts"][0]["alert"], "firing",
        "status shows the alert: {firing}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = alerts(admin.clone(), api.clone()).await;
        let resolved = a["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["host"] == "lb-01" && e["event"] == "resolved");
        if resolved {
            let events: Vec<&Value> = a["history"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["host"] == "lb-01")
                .collect();
            assert_eq!(
                events.first().map(|e| e["event"].clone()),
                Some(Value::from("firing")),
                "{events:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the alert did not resolve after the load stopped: {a}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Each web server saw half the load: 20 req/s is not above 30, so they never fired.
    let a = alerts(admin.clone(), api.clone()).await;
    assert!(
        !a["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["host"] != "lb-01"),
        "{a}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_mariadb_the_guestbook_runs_on_sqlite_with_a_warning() {
    let topo = topology::DEFAULT_TOML
        .replace("127.80.0.", "127.95.0.")
        .replace("engine = \"auto\"", "engine = \"sqlite\"");
    let (lab, out) = Lab::up(topo);
    let state = lab.state.clone();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("WARNING") && stdout.contains("no replication"),
        "up warns:\n{stdout}"
    );

    let status = status_json(&state);
    assert_eq!(status["db"]["engine"], "sqlite");
    assert!(status["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w.as_str().unwrap().contains("no replication")));
    let table = String::from_utf8_lossy(&rampart(&state, &["status"]).stdout).to_string();
    assert!(table.contains("WARNING"), "status warns:\n{table}");

    let client = lb_client(&status);
    let base = status["endpoints"]["https"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let posted: Value = client
        .post(format!("{base}/api/messages"))
        .json(&serde_json::json!({"author": "sqlite", "text": "one file, both servers"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = posted["id"].as_u64().unwrap();
    // Both web servers read the same file: every one of a few reads finds the message.
    let mut served_by = BTreeSet::new();
    for _ in 0..4 {
        let r = client
            .get(format!("{base}/api/messages/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        served_by.insert(r.headers()["x-served-by"].to_str().unwrap().to_string());
    }
    assert_eq!(served_by.len(), 2, "{served_by:?}");
    let whoami: Value = client
        .get(format!("{base}/api/whoami"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(whoami["db"]["engine"], "sqlite");
}

/// A client holding `name`'s host certificate from the lab's PKI, connecting from the
/// host's own address (the monitor's ingest admits agent hosts only).
fn host_client(status: &Value, name: &str) -> reqwest::Client {
    let state = Path::new(status["state_dir"].as_str().unwrap());
    let hosts = state.join("pki").join("hosts");
    let ca = std::fs::read(status["ca_cert"].as_str().unwrap()).unwrap();
    let mut identity = std::fs::read(hosts.join(format!("{name}.pem"))).unwrap();
    identity.extend(std::fs::read(hosts.join(format!("{name}.key"))).unwrap());
    let from: std::net::IpAddr = host(status, name)["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .local_address(from)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// `/api/v1/query_range` (POST, form parameters, as Grafana sends it): each result
/// series' labels and `(time, value)` points.
async fn query_range(
    admin: &reqwest::Client,
    api: &str,
    query: &str,
    (start, end, step): (f64, f64, f64),
) -> Vec<(Value, Vec<(f64, f64)>)> {
    let doc: Value = admin
        .post(format!("{api}query_range"))
        .form(&[
            ("query", query.to_string()),
            ("start", format!("{start:.3}")),
            ("end", format!("{end:.3}")),
            ("step", step.to_string()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["status"], "success", "{query}: {doc}");
    doc["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let pts = s["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p[0].as_f64().unwrap(),
                        p[1].as_str().unwrap().parse().unwrap(),
                    )
                })
                .collect();
            (s["metric"].clone(), pts)
        })
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Waits (at most `limit`) until the node process `pid` has exited.
async fn wait_exited(pid: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
        assert!(Instant::now() < deadline, "node {pid} did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_zombie(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The monitoring pipeline end to end on one lab (127.111.8.0/24):
/// 1. a steady, bounded load through the load balancer; a Grafana-style range query of the
///    site's QPS returns the rate the load generator measured (median of the steady
///    window's points, within 10 %), and HighQPS, set just under that load, does not flap
///    (at most one firing, no resolved while the load lasts);
/// 2. mon-01's node killed with SIGKILL and brought back by `up` keeps every sample it had
///    snapshotted; stopped with SIGTERM and brought back, it keeps the whole hour;
/// 3. killing both web servers' nodes fires BackendDown and SiteUnavailable for lb-01.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_queries_match_the_load_the_monitor_survives_restarts_and_a_dead_site_alerts() {
    // A second site certificate that ends in 2 days, served by SNI.
    let certs = tempfile::tempdir().unwrap();
    let short_after = {
        let mut params = rcgen::CertificateParams::new(vec!["short.foobar.com".into()]).unwrap();
        let now = rcgen::date_time_ymd(2000, 1, 1);
        params.not_before = now;
        let after = std::time::SystemTime::now() + Duration::from_secs(2 * 86_400);
        params.not_after = after.into();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(certs.path().join("short.pem"), cert.pem()).unwrap();
        std::fs::write(certs.path().join("short.key"), key.serialize_pem()).unwrap();
        after
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    // HighQPS just under the 40 req/s load: the load balancer's QPS hovers around it.
    let topo = topology::DEFAULT_TOML
        .replace(
            "# [[site.tls.certificates]]\n# cert = \"certs/shop.example.pem\"\n# key = \"certs/shop.example.key\"",
            &format!(
                "[[site.tls.certificates]]\ncert = {:?}\nkey = {:?}",
                certs.path().join("short.pem"),
                certs.path().join("short.key")
            ),
        )
        .replace("127.80.0.", "127.111.8.")
        .replace("threshold_rps = 100.0", "threshold_rps = 38.0")
        .replace("for_seconds = 10", "for_seconds = 3")
        .replace("clear_rps = 80.0", "clear_rps = 25.0")
        .replace("window_seconds = 10", "window_seconds = 5");
    let (lab, out) = Lab::up(topo);
    let state = lab.state.clone();
    assert!(
        out.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = status_json(&state);
    let site = lb_client(&status);
    let url = status["endpoints"]["https"].as_str().unwrap().to_string();
    let admin = admin_client(&status);
    let api = status["endpoints"]["monitor_api"]
        .as_str()
        .unwrap()
        .to_string();

    // 1. 40 req/s for 24 s.
    let began = unix_now();
    let (answered, took) = load(&site, &url, 40, Duration::from_secs(24), Arc::default()).await;
    let ended = began + took.as_secs_f64();
    assert!(answered > 400, "only {answered} requests answered");
    let measured = f64::from(answered) / took.as_secs_f64();
    // The agents push every second; wait for the last second's push.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The dashboard's QPS query with a 10 s window, over the steady part of the load (its
    // first full window to its last second).
    let series = query_range(
        &admin,
        &api,
        "sum by (instance) (rate(rampart_http_requests_total[10s]))",
        (began + 11.0, ended - 1.0, 1.0),
    )
    .await;
    let qps_of = |instance: &str| -> Vec<f64> {
        series
            .iter()
            .find(|(m, _)| m["instance"] == instance)
            .unwrap_or_else(|| panic!("no QPS series for {instance}: {series:?}"))
            .1
            .iter()
            .map(|p| p.1)
            .collect()
    };
    let median = |mut v: Vec<f64>| {
        assert!(!v.is_empty());
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let lb = qps_of("lb-01");
    assert!(lb.len() >= 8, "{lb:?}");
    let site_qps = median(lb.clone());
    eprintln!(
        "load generator: {answered} answered in {:.1} s = {measured:.2} req/s; \
         query_range median for lb-01 {site_qps:.2} req/s (points {lb:?}); web-01 {:.2}, web-02 {:.2}",
        took.as_secs_f64(),
        median(qps_of("web-01")),
        median(qps_of("web-02")),
    );
    assert!(
        (site_qps - measured).abs() <= 0.1 * measured,
        "the range query says {site_qps:.2} req/s, the load generator measured {measured:.2}"
    );
    // No flapping: HighQPS for lb-01 fired at most once and never resolved under the load.
    let doc: Value = admin
        .get(format!("{api}alerts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events: Vec<&Value> = doc["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["alert"] == "HighQPS" && e["host"] == "lb-01")
        .filter(|e| e["at"].as_f64().is_some_and(|at| at <= ended))
        .collect();
    eprintln!("HighQPS events for lb-01 under the load: {events:?}");
    let count = |event: &str| events.iter().filter(|e| e["event"] == event).count();
    assert!(count("firing") <= 1, "HighQPS flapped: {events:?}");
    assert_eq!(count("resolved"), 0, "HighQPS flapped: {events:?}");

    // The certificates' not-after times reached the monitor through the agents: the
    // load balancer's two site certificates, every agent host's own.
    let now = unix_now();
    let certs = query_range(
        &admin,
        &api,
        "rampart_tls_certificate_not_after_timestamp_seconds",
        (now, now, 1.0),
    )
    .await;
    let not_after = |instance: &str, role: &str, certificate: &str| {
        certs
            .iter()
            .find(|(m, _)| {
                m["instance"] == instance && m["role"] == role && m["certificate"] == certificate
            })
            .map(|(_, pts)| pts[0].1)
            .unwrap_or_else(|| {
                panic!("no {role} certificate {certificate} of {instance}: {certs:?}")
            })
    };
    assert_eq!(
        not_after("lb-01", "lb", "short.foobar.com") as u64,
        short_after,
        "the short-lived certificate's notAfter"
    );
    assert!(not_after("lb-01", "lb", "www.foobar.com") > now + 14.0 * 86_400.0);
    for h in ["lb-01", "web-01", "web-02"] {
        assert!(not_after(h, "node", &format!("host/{h}")) > now);
    }

    // 2. An hour of a probe series, pushed as lb-01 in two halves around a SIGKILL.
    let pusher = host_client(&status, "lb-01");
    let mon = host(&status, "mon-01");
    let ingest = format!(
        "https://{}:{}/api/v1/push",
        mon["address"].as_str().unwrap(),
        mon["ports"]["ingest"].as_u64().unwrap()
    );
    let end = unix_now().floor() - 1.0;
    let start = end - 3_599.0;
    let half = |from: u32, to: u32| {
        (from..to)
            .map(|i| {
                format!(
                    "rampart_restart_probe_total {} {}\n",
                    i * 5,
                    (start as i64 + i64::from(i)) * 1000
                )
            })
            .collect::<String>()
    };
    let push = |body: String| {
        let (pusher, ingest) = (pusher.clone(), ingest.clone());
        async move {
            let r = pusher.post(&ingest).body(body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    // Samples stored in the hour (a range query would repeat the last one for the 5 min
    // lookback).
    let probe_points = |admin: reqwest::Client, api: String| async move {
        let s = query_range(
            &admin,
            &api,
            "count_over_time(rampart_restart_probe_total[1h])",
            (end, end, 1.0),
        )
        .await;
        s.first().map_or(0, |(_, pts)| pts[0].1 as u32)
    };
    let got = push(half(0, 1_800)).await;
    assert_eq!(got["accepted"], 1_800, "{got}");
    let acked = std::time::SystemTime::now();
    // Wait for the next periodic snapshot (every 10 s) after the first half was stored.
    let snapshot = state.join("hosts").join("mon-01").join("monitor.snapshot");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&snapshot)
        .and_then(|m| m.modified())
        .map_or(true, |m| m <= acked)
    {
        assert!(
            Instant::now() < deadline,
            "no snapshot written after the push"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The second half, then at once SIGKILL.
    let got = push(half(1_800, 3_600)).await;
    assert_eq!(got["accepted"], 1_800, "{got}");
    let mon_pid = mon["pid"].as_u64().unwrap();
    let killed = Command::new("kill")
        .args(["-9", &mon_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_exited(mon_pid, Duration::from_secs(10)).await;
    let out = lab.run_up(&lab.topo_path);
    assert!(
        out.status.success(),
        "up after the SIGKILL: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept = probe_points(admin.clone(), api.clone()).await;
    eprintln!("after SIGKILL: {kept} of 3600 probe samples kept (the first 1800 were snapshotted)");
    // Ingest and snapshot each take the store's lock: the second half is in the
    // snapshot whole or not at all; the first half always.
    assert!(kept == 1_800 || kept == 3_600, "{kept} samples kept");
    if kept == 1_800 {
        let got = push(half(1_800, 3_600)).await;
        assert_eq!(got["accepted"], 1_800, "{got}");
    }
    // SIGTERM: the node stops its roles, the monitor writes its last snapshot.
    let mon_pid = host(&status_json(&state), "mon-01")["pid"]
        .as_u64()
        .unwrap();
    let stopped = Command::new("kill")
        .args(["-TERM", &mon_pid.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    wait_exited(mon_pid, Duration::from_secs(30)).await;
    let out = lab.run_up(&lab.topo_path);
    assert!(
        out.status.success(),
        "up after the SIGTERM: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        probe_points(admin.clone(), api.clone()).await,
        3_600,
        "the last hour after a graceful restart"
    );

    // 3. Both web servers' nodes killed: the site has no backend left.
    let status = status_json(&state);
    for name in ["web-01", "web-02"] {
        let pid = host(&status, name)["pid"].as_u64().unwrap();
        let killed = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }
    wait_firing(
        &admin,
        &format!("{api}alerts"),
        &[("BackendDown", "lb-01"), ("SiteUnavailable", "lb-01")],
        Duration::from_secs(40),
    )
    .await;
    let r = site.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503, "no backend left");
}
