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
    pub database: RawDatabase,
    #[serde(default)]
    pub firewall: RawFirewall,
    #[serde(default)]
    pub hosts: Vec<RawHost>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSite {
    pub domain: Option<String>,
    pub aliases: Option<Vec<String>>,
    pub https_port: Option<u16>,
    pub http_port: Option<u16>,
    pub plain_backends: Option<bool>,
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
    pub qps: Option<RawQpsAlert>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQpsAlert {
    pub threshold_rps: Option<f64>,
    pub for_seconds: Option<u64>,
    pub clear_rps: Option<f64>,
    pub window_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDatabase {
    pub engine: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFirewall {
    pub operator_sources: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHost {
    pub name: Option<String>,
    pub address: Option<String>,
    pub roles: Option<Vec<String>>,
}
