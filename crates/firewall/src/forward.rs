//! Byte relays on guarded listeners: MariaDB's relay (filtered TCP → its Unix socket) and
//! the replication egress (a local process's outbound connection → its host's address).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use crate::{Activity, GuardedListener, Net};

/// Where a relay forwards connections.
#[derive(Debug, Clone)]
pub enum Target {
    /// A Unix socket (e.g. a MariaDB server's socket).
    Unix(PathBuf),
    /// A TCP address, connected through the host's [`Net`] (so from its own address).
    Tcp {
        /// The calling host's network seam.
        net: Net,
        /// Destination.
        to: SocketAddr,
    },
}

/// Accepts admitted connections on `listener` and copies bytes both ways to a new
/// connection to `target`, until either side closes, the connection is idle (no byte either
/// way) for the listener's `idle_timeout_ms`, it is evicted, or `shutdown` is cancelled.
/// Runs until `shutdown` is cancelled; accept errors are waited out
/// ([`crate::accept_failed`]).
pub async fn relay(listener: GuardedListener, target: Target, shutdown: CancellationToken) {
    let target = Arc::new(target);
    let idle = listener.limits().idle_timeout();
    let service = listener.filter().service;
    loop {
        let admitted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match admitted {
            Ok(a) => {
                let target = target.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let activity = a.slot.activity().clone();
                    let peer = a.peer;
                    let closed = activity.closed().clone();
                    tokio::select! {
                        r = forward(a.stream, &target, &activity, idle) => match r {
                            Ok((up, down)) => tracing::debug!(%peer, ?target, up, down, "forwarded connection closed"),
                            Err(e) => tracing::warn!(%peer, ?target, error = %e, "forwarding failed"),
                        },
                        _ = closed.cancelled() => tracing::debug!(%peer, "forwarded connection evicted"),
                        _ = shutdown.cancelled() => {}
                    }
                    drop(a.slot);
                });
            }
            Err(e) => crate::accept_failed(service, &e).await,
        }
    }
}

/// Like [`relay`], for a local process that can only be pointed at a Unix socket path (the
/// application's MariaDB client connects through one per database host). The socket lives
/// in the state directory with mode 0600, so only the node's user reaches it; it is not a
/// network listener.
pub async fn egress_unix(listener: tokio::net::UnixListener, target: Target) -> io::Result<()> {
    let target = Arc::new(target);
    let idle = Duration::from_secs(3600);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let target = target.clone();
                tokio::spawn(async move {
                    let activity = Activity::detached();
                    if let Err(e) = forward(stream, &target, &activity, idle).await {
                        tracing::warn!(?target, error = %e, "forwarding failed");
                    }
                });
            }
            Err(e) => {
                if crate::is_transient_accept_error(&e) {
                    tracing::warn!(error = %e, "egress accept failed, continuing");
                    tokio::time::sleep(crate::ACCEPT_BACKOFF).await;
                } else {
                    return Err(e);
                }
            }
        }
    }
}

/// Connects to `target` and copies bytes both ways until both directions are shut down or
/// nothing moved for `idle`. Returns the byte counts (inbound → target, target → inbound).
async fn forward<S>(
    mut inbound: S,
    target: &Target,
    activity: &Arc<Activity>,
    idle: Duration,
) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut inbound = crate::Tracked::new(&mut inbound, activity.clone());
    let copy = async {
        match target {
            Target::Unix(path) => {
                let mut outbound = UnixStream::connect(path).await?;
                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
            }
            Target::Tcp { net, to } => {
                let mut outbound = net.connect(*to).await?;
                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
            }
        }
    };
    tokio::pin!(copy);
    loop {
        let wait = idle.saturating_sub(activity.idle_for());
        tokio::select! {
            r = &mut copy => return r,
            _ = tokio::time::sleep(wait) => {
                if activity.idle_for() >= idle {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("idle for {idle:?}")));
                }
            }
        }
    }
}
