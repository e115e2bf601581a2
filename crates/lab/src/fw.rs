//! `rampart fw`: the kernel firewall of a running lab (show, block, unblock), of any
//! topology (check, export), and the probe that proves the policy with real connections.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use firewall::nft::{self, Nft};
use ipnet::IpNet;
use serde::Serialize;
use topology::{Callers, Policy, Topology};

use crate::status::LabFile;
use crate::{LabError, Mode, StateDir};

/// The mode and the resolved topology of the lab running from `state`.
///
/// Errors: [`LabError::NotUp`] when nothing was brought up there.
pub fn running(state: &StateDir) -> Result<(Mode, Topology), LabError> {
    let lab: LabFile = match std::fs::read(state.lab_file()) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| LabError::Other(format!("{}: {e}", state.lab_file().display())))?,
        Err(_) => return Err(LabError::NotUp(state.root().to_path_buf())),
    };
    Ok((lab.mode, Topology::load(&state.topology_file())?))
}

/// The nftables file of `host` in `t`, for `nft -f` on a real machine (addresses as `t`
/// has them).
///
/// Errors: no such host.
pub fn export(t: &Topology, host: &str) -> Result<String, LabError> {
    let h = t
        .host(host)
        .ok_or_else(|| LabError::Other(format!("host {host} is not in the topology")))?;
    Ok(nft::ruleset(&Policy::compile(t), h, &t.firewall))
}

/// A host's name and whether the kernel accepts its ruleset (`Err`: nft's message).
pub type HostCheck = (String, Result<(), String>);

/// Checks every host's ruleset with `nft -c` (nothing is applied). Returns one line per
/// host, `Err` for the hosts whose ruleset the kernel would refuse.
///
/// Errors: `nft` cannot be run (needs root and the nftables package).
pub fn check(t: &Topology) -> Result<Vec<HostCheck>, LabError> {
    if !nft::nft_available() {
        return Err(LabError::Unsupported(
            "`nft` is not installed (apt-get install nftables)".into(),
        ));
    }
    let policy = Policy::compile(t);
    Ok(t.hosts
        .iter()
        .map(|h| {
            let text = nft::ruleset(&policy, h, &t.firewall);
            (
                h.name.clone(),
                Nft::here().check(&text).map_err(|e| e.to_string()),
            )
        })
        .collect())
}

/// The ruleset as loaded in each host of the running lab (`host`: only that one), with
/// counter values and blocklist elements.
///
/// Errors: not netns mode (loopback mode has no kernel ruleset); the table is missing.
pub fn show(state: &StateDir, host: Option<&str>) -> Result<Vec<(String, String)>, LabError> {
    let (mode, t) = running(state)?;
    need_netns(mode, "fw show")?;
    let mut out = Vec::new();
    for h in t.hosts.iter().filter(|h| host.is_none_or(|n| n == h.name)) {
        let text = Nft::in_netns(&t.netns.namespace(&h.name))
            .show()
            .map_err(|e| LabError::Other(e.to_string()))?;
        out.push((h.name.clone(), text));
    }
    if out.is_empty() {
        return Err(LabError::Other(format!(
            "no host named {}",
            host.unwrap_or_default()
        )));
    }
    Ok(out)
}

/// Adds `addr` to the blocklist of every edge (`lb`) host for `ttl` (`None`: until
/// unblocked). Returns the hosts changed.
///
/// Errors: not netns mode; `nft` fails.
pub fn block(
    state: &StateDir,
    addr: IpNet,
    ttl: Option<Duration>,
) -> Result<Vec<String>, LabError> {
    edge_do(state, "fw block", |n| n.block(addr, ttl))
}

/// Removes `addr` from the blocklist of every edge host.
///
/// Errors: not netns mode; `addr` is not blocked.
pub fn unblock(state: &StateDir, addr: IpNet) -> Result<Vec<String>, LabError> {
    edge_do(state, "fw unblock", |n| n.unblock(addr))
}

fn edge_do(
    state: &StateDir,
    what: &str,
    f: impl Fn(&Nft) -> Result<(), nft::NftError>,
) -> Result<Vec<String>, LabError> {
    let (mode, t) = running(state)?;
    need_netns(mode, what)?;
    let mut done = Vec::new();
    for h in t.hosts_with(topology::Role::Lb) {
        f(&Nft::in_netns(&t.netns.namespace(&h.name)))
            .map_err(|e| LabError::Other(format!("{}: {e}", h.name)))?;
        done.push(h.name.clone());
    }
    Ok(done)
}

fn need_netns(mode: Mode, what: &str) -> Result<(), LabError> {
    if mode == Mode::Netns {
        Ok(())
    } else {
        Err(LabError::Unsupported(format!(
            "`rampart {what}` needs a lab in netns mode (loopback mode has no kernel firewall; \
             `rampart fw probe` works in both)"
        )))
    }
}

/// What a probe connection saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Observed {
    /// The connection was established and not refused by the listener's filter.
    Open,
    /// Refused with a reset: nothing listens (loopback: or nothing there).
    Closed,
    /// Loopback mode: accepted by the kernel, then reset by the user-space filter.
    Reset,
    /// No answer before the timeout: dropped by a firewall.
    Filtered,
}

/// One probed flow.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    /// The source: a host, `client` (netns mode: the Internet) or `operator` (this
    /// machine).
    pub from: String,
    /// The destination host.
    pub to: String,
    /// TCP port.
    pub port: u16,
    /// The service the destination runs on that port, if any.
    pub service: Option<String>,
    /// Whether the policy allows it.
    pub expected_allowed: bool,
    /// What the connection saw.
    pub observed: Observed,
    /// Whether what was seen counts as allowed (netns mode: `open` or `closed`, the
    /// packet got through; loopback mode: `open` only).
    pub observed_allowed: bool,
}

/// The whole probe matrix.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// The lab's mode.
    pub mode: Mode,
    /// Every flow, sources in topology order.
    pub results: Vec<ProbeResult>,
    /// Flows the policy denies that got through.
    pub unexpected_allowed: usize,
    /// Flows the policy allows that did not.
    pub unexpected_denied: usize,
}

/// How long a probe waits for a SYN's answer (and, in loopback mode, for the filter's
/// reset after the kernel accepted).
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
const LOOPBACK_RESET_WAIT: Duration = Duration::from_millis(800);

/// Tries every source → every other host × every port in use (the ports of every rule of
/// the policy), in parallel, and compares with the policy. Sources: every host and this
/// machine (the operator); in netns mode also the client namespace. A flow the policy
/// admits only for the host's own server process (the replication egress) is expected
/// denied: a probe is not that process.
///
/// Errors: nothing runs from `state`; netns mode without root.
pub fn probe(state: &StateDir) -> Result<ProbeReport, LabError> {
    let (mode, t) = running(state)?;
    let policy = Policy::compile(&t);
    let mut ports: Vec<u16> = policy.rules.iter().map(|r| r.port).collect();
    ports.sort_unstable();
    ports.dedup();

    // (name, source address, namespace to enter)
    let mut sources: Vec<(String, IpAddr, Option<String>)> = t
        .hosts
        .iter()
        .map(|h| {
            let ns = (mode == Mode::Netns).then(|| t.netns.namespace(&h.name));
            (h.name.clone(), h.address, ns)
        })
        .collect();
    match mode {
        Mode::Netns => {
            sources.push((
                "client".into(),
                IpAddr::V4(t.netns.client_address()),
                Some(t.netns.namespace("client")),
            ));
            sources.push((
                "operator".into(),
                IpAddr::V4(t.netns.operator_address()),
                None,
            ));
        }
        Mode::Loopback => {
            sources.push(("operator".into(), IpAddr::V4(Ipv4Addr::LOCALHOST), None));
        }
    }

    let mut jobs = Vec::new();
    for (from, src, ns) in &sources {
        for h in &t.hosts {
            if &h.name == from {
                continue;
            }
            for &port in &ports {
                let rule = policy.rules_for(&h.name).find(|r| r.port == port);
                let expected = rule.is_some_and(|r| {
                    r.sources.allows(*src) && !matches!(r.callers, Callers::LocalServer)
                });
                let job = ProbeResult {
                    from: from.clone(),
                    to: h.name.clone(),
                    port,
                    service: rule.map(|r| r.service.as_str().to_string()),
                    expected_allowed: expected,
                    observed: Observed::Filtered,
                    observed_allowed: false,
                };
                let dst = SocketAddr::new(h.address, port);
                let (src, ns) = (*src, ns.clone());
                jobs.push(std::thread::spawn(move || {
                    let observed = probe_one(mode, ns.as_deref(), src, dst);
                    ProbeResult {
                        observed,
                        observed_allowed: match mode {
                            Mode::Netns => matches!(observed, Observed::Open | Observed::Closed),
                            Mode::Loopback => observed == Observed::Open,
                        },
                        ..job
                    }
                }));
            }
        }
    }
    let mut results = Vec::with_capacity(jobs.len());
    for j in jobs {
        results.push(
            j.join()
                .map_err(|_| LabError::Other("a probe thread panicked".into()))?,
        );
    }
    let unexpected_allowed = results
        .iter()
        .filter(|r| r.observed_allowed && !r.expected_allowed)
        .count();
    let unexpected_denied = results
        .iter()
        .filter(|r| !r.observed_allowed && r.expected_allowed)
        .count();
    Ok(ProbeReport {
        mode,
        results,
        unexpected_allowed,
        unexpected_denied,
    })
}

fn probe_one(mode: Mode, ns: Option<&str>, src: IpAddr, dst: SocketAddr) -> Observed {
    if let Some(ns) = ns {
        // This thread alone moves into the source's namespace (setns(2) with CLONE_NEWNET
        // affects the calling thread only); sockets made after it belong there.
        let entered = std::fs::File::open(format!("/var/run/netns/{ns}")).and_then(|f| {
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
        if let Err(e) = entered {
            tracing::warn!("probe: cannot enter namespace {ns}: {e}");
            return Observed::Filtered;
        }
    }
    let stream = match mode {
        Mode::Netns => TcpStream::connect_timeout(&dst, PROBE_TIMEOUT),
        Mode::Loopback => connect_from(src, dst),
    };
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Observed::Closed,
        Err(_) => return Observed::Filtered,
    };
    if mode == Mode::Netns {
        return Observed::Open;
    }
    // Loopback: the kernel accepted; the user-space filter decides right after accept.
    let _ = stream.set_read_timeout(Some(LOOPBACK_RESET_WAIT));
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Observed::Reset,
        Ok(_) => Observed::Open,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Observed::Open
        }
        Err(_) => Observed::Reset,
    }
}

fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect_timeout(&dst.into(), PROBE_TIMEOUT)?;
    Ok(sock.into())
}
