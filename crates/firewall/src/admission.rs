//! Admission of accepted connections: the per-listener and per-source caps, the process-wide
//! descriptor budget, and eviction of the longest-idle connection when a listener is full.
//!
//! Every admitted connection holds a [`ConnSlot`] until it closes. The slot carries the
//! connection's activity (requests in flight, time of last activity) that the serving code
//! keeps up to date, and the cancellation token that eviction and shutdown use.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio_util::sync::CancellationToken;

/// Descriptors a process never gives to outbound connections either: enough for the
/// runtime, log files and status writes.
const HARD_RESERVE: usize = 64;

/// The process-wide budget of socket descriptors: accepted connections may use up to
/// `RLIMIT_NOFILE − fd_reserve`, outbound connections up to `RLIMIT_NOFILE − 64`, so an
/// accept flood never starves health checks, status writes or logs (accept(2) `EMFILE`).
#[derive(Debug)]
pub struct FdBudget {
    nofile: usize,
    reserve: AtomicUsize,
    used: AtomicUsize,
}

impl FdBudget {
    /// The budget of this process, created on first use from the soft `RLIMIT_NOFILE`.
    pub fn global() -> &'static FdBudget {
        static BUDGET: OnceLock<FdBudget> = OnceLock::new();
        BUDGET.get_or_init(|| {
            let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| soft as usize)
                .unwrap_or(1024);
            FdBudget {
                nofile,
                reserve: AtomicUsize::new(1024.min(nofile / 4)),
                used: AtomicUsize::new(0),
            }
        })
    }

    /// Sets the descriptors kept back from accepted connections (`limits.fd_reserve`),
    /// at most a quarter of the open-file limit.
    pub fn set_reserve(&self, reserve: u32) {
        self.reserve
            .store((reserve as usize).min(self.nofile / 4), Ordering::Relaxed);
    }

    /// Socket descriptors currently counted.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The open-file limit the budget was built from.
    pub fn nofile(&self) -> usize {
        self.nofile
    }

    fn try_take(&self, inbound: bool) -> bool {
        let limit = if inbound {
            self.nofile
                .saturating_sub(self.reserve.load(Ordering::Relaxed))
        } else {
            self.nofile.saturating_sub(HARD_RESERVE)
        };
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
                (u < limit).then_some(u + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the serving code reports about one connection, read by eviction.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicU32,
    requests: AtomicU64,
    bytes_read: AtomicU64,
    /// [`coarse_ms`] when bytes last moved or a request last started or ended.
    last_active_ms: AtomicU64,
    close: CancellationToken,
}

/// Milliseconds on the kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`,
/// clock_gettime(2)): the time of the last timer tick, so 1 to 4 ms behind, read from the
/// vDSO without reading the TSC. Activity is touched several times per request and only
/// orders connections by idleness (seconds) for eviction, so the tick's precision does.
fn coarse_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1000
            + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1_000_000
    })
}

impl Activity {
    fn new(close: CancellationToken) -> Activity {
        Activity {
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            last_active_ms: AtomicU64::new(coarse_ms()),
            close,
        }
    }

    /// An activity record outside any listener's table (e.g. for a Unix-socket egress).
    pub fn detached() -> Arc<Activity> {
        Arc::new(Activity::new(CancellationToken::new()))
    }

    /// Records that bytes moved or a request started or ended.
    pub fn touch(&self) {
        self.last_active_ms.store(coarse_ms(), Ordering::Relaxed);
    }

    /// A request started on the connection.
    pub fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
    }

    /// A request (its whole response) ended.
    pub fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.touch();
    }

    /// Records `n` bytes read from the peer.
    pub fn read(&self, n: usize) {
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// Bytes read from the peer so far (TLS records included).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Requests started on the connection so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Time since the last activity.
    pub fn idle_for(&self) -> std::time::Duration {
        let now = coarse_ms();
        std::time::Duration::from_millis(
            now.saturating_sub(self.last_active_ms.load(Ordering::Relaxed)),
        )
    }

    /// Cancelled when the connection must close now (evicted, or the listener shut down
    /// past its drain time).
    pub fn closed(&self) -> &CancellationToken {
        &self.close
    }
}

/// Idle connections compared to choose the one to evict.
const EVICTION_SAMPLE: usize = 64;

/// Why an accepted connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source address is not allowed by the policy.
    Policy,
    /// The source already holds `max_connections_per_source` connections.
    PerSource,
    /// The listener is at `max_connections` and no connection is idle.
    Full,
    /// The process's descriptor budget is spent and no connection is idle.
    Descriptors,
}

impl Refusal {
    /// The `reason` label of `rampart_listener_refused_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Policy => "policy",
            Refusal::PerSource => "per_source",
            Refusal::Full => "max_connections",
            Refusal::Descriptors => "fd_reserve",
        }
    }
}

/// The connection table of one listener.
#[derive(Debug)]
pub(crate) struct Admission {
    max: usize,
    per_source_max: u32,
    next_id: AtomicU64,
    table: Mutex<Table>,
    evicted: AtomicU64,
}

#[derive(Debug, Default)]
struct Table {
    conns: HashMap<u64, Arc<Activity>>,
    per_source: HashMap<IpAddr, u32>,
}

impl Admission {
    pub(crate) fn new(max_connections: u32, per_source: u32) -> Admission {
        Admission {
            max: max_connections.max(1) as usize,
            per_source_max: per_source.max(1),
            next_id: AtomicU64::new(0),
            table: Mutex::new(Table::default()),
            evicted: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table is consistent after any panic: each update is a single insert/remove.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `src`, evicting the longest-idle one of a sample of idle
    /// connections when the listener is full or the descriptor budget is spent.
    pub(crate) fn admit(
        self: &Arc<Self>,
        src: IpAddr,
        parent: &CancellationToken,
    ) -> Result<ConnSlot, Refusal> {
        let mut t = self.lock();
        if t.per_source.get(&src).copied().unwrap_or(0) >= self.per_source_max {
            return Err(Refusal::PerSource);
        }
        let budget = FdBudget::global();
        let full = t.conns.len() >= self.max;
        let fd = if full { false } else { budget.try_take(true) };
        if !fd {
            // Free a slot: close the connection idle longest among a sample of idle ones
            // (approximate LRU, as Redis evicts: a full scan per accept would make a
            // flood against a full listener quadratic).
            let victim = t
                .conns
                .iter()
                .filter(|(_, a)| a.in_flight() == 0)
                .take(EVICTION_SAMPLE)
                .max_by_key(|(_, a)| a.idle_for())
                .map(|(id, _)| *id);
            let Some(id) = victim else {
                return Err(if full {
                    Refusal::Full
                } else {
                    Refusal::Descriptors
                });
            };
            if let Some(a) = t.conns.remove(&id) {
                // Its slot's drop still runs (and gives back its descriptor) when its task
                // ends; the table entry goes now so the new connection fits.
                a.close.cancel();
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
            // The victim's descriptor is given back when its task ends; until then this
            // connection borrows from the reserve.
            budget.used.fetch_add(1, Ordering::AcqRel);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(parent.child_token()));
        t.conns.insert(id, activity.clone());
        *t.per_source.entry(src).or_insert(0) += 1;
        Ok(ConnSlot {
            admission: self.clone(),
            id,
            src,
            activity,
        })
    }

    pub(crate) fn open(&self) -> usize {
        self.lock().conns.len()
    }

    pub(crate) fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Every admitted connection's activity (for drain on shutdown).
    pub(crate) fn all(&self) -> Vec<Arc<Activity>> {
        self.lock().conns.values().cloned().collect()
    }
}

/// An admitted connection's place in its listener's table and in the descriptor budget;
/// both are given back on drop.
#[derive(Debug)]
pub struct ConnSlot {
    admission: Arc<Admission>,
    id: u64,
    src: IpAddr,
    activity: Arc<Activity>,
}

impl ConnSlot {
    /// The connection's activity record.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut t = self.admission.lock();
        t.conns.remove(&self.id);
        if let Some(n) = t.per_source.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                t.per_source.remove(&self.src);
            }
        }
        drop(t);
        FdBudget::global().give_back();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn per_source_cap_refuses_and_frees_on_drop() {
        let a = Arc::new(Admission::new(100, 2));
        let root = CancellationToken::new();
        let s1 = a.admit(ip(1), &root).unwrap();
        let _s2 = a.admit(ip(1), &root).unwrap();
        assert_eq!(a.admit(ip(1), &root).unwrap_err(), Refusal::PerSource);
        let _other = a.admit(ip(2), &root).unwrap();
        drop(s1);
        assert!(a.admit(ip(1), &root).is_ok());
    }

    #[test]
    fn a_full_listener_evicts_the_longest_idle_and_refuses_when_all_are_busy() {
        let a = Arc::new(Admission::new(2, 10));
        let root = CancellationToken::new();
        let old = a.admit(ip(1), &root).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let busy = a.admit(ip(2), &root).unwrap();
        busy.activity().request_started();
        let new = a.admit(ip(3), &root).unwrap();
        assert!(
            old.activity().closed().is_cancelled(),
            "the idle one is evicted"
        );
        assert!(!busy.activity().closed().is_cancelled());
        assert_eq!(a.evicted(), 1);
        new.activity().request_started();
        assert_eq!(a.admit(ip(4), &root).unwrap_err(), Refusal::Full);
        drop(old);
        assert_eq!(a.open(), 2);
    }
}
