//! The one budget of bytes the load balancer holds for clients (request bodies and
//! responses), across all connections and generations.
//!
//! A request body is read whole before a backend is chosen, and a response up to
//! `response_buffer_bytes` is read from the backend in full before it goes to the client,
//! so that a slow client never holds a backend connection. Without a bound over all of
//! them, that buffering is a memory amplifier: a client that asks for large responses and
//! never reads them (an HTTP/1.1 connection that does not read, an HTTP/2 stream whose
//! window stays shut) makes the load balancer hold a buffer each, up to `max_connections`
//! × streams × `response_buffer_bytes`. The budget (`balancer.buffer_total_bytes`) caps
//! the sum: a response is buffered only as far as the budget allows, and the rest of it is
//! streamed from the backend as the client reads, holding the backend's slot the way
//! HAProxy and nginx without `proxy_buffering` do; a request body that finds no room gets
//! 503. Bytes come back to the budget when the body holding them is dropped (sent, or its
//! client gone).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// Largest data frame a buffered body yields at a time. An HTTP/2 stream takes a frame
/// only when the client's window has room, so a client that stops reading leaves the rest
/// in the body, where the budget counts it, rather than in the connection's send queue.
pub(crate) const FRAME_BYTES: usize = 64 * 1024;

/// See the module documentation. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct BufferBudget {
    inner: Arc<Inner>,
    /// `rampart_lb_buffer_exhausted_total`: responses streamed and request bodies
    /// refused because the budget was spent.
    exhausted: Counter,
}

#[derive(Debug)]
struct Inner {
    /// Bytes held now: the sum of every [`Held`]. `rampart_lb_buffered_bytes` reads it
    /// at each scrape.
    used: AtomicU64,
    /// The most that may be held.
    total: u64,
}

/// Bytes taken from a [`BufferBudget`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    inner: Arc<Inner>,
    bytes: u64,
}

impl BufferBudget {
    /// A budget of `total_bytes`, its series registered in `registry`.
    pub(crate) fn register(registry: &mut Registry, total_bytes: u64) -> BufferBudget {
        let budget = BufferBudget::new(total_bytes);
        registry.register(
            "rampart_lb_buffer_exhausted",
            "Responses streamed instead of buffered, and request bodies refused (503), because the buffer budget was spent",
            budget.exhausted.clone(),
        );
        registry.register_collector(Box::new(Scraped(budget.inner.clone())));
        budget
    }

    fn new(total_bytes: u64) -> BufferBudget {
        BufferBudget {
            inner: Arc::new(Inner {
                used: AtomicU64::new(0),
                total: total_bytes,
            }),
            exhausted: Counter::default(),
        }
    }

    /// Takes room for `bytes` more, or `None` when the budget has not that much left;
    /// never waits.
    fn try_take(&self, bytes: usize) -> Option<Held> {
        let bytes = bytes as u64;
        let total = self.inner.total;
        self.inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&after| after <= total)
            })
            .ok()?;
        Some(Held {
            inner: self.inner.clone(),
            bytes,
        })
    }

    /// Adds room for `bytes` more to `held`, the one [`Held`] of a whole body (made by the
    /// first piece). When the budget has not that much left, `held` is left as it is, the
    /// want is counted in `rampart_lb_buffer_exhausted_total`, and the answer is false: the
    /// caller streams the rest of a response, or refuses a request body. Never waits.
    pub(crate) fn take_into(&self, held: &mut Option<Held>, bytes: usize) -> bool {
        let Some(room) = self.try_take(bytes) else {
            self.exhausted.inc();
            return false;
        };
        match held {
            Some(h) => h.merge(room),
            None => *held = Some(room),
        }
        true
    }

    /// Bytes held now.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Acquire)
    }
}

impl Held {
    /// Adds `other` to these bytes: both come back together.
    fn merge(&mut self, mut other: Held) {
        // `other`'s bytes now come back with `self` (both are of the same budget).
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.inner.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// `rampart_lb_buffered_bytes`, read from the budget at each scrape.
#[derive(Debug)]
struct Scraped(Arc<Inner>);

impl prometheus_client::collector::Collector for Scraped {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        let used = i64::try_from(self.0.used.load(Ordering::Acquire)).unwrap_or(i64::MAX);
        let m = enc.encode_descriptor(
            "rampart_lb_buffered_bytes",
            "Bytes of request bodies and responses the load balancer holds (at most balancer.buffer_total_bytes)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(used).encode(m)
    }
}

/// The next data frame of a buffered body: at most [`FRAME_BYTES`] off the front of
/// `rest`, without copying.
pub(crate) fn next_frame(rest: &mut Bytes) -> Bytes {
    rest.split_to(rest.len().min(FRAME_BYTES))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn takes_bytes_until_spent_and_gives_back_on_drop() {
        let budget = BufferBudget::new(10_000);
        let mut a = budget.try_take(1_000).unwrap();
        a.merge(budget.try_take(5_000).unwrap());
        assert_eq!(budget.used(), 6_000);
        let b = budget.try_take(4_000).unwrap();
        assert!(budget.try_take(1).is_none(), "the budget is spent");
        drop(a);
        assert_eq!(budget.used(), 4_000);
        assert!(budget.try_take(6_001).is_none(), "more than is left");
        let c = budget.try_take(6_000).unwrap();
        drop((b, c));
        assert_eq!(budget.used(), 0);
        assert!(budget.try_take(10_000).is_some());
    }

    #[test]
    fn a_body_holds_one_share_and_a_refusal_is_counted() {
        let budget = BufferBudget::new(10_000);
        let mut body = None;
        assert!(budget.take_into(&mut body, 4_000));
        assert!(budget.take_into(&mut body, 5_000));
        assert_eq!(budget.used(), 9_000);
        assert_eq!(budget.exhausted.get(), 0);
        // Too much: the body keeps what it had, and the want is counted.
        assert!(!budget.take_into(&mut body, 1_001));
        assert_eq!(budget.used(), 9_000);
        assert_eq!(budget.exhausted.get(), 1);
        drop(body);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_held_bytes_are_scraped_as_a_gauge() {
        let mut registry = Registry::default();
        let budget = BufferBudget::register(&mut registry, 10_000);
        let _held = budget.try_take(1_234).unwrap();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("rampart_lb_buffered_bytes 1234"), "{text}");
        assert!(
            text.contains("rampart_lb_buffer_exhausted_total 0"),
            "{text}"
        );
    }

    #[test]
    fn frames_are_cut_without_copying() {
        let whole = Bytes::from(vec![7u8; FRAME_BYTES * 2 + 5]);
        let mut rest = whole.clone();
        let sizes: Vec<usize> =
            std::iter::from_fn(|| (!rest.is_empty()).then(|| next_frame(&mut rest).len()))
                .collect();
        assert_eq!(sizes, [FRAME_BYTES, FRAME_BYTES, 5]);
    }
}
