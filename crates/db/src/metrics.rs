//! The data tier's series for the node's registry (read at each scrape, so the agent's
//! `/metrics` and its push carry them like every other role's):
//!
//! per database node: `rampart_db_queries_total` (`Questions`), `rampart_db_connections`
//! (`Threads_connected`), `rampart_db_replication_lag_seconds` (heartbeat age),
//! `rampart_db_replica_io_running`, `rampart_db_replica_sql_running`,
//! `rampart_db_replication_tls_verified`, `rampart_db_clients_require_tls`,
//! `rampart_db_semi_sync_master_status`, `rampart_db_read_only`; on the controller's host:
//! `rampart_db_failovers_total` and `rampart_db_primary_epoch`. A server that does not
//! answer exposes none of its series (their absence is what an absence rule sees).

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::controller::ControllerStatus;
use crate::{Controller, DbNodeStatus, DbServer};

/// Registers `server`'s series in `registry`.
pub fn register_server_metrics(registry: &mut Registry, server: &DbServer) {
    registry.register_collector(Box::new(ServerSeries(server.status_cell())));
}

/// Registers the controller's series in `registry`.
pub fn register_controller_metrics(registry: &mut Registry, controller: &Controller) {
    registry.register_collector(Box::new(ControllerSeries(controller.status_cell())));
}

#[derive(Debug)]
struct ServerSeries(Arc<Mutex<DbNodeStatus>>);

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

impl Collector for ServerSeries {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(o) = s.observed else { return Ok(()) };
        counter(
            &mut enc,
            "rampart_db_queries",
            "Statements received by the server (Questions).",
            o.queries,
        )?;
        gauge(
            &mut enc,
            "rampart_db_connections",
            "Open client connections (Threads_connected).",
            o.connections as f64,
        )?;
        if o.replicating {
            if let Some(lag) = s.lag_seconds {
                gauge(
                    &mut enc,
                    "rampart_db_replication_lag_seconds",
                    "Age of the newest primary heartbeat applied, seconds.",
                    lag,
                )?;
            }
            gauge(
                &mut enc,
                "rampart_db_replica_io_running",
                "1 while the replica's IO thread receives from the primary.",
                flag(o.io_running),
            )?;
            gauge(
                &mut enc,
                "rampart_db_replica_sql_running",
                "1 while the replica's SQL thread applies.",
                flag(o.sql_running),
            )?;
            gauge(
                &mut enc,
                "rampart_db_replication_tls_verified",
                "1 when the replica's link to its primary is TLS with the primary's certificate verified (Master_SSL_Allowed, Master_SSL_Verify_Server_Cert).",
                flag(o.replication_tls && o.replication_tls_verified),
            )?;
        }
        gauge(
            &mut enc,
            "rampart_db_clients_require_tls",
            "1 when the server offers TLS and no account but root (socket only) may log in without it.",
            flag(o.clients_require_tls()),
        )?;
        gauge(
            &mut enc,
            "rampart_db_semi_sync_master_status",
            "1 while commits wait for a replica's acknowledgement; 0 when semi-sync is off or fell back to asynchronous.",
            flag(o.semi_sync_master_enabled && o.semi_sync_master_status),
        )?;
        gauge(
            &mut enc,
            "rampart_db_read_only",
            "1 when the server refuses writes (read_only=ON).",
            flag(o.read_only),
        )
    }
}

#[derive(Debug)]
struct ControllerSeries(Arc<Mutex<ControllerStatus>>);

impl Collector for ControllerSeries {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        counter(
            &mut enc,
            "rampart_db_failovers",
            "Changes of database primary since the cluster was created.",
            s.failovers,
        )?;
        gauge(
            &mut enc,
            "rampart_db_primary_epoch",
            "Epoch of the published database primary (cluster.json).",
            s.epoch as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::NodeObservation;

    #[test]
    fn series_of_a_replica_and_the_controller() {
        let status = DbNodeStatus {
            host: "web-02".into(),
            role: "replica".into(),
            engine: "mariadb".into(),
            pid: Some(1),
            port: 3306,
            socket: None,
            lag_seconds: Some(0.25),
            healthy: true,
            restarts: 0,
            observed: Some(NodeObservation {
                read_only: true,
                replicating: true,
                io_running: true,
                sql_running: false,
                tls_enabled: true,
                replication_tls: true,
                replication_tls_verified: true,
                queries: 42,
                connections: 3,
                ..NodeObservation::default()
            }),
            relay_tls_cipher: None,
        };
        let mut r = Registry::default();
        r.register_collector(Box::new(ServerSeries(Arc::new(Mutex::new(status)))));
        r.register_collector(Box::new(ControllerSeries(Arc::new(Mutex::new(
            ControllerStatus {
                epoch: 3,
                failovers: 2,
                ..ControllerStatus::default()
            },
        )))));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for line in [
            "rampart_db_queries_total 42",
            "rampart_db_connections 3.0",
            "rampart_db_replication_lag_seconds 0.25",
            "rampart_db_replica_io_running 1.0",
            "rampart_db_replica_sql_running 0.0",
            "rampart_db_replication_tls_verified 1.0",
            "rampart_db_clients_require_tls 1.0",
            "rampart_db_semi_sync_master_status 0.0",
            "rampart_db_read_only 1.0",
            "rampart_db_failovers_total 2",
            "rampart_db_primary_epoch 3.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
