//! The per-backend series across reloads, as `/metrics` and the agent's pushes carry them
//! (the registry encoded in the Prometheus text format): a backend a reload removes stops
//! being reported by its gauges, and a backend a reload keeps keeps its counters (a
//! Prometheus counter is monotonic for the life of the process). Load balancer and
//! plain-HTTP backends on 127.99.2.0/24, ports chosen by the kernel.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use lb::{Backend, LbConfig, LbHandle};
use prometheus_client::registry::Registry;
use test_support::{eventually, TestPki};
use topology::HealthCheck;

const WAIT: Duration = Duration::from_secs(20);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 99, 2, last])
}

/// A plain HTTP/1.1 backend answering its name, or 500 to everything but `/healthz` when
/// `failing` (a backend whose application broke while its health endpoint still answers:
/// what passive outlier detection is for).
async fn backend(name: &'static str, last: u8, failing: bool) -> Backend {
    let addr = test_support::http_backend(ip(last), move |req| async move {
        let status = if failing && req.uri().path() != "/healthz" {
            500
        } else {
            200
        };
        test_support::text_response(status, name)
    })
    .await;
    Backend {
        name: name.into(),
        addr,
        server_name: None,
        weight: 1,
        backup: false,
    }
}

fn config(pki: &TestPki, backends: &[&Backend]) -> LbConfig {
    let net = firewall::Net::loopback(
        "lb-01",
        ip(10),
        Arc::new(topology::Policy::compile(&pki.topology)),
        pki.topology.limits.clone(),
    );
    let mut cfg = LbConfig::from_topology(&pki.topology, "lb-01", pki.paths.clone(), net).unwrap();
    cfg.https_port = 0;
    cfg.http_port = 0;
    cfg.plain_backends = true;
    cfg.health = HealthCheck {
        path: "/healthz".into(),
        interval_ms: 100,
        timeout_ms: 1000,
        rise: 2,
        fall: 2,
    };
    // Two failures in a row eject, for a minute (longer than the test).
    cfg.balancer.balancing.eject_consecutive_failures = 2;
    cfg.balancer.balancing.ejection_base_ms = 60_000;
    cfg.balancer.balancing.ejection_max_ms = 60_000;
    cfg.backends = backends.iter().map(|b| (*b).clone()).collect();
    cfg
}

fn client(pki: &TestPki, lb: &LbHandle) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(pki::ca_client_config(&pki.paths).unwrap())
        .resolve("www.foobar.com", lb.https_addr())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// The registry as a scrape of `/metrics` (and a push) carries it.
fn scrape(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

/// The value of the sample `series` (name and labels exactly as exported), if exported.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// Exported lines that carry `label` (e.g. `backend="B"`), other than those named in `allowed`.
fn lines_with<'t>(text: &'t str, label: &str, allowed: &[&str]) -> Vec<&'t str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(label))
        .filter(|l| !allowed.iter().any(|a| l.starts_with(a)))
        .collect()
}

async fn all_up(lb: &LbHandle) {
    eventually("every backend up", WAIT, || {
        let up = lb.backends().iter().all(|(_, up)| *up);
        async move { up.then_some(()) }
    })
    .await;
}

/// The series a removed backend may keep: its counters and histogram (monotonic).
const COUNTERS: &[&str] = &[
    "rampart_lb_backend_responses_total",
    "rampart_lb_backend_response_duration_seconds",
    "rampart_lb_backend_failures_total",
    "rampart_lb_backend_retries_total",
    "rampart_lb_backend_ejections_total",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_removed_by_a_reload_is_no_longer_reported() {
    let pki = TestPki::new(test_support::topology_in_block(99));
    let a = backend("A", 21, false).await;
    let b = backend("B", 22, false).await;
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb = lb::start(config(&pki, &[&a, &b]), &mut registry, &http)
        .await
        .unwrap();
    all_up(&lb).await;
    let client = client(&pki, &lb);
    let url = format!("https://www.foobar.com:{}/", lb.https_addr().port());
    for _ in 0..10 {
        assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    }
    let before = scrape(&registry);
    assert_eq!(
        value(&before, r#"rampart_backend_up{backend="B"}"#),
        Some(1.0)
    );
    let b_responses = value(
        &before,
        r#"rampart_lb_backend_responses_total{backend="B",code="2xx"}"#,
    )
    .unwrap();
    assert!(b_responses > 0.0, "B answered none of 10 requests");

    let report = lb.reload(Some(config(&pki, &[&a]))).await.unwrap();
    assert_eq!(report.backends, ["A"]);
    let after = scrape(&registry);
    // No gauge of B is left: the dashboard's rows (one per rampart_backend_up series)
    // and the backend-down rules no longer see it.
    let left = lines_with(&after, r#"backend="B""#, COUNTERS);
    assert!(
        left.is_empty(),
        "B is still reported after its removal: {left:#?}"
    );
    // Its counters stay, not lower than before.
    assert!(
        value(
            &after,
            r#"rampart_lb_backend_responses_total{backend="B",code="2xx"}"#
        )
        .unwrap()
            >= b_responses
    );
    // The kept backend is reported as before.
    assert_eq!(
        value(&after, r#"rampart_backend_up{backend="A"}"#),
        Some(1.0)
    );
    for series in [
        r#"rampart_lb_backend_ejected{backend="A"}"#,
        r#"rampart_lb_backend_draining{backend="A"}"#,
        r#"rampart_lb_backend_connections{backend="A",state="idle"}"#,
        r#"rampart_lb_backend_active_requests{backend="A"}"#,
        r#"rampart_lb_backend_queue_length{backend="A"}"#,
        r#"rampart_lb_websocket_tunnels{backend="A"}"#,
    ] {
        assert!(
            value(&after, series).is_some(),
            "{series} missing after the reload"
        );
    }
    for _ in 0..5 {
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "A");
    }

    // B back in: its health series is there again, and goes up.
    lb.reload(Some(config(&pki, &[&a, &b]))).await.unwrap();
    eventually("B reported up again", WAIT, || {
        let up = value(&scrape(&registry), r#"rampart_backend_up{backend="B"}"#);
        async move { (up == Some(1.0)).then_some(()) }
    })
    .await;
    lb.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_kept_by_a_reload_keeps_its_counters() {
    let pki = TestPki::new(test_support::topology_in_block(99));
    let a = backend("A", 31, false).await;
    let b = backend("B", 32, true).await;
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb = lb::start(config(&pki, &[&a, &b]), &mut registry, &http)
        .await
        .unwrap();
    all_up(&lb).await;
    let client = client(&pki, &lb);
    let url = format!("https://www.foobar.com:{}/", lb.https_addr().port());
    let ejections = r#"rampart_lb_backend_ejections_total{backend="B"}"#;
    let b_5xx = r#"rampart_lb_backend_responses_total{backend="B",code="5xx"}"#;
    let a_2xx = r#"rampart_lb_backend_responses_total{backend="A",code="2xx"}"#;
    // B answers 500 to every request it gets: two in a row eject it.
    let mut ejected = false;
    for _ in 0..100 {
        client.get(&url).send().await.unwrap();
        if value(&scrape(&registry), ejections).unwrap_or(0.0) >= 1.0 {
            ejected = true;
            break;
        }
    }
    assert!(ejected, "B was not ejected after 100 requests");
    let before = scrape(&registry);
    assert_eq!(
        value(&before, r#"rampart_lb_backend_ejected{backend="B"}"#),
        Some(1.0)
    );

    // The same backends again: a reload that keeps both.
    lb.reload(Some(config(&pki, &[&a, &b]))).await.unwrap();
    let after = scrape(&registry);
    for series in [ejections, b_5xx, a_2xx] {
        let (was, is) = (value(&before, series).unwrap(), value(&after, series));
        assert!(
            is.is_some_and(|is| is >= was),
            "{series} went from {was} to {is:?} across a reload"
        );
    }
    // The ejection carries over (10 s, the default base time): B is still ejected in the
    // new generation, and every request goes to A, none to B.
    assert_eq!(
        value(&after, r#"rampart_lb_backend_ejected{backend="B"}"#),
        Some(1.0),
        "the reload ended B's ejection: {:?}",
        lines_with(&after, r#"backend="B""#, &[])
    );
    for _ in 0..20 {
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let text = scrape(&registry);
    assert_eq!(
        value(&text, b_5xx),
        value(&after, b_5xx),
        "B answered after the reload"
    );
    assert_eq!(
        value(&text, a_2xx).unwrap(),
        value(&after, a_2xx).unwrap() + 20.0
    );
    assert_eq!(value(&text, ejections), value(&after, ejections));
    lb.shutdown();
}
