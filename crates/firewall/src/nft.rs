//! The kernel firewall: the compiled [`Policy`] as one nftables ruleset per host, and the
//! few `nft` operations Rampart performs on it.
//!
//! Everything lives in Rampart's own table, `inet rampart`; other tables (the machine's own
//! firewall, Docker's, …) are never read, flushed or changed. A ruleset file replaces that
//! one table in a single transaction (`table` + `delete table` + the new table, loaded by
//! one `nft -f`): the kernel applies all of it or none of it (nft(8), "Atomic rule
//! replacement"), so a ruleset that fails to load leaves the previous one in force.
//!
//! The input chain: default drop; loopback, established and related traffic accepted;
//! invalid packets counted and dropped; on edge hosts (those with a rule from any source)
//! a blocklist with per-element timeouts and a per-source new-connection rate limit
//! (a dynamic set updated with a `limit rate over` meter); then one accept per policy rule;
//! what falls through is counted in `dropped_policy` and dropped by the chain's policy.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use ipnet::IpNet;
use topology::{FirewallSettings, Host, Policy, Sources};

/// The table every Rampart ruleset lives in.
pub const TABLE: &str = "inet rampart";

/// Named counters of a Rampart ruleset, with what each counts (the `reason` label of
/// `rampart_firewall_dropped_packets_total`).
pub const COUNTERS: [(&str, &str); 4] = [
    (
        "dropped_policy",
        "inbound packets no rule accepts (default deny)",
    ),
    ("dropped_invalid", "packets conntrack marks invalid"),
    ("dropped_blocked", "packets from a blocked source"),
    (
        "dropped_rate",
        "new edge connections over the per-source rate limit",
    ),
];

/// An `nft` failure: the command, and what nft printed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` (or `ip` for a namespace) could not be run.
    #[error("cannot run {program}: {source} (install the nftables and iproute2 packages)")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        source: std::io::Error,
    },
    /// `nft` exited with an error.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line, for the operator to re-run.
        command: String,
        /// nft's message.
        stderr: String,
    },
    /// `nft -j` printed something that is not the documented JSON (libnftables-json(5)).
    #[error("unexpected output of `{command}`: {reason}")]
    Output {
        /// The command.
        command: String,
        /// What was wrong.
        reason: String,
    },
}

/// Compiles the ruleset of `host` from `policy` (its listener rules and extra rules) and
/// `fw` (edge rate limit). The text is a complete file for `nft -f`, with a header saying
/// how to load it; it depends only on its inputs (golden-file tested).
pub fn ruleset(policy: &Policy, host: &Host, fw: &FirewallSettings) -> String {
    let own: Vec<IpNet> = vec![IpNet::from(host.address)];
    let rules: Vec<_> = policy.rules_for(&host.name).collect();
    let edge_ports: Vec<u16> = rules
        .iter()
        .filter(|r| r.sources == Sources::Any)
        .map(|r| r.port)
        .collect();
    let edge = !edge_ports.is_empty();

    let mut s = String::new();
    let _ = writeln!(s, "#!/usr/sbin/nft -f");
    let _ = writeln!(
        s,
        "# Rampart firewall of host {} ({}), compiled from the topology's policy.",
        host.name, host.address
    );
    let _ = writeln!(
        s,
        "# Replaces only the table `{TABLE}`, in one transaction. Load it with:"
    );
    let _ = writeln!(s, "#   nft -c -f FILE && nft -f FILE");
    let _ = writeln!(
        s,
        "# or let `rampart node --host {} --apply-firewall` do it.",
        host.name
    );
    let _ = writeln!(s, "table {TABLE}");
    let _ = writeln!(s, "delete table {TABLE}");
    let _ = writeln!(s, "table {TABLE} {{");
    for (name, what) in COUNTERS {
        if !edge && (name == "dropped_blocked" || name == "dropped_rate") {
            continue;
        }
        let _ = writeln!(s, "\tcounter {name} {{\n\t\tcomment \"{what}\"\n\t}}\n");
    }
    if edge {
        for (set, ty) in [("blocklist4", "ipv4_addr"), ("blocklist6", "ipv6_addr")] {
            let _ = writeln!(
                s,
                "\tset {set} {{\n\t\ttype {ty}\n\t\tflags interval,timeout\n\t\tcomment \"rampart fw block\"\n\t}}\n"
            );
        }
        if fw.edge_new_connections_per_second > 0 {
            for (set, ty) in [("edge_rate4", "ipv4_addr"), ("edge_rate6", "ipv6_addr")] {
                let _ = writeln!(
                    s,
                    "\tset {set} {{\n\t\ttype {ty}\n\t\tsize 65535\n\t\tflags dynamic,timeout\n\t\ttimeout 1m\n\t}}\n"
                );
            }
        }
    }
    let _ = writeln!(s, "\tchain input {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook input priority filter; policy drop;"
    );
    let _ = writeln!(s, "\t\tiif \"lo\" accept");
    let _ = writeln!(s, "\t\tct state established,related accept");
    let _ = writeln!(
        s,
        "\t\tct state invalid counter name \"dropped_invalid\" drop"
    );
    if edge {
        let _ = writeln!(
            s,
            "\t\tip saddr @blocklist4 counter name \"dropped_blocked\" drop"
        );
        let _ = writeln!(
            s,
            "\t\tip6 saddr @blocklist6 counter name \"dropped_blocked\" drop"
        );
        if fw.edge_new_connections_per_second > 0 {
            let ports = port_set(&edge_ports);
            for (family, set) in [("ip", "edge_rate4"), ("ip6", "edge_rate6")] {
                let _ = writeln!(
                    s,
                    "\t\ttcp dport {ports} ct state new update @{set} {{ {family} saddr limit rate over {}/second burst {} packets }} counter name \"dropped_rate\" drop",
                    fw.edge_new_connections_per_second, fw.edge_new_connections_burst
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\t\ticmp type {{ echo-request, destination-unreachable, time-exceeded }} limit rate 100/second accept"
    );
    let _ = writeln!(
        s,
        "\t\ticmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert, destination-unreachable, packet-too-big, time-exceeded }} accept"
    );
    for r in &rules {
        let comment = format!("{}: {}", r.service.as_str(), r.comment);
        match &r.sources {
            Sources::Any => {
                let _ = writeln!(
                    s,
                    "\t\ttcp dport {} accept comment {}",
                    r.port,
                    quoted(&comment)
                );
            }
            Sources::Nets(nets) => {
                // Sources on this host itself arrive on lo, accepted above.
                let remote: Vec<IpNet> = nets
                    .iter()
                    .filter(|n| !n.addr().is_loopback() && !own.contains(n))
                    .copied()
                    .collect();
                if remote.is_empty() {
                    let _ = writeln!(
                        s,
                        "\t\t# {} tcp/{}: this host only (loopback)",
                        r.service.as_str(),
                        r.port
                    );
                }
                accept_from(&mut s, &remote, r.port, &comment);
            }
        }
    }
    for r in policy
        .extra
        .iter()
        .filter(|r| r.host.as_deref() == Some(host.name.as_str()))
    {
        accept_from(&mut s, &r.sources, r.port, &format!("extra: {}", r.comment));
    }
    let _ = writeln!(s, "\t\tcounter name \"dropped_policy\"");
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");
    s
}

fn accept_from(s: &mut String, nets: &[IpNet], port: u16, comment: &str) {
    for (family, list) in [
        (
            "ip",
            nets.iter()
                .filter(|n| matches!(n, IpNet::V4(_)))
                .collect::<Vec<_>>(),
        ),
        (
            "ip6",
            nets.iter()
                .filter(|n| matches!(n, IpNet::V6(_)))
                .collect::<Vec<_>>(),
        ),
    ] {
        if list.is_empty() {
            continue;
        }
        let addrs: Vec<String> = list
            .iter()
            .map(|n| {
                if n.prefix_len() == n.max_prefix_len() {
                    n.addr().to_string()
                } else {
                    n.to_string()
                }
            })
            .collect();
        let _ = writeln!(
            s,
            "\t\t{family} saddr {{ {} }} tcp dport {port} accept comment {}",
            addrs.join(", "),
            quoted(comment)
        );
    }
}

fn port_set(ports: &[u16]) -> String {
    if ports.len() == 1 {
        ports[0].to_string()
    } else {
        let list: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        format!("{{ {} }}", list.join(", "))
    }
}

/// nft strings cannot hold `"`; comments are limited to 128 bytes.
fn quoted(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c == '"' || c.is_control() { '\'' } else { c })
        .take(120)
        .collect();
    format!("\"{clean}\"")
}

/// One named counter as `nft -j list counters` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// Counter name, one of [`COUNTERS`].
    pub name: String,
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// `nft` in one network namespace (`None`: the namespace this process runs in).
#[derive(Debug, Clone, Default)]
pub struct Nft {
    netns: Option<String>,
}

impl Nft {
    /// `nft` in this process's own network namespace (a real machine, or a node already
    /// running inside its host's namespace).
    pub fn here() -> Nft {
        Nft { netns: None }
    }

    /// `nft` inside the named namespace (`ip netns exec NAME nft …`).
    pub fn in_netns(name: &str) -> Nft {
        Nft {
            netns: Some(name.to_string()),
        }
    }

    fn command(&self, args: &[&str]) -> (Command, String) {
        let mut line = String::new();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                line.push_str(&format!("ip netns exec {ns} nft"));
                c
            }
            None => {
                line.push_str("nft");
                Command::new("nft")
            }
        };
        cmd.args(args);
        for a in args {
            line.push(' ');
            line.push_str(a);
        }
        (cmd, line)
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
        let (mut cmd, line) = self.command(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let program = if self.netns.is_some() { "ip" } else { "nft" };
        let mut child = cmd.spawn().map_err(|source| NftError::Spawn {
            program: program.into(),
            source,
        })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // nft reads the whole file before it parses: a write error shows as its exit.
            let _ = pipe.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().map_err(|source| NftError::Spawn {
            program: program.into(),
            source,
        })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NftError::Failed {
                command: line,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Checks `ruleset` against the kernel without applying it (`nft -c -f`).
    ///
    /// Errors: [`NftError::Failed`] with nft's message naming the bad line.
    pub fn check(&self, ruleset: &str) -> Result<(), NftError> {
        self.run(&["-c", "-f", "/dev/stdin"], Some(ruleset))
            .map(|_| ())
    }

    /// Checks, then loads `ruleset` in one transaction (`nft -c -f`, then `nft -f`). On any
    /// error the ruleset in force before stays in force.
    pub fn apply(&self, ruleset: &str) -> Result<(), NftError> {
        self.check(ruleset)?;
        self.run(&["-f", "/dev/stdin"], Some(ruleset)).map(|_| ())
    }

    /// The table as loaded, with counter values and set elements (`nft list table`).
    /// Errors: the table is not loaded ([`NftError::Failed`]).
    pub fn show(&self) -> Result<String, NftError> {
        self.run(&["list", "table", "inet", "rampart"], None)
    }

    /// Whether Rampart's table is loaded here.
    pub fn loaded(&self) -> bool {
        self.show().is_ok()
    }

    /// The named counters of the table (`nft -j list counters table inet rampart`, whose
    /// JSON is described in libnftables-json(5)).
    pub fn counters(&self) -> Result<Vec<Counter>, NftError> {
        let args = ["-j", "list", "counters", "table", "inet", "rampart"];
        let text = self.run(&args, None)?;
        let bad = |reason: &str| NftError::Output {
            command: format!("nft {}", args.join(" ")),
            reason: reason.to_string(),
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let items = v
            .get("nftables")
            .and_then(|n| n.as_array())
            .ok_or_else(|| bad("no \"nftables\" array"))?;
        Ok(items
            .iter()
            .filter_map(|i| i.get("counter"))
            .filter_map(|c| {
                Some(Counter {
                    name: c.get("name")?.as_str()?.to_string(),
                    packets: c.get("packets")?.as_u64()?,
                    bytes: c.get("bytes")?.as_u64()?,
                })
            })
            .collect())
    }

    /// Adds `addr` (an address or network) to the blocklist, for `ttl` (`None`: until
    /// unblocked or the ruleset is reloaded). Only edge hosts have a blocklist.
    pub fn block(&self, addr: IpNet, ttl: Option<Duration>) -> Result<(), NftError> {
        let set = blocklist(&addr);
        let element = match ttl {
            Some(d) => format!("{{ {} timeout {}s }}", element(&addr), d.as_secs().max(1)),
            None => format!("{{ {} }}", element(&addr)),
        };
        self.run(&["add", "element", "inet", "rampart", set, &element], None)
            .map(|_| ())
    }

    /// Removes `addr` from the blocklist. Errors when it is not in it.
    pub fn unblock(&self, addr: IpNet) -> Result<(), NftError> {
        let set = blocklist(&addr);
        let element = format!("{{ {} }}", element(&addr));
        self.run(
            &["delete", "element", "inet", "rampart", set, &element],
            None,
        )
        .map(|_| ())
    }
}

/// The table that cuts a fenced host off: `inet rampart_fence`, apart from the policy's
/// table so that reloading the policy (a node's start, `--apply-firewall`) never lifts a
/// fence.
pub const FENCE_TABLE: &str = "rampart_fence";

/// The ruleset that cuts a host off from every peer (STONITH by firewall, the analogue of
/// a power switch): inbound and outbound chains hooked before the policy's (`priority
/// filter - 10`) drop every packet except loopback and, when `allow` is given, the failover
/// controller's connections to `port` (the MariaDB relay) from `allow` and their replies.
/// Outbound is cut too, so a reply the host wrote (an acknowledgement of a write) never
/// reaches a client. `why` becomes the drop rules' comment (quotes removed). Loaded like the
/// policy: `table` + `delete table` + the table, one transaction.
pub fn fence_ruleset(allow: Option<(IpAddr, u16)>, why: &str) -> String {
    let why: String = why.chars().filter(|c| *c != '"' && *c != '\\').collect();
    let (inbound, outbound) = match allow {
        Some((addr, port)) => {
            let fam = if addr.is_ipv4() { "ip" } else { "ip6" };
            (
                format!("\t\t{fam} saddr {addr} tcp dport {port} accept\n"),
                format!("\t\t{fam} daddr {addr} tcp sport {port} accept\n"),
            )
        }
        None => (String::new(), String::new()),
    };
    format!(
        "table inet {FENCE_TABLE}\ndelete table inet {FENCE_TABLE}\ntable inet {FENCE_TABLE} {{\n\
         \tchain input {{\n\t\ttype filter hook input priority filter - 10; policy accept;\n\
         \t\tiif \"lo\" accept\n{inbound}\t\tcounter drop comment \"{why}\"\n\t}}\n\
         \tchain output {{\n\t\ttype filter hook output priority filter - 10; policy accept;\n\
         \t\toif \"lo\" accept\n{outbound}\t\tcounter drop comment \"{why}\"\n\t}}\n}}\n"
    )
}

impl Nft {
    /// Cuts this host off ([`fence_ruleset`]), checked then loaded in one transaction;
    /// loading it again replaces it.
    ///
    /// Errors: [`NftError`] when `nft` cannot be run or refuses the ruleset; the host is
    /// then not fenced.
    pub fn fence(&self, allow: Option<(IpAddr, u16)>, why: &str) -> Result<(), NftError> {
        self.apply(&fence_ruleset(allow, why))
    }

    /// Whether the fence table is loaded here.
    pub fn fenced(&self) -> bool {
        self.run(&["list", "table", "inet", FENCE_TABLE], None)
            .is_ok()
    }

    /// Removes the fence table (nothing happens when there is none).
    ///
    /// Errors: [`NftError`] when `nft` cannot be run or fails.
    pub fn unfence(&self) -> Result<(), NftError> {
        let text = format!("table inet {FENCE_TABLE}\ndelete table inet {FENCE_TABLE}\n");
        self.run(&["-f", "/dev/stdin"], Some(&text)).map(|_| ())
    }
}

fn blocklist(addr: &IpNet) -> &'static str {
    match addr {
        IpNet::V4(_) => "blocklist4",
        IpNet::V6(_) => "blocklist6",
    }
}

fn element(addr: &IpNet) -> String {
    if addr.prefix_len() == addr.max_prefix_len() {
        addr.addr().to_string()
    } else {
        addr.trunc().to_string()
    }
}

/// Whether the `nft` program can be run here (for choosing netns mode and skipping tests).
pub fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A single address as a network (`/32` or `/128`).
pub fn host_net(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}
