//! GTID replication of a replica from the primary.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use mysql_async::Conn;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use topology::Service;

use super::bootstrap::admin_exec;
use super::process::Restart;
use super::{ServerConfig, ADMIN_TIMEOUT};
use crate::{Credentials, DbError};

/// Opens the replica's replication egress (`ports.mysql_egress` on its own address,
/// forwarding to the primary's relay) and points replication at it: `CHANGE MASTER TO
/// MASTER_HOST=<own address>, MASTER_PORT=<egress>, MASTER_USE_GTID=slave_pos,
/// MASTER_CONNECT_RETRY=1` and `START SLAVE` (MariaDB KB: "CHANGE MASTER TO").
///
/// Errors: [`DbError::Io`] when the egress cannot be bound, [`DbError::Mysql`] or
/// [`DbError::Timeout`] from the statements.
pub(super) async fn start_replica(
    cfg: &ServerConfig,
    creds: &Credentials,
    admin: &mut Conn,
    primary_host: &str,
    primary_addr: SocketAddr,
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
    let target = firewall::Target::Tcp {
        net: cfg.net.clone(),
        to: primary_addr,
    };
    let task = tokio::spawn(firewall::relay(listener, target, stop.clone()));
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
    let _ = admin_exec(&cfg.host, admin, "STOP SLAVE").await;
    admin_exec(&cfg.host, admin, &change).await?;
    admin_exec(&cfg.host, admin, "START SLAVE").await?;
    tracing::info!(host = %cfg.host, primary = %primary_host, "replication started");
    Ok((task, filter))
}

/// A restarted replica (its option file has `skip-slave-start`) starts replicating again
/// from its saved GTID position and connection settings (`START SLAVE`).
pub(super) async fn resume_replication(r: &Restart) {
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
