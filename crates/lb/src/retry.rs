//! When a failed upstream attempt is tried again on another backend, and how many retries
//! the load balancer may add.
//!
//! - A connect failure (TCP or TLS) is retried for every method: nothing of the request
//!   was sent.
//! - A reset or close before the response was complete (nothing has reached the client
//!   yet: responses are buffered) is retried only for idempotent methods — GET, HEAD,
//!   OPTIONS, TRACE, PUT, DELETE (RFC 9110 §9.2.2). The request body is held in memory in
//!   full, so it can be sent again. POST, PATCH and other methods are never sent twice.
//! - Anything else (an unparsable answer, a timeout after the request was sent) is not
//!   retried.
//!
//! Each attempt goes to a backend not tried yet for that request. Every retry draws on a
//! [`RetryBudget`] (linkerd2's and Envoy's retry budgets): retries over the last
//! [`WINDOW_SECONDS`] may be at most `retry_budget_percent` of the requests plus
//! `retry_min_per_second` per second, so an outage of every backend does not multiply the
//! load on them.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use http::Method;

/// Whether `method` is idempotent (RFC 9110 §9.2.2): repeating it has the same intended
/// effect as sending it once.
pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How an upstream attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No connection: nothing was sent.
    Connect,
    /// The connection closed or was reset before the response was complete.
    Reset,
    /// Any other error (a malformed answer, an HTTP protocol error).
    Other,
}

impl Failure {
    /// Classifies an error from an error's source chain: a `hyper::Error` for an
    /// incomplete message or a closed channel, or an I/O reset/abort/EOF, is a reset.
    pub(crate) fn of_chain(e: &(dyn std::error::Error + 'static)) -> Failure {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(h) = err.downcast_ref::<hyper::Error>() {
                if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                    return Failure::Reset;
                }
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::*;
                if matches!(
                    io.kind(),
                    ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
                ) {
                    return Failure::Reset;
                }
                // A wrapped error (`io::Error::other(e)`) hides `e` from `source()`.
                if let Some(inner) = io.get_ref() {
                    if Failure::of_chain(inner) == Failure::Reset {
                        return Failure::Reset;
                    }
                }
            }
            cur = err.source();
        }
        Failure::Other
    }

    /// Whether a request with `method` that failed this way may be sent to another
    /// backend (before the budget is asked).
    #[cfg(test)]
    pub(crate) fn retryable(self, method: &Method) -> bool {
        match self {
            Failure::Connect => true,
            Failure::Reset => idempotent(method),
            Failure::Other => false,
        }
    }
}

/// Length of the budget's sliding window.
pub(crate) const WINDOW_SECONDS: u64 = 10;

/// One second of the window.
#[derive(Debug, Default)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

/// Requests and retries of the last [`WINDOW_SECONDS`] seconds, in per-second buckets of
/// atomics (no lock on the request path; counts are approximate under races at a second
/// boundary, never unbounded).
#[derive(Debug)]
pub(crate) struct RetryBudget {
    epoch: Instant,
    percent: u32,
    min_per_second: u32,
    buckets: [Bucket; WINDOW_SECONDS as usize],
}

impl RetryBudget {
    /// A budget of `percent` % of requests plus `min_per_second` retries a second.
    pub(crate) fn new(percent: u32, min_per_second: u32) -> RetryBudget {
        RetryBudget {
            epoch: Instant::now(),
            percent,
            min_per_second,
            buckets: Default::default(),
        }
    }

    fn now(&self) -> u64 {
        // +1: second 0 is the "empty bucket" marker.
        self.epoch.elapsed().as_secs() + 1
    }

    fn bucket(&self, second: u64) -> &Bucket {
        let b = &self.buckets[(second % WINDOW_SECONDS) as usize];
        let seen = b.second.load(Ordering::Acquire);
        if seen != second
            && b.second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.requests.store(0, Ordering::Release);
            b.retries.store(0, Ordering::Release);
        }
        b
    }

    /// Counts one request (its first attempt).
    pub(crate) fn deposit(&self) {
        self.deposit_at(self.now());
    }

    fn deposit_at(&self, second: u64) {
        self.bucket(second).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Asks for one retry: true (and counted) when the window's retries stay within the
    /// budget.
    pub(crate) fn withdraw(&self) -> bool {
        self.withdraw_at(self.now())
    }

    fn withdraw_at(&self, second: u64) -> bool {
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let s = b.second.load(Ordering::Acquire);
            if s != 0 && s + WINDOW_SECONDS > second && s <= second {
                requests += u64::from(b.requests.load(Ordering::Relaxed));
                retries += u64::from(b.retries.load(Ordering::Relaxed));
            }
        }
        let allowed = u64::from(self.min_per_second) * WINDOW_SECONDS
            + requests * u64::from(self.percent) / 100;
        if retries < allowed {
            self.bucket(second).retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_follow_rfc_9110() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(idempotent(&m.parse().unwrap_or(Method::POST)), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!idempotent(&m), "{m}");
        }
        assert!(Failure::Connect.retryable(&Method::POST));
        assert!(!Failure::Reset.retryable(&Method::POST));
        assert!(Failure::Reset.retryable(&Method::PUT));
        assert!(!Failure::Other.retryable(&Method::GET));
    }

    #[test]
    fn io_resets_anywhere_in_the_chain_are_resets() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(Failure::of_chain(&reset), Failure::Reset);
        let other = std::io::Error::other("bad");
        assert_eq!(Failure::of_chain(&other), Failure::Other);
        let wrapped =
            std::io::Error::other(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert_eq!(Failure::of_chain(&wrapped), Failure::Reset);
    }

    #[test]
    fn budget_is_a_share_of_requests_plus_a_floor() {
        // 20 % of requests + 1 a second (10 in the window).
        let b = RetryBudget::new(20, 1);
        for _ in 0..100 {
            b.deposit_at(5);
        }
        let granted = (0..100).filter(|_| b.withdraw_at(5)).count();
        assert_eq!(granted, 10 + 20);
        // The window slides: ten seconds later the old requests and retries are gone.
        let granted = (0..100).filter(|_| b.withdraw_at(15)).count();
        assert_eq!(granted, 10);
    }
}
