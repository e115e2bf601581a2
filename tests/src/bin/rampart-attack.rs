//! `rampart-attack`: hostile and heavy clients for Rampart's attack suite. Every mode is
//! bounded in connections and time, binds its connections to source addresses of a given
//! network (so the server's per-source caps see many clients), and prints one JSON line.
//!
//! Modes: `idle` (connect, optionally finish TLS or half an HTTP/2 preface, then say
//! nothing), `slow-body` (a POST whose body trickles), `h2-zero-window` (HTTP/2 streams
//! whose responses the client never accepts), `load` (HTTP/1.1 keep-alive clients).
//! Loopback only: targets must be 127.0.0.0/8 addresses.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

#[derive(Parser)]
struct Args {
    /// Target address (127.0.0.0/8 only).
    #[arg(long)]
    target: SocketAddr,
    /// Source addresses are taken round robin from this network.
    #[arg(long, default_value = "127.101.0.0/16")]
    source_net: Ipv4Net,
    /// The lab's CA (PEM), for TLS modes.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TLS server name.
    #[arg(long, default_value = "www.foobar.com")]
    sni: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Open connections and send nothing.
    Idle {
        #[arg(long)]
        count: usize,
        /// tcp | tls | h2-preface
        #[arg(long, default_value = "tcp")]
        how: String,
        /// Seconds to hold them.
        #[arg(long)]
        hold: u64,
        /// New connections per second (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u32,
    },
    /// POST heads announcing a large body, then a few bytes every `interval` seconds.
    SlowBody {
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 3)]
        interval: u64,
        #[arg(long)]
        hold: u64,
    },
    /// HTTP/2 connections with a zero receive window, `streams` GETs each, never read.
    H2ZeroWindow {
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        streams: usize,
        #[arg(long)]
        hold: u64,
    },
    /// HTTP/1.1 keep-alive clients sending GET `path` back to back.
    Load {
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        duration: u64,
        #[arg(long, default_value = "/")]
        path: String,
    },
}

fn sources(net: Ipv4Net) -> impl Iterator<Item = IpAddr> {
    net.hosts().map(IpAddr::V4).cycle()
}

async fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    tokio::time::timeout(Duration::from_secs(10), s.connect(dst))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

fn tls(ca: &Option<PathBuf>, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca {
        let pem = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
            let _ = roots.add(cert);
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|e| panic!("TLS versions: {e}"))
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(cfg))
}

fn server_name(sni: &str) -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from(sni.to_string())
        .unwrap_or_else(|e| panic!("server name {sni}: {e}"))
}

/// Seconds from `start` at which each connection saw the server close it.
#[derive(Default)]
struct Closes(std::sync::Mutex<Vec<f64>>);

impl Closes {
    fn push(&self, t: f64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(t);
    }
    fn summary(&self) -> serde_json::Value {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v.get(((v.len() as f64 - 1.0) * q) as usize).copied();
        serde_json::json!({"closed": v.len(), "min": at(0.0), "median": at(0.5), "max": at(1.0)})
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(
        args.target.ip().is_loopback(),
        "targets must be loopback addresses"
    );
    let out = match args.mode {
        Mode::Idle {
            count,
            ref how,
            hold,
            rate,
        } => idle(&args, count, how, hold, rate).await,
        Mode::SlowBody {
            count,
            interval,
            hold,
        } => slow_body(&args, count, interval, hold).await,
        Mode::H2ZeroWindow {
            conns,
            streams,
            hold,
        } => h2_zero_window(&args, conns, streams, hold).await,
        Mode::Load {
            conns,
            duration,
            ref path,
        } => load(&args, conns, duration, path).await,
    };
    println!("{out}");
}

async fn idle(args: &Args, count: usize, how: &str, hold: u64, rate: u32) -> serde_json::Value {
    let start = Instant::now();
    let closes = Arc::new(Closes::default());
    let failed = Arc::new(AtomicU64::new(0));
    let connector = tls(&args.ca, &[b"h2", b"http/1.1"]);
    let mut tasks = tokio::task::JoinSet::new();
    let deadline = start + Duration::from_secs(hold);
    let mut pace = (rate > 0).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    for src in sources(args.source_net).take(count) {
        if let Some(p) = pace.as_mut() {
            p.tick().await;
        }
        let (closes, failed, connector) = (closes.clone(), failed.clone(), connector.clone());
        let (target, how, sni) = (args.target, how.to_string(), args.sni.clone());
        tasks.spawn(async move {
            let Ok(mut tcp) = connect_from(src, target).await else {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            // Close times are measured from this connection's establishment.
            let start = Instant::now();
            let mut buf = [0u8; 64];
            let wait = tokio::time::sleep_until(deadline.into());
            tokio::pin!(wait);
            if how == "tcp" {
                tokio::select! {
                    _ = tcp.read(&mut buf) => closes.push(start.elapsed().as_secs_f64()),
                    _ = &mut wait => {}
                }
                return;
            }
            let Ok(mut s) = connector.connect(server_name(&sni), tcp).await else {
                closes.push(start.elapsed().as_secs_f64());
                return;
            };
            if how == "h2-preface" {
                let _ = s.write_all(b"PRI * HTTP/2.0\r\n").await;
            }
            tokio::select! {
                _ = s.read(&mut buf) => closes.push(start.elapsed().as_secs_f64()),
                _ = &mut wait => {}
            }
        });
        // Let the server's accept loop keep up instead of overflowing its backlog.
        tokio::task::yield_now().await;
    }
    while tasks.join_next().await.is_some() {}
    serde_json::json!({
        "mode": "idle", "how": how, "count": count, "rate": rate,
        "connect_failed": failed.load(Ordering::Relaxed),
        "closed_by_server": closes.summary(),
    })
}

async fn slow_body(args: &Args, count: usize, interval: u64, hold: u64) -> serde_json::Value {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(hold);
    let statuses = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    let connector = tls(&args.ca, &[b"http/1.1"]);
    let mut tasks = tokio::task::JoinSet::new();
    for src in sources(args.source_net).take(count) {
        let (statuses, connector) = (statuses.clone(), connector.clone());
        let (target, sni) = (args.target, args.sni.clone());
        tasks.spawn(async move {
            let count = |k: &str| {
                *statuses
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(k.to_string())
                    .or_default() += 1;
            };
            let Ok(tcp) = connect_from(src, target).await else {
                return count("connect_failed");
            };
            let Ok(mut s) = connector.connect(server_name(&sni), tcp).await else {
                return count("tls_failed");
            };
            let head = format!(
                "POST /api/messages HTTP/1.1\r\nHost: {sni}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            );
            if s.write_all(head.as_bytes()).await.is_err() {
                return count("closed");
            }
            let mut buf = vec![0u8; 4096];
            loop {
                let tick = tokio::time::sleep(Duration::from_secs(interval));
                tokio::select! {
                    r = s.read(&mut buf) => {
                        match r {
                            Ok(n) if n >= 12 => {
                                let line = String::from_utf8_lossy(&buf[..12]).to_string();
                                return count(line.split(' ').nth(1).unwrap_or("?"));
                            }
                            _ => return count("closed"),
                        }
                    }
                    _ = tick => {
                        if Instant::now() >= deadline {
                            return count("still_open");
                        }
                        if s.write_all(b"{").await.is_err() {
                            return count("closed");
                        }
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let statuses = statuses.lock().unwrap_or_else(|e| e.into_inner()).clone();
    serde_json::json!({"mode": "slow-body", "count": count, "ended": statuses,
        "seconds": start.elapsed().as_secs_f64()})
}

async fn h2_zero_window(args: &Args, conns: usize, streams: usize, hold: u64) -> serde_json::Value {
    let opened = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let connector = tls(&args.ca, &[b"h2"]);
    let mut tasks = tokio::task::JoinSet::new();
    for src in sources(args.source_net).take(conns) {
        let (opened, refused, connector) = (opened.clone(), refused.clone(), connector.clone());
        let (target, sni) = (args.target, args.sni.clone());
        tasks.spawn(async move {
            let Ok(tcp) = connect_from(src, target).await else {
                return;
            };
            let Ok(s) = connector.connect(server_name(&sni), tcp).await else {
                return;
            };
            let Ok((client, conn)) = h2::client::Builder::new()
                .initial_window_size(0)
                .initial_connection_window_size(65_535)
                .handshake::<_, bytes::Bytes>(s)
                .await
            else {
                return;
            };
            let driver = tokio::spawn(conn);
            let mut held = Vec::new();
            for _ in 0..streams {
                let ready =
                    tokio::time::timeout(Duration::from_secs(2), client.clone().ready()).await;
                let Ok(Ok(mut ready)) = ready else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let req = http::Request::get(format!("https://{sni}/"))
                    .body(())
                    .unwrap_or_default();
                match ready.send_request(req, true) {
                    Ok((resp, _)) => {
                        opened.fetch_add(1, Ordering::Relaxed);
                        held.push(resp);
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(hold)).await;
            drop(held);
            driver.abort();
        });
    }
    while tasks.join_next().await.is_some() {}
    serde_json::json!({"mode": "h2-zero-window", "streams_opened": opened.load(Ordering::Relaxed),
        "streams_refused": refused.load(Ordering::Relaxed)})
}

async fn load(args: &Args, conns: usize, duration: u64, path: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(duration);
    let counts: Arc<[AtomicU64; 7]> = Arc::new(Default::default());
    const OK: usize = 0;
    const C4: usize = 1;
    const C5: usize = 2;
    const CONNECT: usize = 3;
    const TLS: usize = 4;
    const BROKEN: usize = 5;
    const OTHER: usize = 6;
    let connector = tls(&args.ca, &[b"http/1.1"]);
    let mut tasks = tokio::task::JoinSet::new();
    for src in sources(args.source_net).take(conns) {
        let (counts, connector) = (counts.clone(), connector.clone());
        let (target, sni, path) = (args.target, args.sni.clone(), path.to_string());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let Ok(tcp) = connect_from(src, target).await else {
                    counts[CONNECT].fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let Ok(s) = connector.connect(server_name(&sni), tcp).await else {
                    counts[TLS].fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await
                else {
                    counts[BROKEN].fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let driver = tokio::spawn(conn);
                while Instant::now() < deadline {
                    let req = http::Request::get(&path)
                        .header(http::header::HOST, &sni)
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap_or_default();
                    let sent =
                        tokio::time::timeout(Duration::from_secs(15), sender.send_request(req))
                            .await;
                    match sent {
                        Ok(Ok(resp)) => {
                            let status = resp.status().as_u16();
                            let body = http_body_util::BodyExt::collect(resp.into_body()).await;
                            let slot = match status {
                                200..=299 => OK,
                                400..=499 => C4,
                                500..=599 => C5,
                                _ => OTHER,
                            };
                            counts[slot].fetch_add(1, Ordering::Relaxed);
                            if body.is_err() {
                                counts[BROKEN].fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                        _ => {
                            counts[BROKEN].fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                driver.abort();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let c = |i: usize| counts[i].load(Ordering::Relaxed);
    serde_json::json!({"mode": "load", "conns": conns, "2xx": c(OK), "4xx": c(C4), "5xx": c(C5),
        "connect_failed": c(CONNECT), "tls_failed": c(TLS), "broken": c(BROKEN), "other": c(OTHER)})
}
