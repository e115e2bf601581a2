//! The dashboard in a real browser: mon-01 and lb-01's agent in-process (127.112.0.0/24,
//! real PKI), lb-01 counting requests and running a real load balancer in front of web-01
//! (a plain HTTP backend answering 200 and 404), web-02 (nothing listening: down), web-03
//! (answering 500 to every request: ejected), web-04 (drained), web-05 (dropping every other connection
//! after reading its request, without an answer: the load balancer retries those requests
//! on web-01) and web-06 (removed by a reload before the page loads);
//! headless Chromium loads the dashboard and its vendored uPlot through a plain-HTTP relay
//! on 127.112.4.1 that presents the admin client certificate to mon-01 (headless Chromium
//! cannot pick a client certificate without a user profile), lets the page refresh for a
//! virtual 20 s, and dumps the DOM: no error recorded by the page, all 11 charts drawn as
//! uPlot canvases (firewall drops and replication lag among them), the ones with data
//! non-empty, and the backends table with every column filled from the load balancer's
//! own series: web-01 up with 2xx and 4xx rates and a p99, web-02 down with no answers,
//! web-03 ejected and counted in the last 5 minutes' ejections, web-04 draining, web-05
//! with retries per second, and no row for web-06.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, Response};
use monitor::{start_agent, start_monitor, AgentConfig, MonitorConfig};
use pki::Identity;
use prometheus_client::registry::Registry;
use test_support::{eventually, topology_in_block, TestPki};

const WAIT: Duration = Duration::from_secs(30);

/// A plain HTTP/1.1 backend on `at`: 200 for `/healthz`, `root` for `/`, `other` for
/// anything else.
async fn backend(at: std::net::IpAddr, root: u16, other: u16) -> std::net::SocketAddr {
    test_support::http_backend(at, move |req| async move {
        let status = match req.uri().path() {
            "/healthz" => 200,
            "/" => root,
            _ => other,
        };
        test_support::text_response(status, "")
    })
    .await
}

/// A plain HTTP/1.1 backend on `at` that answers `/healthz` and every other request in
/// turn with 200, and closes the connection of the others after reading the request,
/// without answering (the load balancer sees the connection closed early: a reset it
/// retries for an idempotent request). One request per connection.
async fn dropping_backend(at: std::net::IpAddr) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind((at, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                // The request head, bounded in size and time.
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16_384 {
                    match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let health = head.starts_with(b"GET /healthz ");
                if health
                    || requests
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                        .is_multiple_of(2)
                {
                    let _ = tcp
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                }
            });
        }
    });
    addr
}

/// The cells of the backends table's row for `backend` in the dumped DOM.
fn backend_row(dom: &str, backend: &str) -> Vec<String> {
    let body = dom
        .split("<tbody id=\"backends\">")
        .nth(1)
        .and_then(|s| s.split("</tbody>").next())
        .unwrap_or_else(|| panic!("no backends table:\n{dom}"));
    let row = body
        .split("<tr>")
        .find(|r| r.contains(&format!("<td>{backend}</td>")))
        .unwrap_or_else(|| panic!("no row for {backend}: {body}"));
    row.split("<td")
        .skip(1)
        .map(|c| {
            let text = c.split_once('>').map_or("", |(_, rest)| rest);
            text.split("</td>").next().unwrap_or("").to_string()
        })
        .collect()
}

/// Forwards a GET to mon-01 with the admin certificate.
async fn relay(
    State((client, base)): State<(reqwest::Client, Arc<String>)>,
    req: Request<Body>,
) -> Response<Body> {
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let r = match client.get(format!("{base}{uri}")).send().await {
        Ok(r) => r,
        Err(e) => {
            return Response::builder()
                .status(502)
                .body(Body::from(e.to_string()))
                .unwrap()
        }
    };
    let mut b = Response::builder().status(r.status().as_u16());
    if let Some(ct) = r.headers().get("content-type") {
        b = b.header("content-type", ct.as_bytes());
    }
    b.body(Body::from(r.bytes().await.unwrap_or_default()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_draws_its_charts_in_headless_chromium() {
    let Some(chromium) = test_support::find_binary("chromium") else {
        test_support::skip("chromium is not installed (apt-get install chromium)");
        return;
    };
    let t = topology_in_block(112);
    let pki = TestPki::new(t.clone());
    let mut mcfg = MonitorConfig::from_topology(
        &t,
        "mon-01",
        pki.paths.clone(),
        test_support::net(&t, "mon-01"),
    )
    .unwrap();
    mcfg.port = 0;
    let mon = start_monitor(mcfg).await.unwrap();
    let mut acfg = AgentConfig::from_topology(
        &t,
        "lb-01",
        pki.paths.clone(),
        test_support::net(&t, "lb-01"),
    )
    .unwrap();
    acfg.port = 0;
    acfg.monitor.1 = mon.addr();
    acfg.spool_dir = None;
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    // A replica's lag, as the database role exports it.
    let lag =
        prometheus_client::metrics::gauge::Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    lag.set(0.25);
    registry.register_with_unit(
        "rampart_db_replication_lag",
        "Seconds the replica lags its primary.",
        prometheus_client::registry::Unit::Seconds,
        lag,
    );
    // A real load balancer on lb-01, its series in the agent's registry: web-01 serves,
    // web-02 has nothing listening, web-03 answers 500 (ejected), web-04 is drained.
    let web_addr = t.host("web-01").unwrap().address;
    let web01 = backend(web_addr, 200, 404).await;
    let web03 = backend(web_addr, 500, 500).await;
    let web04 = backend(web_addr, 200, 404).await;
    let web05 = dropping_backend(web_addr).await;
    let web06 = backend(web_addr, 200, 404).await;
    let web02 = {
        let l = std::net::TcpListener::bind((t.host("web-02").unwrap().address, 0)).unwrap();
        l.local_addr().unwrap()
    };
    let mut lcfg = lb::LbConfig::from_topology(
        &t,
        "lb-01",
        pki.paths.clone(),
        test_support::net(&t, "lb-01"),
    )
    .unwrap();
    lcfg.https_port = 0;
    lcfg.http_port = 0;
    lcfg.plain_backends = true;
    lcfg.access_log = None;
    lcfg.admin_socket = None;
    lcfg.health = topology::HealthCheck {
        path: "/healthz".into(),
        interval_ms: 100,
        timeout_ms: 1000,
        rise: 2,
        fall: 2,
    };
    lcfg.backends = vec![
        lb::Backend::new("web-01", web01),
        lb::Backend::new("web-02", web02),
        lb::Backend::new("web-03", web03),
        lb::Backend::new("web-04", web04),
        lb::Backend::new("web-05", web05),
        lb::Backend::new("web-06", web06),
    ];
    // Ejected for longer than the test.
    lcfg.balancer.balancing.ejection_base_ms = 600_000;
    lcfg.balancer.balancing.ejection_max_ms = 600_000;
    let mut without_web06 = lcfg.clone();
    without_web06.backends.retain(|b| b.name != "web-06");
    let balancer = lb::start(lcfg, &mut registry, &http).await.unwrap();
    eventually("all but web-02 up behind lb-01", WAIT, || {
        let up = balancer.backends().iter().filter(|(_, up)| *up).count() == 5;
        async move { up.then_some(()) }
    })
    .await;
    assert!(balancer.set_draining("web-04", true));
    let _agent = start_agent(acfg, registry, vec![]).await.unwrap();

    let tls = pki::mtls_client_config(&pki.paths, &Identity::Admin, &[b"http/1.1"]).unwrap();
    let admin = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve("mon-01", mon.addr())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("https://mon-01:{}", mon.addr().port());
    // The value of instant query `expr` for lb-01's `backend` in the Prometheus API.
    let value = |expr: &'static str, backend: &'static str| {
        let (admin, base) = (admin.clone(), base.clone());
        async move {
            let doc: serde_json::Value = admin
                .get(format!("{base}/api/v1/query"))
                .query(&[("query", expr)])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let series = doc["data"]["result"]
                .as_array()?
                .iter()
                .find(|s| s["metric"]["backend"] == backend)?;
            series["value"][1].as_str()?.parse::<f64>().ok()
        }
    };
    // The monitor holds web-03's ejection counter at 0 before any request (so its
    // increase counts the ejection to come) and web-06 up...
    eventually(
        "web-03's ejections at 0 and web-06 up in the API",
        WAIT,
        || async {
            let ejections = value("rampart_lb_backend_ejections_total", "web-03").await;
            let up = value("rampart_backend_up", "web-06").await;
            (ejections == Some(0.0) && up == Some(1.0)).then_some(())
        },
    )
    .await;
    // ...then a reload removes web-06: its series leave the pushes and go stale.
    let report = balancer.reload(Some(without_web06)).await.unwrap();
    assert!(!report.backends.iter().any(|b| b == "web-06"), "{report:?}");
    eventually("web-06 gone from the API", WAIT, || async {
        value("rampart_backend_up", "web-06")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    let site = reqwest::Client::builder()
        .use_preconfigured_tls(pki::ca_client_config(&pki.paths).unwrap())
        .resolve("www.foobar.com", balancer.https_addr())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let site_base = format!("https://www.foobar.com:{}", balancer.https_addr().port());
    // Requests through the load balancer every 50 ms while the test runs, one in four
    // answered 404 (bounded by the test's end).
    let browsing = tokio::spawn(async move {
        for i in 0..4000u32 {
            let path = if i % 4 == 0 { "/missing" } else { "/" };
            let _ = site.get(format!("{site_base}{path}")).send().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    eventually("web-03 ejected", WAIT, || {
        let ejected = balancer
            .backend_status()
            .iter()
            .any(|b| b.name == "web-03" && b.ejected);
        async move { ejected.then_some(()) }
    })
    .await;

    // Requests counted every 100 ms while the test runs (bounded by the test's end).
    let counting = tokio::spawn(async move {
        for i in 0..2000u32 {
            let status = if i % 10 == 0 {
                http::StatusCode::INTERNAL_SERVER_ERROR
            } else {
                http::StatusCode::OK
            };
            http.observe("lb", status, 0.002 * f64::from(i % 7 + 1));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let q = format!("{base}/api/v1/query?query=sum%20by%20(instance)%20(rate(rampart_http_requests_total%5B30s%5D))");
    eventually("QPS of lb-01 in the Prometheus API", WAIT, || async {
        let doc: serde_json::Value = admin.get(&q).send().await.ok()?.json().await.ok()?;
        (!doc["data"]["result"].as_array()?.is_empty()).then_some(())
    })
    .await;
    let q = format!("{base}/api/v1/query?query=rate(rampart_lb_backend_responses_total%7Bbackend%3D%22web-01%22%2Ccode%3D%224xx%22%7D%5B30s%5D)");
    eventually("web-01's 4xx rate in the Prometheus API", WAIT, || async {
        let doc: serde_json::Value = admin.get(&q).send().await.ok()?.json().await.ok()?;
        let v: f64 = doc["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()?;
        (v > 0.0).then_some(())
    })
    .await;
    eventually("web-05's retries in the Prometheus API", WAIT, || async {
        let v = value("rate(rampart_lb_backend_retries_total[30s])", "web-05").await?;
        (v > 0.0).then_some(())
    })
    .await;

    let listener = tokio::net::TcpListener::bind("127.112.4.1:0")
        .await
        .unwrap();
    let relay_addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(relay)
        .with_state((admin.clone(), Arc::new(base.clone())));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--enable-logging=stderr",
                "--virtual-time-budget=20000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("http://{relay_addr}/"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium did not finish within 120 s")
    .unwrap();
    counting.abort();
    browsing.abort();
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed:\n{log}");

    // The page recorded no error (failed fetch, script error, rejected promise).
    let errlog = dom
        .split("<pre id=\"errlog\" hidden=\"\">")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .unwrap_or_else(|| panic!("no #errlog in the DOM:\n{dom}"));
    assert!(errlog.is_empty(), "the page reported errors: {errlog}");
    // And the browser logged no script error.
    for bad in ["Uncaught", "SyntaxError", "TypeError", "ReferenceError"] {
        assert!(
            !log.lines()
                .any(|l| l.contains("CONSOLE") && l.contains(bad)),
            "{bad} in the console:\n{log}"
        );
    }
    // Every chart is a uPlot canvas; the request, latency and host charts have points.
    let charts: Vec<&str> = dom.split("class=\"panel chart\"").skip(1).collect();
    let titles: Vec<&str> = charts
        .iter()
        .map(|c| {
            c.split("<h2>")
                .nth(1)
                .and_then(|s| s.split("</h2>").next())
                .unwrap_or("")
        })
        .collect();
    assert_eq!(charts.len(), 11, "{titles:?}");
    for want in [
        "Firewall: kernel drops per second (packets/s)",
        "Replication lag (s)",
    ] {
        assert!(titles.contains(&want), "no {want:?} chart: {titles:?}");
    }
    let canvases = dom.matches("<canvas").count();
    assert!(
        canvases >= charts.len(),
        "{canvases} canvases for {} charts",
        charts.len()
    );
    let points: Vec<u64> = charts
        .iter()
        .map(|c| {
            c.split("data-points=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    eprintln!("points per chart: {points:?}; canvases {canvases}; errlog {errlog:?}");
    for (i, name) in [
        (0, "QPS"),
        (2, "latency p99"),
        (4, "CPU"),
        (5, "memory"),
        (10, "replication lag"),
    ] {
        assert!(points[i] > 0, "the {name} chart has no point: {points:?}");
    }
    // The hosts table lists lb-01 as up; no alert table error.
    assert!(
        dom.contains("<td>lb-01</td><td class=\"up\">up</td>"),
        "{dom}"
    );

    // The backends table: every column, each filled from lb-01's series.
    let head = dom
        .split("<tr id=\"backend-head\">")
        .nth(1)
        .and_then(|s| s.split("</tr>").next())
        .unwrap_or_else(|| panic!("no backends header:\n{dom}"));
    let columns = [
        "load balancer",
        "backend",
        "state",
        "active req",
        "queue",
        "conns active",
        "conns idle",
        "2xx/s",
        "4xx/s",
        "5xx/s",
        "p99",
        "retries/s",
        "ejections 5m",
        "tunnels",
    ];
    let header: String = columns.iter().map(|c| format!("<th>{c}</th>")).collect();
    assert_eq!(head, header);
    let col = |name: &str| columns.iter().position(|c| *c == name).unwrap();
    let number = |row: &[String], name: &str| -> f64 {
        let text = &row[col(name)];
        text.trim_end_matches(" ms")
            .parse()
            .unwrap_or_else(|_| panic!("{name} is {text:?} in {row:?}"))
    };
    let up = backend_row(&dom, "web-01");
    let down = backend_row(&dom, "web-02");
    let ejected = backend_row(&dom, "web-03");
    let drained = backend_row(&dom, "web-04");
    let dropping = backend_row(&dom, "web-05");
    eprintln!("backends table: {up:?}\n{down:?}\n{ejected:?}\n{drained:?}\n{dropping:?}");
    assert_eq!(up.len(), columns.len(), "{up:?}");
    assert_eq!((up[0].as_str(), up[2].as_str()), ("lb-01", "up"));
    assert_eq!(down[2], "down", "{down:?}");
    // Every value cell of web-01 comes from a series that exists (none shows "–").
    for name in &columns[3..] {
        number(&up, name);
    }
    assert!(number(&up, "2xx/s") > 0.0, "{up:?}");
    assert!(number(&up, "4xx/s") > 0.0, "{up:?}");
    assert!(number(&up, "p99") > 0.0, "{up:?}");
    assert_eq!(number(&up, "5xx/s"), 0.0, "{up:?}");
    assert_eq!(number(&down, "2xx/s"), 0.0, "{down:?}");
    assert_eq!(ejected[2], "ejected", "{ejected:?}");
    assert!(number(&ejected, "ejections 5m") >= 1.0, "{ejected:?}");
    assert_eq!(number(&up, "ejections 5m"), 0.0, "{up:?}");
    assert_eq!(drained[2], "draining", "{drained:?}");
    // web-05's dropped requests were retried on another backend, and it stays up (a
    // success between two failures: never ejected).
    assert_eq!(dropping[2], "up", "{dropping:?}");
    assert!(number(&dropping, "retries/s") > 0.0, "{dropping:?}");
    assert_eq!(number(&up, "retries/s"), 0.0, "{up:?}");
    // The backend the reload removed has no row.
    assert!(
        !dom.contains("<td>web-06</td>"),
        "web-06 is listed after its removal"
    );
}
