//! What the database tests share: the two-server topology, the skip rule, the reaper of
//! left-over servers, polling, and root's connection over a server's socket.
#![allow(dead_code)] // Each test file uses its own subset.

use std::path::Path;
use std::time::Duration;

use db::{mariadbd_defaults_file, mariadbd_socket, Credentials};
use mysql_async::{Conn, OptsBuilder};
use topology::Topology;

/// The database hosts of [`pair_topology`].
pub const HOSTS: [&str; 2] = ["web-01", "web-02"];

/// The reference design's database pair on `net` (e.g. `"127.110.2"`): lb-01 at `.10`,
/// web-01 (primary) at `.11`, web-02 (replica) at `.12`, and with `monitor` mon-01 at `.20`
/// (the failover controller's host); MariaDB relays on `mysql`, replication egress on
/// `mysql + 1`.
pub fn pair_topology(net: &str, mysql: u16, monitor: bool) -> Topology {
    let mon = if monitor {
        format!("[[hosts]]\nname = \"mon-01\"\naddress = \"{net}.20\"\nroles = [\"monitor\"]\n")
    } else {
        String::new()
    };
    let text = format!(
        r#"
[ports]
mysql = {mysql}
mysql_egress = {egress}
[database]
engine = "mariadb"
[[hosts]]
name = "lb-01"
address = "{net}.10"
roles = ["lb"]
[[hosts]]
name = "web-01"
address = "{net}.11"
roles = ["web", "app", "db-primary"]
[[hosts]]
name = "web-02"
address = "{net}.12"
roles = ["web", "app", "db-replica"]
{mon}"#,
        egress = mysql + 1
    );
    Topology::parse(&text, "test").unwrap()
}

/// Sets up test logging at `filter`; true (with the reason printed) when MariaDB is not
/// installed.
pub fn skip(filter: &str) -> bool {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(filter)
        .try_init();
    if db::find_mariadbd().is_none() {
        eprintln!("SKIP: mariadbd is not installed (apt-get install mariadb-server)");
        return true;
    }
    false
}

/// Processes whose command line mentions `cnf` (our `--defaults-file`).
pub fn processes_of(cnf: &Path) -> Vec<u32> {
    let needle = cnf.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(&needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Kills (SIGKILL) every `mariadbd` of [`HOSTS`] in the state dir when dropped, so a failing
/// test leaves no server behind.
pub struct Reaper<'a>(pub &'a Path);

impl Drop for Reaper<'_> {
    fn drop(&mut self) {
        for h in HOSTS {
            for pid in processes_of(&mariadbd_defaults_file(self.0, h)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Polls `f` until it answers `Some`, for at most `seconds` ([`test_support::eventually`]).
pub async fn eventually<T, F, Fut>(what: &str, seconds: u64, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    test_support::eventually(what, Duration::from_secs(seconds), f).await
}

/// Root's connection options for `host`'s server, over its Unix socket.
pub fn root_opts(state: &Path, host: &str) -> OptsBuilder {
    let creds = Credentials::load(state).unwrap();
    OptsBuilder::default()
        .socket(Some(
            mariadbd_socket(state, host).to_string_lossy().into_owned(),
        ))
        .prefer_socket(false)
        .user(Some("root"))
        .pass(Some(creds.admin_password))
}

/// Root's connection to `host`'s server, over its Unix socket.
pub async fn root(state: &Path, host: &str) -> Conn {
    Conn::new(root_opts(state, host)).await.unwrap()
}
