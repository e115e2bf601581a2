//! `rampart reload` and the standalone load balancer's signal handling: SIGHUP reloads
//! (certificates, upstream TLS material) and reopens the access log; SIGTERM/SIGINT stop.
//! The command reaches a standalone `rampart lb` through its `--pid-file`, the lab's load
//! balancers through their nodes' pid files; each process records the outcome of every
//! reload next to its pid file, which the command waits for and prints.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use lab::reload::ReloadOutcome;
use lab::StateDir;

/// `rampart reload` arguments.
#[derive(clap::Args)]
pub struct ReloadArgs {
    /// A standalone `rampart lb` started with this --pid-file (default: the lab in the
    /// state directory).
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Lab only: make this file the lab's topology first (same hosts; certificates,
    /// backends' health check, [balancer] limits and [site.tls] certificates may change).
    #[arg(short = 'f', long = "file", conflicts_with = "pid_file")]
    file: Option<PathBuf>,
    /// How long to wait for each load balancer's outcome, seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// Where a standalone load balancer records its reload outcomes: `<pid file>.reload.json`.
fn outcome_path(pid_file: &std::path::Path) -> PathBuf {
    let mut s = pid_file.as_os_str().to_owned();
    s.push(".reload.json");
    PathBuf::from(s)
}

/// Runs `rampart reload`; fails when any load balancer refused the reload.
pub fn run(state: &StateDir, args: ReloadArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.timeout);
    let results = match &args.pid_file {
        Some(pid_file) => {
            let pid: u32 = std::fs::read_to_string(pid_file)
                .with_context(|| format!("reading {}", pid_file.display()))?
                .trim()
                .parse()
                .with_context(|| format!("{} does not hold a pid", pid_file.display()))?;
            let o = lab::reload::signal_and_wait(pid, &outcome_path(pid_file), timeout)?;
            vec![(format!("rampart lb (pid {pid})"), o)]
        }
        None => lab::reload::reload(state, args.file.as_deref(), timeout)?,
    };
    let mut refused = 0;
    for (who, o) in &results {
        if o.ok {
            println!("{who}: reloaded, {}", o.message);
        } else {
            refused += 1;
            println!("{who}: {}", o.message);
        }
    }
    if refused > 0 {
        anyhow::bail!("{refused} load balancer(s) refused the reload");
    }
    Ok(())
}

/// Pairs `--tls-cert` with `--tls-key` by position.
///
/// Errors: the counts differ, or neither a pair nor a directory is given.
pub fn cert_pairs(
    certs: Vec<PathBuf>,
    keys: Vec<PathBuf>,
    have_dir: bool,
) -> anyhow::Result<Vec<pki::CertFiles>> {
    if certs.len() != keys.len() {
        anyhow::bail!(
            "{} --tls-cert but {} --tls-key: give each certificate its key, in the same order",
            certs.len(),
            keys.len()
        );
    }
    if certs.is_empty() && !have_dir {
        anyhow::bail!("no certificate: give --tls-cert FILE --tls-key FILE or --tls-cert-dir DIR");
    }
    Ok(certs
        .into_iter()
        .zip(keys)
        .map(|(cert, key)| pki::CertFiles { cert, key })
        .collect())
}

/// A pid file written at start and removed on drop.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes this process's id to `path`.
    pub fn write(path: PathBuf) -> anyhow::Result<PidFile> {
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing the pid file {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves signals until SIGTERM or SIGINT: SIGHUP reopens the access log and reloads the
/// certificates (recording the outcome next to `pid_file` when there is one).
pub async fn serve_signals(
    handle: &lb::LbHandle,
    pid_file: Option<&PidFile>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => {
                handle.reopen_logs();
                let before = handle.generation();
                let result = handle.reload(None).await;
                match &result {
                    Ok(r) => eprintln!("rampart lb: reloaded, {}", lab::reload::describe(r)),
                    Err(e) => eprintln!("rampart lb: reload refused, running configuration kept: {e}"),
                }
                if let Some(p) = pid_file {
                    let outcome = ReloadOutcome::of(&result, before);
                    let path = outcome_path(&p.0);
                    if let Err(e) = tokio::task::spawn_blocking(move || outcome.write(&path)).await? {
                        eprintln!("rampart lb: cannot record the reload outcome: {e}");
                    }
                }
            }
        }
    }
}
