//! The backend set: each backend's state — active health (written by its checker),
//! passive health ([`crate::outlier`]), drain flag, slow-start ramp, slots and queue — and
//! the choice of a backend for each request.
//!
//! A request may go to the backends that are *available*: up by the active checks, not
//! ejected, not draining, not yet tried for this request. Primaries are used while one is
//! available; backups (`backup = true`) only when none is (HAProxy/nginx `backup`). Among
//! them the algorithm of [`crate::selection`] chooses, unless the request's sticky cookie
//! names an available backend ([`crate::sticky`]). Then: a free slot on the chosen backend;
//! else (algorithms without affinity) a free slot on another; else a place in a queue
//! (HAProxy `maxconn` + `timeout queue` semantics; each queue is FIFO) — the chosen
//! backend's for hashing and stickiness, the shortest otherwise.
//!
//! Slow start (nginx `slow_start`, HAProxy `slowstart`): a backend that comes back up after
//! having been up before, or whose ejection ends, has its weight scaled from 1/10 to full
//! linearly over `slow_start_ms` (weighted algorithms). The first rise after start has no
//! ramp.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use topology::{Algorithm, Balancing};

use crate::backend_metrics::{BackendMetrics, Families};
use crate::outlier::{Outlier, Policy};
use crate::retry::Failure;
use crate::selection::{Candidate, Selector};
use crate::sticky::Sticky;
use crate::Backend;

/// One backend and its current health.
#[derive(Debug)]
pub(crate) struct BackendState {
    /// The backend's name, shared with every response it serves (see
    /// [`crate::proxy::ServedBy`]).
    pub(crate) name: Arc<str>,
    /// Where it listens (a reload keeps a backend's health only for the same name and
    /// address).
    pub(crate) addr: std::net::SocketAddr,
    /// Configured weight (1–256).
    pub(crate) weight: u32,
    /// Used only when no primary is available.
    pub(crate) backup: bool,
    up: AtomicBool,
    /// Whether it was ever up (the first rise has no slow start).
    ever_up: AtomicBool,
    draining: AtomicBool,
    /// When it last came back up (ms since the balancer's epoch; 0 = no ramp).
    ramp_from_ms: AtomicU64,
    /// Passive health.
    pub(crate) outlier: Outlier,
    /// Its request series.
    pub(crate) metrics: BackendMetrics,
    gauge: Gauge,
    /// `backend_max_connections` permits: one per request in flight.
    slots: Arc<Semaphore>,
    max: usize,
    /// Requests waiting for a slot.
    waiting: AtomicUsize,
}

impl BackendState {
    /// The active health checks' verdict.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether it is draining (no new requests; `rampart lb drain`).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Requests in flight to this backend.
    pub(crate) fn active(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Requests waiting in this backend's queue.
    pub(crate) fn queued(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn available(&self, now_ms: u64) -> bool {
        self.is_up() && !self.is_draining() && !self.outlier.is_ejected(now_ms)
    }

    /// Weight in thousandths after slow start at `now_ms`.
    fn effective_weight(&self, now_ms: u64, slow_start_ms: u64) -> u64 {
        let full = u64::from(self.weight.max(1)) * 1000;
        let from = self
            .ramp_from_ms
            .load(Ordering::Relaxed)
            .max(self.outlier.ejected_until());
        if slow_start_ms == 0 || from == 0 || now_ms >= from + slow_start_ms {
            return full;
        }
        let elapsed = now_ms.saturating_sub(from);
        (full * elapsed / slow_start_ms).max(full / 10).max(1)
    }
}

/// Why no backend slot was obtained (HAProxy answers both with 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueError {
    /// No backend is available.
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
    /// The backend's index (for the sticky cookie).
    pub(crate) index: usize,
    pub(crate) permit: OwnedSemaphorePermit,
    /// How long the request waited in the backend's queue for this slot: zero when a slot
    /// was free at once (the clock is read only when the request had to wait).
    pub(crate) queued: Duration,
}

/// What of a request steers its backend choice: the consistent-hash key and the backend
/// its sticky cookie names. Computed once per request, before the first attempt.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Affinity {
    key: Option<u64>,
    pinned: Option<usize>,
}

/// How one attempt at a backend ended, as reported to [`Balancer::observe`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    /// The backend answered with `status`, `elapsed` after the attempt started.
    Answered {
        status: StatusCode,
        elapsed: Duration,
    },
    /// The attempt failed.
    Failed(Failure),
}

/// All backends plus the algorithm's state.
#[derive(Debug)]
pub(crate) struct Balancer {
    backends: Vec<BackendState>,
    selector: Selector,
    sticky: Option<Sticky>,
    hash_header: Option<HeaderName>,
    queue_max: usize,
    queue_timeout: Duration,
    slow_start_ms: u64,
    ejection: Policy,
    epoch: Instant,
    /// Whether this generation's health verdicts still reach `rampart_backend_up`; false
    /// once a reload has retired it ([`Balancer::retire`]). A mutex rather than an atomic
    /// flag: a verdict being published while the reload retires the generation is written
    /// before the reload writes the new generation's verdicts, never after them.
    publishing: std::sync::Mutex<bool>,
}

impl Balancer {
    /// Every backend starts down; `gauge(name)` gives its `rampart_backend_up` series.
    /// `max_connections` requests in flight per backend (at least 1); `queue_max` waiting
    /// per backend for at most `queue_timeout`; `balancing` the algorithm, stickiness,
    /// slow start and ejection settings; `families` the per-backend series.
    pub(crate) fn new(
        backends: &[Backend],
        gauge: impl Fn(&str) -> Gauge,
        families: &Families,
        max_connections: usize,
        queue_max: usize,
        queue_timeout: Duration,
        balancing: &Balancing,
    ) -> Balancer {
        let max = max_connections.max(1);
        let named: Vec<(&str, u32)> = backends
            .iter()
            .map(|b| (b.name.as_str(), b.weight.max(1)))
            .collect();
        let names: Vec<&str> = named.iter().map(|(n, _)| *n).collect();
        Balancer {
            backends: backends
                .iter()
                .map(|b| {
                    // Not reset here: a reload's new generation shares the series with
                    // the live one, which keeps reporting until the swap (see `reload`).
                    // A series starts at 0 when first created.
                    let g = gauge(&b.name);
                    BackendState {
                        name: Arc::from(b.name.as_str()),
                        addr: b.addr,
                        weight: b.weight.max(1),
                        backup: b.backup,
                        up: AtomicBool::new(false),
                        ever_up: AtomicBool::new(false),
                        draining: AtomicBool::new(false),
                        ramp_from_ms: AtomicU64::new(0),
                        outlier: Outlier::counting(families.ejections(&b.name)),
                        metrics: families.backend(&b.name),
                        gauge: g,
                        slots: Arc::new(Semaphore::new(max)),
                        max,
                        waiting: AtomicUsize::new(0),
                    }
                })
                .collect(),
            selector: Selector::new(balancing.algorithm, &named),
            sticky: balancing
                .sticky_cookie
                .as_deref()
                .map(|c| Sticky::new(c, &names)),
            hash_header: balancing
                .hash_header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            queue_max,
            queue_timeout,
            slow_start_ms: balancing.slow_start_ms,
            ejection: Policy::from_config(balancing),
            epoch: Instant::now(),
            publishing: std::sync::Mutex::new(true),
        }
    }

    /// The same balancer counting time from `epoch` instead of its creation: a reload's
    /// new generation shares the live one's, so ejection times carry over unchanged
    /// ([`Balancer::carry_over_from`]).
    pub(crate) fn sharing_epoch(mut self, epoch: Instant) -> Balancer {
        self.epoch = epoch;
        self
    }

    /// When this balancer's millisecond timestamps start.
    pub(crate) fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Takes over what a reload must not reset from `old`, the generation being replaced,
    /// for every backend this generation keeps:
    /// - its drain flag (`rampart lb drain`), by name;
    /// - by name and address, and only when `old` shares this balancer's epoch: its passive
    ///   health ([`Outlier`]: a reload must not end an ejection early) and its slow-start
    ///   ramp (a backend that came back up shortly before the reload keeps ramping instead
    ///   of getting its full weight at once; one that was ever up ramps when it next comes
    ///   back).
    pub(crate) fn carry_over_from(&self, old: &Balancer) {
        let same_clock = old.epoch == self.epoch;
        for b in &self.backends {
            let Some(o) = old.backends.iter().find(|o| o.name == b.name) else {
                continue;
            };
            if o.is_draining() {
                b.draining.store(true, Ordering::Release);
            }
            if !same_clock || o.addr != b.addr {
                continue;
            }
            b.outlier.adopt(&o.outlier);
            if o.ever_up.load(Ordering::Acquire) {
                b.ever_up.store(true, Ordering::Release);
            }
            let ramp = o.ramp_from_ms.load(Ordering::Relaxed);
            if ramp != 0 {
                b.ramp_from_ms.fetch_max(ramp, Ordering::Relaxed);
            }
        }
    }

    /// Stops this generation's health verdicts from reaching `rampart_backend_up` (a
    /// reload swapped in a new one, which shares the series). A health check of this
    /// generation that ends after the swap still updates its own backends' state, which
    /// nothing routes by any more, but cannot overwrite the new generation's verdict.
    pub(crate) fn retire(&self) {
        *self
            .publishing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
    }

    /// Milliseconds since the balancer started, at least 1 (0 means "never" in the
    /// backends' timestamps).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }

    /// The algorithm in use.
    pub(crate) fn algorithm(&self) -> Algorithm {
        self.selector.algorithm()
    }

    /// What steers a request from `client` with `headers`: the hash of `hash_header` (or
    /// of the client address) for consistent hashing, the backend of its sticky cookie.
    pub(crate) fn affinity(&self, headers: &HeaderMap, client: IpAddr) -> Affinity {
        let key = (self.selector.algorithm() == Algorithm::ConsistentHash).then(|| {
            match self.hash_header.as_ref().and_then(|h| headers.get(h)) {
                Some(v) => crate::selection::hash(v.as_bytes()),
                None => match client {
                    IpAddr::V4(a) => crate::selection::hash(&a.octets()),
                    IpAddr::V6(a) => crate::selection::hash(&a.octets()),
                },
            }
        });
        let pinned = self.sticky.as_ref().and_then(|s| s.pinned(headers));
        Affinity { key, pinned }
    }

    /// The `Set-Cookie` value for a response from backend `index`, when stickiness is on
    /// and the request was not already pinned there.
    pub(crate) fn sticky_cookie(&self, affinity: &Affinity, index: usize) -> Option<HeaderValue> {
        let sticky = self.sticky.as_ref()?;
        if affinity.pinned == Some(index) {
            return None;
        }
        sticky.set_cookie(index)
    }

    /// The backends a request may go to now, skipping `tried`: the available primaries,
    /// or the available backups when no primary is.
    fn candidates(&self, now_ms: u64, tried: &[Arc<str>]) -> Vec<Candidate> {
        let pick = |backup: bool| -> Vec<Candidate> {
            self.backends
                .iter()
                .enumerate()
                .filter(|(_, b)| b.backup == backup && b.available(now_ms))
                .filter(|(_, b)| !tried.contains(&b.name))
                .map(|(index, b)| Candidate {
                    index,
                    weight: b.effective_weight(now_ms, self.slow_start_ms),
                    load: (b.active() + b.queued()) as u64,
                })
                .collect()
        };
        let primaries = pick(false);
        if primaries.is_empty() {
            pick(true)
        } else {
            primaries
        }
    }

    /// A slot on an available backend not in `tried` (see the module documentation for
    /// the order).
    pub(crate) async fn acquire(
        &self,
        tried: &[Arc<str>],
        affinity: &Affinity,
    ) -> Result<Slot<'_>, QueueError> {
        let cands = self.candidates(self.now_ms(), tried);
        let pinned = affinity
            .pinned
            .filter(|i| cands.iter().any(|c| c.index == *i));
        let (chosen, keep) = match pinned {
            Some(i) => (i, true),
            None => (
                self.selector
                    .pick(&cands, affinity.key)
                    .ok_or(QueueError::NoBackend)?,
                self.selector.keeps_affinity(),
            ),
        };
        let slot = |index: usize, permit, queued| Slot {
            backend: &self.backends[index],
            index,
            permit,
            queued,
        };
        let b = &self.backends[chosen];
        if let Ok(permit) = b.slots.clone().try_acquire_owned() {
            return Ok(slot(chosen, permit, Duration::ZERO));
        }
        let mut wait_at = chosen;
        if !keep {
            for c in &cands {
                if let Ok(permit) = self.backends[c.index].slots.clone().try_acquire_owned() {
                    return Ok(slot(c.index, permit, Duration::ZERO));
                }
            }
            wait_at = cands
                .iter()
                .min_by_key(|c| self.backends[c.index].queued())
                .map_or(chosen, |c| c.index);
        }
        let b = &self.backends[wait_at];
        if b.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_max {
            b.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(QueueError::Full);
        }
        let waiting = Instant::now();
        let got = tokio::time::timeout(self.queue_timeout, b.slots.clone().acquire_owned()).await;
        b.waiting.fetch_sub(1, Ordering::AcqRel);
        match got {
            Ok(Ok(permit)) => Ok(slot(wait_at, permit, waiting.elapsed())),
            _ => Err(QueueError::Timeout),
        }
    }

    /// Records how an attempt at `backend` ended: passive health (a connect failure, a
    /// reset or a 5xx counts as a failure; enough in a row eject it).
    pub(crate) fn observe(&self, backend: &BackendState, outcome: Outcome) {
        let failed = match outcome {
            Outcome::Answered { status, elapsed } => {
                backend.metrics.answered(status, elapsed.as_secs_f64());
                status.is_server_error()
            }
            Outcome::Failed(failure) => {
                backend.metrics.failed(failure);
                true
            }
        };
        if !failed {
            backend.outlier.success();
            return;
        }
        let now = self.now_ms();
        let ejected = self
            .backends
            .iter()
            .filter(|b| b.outlier.is_ejected(now))
            .count();
        let room = ejected < self.ejection.max_ejected(self.backends.len());
        if let Some(ms) = backend.outlier.failure(&self.ejection, now, room) {
            tracing::warn!(
                backend = %backend.name,
                ejected_for_ms = ms,
                after = self.ejection.consecutive,
                "backend ejected after consecutive failures"
            );
        }
    }

    pub(crate) fn backends(&self) -> &[BackendState] {
        &self.backends
    }

    /// Publishes the active health checks' verdict on backend `index`. A backend coming
    /// back up after having been up before ramps up (slow start) and its ejection, if any,
    /// ends.
    pub(crate) fn set_up(&self, index: usize, up: bool) {
        if let Some(b) = self.backends.get(index) {
            let was = b.up.swap(up, Ordering::AcqRel);
            if up && !was {
                let now = self.now_ms();
                if b.ever_up.swap(true, Ordering::AcqRel) {
                    b.ramp_from_ms.store(now, Ordering::Relaxed);
                }
                b.outlier.clear(now);
            }
            let publishing = self
                .publishing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *publishing {
                b.gauge.set(i64::from(up));
            }
        }
    }

    /// Sets backend `name` draining (no new requests; those in flight finish) or back in
    /// rotation. False when no backend has that name.
    pub(crate) fn set_draining(&self, name: &str, draining: bool) -> bool {
        match self.backends.iter().find(|b| &*b.name == name) {
            Some(b) => {
                b.draining.store(draining, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Whether backend `index` is ejected now.
    pub(crate) fn is_ejected(&self, index: usize) -> bool {
        let now = self.now_ms();
        self.backends
            .get(index)
            .is_some_and(|b| b.outlier.is_ejected(now))
    }

    /// Whether backend `index` is available now (up, not ejected, not draining).
    pub(crate) fn is_available(&self, index: usize) -> bool {
        let now = self.now_ms();
        self.backends.get(index).is_some_and(|b| b.available(now))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;

    #[tokio::test]
    async fn slots_then_a_bounded_queue_then_503() {
        let b = balancer(1);
        b.set_up(0, true);
        let none = Affinity::default();
        let s1 = b.acquire(&[], &none).await.unwrap();
        let _s2 = b.acquire(&[], &none).await.unwrap();
        assert_eq!(b.backends()[0].active(), 2);
        // Both slots taken: the next request waits (queue of 1) and times out.
        assert_eq!(
            b.acquire(&[], &none).await.unwrap_err(),
            QueueError::Timeout
        );
        // A waiting request gets the slot given back.
        let waiter = b.acquire(&[], &none);
        tokio::pin!(waiter);
        assert!(futures_poll_once(waiter.as_mut()).await.is_none());
        // While one waits, the queue is full.
        assert_eq!(b.acquire(&[], &none).await.unwrap_err(), QueueError::Full);
        drop(s1);
        assert!(waiter.await.is_ok());
        let name = b.backends()[0].name.clone();
        assert_eq!(
            b.acquire(&[name], &none).await.unwrap_err(),
            QueueError::NoBackend
        );
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

    fn backends(specs: &[(u32, bool)]) -> Vec<Backend> {
        specs
            .iter()
            .enumerate()
            .map(|(i, (weight, backup))| Backend {
                server_name: None,
                name: format!("web-{i:02}"),
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                weight: *weight,
                backup: *backup,
            })
            .collect()
    }

    fn with(specs: &[(u32, bool)], balancing: Balancing) -> Balancer {
        reporting_to(|_| Gauge::default(), specs, balancing)
    }

    /// [`with`], each backend's `rampart_backend_up` series given by `gauge(name)`.
    fn reporting_to(
        gauge: impl Fn(&str) -> Gauge,
        specs: &[(u32, bool)],
        balancing: Balancing,
    ) -> Balancer {
        Balancer::new(
            &backends(specs),
            gauge,
            &Families::unregistered(),
            2,
            1,
            Duration::from_millis(50),
            &balancing,
        )
    }

    fn balancer(n: usize) -> Balancer {
        with(&vec![(1, false); n], Balancing::default())
    }

    #[test]
    fn a_retired_generation_no_longer_writes_the_shared_up_series() {
        let series = Gauge::default();
        let old = reporting_to(|_| series.clone(), &[(1, false)], Balancing::default());
        old.set_up(0, true);
        assert_eq!(series.get(), 1);
        // A reload swapped in a new generation, which set the series from its verdict.
        old.retire();
        series.set(1);
        // A health check of the old generation that ends now (its probe was in flight at
        // the swap) changes the old state only.
        old.set_up(0, false);
        assert!(!old.backends()[0].is_up());
        assert_eq!(series.get(), 1);
    }

    /// The backend a request with `affinity` gets (its slot given back at once).
    async fn pick(b: &Balancer, affinity: &Affinity) -> Option<String> {
        b.acquire(&[], affinity)
            .await
            .ok()
            .map(|s| s.backend.name.to_string())
    }

    async fn picks(b: &Balancer, n: usize) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for _ in 0..n {
            *seen
                .entry(pick(b, &Affinity::default()).await.unwrap())
                .or_default() += 1;
        }
        seen
    }

    #[tokio::test]
    async fn starts_with_every_backend_down() {
        let b = balancer(2);
        assert_eq!(pick(&b, &Affinity::default()).await, None);
    }

    #[tokio::test]
    async fn round_robin_skips_down_backends() {
        let b = balancer(3);
        b.set_up(0, true);
        b.set_up(2, true);
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(pick(&b, &Affinity::default()).await.unwrap());
        }
        assert_eq!(got, ["web-00", "web-02", "web-00", "web-02"]);
    }

    #[tokio::test]
    async fn weights_and_backups() {
        let b = with(&[(3, false), (1, false), (5, true)], Balancing::default());
        for i in 0..3 {
            b.set_up(i, true);
        }
        // The backup gets nothing while a primary is available.
        let seen = picks(&b, 400).await;
        assert_eq!(seen["web-00"], 300);
        assert_eq!(seen["web-01"], 100);
        assert!(!seen.contains_key("web-02"));
        // Both primaries down: the backup takes everything, and gives it back.
        b.set_up(0, false);
        b.set_up(1, false);
        assert_eq!(picks(&b, 10).await["web-02"], 10);
        b.set_up(1, true);
        assert_eq!(picks(&b, 10).await["web-01"], 10);
    }

    #[tokio::test]
    async fn draining_takes_a_backend_out_until_enabled() {
        let b = balancer(2);
        b.set_up(0, true);
        b.set_up(1, true);
        assert!(b.set_draining("web-00", true));
        assert!(!b.set_draining("web-99", true));
        assert_eq!(picks(&b, 10).await["web-01"], 10);
        assert!(!b.is_available(0));
        b.set_draining("web-00", false);
        assert_eq!(picks(&b, 10).await.len(), 2);
    }

    #[tokio::test]
    async fn sticky_cookie_pins_and_re_pins_when_its_backend_goes_down() {
        let cfg = Balancing {
            sticky_cookie: Some("lb".into()),
            ..Balancing::default()
        };
        let b = with(&[(1, false); 3], cfg);
        for i in 0..3 {
            b.set_up(i, true);
        }
        let client: IpAddr = [192, 0, 2, 1].into();
        let first = b.acquire(&[], &Affinity::default()).await.unwrap();
        let (index, name) = (first.index, first.backend.name.clone());
        drop(first);
        let cookie = b.sticky_cookie(&Affinity::default(), index).unwrap();
        let mut h = HeaderMap::new();
        let pair = cookie
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        h.insert(http::header::COOKIE, HeaderValue::from_str(&pair).unwrap());
        let aff = b.affinity(&h, client);
        for _ in 0..10 {
            assert_eq!(pick(&b, &aff).await.as_deref(), Some(&*name));
        }
        // Already pinned there: no new cookie.
        assert_eq!(b.sticky_cookie(&aff, index), None);
        b.set_up(index, false);
        let moved = b.acquire(&[], &aff).await.unwrap();
        assert_ne!(moved.index, index);
        assert!(b.sticky_cookie(&aff, moved.index).is_some());
    }

    #[tokio::test]
    async fn consistent_hash_keeps_keys_and_moves_only_a_down_backends_keys() {
        let cfg = Balancing {
            algorithm: Algorithm::ConsistentHash,
            hash_header: Some("x-user".into()),
            ..Balancing::default()
        };
        let b = with(&[(1, false); 4], cfg);
        for i in 0..4 {
            b.set_up(i, true);
        }
        let client: IpAddr = [192, 0, 2, 1].into();
        let aff = |user: usize| {
            let mut h = HeaderMap::new();
            h.insert(
                "x-user",
                HeaderValue::from_str(&format!("user-{user}")).unwrap(),
            );
            b.affinity(&h, client)
        };
        let mut before = Vec::new();
        for u in 0..400 {
            before.push(pick(&b, &aff(u)).await.unwrap());
        }
        for (u, home) in before.iter().enumerate() {
            assert_eq!(&pick(&b, &aff(u)).await.unwrap(), home);
        }
        let mut per: HashMap<&str, usize> = HashMap::new();
        for n in &before {
            *per.entry(n).or_default() += 1;
        }
        println!("keys per backend: {per:?}");
        assert_eq!(per.len(), 4);
        assert!(per.values().all(|n| (50..=150).contains(n)), "{per:?}");
        b.set_up(2, false);
        for (u, home) in before.iter().enumerate() {
            let now = pick(&b, &aff(u)).await.unwrap();
            if home == "web-02" {
                assert_ne!(now, "web-02");
            } else {
                assert_eq!(&now, home, "user-{u} moved off a healthy backend");
            }
        }
    }

    #[tokio::test]
    async fn an_ejected_backend_is_skipped_and_returns_with_slow_start() {
        let cfg = Balancing {
            eject_consecutive_failures: 2,
            ejection_base_ms: 60_000,
            slow_start_ms: 60_000,
            ..Balancing::default()
        };
        let b = with(&[(1, false); 2], cfg);
        b.set_up(0, true);
        b.set_up(1, true);
        let fail = Outcome::Failed(Failure::Connect);
        let ok = Outcome::Answered {
            status: StatusCode::OK,
            elapsed: Duration::ZERO,
        };
        let bad = Outcome::Answered {
            status: StatusCode::BAD_GATEWAY,
            elapsed: Duration::ZERO,
        };
        let web0 = &b.backends()[0];
        b.observe(web0, fail);
        b.observe(web0, ok);
        b.observe(web0, bad);
        assert!(b.is_available(0), "a success resets the count");
        b.observe(web0, bad);
        assert!(!b.is_available(0));
        assert_eq!(web0.outlier.ejections(), 1);
        assert_eq!(picks(&b, 10).await["web-01"], 10);
        // At most 50 % ejected: web-01 stays in however it fails.
        for _ in 0..5 {
            b.observe(&b.backends()[1], fail);
        }
        assert!(b.is_available(1));
        // Health checks see web-00 come back: ejection over, weight ramps from 1/10.
        b.set_up(0, false);
        b.set_up(0, true);
        assert!(b.is_available(0));
        let w = web0.effective_weight(b.now_ms(), 60_000);
        assert!((100..300).contains(&w), "{w}");
        let seen = picks(&b, 110).await;
        println!("during slow start: {seen:?}");
        assert!(seen["web-00"] <= 30, "{seen:?}");
    }

    #[tokio::test]
    async fn a_reload_keeps_a_backends_slow_start_ramp() {
        let cfg = Balancing {
            slow_start_ms: 60_000,
            ..Balancing::default()
        };
        let old = with(&[(1, false); 2], cfg.clone());
        old.set_up(0, true);
        old.set_up(1, true);
        // web-00 went down and came back: it ramps from a tenth of its weight.
        old.set_up(0, false);
        old.set_up(0, true);
        let full = old.backends()[1].effective_weight(old.now_ms(), 60_000);
        let ramping = old.backends()[0].effective_weight(old.now_ms(), 60_000);
        assert!(ramping < full / 2, "{ramping} of {full}");
        // The reload's generation sees both up on its first checks (no ramp of its own).
        let new = with(&[(1, false); 2], cfg).sharing_epoch(old.epoch());
        new.set_up(0, true);
        new.set_up(1, true);
        let before = new.backends()[0].effective_weight(new.now_ms(), 60_000);
        assert_eq!(before, full, "a first rise has no ramp");
        new.carry_over_from(&old);
        let after = new.backends()[0].effective_weight(new.now_ms(), 60_000);
        assert!(after < full / 2, "the ramp carried over: {after} of {full}");
        assert_eq!(
            new.backends()[1].effective_weight(new.now_ms(), 60_000),
            full
        );
        // web-01 was up before the reload: its next return ramps in the new generation too.
        new.set_up(1, false);
        new.set_up(1, true);
        let back = new.backends()[1].effective_weight(new.now_ms(), 60_000);
        assert!(back < full / 2, "{back} of {full}");
    }
}
