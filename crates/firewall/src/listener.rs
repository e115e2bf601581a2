//! [`GuardedListener`]: a TCP listener that admits only what the policy and the listener's
//! limits allow.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use topology::{Callers, ListenerLimits};

use crate::admission::{Admission, ConnSlot, Refusal};
use crate::Filter;

/// `listen(2)` backlog of every [`GuardedListener`] (capped by `net.core.somaxconn`, 4096 on
/// current kernels): a burst of connections waits in the kernel instead of being dropped.
pub const BACKLOG: i32 = 4096;

/// The pid of the local server process a [`Callers::LocalServer`] rule admits, asked at
/// each accept (the process may have been restarted).
pub type LocalServer = Arc<dyn Fn() -> Option<u32> + Send + Sync>;

/// One admitted connection: the stream (with `TCP_NODELAY`), the peer, and its slot in the
/// listener's table (hold it as long as the connection lives).
#[derive(Debug)]
pub struct Admitted {
    /// The connection.
    pub stream: TcpStream,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The connection's place in the listener's caps; dropping it frees the place.
    pub slot: ConnSlot,
}

/// A TCP listener whose [`GuardedListener::accept`] returns only connections that (1) the
/// policy allows from their source address, (2) fit under the per-source cap and (3) fit
/// under the listener's cap and the process's descriptor budget — evicting the
/// longest-idle connection when full. Everything else is reset (TCP RST) at once and
/// counted on the [`Filter`] by reason. The listener owns a cancellation token that is the
/// parent of every admitted connection's token.
pub struct GuardedListener {
    listener: TcpListener,
    filter: Arc<Filter>,
    limits: ListenerLimits,
    admission: Arc<Admission>,
    connections: CancellationToken,
    local_server: Option<LocalServer>,
}

impl std::fmt::Debug for GuardedListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedListener")
            .field("listener", &self.listener)
            .field("filter", &self.filter)
            .field("limits", &self.limits)
            .finish()
    }
}

impl GuardedListener {
    /// Binds `addr` (with `SO_REUSEADDR`, backlog [`BACKLOG`]) guarded by `filter`, served
    /// with `limits`. Port 0 lets the kernel choose; read it back with
    /// [`GuardedListener::local_addr`].
    ///
    /// Errors: those of `socket(2)`, `bind(2)` (e.g. `EADDRINUSE`, `EADDRNOTAVAIL`) and
    /// `listen(2)`. Must be called inside a Tokio runtime.
    pub async fn bind(
        addr: SocketAddr,
        filter: Arc<Filter>,
        limits: ListenerLimits,
    ) -> io::Result<GuardedListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        socket.set_nonblocking(true)?;
        let listener = TcpListener::from_std(socket.into())?;
        let admission = Arc::new(Admission::new(
            limits.max_connections,
            limits.max_connections_per_source,
        ));
        filter.attach(admission.clone());
        Ok(GuardedListener {
            listener,
            filter,
            limits,
            admission,
            connections: CancellationToken::new(),
            local_server: None,
        })
    }

    /// For a [`Callers::LocalServer`] rule: the process whose connections are admitted.
    pub fn with_local_server(mut self, pid: LocalServer) -> GuardedListener {
        self.local_server = Some(pid);
        self
    }

    /// The next admitted connection, with `TCP_NODELAY` set. Refused ones are closed with
    /// a TCP RST (`SO_LINGER` 0) and counted, never returned. Errors are those of
    /// `accept(2)`; see [`is_transient_accept_error`] for the ones to retry.
    pub async fn accept(&self) -> io::Result<Admitted> {
        loop {
            let (stream, peer) = self.listener.accept().await?;
            if !self.filter.check(peer.ip()) {
                tracing::debug!(
                    host = %self.filter.host,
                    service = %self.filter.service,
                    %peer,
                    "firewall: refused connection",
                );
                refuse(stream);
                continue;
            }
            if !self.local_server_ok(&stream, peer) {
                self.filter.count_refusal(Refusal::Policy);
                tracing::debug!(service = %self.filter.service, %peer, "firewall: not the local server process");
                refuse(stream);
                continue;
            }
            match self.admission.admit(peer.ip(), &self.connections) {
                Ok(slot) => {
                    // Responses are often written in pieces: without TCP_NODELAY, Nagle's
                    // algorithm holds a small piece back until the peer's delayed ACK.
                    let _ = stream.set_nodelay(true);
                    return Ok(Admitted { stream, peer, slot });
                }
                Err(reason) => {
                    self.filter.count_refusal(reason);
                    refuse(stream);
                }
            }
        }
    }

    fn local_server_ok(&self, stream: &TcpStream, peer: SocketAddr) -> bool {
        let Some(rule) = self.filter.rule() else {
            return false;
        };
        if rule.callers != Callers::LocalServer {
            return true;
        }
        let (Some(pid), Ok(local)) = (
            self.local_server.as_ref().and_then(|f| f()),
            stream.local_addr(),
        ) else {
            return false;
        };
        crate::peer_process::is_owned_by(local, peer, pid).unwrap_or(false)
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// This listener's filter (policy and counters).
    pub fn filter(&self) -> &Arc<Filter> {
        &self.filter
    }

    /// The limits this listener is served with.
    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    /// Connections admitted and still open.
    pub fn open_connections(&self) -> usize {
        self.admission.open()
    }

    /// Stops listening: the kernel refuses new connections to this address from now on
    /// (and resets those queued but not yet accepted), while admitted connections stay
    /// open; used at the start of a drain. `shutdown(2)` of a listening socket, which
    /// Linux implements as leaving the LISTEN state. Errors are logged (the socket is
    /// closed when dropped in any case).
    pub fn stop_listening(&self) {
        if let Err(e) = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both) {
            tracing::debug!(error = %e, "shutdown(2) of a listening socket");
        }
    }

    /// Closes every admitted connection now (cancels their tokens); used at the end of a
    /// drain.
    pub fn close_all(&self) {
        self.connections.cancel();
    }

    /// Every open connection's activity (for drain: idle ones can close at once).
    pub fn activities(&self) -> Vec<Arc<crate::Activity>> {
        self.admission.all()
    }
}

/// Closes `stream` with a TCP RST instead of a FIN: `SO_LINGER` with a zero timeout makes
/// `close(2)` abort the connection (RFC 793 §3.5 "abort", socket(7) `SO_LINGER`).
pub(crate) fn refuse(stream: TcpStream) {
    // A zero linger time never blocks close(2), unlike a positive one.
    if let Err(e) = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "firewall: SO_LINGER on refused connection");
    }
    drop(stream);
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

/// Pause after a failed `accept(2)`, so a shortage of descriptors does not spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Waits out an accept error: transient ones for [`ACCEPT_BACKOFF`], others for 1 s (a
/// listener keeps trying rather than leaving its host silently without the service).
/// Logs through the rate-limited log.
pub async fn accept_failed(service: topology::Service, e: &io::Error) {
    if is_transient_accept_error(e) {
        tracing::warn!(listener = %service, error = %e, "accept failed, retrying");
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    } else {
        tracing::error!(listener = %service, error = %e, "accept failed, retrying in 1 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
