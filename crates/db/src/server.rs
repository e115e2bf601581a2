//! Database servers: a supervised `mariadbd` child per database host (bootstrap, GTID
//! replication, the firewall relay in front of it, health), or the SQLite file.
//!
//! Files of host `H` under the lab's state directory, all written by this module:
//! `hosts/H/mariadb/{my.cnf, data/, mysqld.sock, mariadbd.pid, error.log, install.log}`.

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use topology::{Role, Service, Topology};

use crate::sqlite::{sqlite_path, SqliteStore};
use crate::{Credentials, DbError, Engine};

/// How long `mariadbd` may take to accept on its socket after being started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `mariadb-install-db` may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a `mariadbd` gets to shut down after `SIGTERM` before `SIGKILL`.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one administrative statement or connection.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Period of the health check.
const HEALTH_PERIOD: Duration = Duration::from_secs(1);
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
    /// Replica only: port of the replication egress (`ports.mysql_egress`) on `address`.
    pub egress_port: u16,
    /// Database (schema) name; letters, digits and `_`.
    pub database: String,
    /// Engine in use.
    pub engine: Engine,
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
            database: t.database.name.clone(),
            engine,
        })
    }
}

/// `<state>/hosts/<host>/mariadb`: everything of one host's MariaDB server.
pub fn mariadb_dir(state_dir: &Path, host: &str) -> PathBuf {
    state_dir.join("hosts").join(host).join("mariadb")
}

/// `<state>/hosts/<host>/mariadb/mariadbd.pid`: the pid file `mariadbd` writes (`pid-file`).
/// A `mariadbd` outlives a killed node process on purpose; `rampart down` stops it by
/// sending `SIGTERM` to this pid (after checking that `/proc/<pid>/cmdline` mentions
/// `<state>/hosts/<host>/mariadb/my.cnf`).
pub fn mariadbd_pid_file(state_dir: &Path, host: &str) -> PathBuf {
    mariadb_dir(state_dir, host).join("mariadbd.pid")
}

/// `<state>/hosts/<host>/mariadb/mysqld.sock`: the server's Unix socket.
pub fn mariadbd_socket(state_dir: &Path, host: &str) -> PathBuf {
    mariadb_dir(state_dir, host).join("mysqld.sock")
}

/// The generated option file passed with `--defaults-file` (so `/etc/mysql` is never read).
pub fn mariadbd_defaults_file(state_dir: &Path, host: &str) -> PathBuf {
    mariadb_dir(state_dir, host).join("my.cnf")
}

#[derive(Debug, Clone)]
struct Paths {
    data: PathBuf,
    socket: PathBuf,
    pid: PathBuf,
    log: PathBuf,
    install_log: PathBuf,
    cnf: PathBuf,
    tmp: PathBuf,
}

impl Paths {
    fn new(state_dir: &Path, host: &str) -> Paths {
        let dir = mariadb_dir(state_dir, host);
        Paths {
            data: dir.join("data"),
            socket: mariadbd_socket(state_dir, host),
            pid: mariadbd_pid_file(state_dir, host),
            log: dir.join("error.log"),
            install_log: dir.join("install.log"),
            cnf: mariadbd_defaults_file(state_dir, host),
            tmp: dir.join("tmp"),
        }
    }
}

/// The account `mariadbd` runs as: the one running this process. `mariadbd` only switches
/// user when started as root, and `mariadb-install-db` chowns the datadir to it, which only
/// root may do for another account; naming ourselves works for root and everyone else.
fn run_as_user() -> String {
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

/// The option file of `cfg`'s server. Options follow the MariaDB "Server System Variables"
/// and "Replication and Binary Log System Variables" pages.
fn my_cnf(cfg: &ServerConfig, p: &Paths) -> String {
    let mut s = format!(
        "# Generated by Rampart for {host} ({role}); rewritten at every start.\n\
         [mysqld]\n\
         user = {user}\n\
         datadir = {data}\n\
         socket = {socket}\n\
         pid-file = {pid}\n\
         log-error = {log}\n\
         tmpdir = {tmp}\n\
         # The only TCP entry is the firewall relay in front of the socket.\n\
         skip-networking\n\
         skip-name-resolve\n\
         server-id = {id}\n\
         log-bin = {data}/mariadb-bin\n\
         relay-log = {data}/relay-bin\n\
         binlog_format = ROW\n\
         gtid_strict_mode = ON\n\
         log_slave_updates = ON\n\
         default-time-zone = +00:00\n\
         character-set-server = utf8mb4\n\
         collation-server = utf8mb4_unicode_ci\n\
         innodb_buffer_pool_size = 64M\n\
         innodb_log_file_size = 32M\n\
         performance_schema = OFF\n\
         max_connections = 100\n",
        host = cfg.host,
        role = cfg.role.as_str(),
        data = p.data.display(),
        socket = p.socket.display(),
        pid = p.pid.display(),
        log = p.log.display(),
        tmp = p.tmp.display(),
        id = cfg.server_id,
        user = run_as_user(),
    );
    if cfg.role == NodeRole::Replica {
        s.push_str(
            "read_only = ON\n\
             # Replication is (re)configured and started by the node after each start.\n\
             skip-slave-start\n",
        );
    }
    s
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
    /// The last known status (refreshed every second by a background task).
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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

    let mut child = spawn_mariadbd(&mariadbd, &p)?;
    let pid = child.id();
    tracing::info!(host = %cfg.host, pid, "mariadbd started");
    // The running server's pid, for the replication egress's owner check across restarts.
    let pid_cell = Arc::new(AtomicU32::new(pid.unwrap_or(0)));

    let stop = CancellationToken::new();
    match bring_up(&cfg, &p, &creds, &mut child, pid_cell.clone(), &stop).await {
        Ok((tasks, filters, admin)) => {
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
            }));
            let mut tasks = tasks;
            tasks.push(tokio::spawn(health_loop(
                admin,
                admin_opts(&p, &creds.admin_password),
                cfg.role,
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

type Started = (Vec<JoinHandle<()>>, Vec<Arc<firewall::Filter>>, Conn);

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
    match (&cfg.role, &cfg.primary) {
        (NodeRole::Replica, Some((primary_host, primary_addr))) => {
            let listener = cfg
                .net
                .listen(Service::MysqlEgress, cfg.egress_port)
                .await
                .map_err(|e| {
                    DbError::io(
                        format!(
                            "binding the replication egress {}:{}",
                            cfg.net.address(),
                            cfg.egress_port
                        ),
                        e,
                    )
                })?
                .with_local_server(Arc::new(move || {
                    Some(pid.load(Ordering::Relaxed)).filter(|p| *p != 0)
                }));
            filters.push(listener.filter().clone());
            let target = firewall::Target::Tcp {
                net: cfg.net.clone(),
                to: *primary_addr,
            };
            tasks.push(tokio::spawn(firewall::relay(
                listener,
                target,
                stop.clone(),
            )));
            let change = format!(
                "CHANGE MASTER TO MASTER_HOST='{host}', MASTER_PORT={port}, \
                 MASTER_USER='{user}', MASTER_PASSWORD='{pw}', \
                 MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
                host = cfg.net.address(),
                port = cfg.egress_port,
                user = creds.repl_user,
                pw = creds.repl_password,
            );
            // STOP SLAVE fails harmlessly on a server that never replicated.
            let _ = admin_exec(&cfg.host, &mut admin, "STOP SLAVE").await;
            admin_exec(&cfg.host, &mut admin, &change).await?;
            admin_exec(&cfg.host, &mut admin, "START SLAVE").await?;
            tracing::info!(host = %cfg.host, primary = %primary_host, "replication started");
        }
        _ => bootstrap_primary(cfg, creds, &mut admin).await?,
    }

    let relay_addr = SocketAddr::new(cfg.net.address(), cfg.port);
    let listener = cfg
        .net
        .listen(Service::Mysql, cfg.port)
        .await
        .map_err(|e| DbError::io(format!("binding the MariaDB relay on {relay_addr}"), e))?;
    filters.push(listener.filter().clone());
    let target = firewall::Target::Unix(p.socket.clone());
    tasks.push(tokio::spawn(firewall::relay(
        listener,
        target,
        stop.clone(),
    )));
    Ok((tasks, filters, admin))
}

/// The first restart waits this long after `mariadbd` exits; each further one twice as
/// long, up to [`RESTART_MAX`].
const RESTART_MIN: Duration = Duration::from_secs(1);
/// The longest wait between restarts.
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A server that ran this long before exiting restarts after [`RESTART_MIN`] again.
const RESTART_RESET: Duration = Duration::from_secs(60);

/// Starts `mariadbd` on `p`'s option file, its output appended to the error log, in its own
/// process group (a terminal's Ctrl-C reaches the node, which stops the server in order; a
/// killed node leaves it to `rampart down`).
fn spawn_mariadbd(mariadbd: &Path, p: &Paths) -> Result<Child, DbError> {
    let log_file = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)
            .map_err(|e| DbError::io(format!("opening {}", p.log.display()), e))
    };
    Command::new(mariadbd)
        .arg(format!("--defaults-file={}", p.cnf.display()))
        .stdin(std::process::Stdio::null())
        .stdout(log_file()?)
        .stderr(log_file()?)
        .process_group(0)
        .spawn()
        .map_err(|e| DbError::io(format!("starting {}", mariadbd.display()), e))
}

/// What [`supervise`] needs to start the server again.
struct Restart {
    mariadbd: PathBuf,
    /// Admin connection options (the server's socket, root's password).
    admin: OptsBuilder,
    cfg: ServerConfig,
    p: Paths,
    pid: Arc<AtomicU32>,
    status: Arc<Mutex<DbNodeStatus>>,
}

/// Owns the running `mariadbd`: when it exits on its own (crash, OOM kill, `kill -9`) it is
/// started again on the same datadir after a back-off (1 s, doubling to 30 s; reset after a
/// minute of running), like systemd's `Restart=on-failure` with a growing `RestartSec`.
/// InnoDB recovers from its redo log (`innodb_flush_log_at_trx_commit=1`: no committed
/// transaction is lost) and a replica resumes replication from its saved GTID position; the
/// relay and egress stay bound throughout. On `stop` the server is stopped cleanly.
async fn supervise(mut child: Child, r: Restart, stop: CancellationToken) {
    let host = r.cfg.host.clone();
    let mut backoff = RESTART_MIN;
    let mut running_since = Instant::now();
    loop {
        let exit = tokio::select! {
            _ = stop.cancelled() => {
                terminate(child, &host).await;
                r.pid.store(0, Ordering::Relaxed);
                return;
            }
            exit = child.wait() => exit,
        };
        r.pid.store(0, Ordering::Relaxed);
        {
            let mut s = lock(&r.status);
            s.pid = None;
            s.healthy = false;
            s.lag_seconds = None;
        }
        if running_since.elapsed() >= RESTART_RESET {
            backoff = RESTART_MIN;
        }
        let how = exit.map_or_else(|e| e.to_string(), |s| s.to_string());
        tracing::warn!(host = %host, "mariadbd exited ({how}); restarting in {backoff:?}");
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RESTART_MAX);
            match spawn_mariadbd(&r.mariadbd, &r.p) {
                Ok(mut c) => {
                    let pid = c.id();
                    r.pid.store(pid.unwrap_or(0), Ordering::Relaxed);
                    {
                        let mut s = lock(&r.status);
                        s.pid = pid;
                        s.restarts += 1;
                    }
                    running_since = Instant::now();
                    match wait_ready(&r.cfg, &r.p, &mut c).await {
                        Ok(()) => {
                            tracing::info!(host = %host, pid, "mariadbd restarted");
                            if r.cfg.role == NodeRole::Replica {
                                resume_replication(&r).await;
                            }
                        }
                        Err(e) => tracing::warn!(host = %host, "restarted mariadbd not ready: {e}"),
                    }
                    child = c;
                    break;
                }
                Err(e) => tracing::warn!(host = %host, "cannot restart mariadbd: {e}"),
            }
        }
    }
}

/// A restarted replica (its option file has `skip-slave-start`) starts replicating again
/// from its saved GTID position and connection settings (`START SLAVE`).
async fn resume_replication(r: &Restart) {
    let conn = tokio::time::timeout(ADMIN_TIMEOUT, Conn::new(r.admin.clone())).await;
    match conn {
        Ok(Ok(mut c)) => match admin_exec(&r.cfg.host, &mut c, "START SLAVE").await {
            Ok(()) => tracing::info!(host = %r.cfg.host, "replication resumed"),
            Err(e) => tracing::warn!(host = %r.cfg.host, "START SLAVE after a restart: {e}"),
        },
        Ok(Err(e)) => tracing::warn!(host = %r.cfg.host, "admin connection after a restart: {e}"),
        Err(_) => tracing::warn!(host = %r.cfg.host, "admin connection after a restart timed out"),
    }
}

/// The primary's schema and accounts. Binary-logged on purpose: a replica starting from an
/// empty `gtid_slave_pos` replays the primary's binary log from its first event, so it
/// receives the same database, table and accounts (and GTIDs stay one history). Every
/// statement is idempotent, so restarts re-run them harmlessly.
async fn bootstrap_primary(
    cfg: &ServerConfig,
    creds: &Credentials,
    admin: &mut Conn,
) -> Result<(), DbError> {
    let db = &cfg.database;
    let statements = [
        format!(
            "CREATE DATABASE IF NOT EXISTS `{db}` \
             CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.guestbook (\
             id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, \
             author VARCHAR(64) NOT NULL, \
             `text` TEXT NOT NULL, \
             created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)\
             ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
        ),
        format!(
            "CREATE USER IF NOT EXISTS '{u}'@'localhost' IDENTIFIED BY '{pw}'",
            u = creds.app_user,
            pw = creds.app_password
        ),
        format!(
            "GRANT SELECT, INSERT ON `{db}`.* TO '{u}'@'localhost'",
            u = creds.app_user
        ),
        format!(
            "GRANT SLAVE MONITOR ON *.* TO '{u}'@'localhost'",
            u = creds.app_user
        ),
        format!(
            "CREATE USER IF NOT EXISTS '{u}'@'localhost' IDENTIFIED BY '{pw}'",
            u = creds.repl_user,
            pw = creds.repl_password
        ),
        format!(
            "GRANT REPLICATION SLAVE ON *.* TO '{u}'@'localhost'",
            u = creds.repl_user
        ),
    ];
    for s in &statements {
        admin_exec(&cfg.host, admin, s).await?;
    }
    tracing::info!(host = %cfg.host, database = %db, "primary bootstrapped");
    Ok(())
}

fn admin_opts(p: &Paths, password: &str) -> OptsBuilder {
    OptsBuilder::default()
        .socket(Some(p.socket.to_string_lossy().into_owned()))
        .prefer_socket(false)
        .user(Some("root"))
        .pass(Some(password.to_string()))
}

/// Connects as `root` with the admin password. A datadir just made by
/// `mariadb-install-db --auth-root-authentication-method=normal` has `root@localhost`
/// without a password: then the password is set and the other `root` accounts dropped,
/// with `sql_log_bin=0` so these local changes create no GTID of their own.
async fn admin_connect(
    cfg: &ServerConfig,
    p: &Paths,
    creds: &Credentials,
) -> Result<Conn, DbError> {
    let connect = |opts: OptsBuilder| async move {
        match tokio::time::timeout(ADMIN_TIMEOUT, Conn::new(opts)).await {
            Ok(r) => r.map_err(|e| DbError::mysql(&cfg.host, e)),
            Err(_) => Err(DbError::Timeout {
                what: format!("connecting to MariaDB on {} as root", cfg.host),
                seconds: ADMIN_TIMEOUT.as_secs(),
            }),
        }
    };
    match connect(admin_opts(p, &creds.admin_password)).await {
        Ok(c) => Ok(c),
        Err(DbError::Mysql {
            source: mysql_async::Error::Server(ref e),
            ..
        }) if e.code == 1045 => {
            let mut c = connect(admin_opts(p, "")).await?;
            let others: Vec<String> = tokio::time::timeout(
                ADMIN_TIMEOUT,
                c.query("SELECT host FROM mysql.user WHERE user = 'root' AND host <> 'localhost'"),
            )
            .await
            .map_err(|_| DbError::Timeout {
                what: format!("listing root accounts on {}", cfg.host),
                seconds: ADMIN_TIMEOUT.as_secs(),
            })?
            .map_err(|e| DbError::mysql(&cfg.host, e))?;
            admin_exec(&cfg.host, &mut c, "SET SESSION sql_log_bin = 0").await?;
            admin_exec(
                &cfg.host,
                &mut c,
                &format!(
                    "ALTER USER 'root'@'localhost' IDENTIFIED BY '{}'",
                    creds.admin_password
                ),
            )
            .await?;
            for h in others.iter().filter(|h| !h.contains('\'')) {
                admin_exec(
                    &cfg.host,
                    &mut c,
                    &format!("DROP USER IF EXISTS 'root'@'{h}'"),
                )
                .await?;
            }
            admin_exec(&cfg.host, &mut c, "SET SESSION sql_log_bin = 1").await?;
            tracing::info!(host = %cfg.host, "root account secured");
            Ok(c)
        }
        Err(e) => Err(e),
    }
}

async fn admin_exec(host: &str, c: &mut Conn, sql: &str) -> Result<(), DbError> {
    match tokio::time::timeout(ADMIN_TIMEOUT, c.query_drop(sql)).await {
        Ok(r) => r.map_err(|e| DbError::mysql(host, e)),
        Err(_) => Err(DbError::Timeout {
            what: format!("statement on {host}"),
            seconds: ADMIN_TIMEOUT.as_secs(),
        }),
    }
}

/// Waits until the server accepts on its socket; fails early when it exits.
async fn wait_ready(cfg: &ServerConfig, p: &Paths, child: &mut Child) -> Result<(), DbError> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(startup_error(
                &cfg.host,
                format!("mariadbd exited with {status}"),
                &p.log,
            ));
        }
        if tokio::net::UnixStream::connect(&p.socket).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(startup_error(
                &cfg.host,
                format!(
                    "no connection on {} after {} s",
                    p.socket.display(),
                    READY_TIMEOUT.as_secs()
                ),
                &p.log,
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn install_db(cfg: &ServerConfig, p: &Paths) -> Result<(), DbError> {
    let tool = find_install_db().ok_or_else(|| {
        startup_error(
            &cfg.host,
            "mariadb-install-db not found: install the mariadb-server package".into(),
            &p.log,
        )
    })?;
    // Without `data/mysql` the directory is not a usable datadir (an interrupted first
    // start); begin again from nothing.
    if p.data.exists() {
        std::fs::remove_dir_all(&p.data)
            .map_err(|e| DbError::io(format!("removing {}", p.data.display()), e))?;
    }
    let log = || {
        std::fs::File::create(&p.install_log)
            .and_then(|f| f.try_clone().map(|g| (f, g)))
            .map_err(|e| DbError::io(format!("creating {}", p.install_log.display()), e))
    };
    let (out, err) = log()?;
    let run = Command::new(&tool)
        .arg(format!("--defaults-file={}", p.cnf.display()))
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db")
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .status();
    let status = match tokio::time::timeout(INSTALL_TIMEOUT, run).await {
        Ok(r) => r.map_err(|e| DbError::io(format!("running {}", tool.display()), e))?,
        Err(_) => {
            return Err(startup_error(
                &cfg.host,
                format!(
                    "{} did not finish in {} s",
                    tool.display(),
                    INSTALL_TIMEOUT.as_secs()
                ),
                &p.install_log,
            ))
        }
    };
    if !status.success() {
        // The bootstrap server writes its reasons to `log-error`; install.log holds only
        // the tool's generic advice.
        return Err(startup_error(
            &cfg.host,
            format!(
                "{} failed ({status}); its output is in {}",
                tool.display(),
                p.install_log.display()
            ),
            &p.log,
        ));
    }
    tracing::info!(host = %cfg.host, datadir = %p.data.display(), "datadir initialised");
    Ok(())
}

fn find_install_db() -> Option<PathBuf> {
    ["mariadb-install-db", "mysql_install_db"]
        .into_iter()
        .find_map(|name| crate::find_program(name, &["/usr/bin", "/usr/local/bin", "/usr/sbin"]))
}

/// Stops every `mariadbd` left running on this datadir by an earlier run: the pid file's
/// process and any other live process started with our option file (a lost pid file would
/// otherwise leave the datadir locked).
async fn stop_stale(p: &Paths, host: &str) {
    let mut pids = processes_mentioning(&p.cnf);
    if let Some(pid) = read_pid(&p.pid).filter(|pid| is_ours(*pid, &p.cnf)) {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    for pid in pids {
        tracing::warn!(host, pid, "stopping a mariadbd left by an earlier run");
        let target = Pid::from_raw(pid);
        let _ = kill(target, Signal::SIGTERM);
        if wait_gone(pid, &p.cnf, STOP_TIMEOUT).await {
            continue;
        }
        let _ = kill(target, Signal::SIGKILL);
        wait_gone(pid, &p.cnf, Duration::from_secs(5)).await;
    }
}

/// Live processes other than this one started with `--defaults-file=<cnf>`.
fn processes_mentioning(cnf: &Path) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or_default();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me && is_ours(*pid, cnf))
        .collect()
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 1)
}

/// Whether `pid` is a live (not zombie: its command line is empty) process started with
/// exactly `--defaults-file=<cnf>`, as this module starts `mariadbd`.
fn is_ours(pid: i32, cnf: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let arg = format!("--defaults-file={}", cnf.display());
    String::from_utf8_lossy(&cmdline)
        .split('\0')
        .any(|a| a == arg)
}

async fn wait_gone(pid: i32, cnf: &Path, bound: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < bound {
        if !is_ours(pid, cnf) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    !is_ours(pid, cnf)
}

/// `SIGTERM`, wait up to [`STOP_TIMEOUT`], then `SIGKILL`.
async fn terminate(mut child: Child, host: &str) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        if let Ok(Ok(status)) = tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            tracing::info!(host, pid, %status, "mariadbd stopped");
            return;
        }
        tracing::warn!(host, pid, "mariadbd ignored SIGTERM; killing it");
    }
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}

async fn health_loop(
    first: Conn,
    opts: OptsBuilder,
    role: NodeRole,
    status: Arc<Mutex<DbNodeStatus>>,
) {
    let mut conn = Some(first);
    let mut tick = tokio::time::interval(HEALTH_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let c = match conn.take() {
            Some(c) => Some(c),
            None => tokio::time::timeout(ADMIN_TIMEOUT, Conn::new(opts.clone()))
                .await
                .ok()
                .and_then(Result::ok),
        };
        let (healthy, lag, keep) = match c {
            None => (false, None, None),
            Some(mut c) => match check(&mut c, role).await {
                Some((healthy, lag)) => (healthy, lag, Some(c)),
                None => (false, None, None),
            },
        };
        conn = keep;
        let mut s = lock(&status);
        s.healthy = healthy;
        s.lag_seconds = lag;
    }
}

/// One health check: `None` when the connection failed.
async fn check(c: &mut Conn, role: NodeRole) -> Option<(bool, Option<f64>)> {
    let bound = Duration::from_secs(2);
    tokio::time::timeout(bound, c.ping()).await.ok()?.ok()?;
    if role == NodeRole::Primary {
        return Some((true, None));
    }
    let row: Option<Row> = tokio::time::timeout(bound, c.query_first("SHOW SLAVE STATUS"))
        .await
        .ok()?
        .ok()?;
    let Some(row) = row else {
        return Some((false, None));
    };
    let running = |col: &str| column_str(&row, col).as_deref() == Some("Yes");
    Some((
        running("Slave_IO_Running") && running("Slave_SQL_Running"),
        seconds_behind(&row),
    ))
}

fn column_str(row: &Row, name: &str) -> Option<String> {
    row.get_opt::<Option<String>, _>(name)?.ok()?
}

/// `Seconds_Behind_Master` of a `SHOW SLAVE STATUS` row (NULL → `None`).
pub(crate) fn seconds_behind(row: &Row) -> Option<f64> {
    let v = row
        .get_opt::<Option<u64>, _>("Seconds_Behind_Master")?
        .ok()??;
    Some(v as f64)
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

fn startup_error(host: &str, reason: String, log: &Path) -> DbError {
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
        assert!(!my_cnf(&primary, &Paths::new(state, "web-01")).contains("read_only"));
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
