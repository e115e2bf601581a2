//! `rampart reload` in the lab: how the command reaches the running load balancers, and
//! what their nodes do on SIGHUP.
//!
//! The command (optionally) replaces the lab's resolved topology with a new file whose
//! hosts are unchanged, issues what the PKI now lacks (e.g. a site certificate for a new
//! alias), then sends SIGHUP to the node of every `lb` host (its pid file). On SIGHUP a
//! node reopens its logs, reads the resolved topology again and reloads its load balancer
//! ([`lb::LbHandle::reload`]): certificates, backends, health check and `[balancer]`
//! limits, with no request lost. The outcome is written to `hosts/<name>/reload.json`
//! ([`ReloadOutcome`]), which the command waits for and prints.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use topology::{ConfigError, Topology};

use crate::paths::process_alive;
use crate::{LabError, Mode, StateDir};

/// The result of one reload, as a load balancer process records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// Whether the new configuration and certificates are in force.
    pub ok: bool,
    /// The generation serving afterwards (unchanged when refused).
    pub generation: u64,
    /// What changed, or why it was refused (the running configuration was kept).
    pub message: String,
    /// When it finished, milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

impl ReloadOutcome {
    /// The outcome of `result`, stamped now.
    pub fn of(result: &Result<lb::ReloadReport, lb::LbError>, previous_generation: u64) -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        match result {
            Ok(r) => ReloadOutcome {
                ok: true,
                generation: r.generation,
                message: describe(r),
                unix_ms,
            },
            Err(e) => ReloadOutcome {
                ok: false,
                generation: previous_generation,
                message: format!("refused, running configuration kept: {e}"),
                unix_ms,
            },
        }
    }

    /// Writes it atomically to `path`.
    pub fn write(&self, path: &Path) -> Result<(), LabError> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| LabError::Other(format!("encoding the reload outcome: {e}")))?;
        StateDir::write_atomic(path, &bytes)
    }

    /// Reads one from `path`; `None` when missing or unreadable.
    pub fn read(path: &Path) -> Option<ReloadOutcome> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

/// A one-line summary of a successful reload.
pub fn describe(r: &lb::ReloadReport) -> String {
    let mut s = format!(
        "generation {}: certificates {}; backends {}",
        r.generation,
        r.certificates
            .iter()
            .map(|c| c.names.join(" "))
            .collect::<Vec<_>>()
            .join(", "),
        r.backends.join(", ")
    );
    if !r.down.is_empty() {
        s.push_str(&format!(" (not up yet: {})", r.down.join(", ")));
    }
    if !r.needs_restart.is_empty() {
        s.push_str(&format!(
            "; changed but kept until a restart: {}",
            r.needs_restart.join(", ")
        ));
    }
    s
}

/// `hosts/<name>/reload.json`.
pub fn outcome_file(state: &StateDir, host: &str) -> PathBuf {
    state.host_dir(host).join("reload.json")
}

/// Sends SIGHUP to `pid` and waits up to `timeout` for `outcome` to hold a result newer
/// than the one there before.
///
/// Errors: the process is gone, cannot be signalled, or wrote nothing in time.
pub fn signal_and_wait(
    pid: u32,
    outcome: &Path,
    timeout: Duration,
) -> Result<ReloadOutcome, LabError> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let before = ReloadOutcome::read(outcome).map(|o| o.unix_ms);
    if !process_alive(pid) {
        return Err(LabError::Other(format!("process {pid} is not running")));
    }
    let raw = i32::try_from(pid).map_err(|_| LabError::Other(format!("bad pid {pid}")))?;
    kill(Pid::from_raw(raw), Signal::SIGHUP)
        .map_err(|e| LabError::Other(format!("cannot signal process {pid}: {e}")))?;
    let start = Instant::now();
    loop {
        if let Some(o) = ReloadOutcome::read(outcome) {
            if Some(o.unix_ms) != before {
                return Ok(o);
            }
        }
        if start.elapsed() > timeout {
            return Err(LabError::Other(format!(
                "process {pid} got SIGHUP but reported no reload within {timeout:?} (see its log)"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reloads the load balancers of the lab running from `state`: with `file`, first makes it
/// the lab's topology (its hosts must be those running; listener ports left unset keep the
/// running ones) and issues missing certificates. Returns each `lb` host with its outcome.
///
/// Errors: no lab is up ([`LabError::NotUp`]); `file` is invalid or changes the hosts
/// ([`LabError::Config`]); a node is not running or does not answer in `timeout`.
pub fn reload(
    state: &StateDir,
    file: Option<&Path>,
    timeout: Duration,
) -> Result<Vec<(String, ReloadOutcome)>, LabError> {
    let (mode, current) = crate::fw::running(state)?;
    let t = match file {
        None => current,
        Some(path) => {
            let mut t = Topology::load(path)?;
            if mode == Mode::Netns {
                t = t.in_netns();
            }
            t.site.https_port = t.site.https_port.or(current.site.https_port);
            t.site.http_port = t.site.http_port.or(current.site.http_port);
            if t.hosts != current.hosts {
                return Err(LabError::Config(ConfigError {
                    file: path.display().to_string(),
                    line: None,
                    key: "hosts".into(),
                    reason: "the hosts (names, addresses or roles) differ from the running lab's"
                        .into(),
                    fix: "reload changes certificates, backends' settings and limits; to change hosts run `rampart down` then `rampart up -f` with this file".into(),
                }));
            }
            StateDir::write_atomic(&state.topology_file(), t.to_toml().as_bytes())?;
            t
        }
    };
    pki::ensure(&state.pki().dir, &t)?;
    let mut out = Vec::new();
    for h in t.hosts_with(topology::Role::Lb) {
        let pid = StateDir::read_pid(&state.node_pid_file(&h.name))
            .filter(|p| process_alive(*p))
            .ok_or_else(|| LabError::Other(format!("the node of {} is not running", h.name)))?;
        let outcome = signal_and_wait(pid, &outcome_file(state, &h.name), timeout)?;
        out.push((h.name.clone(), outcome));
    }
    Ok(out)
}

/// What a node does on SIGHUP for its load balancer: reads the resolved topology again,
/// derives the load balancer's configuration as at start (same network seam and access
/// log as `base`), reloads, and records the outcome in `hosts/<host>/reload.json`.
pub async fn on_hangup(state: StateDir, host: String, base: lb::LbConfig, lb: Arc<lb::LbHandle>) {
    let loaded = tokio::task::spawn_blocking({
        let path = state.topology_file();
        move || Topology::load(&path)
    })
    .await;
    let cfg = match loaded {
        Ok(Ok(t)) => lb::LbConfig::from_topology(&t, &host, state.pki(), base.net.clone())
            .map(|mut c| {
                c.access_log = base.access_log.clone();
                c
            })
            .ok_or_else(|| format!("{host} no longer holds the lb role in the topology")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("reading the topology: {e}")),
    };
    let generation = lb.generation();
    let outcome = match cfg {
        Ok(cfg) => ReloadOutcome::of(&lb.reload(Some(cfg)).await, generation),
        Err(e) => {
            tracing::error!(%host, error = %e, "reload refused; the running configuration is kept");
            ReloadOutcome::of(&Err(lb::LbError::Reload(e)), generation)
        }
    };
    let path = outcome_file(&state, &host);
    match tokio::task::spawn_blocking(move || outcome.write(&path)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(%host, "cannot record the reload outcome: {e}"),
        Err(e) => tracing::warn!(%host, "cannot record the reload outcome: {e}"),
    }
}
