//! The internal public-key infrastructure: one CA per state directory, the site certificate
//! for the load balancer, one certificate per host for internal mutual TLS, and an admin
//! (operator) client certificate; plus the rustls configurations every role uses.
//!
//! This crate owns certificate issuance and TLS policy (versions, ALPN, client
//! authentication). It never opens sockets. Every rustls config is built with the `ring`
//! provider explicitly, so no process-wide default provider is needed.
//!
//! Identity: every leaf carries a URI SAN, `rampart://host/<name>` for hosts and
//! `rampart://operator/admin` for the admin client; [`peer_identity`] reads it back.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ServerConfig};
use topology::Topology;

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

/// Who a verified peer certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A topology host (its node process), e.g. `Host("lb-01")`.
    Host(String),
    /// The operator's admin client certificate.
    Admin,
}

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
}

/// Creates what is missing under `dir` for `topology`: the CA (once; never replaced while
/// `ca.pem` and `ca.key` exist), the site certificate, one certificate per host and the
/// admin certificate. Leaves signed by the current CA are kept; keys are written mode 0600.
///
/// Errors: [`PkiError::Io`] when `dir` is not writable, [`PkiError::Issue`] from rcgen,
/// [`PkiError::Pem`] when an existing CA file is unreadable.
pub fn ensure(dir: &Path, topology: &Topology) -> Result<PkiPaths, PkiError> {
    let _ = (dir, topology);
    todo!("pki::ensure")
}

/// The rustls crypto provider every config here uses (`ring`).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file. Errors when the file holds none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let _ = path;
    todo!("pki::load_certs")
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let _ = path;
    todo!("pki::load_key")
}

/// The public site's server config: the site certificate, TLS 1.2 and 1.3 only, ALPN `h2`
/// then `http/1.1` (RFC 7301), no client authentication.
pub fn site_server_config(paths: &PkiPaths) -> Result<ServerConfig, PkiError> {
    let _ = paths;
    todo!("pki::site_server_config")
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
    let _ = (paths, host, alpn);
    todo!("pki::mtls_server_config")
}

/// An internal client config presenting `identity`'s certificate (a host's or the admin's)
/// and trusting only the internal CA. Servers are verified by DNS name = host name.
/// ALPN `alpn` in order of preference (empty: none).
pub fn mtls_client_config(
    paths: &PkiPaths,
    identity: &Identity,
    alpn: &[&[u8]],
) -> Result<ClientConfig, PkiError> {
    let _ = (paths, identity, alpn);
    todo!("pki::mtls_client_config")
}

/// A client config trusting only the internal CA and presenting no certificate (what a
/// visitor's browser is, once it trusts `ca.pem`). ALPN `h2`, `http/1.1`.
pub fn ca_client_config(paths: &PkiPaths) -> Result<ClientConfig, PkiError> {
    let _ = paths;
    todo!("pki::ca_client_config")
}

/// The identity in a verified end-entity certificate's `rampart://` URI SAN, or `None`
/// when it has none or cannot be parsed. Call it only on certificates rustls has verified.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<Identity> {
    let _ = cert;
    todo!("pki::peer_identity")
}
