//! The PKI end to end: issue into a temporary directory, then run real TLS handshakes over
//! loopback TCP with the configs this crate builds.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use pki::{Identity, PkiPaths};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use topology::Topology;

/// Upper bound for one handshake and exchange, so a broken build fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

fn issue() -> (tempfile::TempDir, PkiPaths) {
    let dir = tempfile::tempdir().unwrap();
    let paths = pki::ensure(&dir.path().join("pki"), &Topology::default_topology()).unwrap();
    (dir, paths)
}

/// What the server side of one handshake saw.
#[derive(Debug)]
struct ServerView {
    identity: Option<Identity>,
    alpn: Option<Vec<u8>>,
    suite: Option<rustls::CipherSuite>,
}

/// Accepts one TLS connection with `server`, connects to it with `client` for `name`, and
/// exchanges one line. Returns the server's view (or its handshake error) and whether the
/// client side completed the exchange.
async fn handshake(
    server: ServerConfig,
    client: ClientConfig,
    name: &str,
) -> (Result<ServerView, String>, bool) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let identity = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(pki::peer_identity);
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let suite = conn.negotiated_cipher_suite().map(|s| s.suite());
        tls.write_all(b"hello\n").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(ServerView {
            identity,
            alpn,
            suite,
        })
    });

    let connector = TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from(name.to_string()).unwrap();
    let client_ok = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let mut tls = connector.connect(name, tcp).await.ok()?;
        let mut line = String::new();
        tls.read_to_string(&mut line).await.ok()?;
        Some(line == "hello\n")
    };
    let client_ok = tokio::time::timeout(STEP, client_ok)
        .await
        .expect("client finishes")
        .unwrap_or(false);
    let server = tokio::time::timeout(STEP, server_task)
        .await
        .expect("server finishes")
        .unwrap();
    (server, client_ok)
}

#[test]
fn ensure_is_idempotent_and_keeps_keys_private() {
    let (_dir, paths) = issue();
    let topology = Topology::default_topology();
    let ca = std::fs::read(paths.ca_cert()).unwrap();
    let leaf = std::fs::read(paths.host_cert("web-01")).unwrap();
    let again = pki::ensure(&paths.dir, &topology).unwrap();
    assert_eq!(std::fs::read(again.ca_cert()).unwrap(), ca);
    assert_eq!(std::fs::read(again.host_cert("web-01")).unwrap(), leaf);

    for key in [
        paths.ca_key(),
        paths.site_key(),
        paths.admin_key(),
        paths.host_key("lb-01"),
        paths.host_key("mon-01"),
    ] {
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    for host in &topology.hosts {
        assert!(pki::load_certs(&paths.host_cert(&host.name)).is_ok());
    }
}

#[tokio::test]
async fn missing_leaves_are_reissued_by_the_same_ca() {
    let (_dir, paths) = issue();
    let ca = std::fs::read(paths.ca_cert()).unwrap();
    let site = std::fs::read(paths.site_cert()).unwrap();
    std::fs::remove_file(paths.host_cert("web-02")).unwrap();
    std::fs::remove_file(paths.host_key("lb-01")).unwrap();
    pki::ensure(&paths.dir, &Topology::default_topology()).unwrap();
    assert_eq!(std::fs::read(paths.ca_cert()).unwrap(), ca);
    assert_eq!(std::fs::read(paths.site_cert()).unwrap(), site);

    // The reissued leaves chain to the stored CA.
    let server = pki::mtls_server_config(&paths, "web-02", &[]).unwrap();
    let client =
        pki::mtls_client_config(&paths, &Identity::Host("lb-01".to_string()), &[]).unwrap();
    let (view, client_ok) = handshake(server, client, "web-02").await;
    assert!(client_ok);
    assert_eq!(
        view.unwrap().identity,
        Some(Identity::Host("lb-01".to_string()))
    );
}

#[test]
fn new_ca_reissues_every_leaf() {
    let (_dir, paths) = issue();
    let site = std::fs::read(paths.site_cert()).unwrap();
    std::fs::remove_file(paths.ca_key()).unwrap();
    pki::ensure(&paths.dir, &Topology::default_topology()).unwrap();
    assert_ne!(std::fs::read(paths.site_cert()).unwrap(), site);
}

#[test]
fn changed_host_address_reissues_that_host() {
    let (_dir, paths) = issue();
    let web1 = std::fs::read(paths.host_cert("web-01")).unwrap();
    let web2 = std::fs::read(paths.host_cert("web-02")).unwrap();
    let moved = topology::DEFAULT_TOML.replace("127.80.0.11", "127.80.0.111");
    let moved = Topology::parse(&moved, "moved.toml").unwrap();
    pki::ensure(&paths.dir, &moved).unwrap();
    assert_ne!(std::fs::read(paths.host_cert("web-01")).unwrap(), web1);
    assert_eq!(std::fs::read(paths.host_cert("web-02")).unwrap(), web2);
}

#[test]
fn identities_read_back_from_leaves() {
    let (_dir, paths) = issue();
    let host = pki::load_certs(&paths.host_cert("lb-01")).unwrap();
    assert_eq!(
        pki::peer_identity(&host[0]),
        Some(Identity::Host("lb-01".to_string()))
    );
    let admin = pki::load_certs(&paths.admin_cert()).unwrap();
    assert_eq!(pki::peer_identity(&admin[0]), Some(Identity::Admin));
    let site = pki::load_certs(&paths.site_cert()).unwrap();
    assert_eq!(pki::peer_identity(&site[0]), None);
    let ca = pki::load_certs(&paths.ca_cert()).unwrap();
    assert_eq!(pki::peer_identity(&ca[0]), None);
}

#[test]
fn empty_pem_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    assert!(matches!(
        pki::load_certs(&empty),
        Err(pki::PkiError::Pem { .. })
    ));
    assert!(matches!(
        pki::load_key(&empty),
        Err(pki::PkiError::Pem { .. })
    ));
    assert!(matches!(
        pki::load_key(&dir.path().join("absent.key")),
        Err(pki::PkiError::Io { .. })
    ));
}

#[tokio::test]
async fn mutual_tls_names_the_client_host() {
    let (_dir, paths) = issue();
    let server = pki::mtls_server_config(&paths, "web-01", &[b"h2"]).unwrap();
    let client =
        pki::mtls_client_config(&paths, &Identity::Host("lb-01".to_string()), &[b"h2"]).unwrap();
    let (view, client_ok) = handshake(server, client, "web-01").await;
    let view = view.unwrap();
    assert!(client_ok);
    assert_eq!(view.identity, Some(Identity::Host("lb-01".to_string())));
    assert_eq!(view.alpn.as_deref(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn mutual_tls_names_the_admin() {
    let (_dir, paths) = issue();
    let server = pki::mtls_server_config(&paths, "mon-01", &[]).unwrap();
    let client = pki::mtls_client_config(&paths, &Identity::Admin, &[]).unwrap();
    let (view, client_ok) = handshake(server, client, "mon-01").await;
    assert!(client_ok);
    assert_eq!(view.unwrap().identity, Some(Identity::Admin));
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let (_dir, paths) = issue();
    let server = pki::mtls_server_config(&paths, "web-01", &[]).unwrap();
    let client = pki::ca_client_config(&paths).unwrap();
    let (view, client_ok) = handshake(server, client, "web-01").await;
    assert!(
        view.is_err(),
        "server accepted a client without certificate"
    );
    assert!(!client_ok);
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_rejected() {
    let (_dir, paths) = issue();
    let (_other_dir, other) = issue();
    // Trusts the right CA, but presents lb-01's certificate from another CA.
    let mut roots = rustls::RootCertStore::empty();
    for cert in pki::load_certs(&paths.ca_cert()).unwrap() {
        roots.add(cert).unwrap();
    }
    let client = ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            pki::load_certs(&other.host_cert("lb-01")).unwrap(),
            pki::load_key(&other.host_key("lb-01")).unwrap(),
        )
        .unwrap();
    let server = pki::mtls_server_config(&paths, "web-01", &[]).unwrap();
    let (view, client_ok) = handshake(server, client, "web-01").await;
    assert!(
        view.is_err(),
        "server accepted a foreign client certificate"
    );
    assert!(!client_ok);
}

#[tokio::test]
async fn server_of_another_ca_is_not_trusted() {
    let (_dir, paths) = issue();
    let (_other_dir, other) = issue();
    let server = pki::mtls_server_config(&other, "web-01", &[]).unwrap();
    let client =
        pki::mtls_client_config(&paths, &Identity::Host("lb-01".to_string()), &[]).unwrap();
    let (view, client_ok) = handshake(server, client, "web-01").await;
    assert!(view.is_err());
    assert!(!client_ok);
}

#[tokio::test]
async fn host_certificate_does_not_serve_another_name() {
    let (_dir, paths) = issue();
    let server = pki::mtls_server_config(&paths, "web-02", &[]).unwrap();
    let client =
        pki::mtls_client_config(&paths, &Identity::Host("lb-01".to_string()), &[]).unwrap();
    let (_, client_ok) = handshake(server, client, "web-01").await;
    assert!(!client_ok);
}

#[tokio::test]
async fn site_negotiates_h2_for_the_domain_and_aliases() {
    let (_dir, paths) = issue();
    for name in ["www.foobar.com", "foobar.com"] {
        let server = pki::site_server_config(&paths).unwrap();
        let client = pki::ca_client_config(&paths).unwrap();
        let (view, client_ok) = handshake(server, client, name).await;
        let view = view.unwrap();
        assert!(client_ok, "{name}");
        assert_eq!(view.identity, None);
        assert_eq!(view.alpn.as_deref(), Some(&b"h2"[..]));
    }
    // A client offering only HTTP/1.1 gets it.
    let server = pki::site_server_config(&paths).unwrap();
    let mut client = pki::ca_client_config(&paths).unwrap();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (view, _) = handshake(server, client, "www.foobar.com").await;
    assert_eq!(view.unwrap().alpn.as_deref(), Some(&b"http/1.1"[..]));
}

/// The site picks AES-128-GCM even when the client lists AES-256-GCM first (rustls' and
/// OpenSSL's own order), and still serves a client that offers AES-256-GCM alone.
#[tokio::test]
async fn site_prefers_aes_128_gcm_over_the_clients_order() {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    use rustls::CipherSuite;
    let (_dir, paths) = issue();
    let client_with = |suites: Vec<rustls::SupportedCipherSuite>, tls12: bool| {
        let mut roots = rustls::RootCertStore::empty();
        for cert in pki::load_certs(&paths.ca_cert()).unwrap() {
            roots.add(cert).unwrap();
        }
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: suites,
            ..default_provider()
        };
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    };
    let cases = [
        (
            default_provider().cipher_suites,
            false,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        ),
        (
            default_provider().cipher_suites,
            true,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            vec![cipher_suite::TLS13_AES_256_GCM_SHA384],
            false,
            CipherSuite::TLS13_AES_256_GCM_SHA384,
        ),
    ];
    assert_eq!(
        default_provider().cipher_suites[0].suite(),
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        "the client's own order starts with AES-256"
    );
    for (suites, tls12, want) in cases {
        let server = pki::site_server_config(&paths).unwrap();
        let (view, client_ok) =
            handshake(server, client_with(suites, tls12), "www.foobar.com").await;
        assert!(client_ok);
        assert_eq!(view.unwrap().suite, Some(want), "TLS 1.2 only: {tls12}");
    }
}

/// A database server certificate serves its host's name, the shared database identity and
/// every database host's address (what a replica dials), and nothing else; only database
/// hosts get one.
#[tokio::test]
async fn database_certificate_names_the_host_the_service_and_database_addresses() {
    let (_dir, paths) = issue();
    for name in ["web-01", pki::DB_SERVICE_NAME, "127.80.0.11", "127.80.0.12"] {
        let server =
            pki::server_config_from_files(&paths.db_cert("web-01"), &paths.db_key("web-01"))
                .unwrap();
        let (view, client_ok) =
            handshake(server, pki::ca_client_config(&paths).unwrap(), name).await;
        assert!(
            view.is_ok() && client_ok,
            "web-01's database certificate for {name}"
        );
    }
    for name in ["web-02", "127.80.0.10", "127.80.0.20", "www.foobar.com"] {
        let server =
            pki::server_config_from_files(&paths.db_cert("web-01"), &paths.db_key("web-01"))
                .unwrap();
        let (_, client_ok) = handshake(server, pki::ca_client_config(&paths).unwrap(), name).await;
        assert!(
            !client_ok,
            "web-01's database certificate accepted for {name}"
        );
    }
    let key_mode = std::fs::metadata(paths.db_key("web-02"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert!(!paths.db_cert("lb-01").exists());
    assert!(!paths.db_cert("mon-01").exists());
}
