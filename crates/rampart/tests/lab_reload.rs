//! `rampart reload` on a running lab (loopback mode, a topology of lb-01 and two web
//! servers in 127.114.4.0/24): a new topology file adds a certificate chosen by SNI and
//! changes the health check and `[balancer]` limits while a bounded load loop runs — no
//! request fails, lb-01 serves the new certificate; a bad certificate is refused with the
//! old configuration kept; a file that changes the hosts is refused with exit code 64.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};

const BIN: &str = env!("CARGO_BIN_EXE_rampart");

const TOPOLOGY: &str = r#"
[site]
domain = "www.foobar.com"
aliases = ["foobar.com"]
https_port = 18443
http_port = 18080

[health_check]
path = "/healthz"
interval_ms = 200
timeout_ms = 1000
rise = 2
fall = 3

[[hosts]]
name = "lb-01"
address = "127.114.4.10"
roles = ["lb"]

[[hosts]]
name = "web-01"
address = "127.114.4.11"
roles = ["web"]

[[hosts]]
name = "web-02"
address = "127.114.4.12"
roles = ["web"]
"#;

fn rampart(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run rampart")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `rampart down` when dropped, so the lab stops even when an assertion fails.
struct Down(std::path::PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = rampart(&self.0, &["down"]);
    }
}

/// The certificate lb-01 presents to a client asking for `name` (trusting only `ca`).
async fn served(ca: &CertificateDer<'static>, lb: SocketAddr, name: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    let tcp = tokio::net::TcpStream::connect(lb).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("handshake for {name}: {e}"));
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rampart_reload_changes_a_running_labs_certificates_and_limits_without_failing_a_request() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let file = tmp.path().join("rampart.toml");
    std::fs::write(&file, TOPOLOGY).unwrap();
    let up = rampart(
        &state,
        &[
            "up",
            "--mode",
            "loopback",
            "-d",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    let _down = Down(state.clone());
    assert!(up.status.success(), "up failed: {}", text(&up));
    let lb: SocketAddr = "127.114.4.10:18443".parse().unwrap();
    let lab_ca = std::fs::read(state.join("pki/ca.pem")).unwrap();

    // Bounded load: 2 clients until told to stop, at most 60 s and 20 000 requests.
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&lab_ca).unwrap())
        .resolve("www.foobar.com", lb)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (client, stop, ok, failed) = (client.clone(), stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && ok.load(Ordering::Relaxed) < 20_000
            {
                match client.get("https://www.foobar.com:18443/").send().await {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failed.lock().unwrap().push(format!("body: {e}")),
                    },
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A certificate of another CA for shop.example.test, and new limits.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap();
    let issue = |stem: &str| {
        let p = rcgen::CertificateParams::new(vec!["shop.example.test".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(tmp.path().join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(tmp.path().join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    };
    let shop = issue("shop");
    let new_topology = format!(
        "{}\n[balancer]\nbackend_max_connections = 64\n\n[[site.tls.certificates]]\ncert = \"shop.pem\"\nkey = \"shop.key\"\n",
        TOPOLOGY.replace("interval_ms = 200", "interval_ms = 300")
    );
    let new_file = tmp.path().join("new.toml");
    std::fs::write(&new_file, &new_topology).unwrap();
    let started = Instant::now();
    let out = rampart(&state, &["reload", "-f", new_file.to_str().unwrap()]);
    println!("reload took {:?}: {}", started.elapsed(), text(&out));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("lb-01: reloaded, generation 2"),
        "{}",
        text(&out)
    );
    assert_eq!(served(ca.der(), lb, "shop.example.test").await, shop);
    let site = served(&lab_ca_der(&lab_ca), lb, "www.foobar.com").await;

    // Again, with nothing changed: generation 3, same certificates.
    let out = rampart(&state, &["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("generation 3"), "{}", text(&out));

    // A certificate file that does not parse: refused, the running one kept.
    std::fs::write(tmp.path().join("shop.pem"), "not a certificate").unwrap();
    let out = rampart(&state, &["reload"]);
    println!("{}", text(&out));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("refused"), "{}", text(&out));
    assert_eq!(served(ca.der(), lb, "shop.example.test").await, shop);
    let log = std::fs::read_to_string(state.join("hosts/lb-01/node.log")).unwrap_or_default();
    assert!(
        log.contains("reload refused"),
        "no log line in node.log:\n{log}"
    );

    // Other hosts: not a reload.
    let moved = tmp.path().join("moved.toml");
    std::fs::write(&moved, TOPOLOGY.replace("127.114.4.12", "127.114.4.13")).unwrap();
    let out = rampart(&state, &["reload", "-f", moved.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));

    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    println!(
        "{} requests ok, {} failed across the reloads",
        ok.load(Ordering::Relaxed),
        failed.len()
    );
    assert!(ok.load(Ordering::Relaxed) > 50, "the load loop barely ran");
    assert!(
        failed.is_empty(),
        "failed: {:?}",
        &failed[..failed.len().min(10)]
    );
    assert_eq!(
        served(&lab_ca_der(&lab_ca), lb, "www.foobar.com").await,
        site
    );
}

/// The first certificate in a PEM file's text.
fn lab_ca_der(pem: &[u8]) -> CertificateDer<'static> {
    let mut reader = pem;
    let first = rustls_pemfile::certs(&mut reader).next();
    first.unwrap().unwrap()
}
