//! The per-source request rate limit: a token bucket per client address (refilled at
//! `rate` requests a second up to `burst`), checked before anything else is read of a
//! request; over the limit the load balancer answers `429 Too Many Requests` with
//! `Retry-After` (RFC 6585 §4) and the request never reaches a backend.
//!
//! Memory is bounded: at most [`MAX_SOURCES`] addresses are tracked; when the table is full
//! the buckets that have refilled (sources idle long enough to be back at `burst`) are
//! dropped, and if none has, the new source is admitted untracked rather than evicting an
//! active one (an address flood cannot reset the limits of the sources it competes with).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// The most source addresses tracked at once.
pub const MAX_SOURCES: usize = 100_000;

/// Shards of the table (independent locks).
const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by source address.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<IpAddr, Bucket>>>,
}

impl RateLimit {
    /// `rate` requests a second per source, bursts of up to `burst` (at least 1).
    pub fn new(rate: f64, burst: f64) -> RateLimit {
        RateLimit {
            rate,
            burst: burst.max(1.0),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Whether a request from `src` at `now` is within the limit (and takes a token).
    pub fn admit(&self, src: IpAddr, now: Instant) -> bool {
        let shard = &self.shards[shard_of(src)];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&src) && map.len() >= MAX_SOURCES / SHARDS {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, b| refill(b.tokens, b.at, now, rate, burst) < burst);
            if map.len() >= MAX_SOURCES / SHARDS {
                return true;
            }
        }
        let b = map.entry(src).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens = refill(b.tokens, b.at, now, self.rate, self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether this table limits to `rate` a second with bursts of `burst` (as
    /// [`RateLimit::new`] would), so a reload with the same limits can keep its buckets.
    pub fn has_limits(&self, rate: f64, burst: f64) -> bool {
        self.rate == rate && self.burst == burst.max(1.0)
    }

    /// Source addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

fn refill(tokens: f64, at: Instant, now: Instant, rate: f64, burst: f64) -> f64 {
    let dt = now.saturating_duration_since(at).as_secs_f64();
    (tokens + dt * rate).min(burst)
}

fn shard_of(src: IpAddr) -> usize {
    let bytes: Vec<u8> = match src {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % SHARDS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = RateLimit::new(10.0, 5.0);
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let admitted = (0..8).filter(|_| l.admit(a, t0)).count();
        assert_eq!(admitted, 5, "the burst");
        // another source has its own bucket
        assert!(l.admit(ip("192.0.2.2"), t0));
        // 0.25 s later: 2.5 tokens refilled, two requests pass
        let t1 = t0 + Duration::from_millis(250);
        let admitted = (0..4).filter(|_| l.admit(a, t1)).count();
        assert_eq!(admitted, 2);
        // a long pause refills only up to the burst
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| l.admit(a, t2)).count(), 5);
    }

    #[test]
    fn the_table_is_bounded_and_idle_sources_make_room() {
        let l = RateLimit::new(1.0, 2.0);
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 5_000) {
            let src = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(l.admit(src, t0), "a new source within its burst");
        }
        assert!(l.tracked() <= MAX_SOURCES, "{}", l.tracked());
        // later every bucket has refilled: new sources evict them instead of going untracked
        let t1 = t0 + Duration::from_secs(10);
        let src = ip("192.0.2.9");
        assert!(l.admit(src, t1));
        assert!(l.admit(src, t1));
        assert!(!l.admit(src, t1), "tracked: its burst of 2 is used up");
    }
}
