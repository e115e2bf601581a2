//! The internal public-key infrastructure: one CA per state directory, the site certificate
//! for the load balancer, one certificate per host for internal mutual TLS, and an admin
//! (operator) client certificate; plus the rustls configurations every role uses.
//!
//! This crate owns certificate issuance and TLS policy (versions, ALPN, client
//! authentication). It never opens sockets. Every rustls config is built with the `ring`
//! provider explicitly, so no process-wide default provider is needed.
//!
//! Identity: every leaf carries a URI SAN, `rampart://host/<name>` for hosts and
//! `rampart://operator/admin` for the admin client; [`peer_identity`] reads it back. The
//! database servers' certificates ([`PkiPaths::db_cert`]) are server-only leaves with no
//! identity URI: see [`DB_SERVICE_NAME`] for what they name.

#![forbid(unsafe_code)]

mod issue;
mod sni;

pub use issue::DB_SERVICE_NAME;

pub use sni::{sni_server_config, CertFiles, CertStore, CertSummary, Resumption, SniResolver};

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::version::{TLS12, TLS13};
use rustls::{CipherSuite, ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use topology::Topology;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// TLS versions every config here accepts: 1.3 (RFC 8446) preferred, then 1.2 (RFC 5246).
static VERSIONS: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

/// ALPN protocols of the public site and of [`ca_client_config`], in order of preference.
const WEB_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Errors from issuing, reading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file under the PKI directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file held no usable certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rcgen refused to issue a certificate.
    #[error("issuing {what}: {source}")]
    Issue {
        /// Which certificate.
        what: String,
        /// The rcgen error.
        source: rcgen::Error,
    },
    /// rustls refused a configuration (bad key, bad chain).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// Who a verified peer certificate belongs to (defined with the policy that names who may
/// call what).
pub use topology::Identity;

/// Paths of every PEM file under a PKI directory (normally `<state_dir>/pki`).
#[derive(Debug, Clone)]
pub struct PkiPaths {
    /// The directory itself.
    pub dir: PathBuf,
}

impl PkiPaths {
    /// Paths rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PkiPaths { dir: dir.into() }
    }
    /// `ca.pem`: the internal CA certificate (what clients pass to `curl --cacert`).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// `ca.key`: the CA private key (mode 0600).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    /// `site.pem`: the site certificate (SAN: the site domain and aliases).
    pub fn site_cert(&self) -> PathBuf {
        self.dir.join("site.pem")
    }
    /// `site.key`.
    pub fn site_key(&self) -> PathBuf {
        self.dir.join("site.key")
    }
    /// `admin.pem`: the operator's client certificate.
    pub fn admin_cert(&self) -> PathBuf {
        self.dir.join("admin.pem")
    }
    /// `admin.key`.
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin.key")
    }
    /// `hosts/<name>.pem`: a host's certificate (DNS SAN `<name>`, IP SAN its address,
    /// URI SAN `rampart://host/<name>`), usable as TLS server and client certificate.
    pub fn host_cert(&self, name: &str) -> PathBuf {
        self.dir.join("hosts").join(format!("{name}.pem"))
    }
    /// `hosts/<name>.key`.
    pub fn host_key(&self, name: &str) -> PathBuf {
        self.dir.join("hosts").join(format!("{name}.key"))
    }
    /// `db/<name>.pem`: the MariaDB server certificate of database host `name` (server
    /// authentication only). SANs: DNS `<name>`, DNS [`DB_SERVICE_NAME`], and an IP SAN for
    /// the address of **every** database host of the topology (see [`DB_SERVICE_NAME`]).
    pub fn db_cert(&self, name: &str) -> PathBuf {
        self.dir.join("db").join(format!("{name}.pem"))
    }
    /// `db/<name>.key` (mode 0600): read by that host's `mariadbd` (`ssl_key`).
    pub fn db_key(&self, name: &str) -> PathBuf {
        self.dir.join("db").join(format!("{name}.key"))
    }
}

/// Creates what is missing under `dir` for `topology`: the CA (once; never replaced while
/// `ca.pem` and `ca.key` exist), the site certificate, one certificate per host, one
/// MariaDB server certificate per database host ([`PkiPaths::db_cert`]) and the admin
/// certificate. Leaves signed by the current CA are kept; keys are written mode 0600.
///
/// A leaf is reissued when its certificate or key file is missing or unreadable, when its
/// authority key identifier is not the CA's (the CA was replaced), when it expires within
/// 30 days, or when its SANs differ from what `topology` asks for (a renamed domain, a moved
/// host). The CA is ECDSA P-256 and valid ten years, leaves one year. Every file is written
/// to a temporary name and renamed into place, so concurrent readers never see a partial
/// file; concurrent *callers* for one directory are not coordinated (call it once, before
/// starting the processes that read the files).
///
/// Errors: [`PkiError::Io`] when `dir` is not writable, [`PkiError::Issue`] from rcgen,
/// [`PkiError::Pem`] when an existing CA file is unreadable.
pub fn ensure(dir: &Path, topology: &Topology) -> Result<PkiPaths, PkiError> {
    issue::ensure(dir, topology)
}

/// The rustls crypto provider every config here uses (`ring`), with its cipher suites in
/// Rampart's order of preference: within each protocol version AES-128-GCM first, then
/// ChaCha20-Poly1305, then AES-256-GCM (rustls' own list starts with AES-256-GCM).
///
/// AES-128 matches the ~128-bit strength of the key exchanges on offer (X25519, P-256), and
/// its TLS 1.3 suite hashes with SHA-256, which the CPU computes in hardware (SHA-NI) where
/// ring's SHA-384 runs in software: a full handshake costs about 9 % less CPU. Go's crypto/tls (Caddy) and BoringSSL order the same way.
/// Server configs here set `ignore_client_order`, so this order decides; a client offering
/// only AES-256 or ChaCha20 still gets it.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the suites of each version and rank keep rustls' relative order.
    provider.cipher_suites.sort_by_key(|suite| {
        let version = match suite.version() {
            v if v == &TLS13 => 0,
            _ => 1,
        };
        let rank = match suite.suite() {
            CipherSuite::TLS13_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 1,
            _ => 2,
        };
        (version, rank)
    });
    Arc::new(provider)
}

/// Reads every certificate of a PEM file (RFC 7468 `CERTIFICATE` blocks), in file order.
///
/// Errors: [`PkiError::Io`] when the file cannot be read, [`PkiError::Pem`] when it holds
/// no certificate or a malformed PEM block.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let mut reader = open(path)?;
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate in file".to_string()));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
///
/// Errors: [`PkiError::Io`] when the file cannot be read, [`PkiError::Pem`] when it holds
/// no private key or a malformed PEM block.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let mut reader = open(path)?;
    rustls_pemfile::private_key(&mut reader)
        .map_err(|e| pem_err(path, format!("malformed PEM: {e}")))?
        .ok_or_else(|| pem_err(path, "no private key in file".to_string()))
}

fn open(path: &Path) -> Result<BufReader<File>, PkiError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| PkiError::Io {
            path: path.to_path_buf(),
            source,
        })
}

fn pem_err(path: &Path, reason: String) -> PkiError {
    PkiError::Pem {
        path: path.to_path_buf(),
        reason,
    }
}

/// A root store holding only the internal CA.
fn ca_roots(paths: &PkiPaths) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&paths.ca_cert())? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

fn alpn_list(alpn: &[&[u8]]) -> Vec<Vec<u8>> {
    alpn.iter().map(|p| p.to_vec()).collect()
}

/// The public site's server config: the site certificate, TLS 1.2 and 1.3 only, ALPN `h2`
/// then `http/1.1` (RFC 7301), no client authentication.
pub fn site_server_config(paths: &PkiPaths) -> Result<ServerConfig, PkiError> {
    server_config_from_files(&paths.site_cert(), &paths.site_key())
}

/// A public server config (TLS 1.2/1.3, no client certificate, ALPN h2 then http/1.1) from a
/// PEM certificate chain and its PEM private key, e.g. a site certificate an operator got
/// elsewhere (standalone `rampart lb`).
///
/// Errors: a file cannot be read, holds no certificate or key, or the key does not match.
pub fn server_config_from_files(cert: &Path, key: &Path) -> Result<ServerConfig, PkiError> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn_list(WEB_ALPN);
    config.ignore_client_order = true;
    Ok(config)
}

/// An internal server config for host `host`: its host certificate, TLS 1.2/1.3, a client
/// certificate chaining to the internal CA **required**, ALPN protocols `alpn` in order of
/// preference. Which identities are accepted is decided by the caller with
/// [`peer_identity`] on the verified peer certificate.
pub fn mtls_server_config(
    paths: &PkiPaths,
    host: &str,
    alpn: &[&[u8]],
) -> Result<ServerConfig, PkiError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(ca_roots(paths)?, provider())
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
    let certs = load_certs(&paths.host_cert(host))?;
    let key = load_key(&paths.host_key(host))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn_list(alpn);
    config.ignore_client_order = true;
    Ok(config)
}

/// An internal client config presenting `identity`'s certificate (a host's or the admin's)
/// and trusting only the internal CA. Servers are verified by DNS name = host name.
/// ALPN `alpn` in order of preference (empty: none).
pub fn mtls_client_config(
    paths: &PkiPaths,
    identity: &Identity,
    alpn: &[&[u8]],
) -> Result<ClientConfig, PkiError> {
    let (cert_path, key_path) = match identity {
        Identity::Host(name) => (paths.host_cert(name), paths.host_key(name)),
        Identity::Admin => (paths.admin_cert(), paths.admin_key()),
    };
    let certs = load_certs(&cert_path)?;
    let key = load_key(&key_path)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(ca_roots(paths)?)
        .with_client_auth_cert(certs, key)?;
    config.alpn_protocols = alpn_list(alpn);
    Ok(config)
}

/// A client config that verifies servers against the CA certificates in the PEM file `ca`
/// (no client certificate), with ALPN `alpn`: a load balancer's TLS to backends outside the
/// lab.
///
/// Errors: the file cannot be read or holds no usable certificate.
pub fn client_config_with_ca(ca: &Path, alpn: &[&[u8]]) -> Result<ClientConfig, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| pem_err(ca, format!("not a usable CA certificate: {e}")))?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn_list(alpn);
    Ok(config)
}

/// A client config trusting only the internal CA and presenting no certificate (what a
/// visitor's browser is, once it trusts `ca.pem`). ALPN `h2`, `http/1.1`.
pub fn ca_client_config(paths: &PkiPaths) -> Result<ClientConfig, PkiError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(ca_roots(paths)?)
        .with_no_client_auth();
    config.alpn_protocols = alpn_list(WEB_ALPN);
    Ok(config)
}

/// The identity in a verified end-entity certificate's `rampart://` URI SAN, or `None`
/// when it has none or cannot be parsed. Call it only on certificates rustls has verified.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<Identity> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) if *uri == issue::ADMIN_URI => Some(Identity::Admin),
        GeneralName::URI(uri) => uri
            .strip_prefix(issue::HOST_URI_PREFIX)
            .filter(|host| !host.is_empty())
            .map(|host| Identity::Host(host.to_string())),
        _ => None,
    })
}
