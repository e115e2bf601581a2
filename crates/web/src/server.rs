//! The web listener: bound through the host's network seam and served by the one serve
//! path (`serve::serve_http`): TLS requiring a client certificate of the lab's CA whose
//! identity the policy admits on the web port (the load balancers), then HTTP/1.1 or
//! HTTP/2 (ALPN) into the axum router, with the `limits.web` timeouts and caps.

use std::net::SocketAddr;
use std::sync::Arc;

use firewall::Filter;
use serve::{Ended, HttpOptions, RoleHandle, RoleTasks};
use tokio_rustls::rustls;
use topology::Service;
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::{router, AppState, WebConfig, WebMetrics};

/// Errors from [`start`].
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The TLS server configuration could not be built (missing or bad host certificate).
    #[error("web TLS configuration for {host}: {source}")]
    Pki {
        /// The host.
        host: String,
        /// The PKI error.
        source: pki::PkiError,
    },
    /// The listener could not be bound.
    #[error("binding the web listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The docroot is not a directory (call `deploy_site` first).
    #[error("docroot {0} is not a directory; deploy the application files first")]
    Docroot(std::path::PathBuf),
}

/// A running web server. [`RoleHandle::shutdown`] stops accepting and lets open
/// connections finish their requests (up to `limits.web.drain_timeout_ms`); dropping the
/// handle stops it too.
#[derive(Debug)]
pub struct WebHandle {
    addr: SocketAddr,
    filter: Arc<Filter>,
    tasks: RoleTasks,
}

impl WebHandle {
    /// The bound address (with the port chosen when the configured port was 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl RoleHandle for WebHandle {
    fn role(&self) -> &'static str {
        "web"
    }
    fn addrs(&self) -> Vec<(Service, SocketAddr)> {
        vec![(Service::Web, self.addr)]
    }
    fn healthy(&self) -> bool {
        self.tasks.running()
    }
    fn filters(&self) -> Vec<Arc<Filter>> {
        vec![self.filter.clone()]
    }
    fn shutdown(&self) -> serve::BoxFuture<()> {
        let tasks = self.tasks.clone();
        Box::pin(async move { tasks.shutdown().await })
    }
}

impl Drop for WebHandle {
    fn drop(&mut self) {
        self.tasks.cancel();
    }
}

/// Starts the web server described by `cfg`, registers its own metric
/// (`rampart_web_rejected_clients_total{reason}`: connections closed for a failed or slow
/// handshake, an identity the policy does not admit, or a timeout) in `registry`, and
/// records client requests (health checks excluded) in `http_metrics` with `role="web"` —
/// the node's shared families, registered once by the caller with
/// [`telemetry::HttpMetrics::register`].
///
/// Binds the `(host, web)` listener through `cfg.net`. Unless `cfg.plain`, every
/// connection must present a certificate of the internal CA whose identity the policy
/// admits on the web port; ALPN offers `http/1.1` and `h2`.
///
/// Errors: [`WebError::Docroot`], [`WebError::Pki`] (host certificate unreadable),
/// [`WebError::Bind`].
pub async fn start(
    cfg: WebConfig,
    registry: &mut prometheus_client::registry::Registry,
    http_metrics: &telemetry::HttpMetrics,
) -> Result<WebHandle, WebError> {
    if !cfg.docroot.is_dir() {
        return Err(WebError::Docroot(cfg.docroot.clone()));
    }
    let host = cfg.net.host().to_string();
    let tls: Option<Arc<rustls::ServerConfig>> = if cfg.plain {
        None
    } else {
        let config =
            pki::mtls_server_config(&cfg.pki, &host, &[b"http/1.1", b"h2"]).map_err(|source| {
                WebError::Pki {
                    host: host.clone(),
                    source,
                }
            })?;
        Some(Arc::new(config))
    };
    let metrics = WebMetrics::new(http_metrics.clone());
    metrics.register(registry);
    let want = std::net::SocketAddr::new(cfg.net.address(), cfg.port);
    let listener = cfg
        .net
        .listen(Service::Web, cfg.port)
        .await
        .map_err(|source| WebError::Bind { addr: want, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| WebError::Bind { addr: want, source })?;
    let filter = listener.filter().clone();
    let body_timeout = listener.limits().body_timeout();
    let app = router(AppState {
        host: host.clone(),
        docroot: cfg.docroot.clone(),
        health_path: cfg.health_path.clone(),
        store: cfg.store.clone(),
        metrics: metrics.clone(),
    });
    let service = ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .service(app);
    let rejects = metrics.clone();
    let opts = HttpOptions {
        tls,
        on_ended: Some(Arc::new(move |why: Ended, _peer| match why {
            Ended::HandshakeFailed | Ended::HandshakeTimeout => rejects.reject("handshake"),
            Ended::Identity => rejects.reject("identity"),
            Ended::FirstByteTimeout | Ended::HeaderTimeout | Ended::Stalled => {
                rejects.reject("timeout")
            }
            _ => {}
        })),
        h2c: false,
    };
    let tasks = RoleTasks::new();
    tasks.spawn(serve::serve_http(
        listener,
        opts,
        move |_info| service.clone(),
        tasks.token(),
        tasks.tracker(),
    ));
    tracing::info!(%host, %addr, plain = cfg.plain, "web server listening");
    Ok(WebHandle {
        addr,
        filter,
        tasks,
    })
}
