//! The balancing algorithms: given the backends a request may go to (available, not yet
//! tried, primaries before backups — see [`crate::balancer`]), each with its effective
//! weight and load, choose one. Pure logic over [`Candidate`]s, so distributions are unit
//! tested without sockets.
//!
//! - round robin: strict rotation (one atomic counter);
//! - weighted round robin: nginx's smooth weighted round robin (each pick adds every
//!   candidate's weight to its `current`, takes the largest and subtracts the total), with
//!   a round-robin fast path when every candidate has the same weight;
//! - least connections: fewest in flight per unit of weight, ties in rotation;
//! - power of two choices: two distinct candidates at random, fewer outstanding per unit
//!   of weight wins;
//! - consistent hashing with bounded loads: a ring of [`POINTS_PER_WEIGHT`] points per
//!   unit of weight (xxHash64 of `name#i`); a key goes to the first candidate clockwise
//!   whose load after this request stays within [`LOAD_BOUND`] × the average.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use topology::Algorithm;

/// Points on the hash ring per unit of weight (Ketama uses 160 per server).
pub(crate) const POINTS_PER_WEIGHT: u32 = 160;

/// Bounded-load factor `c`: no backend takes more than `⌈c × average⌉` of the requests in
/// flight (Mirrokni et al. suggest 1.25; HAProxy `hash-balance-factor 125`).
pub(crate) const LOAD_BOUND: f64 = 1.25;

/// One backend a request may go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// Its index in the balancer's backend list.
    pub(crate) index: usize,
    /// Its weight after slow start, in thousandths (weight 1 = 1000); at least 1.
    pub(crate) weight: u64,
    /// Requests in flight to it plus requests waiting in its queue.
    pub(crate) load: u64,
}

/// A 64-bit hash that is the same in every process and version (xxHash64, seed 0), so two
/// load balancers place a key on the same backend.
pub(crate) fn hash(bytes: &[u8]) -> u64 {
    twox_hash::XxHash64::oneshot(0, bytes)
}

/// The state of one algorithm over a fixed list of backends.
#[derive(Debug)]
pub(crate) struct Selector {
    algorithm: Algorithm,
    /// Round-robin position (round robin, weighted fast path, tie breaks).
    next: AtomicUsize,
    /// Smooth weighted round robin's `current` per backend index.
    current: Mutex<Vec<i64>>,
    /// Hash ring: (point, backend index), sorted by point.
    ring: Vec<(u64, usize)>,
}

impl Selector {
    /// `backends` as `(name, weight)` in configuration order (the ring is built from them).
    pub(crate) fn new(algorithm: Algorithm, backends: &[(&str, u32)]) -> Selector {
        let mut ring = Vec::new();
        if algorithm == Algorithm::ConsistentHash {
            for (index, (name, weight)) in backends.iter().enumerate() {
                for i in 0..POINTS_PER_WEIGHT * (*weight).max(1) {
                    ring.push((hash(format!("{name}#{i}").as_bytes()), index));
                }
            }
            ring.sort_unstable();
        }
        Selector {
            algorithm,
            next: AtomicUsize::new(0),
            current: Mutex::new(vec![0; backends.len()]),
            ring,
        }
    }

    /// The algorithm.
    pub(crate) fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Whether requests should wait for the chosen backend rather than spill over to
    /// another with a free slot (hashing keeps a key on its backend).
    pub(crate) fn keeps_affinity(&self) -> bool {
        self.algorithm == Algorithm::ConsistentHash
    }

    /// The chosen candidate's backend index; `key` is the request's hash (consistent
    /// hashing only; without one the algorithm falls back to round robin). `None` only
    /// when `cands` is empty.
    pub(crate) fn pick(&self, cands: &[Candidate], key: Option<u64>) -> Option<usize> {
        match cands.len() {
            0 => return None,
            1 => return Some(cands[0].index),
            _ => {}
        }
        Some(match self.algorithm {
            Algorithm::RoundRobin => self.round_robin(cands),
            Algorithm::WeightedRoundRobin => self.smooth_weighted(cands),
            Algorithm::LeastConnections => self.least_loaded(cands),
            Algorithm::PowerOfTwoChoices => two_choices(cands),
            Algorithm::ConsistentHash => match key {
                Some(k) => self.bounded_hash(cands, k),
                None => self.round_robin(cands),
            },
        })
    }

    fn round_robin(&self, cands: &[Candidate]) -> usize {
        cands[self.next.fetch_add(1, Ordering::Relaxed) % cands.len()].index
    }

    fn smooth_weighted(&self, cands: &[Candidate]) -> usize {
        if cands.iter().all(|c| c.weight == cands[0].weight) {
            return self.round_robin(cands);
        }
        // A poisoned lock only means another request panicked mid-pick; the numbers are
        // still usable.
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut total: i64 = 0;
        let mut best = cands[0].index;
        let mut best_current = i64::MIN;
        for c in cands {
            let w = i64::try_from(c.weight).unwrap_or(i64::MAX >> 16);
            let Some(cur) = current.get_mut(c.index) else {
                continue;
            };
            *cur += w;
            total += w;
            if *cur > best_current {
                best_current = *cur;
                best = c.index;
            }
        }
        if let Some(cur) = current.get_mut(best) {
            *cur -= total;
        }
        best
    }

    fn least_loaded(&self, cands: &[Candidate]) -> usize {
        let start = self.next.fetch_add(1, Ordering::Relaxed) % cands.len();
        let mut best = cands[start];
        for i in 1..cands.len() {
            let c = cands[(start + i) % cands.len()];
            // c.load / c.weight < best.load / best.weight, without division.
            if u128::from(c.load) * u128::from(best.weight)
                < u128::from(best.load) * u128::from(c.weight)
            {
                best = c;
            }
        }
        best.index
    }

    fn bounded_hash(&self, cands: &[Candidate], key: u64) -> usize {
        if self.ring.is_empty() {
            return cands[0].index;
        }
        let total: u64 = cands.iter().map(|c| c.load).sum::<u64>() + 1;
        let bound = ((total as f64 / cands.len() as f64) * LOAD_BOUND).ceil() as u64;
        let start = self.ring.partition_point(|(p, _)| *p < key);
        let mut seen = 0;
        let mut visited = vec![false; cands.iter().map(|c| c.index + 1).max().unwrap_or(0)];
        for i in 0..self.ring.len() {
            let (_, index) = self.ring[(start + i) % self.ring.len()];
            if visited.get(index).copied().unwrap_or(true) {
                continue;
            }
            visited[index] = true;
            let Some(c) = cands.iter().find(|c| c.index == index) else {
                continue;
            };
            if c.load < bound {
                return c.index;
            }
            seen += 1;
            if seen == cands.len() {
                break;
            }
        }
        // Unreachable in practice: some candidate is at or below the average.
        cands[0].index
    }
}

/// Two distinct random candidates; the one with less load per unit of weight (the first
/// drawn on a tie).
fn two_choices(cands: &[Candidate]) -> usize {
    let n = cands.len();
    let i = fastrand::usize(..n);
    let mut j = fastrand::usize(..n - 1);
    if j >= i {
        j += 1;
    }
    let (a, b) = (cands[i], cands[j]);
    if u128::from(b.load) * u128::from(a.weight) < u128::from(a.load) * u128::from(b.weight) {
        b.index
    } else {
        a.index
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cands(weights: &[u64], loads: &[u64]) -> Vec<Candidate> {
        weights
            .iter()
            .zip(loads)
            .enumerate()
            .map(|(index, (w, load))| Candidate {
                index,
                weight: w * 1000,
                load: *load,
            })
            .collect()
    }

    fn counts(picks: impl Iterator<Item = usize>, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for p in picks {
            c[p] += 1;
        }
        c
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves_like_nginx() {
        let s = Selector::new(
            Algorithm::WeightedRoundRobin,
            &[("a", 5), ("b", 1), ("c", 1)],
        );
        let c = cands(&[5, 1, 1], &[0, 0, 0]);
        let seq: Vec<usize> = (0..7).map(|_| s.pick(&c, None).unwrap()).collect();
        // nginx's documented sequence for weights 5, 1, 1: a a b a c a a.
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
        let got = counts((0..7000).map(|_| s.pick(&c, None).unwrap()), 3);
        assert_eq!(got, [5000, 1000, 1000]);
    }

    #[test]
    fn round_robin_ignores_weights() {
        let s = Selector::new(Algorithm::RoundRobin, &[("a", 5), ("b", 1)]);
        let c = cands(&[5, 1], &[0, 0]);
        let got = counts((0..100).map(|_| s.pick(&c, None).unwrap()), 2);
        assert_eq!(got, [50, 50]);
    }

    #[test]
    fn least_connections_takes_the_least_loaded_per_weight_and_rotates_ties() {
        let s = Selector::new(Algorithm::LeastConnections, &[("a", 1), ("b", 1), ("c", 2)]);
        assert_eq!(s.pick(&cands(&[1, 1, 1], &[3, 1, 2]), None), Some(1));
        // c has 4 in flight but twice the weight: 2 per unit, below a's 3.
        assert_eq!(s.pick(&cands(&[1, 1, 2], &[3, 5, 4]), None), Some(2));
        let even = cands(&[1, 1, 1], &[0, 0, 0]);
        let got = counts((0..300).map(|_| s.pick(&even, None).unwrap()), 3);
        assert_eq!(got, [100, 100, 100]);
    }

    #[test]
    fn power_of_two_choices_never_picks_the_most_loaded_of_three() {
        let s = Selector::new(
            Algorithm::PowerOfTwoChoices,
            &[("a", 1), ("b", 1), ("c", 1)],
        );
        let c = cands(&[1, 1, 1], &[0, 5, 10]);
        let got = counts((0..3000).map(|_| s.pick(&c, None).unwrap()), 3);
        println!("p2c with loads 0/5/10: {got:?}");
        // c loses every draw it is in; a wins every draw it is in (2 of 3 pairs).
        assert_eq!(got[2], 0);
        assert!(got[0] > got[1], "{got:?}");
        let even = cands(&[1, 1], &[0, 0]);
        let got = counts((0..2000).map(|_| s.pick(&even, None).unwrap()), 2);
        println!("p2c with equal loads: {got:?}");
        assert!(got.iter().all(|n| *n > 0), "{got:?}");
    }

    #[test]
    fn bounded_load_hashing_spills_a_hot_key_past_an_overloaded_backend() {
        let s = Selector::new(Algorithm::ConsistentHash, &[("a", 1), ("b", 1), ("c", 1)]);
        let key = hash(b"hot");
        let home = s.pick(&cands(&[1, 1, 1], &[0, 0, 0]), Some(key)).unwrap();
        // Same key, same backend while loads are even.
        for _ in 0..10 {
            assert_eq!(
                s.pick(&cands(&[1, 1, 1], &[2, 2, 2]), Some(key)),
                Some(home)
            );
        }
        // Its home carries 10 of 12 in flight: above 1.25 × average, so the key spills.
        let mut loads = [1, 1, 1];
        loads[home] = 10;
        let spilled = s.pick(&cands(&[1, 1, 1], &loads), Some(key)).unwrap();
        assert_ne!(spilled, home);
        // Ring share by weight: b has weight 3 of 5.
        let s = Selector::new(Algorithm::ConsistentHash, &[("a", 1), ("b", 3), ("c", 1)]);
        let idle = cands(&[1, 3, 1], &[0, 0, 0]);
        let got = counts(
            (0..5000u32).map(|k| s.pick(&idle, Some(hash(&k.to_be_bytes()))).unwrap()),
            3,
        );
        println!("keys per backend for weights 1/3/1: {got:?}");
        assert!((2400..3600).contains(&got[1]), "{got:?}");
    }
}
