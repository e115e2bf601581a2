//! The backend set: each backend's up/down state (written by its health checker, read by
//! every request) and the round-robin order in which requests try them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;

use crate::Backend;

/// One backend and its current health.
#[derive(Debug)]
pub(crate) struct BackendState {
    /// The backend's name, shared with every response it serves (see
    /// [`crate::proxy::ServedBy`]).
    pub(crate) name: Arc<str>,
    pub(crate) addr: SocketAddr,
    up: AtomicBool,
    gauge: Gauge,
}

impl BackendState {
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

/// All backends plus the round-robin counter.
#[derive(Debug)]
pub(crate) struct Balancer {
    backends: Vec<BackendState>,
    next: AtomicUsize,
}

impl Balancer {
    /// Every backend starts down; `gauge(name)` gives its `rampart_backend_up` series.
    pub(crate) fn new(backends: &[Backend], gauge: impl Fn(&str) -> Gauge) -> Balancer {
        Balancer {
            backends: backends
                .iter()
                .map(|b| {
                    let g = gauge(&b.name);
                    g.set(0);
                    BackendState {
                        name: Arc::from(b.name.as_str()),
                        addr: b.addr,
                        up: AtomicBool::new(false),
                        gauge: g,
                    }
                })
                .collect(),
            next: AtomicUsize::new(0),
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

    fn balancer(n: usize) -> Balancer {
        let backends: Vec<Backend> = (0..n)
            .map(|i| Backend {
                name: format!("web-{i:02}"),
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
            })
            .collect();
        Balancer::new(&backends, |_| Gauge::default())
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
