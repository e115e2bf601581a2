//! `rampart lb`: the load balancer alone (standalone mode) and, as subcommands, the
//! runtime controls of a running load balancer through its admin socket —
//! `rampart lb drain BACKEND`, `rampart lb enable BACKEND`, `rampart lb status`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use lab::StateDir;

/// `rampart lb …`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct LbCmd {
    #[command(subcommand)]
    action: Option<LbAction>,
    #[command(flatten)]
    run: RunArgs,
}

/// The runtime controls.
#[derive(clap::Subcommand)]
enum LbAction {
    /// Send no new requests to BACKEND; requests in flight finish. Lasts until `enable`
    /// or a restart.
    Drain {
        /// Backend name (`web-01` in the lab; `b1`, `b2`, … for `rampart lb`).
        backend: String,
        #[command(flatten)]
        target: Target,
    },
    /// Put a drained BACKEND back in rotation.
    Enable {
        /// Backend name.
        backend: String,
        #[command(flatten)]
        target: Target,
    },
    /// Every backend's state: up, ejected, draining, weight, requests in flight.
    Status {
        #[command(flatten)]
        target: Target,
    },
}

/// Which load balancer: an admin socket, or the lab's (every load balancer host of the
/// running lab, or `--host`).
#[derive(clap::Args)]
struct Target {
    /// The admin socket of a `rampart lb --admin-socket PATH`.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// A load balancer host of the running lab (default: every one).
    #[arg(long)]
    host: Option<String>,
}

/// The standalone load balancer's flags.
#[derive(clap::Args)]
struct RunArgs {
    /// HTTPS listener address.
    #[arg(long, required = true)]
    listen: Option<SocketAddr>,
    /// PEM certificate chain for clients (repeat with --tls-key for more certificates,
    /// each chosen by SNI for the names it covers; the first is the default).
    #[arg(long = "tls-cert")]
    tls_certs: Vec<PathBuf>,
    /// The PEM private key of the --tls-cert at the same position.
    #[arg(long = "tls-key")]
    tls_keys: Vec<PathBuf>,
    /// A directory of further certificates: NAME.pem (or NAME.crt) with NAME.key, read
    /// again on every reload.
    #[arg(long)]
    tls_cert_dir: Option<PathBuf>,
    /// Write this process's id here (for `rampart reload --pid-file`); removed on exit.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// A backend, ADDR[,weight=N][,backup] (repeat for more; named b1, b2, …).
    #[arg(long = "backend", required = true)]
    backends: Vec<lb::BackendSpec>,
    /// Speak TLS to the backends, verifying them against this PEM CA file.
    #[arg(long)]
    backend_ca: Option<PathBuf>,
    /// An HTTP listener (same address as --listen): it redirects to HTTPS, or with
    /// --http-proxy forwards plain HTTP to the backends.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// The --http-listen listener proxies plain HTTP to the backends instead of
    /// redirecting to HTTPS.
    #[arg(long, requires = "http_listen")]
    http_proxy: bool,
    /// The --http-proxy listener also serves HTTP/2 with prior knowledge (h2c, RFC 9113
    /// §3.3), like nginx `listen … http2`. Without it, plain HTTP is HTTP/1.1 only.
    #[arg(long, requires = "http_proxy")]
    h2c: bool,
    /// A name the site answers to (repeat for more; others get 421). Default: any.
    #[arg(long = "site-name")]
    site_names: Vec<String>,
    /// Health-check path (GET, 2xx = up).
    #[arg(long, default_value = "/")]
    health_path: String,
    /// Access log file.
    #[arg(long)]
    access_log: Option<PathBuf>,
    /// Access log line format: combined (nginx combined + backend and timings), common
    /// (NCSA) or json.
    #[arg(long, default_value = "combined", value_parser = parse_log_format)]
    access_log_format: lb::AccessLogFormat,
    /// Worker threads (default: the CPUs this process may run on, from its affinity
    /// mask).
    #[arg(long)]
    threads: Option<usize>,
    /// Balancing algorithm: round-robin, weighted-round-robin, least-connections,
    /// power-of-two-choices or consistent-hash.
    #[arg(long, default_value = "weighted-round-robin", value_parser = parse_algorithm)]
    balance: lb::Algorithm,
    /// consistent-hash: hash this request header instead of the client address.
    #[arg(long)]
    hash_header: Option<String>,
    /// Pin each client to a backend with this cookie (re-pinned when it goes down).
    #[arg(long)]
    sticky_cookie: Option<String>,
    /// A proxy in front (a CDN, another load balancer) whose X-Forwarded-For names the
    /// client, as an address or CIDR network (repeat): rate limits, hashing and the access
    /// log then use the rightmost untrusted address of that field. Default: none.
    #[arg(long = "trusted-proxy", value_parser = crate::agent_cmd::parse_net)]
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Serve `rampart lb drain|enable|status --socket PATH` on this Unix socket (mode
    /// 0600).
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Serve the load balancer's metrics (per backend, per status class, connections,
    /// TLS handshakes) on `GET /metrics` at this address, plain HTTP, as a Prometheus
    /// scrape target.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Only these source networks may scrape --metrics-listen (repeat; default: any).
    #[arg(long = "metrics-allow", requires = "metrics_listen", value_parser = crate::agent_cmd::parse_net)]
    metrics_allow: Vec<ipnet::IpNet>,
}

/// How the standalone load balancer runs, beside its configuration.
pub(crate) struct RunOptions {
    /// Worker threads (default: the CPUs of the affinity mask).
    pub(crate) threads: Option<usize>,
    /// Where to write the process id.
    pub(crate) pid_file: Option<PathBuf>,
    /// The `/metrics` listener and the networks that may scrape it (empty: any).
    pub(crate) metrics: Option<(SocketAddr, Vec<ipnet::IpNet>)>,
}

/// `--balance NAME` → the algorithm (both `-` and `_` spellings).
fn parse_algorithm(name: &str) -> Result<lb::Algorithm, String> {
    lb::Algorithm::parse(name).ok_or_else(|| {
        let names: Vec<String> = lb::Algorithm::ALL
            .iter()
            .map(|(_, n)| n.replace('_', "-"))
            .collect();
        format!("unknown algorithm {name:?}; one of {}", names.join(", "))
    })
}

/// `--access-log-format NAME` → the format.
fn parse_log_format(name: &str) -> Result<lb::AccessLogFormat, String> {
    lb::AccessLogFormat::parse(name)
        .ok_or_else(|| format!("unknown format {name:?}; one of combined, common, json"))
}

/// Runs `rampart lb …`: a subcommand against a running load balancer, or a standalone
/// load balancer through `serve(config, options)` (until SIGTERM).
pub(crate) fn run(
    cmd: LbCmd,
    state: &StateDir,
    serve: impl FnOnce(lb::LbConfig, RunOptions) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if let Some(action) = cmd.action {
        return admin(action, state);
    }
    let r = cmd.run;
    let Some(listen) = r.listen else {
        anyhow::bail!("--listen is required");
    };
    let certs = crate::reload_cmd::cert_pairs(r.tls_certs, r.tls_keys, r.tls_cert_dir.is_some())?;
    let mut cfg = lb::LbConfig::standalone(lb::StandaloneOptions {
        balancing: lb::Balancing {
            algorithm: r.balance,
            hash_header: r.hash_header.map(|h| h.to_ascii_lowercase()),
            sticky_cookie: r.sticky_cookie,
            ..lb::Balancing::default()
        },
        listen,
        http_listen: r.http_listen,
        http_mode: if r.http_proxy {
            lb::HttpMode::Proxy
        } else {
            lb::HttpMode::Redirect
        },
        h2c: r.h2c,
        tls: lb::StandaloneTls {
            certs,
            cert_dir: r.tls_cert_dir,
            backend_ca: r.backend_ca,
        },
        backends: r.backends,
        site_names: r.site_names,
        health_path: r.health_path,
        access_log: r.access_log,
        access_log_format: r.access_log_format,
        admin_socket: r.admin_socket,
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    cfg.balancer.trusted_proxies = r.trusted_proxies;
    serve(
        cfg,
        RunOptions {
            threads: r.threads,
            pid_file: r.pid_file,
            metrics: r.metrics_listen.map(|a| (a, r.metrics_allow)),
        },
    )
}

/// The admin sockets `target` names: its `--socket`, or the lab's load balancers'.
fn sockets(target: &Target, state: &StateDir) -> anyhow::Result<Vec<(String, PathBuf)>> {
    if let Some(s) = &target.socket {
        return Ok(vec![(s.display().to_string(), s.clone())]);
    }
    let hosts: Vec<String> = match &target.host {
        Some(h) => vec![h.clone()],
        None => {
            let dir = state.root().join("hosts");
            let mut hosts: Vec<String> = std::fs::read_dir(&dir)
                .with_context(|| format!("no running lab in {}", state.root().display()))?
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            hosts.sort();
            hosts
        }
    };
    let found: Vec<(String, PathBuf)> = hosts
        .into_iter()
        .map(|h| {
            let p = state.host_dir(&h).join(lb::ADMIN_SOCKET_FILE);
            (h, p)
        })
        .filter(|(_, p)| p.exists())
        .collect();
    if found.is_empty() {
        anyhow::bail!(
            "no load balancer admin socket under {} (is the lab up? for `rampart lb` give --socket)",
            state.root().display()
        );
    }
    Ok(found)
}

fn admin(action: LbAction, state: &StateDir) -> anyhow::Result<()> {
    let (command, target) = match &action {
        LbAction::Drain { backend, target } => (format!("drain {backend}"), target),
        LbAction::Enable { backend, target } => (format!("enable {backend}"), target),
        LbAction::Status { target } => ("status".to_string(), target),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    for (lb_name, socket) in sockets(target, state)? {
        let answer = rt
            .block_on(lb::admin::request(&socket, &command))
            .with_context(|| format!("load balancer {lb_name}"))?;
        match &action {
            LbAction::Status { .. } => {
                println!("{lb_name}:");
                println!(
                    "  {:<16} {:>4} {:>8} {:>8} {:>6} {:>6} {:>8}",
                    "backend", "up", "ejected", "draining", "weight", "backup", "active"
                );
                for b in answer["backends"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<16} {:>4} {:>8} {:>8} {:>6} {:>6} {:>8}",
                        b["name"].as_str().unwrap_or("?"),
                        b["up"].to_string(),
                        b["ejected"].to_string(),
                        b["draining"].to_string(),
                        b["weight"].to_string(),
                        b["backup"].to_string(),
                        b["active_requests"].to_string()
                    );
                }
            }
            _ => println!(
                "{lb_name}: {} {}",
                answer["backend"].as_str().unwrap_or("?"),
                if answer["draining"] == serde_json::Value::Bool(true) {
                    "draining (no new requests; in-flight ones finish)"
                } else {
                    "enabled"
                }
            ),
        }
    }
    Ok(())
}
