//! What one MariaDB server says about itself: read-only flag, GTID positions, replication
//! threads, heartbeat lag and semi-synchronous state. Read by each node's health loop (and
//! published in its status) and by the failover controller.

use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Row};
use serde::{Deserialize, Serialize};

use crate::gtid::{Gtid, GtidState};

/// The table the writable primary updates every [`HEARTBEAT_PERIOD`]; a replica's lag is
/// the age of the row it has applied (pt-heartbeat's method), which unlike
/// `Seconds_Behind_Master` also grows while the IO thread is stalled.
pub const HEARTBEAT_TABLE: &str = "rampart_heartbeat";
/// Period of the heartbeat write on the primary.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_millis(250);

/// One observation of a server. Every field reflects the statement's answer at the time of
/// the observation; `None` where the server did not say.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeObservation {
    /// `@@read_only`.
    pub read_only: bool,
    /// `@@gtid_current_pos`.
    pub gtid_current_pos: String,
    /// `@@gtid_binlog_pos`: the last GTID of each domain in this server's binary log.
    pub gtid_binlog_pos: String,
    /// `@@gtid_slave_pos`: the last GTID applied by the SQL thread.
    pub gtid_slave_pos: String,
    /// `@@gtid_binlog_state`: the last GTID of each (domain, originating server) in this
    /// server's binary log; what errant transactions are found by.
    #[serde(default)]
    pub gtid_binlog_state: String,
    /// `@@server_id`.
    #[serde(default)]
    pub server_id: u32,
    /// Whether replication is configured (`SHOW SLAVE STATUS` returned a row).
    pub replicating: bool,
    /// `Slave_IO_Running = Yes`: connected to its primary and receiving.
    pub io_running: bool,
    /// `Slave_SQL_Running = Yes`.
    pub sql_running: bool,
    /// `Gtid_IO_Pos`: the last GTID received into the relay log.
    pub gtid_io_pos: String,
    /// `Last_IO_Errno` (0: none). 1236 means the primary does not have this server's
    /// position in its binary log: diverged history.
    pub last_io_errno: u32,
    /// Seconds since the newest heartbeat this server holds was written (on the primary
    /// that wrote it, at most about [`HEARTBEAT_PERIOD`]); `None` without a heartbeat row.
    pub heartbeat_age_seconds: Option<f64>,
    /// `@@rpl_semi_sync_master_enabled`.
    pub semi_sync_master_enabled: bool,
    /// `Rpl_semi_sync_master_status`: ON while commits wait for a replica's
    /// acknowledgement; OFF after `rpl_semi_sync_master_timeout` fell back to asynchronous
    /// replication (MariaDB KB: "Semisynchronous Replication").
    pub semi_sync_master_status: bool,
    /// `Rpl_semi_sync_master_clients`: replicas acknowledging.
    pub semi_sync_master_clients: u64,
    /// `Threads_connected`.
    pub connections: u64,
    /// `Questions`: statements received since start.
    pub queries: u64,
    /// `Ssl_cipher` of this observing connection (empty: not TLS; the node observes its
    /// own server over the Unix socket, where it is always empty).
    pub ssl_cipher: String,
    /// `@@have_ssl = YES`: the server loaded its certificate and key and offers TLS.
    #[serde(default)]
    pub tls_enabled: bool,
    /// Accounts that may log in without TLS (empty `ssl_type` in `mysql.user`; MariaDB KB
    /// "CREATE USER", "REQUIRE SSL"), sorted, besides `root` (reached by the node over the
    /// socket) and the locked `mariadb.sys`: empty when the application and replication
    /// accounts require TLS, and in the failover controller's observations (its account
    /// may not read `mysql.user`).
    #[serde(default)]
    pub plain_accounts: Vec<String>,
    /// `Master_SSL_Allowed = Yes`: this replica's connection to its primary uses TLS.
    #[serde(default)]
    pub replication_tls: bool,
    /// `Master_SSL_Verify_Server_Cert = Yes`: and it verifies the primary's certificate
    /// (CA and name).
    #[serde(default)]
    pub replication_tls_verified: bool,
}

impl NodeObservation {
    /// Transactions in this server's binary log that `primary`'s does not hold (errant
    /// GTIDs, see [`GtidState::not_in`]); empty when either state does not parse.
    pub fn errant_against(&self, primary: &NodeObservation) -> Vec<Gtid> {
        match (
            GtidState::parse(&self.gtid_binlog_state),
            GtidState::parse(&primary.gtid_binlog_state),
        ) {
            (Some(own), Some(p)) => own.not_in(&p, primary.server_id),
            _ => Vec::new(),
        }
    }

    /// Whether every link into this server needs TLS: the server offers it and no account
    /// but `root` may log in without it.
    pub fn clients_require_tls(&self) -> bool {
        self.tls_enabled && self.plain_accounts.is_empty()
    }
}

/// Bound on each statement of an observation.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);

async fn bounded<T>(
    f: impl std::future::Future<Output = mysql_async::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer in {STATEMENT_TIMEOUT:?}")),
    }
}

/// Observes the server behind `c` (an administrative connection). `database` is the
/// schema holding the heartbeat table.
///
/// Errors: the driver's error or a timeout, as text (the caller treats any error as "not
/// reachable").
pub async fn observe(c: &mut Conn, database: &str) -> Result<NodeObservation, String> {
    type Vars = (u8, String, String, String, u8, String, u32);
    let vars: Option<Vars> = bounded(c.query_first(
        "SELECT @@read_only, @@gtid_current_pos, @@gtid_binlog_pos, @@gtid_slave_pos, \
         @@rpl_semi_sync_master_enabled, @@gtid_binlog_state, @@server_id",
    ))
    .await?;
    let Some((ro, cur, binlog, slave, ss_enabled, state, server_id)) = vars else {
        return Err("no answer to SELECT @@read_only".into());
    };
    let mut o = NodeObservation {
        read_only: ro != 0,
        gtid_current_pos: cur,
        gtid_binlog_pos: binlog,
        gtid_slave_pos: slave,
        gtid_binlog_state: state,
        server_id,
        semi_sync_master_enabled: ss_enabled != 0,
        ..NodeObservation::default()
    };
    let status: Vec<(String, String)> = bounded(c.query(
        "SHOW GLOBAL STATUS WHERE Variable_name IN ('Rpl_semi_sync_master_status', \
         'Rpl_semi_sync_master_clients', 'Threads_connected', 'Questions')",
    ))
    .await?;
    for (name, value) in status {
        match name.as_str() {
            "Rpl_semi_sync_master_status" => o.semi_sync_master_status = value == "ON",
            "Rpl_semi_sync_master_clients" => {
                o.semi_sync_master_clients = value.parse().unwrap_or(0)
            }
            "Threads_connected" => o.connections = value.parse().unwrap_or(0),
            "Questions" => o.queries = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    let cipher: Option<(String, String)> =
        bounded(c.query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")).await?;
    o.ssl_cipher = cipher.map(|(_, v)| v).unwrap_or_default();
    let have_ssl: Option<String> = bounded(c.query_first("SELECT @@have_ssl")).await?;
    o.tls_enabled = have_ssl.as_deref() == Some("YES");
    // Compared here rather than in SQL: `ssl_type` is an ENUM whose collation differs from
    // the connection's.
    // The failover controller's account may not read `mysql.user` (it needs no account
    // data): denied (error 1142) leaves the list empty.
    let accounts: Vec<(String, String, String)> =
        match bounded(c.query("SELECT user, CONCAT(ssl_type), CONCAT(is_role) FROM mysql.user"))
            .await
        {
            Ok(a) => a,
            Err(e) if e.contains("(1142)") => Vec::new(),
            Err(e) => return Err(e),
        };
    o.plain_accounts = accounts
        .into_iter()
        .filter(|(user, ssl, role)| {
            ssl.is_empty() && role != "Y" && user != "root" && user != "mariadb.sys"
        })
        .map(|(user, _, _)| user)
        .collect();
    o.plain_accounts.sort();
    o.plain_accounts.dedup();
    let row: Option<Row> = bounded(c.query_first("SHOW SLAVE STATUS")).await?;
    if let Some(row) = row {
        let text = |col: &str| -> String {
            row.get_opt::<Option<String>, _>(col)
                .and_then(Result::ok)
                .flatten()
                .unwrap_or_default()
        };
        o.replicating = true;
        o.io_running = text("Slave_IO_Running") == "Yes";
        o.sql_running = text("Slave_SQL_Running") == "Yes";
        o.gtid_io_pos = text("Gtid_IO_Pos");
        o.last_io_errno = text("Last_IO_Errno").parse().unwrap_or(0);
        o.replication_tls = text("Master_SSL_Allowed") == "Yes";
        o.replication_tls_verified = text("Master_SSL_Verify_Server_Cert") == "Yes";
    }
    let age: Option<Option<f64>> = bounded(c.query_first(format!(
        "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, MAX(ts), NOW(6)) / 1000000 AS DOUBLE) \
         FROM `{database}`.{HEARTBEAT_TABLE}"
    )))
    .await
    .unwrap_or(None);
    o.heartbeat_age_seconds = age.flatten().map(|a| a.max(0.0));
    Ok(o)
}
