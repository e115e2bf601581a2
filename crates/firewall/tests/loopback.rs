//! The firewall on real loopback sockets, in the 127.90.0.0/16 block: guarded listeners,
//! source-address connects, the relay in front of a Unix socket, and egress.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use firewall::{connect_from, egress_unix, relay, Admitted, Filter, GuardedListener, Net, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_util::sync::CancellationToken;
use topology::{ListenerLimits, Policy, Service, Topology};

const TOPOLOGY: &str = r#"
[[hosts]]
name = "lb"
address = "127.90.0.10"
roles = ["lb"]

[[hosts]]
name = "web-a"
address = "127.90.0.11"
roles = ["web", "app", "db-primary"]

[[hosts]]
name = "web-b"
address = "127.90.0.12"
roles = ["web", "app", "db-replica"]
"#;

const LB: &str = "127.90.0.10";
const WEB_A: &str = "127.90.0.11";
const WEB_B: &str = "127.90.0.12";
const STRANGER: &str = "127.90.0.99";

/// Upper bound for every step, so a broken build fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn limits(service: Service) -> ListenerLimits {
    ListenerLimits::default_for(service)
}

async fn bind(filter: &Arc<Filter>, at: &str) -> GuardedListener {
    let service = filter.service;
    GuardedListener::bind(
        SocketAddr::new(ip(at), 0),
        Arc::clone(filter),
        limits(service),
    )
    .await
    .unwrap()
}

fn net(host: &str, at: &str) -> Net {
    let t = Topology::parse(TOPOLOGY, "firewall-test.toml").unwrap();
    Net::loopback(host, ip(at), policy(), t.limits)
}

fn policy() -> Arc<Policy> {
    let t = Topology::parse(TOPOLOGY, "firewall-test.toml").unwrap();
    Arc::new(Policy::compile(&t))
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {STEP:?}"))
}

/// Reads from a connection the firewall refused: the peer must see reset or EOF, no data.
async fn assert_refused(mut stream: TcpStream) {
    let mut buf = [0u8; 16];
    match within("read on refused connection", stream.read(&mut buf)).await {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("refused connection should reset or end, got {other:?}"),
    }
}

/// Sends `msg` and reads the same number of bytes back.
async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    within("echo", stream.read_exact(&mut back)).await.unwrap();
    back
}

/// A TCP server that echoes every connection and reports each peer address.
async fn tcp_echo(addr: SocketAddr) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<IpAddr>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let local = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            let _ = tx.send(peer.ip());
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (local, rx)
}

#[tokio::test]
async fn guarded_listener_admits_only_the_rule_sources() {
    let filter = Filter::new(policy(), "web-a", Service::Web);
    let listener = bind(&filter, WEB_A).await;
    let addr = listener.local_addr().unwrap();
    assert_eq!(addr.ip(), ip(WEB_A));
    tokio::spawn(async move {
        while let Ok(Admitted {
            stream: mut s,
            peer,
            ..
        }) = listener.accept().await
        {
            let _ = s.write_all(peer.ip().to_string().as_bytes()).await;
        }
    });

    // The load balancer is allowed, and the server sees its address.
    let mut ok = within("connect from lb", connect_from(ip(LB), addr))
        .await
        .unwrap();
    assert_eq!(ok.local_addr().unwrap().ip(), ip(LB));
    let mut seen = String::new();
    within("read from allowed", ok.read_to_string(&mut seen))
        .await
        .unwrap();
    assert_eq!(seen, LB);
    assert_eq!(filter.accepted(), 1);

    // Another host of the block and a plain connect (source 127.0.0.1) are refused.
    let other = within("connect from stranger", connect_from(ip(STRANGER), addr))
        .await
        .unwrap();
    assert_refused(other).await;
    assert_eq!(filter.refused(), 1);

    let plain = within("plain connect", TcpStream::connect(addr))
        .await
        .unwrap();
    assert_refused(plain).await;
    assert_eq!(filter.refused(), 2);
    assert_eq!(filter.accepted(), 1);
}

#[tokio::test]
async fn service_without_rule_refuses_everyone() {
    // The load balancer runs no web server, so its web port has no rule: default deny.
    let filter = Filter::new(policy(), "lb", Service::Web);
    let listener = bind(&filter, LB).await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { while listener.accept().await.is_ok() {} });
    let s = within("connect", connect_from(ip(WEB_A), addr))
        .await
        .unwrap();
    assert_refused(s).await;
    assert_eq!(filter.refused(), 1);
    assert_eq!(filter.accepted(), 0);
}

#[tokio::test]
async fn relay_to_unix_socket_filters_and_forwards() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mysqld.sock");
    let unix = UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = unix.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let filter = Filter::new(policy(), "web-a", Service::Mysql);
    let listener = bind(&filter, WEB_A).await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(relay(
        listener,
        Target::Unix(sock),
        CancellationToken::new(),
    ));

    // The replica host may reach the database; bytes pass both ways.
    let mut s = within("connect from replica", connect_from(ip(WEB_B), addr))
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"SELECT 1").await, b"SELECT 1");
    drop(s);

    // The load balancer may not.
    let s = within("connect from lb", connect_from(ip(LB), addr))
        .await
        .unwrap();
    assert_refused(s).await;
    assert_eq!(filter.refused(), 1);
    assert_eq!(filter.accepted(), 1);

    // A relay whose target is gone closes that connection and keeps serving.
    let filter = Filter::new(policy(), "web-a", Service::Mysql);
    let listener = bind(&filter, WEB_A).await;
    let addr = listener.local_addr().unwrap();
    let missing = dir.path().join("absent.sock");
    tokio::spawn(relay(
        listener,
        Target::Unix(missing),
        CancellationToken::new(),
    ));
    for _ in 0..2 {
        let s = within("connect", connect_from(ip(WEB_B), addr))
            .await
            .unwrap();
        assert_refused(s).await;
    }
    assert_eq!(filter.accepted(), 2);
}

#[tokio::test]
async fn egress_admits_only_the_local_server_process_and_leaves_from_the_host_address() {
    let (far, mut peers) = tcp_echo(SocketAddr::new(ip(WEB_A), 0)).await;
    let web_b = net("web-b", WEB_B);
    // The egress admits the process the rule names: this test process plays mariadbd.
    let me = std::process::id();
    let listener = web_b
        .listen(Service::MysqlEgress, 0)
        .await
        .unwrap()
        .with_local_server(Arc::new(move || Some(me)));
    let filter = listener.filter().clone();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(relay(
        listener,
        Target::Tcp {
            net: web_b.clone(),
            to: far,
        },
        CancellationToken::new(),
    ));
    // A plain local connect (source 127.0.0.1) from the named process passes.
    let mut s = within("connect to egress", TcpStream::connect(addr))
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"binlog").await, b"binlog");
    let seen = within("far side peer", peers.recv()).await.unwrap();
    assert_eq!(seen, ip(WEB_B));
    // Another host's address is refused by the address rule.
    let other = within("connect from lb", connect_from(ip(LB), addr))
        .await
        .unwrap();
    assert_refused(other).await;
    assert_eq!(filter.refused(), 1);

    // The same egress naming another process refuses this one, from an allowed address.
    let listener = web_b
        .listen(Service::MysqlEgress, 0)
        .await
        .unwrap()
        .with_local_server(Arc::new(|| Some(1)));
    let filter = listener.filter().clone();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(relay(
        listener,
        Target::Tcp {
            net: web_b,
            to: far,
        },
        CancellationToken::new(),
    ));
    let s = within("connect to egress", TcpStream::connect(addr))
        .await
        .unwrap();
    assert_refused(s).await;
    assert_eq!((filter.accepted(), filter.refused()), (1, 1));
}

#[tokio::test]
async fn per_source_cap_resets_and_a_full_listener_evicts_the_idle() {
    // lb's HTTPS port admits any source.
    let filter = Filter::new(policy(), "lb", Service::Https);
    let mut l = limits(Service::Https);
    l.max_connections = 3;
    l.max_connections_per_source = 2;
    let listener = GuardedListener::bind(SocketAddr::new(ip(LB), 0), Arc::clone(&filter), l)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(a) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let closed = a.slot.activity().closed().clone();
                let _ = tx.send(());
                // An idle client's connection, held until evicted.
                closed.cancelled().await;
                drop(a);
            });
        }
    });
    let (a, b, c) = ("127.90.1.1", "127.90.1.2", "127.90.1.3");
    let first = within("connect", connect_from(ip(a), addr)).await.unwrap();
    within("admitted", rx.recv()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _second = within("connect", connect_from(ip(a), addr)).await.unwrap();
    within("admitted", rx.recv()).await.unwrap();
    // A third from the same source is over the per-source cap: reset at once, counted.
    let third = within("connect", connect_from(ip(a), addr)).await.unwrap();
    assert_refused(third).await;
    assert_eq!(filter.limited()[0].1, 1);
    // Another source fills the listener (3 of 3) ...
    let _fourth = within("connect", connect_from(ip(b), addr)).await.unwrap();
    within("admitted", rx.recv()).await.unwrap();
    assert_eq!(filter.open_connections(), 3);
    // ... and one more is admitted by closing the connection idle longest: the first.
    let _fifth = within("connect", connect_from(ip(c), addr)).await.unwrap();
    within("admitted", rx.recv()).await.unwrap();
    assert_refused(first).await;
    assert_eq!(filter.evicted(), 1);
    assert_eq!(filter.limited()[1].1, 0, "nothing refused for the cap");
}

#[tokio::test]
async fn egress_unix_leaves_from_the_configured_address() {
    let dir = tempfile::tempdir().unwrap();
    let (far, mut peers) = tcp_echo(SocketAddr::new(ip(WEB_A), 0)).await;
    let sock = dir.path().join("web-a.sock");
    let local = UnixListener::bind(&sock).unwrap();
    tokio::spawn(egress_unix(
        local,
        Target::Tcp {
            net: net("web-b", WEB_B),
            to: far,
        },
    ));

    let mut s = within(
        "connect to egress socket",
        tokio::net::UnixStream::connect(&sock),
    )
    .await
    .unwrap();
    s.write_all(b"query").await.unwrap();
    let mut back = [0u8; 5];
    within("echo", s.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"query");
    let seen = within("far side peer", peers.recv()).await.unwrap();
    assert_eq!(seen, ip(WEB_B));
}

/// Accepted connections come with TCP_NODELAY: a response written in pieces must not wait
/// for the peer's delayed ACK (Nagle), which made streamed bodies crawl through the load
/// balancer.
#[tokio::test]
async fn accepted_connections_have_nodelay() {
    let filter = Filter::new(policy(), "web-a", Service::Web);
    let listener = bind(&filter, WEB_A).await;
    let addr = listener.local_addr().unwrap();
    let client = within("connect", connect_from(ip(LB), addr)).await.unwrap();
    let accepted = within("accept", listener.accept()).await.unwrap();
    assert!(accepted.stream.nodelay().unwrap());
    drop(client);
}
