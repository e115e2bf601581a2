//! `rampart lb`, the load balancer alone: the real binary in front of two HTTP backends
//! started by the test, with a self-signed certificate made here. Round robin, the redirect
//! listener, site names (421 for others), request ids, a backend that goes away, and a
//! clean stop on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rampart");

async fn backend(addr: &str, name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || async move { name });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// Starts `cmd` (a `rampart lb` command line) with its standard error piped and returns it
/// with the first line it writes there: "rampart lb: https on ADDR, http on ADDR, N worker
/// thread(s); ...".
fn start_lb(cmd: &mut Command) -> (std::process::Child, String) {
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

/// The address after `key` ("https on ", "http on ") in the first line of `rampart lb`.
fn addr_after(line: &str, key: &str) -> SocketAddr {
    line.split(key)
        .nth(1)
        .and_then(|s| s.split([',', ' ']).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"))
}

/// Writes a self-signed certificate for `params` and its key into `dir` (`cert.pem`,
/// `key.pem`) for `--tls-cert`/`--tls-key`; returns the certificate's PEM and both paths.
fn self_signed(
    dir: &std::path::Path,
    params: rcgen::CertificateParams,
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, &pem).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (pem, cert_path, key_path)
}

/// A self-signed certificate for `www.example.test` in `dir` (see [`self_signed`]).
fn example_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let params = rcgen::CertificateParams::new(vec!["www.example.test".to_string()]).unwrap();
    let (_, cert, key) = self_signed(dir, params);
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_lb_balances_redirects_checks_hosts_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![
        "www.example.test".to_string(),
        "other.example.test".to_string(),
    ])
    .unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.98.1.10".parse().unwrap()));
    let (cert_pem, cert_path, key_path) = self_signed(dir.path(), params);

    let (a, _a) = backend("127.98.1.11:0", "A").await;
    let (b, b_task) = backend("127.98.1.12:0", "B").await;
    let (mut child, line) = start_lb(
        Command::new(BIN)
            .args([
                "lb",
                "--listen",
                "127.98.1.10:0",
                "--http-listen",
                "127.98.1.10:0",
            ])
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .args(["--backend", &a.to_string(), "--backend", &b.to_string()])
            .args(["--site-name", "www.example.test", "--threads", "1"]),
    );
    let (https, http) = (
        addr_after(&line, "https on "),
        addr_after(&line, "http on "),
    );
    assert!(line.contains("1 worker thread"), "{line}");

    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .resolve("www.example.test", https)
        .resolve("other.example.test", https)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("https://www.example.test:{}/", https.port());
    // Both backends come up after their health checks (rise 2, every second).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "backends never both answered: {seen:?}"
        );
        if let Ok(r) = client.get(&url).send().await {
            if r.status() == 200 {
                assert!(r.headers().contains_key("x-request-id"));
                seen.insert(r.text().await.unwrap());
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen, BTreeSet::from(["A".to_string(), "B".to_string()]));
    // Strict round robin once both are up.
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(client.get(&url).send().await.unwrap().text().await.unwrap());
    }
    assert!(answers.windows(2).all(|w| w[0] != w[1]), "{answers:?}");
    // Another host name: 421.
    let r = client
        .get(format!("https://other.example.test:{}/", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    // The redirect listener.
    let plain = reqwest::Client::builder()
        .resolve("www.example.test", http)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = plain
        .get(format!("http://www.example.test:{}/p?q=1", http.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 301);
    assert_eq!(
        r.headers()["location"],
        format!("https://www.example.test:{}/p?q=1", https.port()).as_str()
    );
    // B goes away: after its health checks fail, every request goes to A.
    b_task.abort();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut a_in_a_row = 0;
    while a_in_a_row < 6 {
        assert!(Instant::now() < deadline, "traffic never settled on A");
        let body = match client.get(&url).send().await {
            Ok(r) if r.status() == 200 => r.text().await.ok(),
            _ => None,
        };
        if body.as_deref() == Some("A") {
            a_in_a_row += 1;
        } else {
            a_in_a_row = 0;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SIGTERM: drains and exits 0.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "rampart lb did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
}

/// `--http-proxy`: the HTTP listener forwards plain HTTP to the backends instead of
/// redirecting, and tells them the request came over `http`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_lb_proxies_plain_http_with_http_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = example_cert(dir.path());
    // The backend answers with the scheme the load balancer reported.
    let listener = tokio::net::TcpListener::bind("127.98.1.21:0")
        .await
        .unwrap();
    let backend = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
        format!(
            "{} {}",
            headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            headers
                .get("forwarded")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
        )
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let (mut child, line) = start_lb(
        Command::new(BIN)
            .args([
                "lb",
                "--listen",
                "127.98.1.20:0",
                "--http-listen",
                "127.98.1.20:0",
            ])
            .arg("--http-proxy")
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .args(["--backend", &backend.to_string(), "--threads", "1"]),
    );
    let http = addr_after(&line, "http on ");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("http://{http}/p?q=1");
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        assert!(
            Instant::now() < deadline,
            "the plain listener never proxied"
        );
        if let Ok(r) = client.get(&url).send().await {
            assert_ne!(r.status(), 301, "--http-proxy still redirects");
            if r.status() == 200 {
                break r.text().await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.starts_with("http for=127.0.0.1;proto=http"), "{body}");
    // Broken requests still get the load balancer's own 4xx on this listener.
    let r = client
        .get(format!("http://{http}/"))
        .header("host", "bad host")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let _ = child.kill();
    let _ = child.wait();
}

/// `curl --http2-prior-knowledge URL`: curl's exit code and `HTTP-VERSION STATUS`.
async fn curl_h2c(url: &str) -> (Option<i32>, String) {
    let out = tokio::process::Command::new("curl")
        .args(["--http2-prior-knowledge", "--silent", "--max-time", "10"])
        .args([
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_version} %{http_code}",
        ])
        .arg(url)
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `--h2c`: the proxying HTTP listener serves HTTP/2 with prior knowledge (curl
/// `--http2-prior-knowledge`) beside HTTP/1.1; without it, the same curl is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_lb_serves_h2c_on_the_plain_proxy_listener_only_with_h2c() {
    if !test_support::have_binary("curl") {
        return test_support::skip("curl is not installed (Debian package curl)");
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = example_cert(dir.path());
    let (backend, _task) = backend("127.98.2.11:0", "A").await;
    for h2c in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "lb",
            "--listen",
            "127.98.2.10:0",
            "--http-listen",
            "127.98.2.10:0",
            "--http-proxy",
        ])
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .args(["--backend", &backend.to_string(), "--threads", "1"]);
        if h2c {
            cmd.arg("--h2c");
        }
        let (mut child, line) = start_lb(&mut cmd);
        let http = addr_after(&line, "http on ");
        let url = format!("http://{http}/");
        // HTTP/1.1 works either way (once the backend's health check passed).
        let client = reqwest::Client::builder()
            .http1_only()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                Instant::now() < deadline,
                "the plain listener never proxied"
            );
            if let Ok(r) = client.get(&url).send().await {
                if r.status() == 200 {
                    assert_eq!(r.version(), reqwest::Version::HTTP_11);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (code, out) = curl_h2c(&url).await;
        println!("--h2c {h2c}: curl --http2-prior-knowledge exit {code:?}, {out:?}");
        if h2c {
            assert_eq!((code, out.as_str()), (Some(0), "2 200"));
        } else {
            // Closed without an answer: curl fails, no status.
            assert_ne!(code, Some(0), "HTTP/2 served without --h2c: {out:?}");
            assert!(out.ends_with(" 000"), "{out:?}");
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `--metrics-listen`: the standalone load balancer's registry on `GET /metrics` (per
/// backend answers by status class, backend health), readable only from `--metrics-allow`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_lb_serves_metrics_to_allowed_sources_only() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = example_cert(dir.path());
    let (backend, _task) = backend("127.98.3.11:0", "A").await;
    let (mut child, line) = start_lb(
        Command::new(BIN)
            .args(["lb", "--listen", "127.98.3.10:0"])
            .args(["--http-listen", "127.98.3.10:0", "--http-proxy"])
            .args(["--metrics-listen", "127.98.3.10:0"])
            .args(["--metrics-allow", "127.98.3.30/32"])
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .args(["--backend", &backend.to_string(), "--threads", "1"]),
    );
    let (http, metrics) = (
        addr_after(&line, "http on "),
        addr_after(&line, "metrics on "),
    );
    let client = client_from("127.98.3.30");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = 0;
    while answered < 3 {
        assert!(Instant::now() < deadline, "the backend never came up");
        match client.get(format!("http://{http}/")).send().await {
            Ok(r) if r.status() == 200 => answered += 1,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let r = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    assert_eq!(
        sample("rampart_lb_backend_responses_total{backend=\"b1\",code=\"2xx\"}"),
        3.0
    );
    assert_eq!(sample("rampart_backend_up{backend=\"b1\"}"), 1.0);
    // Another source is refused before any HTTP.
    let refused = client_from("127.98.3.31")
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A client whose connections leave from `source` (a loopback address), 5 s timeout.
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// `--trusted-proxy`: a request from a trusted proxy is logged as the client its
/// X-Forwarded-For names; from any other source the field is only a claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_lb_believes_x_forwarded_for_from_a_trusted_proxy_only() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = example_cert(dir.path());
    let log = dir.path().join("access.log");
    let (backend, _task) = backend("127.98.3.12:0", "A").await;
    let (mut child, line) = start_lb(
        Command::new(BIN)
            .args(["lb", "--listen", "127.98.3.10:0"])
            .args(["--http-listen", "127.98.3.10:0", "--http-proxy"])
            .args(["--trusted-proxy", "127.98.3.40/32"])
            .arg("--access-log")
            .arg(&log)
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .args(["--backend", &backend.to_string(), "--threads", "1"]),
    );
    let http = addr_after(&line, "http on ");
    let get_from = |source: &str, xff: &str| {
        client_from(source)
            .get(format!("http://{http}/"))
            .header("x-forwarded-for", xff)
            .send()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(get_from("127.98.3.40", "198.51.100.7").await, Ok(r) if r.status() == 200) {
        assert!(Instant::now() < deadline, "the backend never came up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = get_from("127.98.3.41", "198.51.100.9").await.unwrap();
    assert_eq!(r.status(), 200);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let served: Vec<&str> = text.lines().filter(|l| l.contains("\" 200 ")).collect();
        if served.len() >= 2 {
            break served.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        }
        assert!(Instant::now() < deadline, "no access log lines: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let n = text.len();
    assert!(text[n - 2].starts_with("198.51.100.7 "), "{text:?}");
    assert!(text[n - 1].starts_with("127.98.3.41 "), "{text:?}");
    let _ = child.kill();
    let _ = child.wait();
}
