//! The load balancer of `www.foobar.com`: an HTTPS listener holding the site certificate
//! (TLS 1.2/1.3, HTTP/1.1 and HTTP/2) that forwards every request to one of the backends
//! its active and passive health checks consider available — chosen by the configured
//! algorithm, sticky cookie, weights and backup flags — over pooled mutual-TLS HTTP/1.1
//! connections made from this host's address, retrying idempotent requests elsewhere
//! within a budget; an HTTP listener that only redirects to HTTPS; and a local admin
//! socket to drain and enable backends.
//!
//! This crate owns the listeners, the balancing and retry policy, the active health checks,
//! the access log (one line per request on either listener, nginx `combined` format plus
//! backend, response time and listener, written by one background thread) and the load
//! balancer's own metrics (`rampart_backend_up`, `rampart_lb_access_log_dropped_total`,
//! `rampart_lb_rejected_requests_total{reason}`, `rampart_lb_connections_closed_total`,
//! `rampart_lb_backend_active_requests`, `rampart_lb_backend_queue_length`,
//! `rampart_lb_websocket_tunnels`); requests are
//! recorded in the node's shared HTTP families from `telemetry`, never registered here. It
//! never issues certificates or decides who may connect (that is `pki` and
//! `topology::Policy`, enforced through `firewall` and `serve`), never holds a backend
//! connection while a client is slow (bodies are buffered both ways, bounded), never
//! replays a request once any of it has been sent to a backend, and never waits on the
//! access log file in the request path.
//!
//! Flow of one request: [`firewall::GuardedListener`] (policy, caps) → `serve::serve_http`
//! (bounded handshake, first byte, head, idle) → access log layer → metrics layer → HSTS
//! and security-header layers → proxy (target and `Host` checks, body read in full, a
//! backend slot or its queue, hop-by-hop and `X-Forwarded-*` headers, forward, response
//! buffered up to a bound, naming the backend in the response's extensions for the access
//! log).

#![forbid(unsafe_code)]

mod access_format;
mod access_log;
mod acme;
pub mod admin;
mod backend_metrics;
mod balancer;
mod buffer_budget;
mod config;
mod exchange;
mod health;
mod layers;
mod outlier;
mod proxy;
pub mod rate_limit;
mod redirect;
mod reload;
mod retry;
mod selection;
mod sticky;
mod tls;
mod unavailable;
mod upstream;
mod websocket;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use firewall::{Filter, GuardedListener};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serve::{Ended, HttpOptions, RoleHandle, RoleTasks};
use tokio::sync::watch;
use topology::Service;
use tower::util::Either;
use tower::ServiceBuilder;

pub use access_log::Rotation;

/// File name of a lab load balancer's admin socket in its host directory
/// (`<state>/hosts/<host>/lb-admin.sock`).
pub const ADMIN_SOCKET_FILE: &str = "lb-admin.sock";
pub use acme::{AcmeConfig, AcmeError};
pub use config::{Backend, BackendSpec, HttpMode, LbConfig, StandaloneOptions, StandaloneTls};
pub use reload::ReloadReport;
pub use topology::{AccessLogFormat, Algorithm, Balancing};

use access_log::{AccessLog, AccessLogLayer, Listener};
use layers::{add_hsts, Metrics, MetricsLayer};
use redirect::Redirect;
use reload::Reloader;

/// Why [`start`] failed. Nothing keeps running after an error.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// A listener could not be bound (address not local, port taken, port below 1024
    /// without the privilege).
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address that was being bound.
        addr: SocketAddr,
        /// The error of `bind(2)`/`listen(2)`.
        source: io::Error,
    },
    /// The site server config or this host's mutual-TLS client config could not be built
    /// (missing or unreadable PEM files under the PKI directory).
    #[error("TLS configuration: {0}")]
    Pki(#[from] pki::PkiError),
    /// The access log file could not be opened for appending (missing directory,
    /// permissions), or its writer thread could not be started.
    #[error("access log {}: {source}", path.display())]
    AccessLog {
        /// The configured [`LbConfig::access_log`].
        path: PathBuf,
        /// The error of `open(2)` or of spawning the thread.
        source: io::Error,
    },
    /// The configuration lists no backend.
    #[error("no backends configured: the topology needs at least one host with the web role")]
    NoBackends,
    /// A backend name is duplicated or unusable as a TLS server name / URI host.
    #[error("backend {name:?}: {reason}")]
    BadBackend {
        /// The backend's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate directory cannot be read or holds a certificate without its key, or
    /// no certificate is configured.
    #[error("certificates {}: {reason}", path.display())]
    CertDir {
        /// The directory (empty when no certificate is configured at all).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A reload could not run to the end (nothing was changed).
    #[error("reload: {0}")]
    Reload(String),
    /// ACME is configured but the HTTP listener, which answers its HTTP-01 challenge, is
    /// off.
    #[error("ACME needs the HTTP listener for its http-01 challenge: turn it on (--http-listen)")]
    AcmeWithoutHttp,
}

/// A running load balancer. It runs until [`LbHandle::shutdown`] is called **or the handle
/// is dropped**: keep it alive as long as the load balancer should serve.
#[derive(Debug)]
pub struct LbHandle {
    https_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    filters: Vec<Arc<Filter>>,
    reloader: Arc<Reloader>,
    acme: Option<tokio::sync::mpsc::Sender<acme::RenewRequest>>,
    shutdown: watch::Sender<bool>,
    tasks: RoleTasks,
    access_log: Option<AccessLog>,
    admin_socket: Option<PathBuf>,
}

impl LbHandle {
    /// The bound HTTPS listener address (the real port when configured with 0).
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// The bound HTTP (redirect) listener address; `None` when it is off (standalone mode
    /// without `--http-listen`).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The firewall filters of the HTTPS and HTTP listeners, in that order (accepted and
    /// refused connection counters).
    pub fn filters(&self) -> Vec<Arc<Filter>> {
        self.filters.clone()
    }

    /// Every backend as `(name, up)` in configuration order; `up` is the health checks'
    /// current verdict (backends start down).
    pub fn backends(&self) -> Vec<(String, bool)> {
        self.reloader
            .live
            .load()
            .balancer
            .backends()
            .iter()
            .map(|b| (b.name.to_string(), b.is_up()))
            .collect()
    }

    /// Whether at least one backend is up, i.e. whether HTTPS requests can be served.
    pub fn healthy(&self) -> bool {
        self.reloader
            .live
            .load()
            .balancer
            .backends()
            .iter()
            .any(|b| b.is_up())
    }

    /// Reloads without restarting: reads every certificate again (for new handshakes;
    /// established connections keep theirs) and, with `cfg`, swaps in its backends, health
    /// check, `[balancer]` limits, site names and body timeouts for new requests while
    /// requests in flight finish on the old ones. `None`: the configuration in force with
    /// its files read again (a certificate renewed in place). All or nothing; listener
    /// settings are kept (see [`ReloadReport::needs_restart`]). Waits (at most `rise ×
    /// interval + timeout + 1 s`) until the backends serving now pass the new generation's
    /// health checks, so no request meets a backend still marked down.
    ///
    /// Errors: a certificate or key cannot be read, does not match, or has expired
    /// ([`LbError::Pki`], [`LbError::CertDir`]); an unusable backend list
    /// ([`LbError::NoBackends`], [`LbError::BadBackend`]); the upstream TLS files are
    /// unusable ([`LbError::Pki`]). The error is also logged; the running configuration
    /// and certificates stay.
    pub async fn reload(&self, cfg: Option<LbConfig>) -> Result<ReloadReport, LbError> {
        self.reloader.reload(cfg).await
    }

    /// The configuration generation serving new requests: 1 at start, +1 per reload.
    pub fn generation(&self) -> u64 {
        self.reloader
            .generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Orders a new site certificate from the ACME server now and installs it (as a
    /// reload would), whatever the current one's age; returns what it covers.
    ///
    /// Errors: ACME is not configured or the load balancer is stopping
    /// ([`AcmeError::Stopped`]), or the order failed (the certificate in force stays).
    pub async fn renew_certificate(&self) -> Result<pki::CertSummary, AcmeError> {
        let tx = self.acme.as_ref().ok_or(AcmeError::Stopped)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(reply).await.map_err(|_| AcmeError::Stopped)?;
        answer.await.map_err(|_| AcmeError::Stopped)?
    }

    /// The certificates served now, the default first.
    pub fn certificates(&self) -> Vec<pki::CertSummary> {
        self.reloader.resolver.current().summary().to_vec()
    }

    /// Every backend's state, in configuration order.
    pub fn backend_status(&self) -> Vec<BackendStatus> {
        status_of(&self.reloader.live.load().balancer)
    }

    /// Drains backend `name` (`draining = true`: no new requests go to it, those in
    /// flight finish) or puts it back in rotation (`false`). Takes effect for the next
    /// request; not persisted across restarts. False when no backend has that name.
    pub fn set_draining(&self, name: &str, draining: bool) -> bool {
        let found = self
            .reloader
            .live
            .load()
            .balancer
            .set_draining(name, draining);
        if found {
            tracing::info!(backend = name, draining, "backend drain state changed");
        }
        found
    }

    /// Reopens the access log at its path before its next line (SIGHUP, after an external
    /// log rotation renamed the file).
    pub fn reopen_logs(&self) {
        if let Some(log) = &self.access_log {
            log.reopen();
        }
    }

    /// Stops accepting connections and health checking; open connections finish their
    /// in-flight requests and WebSocket tunnels may end by themselves (up to the listeners'
    /// `drain_timeout_ms`), then both close. Returns immediately;
    /// [`RoleHandle::shutdown`] also waits for the drain.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
        self.remove_admin_socket();
        self.reloader.stop();
        self.tasks.cancel();
    }

    fn remove_admin_socket(&self) {
        if let Some(path) = &self.admin_socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for LbHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl RoleHandle for LbHandle {
    fn role(&self) -> &'static str {
        "lb"
    }
    fn addrs(&self) -> Vec<(Service, SocketAddr)> {
        std::iter::once((Service::Https, self.https_addr))
            .chain(self.http_addr.map(|a| (Service::Http, a)))
            .collect()
    }
    fn healthy(&self) -> bool {
        LbHandle::healthy(self)
    }
    fn filters(&self) -> Vec<Arc<Filter>> {
        self.filters.clone()
    }
    fn shutdown(&self) -> serve::BoxFuture<()> {
        self.shutdown.send_replace(true);
        self.remove_admin_socket();
        self.reloader.stop();
        let tasks = self.tasks.clone();
        Box::pin(async move { tasks.shutdown().await })
    }
}

/// One backend as [`LbHandle::backend_status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendStatus {
    /// The backend's name.
    pub name: String,
    /// The active health checks' verdict.
    pub up: bool,
    /// Ejected by passive outlier detection right now.
    pub ejected: bool,
    /// Draining (`rampart lb drain`): no new requests.
    pub draining: bool,
    /// Up, not ejected, not draining: new requests may go to it.
    pub available: bool,
    /// Configured weight.
    pub weight: u32,
    /// A backup backend.
    pub backup: bool,
    /// Requests in flight to it.
    pub active_requests: usize,
}

/// Every backend of `balancer` as [`BackendStatus`], in configuration order.
fn status_of(balancer: &balancer::Balancer) -> Vec<BackendStatus> {
    balancer
        .backends()
        .iter()
        .enumerate()
        .map(|(i, b)| BackendStatus {
            name: b.name.to_string(),
            up: b.is_up(),
            ejected: balancer.is_ejected(i),
            draining: b.is_draining(),
            available: balancer.is_available(i),
            weight: b.weight,
            backup: b.backup,
            active_requests: b.active(),
        })
        .collect()
}

/// Labels of `rampart_lb_connections_closed_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// Counts connections the serve path closed for a reason (timeouts, handshake failures,
/// unparsable or oversized heads answered by the serve path itself, evictions) per listener.
fn closed_counter(
    family: &Family<ClosedLabels, Counter>,
    listener: &'static str,
) -> serve::OnEnded {
    let family = family.clone();
    Arc::new(move |why: Ended, peer| {
        family
            .get_or_create(&ClosedLabels {
                listener,
                reason: why.as_str(),
            })
            .inc();
        if matches!(
            why,
            Ended::BadRequest | Ended::HeadTooLarge | Ended::H2cRefused
        ) {
            tracing::info!(%peer, listener, reason = why.as_str(), "request rejected before routing");
        }
    })
}

pub(crate) fn check_backends(backends: &[Backend]) -> Result<(), LbError> {
    if backends.is_empty() {
        return Err(LbError::NoBackends);
    }
    let mut seen = std::collections::HashSet::new();
    for b in backends {
        let bad = |reason: &str| LbError::BadBackend {
            name: b.name.clone(),
            reason: reason.to_string(),
        };
        if !seen.insert(b.name.as_str()) {
            return Err(bad("listed twice"));
        }
        let dns_name = !b.name.is_empty()
            && b.name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
        if !dns_name || rustls::pki_types::ServerName::try_from(b.name.as_str()).is_err() {
            return Err(bad("not a DNS name (letters, digits, '-', '.')"));
        }
        if let Some(sni) = &b.server_name {
            if rustls::pki_types::ServerName::try_from(sni.as_str()).is_err() {
                return Err(bad("its TLS server name is not a DNS name or IP address"));
            }
        }
    }
    Ok(())
}

/// Binds this host's `service` listener on `port` through the network seam; returns the
/// listener and its bound address.
async fn bind(
    net: &firewall::Net,
    service: Service,
    port: u16,
) -> Result<(GuardedListener, SocketAddr), LbError> {
    let addr = SocketAddr::new(net.address(), port);
    let listener = net
        .listen(service, port)
        .await
        .map_err(|source| LbError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| LbError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// Starts the load balancer on the current tokio runtime: builds the TLS configs from
/// `cfg.pki` (site certificate for clients; this host's certificate for backends unless
/// `plain_backends`), binds the HTTPS and HTTP listeners on `cfg.address`, registers
/// `rampart_backend_up{backend}` in `registry`, and spawns the accept loops and one health
/// checker per backend. Every request on either listener is recorded in `http_metrics` (the node's
/// shared families, registered once by the caller with
/// [`telemetry::HttpMetrics::register`]) as `rampart_http_requests_total{role="lb",code}`
/// and `rampart_http_request_duration_seconds{role="lb"}`. Returns once both listeners are
/// bound; backends are down until they pass `cfg.health.rise` checks.
///
/// With `cfg.access_log` set, every request on either listener is also appended to that
/// file as one line (nginx `combined` plus operator fields):
///
/// ```text
/// 127.0.0.1 - - [22/Nov/2026:03:40:01 +0000] "GET /api/messages?x=1 HTTP/2.0" 200 1234 "referer" "user-agent" backend=web-01 rt=0.0031 listener=https
/// ```
///
/// — client IP; arrival time in UTC (nginx `$time_local` shape); method, path and query,
/// protocol; status; the response's declared body length in bytes (`Content-Length`, or
/// the exact size of a response the load balancer made itself) or `-`; `Referer` and
/// `User-Agent` or `-`; the backend that answered (`-` for redirects and the load
/// balancer's own 502/503/504); seconds from arrival to response headers; the listener.
/// Client-sent fields are escaped (`\"`, `\\`, other bytes outside printable ASCII as
/// `\xHH`, as nginx does), so a request is always exactly one line. The request path never
/// waits for the file: lines go through a bounded queue (16 384 lines) to one writer thread
/// that flushes whenever the queue is empty; a line that does not fit is dropped and counted
/// in `rampart_lb_access_log_dropped_total` (registered in `registry` in any case). There is
/// no rotation; the file is opened in append mode, so truncating it in place is safe.
///
/// Errors: [`LbError::Pki`] for missing certificates, [`LbError::Bind`] naming the address
/// that could not be bound, [`LbError::NoBackends`] / [`LbError::BadBackend`] for an
/// unusable backend list, [`LbError::AccessLog`] when the access log cannot be opened.
pub async fn start(
    cfg: LbConfig,
    registry: &mut Registry,
    http_metrics: &telemetry::HttpMetrics,
) -> Result<LbHandle, LbError> {
    check_backends(&cfg.backends)?;
    if cfg.acme.is_some() && !cfg.http_enabled {
        return Err(LbError::AcmeWithoutHttp);
    }
    let certs = tls::load(&cfg)?;
    tracing::info!(certificates = %tls::describe(&certs), "site certificates loaded");
    let cert_names = certs.extra_names();
    let resolver = Arc::new(pki::SniResolver::new(certs));
    let site_tls = Arc::new(pki::sni_server_config(resolver.clone(), cfg.resumption)?);
    let upstream_tls = reload::upstream_tls(&cfg)?;

    let (https, https_addr) = bind(&cfg.net, Service::Https, cfg.https_port).await?;
    let http = if cfg.http_enabled {
        Some(bind(&cfg.net, Service::Http, cfg.http_port).await?)
    } else {
        None
    };
    let http_addr = http.as_ref().map(|(_, a)| *a);
    let tasks = RoleTasks::new();
    let tunnels = websocket::Tunnels::register(
        registry,
        tasks.clone(),
        https.limits().drain_timeout(),
        http.as_ref().map_or(std::time::Duration::ZERO, |(l, _)| {
            l.limits().drain_timeout()
        }),
    );
    let https_filter = https.filter().clone();
    let http_filter = http.as_ref().map(|(l, _)| l.filter().clone());
    let closed = Family::<ClosedLabels, Counter>::default();
    registry.register(
        "rampart_lb_connections_closed",
        "Connections the load balancer closed by reason: TLS handshake failed or timed out, no first byte, incomplete head, idle, stalled, evicted from a full listener, unparsable (400) or oversized (431) head, HTTP/2 preface on a plain HTTP/1.1 listener (h2c_refused)",
        closed.clone(),
    );

    let metrics = Metrics::register(registry, http_metrics.clone());
    let dropped = access_log::register_dropped(registry);
    let access_log = match &cfg.access_log {
        Some(path) => Some(
            AccessLog::open(
                path,
                cfg.access_log_rotation,
                cfg.access_log_format,
                dropped,
            )
            .await
            .map_err(|source| LbError::AccessLog {
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let rejected = Family::<proxy::RejectLabels, Counter>::default();
    registry.register(
        "rampart_lb_rejected_requests",
        "Requests the load balancer answered itself, by reason (bad_host 400, misdirected 421, uri_too_long 414, body_too_large 413, body_timeout 408, bad_framing 400, queue_full/queue_timeout/no_backend/buffer_full 503, method 405, rate_limited 429)",
        rejected.clone(),
    );
    let fixed = reload::Fixed {
        metrics: metrics.clone(),
        rejected,
        backend_families: backend_metrics::Families::register(registry),
        tunnels,
        buffer_budget: buffer_budget::BufferBudget::register(
            registry,
            cfg.balancer.buffer_total_bytes,
        ),
    };
    let generation = reload::build(&cfg, &fixed, upstream_tls, &cert_names, None);
    let reloader = Arc::new(Reloader::new(cfg.clone(), generation, resolver, fixed));
    let live = reloader.live.clone();
    registry.register_collector(Box::new(reload::LiveBackendLoad(live.clone())));
    backend_metrics::register_scraped(registry, live.clone());
    let security = Arc::new(layers::SecurityHeaders::new(&cfg.response_headers));
    let (shutdown, shutdown_rx) = watch::channel(false);
    if let Some(path) = &cfg.admin_socket {
        // The admin socket is a convenience: without it the load balancer still serves.
        if let Err(e) = admin::spawn(path, live.clone(), shutdown_rx.clone()) {
            tracing::warn!(path = %path.display(), error = %e, "admin socket not available; `rampart lb drain|enable|status` cannot reach this load balancer");
        }
    }
    let challenges = cfg
        .acme
        .as_ref()
        .map(|_| Arc::new(acme::Challenges::default()));
    let acme_tx = cfg
        .acme
        .clone()
        .zip(challenges.clone())
        .map(|(acme_cfg, ch)| {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(acme::run(
                acme_cfg,
                ch,
                reloader.clone(),
                rx,
                shutdown_rx.clone(),
            ));
            tx
        });

    let reopen_log = access_log.clone();
    let https_metrics = metrics.clone();
    let https_log = access_log.clone();
    tasks.spawn(serve::serve_http(
        https,
        HttpOptions {
            tls: Some(site_tls),
            on_ended: Some(closed_counter(&closed, "https")),
            h2c: false,
        },
        move |info: &serve::ConnInfo| {
            ServiceBuilder::new()
                .layer(AccessLogLayer::new(
                    https_log.clone(),
                    Listener::Https,
                    info,
                ))
                .layer(MetricsLayer(https_metrics.clone()))
                .map_response(add_hsts)
                .map_response({
                    let security = security.clone();
                    move |resp| security.apply(resp)
                })
                .service(reload::Current::new(
                    live.clone(),
                    info.peer.ip(),
                    proxy::Scheme::Https,
                ))
        },
        tasks.token(),
        tasks.tracker(),
    ));

    let redirect = Redirect::new(&cfg.site_names, https_addr.port());
    if let Some((http, _)) = http {
        let (mode, live) = (cfg.http_mode, reloader.live.clone());
        tasks.spawn(serve::serve_http(
            http,
            HttpOptions {
                tls: None,
                on_ended: Some(closed_counter(&closed, "http")),
                h2c: cfg.http_mode == HttpMode::Proxy && cfg.h2c,
            },
            move |info: &serve::ConnInfo| {
                let inner = match mode {
                    HttpMode::Proxy => Either::Left(reload::Current::new(
                        live.clone(),
                        info.peer.ip(),
                        proxy::Scheme::Http,
                    )),
                    HttpMode::Redirect => {
                        Either::Right(acme::Http01::new(challenges.clone(), redirect.clone()))
                    }
                };
                ServiceBuilder::new()
                    .layer(AccessLogLayer::new(
                        access_log.clone(),
                        Listener::Http,
                        info,
                    ))
                    .layer(MetricsLayer(metrics.clone()))
                    .service(inner)
            },
            tasks.token(),
            tasks.tracker(),
        ));
    }

    tracing::info!(
        host = %cfg.host,
        https = %https_addr,
        http = ?http_addr,
        backends = cfg.backends.len(),
        algorithm = reloader.live.load().balancer.algorithm().as_str(),
        tls_upstream = !cfg.plain_backends,
        access_log = ?cfg.access_log,
        "load balancer listening"
    );
    Ok(LbHandle {
        https_addr,
        http_addr,
        filters: std::iter::once(https_filter).chain(http_filter).collect(),
        reloader,
        acme: acme_tx,
        shutdown,
        tasks,
        access_log: reopen_log,
        admin_socket: cfg.admin_socket.clone(),
    })
}
