//! Where the HTTPS listener's certificates come from, and loading them into a
//! [`pki::CertStore`] for the SNI resolver.
//!
//! In the lab: the site certificate — the ACME one once obtained, else the lab CA's from
//! the PKI directory — as the default, then the topology's `[[site.tls.certificates]]`.
//! Standalone: the ACME certificate if any, the `--tls-cert`/`--tls-key` pairs, then the
//! pairs of `--tls-cert-dir`. Every reload reads the same sources again.

use std::path::{Path, PathBuf};

use pki::{CertFiles, CertStore};

use crate::{LbConfig, LbError};

/// Every certificate/key pair `cfg` names, the default first.
///
/// Errors: [`LbError::CertDir`] when the standalone certificate directory cannot be read,
/// holds a certificate without its key, or when no certificate is configured at all.
pub(crate) fn cert_files(cfg: &LbConfig) -> Result<Vec<CertFiles>, LbError> {
    // An ACME certificate, once there is one, is the default.
    let acme = cfg
        .acme
        .as_ref()
        .filter(|a| a.cert_path().is_file() && a.key_path().is_file())
        .map(|a| CertFiles {
            cert: a.cert_path(),
            key: a.key_path(),
        });
    let mut files = match &cfg.standalone {
        None => vec![acme.unwrap_or_else(|| CertFiles {
            cert: cfg.pki.site_cert(),
            key: cfg.pki.site_key(),
        })],
        Some(s) => {
            let mut files: Vec<CertFiles> = acme.into_iter().collect();
            files.extend(s.certs.iter().cloned());
            if let Some(dir) = &s.cert_dir {
                files.extend(scan_dir(dir)?);
            }
            files
        }
    };
    files.extend(cfg.extra_certs.iter().cloned());
    if files.is_empty() {
        return Err(LbError::CertDir {
            path: PathBuf::new(),
            reason: "no certificate: give --tls-cert/--tls-key or a --tls-cert-dir holding NAME.pem with NAME.key".into(),
        });
    }
    Ok(files)
}

/// Reads and checks every certificate of `cfg` (see [`pki::CertStore::load`]).
pub(crate) fn load(cfg: &LbConfig) -> Result<CertStore, LbError> {
    Ok(CertStore::load(&cert_files(cfg)?)?)
}

/// The pairs of a certificate directory: `NAME.pem` or `NAME.crt` with `NAME.key`, in
/// file-name order. Other files are ignored.
fn scan_dir(dir: &Path) -> Result<Vec<CertFiles>, LbError> {
    let err = |reason: String| LbError::CertDir {
        path: dir.to_path_buf(),
        reason,
    };
    let mut certs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("pem") | Some("crt")
                )
        })
        .collect();
    certs.sort();
    certs
        .into_iter()
        .map(|cert| {
            let key = cert.with_extension("key");
            if key.is_file() {
                Ok(CertFiles { cert, key })
            } else {
                Err(err(format!(
                    "{} has no key {}: put each certificate's key next to it with the same name",
                    cert.display(),
                    key.display()
                )))
            }
        })
        .collect()
}

/// One line per certificate for the log: file and names.
pub(crate) fn describe(store: &CertStore) -> String {
    store
        .summary()
        .iter()
        .map(|c| format!("{} [{}]", c.cert.display(), c.names.join(" ")))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_directory_pairs_certificates_with_keys_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.pem", "b.key", "a.crt", "a.key", "notes.txt"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let pairs = scan_dir(dir.path()).unwrap();
        let names: Vec<_> = pairs
            .iter()
            .map(|p| p.cert.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["a.crt", "b.pem"]);
        assert_eq!(pairs[1].key, dir.path().join("b.key"));
        std::fs::write(dir.path().join("c.pem"), "x").unwrap();
        let e = scan_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("c.pem has no key"), "{e}");
    }
}
