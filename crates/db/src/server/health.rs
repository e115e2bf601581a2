//! The periodic health check and replication lag.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row};

use super::{lock, DbNodeStatus, NodeRole, ADMIN_TIMEOUT};

/// Period of the health check.
const HEALTH_PERIOD: Duration = Duration::from_secs(1);

pub(super) async fn health_loop(
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
