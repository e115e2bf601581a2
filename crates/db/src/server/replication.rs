//! GTID replication: a node's replication egress (which always leads to the primary named
//! in `cluster.json`), pointing a server at the primary, and making a server the writable
//! primary. Shared by the node (at start and after a restart) and the failover controller.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use topology::Service;

use super::bootstrap::admin_exec;
use super::process::Restart;
use super::{ServerConfig, ADMIN_TIMEOUT};
use crate::cluster::ClusterState;
use crate::gtid::GtidPos;
use crate::{Credentials, DbError};

/// Opens the node's replication egress on `ports.mysql_egress` of its own address. Only
/// the node's own `mariadbd` may use it (the policy's `LocalServer` rule); each accepted
/// connection goes to the MariaDB relay of the primary that `<state>/db/cluster.json` names
/// at that moment, so a replica repointed after a failover (`CHANGE MASTER TO`, then
/// `START SLAVE`) reaches the new primary without the egress being rebound.
///
/// Errors: [`DbError::Io`] when the listener cannot be bound.
pub(super) async fn start_egress(
    cfg: &ServerConfig,
    pid: Arc<AtomicU32>,
    stop: &CancellationToken,
) -> Result<(JoinHandle<()>, Arc<firewall::Filter>), DbError> {
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
    let filter = listener.filter().clone();
    let cfg = cfg.clone();
    let stop = stop.clone();
    let task = tokio::spawn(async move {
        loop {
            let admitted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let a = match admitted {
                Ok(a) => a,
                Err(e) => {
                    firewall::accept_failed(Service::MysqlEgress, &e).await;
                    continue;
                }
            };
            let Some(to) = current_primary(&cfg) else {
                tracing::warn!(host = %cfg.host, "replication egress: no other primary in cluster.json");
                continue;
            };
            let net = cfg.net.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut inbound = a.stream;
                let copy = async {
                    let mut out = net.connect(to).await?;
                    tokio::io::copy_bidirectional(&mut inbound, &mut out).await
                };
                tokio::select! {
                    r = copy => if let Err(e) = r {
                        tracing::debug!(%to, error = %e, "replication connection ended");
                    },
                    _ = stop.cancelled() => {}
                }
                drop(a.slot);
            });
        }
    });
    Ok((task, filter))
}

/// The MariaDB address of the primary named in `cluster.json`, unless that is this node.
fn current_primary(cfg: &ServerConfig) -> Option<SocketAddr> {
    let state = ClusterState::load(&cfg.state_dir).ok()??;
    if state.primary == cfg.host {
        return None;
    }
    cfg.peers
        .iter()
        .find(|(h, _)| *h == state.primary)
        .map(|(_, a)| *a)
}

/// Points the server behind `admin` at the current primary through its own replication
/// egress (`own_address:egress_port`) and starts replicating: `STOP SLAVE`; when the
/// server's binary log is ahead of `gtid_slave_pos` (it was a primary), `SET GLOBAL
/// gtid_slave_pos = @@gtid_binlog_pos` so it asks for what follows its own history;
/// `CHANGE MASTER TO ... MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1,
/// MASTER_HEARTBEAT_PERIOD=0.5, MASTER_SSL=1, MASTER_SSL_CA=@@ssl_ca,
/// MASTER_SSL_VERIFY_SERVER_CERT=1`; `START SLAVE` (MariaDB KB: "CHANGE MASTER TO", "Global
/// Transaction ID"). The IO thread thus speaks TLS to the primary through both relays and
/// verifies the primary's certificate against the CA this server was started with, for the
/// name `MASTER_HOST` (its own egress address: every database certificate names every
/// database host's address, see `pki::DB_SERVICE_NAME`). Leaves `read_only` as it is (ON
/// on every server but the primary).
///
/// Errors: [`DbError::Mysql`] or [`DbError::Timeout`] from a statement;
/// [`DbError::Config`] when the server runs without `ssl_ca` (no plain replication).
///
/// The node (after a start or restart) and the failover controller (repointing replicas)
/// may both run this against one server at once; the whole sequence holds the server's
/// named lock [`POINT_LOCK`] (`GET_LOCK`, MariaDB KB "GET_LOCK"), so one `CHANGE MASTER
/// TO` never lands between the other's `STOP SLAVE` and `START SLAVE` (error 1198).
pub(crate) async fn point_at_primary(
    host: &str,
    admin: &mut Conn,
    own_address: IpAddr,
    egress_port: u16,
    creds: &Credentials,
) -> Result<(), DbError> {
    let sql = format!(
        "SELECT GET_LOCK('{POINT_LOCK}', {})",
        ADMIN_TIMEOUT.as_secs()
    );
    let got: Option<Option<i64>> = tokio::time::timeout(
        ADMIN_TIMEOUT + std::time::Duration::from_secs(1),
        admin.query_first(sql),
    )
    .await
    .map_err(|_| DbError::Timeout {
        what: format!("waiting for the replication set-up lock on {host}"),
        seconds: ADMIN_TIMEOUT.as_secs(),
    })?
    .map_err(|e| DbError::mysql(host, e))?;
    if got.flatten() != Some(1) {
        return Err(DbError::Timeout {
            what: format!("waiting for the replication set-up lock on {host}"),
            seconds: ADMIN_TIMEOUT.as_secs(),
        });
    }
    let result = point_at_primary_locked(host, admin, own_address, egress_port, creds).await;
    let _ = admin_exec(host, admin, &format!("DO RELEASE_LOCK('{POINT_LOCK}')")).await;
    result
}

/// The name of the lock [`point_at_primary`] holds on the server it sets up.
pub(crate) const POINT_LOCK: &str = "rampart_point_at_primary";

async fn point_at_primary_locked(
    host: &str,
    admin: &mut Conn,
    own_address: IpAddr,
    egress_port: u16,
    creds: &Credentials,
) -> Result<(), DbError> {
    // STOP SLAVE fails harmlessly on a server that never replicated.
    let _ = admin_exec(host, admin, "STOP SLAVE").await;
    let pos: Option<(String, String, Option<String>)> = tokio::time::timeout(
        ADMIN_TIMEOUT,
        admin.query_first("SELECT @@gtid_binlog_pos, @@gtid_slave_pos, @@ssl_ca"),
    )
    .await
    .map_err(|_| DbError::Timeout {
        what: format!("reading GTID positions on {host}"),
        seconds: ADMIN_TIMEOUT.as_secs(),
    })?
    .map_err(|e| DbError::mysql(host, e))?;
    // The replica verifies its primary against the CA its own server was started with.
    let ca = pos
        .as_ref()
        .and_then(|(_, _, ca)| ca.clone())
        .filter(|ca| !ca.is_empty() && !ca.contains('\''))
        .ok_or_else(|| {
            DbError::Config(format!(
                "{host}: the server has no usable ssl_ca; replication without TLS is refused"
            ))
        })?;
    if let Some((binlog, slave, _)) = pos {
        let (b, s) = (
            GtidPos::parse(&binlog).unwrap_or_default(),
            GtidPos::parse(&slave).unwrap_or_default(),
        );
        if b != s && b.contains(&s) {
            admin_exec(host, admin, "SET GLOBAL gtid_slave_pos = @@gtid_binlog_pos").await?;
            tracing::info!(host, gtid = %binlog, "former primary: replicating from its own binary log position");
        }
    }
    let change = format!(
        "CHANGE MASTER TO MASTER_HOST='{own_address}', MASTER_PORT={egress_port}, \
         MASTER_USER='{user}', MASTER_PASSWORD='{pw}', \
         MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1, MASTER_HEARTBEAT_PERIOD=0.5, \
         MASTER_SSL=1, MASTER_SSL_CA='{ca}', MASTER_SSL_VERIFY_SERVER_CERT=1",
        user = creds.repl_user,
        pw = creds.repl_password,
    );
    admin_exec(host, admin, &change).await?;
    admin_exec(host, admin, "START SLAVE").await?;
    Ok(())
}

/// Makes the server behind `admin` the writable primary: replication stopped and forgotten
/// (`STOP SLAVE`, `RESET SLAVE ALL`), the semi-synchronous master side on or off
/// (`semi_sync`: on when a replica is there to acknowledge, else commits would stall for
/// `rpl_semi_sync_master_timeout`), then `read_only = OFF` — last, so it takes no write
/// before the rest is done. The caller fences any other primary first.
///
/// Errors: [`DbError::Mysql`] or [`DbError::Timeout`] from a statement.
pub(crate) async fn make_writable(
    host: &str,
    admin: &mut Conn,
    semi_sync: bool,
) -> Result<(), DbError> {
    let _ = admin_exec(host, admin, "STOP SLAVE").await;
    admin_exec(host, admin, "RESET SLAVE ALL").await?;
    let on = if semi_sync { "ON" } else { "OFF" };
    admin_exec(
        host,
        admin,
        &format!("SET GLOBAL rpl_semi_sync_master_enabled = {on}"),
    )
    .await?;
    admin_exec(host, admin, "SET GLOBAL read_only = OFF").await
}

/// After `mariadbd` restarted on its own (it comes back read-only): when `cluster.json`
/// names another primary the server is pointed at it; when it names this node, the server
/// stays read-only until the controller decides (it may have promoted a replica meanwhile).
pub(super) async fn after_restart(r: &Restart) {
    let primary = match ClusterState::load(&r.cfg.state_dir) {
        Ok(Some(s)) => s.primary,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(host = %r.cfg.host, "after a restart: {e}");
            return;
        }
    };
    if primary == r.cfg.host {
        tracing::warn!(host = %r.cfg.host, "restarted read-only; the failover controller decides who takes writes");
        return;
    }
    let conn = tokio::time::timeout(ADMIN_TIMEOUT, Conn::new(r.admin.clone())).await;
    match conn {
        Ok(Ok(mut c)) => match point_at_primary(
            &r.cfg.host,
            &mut c,
            r.cfg.net.address(),
            r.cfg.egress_port,
            &r.creds,
        )
        .await
        {
            Ok(()) => tracing::info!(host = %r.cfg.host, %primary, "replication resumed"),
            Err(e) => tracing::warn!(host = %r.cfg.host, "replication after a restart: {e}"),
        },
        Ok(Err(e)) => tracing::warn!(host = %r.cfg.host, "admin connection after a restart: {e}"),
        Err(_) => tracing::warn!(host = %r.cfg.host, "admin connection after a restart timed out"),
    }
}
