//! A tidy invariant over a running lab: every TCP socket a lab process listens on is
//! covered by a rule of the compiled policy for that host (no listener outside the
//! firewall), or is a process egress of the data tier on `127.0.0.1` that admits only its
//! own process (this test's connections get nothing); and the replication egress refuses
//! everyone but the replica's own `mariadbd`.
//!
//! Lab on 127.100.1.0/24 with ports of its own (2xxxx).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use topology::{Policy, Topology};

fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_rampart-attack")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first",
        p.display()
    );
    p
}

fn rampart(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("rampart"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap()
}

struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = rampart(&self.0, &["down"]);
    }
}

/// `/proc/net/tcp` address `0100007F:1F90` → 127.0.0.1:8080 (IPv4 in host byte order).
fn parse_v4(field: &str) -> Option<SocketAddr> {
    let (a, p) = field.split_once(':')?;
    let ip = u32::from_str_radix(a, 16).ok()?;
    let port = u16::from_str_radix(p, 16).ok()?;
    Some(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(ip.to_ne_bytes())),
        port,
    ))
}

/// Listening sockets: inode → address, from /proc/net/tcp (state 0A is LISTEN, proc(5)).
fn listening() -> BTreeMap<u64, SocketAddr> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3) == Some(&"0A")).then_some(())?;
            Some((f.get(9)?.parse().ok()?, parse_v4(f.get(1)?)?))
        })
        .collect()
}

fn socket_inodes(pid: u64) -> BTreeSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let s = link.to_string_lossy().to_string();
            s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

#[test]
fn every_listener_of_a_running_lab_is_in_the_policy() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/topology/src/default.toml"),
    )
    .unwrap()
    .replace("127.80.0.", "127.100.1.")
    .replace("# https_port = 443", "https_port = 28443")
    .replace("# http_port = 80", "http_port = 28080")
    .replace("web = 9443", "web = 29443")
    .replace("agent = 9100", "agent = 29100")
    .replace("mysql = 3306", "mysql = 23306")
    .replace("mysql_egress = 3307", "mysql_egress = 23307")
    .replace("ingest = 9090", "ingest = 29090");
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let file = tmp.path().join("rampart.toml");
    std::fs::write(&file, text).unwrap();
    let _down = Down(state.clone());
    let out = rampart(
        &state,
        &[
            "up",
            "--mode",
            "loopback",
            "-d",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let status: Value =
        serde_json::from_slice(&rampart(&state, &["status", "--json"]).stdout).unwrap();
    let topology = Topology::load(&state.join("topology.toml")).unwrap();
    let policy = Policy::compile(&topology);
    // Every process of the lab, with the host it belongs to.
    let mut pids: Vec<(String, u64)> = Vec::new();
    for h in status["hosts"].as_array().unwrap() {
        if let Some(pid) = h["pid"].as_u64() {
            pids.push((h["name"].as_str().unwrap().to_string(), pid));
        }
    }
    for n in status["db"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        if let Some(pid) = n["pid"].as_u64() {
            pids.push((n["host"].as_str().unwrap().to_string(), pid));
        }
    }
    assert!(pids.len() >= 4, "lab processes: {pids:?}");
    let listeners = listening();
    let mut seen = 0;
    let mut outside = Vec::new();
    let mut process_egresses = Vec::new();
    for (host, pid) in &pids {
        let address = topology.host(host).unwrap().address;
        for inode in socket_inodes(*pid) {
            let Some(addr) = listeners.get(&inode) else {
                continue;
            };
            seen += 1;
            let covered =
                addr.ip() == address && policy.rules_for(host).any(|r| r.port == addr.port());
            if !covered && addr.ip() == IpAddr::from([127, 0, 0, 1]) {
                // The data tier's MariaDB client egress: checked below to refuse us.
                process_egresses.push(format!("{host} (pid {pid}) {addr}"));
                let mut tcp = TcpStream::connect_timeout(addr, Duration::from_secs(5)).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 64];
                let n = tcp.read(&mut buf).unwrap_or(0);
                if n != 0 {
                    outside.push(format!(
                        "{host} (pid {pid}) listens on {addr} and answered another process"
                    ));
                }
            } else if !covered {
                outside.push(format!("{host} (pid {pid}) listens on {addr}"));
            }
        }
    }
    assert!(seen >= 8, "found only {seen} listening sockets of the lab");
    println!("process egresses: {process_egresses:?}");
    assert!(
        outside.is_empty(),
        "listeners outside the compiled policy:\n{}",
        outside.join("\n")
    );

    // The replication egress admits only the replica's own mariadbd: any other source,
    // and any other local process, is reset before a byte of MariaDB's greeting.
    if status["db"]["engine"] == "mariadb" {
        let egress = SocketAddr::new(topology.host("web-02").unwrap().address, 23307);
        for from in ["127.101.0.9", "127.100.1.10", "127.0.0.1"] {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&SocketAddr::new(from.parse().unwrap(), 0).into())
                .unwrap();
            sock.connect(&egress.into()).unwrap();
            let mut tcp: TcpStream = sock.into();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            let n = tcp.read(&mut buf).unwrap_or(0);
            assert_eq!(n, 0, "the egress answered {from} with {n} bytes of MariaDB");
        }
    } else {
        println!("SKIP: egress refusal (no MariaDB installed, the data tier runs on SQLite)");
    }
}
