//! [`HostPlan`]: everything one host runs, derived from the topology in one place. The node
//! builds it once at start and hands each role its part; no role reads the topology.

use std::path::Path;
use std::sync::Arc;

use topology::{Host, Policy, Role, Topology};

use crate::{LabError, StateDir};

/// The roles of one host and the configuration of each, with the host's network seam.
#[derive(Debug)]
pub struct HostPlan {
    /// The host as in the topology.
    pub host: Host,
    /// The host's network seam (address, compiled policy, limits).
    pub net: firewall::Net,
    /// The database server of a `db-primary`/`db-replica` host.
    pub db_server: Option<db::ServerConfig>,
    /// The application's database client of an `app` host.
    pub db_client: Option<db::ClientConfig>,
    /// The database failover controller: on `[database.failover] controller` (default the
    /// first `monitor` host), when the engine is MariaDB and the topology has a
    /// `db-primary`. It probes over the network from this host; in netns mode it fences an
    /// unreachable primary at its host's firewall, in loopback mode by `SIGKILL`.
    pub db_controller: Option<db::ControllerConfig>,
    /// The monitoring service of the `monitor` host.
    pub monitor: Option<monitor::MonitorConfig>,
    /// The web server of a `web` host (its store is attached once the client connects).
    pub web: Option<WebPlan>,
    /// The load balancer of an `lb` host.
    pub lb: Option<lb::LbConfig>,
    /// The monitoring agent of an `agent` host.
    pub agent: Option<monitor::AgentConfig>,
}

/// The web server's settings before its store exists.
#[derive(Debug, Clone)]
pub struct WebPlan {
    /// Listener port.
    pub port: u16,
    /// Where the application files are deployed.
    pub docroot: std::path::PathBuf,
    /// The insecure variant (plain HTTP from the load balancer).
    pub plain: bool,
    /// The load balancer's health-check path.
    pub health_path: String,
}

impl HostPlan {
    /// The plan of host `name` in `t`, with files under `state`, isolated by `isolation`.
    ///
    /// Errors: the host is not in the topology; the database engine cannot be resolved
    /// (`engine = "mariadb"` without MariaDB installed).
    pub fn from_topology(
        t: &Topology,
        name: &str,
        state: &StateDir,
        isolation: firewall::Isolation,
    ) -> Result<HostPlan, LabError> {
        let host = t
            .host(name)
            .cloned()
            .ok_or_else(|| LabError::Other(format!("host {name} is not in the topology")))?;
        let policy = Arc::new(Policy::compile(t));
        let net = firewall::Net::new(name, host.address, policy, t.limits.clone(), isolation);
        let pki = state.pki();
        let root: &Path = state.root();
        // Resolved once: the database role and the application must agree on it.
        let engine = if [Role::DbPrimary, Role::DbReplica, Role::App]
            .iter()
            .any(|r| host.has(*r))
        {
            Some(db::resolve_engine(t)?)
        } else {
            None
        };
        let db_server =
            engine.and_then(|e| db::ServerConfig::from_topology(t, name, root, net.clone(), e));
        let db_client =
            engine.and_then(|e| db::ClientConfig::from_topology(t, name, root, net.clone(), e));
        let db_controller = if t.database.failover.controller.as_deref() == Some(name)
            && matches!(db::resolve_engine(t), Ok(db::Engine::Mariadb))
        {
            db::ControllerConfig::from_topology(t, root).map(|mut c| {
                // Over the network from this host, through each database host's firewall:
                // a partition cuts the controller off like any peer.
                c.net = Some(net.clone());
                if isolation == firewall::Isolation::Kernel {
                    c.fencing = db::ControllerConfig::firewall_fencing(t);
                }
                c
            })
        } else {
            None
        };
        let monitor = monitor::MonitorConfig::from_topology(t, name, pki.clone(), net.clone()).map(
            |mut c| {
                c.snapshot = Some(state.host_dir(name).join("monitor.snapshot"));
                c.silences_file = Some(state.host_dir(name).join("silences.json"));
                c
            },
        );
        let web = host.has(Role::Web).then(|| WebPlan {
            port: t.ports.web,
            docroot: state.docroot(name),
            plain: t.site.plain_backends,
            health_path: t.health_check.path.clone(),
        });
        let lb = lb::LbConfig::from_topology(t, name, pki.clone(), net.clone()).map(|mut c| {
            c.access_log = Some(state.host_dir(name).join("access.log"));
            c.admin_socket = Some(state.host_dir(name).join(lb::ADMIN_SOCKET_FILE));
            c
        });
        let agent = monitor::AgentConfig::from_topology(t, name, pki, net.clone());
        Ok(HostPlan {
            host,
            net,
            db_server,
            db_client,
            db_controller,
            monitor,
            web,
            lb,
            agent,
        })
    }
}
