//! Serving an axum [`Router`] over mutual TLS on a guarded listener, with the verified
//! client certificate's identity handed to handlers as a [`Peer`] request extension.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pki::Identity;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::Service;

/// Seconds a client gets to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds an HTTP/1.1 client gets to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity of the connection's verified client certificate (`None`: the certificate
/// chains to the CA but carries no `rampart://` identity), a request extension.
#[derive(Debug, Clone)]
pub struct Peer(pub Option<Identity>);

/// Accepts connections on `listener` until the returned task is aborted; aborting it also
/// ends every connection it accepted.
pub fn spawn(
    listener: firewall::GuardedListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("{what}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            conns.spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!("{what}: TLS handshake with {remote} failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("{what}: TLS handshake with {remote} timed out");
                        return;
                    }
                };
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(pki::peer_identity);
                let peer = Peer(identity);
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    app.clone().call(req)
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                builder.http2().timer(TokioTimer::new());
                if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
                    tracing::debug!("{what}: connection from {remote}: {e}");
                }
            });
        }
    })
}
