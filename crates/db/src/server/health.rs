//! The periodic observation of the server (published in the node's status) and the
//! heartbeat the writable primary writes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};

use super::{lock, DbNodeStatus, ADMIN_TIMEOUT};
use crate::egress::LocalEgress;
use crate::observe::{observe, HEARTBEAT_PERIOD, HEARTBEAT_TABLE};

/// Period of the observation.
const HEALTH_PERIOD: Duration = Duration::from_millis(500);

/// Observes the server every [`HEALTH_PERIOD`] and publishes the result in `status`:
/// `observed`, the role it plays now (`primary` when writable and not replicating, else
/// `replica`), `lag_seconds` (heartbeat age on a replica) and `healthy` (a writable
/// primary, or a replica whose two replication threads run).
pub(super) async fn health_loop(
    first: Conn,
    opts: OptsBuilder,
    database: String,
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
        let (obs, keep) = match c {
            None => (None, None),
            Some(mut c) => match observe(&mut c, &database).await {
                Ok(o) => (Some(o), Some(c)),
                Err(e) => {
                    tracing::debug!(error = %e, "observation failed");
                    (None, None)
                }
            },
        };
        conn = keep;
        let mut s = lock(&status);
        match obs {
            Some(o) => {
                let primary = !o.read_only && !o.replicating;
                s.role = if primary { "primary" } else { "replica" }.into();
                s.healthy = primary || (o.io_running && o.sql_running);
                s.lag_seconds = if o.replicating {
                    o.heartbeat_age_seconds
                } else {
                    None
                };
                s.observed = Some(o);
            }
            None => {
                s.healthy = false;
                s.lag_seconds = None;
                s.observed = None;
            }
        }
    }
}

/// Writes the heartbeat row every [`HEARTBEAT_PERIOD`] with the application account
/// (`opts`, TCP with TLS through `egress`, which lives as long as the loop). On a read-only
/// server the write fails (error 1290) and nothing happens: only the writable primary's
/// heartbeats exist, and replicas measure their lag by them.
///
/// Each new connection reads its `Ssl_cipher` into `status.relay_tls_cipher` (`None`
/// while not connected).
pub(super) async fn heartbeat_loop(
    _egress: LocalEgress,
    opts: OptsBuilder,
    database: String,
    status: Arc<Mutex<DbNodeStatus>>,
) {
    let sql = format!(
        "INSERT INTO `{database}`.{HEARTBEAT_TABLE} (id, server_id, ts) \
         VALUES (1, @@server_id, NOW(6)) \
         ON DUPLICATE KEY UPDATE server_id = VALUES(server_id), ts = VALUES(ts)"
    );
    let mut conn: Option<Conn> = None;
    let mut tick = tokio::time::interval(HEARTBEAT_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut c = match conn.take() {
            Some(c) => c,
            None => match tokio::time::timeout(ADMIN_TIMEOUT, Conn::new(opts.clone())).await {
                Ok(Ok(mut c)) => {
                    let cipher: Option<(String, String)> = tokio::time::timeout(
                        ADMIN_TIMEOUT,
                        c.query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'"),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                    lock(&status).relay_tls_cipher =
                        cipher.map(|(_, v)| v).filter(|v| !v.is_empty());
                    c
                }
                _ => {
                    lock(&status).relay_tls_cipher = None;
                    continue;
                }
            },
        };
        // A write waiting for a semi-synchronous acknowledgement may take up to
        // `rpl_semi_sync_master_timeout`.
        match tokio::time::timeout(Duration::from_secs(10), c.query_drop(&sql)).await {
            Ok(Ok(())) => conn = Some(c),
            // Read-only (1290) or no grant yet (1142): keep the connection.
            Ok(Err(mysql_async::Error::Server(_))) => conn = Some(c),
            _ => {}
        }
    }
}

/// How often the certificate files are looked at for a change.
const CERT_CHECK_PERIOD: Duration = Duration::from_secs(5);

/// The modification times of `files` (`None` for one that cannot be read).
fn mtimes(files: &[std::path::PathBuf]) -> Vec<Option<std::time::SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

/// Makes the running server load its TLS files again after they changed on disk (the lab's
/// PKI reissues a certificate 30 days before it expires, or when its names change): every
/// [`CERT_CHECK_PERIOD`] compares the files' modification times with the last ones seen
/// and, on a change, runs `FLUSH SSL` as root (MariaDB KB: "FLUSH": reloads `ssl_cert`,
/// `ssl_key`, `ssl_ca` for new connections; established ones keep theirs). A failed
/// `FLUSH SSL` is logged and tried again at the next period; a restarted `mariadbd` reads
/// the files anyway.
pub(super) async fn cert_reload_loop(
    host: String,
    admin: OptsBuilder,
    files: Vec<std::path::PathBuf>,
) {
    let mut seen = {
        let files = files.clone();
        tokio::task::spawn_blocking(move || mtimes(&files))
            .await
            .unwrap_or_default()
    };
    let mut tick = tokio::time::interval(CERT_CHECK_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = {
            let files = files.clone();
            match tokio::task::spawn_blocking(move || mtimes(&files)).await {
                Ok(m) => m,
                Err(_) => continue,
            }
        };
        if now == seen || now.iter().any(Option::is_none) {
            continue;
        }
        let flushed = async {
            let mut c = tokio::time::timeout(ADMIN_TIMEOUT, Conn::new(admin.clone()))
                .await
                .map_err(|_| "connection timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let r = tokio::time::timeout(ADMIN_TIMEOUT, c.query_drop("FLUSH SSL"))
                .await
                .map_err(|_| "FLUSH SSL timed out".to_string())?
                .map_err(|e| e.to_string());
            let _ = c.disconnect().await;
            r
        };
        match flushed.await {
            Ok(()) => {
                tracing::info!(%host, "TLS certificate files changed: reloaded (FLUSH SSL)");
                seen = now;
            }
            Err(e) => tracing::warn!(%host, "TLS certificate files changed, FLUSH SSL failed: {e}"),
        }
    }
}
