//! The firewall and the network seam: the policy compiled by `topology` enforced for real,
//! and the one place where listeners are bound ([`Net::listen`]) and hosts connect to each
//! other ([`Net::connect`]).
//!
//! In loopback mode every host shares the machine's loopback interface, so the policy is
//! enforced in user space: each listener is a [`GuardedListener`] that refuses (TCP RST)
//! and counts connections from source addresses its rule does not allow, and every
//! outbound connection a host makes leaves from the host's own address
//! ([`connect_from`]) so the receiving side can tell who is calling. [`relay`] puts the
//! same filter in front of a process we do not control (MariaDB) and, on the replication
//! egress, gives such a process's outbound connections its host's address.
//!
//! Every [`GuardedListener`] also enforces its listener's limits at accept: the per-source
//! and per-listener connection caps (evicting the longest-idle connection when full) and
//! the process's descriptor reserve ([`FdBudget`]).
//!
//! This crate never decides policy (that is `topology::Policy`) and never touches
//! another program's firewall state.

#![forbid(unsafe_code)]

mod admission;
mod forward;
mod io;
mod listener;
mod net;
pub mod nft;
pub mod peer_process;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::net::{TcpSocket, TcpStream};
use topology::{Policy, Rule, Service};

pub use admission::{Activity, ConnSlot, FdBudget, Refusal};
pub use forward::{egress_unix, relay, Target};
pub use io::Tracked;
pub use listener::{
    accept_failed, is_transient_accept_error, Admitted, GuardedListener, LocalServer,
    ACCEPT_BACKOFF, BACKLOG,
};
pub use net::{Isolation, Net};

use admission::Admission;

/// The filter of one listener: the rule for `(host, service)` plus its counters.
#[derive(Debug)]
pub struct Filter {
    /// The host whose firewall this is.
    pub host: String,
    /// The service the listener serves.
    pub service: Service,
    policy: Arc<Policy>,
    accepted: AtomicU64,
    refused: AtomicU64,
    limited: [AtomicU64; 3],
    admission: OnceLock<Arc<Admission>>,
}

impl Filter {
    /// The filter for `host`'s `service` under `policy` (default deny when the policy has
    /// no rule for the pair).
    pub fn new(policy: Arc<Policy>, host: &str, service: Service) -> Arc<Filter> {
        Arc::new(Filter {
            host: host.to_string(),
            service,
            policy,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            limited: Default::default(),
            admission: OnceLock::new(),
        })
    }

    /// The policy rule this filter enforces (`None`: default deny).
    pub fn rule(&self) -> Option<&Rule> {
        self.policy.rule(&self.host, self.service)
    }

    pub(crate) fn attach(&self, admission: Arc<Admission>) {
        let _ = self.admission.set(admission);
    }

    pub(crate) fn count_refusal(&self, reason: Refusal) {
        match reason {
            Refusal::Policy => {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
            Refusal::PerSource => {
                self.limited[0].fetch_add(1, Ordering::Relaxed);
            }
            Refusal::Full => {
                self.limited[1].fetch_add(1, Ordering::Relaxed);
            }
            Refusal::Descriptors => {
                self.limited[2].fetch_add(1, Ordering::Relaxed);
            }
        }
        tracing::debug!(host = %self.host, service = %self.service, reason = reason.as_str(), "connection refused");
    }

    /// Connections reset at accept because of a limit, by reason: per-source cap,
    /// listener cap with nothing idle to evict, descriptor reserve.
    pub fn limited(&self) -> [(Refusal, u64); 3] {
        [
            (Refusal::PerSource, self.limited[0].load(Ordering::Relaxed)),
            (Refusal::Full, self.limited[1].load(Ordering::Relaxed)),
            (
                Refusal::Descriptors,
                self.limited[2].load(Ordering::Relaxed),
            ),
        ]
    }

    /// Idle connections closed to admit new ones on a full listener.
    pub fn evicted(&self) -> u64 {
        self.admission.get().map_or(0, |a| a.evicted())
    }

    /// Connections open on the listener now.
    pub fn open_connections(&self) -> u64 {
        self.admission.get().map_or(0, |a| a.open() as u64)
    }

    /// Whether `src` may connect; counts the verdict.
    pub fn check(&self, src: IpAddr) -> bool {
        let ok = self.policy.allows(&self.host, self.service, src);
        if ok {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Connects to `dst` from the host address `src` (port chosen by the kernel), so the peer's
/// firewall sees the calling host. Sets `TCP_NODELAY`.
///
/// Errors: `bind(2)` fails with `EADDRNOTAVAIL` when `src` is not a local address (any
/// 127.0.0.0/8 address is local on Linux); otherwise the errors of `connect(2)` (e.g.
/// `ECONNREFUSED`). `src` and `dst` must be of the same family.
pub async fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(src, 0))?;
    let stream = socket.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_accept_errors() {
        use std::io;
        assert!(is_transient_accept_error(&io::Error::from_raw_os_error(24)));
        assert!(is_transient_accept_error(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        assert!(!is_transient_accept_error(&io::Error::from_raw_os_error(9)));
    }

    #[test]
    fn filter_counts_verdicts_and_denies_by_default() {
        let policy = Arc::new(Policy::compile(&topology::Topology::default_topology()));
        let lb: IpAddr = [127, 80, 0, 10].into();
        let web = Filter::new(Arc::clone(&policy), "web-01", Service::Web);
        assert!(web.check(lb));
        assert!(!web.check([127, 0, 0, 1].into()));
        assert_eq!((web.accepted(), web.refused()), (1, 1));
        let none = Filter::new(policy, "lb-01", Service::Mysql);
        assert!(!none.check(lb));
    }
}
