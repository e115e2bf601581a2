//! [`Net`]: the one network seam of a host. Every listener of every role is bound with
//! [`Net::listen`] and every connection to another host is made with [`Net::connect`], so
//! an isolation mode (loopback addresses, or network namespaces / real machines with
//! nftables)
//! plugs in here without touching the roles.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use topology::{Limits, Policy, Service};

use crate::{Filter, GuardedListener};

/// How hosts are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Every host has its own 127.x address on this machine's loopback interface; the
    /// policy is enforced in user space at every listener and outbound connections leave
    /// from the calling host's address. Development only: a local process can bind a
    /// host's address and pass the filter.
    Loopback,
    /// The host has a network stack of its own (a network namespace of the lab, or a real
    /// machine) and the kernel holds the host's nftables ruleset ([`crate::nft`]); the
    /// user-space filter still runs behind it.
    Kernel,
}

/// The network seam of one host: its name and address, the compiled policy and the limits.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Net {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    host: String,
    address: IpAddr,
    policy: Arc<Policy>,
    limits: Limits,
    isolation: Isolation,
}

impl Net {
    /// The seam of `host` (at `address`) in loopback mode. Sets the process's descriptor
    /// reserve from `limits.fd_reserve`.
    pub fn loopback(host: &str, address: IpAddr, policy: Arc<Policy>, limits: Limits) -> Net {
        Net::new(host, address, policy, limits, Isolation::Loopback)
    }

    /// The seam of `host` (at `address`) under `isolation`. Sets the process's descriptor
    /// reserve from `limits.fd_reserve`.
    pub fn new(
        host: &str,
        address: IpAddr,
        policy: Arc<Policy>,
        limits: Limits,
        isolation: Isolation,
    ) -> Net {
        crate::FdBudget::global().set_reserve(limits.fd_reserve);
        Net {
            inner: Arc::new(Inner {
                host: host.to_string(),
                address,
                policy,
                limits,
                isolation,
            }),
        }
    }

    /// The host's name.
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// The host's own address.
    pub fn address(&self) -> IpAddr {
        self.inner.address
    }

    /// The compiled policy.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.inner.policy
    }

    /// The limits listeners are served with.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The isolation mode.
    pub fn isolation(&self) -> Isolation {
        self.inner.isolation
    }

    /// Binds this host's listener for `service` on its address and `port` (0: the kernel
    /// picks), guarded by the policy's rule for `(host, service)` (none: nobody is
    /// admitted) and served with `limits.<service>`.
    ///
    /// Errors: those of `bind(2)`/`listen(2)` (`EADDRINUSE`, `EADDRNOTAVAIL`, `EACCES`
    /// below 1024 without the privilege).
    pub async fn listen(&self, service: Service, port: u16) -> io::Result<GuardedListener> {
        let filter = Filter::new(self.inner.policy.clone(), &self.inner.host, service);
        GuardedListener::bind(
            SocketAddr::new(self.inner.address, port),
            filter,
            self.inner.limits.listener(service),
        )
        .await
    }

    /// A TCP connection from this host to `dst` (from the host's own address, so the
    /// receiving firewall sees who calls), with `TCP_NODELAY`.
    ///
    /// Errors: those of `bind(2)` and `connect(2)` (e.g. `ECONNREFUSED`).
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        match self.inner.isolation {
            // Bound to the host's address in both modes: in a namespace it is the only
            // non-loopback address anyway, and the receiving firewalls match on it.
            Isolation::Loopback | Isolation::Kernel => {
                crate::connect_from(self.inner.address, dst).await
            }
        }
    }
}
