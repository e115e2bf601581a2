//! Issuing the CA and the leaves, and deciding which existing files can be kept.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};
use topology::{Role, Topology};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{PkiError, PkiPaths};

/// Common name of the internal CA.
pub(crate) const CA_COMMON_NAME: &str = "Rampart internal CA";
/// Common name of the operator's client certificate.
pub(crate) const ADMIN_COMMON_NAME: &str = "rampart-admin";
/// URI SAN prefix of host certificates.
pub(crate) const HOST_URI_PREFIX: &str = "rampart://host/";
/// URI SAN of the admin certificate.
pub(crate) const ADMIN_URI: &str = "rampart://operator/admin";

/// The DNS name every database server certificate carries besides its host's name: the
/// shared identity "a MariaDB server of this lab".
///
/// Why the certificates also carry IP SANs of every database host: a replica reaches its
/// primary through its own host's replication egress, so its `MASTER_HOST` is its own
/// address, and MariaDB's `MASTER_SSL_VERIFY_SERVER_CERT` checks the primary's
/// certificate against `MASTER_HOST` (MariaDB KB: "CHANGE MASTER TO",
/// "Securing Connections for Client and Server"). Any database host may replicate from any
/// other after a failover, so each database server certificate names the addresses of all
/// database hosts. What replication verifies is therefore "the peer holds the key of a
/// database server certificate of this lab's CA", not which database host it is; the
/// application's client, which names the host it wants, verifies the DNS SAN `<host>`.
pub const DB_SERVICE_NAME: &str = "mariadb.rampart.internal";

/// CA validity: ten years.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Leaf validity: one year.
const LEAF_VALIDITY: Duration = Duration::days(365);
/// A leaf expiring sooner than this is reissued.
const LEAF_RENEW_BEFORE: Duration = Duration::days(30);
/// Backdating of `notBefore`, so small clock differences do not matter.
const BACKDATE: Duration = Duration::hours(1);

/// The CA in memory: what rcgen needs to sign leaves, plus its subject key identifier.
struct Ca {
    cert: Certificate,
    key: KeyPair,
    key_id: Vec<u8>,
}

/// What one leaf should be.
struct LeafSpec {
    what: String,
    cert: PathBuf,
    key: PathBuf,
    common_name: String,
    sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
}

pub(crate) fn ensure(dir: &Path, topology: &Topology) -> Result<PkiPaths, PkiError> {
    let paths = PkiPaths::new(dir);
    create_dir(dir)?;
    create_dir(&dir.join("hosts"))?;
    create_dir(&dir.join("db"))?;

    let (ca, fresh) = if paths.ca_cert().exists() && paths.ca_key().exists() {
        (load_ca(&paths)?, false)
    } else {
        (create_ca(&paths)?, true)
    };

    for spec in leaf_specs(&paths, topology)? {
        if fresh || !leaf_is_current(&spec, &ca.key_id) {
            issue_leaf(&spec, &ca)?;
        }
    }
    Ok(paths)
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn issue_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Issue {
        what: what.to_string(),
        source,
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "Rampart");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params
}

fn create_ca(paths: &PkiPaths) -> Result<Ca, PkiError> {
    let what = "internal CA";
    let key = KeyPair::generate().map_err(issue_err(what))?;
    let cert = ca_params().self_signed(&key).map_err(issue_err(what))?;
    // Key first: a reader that sees ca.pem can always find its key.
    write_atomic(&paths.ca_key(), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&paths.ca_cert(), cert.pem().as_bytes(), 0o644)?;
    let key_id = cert.key_identifier();
    Ok(Ca { cert, key, key_id })
}

fn load_ca(paths: &PkiPaths) -> Result<Ca, PkiError> {
    let cert_pem = read_string(&paths.ca_cert())?;
    let key_pem = read_string(&paths.ca_key())?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Pem {
        path: paths.ca_key(),
        reason: format!("not a usable private key: {e}"),
    })?;
    let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| PkiError::Pem {
        path: paths.ca_cert(),
        reason: format!("not a usable CA certificate: {e}"),
    })?;
    let der = crate::load_certs(&paths.ca_cert())?
        .into_iter()
        .next()
        .ok_or_else(|| PkiError::Pem {
            path: paths.ca_cert(),
            reason: "no certificate".to_string(),
        })?;
    let key_id = subject_key_id(&der).ok_or_else(|| PkiError::Pem {
        path: paths.ca_cert(),
        reason: "CA certificate has no subject key identifier".to_string(),
    })?;
    // Re-signing the parameters gives rcgen an issuer with the same subject and key
    // identifier; the stored ca.pem is left untouched.
    let cert = params.self_signed(&key).map_err(issue_err("internal CA"))?;
    Ok(Ca { cert, key, key_id })
}

fn leaf_specs(paths: &PkiPaths, topology: &Topology) -> Result<Vec<LeafSpec>, PkiError> {
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let mut specs = Vec::new();

    let mut site_sans = Vec::new();
    for name in std::iter::once(&topology.site.domain).chain(&topology.site.aliases) {
        site_sans.push(dns(name, "site certificate")?);
    }
    specs.push(LeafSpec {
        what: "site certificate".to_string(),
        cert: paths.site_cert(),
        key: paths.site_key(),
        common_name: topology.site.domain.clone(),
        sans: site_sans,
        usages: vec![ServerAuth],
    });

    for host in &topology.hosts {
        let what = format!("certificate of host {}", host.name);
        let sans = vec![
            dns(&host.name, &what)?,
            SanType::IpAddress(host.address),
            uri(&format!("{HOST_URI_PREFIX}{}", host.name), &what)?,
        ];
        specs.push(LeafSpec {
            cert: paths.host_cert(&host.name),
            key: paths.host_key(&host.name),
            common_name: host.name.clone(),
            sans,
            usages: vec![ServerAuth, ClientAuth],
            what,
        });
    }

    let db_hosts: Vec<_> = topology
        .hosts
        .iter()
        .filter(|h| h.has(Role::DbPrimary) || h.has(Role::DbReplica))
        .collect();
    for host in &db_hosts {
        let what = format!("database certificate of host {}", host.name);
        let mut sans = vec![dns(&host.name, &what)?, dns(DB_SERVICE_NAME, &what)?];
        for other in &db_hosts {
            let ip = SanType::IpAddress(other.address);
            if !sans.contains(&ip) {
                sans.push(ip);
            }
        }
        specs.push(LeafSpec {
            cert: paths.db_cert(&host.name),
            key: paths.db_key(&host.name),
            common_name: host.name.clone(),
            sans,
            usages: vec![ServerAuth],
            what,
        });
    }

    let what = "admin certificate";
    specs.push(LeafSpec {
        what: what.to_string(),
        cert: paths.admin_cert(),
        key: paths.admin_key(),
        common_name: ADMIN_COMMON_NAME.to_string(),
        sans: vec![uri(ADMIN_URI, what)?],
        usages: vec![ClientAuth],
    });
    Ok(specs)
}

fn dns(name: &str, what: &str) -> Result<SanType, PkiError> {
    name.to_string()
        .try_into()
        .map(SanType::DnsName)
        .map_err(issue_err(what))
}

fn uri(value: &str, what: &str) -> Result<SanType, PkiError> {
    value
        .to_string()
        .try_into()
        .map(SanType::URI)
        .map_err(issue_err(what))
}

fn issue_leaf(spec: &LeafSpec, ca: &Ca) -> Result<(), PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.common_name.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = spec.sans.clone();
    params.extended_key_usages = spec.usages.clone();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + LEAF_VALIDITY;

    let key = KeyPair::generate().map_err(issue_err(&spec.what))?;
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key)
        .map_err(issue_err(&spec.what))?;
    write_atomic(&spec.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&spec.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Whether the leaf on disk can be kept: its key exists, it was issued by the CA with key
/// identifier `ca_key_id`, it is not near expiry, and its SANs are exactly the wanted ones.
fn leaf_is_current(spec: &LeafSpec, ca_key_id: &[u8]) -> bool {
    if !spec.key.exists() {
        return false;
    }
    let Some(der) = crate::load_certs(&spec.cert)
        .ok()
        .and_then(|certs| certs.into_iter().next())
    else {
        return false;
    };
    let Ok((_, cert)) = X509Certificate::from_der(&der) else {
        return false;
    };
    let renew_at = OffsetDateTime::now_utc() + LEAF_RENEW_BEFORE;
    if cert.validity().not_after.to_datetime() < renew_at {
        return false;
    }
    if authority_key_id(&cert).as_deref() != Some(ca_key_id) {
        return false;
    }
    let mut have = san_strings(&cert);
    let mut want: Vec<String> = spec.sans.iter().filter_map(wanted_san_string).collect();
    have.sort();
    want.sort();
    have == want
}

fn subject_key_id(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

fn authority_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| id.0.to_vec())
            }
            _ => None,
        })
}

fn san_strings(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(d) => Some(format!("dns:{d}")),
            GeneralName::URI(u) => Some(format!("uri:{u}")),
            GeneralName::IPAddress(bytes) => ip_from_bytes(bytes).map(|ip| format!("ip:{ip}")),
            _ => None,
        })
        .collect()
}

fn wanted_san_string(san: &SanType) -> Option<String> {
    match san {
        SanType::DnsName(d) => Some(format!("dns:{}", d.as_str())),
        SanType::URI(u) => Some(format!("uri:{}", u.as_str())),
        SanType::IpAddress(ip) => Some(format!("ip:{ip}")),
        _ => None,
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn read_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `path` atomically: a temporary file in the same directory, created with `mode`,
/// synced, then renamed over `path` (rename(2) is atomic within one file system), so a
/// concurrent reader sees the old file or the new one, never a partial one.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let io_err = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(e)
    })
}
