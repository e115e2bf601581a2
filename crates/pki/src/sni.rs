//! Several server certificates chosen by the client's SNI (RFC 6066 §3), replaceable while
//! the listener runs, and the session-resumption settings of a public listener.
//!
//! A [`CertStore`] is built from certificate/key file pairs, all or nothing: every pair must
//! parse, its key must match its certificate and the certificate must not have expired.
//! The first pair is the default, presented to clients that send no SNI or a name no
//! certificate covers. [`SniResolver`] holds the current store behind an atomic pointer:
//! [`SniResolver::replace`] swaps it for new handshakes while connections already
//! established keep the certificate they were given.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{alpn_list, load_certs, load_key, pem_err, provider, PkiError, VERSIONS, WEB_ALPN};

/// One certificate: a PEM chain (leaf first) and its PEM private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, end-entity certificate first.
    pub cert: PathBuf,
    /// Its PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// What one loaded certificate covers, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The certificate file.
    pub cert: PathBuf,
    /// DNS names of its subject alternative names (lower case; `*.example.com` for a
    /// wildcard).
    pub names: Vec<String>,
    /// Start of its validity, seconds since the Unix epoch.
    pub not_before_unix: i64,
    /// End of its validity, seconds since the Unix epoch.
    pub not_after_unix: i64,
}

/// A set of certificates indexed by the names they cover. Build with [`CertStore::load`].
pub struct CertStore {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    summary: Vec<CertSummary>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("certificates", &self.summary)
            .finish()
    }
}

impl CertStore {
    /// Loads every pair of `files`; the first is the default certificate, served for names
    /// no other certificate covers. A name covered by two of the others goes to the one
    /// listed first. Wildcards (`*.example.com`) cover
    /// exactly one label (RFC 6125 §6.4.3); an exact name wins over a wildcard.
    ///
    /// Errors (nothing is kept from a failed load): `files` is empty
    /// ([`PkiError::Pem`] with an empty path); a file cannot be read or holds no
    /// certificate or key ([`PkiError::Io`], [`PkiError::Pem`]); the key is not usable or
    /// does not match the certificate, or the certificate cannot be parsed or has expired
    /// ([`PkiError::Pem`] naming the certificate file).
    pub fn load(files: &[CertFiles]) -> Result<CertStore, PkiError> {
        let Some(first) = files.first() else {
            return Err(pem_err(
                std::path::Path::new(""),
                "no certificate configured".to_string(),
            ));
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut loaded = Vec::with_capacity(files.len());
        for f in files {
            loaded.push(load_one(f, now)?);
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // The certificates after the first claim their names first; the default covers
        // what they leave.
        let order = (1..loaded.len()).chain(std::iter::once(0));
        let keys: Vec<Arc<CertifiedKey>> =
            loaded.iter().map(|(k, _)| Arc::new(k.clone())).collect();
        for i in order {
            for name in &loaded[i].1.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard
                        .entry(parent.to_string())
                        .or_insert_with(|| keys[i].clone()),
                    None => exact.entry(name.clone()).or_insert_with(|| keys[i].clone()),
                };
            }
        }
        let summary = loaded.into_iter().map(|(_, s)| s).collect();
        let default = keys.first().cloned();
        let default = default.ok_or_else(|| pem_err(&first.cert, "no certificate".into()))?;
        Ok(CertStore {
            default,
            exact,
            wildcard,
            summary,
        })
    }

    /// The certificate for a client that asked for `sni` (`None`: no SNI): the exact name,
    /// else a wildcard covering it, else the default.
    pub fn choose(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) else {
            return self.default.clone();
        };
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return k.clone();
            }
        }
        self.default.clone()
    }

    /// What each certificate covers, in load order (the default first).
    pub fn summary(&self) -> &[CertSummary] {
        &self.summary
    }

    /// The exact (non-wildcard) DNS names of the certificates after the default, lower
    /// case, sorted, each once: the names added for SNI.
    pub fn extra_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .summary
            .iter()
            .skip(1)
            .flat_map(|s| s.names.iter())
            .filter(|n| !n.starts_with("*."))
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Loads, checks and summarises one pair.
fn load_one(f: &CertFiles, now_unix: i64) -> Result<(CertifiedKey, CertSummary), PkiError> {
    let chain = load_certs(&f.cert)?;
    let key = load_key(&f.key)?;
    let bad = |reason: String| pem_err(&f.cert, reason);
    let (_, leaf) = X509Certificate::from_der(&chain[0])
        .map_err(|e| bad(format!("unparsable certificate: {e}")))?;
    let not_after = leaf.validity().not_after.timestamp();
    let not_before = leaf.validity().not_before.timestamp();
    if not_after <= now_unix {
        return Err(bad(format!(
            "certificate expired at {} (Unix time {not_after})",
            leaf.validity().not_after
        )));
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    drop(leaf);
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        bad(format!(
            "key {} does not fit this certificate: {e}",
            f.key.display()
        ))
    })?;
    Ok((
        certified,
        CertSummary {
            cert: f.cert.clone(),
            names,
            not_before_unix: not_before,
            not_after_unix: not_after,
        },
    ))
}

/// Picks a certificate from the current [`CertStore`] by SNI, for every handshake.
pub struct SniResolver {
    current: ArcSwap<CertStore>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("store", &*self.current.load())
            .finish()
    }
}

impl SniResolver {
    /// A resolver serving `store`.
    pub fn new(store: CertStore) -> SniResolver {
        SniResolver {
            current: ArcSwap::from_pointee(store),
        }
    }

    /// Serves `store` to every handshake that starts from now on; connections already
    /// established keep their certificate.
    pub fn replace(&self, store: CertStore) {
        self.current.store(Arc::new(store));
    }

    /// The store currently served.
    pub fn current(&self) -> Arc<CertStore> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().choose(hello.server_name()))
    }
}

/// TLS session resumption on a public listener (RFC 8446 §2.2 for TLS 1.3; RFC 5246 §7.3
/// session IDs and RFC 5077 tickets for TLS 1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumption {
    /// Sessions kept in the server's memory cache (TLS 1.2 session IDs; TLS 1.3 sessions
    /// when tickets are off); the oldest is evicted beyond it. 0 disables the cache.
    pub cache_entries: usize,
    /// Stateless tickets (TLS 1.2 and 1.3), encrypted with ChaCha20-Poly1305 keys that
    /// rotate every 6 hours; a ticket stays valid for up to 12 hours (the current and the
    /// previous key). Off: TLS 1.3 resumes from the cache.
    pub tickets: bool,
}

/// The public listener's server config: certificates chosen by `resolver`, TLS 1.2/1.3,
/// ALPN `h2` then `http/1.1`, no client authentication, session resumption per
/// `resumption`. The resolver can be swapped later ([`SniResolver::replace`]) without
/// rebuilding the config, so the session cache and ticket keys survive a certificate
/// reload.
///
/// Errors: [`PkiError::Tls`] when the ticket keys cannot be generated (no randomness).
pub fn sni_server_config(
    resolver: Arc<SniResolver>,
    resumption: Resumption,
) -> Result<ServerConfig, PkiError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn_list(WEB_ALPN);
    config.ignore_client_order = true;
    config.session_storage = if resumption.cache_entries > 0 {
        ServerSessionMemoryCache::new(resumption.cache_entries)
    } else {
        Arc::new(rustls::server::NoServerSessionStorage {})
    };
    if resumption.tickets {
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::Path;

    /// Writes a self-signed certificate for `names` (valid `days` from now, negative:
    /// expired) and its key under `dir` as `stem.pem`/`stem.key`.
    fn pair(dir: &Path, stem: &str, names: &[&str], days: i64) -> CertFiles {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(400);
        params.not_after = now + time::Duration::days(days);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let files = CertFiles {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    fn leaf(store: &CertStore, sni: Option<&str>) -> Vec<u8> {
        store.choose(sni).cert[0].to_vec()
    }

    fn der(f: &CertFiles) -> Vec<u8> {
        crate::load_certs(&f.cert).unwrap()[0].to_vec()
    }

    #[test]
    fn chooses_by_exact_name_then_wildcard_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let site = pair(
            dir.path(),
            "site",
            &["www.foobar.com", "shop.example.test"],
            30,
        );
        let shop = pair(dir.path(), "shop", &["shop.example.test"], 30);
        let wild = pair(dir.path(), "wild", &["*.apps.example.test"], 30);
        let store = CertStore::load(&[site.clone(), shop.clone(), wild.clone()]).unwrap();
        assert_eq!(leaf(&store, None), der(&site));
        assert_eq!(leaf(&store, Some("www.foobar.com")), der(&site));
        // A later certificate wins over the default for the names it covers.
        assert_eq!(leaf(&store, Some("SHOP.example.test.")), der(&shop));
        assert_eq!(leaf(&store, Some("a.apps.example.test")), der(&wild));
        // A wildcard covers one label only.
        assert_eq!(leaf(&store, Some("a.b.apps.example.test")), der(&site));
        assert_eq!(leaf(&store, Some("unknown.test")), der(&site));
        assert_eq!(store.extra_names(), ["shop.example.test"]);
    }

    #[test]
    fn a_bad_pair_fails_the_whole_load() {
        let dir = tempfile::tempdir().unwrap();
        let good = pair(dir.path(), "good", &["a.test"], 30);
        let other = pair(dir.path(), "other", &["b.test"], 30);
        let expired = pair(dir.path(), "old", &["c.test"], -1);
        let mismatched = CertFiles {
            cert: good.cert.clone(),
            key: other.key.clone(),
        };
        let e = CertStore::load(&[good.clone(), mismatched])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit"), "{e}");
        let e = CertStore::load(&[good.clone(), expired])
            .unwrap_err()
            .to_string();
        assert!(e.contains("expired"), "{e}");
        std::fs::write(dir.path().join("garbage.pem"), "not pem").unwrap();
        let garbage = CertFiles {
            cert: dir.path().join("garbage.pem"),
            key: good.key.clone(),
        };
        assert!(CertStore::load(&[good, garbage]).is_err());
        assert!(CertStore::load(&[]).is_err());
    }
}
