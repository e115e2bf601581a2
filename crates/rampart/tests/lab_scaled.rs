//! The shipped `scaled` topology brought up for real in loopback mode (addresses
//! 127.116.0.0/16): db-01 takes the writes, db-02 and db-03 replicate them, and the site
//! writes and reads the guestbook through the load balancer with reads served by a replica.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_rampart");

fn rampart(state: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run rampart")
}

/// A lab of the test's own; dropping it runs `rampart down`.
struct Lab {
    _tmp: tempfile::TempDir,
    state: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = rampart(&self.state, &["down"]);
    }
}

fn host(status: &Value, name: &str) -> Value {
    status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no host {name} in {status}"))
        .clone()
}

/// One value from `sql` run as root on `db_host`'s server socket (the operator's console
/// path, not the site's).
fn query(state: &Path, db_host: &str, sql: &str) -> String {
    let creds: Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("db/credentials.json")).unwrap())
            .unwrap();
    let socket = state.join(format!("hosts/{db_host}/mariadb/mysqld.sock"));
    let out = Command::new("mariadb")
        .arg(format!("--socket={}", socket.display()))
        .args(["-uroot", "-N", "-B", "-e", sql])
        .env("MYSQL_PWD", creds["admin_password"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{db_host}: {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_topology_writes_on_db_01_and_reads_from_a_replica_through_the_site() {
    if !test_support::have_binary("mariadbd") || !test_support::have_binary("mariadb") {
        test_support::skip("mariadbd or the mariadb client is not installed: the scaled database tier needs MariaDB");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("scaled.toml");
    let out = Command::new(BIN)
        .args(["init", "--topology", "scaled", "-o"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("127.80.0.", "127.116.0.");
    std::fs::write(&file, text).unwrap();
    let lab = Lab {
        state: tmp.path().join("state"),
        _tmp: tmp,
    };
    let out = rampart(
        &lab.state,
        &[
            "up",
            "--mode",
            "loopback",
            "-d",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "rampart up failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rampart(&lab.state, &["status", "--json"]);
    assert!(out.status.success());
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["db"]["engine"], "mariadb", "{status}");
    assert_eq!(status["db"]["primary"], "db-01", "{status}");
    let mut db_nodes: Vec<String> = status["db"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            format!(
                "{} {}",
                n["host"].as_str().unwrap(),
                n["role"].as_str().unwrap()
            )
        })
        .collect();
    db_nodes.sort();
    assert_eq!(
        db_nodes,
        ["db-01 primary", "db-02 replica", "db-03 replica"],
        "{status}"
    );
    for name in [
        "lb-01", "web-01", "web-02", "db-01", "db-02", "db-03", "mon-01",
    ] {
        assert_eq!(host(&status, name)["healthy"], true, "{name}: {status}");
    }
    // The database hosts run no web server and the web hosts no MariaDB.
    assert!(host(&status, "db-01")["ports"].get("web").is_none());
    assert!(host(&status, "web-01")["ports"].get("mysql").is_none());

    let lb = host(&status, "lb-01");
    let addr = SocketAddr::new(
        lb["address"].as_str().unwrap().parse().unwrap(),
        lb["ports"]["https"].as_u64().unwrap() as u16,
    );
    let ca = std::fs::read(status["ca_cert"].as_str().unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve("www.foobar.com", addr)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let base = format!("https://www.foobar.com:{}", addr.port());

    // One write through the site.
    let r = client
        .post(format!("{base}/api/messages"))
        .json(&serde_json::json!({"author": "scaled", "text": "written through lb-01"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_u64().unwrap();

    // It is on both replicas (replicated from db-01) ...
    for replica in ["db-02", "db-03"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = query(
                &lab.state,
                replica,
                &format!("SELECT author FROM foobar.guestbook WHERE id = {id}"),
            );
            if got == "scaled" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{replica} never received message {id}: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(query(&lab.state, replica, "SELECT @@read_only"), "1");
    }
    assert_eq!(query(&lab.state, "db-01", "SELECT @@read_only"), "0");

    // ... and the site reads it back with its reads served by a replica: both web servers
    // (round robin) list it and report a replica as their read node.
    let mut read_from = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while read_from.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "reads never went to a replica on both web servers: {read_from:?}"
        );
        let who: Value = client
            .get(format!("{base}/api/whoami"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let node = who["db"]["read_node"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if node == "db-02" || node == "db-03" {
            read_from.insert(who["served_by"].as_str().unwrap().to_string(), node);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The list (from a replica: each web server's read node is one now) holds the message,
    // on both web servers.
    for _ in 0..2 {
        let list: Value = client
            .get(format!("{base}/api/messages"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let listed = list["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"].as_u64() == Some(id) && m["author"] == "scaled");
        assert!(listed, "message {id} not listed: {list}");
    }
    assert_eq!(
        read_from.keys().cloned().collect::<Vec<_>>(),
        ["web-01", "web-02"]
    );
}
