//! The backend set: each backend's up/down state (written by its health checker, read by
//! every request) and the round-robin order in which requests try them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use prometheus_client::metrics::gauge::Gauge;

use crate::Backend;

/// One backend and its current health.
#[derive(Debug)]
pub(crate) struct BackendState {
    /// The backend's name, shared with every response it serves (see
    /// [`crate::proxy::ServedBy`]).
    pub(crate) name: Arc<str>,
    /// `name:port`, the authority of request URIs to this backend (the connector maps the
    /// name back to the address), parsed once instead of per request.
    pub(crate) authority: http::uri::Authority,
    up: AtomicBool,
    gauge: Gauge,
    /// `backend_max_connections` permits: one per request in flight.
    slots: Arc<Semaphore>,
    max: usize,
    /// Requests waiting for a slot.
    waiting: AtomicUsize,
}

impl BackendState {
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Requests in flight to this backend.
    pub(crate) fn active(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Requests waiting in this backend's queue.
    pub(crate) fn queued(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Why no backend slot was obtained (HAProxy answers both with 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueError {
    /// No backend is up.
    NoBackend,
    /// The chosen backend's queue holds `backend_queue_max` requests.
    Full,
    /// The request waited `backend_queue_timeout_ms`.
    Timeout,
}

/// A backend and one of its slots; the slot is given back on drop.
#[derive(Debug)]
pub(crate) struct Slot<'a> {
    pub(crate) backend: &'a BackendState,
    pub(crate) permit: OwnedSemaphorePermit,
}

/// `name:port` as a URI authority; backend names are validated host names, so parsing
/// fails only for a name no request could reach (then a placeholder the connector refuses
/// as an unknown backend, i.e. a connect error).
fn authority_of(name: &str, port: u16) -> http::uri::Authority {
    format!("{name}:{port}")
        .parse()
        .unwrap_or_else(|_| http::uri::Authority::from_static("invalid.backend"))
}

/// All backends plus the round-robin counter.
#[derive(Debug)]
pub(crate) struct Balancer {
    backends: Vec<BackendState>,
    next: AtomicUsize,
    queue_max: usize,
    queue_timeout: Duration,
}

impl Balancer {
    /// Every backend starts down; `gauge(name)` gives its `rampart_backend_up` series.
    /// `max_connections` requests in flight per backend (at least 1); `queue_max` waiting
    /// per backend for at most `queue_timeout`.
    pub(crate) fn new(
        backends: &[Backend],
        gauge: impl Fn(&str) -> Gauge,
        max_connections: usize,
        queue_max: usize,
        queue_timeout: Duration,
    ) -> Balancer {
        let max = max_connections.max(1);
        Balancer {
            backends: backends
                .iter()
                .map(|b| {
                    let g = gauge(&b.name);
                    g.set(0);
                    BackendState {
                        name: Arc::from(b.name.as_str()),
                        authority: authority_of(&b.name, b.addr.port()),
                        up: AtomicBool::new(false),
                        gauge: g,
                        slots: Arc::new(Semaphore::new(max)),
                        max,
                        waiting: AtomicUsize::new(0),
                    }
                })
                .collect(),
            next: AtomicUsize::new(0),
            queue_max,
            queue_timeout,
        }
    }

    /// A slot on a backend that is up, skipping `tried`: the first in round-robin order
    /// with a free slot; when all are busy, a place in the queue of the one with the
    /// shortest queue (HAProxy `maxconn` + `timeout queue` semantics; the queue is FIFO).
    pub(crate) async fn acquire(&self, tried: &[Arc<str>]) -> Result<Slot<'_>, QueueError> {
        let order: Vec<&BackendState> = self
            .order()
            .into_iter()
            .filter(|b| !tried.contains(&b.name))
            .collect();
        if order.is_empty() {
            return Err(QueueError::NoBackend);
        }
        for b in &order {
            if let Ok(permit) = b.slots.clone().try_acquire_owned() {
                return Ok(Slot { backend: b, permit });
            }
        }
        let b = order
            .iter()
            .min_by_key(|b| b.queued())
            .copied()
            .ok_or(QueueError::NoBackend)?;
        if b.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_max {
            b.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(QueueError::Full);
        }
        let got = tokio::time::timeout(self.queue_timeout, b.slots.clone().acquire_owned()).await;
        b.waiting.fetch_sub(1, Ordering::AcqRel);
        match got {
            Ok(Ok(permit)) => Ok(Slot { backend: b, permit }),
            _ => Err(QueueError::Timeout),
        }
    }

    pub(crate) fn backends(&self) -> &[BackendState] {
        &self.backends
    }

    pub(crate) fn set_up(&self, index: usize, up: bool) {
        if let Some(b) = self.backends.get(index) {
            b.up.store(up, Ordering::Release);
            b.gauge.set(i64::from(up));
        }
    }

    /// The backends that are up, starting at the next one in round-robin order, each once:
    /// the first is the one to use, the rest are the fallbacks when connecting fails.
    /// Empty when no backend is up.
    pub(crate) fn order(&self) -> Vec<&BackendState> {
        let mut up: Vec<&BackendState> = self.backends.iter().filter(|b| b.is_up()).collect();
        if !up.is_empty() {
            let start = self.next.fetch_add(1, Ordering::Relaxed) % up.len();
            up.rotate_left(start);
        }
        up
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn slots_then_a_bounded_queue_then_503() {
        let b = balancer(1);
        b.set_up(0, true);
        let s1 = b.acquire(&[]).await.unwrap();
        let _s2 = b.acquire(&[]).await.unwrap();
        assert_eq!(b.backends()[0].active(), 2);
        // Both slots taken: the next request waits (queue of 1) and times out.
        assert_eq!(b.acquire(&[]).await.unwrap_err(), QueueError::Timeout);
        // A waiting request gets the slot given back.
        let waiter = b.acquire(&[]);
        tokio::pin!(waiter);
        assert!(futures_poll_once(waiter.as_mut()).await.is_none());
        // While one waits, the queue is full.
        assert_eq!(b.acquire(&[]).await.unwrap_err(), QueueError::Full);
        drop(s1);
        assert!(waiter.await.is_ok());
        let name = b.backends()[0].name.clone();
        assert_eq!(b.acquire(&[name]).await.unwrap_err(), QueueError::NoBackend);
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    fn balancer(n: usize) -> Balancer {
        let backends: Vec<Backend> = (0..n)
            .map(|i| Backend {
                server_name: None,
                name: format!("web-{i:02}"),
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
            })
            .collect();
        Balancer::new(
            &backends,
            |_| Gauge::default(),
            2,
            1,
            Duration::from_millis(50),
        )
    }

    fn first(b: &Balancer) -> Option<String> {
        b.order().first().map(|s| s.name.to_string())
    }

    #[test]
    fn starts_with_every_backend_down() {
        let b = balancer(2);
        assert!(b.order().is_empty());
    }

    #[test]
    fn round_robin_skips_down_backends() {
        let b = balancer(3);
        b.set_up(0, true);
        b.set_up(2, true);
        let picks: Vec<_> = (0..4).map(|_| first(&b).unwrap()).collect();
        assert_eq!(picks, ["web-00", "web-02", "web-00", "web-02"]);
    }

    #[test]
    fn order_lists_each_up_backend_once() {
        let b = balancer(3);
        for i in 0..3 {
            b.set_up(i, true);
        }
        let order: Vec<_> = b.order().iter().map(|s| s.name.to_string()).collect();
        assert_eq!(order, ["web-00", "web-01", "web-02"]);
        let order: Vec<_> = b.order().iter().map(|s| s.name.to_string()).collect();
        assert_eq!(order, ["web-01", "web-02", "web-00"]);
        b.set_up(1, false);
        assert_eq!(b.order().len(), 2);
    }
}
