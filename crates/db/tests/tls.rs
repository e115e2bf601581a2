#![allow(clippy::unwrap_used, missing_docs)]
//! TLS on the data tier's links against real `mariadbd` servers: replication runs over TLS
//! with the primary's certificate verified, the application and replication accounts are
//! refused without TLS (also through the firewall relay), the application's client
//! verifies the server's name and CA, and a replica refuses a primary whose certificate
//! comes from another CA or does not name the address it dials; a reissued certificate is
//! loaded by the running server.
//! Skipped (with `SKIP:`) when `mariadbd` is not installed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use db::{
    connect_client, mariadbd_socket, start_server, ClientConfig, Credentials, DbServer, Engine,
    ServerConfig, ServerTls,
};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row};
use topology::Topology;

mod common;
use common::{eventually, pair_topology, root, skip, Reaper};

fn server_config(t: &Topology, state: &Path, host: &str) -> ServerConfig {
    ServerConfig::from_topology(t, host, state, test_support::net(t, host), Engine::Mariadb)
        .unwrap()
}

async fn start_pair(a: ServerConfig, b: ServerConfig) -> (DbServer, DbServer) {
    let (p, r) = tokio::join!(start_server(a), start_server(b));
    (p.unwrap(), r.unwrap())
}

/// `SHOW SLAVE STATUS` of `host` as (column, value) text pairs; `None` without replication.
async fn slave_status(state: &Path, host: &str) -> Option<Vec<(String, String)>> {
    let mut c = root(state, host).await;
    let row: Option<Row> = c.query_first("SHOW SLAVE STATUS").await.unwrap();
    let _ = c.disconnect().await;
    let row = row?;
    let columns = row.columns();
    Some(
        columns
            .iter()
            .enumerate()
            .map(|(i, col)| {
                let v: Option<String> = row.get_opt(i).and_then(Result::ok).flatten();
                (col.name_str().into_owned(), v.unwrap_or_default())
            })
            .collect(),
    )
}

fn field<'a>(status: &'a [(String, String)], name: &str) -> &'a str {
    status
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in SHOW SLAVE STATUS"))
}

/// A byte forwarder on `127.0.0.1:0` whose connections leave from `net`'s host address to
/// `to` (what the relay's firewall filters on): lets the test speak MySQL to a relay as an
/// application host would, with any options it likes. Lives as long as the runtime.
async fn forwarder(net: firewall::Net, to: SocketAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let net = net.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = net.connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    addr
}

/// Connects with `opts`, bounded by 10 s.
async fn connect(opts: OptsBuilder) -> Result<Conn, mysql_async::Error> {
    tokio::time::timeout(Duration::from_secs(10), Conn::new(opts))
        .await
        .expect("connection attempt finished")
}

fn server_error_code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_and_application_links_are_verified_tls() {
    if skip("db=info") {
        return;
    }
    let t = pair_topology("127.115.1", 24306, false);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let _reaper = Reaper(state);
    let creds = Credentials::ensure(state).unwrap();
    let pki = pki::ensure(&db::pki_dir(state), &t).unwrap();
    let (primary, replica) = start_pair(
        server_config(&t, state, "web-01"),
        server_config(&t, state, "web-02"),
    )
    .await;

    // Replication: MASTER_SSL with the lab's CA and server verification on, and running.
    let status = eventually("replica's IO and SQL threads running", 60, || async {
        let s = slave_status(state, "web-02").await?;
        (field(&s, "Slave_IO_Running") == "Yes" && field(&s, "Slave_SQL_Running") == "Yes")
            .then_some(s)
    })
    .await;
    assert_eq!(field(&status, "Master_SSL_Allowed"), "Yes");
    assert_eq!(field(&status, "Master_SSL_Verify_Server_Cert"), "Yes");
    assert_eq!(
        Path::new(field(&status, "Master_SSL_CA_File")),
        pki.ca_cert().as_path()
    );
    // MASTER_HOST is the replica's own egress address, which the primary's certificate names.
    assert_eq!(field(&status, "Master_Host"), "127.115.1.12");

    // Both accounts require TLS (replayed to the replica from the primary's binary log,
    // all of which the replica has applied once MASTER_GTID_WAIT returns 0).
    let mut p = root(state, "web-01").await;
    let pos: Option<String> = p.query_first("SELECT @@gtid_binlog_pos").await.unwrap();
    let _ = p.disconnect().await;
    let mut r = root(state, "web-02").await;
    let waited: Option<i64> = r
        .exec_first("SELECT MASTER_GTID_WAIT(?, 60)", (pos.unwrap(),))
        .await
        .unwrap();
    assert_eq!(
        waited,
        Some(0),
        "the replica applied the primary's binary log"
    );
    let _ = r.disconnect().await;
    for host in ["web-01", "web-02"] {
        let mut c = root(state, host).await;
        let mut accounts: Vec<(String, String)> = c
            .exec(
                "SELECT user, CONCAT(ssl_type) FROM mysql.user WHERE user IN (?, ?)",
                (&creds.app_user, &creds.repl_user),
            )
            .await
            .unwrap();
        accounts.sort();
        let want = vec![
            (creds.app_user.clone(), "ANY".to_string()),
            (creds.repl_user.clone(), "ANY".to_string()),
        ];
        assert_eq!(accounts, want, "{host}: REQUIRE SSL");
        let have_ssl: Option<String> = c.query_first("SELECT @@have_ssl").await.unwrap();
        assert_eq!(have_ssl.as_deref(), Some("YES"), "{host}");
    }

    // What the nodes publish (and `rampart db status` shows): TLS required on both,
    // replication over verified TLS, and the cipher of the node's own application-account
    // connection through its relay.
    let published = |s: &DbServer, replica: bool| {
        let s = s.status();
        let o = s.observed.clone()?;
        let ok = o.clients_require_tls()
            && (!replica || (o.replication_tls && o.replication_tls_verified))
            && s.relay_tls_cipher.as_deref().is_some_and(|c| !c.is_empty());
        ok.then_some(())
    };
    eventually("TLS published by both nodes", 30, || async {
        published(&primary, false)?;
        published(&replica, true)
    })
    .await;

    // Through web-01's relay, from web-02's address, as the application host's client is.
    let relay = SocketAddr::new("127.115.1.11".parse().unwrap(), 24306);
    let via = forwarder(test_support::net(&t, "web-02"), relay).await;
    let ca = pki.ca_cert();

    // TLS, CA and name verified: accepted, and the session is encrypted.
    let mut c = connect(db::tcp_opts(
        via,
        "web-01",
        &ca,
        &creds.app_user,
        &creds.app_password,
    ))
    .await
    .unwrap();
    let cipher: Option<(String, String)> = c
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .await
        .unwrap();
    let cipher = cipher.unwrap().1;
    assert!(!cipher.is_empty(), "the application's session is not TLS");
    let version: Option<(String, String)> = c
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_version'")
        .await
        .unwrap();
    assert!(
        matches!(version.unwrap().1.as_str(), "TLSv1.3" | "TLSv1.2"),
        "TLS version"
    );
    let _ = c.disconnect().await;

    // The same accounts without TLS: refused by the server (access denied), through the
    // relay and on the socket alike.
    for (user, password) in [
        (&creds.app_user, &creds.app_password),
        (&creds.repl_user, &creds.repl_password),
    ] {
        let plain = OptsBuilder::default()
            .ip_or_hostname(via.ip().to_string())
            .tcp_port(via.port())
            .prefer_socket(false)
            .user(Some(user.clone()))
            .pass(Some(password.clone()));
        let e = connect(plain)
            .await
            .expect_err("a plain login was accepted");
        assert_eq!(server_error_code(&e), Some(1045), "{user} plain: {e}");
        let socket = OptsBuilder::default()
            .socket(Some(
                mariadbd_socket(state, "web-01")
                    .to_string_lossy()
                    .into_owned(),
            ))
            .prefer_socket(false)
            .user(Some(user.clone()))
            .pass(Some(password.clone()));
        let e = connect(socket)
            .await
            .expect_err("a plain socket login was accepted");
        assert_eq!(
            server_error_code(&e),
            Some(1045),
            "{user} on the socket: {e}"
        );
    }

    // The client refuses a server certificate for another name, or from another CA.
    let e = connect(db::tcp_opts(
        via,
        "web-02",
        &ca,
        &creds.app_user,
        &creds.app_password,
    ))
    .await
    .expect_err("a certificate for web-01 was accepted as web-02");
    assert_eq!(server_error_code(&e), None, "not refused by TLS: {e}");
    let other = tempfile::tempdir().unwrap();
    let other_pki = pki::ensure(other.path(), &t).unwrap();
    let e = connect(db::tcp_opts(
        via,
        "web-01",
        &other_pki.ca_cert(),
        &creds.app_user,
        &creds.app_password,
    ))
    .await
    .expect_err("a server of another CA was accepted");
    assert_eq!(server_error_code(&e), None, "not refused by TLS: {e}");

    // The application's own client works end to end (it needs TLS to log in at all).
    let app = connect_client(
        ClientConfig::from_topology(
            &t,
            "web-02",
            state,
            test_support::net(&t, "web-02"),
            Engine::Mariadb,
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let m = app.insert_message("ann", "over TLS").await.unwrap();
    assert_eq!(app.get_message(m.id).await.unwrap().unwrap(), m);
    drop(app);

    primary.stop().await;
    replica.stop().await;
}

/// Starts web-01 (primary) serving `cert`/`key` instead of its own database certificate,
/// and web-02 (replica) as usual, and returns the replica's `SHOW SLAVE STATUS` once its IO
/// thread reported an error, with the replica's `@@gtid_slave_pos`.
async fn replica_against_primary_certificate(
    net: &str,
    port: u16,
    primary_tls: impl FnOnce(&Topology, &Path) -> ServerTls,
) -> (Vec<(String, String)>, String) {
    let t = pair_topology(net, port, false);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let _reaper = Reaper(state);
    Credentials::ensure(state).unwrap();
    pki::ensure(&db::pki_dir(state), &t).unwrap();
    let mut p = server_config(&t, state, "web-01");
    p.tls = primary_tls(&t, state);
    let (primary, replica) = start_pair(p, server_config(&t, state, "web-02")).await;
    // The primary's relay is up now: restart the IO thread, which clears an error from
    // before (a connection refused while the primary was still starting).
    let mut c = root(state, "web-02").await;
    c.query_drop("STOP SLAVE IO_THREAD").await.unwrap();
    c.query_drop("START SLAVE IO_THREAD").await.unwrap();
    let _ = c.disconnect().await;
    let status = eventually("the replica's IO thread reports an error", 60, || async {
        let s = slave_status(state, "web-02").await?;
        (field(&s, "Last_IO_Errno") != "0").then_some(s)
    })
    .await;
    let mut c = root(state, "web-02").await;
    let pos: Option<String> = c.query_first("SELECT @@gtid_slave_pos").await.unwrap();
    let _ = c.disconnect().await;
    primary.stop().await;
    replica.stop().await;
    (status, pos.unwrap_or_default())
}

fn assert_refused_by_tls(status: &[(String, String)], gtid_slave_pos: &str) {
    assert_ne!(field(status, "Slave_IO_Running"), "Yes", "{status:?}");
    // CR_SSL_CONNECTION_ERROR (MariaDB KB: "MariaDB Error Codes").
    assert_eq!(field(status, "Last_IO_Errno"), "2026", "{status:?}");
    let error = field(status, "Last_IO_Error");
    eprintln!("the replica's IO thread: {error}");
    assert!(error.contains("SSL"), "{error}");
    // Nothing of the primary's history arrived.
    assert_eq!(field(status, "Gtid_IO_Pos"), "", "{status:?}");
    assert_eq!(gtid_slave_pos, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_a_primary_certified_by_another_ca() {
    if skip("db=info") {
        return;
    }
    let other = tempfile::tempdir().unwrap();
    let other_dir = other.path().to_path_buf();
    let (status, pos) = replica_against_primary_certificate("127.115.2", 24316, |t, _| {
        // Same names and addresses, another CA.
        let other_pki = pki::ensure(&other_dir, t).unwrap();
        ServerTls::for_host(&other_pki, "web-01")
    })
    .await;
    assert_refused_by_tls(&status, &pos);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_a_primary_certificate_not_naming_its_master_host() {
    if skip("db=info") {
        return;
    }
    // The lab's own CA, but lb-01's host certificate: it names lb-01 and 127.115.3.10, not
    // the replica's egress address 127.115.3.12 that MASTER_HOST holds.
    let (status, pos) = replica_against_primary_certificate("127.115.3", 24326, |_, state| {
        let own = pki::PkiPaths::new(db::pki_dir(state));
        ServerTls {
            ca: own.ca_cert(),
            cert: own.host_cert("lb-01"),
            key: own.host_key("lb-01"),
        }
    })
    .await;
    assert_refused_by_tls(&status, &pos);
}

/// `Ssl_server_not_before` of the certificate the server presents to a new TLS
/// connection (through `via`, as the application account).
async fn presented_not_before(via: SocketAddr, ca: &Path, creds: &Credentials) -> String {
    let mut c = connect(db::tcp_opts(
        via,
        "web-01",
        ca,
        &creds.app_user,
        &creds.app_password,
    ))
    .await
    .unwrap();
    let v: Option<(String, String)> = c
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_server_not_before'")
        .await
        .unwrap();
    let _ = c.disconnect().await;
    v.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reissued_certificate_is_loaded_without_a_restart() {
    if skip("db=info") {
        return;
    }
    let t = pair_topology("127.115.5", 24346, false);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let _reaper = Reaper(state);
    let creds = Credentials::ensure(state).unwrap();
    let pki = pki::ensure(&db::pki_dir(state), &t).unwrap();
    let issued = Instant::now();
    let primary = start_server(server_config(&t, state, "web-01"))
        .await
        .unwrap();
    let pid = primary.status().pid;
    let relay = SocketAddr::new("127.115.5.11".parse().unwrap(), 24346);
    let via = forwarder(test_support::net(&t, "web-02"), relay).await;
    let ca = pki.ca_cert();
    let before = presented_not_before(via, &ca, &creds).await;
    assert!(!before.is_empty(), "no certificate presented");

    // Reissue web-01's database certificate (as `pki::ensure` does near expiry) at least a
    // second after the first one, so that its validity start differs.
    if let Some(rest) = Duration::from_millis(1500).checked_sub(issued.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    std::fs::remove_file(pki.db_cert("web-01")).unwrap();
    pki::ensure(&db::pki_dir(state), &t).unwrap();
    // New connections get the new certificate, verified as before.
    let after = eventually("the server presents the new certificate", 30, || async {
        let now = presented_not_before(via, &ca, &creds).await;
        (now != before).then_some(now)
    })
    .await;
    assert_ne!(after, before);
    assert_eq!(primary.status().pid, pid, "the server was restarted");
    primary.stop().await;
}
