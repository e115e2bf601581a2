//! Balancing algorithms, stickiness, health (active and passive) and retries of the load
//! balancer against real backends started in the test (see `common`).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{served_by, setup, Mode, Setup};
use http::StatusCode;
use topology::Algorithm;

/// `n` sequential GETs of `/`; how many each backend served.
async fn spread(s: &Setup, n: usize) -> HashMap<String, usize> {
    let c = s.client(false);
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = c.get(s.url("/")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        *seen.entry(served_by(&r)).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_with_a_backup() {
    let s = setup(3, false, |cfg| {
        cfg.balancer.balancing.algorithm = Algorithm::WeightedRoundRobin;
        cfg.backends[0].weight = 3;
        cfg.backends[2].backup = true;
    })
    .await;
    let seen = spread(&s, 40).await;
    println!("weights 3/1 + backup: {seen:?}");
    assert_eq!(seen.get("web-01"), Some(&30));
    assert_eq!(seen.get("web-02"), Some(&10));
    assert_eq!(
        seen.get("web-03"),
        None,
        "the backup served while primaries were up"
    );

    // Both primaries fail their health checks: the backup takes over.
    s.backends[0].healthy.store(false, Ordering::SeqCst);
    s.backends[1].healthy.store(false, Ordering::SeqCst);
    s.wait_available("web-01", false).await;
    s.wait_available("web-02", false).await;
    assert_eq!(spread(&s, 6).await.get("web-03"), Some(&6));
    // One primary back: the backup is idle again.
    s.backends[1].healthy.store(true, Ordering::SeqCst);
    s.wait_available("web-02", true).await;
    assert_eq!(spread(&s, 6).await.get("web-02"), Some(&6));
}

/// Sends `n` GETs of `/`, `concurrency` at a time; how many each backend served.
async fn concurrent_spread(s: &Setup, n: usize, concurrency: usize) -> HashMap<String, usize> {
    let c = s.client(false);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (c, next, url) = (c.clone(), next.clone(), s.url("/"));
        tasks.spawn(async move {
            let mut seen: HashMap<String, usize> = HashMap::new();
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                *seen.entry(served_by(&r)).or_default() += 1;
            }
            seen
        });
    }
    let mut all = HashMap::new();
    while let Some(seen) = tasks.join_next().await {
        for (k, v) in seen.unwrap() {
            *all.entry(k).or_default() += v;
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_and_two_choices_send_less_to_a_slow_backend() {
    for algorithm in [Algorithm::LeastConnections, Algorithm::PowerOfTwoChoices] {
        let s = setup(2, false, |cfg| cfg.balancer.balancing.algorithm = algorithm).await;
        s.backends[0].set_delay(Duration::from_millis(200));
        let seen = concurrent_spread(&s, 60, 6).await;
        println!(
            "{}: slow web-01 vs fast web-02: {seen:?}",
            algorithm.as_str()
        );
        let slow = seen.get("web-01").copied().unwrap_or(0);
        let fast = seen.get("web-02").copied().unwrap_or(0);
        assert_eq!(slow + fast, 60);
        // Round robin would give each 30; the slow one always has requests in flight.
        assert!(slow < 20, "{seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_on_a_header_keeps_each_user_on_one_backend() {
    let s = setup(3, false, |cfg| {
        cfg.balancer.balancing.algorithm = Algorithm::ConsistentHash;
        cfg.balancer.balancing.hash_header = Some("x-user".into());
    })
    .await;
    let c = s.client(false);
    let mut home = HashMap::new();
    for u in 0..30 {
        for _ in 0..3 {
            let r = c
                .get(s.url("/"))
                .header("x-user", format!("user-{u}"))
                .send()
                .await
                .unwrap();
            let b = served_by(&r);
            assert_eq!(home.entry(u).or_insert_with(|| b.clone()), &b, "user-{u}");
        }
    }
    let mut per: HashMap<&str, usize> = HashMap::new();
    for b in home.values() {
        *per.entry(b).or_default() += 1;
    }
    println!("users per backend: {per:?}");
    assert!(per.len() >= 2, "{per:?}");

    // web-02 goes down: only its users move.
    s.backends[1].healthy.store(false, Ordering::SeqCst);
    s.wait_available("web-02", false).await;
    for (u, was) in &home {
        let r = c
            .get(s.url("/"))
            .header("x-user", format!("user-{u}"))
            .send()
            .await
            .unwrap();
        let now = served_by(&r);
        if was == "web-02" {
            assert_ne!(now, "web-02");
        } else {
            assert_eq!(&now, was, "user-{u} moved off a healthy backend");
        }
    }
}

/// The `name=value` part of a response's `Set-Cookie`, if any.
fn set_cookie(r: &reqwest::Response) -> Option<String> {
    let v = r.headers().get("set-cookie")?.to_str().ok()?;
    Some(v.split(';').next()?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_pins_a_client_and_re_pins_it_when_its_backend_goes_down() {
    let s = setup(2, true, |cfg| {
        cfg.balancer.balancing.sticky_cookie = Some("rampart_backend".into());
    })
    .await;
    let c = s.client(true);
    let first = c.get(s.url("/")).send().await.unwrap();
    let pinned = served_by(&first);
    let cookie = set_cookie(&first).expect("a Set-Cookie on the first answer");
    assert!(cookie.starts_with("rampart_backend="), "{cookie}");
    let attrs = first.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        attrs.contains("HttpOnly") && attrs.contains("Secure"),
        "{attrs}"
    );
    for _ in 0..10 {
        let r = c
            .get(s.url("/"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(served_by(&r), pinned);
        assert_eq!(set_cookie(&r), None, "already pinned: no new cookie");
        // The backend still sees the client's cookie.
        assert_eq!(r.headers()["x-seen-cookie"], cookie.as_str());
    }
    let i = s.backends.iter().position(|b| b.name == pinned).unwrap();
    s.backends[i].healthy.store(false, Ordering::SeqCst);
    s.wait_available(&pinned, false).await;
    let moved = c
        .get(s.url("/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let other = served_by(&moved);
    assert_ne!(other, pinned);
    let cookie2 = set_cookie(&moved).expect("re-pinned with a new cookie");
    assert_ne!(cookie2, cookie);
    // The old backend comes back; the client stays on its new one.
    s.backends[i].healthy.store(true, Ordering::SeqCst);
    s.wait_available(&pinned, true).await;
    for _ in 0..5 {
        let r = c
            .get(s.url("/"))
            .header("cookie", &cookie2)
            .send()
            .await
            .unwrap();
        assert_eq!(served_by(&r), other);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_a_backend_down_and_up_and_all_down_is_a_quick_503() {
    let s = setup(2, true, |_| {}).await;
    let up = |name: &str| format!("rampart_backend_up{{backend=\"{name}\"}}");
    assert_eq!(s.metric(&up("web-01")), 1.0);
    for b in &s.backends {
        b.healthy.store(false, Ordering::SeqCst);
    }
    let t = Instant::now();
    s.wait_available("web-01", false).await;
    s.wait_available("web-02", false).await;
    println!(
        "both down {:?} after their checks started failing (fall 2, interval 100 ms)",
        t.elapsed()
    );
    assert_eq!(s.metric(&up("web-01")), 0.0);
    assert!(!s.lb.healthy());
    let c = s.client(false);
    let t = Instant::now();
    let r = c.get(s.url("/")).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    let body = r.text().await.unwrap();
    println!("every backend down: 503 in {took:?}: {body:?}");
    assert!(body.contains("no backend"), "{body}");
    // A backend that passes `rise` checks again takes traffic.
    s.backends[1].healthy.store(true, Ordering::SeqCst);
    s.wait_available("web-02", true).await;
    assert_eq!(spread(&s, 4).await.get("web-02"), Some(&4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_eject_a_backend_until_its_time_is_over() {
    let s = setup(2, true, |cfg| {
        let b = &mut cfg.balancer.balancing;
        b.algorithm = Algorithm::RoundRobin;
        b.eject_consecutive_failures = 3;
        b.ejection_base_ms = 1_500;
        b.slow_start_ms = 0;
    })
    .await;
    // web-01's health checks pass, but it answers every request with 500.
    s.backends[0].set_mode(Mode::Fail);
    let c = s.client(false);
    let mut fives = 0;
    for _ in 0..20 {
        let r = c.get(s.url("/")).send().await.unwrap();
        if r.status() == StatusCode::INTERNAL_SERVER_ERROR {
            fives += 1;
        }
    }
    println!("500s before the ejection: {fives}");
    // Three 500s in a row eject it; the client saw exactly those.
    assert_eq!(fives, 3);
    let ejections = "rampart_lb_backend_ejections_total{backend=\"web-01\"}";
    assert_eq!(s.metric(ejections), 1.0);
    assert_eq!(
        s.metric("rampart_lb_backend_ejected{backend=\"web-01\"}"),
        1.0
    );
    assert_eq!(
        s.metric("rampart_lb_backend_responses_total{backend=\"web-01\",code=\"5xx\"}"),
        3.0
    );
    assert!(s.lb.backend_status()[0].up, "active checks still pass");
    // Fixed, it returns once the ejection (1.5 s) is over.
    s.backends[0].set_mode(Mode::Answer);
    s.wait_available("web-01", true).await;
    assert_eq!(spread(&s, 4).await.get("web-01"), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_with_no_backend_left_to_try_is_a_bad_gateway_not_a_refusal() {
    // One backend, which drops every request unanswered: the GET is retried, finds no
    // other backend, and gets the failure's 502, not the "no backend" refusal (that one
    // is for when no backend is up at all).
    let s = setup(1, true, |cfg| {
        cfg.balancer.balancing.eject_consecutive_failures = 0;
    })
    .await;
    s.backends[0].set_mode(Mode::Drop);
    let r = s.client(false).get(s.url("/item")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(r.text().await.unwrap().trim(), "bad gateway");
    assert_eq!(
        s.metric("rampart_lb_rejected_requests_total{reason=\"no_backend\"}"),
        0.0,
        "{}",
        s.metrics()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_answer_is_retried_for_idempotent_methods_only() {
    let s = setup(2, true, |cfg| {
        let b = &mut cfg.balancer.balancing;
        b.algorithm = Algorithm::RoundRobin;
        b.eject_consecutive_failures = 0;
    })
    .await;
    // web-01 reads each request, then closes the connection without answering.
    s.backends[0].set_mode(Mode::Drop);
    let c = s.client(false);
    for (i, method) in ["GET", "PUT", "DELETE", "GET"].iter().enumerate() {
        for j in 0..3 {
            let id = format!("{method}-{i}-{j}");
            let r = c
                .request(method.parse().unwrap(), s.url("/item"))
                .header("x-test-id", &id)
                .body("payload")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{id}");
            assert_eq!(served_by(&r), "web-02", "{id}");
        }
    }
    let retried: usize = ["GET", "PUT", "DELETE"]
        .iter()
        .map(|m| s.backends[0].ids(m).len())
        .sum();
    println!("idempotent requests web-01 dropped and web-02 answered: {retried}");
    assert!(retried > 0, "round robin never tried web-01");
    let retries = s.metric("rampart_lb_backend_retries_total{backend=\"web-01\"}");
    assert!(retries >= retried as f64, "{retries}");

    // POST and PATCH are never sent twice: those web-01 dropped get 502.
    let mut bad_gateway = 0;
    for i in 0..6 {
        let method = if i % 2 == 0 { "POST" } else { "PATCH" };
        let id = format!("{method}-{i}");
        let r = c
            .request(method.parse().unwrap(), s.url("/item"))
            .header("x-test-id", &id)
            .body("payload")
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::OK => assert_eq!(served_by(&r), "web-02"),
            StatusCode::BAD_GATEWAY => bad_gateway += 1,
            other => panic!("{id}: {other}"),
        }
    }
    let dropped: usize = ["POST", "PATCH"]
        .iter()
        .map(|m| s.backends[0].ids(m).len())
        .sum();
    assert!(dropped > 0, "round robin never tried web-01");
    assert_eq!(bad_gateway, dropped);
    for m in ["POST", "PATCH"] {
        let twice: Vec<_> = s.backends[0]
            .ids(m)
            .intersection(&s.backends[1].ids(m))
            .cloned()
            .collect();
        assert!(twice.is_empty(), "{m} sent to both backends: {twice:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_load_loses_no_idempotent_request() {
    const REQUESTS: usize = 400;
    const WORKERS: usize = 8;
    let s = setup(2, true, |_| {}).await;
    for b in &s.backends {
        b.set_delay(Duration::from_millis(10));
    }
    let c = s.client(false);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let (c, next, done, url) = (c.clone(), next.clone(), done.clone(), s.url("/"));
        tasks.spawn(async move {
            let mut failed = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= REQUESTS {
                    break;
                }
                let method = if i % 2 == 0 { "GET" } else { "PUT" };
                let r = c
                    .request(method.parse().unwrap(), &url)
                    .header("x-test-id", i.to_string())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == StatusCode::OK => {}
                    Ok(r) => failed.push(format!("{method} {i}: {}", r.status())),
                    Err(e) => failed.push(format!("{method} {i}: {e}")),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            failed
        });
    }
    test_support::eventually("a quarter of the load done", common::WAIT, || {
        let n = done.load(Ordering::SeqCst);
        async move { (n >= REQUESTS / 4).then_some(()) }
    })
    .await;
    let in_flight_at_web01 = s.lb.backend_status()[0].active_requests;
    s.backends[0].stop().await;
    let mut failed = Vec::new();
    while let Some(f) = tasks.join_next().await {
        failed.extend(f.unwrap());
    }
    let text = s.metrics();
    let retries: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("rampart_lb_backend_retries_total") || l.contains("failures_total{")
        })
        .collect();
    println!(
        "killed web-01 with {in_flight_at_web01} request(s) in flight; {} of {REQUESTS} failed; {retries:?}",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    let answered = s.backends[1].requests.load(Ordering::SeqCst);
    assert!(answered > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_finishes_its_requests_and_gets_no_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("lb-admin.sock");
    let path = socket.clone();
    let s = setup(2, true, move |cfg| {
        cfg.balancer.balancing.algorithm = Algorithm::RoundRobin;
        cfg.admin_socket = Some(path);
    })
    .await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Slow requests in flight on both backends.
    for b in &s.backends {
        b.set_delay(Duration::from_millis(600));
    }
    let c = s.client(false);
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (c, url) = (c.clone(), s.url("/slow"));
        slow.spawn(async move { c.get(url).send().await.map(|r| (r.status(), served_by(&r))) });
    }
    test_support::eventually("requests in flight on web-01", common::WAIT, || {
        let n = s.lb.backend_status()[0].active_requests;
        async move { (n > 0).then_some(()) }
    })
    .await;
    let answer = lb::admin::request(&socket, "drain web-01").await.unwrap();
    assert_eq!(answer["draining"], true);
    assert_eq!(
        s.metric("rampart_lb_backend_draining{backend=\"web-01\"}"),
        1.0
    );
    let status = lb::admin::request(&socket, "status").await.unwrap();
    assert_eq!(status["backends"][0]["draining"], true);
    assert_eq!(status["backends"][0]["available"], false);
    for b in &s.backends {
        b.set_delay(Duration::ZERO);
    }
    // New requests go to web-02 only, while web-01's in-flight ones finish with 200.
    assert_eq!(spread(&s, 6).await.get("web-02"), Some(&6));
    let mut finished_on = Vec::new();
    while let Some(r) = slow.join_next().await {
        let (status, by) = r.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK);
        finished_on.push(by);
    }
    println!("in-flight requests finished on {finished_on:?}");
    assert!(finished_on.iter().any(|b| b == "web-01"));
    // Unknown names and commands are refused.
    let e = lb::admin::request(&socket, "drain web-07")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("web-01, web-02"), "{e}");
    assert!(lb::admin::request(&socket, "reboot").await.is_err());
    lb::admin::request(&socket, "enable web-01").await.unwrap();
    assert_eq!(spread(&s, 4).await.get("web-01"), Some(&2));
    // Per-backend metrics: answers by class, durations, pooled connections.
    let text = s.metrics();
    for series in [
        "rampart_lb_backend_responses_total{backend=\"web-01\",code=\"2xx\"}",
        "rampart_lb_backend_response_duration_seconds_count{backend=\"web-02\"}",
        "rampart_lb_backend_connections{backend=\"web-01\",state=\"idle\"}",
        "rampart_lb_backend_ejected{backend=\"web-02\"} 0",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
    assert!(s.metric("rampart_lb_backend_connections{backend=\"web-02\",state=\"idle\"}") >= 1.0);
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_names_the_backend_and_the_timings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = path.clone();
    let s = setup(1, true, move |cfg| {
        cfg.access_log = Some(log);
        cfg.access_log_format = lb::AccessLogFormat::Json;
    })
    .await;
    let c = s.client(false);
    for i in 0..3 {
        let r = c
            .get(s.url(&format!("/page?n={i}")))
            .header("user-agent", "tester \"q\"")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let text = test_support::eventually("three JSON lines", common::WAIT, || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        async move { (text.lines().count() >= 3).then_some(text) }
    })
    .await;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    println!("{}", text.lines().next().unwrap());
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["client"], common::CLIENT_IP);
        assert_eq!(l["method"], "GET");
        assert_eq!(l["path"], format!("/page?n={i}"));
        assert_eq!(l["status"], 200);
        assert_eq!(l["backend"], "web-01");
        assert_eq!(l["user_agent"], "tester \"q\"");
        assert_eq!(l["listener"], "https");
        for key in [
            "request_time",
            "tls_handshake_time",
            "queue_time",
            "upstream_time",
        ] {
            assert!(l[key].as_f64().is_some(), "{key} in {l}");
        }
    }
    // The first request opened the upstream connection; the next ones reused it.
    assert!(lines[0]["connect_time"].as_f64().is_some(), "{}", lines[0]);
    assert!(lines[2]["connect_time"].is_null(), "{}", lines[2]);
}
