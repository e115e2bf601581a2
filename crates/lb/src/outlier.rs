//! Passive outlier ejection (Envoy's outlier detection, `consecutive_5xx` +
//! `consecutive_gateway_failure`): every forwarded request reports whether its backend
//! failed it (connect error, reset, 5xx answer); after `eject_consecutive_failures` failures
//! in a row the backend is ejected — skipped by the balancer — for `ejection_base_ms ×
//! 2^(n-1)` (n = its ejections in a row, capped at `ejection_max_ms`). A backend that went
//! `ejection_max_ms` since its last ejection starts again from the base time. At most
//! `max_ejected_percent` of the backends are ejected at once (always at least one may be).
//! When its time is over the backend returns with slow start (see [`crate::balancer`]).
//!
//! Times are milliseconds since the balancer's epoch, so the state is a few atomics read
//! lock-free on every request; the rare ejection itself takes a lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use topology::Balancing;

/// The ejection settings of a balancer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Consecutive failures that eject; 0 = never.
    pub(crate) consecutive: u32,
    pub(crate) base_ms: u64,
    pub(crate) max_ms: u64,
    pub(crate) max_percent: u32,
}

impl Policy {
    pub(crate) fn from_config(b: &Balancing) -> Policy {
        Policy {
            consecutive: b.eject_consecutive_failures,
            base_ms: b.ejection_base_ms,
            max_ms: b.ejection_max_ms,
            max_percent: b.max_ejected_percent,
        }
    }

    /// How many of `n` backends may be ejected at once (at least one).
    pub(crate) fn max_ejected(&self, n: usize) -> usize {
        (n * self.max_percent as usize / 100).max(1)
    }

    /// Length of ejection number `n` (1 = first) in a row.
    pub(crate) fn duration_ms(&self, n: u32) -> u64 {
        let factor = 1u64 << n.saturating_sub(1).min(32);
        self.base_ms.saturating_mul(factor).min(self.max_ms)
    }
}

/// One backend's passive health.
#[derive(Debug, Default)]
pub(crate) struct Outlier {
    /// Failures in a row since the last success.
    failures: AtomicU32,
    /// Ejected until this time (ms since epoch); 0 = not ejected.
    until_ms: AtomicU64,
    /// Ejections so far: the backend's `rampart_lb_backend_ejections_total` series, shared
    /// by every generation that has this backend, so a reload does not restart it.
    total: Counter,
    /// (ejections in a row, end of the last one): written under the lock only.
    streak: Mutex<(u32, u64)>,
}

impl Outlier {
    /// A backend's passive health counting its ejections in `total`.
    pub(crate) fn counting(total: Counter) -> Outlier {
        Outlier {
            failures: AtomicU32::new(0),
            until_ms: AtomicU64::new(0),
            total,
            streak: Mutex::new((0, 0)),
        }
    }

    /// Whether the backend is ejected at `now_ms`.
    pub(crate) fn is_ejected(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms.load(Ordering::Acquire)
    }

    /// End of the current or last ejection (ms since epoch; 0 = never ejected).
    pub(crate) fn ejected_until(&self) -> u64 {
        self.until_ms.load(Ordering::Acquire)
    }

    /// Ejections since the process started (of every generation with this backend).
    #[cfg(test)]
    pub(crate) fn ejections(&self) -> u64 {
        self.total.get()
    }

    /// A request the backend answered without failing: the failure count restarts.
    pub(crate) fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A failed request at `now_ms`. Returns the ejection length when this failure ejects
    /// the backend; `may_eject` says whether the cap on ejected backends leaves room.
    pub(crate) fn failure(&self, policy: &Policy, now_ms: u64, may_eject: bool) -> Option<u64> {
        if policy.consecutive == 0 || self.is_ejected(now_ms) {
            return None;
        }
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n < policy.consecutive || !may_eject {
            return None;
        }
        let mut streak = self.streak.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_ejected(now_ms) {
            return None;
        }
        let (in_a_row, last_end) = *streak;
        let in_a_row = if last_end != 0 && now_ms.saturating_sub(last_end) >= policy.max_ms {
            1
        } else {
            in_a_row + 1
        };
        let length = policy.duration_ms(in_a_row);
        let until = now_ms.saturating_add(length).max(1);
        *streak = (in_a_row, until);
        self.failures.store(0, Ordering::Release);
        self.until_ms.store(until, Ordering::Release);
        self.total.inc();
        Some(length)
    }

    /// Takes over `old`'s state — failures in a row, the ejection in force, the streak that
    /// sets the next ejection's length — when a reload keeps the backend, so a reload
    /// neither frees an ejected backend early nor forgets its record. Both must count time
    /// from the same epoch ([`crate::balancer::Balancer::sharing_epoch`]).
    pub(crate) fn adopt(&self, old: &Outlier) {
        let streak = *old.streak.lock().unwrap_or_else(|p| p.into_inner());
        *self.streak.lock().unwrap_or_else(|p| p.into_inner()) = streak;
        self.failures
            .store(old.failures.load(Ordering::Acquire), Ordering::Release);
        self.until_ms
            .store(old.until_ms.load(Ordering::Acquire), Ordering::Release);
    }

    /// Ends an ejection early (an active health check saw the backend come back up).
    pub(crate) fn clear(&self, now_ms: u64) {
        if self.is_ejected(now_ms) {
            self.until_ms.store(now_ms.max(1), Ordering::Release);
        }
        self.failures.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy() -> Policy {
        Policy {
            consecutive: 3,
            base_ms: 1_000,
            max_ms: 5_000,
            max_percent: 50,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let (p, o) = (policy(), Outlier::default());
        assert_eq!(o.failure(&p, 10, true), None);
        assert_eq!(o.failure(&p, 10, true), None);
        o.success();
        assert_eq!(o.failure(&p, 10, true), None);
        assert_eq!(o.failure(&p, 10, true), None);
        assert!(!o.is_ejected(10));
        assert_eq!(o.failure(&p, 10, true), Some(1_000));
        assert!(o.is_ejected(10));
        assert!(o.is_ejected(1_009));
        assert!(!o.is_ejected(1_010));
        assert_eq!(o.ejections(), 1);
    }

    #[test]
    fn ejection_time_doubles_up_to_the_max_then_resets_after_a_quiet_spell() {
        let (p, o) = (policy(), Outlier::default());
        let mut now = 0;
        let mut lengths = Vec::new();
        for _ in 0..5 {
            let mut got = None;
            for _ in 0..3 {
                got = o.failure(&p, now, true);
            }
            let length = got.unwrap();
            lengths.push(length);
            now += length; // returns, fails again at once
        }
        assert_eq!(lengths, [1_000, 2_000, 4_000, 5_000, 5_000]);
        // Quiet for max_ms after the last ejection ended: back to the base time.
        now += 5_000;
        for _ in 0..2 {
            assert_eq!(o.failure(&p, now, true), None);
        }
        assert_eq!(o.failure(&p, now, true), Some(1_000));
    }

    #[test]
    fn the_cap_and_the_off_switch_prevent_ejection() {
        let o = Outlier::default();
        for _ in 0..10 {
            assert_eq!(o.failure(&policy(), 0, false), None);
        }
        let off = Policy {
            consecutive: 0,
            ..policy()
        };
        for _ in 0..10 {
            assert_eq!(o.failure(&off, 0, true), None);
        }
        assert!(!o.is_ejected(0));
        assert_eq!(policy().max_ejected(2), 1);
        assert_eq!(policy().max_ejected(1), 1);
        assert_eq!(policy().max_ejected(10), 5);
    }

    #[test]
    fn adopting_keeps_the_ejection_and_the_streak() {
        let (p, old, new) = (policy(), Outlier::default(), Outlier::default());
        for _ in 0..3 {
            old.failure(&p, 0, true);
        }
        old.failure(&p, 500, true); // one failure towards the next, ignored while ejected
        new.adopt(&old);
        assert!(new.is_ejected(999));
        assert!(!new.is_ejected(1_000));
        // The next ejection is the second in a row: twice the base time.
        let mut got = None;
        for _ in 0..3 {
            got = new.failure(&p, 1_000, true);
        }
        assert_eq!(got, Some(2_000));
    }

    #[test]
    fn clear_ends_an_ejection() {
        let (p, o) = (policy(), Outlier::default());
        for _ in 0..3 {
            o.failure(&p, 0, true);
        }
        assert!(o.is_ejected(5));
        o.clear(5);
        assert!(!o.is_ejected(5));
    }
}
