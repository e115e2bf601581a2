//! `rampart lb` with several certificates (a `--tls-cert`/`--tls-key` pair and a
//! `--tls-cert-dir`), chosen by SNI, and `rampart reload --pid-file` replacing one without a
//! restart — a bad one refused with the old one kept. The real binary, real rustls clients,
//! one backend; addresses in 127.114.1.0/24.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

const BIN: &str = env!("CARGO_BIN_EXE_rampart");

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// Writes `dir/stem.pem` and `dir/stem.key` for `name`; returns the certificate's DER.
    fn issue(&self, dir: &Path, stem: &str, name: &str) -> Vec<u8> {
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    /// A client trusting only this CA, with full handshakes only.
    fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut c =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    }
}

/// The certificate a verifying TLS client gets when it asks for `name`.
async fn served(config: &Arc<ClientConfig>, lb: SocketAddr, name: &str) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(lb).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("handshake for {name}: {e}"));
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn reload(pid_file: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["reload", "--timeout", "30", "--pid-file"])
        .arg(pid_file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_lb_serves_certificates_by_sni_and_reloads_them_on_rampart_reload() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let ca = Ca::new();
    let a = ca.issue(dir.path(), "a", "a.example.test");
    let b = ca.issue(&certs, "b", "b.example.test");
    let pid_file = dir.path().join("lb.pid");

    let listener = tokio::net::TcpListener::bind("127.114.1.11:0")
        .await
        .unwrap();
    let backend = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async { "backend" });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let mut child = Command::new(BIN)
        .args(["lb", "--listen", "127.114.1.10:0", "--threads", "1"])
        .arg("--tls-cert")
        .arg(dir.path().join("a.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("a.key"))
        .arg("--tls-cert-dir")
        .arg(&certs)
        .arg("--pid-file")
        .arg(&pid_file)
        .args(["--backend", &backend.to_string()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Its log, read all along (the first line names the listener).
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    std::thread::spawn({
        let log = log.clone();
        move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = first_tx.send(line.clone());
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        }
    });
    let line = first_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let https: SocketAddr = line
        .split("https on ")
        .nth(1)
        .and_then(|s| s.split([',', ' ']).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        child.id().to_string()
    );

    let client = ca.client();
    assert_eq!(served(&client, https, "a.example.test").await, a);
    assert_eq!(served(&client, https, "b.example.test").await, b);

    // b renewed in place: `rampart reload` makes new handshakes get it.
    let b2 = ca.issue(&certs, "b", "b.example.test");
    let started = Instant::now();
    let (ok, out) = reload(&pid_file);
    println!("reload took {:?}: {out}", started.elapsed());
    assert!(ok, "{out}");
    assert!(out.contains("reloaded"), "{out}");
    assert_eq!(served(&client, https, "b.example.test").await, b2);
    assert_eq!(served(&client, https, "a.example.test").await, a);

    // A new certificate whose key is another's: refused, said so, b2 kept.
    ca.issue(&certs, "c", "b.example.test");
    std::fs::copy(certs.join("c.pem"), certs.join("b.pem")).unwrap();
    std::fs::remove_file(certs.join("c.pem")).unwrap();
    let (ok, out) = reload(&pid_file);
    println!("{out}");
    assert!(!ok, "a bad certificate was accepted: {out}");
    assert!(
        out.contains("refused") && out.contains("does not fit"),
        "{out}"
    );
    assert_eq!(served(&client, https, "b.example.test").await, b2);
    // The load balancer's own log says it too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.lock().unwrap().contains("reload refused") {
        assert!(
            Instant::now() < deadline,
            "no log line: {}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "rampart lb did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    assert!(!pid_file.exists(), "the pid file is removed on exit");
}
