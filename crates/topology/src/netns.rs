//! Netns mode and kernel firewall settings of a topology: the `[netns]` table (namespace
//! name prefix and the lab subnet), each host's `netns_address`, and the `[firewall]` keys
//! the nftables rulesets use (edge rate limit, extra accept rules).

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;

use crate::raw::{RawExtraRule, RawFirewall, RawNetns};
use crate::ConfigError;

/// `[netns]`: how `rampart up --mode netns` lays the hosts out.
///
/// Every host becomes the network namespace `<prefix>-<host>`, with one veth into a bridge
/// that lives in the namespace `<prefix>-br`; the namespace `<prefix>-client` stands for
/// the Internet and this machine joins the bridge through the interface `<prefix>0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetnsSettings {
    /// Namespace and interface name prefix, 1–11 characters of `a-z`, `0-9`, `-`
    /// (interface names are at most 15 bytes). Default `rampart`.
    pub prefix: String,
    /// The lab's IPv4 subnet, prefix length 8–24. Default `10.80.0.0/24`. Its first
    /// address is this machine's (the operator's), its last the client namespace's.
    pub subnet: Ipv4Net,
}

impl Default for NetnsSettings {
    fn default() -> NetnsSettings {
        NetnsSettings {
            prefix: "rampart".into(),
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 80, 0, 0), 24)
                .unwrap_or_else(|e| panic!("built-in subnet: {e}")),
        }
    }
}

impl NetnsSettings {
    /// The namespace of `host` (`client` and `br` name the client and bridge namespaces).
    pub fn namespace(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// The interface in this machine's own namespace that joins the lab's bridge.
    pub fn operator_interface(&self) -> String {
        format!("{}0", self.prefix)
    }

    /// This machine's address on the lab subnet (the subnet's first host address).
    pub fn operator_address(&self) -> Ipv4Addr {
        self.subnet.hosts().next().unwrap_or(self.subnet.network())
    }

    /// The client namespace's address (the subnet's last host address).
    pub fn client_address(&self) -> Ipv4Addr {
        self.subnet
            .hosts()
            .last()
            .unwrap_or(self.subnet.broadcast())
    }

    /// The address `host` gets in netns mode when it sets no `netns_address`: the subnet's
    /// network address plus the host part of its loopback-mode address (`127.80.0.11` →
    /// `10.80.0.11` on the default subnet).
    pub fn derived_address(&self, loopback: IpAddr) -> Option<Ipv4Addr> {
        let IpAddr::V4(v4) = loopback else {
            return None;
        };
        let host_bits = 32 - u32::from(self.subnet.prefix_len());
        let mask = if host_bits >= 32 {
            u32::MAX
        } else {
            (1u32 << host_bits) - 1
        };
        let addr = Ipv4Addr::from(u32::from(self.subnet.network()) | (u32::from(v4) & mask));
        Some(addr)
    }
}

/// `[[firewall.allow]]`: an accept rule beyond those the roles need, e.g. SSH from an
/// administration network. Applied by the nftables rulesets only (no Rampart listener
/// serves these ports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtraRule {
    /// The host whose firewall holds it; `None` (key absent): every host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// TCP port.
    pub port: u16,
    /// Allowed source networks.
    pub sources: Vec<IpNet>,
    /// Why it exists (shown as the nftables rule's comment).
    pub comment: String,
}

/// The kernel firewall's own settings (`[firewall]` besides `operator_sources`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirewallSettings {
    /// New connections per second one source address may open to the edge (HTTPS and
    /// HTTP ports of `lb` hosts) before further SYNs are dropped; 0 turns the limit off.
    /// Default 200.
    pub edge_new_connections_per_second: u32,
    /// Burst above that rate, in connections. Default 400.
    pub edge_new_connections_burst: u32,
    /// Extra accept rules.
    pub allow: Vec<ExtraRule>,
}

impl Default for FirewallSettings {
    fn default() -> FirewallSettings {
        FirewallSettings {
            edge_new_connections_per_second: 200,
            edge_new_connections_burst: 400,
            allow: Vec::new(),
        }
    }
}

pub(crate) fn validate_netns(raw: RawNetns, file: &str) -> Result<NetnsSettings, ConfigError> {
    let d = NetnsSettings::default();
    let prefix = raw.prefix.unwrap_or(d.prefix);
    let ok = !prefix.is_empty()
        && prefix.len() <= 11
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !prefix.starts_with('-');
    if !ok {
        return Err(ConfigError::new(
            file,
            "netns.prefix",
            format!("{prefix:?} cannot prefix namespace and interface names"),
            "use 1-11 characters of a-z, 0-9 and '-', e.g. \"rampart\"",
        ));
    }
    let subnet = match raw.subnet {
        None => d.subnet,
        Some(s) => s.parse::<Ipv4Net>().map_err(|_| {
            ConfigError::new(
                file,
                "netns.subnet",
                format!("{s:?} is not an IPv4 network"),
                "e.g. subnet = \"10.80.0.0/24\"",
            )
        })?,
    };
    let private = subnet.network().is_private() && subnet.broadcast().is_private();
    if !(8..=24).contains(&subnet.prefix_len()) || !private || subnet.trunc() != subnet {
        return Err(ConfigError::new(
            file,
            "netns.subnet",
            format!("{subnet} is not a private network with a prefix length from 8 to 24"),
            "use an unused RFC 1918 network such as \"10.80.0.0/24\"",
        ));
    }
    Ok(NetnsSettings { prefix, subnet })
}

pub(crate) fn validate_firewall(
    raw: &RawFirewall,
    file: &str,
) -> Result<FirewallSettings, ConfigError> {
    let d = FirewallSettings::default();
    let mut allow = Vec::new();
    for (i, r) in raw.allow.iter().flatten().enumerate() {
        allow.push(validate_extra(r, i, file)?);
    }
    Ok(FirewallSettings {
        edge_new_connections_per_second: raw
            .edge_new_connections_per_second
            .unwrap_or(d.edge_new_connections_per_second),
        edge_new_connections_burst: raw
            .edge_new_connections_burst
            .unwrap_or(d.edge_new_connections_burst),
        allow,
    })
}

fn validate_extra(r: &RawExtraRule, i: usize, file: &str) -> Result<ExtraRule, ConfigError> {
    let key = |k: &str| format!("firewall.allow[{i}].{k}");
    let port = match r.port {
        Some(p) if p > 0 => p,
        _ => {
            return Err(ConfigError::new(
                file,
                key("port"),
                "missing or 0",
                "give the TCP port to open, e.g. port = 22",
            ))
        }
    };
    let mut sources = Vec::new();
    for (j, s) in r.sources.iter().flatten().enumerate() {
        let net = crate::model::net_or_address(s).ok_or_else(|| {
            ConfigError::new(
                file,
                format!("firewall.allow[{i}].sources[{j}]"),
                format!("{s:?} is not an address or CIDR network"),
                "e.g. \"192.168.10.0/24\"",
            )
        })?;
        sources.push(net);
    }
    if sources.is_empty() {
        return Err(ConfigError::new(
            file,
            key("sources"),
            "no sources",
            "list the networks allowed, e.g. sources = [\"192.168.10.0/24\"]",
        ));
    }
    Ok(ExtraRule {
        host: r.host.clone(),
        port,
        sources,
        comment: r
            .comment
            .clone()
            .unwrap_or_else(|| format!("extra rule {i} of the topology")),
    })
}
