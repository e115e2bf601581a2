//! `rampart`: the command line. Parses arguments, calls the `lab` library, maps errors to
//! exit codes (0 ok, 1 failure, 2 usage, 64 bad configuration), and names the process's
//! allocator. Nothing else lives here.

// Denied, not forbidden: `alloc`, the global allocator, is the workspace's one module with
// `unsafe` (GlobalAlloc is an unsafe trait); every other crate forbids it.
#![deny(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod agent_cmd;
mod alerts_cmd;
mod alloc;
mod db_cmd;
mod lb_cmd;
mod monitor_cmd;
mod top_cmd;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use lab::{LabError, Mode, StateDir, Status};
use topology::Topology;

mod reload_cmd;

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
// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Write a shipped topology (the default, or `scaled`) to a file to edit.
    Init {
        /// Where to write it.
        #[arg(short = 'o', long, default_value = "rampart.toml")]
        output: PathBuf,
        /// Which one: `default` (the reference design: the database on the two web
        /// servers) or `scaled` (lb-01, web-01/02, db-01 primary with db-02/03 replicas on
        /// hosts of their own, mon-01).
        #[arg(long, value_enum, default_value_t = TopologyArg::Default)]
        topology: TopologyArg,
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
        /// Isolation mode: netns (every host a network namespace with its own nftables
        /// ruleset; needs root, ip and nft), loopback (development: 127.x addresses and a
        /// user-space firewall a local process can pass), or auto (netns when possible).
        #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
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
        /// Load the host's nftables ruleset (table inet rampart) into the network
        /// namespace this process runs in before starting the roles: on a real machine,
        /// the machine's firewall.
        #[arg(long)]
        apply_firewall: bool,
    },
    /// Run a command inside a host's network namespace (netns mode), e.g.
    /// `rampart exec client -- curl https://www.foobar.com/`.
    Exec {
        /// A host of the topology, or `client` (the Internet).
        host: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Run a load balancer alone in front of HTTP backends (standalone mode), e.g.
    /// `rampart lb --listen 0.0.0.0:443 --tls-cert site.pem --tls-key site.key --backend
    /// 10.0.0.11:8080 --backend 10.0.0.12:8080`. Runs until SIGTERM or Ctrl-C, then drains.
    /// `rampart lb drain|enable BACKEND` and `rampart lb status` control a running one.
    Lb(Box<lb_cmd::LbCmd>),
    /// Reload load balancers without a restart: certificates (new handshakes get the new
    /// ones) and, in the lab, the topology's backends, health check and [balancer] limits
    /// (new requests use them, requests in flight finish). Sends SIGHUP to the lab's load
    /// balancer nodes, or to the standalone `rampart lb` of --pid-file.
    Reload(reload_cmd::ReloadArgs),
    /// The monitoring service's active alerts (pending and firing).
    Alerts {
        /// One JSON array (Prometheus' alert objects).
        #[arg(long)]
        json: bool,
    },
    /// Silences: suppress the notifications of matching alerts for a while.
    Silence {
        #[command(subcommand)]
        command: alerts_cmd::SilenceCmd,
    },
    /// Run the monitoring agent alone: host metrics on /metrics (like node_exporter),
    /// optionally pushed to a monitoring service, e.g. `rampart agent --listen
    /// 0.0.0.0:9100` or `rampart agent --push https://mon-01:9090/api/v1/push --cert
    /// host.pem --key host.key --ca ca.pem`. Runs until SIGTERM or Ctrl-C.
    Agent(agent_cmd::AgentArgs),
    /// A live terminal view of the running lab: hosts, QPS, p99 latency, errors, alerts
    /// (q quits).
    Top,
    /// Interoperate with Prometheus and Grafana: `rampart monitor export DIR`.
    Monitor {
        #[command(subcommand)]
        command: monitor_cmd::MonitorCmd,
    },
    /// The database tier: status, switchover, failover.
    Db {
        #[command(subcommand)]
        command: db_cmd::DbCmd,
    },
    /// The kernel firewall: show, check, export, probe, block, unblock.
    Fw {
        #[command(subcommand)]
        command: FwCmd,
    },
}

#[derive(Subcommand)]
enum FwCmd {
    /// The ruleset as loaded in a host of the running lab (every host without HOST), with
    /// counters and blocked addresses.
    Show {
        /// Host name.
        host: Option<String>,
    },
    /// Validate every host's ruleset with `nft -c` without applying anything.
    Check {
        /// Topology file (default: the running lab's, else the built-in one).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
    },
    /// Print a host's nftables file for a real machine (addresses as in the topology).
    Export {
        /// Host name.
        host: String,
        /// Topology file (default: the running lab's, else the built-in one).
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
    },
    /// Try every host -> every host x every port in use and compare with the policy; exit 1
    /// on any mismatch.
    Probe {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drop everything from ADDR (an address or network) at the edge.
    Block {
        /// Address or CIDR network.
        addr: String,
        /// How long, e.g. 30s, 10m, 2h (default: until unblocked).
        #[arg(long = "for")]
        duration: Option<String>,
    },
    /// Lift a block.
    Unblock {
        /// Address or CIDR network.
        addr: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TopologyArg {
    Default,
    Scaled,
}

impl TopologyArg {
    fn text(self) -> &'static str {
        match self {
            TopologyArg::Default => topology::DEFAULT_TOML,
            TopologyArg::Scaled => topology::SCALED_TOML,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Auto,
    Loopback,
    Netns,
}

/// The process's allocator. Every request through the load balancer makes dozens of small,
/// short-lived allocations (header maps, buffers, futures); mimalloc's per-thread free lists
/// serve them with fewer instructions than the C library's allocator (measured with
/// `bench/lb-standalone.sh`: lower CPU time per request). See [`alloc`] for how it is called.
#[global_allocator]
static ALLOCATOR: alloc::Mimalloc = alloc::Mimalloc;

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
        Cmd::Init {
            output,
            topology,
            force,
        } => {
            if output.exists() && !force {
                anyhow::bail!("{} exists; pass --force to overwrite it", output.display());
            }
            std::fs::write(&output, topology.text())
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
            let (mode, why) = match mode {
                ModeArg::Auto => Mode::auto(),
                ModeArg::Loopback => (
                    Mode::Loopback,
                    "asked for; a development mode: its firewall is in user space and a local \
                     process can pass it"
                        .into(),
                ),
                ModeArg::Netns => (Mode::Netns, "asked for".into()),
            };
            let opts = lab::UpOptions {
                topology_file: file,
                state_dir: state.clone(),
                mode,
                node_exe: std::env::current_exe().context("locating the rampart binary")?,
                timeout: Duration::from_secs(timeout),
                progress: true,
            };
            eprintln!(
                "rampart: bringing up {} in {} mode ({why}); state in {}",
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
        Cmd::Node {
            host,
            apply_firewall,
        } => {
            lab::node::run(&state, &host, apply_firewall)?;
            Ok(())
        }
        Cmd::Exec { host, command } => {
            use std::os::unix::process::CommandExt;
            let (mode, t) = lab::fw::running(&state)?;
            if mode != Mode::Netns {
                anyhow::bail!(
                    "`rampart exec` needs a lab in netns mode; in loopback mode every host shares this machine's network, so run the command directly"
                );
            }
            if host != "client" && t.host(&host).is_none() {
                anyhow::bail!(
                    "no host named {host} (hosts: {}, client)",
                    t.hosts
                        .iter()
                        .map(|h| h.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let mut cmd = lab::netns::exec_in(&t.netns.namespace(&host), &command[0]);
            cmd.args(&command[1..]);
            let err = cmd.exec();
            Err(anyhow::anyhow!("running ip netns exec: {err}"))
        }
        Cmd::Fw { command } => fw(&state, command),
        Cmd::Alerts { json } => alerts_cmd::alerts(&state, json),
        Cmd::Silence { command } => alerts_cmd::silence(&state, command),
        Cmd::Reload(args) => reload_cmd::run(&state, args),
        Cmd::Db { command } => db_cmd::run(&state, command),
        Cmd::Lb(cmd) => lb_cmd::run(*cmd, &state, run_standalone_lb),
        Cmd::Agent(args) => agent_cmd::run(args),
        Cmd::Top => top_cmd::run(&state),
        Cmd::Monitor { command } => {
            monitor_cmd::run(command, &state, |file| fw_topology(&state, file))
        }
    }
}

/// Runs a standalone load balancer until SIGTERM or SIGINT, then drains it, on
/// [`serve::runtime`]: `opts.threads` workers, by default one per CPU of this process's
/// affinity mask, and tokio's current-thread runtime when that is one. With
/// `opts.metrics`, its registry is also served on `GET /metrics` there.
fn run_standalone_lb(cfg: lb::LbConfig, opts: lb_cmd::RunOptions) -> anyhow::Result<()> {
    let threads = serve::worker_threads(opts.threads);
    let rt = serve::runtime(Some(threads)).context("starting the async runtime")?;
    rt.block_on(async move {
        let mut registry = prometheus_client::registry::Registry::default();
        let http = telemetry::HttpMetrics::register(&mut registry);
        let handle = lb::start(cfg, &mut registry, &http).await?;
        let metrics = match opts.metrics {
            Some((listen, allow)) => Some(
                monitor::serve_metrics(listen, &allow, Arc::new(registry), "lb")
                    .await
                    .with_context(|| format!("the --metrics-listen listener on {listen}"))?,
            ),
            None => None,
        };
        let pid = opts.pid_file.map(reload_cmd::PidFile::write).transpose()?;
        eprintln!(
            "rampart lb: https on {}{}{}, {} worker thread(s); SIGTERM or Ctrl-C stops it",
            handle.https_addr(),
            handle
                .http_addr()
                .map(|a| format!(", http on {a}"))
                .unwrap_or_default(),
            metrics
                .as_ref()
                .map(|m| format!(", metrics on {}", m.addr()))
                .unwrap_or_default(),
            threads
        );
        reload_cmd::serve_signals(&handle, pid.as_ref()).await?;
        // Drain: stop accepting, let requests in flight finish (limits.drain_timeout_ms).
        serve::RoleHandle::shutdown(&handle).await;
        drop(metrics);
        Ok(())
    })
}

/// The topology `fw check`/`fw export` work on: the file given, else the running lab's,
/// else the built-in default.
fn fw_topology(state: &StateDir, file: Option<PathBuf>) -> anyhow::Result<Topology> {
    Ok(match file {
        Some(f) => Topology::load(&f)?,
        None => match lab::fw::running(state) {
            Ok((_, t)) => t,
            Err(_) => Topology::default_topology(),
        },
    })
}

fn fw(state: &StateDir, command: FwCmd) -> anyhow::Result<()> {
    match command {
        FwCmd::Show { host } => {
            for (h, text) in lab::fw::show(state, host.as_deref())? {
                println!("# {h}\n{text}");
            }
            Ok(())
        }
        FwCmd::Check { file } => {
            let t = fw_topology(state, file)?;
            let mut bad = 0;
            for (h, r) in lab::fw::check(&t)? {
                match r {
                    Ok(()) => println!("{h:8} ok"),
                    Err(e) => {
                        bad += 1;
                        println!("{h:8} REFUSED: {e}");
                    }
                }
            }
            if bad > 0 {
                anyhow::bail!("{bad} ruleset(s) would not load");
            }
            Ok(())
        }
        FwCmd::Export { host, file } => {
            let t = fw_topology(state, file)?;
            print!("{}", lab::fw::export(&t, &host)?);
            Ok(())
        }
        FwCmd::Probe { json } => {
            let report = lab::fw::probe(state)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{:<9} {:<9} {:>5} {:<13} {:<9} {:<9} {:<8}",
                    "FROM", "TO", "PORT", "SERVICE", "EXPECTED", "OBSERVED", ""
                );
                for r in &report.results {
                    let verdict = |a: bool| if a { "allowed" } else { "denied" };
                    let ok = r.expected_allowed == r.observed_allowed;
                    println!(
                        "{:<9} {:<9} {:>5} {:<13} {:<9} {:<9} {}",
                        r.from,
                        r.to,
                        r.port,
                        r.service.as_deref().unwrap_or("-"),
                        verdict(r.expected_allowed),
                        format!("{}", verdict(r.observed_allowed)),
                        if ok {
                            String::new()
                        } else {
                            format!("MISMATCH ({:?})", r.observed).to_lowercase()
                        }
                    );
                }
            }
            let flows = report.results.len();
            let allowed = report.results.iter().filter(|r| r.observed_allowed).count();
            // With --json the summary goes to stderr so stdout stays one JSON document.
            let summary = format!(
                "probe ({} mode): {flows} flows, {allowed} allowed, {} denied; {} unexpected allowed, {} unexpected denied",
                report.mode,
                flows - allowed,
                report.unexpected_allowed,
                report.unexpected_denied
            );
            if json {
                eprintln!("{summary}");
            } else {
                println!("{summary}");
            }
            if report.unexpected_allowed + report.unexpected_denied > 0 {
                anyhow::bail!("the firewall does not match the policy");
            }
            Ok(())
        }
        FwCmd::Block { addr, duration } => {
            let net = parse_net(&addr)?;
            let ttl = duration.as_deref().map(parse_duration).transpose()?;
            let hosts = lab::fw::block(state, net, ttl)?;
            println!(
                "blocked {net} at {}{}",
                hosts.join(", "),
                duration.map(|d| format!(" for {d}")).unwrap_or_default()
            );
            Ok(())
        }
        FwCmd::Unblock { addr } => {
            let net = parse_net(&addr)?;
            let hosts = lab::fw::unblock(state, net)?;
            println!("unblocked {net} at {}", hosts.join(", "));
            Ok(())
        }
    }
}

fn parse_net(s: &str) -> anyhow::Result<lab::IpNet> {
    s.parse::<lab::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(lab::IpNet::from))
        .map_err(|_| anyhow::anyhow!("{s:?} is not an address or CIDR network"))
}

/// `30s`, `10m`, `2h`, `1d` or plain seconds.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration such as 30s, 10m or 2h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => anyhow::bail!("{s:?} is not a duration such as 30s, 10m or 2h"),
    };
    if secs == 0 {
        anyhow::bail!("a block lasts at least 1 s");
    }
    Ok(Duration::from_secs(secs))
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
    if s.mode == Mode::Netns {
        println!(
            "This machine reaches the lab through its interface on the lab subnet. From the\n\
             Internet's side (the client namespace, where the site's names resolve to the\n\
             load balancer):\n\n  rampart exec client -- curl --cacert {} {}\n",
            s.ca_cert.display(),
            s.endpoints.https
        );
    }
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
    let label = match s.mode {
        Mode::Netns => "netns (every host a network namespace with its own nftables ruleset)",
        Mode::Loopback => {
            "loopback (development mode: the firewall is in user space and a local process can pass it)"
        }
    };
    println!("mode {label}  state {}", s.state_dir.display());
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
