//! The process egress: how this process's own MariaDB client connections leave from its
//! host's address.
//!
//! `mysql_async` can neither choose a connection's source address (which the firewall
//! relays filter on) nor start TLS on a Unix socket. So for each MariaDB server it talks
//! to, a role opens a [`LocalEgress`]: a TCP listener on `127.0.0.1` with a kernel-chosen
//! port that admits only connections made by **this process** (the owner of the client's
//! socket, read from `/proc` by [`firewall::peer_process::is_owned_by`]) and forwards each
//! one through the host's [`firewall::Net`] to the server's relay. The client then speaks
//! TLS over it to `mariadbd` (see [`crate::tcp_opts`]), verifying the server's name, not
//! the egress's address.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::DbError;

/// Bound on connecting to the server's relay, seconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A forwarded connection with no byte either way for this long is closed (pooled
/// connections are retired after 30 s idle; the heartbeat writes every 250 ms).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Pause after an `accept(2)` error (e.g. `EMFILE`) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A loopback listener forwarding this process's connections to one MariaDB relay (see the
/// module docs). Stops listening, and closes what it forwards, when dropped.
#[derive(Debug)]
pub(crate) struct LocalEgress {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for LocalEgress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LocalEgress {
    /// Binds `127.0.0.1:0` and forwards admitted connections to `to` through `net` (from the
    /// host's address). At most `max_connections` are forwarded at once; more are closed at
    /// accept. Connections from another process are closed at once, with a warning.
    ///
    /// Errors: [`DbError::Io`] when the listener cannot be bound.
    pub(crate) async fn open(
        net: firewall::Net,
        to: SocketAddr,
        max_connections: usize,
    ) -> Result<LocalEgress, DbError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|e| DbError::io(format!("binding the MariaDB egress to {to}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| DbError::io(format!("the MariaDB egress to {to}"), e))?;
        let slots = Arc::new(Semaphore::new(max_connections));
        let task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(%to, error = %e, "MariaDB egress: accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%to, max_connections, "MariaDB egress full: connection closed");
                    continue;
                };
                let net = net.clone();
                tokio::spawn(async move {
                    if !ours(&stream, peer).await {
                        tracing::warn!(%to, %peer, "MariaDB egress: a connection from another process, closed");
                        return;
                    }
                    if let Err(e) = forward(stream, &net, to).await {
                        tracing::debug!(%to, error = %e, "MariaDB egress connection ended");
                    }
                    drop(slot);
                });
            }
        });
        Ok(LocalEgress { addr, task })
    }

    /// The listener's address (`127.0.0.1:<port>`): what the client connects to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Whether this process holds the client side of `stream` (reads `/proc`, off the runtime).
async fn ours(stream: &TcpStream, peer: SocketAddr) -> bool {
    let Ok(local) = stream.local_addr() else {
        return false;
    };
    let me = std::process::id();
    tokio::task::spawn_blocking(move || {
        firewall::peer_process::is_owned_by(local, peer, me).unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// Copies bytes both ways between `inbound` and a new connection to `to` from the host's
/// address, until either side closes or nothing moved for [`IDLE_TIMEOUT`].
async fn forward(inbound: TcpStream, net: &firewall::Net, to: SocketAddr) -> std::io::Result<()> {
    let activity = firewall::Activity::detached();
    let mut inbound = firewall::Tracked::new(inbound, activity.clone());
    let mut outbound = tokio::time::timeout(CONNECT_TIMEOUT, net.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
    tokio::pin!(copy);
    loop {
        let wait = IDLE_TIMEOUT.saturating_sub(activity.idle_for());
        tokio::select! {
            r = &mut copy => return r.map(|_| ()),
            _ = tokio::time::sleep(wait) => {
                if activity.idle_for() >= IDLE_TIMEOUT {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle"));
                }
            }
        }
    }
}
