//! `rampart down`: stop every process the lab started from a state directory.
//!
//! Found through pid files only (`hosts/*/node.pid` and each MariaDB server's pid file),
//! then a sweep of `/proc` for processes whose command line names this state directory (a
//! node or `mariadbd` whose pid file was lost). Data (datadirs, certificates, logs) stays
//! unless `purge` is set.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::paths::process_alive;
use crate::{LabError, StateDir};

/// Stops everything started from `state`. Nodes get SIGTERM (they stop their MariaDB
/// server cleanly) and up to 20 s, then SIGKILL; the same for MariaDB servers left
/// running. Idempotent: with nothing running it stops nothing.
///
/// Returns a line per process stopped, e.g. `node web-01 (pid 1234)`.
/// With `purge`, the whole state directory is removed afterwards.
pub fn down(state: &StateDir, purge: bool) -> Result<Vec<String>, LabError> {
    let netns_prefix = std::fs::read(state.lab_file())
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::status::LabFile>(&b).ok())
        .and_then(|l| l.netns_prefix);
    let hosts = host_names(state);
    let mut stopped = stop_nodes(state, &hosts);

    let mut servers = Vec::new();
    for host in &hosts {
        let pid_file = db::mariadbd_pid_file(state.root(), host);
        if let Some(pid) = StateDir::read_pid(&pid_file) {
            if process_alive(pid) && cmdline_mentions(pid, state.root()) {
                signal(pid, Signal::SIGTERM);
                servers.push((format!("mariadbd {host} (pid {pid})"), pid));
            }
        }
    }
    stopped.extend(wait_or_kill(servers, Duration::from_secs(30)));

    // Anything else still naming this state directory: a node or server whose pid file
    // was lost. Never touches processes that do not mention the directory.
    let strays: Vec<(String, u32)> = stray_processes(state.root())
        .into_iter()
        .map(|pid| {
            signal(pid, Signal::SIGTERM);
            (format!("stray process (pid {pid})"), pid)
        })
        .collect();
    stopped.extend(wait_or_kill(strays, Duration::from_secs(10)));

    // Netns mode: the namespaces (and with them their veths and nftables tables), the
    // operator's interface and the /etc/netns entries.
    if let Some(prefix) = netns_prefix {
        let settings = topology::NetnsSettings {
            prefix,
            ..topology::NetnsSettings::default()
        };
        stopped.extend(crate::netns::sweep(&settings)?);
    }

    let _ = std::fs::remove_file(state.lab_file());
    if purge && state.root().exists() {
        std::fs::remove_dir_all(state.root()).map_err(|e| LabError::io(state.root(), e))?;
    }
    Ok(stopped)
}

/// Stops the nodes of `hosts` (SIGTERM, up to 20 s, then SIGKILL) and removes their pid
/// and status files; other hosts are left alone. Returns a line per node stopped.
pub(crate) fn stop_nodes(state: &StateDir, hosts: &[String]) -> Vec<String> {
    let nodes: Vec<(String, u32)> = hosts
        .iter()
        .filter_map(|host| {
            let pid =
                StateDir::read_pid(&state.node_pid_file(host)).filter(|p| process_alive(*p))?;
            signal(pid, Signal::SIGTERM);
            Some((format!("node {host} (pid {pid})"), pid))
        })
        .collect();
    let stopped = wait_or_kill(nodes, Duration::from_secs(20));
    for host in hosts {
        let _ = std::fs::remove_file(state.node_pid_file(host));
        let _ = std::fs::remove_file(state.node_status_file(host));
    }
    stopped
}

/// Host directories under `hosts/`.
pub(crate) fn host_names(state: &StateDir) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(state.root().join("hosts"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

fn wait_or_kill(procs: Vec<(String, u32)>, grace: Duration) -> Vec<String> {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && procs.iter().any(|(_, pid)| process_alive(*pid)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for (what, pid) in &procs {
        if process_alive(*pid) {
            tracing::warn!("{what} did not stop after {grace:?}; sending SIGKILL");
            signal(*pid, Signal::SIGKILL);
        }
    }
    let kill_deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < kill_deadline && procs.iter().any(|(_, pid)| process_alive(*pid)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    procs.into_iter().map(|(what, _)| what).collect()
}

fn cmdline_mentions(pid: u32, dir: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = dir.as_os_str().as_encoded_bytes();
    raw.split(|b| *b == 0)
        .any(|arg| arg.windows(needle.len()).any(|w| w == needle))
}

/// Programs the lab starts: `rampart node` and MariaDB's server and its installer (the
/// kernel keeps the first 15 bytes of a program name in `/proc/<pid>/comm`).
const OUR_PROGRAMS: [&str; 4] = ["rampart", "mariadbd", "mysqld", "mariadb-install"];

/// Live processes of [`OUR_PROGRAMS`] whose command line names `dir`, other than this
/// process and its ancestors (a shell or `up` that ran this `down` names the directory too).
fn stray_processes(dir: &Path) -> Vec<u32> {
    let spared = self_and_ancestors();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    !spared.contains(pid)
                        && process_alive(*pid)
                        && is_our_program(*pid)
                        && cmdline_mentions(*pid, dir)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One of [`OUR_PROGRAMS`], or this very binary under another name.
fn is_our_program(pid: u32) -> bool {
    let named_ours = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| OUR_PROGRAMS.contains(&comm.trim_end()));
    named_ours || {
        let exe = |p: &str| std::fs::read_link(format!("/proc/{p}/exe")).ok();
        exe(&pid.to_string()).is_some_and(|e| Some(e) == exe("self"))
    }
}

/// This process and every ancestor, from the `PPid:` lines of `/proc/<pid>/status`.
fn self_and_ancestors() -> Vec<u32> {
    let mut chain = vec![std::process::id()];
    while let Some(&pid) = chain.last() {
        let parent = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PPid:"))
                    .and_then(|v| v.trim().parse::<u32>().ok())
            })
            .filter(|p| *p > 1 && !chain.contains(p));
        match parent {
            Some(p) => chain.push(p),
            None => break,
        }
    }
    chain
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_include_self_and_parent() {
        let chain = self_and_ancestors();
        assert_eq!(chain[0], std::process::id());
        assert!(chain.len() >= 2, "a test runs under some parent: {chain:?}");
    }

    #[test]
    fn the_sweep_spares_other_programs_naming_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        // A shell whose command line names the directory, as `sh -c "rampart --state-dir
        // DIR down"` would: not a program the lab starts, so never a stray.
        // `read` is a shell builtin: the shell itself waits on its stdin, no child process.
        let mut sleeper = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("read line # {}", dir.path().display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let found = stray_processes(dir.path());
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert!(!found.contains(&sleeper.id()), "{found:?}");
    }
}
