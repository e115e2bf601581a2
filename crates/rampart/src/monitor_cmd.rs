//! `rampart monitor …`: interoperation with the Prometheus ecosystem.

use std::path::PathBuf;

use anyhow::Context;
use lab::StateDir;
use topology::Topology;

/// `rampart monitor …`.
#[derive(clap::Subcommand)]
pub(crate) enum MonitorCmd {
    /// Write prometheus.yml (scraping every agent over mutual TLS), rampart-rules.yml (the
    /// built-in alert rules in the Prometheus format) and grafana-dashboard.json into DIR.
    Export {
        /// Output directory (created when missing).
        dir: PathBuf,
        /// Topology file (default: the running lab's, else the built-in one).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Client certificate Prometheus presents to the agents (default: the state
        /// directory's admin certificate).
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// The private key of --cert.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
}

/// Runs `cmd`; `topology` loads the topology (file, running lab or built-in).
pub(crate) fn run(
    cmd: MonitorCmd,
    state: &StateDir,
    topology: impl FnOnce(Option<PathBuf>) -> anyhow::Result<Topology>,
) -> anyhow::Result<()> {
    match cmd {
        MonitorCmd::Export {
            dir,
            file,
            cert,
            key,
        } => {
            let t = topology(file)?;
            let pki = pki::PkiPaths::new(state.root().join("pki"));
            // Absolute paths: prometheus.yml is read from wherever Prometheus runs.
            let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let pki = pki::PkiPaths::new(abs(pki.dir.clone()));
            let cert = abs(cert.unwrap_or_else(|| pki.admin_cert()));
            let key = abs(key.unwrap_or_else(|| pki.admin_key()));
            let written = monitor::export::export(&t, &pki, &cert, &key, &dir)
                .with_context(|| format!("writing into {}", dir.display()))?;
            for p in written {
                println!("wrote {}", p.display());
            }
            println!(
                "check with: promtool check config {}",
                dir.join("prometheus.yml").display()
            );
            Ok(())
        }
    }
}
