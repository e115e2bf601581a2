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
    /// The TLS cipher of the observing connection (`null`: not TLS).
    tls: Option<String>,
    restarts: u64,
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
            tls: o
                .as_ref()
                .map(|o| o.ssl_cipher.clone())
                .filter(|c| !c.is_empty()),
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
                    n.tls.as_deref().unwrap_or("off"),
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
