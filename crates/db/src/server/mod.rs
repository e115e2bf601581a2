//! Database servers: a supervised `mariadbd` child per database host (bootstrap, GTID
//! replication, the firewall relay in front of it, health), or the SQLite file.
//!
//! Files of host `H` under the lab's state directory, all written by this module:
//! `hosts/H/mariadb/{my.cnf, data/, mysqld.sock, mariadbd.pid, error.log, install.log}`.

//!
//! One module per concern: [`options`] (the option file and paths), [`process`] (the
//! `mariadbd` child and its supervision), [`bootstrap`] (datadir, admin connection, schema
//! and accounts), [`replication`] (a replica's egress and `CHANGE MASTER TO`), [`health`]
//! (the periodic check and lag).

mod bootstrap;
mod health;
mod options;
mod process;
mod replication;

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mysql_async::Conn;
use serde::Serialize;
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use topology::{Role, Service, Topology};

use crate::cluster::ClusterState;
use crate::egress::LocalEgress;
use crate::sqlite::{sqlite_path, SqliteStore};
use crate::tls::ServerTls;
use crate::{Credentials, DbError, Engine};

use bootstrap::{admin_connect, admin_opts, bootstrap_primary, install_db};
pub(crate) use bootstrap::{admin_exec, admin_opts_for};
use health::{cert_reload_loop, health_loop, heartbeat_loop};
pub use options::SEMI_SYNC_TIMEOUT_MS;
pub use options::{mariadb_dir, mariadbd_defaults_file, mariadbd_pid_file, mariadbd_socket};
use options::{my_cnf, Paths};
pub(crate) use process::{is_ours, read_pid};
use process::{spawn_mariadbd, stop_stale, supervise, terminate, wait_ready, Restart};
pub(crate) use replication::{make_writable, point_at_primary};

/// Bound on one administrative statement or connection.
pub(super) const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// `sun_path` holds 108 bytes including the terminating NUL (unix(7)).
const MAX_SOCKET_PATH: usize = 107;

/// A database node's place in replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Takes writes; its binary log feeds the replicas.
    Primary,
    /// Read-only (`read_only=ON`); replicates from the primary with GTID.
    Replica,
}

impl NodeRole {
    /// `"primary"` or `"replica"`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Primary => "primary",
            NodeRole::Replica => "replica",
        }
    }
}

/// Everything needed to run one host's database server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Host name, e.g. `web-01`.
    pub host: String,
    /// The host's network seam: the relay and the replication egress are bound through
    /// it (the host's address, the policy, the limits); replication leaves from it.
    pub net: firewall::Net,
    /// The lab's state directory. This crate owns `<state_dir>/hosts/<host>/mariadb/` and
    /// `<state_dir>/db/`.
    pub state_dir: PathBuf,
    /// Primary or replica.
    pub role: NodeRole,
    /// MariaDB `server_id`, unique in the topology (1-based host index).
    pub server_id: u32,
    /// The host's MariaDB port (`ports.mysql`): the firewall relay listens here.
    pub port: u16,
    /// Replica only: the primary's host name and MariaDB address.
    pub primary: Option<(String, SocketAddr)>,
    /// Port of the replication egress (`ports.mysql_egress`) on the host's address.
    pub egress_port: u16,
    /// Every database host (this one included) and its MariaDB address, in topology
    /// order: where the egress leads when `cluster.json` names another primary.
    pub peers: Vec<(String, SocketAddr)>,
    /// Database (schema) name; letters, digits and `_`.
    pub database: String,
    /// Engine in use.
    pub engine: Engine,
    /// The certificate files `mariadbd` serves TLS with (from `<state>/pki`, see
    /// [`crate::pki_dir`]); its replication client verifies its primary against `tls.ca`.
    pub tls: ServerTls,
}

impl ServerConfig {
    /// The configuration for `host`; `None` when it holds neither `db-primary` nor
    /// `db-replica`. Under SQLite a `db-replica` host gets a configuration too: its server
    /// only opens the shared file (there is no replication to run).
    pub fn from_topology(
        t: &Topology,
        host: &str,
        state_dir: &Path,
        net: firewall::Net,
        engine: Engine,
    ) -> Option<ServerConfig> {
        let index = t.hosts.iter().position(|h| h.name == host)?;
        let me = &t.hosts[index];
        let role = if me.has(Role::DbPrimary) {
            NodeRole::Primary
        } else if me.has(Role::DbReplica) {
            NodeRole::Replica
        } else {
            return None;
        };
        let primary = match role {
            NodeRole::Primary => None,
            NodeRole::Replica => {
                let p = t.db_primary()?;
                Some((p.name.clone(), SocketAddr::new(p.address, t.ports.mysql)))
            }
        };
        Some(ServerConfig {
            host: me.name.clone(),
            net,
            state_dir: state_dir.to_path_buf(),
            role,
            server_id: u32::try_from(index + 1).unwrap_or(u32::MAX),
            port: t.ports.mysql,
            primary,
            egress_port: t.ports.mysql_egress,
            peers: t
                .hosts
                .iter()
                .filter(|h| h.has(Role::DbPrimary) || h.has(Role::DbReplica))
                .map(|h| (h.name.clone(), SocketAddr::new(h.address, t.ports.mysql)))
                .collect(),
            database: t.database.name.clone(),
            engine,
            tls: ServerTls::for_host(&pki::PkiPaths::new(crate::pki_dir(state_dir)), &me.name),
        })
    }
}

/// What a running server reports.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct DbNodeStatus {
    /// Host name.
    pub host: String,
    /// `"primary"` or `"replica"`.
    pub role: String,
    /// `"mariadb"` or `"sqlite"`.
    pub engine: String,
    /// The `mariadbd` process id; `None` for SQLite or once stopped.
    pub pid: Option<u32>,
    /// The MariaDB (relay) port; 0 for SQLite, where nothing listens.
    pub port: u16,
    /// The server's Unix socket; `None` for SQLite.
    pub socket: Option<PathBuf>,
    /// Replica: `Seconds_Behind_Master`, seconds (`None` while the SQL thread is stopped).
    pub lag_seconds: Option<f64>,
    /// Last health check (every second): the server answers a ping and, for a replica,
    /// both replication threads run. SQLite: always true.
    pub healthy: bool,
    /// Times the node restarted a `mariadbd` that exited on its own.
    #[serde(default)]
    pub restarts: u64,
    /// The server's last observation (read-only flag, GTID positions, replication threads,
    /// heartbeat lag, semi-synchronous state); `None` while it does not answer, and for
    /// SQLite.
    #[serde(default)]
    pub observed: Option<crate::NodeObservation>,
    /// The TLS cipher `mariadbd` reports (`Ssl_cipher`) for the node's own connection as
    /// the application account through its relay (the heartbeat writer's, TCP and TLS
    /// like every application connection); `None` until that connection is made.
    #[serde(default)]
    pub relay_tls_cipher: Option<String>,
}

/// A running database server. Dropping it closes its listeners but leaves `mariadbd`
/// running (see [`mariadbd_pid_file`]); call [`DbServer::stop`] for an orderly stop.
pub struct DbServer {
    status: Arc<Mutex<DbNodeStatus>>,
    /// Owns `mariadbd` and restarts it when it exits (see [`supervise`]).
    supervisor: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Stops the supervisor, which then stops `mariadbd` (only [`DbServer::stop`]).
    stop_server: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    filters: Vec<Arc<firewall::Filter>>,
    stop: CancellationToken,
    address: std::net::IpAddr,
}

impl std::fmt::Debug for DbServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbServer")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Drop for DbServer {
    /// Stops the relay, egress and health tasks; `mariadbd` keeps running (as when the node
    /// process is killed) until [`DbServer::stop`], a later [`start_server`] on the same
    /// datadir, or `rampart down` (via [`mariadbd_pid_file`]).
    fn drop(&mut self) {
        self.stop.cancel();
        for t in std::mem::take(&mut *lock(&self.tasks)) {
            t.abort();
        }
        // Aborting the supervisor drops its `Child` without killing the server.
        if let Ok(mut sup) = self.supervisor.try_lock() {
            if let Some(t) = sup.take() {
                t.abort();
            }
        }
    }
}

impl DbServer {
    pub(crate) fn status_cell(&self) -> Arc<Mutex<DbNodeStatus>> {
        self.status.clone()
    }

    /// The last known status (refreshed every 500 ms by a background task).
    pub fn status(&self) -> DbNodeStatus {
        lock(&self.status).clone()
    }

    /// Stops the relay, the egress and the health check, then the server: `SIGTERM`, up to
    /// 30 s for a clean InnoDB shutdown, then `SIGKILL`. Idempotent.
    pub async fn stop(&self) {
        self.stop.cancel();
        for t in std::mem::take(&mut *lock(&self.tasks)) {
            t.abort();
        }
        self.stop_server.cancel();
        let supervisor = self.supervisor.lock().await.take();
        if let Some(supervisor) = supervisor {
            let _ = supervisor.await;
        }
        let mut s = lock(&self.status);
        s.pid = None;
        s.healthy = false;
        s.lag_seconds = None;
    }

    /// The filters of this server's listeners (the MariaDB relay), for firewall counters.
    /// Empty for SQLite.
    pub fn filters(&self) -> Vec<Arc<firewall::Filter>> {
        self.filters.clone()
    }
}

impl serve::RoleHandle for DbServer {
    fn role(&self) -> &'static str {
        match lock(&self.status).role.as_str() {
            "primary" => "db-primary",
            _ => "db-replica",
        }
    }
    fn addrs(&self) -> Vec<(Service, SocketAddr)> {
        self.filters
            .iter()
            .filter_map(|f| {
                let port = f.rule()?.port;
                Some((f.service, SocketAddr::new(self.address, port)))
            })
            .collect()
    }
    fn healthy(&self) -> bool {
        lock(&self.status).healthy
    }
    fn filters(&self) -> Vec<Arc<firewall::Filter>> {
        self.filters.clone()
    }
    fn shutdown(&self) -> serve::BoxFuture<()> {
        // `stop` borrows self; the node awaits it directly (see `DbServer::stop`).
        self.stop.cancel();
        Box::pin(async {})
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts `cfg`'s server and returns once it serves.
///
/// MariaDB: writes `my.cnf`, stops a `mariadbd` left running on this datadir by an earlier
/// run, initialises the datadir on first start (`mariadb-install-db`), starts `mariadbd`
/// as a child in its own process group (no parent-death signal), waits up to 60 s for its
/// socket, then bootstraps over the socket: `root@localhost` gets the admin password (not
/// binary-logged); the primary creates the database, the `guestbook` table and the
/// application and replication accounts (binary-logged, so replicas receive them through
/// replication); a replica starts its replication egress and runs `CHANGE MASTER TO ...
/// MASTER_USE_GTID=slave_pos` + `START SLAVE` (the IO thread retries every second while the
/// primary is not up). Last, the firewall relay opens on `address:port`.
///
/// SQLite: creates `<state>/db/<database>.sqlite3` and its schema, and reports healthy with
/// no pid and port 0 (a `db-replica` host reports role `replica`: it holds nothing of its
/// own, the application hosts share the one file).
///
/// Errors: [`DbError::MariadbNotInstalled`], [`DbError::Credentials`] (run
/// [`Credentials::ensure`] first), [`DbError::Startup`] with the end of the log,
/// [`DbError::Io`] (a port in use), [`DbError::Mysql`] from bootstrap. On error no
/// `mariadbd` is left running.
pub async fn start_server(cfg: ServerConfig) -> Result<DbServer, DbError> {
    match cfg.engine {
        Engine::Sqlite => {
            check_identifier(&cfg.database)?;
            SqliteStore::open(sqlite_path(&cfg.state_dir, &cfg.database)).await?;
            Ok(DbServer {
                status: Arc::new(Mutex::new(DbNodeStatus {
                    host: cfg.host.clone(),
                    role: cfg.role.as_str().into(),
                    engine: Engine::Sqlite.as_str().into(),
                    pid: None,
                    port: 0,
                    socket: None,
                    lag_seconds: None,
                    healthy: true,
                    restarts: 0,
                    observed: None,
                    relay_tls_cipher: None,
                })),
                supervisor: tokio::sync::Mutex::new(None),
                stop_server: CancellationToken::new(),
                tasks: Mutex::new(Vec::new()),
                filters: Vec::new(),
                stop: CancellationToken::new(),
                address: cfg.net.address(),
            })
        }
        Engine::Mariadb => start_mariadb(cfg).await,
    }
}

async fn start_mariadb(cfg: ServerConfig) -> Result<DbServer, DbError> {
    let mariadbd = crate::find_mariadbd().ok_or(DbError::MariadbNotInstalled)?;
    check_identifier(&cfg.database)?;
    if cfg.role == NodeRole::Replica && cfg.primary.is_none() {
        return Err(DbError::Config(format!(
            "{} is a replica without a primary",
            cfg.host
        )));
    }
    let creds = Credentials::load(&cfg.state_dir)?;
    cfg.tls.check(&cfg.host)?;
    let cfg = follow_cluster(cfg)?;
    let p = Paths::new(&cfg.state_dir, &cfg.host);
    check_socket_path(&p.socket)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&p.tmp)
        .map_err(|e| DbError::io(format!("creating {}", p.tmp.display()), e))?;
    std::fs::write(&p.cnf, my_cnf(&cfg, &p))
        .map_err(|e| DbError::io(format!("writing {}", p.cnf.display()), e))?;

    stop_stale(&p, &cfg.host).await;
    if !p.data.join("mysql").is_dir() {
        install_db(&cfg, &p).await?;
    }

    let replica =
        process::starts_as_replica(&cfg.state_dir, &cfg.host, cfg.role == NodeRole::Replica);
    let mut child = spawn_mariadbd(&mariadbd, &p, replica)?;
    let pid = child.id();
    tracing::info!(host = %cfg.host, pid, "mariadbd started");
    // The running server's pid, for the replication egress's owner check across restarts.
    let pid_cell = Arc::new(AtomicU32::new(pid.unwrap_or(0)));

    let stop = CancellationToken::new();
    match bring_up(&cfg, &p, &creds, &mut child, pid_cell.clone(), &stop).await {
        Ok((tasks, filters, admin, (egress, heartbeat_opts))) => {
            let status = Arc::new(Mutex::new(DbNodeStatus {
                host: cfg.host.clone(),
                role: cfg.role.as_str().into(),
                engine: Engine::Mariadb.as_str().into(),
                pid,
                port: cfg.port,
                socket: Some(p.socket.clone()),
                lag_seconds: None,
                healthy: cfg.role == NodeRole::Primary,
                restarts: 0,
                observed: None,
                relay_tls_cipher: None,
            }));
            let mut tasks = tasks;
            tasks.push(tokio::spawn(health_loop(
                admin,
                admin_opts(&p, &creds.admin_password),
                cfg.database.clone(),
                status.clone(),
            )));
            tasks.push(tokio::spawn(cert_reload_loop(
                cfg.host.clone(),
                admin_opts(&p, &creds.admin_password),
                vec![
                    cfg.tls.ca.clone(),
                    cfg.tls.cert.clone(),
                    cfg.tls.key.clone(),
                ],
            )));
            tasks.push(tokio::spawn(heartbeat_loop(
                egress,
                heartbeat_opts,
                cfg.database.clone(),
                status.clone(),
            )));
            let stop_server = CancellationToken::new();
            let supervisor = tokio::spawn(supervise(
                child,
                Restart {
                    mariadbd,
                    admin: admin_opts(&p, &creds.admin_password),
                    cfg: cfg.clone(),
                    p: p.clone(),
                    pid: pid_cell,
                    status: status.clone(),
                    creds: creds.clone(),
                },
                stop_server.clone(),
            ));
            Ok(DbServer {
                status,
                supervisor: tokio::sync::Mutex::new(Some(supervisor)),
                stop_server,
                tasks: Mutex::new(tasks),
                filters,
                stop,
                address: cfg.net.address(),
            })
        }
        Err(e) => {
            terminate(child, &cfg.host).await;
            Err(e)
        }
    }
}

/// The role `cfg`'s node takes from `<state>/db/cluster.json` (created from the topology
/// when absent): primary when the file names it, otherwise a replica of the node it names.
/// A former primary restarted after a failover thus comes back as a replica.
fn follow_cluster(mut cfg: ServerConfig) -> Result<ServerConfig, DbError> {
    let first_primary = match (&cfg.role, &cfg.primary) {
        (NodeRole::Primary, _) => cfg.host.clone(),
        (NodeRole::Replica, Some((p, _))) => p.clone(),
        (NodeRole::Replica, None) => {
            return Err(DbError::Config(format!(
                "{} is a replica without a primary",
                cfg.host
            )))
        }
    };
    let initial = ClusterState {
        epoch: 1,
        primary: first_primary,
        nodes: cfg.peers.iter().map(|(h, _)| h.clone()).collect(),
        failovers: 0,
    };
    let state = ClusterState::load_or_init(&cfg.state_dir, &initial)?;
    if state.primary == cfg.host {
        cfg.role = NodeRole::Primary;
        cfg.primary = None;
    } else {
        let addr = cfg
            .peers
            .iter()
            .find(|(h, _)| *h == state.primary)
            .map(|(_, a)| *a)
            .ok_or_else(|| {
                DbError::Config(format!(
                    "cluster.json names {} primary, which is not a database host of the topology",
                    state.primary
                ))
            })?;
        cfg.role = NodeRole::Replica;
        cfg.primary = Some((state.primary.clone(), addr));
    }
    Ok(cfg)
}

type Started = (
    Vec<JoinHandle<()>>,
    Vec<Arc<firewall::Filter>>,
    Conn,
    (LocalEgress, mysql_async::OptsBuilder),
);

async fn bring_up(
    cfg: &ServerConfig,
    p: &Paths,
    creds: &Credentials,
    child: &mut Child,
    pid: Arc<AtomicU32>,
    stop: &CancellationToken,
) -> Result<Started, DbError> {
    wait_ready(cfg, p, child).await?;
    let mut admin = admin_connect(cfg, p, creds).await?;
    let mut tasks = Vec::new();
    let mut filters = Vec::new();
    let (task, filter) = replication::start_egress(cfg, pid, stop).await?;
    tasks.push(task);
    filters.push(filter);
    match (&cfg.role, &cfg.primary) {
        (NodeRole::Replica, Some((primary_host, _))) => {
            point_at_primary(
                &cfg.host,
                &mut admin,
                cfg.net.address(),
                cfg.egress_port,
                creds,
            )
            .await?;
            tracing::info!(host = %cfg.host, primary = %primary_host, "replication started");
        }
        _ => {
            bootstrap_primary(cfg, creds, &mut admin).await?;
            // The first start of the node that cluster.json names primary makes it
            // writable; a restart of its mariadbd alone does not (see `after_restart`).
            // Semi-synchronous from the start: the replicas connect within seconds.
            make_writable(&cfg.host, &mut admin, true).await?;
            tracing::info!(host = %cfg.host, "primary writable");
        }
    }

    let relay_addr = SocketAddr::new(cfg.net.address(), cfg.port);
    let listener = cfg
        .net
        .listen(Service::Mysql, cfg.port)
        .await
        .map_err(|e| DbError::io(format!("binding the MariaDB relay on {relay_addr}"), e))?;
    // The MariaDB relay's filter first (callers count its refusals).
    filters.insert(0, listener.filter().clone());
    let target = firewall::Target::Unix(p.socket.clone());
    tasks.push(tokio::spawn(firewall::relay(
        listener,
        target,
        stop.clone(),
    )));
    // The heartbeat is written with the application account, which is REQUIRE SSL: over
    // TCP and TLS through this host's own relay, like the application's connections.
    let egress = LocalEgress::open(cfg.net.clone(), relay_addr, 2).await?;
    let opts = crate::tcp_opts(
        egress.addr(),
        &cfg.host,
        &cfg.tls.ca,
        &creds.app_user,
        &creds.app_password,
    );
    Ok((tasks, filters, admin, (egress, opts)))
}

fn check_identifier(name: &str) -> Result<(), DbError> {
    if name.is_empty()
        || name.len() > 64
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(DbError::Config(format!(
            "database name {name:?} must be 1 to 64 letters, digits or '_' ([database] name)"
        )));
    }
    Ok(())
}

/// Unix socket paths must fit `sun_path` (unix(7)).
pub(crate) fn check_socket_path(path: &Path) -> Result<(), DbError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(DbError::Config(format!(
            "socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a shorter state directory",
            path.display()
        )));
    }
    Ok(())
}

pub(super) fn startup_error(host: &str, reason: String, log: &Path) -> DbError {
    DbError::Startup {
        host: host.to_string(),
        reason,
        log: log.to_path_buf(),
        tail: tail(log, 20),
    }
}

/// The last `lines` lines of `path` (reads at most the last 8 KiB).
fn tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(8192)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TOPOLOGY: &str = "
[[hosts]]
name = \"lb-01\"
address = \"127.93.9.10\"
roles = [\"lb\"]
[[hosts]]
name = \"web-01\"
address = \"127.93.9.11\"
roles = [\"web\", \"app\", \"db-primary\"]
[[hosts]]
name = \"web-02\"
address = \"127.93.9.12\"
roles = [\"web\", \"app\", \"db-replica\"]
";

    #[test]
    fn replica_config_and_option_file() {
        let t = Topology::parse(TOPOLOGY, "t").unwrap();
        let state = Path::new("/s");
        let cfg = ServerConfig::from_topology(
            &t,
            "web-02",
            state,
            test_support::net(&t, "web-02"),
            Engine::Mariadb,
        )
        .unwrap();
        assert_eq!(cfg.role, NodeRole::Replica);
        assert_eq!(cfg.server_id, 3);
        assert_eq!(
            cfg.primary,
            Some(("web-01".into(), "127.93.9.11:3306".parse().unwrap()))
        );
        let cnf = my_cnf(&cfg, &Paths::new(state, "web-02"));
        for line in [
            "socket = /s/hosts/web-02/mariadb/mysqld.sock",
            "pid-file = /s/hosts/web-02/mariadb/mariadbd.pid",
            "skip-networking",
            "server-id = 3",
            "gtid_strict_mode = ON",
            "read_only = ON",
            "skip-slave-start",
            "ssl_ca = /s/pki/ca.pem",
            "ssl_cert = /s/pki/db/web-02.pem",
            "ssl_key = /s/pki/db/web-02.key",
        ] {
            assert!(cnf.lines().any(|l| l == line), "{line} missing in\n{cnf}");
        }
        let primary = ServerConfig::from_topology(
            &t,
            "web-01",
            state,
            test_support::net(&t, "web-01"),
            Engine::Mariadb,
        )
        .unwrap();
        // Every server starts read-only, the primary too; durability and semi-sync set.
        let cnf = my_cnf(&primary, &Paths::new(state, "web-01"));
        for line in [
            "read_only = ON",
            "sync_binlog = 1",
            "innodb_flush_log_at_trx_commit = 1",
            "binlog_format = ROW",
            "log_slave_updates = ON",
            "rpl_semi_sync_master_wait_point = AFTER_SYNC",
            "rpl_semi_sync_slave_enabled = ON",
        ] {
            assert!(cnf.lines().any(|l| l == line), "{line} missing in\n{cnf}");
        }
        assert_eq!(primary.peers.len(), 2);
        let sqlite_replica = ServerConfig::from_topology(
            &t,
            "web-02",
            state,
            test_support::net(&t, "web-02"),
            Engine::Sqlite,
        )
        .unwrap();
        assert_eq!(sqlite_replica.role, NodeRole::Replica);
        assert!(ServerConfig::from_topology(
            &t,
            "lb-01",
            state,
            test_support::net(&t, "lb-01"),
            Engine::Mariadb
        )
        .is_none());
    }

    #[test]
    fn identifiers_and_socket_paths_are_checked() {
        assert!(check_identifier("foobar_2").is_ok());
        assert!(check_identifier("foo`bar").is_err());
        assert!(check_identifier("").is_err());
        assert!(check_socket_path(Path::new("/tmp/x.sock")).is_ok());
        assert!(check_socket_path(&Path::new("/").join("d".repeat(120))).is_err());
    }
}
