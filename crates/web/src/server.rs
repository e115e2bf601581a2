//! The web listener: firewall-guarded accept, TLS with a required client certificate, the
//! load-balancer identity check, then HTTP/1.1 or HTTP/2 (ALPN) served by hyper.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use firewall::{Filter, GuardedListener};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use pki::Identity;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use topology::Service;

use crate::{router, AppState, WebConfig, WebMetrics};

/// Seconds a client has to complete the TLS handshake before the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds a client has to send a complete HTTP/1.1 request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further accepted connections wait for a slot.
const MAX_CONNECTIONS: usize = 1024;
/// Seconds open connections get to finish their requests on shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A running web server. Dropping it (or [`WebHandle::shutdown`]) stops accepting and
/// closes open connections after their current requests.
#[derive(Debug)]
pub struct WebHandle {
    addr: SocketAddr,
    filter: Arc<Filter>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl WebHandle {
    /// The bound address (with the port chosen when the configured port was 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The firewall filters of this server's listeners (one), for their counters.
    pub fn filters(&self) -> Vec<Arc<Filter>> {
        vec![self.filter.clone()]
    }

    /// Stops accepting, lets open connections finish their requests (up to 5 s), and
    /// returns when the accept loop has ended.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for WebHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Starts the web server described by `cfg`, registers its own metric
/// (`rampart_web_rejected_clients_total`) in `registry`, and records client requests
/// (health checks excluded) in `http_metrics` with `role="web"` — the node's shared
/// families, registered once by the caller with [`telemetry::HttpMetrics::register`].
///
/// Binds a [`GuardedListener`] on `cfg.address:cfg.port` with the `(host, Service::Web)`
/// rule of `cfg.policy`. Unless `cfg.plain`, every connection must complete a TLS handshake
/// within [`HANDSHAKE_TIMEOUT`] presenting a certificate of the internal CA whose identity
/// is `Identity::Host(n)` with `n` in `cfg.lb_hosts`; other connections are closed and
/// counted in `rampart_web_rejected_clients_total`. ALPN offers `http/1.1` and `h2`.
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
    let tls = if cfg.plain {
        None
    } else {
        let config = pki::mtls_server_config(&cfg.pki, &cfg.host, &[b"http/1.1", b"h2"]).map_err(
            |source| WebError::Pki {
                host: cfg.host.clone(),
                source,
            },
        )?;
        Some(TlsAcceptor::from(Arc::new(config)))
    };
    let metrics = WebMetrics::new(http_metrics.clone());
    metrics.register(registry);
    let addr = SocketAddr::new(cfg.address, cfg.port);
    let filter = Filter::new(cfg.policy.clone(), &cfg.host, Service::Web);
    let listener = GuardedListener::bind(addr, filter.clone())
        .await
        .map_err(|source| WebError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| WebError::Bind { addr, source })?;
    let app = router(AppState {
        host: cfg.host.clone(),
        docroot: cfg.docroot.clone(),
        health_path: cfg.health_path.clone(),
        store: cfg.store.clone(),
        metrics: metrics.clone(),
    });
    let (stop, stopped) = watch::channel(false);
    let ctx = Arc::new(Conn {
        tls,
        lb_hosts: cfg.lb_hosts.clone(),
        app,
        metrics,
    });
    tracing::info!(host = %cfg.host, %addr, plain = cfg.plain, "web server listening");
    let task = tokio::spawn(accept_loop(listener, ctx, stopped));
    Ok(WebHandle {
        addr,
        filter,
        stop,
        task: Some(task),
    })
}

/// What every connection task shares.
struct Conn {
    tls: Option<TlsAcceptor>,
    lb_hosts: Vec<String>,
    app: Router,
    metrics: WebMetrics,
}

async fn accept_loop(listener: GuardedListener, ctx: Arc<Conn>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let ctx = ctx.clone();
                let stop = stop.clone();
                connections.spawn(async move {
                    connection(stream, peer, &ctx, stop).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Back off instead of spinning; a web server keeps trying rather than
                // leaving its host silently without one.
                if firewall::is_transient_accept_error(&e) {
                    tracing::warn!(error = %e, "web listener accept failed, retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                } else {
                    tracing::error!(error = %e, "web listener accept failed, retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        connections.abort_all();
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, ctx: &Conn, stop: watch::Receiver<bool>) {
    let Some(acceptor) = &ctx.tls else {
        return serve(TokioIo::new(stream), ctx.app.clone(), stop).await;
    };
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            ctx.metrics.reject("handshake");
            tracing::debug!(%peer, error = %e, "web TLS handshake failed");
            return;
        }
        Err(_) => {
            ctx.metrics.reject("handshake");
            tracing::debug!(%peer, "web TLS handshake timed out");
            return;
        }
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(pki::peer_identity);
    let allowed = matches!(&identity, Some(Identity::Host(name)) if ctx.lb_hosts.contains(name));
    if !allowed {
        ctx.metrics.reject("identity");
        tracing::warn!(%peer, ?identity, "web client is not an allowed load balancer; closing");
        let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
        return;
    }
    serve(TokioIo::new(tls), ctx.app.clone(), stop).await;
}

async fn serve<I>(io: TokioIo<I>, app: Router, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "web connection ended with an error");
    }
}
