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
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixStream};
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
    /// Binds `addr` (with `SO_REUSEADDR`, backlog [`BACKLOG`]) guarded by `filter`. Port 0
    /// lets the kernel choose; read it back with [`GuardedListener::local_addr`].
    ///
    /// Errors: those of `socket(2)`, `bind(2)` (e.g. `EADDRINUSE`, `EADDRNOTAVAIL`) and
    /// `listen(2)`. Must be called inside a Tokio runtime.
    pub async fn bind(addr: SocketAddr, filter: Arc<Filter>) -> io::Result<GuardedListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        socket.set_nonblocking(true)?;
        let listener = TcpListener::from_std(socket.into())?;
        Ok(GuardedListener { listener, filter })
    }

    /// The next allowed connection, with `TCP_NODELAY` set. Disallowed ones are closed with a
    /// TCP RST (`SO_LINGER` 0) and counted, never returned. Errors are those of `accept(2)`.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        loop {
            let (stream, peer) = self.listener.accept().await?;
            if self.filter.check(peer.ip()) {
                // Responses are often written in pieces (head, then body chunks): without
                // TCP_NODELAY, Nagle's algorithm holds a small piece back until the peer's
                // (delayed) ACK, stalling request/response traffic by up to 40 ms.
                // A failure here (the peer already gone) surfaces on the first read/write.
                let _ = stream.set_nodelay(true);
                return Ok((stream, peer));
            }
            tracing::debug!(
                host = %self.filter.host,
                service = %self.filter.service,
                %peer,
                "firewall: refused connection",
            );
            refuse(stream);
        }
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

/// `listen(2)` backlog of every [`GuardedListener`].
pub const BACKLOG: i32 = 1024;

/// Closes `stream` with a TCP RST instead of a FIN: `SO_LINGER` with a zero timeout makes
/// `close(2)` abort the connection (RFC 793 §3.5 "abort", socket(7) `SO_LINGER`).
fn refuse(stream: TcpStream) {
    // A zero linger time never blocks close(2), unlike a positive one.
    if let Err(e) = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "firewall: SO_LINGER on refused connection");
    }
    drop(stream);
}

/// Connects to `dst` from the host address `src` (port chosen by the kernel), so the peer's
/// firewall sees the calling host. Sets `TCP_NODELAY`.
///
/// Errors: `bind(2)` fails with `EADDRNOTAVAIL` when `src` is not a local address (any
/// 127.0.0.0/8 address is local on Linux); otherwise the errors of `connect(2)` (e.g.
/// `ECONNREFUSED`). `src` and `dst` must be of the same family.
pub async fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
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
///
/// Each connection is served by its own task; a failed connection to `target` or a broken
/// copy is logged and closes only that connection. Transient accept errors
/// ([`is_transient_accept_error`]) are logged and retried; any other `accept(2)` error
/// stops the loop and is returned.
pub async fn relay(listener: GuardedListener, target: Target) -> io::Result<()> {
    let target = Arc::new(target);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => spawn_forward(stream, peer.to_string(), &target),
            Err(e) => accept_failed(e).await?,
        }
    }
}

/// Forwards every connection accepted on a plain `listener` (for a local process such as a
/// MariaDB replica) to `target`. Runs until the listener fails.
///
/// No filtering: the listener should be bound where only the local process reaches it.
/// Per-connection failures are logged as in [`relay`].
pub async fn egress(listener: TcpListener, target: Target) -> io::Result<()> {
    let target = Arc::new(target);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // As for guarded listeners: small writes (replication events) go out at once.
                let _ = stream.set_nodelay(true);
                spawn_forward(stream, peer.to_string(), &target)
            }
            Err(e) => accept_failed(e).await?,
        }
    }
}

/// Like [`egress`], for a local process that can only be pointed at a Unix socket path
/// (the application's MariaDB client connects through one per database host).
pub async fn egress_unix(listener: tokio::net::UnixListener, target: Target) -> io::Result<()> {
    let target = Arc::new(target);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_forward(stream, "unix socket".to_string(), &target),
            Err(e) => accept_failed(e).await?,
        }
    }
}

/// Whether an `accept(2)` error concerns one connection or a momentary shortage (aborted
/// handshake, out of file descriptors or memory), so an accept loop should go on rather than
/// stop. See accept(2), ERRORS: `ECONNABORTED`, `EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`.
pub fn is_transient_accept_error(e: &io::Error) -> bool {
    // Linux errno values: ENOMEM 12, ENFILE 23, EMFILE 24, ENOBUFS 105.
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || matches!(e.raw_os_error(), Some(12 | 23 | 24 | 105))
}

/// Pause after a transient accept error, so a shortage of descriptors does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Handles an accept error inside a forwarding loop: transient ones are logged and waited
/// out (`Ok`), anything else stops the loop (`Err`).
async fn accept_failed(e: io::Error) -> io::Result<()> {
    if is_transient_accept_error(&e) {
        tracing::warn!(error = %e, "accept failed, continuing");
        tokio::time::sleep(ACCEPT_BACKOFF).await;
        Ok(())
    } else {
        Err(e)
    }
}

/// Serves one accepted connection on its own task: see [`forward`].
fn spawn_forward<S>(inbound: S, peer: String, target: &Arc<Target>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let target = Arc::clone(target);
    tokio::spawn(async move {
        match forward(inbound, &target).await {
            Ok((up, down)) => {
                tracing::debug!(%peer, ?target, up, down, "forwarded connection closed")
            }
            Err(e) => tracing::warn!(%peer, ?target, error = %e, "forwarding failed"),
        }
    });
}

/// Connects to `target` and copies bytes both ways until both directions are shut down.
/// Returns the byte counts (inbound → target, target → inbound).
async fn forward<S>(mut inbound: S, target: &Target) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match target {
        Target::Unix(path) => {
            let mut outbound = UnixStream::connect(path).await?;
            tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
        }
        Target::Tcp { from, to } => {
            let mut outbound = connect_from(*from, *to).await?;
            tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_accept_errors() {
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
