//! The site certificate from an ACME server (RFC 8555), with the HTTP-01 challenge
//! (RFC 8555 §8.3) answered by the load balancer's own HTTP listener.
//!
//! One task per load balancer: it keeps an account (its key and URL persisted as
//! `account.json`, mode 0600) and the certificate (`cert.pem`, `key.pem` mode 0600) in
//! [`AcmeConfig::dir`]. It orders a certificate for [`AcmeConfig::names`] when there is
//! none, when the one there does not cover the names, and once `renew_at` of its lifetime
//! has passed (by default two thirds, as Let's Encrypt advises for 90-day certificates);
//! each new certificate is swapped in through the same reload path as `rampart reload`
//! (new handshakes get it, nothing is restarted). A failed order is retried after 1 minute,
//! doubling up to 1 hour, while the certificate in force (the lab's, until the first
//! issuance) keeps serving. The ACME client is the `instant-acme` crate.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::proxy::Body;
use crate::redirect::Redirect;
use crate::reload::Reloader;

/// Where the HTTP-01 challenge responses are served (RFC 8555 §8.3).
const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// At most this many challenges are served at once (one per name of an order in flight).
const MAX_CHALLENGES: usize = 256;

/// How the load balancer gets its site certificate from an ACME server.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeConfig {
    /// The ACME directory URL, e.g. `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory_url: String,
    /// Contact URIs of the account (`mailto:ops@example.com`); may be empty.
    pub contact: Vec<String>,
    /// A PEM CA certificate that the directory's HTTPS certificate chains to (a private or
    /// test ACME server); `None`: the system's trusted roots.
    pub ca_bundle: Option<PathBuf>,
    /// The DNS names to certify (the site's domain and aliases).
    pub names: Vec<String>,
    /// Where the account and the certificate are kept (created mode 0700).
    pub dir: PathBuf,
    /// The fraction of a certificate's lifetime after which it is renewed, in (0, 1).
    pub renew_at: f64,
}

impl AcmeConfig {
    /// The certificate obtained, once there is one.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    /// Its private key.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }
}

/// The HTTP-01 responses being served: token → key authorization.
#[derive(Debug, Default)]
pub(crate) struct Challenges(RwLock<HashMap<String, String>>);

impl Challenges {
    fn insert(&self, token: String, key_authorization: String) {
        if let Ok(mut map) = self.0.write() {
            if map.len() < MAX_CHALLENGES {
                map.insert(token, key_authorization);
            }
        }
    }
    fn remove(&self, token: &str) {
        if let Ok(mut map) = self.0.write() {
            map.remove(token);
        }
    }
    fn get(&self, token: &str) -> Option<String> {
        self.0.read().ok()?.get(token).cloned()
    }
}

/// The HTTP listener's service: the HTTP-01 challenge responses, everything else to the
/// redirect.
#[derive(Debug, Clone)]
pub(crate) struct Http01 {
    challenges: Option<Arc<Challenges>>,
    redirect: Redirect,
}

impl Http01 {
    /// `challenges`: `None` when ACME is off (everything is redirected).
    pub(crate) fn new(challenges: Option<Arc<Challenges>>, redirect: Redirect) -> Http01 {
        Http01 {
            challenges,
            redirect,
        }
    }
}

impl<B> tower::Service<Request<B>> for Http01 {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let token = req.uri().path().strip_prefix(CHALLENGE_PREFIX);
        let (Some(challenges), Some(token)) = (&self.challenges, token) else {
            return self.redirect.call(req);
        };
        let (status, body) = match challenges.get(token) {
            Some(key_authorization) => (StatusCode::OK, key_authorization),
            None => (StatusCode::NOT_FOUND, String::new()),
        };
        let mut resp = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never: Infallible| match never {})
                .boxed_unsync(),
        );
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        ready(Ok(resp))
    }
}

/// Why getting a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME server or the client refused (problem document, transport error).
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    /// The order did not become ready (a challenge failed validation).
    #[error("order {0:?}: a challenge was not validated")]
    Order(OrderStatus),
    /// An authorization offered no HTTP-01 challenge.
    #[error("no http-01 challenge offered for {0}")]
    NoHttp01(String),
    /// A file of the ACME directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Building the key or the certificate request failed.
    #[error("certificate request: {0}")]
    Csr(#[from] rcgen::Error),
    /// The new certificate was refused by the reload (see [`crate::LbError`]).
    #[error("installing the certificate: {0}")]
    Install(String),
    /// The ACME task is not running (the load balancer is stopping).
    #[error("the ACME task is not running")]
    Stopped,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AcmeError + '_ {
    move |source| AcmeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A request to renew now, answered with the outcome.
pub(crate) type RenewRequest = oneshot::Sender<Result<pki::CertSummary, AcmeError>>;

/// When the certificate at `cfg.cert_path()` should be renewed, seconds since the Unix
/// epoch; `None` when there is none usable (missing, unparsable, not covering every name,
/// expired): order one now.
fn renew_due(cfg: &AcmeConfig) -> Option<i64> {
    let store = pki::CertStore::load(&[pki::CertFiles {
        cert: cfg.cert_path(),
        key: cfg.key_path(),
    }])
    .ok()?;
    let summary = store.summary().first()?;
    let covered = cfg
        .names
        .iter()
        .all(|n| summary.names.contains(&n.to_ascii_lowercase()));
    if !covered {
        return None;
    }
    Some(renew_time(
        summary.not_before_unix,
        summary.not_after_unix,
        cfg.renew_at,
    ))
}

/// `not_before + renew_at × (not_after − not_before)`.
pub(crate) fn renew_time(not_before: i64, not_after: i64, renew_at: f64) -> i64 {
    let lifetime = (not_after - not_before).max(0) as f64;
    not_before + (lifetime * renew_at.clamp(0.0, 1.0)) as i64
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The ACME task: issues and renews until `shutdown`; `renew` forces an order now.
pub(crate) async fn run(
    cfg: AcmeConfig,
    challenges: Arc<Challenges>,
    reloader: Arc<Reloader>,
    mut renew: mpsc::Receiver<RenewRequest>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(60);
    loop {
        let due = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || renew_due(&cfg))
                .await
                .ok()
                .flatten()
        };
        let wait = match due {
            None => Duration::ZERO,
            Some(at) => Duration::from_secs((at - now_unix()).clamp(0, 3600) as u64),
        };
        let forced: Option<RenewRequest> = if wait.is_zero() {
            None
        } else {
            tokio::select! {
                _ = shutdown.changed() => return,
                r = renew.recv() => match r {
                    Some(reply) => Some(reply),
                    None => return,
                },
                _ = tokio::time::sleep(wait) => {
                    continue;
                }
            }
        };
        let result = tokio::select! {
            _ = shutdown.changed() => return,
            r = obtain(&cfg, &challenges, &reloader) => r,
        };
        match &result {
            Ok(c) => {
                backoff = Duration::from_secs(60);
                tracing::info!(names = ?c.names, not_after = c.not_after_unix, "ACME certificate installed");
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?backoff, "ACME order failed; the certificate in force keeps serving");
            }
        }
        let failed = result.is_err();
        if let Some(reply) = forced {
            let _ = reply.send(result);
        }
        if failed {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(backoff) => {}
                r = renew.recv() => match r {
                    // A forced renewal during the back-off is tried at once.
                    Some(reply) => {
                        let r = obtain(&cfg, &challenges, &reloader).await;
                        let _ = reply.send(r);
                    }
                    None => return,
                },
            }
            backoff = (backoff * 2).min(Duration::from_secs(3600));
        }
    }
}

/// The account: the one in `account.json`, or a new one registered and saved there.
async fn account(cfg: &AcmeConfig) -> Result<Account, AcmeError> {
    let builder = || match &cfg.ca_bundle {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let path = cfg.account_path();
    if let Ok(bytes) = tokio::fs::read(&path).await {
        if let Ok(creds) = serde_json::from_slice::<AccountCredentials>(&bytes) {
            return Ok(builder()?.from_credentials(creds).await?);
        }
        tracing::warn!(path = %path.display(), "unreadable ACME account file; registering a new account");
    }
    let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
    let (account, creds) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory_url.clone(),
            None,
        )
        .await?;
    let json = serde_json::to_vec_pretty(&creds).map_err(|e| AcmeError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    write_private(&path, &json).await?;
    tracing::info!(id = account.id(), "ACME account registered");
    Ok(account)
}

/// Writes `bytes` to `path` mode 0600 through a temporary file and a rename.
async fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    let (path, bytes) = (path.to_path_buf(), bytes.to_vec());
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    })
    .await
    .map_err(|e| AcmeError::Install(e.to_string()))?
}

/// One order: HTTP-01 for every name, a new P-256 key, the chain saved, then reloaded.
async fn obtain(
    cfg: &AcmeConfig,
    challenges: &Challenges,
    reloader: &Reloader,
) -> Result<pki::CertSummary, AcmeError> {
    let account = account(cfg).await?;
    let identifiers: Vec<Identifier> = cfg
        .names
        .iter()
        .map(|n| Identifier::Dns(n.clone()))
        .collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut tokens = Vec::new();
    let served = async {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            if authz.status == AuthorizationStatus::Valid {
                continue;
            }
            let name = format!("{:?}", authz.identifier());
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .ok_or(AcmeError::NoHttp01(name))?;
            let token = challenge.token.clone();
            challenges.insert(
                token.clone(),
                challenge.key_authorization().as_str().to_string(),
            );
            tokens.push(token);
            challenge.set_ready().await?;
        }
        Ok::<_, AcmeError>(())
    }
    .await;
    let ready = match served {
        Ok(()) => order
            .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(90)))
            .await
            .map_err(AcmeError::from),
        Err(e) => Err(e),
    };
    for t in &tokens {
        challenges.remove(t);
    }
    let status = ready?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::Order(status));
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(cfg.names.clone())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    order.finalize_csr(csr.der()).await?;
    let chain = order
        .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(90)))
        .await?;
    // The key first: a reload between the two renames refuses the mismatched pair and
    // keeps the certificate in force.
    write_private(&cfg.key_path(), key.serialize_pem().as_bytes()).await?;
    write_private(&cfg.cert_path(), chain.as_bytes()).await?;
    let report = reloader
        .reload(None)
        .await
        .map_err(|e| AcmeError::Install(e.to_string()))?;
    report
        .certificates
        .into_iter()
        .next()
        .ok_or_else(|| AcmeError::Install("no certificate after reload".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_the_fraction_of_the_lifetime() {
        // A 90-day certificate renewed at two thirds: after 60 days.
        let day = 86_400;
        assert_eq!(renew_time(0, 90 * day, 2.0 / 3.0), 60 * day);
        assert_eq!(renew_time(1000, 1000, 0.5), 1000);
        assert_eq!(renew_time(0, 100, 2.0), 100);
    }

    #[test]
    fn challenges_are_bounded() {
        let c = Challenges::default();
        for i in 0..(MAX_CHALLENGES + 10) {
            c.insert(format!("t{i}"), "k".into());
        }
        assert_eq!(c.0.read().map(|m| m.len()).unwrap_or(0), MAX_CHALLENGES);
        c.remove("t0");
        assert!(c.get("t0").is_none());
        assert_eq!(c.get("t1").as_deref(), Some("k"));
    }
}
