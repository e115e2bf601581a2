#![allow(clippy::unwrap_used, missing_docs)]
//! Failover and switchover against real `mariadbd` servers under a steady write load: the
//! primary's `mariadbd` SIGKILLed (automatic failover by the controller) and a planned
//! switchover. Every acknowledged write is recorded and looked for on the new primary; the
//! read-only flag of every server is polled throughout so that two writable servers at
//! once would be seen. Also: reads routed by replica lag, read-your-writes.
//! Skipped (with `SKIP:`) when `mariadbd` is not installed.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use db::{
    connect_client, start_controller, start_server, switchover, ClientConfig, ClusterState,
    ControllerConfig, Credentials, DbClient, DbServer, Engine, ServerConfig,
};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use topology::Topology;

mod common;
use common::{eventually, pair_topology, root_opts, skip, Reaper, HOSTS};

struct Lab {
    t: Topology,
    _dir: tempfile::TempDir,
    state: std::path::PathBuf,
    servers: Vec<DbServer>,
}

async fn lab(net: &str, port: u16) -> Lab {
    let t = pair_topology(net, port, true);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_path_buf();
    Credentials::ensure(&state).unwrap();
    pki::ensure(&db::pki_dir(&state), &t).unwrap();
    let cfg = |h| {
        ServerConfig::from_topology(&t, h, &state, test_support::net(&t, h), Engine::Mariadb)
            .unwrap()
    };
    let (p, r) = tokio::join!(start_server(cfg("web-01")), start_server(cfg("web-02")));
    Lab {
        servers: vec![p.unwrap(), r.unwrap()],
        t,
        state,
        _dir: dir,
    }
}

/// The lab's failover controller as a node runs it: on mon-01, probing and fencing over the
/// network through each database host's relay (loopback mode: fencing by `SIGKILL`).
fn controller_config(l: &Lab) -> ControllerConfig {
    let mut c = ControllerConfig::from_topology(&l.t, &l.state).unwrap();
    c.net = Some(test_support::net(&l.t, "mon-01"));
    c
}

/// Starts the controller and waits until the primary runs semi-synchronous replication
/// with a healthy replica (a failover before that is refused as unsafe).
async fn controller_with_semi_sync(l: &Lab, cfg: ControllerConfig) -> db::Controller {
    let controller = start_controller(cfg).await.unwrap();
    eventually("semi-synchronous replication on", 60, || async {
        (controller.status().semi_sync_ok && l.servers[1].status().healthy).then_some(())
    })
    .await;
    controller
}

async fn client(l: &Lab, host: &str) -> DbClient {
    let cfg = ClientConfig::from_topology(
        &l.t,
        host,
        &l.state,
        test_support::net(&l.t, host),
        Engine::Mariadb,
    )
    .unwrap();
    connect_client(cfg).await.unwrap()
}

/// What the write load saw.
#[derive(Default)]
struct Load {
    /// Acknowledged writes: id → text.
    acked: Mutex<BTreeMap<u64, String>>,
    failed: AtomicU64,
    stop: AtomicBool,
}

/// Writes one message every 10 ms until stopped (at most 60 s), recording every
/// acknowledged one.
fn write_load(app: DbClient, load: Arc<Load>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut n = 0u64;
        while !load.stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
            n += 1;
            let text = format!("w{n}");
            match app.insert_message("load", &text).await {
                Ok(m) => {
                    assert_eq!(m.text, text);
                    let before = load.acked.lock().unwrap().insert(m.id, text);
                    assert!(before.is_none(), "id {} acknowledged twice", m.id);
                }
                Err(_) => {
                    load.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Polls `@@read_only` on every server every 20 ms until stopped (at most 60 s); returns
/// how many polls saw more than one writable server.
fn poll_writable(state: &Path, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let opts: Vec<OptsBuilder> = HOSTS.iter().map(|h| root_opts(state, h)).collect();
    tokio::spawn(async move {
        let mut conns: Vec<Option<Conn>> = HOSTS.iter().map(|_| None).collect();
        let mut both = 0;
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
            let mut writable = 0;
            for (i, o) in opts.iter().enumerate() {
                if conns[i].is_none() {
                    conns[i] =
                        tokio::time::timeout(Duration::from_millis(500), Conn::new(o.clone()))
                            .await
                            .ok()
                            .and_then(Result::ok);
                }
                let Some(c) = conns[i].as_mut() else { continue };
                let r = tokio::time::timeout(
                    Duration::from_millis(500),
                    c.query_first::<u8, _>("SELECT @@read_only"),
                )
                .await;
                match r {
                    Ok(Ok(Some(0))) => writable += 1,
                    Ok(Ok(_)) => {}
                    _ => conns[i] = None,
                }
            }
            if writable > 1 {
                both += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        both
    })
}

/// Every acknowledged write is on `host`'s server with its own text, and no text is there
/// twice.
async fn check_nothing_lost(state: &Path, host: &str, load: &Load) {
    let mut c = Conn::new(root_opts(state, host)).await.unwrap();
    let rows: Vec<(u64, String)> = c
        .query("SELECT id, `text` FROM foobar.guestbook")
        .await
        .unwrap();
    let table: BTreeMap<u64, String> = rows.iter().cloned().collect();
    let mut texts = HashSet::new();
    for (_, text) in &rows {
        assert!(texts.insert(text.clone()), "{text} stored twice on {host}");
    }
    let acked = load.acked.lock().unwrap();
    let lost: Vec<_> = acked
        .iter()
        .filter(|(id, text)| table.get(id) != Some(text))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes missing on {host}: {lost:?}"
    );
}

/// Sends `signal` to web-01's `mariadbd` (the primary); returns its pid.
fn signal_primary(l: &Lab, signal: nix::sys::signal::Signal) -> i32 {
    let pid = l.servers[0].status().pid.unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    pid
}

/// Waits until `cluster.json` names web-02 the primary of epoch 2.
async fn web_02_promoted(l: &Lab) {
    eventually("web-02 promoted", 60, || async {
        let s = ClusterState::load(&l.state).ok()??;
        (s.primary == "web-02" && s.epoch == 2).then_some(())
    })
    .await;
}

/// Waits until web-01 is back as a read-only replica, both replication threads running.
async fn web_01_rejoined(l: &Lab) {
    eventually("web-01 rejoined as a replica", 90, || async {
        let o = l.servers[0].status().observed?;
        (o.read_only && o.io_running && o.sql_running).then_some(())
    })
    .await;
}

async fn wait_acked(load: &Load, at_least: usize) {
    eventually("acknowledged writes", 60, || async {
        (load.acked.lock().unwrap().len() >= at_least).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_primary_fails_over_without_losing_a_write() {
    if skip("db=info") {
        return;
    }
    let l = lab("127.110.1", 23406).await;
    let _reaper = Reaper(&l.state);
    let ccfg = controller_config(&l);
    let controller = controller_with_semi_sync(&l, ccfg).await;
    let app = client(&l, "web-02").await;

    let load = Arc::new(Load::default());
    let stop_poll = Arc::new(AtomicBool::new(false));
    let poller = poll_writable(&l.state, stop_poll.clone());
    let writer = write_load(app.clone(), load.clone());
    wait_acked(&load, 30).await;

    // SIGKILL the primary's mariadbd.
    signal_primary(&l, nix::sys::signal::Signal::SIGKILL);
    let acked_at_kill = load.acked.lock().unwrap().len();
    web_02_promoted(&l).await;
    // Writes resume on the new primary.
    wait_acked(&load, acked_at_kill + 30).await;
    // The old primary comes back by itself as a read-only replica of the new one.
    web_01_rejoined(&l).await;
    load.stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    stop_poll.store(true, Ordering::Relaxed);
    let two_writable = poller.await.unwrap();
    assert_eq!(two_writable, 0, "two servers were writable at once");
    assert!(
        load.failed.load(Ordering::Relaxed) > 0,
        "the kill was never seen by a writer"
    );

    check_nothing_lost(&l.state, "web-02", &load).await;
    // No errant transactions: the rejoined server catches up with everything.
    let st = controller.status();
    assert!(st.errant.is_empty(), "{st:?}");
    assert_eq!(
        (st.epoch, st.primary.as_str(), st.failovers),
        (2, "web-02", 1)
    );
    let last = *load.acked.lock().unwrap().keys().last().unwrap();
    eventually("web-01 has every acknowledged write", 30, || async {
        let mut c = Conn::new(root_opts(&l.state, "web-01")).await.ok()?;
        let max: Option<u64> = c
            .query_first("SELECT MAX(id) FROM foobar.guestbook")
            .await
            .ok()?;
        (max? >= last).then_some(())
    })
    .await;
    check_nothing_lost(&l.state, "web-01", &load).await;

    controller.stop().await;
    drop(app);
    for s in &l.servers {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_loses_nothing_and_reads_follow_lag() {
    if skip("db=info") {
        return;
    }
    let l = lab("127.110.2", 23416).await;
    let _reaper = Reaper(&l.state);
    let ccfg = controller_config(&l);
    let controller = start_controller(ccfg.clone()).await.unwrap();
    let app = client(&l, "web-01").await;
    eventually("semi-synchronous replication on", 60, || async {
        (controller.status().semi_sync_ok && l.servers[1].status().healthy).then_some(())
    })
    .await;

    // Reads go to the replica while its lag is under 1 s, and read the client's own
    // write at once (MASTER_GTID_WAIT on the write's GTID).
    eventually("reads on web-02", 30, || async {
        (app.info().await.ok()?.read_node == "web-02").then_some(())
    })
    .await;
    let m = app.insert_message("ann", "mine").await.unwrap();
    assert_eq!(app.list_messages(1).await.unwrap(), vec![m.clone()]);
    // A replica whose SQL thread stopped falls behind the heartbeat: reads leave it.
    let mut r = Conn::new(root_opts(&l.state, "web-02")).await.unwrap();
    r.query_drop("STOP SLAVE SQL_THREAD").await.unwrap();
    eventually("reads on the primary while web-02 lags", 30, || async {
        (app.info().await.ok()?.read_node == "web-01").then_some(())
    })
    .await;
    let m2 = app.insert_message("ann", "while lagging").await.unwrap();
    assert_eq!(app.list_messages(1).await.unwrap(), vec![m2.clone()]);
    r.query_drop("START SLAVE SQL_THREAD").await.unwrap();
    eventually("reads back on web-02", 30, || async {
        (app.info().await.ok()?.read_node == "web-02").then_some(())
    })
    .await;

    let load = Arc::new(Load::default());
    let stop_poll = Arc::new(AtomicBool::new(false));
    let poller = poll_writable(&l.state, stop_poll.clone());
    let writer = write_load(app.clone(), load.clone());
    wait_acked(&load, 20).await;
    let next = switchover(ccfg.clone(), Some("web-02".into()))
        .await
        .unwrap();
    assert_eq!((next.primary.as_str(), next.epoch), ("web-02", 2));
    let n = load.acked.lock().unwrap().len();
    wait_acked(&load, n + 20).await;
    // And back.
    let back = switchover(ccfg, None)
        .await
        .expect("switchover back to web-01");
    assert_eq!((back.primary.as_str(), back.epoch), ("web-01", 3));
    let n = load.acked.lock().unwrap().len();
    wait_acked(&load, n + 20).await;
    load.stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    stop_poll.store(true, Ordering::Relaxed);
    assert_eq!(
        poller.await.unwrap(),
        0,
        "two servers were writable at once"
    );
    check_nothing_lost(&l.state, "web-01", &load).await;
    eventually("web-02 replicating from web-01", 30, || async {
        let o = l.servers[1].status().observed?;
        (o.read_only && o.io_running && o.sql_running).then_some(())
    })
    .await;
    assert!(controller.status().errant.is_empty());

    controller.stop().await;
    drop(app);
    for s in &l.servers {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_from_the_replica_then_restore_round_trips() {
    if skip("db=info") {
        return;
    }
    let l = lab("127.110.3", 23426).await;
    let _reaper = Reaper(&l.state);
    let app = client(&l, "web-01").await;
    let kept = app.insert_message("ann", "kept").await.unwrap();
    eventually("replicated", 30, || async {
        let mut c = Conn::new(root_opts(&l.state, "web-02")).await.ok()?;
        let n: Option<u64> = c
            .exec_first(
                "SELECT COUNT(*) FROM foobar.guestbook WHERE id = ?",
                (kept.id,),
            )
            .await
            .ok()?;
        (n? == 1).then_some(())
    })
    .await;
    let state = l.state.clone();
    let file = tokio::task::spawn_blocking(move || db::backup(&state, "foobar"))
        .await
        .unwrap()
        .unwrap();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("foobar-web-02-") && name.ends_with(".sql.gz"),
        "{name}"
    );
    assert!(file.starts_with(db::backups_dir(&l.state)));
    // The data, without the servers' heartbeat row: restoring that raced its writer.
    let dump = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains("guestbook"), "{text}");
    assert!(!text.contains(db::HEARTBEAT_TABLE), "{text}");
    let later = app.insert_message("bob", "after the backup").await.unwrap();
    assert_eq!(
        app.list_messages(10).await.unwrap(),
        vec![later, kept.clone()]
    );
    let (state, f) = (l.state.clone(), file.clone());
    tokio::task::spawn_blocking(move || db::restore(&state, &f))
        .await
        .unwrap()
        .unwrap();
    // The primary holds what the backup held, and the replica receives the restore.
    let mut c = Conn::new(root_opts(&l.state, "web-01")).await.unwrap();
    let rows: Vec<(u64, String)> = c
        .query("SELECT id, `text` FROM foobar.guestbook")
        .await
        .unwrap();
    assert_eq!(rows, vec![(kept.id, "kept".to_string())]);
    eventually("restore replicated", 30, || async {
        let mut c = Conn::new(root_opts(&l.state, "web-02")).await.ok()?;
        let rows: Vec<(u64, String)> = c
            .query("SELECT id, `text` FROM foobar.guestbook")
            .await
            .ok()?;
        (rows == vec![(kept.id, "kept".to_string())]).then_some(())
    })
    .await;
    drop(app);
    for s in &l.servers {
        s.stop().await;
    }
}

/// A primary that hangs (SIGSTOP: alive, holding its connections, answering nothing) is
/// fenced by SIGKILL in loopback mode: it is the process last seen writable. Its node
/// restarts it read-only and it rejoins as a replica of the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_is_killed_to_fence_it() {
    if skip("db=info") {
        return;
    }
    let l = lab("127.110.4", 23436).await;
    let _reaper = Reaper(&l.state);
    let controller = controller_with_semi_sync(&l, controller_config(&l)).await;
    let pid = signal_primary(&l, nix::sys::signal::Signal::SIGSTOP);
    web_02_promoted(&l).await;
    // cluster.json is written before the promotion ends; the controller's report after.
    let last = eventually("the failover reported", 30, || async {
        controller.status().last_failover
    })
    .await;
    assert!(last.contains("unreachable, stopped"), "{last}");
    eventually("the hung process killed", 30, || async {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        // Gone, or a zombie until its parent reaps it.
        state
            .is_none_or(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .then_some(())
    })
    .await;
    web_01_rejoined(&l).await;
    controller.stop().await;
    for s in &l.servers {
        s.stop().await;
    }
}
