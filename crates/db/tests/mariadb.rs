#![allow(clippy::unwrap_used, missing_docs)]
//! The MariaDB engine against real `mariadbd` servers: a primary and a replica started from a
//! topology, replication, the application client through its egress sockets, the firewall
//! relay refusing a disallowed source, restart on an existing datadir, and a clean stop.
//! Skipped (with `SKIP:`) when `mariadbd` is not installed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use db::{
    connect_client, mariadbd_defaults_file, start_controller, start_server, ClientConfig,
    ControllerConfig, Credentials, DbClient, Engine, ServerConfig,
};
use tokio::io::AsyncReadExt;
use topology::Topology;

mod common;
use common::{pair_topology, processes_of, skip, Reaper};

/// Polls `f` every 100 ms for at most 30 s.
async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    common::eventually(what, 30, f).await
}

fn controller_config(t: &Topology, state: &Path) -> ControllerConfig {
    ControllerConfig::from_topology(t, state).unwrap()
}

async fn start_pair(t: &Topology, state: &Path) -> (db::DbServer, db::DbServer) {
    let cfg = |h| {
        ServerConfig::from_topology(t, h, state, test_support::net(t, h), Engine::Mariadb).unwrap()
    };
    // Started together: the replica must cope with a primary that is not up yet.
    let (p, r) = tokio::join!(start_server(cfg("web-01")), start_server(cfg("web-02")));
    (p.unwrap(), r.unwrap())
}

async fn client(t: &Topology, host: &str, state: &Path) -> DbClient {
    let cfg =
        ClientConfig::from_topology(t, host, state, test_support::net(t, host), Engine::Mariadb)
            .unwrap();
    connect_client(cfg).await.unwrap()
}

/// Waits until reads go to the replica: its replication threads run and it has received
/// the application account from the primary.
async fn reads_from_replica(app: &DbClient, replica: &db::DbServer) {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(60) {
        let info = app.info().await;
        let status = replica.status();
        if status.healthy && matches!(&info, Ok(i) if i.read_node == "web-02") {
            return;
        }
        last = format!("client info {info:?}; replica status {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("reads served by web-02: not within 60 s; last seen: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_replica_client_and_relay() {
    if skip("db=debug") {
        return;
    }
    let t = pair_topology("127.93.0", 23306, false);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let _reaper = Reaper(state);
    Credentials::ensure(state).unwrap();
    pki::ensure(&db::pki_dir(state), &t).unwrap();
    let (primary, replica) = start_pair(&t, state).await;
    let ps = primary.status();
    assert_eq!(
        (ps.role.as_str(), ps.engine.as_str()),
        ("primary", "mariadb")
    );
    assert!(ps.pid.is_some());
    assert_eq!(ps.port, 23306);
    assert_eq!(replica.status().role, "replica");

    let app = client(&t, "web-02", state).await;
    // The replica's health check sees both replication threads running.
    reads_from_replica(&app, &replica).await;
    // The replica's lag is the age of the primary's heartbeat row, once one has reached it
    // and the server's next observation has read it (the client reads the row itself, so
    // it may route reads there first).
    eventually("the replica's lag measured", || async {
        replica.status().lag_seconds.map(|_| ())
    })
    .await;
    let m = app
        .insert_message("ann", "hello from web-02 ✓")
        .await
        .unwrap();
    assert!(m.created_at.ends_with('Z'), "{}", m.created_at);
    // Read-your-writes: found even before the replica has it.
    assert_eq!(app.get_message(m.id).await.unwrap().unwrap(), m);
    eventually("message replicated", || async {
        let list = app.list_messages(10).await.ok()?;
        (list.first() == Some(&m)).then_some(())
    })
    .await;
    let m2 = app.insert_message("bob", "second").await.unwrap();
    eventually("list newest first", || async {
        let list = app.list_messages(1).await.ok()?;
        (list == vec![m2.clone()]).then_some(())
    })
    .await;

    let info = app.info().await.unwrap();
    assert_eq!(info.engine, "mariadb");
    assert_eq!(info.write_node, "web-01");
    assert_eq!(info.read_node, "web-02");
    assert!(info.lag_seconds.is_some(), "{info:?}");

    // web-01's client reads from the replica on web-02 as well.
    let other = client(&t, "web-01", state).await;
    assert_eq!(other.info().await.unwrap().read_node, "web-02");

    // The relay refuses a source the policy does not allow (127.0.0.1 is no app host).
    let relay: SocketAddr = "127.93.0.11:23306".parse().unwrap();
    let refused_before = primary.filters()[0].refused();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    if let Ok(mut s) = sock.connect(relay).await {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "a disallowed source got data: {r:?}"
        );
    }
    eventually("refusal counted", || async {
        (primary.filters()[0].refused() > refused_before).then_some(())
    })
    .await;

    // With the replica gone, reads fall back to the primary.
    replica.stop().await;
    assert!(!replica.status().healthy);
    assert_eq!(
        app.list_messages(2).await.unwrap(),
        vec![m2.clone(), m.clone()]
    );
    assert_eq!(app.get_message(m.id).await.unwrap().unwrap(), m);
    let info = app.info().await.unwrap();
    assert_eq!(
        (info.read_node.as_str(), info.lag_seconds),
        ("web-01", None)
    );

    drop(app);
    drop(other);
    primary.stop().await;
    assert_eq!(primary.status().pid, None);
    for h in ["web-01", "web-02"] {
        let cnf = mariadbd_defaults_file(state, h);
        assert!(
            processes_of(&cnf).is_empty(),
            "mariadbd of {h} still running"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_data_and_replaces_a_leftover_server() {
    if skip("db=debug") {
        return;
    }
    let t = pair_topology("127.93.2", 23306, false);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let _reaper = Reaper(state);
    Credentials::ensure(state).unwrap();
    pki::ensure(&db::pki_dir(state), &t).unwrap();
    let (primary, replica) = start_pair(&t, state).await;
    let app = client(&t, "web-01", state).await;
    reads_from_replica(&app, &replica).await;
    let m = app.insert_message("ann", "kept").await.unwrap();
    eventually("replicated", || async {
        (app.list_messages(1).await.ok()? == vec![m.clone()]).then_some(())
    })
    .await;
    drop(app);

    // A node killed without stopping its servers leaves mariadbd running; the next start
    // on the same datadirs must replace them.
    let old_pids = (primary.status().pid, replica.status().pid);
    drop(primary);
    drop(replica);
    // A lost pid file must not hide the leftover server.
    std::fs::remove_file(db::mariadbd_pid_file(state, "web-02")).unwrap();
    let (primary, replica) = start_pair(&t, state).await;
    assert_ne!((primary.status().pid, replica.status().pid), old_pids);
    let app = client(&t, "web-02", state).await;
    reads_from_replica(&app, &replica).await;
    assert_eq!(app.list_messages(1).await.unwrap(), vec![m.clone()]);
    assert_eq!(app.get_message(m.id).await.unwrap().unwrap(), m);
    let m2 = app.insert_message("bob", "after restart").await.unwrap();
    eventually("replicated after restart", || async {
        (app.list_messages(2).await.ok()? == vec![m2.clone(), m.clone()]).then_some(())
    })
    .await;
    drop(app);
    primary.stop().await;
    replica.stop().await;
    for h in ["web-01", "web-02"] {
        assert!(processes_of(&mariadbd_defaults_file(state, h)).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_mariadbd_is_restarted_and_takes_writes_again() {
    if skip("db=debug") {
        return;
    }
    let t = pair_topology("127.93.3", 23306, false);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let _reaper = Reaper(state);
    Credentials::ensure(state).unwrap();
    pki::ensure(&db::pki_dir(state), &t).unwrap();
    let (primary, replica) = start_pair(&t, state).await;
    // Servers come back read-only; the controller decides who takes writes again.
    let controller = start_controller(controller_config(&t, state))
        .await
        .unwrap();
    let app = client(&t, "web-01", state).await;
    reads_from_replica(&app, &replica).await;
    let before = app.insert_message("ann", "before the crash").await.unwrap();

    // SIGKILL both servers, as the OOM killer would.
    let old = (primary.status().pid.unwrap(), replica.status().pid.unwrap());
    for pid in [old.0, old.1] {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    let restarted = common::eventually("both servers restarted and healthy", 60, || async {
        let (p, r) = (primary.status(), replica.status());
        let new_pids = p.pid.is_some_and(|x| x != old.0) && r.pid.is_some_and(|x| x != old.1);
        (p.healthy && r.healthy && new_pids).then_some((p, r))
    })
    .await;
    assert_eq!((restarted.0.restarts, restarted.1.restarts), (1, 1));

    // The acknowledged write survived, writes work again and reach the replica.
    let after = eventually("a write after the restart", || async {
        app.insert_message("bob", "after the crash").await.ok()
    })
    .await;
    assert_eq!(app.get_message(before.id).await.unwrap().unwrap(), before);
    eventually("replicated after the restart", || async {
        let list = app.list_messages(2).await.ok()?;
        (list == vec![after.clone(), before.clone()]).then_some(())
    })
    .await;
    controller.stop().await;
    drop(app);
    primary.stop().await;
    replica.stop().await;
    for h in ["web-01", "web-02"] {
        assert!(processes_of(&mariadbd_defaults_file(state, h)).is_empty());
    }
}
