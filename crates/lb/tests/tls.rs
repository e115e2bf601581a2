//! The HTTPS listener's TLS with real rustls clients: certificates chosen by SNI, session
//! resumption (TLS 1.3 tickets, TLS 1.2 session IDs and tickets) and certificate reload
//! without a restart. Load balancer and one plain-HTTP backend on loopback addresses in
//! 127.114.0.0/24 (lb-01 .10, web-01 .11), ports chosen by the kernel.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use lb::{Backend, LbConfig, LbHandle};
use prometheus_client::registry::Registry;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, Tls12Resumption};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme};
use test_support::{eventually, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use topology::HealthCheck;

const WAIT: Duration = Duration::from_secs(20);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 114, 0, last])
}

/// A plain HTTP/1.1 backend answering `/healthz` and everything else with `web-01`.
async fn backend() -> SocketAddr {
    test_support::http_backend(ip(11), |_| async {
        test_support::text_response(200, "web-01")
    })
    .await
}

/// A CA of the test's own, issuing the extra (non-lab) certificates.
struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tls test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// Issues a leaf for `names`, writes `stem.pem`/`stem.key` in `dir`; returns its DER.
    fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> Vec<u8> {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    fn roots(&self, pki: &pki::PkiPaths) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        for c in pki::load_certs(&pki.ca_cert()).unwrap() {
            roots.add(c).unwrap();
        }
        roots
    }
}

struct Setup {
    pki: TestPki,
    ca: TestCa,
    certs: tempfile::TempDir,
    shop_der: Vec<u8>,
    lb: LbHandle,
}

/// lb-01 with the lab's site certificate (www.foobar.com, foobar.com) as the default and
/// `shop.example.test` from the test CA, in front of one backend.
async fn setup(resumption: pki::Resumption) -> Setup {
    let pki = TestPki::new(test_support::topology_in_block(114));
    let ca = TestCa::new();
    let certs = tempfile::tempdir().unwrap();
    let shop_der = ca.issue(certs.path(), "shop", &["shop.example.test"]);
    let addr = backend().await;
    let net = test_support::net(&pki.topology, "lb-01");
    let mut cfg = LbConfig::from_topology(&pki.topology, "lb-01", pki.paths.clone(), net).unwrap();
    cfg.https_port = 0;
    cfg.http_port = 0;
    cfg.plain_backends = true;
    cfg.health = HealthCheck {
        path: "/healthz".into(),
        interval_ms: 100,
        timeout_ms: 1000,
        rise: 1,
        fall: 2,
    };
    cfg.backends = vec![Backend {
        name: "web-01".into(),
        addr,
        server_name: None,
        weight: 1,
        backup: false,
    }];
    cfg.extra_certs = vec![pki::CertFiles {
        cert: certs.path().join("shop.pem"),
        key: certs.path().join("shop.key"),
    }];
    cfg.resumption = resumption;
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb = lb::start(cfg, &mut registry, &http).await.unwrap();
    eventually("the backend up", WAIT, || {
        let up = lb.healthy();
        async move { up.then_some(()) }
    })
    .await;
    Setup {
        pki,
        ca,
        certs,
        shop_der,
        lb,
    }
}

fn site_der(s: &Setup) -> Vec<u8> {
    pki::load_certs(&s.pki.paths.site_cert()).unwrap()[0].to_vec()
}

fn resumption_default() -> pki::Resumption {
    pki::Resumption {
        cache_entries: topology::DEFAULT_SESSION_CACHE_ENTRIES,
        tickets: true,
    }
}

/// Accepts any server certificate (signatures of the handshake still checked): lets the
/// test see which certificate a client without SNI, or asking for an unknown name, got.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn verifying(
    roots: RootCertStore,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientConfig {
    ClientConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn trusting_anything() -> ClientConfig {
    ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(pki::provider())))
        .with_no_client_auth()
}

/// One HTTPS request on a new connection (`name` as SNI and `Host`; an IP address sends no
/// SNI); returns the certificate the server presented, how the handshake went and the
/// response's first line. Reads the whole response, so TLS 1.3 tickets sent after the
/// handshake reach the client's session store.
async fn fetch(
    config: &Arc<ClientConfig>,
    lb: SocketAddr,
    name: &str,
) -> Result<(Vec<u8>, HandshakeKind, String), String> {
    let tcp = tokio::net::TcpStream::connect(lb)
        .await
        .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let mut tls = TlsConnector::from(config.clone())
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    let der = conn.peer_certificates().unwrap()[0].to_vec();
    let kind = conn.handshake_kind().unwrap();
    let req = format!("GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    // A TLS 1.2 server may close without close_notify after Connection: close; what was
    // read is what counts.
    let _ = tls.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp);
    let status = text.lines().next().unwrap_or_default().to_string();
    Ok((der, kind, status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_for_the_name_and_the_site_one_by_default() {
    let s = setup(resumption_default()).await;
    let addr = s.lb.https_addr();
    let site = site_der(&s);
    assert_ne!(site, s.shop_der);

    // Clients that verify: each name gets a certificate valid for it, from its CA.
    let roots = s.ca.roots(&s.pki.paths);
    let real = Arc::new(verifying(roots, rustls::DEFAULT_VERSIONS));
    let (der, _, status) = fetch(&real, addr, "shop.example.test").await.unwrap();
    assert_eq!(der, s.shop_der, "shop.example.test got another certificate");
    assert_eq!(
        status, "HTTP/1.1 200 OK",
        "names of extra certificates are served"
    );
    let (der, _, status) = fetch(&real, addr, "www.foobar.com").await.unwrap();
    assert_eq!(der, site);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (der, _, _) = fetch(&real, addr, "foobar.com").await.unwrap();
    assert_eq!(der, site);

    // No SNI (an IP address as the name) and an unknown name: the default, the site's.
    let any = Arc::new(trusting_anything());
    let (der, _, _) = fetch(&any, addr, &addr.ip().to_string()).await.unwrap();
    assert_eq!(
        der, site,
        "a client without SNI gets the default certificate"
    );
    let (der, _, status) = fetch(&any, addr, "unknown.example.test").await.unwrap();
    assert_eq!(der, site);
    assert!(status.starts_with("HTTP/1.1 421"), "{status}");

    // reqwest, HTTP/2 with ALPN, through to the backend by the extra name.
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_der(s.ca.cert.der()).unwrap())
        .resolve("shop.example.test", addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = client
        .get(format!("https://shop.example.test:{}/", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.text().await.unwrap(), "web-01");
    assert_eq!(s.lb.certificates().len(), 2);
    drop(s.certs);
}

/// A client config for `versions` that keeps sessions for resumption, with TLS 1.2
/// tickets or session IDs only.
fn resuming(
    s: &Setup,
    versions: &[&'static rustls::SupportedProtocolVersion],
    tls12: Tls12Resumption,
) -> Arc<ClientConfig> {
    let mut c = verifying(s.ca.roots(&s.pki.paths), versions);
    c.resumption = Resumption::in_memory_sessions(64).tls12_resumption(tls12);
    Arc::new(c)
}

/// Two connections with one client config: how the second handshake went.
async fn second_handshake(s: &Setup, config: &Arc<ClientConfig>) -> HandshakeKind {
    let addr = s.lb.https_addr();
    let (_, first, status) = fetch(config, addr, "www.foobar.com").await.unwrap();
    assert_eq!(first, HandshakeKind::Full);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (der, second, status) = fetch(config, addr, "www.foobar.com").await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        der,
        site_der(s),
        "a resumed session still names its certificate"
    );
    second
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_by_tls13_tickets_tls12_session_ids_and_tls12_tickets() {
    use rustls::version::{TLS12, TLS13};
    use HandshakeKind::{Full, Resumed};
    let ids = Tls12Resumption::SessionIdOnly;
    let tickets = Tls12Resumption::SessionIdOrTickets;

    // Both on (the default).
    let s = setup(resumption_default()).await;
    for (what, versions, tls12, want) in [
        ("TLS 1.3", &[&TLS13][..], tickets, Resumed),
        ("TLS 1.2 session id", &[&TLS12][..], ids, Resumed),
        ("TLS 1.2 ticket", &[&TLS12][..], tickets, Resumed),
    ] {
        let got = second_handshake(&s, &resuming(&s, versions, tls12)).await;
        println!("cache+tickets, {what}: {got:?}");
        assert_eq!(got, want, "{what}");
    }

    // Tickets only (no server cache): a TLS 1.2 client without ticket support cannot
    // resume, one with tickets can — so the tickets above were real tickets.
    let s = setup(pki::Resumption {
        cache_entries: 0,
        tickets: true,
    })
    .await;
    for (what, versions, tls12, want) in [
        ("TLS 1.3", &[&TLS13][..], tickets, Resumed),
        ("TLS 1.2 session id", &[&TLS12][..], ids, Full),
        ("TLS 1.2 ticket", &[&TLS12][..], tickets, Resumed),
    ] {
        let got = second_handshake(&s, &resuming(&s, versions, tls12)).await;
        println!("tickets only, {what}: {got:?}");
        assert_eq!(got, want, "{what}");
    }

    // Cache only (no tickets): session IDs, and TLS 1.3 resumes from the cache.
    let s = setup(pki::Resumption {
        cache_entries: 1000,
        tickets: false,
    })
    .await;
    for (what, versions, tls12, want) in [
        ("TLS 1.3", &[&TLS13][..], tickets, Resumed),
        ("TLS 1.2 session id", &[&TLS12][..], ids, Resumed),
        ("TLS 1.2 ticket client", &[&TLS12][..], tickets, Resumed),
    ] {
        let got = second_handshake(&s, &resuming(&s, versions, tls12)).await;
        println!("cache only, {what}: {got:?}");
        assert_eq!(got, want, "{what}");
    }
}

/// An HTTP/1.1 keep-alive connection by name; returns the sender and the certificate.
async fn keep_alive(
    config: &Arc<ClientConfig>,
    lb: SocketAddr,
    name: &str,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    Vec<u8>,
) {
    let tcp = tokio::net::TcpStream::connect(lb).await.unwrap();
    let tls = TlsConnector::from(config.clone())
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    (sender, der)
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    name: &str,
) -> String {
    let req = Request::get("/")
        .header(http::header::HOST, name)
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_for_new_handshakes_and_a_bad_one_is_refused() {
    let s = setup(resumption_default()).await;
    let addr = s.lb.https_addr();
    // Full handshakes only: a resumed session keeps the certificate it was made with.
    let mut config = verifying(s.ca.roots(&s.pki.paths), rustls::DEFAULT_VERSIONS);
    config.resumption = Resumption::disabled();
    let config = Arc::new(config);
    let (mut old_conn, der) = keep_alive(&config, addr, "shop.example.test").await;
    assert_eq!(der, s.shop_der);
    assert_eq!(get(&mut old_conn, "shop.example.test").await, "web-01");

    // The certificate renewed in place (new key too), then reloaded.
    let renewed = s.ca.issue(s.certs.path(), "shop", &["shop.example.test"]);
    assert_ne!(renewed, s.shop_der);
    let generation = s.lb.generation();
    let report = s.lb.reload(None).await.unwrap();
    assert_eq!(report.generation, generation + 1);
    assert_eq!(s.lb.generation(), generation + 1);
    let (der, ..) = fetch(&config, addr, "shop.example.test").await.unwrap();
    assert_eq!(der, renewed, "a new handshake gets the new certificate");
    // The connection made before keeps going with its certificate.
    assert_eq!(get(&mut old_conn, "shop.example.test").await, "web-01");

    // A certificate whose key does not match: refused, the renewed one kept.
    let other = s.ca.issue(s.certs.path(), "other", &["shop.example.test"]);
    std::fs::copy(
        s.certs.path().join("other.pem"),
        s.certs.path().join("shop.pem"),
    )
    .unwrap();
    let e = s.lb.reload(None).await.unwrap_err().to_string();
    println!("refused: {e}");
    assert!(e.contains("does not fit"), "{e}");
    assert_eq!(s.lb.generation(), generation + 1);
    let (der, ..) = fetch(&config, addr, "shop.example.test").await.unwrap();
    assert_eq!(der, renewed);
    assert_ne!(der, other);
    // An unreadable file: refused the same way.
    std::fs::write(s.certs.path().join("shop.pem"), "garbage").unwrap();
    assert!(s.lb.reload(None).await.is_err());
    let (der, ..) = fetch(&config, addr, "shop.example.test").await.unwrap();
    assert_eq!(der, renewed);
    // The site certificate reloads too.
    let (der, ..) = fetch(&config, addr, "www.foobar.com").await.unwrap();
    assert_eq!(der, site_der(&s));
}
