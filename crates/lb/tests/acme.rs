//! ACME (RFC 8555) against a real ACME server: Debian's `pebble`, started by the test with
//! `pebble-challtestsrv` as its DNS server (every name resolves to the load balancer's
//! address). Pebble validates the HTTP-01 challenge for real, over HTTP to the load
//! balancer's HTTP listener; nothing is marked valid without validation. The test checks
//! issuance, a forced renewal, a restart that keeps the account and certificate, a renewal
//! that comes by itself at `renew_at` of the lifetime, and that a TLS client trusting only
//! pebble's root (from its management endpoint) accepts the served certificate. Addresses in 127.114.5.0/24:
//! pebble .2, its DNS .3, lb-01 .10.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use lb::{Backend, LbConfig};
use prometheus_client::registry::Registry;
use rustls::pki_types::{CertificateDer, ServerName};
use test_support::{eventually, TestPki};

const LB_HTTP_PORT: u16 = 18580;
const PEBBLE: &str = "127.114.5.2";
const DNS: &str = "127.114.5.3:8053";

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 114, 5, last])
}

/// Kills and reaps a child process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA for pebble's own HTTPS listener (the ACME directory), and its leaf.
fn pebble_tls(dir: &Path) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(rcgen::SanType::IpAddress(PEBBLE.parse().unwrap()));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("directory-ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("pebble.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("pebble.key"), key.serialize_pem()).unwrap();
    ca.pem().into_bytes()
}

fn start_pebble(dir: &Path) -> (Killed, Killed) {
    let dns = Command::new("pebble-challtestsrv")
        .args([
            "-dns01",
            DNS,
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
        ])
        .args(["-management", "127.114.5.3:8055"])
        .args(["-defaultIPv4", "127.114.5.10", "-defaultIPv6", ""])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let config = serde_json::json!({
        "pebble": {
            "listenAddress": format!("{PEBBLE}:14000"),
            "managementListenAddress": format!("{PEBBLE}:15000"),
            "certificate": dir.join("pebble.pem"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": LB_HTTP_PORT,
            "tlsPort": 18581,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }
    });
    std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
    let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
    let pebble = Command::new("pebble")
        .arg("-config")
        .arg(dir.join("pebble.json"))
        .args(["-dnsserver", DNS])
        // Validate at once instead of after a random pause of up to 15 s.
        .env("PEBBLE_VA_NOSLEEP", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    (Killed(dns), Killed(pebble))
}

/// A rustls client trusting only `root`; returns the leaf the server at `lb` presents for
/// `name`, after verifying the chain.
async fn served_verified(root: &CertificateDer<'static>, lb: SocketAddr, name: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    let tcp = tokio::net::TcpStream::connect(lb).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS to {name} with pebble's root only: {e}"));
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn first_cert(path: &Path) -> Vec<u8> {
    pki::load_certs(path).unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_issues_and_renews_the_site_certificate_from_pebble() {
    for bin in ["pebble", "pebble-challtestsrv"] {
        if !test_support::have_binary(bin) {
            return test_support::skip(&format!(
                "{bin} is not installed (Debian package pebble; scripts/install-deps.sh installs it)"
            ));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let directory_ca = pebble_tls(tmp.path());
    let (_dns, _pebble) = start_pebble(tmp.path());
    let directory = format!("https://{PEBBLE}:14000/dir");
    let https = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&directory_ca).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    eventually("pebble answers", Duration::from_secs(30), || {
        let (https, url) = (https.clone(), directory.clone());
        async move {
            https
                .get(url)
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
        }
    })
    .await;
    eventually("pebble's DNS answers", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect("127.114.5.3:8055")
            .await
            .ok()
    })
    .await;

    // lb-01 with one backend; its HTTP listener on the port pebble validates on.
    let pki = TestPki::new(test_support::topology_in_block(114));
    let backend = tokio::net::TcpListener::bind(SocketAddr::new(ip(11), 0))
        .await
        .unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let net = firewall::Net::loopback(
        "lb-01",
        ip(10),
        Arc::new(topology::Policy::compile(&pki.topology)),
        pki.topology.limits.clone(),
    );
    let mut cfg =
        LbConfig::from_topology(&pki.topology, "lb-01", pki.paths.clone(), net.clone()).unwrap();
    cfg.https_port = 0;
    cfg.http_port = LB_HTTP_PORT;
    cfg.plain_backends = true;
    cfg.backends = vec![Backend {
        name: "web-01".into(),
        addr: backend_addr,
        server_name: None,
        weight: 1,
        backup: false,
    }];
    let acme_dir = tmp.path().join("acme");
    cfg.acme = Some(lb::AcmeConfig {
        directory_url: directory.clone(),
        contact: vec!["mailto:ops@foobar.com".into()],
        ca_bundle: Some(tmp.path().join("directory-ca.pem")),
        names: cfg.site_names.clone(),
        dir: acme_dir.clone(),
        renew_at: 0.667,
    });
    let acme = cfg.acme.clone().unwrap();
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb = lb::start(cfg.clone(), &mut registry, &http).await.unwrap();
    let addr = lb.https_addr();

    // Issuance: the lab's certificate serves until the ACME one replaces it.
    let lab_site = first_cert(&pki.paths.site_cert());
    let started = std::time::Instant::now();
    eventually(
        "an ACME certificate installed",
        Duration::from_secs(90),
        || {
            let installed = acme.cert_path().is_file() && lb.generation() >= 2;
            async move { installed.then_some(()) }
        },
    )
    .await;
    println!("issued in {:?}", started.elapsed());
    let issued = first_cert(&acme.cert_path());
    assert_ne!(issued, lab_site);

    // Pebble's issuing root, from its management endpoint; the served chain verifies to it.
    let roots_pem = https
        .get(format!("https://{PEBBLE}:15000/roots/0"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let root = rustls_pemfile::certs(&mut &roots_pem[..])
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(served_verified(&root, addr, "www.foobar.com").await, issued);
    assert_eq!(served_verified(&root, addr, "foobar.com").await, issued);

    // The account and the key are kept private in the state directory.
    use std::os::unix::fs::PermissionsExt;
    for f in ["account.json", "key.pem"] {
        let mode = std::fs::metadata(acme_dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let summary = lb.certificates()[0].clone();
    println!(
        "pebble certificate: {:?}, valid {} days; renewal due at {:.0}% of it",
        summary.names,
        (summary.not_after_unix - summary.not_before_unix) / 86_400,
        acme.renew_at * 100.0
    );

    // A forced renewal: a new order validated again, swapped in live.
    let generation = lb.generation();
    let renewed = lb.renew_certificate().await.unwrap();
    assert!(
        renewed.names.contains(&"www.foobar.com".to_string()),
        "{renewed:?}"
    );
    assert!(lb.generation() > generation);
    let second = first_cert(&acme.cert_path());
    assert_ne!(second, issued, "the renewal brought a new certificate");
    assert_eq!(served_verified(&root, addr, "www.foobar.com").await, second);

    // A restart with the state kept: the saved certificate serves at once with the saved
    // account, and renewal comes by itself once `renew_at` of the lifetime has passed
    // (here a few seconds of pebble's five years).
    serve::RoleHandle::shutdown(&lb).await;
    drop(lb);
    let account = std::fs::read(acme_dir.join("account.json")).unwrap();
    if let Some(a) = cfg.acme.as_mut() {
        a.renew_at = 2e-8;
    }
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb = lb::start(cfg, &mut registry, &http).await.unwrap();
    let addr = lb.https_addr();
    assert_eq!(lb.certificates()[0].not_after_unix, renewed.not_after_unix);
    // (Unless the scheduled renewal was already quicker than this handshake.)
    let served = served_verified(&root, addr, "www.foobar.com").await;
    assert!(served == second || served == first_cert(&acme.cert_path()));
    eventually("a scheduled renewal", Duration::from_secs(90), || {
        let renewed = lb.generation() >= 2;
        async move { renewed.then_some(()) }
    })
    .await;
    let third = first_cert(&acme.cert_path());
    assert_ne!(third, second);
    assert_eq!(served_verified(&root, addr, "www.foobar.com").await, third);
    assert_eq!(
        std::fs::read(acme_dir.join("account.json")).unwrap(),
        account
    );
}
