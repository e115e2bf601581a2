//! A network partition of the primary in netns mode, with the shipped `scaled` topology
//! (namespaces `rpt-dp-*`, subnet 10.116.0.0/24): under a steady write load through the
//! site, db-01's host is cut off from every peer (an nftables table of the test's own in
//! its namespace, dropping everything) while its `mariadbd` keeps running. The failover
//! controller on mon-01 must fence it at its firewall and promote a replica; writes resume,
//! every acknowledged id is on the new primary, no text twice, no moment with two servers
//! that clients reach and that take writes; after the partition heals the old primary is
//! read-only and either replicates from the new primary (fence lifted) or, when it
//! committed transactions after semi-synchronous replication timed out, is reported
//! diverged and kept cut off — none of those transactions acknowledged to a client.
//!
//! Needs root, ip, nft, mariadbd and the mariadb client; skipped with a reason otherwise.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_rampart");
const PREFIX: &str = "rpt-dp";
const DB_HOSTS: [(&str, &str); 3] = [
    ("db-01", "10.116.0.31"),
    ("db-02", "10.116.0.32"),
    ("db-03", "10.116.0.33"),
];
/// The test's own partition table in db-01's namespace (not Rampart's tables).
const CUT_TABLE: &str = "rpt_partition";

fn rampart(state: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run rampart")
}

fn possible() -> bool {
    let ok = test_support::is_root()
        && ["ip", "nft", "mariadbd", "mariadb", "timeout"]
            .iter()
            .all(|b| test_support::have_binary(b));
    if !ok {
        test_support::skip(
            "the partition test needs root, ip, nft, timeout, mariadbd and the mariadb client \
             (apt-get install iproute2 nftables coreutils mariadb-server)",
        );
    }
    ok
}

struct Lab {
    _tmp: tempfile::TempDir,
    state: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        heal();
        let _ = rampart(&self.state, &["down"]);
    }
}

fn nft_in(ns: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "nft"]).args(args);
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        pipe.write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn ns(host: &str) -> String {
    format!("{PREFIX}-{host}")
}

/// Cuts db-01's host off from every peer, both ways (loopback excepted).
fn partition() {
    let rules = format!(
        "table inet {CUT_TABLE} {{\n\
         \tchain input {{ type filter hook input priority filter - 20; policy accept; iif \"lo\" accept; drop; }}\n\
         \tchain output {{ type filter hook output priority filter - 20; policy accept; oif \"lo\" accept; drop; }}\n}}\n"
    );
    let out = nft_in(&ns("db-01"), &["-f", "-"], Some(&rules));
    assert!(
        out.status.success(),
        "cutting db-01 off: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn heal() {
    let _ = nft_in(&ns("db-01"), &["delete", "table", "inet", CUT_TABLE], None);
}

fn creds(state: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(state.join("db/credentials.json")).unwrap())
        .unwrap()
}

/// Rows of `sql` run as root on `db_host`'s server socket (the operator's console, which
/// no partition cuts): tab-separated columns.
fn query(state: &Path, db_host: &str, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let socket = state.join(format!("hosts/{db_host}/mariadb/mysqld.sock"));
    let out = Command::new("timeout")
        .args(["-s", "KILL", "10", "mariadb"])
        .arg(format!("--socket={}", socket.display()))
        .args(["-uroot", "-N", "-B", "--connect-timeout=2", "-e", sql])
        .env(
            "MYSQL_PWD",
            creds(state)["admin_password"].as_str().unwrap(),
        )
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect())
}

fn one(state: &Path, db_host: &str, sql: &str) -> Option<String> {
    query(state, db_host, sql)
        .ok()?
        .into_iter()
        .next()?
        .into_iter()
        .next()
}

fn cluster(state: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(state.join("db/cluster.json")).unwrap()).unwrap()
}

/// The failover controller's status as mon-01's node last wrote it.
fn controller(state: &Path) -> Value {
    let text = std::fs::read_to_string(state.join("hosts/mon-01/status.json")).unwrap_or_default();
    serde_json::from_str::<Value>(&text).unwrap_or_default()["db_controller"].clone()
}

fn eventually<T>(what: &str, seconds: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(seconds),
            "{what}: not within {seconds} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the write load saw.
#[derive(Default)]
struct Load {
    /// Acknowledged writes: id → text.
    acked: Mutex<BTreeMap<u64, String>>,
    failed: AtomicU64,
    stop: AtomicBool,
    /// The first failed write, and the first acknowledged one after it (printed, never
    /// asserted on).
    outage: Mutex<(Option<Instant>, Option<Instant>)>,
}

/// Polls, as a client does (from web-01's namespace, through each database host's firewall
/// and relay, with the application account over TLS), which servers take writes; counts the
/// rounds where more than one reachable server had `read_only = 0`. Bounded to 300 s.
fn poll_writable(state: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    let c = creds(state);
    let (user, pw) = (
        c["app_user"].as_str().unwrap().to_string(),
        c["app_password"].as_str().unwrap().to_string(),
    );
    let ca = state.join("pki/ca.pem");
    std::thread::spawn(move || {
        let (mut rounds, mut two) = (0, 0);
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(300) {
            let answers: Vec<Option<String>> = std::thread::scope(|s| {
                let handles: Vec<_> = DB_HOSTS
                    .iter()
                    .map(|(_, addr)| {
                        let (user, pw, ca) = (&user, &pw, &ca);
                        s.spawn(move || {
                            // `--connect-timeout` bounds the TCP connect only: a
                            // connection cut after it would wait for ever, so the whole
                            // client is killed after 3 s (coreutils timeout(1)).
                            let out = Command::new("timeout")
                                .args(["-s", "KILL", "3", "ip", "netns", "exec"])
                                .args([&ns("web-01"), "mariadb"])
                                .args(["-h", addr, "-P", "3306", "-u", user])
                                .arg("--ssl")
                                .arg(format!("--ssl-ca={}", ca.display()))
                                .args(["--connect-timeout=1", "-N", "-B"])
                                .args(["-e", "SELECT @@read_only"])
                                .env("MYSQL_PWD", pw)
                                .stderr(Stdio::null())
                                .output()
                                .ok()?;
                            out.status
                                .success()
                                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            rounds += 1;
            if answers.iter().filter(|a| a.as_deref() == Some("0")).count() > 1 {
                two += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (rounds, two)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_primary_is_fenced_and_nothing_acknowledged_is_lost() {
    if !possible() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("scaled.toml");
    let text = topology::SCALED_TOML
        .replace("127.80.0.", "127.116.0.")
        .replace("prefix = \"rampart\"", &format!("prefix = \"{PREFIX}\""))
        .replace("subnet = \"10.80.0.0/24\"", "subnet = \"10.116.0.0/24\"");
    assert!(text.contains(PREFIX) && text.contains("10.116.0.0/24"));
    std::fs::write(&file, text).unwrap();
    let lab = Lab {
        state: tmp.path().join("state"),
        _tmp: tmp,
    };
    let state = lab.state.clone();
    let out = rampart(
        &state,
        &["up", "--mode", "netns", "-d", "-f", file.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "rampart up failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cluster(&state)["primary"], "db-01");
    // The controller runs and has seen semi-synchronous replication on.
    eventually("the controller sees db-01 with semi-sync on", 60, || {
        let c = controller(&state);
        (c["primary"] == "db-01" && c["semi_sync_ok"] == true).then_some(())
    });

    // A steady write load through the site, from this machine (the operator's address).
    let ca = std::fs::read(state.join("pki/ca.pem")).unwrap();
    let site = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .resolve(
            "www.foobar.com",
            SocketAddr::new("10.116.0.10".parse().unwrap(), 443),
        )
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let load = Arc::new(Load::default());
    let writer = {
        let load = load.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut n = 0u64;
            while !load.stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(300) {
                n += 1;
                let text = format!("p{n}");
                let r = site
                    .post("https://www.foobar.com/api/messages")
                    .json(&serde_json::json!({"author": "partition", "text": text}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => {
                        let m: Value = r.json().await.unwrap();
                        assert_eq!(m["text"], text.as_str());
                        let id = m["id"].as_u64().unwrap();
                        let before = load.acked.lock().unwrap().insert(id, text);
                        assert!(before.is_none(), "id {id} acknowledged twice");
                        let mut o = load.outage.lock().unwrap();
                        if o.0.is_some() && o.1.is_none() {
                            o.1 = Some(Instant::now());
                        }
                    }
                    _ => {
                        load.failed.fetch_add(1, Ordering::Relaxed);
                        let mut o = load.outage.lock().unwrap();
                        if o.0.is_none() {
                            o.0 = Some(Instant::now());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let acked = |load: &Load| load.acked.lock().unwrap().len();
    let stop_poll = Arc::new(AtomicBool::new(false));
    let poller = poll_writable(&state, stop_poll.clone());
    let wait_acked = |at_least: usize, what: &str| {
        let load = load.clone();
        let what = what.to_string();
        tokio::task::spawn_blocking(move || {
            eventually(&what, 120, || (acked(&load) >= at_least).then_some(()))
        })
    };
    wait_acked(30, "writes before the partition").await.unwrap();

    // The partition: db-01 alive, cut off from everyone.
    let pid: i32 = std::fs::read_to_string(state.join("hosts/db-01/mariadb/mariadbd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    partition();
    let cut_at = Instant::now();
    let at_cut = acked(&load);
    let st = state.clone();
    let new_primary = tokio::task::spawn_blocking(move || {
        eventually("a replica promoted", 90, || {
            let c = cluster(&st);
            (c["primary"] != "db-01").then(|| c["primary"].as_str().unwrap().to_string())
        })
    })
    .await
    .unwrap();
    let promoted_after = cut_at.elapsed();
    assert!(new_primary == "db-02" || new_primary == "db-03");
    // Writes resume on the new primary.
    wait_acked(at_cut + 30, "writes after the failover")
        .await
        .unwrap();
    // db-01 was fenced at its firewall, not stopped: its mariadbd still runs.
    assert!(
        nft_in(
            &ns("db-01"),
            &["list", "table", "inet", "rampart_fence"],
            None
        )
        .status
        .success(),
        "db-01 has no fence table"
    );
    let fences = std::fs::read_to_string(state.join("db/fences.json")).unwrap();
    assert!(fences.contains("\"db-01\""), "{fences}");
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "db-01's mariadbd ({pid}) was stopped; the partition test wants it alive"
    );
    assert_eq!(
        one(&state, "db-01", "SELECT @@read_only").as_deref(),
        Some("0")
    );

    // The partition heals; the fence stays until the controller has dealt with db-01.
    heal();
    let st = state.clone();
    let np = new_primary.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        eventually("db-01 rejoined or kept out", 90, || {
            let ro = one(&st, "db-01", "SELECT @@read_only")?;
            if ro != "1" {
                return None;
            }
            let c = controller(&st);
            let errant = c["errant"]
                .as_array()
                .is_some_and(|a| a.iter().any(|h| h == "db-01"));
            if errant {
                return Some("errant");
            }
            let rows = query(&st, "db-01", "SHOW SLAVE STATUS").ok()?;
            let replicating = !rows.is_empty();
            let fenced = std::fs::read_to_string(st.join("db/fences.json"))
                .unwrap_or_default()
                .contains("\"db-01\"");
            let status = query(
                &st,
                "db-01",
                "SELECT 1 FROM information_schema.GLOBAL_STATUS \
                 WHERE VARIABLE_NAME = 'SLAVE_RUNNING' AND VARIABLE_VALUE = 'ON'",
            )
            .ok()?;
            (replicating && !fenced && !status.is_empty() && c["primary"] == np.as_str())
                .then_some("rejoined")
        })
    })
    .await
    .unwrap();
    let n = acked(&load);
    wait_acked(n + 10, "writes after the heal").await.unwrap();
    load.stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    stop_poll.store(true, Ordering::Relaxed);
    let (rounds, two_writable) = poller.join().unwrap();
    assert_eq!(
        two_writable, 0,
        "two servers took writes and were reachable by clients ({rounds} polls)"
    );
    assert!(rounds > 10, "the read-only poller barely ran: {rounds}");
    assert!(
        load.failed.load(Ordering::Relaxed) > 0,
        "no write failed: the partition was never seen"
    );

    // Every acknowledged write is on the new primary, with its own text, none twice.
    let rows = query(
        &state,
        &new_primary,
        "SELECT id, `text` FROM foobar.guestbook WHERE author = 'partition'",
    )
    .unwrap();
    let table: BTreeMap<u64, String> = rows
        .iter()
        .map(|r| (r[0].parse().unwrap(), r[1].clone()))
        .collect();
    let mut texts = HashSet::new();
    for t in table.values() {
        assert!(texts.insert(t.clone()), "{t} stored twice on {new_primary}");
    }
    let acked_all = load.acked.lock().unwrap().clone();
    let lost: Vec<_> = acked_all
        .iter()
        .filter(|(id, text)| table.get(id) != Some(text))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // Whatever db-01 holds that the new primary does not was never acknowledged.
    let old: Vec<Vec<String>> = query(
        &state,
        "db-01",
        "SELECT id, `text` FROM foobar.guestbook WHERE author = 'partition'",
    )
    .unwrap();
    // A write is known by its text: the new primary may have given a lost write's id to
    // another one (an in-flight write committed on db-01 at the cut, never acknowledged).
    let acked_texts: HashSet<&String> = acked_all.values().collect();
    for r in &old {
        let id: u64 = r[0].parse().unwrap();
        if table.get(&id) != Some(&r[1]) {
            assert!(
                !acked_texts.contains(&r[1]),
                "db-01 holds {id} {:?}, acknowledged, not on {new_primary}",
                r[1]
            );
        }
    }
    match outcome {
        "rejoined" => {
            assert!(
                !nft_in(
                    &ns("db-01"),
                    &["list", "table", "inet", "rampart_fence"],
                    None
                )
                .status
                .success(),
                "db-01 rejoined but is still cut off"
            );
            let c = controller(&state);
            assert!(c["errant"].as_array().unwrap().is_empty(), "{c}");
        }
        _ => {
            // Kept out: still cut off from everyone but the controller.
            assert!(
                nft_in(
                    &ns("db-01"),
                    &["list", "table", "inet", "rampart_fence"],
                    None
                )
                .status
                .success(),
                "db-01 diverged but its fence was lifted"
            );
            // And the operator is told.
            let out = rampart(&state, &["db", "status"]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{text}");
            assert!(
                text.contains("errant (kept out of replication): db-01"),
                "{text}"
            );
            assert!(text.contains("fenced (cut off"), "{text}");
            assert!(
                text.lines()
                    .any(|l| l.starts_with("fenced") && l.ends_with("db-01")),
                "{text}"
            );
        }
    }
    let outage = match *load.outage.lock().unwrap() {
        (Some(a), Some(b)) => format!(
            "{:.2} s from the first failed write, {:.2} s from the cut",
            (b - a).as_secs_f64(),
            b.saturating_duration_since(cut_at).as_secs_f64()
        ),
        _ => "-".into(),
    };
    eprintln!(
        "partition: {} writes acknowledged, {} failed, new primary {new_primary} in cluster.json \
         {:.1} s after the cut (polled every 0.2 s), next acknowledged write {outage}, old primary {outcome}, {rounds} read-only polls, \
         {two_writable} with two writable",
        acked_all.len(),
        load.failed.load(Ordering::Relaxed),
        promoted_after.as_secs_f64()
    );
}
