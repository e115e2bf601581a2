//! The topology: which hosts exist, which roles each one holds, which ports the services use,
//! the health-check and alert settings, and the firewall policy compiled from all of that.
//!
//! This crate owns the model and its validation (raw TOML → [`Topology`], with errors that
//! name the file, the key and the fix). It never opens a socket, spawns a process or touches
//! the disk beyond reading the one file it is asked to load.

#![forbid(unsafe_code)]

mod balancing;
mod error;
mod limits;
mod model;
mod netns;
mod policy;
mod raw;

pub use balancing::{is_token, Algorithm, BackendOptions, Balancing, MAX_WEIGHT};
pub use error::ConfigError;
pub use limits::{AccessLogFormat, AccessLogLimits, BalancerLimits, Limits, ListenerLimits};
pub use model::{
    default_response_headers, parse_duration_seconds, AcmeSettings, AlertGrouping, AlertRule,
    CertPaths, Database, DbEngine, EmailSettings, Failover, HealthCheck, Host, Ports, Role, Site,
    SiteTls, SmtpTls, Topology, BUILT_IN_TOPOLOGIES, DEFAULT_SESSION_CACHE_ENTRIES, DEFAULT_TOML,
    SCALED_TOML,
};
pub use netns::{ExtraRule, FirewallSettings, NetnsSettings};
pub use policy::{Callers, Identity, Policy, Rule, Service, Sources};
