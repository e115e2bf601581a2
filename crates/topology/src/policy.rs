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
        }
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
    /// Why the rule exists, for people reading `rampart status` or the ruleset.
    pub comment: String,
}

/// The whole compiled policy: default deny plus the rules of [`Policy::compile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// All accept rules, grouped by host in topology order.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// Compiles the policy of the reference design from a topology:
    /// - `lb` hosts: HTTPS and HTTP from anywhere;
    /// - `web` hosts: the web port only from `lb` hosts;
    /// - database hosts: the MariaDB port only from `app` hosts and `db-replica` hosts;
    /// - the `monitor` host: ingest only from `agent` hosts and the operator sources;
    /// - `agent` hosts: `/metrics` only from the `monitor` host and the operator sources.
    pub fn compile(t: &Topology) -> Policy {
        let addrs = |role: Role| -> Vec<IpNet> {
            t.hosts_with(role).map(|h| IpNet::from(h.address)).collect()
        };
        let with_operator = |mut nets: Vec<IpNet>| {
            nets.extend(t.operator_sources.iter().copied());
            nets
        };
        let mut rules = Vec::new();
        for h in &t.hosts {
            let mut rule = |service, port, sources, comment: &str| {
                rules.push(Rule {
                    host: h.name.clone(),
                    service,
                    port,
                    sources,
                    comment: comment.to_string(),
                })
            };
            if h.has(Role::Lb) {
                rule(Service::Https, t.https_port(), Sources::Any, "public HTTPS");
                rule(
                    Service::Http,
                    t.http_port(),
                    Sources::Any,
                    "public HTTP, redirects to HTTPS",
                );
            }
            if h.has(Role::Web) {
                rule(
                    Service::Web,
                    t.ports.web,
                    Sources::Nets(addrs(Role::Lb)),
                    "web server, load balancers only",
                );
            }
            if h.has(Role::DbPrimary) || h.has(Role::DbReplica) {
                let mut nets = addrs(Role::App);
                for n in addrs(Role::DbReplica) {
                    if !nets.contains(&n) {
                        nets.push(n);
                    }
                }
                rule(
                    Service::Mysql,
                    t.ports.mysql,
                    Sources::Nets(nets),
                    "MariaDB, application hosts and replicas only",
                );
            }
            if h.has(Role::Monitor) {
                rule(
                    Service::Ingest,
                    t.ports.ingest,
                    Sources::Nets(with_operator(addrs(Role::Agent))),
                    "monitoring ingest, agents and operator only",
                );
            }
            if h.has(Role::Agent) {
                rule(
                    Service::Agent,
                    t.ports.agent,
                    Sources::Nets(with_operator(addrs(Role::Monitor))),
                    "agent /metrics, monitor and operator only",
                );
            }
        }
        Policy { rules }
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
    }

    #[test]
    fn mapped_ipv6_sources_match_ipv4_rules() {
        let p = Policy::compile(&Topology::default_topology());
        assert!(p.allows("web-01", Service::Web, ip("::ffff:127.80.0.10")));
    }
}
