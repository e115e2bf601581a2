//! The node process: one per host (`rampart node --host NAME`). It reads the resolved
//! topology from the state directory, builds the host's [`HostPlan`] once, starts the
//! host's roles in dependency order (database, monitoring service, web/application, load
//! balancer, agent) — each returning a [`RoleHandle`] — writes `status.json` every second
//! (healthy when every role is), and on SIGTERM or SIGINT stops the roles in reverse order
//! (listeners drain), stops its MariaDB server and exits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serve::RoleHandle;
use tokio::signal::unix::{signal, SignalKind};
use topology::{Role, Topology};

use crate::plan::HostPlan;
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
    /// The database failover controller on this host, if any.
    #[serde(default)]
    pub db_controller: Option<db::ControllerStatus>,
    /// The load balancer's view of its backends: name → up.
    pub backends: BTreeMap<String, bool>,
    /// Unix time of this report, milliseconds.
    pub updated_unix_ms: u64,
}

/// Runs the node for `host` until SIGTERM or SIGINT. Blocks the calling thread. The
/// runtime has one worker thread per CPU the process may run on ([`serve::runtime`]): a
/// host pinned to one CPU (`taskset -c 1 rampart up`, a cpuset) runs its roles on one
/// thread, with no cross-thread wake-ups.
///
/// Errors: the resolved topology is missing or invalid, the host is not in it, or a role
/// fails to start (the error names the role).
///
/// With `apply_firewall`, the host's nftables ruleset (compiled from the topology's policy)
/// is loaded into the network namespace this process runs in before any role starts: a
/// lab host's namespace in netns mode, or the machine itself on a real deployment.
pub fn run(state: &StateDir, host: &str, apply_firewall: bool) -> Result<(), LabError> {
    let runtime = serve::runtime(None)
        .map_err(|e| LabError::Other(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(run_async(state.clone(), host.to_string(), apply_firewall))
}

/// Compiles `host`'s ruleset and loads it here (check, then one transaction).
fn apply_ruleset(t: &Topology, host: &str) -> Result<(), LabError> {
    let h = t
        .host(host)
        .ok_or_else(|| LabError::Other(format!("host {host} is not in the topology")))?;
    let policy = topology::Policy::compile(t);
    let text = firewall::nft::ruleset(&policy, h, &t.firewall);
    firewall::nft::Nft::here()
        .apply(&text)
        .map_err(|e| LabError::Other(format!("the firewall of {host} did not load: {e}")))?;
    tracing::info!(
        host,
        rules = policy.rules_for(host).count(),
        "nftables ruleset loaded (table inet rampart)"
    );
    Ok(())
}

fn role_err(host: &str, role: Role, reason: impl std::fmt::Display) -> LabError {
    LabError::Role {
        host: host.to_string(),
        role: role.to_string(),
        reason: reason.to_string(),
    }
}

async fn run_async(state: StateDir, name: String, apply_firewall: bool) -> Result<(), LabError> {
    let topology = Topology::load(&state.topology_file())?;
    let isolation = if apply_firewall {
        apply_ruleset(&topology, &name)?;
        firewall::Isolation::Kernel
    } else {
        firewall::Isolation::Loopback
    };
    let plan = HostPlan::from_topology(&topology, &name, &state, isolation)?;
    let host = plan.host.clone();
    let ports = plan.net.policy().ports(&name);
    let mut registry = Registry::default();
    // The request families every HTTP-serving role of this host records into, registered
    // once so the exposition holds each family exactly once.
    let http = telemetry::HttpMetrics::register(&mut registry);
    telemetry::log_limit::register(
        &mut registry,
        telemetry::log_limit::RateLimit::global().clone(),
    );
    // Every role, in start order; stopped in reverse.
    let mut roles: Vec<Arc<dyn RoleHandle>> = Vec::new();

    // Database first: the application connects to it.
    let mut db_server = None;
    if let Some(cfg) = plan.db_server {
        let role = if host.has(Role::DbPrimary) {
            Role::DbPrimary
        } else {
            Role::DbReplica
        };
        let server = Arc::new(
            db::start_server(cfg)
                .await
                .map_err(|e| role_err(&name, role, e))?,
        );
        tracing::info!(host = %name, "database role started");
        db::register_server_metrics(&mut registry, &server);
        roles.push(server.clone());
        db_server = Some(server);
    } else if host.has(Role::DbPrimary) || host.has(Role::DbReplica) {
        return Err(role_err(
            &name,
            Role::DbPrimary,
            "no database configuration for this host",
        ));
    }

    let db_controller = match plan.db_controller {
        Some(cfg) => {
            let c = db::start_controller(cfg)
                .await
                .map_err(|e| role_err(&name, Role::Monitor, e))?;
            tracing::info!(host = %name, "database failover controller started");
            db::register_controller_metrics(&mut registry, &c);
            Some(c)
        }
        None => None,
    };

    if let Some(cfg) = plan.monitor {
        let handle = monitor::start_monitor(cfg)
            .await
            .map_err(|e| role_err(&name, Role::Monitor, e))?;
        tracing::info!(host = %name, addr = %handle.addr(), "monitoring service started");
        roles.push(Arc::new(handle));
    }

    if let Some(web_plan) = plan.web {
        let store: Option<Arc<dyn web::Store>> = match plan.db_client {
            Some(cfg) => {
                let client = db::connect_client(cfg)
                    .await
                    .map_err(|e| role_err(&name, Role::App, e))?;
                Some(Arc::new(client))
            }
            None if host.has(Role::App) => {
                return Err(role_err(
                    &name,
                    Role::App,
                    "no database client configuration",
                ))
            }
            None => None,
        };
        web::deploy_site(&web_plan.docroot).map_err(|e| LabError::io(&web_plan.docroot, e))?;
        let cfg = web::WebConfig {
            host: name.clone(),
            net: plan.net.clone(),
            port: web_plan.port,
            docroot: web_plan.docroot,
            pki: state.pki(),
            plain: web_plan.plain,
            health_path: web_plan.health_path,
            store,
        };
        let handle = web::start(cfg, &mut registry, &http)
            .await
            .map_err(|e| role_err(&name, Role::Web, e))?;
        tracing::info!(host = %name, addr = %handle.addr(), "web server started");
        roles.push(Arc::new(handle));
    }

    let mut lb_handle = None;
    let lb_base = plan.lb.clone();
    if let Some(cfg) = plan.lb {
        let handle = Arc::new(
            lb::start(cfg, &mut registry, &http)
                .await
                .map_err(|e| role_err(&name, Role::Lb, e))?,
        );
        tracing::info!(host = %name, https = %handle.https_addr(), http = ?handle.http_addr(), "load balancer started");
        roles.push(handle.clone());
        lb_handle = Some(handle);
    }

    // The not-after times of the certificates this host serves, for CertificateExpiring:
    // its own (every internal listener), the internal CA, and the load balancer's
    // site certificates as its SNI store holds them now (a reload replaces them).
    let mut certs = vec![
        monitor::collect::CertSource::File {
            role: "node".into(),
            certificate: format!("host/{name}"),
            path: state.pki().host_cert(&name),
        },
        monitor::collect::CertSource::File {
            role: "ca".into(),
            certificate: "internal-ca".into(),
            path: state.pki().ca_cert(),
        },
    ];
    if let Some(lb) = &lb_handle {
        let lb = lb.clone();
        certs.push(monitor::collect::CertSource::Live {
            role: "lb".into(),
            read: Arc::new(move || {
                lb.certificates()
                    .into_iter()
                    .map(|c| {
                        let name = c.names.first().cloned().unwrap_or_else(|| {
                            c.cert
                                .file_name()
                                .map(|f| f.to_string_lossy().into_owned())
                                .unwrap_or_default()
                        });
                        (name, c.not_after_unix as f64)
                    })
                    .collect()
            }),
        });
    }
    registry.register_collector(Box::new(monitor::collect::CertificateCollector::new(certs)));

    if let Some(cfg) = plan.agent {
        let filters = roles.iter().flat_map(|r| r.filters()).collect();
        let handle = monitor::start_agent(cfg, registry, filters)
            .await
            .map_err(|e| role_err(&name, Role::Agent, e))?;
        tracing::info!(host = %name, addr = %handle.addr(), "monitoring agent started");
        roles.push(Arc::new(handle));
    }

    let write_status = || {
        let db = db_server.as_ref().map(|s| s.status());
        let db_controller = db_controller.as_ref().map(|c| c.status());
        let backends: BTreeMap<String, bool> = lb_handle
            .as_ref()
            .map(|h| h.backends().into_iter().collect())
            .unwrap_or_default();
        // The node is healthy when every role is.
        let healthy = roles.iter().all(|r| r.healthy());
        let status = NodeStatus {
            host: name.clone(),
            pid: std::process::id(),
            healthy,
            roles: host.roles.iter().map(|r| r.to_string()).collect(),
            ports: ports.clone(),
            db,
            db_controller,
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
    // One summary line per rate-limited callsite every 10 s.
    let _summaries = telemetry::log_limit::spawn_summaries(
        telemetry::log_limit::RateLimit::global().clone(),
        telemetry::log_limit::DEFAULT_WINDOW,
    );
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| LabError::Other(format!("cannot watch SIGHUP: {e}")))?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => write_status(),
            _ = hup.recv() => {
                // logrotate convention: the files were renamed; reopen them.
                if let Some(lb) = &lb_handle {
                    lb.reopen_logs();
                }
                tracing::info!(host = %name, "SIGHUP: logs reopened");
                // `rampart reload`: certificates and configuration, without a restart.
                if let (Some(lb), Some(base)) = (&lb_handle, &lb_base) {
                    tokio::spawn(crate::reload::on_hangup(state.clone(), name.clone(), base.clone(), lb.clone()));
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(host = %name, "stopping");
    // Reverse start order: the agent and the load balancer first, the database last. Each
    // role drains its listeners (bounded by their drain timeouts).
    for role in roles.iter().rev() {
        role.shutdown().await;
    }
    if let Some(c) = db_controller {
        c.stop().await;
    }
    if let Some(server) = &db_server {
        server.stop().await;
    }
    drop(roles);
    let _ = std::fs::remove_file(state.node_status_file(&name));
    Ok(())
}
