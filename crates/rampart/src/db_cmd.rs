//! `rampart db status|switchover|failover`: the database tier of the running lab.

use anyhow::Context;
use clap::Subcommand;
use lab::StateDir;
use serde::Serialize;
use topology::{Role, Topology};

#[derive(Subcommand)]
pub enum DbCmd {
    /// Per database node: role, read_only, GTID positions, replication threads, lag,
    /// semi-synchronous state, TLS; and the controller's epoch, primary and failovers.
    Status {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Planned change of primary: the primary goes read-only, the target catches up with
    /// it, is promoted and the others follow it. Writes pause briefly; none is lost.
    Switchover {
        /// The replica to promote (default: the most advanced).
        #[arg(long)]
        to: Option<String>,
    },
    /// Promote the most advanced replica now, fencing the primary. Refused when the
    /// primary's semi-synchronous replication had fallen back to asynchronous.
    Failover {
        /// Promote even then (acknowledged writes may be lost).
        #[arg(long)]
        force: bool,
    },
    /// Logical dump of the application's database from a replica (`mariadb-dump
    /// --single-transaction --gtid`), gzip-compressed into a dated file under
    /// `<state>/backups/`; prints its path.
    Backup,
    /// Replay a dump made by `backup` into the primary (the replicas receive it too); its
    /// tables replace the current ones.
    Restore {
        /// The `.sql.gz` file.
        file: std::path::PathBuf,
    },
}

/// One node in `rampart db status --json`.
#[derive(Serialize)]
struct NodeRow {
    host: String,
    /// `primary` or `replica` as the server behaves now; `down` when it does not answer.
    role: String,
    reachable: bool,
    read_only: Option<bool>,
    gtid_current_pos: Option<String>,
    gtid_binlog_pos: Option<String>,
    gtid_slave_pos: Option<String>,
    io_running: Option<bool>,
    sql_running: Option<bool>,
    lag_seconds: Option<f64>,
    semi_sync_master_enabled: Option<bool>,
    semi_sync_master_status: Option<bool>,
    /// TLS on the node's links; `null` when the node does not answer.
    tls: Option<TlsRow>,
    restarts: u64,
}

/// TLS of one database node, as its server reports it.
#[derive(Serialize, Debug, PartialEq)]
struct TlsRow {
    /// The server offers TLS (`@@have_ssl`) and no account but `root` (reached over the
    /// node's Unix socket) may log in without it (`REQUIRE SSL`).
    clients_required: bool,
    /// Accounts that may log in without TLS, `root` aside.
    plain_accounts: Vec<String>,
    /// The cipher the server reports for the node's own application-account connection
    /// through its relay (the same path as the application's); `null` until connected.
    relay_cipher: Option<String>,
    /// This replica's link to its primary: `verified` (TLS, the primary's certificate
    /// checked against the lab CA and `MASTER_HOST`), `unverified` (TLS only) or `plain`;
    /// `null` on a node that does not replicate.
    replication: Option<&'static str>,
}

fn tls_row(d: &db::DbNodeStatus) -> Option<TlsRow> {
    let o = d.observed.as_ref()?;
    Some(TlsRow {
        clients_required: o.clients_require_tls(),
        plain_accounts: o.plain_accounts.clone(),
        relay_cipher: d.relay_tls_cipher.clone(),
        replication: o.replicating.then_some(
            match (o.replication_tls, o.replication_tls_verified) {
                (true, true) => "verified",
                (true, false) => "unverified",
                (false, _) => "plain",
            },
        ),
    })
}

/// The table's TLS cell: clients (`required`, `OPEN:<accounts>` or `OFF`), the
/// replication link (`repl=<state>` on a replica) and the relay cipher.
fn tls_cell(t: Option<&TlsRow>) -> String {
    let Some(t) = t else {
        return "-".into();
    };
    let clients = if t.clients_required {
        "required".to_string()
    } else if t.plain_accounts.is_empty() {
        "OFF".to_string()
    } else {
        format!("OPEN:{}", t.plain_accounts.join(","))
    };
    let mut cell = clients;
    if let Some(r) = t.replication {
        let r = if r == "verified" {
            r.to_string()
        } else {
            r.to_uppercase()
        };
        cell.push_str(&format!(" repl={r}"));
    }
    cell.push(' ');
    cell.push_str(t.relay_cipher.as_deref().unwrap_or("-"));
    cell
}

#[derive(Serialize)]
struct DbStatus {
    epoch: Option<u64>,
    primary: Option<String>,
    failovers: Option<u64>,
    controller: Option<db::ControllerStatus>,
    nodes: Vec<NodeRow>,
}

fn read_node(state: &StateDir, host: &str) -> Option<lab::node::NodeStatus> {
    let bytes = std::fs::read(state.node_status_file(host)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn collect(state: &StateDir, t: &Topology) -> anyhow::Result<DbStatus> {
    let cluster = db::ClusterState::load(state.root())?;
    let controller = t
        .hosts_with(Role::Monitor)
        .find_map(|h| read_node(state, &h.name)?.db_controller);
    let mut nodes = Vec::new();
    for h in t
        .hosts
        .iter()
        .filter(|h| h.has(Role::DbPrimary) || h.has(Role::DbReplica))
    {
        let d = read_node(state, &h.name).and_then(|n| n.db);
        let o = d.as_ref().and_then(|d| d.observed.clone());
        nodes.push(NodeRow {
            host: h.name.clone(),
            role: match (&d, &o) {
                (Some(d), Some(_)) => d.role.clone(),
                _ => "down".into(),
            },
            reachable: o.is_some(),
            read_only: o.as_ref().map(|o| o.read_only),
            gtid_current_pos: o.as_ref().map(|o| o.gtid_current_pos.clone()),
            gtid_binlog_pos: o.as_ref().map(|o| o.gtid_binlog_pos.clone()),
            gtid_slave_pos: o.as_ref().map(|o| o.gtid_slave_pos.clone()),
            io_running: o.as_ref().filter(|o| o.replicating).map(|o| o.io_running),
            sql_running: o.as_ref().filter(|o| o.replicating).map(|o| o.sql_running),
            lag_seconds: d.as_ref().and_then(|d| d.lag_seconds),
            semi_sync_master_enabled: o.as_ref().map(|o| o.semi_sync_master_enabled),
            semi_sync_master_status: o.as_ref().map(|o| o.semi_sync_master_status),
            tls: d.as_ref().and_then(tls_row),
            restarts: d.map(|d| d.restarts).unwrap_or(0),
        });
    }
    Ok(DbStatus {
        epoch: cluster.as_ref().map(|c| c.epoch),
        primary: cluster.as_ref().map(|c| c.primary.clone()),
        failovers: cluster.as_ref().map(|c| c.failovers),
        controller,
        nodes,
    })
}

fn yes_no(b: Option<bool>) -> &'static str {
    match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

pub fn run(state: &StateDir, cmd: DbCmd) -> anyhow::Result<()> {
    let t = Topology::load(&state.topology_file())
        .with_context(|| format!("no running lab in {}", state.root().display()))?;
    let cfg = || {
        db::ControllerConfig::from_topology(&t, state.root())
            .context("the topology has no db-primary")
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cmd {
        DbCmd::Status { json } => {
            let s = collect(state, &t)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            println!(
                "epoch {}  primary {}  failovers {}",
                s.epoch.map_or("-".into(), |e| e.to_string()),
                s.primary.as_deref().unwrap_or("-"),
                s.failovers.map_or("-".into(), |e| e.to_string()),
            );
            if let Some(c) = &s.controller {
                if let Some(r) = &c.refused {
                    println!("failover refused: {r}");
                }
                if !c.errant.is_empty() {
                    println!("errant (kept out of replication): {}", c.errant.join(", "));
                }
                if !c.fenced.is_empty() {
                    println!(
                        "fenced (cut off at the firewall until read-only and replicating): {}",
                        c.fenced.join(", ")
                    );
                }
            }
            println!(
                "{:<8} {:<8} {:<4} {:<20} {:<20} {:<3} {:<3} {:>7} {:<9} TLS",
                "HOST",
                "ROLE",
                "RO",
                "GTID_CURRENT",
                "GTID_SLAVE",
                "IO",
                "SQL",
                "LAG_S",
                "SEMISYNC"
            );
            for n in &s.nodes {
                let semi = match (n.semi_sync_master_enabled, n.semi_sync_master_status) {
                    (Some(true), Some(true)) => "on",
                    (Some(true), Some(false)) => "FELL-BACK",
                    (Some(false), _) => "off",
                    _ => "-",
                };
                println!(
                    "{:<8} {:<8} {:<4} {:<20} {:<20} {:<3} {:<3} {:>7} {:<9} {}",
                    n.host,
                    n.role,
                    yes_no(n.read_only),
                    n.gtid_current_pos.as_deref().unwrap_or("-"),
                    n.gtid_slave_pos.as_deref().unwrap_or("-"),
                    yes_no(n.io_running),
                    yes_no(n.sql_running),
                    n.lag_seconds.map_or("-".into(), |l| format!("{l:.2}")),
                    semi,
                    tls_cell(n.tls.as_ref()),
                );
            }
            Ok(())
        }
        DbCmd::Switchover { to } => {
            let next = rt.block_on(db::switchover(cfg()?, to))?;
            println!("primary is now {} (epoch {})", next.primary, next.epoch);
            Ok(())
        }
        DbCmd::Backup => {
            let path = db::backup(state.root(), &t.database.name)?;
            println!("{}", path.display());
            Ok(())
        }
        DbCmd::Restore { file } => {
            db::restore(state.root(), &file)?;
            println!("restored {}", file.display());
            Ok(())
        }
        DbCmd::Failover { force } => {
            let next = rt.block_on(db::failover(cfg()?, force))?;
            println!("primary is now {} (epoch {})", next.primary, next.epoch);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(o: Option<db::NodeObservation>, cipher: Option<&str>) -> db::DbNodeStatus {
        db::DbNodeStatus {
            host: "web-02".into(),
            role: "replica".into(),
            engine: "mariadb".into(),
            pid: Some(1),
            port: 3306,
            socket: None,
            lag_seconds: None,
            healthy: true,
            restarts: 0,
            observed: o,
            relay_tls_cipher: cipher.map(str::to_string),
        }
    }

    #[test]
    fn tls_cell_says_what_the_server_reports() {
        let verified = db::NodeObservation {
            tls_enabled: true,
            replicating: true,
            replication_tls: true,
            replication_tls_verified: true,
            ..db::NodeObservation::default()
        };
        let row = tls_row(&node(
            Some(verified.clone()),
            Some("TLS_AES_256_GCM_SHA384"),
        ));
        assert_eq!(
            tls_cell(row.as_ref()),
            "required repl=verified TLS_AES_256_GCM_SHA384"
        );
        let open = db::NodeObservation {
            plain_accounts: vec!["rampart_app".into()],
            replicating: false,
            ..verified.clone()
        };
        assert_eq!(
            tls_cell(tls_row(&node(Some(open), None)).as_ref()),
            "OPEN:rampart_app -"
        );
        let plain = db::NodeObservation {
            tls_enabled: false,
            replication_tls: false,
            replication_tls_verified: false,
            ..verified
        };
        assert_eq!(
            tls_cell(tls_row(&node(Some(plain), None)).as_ref()),
            "OFF repl=PLAIN -"
        );
        assert_eq!(tls_cell(tls_row(&node(None, None)).as_ref()), "-");
    }
}
