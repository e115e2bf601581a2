//! `rampart lb` with balancing flags and its runtime controls: the real binary in front of
//! three HTTP backends started by the test (127.113.1.0/24), `--balance
//! weighted-round-robin` with a weight and a backup, then `rampart lb drain|enable|status
//! --socket` against its admin socket.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rampart");

async fn backend(addr: &str, name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || async move { name });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// Runs `rampart lb <args>` (a control subcommand) to completion: (exit code, stdout,
/// stderr).
fn control(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).arg("lb").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills the child on drop, so a failed assertion leaves no process behind.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn counts(client: &reqwest::Client, url: &str, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        *seen.entry(r.text().await.unwrap()).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_backup_and_runtime_drain_through_the_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let params = rcgen::CertificateParams::new(vec!["www.example.test".to_string()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let socket = dir.path().join("admin.sock");

    let a = backend("127.113.1.11:0", "A").await;
    let b = backend("127.113.1.12:0", "B").await;
    let c = backend("127.113.1.13:0", "C").await;
    // A bad algorithm name is a usage error.
    let (code, _, err) = control(&[
        "--listen",
        "127.113.1.10:0",
        "--tls-cert",
        "x",
        "--tls-key",
        "y",
        "--backend",
        "127.0.0.1:1",
        "--balance",
        "fastest",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("least-connections"), "{err}");

    let mut child = Child(
        Command::new(BIN)
            .args(["lb", "--listen", "127.113.1.10:0"])
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .args(["--balance", "weighted-round-robin"])
            .args(["--backend", &format!("{a},weight=3")])
            .args(["--backend", &b.to_string()])
            .args(["--backend", &format!("{c},backup")])
            .arg("--admin-socket")
            .arg(&socket)
            .args(["--threads", "1"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let https: SocketAddr = line
        .split("https on ")
        .nth(1)
        .and_then(|s| s.split([',', ' ']).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap())
        .resolve("www.example.test", https)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("https://www.example.test:{}/", https.port());

    let status = |socket: &Path| control(&["status", "--socket", socket.to_str().unwrap()]);
    // Every backend up (rise 2 at one check a second).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = status(&socket);
        if code == 0 && out.lines().filter(|l| l.contains(" true ")).count() >= 3 {
            let up: Vec<&str> = out.lines().skip(2).collect();
            if up
                .iter()
                .all(|l| l.split_whitespace().nth(1) == Some("true"))
            {
                println!("{out}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "backends never all up: {out}{err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = counts(&client, &url, 40).await;
    println!("weights 3/1 + backup: {seen:?}");
    assert_eq!(seen.get("A"), Some(&30));
    assert_eq!(seen.get("B"), Some(&10));
    assert_eq!(seen.get("C"), None);

    let sock = socket.to_str().unwrap();
    let (code, out, err) = control(&["drain", "b1", "--socket", sock]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("b1 draining"), "{out}");
    assert_eq!(counts(&client, &url, 10).await.get("B"), Some(&10));
    let (_, out, _) = status(&socket);
    assert!(out
        .lines()
        .any(|l| l.trim_start().starts_with("b1") && l.contains("true")));
    // Both primaries drained: the backup serves.
    assert_eq!(control(&["drain", "b2", "--socket", sock]).0, 0);
    assert_eq!(counts(&client, &url, 5).await.get("C"), Some(&5));
    for name in ["b1", "b2"] {
        let (code, out, err) = control(&["enable", name, "--socket", sock]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("enabled"), "{out}");
    }
    let seen = counts(&client, &url, 8).await;
    assert_eq!(
        seen.get("A").copied().unwrap_or(0) + seen.get("B").copied().unwrap_or(0),
        8
    );
    // An unknown backend is refused with the names that exist.
    let (code, _, err) = control(&["drain", "web-09", "--socket", sock]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no backend named") && err.contains("b1, b2, b3"),
        "{err}"
    );

    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "rampart lb did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the admin socket is removed at stop");
}
