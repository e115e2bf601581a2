//! The firewall: the policy compiled by `topology` enforced for real.
//!
//! In loopback mode every host shares the machine's loopback interface, so the policy is
//! enforced in user space: each listener is a [`GuardedListener`] that refuses (TCP RST)
//! and counts connections from source addresses its rule does not allow, and every
//! outbound connection a host makes leaves from the host's own address
//! ([`connect_from`]) so the receiving side can tell who is calling. [`relay`] puts the
//! same filter in front of a process we do not control (MariaDB), and [`egress`] gives such
//! a process's outbound connections its host's address.
//!
//! This crate never decides policy (that is `topology::Policy`) and never touches
//! another program's firewall state.

#![forbid(unsafe_code)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use topology::{Policy, Service};

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
        })
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

/// A TCP listener whose `accept` only returns connections its [`Filter`] allows.
#[derive(Debug)]
pub struct GuardedListener {
    listener: TcpListener,
    filter: Arc<Filter>,
}

impl GuardedListener {
    /// Binds `addr` (with `SO_REUSEADDR`) guarded by `filter`.
    pub async fn bind(addr: SocketAddr, filter: Arc<Filter>) -> io::Result<GuardedListener> {
        let _ = (addr, filter);
        todo!("GuardedListener::bind")
    }

    /// The next allowed connection. Disallowed ones are closed with a TCP RST (`SO_LINGER`
    /// 0) and counted, never returned. Errors are those of `accept(2)`.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        todo!("GuardedListener::accept")
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// This listener's filter (for counters).
    pub fn filter(&self) -> &Arc<Filter> {
        &self.filter
    }
}

/// Connects to `dst` from the host address `src` (port chosen by the kernel), so the peer's
/// firewall sees the calling host. Sets `TCP_NODELAY`.
pub async fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let _ = (src, dst);
    todo!("connect_from")
}

/// Where a relay or egress forwards connections.
#[derive(Debug, Clone)]
pub enum Target {
    /// A Unix socket (e.g. a MariaDB server's socket).
    Unix(PathBuf),
    /// A TCP address, connected from the given source address.
    Tcp {
        /// Source address to bind.
        from: IpAddr,
        /// Destination.
        to: SocketAddr,
    },
}

/// Accepts allowed connections on `listener` and copies bytes both ways to a new
/// connection to `target`, until either side closes. Runs until the listener fails.
pub async fn relay(listener: GuardedListener, target: Target) -> io::Result<()> {
    let _ = (listener, target);
    todo!("relay")
}

/// Forwards every connection accepted on a plain `listener` (for a local process such as a
/// MariaDB replica) to `target`. Runs until the listener fails.
pub async fn egress(listener: TcpListener, target: Target) -> io::Result<()> {
    let _ = (listener, target);
    todo!("egress")
}

/// Like [`egress`], for a local process that can only be pointed at a Unix socket path
/// (the application's MariaDB client connects through one per database host).
pub async fn egress_unix(listener: tokio::net::UnixListener, target: Target) -> io::Result<()> {
    let _ = (listener, target);
    todo!("egress_unix")
}
