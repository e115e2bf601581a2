//! The agent: collectors, `/metrics`, and the push (see [`crate::push`]). Two ways to run
//! it: the lab's agent of a topology host ([`start_agent`], mutual TLS on both sides) and
//! the standalone agent ([`start_standalone_agent`], `rampart agent`), which serves
//! `/metrics` like node_exporter and optionally pushes with certificates given as files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use pki::Identity;
use prometheus_client::registry::Registry;
use topology::Service;

use crate::collect::{FirewallCollector, HostCollector, KernelFirewallCollector};
use crate::push::{PushCollector, PushFormat, PushStats, PushTarget, PUSH_TIMEOUT};
use crate::serve::{self, Peer};
use crate::spool::Spool;
use crate::{AgentConfig, MonitorError, OPENMETRICS_CONTENT_TYPE};

/// A running agent. Dropping it stops the listener and the push loop.
#[derive(Debug)]
pub struct AgentHandle {
    addr: SocketAddr,
    filter: Arc<firewall::Filter>,
    tasks: ::serve::RoleTasks,
}

impl AgentHandle {
    /// The `/metrics` listener's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The filter of the agent's own listener (its firewall counters).
    pub fn filters(&self) -> Vec<Arc<firewall::Filter>> {
        vec![self.filter.clone()]
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.tasks.cancel();
    }
}

impl ::serve::RoleHandle for AgentHandle {
    fn role(&self) -> &'static str {
        "agent"
    }
    fn addrs(&self) -> Vec<(Service, SocketAddr)> {
        vec![(Service::Agent, self.addr)]
    }
    fn healthy(&self) -> bool {
        self.tasks.running()
    }
    fn filters(&self) -> Vec<Arc<firewall::Filter>> {
        vec![self.filter.clone()]
    }
    fn shutdown(&self) -> ::serve::BoxFuture<()> {
        let tasks = self.tasks.clone();
        Box::pin(async move { tasks.shutdown().await })
    }
}

/// Starts the agent of `cfg.host`: registers the host and firewall collectors into
/// `registry` (the firewall one covers `filters` plus the agent's own listener), serves
/// `GET /metrics` on `cfg.address:cfg.port` (mutual TLS, HTTP/1.1; the monitor host and the
/// admin may read, others get 403), and pushes the same samples to the monitoring service
/// every `cfg.push_interval` through the spool of `cfg.spool_dir` (see [`crate::push`]).
///
/// Errors: TLS material missing or invalid ([`MonitorError::Pki`]), the address cannot be
/// bound ([`MonitorError::Bind`]), the push client cannot be built, the spool directory
/// cannot be created ([`MonitorError::Spool`]).
pub async fn start_agent(
    cfg: AgentConfig,
    mut registry: Registry,
    filters: Vec<Arc<firewall::Filter>>,
) -> Result<AgentHandle, MonitorError> {
    let server_tls = pki::mtls_server_config(&cfg.pki, &cfg.host, &[b"http/1.1"])?;
    let client_tls = pki::mtls_client_config(
        &cfg.pki,
        &Identity::Host(cfg.host.clone()),
        &[b"h2", b"http/1.1"],
    )?;
    let (monitor_name, monitor_addr) = cfg.monitor.clone();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(client_tls)
        .resolve(&monitor_name, monitor_addr)
        // reqwest binds the source address itself: the host's address from its seam.
        .local_address(Some(cfg.net.address()))
        .connect_timeout(PUSH_TIMEOUT)
        .timeout(PUSH_TIMEOUT)
        .build()?;

    let bind = SocketAddr::new(cfg.net.address(), cfg.port);
    let listener = cfg
        .net
        .listen(Service::Agent, cfg.port)
        .await
        .map_err(|source| MonitorError::Bind { addr: bind, source })?;
    let filter = listener.filter().clone();
    let mut all_filters = filters;
    all_filters.push(filter.clone());
    registry.register_collector(Box::new(HostCollector::default()));
    registry.register_collector(Box::new(FirewallCollector {
        filters: all_filters,
    }));
    if cfg.net.isolation() == firewall::Isolation::Kernel {
        registry.register_collector(Box::new(KernelFirewallCollector::default()));
    }
    let spool = open_spool(cfg.spool_dir.as_deref(), cfg.spool_max_bytes)?;
    let stats = Arc::new(PushStats::default());
    registry.register_collector(Box::new(PushCollector {
        targets: vec![("monitor", spool.clone(), stats.clone())],
    }));
    let registry = Arc::new(registry);

    let addr = listener
        .local_addr()
        .map_err(|source| MonitorError::Bind { addr: bind, source })?;

    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(MetricsState {
            registry: registry.clone(),
            monitor_host: monitor_name.clone(),
        }));
    let tasks = ::serve::RoleTasks::new();
    serve::spawn(listener, Arc::new(server_tls), app, &tasks);
    let url = format!("https://{monitor_name}:{}/api/v1/push", monitor_addr.port());
    let target = PushTarget {
        url,
        format: PushFormat::Text,
        client,
        interval: cfg.push_interval,
    };
    crate::push::spawn(&tasks, registry, target, spool, stats);
    tracing::info!(
        "agent {} serving /metrics on {addr}, pushing to {monitor_name} at {monitor_addr}",
        cfg.host
    );
    Ok(AgentHandle {
        addr,
        filter,
        tasks,
    })
}

struct MetricsState {
    registry: Arc<Registry>,
    monitor_host: String,
}

/// Encodes the registry off the runtime (collectors read procfs).
async fn encode(registry: Arc<Registry>) -> Option<String> {
    let r = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).map(|()| text)
    })
    .await;
    match r {
        Ok(Ok(text)) => Some(text),
        Ok(Err(e)) => {
            tracing::error!("encoding metrics: {e}");
            None
        }
        Err(e) => {
            tracing::error!("encoding metrics: {e}");
            None
        }
    }
}

async fn metrics(
    State(st): State<Arc<MetricsState>>,
    Extension(peer): Extension<Peer>,
    headers: axum::http::HeaderMap,
) -> Response {
    let allowed = match &peer.0 {
        Some(Identity::Admin) => true,
        Some(Identity::Host(h)) => *h == st.monitor_host,
        None => false,
    };
    if !allowed {
        return (
            StatusCode::FORBIDDEN,
            "forbidden: admin or monitor host only\n",
        )
            .into_response();
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    negotiated(st.registry.clone(), accept).await
}

/// The registry in the format `accept` asks for, with the matching Content-Type.
async fn negotiated(registry: Arc<Registry>, accept: Option<&str>) -> Response {
    match encode(registry).await {
        Some(text) if crate::negotiate::wants_openmetrics(accept) => {
            ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response()
        }
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                crate::negotiate::TEXT_004_CONTENT_TYPE,
            )],
            crate::negotiate::to_text_004(&text),
        )
            .into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The spool in `dir`, or in memory without one.
fn open_spool(dir: Option<&std::path::Path>, max_bytes: u64) -> Result<Arc<Spool>, MonitorError> {
    Ok(Arc::new(match dir {
        Some(d) => Spool::open(d, max_bytes)?,
        None => Spool::memory(max_bytes),
    }))
}

/// The standalone agent's push: where, with which certificate, how often.
#[derive(Debug, Clone)]
pub struct StandalonePush {
    /// The monitor's ingest URL, e.g. `https://mon-01:9090/api/v1/push`; its host is the
    /// name verified on the monitor's certificate.
    pub url: String,
    /// Connect here instead of resolving the URL's host (which is still verified).
    pub connect: Option<SocketAddr>,
    /// PEM certificate chain presented to the monitor (its identity is the pushing host).
    pub cert: PathBuf,
    /// The PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificates the monitor's certificate must chain to.
    pub ca: PathBuf,
    /// Time between pushes.
    pub interval: Duration,
    /// Spool directory (`None`: in memory).
    pub spool_dir: Option<PathBuf>,
    /// Spool bound, bytes.
    pub spool_max_bytes: u64,
}

/// The standalone agent's Prometheus remote-write target.
#[derive(Debug, Clone)]
pub struct StandaloneRemoteWrite {
    /// The receiver's URL, e.g. `http://prometheus:9090/api/v1/write`.
    pub url: String,
    /// PEM CA certificates for an `https` URL (none: plain HTTP only).
    pub ca: Option<PathBuf>,
    /// Labels added to every series (`instance`, `job`).
    pub labels: Vec<(String, String)>,
    /// Time between writes.
    pub interval: Duration,
    /// Bound of the in-memory spool, bytes.
    pub spool_max_bytes: u64,
}

/// What `rampart agent` runs.
#[derive(Debug, Clone)]
pub struct StandaloneAgentConfig {
    /// The plain-HTTP `/metrics` listener.
    pub listen: SocketAddr,
    /// Source networks allowed to scrape (empty: any).
    pub allow: Vec<ipnet::IpNet>,
    /// Push to a monitoring service as well.
    pub push: Option<StandalonePush>,
    /// Forward the samples to a Prometheus remote-write receiver as well.
    pub remote_write: Option<StandaloneRemoteWrite>,
}

/// Starts the standalone agent: host metrics ([`HostCollector`]) on `GET /metrics` over
/// plain HTTP on `cfg.listen` (format negotiated from `Accept` as for the lab's agent;
/// timeouts and connection caps of the topology model's defaults for the agent listener,
/// through the one serve path), readable by anyone from `cfg.allow`; with `cfg.push`,
/// pushes over mutual TLS with the given certificate (see [`crate::push`]); with
/// `cfg.remote_write`, forwards the same samples to a remote-write receiver
/// ([`crate::remote_write`]).
///
/// Errors: the address cannot be bound ([`MonitorError::Bind`]), the certificate, key or
/// CA cannot be loaded ([`MonitorError::Pki`]), the push client cannot be built, the
/// spool directory cannot be created.
pub async fn start_standalone_agent(
    cfg: StandaloneAgentConfig,
) -> Result<AgentHandle, MonitorError> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HostCollector::default()));
    let push = match &cfg.push {
        Some(p) => {
            let tls = client_tls_from_files(&p.cert, &p.key, &p.ca)?;
            let mut b = reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .connect_timeout(PUSH_TIMEOUT)
                .timeout(PUSH_TIMEOUT);
            if let Some(to) = p.connect {
                let host = reqwest::Url::parse(&p.url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
                    .unwrap_or_default();
                b = b.resolve(&host, to);
            }
            let spool = open_spool(p.spool_dir.as_deref(), p.spool_max_bytes)?;
            let stats = Arc::new(PushStats::default());
            Some((
                PushTarget {
                    url: p.url.clone(),
                    format: PushFormat::Text,
                    client: b.build()?,
                    interval: p.interval,
                },
                spool,
                stats,
            ))
        }
        None => None,
    };
    let remote_write = match &cfg.remote_write {
        Some(rw) => {
            let mut b = reqwest::Client::builder()
                .connect_timeout(PUSH_TIMEOUT)
                .timeout(PUSH_TIMEOUT);
            if let Some(ca) = &rw.ca {
                b = b.use_preconfigured_tls(pki::client_config_with_ca(ca, &[b"h2", b"http/1.1"])?);
            }
            Some((
                PushTarget {
                    url: rw.url.clone(),
                    format: PushFormat::RemoteWrite {
                        labels: rw.labels.clone(),
                    },
                    client: b.build()?,
                    interval: rw.interval,
                },
                Arc::new(Spool::memory(rw.spool_max_bytes)),
                Arc::new(PushStats::default()),
            ))
        }
        None => None,
    };
    let mut targets = Vec::new();
    if let Some((_, spool, stats)) = &push {
        targets.push(("monitor", spool.clone(), stats.clone()));
    }
    if let Some((_, spool, stats)) = &remote_write {
        targets.push(("remote_write", spool.clone(), stats.clone()));
    }
    registry.register_collector(Box::new(PushCollector { targets }));
    let registry = Arc::new(registry);
    let handle = serve_metrics(cfg.listen, &cfg.allow, registry.clone(), "agent").await?;
    for (target, spool, stats) in push.into_iter().chain(remote_write) {
        tracing::info!(
            "agent pushing to {} every {:?}",
            target.url,
            target.interval
        );
        crate::push::spawn(&handle.tasks, registry.clone(), target, spool, stats);
    }
    Ok(handle)
}

/// Serves `registry` on `GET /metrics` over plain HTTP on `listen`, as a scrape target of
/// its own (what `rampart agent` and `rampart lb --metrics-listen` run): the Prometheus text
/// format 0.0.4, or OpenMetrics 1.0 when `Accept` asks for it; readable from the networks
/// in `allow` (empty: any source), other sources refused at accept by the firewall filter
/// of the one serve path; the topology model's default timeouts and connection caps of an
/// agent listener. `owner` names the listener's host in logs and firewall counters. The
/// listener stops when the handle is dropped.
///
/// Errors: [`MonitorError::Bind`] when `listen` cannot be bound.
pub async fn serve_metrics(
    listen: SocketAddr,
    allow: &[ipnet::IpNet],
    registry: Arc<Registry>,
    owner: &str,
) -> Result<AgentHandle, MonitorError> {
    use topology::{Callers, Policy, Rule, Sources};
    let rule = Rule {
        host: owner.into(),
        service: Service::Agent,
        port: listen.port(),
        sources: if allow.is_empty() {
            Sources::Any
        } else {
            Sources::Nets(allow.to_vec())
        },
        callers: Callers::Anyone,
        comment: format!("{owner} metrics"),
    };
    let policy = Arc::new(Policy {
        rules: vec![rule],
        extra: Vec::new(),
    });
    let limits = topology::Topology::default_topology().limits;
    let net = firewall::Net::new(
        owner,
        listen.ip(),
        policy,
        limits,
        firewall::Isolation::Kernel,
    );
    let bind_err = |source| MonitorError::Bind {
        addr: listen,
        source,
    };
    let listener = net
        .listen(Service::Agent, listen.port())
        .await
        .map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let filter = listener.filter().clone();
    let tasks = ::serve::RoleTasks::new();
    let app = Router::new()
        .route("/metrics", get(public_metrics))
        .with_state(registry);
    serve::spawn_with(listener, None, app, &tasks);
    tracing::info!("{owner} serving /metrics on http://{addr}/metrics");
    Ok(AgentHandle {
        addr,
        filter,
        tasks,
    })
}

/// A mutual-TLS client config from PEM files: `cert` and `key` presented, servers verified
/// against the CA certificates of `ca`; ALPN h2, http/1.1.
fn client_tls_from_files(
    cert: &std::path::Path,
    key: &std::path::Path,
    ca: &std::path::Path,
) -> Result<rustls::ClientConfig, MonitorError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pki::load_certs(ca)? {
        roots.add(c).map_err(pki::PkiError::from)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(pki::PkiError::from)?
        .with_root_certificates(roots)
        .with_client_auth_cert(pki::load_certs(cert)?, pki::load_key(key)?)
        .map_err(pki::PkiError::from)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// `GET /metrics` of the standalone agent: no identity check (the listener's source
/// networks decide), the format from `Accept`.
async fn public_metrics(
    State(registry): State<Arc<Registry>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    negotiated(registry, accept).await
}
