//! WebSocket pass-through: an HTTP/1.1 `GET` with `Connection: upgrade` and `Upgrade:
//! websocket` (RFC 6455 §4.1, RFC 9110 §7.8) is sent with its upgrade fields on a
//! connection of its own to a backend chosen like any request; when the backend answers
//! `101 Switching Protocols`, the client gets that answer and the two connections are
//! joined byte for byte. Any other answer is passed back as is.
//!
//! The tunnel ends when either side closes, or when no byte has crossed it in either
//! direction for `tunnel_idle_timeout_ms` (nginx `proxy_read_timeout`, HAProxy `timeout
//! tunnel`). A tunnel does not hold one of the backend's request slots (it is not a
//! request in flight) and its connection is never pooled. The handshake follows the
//! request rules: forwarding fields added, the backend chosen by the algorithm and sticky
//! cookie, a connect failure or a reset before the answer tried on another backend under
//! the retry budget.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::balancer::{Outcome, QueueError};
use crate::proxy::{local, strip_hop_by_hop, upstream_headers, Body, Scheme, ServedBy, Upstreams};
use crate::retry::Failure;

/// Time allowed for the backend's answer to the upgrade request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Forwards the upgrade request `req` (already checked: target, `Host`) from `client_ip`,
/// received over `scheme`.
pub(crate) async fn forward(
    up: &Upstreams,
    mut req: Request<Incoming>,
    client_ip: IpAddr,
    scheme: Scheme,
) -> Response<Body> {
    let client_side = hyper::upgrade::on(&mut req);
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
    let mut headers = upstream_headers(parts.headers, &parts.uri, client_ip, parts.version, scheme);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade.clone());
    let affinity = up.balancer.affinity(&headers, client_ip);
    up.retry_budget.deposit();
    let mut tried = Vec::new();
    loop {
        let slot = match up.balancer.acquire(&tried, &affinity).await {
            Ok(s) => s,
            Err(QueueError::NoBackend) if tried.is_empty() => {
                return crate::unavailable::no_backend(up)
            }
            Err(_) => {
                return up.reject(
                    StatusCode::BAD_GATEWAY,
                    "no_backend",
                    "no backend reachable",
                )
            }
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
                let name = backend.name.clone();
                tokio::spawn(async move {
                    match tokio::try_join!(client_side, backend_side) {
                        Ok((c, b)) => {
                            let (to_backend, to_client) =
                                tunnel(TokioIo::new(c), TokioIo::new(b), idle).await;
                            tracing::debug!(backend = %name, to_backend, to_client, "websocket tunnel closed");
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

/// Copies both ways until each side has closed its sending half, an error, or `idle`
/// without a byte either way; returns the bytes sent (to the backend, to the client), or
/// zeros when the idle timeout ended it.
async fn tunnel<C, B>(client: C, backend: B, idle: Duration) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let (cr, cw) = tokio::io::split(client);
    let (br, bw) = tokio::io::split(backend);
    let up = pump(cr, bw, &last, epoch);
    let down = pump(br, cw, &last, epoch);
    let watchdog = async {
        let tick = (idle / 4).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(tick).await;
            let quiet = epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
        }
    };
    tokio::select! {
        both = async { tokio::join!(up, down) } => both,
        _ = watchdog => {
            tracing::debug!(?idle, "websocket tunnel idle: closed");
            (0, 0)
        }
    }
}

/// Copies `from` to `to` until end of stream or an error (then shuts `to` down); the bytes
/// copied. Marks `last` (ms since `epoch`) at every chunk.
async fn pump<R, W>(mut from: R, mut to: W, last: &AtomicU64, epoch: Instant) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
        last.store(
            u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
    let _ = to.shutdown().await;
    total
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
        let t = tokio::spawn(tunnel(client, backend, Duration::from_millis(200)));
        client_peer.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        backend_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // Nothing more: the tunnel ends by itself and both peers see end of stream.
        t.await.unwrap();
        assert_eq!(client_peer.read(&mut buf).await.unwrap(), 0);
        assert_eq!(backend_peer.read(&mut buf).await.unwrap(), 0);
    }
}
