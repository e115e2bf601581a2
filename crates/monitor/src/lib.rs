//! Rampart monitoring: the *agent* every server runs (host collectors read from procfs, the
//! roles' metrics, the firewall counters; `/metrics` in OpenMetrics text; a push every
//! second to the monitoring service) and the *monitoring service* on the monitor host
//! (validated, size-capped ingest; an in-memory per-series store; QPS per host; the QPS
//! alert rule with `for` and a clear threshold; a JSON API and a live dashboard).
//!
//! Both listen only on a `firewall::GuardedListener` with mutual TLS from `pki`, and decide
//! who may do what from the verified client certificate's identity, never from a request's
//! content: only agent hosts push (and a push is stored under the identity of its
//! certificate), only the admin reads the dashboard and API. The crate never persists
//! samples to disk and never opens a connection except from its host's own address.
//!
//! Ingest trusts an agent's identity, not its numbers ([`store::Store::ingest`]): a push
//! that does not parse or repeats a series is refused whole; otherwise single samples are
//! refused and the rest stored — non-finite values, counters below zero or above 2^53,
//! samples out of order, too old or too far in the future, and new series beyond the
//! agent's **series budget** of [`store::MAX_SERIES_PER_HOST`] series. Refusals are
//! counted per host and reason (`GET /api/v1/ingest`) and logged at most once per host
//! and reason every [`REFUSAL_LOG_INTERVAL_SECONDS`]. A counter that decreases is a
//! counter reset (a restarted process, a recreated network interface), stored and counted
//! as Prometheus treats it.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::net::SocketAddr;

use std::time::Duration;

use pki::PkiPaths;
use topology::{AlertRule, Role, Topology};

mod agent;
pub mod alert;
pub mod chunk;
pub mod collect;
mod dashboard;
pub mod export;
pub mod exposition;
pub mod negotiate;
pub mod notify;
mod promapi;
pub mod promql;
pub mod push;
pub mod remote_write;
pub mod rules;
mod serve;
mod service;
pub mod silence;
pub mod spool;
pub mod store;

pub use agent::{
    serve_metrics, start_agent, start_standalone_agent, AgentHandle, StandaloneAgentConfig,
    StandalonePush, StandaloneRemoteWrite,
};
pub use serve::Peer;
pub use service::{
    app, start_monitor, HostIngest, MonitorHandle, MonitorState, QpsRange, RangeError, RangeQuery,
    ALERT_NAME, HISTORY_LEN, MAX_PUSH_BYTES, REFUSAL_LOG_INTERVAL_SECONDS, STALE_AFTER_SECONDS,
};

/// How often the monitoring service writes its store snapshot.
pub const SNAPSHOT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// The metric whose rate is a host's QPS (the metric contract shared by lb and web).
pub const REQUESTS_METRIC: &str = "rampart_http_requests_total";

/// The Content-Type of prometheus-client's text encoding (OpenMetrics 1.0, section
/// "Overall structure").
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Errors starting the agent or the monitoring service.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// A certificate or key could not be loaded into a TLS configuration.
    #[error("TLS: {0}")]
    Pki(#[from] pki::PkiError),
    /// The listener could not be bound (address not local, port in use).
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The push client could not be built.
    #[error("push client: {0}")]
    Client(#[from] reqwest::Error),
    /// A rule file (`[alerts] rule_files`) cannot be read or is invalid.
    #[error("{0}")]
    Rules(#[from] rules::RuleError),
    /// The push spool's directory could not be created or read.
    #[error("{0}")]
    Spool(#[from] spool::SpoolError),
}

/// What the agent of one host needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's name (its certificate identity).
    pub host: String,
    /// This host's network seam: the `/metrics` listener is bound through it; pushes leave
    /// from its address.
    pub net: firewall::Net,
    /// `/metrics` listener port (0: any, in tests).
    pub port: u16,
    /// The monitoring service: host name (verified on its certificate) and ingest address.
    pub monitor: (String, SocketAddr),
    /// The PKI directory.
    pub pki: PkiPaths,
    /// Time between pushes; 1 s from the topology.
    pub push_interval: Duration,
    /// Where pushes wait while the monitor is unreachable (`None`: in memory); from the
    /// topology, `<state dir>/spool/<host>`.
    pub spool_dir: Option<std::path::PathBuf>,
    /// The spool's bound in bytes ([`push::DEFAULT_SPOOL_BYTES`]); the oldest pushes are
    /// dropped beyond it.
    pub spool_max_bytes: u64,
}

impl AgentConfig {
    /// The agent of `host` in `t`: its address, the topology's agent port, the monitor host
    /// and ingest port, a 1 s push interval, a spool under the state directory (the parent
    /// of the PKI directory). `None` when `host` does not exist, does not
    /// hold the `agent` role, or the topology has no monitor host.
    pub fn from_topology(
        t: &Topology,
        host: &str,
        pki: PkiPaths,
        net: firewall::Net,
    ) -> Option<AgentConfig> {
        let h = t.host(host).filter(|h| h.has(Role::Agent))?;
        let mon = t.monitor()?;
        Some(AgentConfig {
            host: h.name.clone(),
            net,
            port: t.ports.agent,
            monitor: (
                mon.name.clone(),
                SocketAddr::new(mon.address, t.ports.ingest),
            ),
            spool_dir: pki
                .dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(|state| state.join("spool").join(&h.name)),
            pki,
            push_interval: Duration::from_secs(1),
            spool_max_bytes: push::DEFAULT_SPOOL_BYTES,
        })
    }
}

/// What the monitoring service needs.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// The monitor host's name (its server certificate).
    pub host: String,
    /// The host's network seam: the listener is bound through it.
    pub net: firewall::Net,
    /// Listener port (push ingest, dashboard, API; 0: any, in tests).
    pub port: u16,
    /// The PKI directory.
    pub pki: PkiPaths,
    /// The QPS alert rule.
    pub rule: AlertRule,
    /// The firewall drop-surge rule.
    pub drop_rule: AlertRule,
    /// Webhooks notified of every firing and resolved alert (Alertmanager payload).
    pub webhook_urls: Vec<String>,
    /// Where the series store is snapshotted (every [`SNAPSHOT_INTERVAL`] and at stop) and
    /// restored from at start, so a restarted monitor keeps its history; `None`: memory
    /// only.
    pub snapshot: Option<std::path::PathBuf>,
    /// Where the silences are kept (written atomically after every change, loaded at
    /// start), so a restarted monitor keeps them; `None`: memory only.
    pub silences_file: Option<std::path::PathBuf>,
    /// Host identities allowed to push; each gets an alert and a QPS entry.
    pub agent_hosts: Vec<String>,
    /// Seconds of history the store keeps (`[monitor] retention`).
    pub retention_seconds: u64,
    /// Prometheus rule files loaded besides the built-in rules (`[alerts] rule_files`).
    pub rule_files: Vec<std::path::PathBuf>,
    /// Email notifications (`[alerts.email]`).
    pub email: Option<topology::EmailSettings>,
    /// When grouped notifications leave (`[alerts.grouping]`).
    pub grouping: notify::Grouping,
}

impl MonitorConfig {
    /// The monitoring service of `host` in `t`: its address, the ingest port, the
    /// topology's QPS rule, the hosts holding `agent`. `None` when `host` does not exist
    /// or does not hold the `monitor` role.
    pub fn from_topology(
        t: &Topology,
        host: &str,
        pki: PkiPaths,
        net: firewall::Net,
    ) -> Option<MonitorConfig> {
        let h = t.host(host).filter(|h| h.has(Role::Monitor))?;
        Some(MonitorConfig {
            host: h.name.clone(),
            net,
            port: t.ports.ingest,
            pki,
            rule: t.qps_alert.clone(),
            drop_rule: t.drop_alert.clone(),
            webhook_urls: t.webhook_urls.clone(),
            snapshot: None,
            silences_file: None,
            agent_hosts: t.hosts_with(Role::Agent).map(|h| h.name.clone()).collect(),
            retention_seconds: t.monitor_retention_seconds,
            rule_files: t.alert_rule_files.clone(),
            email: t.alert_email.clone(),
            grouping: t.alert_grouping.into(),
        })
    }
}

/// Seconds since the Unix epoch, the clock samples and alerts are stamped with.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use topology::Policy;

    #[test]
    fn configs_from_the_default_topology() {
        let t = Topology::default_topology();
        let policy = Arc::new(Policy::compile(&t));
        let net = |h: &str| {
            let a = t.host(h).unwrap().address;
            firewall::Net::loopback(h, a, policy.clone(), t.limits.clone())
        };
        let pki = PkiPaths::new("/tmp/x");
        let a = AgentConfig::from_topology(&t, "web-01", pki.clone(), net("web-01")).unwrap();
        assert_eq!(a.monitor.0, "mon-01");
        assert_eq!(a.monitor.1, "127.80.0.20:9090".parse().unwrap());
        assert_eq!(a.port, 9100);
        assert_eq!(
            a.spool_dir.as_deref(),
            Some(std::path::Path::new("/tmp/spool/web-01"))
        );
        assert!(AgentConfig::from_topology(&t, "mon-01", pki.clone(), net("mon-01")).is_none());
        let m = MonitorConfig::from_topology(&t, "mon-01", pki.clone(), net("mon-01")).unwrap();
        assert_eq!(m.agent_hosts, ["lb-01", "web-01", "web-02"]);
        assert_eq!(m.rule.threshold_rps, 100.0);
        assert_eq!(m.grouping, notify::Grouping::default());
        let mut slow = t.clone();
        slow.alert_grouping.repeat_interval_seconds = 86_400;
        let m = MonitorConfig::from_topology(&slow, "mon-01", pki.clone(), net("mon-01")).unwrap();
        assert_eq!(
            m.grouping.repeat_interval,
            std::time::Duration::from_secs(86_400)
        );
        assert!(MonitorConfig::from_topology(&t, "lb-01", pki, net("lb-01")).is_none());
    }
}
