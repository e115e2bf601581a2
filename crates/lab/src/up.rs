//! `rampart up`: validate the topology, resolve ports, create certificates and database
//! credentials, start one node process per host, and wait until every part is healthy and
//! the site answers through the load balancer.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use topology::{ConfigError, Role, Topology};

use crate::down::stop_nodes;
use crate::node::NodeStatus;
use crate::paths::process_alive;
use crate::status::{curl_line, LabFile};
use crate::{down, status, LabError, Mode, StateDir, Status};

/// What `up` is asked to do.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Topology file; `None` uses the built-in default.
    pub topology_file: Option<PathBuf>,
    /// Where everything the lab creates lives.
    pub state_dir: StateDir,
    /// Isolation mode.
    pub mode: Mode,
    /// The `rampart` binary to run as `rampart node` (normally the current executable).
    pub node_exe: PathBuf,
    /// How long to wait for every part to be healthy.
    pub timeout: Duration,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

/// What `up` brought up.
#[derive(Debug, Clone)]
pub struct UpReport {
    /// The lab's status once healthy.
    pub status: Status,
    /// Seconds from start to healthy.
    pub seconds: f64,
}

/// Brings the topology up and waits until it is healthy.
///
/// When part of the lab already runs from this state directory with the same topology, only
/// the hosts whose node is not running are started (e.g. after a node was killed).
///
/// Errors: [`LabError::Config`] for an invalid topology (exit 64), [`LabError::AlreadyUp`]
/// when nodes of a different topology run from this state directory, [`LabError::NotHealthy`] when a part is
/// not healthy within `timeout` (everything started is stopped again), and the errors of
/// certificate and credential creation.
pub async fn up(opts: &UpOptions) -> Result<UpReport, LabError> {
    let started = Instant::now();
    let state = &opts.state_dir;
    let mut t = match &opts.topology_file {
        Some(path) => Topology::load(path)?,
        None => Topology::default_topology(),
    };
    let source = opts
        .topology_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<built-in default>".into());
    if opts.mode == Mode::Netns {
        crate::netns::available().map_err(|why| {
            LabError::Unsupported(format!(
                "netns mode needs root, ip and nft: {why}; use --mode loopback"
            ))
        })?;
        t = t.in_netns();
    } else {
        check_loopback(&t, &source)?;
    }
    let running: Vec<String> = t
        .hosts
        .iter()
        .filter(|h| StateDir::read_pid(&state.node_pid_file(&h.name)).is_some_and(process_alive))
        .map(|h| h.name.clone())
        .collect();
    if running.is_empty() {
        if opts.mode == Mode::Netns {
            // Each load balancer has a network stack of its own: the standard ports are
            // free there, and the node runs as root.
            t.site.https_port = t.site.https_port.or(Some(443));
            t.site.http_port = t.site.http_port.or(Some(80));
            crate::netns::LabNetwork::new(&t).create()?;
        } else {
            crate::ports::resolve_public_ports(&mut t);
        }
        StateDir::create_dir(state.root())?;
        StateDir::write_atomic(&state.topology_file(), t.to_toml().as_bytes())?;
    } else {
        // Part of this lab runs already: start only the hosts that do not, provided it is
        // the same topology (the ports `up` resolved before are kept: the running load
        // balancer holds them now).
        let current = Topology::load(&state.topology_file()).ok();
        if let Some(cur) = &current {
            t.site.https_port = t.site.https_port.or(cur.site.https_port);
            t.site.http_port = t.site.http_port.or(cur.site.http_port);
        }
        if current.as_ref() != Some(&t) {
            return Err(LabError::AlreadyUp(state.root().to_path_buf()));
        }
    }
    pki::ensure(&state.pki().dir, &t)?;

    let mut warnings = Vec::new();
    if opts.mode == Mode::Loopback {
        warnings.push(
            "loopback mode is a development mode: every host shares this machine's network and \
             the firewall runs in user space, so a local process can bind a host's address and \
             pass it (run as root with ip and nft installed for netns mode: real kernel \
             firewalls)"
                .to_string(),
        );
    }
    if t.db_primary().is_some() {
        let engine = db::resolve_engine(&t)?;
        if matches!(engine, db::Engine::Sqlite) {
            let why = if t.database.engine == topology::DbEngine::Sqlite {
                "database.engine is \"sqlite\""
            } else {
                "MariaDB is not installed"
            };
            warnings.push(format!(
                "{why}: the data tier is one embedded SQLite file with no replication and no \
                 failover (install mariadb-server and set database.engine = \"auto\" for a \
                 primary and a replica)"
            ));
        }
        db::Credentials::ensure(state.root())?;
    }
    let lab = LabFile {
        mode: opts.mode,
        netns_prefix: (opts.mode == Mode::Netns).then(|| t.netns.prefix.clone()),
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        warnings: warnings.clone(),
    };
    let lab_json = serde_json::to_vec_pretty(&lab)
        .map_err(|e| LabError::Other(format!("encoding lab.json: {e}")))?;
    StateDir::write_atomic(&state.lab_file(), &lab_json)?;

    let bars = MultiProgress::with_draw_target(if opts.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{spinner} {prefix:8} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    // Spinners need a terminal; elsewhere (logs, CI) progress is one line per step.
    let plain = opts.progress && !std::io::stderr().is_terminal();
    let mut pending = Vec::new();
    let mut started_now = Vec::new();
    for h in &t.hosts {
        let (pid, what) = if running.contains(&h.name) {
            let pid = StateDir::read_pid(&state.node_pid_file(&h.name)).unwrap_or_default();
            (pid, "already running")
        } else {
            started_now.push(h.name.clone());
            (spawn_node(opts, &t, &h.name)?, "starting")
        };
        if plain {
            eprintln!("  {:8} {} {what} (pid {pid})", h.name, h.address);
        }
        let bar = bars.add(ProgressBar::new_spinner());
        bar.set_style(style.clone());
        bar.set_prefix(h.name.clone());
        bar.set_message(format!(
            "{} [{}] {what} (pid {pid})",
            h.address,
            h.roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        bar.enable_steady_tick(Duration::from_millis(120));
        pending.push((h.name.clone(), bar));
    }

    let result = wait_healthy(opts, &t, &mut pending, plain).await;
    for (_, bar) in &pending {
        bar.finish();
    }
    if let Err(e) = result {
        if running.is_empty() {
            let _ = down(state, false);
        } else {
            // Leave the parts that were running alone; stop only what this call started.
            let _ = stop_nodes(state, &started_now);
        }
        return Err(e);
    }
    let status = status(state).await?;
    Ok(UpReport {
        status,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Loopback mode puts every host on this machine's loopback interface.
fn check_loopback(t: &Topology, source: &str) -> Result<(), LabError> {
    for (i, h) in t.hosts.iter().enumerate() {
        if !h.address.is_loopback() {
            return Err(LabError::Config(ConfigError {
                file: source.to_string(),
                line: None,
                key: format!("hosts[{i}].address"),
                reason: format!(
                    "{} is not a loopback address, and loopback mode runs every host on this machine's loopback interface",
                    h.address
                ),
                fix: "use an address in 127.0.0.0/8 such as 127.80.0.11".into(),
            }));
        }
    }
    Ok(())
}

fn spawn_node(opts: &UpOptions, t: &Topology, host: &str) -> Result<u32, LabError> {
    let state = &opts.state_dir;
    let dir = state.host_dir(host);
    StateDir::create_dir(&dir)?;
    let _ = std::fs::remove_file(state.node_status_file(host));
    let log_path = state.node_log(host);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| LabError::io(&log_path, e))?;
    let log2 = log.try_clone().map_err(|e| LabError::io(&log_path, e))?;
    // In netns mode the node runs inside its host's namespace and loads the host's
    // ruleset there itself, exactly as on a real machine.
    let mut cmd = match opts.mode {
        Mode::Loopback => Command::new(&opts.node_exe),
        Mode::Netns => crate::netns::exec_in(&t.netns.namespace(host), &opts.node_exe),
    };
    cmd.arg("node")
        .arg("--host")
        .arg(host)
        .arg("--state-dir")
        .arg(state.root());
    if opts.mode == Mode::Netns {
        cmd.arg("--apply-firewall");
    }
    cmd.stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C meant for `up` reaches the nodes only through
        // `down`, in order.
        .process_group(0);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let child = cmd.spawn().map_err(|e| LabError::io(&opts.node_exe, e))?;
    let pid = child.id();
    StateDir::write_atomic(&state.node_pid_file(host), pid.to_string().as_bytes())?;
    Ok(pid)
}

async fn wait_healthy(
    opts: &UpOptions,
    t: &Topology,
    pending: &mut [(String, ProgressBar)],
    plain: bool,
) -> Result<(), LabError> {
    let state = &opts.state_dir;
    let deadline = Instant::now() + opts.timeout;
    let mut done = vec![false; pending.len()];
    loop {
        for (i, (host, bar)) in pending.iter().enumerate() {
            if done[i] {
                continue;
            }
            let pid = StateDir::read_pid(&state.node_pid_file(host));
            if !pid.is_some_and(process_alive) {
                return Err(LabError::Role {
                    host: host.clone(),
                    role: "node".into(),
                    reason: format!(
                        "the node process exited; its log says:\n{}",
                        log_tail(&state.node_log(host), 15)
                    ),
                });
            }
            let node: Option<NodeStatus> = std::fs::read(state.node_status_file(host))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(n) = node {
                let backends_up = n.backends.values().all(|up| *up);
                if n.healthy && backends_up {
                    done[i] = true;
                    bar.set_message(describe(&n));
                    if plain {
                        eprintln!("  {host:8} {}", describe(&n));
                    }
                } else {
                    bar.set_message(format!("waiting: {}", waiting_for(&n)));
                }
            }
        }
        if done.iter().all(|d| *d) {
            break;
        }
        if Instant::now() >= deadline {
            let what: Vec<String> = pending
                .iter()
                .zip(&done)
                .filter(|(_, d)| !**d)
                .map(|((h, _), _)| h.clone())
                .collect();
            return Err(LabError::NotHealthy {
                seconds: opts.timeout.as_secs(),
                what: what.join(", "),
                logs: state.root().join("hosts"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    probe_site(state, t, deadline).await
}

fn describe(n: &NodeStatus) -> String {
    let ports: Vec<String> = n.ports.iter().map(|(s, p)| format!("{s} {p}")).collect();
    let mut s = format!("healthy  {}", ports.join(", "));
    if let Some(d) = &n.db {
        s.push_str(&format!("  db {} {}", d.engine, d.role));
    }
    s
}

fn waiting_for(n: &NodeStatus) -> String {
    let mut parts = Vec::new();
    if let Some(d) = &n.db {
        if !d.healthy {
            parts.push(format!("database {}", d.role));
        }
    }
    for (b, up) in &n.backends {
        if !up {
            parts.push(format!("backend {b} health checks"));
        }
    }
    if parts.is_empty() {
        "roles starting".into()
    } else {
        parts.join(", ")
    }
}

/// One real HTTPS request through the load balancer, verified against the lab's CA.
async fn probe_site(state: &StateDir, t: &Topology, deadline: Instant) -> Result<(), LabError> {
    let Some(lb) = t.hosts_with(Role::Lb).next() else {
        return Ok(());
    };
    let tls = pki::ca_client_config(&state.pki())?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve(&t.site.domain, SocketAddr::new(lb.address, t.https_port()))
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| LabError::Other(format!("HTTPS client: {e}")))?;
    let url = format!(
        "https://{}{}/",
        t.site.domain,
        crate::status::port_suffix(t.https_port(), 443)
    );
    let mut last = String::new();
    while Instant::now() < deadline {
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(LabError::NotHealthy {
        seconds: 0,
        what: format!(
            "{url} through the load balancer ({last}); try: {}",
            curl_line(state, t)
        ),
        logs: state.root().join("hosts"),
    })
}

fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
