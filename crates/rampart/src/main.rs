//! `rampart`: the command line. Parses arguments, calls the `lab` library, maps errors to
//! exit codes (0 ok, 1 failure, 2 usage, 64 bad configuration). Nothing else lives here.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use lab::{LabError, Mode, StateDir, Status};
use topology::Topology;

/// Exit code for a bad configuration (the file, key and fix are printed).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "rampart",
    version,
    about = "A secured, monitored, load-balanced web infrastructure (www.foobar.com) from one binary"
)]
struct Cli {
    /// State directory: certificates, datadirs, logs, pid files.
    #[arg(
        long,
        global = true,
        env = "RAMPART_STATE_DIR",
        default_value = ".rampart"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write the default topology to a file to edit.
    Init {
        /// Where to write it.
        #[arg(short = 'o', long, default_value = "rampart.toml")]
        output: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Validate a topology file and print its firewall policy.
    Check {
        /// Topology file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Bring the topology up on this machine and wait until it is healthy.
    Up {
        /// Topology file (default: the built-in reference design).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Isolation mode.
        #[arg(long, value_enum, default_value_t = ModeArg::Loopback)]
        mode: ModeArg,
        /// Return once healthy and leave it running.
        #[arg(short = 'd', long)]
        detach: bool,
        /// Seconds to wait for every part to become healthy.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Stop everything `up` started from the state directory.
    Down {
        /// Also delete the state directory (certificates, data, logs).
        #[arg(long)]
        purge: bool,
    },
    /// Show what runs where.
    Status {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run one host's roles (started by `up`; on a real machine, run it yourself).
    Node {
        /// The host name in the topology.
        #[arg(long)]
        host: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Loopback,
    Netns,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        // Every log line passes the per-callsite rate limit: a flood of failing requests
        // cannot fill the disk through the log.
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(telemetry::log_limit::RateLimit::global().clone());
        tracing_subscriber::registry().with(filter).with(fmt).init();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rampart: {e:#}");
            let config = e.chain().any(|c| {
                c.is::<topology::ConfigError>()
                    || matches!(c.downcast_ref::<LabError>(), Some(LabError::Config(_)))
            });
            if config {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let state = StateDir::new(&cli.state_dir);
    match cli.command {
        Cmd::Init { output, force } => {
            if output.exists() && !force {
                anyhow::bail!("{} exists; pass --force to overwrite it", output.display());
            }
            std::fs::write(&output, topology::DEFAULT_TOML)
                .with_context(|| format!("writing {}", output.display()))?;
            println!(
                "wrote {}; edit it, then: rampart up -f {}",
                output.display(),
                output.display()
            );
            Ok(())
        }
        Cmd::Check { file } => {
            let t = Topology::load(&file)?;
            let policy = topology::Policy::compile(&t);
            println!("{}: ok, {} hosts", file.display(), t.hosts.len());
            for r in &policy.rules {
                let from = match &r.sources {
                    topology::Sources::Any => "any".to_string(),
                    topology::Sources::Nets(n) => n
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                };
                let callers = match &r.callers {
                    topology::Callers::Anyone => String::new(),
                    topology::Callers::Identities(ids) => format!(
                        " as {}",
                        ids.iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    topology::Callers::LocalServer => " as the host's own mariadbd".to_string(),
                };
                println!(
                    "  {:8} {:12} tcp/{:<5} from {from}{callers}",
                    r.host,
                    r.service.as_str(),
                    r.port
                );
            }
            Ok(())
        }
        Cmd::Up {
            file,
            mode,
            detach,
            timeout,
        } => {
            let opts = lab::UpOptions {
                topology_file: file,
                state_dir: state.clone(),
                mode: match mode {
                    ModeArg::Loopback => Mode::Loopback,
                    ModeArg::Netns => Mode::Netns,
                },
                node_exe: std::env::current_exe().context("locating the rampart binary")?,
                timeout: Duration::from_secs(timeout),
                progress: true,
            };
            eprintln!(
                "rampart: bringing up {} in {} mode (state in {})",
                opts.topology_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "the default topology".into()),
                opts.mode,
                state.root().display()
            );
            let rt = runtime()?;
            let report = rt.block_on(lab::up(&opts))?;
            print_up(&report.status, report.seconds);
            if detach {
                return Ok(());
            }
            println!("\nRunning. Press Ctrl-C (or send SIGTERM) to stop everything.");
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    },
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            });
            for line in lab::down(&state, false)? {
                println!("stopped {line}");
            }
            Ok(())
        }
        Cmd::Down { purge } => {
            let stopped = lab::down(&state, purge)?;
            if stopped.is_empty() {
                println!("nothing was running from {}", state.root().display());
            }
            for line in stopped {
                println!("stopped {line}");
            }
            Ok(())
        }
        Cmd::Status { json } => {
            let status = runtime()?.block_on(lab::status(&state))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_table(&status);
            }
            Ok(())
        }
        Cmd::Node { host } => {
            lab::node::run(&state, &host)?;
            Ok(())
        }
    }
}

fn print_up(s: &Status, seconds: f64) {
    println!("\nwww.foobar.com is up ({seconds:.1} s):\n");
    print_table(s);
    println!("\n  site       {}", s.endpoints.https);
    println!("  redirect   {} -> https", s.endpoints.http);
    println!(
        "  dashboard  {}  (admin certificate: {})",
        s.endpoints.dashboard,
        s.admin_cert.display()
    );
    println!(
        "\nReach it through the load balancer, verifying the chain:\n\n  {}\n",
        s.curl
    );
    println!(
        "Dashboard:\n\n  curl --cacert {} --cert {} --key {} {}\n",
        s.ca_cert.display(),
        s.admin_cert.display(),
        s.admin_key.display(),
        s.endpoints.dashboard
    );
    println!("Stop everything with: rampart down");
}

fn print_table(s: &Status) {
    println!("mode {}  state {}", s.mode, s.state_dir.display());
    println!(
        "{:<8} {:<13} {:<8} {:<8} {:>7} {:<9} {:<28} ports",
        "HOST", "ADDRESS", "PID", "HEALTHY", "QPS", "ALERT", "ROLES"
    );
    for h in &s.hosts {
        let ports: Vec<String> = h.ports.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        println!(
            "{:<8} {:<13} {:<8} {:<8} {:>7} {:<9} {:<28} {}",
            h.name,
            h.address,
            h.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            if h.healthy { "yes" } else { "NO" },
            h.qps
                .map(|q| format!("{q:.1}"))
                .unwrap_or_else(|| "-".into()),
            h.alert.as_deref().unwrap_or("-"),
            h.roles.join(","),
            ports.join(" ")
        );
    }
    println!(
        "database {} primary {}",
        s.db.engine.as_deref().unwrap_or("-"),
        s.db.primary.as_deref().unwrap_or("-")
    );
    for n in &s.db.nodes {
        println!(
            "  {:<8} {:<8} pid {:<8} port {:<5} lag {}",
            n.host,
            n.role,
            n.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            n.port,
            n.lag_seconds
                .map(|l| format!("{l:.0} s"))
                .unwrap_or_else(|| "-".into())
        );
    }
    for w in &s.warnings {
        println!("WARNING: {w}");
    }
}
