//! The node process: one per host (`rampart node --host NAME`). It reads the resolved
//! topology from the state directory, starts the host's roles in dependency order
//! (database, monitoring service, web/application, load balancer, agent), writes
//! `status.json` every second, and on SIGTERM or SIGINT stops its MariaDB server and exits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};
use topology::{Policy, Role, Topology};

use crate::{LabError, StateDir};

/// What a node reports about itself in `hosts/<name>/status.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Host name.
    pub host: String,
    /// The node's process id.
    pub pid: u32,
    /// Every role is up (the load balancer: at least one backend up; the database: the
    /// server answers and, for a replica, replication runs).
    pub healthy: bool,
    /// Roles, as in the topology.
    pub roles: Vec<String>,
    /// Service name → TCP port this host listens on.
    pub ports: BTreeMap<String, u16>,
    /// The database node on this host, if any.
    pub db: Option<db::DbNodeStatus>,
    /// The load balancer's view of its backends: name → up.
    pub backends: BTreeMap<String, bool>,
    /// Unix time of this report, milliseconds.
    pub updated_unix_ms: u64,
}

/// Runs the node for `host` until SIGTERM or SIGINT. Blocks the calling thread.
///
/// Errors: the resolved topology is missing or invalid, the host is not in it, or a role
/// fails to start (the error names the role).
pub fn run(state: &StateDir, host: &str) -> Result<(), LabError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| LabError::Other(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(run_async(state.clone(), host.to_string()))
}

fn role_err(host: &str, role: Role, reason: impl std::fmt::Display) -> LabError {
    LabError::Role {
        host: host.to_string(),
        role: role.to_string(),
        reason: reason.to_string(),
    }
}

async fn run_async(state: StateDir, name: String) -> Result<(), LabError> {
    let topology = Topology::load(&state.topology_file())?;
    let host = topology
        .host(&name)
        .cloned()
        .ok_or_else(|| LabError::Other(format!("host {name} is not in the topology")))?;
    let policy = Arc::new(Policy::compile(&topology));
    let pki = state.pki();
    let mut registry = Registry::default();
    // The request families every HTTP-serving role of this host records into, registered
    // once so the exposition holds each family exactly once.
    let http = telemetry::HttpMetrics::register(&mut registry);
    let mut filters: Vec<Arc<firewall::Filter>> = Vec::new();
    let ports = policy.ports(&name);

    // Resolved once: the database role and the application must agree on it.
    let engine = if [Role::DbPrimary, Role::DbReplica, Role::App]
        .iter()
        .any(|r| host.has(*r))
    {
        Some(db::resolve_engine(&topology)?)
    } else {
        None
    };

    // Database first: the application connects to it.
    let mut db_server = None;
    if host.has(Role::DbPrimary) || host.has(Role::DbReplica) {
        let role = if host.has(Role::DbPrimary) {
            Role::DbPrimary
        } else {
            Role::DbReplica
        };
        let cfg = engine
            .and_then(|e| {
                db::ServerConfig::from_topology(&topology, &name, state.root(), policy.clone(), e)
            })
            .ok_or_else(|| role_err(&name, role, "no database configuration for this host"))?;
        let server = db::start_server(cfg)
            .await
            .map_err(|e| role_err(&name, role, e))?;
        filters.extend(server.filters());
        tracing::info!(host = %name, "database role started");
        db_server = Some(server);
    }

    let mut monitor = None;
    if host.has(Role::Monitor) {
        let cfg =
            monitor::MonitorConfig::from_topology(&topology, &name, pki.clone(), policy.clone())
                .ok_or_else(|| role_err(&name, Role::Monitor, "no monitor configuration"))?;
        let handle = monitor::start_monitor(cfg)
            .await
            .map_err(|e| role_err(&name, Role::Monitor, e))?;
        filters.extend(handle.filters());
        tracing::info!(host = %name, addr = %handle.addr(), "monitoring service started");
        monitor = Some(handle);
    }

    let mut web_handle = None;
    if host.has(Role::Web) {
        let store: Option<Arc<dyn web::Store>> = if host.has(Role::App) {
            let cfg = engine
                .and_then(|e| db::ClientConfig::from_topology(&topology, &name, state.root(), e))
                .ok_or_else(|| role_err(&name, Role::App, "no database client configuration"))?;
            let client = db::connect_client(cfg)
                .await
                .map_err(|e| role_err(&name, Role::App, e))?;
            Some(Arc::new(client))
        } else {
            None
        };
        let docroot = state.docroot(&name);
        web::deploy_site(&docroot).map_err(|e| LabError::io(&docroot, e))?;
        let cfg = web::WebConfig {
            host: name.clone(),
            address: host.address,
            port: topology.ports.web,
            docroot,
            pki: pki.clone(),
            policy: policy.clone(),
            plain: topology.site.plain_backends,
            lb_hosts: topology
                .hosts_with(Role::Lb)
                .map(|h| h.name.clone())
                .collect(),
            health_path: topology.health_check.path.clone(),
            store,
        };
        let handle = web::start(cfg, &mut registry, &http)
            .await
            .map_err(|e| role_err(&name, Role::Web, e))?;
        filters.extend(handle.filters());
        tracing::info!(host = %name, addr = %handle.addr(), "web server started");
        web_handle = Some(handle);
    }

    let mut lb_handle = None;
    if host.has(Role::Lb) {
        let mut cfg = lb::LbConfig::from_topology(&topology, &name, pki.clone(), policy.clone())
            .ok_or_else(|| role_err(&name, Role::Lb, "no load balancer configuration"))?;
        cfg.access_log = Some(state.host_dir(&name).join("access.log"));
        let handle = lb::start(cfg, &mut registry, &http)
            .await
            .map_err(|e| role_err(&name, Role::Lb, e))?;
        filters.extend(handle.filters());
        tracing::info!(host = %name, https = %handle.https_addr(), http = %handle.http_addr(), "load balancer started");
        lb_handle = Some(handle);
    }

    let mut agent = None;
    if host.has(Role::Agent) {
        let cfg =
            monitor::AgentConfig::from_topology(&topology, &name, pki.clone(), policy.clone())
                .ok_or_else(|| role_err(&name, Role::Agent, "no agent configuration"))?;
        let handle = monitor::start_agent(cfg, registry, filters.clone())
            .await
            .map_err(|e| role_err(&name, Role::Agent, e))?;
        tracing::info!(host = %name, addr = %handle.addr(), "monitoring agent started");
        agent = Some(handle);
    }

    let write_status = || {
        let db = db_server.as_ref().map(|s| s.status());
        let backends: BTreeMap<String, bool> = lb_handle
            .as_ref()
            .map(|h| h.backends().into_iter().collect())
            .unwrap_or_default();
        let healthy =
            db.as_ref().is_none_or(|d| d.healthy) && lb_handle.as_ref().is_none_or(|h| h.healthy());
        let status = NodeStatus {
            host: name.clone(),
            pid: std::process::id(),
            healthy,
            roles: host.roles.iter().map(|r| r.to_string()).collect(),
            ports: ports.clone(),
            db,
            backends,
            updated_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let path = state.node_status_file(&name);
        match serde_json::to_vec_pretty(&status) {
            Ok(bytes) => {
                if let Err(e) = StateDir::write_atomic(&path, &bytes) {
                    tracing::warn!("cannot write the node status: {e}");
                }
            }
            Err(e) => tracing::warn!("cannot encode the node status: {e}"),
        }
    };

    let mut term = signal(SignalKind::terminate())
        .map_err(|e| LabError::Other(format!("cannot watch SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| LabError::Other(format!("cannot watch SIGINT: {e}")))?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => write_status(),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(host = %name, "stopping");
    if let Some(server) = &db_server {
        server.stop().await;
    }
    drop((agent, lb_handle, web_handle, monitor));
    let _ = std::fs::remove_file(state.node_status_file(&name));
    Ok(())
}
