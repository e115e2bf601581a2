//! TLS on the data tier's links: the server's certificate files, and the one set of TCP
//! connection options every TCP connection of this crate uses ([`tcp_opts`]).
//!
//! MariaDB negotiates TLS inside its own protocol (the client answers the server's greeting
//! with an `SSLRequest` packet, then the TLS handshake runs on the same connection; MariaDB
//! KB: "Secure Connections Overview"), so the firewall relay and the egresses, which copy
//! bytes, carry it end to end between the client and `mariadbd`. `mariadbd` listens only
//! on its Unix socket (`skip-networking`) and MariaDB 10.11 accepts TLS on a Unix socket
//! connection: relayed connections are TLS from the client to the server process.
//!
//! What it does not give: `require_secure_transport` counts every Unix socket connection as
//! secure, relayed ones included, so it would let a plain connection through the relay.
//! The application, replication and failover-controller accounts are created `REQUIRE
//! SSL` instead. `root` stays without it: the node (and the operator's `rampart db`
//! commands) reach `root` over the server's Unix socket, where `mysql_async` cannot start
//! TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mysql_async::{OptsBuilder, SslOpts};

use crate::DbError;

/// `<state>/pki`: the lab's PKI directory (issued by `rampart up` with `pki::ensure`).
pub fn pki_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pki")
}

/// The files a database host's `mariadbd` serves TLS with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The internal CA certificate (`ssl_ca`; also what the server's replication client
    /// verifies its primary against, `MASTER_SSL_CA`).
    pub ca: PathBuf,
    /// The host's database server certificate (`ssl_cert`, `pki::PkiPaths::db_cert`).
    pub cert: PathBuf,
    /// Its private key (`ssl_key`, mode 0600).
    pub key: PathBuf,
}

impl ServerTls {
    /// The files of `host` under the PKI directory `pki`.
    pub fn for_host(pki: &pki::PkiPaths, host: &str) -> ServerTls {
        ServerTls {
            ca: pki.ca_cert(),
            cert: pki.db_cert(host),
            key: pki.db_key(host),
        }
    }

    /// Checks that the three files exist (`mariadbd` would otherwise start without TLS
    /// and only log it, and every account requiring TLS would be locked out).
    ///
    /// Errors: [`DbError::Config`] naming the missing file and the fix.
    pub fn check(&self, host: &str) -> Result<(), DbError> {
        for (what, path) in [
            ("CA certificate", &self.ca),
            ("database certificate", &self.cert),
            ("database key", &self.key),
        ] {
            if !path.is_file() {
                return Err(DbError::Config(format!(
                    "{host}: {what} {} is missing: the lab's PKI issues it (`rampart up`, \
                     or `rampart reload` after adding a database host)",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

/// The connection options of every TCP connection this crate makes to a MariaDB server:
/// TCP to `addr` (never switching to a Unix socket, `prefer_socket(false)`), TLS required
/// (the driver refuses a server that does not offer it), the server certificate verified
/// by rustls against the CA certificate in the PEM file `ca` alone (no public roots) and
/// for the DNS name `server_name` — a database host's name, or `pki::DB_SERVICE_NAME` for
/// "any database server of this lab" — whatever `addr` is (a relay or an egress), and
/// logging in as `user` with `password`. Callers add the database, pool and init options.
///
/// The CA file is read at each new connection, so a reissued CA is picked up without a
/// restart.
pub fn tcp_opts(
    addr: SocketAddr,
    server_name: &str,
    ca: &Path,
    user: &str,
    password: &str,
) -> OptsBuilder {
    let ssl = SslOpts::default()
        .with_root_certs(vec![ca.to_path_buf().into()])
        .with_disable_built_in_roots(true)
        .with_danger_tls_hostname_override(Some(server_name.to_string()));
    OptsBuilder::default()
        .ip_or_hostname(addr.ip().to_string())
        .tcp_port(addr.port())
        .prefer_socket(false)
        .ssl_opts(Some(ssl))
        .user(Some(user.to_string()))
        .pass(Some(password.to_string()))
}
