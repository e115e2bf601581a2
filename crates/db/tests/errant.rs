#![allow(clippy::unwrap_used, missing_docs)]
//! The failover controller's errant-transaction guard against real `mariadbd` servers: a
//! replica that commits a transaction of its own (the classic operator mistake: a write
//! on a replica as a privileged user) has a history the primary does not have; the
//! controller must report it and keep it out of replication, and the transaction must not
//! reach the primary. Skipped (with `SKIP:`) when `mariadbd` is not installed.

use std::time::{Duration, Instant};

use db::{
    connect_client, start_controller, start_server, ClientConfig, ControllerConfig, Credentials,
    Engine, ServerConfig,
};
use mysql_async::prelude::Queryable;

mod common;
use common::{eventually, pair_topology, root, Reaper};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_an_errant_transaction_is_reported_and_kept_out() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("db=info,db::client=debug")
        .try_init();
    if db::find_mariadbd().is_none() {
        eprintln!("SKIP: mariadbd is not installed (apt-get install mariadb-server)");
        return;
    }
    let t = pair_topology("127.115.4", 24336, true);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let _reaper = Reaper(state);
    Credentials::ensure(state).unwrap();
    pki::ensure(&db::pki_dir(state), &t).unwrap();
    let cfg = |h| {
        ServerConfig::from_topology(&t, h, state, test_support::net(&t, h), Engine::Mariadb)
            .unwrap()
    };
    let (p, r) = tokio::join!(start_server(cfg("web-01")), start_server(cfg("web-02")));
    let (primary, replica) = (p.unwrap(), r.unwrap());
    let controller = start_controller(ControllerConfig::from_topology(&t, state).unwrap())
        .await
        .unwrap();
    let app = connect_client(
        ClientConfig::from_topology(
            &t,
            "web-01",
            state,
            test_support::net(&t, "web-01"),
            Engine::Mariadb,
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let start = Instant::now();
    loop {
        let info = app.info().await;
        let status = replica.status();
        if status.healthy && matches!(&info, Ok(i) if i.read_node == "web-02") {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let mut c = root(state, "web-02").await;
            let slave: Option<mysql_async::Row> = c.query_first("SHOW SLAVE STATUS").await.unwrap();
            panic!("reads served by web-02: not within 60 s; client info {info:?}; replica status {status:?}; slave status {slave:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = app.insert_message("ann", "everywhere").await.unwrap();
    assert!(controller.status().errant.is_empty());

    // A privileged write on the replica (root has READ_ONLY ADMIN): binary-logged with the
    // replica's server_id, a transaction the primary never had.
    let db_name = &t.database.name;
    let mut c = root(state, "web-02").await;
    c.query_drop("STOP SLAVE").await.unwrap();
    c.query_drop(format!(
        "INSERT INTO `{db_name}`.guestbook (author, `text`) VALUES ('errant', 'only on web-02')"
    ))
    .await
    .unwrap();
    let errant: Option<String> = c.query_first("SELECT @@last_gtid").await.unwrap();
    let errant = db::GtidPos::parse(&errant.unwrap()).unwrap();
    c.query_drop("START SLAVE").await.unwrap();
    let _ = c.disconnect().await;

    // Once the primary's own sequence numbers have moved past the errant one (its
    // heartbeat writes every 250 ms), comparing the last GTID of each domain can no
    // longer tell the errant transaction apart; a controller started now must still
    // find it.
    let mut p = root(state, "web-01").await;
    let start = Instant::now();
    loop {
        let pos: Option<String> = p.query_first("SELECT @@gtid_binlog_pos").await.unwrap();
        let pos = db::GtidPos::parse(&pos.unwrap()).unwrap();
        if pos.progress() > errant.progress() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the primary's binary log did not pass {errant} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = p.disconnect().await;
    controller.stop().await;
    let controller = start_controller(ControllerConfig::from_topology(&t, state).unwrap())
        .await
        .unwrap();
    let status = eventually("web-02 reported errant", 30, || async {
        let s = controller.status();
        s.errant.contains(&"web-02".to_string()).then_some(s)
    })
    .await;
    assert_eq!(status.errant, vec!["web-02".to_string()]);
    assert_eq!(status.primary, "web-01");

    // The primary never got the errant transaction, and keeps taking writes.
    let after = app.insert_message("bob", "after").await.unwrap();
    let mut p = root(state, "web-01").await;
    let errant_rows: Option<i64> = p
        .query_first(format!(
            "SELECT COUNT(*) FROM `{db_name}`.guestbook WHERE author = 'errant'"
        ))
        .await
        .unwrap();
    assert_eq!(errant_rows, Some(0));
    let _ = p.disconnect().await;
    assert_eq!(app.get_message(before.id).await.unwrap().unwrap(), before);
    assert_eq!(app.get_message(after.id).await.unwrap().unwrap(), after);
    // Reads no longer go to the diverged replica.
    eventually("reads served by the primary", 30, || async {
        (app.info().await.ok()?.read_node == "web-01").then_some(())
    })
    .await;

    drop(app);
    controller.stop().await;
    primary.stop().await;
    replica.stop().await;
}
