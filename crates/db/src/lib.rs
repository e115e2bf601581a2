//! The data tier: the guestbook's storage, run for real.
//!
//! This crate owns the MariaDB servers of the database hosts — their option files, datadirs,
//! `mariadbd` child processes, bootstrap (schema and accounts), GTID replication from the
//! primary to replicas, health and lag — the firewall relay in front of each server and the
//! egress that gives a server's or an application's outbound connections its host's address.
//! It also owns the embedded SQLite fallback used when MariaDB is not installed, and the
//! application's client ([`DbClient`]): writes to the primary, reads from a replica with a
//! fallback to the primary.
//!
//! It must never read or touch the machine's own MariaDB (`/etc/mysql`, the system datadir or
//! service): every server runs from `<state>/hosts/<host>/mariadb/` with a generated
//! `--defaults-file`, listens on a Unix socket only (`skip-networking`), and is reached over
//! TCP only through a [`firewall::GuardedListener`]. It never decides firewall policy.
//!
//! Order of calls for a lab: [`Credentials::ensure`] and `pki::ensure` on [`pki_dir`] once
//! (`rampart up`), then on each
//! database host [`start_server`], then on each application host [`connect_client`].
//!
//! # How the data tier is put together
//!
//! - **Files.** Host `H`'s server lives in `<state>/hosts/H/mariadb/`: `my.cnf` (generated
//!   at every start, passed with `--defaults-file`), `data/` (datadir, binary and relay
//!   logs), `tmp/`, `mysqld.sock`, `mariadbd.pid`, `error.log`, `install.log`. Shared:
//!   `<state>/db/credentials.json` (0600) and, for SQLite, `<state>/db/<database>.sqlite3`.
//!   TLS: `<state>/pki/ca.pem` and each database host's `<state>/pki/db/<host>.{pem,key}`.
//! - **Accounts.** `root@localhost` gets the admin password on each server with
//!   `sql_log_bin=0` (a local change: no GTID, nothing replicated) and the other `root`
//!   accounts are dropped — every relayed connection reaches the socket from the root-owned
//!   node process, so neither `unix_socket` nor an empty password would keep anyone out.
//!   The application account (`SELECT, INSERT` on the database, `SLAVE MONITOR` for lag)
//!   and the replication account (`REPLICATION SLAVE`), both `@'localhost'` and
//!   `REQUIRE SSL`, the database
//!   and the `guestbook` table are created **on the primary only, binary-logged**: a replica
//!   starts from an empty `gtid_slave_pos` and replays the primary's whole binary log
//!   (which begins at the primary's first start, after `mariadb-install-db`), so it receives
//!   exactly the same schema and accounts and both servers share one GTID history
//!   (`gtid_strict_mode=ON` stays satisfied). Until that has replayed, the replica refuses
//!   the application account and the client reads from the primary.
//! - **Replication.** A replica runs `CHANGE MASTER TO MASTER_HOST=<own address>,
//!   MASTER_PORT=<ports.mysql_egress>, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1`
//!   and `START SLAVE` after every start (`skip-slave-start` keeps it from replicating
//!   with stale settings before that). The egress listener on that port forwards to the
//!   primary's relay from the replica host's address (MariaDB KB: "CHANGE MASTER TO",
//!   "Global Transaction ID").
//! - **TLS.** Every server loads `<state>/pki/db/<host>.{pem,key}` and the lab's CA
//!   (`ssl_cert`, `ssl_key`, `ssl_ca`); TLS passes through the relays to `mariadbd` on its
//!   socket. Replicas replicate with `MASTER_SSL=1, MASTER_SSL_VERIFY_SERVER_CERT=1`; every
//!   TCP connection of this crate is built by [`tcp_opts`] and leaves through a process
//!   egress (`egress.rs`), since `mysql_async` can start TLS only on TCP. `root` is used
//!   over the socket only, without TLS.
//! - **Processes.** `mariadbd` is a child in its own process group with no parent-death
//!   signal: it outlives a killed node, and the next start on the same datadir (or
//!   `rampart down`, via [`mariadbd_pid_file`]) stops it.

#![forbid(unsafe_code)]

mod backup;
mod client;
mod cluster;
mod controller;
mod credentials;
mod egress;
mod error;
mod gtid;
mod metrics;
mod observe;
mod server;
mod sqlite;
mod tls;

use std::path::PathBuf;

use serde::Serialize;
use topology::{DbEngine, Topology};

pub use backup::{backup, backups_dir, restore};
pub use client::{
    connect_client, ClientConfig, DbClient, DbInfo, DbNode, Message, DEFAULT_MAX_LAG_SECONDS,
    MAX_AUTHOR_CHARS, MAX_LIST, MAX_TEXT_BYTES,
};
pub use cluster::{cluster_path, fences_path, load_fences, ClusterState, Fence};
pub use controller::{
    failover, start_controller, switchover, Controller, ControllerConfig, ControllerStatus,
    FailoverError, Fencing,
};
pub use credentials::{credentials_path, Credentials};
pub use error::DbError;
pub use gtid::{Gtid, GtidPos, GtidState};
pub use metrics::{register_controller_metrics, register_server_metrics};
pub use observe::{NodeObservation, HEARTBEAT_PERIOD, HEARTBEAT_TABLE};
pub use server::{
    mariadb_dir, mariadbd_defaults_file, mariadbd_pid_file, mariadbd_socket, start_server,
    DbNodeStatus, DbServer, NodeRole, ServerConfig, SEMI_SYNC_TIMEOUT_MS,
};
pub use sqlite::sqlite_path;
pub use tls::{pki_dir, tcp_opts, ServerTls};

/// The engine the data tier runs on, resolved from [`topology::DbEngine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// MariaDB servers with GTID replication.
    Mariadb,
    /// One embedded SQLite file shared by the application hosts; no replication.
    Sqlite,
}

impl Engine {
    /// `"mariadb"` or `"sqlite"` (as in `rampart status --json`).
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Mariadb => "mariadb",
            Engine::Sqlite => "sqlite",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resolves the topology's engine: `auto` → MariaDB when `mariadbd` is found (in `PATH`,
/// `/usr/sbin` or `/usr/local/sbin`), SQLite otherwise; `mariadb` → MariaDB, or
/// [`DbError::MariadbNotInstalled`] (which says to install `mariadb-server`) when absent;
/// `sqlite` → SQLite.
pub fn resolve_engine(t: &Topology) -> Result<Engine, DbError> {
    match t.database.engine {
        DbEngine::Sqlite => Ok(Engine::Sqlite),
        DbEngine::Mariadb if find_mariadbd().is_some() => Ok(Engine::Mariadb),
        DbEngine::Mariadb => Err(DbError::MariadbNotInstalled),
        DbEngine::Auto if find_mariadbd().is_some() => Ok(Engine::Mariadb),
        DbEngine::Auto => Ok(Engine::Sqlite),
    }
}

/// The `mariadbd` binary: the first found in `PATH`, `/usr/sbin`, `/usr/local/sbin`.
pub fn find_mariadbd() -> Option<PathBuf> {
    find_program("mariadbd", &["/usr/sbin", "/usr/local/sbin"])
}

/// The first executable file `name` in `PATH`, then in `extra` directories.
pub(crate) fn find_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
