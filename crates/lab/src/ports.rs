//! Resolving the public ports: 443/80 where this process may bind them, otherwise
//! 8443/8080 (an unprivileged user cannot bind ports below 1024 unless
//! `net.ipv4.ip_unprivileged_port_start` allows it).

use std::net::{IpAddr, SocketAddr, TcpListener};

use topology::{Role, Topology};

/// Fills `site.https_port` / `site.http_port` when the topology leaves them unset: the
/// privileged port when a test bind on every load balancer address succeeds, otherwise the
/// unprivileged fallback. Ports set in the topology are kept as they are.
pub(crate) fn resolve_public_ports(t: &mut Topology) {
    let lbs: Vec<IpAddr> = t.hosts_with(Role::Lb).map(|h| h.address).collect();
    if t.site.https_port.is_none() {
        t.site.https_port = Some(pick(&lbs, 443, 8443));
    }
    if t.site.http_port.is_none() {
        t.site.http_port = Some(pick(&lbs, 80, 8080));
    }
}

fn pick(addrs: &[IpAddr], preferred: u16, fallback: u16) -> u16 {
    let ok = addrs
        .iter()
        .all(|a| TcpListener::bind(SocketAddr::new(*a, preferred)).is_ok());
    if ok {
        preferred
    } else {
        fallback
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn explicit_ports_are_kept() {
        let mut t = Topology::default_topology();
        t.site.https_port = Some(18443);
        t.site.http_port = Some(18080);
        resolve_public_ports(&mut t);
        assert_eq!(t.site.https_port, Some(18443));
        assert_eq!(t.site.http_port, Some(18080));
    }

    #[test]
    fn busy_preferred_port_falls_back() {
        let addr: IpAddr = "127.95.9.1".parse().expect("address");
        let held = TcpListener::bind(SocketAddr::new(addr, 0)).expect("bind");
        let port = held.local_addr().expect("addr").port();
        assert_eq!(pick(&[addr], port, 1), 1);
    }
}
