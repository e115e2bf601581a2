//! The validated topology. Defaults live here, once, documented on their fields.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Serialize, Serializer};

use crate::raw::{RawHost, RawTopology};
use crate::ConfigError;

/// The default topology as TOML: the reference design for `www.foobar.com` on one machine.
/// `rampart init` writes exactly this text to `rampart.toml`.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// The shipped `scaled` topology as TOML: the load balancer, two web/application hosts,
/// a database tier of its own (db-01 primary, db-02 and db-03 replicas) and the monitor.
/// `rampart init --topology scaled` writes exactly this text.
pub const SCALED_TOML: &str = include_str!("scaled.toml");

/// The topologies shipped in the binary, by name: `default` ([`DEFAULT_TOML`]) and
/// `scaled` ([`SCALED_TOML`]).
pub const BUILT_IN_TOPOLOGIES: [(&str, &str); 2] =
    [("default", DEFAULT_TOML), ("scaled", SCALED_TOML)];

const BUILT_IN: &str = "<built-in default>";

/// A role a host can hold. A host holds any set of roles; one `rampart node` process per host
/// runs them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The load balancer: HTTPS/HTTP listeners, the site certificate, health checks.
    Lb,
    /// The web server: application files, `/healthz`, `/api` to the application.
    Web,
    /// The application server (the guestbook), mounted under `/api` of the web server.
    App,
    /// The MariaDB primary (accepts writes).
    DbPrimary,
    /// A MariaDB replica (serves reads, replicates from the primary with GTID).
    DbReplica,
    /// The monitoring service: ingest, series store, alert rules, dashboard, API.
    Monitor,
    /// The monitoring client: procfs and role metrics, `/metrics`, push to the monitor.
    Agent,
}

impl Role {
    /// Every role, in the order `rampart node` starts them (databases before the
    /// application that uses them, backends before the load balancer).
    pub const ALL: [Role; 7] = [
        Role::DbPrimary,
        Role::DbReplica,
        Role::Monitor,
        Role::App,
        Role::Web,
        Role::Lb,
        Role::Agent,
    ];

    /// The name used in TOML and in `rampart status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Lb => "lb",
            Role::Web => "web",
            Role::App => "app",
            Role::DbPrimary => "db-primary",
            Role::DbReplica => "db-replica",
            Role::Monitor => "monitor",
            Role::Agent => "agent",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or(())
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The public site served by the load balancer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Site {
    /// The name on the certificate and in the URL. Default `www.foobar.com`.
    pub domain: String,
    /// Further names on the site certificate. Default `["foobar.com"]`.
    pub aliases: Vec<String>,
    /// HTTPS listener port. `None` (the default) means 443 where the process may bind it,
    /// otherwise 8443; `rampart up` resolves it before starting nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_port: Option<u16>,
    /// HTTP listener port (it only redirects to HTTPS). `None` means 80 where permitted,
    /// otherwise 8080.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
    /// The reference design's insecure variant: LB→web in clear HTTP instead of mutual TLS.
    /// Default `false`; only for showing and measuring the difference.
    pub plain_backends: bool,
    /// Header fields the load balancer adds to every HTTPS response that does not carry
    /// them already (`[site.response_headers]`, name → value; an empty value removes a
    /// default). Defaults: `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`,
    /// `Content-Security-Policy: frame-ancestors 'none'`, `Referrer-Policy:
    /// strict-origin-when-cross-origin` (OWASP secure headers; HSTS is always sent).
    pub response_headers: std::collections::BTreeMap<String, String>,
    /// The HTTPS listener's certificates and session resumption (`[site.tls]`).
    pub tls: SiteTls,
    /// The site certificate from an ACME server instead of the lab's CA (`[site.acme]`).
    /// Default `None`: the lab's CA issues it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeSettings>,
}

/// ACME (RFC 8555) for the site certificate (`[site.acme]`): the load balancer orders a
/// certificate for the site's domain and aliases, answers the HTTP-01 challenge on its
/// HTTP listener (which must be reachable on port 80 from the ACME server), keeps the
/// account and the certificate under `<state>/pki/acme/` and renews ahead of expiry. Until
/// the first certificate arrives, the lab's site certificate serves.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AcmeSettings {
    /// The directory URL, e.g. `https://acme-v02.api.letsencrypt.org/directory`. Required.
    pub directory_url: String,
    /// Account contact URIs, e.g. `["mailto:ops@foobar.com"]`. Default none.
    pub contact: Vec<String>,
    /// A PEM CA certificate the directory's HTTPS certificate chains to (a private or test
    /// ACME server; relative to the topology file). Default none: the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<std::path::PathBuf>,
    /// Renew once this fraction of the certificate's lifetime has passed, in (0, 1).
    /// Default 0.667 (day 60 of a 90-day certificate).
    pub renew_at: f64,
}

/// The HTTPS listener's TLS beyond the site certificate (`[site.tls]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteTls {
    /// Further certificates, each chosen for the names in its subject alternative names
    /// when a client asks for one of them by SNI (`[[site.tls.certificates]]` with `cert`
    /// and `key`, PEM files; relative paths are relative to the topology file's directory).
    /// The lab's site certificate stays the default, for clients without SNI or asking for
    /// another name. Default none. Reloaded with the certificates (SIGHUP, `rampart
    /// reload`).
    pub certificates: Vec<CertPaths>,
    /// TLS sessions kept in memory for resumption by session ID (TLS 1.2) or by a TLS 1.3
    /// PSK when tickets are off; the oldest is evicted beyond it, 0 turns the cache off.
    /// Default 20 000 (a few hundred bytes each).
    pub session_cache_entries: usize,
    /// Stateless session tickets (RFC 5077 for TLS 1.2, RFC 8446 §4.6.1 for TLS 1.3),
    /// encrypted with keys that rotate every 6 hours. Default `true`.
    pub session_tickets: bool,
}

/// Default of [`SiteTls::session_cache_entries`].
pub const DEFAULT_SESSION_CACHE_ENTRIES: usize = 20_000;

impl Default for SiteTls {
    fn default() -> Self {
        SiteTls {
            certificates: Vec::new(),
            session_cache_entries: DEFAULT_SESSION_CACHE_ENTRIES,
            session_tickets: true,
        }
    }
}

/// A PEM certificate chain and its PEM private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertPaths {
    /// The certificate chain, end-entity certificate first.
    pub cert: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
}

/// The default of [`Site::response_headers`].
pub fn default_response_headers() -> std::collections::BTreeMap<String, String> {
    [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("content-security-policy", "frame-ancestors 'none'"),
        ("referrer-policy", "strict-origin-when-cross-origin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Site {
    /// Every name the site answers to: the domain, then the aliases.
    pub fn names(&self) -> Vec<String> {
        std::iter::once(self.domain.clone())
            .chain(self.aliases.iter().cloned())
            .collect()
    }
}

/// Service ports. Every host has its own address, so hosts share port numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ports {
    /// Web server listener (mutual TLS from the load balancer). Default 9443.
    pub web: u16,
    /// Monitoring agent `/metrics` listener (HTTPS, mutual TLS). Default 9100.
    pub agent: u16,
    /// MariaDB listener (behind the firewall relay in loopback mode). Default 3306.
    pub mysql: u16,
    /// Loopback mode only: the replica host's outbound relay that gives replication traffic
    /// its host's source address. Default 3307.
    pub mysql_egress: u16,
    /// Monitoring service listener: agent push, dashboard and API (HTTPS, mutual TLS).
    /// Default 9090.
    pub ingest: u16,
}

/// Active health checks from the load balancer to each backend (Pingora/HAProxy style:
/// `rise` consecutive successes mark a backend up, `fall` consecutive failures mark it down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    /// Path requested with `GET`. Default `/healthz`.
    pub path: String,
    /// Milliseconds between checks. Default 1000.
    pub interval_ms: u64,
    /// Milliseconds before a check counts as failed. Default 1000.
    pub timeout_ms: u64,
    /// Consecutive successes to mark a backend up. Default 2.
    pub rise: u32,
    /// Consecutive failures to mark a backend down. Default 3.
    pub fall: u32,
}

/// The QPS alert: fires when a server's request rate stays above `threshold_rps` for
/// `for_seconds`, resolves once it is at or below `clear_rps`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertRule {
    /// Requests per second above which the rule is pending. Default 100.
    pub threshold_rps: f64,
    /// Seconds the condition must hold before the alert fires. Default 10.
    pub for_seconds: u64,
    /// Requests per second at or below which a firing alert resolves (hysteresis against
    /// flapping). Default 80 % of the threshold.
    pub clear_rps: f64,
    /// Seconds of samples the rate is computed over. Default 10.
    pub window_seconds: u64,
    /// Seconds the value must stay at or below `clear_rps` before a firing alert resolves
    /// (like Prometheus' `keep_firing_for`): a brief dip does not resolve it. Default 5.
    pub clear_for_seconds: u64,
}

/// Which database engine the data tier uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DbEngine {
    /// MariaDB when `mariadbd` is installed, SQLite otherwise (the default).
    Auto,
    /// MariaDB, an error when it is not installed.
    Mariadb,
    /// The embedded SQLite store: no replication.
    Sqlite,
}

/// Database settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Database {
    /// Engine choice. Default `auto`.
    pub engine: DbEngine,
    /// Schema (database) name used by the application. Default `foobar`.
    pub name: String,
    /// The failover controller (`[database.failover]`).
    pub failover: Failover,
}

/// `[database.failover]`: where the database failover controller runs and how fast it
/// acts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failover {
    /// The host running the controller (`controller`). Default: the first `monitor` host;
    /// never a database host (it must see the primary from outside). `None` when the
    /// topology has no monitor host and none is named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// Time between two observations of every server, ms (`probe_interval_ms`, 50 to
    /// 10 000). Default 250.
    pub probe_interval_ms: u64,
    /// How long the primary must stay lost before a failover, ms (`fail_after_ms`, at
    /// least twice the probe interval, at most 60 000). Default 1000.
    pub fail_after_ms: u64,
}

/// One host of the topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    /// Host name, a DNS label such as `web-01`.
    pub name: String,
    /// The host's own address. In loopback mode an address in 127.0.0.0/8.
    pub address: IpAddr,
    /// The host's address in netns mode (`netns_address`; by default derived from
    /// `address` and `netns.subnet`, see [`crate::NetnsSettings::derived_address`]).
    pub netns_address: Ipv4Addr,
    /// Roles, sorted and de-duplicated.
    pub roles: Vec<Role>,
}

impl Host {
    /// Whether this host holds `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct FirewallOut<'a> {
    operator_sources: Vec<String>,
    edge_new_connections_per_second: u32,
    edge_new_connections_burst: u32,
    allow: &'a [crate::ExtraRule],
}

/// Where alert notifications are mailed (`[alerts.email]`), SMTP (RFC 5321): a relay on
/// the monitor's network in clear, or a mail provider over TLS with authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct EmailSettings {
    /// The SMTP server, `host:port`.
    pub smtp: String,
    /// The sender address.
    pub from: String,
    /// Recipients (at least one).
    pub to: Vec<String>,
    /// Transport security (`tls`: `"none"`, the default; `"starttls"`, RFC 3207, usually
    /// port 587; `"tls"`, implicit TLS, RFC 8314, usually port 465).
    pub tls: SmtpTls,
    /// PEM CA certificates trusted for the server besides the public web roots
    /// (`ca_file`, relative to the topology file), e.g. a company relay's own CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// The SMTP AUTH user (`username`, RFC 4954; PLAIN or LOGIN, as the server offers);
    /// requires `password_file` and TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The file holding the password (`password_file`, relative to the topology file; its
    /// first line, read at each send so a rotated password is used; never inline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<std::path::PathBuf>,
}

/// An SMTP connection's security ([`EmailSettings::tls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP.
    #[default]
    None,
    /// Plain, upgraded with STARTTLS (RFC 3207); refused when the server does not offer it.
    Starttls,
    /// TLS from the first byte (RFC 8314 "implicit TLS").
    Tls,
}

/// When grouped alert notifications leave (`[alerts.grouping]`, after Alertmanager's
/// route settings of the same names), seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertGrouping {
    /// `group_wait`: how long a new group waits before its first notification (default
    /// 1 s; 0 allowed).
    pub group_wait_seconds: u64,
    /// `group_interval`: the least time between two notifications of one group (default
    /// 2 s; at least 1 s).
    pub group_interval_seconds: u64,
    /// `repeat_interval`: how often a still-firing alert is notified again (default 4 h;
    /// at least `group_interval`).
    pub repeat_interval_seconds: u64,
}

impl Default for AlertGrouping {
    fn default() -> AlertGrouping {
        AlertGrouping {
            group_wait_seconds: 1,
            group_interval_seconds: 2,
            repeat_interval_seconds: 4 * 3_600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct GroupingOut {
    group_wait: String,
    group_interval: String,
    repeat_interval: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct AlertsOut<'a> {
    webhook_urls: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a EmailSettings>,
    grouping: GroupingOut,
    rule_files: &'a [std::path::PathBuf],
    qps: &'a AlertRule,
    firewall_drops: DropAlertOut,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct DropAlertOut {
    threshold_pps: f64,
    for_seconds: u64,
    clear_pps: f64,
    window_seconds: u64,
    clear_for_seconds: u64,
}

/// A validated topology. Build one with [`Topology::load`], [`Topology::parse`] or
/// [`Topology::default_topology`]; every invariant below holds for any value of this type:
/// host names and addresses are unique; exactly one host has `monitor` if any has `agent`;
/// at least one `lb` and one `web`; `app` only on `web` hosts; at most one `db-primary`, and
/// replicas only with a primary; `clear_rps < threshold_rps`.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// The public site.
    pub site: Site,
    /// Service ports.
    pub ports: Ports,
    /// Load balancer health checks.
    pub health_check: HealthCheck,
    /// The QPS alert rule.
    pub qps_alert: AlertRule,
    /// The firewall drop-surge rule (`[alerts.firewall_drops]`): the same shape as the QPS
    /// rule, over packets per second dropped by a host's kernel firewall
    /// (`threshold_pps` → `threshold_rps`, `clear_pps` → `clear_rps`). Default 50 packets/s
    /// for 10 s, clear at 40, 10 s window.
    pub drop_alert: AlertRule,
    /// Where firing and resolved alerts are POSTed (`[alerts] webhook_urls`), as
    /// Alertmanager's webhook receiver payload (version 4); `http://` or `https://` (verified
    /// against the lab's CA). Default none: alerts are logged only.
    pub webhook_urls: Vec<String>,
    /// Prometheus rule files (`[alerts] rule_files`) the monitoring service loads besides
    /// its built-in rules, relative paths resolved against the topology file's directory.
    /// Default none.
    pub alert_rule_files: Vec<std::path::PathBuf>,
    /// Alert notifications by email (`[alerts.email] smtp, from, to`). Default none.
    pub alert_email: Option<EmailSettings>,
    /// When grouped notifications leave (`[alerts.grouping]`). Default
    /// [`AlertGrouping::default`].
    pub alert_grouping: AlertGrouping,
    /// Seconds of history the monitoring service keeps (`[monitor] retention`, a
    /// Prometheus-style duration such as `"24h"`, `"90m"`, `"2d"`; at least one minute).
    /// Default 24 h.
    pub monitor_retention_seconds: u64,
    /// Database settings.
    pub database: Database,
    /// Sources allowed to reach operator-facing ports (monitor API/dashboard, agents'
    /// `/metrics`) besides the hosts that need them. Default `127.0.0.1/32` (the operator's
    /// shell on this machine).
    pub operator_sources: Vec<IpNet>,
    /// Timeouts and connection caps of every listener (`[limits]`, `[limits.<service>]`).
    pub limits: crate::Limits,
    /// The load balancer's per-backend queueing and buffering (`[balancer]`).
    pub balancer: crate::BalancerLimits,
    /// The load balancer's access log size cap and rotation (`[access_log]`).
    pub access_log: crate::AccessLogLimits,
    /// The kernel firewall's settings (`[firewall]`: edge rate limit, extra rules).
    pub firewall: crate::FirewallSettings,
    /// Netns mode's layout (`[netns]`).
    pub netns: crate::NetnsSettings,
    /// Hosts, in file order.
    pub hosts: Vec<Host>,
}

impl Topology {
    /// The built-in default topology (the text of [`DEFAULT_TOML`]).
    pub fn default_topology() -> Topology {
        // The built-in text is covered by a unit test, so this cannot fail at run time.
        Topology::parse(DEFAULT_TOML, BUILT_IN).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A topology shipped in the binary by its name in [`BUILT_IN_TOPOLOGIES`]; `None`
    /// for another name.
    pub fn built_in(name: &str) -> Option<Topology> {
        let (_, text) = BUILT_IN_TOPOLOGIES.iter().find(|(n, _)| *n == name)?;
        // Every built-in text is covered by a unit test, so this cannot fail at run time.
        Some(Topology::parse(text, &format!("<built-in {name}>")).unwrap_or_else(|e| panic!("{e}")))
    }

    /// Reads and validates a topology file.
    ///
    /// Errors: the file cannot be read, is not TOML, has an unknown key, or breaks an
    /// invariant of [`Topology`]; each error names `path`, the key and the fix.
    pub fn load(path: &Path) -> Result<Topology, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                &name,
                "(file)",
                format!("cannot read the topology: {e}"),
                "pass an existing file with -f, or run `rampart init` to write the default",
            )
        })?;
        let mut t = Topology::parse(&text, &name)?;
        // Certificate files named relative to the topology file.
        if let Some(dir) = path.parent() {
            let acme = t.site.acme.iter_mut().flat_map(|a| a.ca_bundle.as_mut());
            let certs = t
                .site
                .tls
                .certificates
                .iter_mut()
                .flat_map(|c| [&mut c.cert, &mut c.key]);
            for p in certs.chain(acme) {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(t)
    }

    /// Parses and validates topology TOML; `file` names the source in errors.
    pub fn parse(text: &str, file: &str) -> Result<Topology, ConfigError> {
        let raw: RawTopology = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let mut err = ConfigError::new(
                file,
                "(syntax)",
                e.message().trim().to_string(),
                "correct the TOML at that line; `rampart init` writes a valid example",
            );
            err.line = line;
            err
        })?;
        validate(raw, file)
    }

    /// The topology as TOML that [`Topology::parse`] reads back to an equal value.
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct MonitorOut {
            retention: String,
        }
        #[derive(Serialize)]
        struct Out<'a> {
            site: &'a Site,
            ports: &'a Ports,
            health_check: &'a HealthCheck,
            alerts: AlertsOut<'a>,
            monitor: MonitorOut,
            database: &'a Database,
            firewall: FirewallOut<'a>,
            limits: &'a crate::Limits,
            balancer: &'a crate::BalancerLimits,
            access_log: &'a crate::AccessLogLimits,
            netns: &'a crate::NetnsSettings,
            hosts: &'a [Host],
        }
        let out = Out {
            site: &self.site,
            ports: &self.ports,
            health_check: &self.health_check,
            alerts: AlertsOut {
                webhook_urls: &self.webhook_urls,
                email: self.alert_email.as_ref(),
                grouping: GroupingOut {
                    group_wait: format!("{}s", self.alert_grouping.group_wait_seconds),
                    group_interval: format!("{}s", self.alert_grouping.group_interval_seconds),
                    repeat_interval: format!("{}s", self.alert_grouping.repeat_interval_seconds),
                },
                rule_files: &self.alert_rule_files,
                qps: &self.qps_alert,
                firewall_drops: DropAlertOut {
                    threshold_pps: self.drop_alert.threshold_rps,
                    for_seconds: self.drop_alert.for_seconds,
                    clear_pps: self.drop_alert.clear_rps,
                    window_seconds: self.drop_alert.window_seconds,
                    clear_for_seconds: self.drop_alert.clear_for_seconds,
                },
            },
            monitor: MonitorOut {
                retention: format!("{}s", self.monitor_retention_seconds),
            },
            database: &self.database,
            firewall: FirewallOut {
                operator_sources: self
                    .operator_sources
                    .iter()
                    .map(|n| n.to_string())
                    .collect(),
                edge_new_connections_per_second: self.firewall.edge_new_connections_per_second,
                edge_new_connections_burst: self.firewall.edge_new_connections_burst,
                allow: &self.firewall.allow,
            },
            limits: &self.limits,
            balancer: &self.balancer,
            access_log: &self.access_log,
            netns: &self.netns,
            hosts: &self.hosts,
        };
        toml::to_string(&out).unwrap_or_else(|e| panic!("topology serializes: {e}"))
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Hosts holding `role`, in file order.
    pub fn hosts_with(&self, role: Role) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(move |h| h.has(role))
    }

    /// The host holding `db-primary`, if the topology has a database.
    pub fn db_primary(&self) -> Option<&Host> {
        self.hosts_with(Role::DbPrimary).next()
    }

    /// The host holding `monitor`, if any.
    pub fn monitor(&self) -> Option<&Host> {
        self.hosts_with(Role::Monitor).next()
    }

    /// HTTPS port, 443 when unresolved.
    pub fn https_port(&self) -> u16 {
        self.site.https_port.unwrap_or(443)
    }

    /// HTTP port, 80 when unresolved.
    pub fn http_port(&self) -> u16 {
        self.site.http_port.unwrap_or(80)
    }

    /// The same topology laid out for netns mode: every host's `address` becomes its
    /// `netns_address`, and loopback operator sources become this machine's address on the
    /// lab subnet ([`crate::NetnsSettings::operator_address`]); other operator sources
    /// (an administration network) stay. Applying it twice changes nothing more.
    pub fn in_netns(&self) -> Topology {
        let mut t = self.clone();
        for h in &mut t.hosts {
            h.address = IpAddr::V4(h.netns_address);
        }
        let operator = IpNet::from(IpAddr::V4(t.netns.operator_address()));
        let mut sources: Vec<IpNet> = Vec::new();
        for n in &self.operator_sources {
            let n = if n.addr().is_loopback() { operator } else { *n };
            if !sources.contains(&n) {
                sources.push(n);
            }
        }
        t.operator_sources = sources;
        t
    }
}

/// Seconds in a Prometheus-style duration: whole numbers with units `s`, `m`, `h`, `d`,
/// `w`, concatenated (`"1h30m"`). `None` when malformed or empty.
pub fn parse_duration_seconds(text: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut any = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        let n: u64 = digits.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        digits.clear();
        any = true;
    }
    (any && digits.is_empty()).then_some(total)
}

fn err(file: &str, key: impl Into<String>, reason: impl Into<String>, fix: &str) -> ConfigError {
    ConfigError::new(file, key, reason, fix)
}

fn site_tls(raw: Option<crate::raw::RawSiteTls>, file: &str) -> Result<SiteTls, ConfigError> {
    let raw = raw.unwrap_or_default();
    let mut certificates = Vec::new();
    for (i, c) in raw.certificates.unwrap_or_default().into_iter().enumerate() {
        for (key, p) in [("cert", &c.cert), ("key", &c.key)] {
            if p.as_os_str().is_empty() {
                return Err(err(
                    file,
                    format!("site.tls.certificates[{i}].{key}"),
                    "empty path",
                    "name a PEM file, e.g. cert = \"certs/example.pem\", key = \"certs/example.key\"",
                ));
            }
        }
        certificates.push(CertPaths {
            cert: c.cert,
            key: c.key,
        });
    }
    let d = SiteTls::default();
    Ok(SiteTls {
        certificates,
        session_cache_entries: raw.session_cache_entries.unwrap_or(d.session_cache_entries),
        session_tickets: raw.session_tickets.unwrap_or(d.session_tickets),
    })
}

fn site_acme(
    raw: Option<crate::raw::RawAcme>,
    file: &str,
) -> Result<Option<AcmeSettings>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    if !(raw.directory_url.starts_with("https://") || raw.directory_url.starts_with("http://")) {
        return Err(err(
            file,
            "site.acme.directory_url",
            format!("{:?} is not an http(s) URL", raw.directory_url),
            "use the ACME server's directory URL, e.g. \"https://acme-v02.api.letsencrypt.org/directory\"",
        ));
    }
    let renew_at = raw.renew_at.unwrap_or(0.667);
    if !(renew_at > 0.0 && renew_at < 1.0) {
        return Err(err(
            file,
            "site.acme.renew_at",
            format!("{renew_at} is not between 0 and 1"),
            "give the fraction of the lifetime after which to renew, e.g. 0.667",
        ));
    }
    Ok(Some(AcmeSettings {
        directory_url: raw.directory_url,
        contact: raw.contact.unwrap_or_default(),
        ca_bundle: raw.ca_bundle,
        renew_at,
    }))
}

fn validate(raw: RawTopology, file: &str) -> Result<Topology, ConfigError> {
    let site = Site {
        domain: raw.site.domain.unwrap_or_else(|| "www.foobar.com".into()),
        aliases: raw
            .site
            .aliases
            .unwrap_or_else(|| vec!["foobar.com".into()]),
        https_port: raw.site.https_port,
        http_port: raw.site.http_port,
        plain_backends: raw.site.plain_backends.unwrap_or(false),
        response_headers: {
            let mut h = default_response_headers();
            for (name, value) in raw.site.response_headers.clone().unwrap_or_default() {
                let name = name.to_ascii_lowercase();
                let valid_name = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if !valid_name || value.bytes().any(|b| b.is_ascii_control()) {
                    return Err(err(
                        file,
                        format!("site.response_headers.{name}"),
                        "not a valid header field name and value",
                        "use letters, digits and '-' for the name and printable text for the value",
                    ));
                }
                if value.is_empty() {
                    h.remove(&name);
                } else {
                    h.insert(name, value);
                }
            }
            h
        },
        tls: site_tls(raw.site.tls, file)?,
        acme: site_acme(raw.site.acme, file)?,
    };
    for (key, name) in std::iter::once(("site.domain".to_string(), &site.domain)).chain(
        site.aliases
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("site.aliases[{i}]"), a)),
    ) {
        if !is_dns_name(name) {
            return Err(err(
                file,
                key,
                format!("{name:?} is not a DNS name"),
                "use letters, digits, '-' and '.', e.g. \"www.foobar.com\"",
            ));
        }
    }
    for (key, port) in [
        ("site.https_port", site.https_port),
        ("site.http_port", site.http_port),
    ] {
        if port == Some(0) {
            return Err(err(
                file,
                key,
                "port 0",
                "use a port from 1 to 65535, or remove the key for the default",
            ));
        }
    }

    let p = raw.ports;
    let ports = Ports {
        web: p.web.unwrap_or(9443),
        agent: p.agent.unwrap_or(9100),
        mysql: p.mysql.unwrap_or(3306),
        mysql_egress: p.mysql_egress.unwrap_or(3307),
        ingest: p.ingest.unwrap_or(9090),
    };
    for (key, port) in [
        ("ports.web", ports.web),
        ("ports.agent", ports.agent),
        ("ports.mysql", ports.mysql),
        ("ports.mysql_egress", ports.mysql_egress),
        ("ports.ingest", ports.ingest),
    ] {
        if port == 0 {
            return Err(err(file, key, "port 0", "use a port from 1 to 65535"));
        }
    }

    let h = raw.health_check;
    let health_check = HealthCheck {
        path: h.path.unwrap_or_else(|| "/healthz".into()),
        interval_ms: h.interval_ms.unwrap_or(1000),
        timeout_ms: h.timeout_ms.unwrap_or(1000),
        rise: h.rise.unwrap_or(2),
        fall: h.fall.unwrap_or(3),
    };
    if !health_check.path.starts_with('/') {
        return Err(err(
            file,
            "health_check.path",
            "must start with '/'",
            "e.g. path = \"/healthz\"",
        ));
    }
    if health_check.interval_ms < 100 {
        return Err(err(
            file,
            "health_check.interval_ms",
            "below 100 ms",
            "use at least 100",
        ));
    }
    if health_check.timeout_ms == 0 {
        return Err(err(
            file,
            "health_check.timeout_ms",
            "must be positive",
            "e.g. timeout_ms = 1000",
        ));
    }
    if health_check.rise == 0 || health_check.fall == 0 {
        return Err(err(
            file,
            "health_check.rise/fall",
            "must be at least 1",
            "e.g. rise = 2, fall = 3",
        ));
    }

    let q = raw.alerts.qps.unwrap_or_default();
    let threshold_rps = q.threshold_rps.unwrap_or(100.0);
    if !(threshold_rps.is_finite() && threshold_rps > 0.0) {
        return Err(err(
            file,
            "alerts.qps.threshold_rps",
            "must be a positive number",
            "e.g. threshold_rps = 100.0",
        ));
    }
    let qps_alert = AlertRule {
        threshold_rps,
        for_seconds: q.for_seconds.unwrap_or(10),
        clear_rps: q.clear_rps.unwrap_or(threshold_rps * 0.8),
        window_seconds: q.window_seconds.unwrap_or(10),
        clear_for_seconds: q.clear_for_seconds.unwrap_or(5),
    };
    if !(qps_alert.clear_rps.is_finite()
        && qps_alert.clear_rps >= 0.0
        && qps_alert.clear_rps < threshold_rps)
    {
        return Err(err(
            file,
            "alerts.qps.clear_rps",
            format!("must be at least 0 and below threshold_rps ({threshold_rps})"),
            "set it below the threshold, or remove it for 80 % of the threshold",
        ));
    }
    if qps_alert.window_seconds == 0 {
        return Err(err(
            file,
            "alerts.qps.window_seconds",
            "must be at least 1",
            "e.g. window_seconds = 10",
        ));
    }

    let mut webhook_urls = Vec::new();
    for (i, u) in raw.alerts.webhook_urls.iter().flatten().enumerate() {
        let ok = (u.starts_with("http://") || u.starts_with("https://"))
            && u.len() > "https://".len()
            && !u.chars().any(|c| c.is_whitespace() || c.is_control());
        if !ok {
            return Err(err(
                file,
                format!("alerts.webhook_urls[{i}]"),
                format!("{u:?} is not an http:// or https:// URL"),
                "e.g. webhook_urls = [\"http://10.80.0.1:9093/hook\"]",
            ));
        }
        webhook_urls.push(u.clone());
    }
    let base_dir = std::path::Path::new(file)
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let alert_rule_files = raw
        .alerts
        .rule_files
        .unwrap_or_default()
        .into_iter()
        .map(|p| if p.is_relative() { base_dir.join(p) } else { p })
        .collect();
    let alert_email = match raw.alerts.email {
        None => None,
        Some(e) => {
            let port_ok = e
                .smtp
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok {
                return Err(err(
                    file,
                    "alerts.email.smtp",
                    format!("{:?} is not host:port", e.smtp),
                    "e.g. smtp = \"10.80.0.1:25\"",
                ));
            }
            let addr_ok = |a: &String| a.contains('@') && !a.chars().any(|c| c.is_whitespace());
            if !addr_ok(&e.from) || e.to.is_empty() || !e.to.iter().all(addr_ok) {
                return Err(err(
                    file,
                    "alerts.email",
                    "from must be an address and to a list of at least one address",
                    "e.g. from = \"rampart@foobar.com\", to = [\"ops@foobar.com\"]",
                ));
            }
            let tls = match e.tls.as_deref() {
                None | Some("none") => SmtpTls::None,
                Some("starttls") => SmtpTls::Starttls,
                Some("tls") => SmtpTls::Tls,
                Some(other) => {
                    return Err(err(
                        file,
                        "alerts.email.tls",
                        format!("{other:?} is not a transport security"),
                        "write tls = \"none\", \"starttls\" (port 587) or \"tls\" (port 465)",
                    ))
                }
            };
            let resolve =
                |p: std::path::PathBuf| if p.is_relative() { base_dir.join(p) } else { p };
            match (&e.username, &e.password_file) {
                (Some(u), Some(_)) if u.is_empty() || u.chars().any(char::is_control) => {
                    return Err(err(
                        file,
                        "alerts.email.username",
                        "is empty or holds control characters",
                        "e.g. username = \"rampart@foobar.com\"",
                    ))
                }
                (Some(_), Some(_)) if tls == SmtpTls::None => {
                    return Err(err(
                        file,
                        "alerts.email.tls",
                        "a password is never sent over plain SMTP",
                        "set tls = \"starttls\" or \"tls\" with username and password_file",
                    ))
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(err(
                        file,
                        "alerts.email.password_file",
                        "username and password_file go together",
                        "set both (the password in its own file, mode 0600), or neither",
                    ))
                }
                _ => {}
            }
            Some(EmailSettings {
                smtp: e.smtp,
                from: e.from,
                to: e.to,
                tls,
                ca_file: e.ca_file.map(resolve),
                username: e.username,
                password_file: e.password_file.map(resolve),
            })
        }
    };
    let g = raw.alerts.grouping.unwrap_or_default();
    let defaults = AlertGrouping::default();
    let duration = |key: &str, text: Option<&String>, default: u64, least: u64| match text {
        None => Ok(default),
        Some(t) => match parse_duration_seconds(t) {
            Some(s) if s >= least => Ok(s),
            _ => Err(err(
                file,
                format!("alerts.grouping.{key}"),
                format!("{t:?} is not a duration of at least {least} s"),
                "write a number with a unit s, m, h or d, e.g. group_interval = \"5m\"",
            )),
        },
    };
    let alert_grouping = AlertGrouping {
        group_wait_seconds: duration(
            "group_wait",
            g.group_wait.as_ref(),
            defaults.group_wait_seconds,
            0,
        )?,
        group_interval_seconds: duration(
            "group_interval",
            g.group_interval.as_ref(),
            defaults.group_interval_seconds,
            1,
        )?,
        repeat_interval_seconds: duration(
            "repeat_interval",
            g.repeat_interval.as_ref(),
            defaults.repeat_interval_seconds,
            1,
        )?,
    };
    if alert_grouping.repeat_interval_seconds < alert_grouping.group_interval_seconds {
        return Err(err(
            file,
            "alerts.grouping.repeat_interval",
            "is shorter than group_interval",
            "make repeat_interval at least group_interval, e.g. repeat_interval = \"4h\"",
        ));
    }
    let monitor_retention_seconds = match raw.monitor.retention.as_deref() {
        None => 86_400,
        Some(text) => match parse_duration_seconds(text) {
            Some(s) if s >= 60 => s,
            _ => {
                return Err(err(
                    file,
                    "monitor.retention",
                    format!("{text:?} is not a duration of at least one minute"),
                    "write a number with a unit s, m, h or d, e.g. retention = \"24h\"",
                ))
            }
        },
    };
    let d = raw.alerts.firewall_drops.unwrap_or_default();
    let threshold_pps = d.threshold_pps.unwrap_or(50.0);
    let drop_alert = AlertRule {
        threshold_rps: threshold_pps,
        for_seconds: d.for_seconds.unwrap_or(10),
        clear_rps: d.clear_pps.unwrap_or(threshold_pps * 0.8),
        window_seconds: d.window_seconds.unwrap_or(10),
        clear_for_seconds: d.clear_for_seconds.unwrap_or(5),
    };
    if !(threshold_pps.is_finite()
        && threshold_pps > 0.0
        && drop_alert.clear_rps.is_finite()
        && drop_alert.clear_rps >= 0.0
        && drop_alert.clear_rps < threshold_pps
        && drop_alert.window_seconds > 0)
    {
        return Err(err(
            file,
            "alerts.firewall_drops",
            "threshold_pps must be positive, clear_pps at least 0 and below it, window_seconds at least 1",
            "e.g. threshold_pps = 50.0, clear_pps = 40.0, window_seconds = 10",
        ));
    }

    let engine = match raw.database.engine.as_deref() {
        None | Some("auto") => DbEngine::Auto,
        Some("mariadb") => DbEngine::Mariadb,
        Some("sqlite") => DbEngine::Sqlite,
        Some(other) => {
            return Err(err(
                file,
                "database.engine",
                format!("unknown engine {other:?}"),
                "use \"auto\", \"mariadb\" or \"sqlite\"",
            ))
        }
    };
    let db_name = raw.database.name.unwrap_or_else(|| "foobar".into());
    if db_name.is_empty()
        || db_name.len() > 64
        || !db_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(err(
            file,
            "database.name",
            format!("{db_name:?} is not a plain identifier"),
            "use 1-64 letters, digits or '_'",
        ));
    }
    let raw_failover = raw.database.failover.unwrap_or_default();
    let probe_interval_ms = raw_failover.probe_interval_ms.unwrap_or(250);
    if !(50..=10_000).contains(&probe_interval_ms) {
        return Err(err(
            file,
            "database.failover.probe_interval_ms",
            format!("{probe_interval_ms} is out of range"),
            "use 50 to 10000 (default 250)",
        ));
    }
    let fail_after_ms = raw_failover.fail_after_ms.unwrap_or(1000);
    if fail_after_ms < 2 * probe_interval_ms || fail_after_ms > 60_000 {
        return Err(err(
            file,
            "database.failover.fail_after_ms",
            format!("{fail_after_ms} is out of range"),
            "use at least twice probe_interval_ms and at most 60000 (default 1000)",
        ));
    }
    let mut database = Database {
        engine,
        name: db_name,
        failover: Failover {
            controller: raw_failover.controller,
            probe_interval_ms,
            fail_after_ms,
        },
    };

    let mut operator_sources = Vec::new();
    for (i, s) in raw
        .firewall
        .operator_sources
        .clone()
        .unwrap_or_else(|| vec!["127.0.0.1/32".into()])
        .iter()
        .enumerate()
    {
        let net = net_or_address(s).ok_or_else(|| {
            err(
                file,
                format!("firewall.operator_sources[{i}]"),
                format!("{s:?} is not an address or CIDR network"),
                "e.g. \"127.0.0.1/32\"",
            )
        })?;
        operator_sources.push(net);
    }

    let limits = crate::limits::validate_limits(raw.limits.gather(), file)?;
    let balancer = crate::limits::validate_balancer(raw.balancer, file)?;
    let access_log = crate::limits::validate_access_log(raw.access_log, file)?;
    let firewall = crate::netns::validate_firewall(&raw.firewall, file)?;
    let netns = crate::netns::validate_netns(raw.netns, file)?;
    let hosts = validate_hosts(raw.hosts, &netns, file)?;
    for (i, r) in firewall.allow.iter().enumerate() {
        if let Some(h) = &r.host {
            if !hosts.iter().any(|x| &x.name == h) {
                return Err(err(
                    file,
                    format!("firewall.allow[{i}].host"),
                    format!("no host is named {h:?}"),
                    "name a host of the topology, or remove the key for every host",
                ));
            }
        }
    }
    let web_hosts: Vec<&str> = hosts
        .iter()
        .filter(|h| h.has(Role::Web))
        .map(|h| h.name.as_str())
        .collect();
    crate::balancing::check_backend_names(&balancer.balancing, &web_hosts, file)?;
    let web = limits.listener(crate::Service::Web);
    if balancer.upstream_idle_timeout_ms >= web.idle_timeout_ms {
        return Err(err(
            file,
            "balancer.upstream_idle_timeout_ms",
            format!(
                "{} ms is not below the web listeners' idle_timeout_ms ({} ms): the load \
                 balancer would reuse connections the web servers are closing",
                balancer.upstream_idle_timeout_ms, web.idle_timeout_ms
            ),
            "lower balancer.upstream_idle_timeout_ms or raise limits.web.idle_timeout_ms",
        ));
    }
    let lbs = hosts.iter().filter(|h| h.has(Role::Lb)).count() as u64;
    // Each load balancer keeps a few connection slots of every backend free for its
    // health checks.
    let needed = lbs * (u64::from(balancer.backend_max_connections) + HEALTH_CHECK_SLOTS);
    if needed > u64::from(web.max_connections) {
        return Err(err(
            file,
            "balancer.backend_max_connections",
            format!(
                "{lbs} load balancer(s) × ({} + {HEALTH_CHECK_SLOTS} for health checks) \
                 exceeds the web listeners' max_connections ({})",
                balancer.backend_max_connections, web.max_connections
            ),
            "lower balancer.backend_max_connections or raise limits.web.max_connections",
        ));
    }
    match &database.failover.controller {
        Some(c) => {
            match hosts.iter().find(|h| &h.name == c) {
                None => {
                    return Err(err(
                        file,
                        "database.failover.controller",
                        format!("{c:?} is not a host of the topology"),
                        "name a host, e.g. the monitor host \"mon-01\"",
                    ))
                }
                Some(h) if h.has(Role::DbPrimary) || h.has(Role::DbReplica) => return Err(err(
                    file,
                    "database.failover.controller",
                    format!("{c:?} is a database host"),
                    "run the controller on a host without a database role, e.g. the monitor host",
                )),
                Some(_) => {}
            }
        }
        None => {
            database.failover.controller = hosts
                .iter()
                .find(|h| h.has(Role::Monitor))
                .map(|h| h.name.clone());
        }
    }
    Ok(Topology {
        site,
        ports,
        health_check,
        qps_alert,
        drop_alert,
        webhook_urls,
        alert_rule_files,
        alert_email,
        alert_grouping,
        monitor_retention_seconds,
        database,
        operator_sources,
        limits,
        balancer,
        access_log,
        firewall,
        netns,
        hosts,
    })
}

/// Connection slots of each backend that every load balancer leaves to its health checks
/// (see `balancer.backend_max_connections`).
pub const HEALTH_CHECK_SLOTS: u64 = 4;

fn validate_hosts(
    raw: Vec<RawHost>,
    netns: &crate::NetnsSettings,
    file: &str,
) -> Result<Vec<Host>, ConfigError> {
    if raw.is_empty() {
        return Err(err(
            file,
            "hosts",
            "no hosts",
            "add [[hosts]] tables; `rampart init` writes an example",
        ));
    }
    let mut hosts: Vec<Host> = Vec::new();
    for (i, rh) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("hosts[{i}].{k}");
        let name = rh.name.ok_or_else(|| {
            err(
                file,
                key("name"),
                "missing",
                "give every host a name, e.g. name = \"web-01\"",
            )
        })?;
        if !is_dns_label(&name) {
            return Err(err(
                file,
                key("name"),
                format!("{name:?} is not a host name"),
                "use a DNS label: letters, digits and '-', e.g. \"web-01\"",
            ));
        }
        if hosts.iter().any(|h| h.name == name) {
            return Err(err(
                file,
                key("name"),
                format!("host {name:?} appears twice"),
                "give each host a unique name",
            ));
        }
        let address = rh.address.ok_or_else(|| {
            err(
                file,
                key("address"),
                "missing",
                "give the host its own address, e.g. address = \"127.80.0.11\"",
            )
        })?;
        let address: IpAddr = address.parse().map_err(|_| {
            err(
                file,
                key("address"),
                format!("{address:?} is not an IP address"),
                "e.g. address = \"127.80.0.11\"",
            )
        })?;
        if address.is_unspecified() || address == IpAddr::V4(Ipv4Addr::LOCALHOST) {
            return Err(err(
                file,
                key("address"),
                format!("{address} cannot be a host's own address"),
                "use an address no other process uses, e.g. 127.80.0.11",
            ));
        }
        if let Some(other) = hosts.iter().find(|h| h.address == address) {
            return Err(err(
                file,
                key("address"),
                format!("{address} is already {}'s address", other.name),
                "give each host its own address",
            ));
        }
        let netns_address = match &rh.netns_address {
            Some(a) => a.parse::<Ipv4Addr>().map_err(|_| {
                err(
                    file,
                    key("netns_address"),
                    format!("{a:?} is not an IPv4 address"),
                    "e.g. netns_address = \"10.80.0.11\"",
                )
            })?,
            None => netns.derived_address(address).ok_or_else(|| {
                err(
                    file,
                    key("netns_address"),
                    format!("netns mode cannot derive an address from {address}"),
                    "set netns_address, e.g. netns_address = \"10.80.0.11\"",
                )
            })?,
        };
        let reserved = [netns.operator_address(), netns.client_address()];
        if !netns.subnet.contains(&netns_address)
            || netns_address == netns.subnet.network()
            || netns_address == netns.subnet.broadcast()
            || reserved.contains(&netns_address)
        {
            return Err(err(
                file,
                key("netns_address"),
                format!(
                    "{netns_address} is not a free host address of netns.subnet {} (the first \
                     address is this machine's, the last the client's)",
                    netns.subnet
                ),
                "set netns_address to another address of the subnet, or change netns.subnet",
            ));
        }
        if let Some(other) = hosts.iter().find(|h| h.netns_address == netns_address) {
            return Err(err(
                file,
                key("netns_address"),
                format!("{netns_address} is already {}'s netns address", other.name),
                "set netns_address so that every host has its own",
            ));
        }
        let mut roles = BTreeSet::new();
        for (j, r) in rh.roles.unwrap_or_default().iter().enumerate() {
            let role = r.parse::<Role>().map_err(|_| {
                err(
                    file,
                    format!("hosts[{i}].roles[{j}]"),
                    format!("unknown role {r:?}"),
                    "use lb, web, app, db-primary, db-replica, monitor or agent",
                )
            })?;
            roles.insert(role);
        }
        if roles.is_empty() {
            return Err(err(
                file,
                key("roles"),
                "no roles",
                "list what the host runs, e.g. roles = [\"web\", \"app\", \"agent\"]",
            ));
        }
        if roles.contains(&Role::App) && !roles.contains(&Role::Web) {
            return Err(err(
                file,
                key("roles"),
                "role app without web",
                "the application is served by the web server: add \"web\"",
            ));
        }
        if roles.contains(&Role::DbPrimary) && roles.contains(&Role::DbReplica) {
            return Err(err(
                file,
                key("roles"),
                "a host cannot be both db-primary and db-replica",
                "keep one of them",
            ));
        }
        hosts.push(Host {
            name,
            address,
            netns_address,
            roles: roles.into_iter().collect(),
        });
    }
    let count = |r: Role| hosts.iter().filter(|h| h.has(r)).count();
    if count(Role::Lb) == 0 {
        return Err(err(
            file,
            "hosts",
            "no host has role lb",
            "add \"lb\" to one host's roles",
        ));
    }
    if count(Role::Web) == 0 {
        return Err(err(
            file,
            "hosts",
            "no host has role web",
            "add \"web\" to at least one host's roles",
        ));
    }
    if count(Role::Monitor) > 1 {
        return Err(err(
            file,
            "hosts",
            "more than one host has role monitor",
            "keep \"monitor\" on one host",
        ));
    }
    if count(Role::Agent) > 0 && count(Role::Monitor) == 0 {
        return Err(err(
            file,
            "hosts",
            "agents but no host has role monitor",
            "add \"monitor\" to one host, e.g. mon-01",
        ));
    }
    if count(Role::DbPrimary) > 1 {
        return Err(err(
            file,
            "hosts",
            "more than one host has role db-primary",
            "keep \"db-primary\" on one host; the others are db-replica",
        ));
    }
    if count(Role::DbReplica) > 0 && count(Role::DbPrimary) == 0 {
        return Err(err(
            file,
            "hosts",
            "replicas but no db-primary",
            "add \"db-primary\" to one host",
        ));
    }
    if count(Role::App) > 0 && count(Role::DbPrimary) == 0 {
        return Err(err(
            file,
            "hosts",
            "application hosts but no db-primary",
            "add \"db-primary\" to one host",
        ));
    }
    Ok(hosts)
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A CIDR network (`10.0.0.0/8`, `2001:db8::/32`) or one address (`192.0.2.7`, taken as
/// its host network), as the topology's source lists accept them; `None` for anything else.
pub(crate) fn net_or_address(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_topology_is_the_reference_design() {
        let t = Topology::default_topology();
        let names: Vec<_> = t.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["lb-01", "web-01", "web-02", "mon-01"]);
        assert_eq!(t.db_primary().map(|h| h.name.as_str()), Some("web-01"));
        assert!(t.host("web-02").is_some_and(|h| h.has(Role::DbReplica)));
        assert_eq!(t.hosts_with(Role::Agent).count(), 3);
        assert_eq!(t.qps_alert.threshold_rps, 100.0);
        assert_eq!(t.qps_alert.for_seconds, 10);
        assert_eq!(t.health_check.rise, 2);
        assert_eq!(t.health_check.fall, 3);
    }

    #[test]
    fn scaled_topology_puts_the_database_tier_on_its_own_hosts() {
        let t = Topology::built_in("scaled").unwrap();
        let names: Vec<_> = t.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(
            names,
            ["lb-01", "web-01", "web-02", "db-01", "db-02", "db-03", "mon-01"]
        );
        assert_eq!(t.db_primary().map(|h| h.name.as_str()), Some("db-01"));
        let replicas: Vec<_> = t
            .hosts_with(Role::DbReplica)
            .map(|h| h.name.as_str())
            .collect();
        assert_eq!(replicas, ["db-02", "db-03"]);
        for h in t
            .hosts_with(Role::DbPrimary)
            .chain(t.hosts_with(Role::DbReplica))
        {
            assert_eq!(
                h.roles,
                [h.roles[0], Role::Agent],
                "{}: database and agent only",
                h.name
            );
        }
        assert!(t
            .hosts_with(Role::App)
            .all(|h| h.has(Role::Web) && h.roles.len() == 3));
        assert_eq!(t.database.failover.controller.as_deref(), Some("mon-01"));
        // It reads back to itself, like every topology `up` writes to the state directory.
        assert_eq!(Topology::parse(&t.to_toml(), "t.toml").unwrap(), t);
        assert!(Topology::built_in("nope").is_none());
        assert_eq!(
            Topology::built_in("default").unwrap(),
            Topology::default_topology()
        );
    }

    #[test]
    fn monitor_retention_and_rule_files() {
        assert_eq!(parse_duration_seconds("24h"), Some(86_400));
        assert_eq!(parse_duration_seconds("1h30m"), Some(5_400));
        assert_eq!(parse_duration_seconds("90"), None);
        assert_eq!(parse_duration_seconds("h"), None);
        assert_eq!(
            Topology::default_topology().monitor_retention_seconds,
            86_400
        );
        let base = Topology::default_topology().to_toml();
        let with = |extra: &str| {
            let text = base
                .replace("[monitor]\nretention = \"86400s\"", extra)
                .replace(
                    "rule_files = []",
                    "rule_files = [\"rules/site.yml\", \"/etc/r.yml\"]",
                );
            Topology::parse(&text, "conf/rampart.toml")
        };
        let t = with("[monitor]\nretention = \"2d\"\n[alerts.email]\nsmtp = \"127.0.0.1:25\"\nfrom = \"r@x\"\nto = [\"o@x\"]").unwrap();
        assert_eq!(
            t.alert_email.as_ref().map(|e| e.smtp.as_str()),
            Some("127.0.0.1:25")
        );
        assert_eq!(
            Topology::parse(&t.to_toml(), "x").unwrap().alert_email,
            t.alert_email
        );
        let e =
            with("[alerts.email]\nsmtp = \"nohost\"\nfrom = \"r@x\"\nto = [\"o@x\"]").unwrap_err();
        assert!(e.to_string().contains("alerts.email.smtp"), "{e}");
        assert_eq!(t.monitor_retention_seconds, 172_800);
        assert_eq!(
            t.alert_rule_files,
            [
                std::path::PathBuf::from("conf/rules/site.yml"),
                std::path::PathBuf::from("/etc/r.yml")
            ]
        );
        let e = with("[monitor]\nretention = \"30s\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("monitor.retention") && e.contains("conf/rampart.toml"),
            "{e}"
        );
    }

    #[test]
    fn alert_grouping_and_email_security() {
        let base = Topology::default_topology().to_toml();
        let with = |extra: &str| {
            let default_grouping = "[alerts.grouping]\ngroup_wait = \"1s\"\ngroup_interval = \"2s\"\nrepeat_interval = \"14400s\"\n";
            assert!(base.contains(default_grouping), "{base}");
            let text = base
                .replace(default_grouping, "")
                .replace("[monitor]\nretention = \"86400s\"", extra);
            Topology::parse(&text, "conf/rampart.toml")
        };
        assert_eq!(
            Topology::default_topology().alert_grouping,
            AlertGrouping::default()
        );
        let t = with("[monitor]\n[alerts.grouping]\ngroup_wait = \"0s\"\ngroup_interval = \"5m\"\nrepeat_interval = \"1d\"")
            .unwrap();
        assert_eq!(
            t.alert_grouping,
            AlertGrouping {
                group_wait_seconds: 0,
                group_interval_seconds: 300,
                repeat_interval_seconds: 86_400
            }
        );
        assert_eq!(
            Topology::parse(&t.to_toml(), "x").unwrap().alert_grouping,
            t.alert_grouping
        );
        for (bad, key) in [
            ("group_interval = \"0s\"", "alerts.grouping.group_interval"),
            ("group_wait = \"soon\"", "alerts.grouping.group_wait"),
            (
                "group_interval = \"1h\"\nrepeat_interval = \"5m\"",
                "alerts.grouping.repeat_interval",
            ),
        ] {
            let e = with(&format!("[monitor]\n[alerts.grouping]\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(key) && e.contains("conf/rampart.toml"),
                "{bad}: {e}"
            );
        }
        let email = |more: &str| {
            with(&format!(
                "[monitor]\n[alerts.email]\nsmtp = \"mail.foobar.com:587\"\nfrom = \"r@x\"\nto = [\"o@x\"]\n{more}"
            ))
        };
        let t = email("tls = \"starttls\"\nusername = \"r@x\"\npassword_file = \"secrets/smtp\"\nca_file = \"/etc/ca.pem\"").unwrap();
        let e = t.alert_email.clone().unwrap();
        assert_eq!(e.tls, SmtpTls::Starttls);
        assert_eq!(e.username.as_deref(), Some("r@x"));
        assert_eq!(
            e.password_file,
            Some(std::path::PathBuf::from("conf/secrets/smtp"))
        );
        assert_eq!(e.ca_file, Some(std::path::PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            Topology::parse(&t.to_toml(), "x").unwrap().alert_email,
            t.alert_email
        );
        assert_eq!(email("").unwrap().alert_email.unwrap().tls, SmtpTls::None);
        for (bad, key) in [
            ("tls = \"ssl\"", "alerts.email.tls"),
            (
                "username = \"r@x\"\npassword_file = \"p\"",
                "alerts.email.tls",
            ),
            (
                "tls = \"tls\"\nusername = \"r@x\"",
                "alerts.email.password_file",
            ),
            (
                "tls = \"tls\"\npassword_file = \"p\"",
                "alerts.email.password_file",
            ),
            ("password = \"hunter2\"", "password"),
        ] {
            let e = email(bad).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn netns_layout_derives_addresses_from_the_subnet() {
        let t = Topology::default_topology().in_netns();
        let addr = |n: &str| t.host(n).map(|h| h.address.to_string());
        assert_eq!(addr("lb-01").as_deref(), Some("10.80.0.10"));
        assert_eq!(addr("web-02").as_deref(), Some("10.80.0.12"));
        assert_eq!(addr("mon-01").as_deref(), Some("10.80.0.20"));
        assert_eq!(t.operator_sources, vec!["10.80.0.1/32".parse().unwrap()]);
        assert_eq!(t.netns.client_address().to_string(), "10.80.0.254");
        assert_eq!(t.in_netns(), t);
        let back = Topology::parse(&t.to_toml(), "x").expect("round trip");
        assert_eq!(back, t);
    }

    #[test]
    fn netns_settings_are_validated() {
        let bad = |from: &str, to: &str| {
            Topology::parse(&DEFAULT_TOML.replace(from, to), "t.toml")
                .unwrap_err()
                .key
        };
        assert_eq!(
            bad("subnet = \"10.80.0.0/24\"", "subnet = \"8.8.8.0/24\""),
            "netns.subnet"
        );
        assert_eq!(
            bad("prefix = \"rampart\"", "prefix = \"much-too-long-prefix\""),
            "netns.prefix"
        );
        assert_eq!(
            bad("threshold_pps = 50.0", "threshold_pps = 0.0"),
            "alerts.firewall_drops"
        );
        let text = DEFAULT_TOML.replace(
            "address = \"127.80.0.12\"",
            "address = \"127.80.0.12\"\nnetns_address = \"10.80.0.11\"",
        );
        assert_eq!(
            Topology::parse(&text, "t").unwrap_err().key,
            "hosts[2].netns_address"
        );
        let text = format!(
            "{DEFAULT_TOML}\n[[firewall.allow]]\nhost = \"nope\"\nport = 22\nsources = [\"192.168.1.0/24\"]\n"
        );
        assert_eq!(
            Topology::parse(&text, "t").unwrap_err().key,
            "firewall.allow[0].host"
        );
    }

    #[test]
    fn to_toml_round_trips() {
        let mut t = Topology::default_topology();
        t.site.https_port = Some(8443);
        let back = Topology::parse(&t.to_toml(), "x").expect("round trip");
        assert_eq!(back, t);
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let e = Topology::parse("[site]\ndomian = \"x\"\n", "rampart.toml").unwrap_err();
        assert_eq!(e.file, "rampart.toml");
        assert_eq!(e.line, Some(2));
        assert!(e.reason.contains("domian"), "{e}");
    }

    #[test]
    fn bad_address_names_key_and_fix() {
        let text = DEFAULT_TOML.replace("127.80.0.12", "not-an-ip");
        let e = Topology::parse(&text, "t.toml").unwrap_err();
        assert_eq!(e.key, "hosts[2].address");
        assert!(e.to_string().contains("fix:"), "{e}");
    }

    #[test]
    fn duplicate_address_is_rejected() {
        let text = DEFAULT_TOML.replace("127.80.0.12", "127.80.0.11");
        let e = Topology::parse(&text, "t.toml").unwrap_err();
        assert_eq!(e.key, "hosts[2].address");
        assert!(e.reason.contains("web-01"), "{e}");
    }

    #[test]
    fn unknown_role_and_clear_threshold_are_rejected() {
        let text = DEFAULT_TOML.replace("\"agent\"]", "\"agnet\"]");
        assert!(Topology::parse(&text, "t")
            .unwrap_err()
            .reason
            .contains("agnet"));
        let text = DEFAULT_TOML.replace("clear_rps = 80.0", "clear_rps = 120.0");
        assert_eq!(
            Topology::parse(&text, "t").unwrap_err().key,
            "alerts.qps.clear_rps"
        );
    }

    #[test]
    fn site_tls_certificates_resolve_relative_to_the_file_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rampart.toml");
        let text = format!(
            "{DEFAULT_TOML}\n[[site.tls.certificates]]\ncert = \"certs/a.pem\"\nkey = \"/abs/a.key\"\n"
        );
        std::fs::write(&file, &text).unwrap();
        let t = Topology::load(&file).unwrap();
        let c = &t.site.tls.certificates[0];
        assert_eq!(c.cert, dir.path().join("certs/a.pem"));
        assert_eq!(c.key, std::path::PathBuf::from("/abs/a.key"));
        assert_eq!(
            t.site.tls.session_cache_entries,
            DEFAULT_SESSION_CACHE_ENTRIES
        );
        assert!(t.site.tls.session_tickets);
        let back = Topology::parse(&t.to_toml(), "resolved").unwrap();
        assert_eq!(back.site.tls, t.site.tls);
        let e = Topology::parse(
            &DEFAULT_TOML.replace("session_tickets", "session_ticket"),
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("session_ticket"), "{e}");
    }

    #[test]
    fn site_acme_is_optional_validated_and_round_trips() {
        assert_eq!(Topology::default_topology().site.acme, None);
        let with = |acme: &str| format!("{DEFAULT_TOML}\n[site.acme]\n{acme}\n");
        let t = Topology::parse(
            &with(
                "directory_url = \"https://acme.test/dir\"\ncontact = [\"mailto:ops@foobar.com\"]",
            ),
            "t",
        )
        .unwrap();
        let acme = t.site.acme.clone().unwrap();
        assert_eq!(acme.directory_url, "https://acme.test/dir");
        assert!((acme.renew_at - 0.667).abs() < 1e-9);
        assert_eq!(Topology::parse(&t.to_toml(), "resolved").unwrap(), t);
        let e = Topology::parse(&with("directory_url = \"ftp://x\""), "t").unwrap_err();
        assert_eq!(e.key, "site.acme.directory_url");
        let e = Topology::parse(
            &with("directory_url = \"https://a/dir\"\nrenew_at = 1.5"),
            "t",
        )
        .unwrap_err();
        assert_eq!(e.key, "site.acme.renew_at");
    }

    #[test]
    fn database_failover_settings_are_validated() {
        let t = Topology::default_topology();
        assert_eq!(t.database.failover.controller.as_deref(), Some("mon-01"));
        assert_eq!(
            (
                t.database.failover.probe_interval_ms,
                t.database.failover.fail_after_ms
            ),
            (250, 1000)
        );
        let with = |extra: &str| {
            let text = DEFAULT_TOML.replace(
                "[database.failover]\ncontroller = \"mon-01\"",
                &format!("[database.failover]\n{extra}"),
            );
            Topology::parse(&text, "f.toml")
        };
        for (extra, key) in [
            ("controller = \"web-01\"", "database.failover.controller"),
            ("controller = \"nope\"", "database.failover.controller"),
        ] {
            let e = with(extra).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("f.toml"), "{extra}: {e}");
        }
        let e = Topology::parse(
            &DEFAULT_TOML.replace("probe_interval_ms = 250", "probe_interval_ms = 10"),
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("database.failover.probe_interval_ms"), "{e}");
        // Without a controller named, the first monitor host runs it.
        let t = with("").unwrap();
        assert_eq!(t.database.failover.controller.as_deref(), Some("mon-01"));
        let e = Topology::parse(
            &DEFAULT_TOML.replace("fail_after_ms = 1000", "fail_after_ms = 300"),
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("database.failover.fail_after_ms"), "{e}");
    }
}
