//! The firewall policy compiled from a topology: for every host, which service ports are
//! open and to which source addresses. The same [`Policy`] drives the user-space filter at
//! every listener in loopback mode and (later) the nftables ruleset in netns mode.
//!
//! Default deny: a `(host, service)` pair without a rule accepts nobody.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::{Role, Topology};

/// A service port a host can expose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    /// The load balancer's HTTPS listener.
    Https,
    /// The load balancer's HTTP listener (redirects to HTTPS).
    Http,
    /// A web server's listener, reached by the load balancer.
    Web,
    /// A monitoring agent's `/metrics` listener.
    Agent,
    /// A MariaDB listener.
    Mysql,
    /// The monitoring service's listener (push ingest, dashboard, API).
    Ingest,
    /// Loopback mode only: a replica host's replication egress, the local TCP port its own
    /// `mariadbd` connects to so that replication leaves from the host's address.
    MysqlEgress,
}

impl Service {
    /// The name used in `rampart status` (`ports` keys) and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Https => "https",
            Service::Http => "http",
            Service::Web => "web",
            Service::Agent => "agent",
            Service::Mysql => "mysql",
            Service::Ingest => "ingest",
            Service::MysqlEgress => "mysql_egress",
        }
    }
}

impl Service {
    /// Every service, in the order `rampart check` and the limits tables list them.
    pub const ALL: [Service; 7] = [
        Service::Https,
        Service::Http,
        Service::Web,
        Service::Agent,
        Service::Mysql,
        Service::Ingest,
        Service::MysqlEgress,
    ];
}

impl std::str::FromStr for Service {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Service::ALL.into_iter().find(|v| v.as_str() == s).ok_or(())
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who may connect to a rule's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sources {
    /// Any source address (the public edge).
    Any,
    /// Only these networks (host addresses appear as /32 or /128).
    Nets(Vec<IpNet>),
}

impl Sources {
    /// Whether `src` is allowed. IPv4-mapped IPv6 sources are compared as IPv4.
    pub fn allows(&self, src: IpAddr) -> bool {
        let src = match src {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(src),
            v4 => v4,
        };
        match self {
            Sources::Any => true,
            Sources::Nets(nets) => nets.iter().any(|n| n.contains(&src)),
        }
    }
}

/// Who a verified peer certificate belongs to: the identity carried in a certificate of the
/// lab's CA (`rampart://host/<name>` or `rampart://operator/admin` URI SAN, see `pki`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Identity {
    /// A topology host (its node process), e.g. `Host("lb-01")`.
    Host(String),
    /// The operator's admin client certificate.
    Admin,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Host(h) => write!(f, "host/{h}"),
            Identity::Admin => f.write_str("operator/admin"),
        }
    }
}

/// Which callers a rule admits beyond their source address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Callers {
    /// No identity is checked (the public edge; MariaDB's own protocol, where the relay
    /// sees no certificate).
    Anyone,
    /// A TLS client certificate of the lab's CA carrying one of these identities is
    /// required (mutual TLS).
    Identities(Vec<Identity>),
    /// Only the host's own local server process (the replica's `mariadbd`, found by the
    /// connection's owning process in `/proc`, see proc(5)): used where the caller is a
    /// program that cannot present a certificate or choose its source address.
    LocalServer,
}

impl Callers {
    /// Whether a peer with the verified `identity` (`None`: no client certificate) passes.
    /// [`Callers::LocalServer`] is decided by the listener from the owning process, not
    /// here: it never passes on identity alone.
    pub fn admit(&self, identity: Option<&Identity>) -> bool {
        match self {
            Callers::Anyone => true,
            Callers::Identities(ids) => identity.is_some_and(|i| ids.contains(i)),
            Callers::LocalServer => false,
        }
    }
}

/// One accept rule: `sources` may reach `host`'s `service` on TCP `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// The host whose firewall holds this rule.
    pub host: String,
    /// The service the port belongs to.
    pub service: Service,
    /// TCP port.
    pub port: u16,
    /// Allowed sources.
    pub sources: Sources,
    /// Allowed callers (certificate identities), checked after the source address.
    pub callers: Callers,
    /// Why the rule exists, for people reading `rampart status` or the ruleset.
    pub comment: String,
}

/// The whole compiled policy: default deny plus the rules of [`Policy::compile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// All accept rules, grouped by host in topology order.
    pub rules: Vec<Rule>,
    /// The topology's `[[firewall.allow]]` rules, one per host they apply to (`host` is
    /// always set): enforced by the kernel firewall only, no Rampart listener serves them.
    pub extra: Vec<crate::ExtraRule>,
}

impl Policy {
    /// Compiles the policy of the reference design from a topology:
    /// - `lb` hosts: HTTPS and HTTP from anywhere;
    /// - `web` hosts: the web port only from `lb` hosts;
    /// - database hosts: the MariaDB port only from `app` hosts, the database hosts
    ///   (replication, before and after a failover) and the failover controller's host
    ///   (`[database.failover] controller`: it probes and fences over the network);
    /// - the `monitor` host: ingest only from `agent` hosts and the operator sources;
    /// - `agent` hosts: `/metrics` only from the `monitor` host and the operator sources;
    /// - `db-replica` hosts (loopback mode): the replication egress only from the host
    ///   itself (its address or 127.0.0.1, the source Linux gives a local process) and only
    ///   for the host's own `mariadbd`.
    ///
    /// Every rule over mutual TLS also names the certificate identities it admits: the web
    /// port the `lb` hosts, ingest the `agent` hosts and the admin, `/metrics` the `monitor`
    /// host and the admin.
    pub fn compile(t: &Topology) -> Policy {
        let addrs = |role: Role| -> Vec<IpNet> {
            t.hosts_with(role).map(|h| IpNet::from(h.address)).collect()
        };
        let ids = |role: Role| -> Vec<Identity> {
            t.hosts_with(role)
                .map(|h| Identity::Host(h.name.clone()))
                .collect()
        };
        let with_admin = |mut ids: Vec<Identity>| {
            ids.push(Identity::Admin);
            Callers::Identities(ids)
        };
        let with_operator = |mut nets: Vec<IpNet>| {
            nets.extend(t.operator_sources.iter().copied());
            nets
        };
        let mut rules = Vec::new();
        for h in &t.hosts {
            let mut rule = |service, port, sources, callers, comment: &str| {
                rules.push(Rule {
                    host: h.name.clone(),
                    service,
                    port,
                    sources,
                    callers,
                    comment: comment.to_string(),
                })
            };
            if h.has(Role::Lb) {
                rule(
                    Service::Https,
                    t.https_port(),
                    Sources::Any,
                    Callers::Anyone,
                    "public HTTPS",
                );
                rule(
                    Service::Http,
                    t.http_port(),
                    Sources::Any,
                    Callers::Anyone,
                    "public HTTP, redirects to HTTPS",
                );
            }
            if h.has(Role::Web) {
                let callers = if t.site.plain_backends {
                    Callers::Anyone
                } else {
                    Callers::Identities(ids(Role::Lb))
                };
                rule(
                    Service::Web,
                    t.ports.web,
                    Sources::Nets(addrs(Role::Lb)),
                    callers,
                    "web server, load balancers only",
                );
            }
            if h.has(Role::DbPrimary) || h.has(Role::DbReplica) {
                // Any database host may become a replica of this one after a failover; the
                // host itself is among them (its heartbeat writer reaches its own relay
                // from the host's address).
                let mut nets = addrs(Role::App);
                for n in addrs(Role::DbReplica)
                    .into_iter()
                    .chain(addrs(Role::DbPrimary))
                {
                    if !nets.contains(&n) {
                        nets.push(n);
                    }
                }
                // The failover controller observes and fences every server from its host.
                let controller = t.database.failover.controller.as_deref();
                if let Some(c) = controller.and_then(|c| t.host(c)) {
                    let n = IpNet::from(c.address);
                    if !nets.contains(&n) {
                        nets.push(n);
                    }
                }
                rule(
                    Service::Mysql,
                    t.ports.mysql,
                    Sources::Nets(nets),
                    Callers::Anyone,
                    "MariaDB, application and database hosts and the failover controller only",
                );
            }
            // Every database host replicates after a failover, the first primary included.
            if h.has(Role::DbReplica) || h.has(Role::DbPrimary) {
                rule(
                    Service::MysqlEgress,
                    t.ports.mysql_egress,
                    Sources::Nets(vec![
                        IpNet::from(h.address),
                        IpNet::from(IpAddr::from([127, 0, 0, 1])),
                    ]),
                    Callers::LocalServer,
                    "replication egress, this host's own mariadbd only",
                );
            }
            if h.has(Role::Monitor) {
                rule(
                    Service::Ingest,
                    t.ports.ingest,
                    Sources::Nets(with_operator(addrs(Role::Agent))),
                    with_admin(ids(Role::Agent)),
                    "monitoring ingest, agents and operator only",
                );
            }
            if h.has(Role::Agent) {
                rule(
                    Service::Agent,
                    t.ports.agent,
                    Sources::Nets(with_operator(addrs(Role::Monitor))),
                    with_admin(ids(Role::Monitor)),
                    "agent /metrics, monitor and operator only",
                );
            }
        }
        let extra = t
            .hosts
            .iter()
            .flat_map(|h| {
                t.firewall
                    .allow
                    .iter()
                    .filter(|r| r.host.as_ref().is_none_or(|n| n == &h.name))
                    .map(|r| crate::ExtraRule {
                        host: Some(h.name.clone()),
                        ..r.clone()
                    })
            })
            .collect();
        Policy { rules, extra }
    }

    /// The rule for `host`'s `service`, if the host exposes it.
    pub fn rule(&self, host: &str, service: Service) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.host == host && r.service == service)
    }

    /// Rules held by `host`'s firewall.
    pub fn rules_for<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| r.host == host)
    }

    /// Service name → TCP port of every service `host` exposes (what `rampart status`
    /// reports as a host's `ports`).
    pub fn ports(&self, host: &str) -> std::collections::BTreeMap<String, u16> {
        self.rules_for(host)
            .map(|r| (r.service.as_str().to_string(), r.port))
            .collect()
    }

    /// Whether a verified peer `identity` (`None`: no client certificate) may call `host`'s
    /// `service` (default deny). See [`Callers::admit`].
    pub fn admits(&self, host: &str, service: Service, identity: Option<&Identity>) -> bool {
        self.rule(host, service)
            .is_some_and(|r| r.callers.admit(identity))
    }

    /// Whether a connection from `src` to `host`'s `service` is accepted (default deny).
    pub fn allows(&self, host: &str, service: Service, src: IpAddr) -> bool {
        self.rule(host, service)
            .is_some_and(|r| r.sources.allows(src))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn reference_design_policy() {
        let t = Topology::default_topology();
        let p = Policy::compile(&t);
        let (lb, web1, web2, mon) = (
            ip("127.80.0.10"),
            ip("127.80.0.11"),
            ip("127.80.0.12"),
            ip("127.80.0.20"),
        );
        let anyone = ip("203.0.113.9");
        assert!(p.allows("lb-01", Service::Https, anyone));
        assert!(p.allows("lb-01", Service::Http, anyone));
        assert!(p.allows("web-01", Service::Web, lb));
        assert!(!p.allows("web-01", Service::Web, web2));
        assert!(!p.allows("web-01", Service::Web, ip("127.0.0.1")));
        assert!(p.allows("web-01", Service::Mysql, web2));
        assert!(p.allows("web-02", Service::Mysql, web1));
        assert!(!p.allows("web-01", Service::Mysql, lb));
        assert!(p.allows("mon-01", Service::Ingest, lb));
        assert!(p.allows("mon-01", Service::Ingest, ip("127.0.0.1")));
        assert!(!p.allows("mon-01", Service::Ingest, anyone));
        assert!(p.allows("web-01", Service::Agent, mon));
        assert!(!p.allows("web-01", Service::Agent, lb));
        // default deny: services a host does not run
        assert!(!p.allows("lb-01", Service::Mysql, web1));
        assert!(!p.allows("mon-01", Service::Https, anyone));
        // the replication egress: only the database host itself, the first primary
        // included (it replicates after a failover)
        assert!(p.allows("web-02", Service::MysqlEgress, ip("127.0.0.1")));
        assert!(p.allows("web-02", Service::MysqlEgress, web2));
        assert!(!p.allows("web-02", Service::MysqlEgress, lb));
        assert!(p.allows("web-01", Service::MysqlEgress, web1));
        assert!(!p.allows("web-01", Service::MysqlEgress, web2));
        assert!(!p.allows("lb-01", Service::MysqlEgress, ip("127.0.0.1")));
        // a former primary replicates from the new one
        assert!(p.allows("web-02", Service::Mysql, web1));
        // the failover controller (mon-01) probes and fences over the network
        assert!(p.allows("web-01", Service::Mysql, mon));
        assert!(!p.allows("mon-01", Service::Mysql, mon));
    }

    #[test]
    fn scaled_policy_database_hosts_take_mysql_from_web_replicas_and_controller_only() {
        let t = Topology::built_in("scaled").unwrap();
        let p = Policy::compile(&t);
        let addr = |h: &str| t.host(h).unwrap().address;
        for db in ["db-01", "db-02", "db-03"] {
            let rule = p.rule(db, Service::Mysql).unwrap();
            let Sources::Nets(nets) = &rule.sources else {
                panic!("{db}: MariaDB open to any source");
            };
            let mut got: Vec<IpAddr> = nets.iter().map(|n| n.addr()).collect();
            got.sort();
            let mut want: Vec<IpAddr> = ["web-01", "web-02", "db-01", "db-02", "db-03", "mon-01"]
                .into_iter()
                .map(addr)
                .collect();
            want.sort();
            assert_eq!(got, want, "{db}");
            assert!(
                nets.iter().all(|n| n.prefix_len() == 32),
                "{db}: host addresses only"
            );
            assert!(!p.allows(db, Service::Mysql, addr("lb-01")));
            assert!(!p.allows(db, Service::Mysql, ip("127.0.0.1")));
            // Nothing else on a database host but its agent and its own egress.
            assert!(!p.allows(db, Service::Web, addr("lb-01")));
            assert!(p.allows(db, Service::Agent, addr("mon-01")));
        }
        for web in ["web-01", "web-02"] {
            assert!(
                p.rule(web, Service::Mysql).is_none(),
                "{web} runs no MariaDB"
            );
            assert!(p.allows(web, Service::Web, addr("lb-01")));
        }
        assert!(p.rule("lb-01", Service::Mysql).is_none());
        assert!(p.rule("mon-01", Service::Mysql).is_none());
    }

    #[test]
    fn identities_are_part_of_the_policy() {
        let p = Policy::compile(&Topology::default_topology());
        let lb = Identity::Host("lb-01".into());
        let web2 = Identity::Host("web-02".into());
        assert!(p.admits("web-01", Service::Web, Some(&lb)));
        assert!(!p.admits("web-01", Service::Web, Some(&web2)));
        assert!(!p.admits("web-01", Service::Web, Some(&Identity::Admin)));
        assert!(!p.admits("web-01", Service::Web, None));
        assert!(p.admits("mon-01", Service::Ingest, Some(&web2)));
        assert!(p.admits("mon-01", Service::Ingest, Some(&Identity::Admin)));
        assert!(!p.admits(
            "mon-01",
            Service::Ingest,
            Some(&Identity::Host("mon-01".into()))
        ));
        assert!(p.admits(
            "web-01",
            Service::Agent,
            Some(&Identity::Host("mon-01".into()))
        ));
        assert!(!p.admits("web-01", Service::Agent, Some(&lb)));
        assert!(p.admits("lb-01", Service::Https, None));
        assert!(!p.admits("web-02", Service::MysqlEgress, None));
    }

    #[test]
    fn mapped_ipv6_sources_match_ipv4_rules() {
        let p = Policy::compile(&Topology::default_topology());
        assert!(p.allows("web-01", Service::Web, ip("::ffff:127.80.0.10")));
    }
}
