//! The `mariadbd` child: start, readiness, supervision with restart back-off, stop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::OptsBuilder;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::options::Paths;
use super::replication::after_restart;
use super::{lock, startup_error, DbNodeStatus, ServerConfig};
use crate::DbError;

/// How long `mariadbd` may take to accept on its socket after being started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a `mariadbd` gets to shut down after `SIGTERM` before `SIGKILL`.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The first restart waits this long after `mariadbd` exits; each further one twice as
/// long, up to [`RESTART_MAX`].
const RESTART_MIN: Duration = Duration::from_secs(1);
/// The longest wait between restarts.
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A server that ran this long before exiting restarts after [`RESTART_MIN`] again.
const RESTART_RESET: Duration = Duration::from_secs(60);

/// Whether a server the node starts is to come back as a replica: `<state>/db/cluster.json`
/// names another primary (or, before any exists, the topology made it a replica). A server
/// the supervisor restarts after a crash is always started as one.
///
/// Such a server starts with `--init-rpl-role=SLAVE`, which makes MariaDB's crash recovery
/// roll back the transactions its binary log holds but its engine had only prepared (the
/// tail a semi-synchronous primary wrote with `AFTER_SYNC` and was killed while waiting for
/// the acknowledgement: never acknowledged to a client, never on a replica). Without it
/// recovery commits them, and a former primary rejoins with transactions the new primary
/// does not have (errant GTIDs). Since MariaDB 10.6.17/10.11.7 (MDEV-33465) this option, no
/// longer `rpl_semi_sync_slave_enabled`, selects that truncation; a server that stays
/// primary must not truncate (its replicas may hold that tail already).
pub(super) fn starts_as_replica(state_dir: &Path, host: &str, topology_replica: bool) -> bool {
    match crate::cluster::ClusterState::load(state_dir) {
        Ok(Some(c)) => c.primary != host,
        _ => topology_replica,
    }
}

/// Starts `mariadbd` on `p`'s option file, its output appended to the error log, in its own
/// process group (a terminal's Ctrl-C reaches the node, which stops the server in order; a
/// killed node leaves it to `rampart down`). `replica`: see [`starts_as_replica`].
pub(super) fn spawn_mariadbd(mariadbd: &Path, p: &Paths, replica: bool) -> Result<Child, DbError> {
    let log_file = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)
            .map_err(|e| DbError::io(format!("opening {}", p.log.display()), e))
    };
    let mut cmd = Command::new(mariadbd);
    // `--defaults-file` must come first.
    cmd.arg(format!("--defaults-file={}", p.cnf.display()));
    if replica {
        cmd.arg("--init-rpl-role=SLAVE");
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log_file()?)
        .stderr(log_file()?)
        .process_group(0)
        .spawn()
        .map_err(|e| DbError::io(format!("starting {}", mariadbd.display()), e))
}

/// What [`supervise`] needs to start the server again.
pub(super) struct Restart {
    pub(super) mariadbd: PathBuf,
    /// Admin connection options (the server's socket, root's password).
    pub(super) admin: OptsBuilder,
    pub(super) cfg: ServerConfig,
    pub(super) p: Paths,
    pub(super) pid: Arc<AtomicU32>,
    pub(super) status: Arc<Mutex<DbNodeStatus>>,
    pub(super) creds: crate::Credentials,
}

/// Owns the running `mariadbd`: when it exits on its own (crash, OOM kill, `kill -9`) it is
/// started again on the same datadir after a back-off (1 s, doubling to 30 s; reset after a
/// minute of running), like systemd's `Restart=on-failure` with a growing `RestartSec`.
/// InnoDB recovers from its redo log (`innodb_flush_log_at_trx_commit=1`: no committed
/// transaction is lost) and a replica resumes replication from its saved GTID position; the
/// relay and egress stay bound throughout. On `stop` the server is stopped cleanly.
pub(super) async fn supervise(mut child: Child, r: Restart, stop: CancellationToken) {
    let host = r.cfg.host.clone();
    let mut backoff = RESTART_MIN;
    let mut running_since = Instant::now();
    loop {
        let exit = tokio::select! {
            _ = stop.cancelled() => {
                terminate(child, &host).await;
                r.pid.store(0, Ordering::Relaxed);
                return;
            }
            exit = child.wait() => exit,
        };
        r.pid.store(0, Ordering::Relaxed);
        {
            let mut s = lock(&r.status);
            s.pid = None;
            s.healthy = false;
            s.lag_seconds = None;
        }
        if running_since.elapsed() >= RESTART_RESET {
            backoff = RESTART_MIN;
        }
        let how = exit.map_or_else(|e| e.to_string(), |s| s.to_string());
        tracing::warn!(host = %host, "mariadbd exited ({how}); restarting in {backoff:?}");
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RESTART_MAX);
            // A server restarted after it exited on its own never takes writes again by
            // itself (a primary comes back read-only and the controller hands its role to
            // a replica): it recovers as a replica, whatever cluster.json says yet.
            match spawn_mariadbd(&r.mariadbd, &r.p, true) {
                Ok(mut c) => {
                    let pid = c.id();
                    r.pid.store(pid.unwrap_or(0), Ordering::Relaxed);
                    {
                        let mut s = lock(&r.status);
                        s.pid = pid;
                        s.restarts += 1;
                    }
                    running_since = Instant::now();
                    match wait_ready(&r.cfg, &r.p, &mut c).await {
                        Ok(()) => {
                            tracing::info!(host = %host, pid, "mariadbd restarted");
                            after_restart(&r).await;
                        }
                        Err(e) => tracing::warn!(host = %host, "restarted mariadbd not ready: {e}"),
                    }
                    child = c;
                    break;
                }
                Err(e) => tracing::warn!(host = %host, "cannot restart mariadbd: {e}"),
            }
        }
    }
}

/// Waits until the server accepts on its socket; fails early when it exits.
pub(super) async fn wait_ready(
    cfg: &ServerConfig,
    p: &Paths,
    child: &mut Child,
) -> Result<(), DbError> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(startup_error(
                &cfg.host,
                format!("mariadbd exited with {status}"),
                &p.log,
            ));
        }
        if tokio::net::UnixStream::connect(&p.socket).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(startup_error(
                &cfg.host,
                format!(
                    "no connection on {} after {} s",
                    p.socket.display(),
                    READY_TIMEOUT.as_secs()
                ),
                &p.log,
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops every `mariadbd` left running on this datadir by an earlier run: the pid file's
/// process and any other live process started with our option file (a lost pid file would
/// otherwise leave the datadir locked).
pub(super) async fn stop_stale(p: &Paths, host: &str) {
    let mut pids = processes_mentioning(&p.cnf);
    if let Some(pid) = read_pid(&p.pid).filter(|pid| is_ours(*pid, &p.cnf)) {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    for pid in pids {
        tracing::warn!(host, pid, "stopping a mariadbd left by an earlier run");
        let target = Pid::from_raw(pid);
        let _ = kill(target, Signal::SIGTERM);
        if wait_gone(pid, &p.cnf, STOP_TIMEOUT).await {
            continue;
        }
        let _ = kill(target, Signal::SIGKILL);
        wait_gone(pid, &p.cnf, Duration::from_secs(5)).await;
    }
}

/// Live processes other than this one started with `--defaults-file=<cnf>`.
fn processes_mentioning(cnf: &Path) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or_default();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me && is_ours(*pid, cnf))
        .collect()
}

pub(crate) fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 1)
}

/// Whether `pid` is a live (not zombie: its command line is empty) process started with
/// exactly `--defaults-file=<cnf>`, as this module starts `mariadbd`.
pub(crate) fn is_ours(pid: i32, cnf: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let arg = format!("--defaults-file={}", cnf.display());
    String::from_utf8_lossy(&cmdline)
        .split('\0')
        .any(|a| a == arg)
}

async fn wait_gone(pid: i32, cnf: &Path, bound: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < bound {
        if !is_ours(pid, cnf) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    !is_ours(pid, cnf)
}

/// `SIGTERM`, wait up to [`STOP_TIMEOUT`], then `SIGKILL`.
pub(super) async fn terminate(mut child: Child, host: &str) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        if let Ok(Ok(status)) = tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            tracing::info!(host, pid, %status, "mariadbd stopped");
            return;
        }
        tracing::warn!(host, pid, "mariadbd ignored SIGTERM; killing it");
    }
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}
