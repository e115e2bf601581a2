//! `rampart status`: what runs where, read from the nodes' status files and the monitoring
//! service. The JSON shape is a contract other tools rely on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use topology::{Role, Topology};

use crate::node::NodeStatus;
use crate::paths::process_alive;
use crate::{LabError, Mode, StateDir};

/// A node's status file older than this counts as not healthy.
const STALE_AFTER: Duration = Duration::from_secs(5);

/// `lab.json`: what `up` recorded about the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LabFile {
    pub mode: Mode,
    /// Netns mode: the namespace prefix (`down` removes what carries it).
    #[serde(default)]
    pub netns_prefix: Option<String>,
    pub started_unix: u64,
    pub warnings: Vec<String>,
}

/// The whole lab, as `rampart status --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// `loopback` (or `netns`).
    pub mode: Mode,
    /// Absolute state directory.
    pub state_dir: PathBuf,
    /// The internal CA certificate (pass to `curl --cacert`).
    pub ca_cert: PathBuf,
    /// The operator's client certificate (dashboard, monitor API, agents' `/metrics`).
    pub admin_cert: PathBuf,
    /// Its key.
    pub admin_key: PathBuf,
    /// The site's domain, e.g. `www.foobar.com`.
    pub site: String,
    /// Where to reach things.
    pub endpoints: Endpoints,
    /// Every host.
    pub hosts: Vec<HostView>,
    /// The data tier.
    pub db: DbView,
    /// Things the operator should know (e.g. no replication with SQLite).
    pub warnings: Vec<String>,
    /// The exact command that fetches the site through the load balancer.
    pub curl: String,
}

/// Where to reach the lab's public and operator endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    /// `https://www.foobar.com[:port]/`.
    pub https: String,
    /// `http://www.foobar.com[:port]/` (redirects to https).
    pub http: String,
    /// The load balancer's address (what www.foobar.com resolves to).
    pub lb_address: String,
    /// The monitoring dashboard (needs the admin certificate).
    pub dashboard: String,
    /// The monitoring API base (needs the admin certificate).
    pub monitor_api: String,
}

/// One host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostView {
    /// Host name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// Network namespace (always null in loopback mode).
    pub netns: Option<String>,
    /// The node process, when running.
    pub pid: Option<u32>,
    /// Roles.
    pub roles: Vec<String>,
    /// The node runs, reported within the last 5 s, and all its roles are healthy.
    pub healthy: bool,
    /// Requests per second over the monitor's window (10 s by default), from the monitoring
    /// service; null for hosts without an agent, whose pushes have stopped (stale), or when
    /// the monitor is unreachable.
    pub qps: Option<f64>,
    /// The QPS alert's state for this host (`inactive`, `pending`, `firing`); null for
    /// hosts without an agent or when the monitor is unreachable.
    pub alert: Option<String>,
    /// Service name → port.
    pub ports: BTreeMap<String, u16>,
}

/// The data tier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbView {
    /// `mariadb` or `sqlite` (null when no node reported yet).
    pub engine: Option<String>,
    /// The host holding the primary: the one `<state>/db/cluster.json` names (it follows
    /// failovers), else the topology's `db-primary`.
    pub primary: Option<String>,
    /// Every database node.
    pub nodes: Vec<DbNodeView>,
}

/// One database node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbNodeView {
    /// Host name.
    pub host: String,
    /// `primary` or `replica`.
    pub role: String,
    /// The `mariadbd` process (null for SQLite).
    pub pid: Option<u32>,
    /// The host's MariaDB port.
    pub port: u16,
    /// The server's Unix socket.
    pub socket: Option<PathBuf>,
    /// Replication lag in seconds (replicas), null when unknown.
    pub lag_seconds: Option<f64>,
}

pub(crate) fn port_suffix(port: u16, default: u16) -> String {
    if port == default {
        String::new()
    } else {
        format!(":{port}")
    }
}

/// The exact curl line that reaches the site through the load balancer, verifying the
/// chain against the lab's CA with SNI = the site domain.
pub(crate) fn curl_line(state: &StateDir, t: &Topology) -> String {
    let lb = t
        .hosts_with(Role::Lb)
        .next()
        .map(|h| h.address.to_string())
        .unwrap_or_default();
    format!(
        "curl --cacert {} --resolve {}:{}:{} https://{}{}/",
        state.pki().ca_cert().display(),
        t.site.domain,
        t.https_port(),
        lb,
        t.site.domain,
        port_suffix(t.https_port(), 443)
    )
}

/// Reads the lab's status. Per-host `qps` and `alert` come from the monitoring service's API, reached
/// with the admin certificate; when it cannot be reached the values are null.
///
/// Errors: [`LabError::NotUp`] when `up` never ran from this state directory.
pub async fn status(state: &StateDir) -> Result<Status, LabError> {
    let lab: LabFile = match std::fs::read(state.lab_file()) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| LabError::Other(format!("{}: {e}", state.lab_file().display())))?,
        Err(_) => return Err(LabError::NotUp(state.root().to_path_buf())),
    };
    let t = Topology::load(&state.topology_file())?;
    let pki = state.pki();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let monitor = fetch_monitor(state, &t).await.unwrap_or_default();
    let policy = topology::Policy::compile(&t);

    let mut hosts = Vec::new();
    let mut db_nodes = Vec::new();
    let mut engine = None;
    for h in &t.hosts {
        let pid = StateDir::read_pid(&state.node_pid_file(&h.name)).filter(|p| process_alive(*p));
        let node: Option<NodeStatus> = std::fs::read(state.node_status_file(&h.name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let fresh = node.as_ref().is_some_and(|n| {
            now_ms.saturating_sub(n.updated_unix_ms) < STALE_AFTER.as_millis() as u64
        });
        let healthy = pid.is_some() && fresh && node.as_ref().is_some_and(|n| n.healthy);
        let ports = node
            .as_ref()
            .map(|n| n.ports.clone())
            .unwrap_or_else(|| policy.ports(&h.name));
        if let Some(d) = node.as_ref().and_then(|n| n.db.clone()) {
            engine.get_or_insert(d.engine.clone());
            db_nodes.push(DbNodeView {
                host: d.host,
                role: d.role,
                pid: d.pid.filter(|p| fresh && process_alive(*p)),
                port: d.port,
                socket: d.socket,
                lag_seconds: d.lag_seconds,
            });
        }
        hosts.push(HostView {
            name: h.name.clone(),
            address: h.address.to_string(),
            netns: (lab.mode == Mode::Netns).then(|| t.netns.namespace(&h.name)),
            pid,
            roles: h.roles.iter().map(|r| r.to_string()).collect(),
            healthy,
            qps: monitor.qps.get(&h.name).copied(),
            alert: monitor.alerts.get(&h.name).cloned(),
            ports,
        });
    }
    Ok(Status {
        mode: lab.mode,
        state_dir: state.root().to_path_buf(),
        ca_cert: pki.ca_cert(),
        admin_cert: pki.admin_cert(),
        admin_key: pki.admin_key(),
        site: t.site.domain.clone(),
        endpoints: endpoints(&t),
        hosts,
        db: DbView {
            engine,
            // The controller's published state; the topology's until it exists.
            primary: db::ClusterState::load(state.root())
                .ok()
                .flatten()
                .map(|c| c.primary)
                .or_else(|| t.db_primary().map(|h| h.name.clone())),
            nodes: db_nodes,
        },
        warnings: lab.warnings,
        curl: curl_line(state, &t),
    })
}

pub(crate) fn endpoints(t: &Topology) -> Endpoints {
    let lb = t
        .hosts_with(Role::Lb)
        .next()
        .map(|h| h.address.to_string())
        .unwrap_or_default();
    let mon = t
        .monitor()
        .map(|h| SocketAddr::new(h.address, t.ports.ingest).to_string())
        .unwrap_or_default();
    Endpoints {
        https: format!(
            "https://{}{}/",
            t.site.domain,
            port_suffix(t.https_port(), 443)
        ),
        http: format!(
            "http://{}{}/",
            t.site.domain,
            port_suffix(t.http_port(), 80)
        ),
        lb_address: lb,
        dashboard: format!("https://{mon}/"),
        monitor_api: format!("https://{mon}/api/v1/"),
    }
}

/// An HTTPS client presenting the admin certificate, trusting only the lab's CA.
pub(crate) fn admin_client(state: &StateDir) -> Result<reqwest::Client, LabError> {
    let tls = pki::mtls_client_config(&state.pki(), &pki::Identity::Admin, &[b"http/1.1"])?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| LabError::Other(format!("HTTPS client: {e}")))
}

#[derive(Deserialize)]
struct QpsReply {
    hosts: BTreeMap<String, QpsHost>,
}

#[derive(Deserialize)]
struct QpsHost {
    /// Null when the monitor has too few samples.
    qps: Option<f64>,
    /// The host's pushes stopped: its last rate says nothing about now.
    #[serde(default)]
    stale: bool,
}

#[derive(Deserialize)]
struct AlertsReply {
    alerts: Vec<AlertEntry>,
}

#[derive(Deserialize)]
struct AlertEntry {
    host: String,
    state: String,
}

/// What the monitoring service says about each host.
#[derive(Debug, Default)]
pub(crate) struct MonitorView {
    /// Host name → requests/s over the rule's window (hosts whose pushes are stale left out).
    pub qps: BTreeMap<String, f64>,
    /// Host name → QPS alert state (`inactive`, `pending`, `firing`).
    pub alerts: BTreeMap<String, String>,
}

/// Reads `/api/v1/qps` and `/api/v1/alerts` with the admin certificate; `None` when the
/// monitoring service cannot be reached or answers something else.
pub(crate) async fn fetch_monitor(state: &StateDir, t: &Topology) -> Option<MonitorView> {
    let mon = t.monitor()?;
    let client = admin_client(state).ok()?;
    let base = format!("https://{}:{}/api/v1", mon.address, t.ports.ingest);
    async fn get_json<T: serde::de::DeserializeOwned>(
        client: &reqwest::Client,
        url: String,
    ) -> Option<T> {
        let reply = client.get(url).send().await.ok()?.error_for_status().ok()?;
        reply.json().await.ok()
    }
    let qps: QpsReply = get_json(&client, format!("{base}/qps")).await?;
    let alerts: AlertsReply = get_json(&client, format!("{base}/alerts")).await?;
    Some(MonitorView {
        qps: qps
            .hosts
            .into_iter()
            .filter_map(|(host, q)| Some((host, q.qps.filter(|_| !q.stale)?)))
            .collect(),
        alerts: alerts
            .alerts
            .into_iter()
            .map(|a| (a.host, a.state))
            .collect(),
    })
}
