//! `rampart agent`: the monitoring agent alone, on any machine — host metrics on
//! `/metrics` like node_exporter, and optionally pushes to a Rampart monitoring service
//! over mutual TLS with a spool for outages.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// `rampart agent …`.
#[derive(clap::Args)]
pub(crate) struct AgentArgs {
    /// `/metrics` listener address (plain HTTP, like node_exporter's :9100).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Only these source networks may scrape (repeat; default: any).
    #[arg(long = "allow", value_parser = parse_net)]
    allow: Vec<ipnet::IpNet>,
    /// Also push to this monitoring service ingest URL, e.g.
    /// https://mon-01:9090/api/v1/push (needs --cert, --key and --ca).
    #[arg(long, requires_all = ["cert", "key", "ca"])]
    push: Option<String>,
    /// Connect to this address instead of resolving the --push URL's host (whose name is
    /// still the one verified on the monitor's certificate).
    #[arg(long, requires = "push")]
    connect: Option<SocketAddr>,
    /// PEM client certificate presented to the monitor (a host certificate of its CA).
    #[arg(long, requires = "push")]
    cert: Option<PathBuf>,
    /// The PEM private key of --cert.
    #[arg(long, requires = "push")]
    key: Option<PathBuf>,
    /// PEM CA certificate(s) the monitor's certificate must chain to.
    #[arg(long, requires = "push")]
    ca: Option<PathBuf>,
    /// Time between pushes, e.g. 1s, 15s.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    interval: Duration,
    /// Keep pushes the monitor has not taken yet in this directory (default: in memory,
    /// lost on exit).
    #[arg(long, requires = "push")]
    spool_dir: Option<PathBuf>,
    /// The spool's bound in bytes; the oldest pushes are dropped (and counted) beyond it.
    #[arg(long, default_value_t = monitor::push::DEFAULT_SPOOL_BYTES)]
    spool_max_bytes: u64,
    /// Also forward the samples to this Prometheus remote-write 1.0 receiver, e.g.
    /// http://prometheus:9090/api/v1/write (every --interval).
    #[arg(long)]
    remote_write: Option<String>,
    /// PEM CA certificate(s) for an https --remote-write URL.
    #[arg(long, requires = "remote_write")]
    remote_write_ca: Option<PathBuf>,
    /// The `instance` label of the forwarded series (default: this machine's host name).
    #[arg(long)]
    instance: Option<String>,
    /// The `job` label of the forwarded series.
    #[arg(long, default_value = "rampart-agent")]
    job: String,
}

/// `500ms`, `1s`, `15s`, `1m`: a positive interval.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not an interval such as 500ms, 1s or 1m");
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(format!("{s:?}: the interval must be more than 0"));
    }
    Ok(d)
}

/// `--allow NET`: a CIDR network or a single address.
pub(crate) fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or CIDR network"))
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub(crate) fn run(args: AgentArgs) -> anyhow::Result<()> {
    let push = match args.push {
        Some(url) => Some(monitor::StandalonePush {
            url,
            connect: args.connect,
            cert: args.cert.context("--push needs --cert")?,
            key: args.key.context("--push needs --key")?,
            ca: args.ca.context("--push needs --ca")?,
            interval: args.interval,
            spool_dir: args.spool_dir,
            spool_max_bytes: args.spool_max_bytes,
        }),
        None => None,
    };
    let remote_write = match args.remote_write {
        Some(url) => {
            let instance = match args.instance {
                Some(i) => i,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .context("reading the host name for the instance label; give --instance")?,
            };
            Some(monitor::StandaloneRemoteWrite {
                url,
                ca: args.remote_write_ca,
                labels: vec![("instance".into(), instance), ("job".into(), args.job)],
                interval: args.interval,
                spool_max_bytes: args.spool_max_bytes,
            })
        }
        None => None,
    };
    let cfg = monitor::StandaloneAgentConfig {
        listen: args.listen,
        allow: args.allow,
        push,
        remote_write,
    };
    // One thread: the agent's work is a few reads of /proc per scrape or push.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let handle = monitor::start_standalone_agent(cfg).await?;
        eprintln!(
            "rampart agent: /metrics on http://{}/metrics; SIGTERM or Ctrl-C stops it",
            handle.addr()
        );
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        serve::RoleHandle::shutdown(&handle).await;
        anyhow::Ok(())
    })
}
