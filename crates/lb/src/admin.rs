//! The load balancer's local admin endpoint: a Unix stream socket (mode 0600, so only its
//! owner — root in the lab — may connect; it is never reachable over the network) that
//! takes one command per connection, as one line, and answers one line:
//!
//! ```text
//! drain web-01    → {"ok":true,"backend":"web-01","draining":true}
//! enable web-01   → {"ok":true,"backend":"web-01","draining":false}
//! status          → {"ok":true,"backends":[{"name":"web-01","up":true,…},…]}
//! anything else   → {"ok":false,"error":"…"}
//! ```
//!
//! Draining a backend (HAProxy `set server … state drain`) sends it no new requests;
//! requests in flight finish. The state lives in memory: a restart enables every backend.
//! Bounds: a command line of at most [`MAX_LINE`] bytes read within [`READ_TIMEOUT`], at
//! most [`MAX_CLIENTS`] connections at once (more wait in the kernel's backlog).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use crate::balancer::Balancer;

/// Longest command line, bytes.
pub const MAX_LINE: u64 = 512;
/// Time a client has to send its command (and to read the answer).
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Admin connections served at once.
pub const MAX_CLIENTS: usize = 8;

/// Why an admin request failed (the `rampart lb drain|enable|status` side).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Connecting to, writing to or reading from the socket failed (no load balancer
    /// listening there, permissions).
    #[error("admin socket {}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// No answer within [`READ_TIMEOUT`].
    #[error("admin socket {}: no answer within {READ_TIMEOUT:?}", path.display())]
    Timeout {
        /// The socket.
        path: PathBuf,
    },
    /// The load balancer refused the command (e.g. no such backend).
    #[error("{0}")]
    Refused(String),
}

/// Binds the admin socket at `path` (replacing a stale one) with mode 0600 and serves it
/// until `shutdown` changes; the socket file is removed then. Commands act on the live
/// generation's backends (see [`crate::reload`]); a reload carries the drain flags over.
pub(crate) fn spawn(
    path: &Path,
    live: crate::reload::Live,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = shutdown.changed() => break,
                p = clients.clone().acquire_owned() => p,
            };
            let Ok(permit) = permit else { break };
            let accepted = tokio::select! {
                _ = shutdown.changed() => break,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let balancer = live.load().balancer.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = handle(stream, &balancer).await {
                    tracing::debug!(error = %e, "admin connection failed");
                }
            });
        }
        // The socket file is removed by the handle's shutdown, not here: a successor may
        // already be bound at the same path.
    });
    Ok(())
}

async fn handle(stream: UnixStream, balancer: &Balancer) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE));
    tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let answer = execute(line.trim(), balancer);
    tokio::time::timeout(READ_TIMEOUT, async {
        write.write_all(answer.as_bytes()).await?;
        write.write_all(b"\n").await?;
        write.shutdown().await
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Runs one command; the JSON answer line.
fn execute(line: &str, balancer: &Balancer) -> String {
    let mut words = line.split_whitespace();
    let refuse = |error: String| serde_json::json!({"ok": false, "error": error}).to_string();
    match (words.next(), words.next(), words.next()) {
        (Some(cmd @ ("drain" | "enable")), Some(name), None) => {
            let draining = cmd == "drain";
            if balancer.set_draining(name, draining) {
                tracing::info!(backend = name, draining, "backend drain state changed");
                serde_json::json!({"ok": true, "backend": name, "draining": draining}).to_string()
            } else {
                let names: Vec<&str> = balancer.backends().iter().map(|b| &*b.name).collect();
                refuse(format!(
                    "no backend named {name:?} (backends: {})",
                    names.join(", ")
                ))
            }
        }
        (Some("status"), None, None) => {
            serde_json::json!({"ok": true, "backends": crate::status_of(balancer)}).to_string()
        }
        _ => refuse(format!(
            "unknown command {line:?}: use `drain BACKEND`, `enable BACKEND` or `status`"
        )),
    }
}

/// Sends `command` (`drain NAME`, `enable NAME`, `status`) to the admin socket at `path`
/// and returns the answer's JSON object when it says `"ok": true`.
///
/// Errors: [`AdminError::Io`] when nothing listens at `path`, [`AdminError::Timeout`],
/// [`AdminError::Refused`] with the load balancer's reason.
pub async fn request(path: &Path, command: &str) -> Result<serde_json::Value, AdminError> {
    let io_err = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    let exchange = async {
        let mut stream = UnixStream::connect(path).await.map_err(io_err)?;
        stream
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io_err)?;
        let mut answer = String::new();
        stream
            .take(64 * 1024)
            .read_to_string(&mut answer)
            .await
            .map_err(io_err)?;
        Ok(answer)
    };
    let answer = tokio::time::timeout(READ_TIMEOUT, exchange)
        .await
        .map_err(|_| AdminError::Timeout {
            path: path.to_path_buf(),
        })??;
    let value: serde_json::Value = serde_json::from_str(answer.trim())
        .map_err(|e| AdminError::Refused(format!("unreadable answer {answer:?}: {e}")))?;
    if value["ok"] == serde_json::Value::Bool(true) {
        Ok(value)
    } else {
        Err(AdminError::Refused(
            value["error"].as_str().unwrap_or("refused").to_string(),
        ))
    }
}
