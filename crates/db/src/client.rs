//! The application's handle on the data tier: writes to the primary, reads from a replica
//! (the one on the application's own host if there is one) with a fallback to the primary.
//!
//! Every connection is TCP with TLS to `mariadbd`, the server certificate verified against
//! the lab's CA for the database host's name ([`crate::tcp_opts`]); the application account
//! is `REQUIRE SSL`, so the server refuses it without TLS. In loopback mode a host's
//! outbound connections must leave from the host's own address, and `mysql_async` cannot
//! choose a source address: for each database host the client opens a process egress
//! (`crate::egress`, a `127.0.0.1` listener only this process may use) that connects to that
//! host's MariaDB relay from the application host's address; the pool points at it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool, PoolConstraints, PoolOpts, Row};
use serde::Serialize;
use topology::{Role, Topology};

use crate::cluster::ClusterState;
use crate::egress::LocalEgress;
use crate::observe::HEARTBEAT_TABLE;
use crate::sqlite::{sqlite_path, SqliteStore};
use crate::{Credentials, DbError, Engine};

/// Longest accepted author name, in characters (the column is `VARCHAR(64)`).
pub const MAX_AUTHOR_CHARS: usize = 64;
/// Longest accepted message text, in bytes (the MariaDB `TEXT` column limit).
pub const MAX_TEXT_BYTES: usize = 65_535;
/// Largest `limit` [`DbClient::list_messages`] honours; larger values are capped.
pub const MAX_LIST: u32 = 1000;

/// Bound on taking a pooled connection (including a new connection and its handshake),
/// seconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Most pooled connections per database node.
const POOL_MAX: usize = 8;
/// Bound on one statement once connected, seconds.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// One guestbook message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// Primary key, assigned by the primary (`AUTO_INCREMENT`), increasing.
    pub id: u64,
    /// Author name, at most [`MAX_AUTHOR_CHARS`] characters.
    pub author: String,
    /// Message text, at most [`MAX_TEXT_BYTES`] bytes.
    pub text: String,
    /// Creation time set by the database, RFC 3339 in UTC with a `Z` suffix and fractional
    /// seconds (microseconds on MariaDB, milliseconds on SQLite).
    pub created_at: String,
}

/// Where the data tier's reads and writes currently go.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DbInfo {
    /// `"mariadb"` or `"sqlite"`.
    pub engine: String,
    /// Host name of the node taking writes (the primary).
    pub write_node: String,
    /// Host name of the node serving reads: the replica, or the primary when the replica is
    /// unreachable (or there is none).
    pub read_node: String,
    /// The read node's replication lag: the age of the newest heartbeat it has applied
    /// (the primary writes one every 250 ms), seconds; `None` when reads go to the primary
    /// or the engine is SQLite.
    pub lag_seconds: Option<f64>,
}

/// A database node the client reaches: its host name and its MariaDB (relay) address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbNode {
    /// Host name, e.g. `web-01`.
    pub host: String,
    /// The host's MariaDB address and port (`ports.mysql`).
    pub addr: SocketAddr,
}

/// What an application host needs to reach the data tier.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The application host's name.
    pub host: String,
    /// The application host's network seam: connections to database hosts leave through
    /// it, from the host's own address.
    pub net: firewall::Net,
    /// The lab's state directory (credentials, egress sockets, the SQLite file).
    pub state_dir: PathBuf,
    /// Engine in use.
    pub engine: Engine,
    /// Database (schema) name.
    pub database: String,
    /// The primary.
    pub primary: DbNode,
    /// The replica reads go to: the one on this host if any, else the first in topology
    /// order; `None` when there is no replica.
    pub read: Option<DbNode>,
    /// Every database node, in topology order. Writes go to the one `<state>/db/cluster.json`
    /// names primary (the topology's `db-primary` until that file exists); reads to another
    /// whose lag is at most `max_lag_seconds`, the preferred `read` node first.
    pub nodes: Vec<DbNode>,
    /// Largest replication lag (heartbeat age) a replica may have to serve reads, seconds.
    /// Default [`DEFAULT_MAX_LAG_SECONDS`].
    pub max_lag_seconds: f64,
}

/// Default bound on a read replica's lag, seconds.
pub const DEFAULT_MAX_LAG_SECONDS: f64 = 1.0;

impl ClientConfig {
    /// The configuration for application host `host`; `None` when `host` does not exist,
    /// does not hold [`Role::App`], or the topology has no `db-primary`.
    pub fn from_topology(
        t: &Topology,
        host: &str,
        state_dir: &Path,
        net: firewall::Net,
        engine: Engine,
    ) -> Option<ClientConfig> {
        let me = t.host(host).filter(|h| h.has(Role::App))?;
        let node = |h: &topology::Host| DbNode {
            host: h.name.clone(),
            addr: SocketAddr::new(h.address, t.ports.mysql),
        };
        let primary = node(t.db_primary()?);
        let read = if me.has(Role::DbReplica) {
            Some(node(me))
        } else {
            t.hosts_with(Role::DbReplica).next().map(node)
        };
        let nodes = t
            .hosts
            .iter()
            .filter(|h| h.has(Role::DbPrimary) || h.has(Role::DbReplica))
            .map(node)
            .collect();
        Some(ClientConfig {
            host: me.name.clone(),
            net,
            state_dir: state_dir.to_path_buf(),
            engine,
            database: t.database.name.clone(),
            primary,
            read,
            nodes,
            max_lag_seconds: DEFAULT_MAX_LAG_SECONDS,
        })
    }
}

/// Opens the application's handle on the data tier. For MariaDB: loads the credentials
/// (`<state>/db/credentials.json`), opens an egress for every database host (see the module
/// docs) and builds small connection pools; no connection is made yet, so this succeeds
/// while the servers are still starting. For SQLite: opens the shared file and creates the
/// schema.
///
/// The egress listeners live as long as the returned client (and its clones).
///
/// Errors: [`DbError::Credentials`], [`DbError::Config`] when the CA certificate
/// (`<state>/pki/ca.pem`) is missing, [`DbError::Io`] when an egress cannot be bound,
/// [`DbError::Sqlite`].
pub async fn connect_client(cfg: ClientConfig) -> Result<DbClient, DbError> {
    let inner = match cfg.engine {
        Engine::Sqlite => Inner::Sqlite {
            store: SqliteStore::open(sqlite_path(&cfg.state_dir, &cfg.database)).await?,
            node: cfg.primary.host.clone(),
        },
        Engine::Mariadb => Inner::Mariadb(MariaClient::open(&cfg).await?),
    };
    Ok(DbClient {
        inner: Arc::new(inner),
    })
}

/// The application's handle on the data tier. Cheap to clone (shared pools).
#[derive(Clone)]
pub struct DbClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DbClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let engine = match &*self.inner {
            Inner::Sqlite { .. } => "sqlite",
            Inner::Mariadb(_) => "mariadb",
        };
        f.debug_struct("DbClient").field("engine", &engine).finish()
    }
}

enum Inner {
    Sqlite { store: SqliteStore, node: String },
    Mariadb(MariaClient),
}

impl DbClient {
    /// Inserts a message on the primary and returns it as stored (id and `created_at` set
    /// by the database).
    ///
    /// Errors: [`DbError::Invalid`] for an empty or over-long author or text; otherwise the
    /// primary's error ([`DbError::Mysql`], [`DbError::Timeout`], [`DbError::Sqlite`]).
    pub async fn insert_message(&self, author: &str, text: &str) -> Result<Message, DbError> {
        validate(author, text)?;
        match &*self.inner {
            Inner::Sqlite { store, .. } => store.insert(author.into(), text.into()).await,
            Inner::Mariadb(m) => m.insert(author, text).await,
        }
    }

    /// The newest `limit` messages (capped at [`MAX_LIST`]), newest first, from a replica
    /// whose lag is under the bound and which has applied this client's last write
    /// (`MASTER_GTID_WAIT` on its `@@last_gtid`, up to 0.5 s); else from the primary.
    pub async fn list_messages(&self, limit: u32) -> Result<Vec<Message>, DbError> {
        let limit = limit.min(MAX_LIST);
        match &*self.inner {
            Inner::Sqlite { store, .. } => store.list(limit).await,
            Inner::Mariadb(m) => m.list(limit).await,
        }
    }

    /// The message with `id`: asked of the read replica first, then of the primary when the
    /// replica does not have it (yet) or fails, so a client reads its own writes.
    pub async fn get_message(&self, id: u64) -> Result<Option<Message>, DbError> {
        match &*self.inner {
            Inner::Sqlite { store, .. } => store.get(id).await,
            Inner::Mariadb(m) => m.get(id).await,
        }
    }

    /// Which nodes take writes and reads, and the read node's replication lag.
    ///
    /// Errors: none for MariaDB (an unreachable replica shows as reads going to the
    /// primary); SQLite cannot fail here either. The `Result` leaves room for engines
    /// that can.
    pub async fn info(&self) -> Result<DbInfo, DbError> {
        match &*self.inner {
            Inner::Sqlite { node, .. } => Ok(DbInfo {
                engine: Engine::Sqlite.as_str().into(),
                write_node: node.clone(),
                read_node: node.clone(),
                lag_seconds: None,
            }),
            Inner::Mariadb(m) => Ok(m.info().await),
        }
    }
}

fn validate(author: &str, text: &str) -> Result<(), DbError> {
    if author.trim().is_empty() {
        return Err(DbError::Invalid("author is empty".into()));
    }
    if author.chars().count() > MAX_AUTHOR_CHARS {
        return Err(DbError::Invalid(format!(
            "author is longer than {MAX_AUTHOR_CHARS} characters"
        )));
    }
    if text.trim().is_empty() {
        return Err(DbError::Invalid("text is empty".into()));
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(DbError::Invalid(format!(
            "text is longer than {MAX_TEXT_BYTES} bytes"
        )));
    }
    Ok(())
}

/// One MariaDB node reached through its egress socket.
struct MariaNode {
    host: String,
    pool: Pool,
}

/// Longest wait for a replica to apply the client's last write before a read goes to the
/// primary instead (`MASTER_GTID_WAIT`), seconds.
const GTID_WAIT_SECONDS: f64 = 0.5;

struct MariaClient {
    state_dir: PathBuf,
    /// Every database node, in topology order.
    nodes: Vec<MariaNode>,
    /// The node reads prefer (the replica on this host, else the first replica).
    preferred_read: Option<String>,
    /// Largest replica lag reads accept, seconds.
    max_lag: f64,
    /// The newest cluster state seen; never replaced by one with a lower epoch.
    seen: std::sync::Mutex<Option<ClusterState>>,
    /// `@@last_gtid` of this client's newest write, for read-your-writes.
    last_gtid: std::sync::Mutex<Option<String>>,
    /// Where the topology put the primary, used until `cluster.json` exists.
    first_primary: String,
    /// Egress listeners, one per database host; closed on drop.
    _egress: Vec<LocalEgress>,
}

const SELECT_COLUMNS: &str =
    "SELECT id, author, `text`, DATE_FORMAT(created_at, '%Y-%m-%dT%H:%i:%s.%fZ') FROM guestbook";

impl MariaClient {
    async fn open(cfg: &ClientConfig) -> Result<MariaClient, DbError> {
        let creds = Credentials::load(&cfg.state_dir)?;
        let ca = pki::PkiPaths::new(crate::pki_dir(&cfg.state_dir)).ca_cert();
        if !ca.is_file() {
            return Err(DbError::Config(format!(
                "{}: the CA certificate {} is missing: the lab's PKI issues it (`rampart up`)",
                cfg.host,
                ca.display()
            )));
        }
        let mut egress = Vec::new();
        let mut nodes = Vec::new();
        for n in &cfg.nodes {
            nodes.push(open_node(cfg, n, &creds, &ca, &mut egress).await?);
        }
        Ok(MariaClient {
            state_dir: cfg.state_dir.clone(),
            nodes,
            preferred_read: cfg.read.as_ref().map(|r| r.host.clone()),
            max_lag: cfg.max_lag_seconds,
            seen: std::sync::Mutex::new(None),
            last_gtid: std::sync::Mutex::new(None),
            first_primary: cfg.primary.host.clone(),
            _egress: egress,
        })
    }

    /// The primary's host name: from `cluster.json` unless its epoch is lower than one
    /// already seen (a stale state is ignored, with a warning).
    fn primary_host(&self) -> String {
        let loaded = ClusterState::load(&self.state_dir).ok().flatten();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match (loaded, seen.as_ref()) {
            (Some(l), Some(s)) if l.epoch < s.epoch => {
                tracing::warn!(
                    seen = s.epoch,
                    got = l.epoch,
                    "ignoring a cluster state with a lower epoch"
                );
            }
            (Some(l), _) => *seen = Some(l),
            (None, _) => {}
        }
        seen.as_ref()
            .map(|s| s.primary.clone())
            .unwrap_or_else(|| self.first_primary.clone())
    }

    fn node(&self, host: &str) -> Option<&MariaNode> {
        self.nodes.iter().find(|n| n.host == host)
    }

    fn primary(&self) -> Result<&MariaNode, DbError> {
        let host = self.primary_host();
        self.node(&host).ok_or_else(|| DbError::Data {
            node: host.clone(),
            reason: "the primary in cluster.json is not a database host of the topology".into(),
        })
    }

    /// Replicas in the order reads try them: the preferred one first.
    fn replicas(&self) -> Vec<&MariaNode> {
        let primary = self.primary_host();
        let mut v: Vec<&MariaNode> = self.nodes.iter().filter(|n| n.host != primary).collect();
        v.sort_by_key(|n| Some(&n.host) != self.preferred_read.as_ref());
        v
    }

    async fn insert(&self, author: &str, text: &str) -> Result<Message, DbError> {
        let node = self.primary()?;
        let mut conn = node.conn().await?;
        let q = async {
            conn.exec_drop(
                "INSERT INTO guestbook (author, `text`) VALUES (?, ?)",
                (author, text),
            )
            .await?;
            let id = conn.last_insert_id().unwrap_or_default();
            let gtid: Option<String> = conn.query_first("SELECT @@last_gtid").await?;
            let row = conn
                .exec_first::<Row, _, _>(format!("{SELECT_COLUMNS} WHERE id = ?"), (id,))
                .await?;
            Ok::<_, mysql_async::Error>((gtid, row))
        };
        let (gtid, row) = node.bounded("insert", q).await?;
        if let Some(g) = gtid.filter(|g| !g.is_empty()) {
            *self.last_gtid.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
        }
        match row {
            Some(row) => node.message(row),
            None => Err(DbError::Data {
                node: node.host.clone(),
                reason: "the inserted row is not there".into(),
            }),
        }
    }

    /// A connection to a replica fit for reading: lag under the bound and this client's
    /// last write applied (`MASTER_GTID_WAIT`, up to [`GTID_WAIT_SECONDS`]); with its lag.
    async fn read_conn(&self) -> Option<(&MariaNode, Conn, Option<f64>)> {
        let gtid = self
            .last_gtid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for r in self.replicas() {
            let Ok(mut conn) = r.conn().await else {
                continue;
            };
            let lag = match r.lag(&mut conn).await {
                Ok(Some(l)) if l <= self.max_lag => l,
                Ok(_) => continue,
                Err(e) => {
                    // A connection keeps the global privileges its account had when it
                    // logged in (MariaDB KB: "GRANT"): one made while the replica had
                    // replayed the account but not yet its SLAVE MONITOR grant would fail
                    // here for as long as the pool reuses it. Close it instead.
                    tracing::debug!(replica = %r.host, error = %e, "lag unreadable, closing the connection");
                    let _ = conn.disconnect().await;
                    continue;
                }
            };
            if let Some(g) = &gtid {
                let waited: Result<Option<i64>, _> = r
                    .bounded(
                        "MASTER_GTID_WAIT",
                        conn.exec_first("SELECT MASTER_GTID_WAIT(?, ?)", (g, GTID_WAIT_SECONDS)),
                    )
                    .await;
                if !matches!(waited, Ok(Some(0))) {
                    continue;
                }
            }
            return Some((r, conn, Some(lag)));
        }
        None
    }

    async fn list(&self, limit: u32) -> Result<Vec<Message>, DbError> {
        if let Some((r, mut conn, _)) = self.read_conn().await {
            match r.list(&mut conn, limit).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::warn!(replica = %r.host, error = %e, "read failed, using the primary")
                }
            }
        }
        let p = self.primary()?;
        let mut conn = p.conn().await?;
        p.list(&mut conn, limit).await
    }

    async fn get(&self, id: u64) -> Result<Option<Message>, DbError> {
        if let Some((r, mut conn, _)) = self.read_conn().await {
            match r.get(&mut conn, id).await {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(replica = %r.host, error = %e, "read failed, using the primary")
                }
            }
        }
        let p = self.primary()?;
        let mut conn = p.conn().await?;
        p.get(&mut conn, id).await
    }

    async fn info(&self) -> DbInfo {
        let write = self.primary_host();
        let mut info = DbInfo {
            engine: Engine::Mariadb.as_str().into(),
            write_node: write.clone(),
            read_node: write,
            lag_seconds: None,
        };
        if let Some((r, _, lag)) = self.read_conn().await {
            info.read_node = r.host.clone();
            info.lag_seconds = lag;
        }
        info
    }
}

/// Most connections one egress forwards at once: the pool's, plus the ones being retired.
const EGRESS_MAX: usize = 2 * POOL_MAX;

async fn open_node(
    cfg: &ClientConfig,
    node: &DbNode,
    creds: &Credentials,
    ca: &Path,
    egress: &mut Vec<LocalEgress>,
) -> Result<MariaNode, DbError> {
    let e = LocalEgress::open(cfg.net.clone(), node.addr, EGRESS_MAX).await?;
    let opts = crate::tcp_opts(
        e.addr(),
        &node.host,
        ca,
        &creds.app_user,
        &creds.app_password,
    )
    .db_name(Some(cfg.database.clone()))
    .init(vec!["SET time_zone = '+00:00'"])
    .pool_opts(
        PoolOpts::default()
            .with_constraints(PoolConstraints::new(0, POOL_MAX).unwrap_or_default())
            .with_inactive_connection_ttl(Duration::from_secs(30))
            .with_ttl_check_interval(Duration::from_secs(10)),
    );
    egress.push(e);
    Ok(MariaNode {
        host: node.host.clone(),
        pool: Pool::new(opts),
    })
}

impl MariaNode {
    /// A pooled connection that answered a ping just now (validation on borrow): a pooled
    /// connection whose server or relay went away since it was last used is dropped and
    /// replaced before a statement is sent on it, so a write is never sent on a connection
    /// that cannot say whether it ran.
    async fn conn(&self) -> Result<Conn, DbError> {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        // Every idle connection may be stale after an outage; the pool holds at most 8.
        for _ in 0..=POOL_MAX {
            let mut conn = match tokio::time::timeout_at(deadline, self.pool.get_conn()).await {
                Ok(r) => r.map_err(|e| DbError::mysql(&self.host, e))?,
                Err(_) => break,
            };
            match tokio::time::timeout_at(deadline, conn.ping()).await {
                Ok(Ok(())) => return Ok(conn),
                Ok(Err(e)) => {
                    tracing::debug!(node = %self.host, error = %e, "dropping a stale pooled connection");
                    let _ = conn.disconnect().await;
                }
                Err(_) => break,
            }
        }
        Err(DbError::Timeout {
            what: format!("connecting to MariaDB on {}", self.host),
            seconds: CONNECT_TIMEOUT.as_secs(),
        })
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = mysql_async::Result<T>>,
    ) -> Result<T, DbError> {
        match tokio::time::timeout(QUERY_TIMEOUT, f).await {
            Ok(r) => r.map_err(|e| DbError::mysql(&self.host, e)),
            Err(_) => Err(DbError::Timeout {
                what: format!("{what} on {}", self.host),
                seconds: QUERY_TIMEOUT.as_secs(),
            }),
        }
    }

    async fn list(&self, conn: &mut Conn, limit: u32) -> Result<Vec<Message>, DbError> {
        let rows: Vec<Row> = self
            .bounded(
                "list",
                conn.exec(
                    format!("{SELECT_COLUMNS} ORDER BY id DESC LIMIT ?"),
                    (limit,),
                ),
            )
            .await?;
        rows.into_iter().map(|r| self.message(r)).collect()
    }

    async fn get(&self, conn: &mut Conn, id: u64) -> Result<Option<Message>, DbError> {
        let row: Option<Row> = self
            .bounded(
                "get",
                conn.exec_first(format!("{SELECT_COLUMNS} WHERE id = ?"), (id,)),
            )
            .await?;
        row.map(|r| self.message(r)).transpose()
    }

    /// This node's replication lag: the age of the newest heartbeat it holds, seconds
    /// (`None` when it is not replicating or holds no heartbeat).
    async fn lag(&self, conn: &mut Conn) -> Result<Option<f64>, DbError> {
        let replicating: Option<Row> = self
            .bounded("SHOW SLAVE STATUS", conn.query_first("SHOW SLAVE STATUS"))
            .await?;
        if replicating.is_none() {
            return Ok(None);
        }
        let age: Option<Option<f64>> = self
            .bounded(
                "heartbeat",
                conn.query_first(format!(
                    "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, MAX(ts), NOW(6)) / 1000000 AS DOUBLE) \
                     FROM {HEARTBEAT_TABLE}"
                )),
            )
            .await?;
        Ok(age.flatten().map(|a| a.max(0.0)))
    }

    fn message(&self, row: Row) -> Result<Message, DbError> {
        let (id, author, text, created_at) =
            mysql_async::from_row_opt::<(u64, String, String, String)>(row).map_err(|e| {
                DbError::Data {
                    node: self.host.clone(),
                    reason: format!("guestbook row: {e}"),
                }
            })?;
        Ok(Message {
            id,
            author,
            text,
            created_at,
        })
    }
}

impl Drop for MariaClient {
    fn drop(&mut self) {
        // Close pooled connections in the background when a runtime is still there.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let pools: Vec<Pool> = self.nodes.iter().map(|n| n.pool.clone()).collect();
            rt.spawn(async move {
                for p in pools {
                    let _ = p.disconnect().await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn validation_bounds() {
        assert!(validate("ann", "hi").is_ok());
        assert!(validate("", "hi").unwrap_err().is_invalid_input());
        assert!(validate("ann", " ").unwrap_err().is_invalid_input());
        assert!(validate(&"é".repeat(64), "x").is_ok());
        assert!(validate(&"é".repeat(65), "x").is_err());
        assert!(validate("a", &"x".repeat(MAX_TEXT_BYTES + 1)).is_err());
    }

    #[test]
    fn read_node_prefers_the_local_replica() {
        let text = "
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
[[hosts]]
name = \"web-03\"
address = \"127.93.9.13\"
roles = [\"web\", \"app\"]
";
        let t = Topology::parse(text, "t").unwrap();
        let dir = Path::new("/state");
        let c = |h| {
            ClientConfig::from_topology(&t, h, dir, test_support::net(&t, h), Engine::Mariadb)
                .unwrap()
        };
        assert_eq!(c("web-01").read.unwrap().host, "web-02");
        assert_eq!(c("web-02").read.unwrap().host, "web-02");
        assert_eq!(c("web-03").read.unwrap().host, "web-02");
        assert_eq!(c("web-03").primary.host, "web-01");
        assert!(ClientConfig::from_topology(
            &t,
            "lb-01",
            dir,
            test_support::net(&t, "lb-01"),
            Engine::Mariadb
        )
        .is_none());
    }
}
