//! The load balancer against two in-process mutual-TLS backends, all on real loopback
//! sockets in 127.91.0.0/24 (lb-01 .10, web-01 .11, web-02 .12), ports chosen by the kernel.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use lb::{Backend, LbConfig, LbHandle};
use prometheus_client::registry::Registry;
use test_support::{eventually, TestPki};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use topology::{HealthCheck, Policy, Service};

const WAIT: Duration = Duration::from_secs(20);
const CLIENT_IP: &str = "127.0.0.1";

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 91, 0, last])
}

/// What a backend saw of the proxied (non-health-check) requests.
#[derive(Default)]
struct Seen {
    /// Connection ids that carried proxied requests.
    connections: HashSet<u64>,
    requests: u64,
}

/// A tiny web server standing in for web-0N: `/healthz` → 200; anything else → 200 with
/// `X-Served-By` and the request's forwarding headers echoed back as `X-Seen-*`; a request
/// body is echoed as the response body.
struct TestBackend {
    name: String,
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl TestBackend {
    async fn start(
        pki: &pki::PkiPaths,
        policy: &Arc<Policy>,
        name: &str,
        at: IpAddr,
        tls: bool,
    ) -> TestBackend {
        let filter = firewall::Filter::new(policy.clone(), name, Service::Web);
        let limits = topology::ListenerLimits::default_for(Service::Web);
        let listener = firewall::GuardedListener::bind(SocketAddr::new(at, 0), filter, limits)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tls.then(|| {
            TlsAcceptor::from(Arc::new(
                pki::mtls_server_config(pki, name, &[b"http/1.1"]).unwrap(),
            ))
        });
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (task_name, task_seen) = (name.to_string(), seen.clone());
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            let ids = AtomicU64::new(0);
            loop {
                let accepted = tokio::select! {
                    _ = &mut stop_rx => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok(firewall::Admitted {
                    stream: tcp,
                    peer,
                    slot,
                }) = accepted
                else {
                    continue;
                };
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let (name, seen, acceptor) =
                    (task_name.clone(), task_seen.clone(), acceptor.clone());
                connections.spawn(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |req| {
                        let (name, seen) = (name.clone(), seen.clone());
                        async move { Ok::<_, Infallible>(answer(&name, id, peer, &seen, req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let identity = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(pki::peer_identity);
                            assert_eq!(identity, Some(pki::Identity::Host("lb-01".into())));
                            let _ = http.serve_connection(TokioIo::new(tls), service).await;
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
            // Like a killed process: every connection is gone before the listener closes.
            connections.shutdown().await;
            drop(listener);
        });
        TestBackend {
            name: name.to_string(),
            addr,
            seen,
            stop: Mutex::new(Some(stop_tx)),
            task: Mutex::new(Some(task)),
        }
    }

    fn backend(&self) -> Backend {
        Backend::new(self.name.clone(), self.addr)
    }

    /// Closes every open connection and the listener, like a killed process; returns
    /// once they are closed.
    async fn stop(&self) {
        let stop = self.stop.lock().unwrap().take();
        let task = self.task.lock().unwrap().take();
        if let (Some(stop), Some(task)) = (stop, task) {
            let _ = stop.send(());
            task.await.unwrap();
        }
    }
}

async fn answer(
    name: &str,
    conn: u64,
    peer: SocketAddr,
    seen: &Mutex<Seen>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        return Response::new(Full::new(Bytes::from_static(b"ok")));
    }
    {
        let mut s = seen.lock().unwrap();
        s.requests += 1;
        s.connections.insert(conn);
    }
    let mut resp = Response::builder()
        .header("x-served-by", name)
        .header("x-seen-peer", peer.ip().to_string());
    for (from, to) in [
        ("x-forwarded-for", "x-seen-forwarded-for"),
        ("x-forwarded-proto", "x-seen-forwarded-proto"),
        ("x-forwarded-host", "x-seen-forwarded-host"),
        ("host", "x-seen-host"),
    ] {
        if let Some(v) = req.headers().get(from) {
            resp = resp.header(to, v);
        }
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    resp.body(Full::new(body)).unwrap()
}

struct Setup {
    pki: TestPki,
    policy: Arc<Policy>,
    backends: Vec<TestBackend>,
    lb: LbHandle,
    registry: Registry,
}

fn health() -> HealthCheck {
    HealthCheck {
        path: "/healthz".into(),
        interval_ms: 100,
        timeout_ms: 1000,
        rise: 2,
        fall: 2,
    }
}

async fn setup(tls: bool) -> Setup {
    setup_with(tls, None, |_| {}).await
}

async fn setup_with(
    tls: bool,
    access_log: Option<std::path::PathBuf>,
    tune: impl FnOnce(&mut LbConfig),
) -> Setup {
    let pki = TestPki::new(test_support::topology_in_block(91));
    let policy = Arc::new(Policy::compile(&pki.topology));
    let mut backends = Vec::new();
    for (name, last) in [("web-01", 11), ("web-02", 12)] {
        backends.push(TestBackend::start(&pki.paths, &policy, name, ip(last), tls).await);
    }
    let net = firewall::Net::loopback("lb-01", ip(10), policy.clone(), pki.topology.limits.clone());
    let mut cfg = LbConfig::from_topology(&pki.topology, "lb-01", pki.paths.clone(), net).unwrap();
    cfg.https_port = 0;
    cfg.http_port = 0;
    cfg.plain_backends = !tls;
    cfg.health = health();
    cfg.backends = backends.iter().map(TestBackend::backend).collect();
    cfg.access_log = access_log;
    tune(&mut cfg);
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb = lb::start(cfg, &mut registry, &http).await.unwrap();
    eventually("both backends up", WAIT, || {
        let up = lb.backends().iter().all(|(_, up)| *up);
        async move { up.then_some(()) }
    })
    .await;
    Setup {
        pki,
        policy,
        backends,
        lb,
        registry,
    }
}

/// Turns the per-source rate limit on: `rate` requests a second, bursts of `burst`.
fn rate_limit(cfg: &mut LbConfig, rate: u32, burst: u32) {
    cfg.balancer.rate_limit_per_source = rate;
    cfg.balancer.rate_limit_burst = burst;
}

fn client(s: &Setup, h2: bool) -> reqwest::Client {
    client_from(s, h2, CLIENT_IP)
}

/// A client of the HTTPS listener whose connections come from `source`.
fn client_from(s: &Setup, h2: bool, source: &str) -> reqwest::Client {
    let mut tls = pki::ca_client_config(&s.pki.paths).unwrap();
    // reqwest keeps a preconfigured config's ALPN list as it is.
    if !h2 {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    let b = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve("www.foobar.com", s.lb.https_addr())
        .local_address(source.parse::<IpAddr>().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    let b = if h2 { b } else { b.http1_only() };
    b.build().unwrap()
}

/// A client for the plain HTTP listener that does not follow redirects.
fn http_client(s: &Setup) -> reqwest::Client {
    reqwest::Client::builder()
        .resolve("www.foobar.com", s.lb.http_addr().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn url(s: &Setup, path: &str) -> String {
    format!("https://www.foobar.com:{}{path}", s.lb.https_addr().port())
}

fn served_by(resp: &reqwest::Response) -> String {
    resp.headers()["x-served-by"].to_str().unwrap().to_string()
}

fn metrics_text(r: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, r).unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_round_robin_with_forwarding_headers_and_hsts() {
    let s = setup(true).await;
    let c = client(&s, false);
    let mut by_backend: HashMap<String, u32> = HashMap::new();
    for _ in 0..20 {
        let resp = c.get(url(&s, "/index.html?x=1")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), Version::HTTP_11);
        let h = resp.headers();
        assert_eq!(h["strict-transport-security"], "max-age=31536000");
        assert_eq!(h["x-seen-forwarded-for"], CLIENT_IP);
        assert_eq!(h["x-seen-forwarded-proto"], "https");
        let host = format!("www.foobar.com:{}", s.lb.https_addr().port());
        assert_eq!(h["x-seen-host"], host.as_str());
        assert_eq!(h["x-seen-forwarded-host"], host.as_str());
        // Upstream connections leave from lb-01's own address.
        assert_eq!(h["x-seen-peer"], "127.91.0.10");
        *by_backend.entry(served_by(&resp)).or_default() += 1;
    }
    assert_eq!(by_backend.len(), 2, "{by_backend:?}");
    assert!(by_backend.values().all(|n| *n == 10), "{by_backend:?}");

    // Upstream connections are pooled: far fewer connections than requests.
    for b in &s.backends {
        let seen = b.seen.lock().unwrap();
        assert!(
            (seen.connections.len() as u64) < seen.requests,
            "{}: {} connections for {} requests",
            b.name,
            seen.connections.len(),
            seen.requests
        );
    }

    // A request body is streamed to the backend and its answer back.
    let resp = c
        .post(url(&s, "/api/echo"))
        .body("hello through the balancer")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "hello through the balancer");

    let text = metrics_text(&s.registry);
    assert!(
        text.contains(r#"rampart_http_requests_total{role="lb",code="2xx"} 21"#),
        "{text}"
    );
    assert!(
        text.contains(r#"rampart_backend_up{backend="web-01"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"rampart_http_request_duration_seconds_count{role="lb"} 21"#));
    assert!(s.lb.healthy());
    assert!(s.lb.filters()[0].accepted() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_request_is_forwarded_as_http11_with_host() {
    let s = setup(true).await;
    let c = client(&s, true);
    let resp = c.get(url(&s, "/h2")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_2);
    let host = format!("www.foobar.com:{}", s.lb.https_addr().port());
    assert_eq!(resp.headers()["x-seen-host"], host.as_str());
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    assert!(resp.headers().contains_key("x-served-by"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_redirects_to_https() {
    let s = setup(true).await;
    let c = http_client(&s);
    let http_port = s.lb.http_addr().unwrap().port();
    let resp = c
        .get(format!("http://www.foobar.com:{http_port}/a/b?c=d"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    let expected = format!(
        "https://www.foobar.com:{}/a/b?c=d",
        s.lb.https_addr().port()
    );
    assert_eq!(resp.headers()["location"], expected.as_str());
    assert!(!resp.headers().contains_key("strict-transport-security"));
    let text = metrics_text(&s.registry);
    assert!(
        text.contains(r#"rampart_http_requests_total{role="lb",code="3xx"} 1"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_gets_431() {
    let s = setup(true).await;
    let c = http_client(&s);
    let url = format!(
        "http://www.foobar.com:{}/",
        s.lb.http_addr().unwrap().port()
    );
    let fits = c
        .get(&url)
        .header("x-pad", "x".repeat(8 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(fits.status(), StatusCode::MOVED_PERMANENTLY);
    let big = c
        .get(&url)
        .header("x-pad", "x".repeat(200 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // The cap is exact: a head a little over it is refused however it arrives, one a
    // little under it is served.
    let cap = serve::MAX_HTTP1_HEAD_BYTES;
    for (pad, fits) in [
        (cap - 1024, true),
        (cap + 1024, false),
        (cap + 6 * 1024, false),
    ] {
        let r = c
            .get(&url)
            .header("x-pad", "x".repeat(pad))
            .send()
            .await
            .unwrap();
        let want = if fits {
            StatusCode::MOVED_PERMANENTLY
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        };
        assert_eq!(r.status(), want, "a field of {pad} bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_is_marked_down_and_traffic_moves_to_the_other() {
    let s = setup(true).await;
    let c = client(&s, false);
    // Warm the pool so a pooled connection to web-01 exists when it dies.
    for _ in 0..4 {
        let resp = c.get(url(&s, "/")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    s.backends[0].stop().await;

    // Before the health checks notice, connect failures are retried on web-02.
    let mut failures = 0;
    for _ in 0..10 {
        match c.get(url(&s, "/")).send().await {
            Ok(r) if r.status() == StatusCode::OK => assert_eq!(served_by(&r), "web-02"),
            _ => failures += 1,
        }
    }
    // A request already written to a pooled connection the backend closed at that very
    // moment cannot be replayed safely; allow that one race, nothing more.
    assert!(
        failures <= 1,
        "{failures} requests failed while web-01 was going down"
    );

    eventually("web-01 marked down", WAIT, || {
        let down =
            s.lb.backends() == vec![("web-01".to_string(), false), ("web-02".to_string(), true)];
        async move { down.then_some(()) }
    })
    .await;
    for _ in 0..10 {
        let resp = c.get(url(&s, "/")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(served_by(&resp), "web-02");
    }
    let text = metrics_text(&s.registry);
    assert!(
        text.contains(r#"rampart_backend_up{backend="web-01"} 0"#),
        "{text}"
    );
    assert!(s.lb.healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_up_gives_503() {
    let s = setup(true).await;
    for b in &s.backends {
        b.stop().await;
    }
    eventually("every backend marked down", WAIT, || {
        let healthy = s.lb.healthy();
        async move { (!healthy).then_some(()) }
    })
    .await;
    let c = client(&s, false);
    let resp = c.get(url(&s, "/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    assert!(!resp.text().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_backends_variant_forwards_in_clear() {
    let s = setup(false).await;
    let c = client(&s, false);
    let mut served = HashSet::new();
    for _ in 0..4 {
        let resp = c.get(url(&s, "/")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        served.insert(served_by(&resp));
    }
    assert_eq!(served.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_listeners() {
    let s = setup(true).await;
    let addr = s.lb.https_addr();
    s.lb.shutdown();
    eventually("HTTPS listener closed", WAIT, || async move {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let _ = &s.policy;
}

/// What one request should have left in the access log.
struct Expected {
    status: u16,
    backend: String,
    listener: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_escaped_line_per_request_naming_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let s = setup_with(true, Some(path.clone()), |_| {}).await;
    let mut expected = Vec::new();

    for h2 in [false, true] {
        let c = client(&s, h2);
        for _ in 0..3 {
            let resp = c.get(url(&s, "/api/messages?x=1")).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            expected.push(Expected {
                status: 200,
                backend: served_by(&resp),
                listener: "https",
            });
        }
    }
    // A hostile User-Agent: a quote, a backslash, a tab and a byte outside ASCII.
    let hostile = http::HeaderValue::from_bytes(b"evil\" agent\\\t\xff").unwrap();
    let resp = client(&s, false)
        .get(url(&s, "/hostile"))
        .header("user-agent", hostile)
        .header("referer", "https://ref.example/\"x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    expected.push(Expected {
        status: 200,
        backend: served_by(&resp),
        listener: "https",
    });

    let plain = http_client(&s);
    for i in 0..2 {
        let resp = plain
            .get(format!(
                "http://www.foobar.com:{}/r/{i}",
                s.lb.http_addr().unwrap().port()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        expected.push(Expected {
            status: 301,
            backend: "-".into(),
            listener: "http",
        });
    }

    // A request target with a quote, sent raw (clients percent-encode it).
    let mut tcp = tokio::net::TcpStream::connect(s.lb.http_addr().unwrap())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut tcp,
        b"GET /q\"\xc3\xa9 HTTP/1.1\r\nHost: www.foobar.com\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 301 "), "{answer:?}");
    expected.push(Expected {
        status: 301,
        backend: "-".into(),
        listener: "http",
    });

    let n = expected.len();
    let text = eventually("one access log line per request", WAIT, || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        async move { (text.lines().count() >= n).then_some(text) }
    })
    .await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), n, "{text}");
    // Each line is queued before its response is returned, so sequential requests are
    // logged in order.
    for (line, e) in lines.iter().zip(&expected) {
        assert!(line.starts_with(&format!("{CLIENT_IP} - - [")), "{line}");
        let status = format!("\" {} ", e.status);
        assert!(line.contains(&status), "{line}");
        let tail = format!(" backend={} rt=", e.backend);
        assert!(line.contains(&tail), "{line}");
        assert!(
            line.ends_with(&format!(" listener={}", e.listener)),
            "{line}"
        );
    }
    assert!(
        lines[0].contains("\"GET /api/messages?x=1 HTTP/1.1\""),
        "{}",
        lines[0]
    );
    assert!(
        lines[3].contains("\"GET /api/messages?x=1 HTTP/2.0\""),
        "{}",
        lines[3]
    );
    assert!(
        lines[6].contains(r#""https://ref.example/\"x" "evil\" agent\\\x09\xFF" backend="#),
        "{}",
        lines[6]
    );
    assert!(
        lines[7].contains("\"GET /r/0 HTTP/1.1\" 301 "),
        "{}",
        lines[7]
    );
    let metrics = metrics_text(&s.registry);
    assert!(
        metrics.contains("rampart_lb_access_log_dropped_total 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_rate_limit_buckets() {
    // 1 request a second, bursts of 40: spend the burst, reload with the same limits, and
    // the source is still limited (a fresh table would let the next 40 through).
    let s = setup_with(true, None, |cfg| rate_limit(cfg, 1, 40)).await;
    let c = client(&s, false);
    let mut spent = 0;
    for _ in 0..60 {
        if c.get(url(&s, "/")).send().await.unwrap().status() == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        spent += 1;
    }
    assert!(spent >= 40, "the burst was not admitted: {spent}");
    let started = std::time::Instant::now();
    s.lb.reload(None).await.unwrap();
    let mut admitted = 0;
    for _ in 0..30 {
        if c.get(url(&s, "/")).send().await.unwrap().status() == StatusCode::OK {
            admitted += 1;
        }
    }
    // At 1 token a second only what refilled meanwhile passes.
    let refilled = started.elapsed().as_secs() + 1;
    assert!(
        admitted <= refilled.min(30) as usize && admitted < 30,
        "{admitted} of 30 admitted after the reload ({refilled} s of refill)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_the_rate_limit_gets_429_and_others_do_not() {
    // 2 requests a second, bursts of 5: 20 requests at once get 5 through.
    let s = setup_with(true, None, |cfg| rate_limit(cfg, 2, 5)).await;
    let c = client(&s, false);
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..20 {
        let r = c.get(url(&s, "/")).send().await.unwrap();
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(r.headers()["retry-after"], "1");
                limited += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // A request may straddle a refill (2 a second): at most a couple more than the burst.
    assert!((5..=7).contains(&ok), "ok {ok}, limited {limited}");
    assert_eq!(ok + limited, 20);
    let text = metrics_text(&s.registry);
    assert!(
        text.contains("rampart_lb_rejected_requests_total{reason=\"rate_limited\"}"),
        "{text}"
    );
    // Another source address has its own bucket.
    let other = client_from(&s, false, "127.91.0.99");
    assert_eq!(
        other.get(url(&s, "/")).send().await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_forwarded_client_is_limited_and_logged() {
    // The test client's address stands for a CDN in front: its X-Forwarded-For names the
    // client. 1 request a second, bursts of 3.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let s = setup_with(true, Some(path.clone()), |cfg| {
        rate_limit(cfg, 1, 3);
        cfg.balancer.trusted_proxies = vec![format!("{CLIENT_IP}/32").parse().unwrap()];
    })
    .await;
    let c = client(&s, false);
    let get = |xff: &'static str| c.get(url(&s, "/")).header("x-forwarded-for", xff).send();
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..6 {
        let r = get("198.51.100.7").await.unwrap();
        match r.status() {
            StatusCode::OK => {
                // The chain goes on with the address the request came from.
                assert_eq!(
                    r.headers()["x-seen-forwarded-for"],
                    format!("198.51.100.7, {CLIENT_IP}").as_str()
                );
                ok += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    // A request may straddle a refill (1 a second): at most one more than the burst.
    assert!(
        (3..=4).contains(&ok) && limited >= 2,
        "ok {ok}, limited {limited}"
    );
    // Another forwarded client has its own bucket, also when a claim stands to its left:
    // the rightmost untrusted address is the client.
    assert_eq!(get("198.51.100.8").await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        get("6.6.6.6, 198.51.100.8").await.unwrap().status(),
        StatusCode::OK
    );
    // From a source that is not trusted the field is a claim: the connection's address is
    // the client, whatever the field says.
    let untrusted = client_from(&s, false, "127.91.0.99");
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = untrusted
            .get(url(&s, "/"))
            .header("x-forwarded-for", format!("203.0.113.{i}"))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    // The access log names the forwarded client, and the untrusted source as itself.
    let lines = eventually("the access log lines", WAIT, || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        async move { (text.lines().count() >= 14).then_some(text) }
    })
    .await;
    let clients: Vec<&str> = lines
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(clients[..6], ["198.51.100.7"; 6], "{lines}");
    assert_eq!(clients[6..8], ["198.51.100.8"; 2], "{lines}");
    assert_eq!(clients[8..14], ["127.91.0.99"; 6], "{lines}");
}
