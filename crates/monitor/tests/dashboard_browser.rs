//! The dashboard in a real browser: mon-01 and lb-01's agent in-process (127.112.0.0/24,
//! real PKI), lb-01 counting requests; headless Chromium loads the dashboard and its
//! vendored uPlot through a plain-HTTP relay on 127.112.4.1 that presents the admin client
//! certificate to mon-01 (headless Chromium cannot pick a client certificate without a
//! user profile), lets the page refresh for a virtual 20 s, and dumps the DOM: no error
//! recorded by the page, all 11 charts drawn as uPlot canvases (firewall drops and
//! replication lag among them), the ones with data non-empty.

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
    let _agent = start_agent(acfg, registry, vec![]).await.unwrap();

    let tls = pki::mtls_client_config(&pki.paths, &Identity::Admin, &[b"http/1.1"]).unwrap();
    let admin = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve("mon-01", mon.addr())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("https://mon-01:{}", mon.addr().port());
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
}
