//! Netns mode's network: one network namespace per host, a client namespace standing for the
//! Internet, and a bridge in a namespace of its own, all made with `ip` (ip-netns(8),
//! ip-link(8)).
//!
//! ```text
//!  <prefix>-lb-01 eth0 ─┐
//!  <prefix>-web-01 eth0 ─┤
//!  <prefix>-web-02 eth0 ─┼─ br0 in <prefix>-br ─ <prefix>0 (this machine, the operator)
//!  <prefix>-mon-01 eth0 ─┤
//!  <prefix>-client eth0 ─┘
//! ```
//!
//! The bridge has a namespace of its own so the machine's own forwarding and bridge
//! filtering rules never see lab traffic. This machine reaches the lab through the veth
//! `<prefix>0` holding the subnet's first address. Every name this module creates starts
//! with the topology's `netns.prefix`: `sweep` removes exactly those (namespaces
//! `<prefix>-*`, the interface `<prefix>0`, `/etc/netns/<prefix>-*`).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use topology::{NetnsSettings, Role, Topology};

use crate::LabError;

/// Names a host cannot have in netns mode (they name the lab's own namespaces).
pub const RESERVED_HOSTS: [&str; 2] = ["br", "client"];

/// The lab network of a topology already laid out for netns mode
/// ([`Topology::in_netns`]).
#[derive(Debug, Clone)]
pub struct LabNetwork {
    settings: NetnsSettings,
    hosts: Vec<(String, Ipv4Addr)>,
    /// `hosts` file lines of the client namespace: the site's names at the load balancer.
    site_names: Option<(Ipv4Addr, Vec<String>)>,
}

impl LabNetwork {
    /// The network of `t` (laid out for netns mode).
    pub fn new(t: &Topology) -> LabNetwork {
        let lb = t.hosts_with(Role::Lb).next().map(|h| h.netns_address);
        LabNetwork {
            settings: t.netns.clone(),
            hosts: t
                .hosts
                .iter()
                .map(|h| (h.name.clone(), h.netns_address))
                .collect(),
            site_names: lb.map(|a| (a, t.site.names())),
        }
    }

    /// The namespace of `host` (`client` for the client namespace).
    pub fn namespace(&self, host: &str) -> String {
        self.settings.namespace(host)
    }

    /// Every namespace of the lab: hosts, client, bridge.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = self.hosts.iter().map(|(h, _)| self.namespace(h)).collect();
        all.push(self.namespace("client"));
        all.push(self.namespace("br"));
        all
    }

    /// Creates the whole network. Leftovers of an earlier run with the same prefix are
    /// swept first; a namespace of that prefix with live processes in it belongs to a lab
    /// still running (from another state directory) and is an error.
    ///
    /// Errors: a host has a reserved name, the subnet is already routed on this machine
    /// through another interface, or an `ip` command fails (its message included).
    pub fn create(&self) -> Result<(), LabError> {
        for (h, _) in &self.hosts {
            if RESERVED_HOSTS.contains(&h.as_str()) {
                return Err(LabError::Unsupported(format!(
                    "netns mode names its own namespaces {}-br and {}-client: rename host {h}",
                    self.settings.prefix, self.settings.prefix
                )));
            }
        }
        sweep(&self.settings)?;
        let subnet = self.settings.subnet;
        let routed = ip_output(&["-4", "route", "show", "to", "match", &subnet.to_string()])?;
        if let Some(line) = routed
            .lines()
            .find(|l| !l.starts_with("default") && l.contains(&subnet.to_string()))
        {
            return Err(LabError::Unsupported(format!(
                "netns.subnet {subnet} is already routed on this machine ({line}); choose \
                 another subnet in the topology's [netns] table"
            )));
        }
        let len = subnet.prefix_len();
        let br = self.namespace("br");
        ip(&["netns", "add", &br])?;
        ns_ip(&br, &["link", "set", "lo", "up"])?;
        ns_ip(&br, &["link", "add", "br0", "type", "bridge"])?;
        ns_ip(&br, &["link", "set", "br0", "up"])?;

        let mut members: Vec<(String, Ipv4Addr, String)> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, (h, a))| (self.namespace(h), *a, format!("h{i}")))
            .collect();
        members.push((
            self.namespace("client"),
            self.settings.client_address(),
            "c0".into(),
        ));
        for (ns, addr, port) in &members {
            ip(&["netns", "add", ns])?;
            ns_ip(ns, &["link", "set", "lo", "up"])?;
            ns_ip(
                &br,
                &[
                    "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            )?;
            ns_ip(&br, &["link", "set", port, "master", "br0", "up"])?;
            ns_ip(
                ns,
                &["addr", "add", &format!("{addr}/{len}"), "dev", "eth0"],
            )?;
            ns_ip(ns, &["link", "set", "eth0", "up"])?;
        }
        // This machine (the operator) joins the bridge.
        let op = self.settings.operator_interface();
        ip(&[
            "link", "add", &op, "type", "veth", "peer", "name", "op", "netns", &br,
        ])?;
        ns_ip(&br, &["link", "set", "op", "master", "br0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/{len}", self.settings.operator_address()),
            "dev",
            &op,
        ])?;
        ip(&["link", "set", &op, "up"])?;
        self.write_hosts_files()?;
        Ok(())
    }

    /// `/etc/netns/<ns>/hosts` for every namespace (ip-netns(8) bind-mounts it over
    /// `/etc/hosts` for `ip netns exec`): host names everywhere, and the site's names at
    /// the load balancer.
    fn write_hosts_files(&self) -> Result<(), LabError> {
        let mut text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
        for (h, a) in &self.hosts {
            text.push_str(&format!("{a}\t{h}\n"));
        }
        text.push_str(&format!("{}\tclient\n", self.settings.client_address()));
        if let Some((lb, names)) = &self.site_names {
            text.push_str(&format!("{lb}\t{}\n", names.join(" ")));
        }
        for ns in self.namespaces() {
            let dir = etc_netns(&ns);
            std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
            let file = dir.join("hosts");
            std::fs::write(&file, &text).map_err(|e| LabError::io(&file, e))?;
        }
        Ok(())
    }
}

fn etc_netns(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

/// Removes everything netns mode made for `settings.prefix`: the namespaces `<prefix>-*`
/// (which takes their veths, addresses and nftables tables with them), the interface
/// `<prefix>0` and `/etc/netns/<prefix>-*`. Returns what it removed.
///
/// Errors: a namespace still has processes in it (a lab that still runs); an `ip` command
/// fails.
pub fn sweep(settings: &NetnsSettings) -> Result<Vec<String>, LabError> {
    let mine = lab_namespaces(settings)?;
    for ns in &mine {
        let pids = ip_output(&["netns", "pids", ns]).unwrap_or_default();
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if !pids.is_empty() {
            return Err(LabError::Unsupported(format!(
                "namespace {ns} still has processes in it (pids {}): a lab is running there; \
                 stop it with `rampart down` from its state directory",
                pids.join(", ")
            )));
        }
    }
    let mut removed = Vec::new();
    for ns in &mine {
        ip(&["netns", "del", ns])?;
        removed.push(format!("namespace {ns}"));
    }
    let op = settings.operator_interface();
    if ip_output(&["link", "show", "dev", &op]).is_ok() {
        // Deleting a namespace frees its veths asynchronously; delete ours at once.
        let _ = ip(&["link", "del", &op]);
        removed.push(format!("interface {op}"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while ip_output(&["link", "show", "dev", &op]).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Ok(rd) = std::fs::read_dir("/etc/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{}-", settings.prefix)) {
                let _ = std::fs::remove_dir_all(e.path());
                removed.push(format!("/etc/netns/{name}"));
            }
        }
    }
    Ok(removed)
}

/// The namespaces named `<prefix>-*` that exist now.
pub fn lab_namespaces(settings: &NetnsSettings) -> Result<Vec<String>, LabError> {
    let list = ip_output(&["netns", "list"])?;
    let want = format!("{}-", settings.prefix);
    Ok(list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&want))
        .map(str::to_string)
        .collect())
}

/// Whether netns mode can run here, and if not, why: it needs root, `ip` and `nft`.
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".into());
    }
    let runs = |p: &str, arg: &str| {
        Command::new(p)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !runs("ip", "-V") {
        return Err("`ip` (iproute2) is not installed".into());
    }
    if !runs("nft", "--version") {
        return Err("`nft` (nftables) is not installed".into());
    }
    Ok(())
}

/// A command run inside `ns` (`ip netns exec NS PROGRAM`).
pub fn exec_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

fn ns_ip(ns: &str, args: &[&str]) -> Result<(), LabError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    ip_output(args).map(|_| ())
}

fn ip_output(args: &[&str]) -> Result<String, LabError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Other(format!("cannot run ip: {e} (install iproute2)")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
