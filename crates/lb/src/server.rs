//! The downstream side: accept loops of the two guarded listeners and the per-connection
//! serving (TLS handshake bounded in time, HTTP/1.1 or HTTP/2, graceful drain on shutdown).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use firewall::GuardedListener;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::proxy::Body;

/// Time a client has to complete the TLS handshake.
pub(crate) const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time an HTTP/1 client has to send a complete request head (against slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Limit on an HTTP/1 request head (request line and headers), bytes. hyper checks it
/// against its read buffer, so a head a little larger can slip through; a much larger one
/// is answered `431 Request Header Fields Too Large` (RFC 6585 §5) instead of being held in
/// memory up to hyper's ~400 KB default. HTTP/2 keeps its header-list limit (16 KiB).
const MAX_HTTP1_HEAD_BYTES: usize = 64 * 1024;

/// HTTP/2 keep-alive ping interval; a peer that does not answer within the default ping
/// timeout (20 s) is disconnected.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Pause after a failed `accept(2)`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The HTTP/1.1 + HTTP/2 server settings shared by both listeners.
pub(crate) fn http_builder() -> Arc<auto::Builder<TokioExecutor>> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HTTP1_HEAD_BYTES);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE);
    Arc::new(b)
}

/// Accepts connections allowed by `listener`'s filter until `shutdown` changes (or its
/// sender is dropped), handing each to `on_conn` in its own task.
pub(crate) async fn accept_loop<F, Fut>(
    listener: GuardedListener,
    mut shutdown: watch::Receiver<bool>,
    on_conn: F,
) where
    F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let service = listener.filter().service;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    tokio::spawn(on_conn(tcp, peer, shutdown.clone()));
                }
                Err(e) => {
                    // The listener keeps serving whatever the error; back off so a
                    // shortage of descriptors (EMFILE) does not spin.
                    if firewall::is_transient_accept_error(&e) {
                        tracing::warn!(listener = %service, error = %e, "accept failed");
                    } else {
                        tracing::error!(listener = %service, error = %e, "accept failed");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    tracing::debug!(listener = %service, "listener closed");
}

/// Completes the TLS handshake within [`TLS_HANDSHAKE_TIMEOUT`], then serves HTTP.
pub(crate) async fn serve_tls<S>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    service: S,
    shutdown: watch::Receiver<bool>,
) where
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => serve(builder, TokioIo::new(tls), peer, service, shutdown).await,
        Ok(Err(e)) => {
            tracing::debug!(side = "downstream", %peer, error = %e, "TLS handshake failed")
        }
        Err(_) => tracing::debug!(side = "downstream", %peer, "TLS handshake timed out"),
    }
}

/// Serves HTTP/1.1 or HTTP/2 (detected from the connection preface) on `io` until the
/// client leaves; on shutdown, finishes in-flight requests and closes.
pub(crate) async fn serve<I, S>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: I,
    peer: SocketAddr,
    service: S,
    mut shutdown: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let hyper_service =
        hyper::service::service_fn(move |req: Request<Incoming>| service.clone().oneshot(req));
    let conn = builder.serve_connection(io, hyper_service);
    tokio::pin!(conn);
    let mut draining = false;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = shutdown.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(side = "downstream", %peer, error = %e, "connection ended with an error");
    }
}
