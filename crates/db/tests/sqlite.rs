#![allow(clippy::unwrap_used, missing_docs)]
//! The SQLite engine end to end: server start (schema), client insert/get/list, info.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use db::{connect_client, start_server, ClientConfig, Engine, ServerConfig};
use topology::Topology;

const TOPOLOGY: &str = r#"
[database]
engine = "sqlite"
[[hosts]]
name = "lb-01"
address = "127.93.1.10"
roles = ["lb"]
[[hosts]]
name = "web-01"
address = "127.93.1.11"
roles = ["web", "app", "db-primary"]
[[hosts]]
name = "web-02"
address = "127.93.1.12"
roles = ["web", "app", "db-replica"]
"#;

async fn client(t: &Topology, host: &str, state: &Path) -> db::DbClient {
    let cfg =
        ClientConfig::from_topology(t, host, state, test_support::net(t, host), Engine::Sqlite)
            .unwrap();
    connect_client(cfg).await.unwrap()
}

#[tokio::test]
async fn sqlite_round_trip() {
    let t = Topology::parse(TOPOLOGY, "test").unwrap();
    assert_eq!(db::resolve_engine(&t).unwrap(), Engine::Sqlite);
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig::from_topology(
        &t,
        "web-01",
        dir.path(),
        test_support::net(&t, "web-01"),
        Engine::Sqlite,
    )
    .unwrap();
    // A db-replica host under SQLite only opens the shared file.
    let replica_cfg = ServerConfig::from_topology(
        &t,
        "web-02",
        dir.path(),
        test_support::net(&t, "web-02"),
        Engine::Sqlite,
    )
    .unwrap();
    let replica = start_server(replica_cfg).await.unwrap();
    let rs = replica.status();
    assert_eq!(
        (rs.role.as_str(), rs.healthy, rs.pid, rs.port),
        ("replica", true, None, 0)
    );
    assert!(replica.filters().is_empty());
    let server = start_server(cfg).await.unwrap();
    let st = server.status();
    assert!(st.healthy);
    assert_eq!(
        (st.role.as_str(), st.engine.as_str()),
        ("primary", "sqlite")
    );
    assert_eq!(st.pid, None);
    assert!(dir.path().join("db/foobar.sqlite3").is_file());

    let a = client(&t, "web-01", dir.path()).await;
    let b = client(&t, "web-02", dir.path()).await;
    let m1 = a.insert_message("ann", "first").await.unwrap();
    let m2 = b.insert_message("bob", "zweite ✓").await.unwrap();
    let m3 = a.insert_message("ann", "third").await.unwrap();
    assert!(m1.id < m2.id && m2.id < m3.id);
    assert!(m1.created_at.ends_with('Z') && m1.created_at.contains('T'));
    assert_eq!(b.get_message(m1.id).await.unwrap().unwrap(), m1);
    assert_eq!(
        a.get_message(m2.id).await.unwrap().unwrap().text,
        "zweite ✓"
    );
    assert!(a.get_message(m3.id + 100).await.unwrap().is_none());

    let all = b.list_messages(10).await.unwrap();
    assert_eq!(
        all.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![m3.id, m2.id, m1.id]
    );
    assert_eq!(a.list_messages(2).await.unwrap(), all[..2].to_vec());

    assert!(a
        .insert_message("", "x")
        .await
        .unwrap_err()
        .is_invalid_input());
    assert!(a
        .insert_message(&"n".repeat(65), "x")
        .await
        .unwrap_err()
        .is_invalid_input());

    let info = b.info().await.unwrap();
    assert_eq!(info.engine, "sqlite");
    assert_eq!(info.write_node, "web-01");
    assert_eq!(info.read_node, "web-01");
    assert_eq!(info.lag_seconds, None);
    server.stop().await;
    replica.stop().await;
}

/// Application hosts open the one file at the same moment (each node does at start): every
/// open and a first write succeed, round after round. Openers in one process share
/// SQLite's in-process lock table; see the test below for separate processes, as nodes are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_openers_of_a_fresh_file_all_succeed() {
    let t = Topology::parse(TOPOLOGY, "test").unwrap();
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let openers: Vec<_> = (0..8)
            .map(|i| {
                let (t, dir) = (t.clone(), dir.path().to_path_buf());
                tokio::spawn(async move {
                    let host = if i % 2 == 0 { "web-01" } else { "web-02" };
                    let c = client(&t, host, &dir).await;
                    c.insert_message("a", &format!("round {round} opener {i}"))
                        .await
                        .unwrap();
                })
            })
            .collect();
        for o in openers {
            o.await.unwrap();
        }
    }
}

/// Set for a child process of [`concurrent_opener_processes_of_a_fresh_file_all_succeed`]:
/// the state directory whose SQLite file it opens and writes once.
const OPENER_DIR_ENV: &str = "RAMPART_TEST_SQLITE_OPENER_DIR";
const OPENERS: usize = 8;

/// Not a test on its own: does nothing unless started as one of the opener processes.
/// Spins (bounded) until the parent's `go` file exists so that the openers start within
/// microseconds of each other — a sleeping poll spreads them enough to hide the race —
/// then opens the shared file as an application host does and writes one message.
#[tokio::test]
async fn sqlite_opener_child() {
    let Some(dir) = std::env::var_os(OPENER_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    for _ in 0..5_000_000 {
        if dir.join("go").exists() {
            break;
        }
        std::hint::spin_loop();
    }
    let t = Topology::parse(TOPOLOGY, "test").unwrap();
    let c = client(&t, "web-02", &dir).await;
    c.insert_message("opener", &format!("pid {}", std::process::id()))
        .await
        .unwrap();
}

/// The failure the end-to-end test once hit ("database is locked" when both application
/// hosts' nodes open a fresh file): 20 rounds of 8 processes opening one fresh file at
/// once, each open and first write must succeed and every write be there.
#[test]
fn concurrent_opener_processes_of_a_fresh_file_all_succeed() {
    let exe = std::env::current_exe().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = Topology::parse(TOPOLOGY, "test").unwrap();
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let mut children: Vec<_> = (0..OPENERS)
            .map(|_| {
                Command::new(&exe)
                    .args(["--exact", "sqlite_opener_child", "--test-threads=1"])
                    .env(OPENER_DIR_ENV, dir.path())
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::fs::write(dir.path().join("go"), b"").unwrap();
        for child in &mut children {
            // Bounded: an opener gives up after its own retry limit (15 s), far sooner.
            let mut exited = false;
            for _ in 0..12_000 {
                if child.try_wait().unwrap().is_some() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if !exited {
                let _ = child.kill();
            }
        }
        for (i, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round} opener {i}: {}\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let written = rt.block_on(async {
            let c = client(&t, "web-01", dir.path()).await;
            c.list_messages(100).await.unwrap()
        });
        assert_eq!(written.len(), OPENERS, "round {round}");
    }
}
