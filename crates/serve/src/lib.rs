//! The one serve path of every HTTP listener of every role (load balancer, web servers,
//! monitoring service, agents), and the one lifecycle every role shares.
//!
//! [`serve_http`] takes a [`firewall::GuardedListener`] (bound through the host's
//! [`firewall::Net`], so the source-address policy, the connection caps and the descriptor
//! reserve are already enforced at accept), the role's TLS config, and a per-connection
//! service; it enforces, with the listener's [`topology::ListenerLimits`]:
//! - the TLS handshake timeout;
//! - HTTP/1.1 served by Rampart's own HTTP/1 server side ([`h1`]: an idle connection holds
//!   no buffer), HTTP/2 by hyper: ALPN (RFC 7301) chooses on TLS, and without ALPN the
//!   first bytes tell (HTTP/2's preface); on a plain listener HTTP/1.1 only, unless
//!   [`HttpOptions::h2c`] asks for HTTP/2 with prior knowledge as well;
//! - the caller identities the policy's rule names (mutual TLS; roles never decide who
//!   may call them);
//! - the first-byte (protocol detection) timeout, then the HTTP/1 header read timeout;
//! - the keep-alive idle timeout, and a stall bound (no byte either way for the idle
//!   timeout) on connections with a request in flight, so a zero-window client is closed;
//! - the HTTP/1 head size cap and the HTTP/2 concurrent-stream cap;
//! - lingering close after a response the client did not wait for ([`io`]);
//! - graceful drain on shutdown: the listening socket stops listening at once (new
//!   connections are refused by the kernel), in-flight requests finish for up to
//!   `drain_timeout_ms`, then every connection is closed.
//!
//! Request-body idle timeouts (`body_timeout_ms`) are applied by the role around its
//! service: the load balancer buffers bodies itself, the axum roles use tower-http's
//! `RequestBodyTimeoutLayer`.
//!
//! This crate never decides policy or picks limits: both come from `topology` through the
//! listener.

#![forbid(unsafe_code)]

mod armed;
mod body;
pub mod h1;
pub mod io;
mod lifecycle;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use firewall::{Activity, GuardedListener};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use topology::{Callers, Identity, ListenerLimits, Service};
use tower::ServiceExt;

use crate::armed::Armed;

pub use body::{upgrade, BodyError, RequestBody};
pub use lifecycle::{runtime, worker_threads, RoleHandle, RoleTasks};

/// Limit on an HTTP/1 request head (request line and headers), bytes; a larger one is
/// answered `431 Request Header Fields Too Large` (RFC 6585 §5). Exact: reads stop at the
/// cap until the head has ended.
pub const MAX_HTTP1_HEAD_BYTES: usize = 64 * 1024;

/// Concurrent HTTP/2 streams per connection (RFC 9113 §6.5.2
/// `SETTINGS_MAX_CONCURRENT_STREAMS`; nginx `http2_max_concurrent_streams` 128).
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 128;

/// HTTP/2 keep-alive ping interval; a peer that does not answer within hyper's ping timeout
/// (20 s) is disconnected.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// After a graceful close was asked of an idle connection, how long it gets to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What a role's service knows about the connection a request came on: given to the role's
/// `make` function, which builds the connection's service from it (not put in each
/// request's extensions: a first extension allocates the request's extension map, and no
/// service needs it per request).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The verified client certificate's identity (`None`: no certificate, or plain TCP).
    pub identity: Option<Identity>,
    /// The listener's service.
    pub service: Service,
    /// How long the TLS handshake took (`None`: plain TCP).
    pub tls_handshake: Option<Duration>,
}

/// Why a connection ended before or between requests, for the role's counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The TLS handshake did not finish in time.
    HandshakeTimeout,
    /// The TLS handshake failed.
    HandshakeFailed,
    /// The client's certificate identity is not one the policy admits here.
    Identity,
    /// No request byte within the first-byte timeout.
    FirstByteTimeout,
    /// No complete first request within first-byte + header-read timeouts.
    HeaderTimeout,
    /// Idle keep-alive connection closed.
    Idle,
    /// A request was in flight but nothing moved for the idle timeout (e.g. a client
    /// advertising a zero receive window).
    Stalled,
    /// Closed to admit a new connection on a full listener.
    Evicted,
    /// HTTP/1 head larger than [`MAX_HTTP1_HEAD_BYTES`] (answered 431).
    HeadTooLarge,
    /// Unparsable HTTP (answered 400).
    BadRequest,
    /// HTTP/2's connection preface (RFC 9113 §3.4) where HTTP/1.1 alone is served (a
    /// plain listener with [`HttpOptions::h2c`] off, or TLS whose ALPN chose `http/1.1`):
    /// answered with GOAWAY HTTP_1_1_REQUIRED ([`h1::H2_REFUSAL`]; an HTTP/1 status line
    /// would mean nothing to an HTTP/2 client), then closed.
    H2cRefused,
}

impl Ended {
    /// The `reason` label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::HandshakeTimeout => "tls_handshake_timeout",
            Ended::HandshakeFailed => "tls_handshake_failed",
            Ended::Identity => "identity",
            Ended::FirstByteTimeout => "first_byte_timeout",
            Ended::HeaderTimeout => "header_timeout",
            Ended::Idle => "idle",
            Ended::Stalled => "stalled",
            Ended::Evicted => "evicted",
            Ended::HeadTooLarge => "head_too_large",
            Ended::BadRequest => "bad_request",
            Ended::H2cRefused => "h2c_refused",
        }
    }
}

/// Called when a connection ends for one of the [`Ended`] reasons (with the client's
/// address): a role counts and logs its own rejections with it.
pub type OnEnded = Arc<dyn Fn(Ended, SocketAddr) + Send + Sync>;

/// How [`serve_http`] serves one listener.
#[derive(Clone)]
pub struct HttpOptions {
    /// The TLS config (`None`: plain HTTP, e.g. the redirect listener).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Notified of every connection that ends for an [`Ended`] reason.
    pub on_ended: Option<OnEnded>,
    /// Plain listeners only (`tls: None`): serve HTTP/2 with prior knowledge ("h2c",
    /// RFC 9113 §3.3) beside HTTP/1.1, told apart by the first 24 bytes (the preface). Off:
    /// every plain connection is HTTP/1.1, and a client that starts with the HTTP/2
    /// preface gets GOAWAY HTTP_1_1_REQUIRED and is closed ([`Ended::H2cRefused`]). Peers make it opt-in too: nginx `listen … http2`, HAProxy
    /// `bind … proto h2`. Ignored with TLS, where ALPN (RFC 7301) chooses.
    pub h2c: bool,
}

/// The HTTP/2 server settings of a listener.
fn http2_builder() -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS);
    b
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` until `shutdown` is cancelled, then drains: no
/// new connections, in-flight requests get `drain_timeout_ms`, then every connection is
/// closed. `make` builds the service of one connection from its [`ConnInfo`]. Spawns its
/// connection tasks on `tasks`, so a role's shutdown can wait for them.
pub async fn serve_http<M, S, B>(
    listener: GuardedListener,
    opts: HttpOptions,
    make: M,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) where
    M: Fn(&ConnInfo) -> S + Send + Sync + 'static,
    S: tower::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = Arc::new(listener);
    let limits = listener.limits().clone();
    let service = listener.filter().service;
    let callers = listener
        .filter()
        .rule()
        .map(|r| r.callers.clone())
        .unwrap_or(Callers::Identities(Vec::new()));
    let ctx = Arc::new(Ctx {
        http2: http2_builder(),
        http1: h1::Settings {
            header_read_timeout: limits.header_read_timeout(),
            max_head: MAX_HTTP1_HEAD_BYTES,
            http2: false,
        },
        plain_h2c: opts.h2c,
        acceptor: opts.tls.map(TlsAcceptor::from),
        on_ended: opts.on_ended,
        limits,
        service,
        callers,
        make,
    });
    let conns = TaskTracker::new();
    loop {
        let admitted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match admitted {
            Ok(a) => {
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                conns.spawn(async move { ctx.connection(a, shutdown).await });
            }
            Err(e) => firewall::accept_failed(service, &e).await,
        }
    }
    // Drain: no new connections (the kernel refuses them rather than queueing them for
    // nobody); every connection saw `shutdown` and closes once its requests are done.
    listener.stop_listening();
    conns.close();
    let drain = ctx.limits.drain_timeout();
    if tokio::time::timeout(drain, conns.wait()).await.is_err() {
        tracing::info!(listener = %service, open = conns.len(), "drain time over; closing");
        listener.close_all();
        conns.wait().await;
    }
    drop(tasks);
}

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy)]
enum Proto {
    /// HTTP/1.1 ([`h1`]); `http2`: a connection that opens with HTTP/2's preface is served
    /// as HTTP/2 (TLS without ALPN, or a plain listener with h2c), else it is refused.
    Http1 { http2: bool },
    /// HTTP/2, chosen by ALPN (RFC 7301).
    Http2,
}

/// Why a connection's protocol ended with an error.
enum ConnError {
    /// One of the reasons a role counts.
    Ended(Ended),
    /// Anything else (logged at debug).
    Other(Box<dyn std::error::Error + Send + Sync>),
}

struct Ctx<M> {
    http2: http2::Builder<TokioExecutor>,
    http1: h1::Settings,
    /// A plain connection may speak HTTP/2 with prior knowledge ([`HttpOptions::h2c`]).
    plain_h2c: bool,
    acceptor: Option<TlsAcceptor>,
    on_ended: Option<OnEnded>,
    limits: ListenerLimits,
    service: Service,
    callers: Callers,
    make: M,
}

impl<M> Ctx<M> {
    fn ended(&self, why: Ended, peer: SocketAddr) {
        tracing::debug!(listener = %self.service, %peer, reason = why.as_str(), "connection closed");
        if let Some(f) = &self.on_ended {
            f(why, peer);
        }
    }

    async fn connection<S, B>(&self, a: firewall::Admitted, shutdown: CancellationToken)
    where
        M: Fn(&ConnInfo) -> S,
        S: tower::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let peer = a.peer;
        let activity = a.slot.activity().clone();
        let closed = activity.closed().clone();
        let (io, linger) = io::EdgeIo::new(a.stream, a.slot);
        let Some(acceptor) = &self.acceptor else {
            let info = ConnInfo {
                peer,
                identity: None,
                service: self.service,
                tls_handshake: None,
            };
            if !self.callers.admit(None) {
                return self.ended(Ended::Identity, peer);
            }
            let svc = (self.make)(&info);
            let proto = Proto::Http1 {
                http2: self.plain_h2c,
            };
            let served = Box::pin(self.http(io, proto, info, svc, &activity, &shutdown, &linger));
            return served.await;
        };
        let handshake_started = std::time::Instant::now();
        // The handshake and the TLS session it yields (about 1.3 KiB) are boxed: a session
        // held inline, even one already moved out, would keep its bytes in this task's
        // future for the connection's whole life (a future keeps a slot for every local
        // that lives across an await).
        let accept = Box::pin(async move { acceptor.accept(io).await.map(Box::new) });
        let handshake = tokio::select! {
            r = tokio::time::timeout(self.limits.tls_handshake_timeout(), accept) => r,
            _ = closed.cancelled() => return self.ended(Ended::Evicted, peer),
            _ = shutdown.cancelled() => return,
        };
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(_)) => return self.ended(Ended::HandshakeFailed, peer),
            Err(_) => return self.ended(Ended::HandshakeTimeout, peer),
        };
        // ALPN (RFC 7301 §3.2) names the one protocol the client speaks; without it the
        // first bytes tell.
        let proto = match tls.get_ref().1.alpn_protocol() {
            Some(b"h2") => Proto::Http2,
            Some(_) => Proto::Http1 { http2: false },
            None => Proto::Http1 { http2: true },
        };
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(pki::peer_identity);
        let info = ConnInfo {
            peer,
            identity,
            service: self.service,
            tls_handshake: Some(handshake_started.elapsed()),
        };
        if !self.callers.admit(info.identity.as_ref()) {
            // Answered, not dropped: a caller with a valid certificate of the lab learns
            // why (403, RFC 9110 §15.5.4) and the operator sees it counted.
            tracing::warn!(listener = %self.service, %peer, identity = ?info.identity, "caller not admitted by the policy");
            self.ended(Ended::Identity, peer);
            let served =
                Box::pin(self.http(tls, proto, info, forbidden(), &activity, &shutdown, &linger));
            return served.await;
        }
        let svc = (self.make)(&info);
        let served = Box::pin(self.http(tls, proto, info, svc, &activity, &shutdown, &linger));
        served.await
    }

    /// Serves HTTP on `io` until it closes, watching its timeouts (first byte, first
    /// head, keep-alive idle, stall) and the role's shutdown.
    #[allow(clippy::too_many_arguments)]
    async fn http<I, S, B>(
        &self,
        io: I,
        proto: Proto,
        info: ConnInfo,
        svc: S,
        activity: &Arc<Activity>,
        shutdown: &CancellationToken,
        linger: &std::sync::atomic::AtomicBool,
    ) where
        I: AsyncRead + AsyncWrite + h1::ReadReady + Unpin + Send + 'static,
        S: tower::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let peer = info.peer;
        let counted = activity.clone();
        let handle = move |req: Request<RequestBody>| {
            counted.request_started();
            let guard = InFlight(counted.clone());
            let fut = svc.clone().oneshot(req);
            // `Result<_, Infallible>`: hyper's HTTP/2 service takes the future as it is,
            // without another async block around it (one move less per request).
            async move {
                let Ok(resp) = fut.await;
                Ok::<_, Infallible>(resp.map(|body| CountedBody {
                    inner: body,
                    _guard: guard,
                }))
            }
        };
        // Asks the connection to finish the request in flight, if any, then close
        // (HTTP/2: GOAWAY first).
        let graceful = CancellationToken::new();
        // Boxed: the connection's state is allocated at its own size instead of widening
        // this future.
        let mut conn = Box::pin({
            let graceful = graceful.clone();
            let http2 = &self.http2;
            let mut settings = self.http1;
            // hyper's HTTP/2 connection is boxed on its own: its state would otherwise size
            // every HTTP/1.1 connection's.
            async move {
                let http2_allowed = match proto {
                    Proto::Http2 => {
                        let served = Box::pin(serve_http2(http2, io, handle, &graceful));
                        return served.await;
                    }
                    Proto::Http1 { http2 } => http2,
                };
                settings.http2 = http2_allowed;
                let served = h1::serve(io, settings, &graceful, handle).await;
                match served {
                    Ok(h1::Done::Http2(io, handle)) => {
                        let served = Box::pin(serve_http2(http2, io, handle, &graceful));
                        served.await
                    }
                    Ok(h1::Done::Closed | h1::Done::Upgraded) => Ok(()),
                    Err(h1::Failed::Ended(why)) => Err(ConnError::Ended(why)),
                    Err(h1::Failed::Io(e)) => Err(ConnError::Other(e.into())),
                }
            }
        });
        let closed = activity.closed().clone();
        let bytes_at_start = activity.bytes_read();
        let started = tokio::time::Instant::now();
        let first_byte = self.limits.first_byte_timeout();
        let first_request = first_byte + self.limits.header_read_timeout();
        let idle = self.limits.idle_timeout();
        let mut closing: Option<(Ended, tokio::time::Instant)> = None;
        let mut draining = false;
        let result = loop {
            // When to look again, and what ends the connection then.
            let now = tokio::time::Instant::now();
            let (deadline, why) = if let Some((_, at)) = closing {
                (at, None)
            } else if activity.requests() == 0 {
                if activity.bytes_read() == bytes_at_start {
                    (started + first_byte, Some(Ended::FirstByteTimeout))
                } else {
                    (started + first_request, Some(Ended::HeaderTimeout))
                }
            } else if activity.in_flight() == 0 {
                (
                    now + idle.saturating_sub(activity.idle_for()),
                    Some(Ended::Idle),
                )
            } else {
                (
                    now + idle.saturating_sub(activity.idle_for()),
                    Some(Ended::Stalled),
                )
            };
            // The watchdogs are Armed: after registering the task's waker they are polled
            // only once they may have fired, not on every wake of the connection.
            tokio::select! {
                biased;
                r = conn.as_mut() => break r,
                _ = Armed::new(closed.cancelled(), |_| closed.is_cancelled()) => {
                    self.ended(Ended::Evicted, peer);
                    return;
                }
                _ = Armed::new(shutdown.cancelled(), |_| shutdown.is_cancelled()), if !draining => {
                    draining = true;
                    graceful.cancel();
                }
                _ = Armed::new(tokio::time::sleep_until(deadline), tokio::time::Sleep::is_elapsed) => {
                    let Some(why) = why else {
                        // The grace after a graceful close is over.
                        if let Some((why, _)) = closing {
                            if why == Ended::Idle && activity.in_flight() > 0 {
                                // A request came in as the idle close was asked: it is
                                // answered (under the stall rule, with `Connection: close`),
                                // then the connection closes.
                                closing = None;
                                continue;
                            }
                            self.ended(why, peer);
                        }
                        return;
                    };
                    let due = match why {
                        Ended::FirstByteTimeout => activity.requests() == 0 && activity.bytes_read() == bytes_at_start,
                        Ended::HeaderTimeout => activity.requests() == 0,
                        Ended::Idle => activity.in_flight() == 0 && activity.idle_for() >= idle,
                        _ => activity.in_flight() > 0 && activity.idle_for() >= idle,
                    };
                    if due {
                        if why == Ended::Stalled {
                            self.ended(why, peer);
                            return;
                        }
                        graceful.cancel();
                        closing = Some((why, tokio::time::Instant::now() + CLOSE_GRACE));
                    }
                }
            }
        };
        match result {
            Ok(()) => {
                if let Some((why, _)) = closing {
                    self.ended(why, peer);
                }
            }
            Err(ConnError::Ended(why)) => self.ended(why, peer),
            Err(ConnError::Other(e)) => {
                tracing::debug!(listener = %self.service, %peer, error = %e, "connection ended with an error");
            }
        }
        // The connection ended normally after serving: close lingering, so a response sent
        // before the request was read completely is not lost to a reset.
        if activity.requests() > 0 {
            linger.store(true, Ordering::Relaxed);
        }
    }
}

/// Serves HTTP/2 on `io` with hyper until it closes; `graceful`: GOAWAY, finish the
/// streams in flight, close. hyper writes through [`io::Unvectored`], so the small
/// responses of streams that finish together share one write.
async fn serve_http2<I, H, Fut, B>(
    builder: &http2::Builder<TokioExecutor>,
    io: I,
    handle: H,
    graceful: &CancellationToken,
) -> Result<(), ConnError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<RequestBody>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        handle(req.map(RequestBody::hyper))
    });
    let io = TokioIo::new(io::Unvectored(io));
    let mut conn = std::pin::pin!(builder.serve_connection(io, svc));
    let other = |e: hyper::Error| ConnError::Other(e.into());
    tokio::select! {
        r = conn.as_mut() => return r.map_err(other),
        () = graceful.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await.map_err(other)
}

type Forbidden = tower::util::ServiceFn<
    fn(Request<RequestBody>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>,
>;

/// Answers every request `403 Forbidden` and closes the connection.
fn forbidden() -> Forbidden {
    fn answer(
        _req: Request<RequestBody>,
    ) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
        let mut resp = Response::new(Full::new(Bytes::from_static(
            b"this certificate's identity may not call this service\n",
        )));
        *resp.status_mut() = http::StatusCode::FORBIDDEN;
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        std::future::ready(Ok(resp))
    }
    tower::service_fn(answer as fn(_) -> _)
}

/// Marks a request ended (its response body finished or was dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

pin_project_lite::pin_project! {
    /// A response body that marks its request ended when it is dropped.
    struct CountedBody<B> {
        #[pin]
        inner: B,
        _guard: InFlight,
    }
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Boxed future of a wrapped service.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
