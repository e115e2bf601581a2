//! Test backends and a load balancer in front of them, on real loopback sockets in
//! 127.113.0.0/24 (lb-01 .10, backends .11, .12, .13), ports chosen by the kernel.
//!
//! A [`Backend`] is a small HTTP/1.1 server (mutual TLS for web-01/web-02 when asked, plain
//! otherwise) that echoes request bodies and answers `/bytes/N` with N bytes of a fixed
//! pattern, and whose behaviour the test switches at run time: healthy or not on
//! `/healthz`, answering 500 or closing the connection without an answer on other paths,
//! an added delay. It records which request ids (`X-Test-Id`) it answered.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use lb::{LbConfig, LbHandle};
use prometheus_client::registry::Registry;
use test_support::{eventually, TestPki};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use topology::HealthCheck;

pub const WAIT: Duration = Duration::from_secs(20);
pub const CLIENT_IP: &str = "127.0.0.1";

pub fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 113, 0, last])
}

/// What a backend does with requests other than health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// 200 with `X-Served-By`.
    Answer = 0,
    /// 500.
    Fail = 1,
    /// Close the connection without answering (after reading the request).
    Drop = 2,
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub healthy: Arc<AtomicBool>,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
    /// `X-Test-Id` of every request answered or dropped here (method, id).
    pub seen: Arc<Mutex<Vec<(String, String)>>>,
    pub requests: Arc<AtomicU64>,
    /// WebSocket connections that ended here (closed, or a close frame came).
    pub ws_ended: Arc<AtomicU64>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Clone)]
struct Shared {
    name: String,
    healthy: Arc<AtomicBool>,
    mode: Arc<AtomicU8>,
    delay_ms: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    requests: Arc<AtomicU64>,
    ws_ended: Arc<AtomicU64>,
}

impl Backend {
    /// Starts backend `name` on `at`, over mutual TLS with `pki`'s host certificate of
    /// `name` when `tls` is given.
    pub async fn start(name: &str, at: IpAddr, tls: Option<&pki::PkiPaths>) -> Backend {
        let listener = TcpListener::bind(SocketAddr::new(at, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tls.map(|pki| {
            TlsAcceptor::from(Arc::new(
                pki::mtls_server_config(pki, name, &[b"http/1.1"]).unwrap(),
            ))
        });
        let shared = Shared {
            name: name.to_string(),
            healthy: Arc::new(AtomicBool::new(true)),
            mode: Arc::new(AtomicU8::new(Mode::Answer as u8)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            seen: Arc::default(),
            requests: Arc::default(),
            ws_ended: Arc::default(),
        };
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let task_shared = shared.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    _ = &mut stop_rx => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((tcp, _)) = accepted else { continue };
                let (shared, acceptor) = (task_shared.clone(), acceptor.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { answer(&shared, req).await }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let _ = http
                                .serve_connection(TokioIo::new(tls), service)
                                .with_upgrades()
                                .await;
                        }
                        None => {
                            let _ = http
                                .serve_connection(TokioIo::new(tcp), service)
                                .with_upgrades()
                                .await;
                        }
                    }
                });
            }
            // Like a killed process: every connection is gone before the listener closes.
            connections.shutdown().await;
            drop(listener);
        });
        Backend {
            name: name.to_string(),
            addr,
            healthy: shared.healthy,
            mode: shared.mode,
            delay_ms: shared.delay_ms,
            seen: shared.seen,
            requests: shared.requests,
            ws_ended: shared.ws_ended,
            stop: Mutex::new(Some(stop_tx)),
            task: Mutex::new(Some(task)),
        }
    }

    pub fn backend(&self) -> lb::Backend {
        lb::Backend::new(self.name.clone(), self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Ids of the requests with `method` this backend saw.
    pub fn ids(&self, method: &str) -> HashSet<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| m == method)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Closes every open connection and the listener, like a killed process; returns once
    /// they are closed.
    pub async fn stop(&self) {
        let stop = self.stop.lock().unwrap().take();
        let task = self.task.lock().unwrap().take();
        if let (Some(stop), Some(task)) = (stop, task) {
            let _ = stop.send(());
            task.await.unwrap();
        }
    }
}

/// A service error makes hyper close the connection without an answer.
#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dropped on purpose")
    }
}
impl std::error::Error for Dropped {}

async fn answer(s: &Shared, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
    if req.uri().path() == "/healthz" {
        let status = if s.healthy.load(Ordering::SeqCst) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"health")))
            .unwrap());
    }
    if let Some(n) = req.uri().path().strip_prefix("/bytes/") {
        // `n` bytes of a fixed pattern (byte i is i mod 251), whatever the request.
        let n: usize = n.parse().unwrap_or(0);
        let body: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        return Ok(Response::builder()
            .header("x-served-by", &s.name)
            .body(Full::new(Bytes::from(body)))
            .unwrap());
    }
    if req.uri().path() == "/ws" {
        return Ok(websocket_echo(&s.name, s.ws_ended.clone(), req));
    }
    s.requests.fetch_add(1, Ordering::SeqCst);
    let id = req
        .headers()
        .get("x-test-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let method = req.method().to_string();
    let cookie = req
        .headers()
        .get("cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let host = req.headers().get("host").cloned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    s.seen.lock().unwrap().push((method, id));
    match s.mode.load(Ordering::SeqCst) {
        1 => Ok(Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .header("x-served-by", &s.name)
            .body(Full::new(Bytes::from_static(b"broken")))
            .unwrap()),
        2 => Err(Dropped),
        _ => {
            let mut resp = Response::builder()
                .header("x-served-by", &s.name)
                .header("x-seen-cookie", cookie);
            if let Some(host) = host {
                resp = resp.header("x-seen-host", host);
            }
            Ok(resp.body(Full::new(body)).unwrap())
        }
    }
}

/// Answers a WebSocket upgrade (RFC 6455 §4.2.2) and echoes every message on the upgraded
/// connection, prefixed with the backend's name; counts the connection in `ended` when it ends.
fn websocket_echo(
    name: &str,
    ended: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::new()))
            .unwrap();
    };
    let prefix = format!("{name}: ");
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            let echo = match msg {
                Message::Text(t) => Message::text(format!("{prefix}{t}")),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(echo).await.is_err() {
                break;
            }
        }
        ended.fetch_add(1, Ordering::SeqCst);
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// The load balancer and its backends.
pub struct Setup {
    pub pki: TestPki,
    pub backends: Vec<Backend>,
    pub lb: LbHandle,
    pub registry: Registry,
    /// The configuration the load balancer started with (a base for reloads).
    pub cfg: LbConfig,
}

pub fn health() -> HealthCheck {
    HealthCheck {
        path: "/healthz".into(),
        interval_ms: 100,
        timeout_ms: 1000,
        rise: 2,
        fall: 2,
    }
}

/// Starts `n` backends (web-01 … web-0n; over mutual TLS when `tls`, which allows at most
/// two), then a load balancer whose config `tune` may change, and waits until every
/// backend is up.
pub async fn setup(n: usize, tls: bool, tune: impl FnOnce(&mut LbConfig)) -> Setup {
    setup_with_limits(n, tls, |_| {}, tune).await
}

/// [`setup`] with the topology's listener limits changed by `limits` first.
pub async fn setup_with_limits(
    n: usize,
    tls: bool,
    limits: impl FnOnce(&mut topology::Limits),
    tune: impl FnOnce(&mut LbConfig),
) -> Setup {
    assert!(
        !tls || n <= 2,
        "the test PKI has certificates for web-01 and web-02"
    );
    let mut pki = TestPki::new(test_support::topology_in_block(113));
    limits(&mut pki.topology.limits);
    let mut backends = Vec::new();
    for i in 0..n {
        let name = format!("web-{:02}", i + 1);
        let paths = tls.then_some(&pki.paths);
        backends.push(Backend::start(&name, ip(11 + i as u8), paths).await);
    }
    let net = test_support::net(&pki.topology, "lb-01");
    let mut cfg = LbConfig::from_topology(&pki.topology, "lb-01", pki.paths.clone(), net).unwrap();
    cfg.https_port = 0;
    cfg.http_port = 0;
    cfg.plain_backends = !tls;
    cfg.health = health();
    cfg.backends = backends.iter().map(Backend::backend).collect();
    tune(&mut cfg);
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb = lb::start(cfg.clone(), &mut registry, &http).await.unwrap();
    eventually("every backend up", WAIT, || {
        let up = lb.backends().iter().all(|(_, up)| *up);
        async move { up.then_some(()) }
    })
    .await;
    Setup {
        pki,
        backends,
        lb,
        registry,
        cfg,
    }
}

impl Setup {
    /// An HTTP/1.1 (or HTTP/2 when `h2`) client of the site, from 127.0.0.1.
    pub fn client(&self, h2: bool) -> reqwest::Client {
        self.client_from(CLIENT_IP.parse().unwrap(), h2)
    }

    /// The same from address `from`.
    pub fn client_from(&self, from: IpAddr, h2: bool) -> reqwest::Client {
        let mut tls = pki::ca_client_config(&self.pki.paths).unwrap();
        if !h2 {
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        }
        let b = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .resolve("www.foobar.com", self.lb.https_addr())
            .local_address(from)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10));
        let b = if h2 { b } else { b.http1_only() };
        b.build().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "https://www.foobar.com:{}{path}",
            self.lb.https_addr().port()
        )
    }

    pub fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    /// The value of the series `line_prefix` (e.g. `name{labels}`) in the metrics, 0 when
    /// absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until backend `name`'s availability is `available`.
    pub async fn wait_available(&self, name: &str, available: bool) {
        eventually(&format!("{name} available = {available}"), WAIT, || {
            let ok = self
                .lb
                .backend_status()
                .iter()
                .any(|b| b.name == name && b.available == available);
            async move { ok.then_some(()) }
        })
        .await;
    }
}

pub fn served_by(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

/// Infallible, for `service_fn` in tests that need it.
pub type Never = Infallible;
