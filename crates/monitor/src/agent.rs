//! The agent: collectors, `/metrics`, and the push loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use pki::Identity;
use prometheus_client::registry::Registry;
use topology::Service;

use crate::collect::{FirewallCollector, HostCollector, KernelFirewallCollector};
use crate::serve::{self, Peer};
use crate::{AgentConfig, MonitorError, OPENMETRICS_CONTENT_TYPE};

/// Longest a push may take, connection included.
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one failure log line per this period while pushes keep failing.
const FAILURE_LOG_PERIOD: Duration = Duration::from_secs(30);

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
/// admin may read, others get 403), and pushes the same text to the monitoring service
/// every `cfg.push_interval`. Push failures are logged (at most every 30 s) and retried on
/// the next tick.
///
/// Errors: TLS material missing or invalid ([`MonitorError::Pki`]), the address cannot be
/// bound ([`MonitorError::Bind`]), the push client cannot be built.
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
    let token = tasks.token();
    let push = push_loop(client, url, registry, cfg.push_interval);
    tasks.spawn(async move {
        tokio::select! {
            _ = push => {}
            _ = token.cancelled() => {}
        }
    });
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
    match encode(st.registry.clone()).await {
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

async fn push_loop(client: reqwest::Client, url: String, registry: Arc<Registry>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut failures: u64 = 0;
    let mut last_log: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(body) = encode(registry.clone()).await else {
            continue;
        };
        let result = client
            .post(&url)
            .header(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)
            .body(body)
            .send()
            .await;
        let error = match result {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                Some(format!("{status}: {}", text.trim()))
            }
            Err(e) => Some(error_chain(&e)),
        };
        match error {
            None => {
                if failures > 0 {
                    tracing::info!("push to {url} recovered after {failures} failures");
                }
                failures = 0;
                last_log = None;
            }
            Some(e) => {
                failures += 1;
                if last_log.is_none_or(|t| t.elapsed() >= FAILURE_LOG_PERIOD) {
                    tracing::warn!("push to {url} failed ({failures} in a row): {e}");
                    last_log = Some(Instant::now());
                }
            }
        }
    }
}

/// An error and its sources on one line (reqwest hides the cause in `source()`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
