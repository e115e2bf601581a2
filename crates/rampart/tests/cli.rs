//! The command line's contract: exit codes and messages for bad input.

#![allow(clippy::unwrap_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_rampart");

#[test]
fn a_bad_topology_exits_64_naming_file_key_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.toml");
    std::fs::write(
        &file,
        topology::DEFAULT_TOML.replace("127.80.0.12", "999.1.1.1"),
    )
    .unwrap();
    for args in [
        vec!["check", "-f"],
        vec!["up", "--mode", "loopback", "-d", "-f"],
    ] {
        let out = Command::new(BIN)
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .args(&args)
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("bad.toml"), "{err}");
        assert!(err.contains("hosts[2].address"), "{err}");
        assert!(err.contains("fix:"), "{err}");
    }
}

#[test]
fn a_syntax_error_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("broken.toml");
    std::fs::write(&file, "[site]\ndomain = \n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.toml:2"));
}

#[test]
fn a_non_loopback_address_is_a_configuration_error_in_loopback_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("t.toml");
    std::fs::write(
        &file,
        topology::DEFAULT_TOML.replace("127.80.0.20", "192.0.2.20"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args(["up", "--mode", "loopback", "-d", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("hosts[3].address"));
}

#[test]
fn usage_errors_exit_2_and_status_without_a_lab_fails() {
    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("--state-dir")
        .arg(tmp.path())
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rampart up"));
}

#[test]
fn init_writes_the_default_topology_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("rampart.toml");
    let run = |force: bool| {
        let mut c = Command::new(BIN);
        c.args(["init", "-o"]).arg(&file);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    assert!(run(false).status.success());
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        topology::DEFAULT_TOML
    );
    assert_eq!(run(false).status.code(), Some(1));
    assert!(run(true).status.success());
}

#[test]
fn init_writes_the_scaled_topology_and_check_shows_its_database_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("scaled.toml");
    let out = Command::new(BIN)
        .args(["init", "--topology", "scaled", "-o"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        topology::SCALED_TOML
    );
    let out = Command::new(BIN)
        .args(["check", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok, 7 hosts"), "{text}");
    // Each database host: MariaDB from the web/application hosts, the database hosts and
    // the failover controller (mon-01), nothing else.
    let sources = "127.80.0.11/32, 127.80.0.12/32, 127.80.0.32/32, 127.80.0.33/32, \
                   127.80.0.31/32, 127.80.0.20/32";
    for db in ["db-01", "db-02", "db-03"] {
        let line = text
            .lines()
            .find(|l| l.contains(db) && l.contains("mysql ") && l.contains("tcp/3306"))
            .unwrap_or_else(|| panic!("no MariaDB rule for {db}:\n{text}"));
        assert!(line.ends_with(&format!("from {sources}")), "{line}");
    }
    assert!(
        !text
            .lines()
            .any(|l| l.contains("tcp/3306") && (l.contains("web-0") || l.contains("mon-01"))),
        "MariaDB only on database hosts:\n{text}"
    );
}

#[test]
fn fw_export_prints_a_loadable_file_for_a_real_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("t.toml");
    // Real machines: the addresses as written in the topology.
    std::fs::write(
        &file,
        topology::DEFAULT_TOML
            .replace("127.80.0.10", "192.0.2.10")
            .replace("127.80.0.11", "192.0.2.11"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args(["fw", "export", "web-01", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nft -c -f FILE && nft -f FILE"), "{text}");
    assert!(
        text.contains("ip saddr { 192.0.2.10 } tcp dport 9443 accept"),
        "{text}"
    );
    let out = Command::new(BIN)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args(["fw", "export", "nope", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

#[test]
fn a_zero_half_closed_tunnel_timeout_exits_64_naming_the_key_and_the_default() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("t.toml");
    std::fs::write(
        &file,
        topology::DEFAULT_TOML.replace(
            "tunnel_half_closed_timeout_ms = 10000",
            "tunnel_half_closed_timeout_ms = 0",
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("t.toml"), "{err}");
    assert!(
        err.contains("balancer.tunnel_half_closed_timeout_ms"),
        "{err}"
    );
    assert!(err.contains("fix:") && err.contains("10000"), "{err}");
}
