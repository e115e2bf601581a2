//! The topology exactly as written in TOML, before validation. Every table denies unknown
//! keys so a typo is an error, not a silently ignored setting.

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTopology {
    #[serde(default)]
    pub site: RawSite,
    #[serde(default)]
    pub ports: RawPorts,
    #[serde(default)]
    pub health_check: RawHealthCheck,
    #[serde(default)]
    pub alerts: RawAlerts,
    #[serde(default)]
    pub monitor: RawMonitor,
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub firewall: RawFirewall,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub balancer: RawBalancer,
    #[serde(default)]
    pub access_log: RawAccessLog,
    #[serde(default)]
    pub netns: RawNetns,
    #[serde(default)]
    pub hosts: Vec<RawHost>,
}

/// `[limits]`: the keys of [`RawListenerLimits`] for every listener, `fd_reserve`, and one
/// optional table per service name.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub fd_reserve: Option<u32>,
    pub tls_handshake_timeout_ms: Option<u64>,
    pub first_byte_timeout_ms: Option<u64>,
    pub header_read_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub body_timeout_ms: Option<u64>,
    pub body_deadline_ms: Option<u64>,
    pub max_connections: Option<u32>,
    pub max_connections_per_source: Option<u32>,
    pub drain_timeout_ms: Option<u64>,
    #[serde(skip)]
    pub common: RawListenerLimits,
    pub https: Option<RawListenerLimits>,
    pub http: Option<RawListenerLimits>,
    pub web: Option<RawListenerLimits>,
    pub agent: Option<RawListenerLimits>,
    pub mysql: Option<RawListenerLimits>,
    pub ingest: Option<RawListenerLimits>,
    pub mysql_egress: Option<RawListenerLimits>,
}

impl RawLimits {
    /// Copies the top-level keys into `common` (serde cannot flatten with
    /// `deny_unknown_fields`).
    pub fn gather(mut self) -> RawLimits {
        self.common = RawListenerLimits {
            tls_handshake_timeout_ms: self.tls_handshake_timeout_ms,
            first_byte_timeout_ms: self.first_byte_timeout_ms,
            header_read_timeout_ms: self.header_read_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            body_timeout_ms: self.body_timeout_ms,
            body_deadline_ms: self.body_deadline_ms,
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            drain_timeout_ms: self.drain_timeout_ms,
        };
        self
    }

    pub fn per_service(&self, s: crate::Service) -> Option<&RawListenerLimits> {
        use crate::Service::*;
        match s {
            Https => self.https.as_ref(),
            Http => self.http.as_ref(),
            Web => self.web.as_ref(),
            Agent => self.agent.as_ref(),
            Mysql => self.mysql.as_ref(),
            Ingest => self.ingest.as_ref(),
            MysqlEgress => self.mysql_egress.as_ref(),
        }
    }
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerLimits {
    pub tls_handshake_timeout_ms: Option<u64>,
    pub first_byte_timeout_ms: Option<u64>,
    pub header_read_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub body_timeout_ms: Option<u64>,
    pub body_deadline_ms: Option<u64>,
    pub max_connections: Option<u32>,
    pub max_connections_per_source: Option<u32>,
    pub drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBalancer {
    pub backend_max_connections: Option<u32>,
    pub backend_queue_max: Option<u32>,
    pub backend_queue_timeout_ms: Option<u64>,
    pub max_request_body_bytes: Option<u64>,
    pub response_buffer_bytes: Option<u64>,
    pub buffer_total_bytes: Option<u64>,
    pub upstream_idle_timeout_ms: Option<u64>,
    pub rate_limit_per_source: Option<u32>,
    pub rate_limit_burst: Option<u32>,
    pub trusted_proxies: Option<Vec<String>>,
    pub algorithm: Option<String>,
    pub hash_header: Option<String>,
    pub sticky_cookie: Option<String>,
    pub slow_start_ms: Option<u64>,
    pub eject_consecutive_failures: Option<u32>,
    pub ejection_base_ms: Option<u64>,
    pub ejection_max_ms: Option<u64>,
    pub max_ejected_percent: Option<u32>,
    pub retry_budget_percent: Option<u32>,
    pub retry_min_per_second: Option<u32>,
    pub tunnel_idle_timeout_ms: Option<u64>,
    pub tunnel_half_closed_timeout_ms: Option<u64>,
    pub backends: Option<std::collections::BTreeMap<String, crate::balancing::RawBackendOptions>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSite {
    pub domain: Option<String>,
    pub aliases: Option<Vec<String>>,
    pub https_port: Option<u16>,
    pub http_port: Option<u16>,
    pub plain_backends: Option<bool>,
    pub response_headers: Option<std::collections::BTreeMap<String, String>>,
    pub tls: Option<RawSiteTls>,
    pub acme: Option<RawAcme>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAcme {
    pub directory_url: String,
    pub contact: Option<Vec<String>>,
    pub ca_bundle: Option<std::path::PathBuf>,
    pub renew_at: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSiteTls {
    pub certificates: Option<Vec<RawCertFiles>>,
    pub session_cache_entries: Option<usize>,
    pub session_tickets: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPorts {
    pub web: Option<u16>,
    pub agent: Option<u16>,
    pub mysql: Option<u16>,
    pub mysql_egress: Option<u16>,
    pub ingest: Option<u16>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    pub path: Option<String>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlerts {
    pub webhook_urls: Option<Vec<String>>,
    pub rule_files: Option<Vec<std::path::PathBuf>>,
    pub email: Option<RawEmail>,
    pub grouping: Option<RawGrouping>,
    pub qps: Option<RawQpsAlert>,
    pub firewall_drops: Option<RawDropAlert>,
}

/// `[alerts.email]`: notifications by SMTP.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEmail {
    pub smtp: String,
    pub from: String,
    pub to: Vec<String>,
    pub tls: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<std::path::PathBuf>,
}

/// `[alerts.grouping]`: when grouped notifications leave (durations).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGrouping {
    pub group_wait: Option<String>,
    pub group_interval: Option<String>,
    pub repeat_interval: Option<String>,
}

/// `[monitor]`: the monitoring service's store.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMonitor {
    pub retention: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDropAlert {
    pub threshold_pps: Option<f64>,
    pub for_seconds: Option<u64>,
    pub clear_pps: Option<f64>,
    pub window_seconds: Option<u64>,
    pub clear_for_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQpsAlert {
    pub threshold_rps: Option<f64>,
    pub for_seconds: Option<u64>,
    pub clear_rps: Option<f64>,
    pub window_seconds: Option<u64>,
    pub clear_for_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDatabase {
    pub engine: Option<String>,
    pub name: Option<String>,
    pub failover: Option<RawFailover>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFailover {
    pub controller: Option<String>,
    pub probe_interval_ms: Option<u64>,
    pub fail_after_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFirewall {
    pub operator_sources: Option<Vec<String>>,
    pub edge_new_connections_per_second: Option<u32>,
    pub edge_new_connections_burst: Option<u32>,
    pub allow: Option<Vec<RawExtraRule>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawExtraRule {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub sources: Option<Vec<String>>,
    pub comment: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetns {
    pub prefix: Option<String>,
    pub subnet: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHost {
    pub name: Option<String>,
    pub address: Option<String>,
    pub netns_address: Option<String>,
    pub roles: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccessLog {
    pub max_bytes: Option<u64>,
    pub keep: Option<u32>,
    pub format: Option<String>,
}
