//! WebSocket pass-through: an HTTP/1.1 `GET` with `Connection: upgrade` and `Upgrade:
//! websocket` (RFC 6455 §4.1, RFC 9110 §7.8) is sent with its upgrade fields on a
//! connection of its own to a backend chosen like any request; when the backend answers
//! `101 Switching Protocols`, the client gets that answer and the two connections are
//! joined byte for byte. Any other answer is passed back as is.
//!
//! The tunnel ends when both sides have closed their sending half; when one has and the
//! other direction carries no byte for `tunnel_half_closed_timeout_ms` (HAProxy `timeout
//! client-fin` / `timeout server-fin`: a WebSocket peer answers a Close promptly); or when no byte has
//! crossed it in either direction for `tunnel_idle_timeout_ms` (nginx
//! `proxy_read_timeout`, HAProxy `timeout tunnel`). A tunnel does not hold one of the
//! backend's request slots (it is not a request in flight) and its connection is never
//! pooled.
//!
//! Every tunnel is one of the load balancer's tasks ([`Tunnels`]), whatever generation
//! opened it: a reload leaves open tunnels alone (they keep the backend connection they
//! have, even when the new configuration drops that backend, as an old HAProxy process
//! keeps its tunnels after a reload), and a stop gives each the `drain_timeout_ms` of the
//! listener it came through, counted from the stop, to end by itself, then closes both
//! sides (TLS `close_notify` and FIN, then the sockets) — the role's shutdown returns only
//! after that. Open tunnels are the gauge `rampart_lb_websocket_tunnels{backend}`. The
//! handshake follows the request rules: forwarding fields added, the backend chosen by the
//! algorithm and sticky cookie, a connect failure or a reset before the answer tried on
//! another backend under the retry budget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serve::RequestBody;
use serve::RoleTasks;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::balancer::Outcome;
use crate::proxy::{
    local, strip_hop_by_hop, upstream_headers, Body, BoxError, Client, Scheme, ServedBy, Upstreams,
};
use crate::retry::Failure;

/// Time allowed for the backend's answer to the upgrade request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Time allowed to send the closing `close_notify` and FIN to one side of a tunnel the
/// load balancer ends (a peer that reads nothing cannot hold the stop).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    backend: String,
}

/// The open WebSocket tunnels of one load balancer, across its generations: each runs as
/// one of the role's tasks (so its shutdown waits for them) and is counted in
/// `rampart_lb_websocket_tunnels{backend}`. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Tunnels {
    tasks: RoleTasks,
    /// `drain_timeout_ms` of the HTTPS and of the HTTP listener.
    drain_https: Duration,
    drain_http: Duration,
    /// When the stop was first seen: the drain time of every tunnel counts from it, so a
    /// tunnel whose handshake ended during the drain gets no more time than the others.
    stopped_at: Arc<OnceLock<tokio::time::Instant>>,
    open: Family<TunnelLabels, Gauge>,
}

impl Tunnels {
    /// Registers `rampart_lb_websocket_tunnels` in `registry`; tunnels run on `tasks` and,
    /// once its token is cancelled, get the drain time of their listener.
    pub(crate) fn register(
        registry: &mut Registry,
        tasks: RoleTasks,
        drain_https: Duration,
        drain_http: Duration,
    ) -> Tunnels {
        let open = Family::<TunnelLabels, Gauge>::default();
        registry.register(
            "rampart_lb_websocket_tunnels",
            "Open WebSocket tunnels (upgraded connections joined to a backend), by backend",
            open.clone(),
        );
        Tunnels {
            tasks,
            drain_https,
            drain_http,
            stopped_at: Arc::default(),
            open,
        }
    }

    /// Creates backend `backend`'s series (at 0 until a tunnel opens), so a scrape shows
    /// every configured backend.
    pub(crate) fn declare(&self, backend: &str) {
        drop(self.open.get_or_create(&TunnelLabels {
            backend: backend.to_string(),
        }));
    }

    /// Removes backend `backend`'s series when no tunnel to it is open (a reload removed
    /// the backend; one still open keeps its series until a later reload finds it at 0).
    pub(crate) fn forget(&self, backend: &str) {
        let labels = TunnelLabels {
            backend: backend.to_string(),
        };
        let idle = self.open.get(&labels).is_some_and(|g| g.get() == 0);
        if idle {
            self.open.remove(&labels);
        }
    }

    /// Runs the tunnel `run` to backend `backend`, opened through the `scheme` listener,
    /// as one of the role's tasks; `run` gets the future that completes when the tunnel
    /// must close (the listener's drain time after the stop).
    fn spawn<F>(&self, backend: &str, scheme: Scheme, run: impl FnOnce(Closing) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let gauge = self
            .open
            .get_or_create(&TunnelLabels {
                backend: backend.to_string(),
            })
            .clone();
        gauge.inc();
        let (token, stopped_at) = (self.tasks.token(), self.stopped_at.clone());
        let drain = match scheme {
            Scheme::Https => self.drain_https,
            Scheme::Http => self.drain_http,
        };
        let closing: Closing = Box::pin(async move {
            token.cancelled().await;
            let stopped = *stopped_at.get_or_init(tokio::time::Instant::now);
            tokio::time::sleep_until(stopped + drain).await;
        });
        let task = run(closing);
        let open = Open(gauge);
        self.tasks.spawn(async move {
            task.await;
            drop(open);
        });
    }
}

/// One open tunnel in the gauge, taken out when dropped (also when its task panics).
struct Open(Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Completes when an open tunnel must be closed by the load balancer.
type Closing = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Whether `req` asks for a WebSocket upgrade over HTTP/1.1.
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    req.version() == Version::HTTP_11
        && req.method() == Method::GET
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket")
}

/// Forwards the upgrade request `req` (already checked: target, `Host`) that came over the
/// connection of `client`, from the client at `source` (see [`crate::proxy::real_client`]).
pub(crate) async fn forward(
    up: &Upstreams,
    mut req: Request<RequestBody>,
    client: &Client,
    source: std::net::IpAddr,
) -> Response<Body> {
    let client_side = serve::upgrade::on(&mut req);
    let (parts, _) = req.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("websocket"));
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    let mut headers = upstream_headers(&parts.headers, &parts.uri, client, parts.version);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade.clone());
    let affinity = up.balancer.affinity(&headers, source);
    up.retry_budget.deposit();
    let mut tried = Vec::new();
    loop {
        let slot = match up.balancer.acquire(&tried, &affinity).await {
            Ok(s) => s,
            Err(e) => return up.no_slot(e, !tried.is_empty()),
        };
        let (backend, index) = (slot.backend, slot.index);
        // Not a request in flight once upgraded: the slot only covers the handshake.
        drop(slot.permit);
        let attempt = Instant::now();
        let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let io = up
                .connector
                .connect(&backend.name)
                .await
                .map_err(|_| Failure::Connect)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| Failure::of_chain(&e))?;
            tokio::spawn(conn.with_upgrades());
            let mut breq = Request::new(Empty::<Bytes>::new());
            *breq.method_mut() = Method::GET;
            *breq.uri_mut() = path.parse().map_err(|_| Failure::Other)?;
            *breq.headers_mut() = headers.clone();
            sender
                .send_request(breq)
                .await
                .map_err(|e| Failure::of_chain(&e))
        })
        .await;
        let failure = match result {
            Ok(Ok(mut resp)) => {
                up.balancer.observe(
                    backend,
                    Outcome::Answered {
                        status: resp.status(),
                        elapsed: attempt.elapsed(),
                    },
                );
                if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    parts.extensions.insert(ServedBy(backend.name.clone()));
                    return Response::from_parts(parts, body.map_err(Into::into).boxed_unsync());
                }
                let backend_side = hyper::upgrade::on(&mut resp);
                let idle = up.tunnel_idle;
                let half_closed = up.tunnel_half_closed.min(idle);
                let name = backend.name.clone();
                up.tunnels.spawn(&backend.name, client.scheme, |mut closing| async move {
                    let both = tokio::select! {
                        both = async {
                            let backend_side = async { backend_side.await.map_err(BoxError::from) };
                            let client_side = async { client_side.await.map_err(BoxError::from) };
                            tokio::try_join!(client_side, backend_side)
                        } => both,
                        () = &mut closing => return,
                    };
                    match both {
                        Ok((c, b)) => {
                            let end = tunnel(
                                c,
                                TokioIo::new(b),
                                Limits {
                                    idle,
                                    half_closed,
                                },
                                closing,
                            )
                            .await;
                            tracing::debug!(backend = %name, to_backend = end.to_backend, to_client = end.to_client, reason = end.reason.as_str(), "websocket tunnel closed");
                        }
                        Err(e) => tracing::debug!(backend = %name, error = %e, "upgrade failed"),
                    }
                });
                let (mut parts, _) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, upgrade);
                if let Some(cookie) = up.balancer.sticky_cookie(&affinity, index) {
                    parts.headers.append(header::SET_COOKIE, cookie);
                }
                parts.extensions.insert(ServedBy(backend.name.clone()));
                return Response::from_parts(
                    parts,
                    http_body_util::Empty::new()
                        .map_err(|never: std::convert::Infallible| match never {})
                        .boxed_unsync(),
                );
            }
            Ok(Err(f)) => f,
            Err(_) => {
                up.balancer
                    .observe(backend, Outcome::Failed(Failure::Other));
                return local(StatusCode::GATEWAY_TIMEOUT, "gateway timeout");
            }
        };
        up.balancer.observe(backend, Outcome::Failed(failure));
        tracing::warn!(side = "upstream", backend = %backend.name, ?failure, "websocket handshake failed");
        // A GET: connect failures and resets may go to another backend.
        if !up.may_retry(true, failure) {
            return local(StatusCode::BAD_GATEWAY, "bad gateway");
        }
        backend.metrics.retried();
        tried.push(backend.name.clone());
    }
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// Both sides closed their sending half, or one failed.
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
    /// One side closed its sending half and the other direction stayed quiet for
    /// `tunnel_half_closed_timeout_ms`.
    HalfClosed,
    /// The load balancer stopped and the drain time is over.
    Drained,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Closed => "closed",
            Reason::Idle => "idle",
            Reason::HalfClosed => "half_closed",
            Reason::Drained => "drained",
        }
    }
}

/// How a tunnel ended: why, and the bytes copied to the backend and to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TunnelEnd {
    reason: Reason,
    to_backend: u64,
    to_client: u64,
}

/// A tunnel's idle limits: `idle` with no byte either way, `half_closed` with no byte after
/// one side closed its sending half.
#[derive(Debug, Clone, Copy)]
struct Limits {
    idle: Duration,
    half_closed: Duration,
}

/// Copies both ways until each side has closed its sending half or failed, one side has
/// closed and `limits.half_closed` passes without a byte, `limits.idle` passes without a
/// byte either way, or `closing` completes. In the last three cases both sides are shut down (each within [`CLOSE_TIMEOUT`]) before they are dropped, so each peer reads an
/// orderly end of stream rather than a reset.
async fn tunnel<C, B>(
    client: C,
    backend: B,
    limits: Limits,
    closing: impl std::future::Future<Output = ()>,
) -> TunnelEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let Limits { idle, half_closed } = limits;
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    // A direction reached end of stream (or failed).
    let half_closed_seen = AtomicBool::new(false);
    let (to_backend, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);
    let reason = {
        let up = async {
            pump(&mut cr, &mut bw, &last, &to_backend, epoch).await;
            half_closed_seen.store(true, Ordering::Relaxed);
        };
        let down = async {
            pump(&mut br, &mut cw, &last, &to_client, epoch).await;
            half_closed_seen.store(true, Ordering::Relaxed);
        };
        let watchdog = async {
            let tick = (half_closed.min(idle) / 4).max(Duration::from_millis(50));
            loop {
                tokio::time::sleep(tick).await;
                let quiet = epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    return Reason::Idle;
                }
                if half_closed_seen.load(Ordering::Relaxed) && quiet >= half_closed {
                    return Reason::HalfClosed;
                }
            }
        };
        tokio::select! {
            _ = async { tokio::join!(up, down) } => Reason::Closed,
            why = watchdog => why,
            () = closing => Reason::Drained,
        }
    };
    if reason != Reason::Closed {
        tracing::debug!(
            ?idle,
            reason = reason.as_str(),
            "websocket tunnel closed by the load balancer"
        );
        let _ = tokio::join!(
            tokio::time::timeout(CLOSE_TIMEOUT, cw.shutdown()),
            tokio::time::timeout(CLOSE_TIMEOUT, bw.shutdown()),
        );
    }
    TunnelEnd {
        reason,
        to_backend: to_backend.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
    }
}

/// Copies `from` to `to` until end of stream or an error (then shuts `to` down), adding
/// the bytes copied to `total`. Marks `last` (ms since `epoch`) at every chunk.
async fn pump<R, W>(from: &mut R, to: &mut W, last: &AtomicU64, total: &AtomicU64, epoch: Instant)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
        last.store(
            u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_http11_get_with_both_upgrade_tokens_is_an_upgrade() {
        let req = |v: Version, m: Method, conn: &str, upg: &str| {
            Request::builder()
                .version(v)
                .method(m)
                .header("connection", conn)
                .header("upgrade", upg)
                .body(())
                .unwrap()
        };
        assert!(is_upgrade(&req(
            Version::HTTP_11,
            Method::GET,
            "keep-alive, Upgrade",
            "WebSocket"
        )));
        assert!(!is_upgrade(&req(
            Version::HTTP_11,
            Method::POST,
            "upgrade",
            "websocket"
        )));
        assert!(!is_upgrade(&req(
            Version::HTTP_2,
            Method::GET,
            "upgrade",
            "websocket"
        )));
        assert!(!is_upgrade(&req(
            Version::HTTP_11,
            Method::GET,
            "close",
            "websocket"
        )));
        assert!(!is_upgrade(&req(
            Version::HTTP_11,
            Method::GET,
            "upgrade",
            "h2c"
        )));
    }

    #[tokio::test]
    async fn an_idle_tunnel_is_closed() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (backend, mut backend_peer) = tokio::io::duplex(64);
        let t = tokio::spawn(tunnel(
            client,
            backend,
            limits(Duration::from_millis(200)),
            std::future::pending(),
        ));
        client_peer.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        backend_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // Nothing more: the tunnel ends by itself and both peers see end of stream.
        let end = t.await.unwrap();
        assert_eq!(
            (end.reason, end.to_backend, end.to_client),
            (Reason::Idle, 4, 0)
        );
        assert_eq!(client_peer.read(&mut buf).await.unwrap(), 0);
        assert_eq!(backend_peer.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_closing_tunnel_shuts_both_sides_down() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (backend, mut backend_peer) = tokio::io::duplex(64);
        let (close, closing) = tokio::sync::oneshot::channel::<()>();
        let t = tokio::spawn(tunnel(
            client,
            backend,
            limits(Duration::from_secs(3600)),
            async {
                let _ = closing.await;
            },
        ));
        backend_peer.write_all(b"pong").await.unwrap();
        let mut buf = [0u8; 4];
        client_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        close.send(()).unwrap();
        let end = t.await.unwrap();
        assert_eq!(
            (end.reason, end.to_backend, end.to_client),
            (Reason::Drained, 0, 4)
        );
        assert_eq!(client_peer.read(&mut buf).await.unwrap(), 0);
        assert_eq!(backend_peer.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_tunnel_both_peers_close_ends_as_closed() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (backend, mut backend_peer) = tokio::io::duplex(64);
        let t = tokio::spawn(tunnel(
            client,
            backend,
            limits(Duration::from_secs(3600)),
            std::future::pending(),
        ));
        client_peer.write_all(b"bye").await.unwrap();
        client_peer.shutdown().await.unwrap();
        backend_peer.shutdown().await.unwrap();
        let end = t.await.unwrap();
        assert_eq!(
            (end.reason, end.to_backend, end.to_client),
            (Reason::Closed, 3, 0)
        );
    }

    /// `idle` both ways, and the same after a half close.
    fn limits(idle: Duration) -> Limits {
        Limits {
            idle,
            half_closed: idle,
        }
    }

    #[tokio::test]
    async fn a_half_closed_tunnel_is_closed_when_the_other_direction_stays_quiet() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (backend, mut backend_peer) = tokio::io::duplex(64);
        let t = tokio::spawn(tunnel(
            client,
            backend,
            Limits {
                idle: Duration::from_secs(3600),
                half_closed: Duration::from_secs(2),
            },
            std::future::pending(),
        ));
        // The backend closes its side (after its Close frame); the client never does.
        backend_peer.write_all(b"bye").await.unwrap();
        backend_peer.shutdown().await.unwrap();
        let mut buf = [0u8; 3];
        client_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(client_peer.read(&mut buf).await.unwrap(), 0);
        // The client still sends within the limit: it gets through.
        client_peer.write_all(b"ack").await.unwrap();
        backend_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ack");
        // Without the half-close limit it would wait for the hour-long idle timeout.
        let end = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("the half-closed tunnel was not closed")
            .unwrap();
        assert_eq!(
            (end.reason, end.to_backend, end.to_client),
            (Reason::HalfClosed, 3, 3)
        );
        assert_eq!(backend_peer.read(&mut buf).await.unwrap(), 0);
    }
}
