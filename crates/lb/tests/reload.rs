//! Hot reload of the load balancer's configuration under load: a bounded request loop runs
//! across several reloads that change the backend set and limits; no request may fail, a
//! request in flight on a removed backend completes there, and each new backend set takes
//! effect. Then graceful drain on stop. Load balancer and three plain-HTTP backends on
//! 127.114.2.0/24, ports chosen by the kernel.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb::{Backend, LbConfig, LbHandle};
use prometheus_client::registry::Registry;
use test_support::{eventually, TestPki};
use topology::HealthCheck;

const WAIT: Duration = Duration::from_secs(20);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 114, 2, last])
}

/// A plain HTTP/1.1 backend answering its name; `/slow` after `slow`.
async fn backend(name: &'static str, last: u8, slow: Duration) -> Backend {
    let addr = test_support::http_backend(ip(last), move |req| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(slow).await;
        }
        test_support::text_response(200, name)
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
    config_with(pki, backends, pki.topology.limits.clone())
}

fn config_with(pki: &TestPki, backends: &[&Backend], limits: topology::Limits) -> LbConfig {
    let net = firewall::Net::loopback(
        "lb-01",
        ip(10),
        Arc::new(topology::Policy::compile(&pki.topology)),
        limits,
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
    cfg.backends = backends.iter().map(|b| (*b).clone()).collect();
    cfg
}

/// Outcomes of the load loop.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: Mutex<Vec<String>>,
}

/// Requests until every backend of `want` has answered (at most 300): panics when one
/// outside `want` answers or one of `want` never does.
async fn only_and_all(client: &reqwest::Client, url: &str, want: &BTreeSet<String>, what: &str) {
    let mut seen = BTreeSet::new();
    for _ in 0..300 {
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let name = r.text().await.unwrap();
        assert!(want.contains(&name), "after {what}: {name} answered");
        seen.insert(name);
        if &seen == want {
            return;
        }
    }
    panic!("after {what}: only {seen:?} answered, not all of {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_no_request_and_switch_the_backend_set() {
    let pki = TestPki::new(test_support::topology_in_block(114));
    let slow = Duration::from_millis(1500);
    let a = backend("A", 11, slow).await;
    let b = backend("B", 12, slow).await;
    let c = backend("C", 13, slow).await;
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb: Arc<LbHandle> = Arc::new(
        lb::start(config(&pki, &[&a]), &mut registry, &http)
            .await
            .unwrap(),
    );
    eventually("A up", WAIT, || {
        let up = lb.backends().iter().all(|(_, up)| *up);
        async move { up.then_some(()) }
    })
    .await;
    let tls = pki::ca_client_config(&pki.paths).unwrap();
    let make_client = |h2: bool| {
        let mut tls = tls.clone();
        if !h2 {
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        }
        let b = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .resolve("www.foobar.com", lb.https_addr())
            .timeout(Duration::from_secs(15));
        if h2 { b } else { b.http1_only() }.build().unwrap()
    };
    let url = format!("https://www.foobar.com:{}/", lb.https_addr().port());

    // The load: 4 clients (2 HTTP/1.1 keep-alive, 2 HTTP/2), until told to stop, at most
    // 60 s and 40 000 requests in all.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut load = Vec::new();
    for i in 0..4 {
        let (client, url, stop, tally) = (
            make_client(i % 2 == 0),
            url.clone(),
            stop.clone(),
            tally.clone(),
        );
        load.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && tally.ok.load(Ordering::Relaxed) < 40_000
            {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(_) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tally.failed.lock().unwrap().push(format!("body: {e}")),
                    },
                    Ok(r) => tally
                        .failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => tally.failed.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }
    let probe = make_client(false);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A slow request in flight on A while A is removed: it completes, on A.
    let mut in_flight = Some({
        let (client, url) = (make_client(false), format!("{url}slow"));
        tokio::spawn(async move {
            let r = client.get(&url).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        })
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let steps: [(&str, Vec<&Backend>, u32); 4] = [
        ("A -> B and C", vec![&b, &c], 256),
        ("B and C -> C", vec![&c], 64),
        ("C -> A, B and C", vec![&a, &b, &c], 128),
        ("A, B and C -> A", vec![&a], 128),
    ];
    for (what, set, max_conns) in steps {
        let mut cfg = config(&pki, &set);
        cfg.balancer.backend_max_connections = max_conns;
        let started = Instant::now();
        let report = lb.reload(Some(cfg)).await.unwrap();
        println!(
            "reload {what}: generation {}, took {:?}, not up at swap: {:?}, {} requests ok so far",
            report.generation,
            started.elapsed(),
            report.down,
            tally.ok.load(Ordering::Relaxed)
        );
        let names: BTreeSet<String> = set.iter().map(|b| b.name.clone()).collect();
        assert_eq!(
            report.backends.iter().cloned().collect::<BTreeSet<_>>(),
            names
        );
        assert!(
            report.needs_restart.is_empty(),
            "{:?}",
            report.needs_restart
        );
        if let Some(slow) = in_flight.take() {
            let (status, body) = slow.await.unwrap();
            assert_eq!(
                (status.as_u16(), body.as_str()),
                (200, "A"),
                "the request in flight finished on A"
            );
        }
        // Once every new backend is up, traffic goes to exactly the new set.
        eventually(&format!("every backend of {what} up"), WAIT, || {
            let up = lb.backends().iter().all(|(_, up)| *up);
            async move { up.then_some(()) }
        })
        .await;
        only_and_all(&probe, &url, &names, what).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let failed = tally.failed.lock().unwrap().clone();
    println!(
        "{} requests ok, {} failed across 4 reloads",
        tally.ok.load(Ordering::Relaxed),
        failed.len()
    );
    assert!(
        tally.ok.load(Ordering::Relaxed) > 100,
        "the load loop barely ran"
    );
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(10)]
    );

    // A reload that is refused changes nothing.
    let mut bad = config(&pki, &[&a]);
    bad.backends.clear();
    let generation = lb.generation();
    assert!(lb.reload(Some(bad)).await.is_err());
    assert_eq!(lb.generation(), generation);
    only_and_all(
        &probe,
        &url,
        &BTreeSet::from(["A".to_string()]),
        "a refused reload",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_stays_drained_across_a_reload() {
    let pki = TestPki::new(test_support::topology_in_block(114));
    let a = backend("A", 21, Duration::ZERO).await;
    let b = backend("B", 22, Duration::ZERO).await;
    let c = backend("C", 23, Duration::ZERO).await;
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb = lb::start(config(&pki, &[&a, &b]), &mut registry, &http)
        .await
        .unwrap();
    eventually("A and B up", WAIT, || {
        let up = lb.backends().iter().all(|(_, up)| *up);
        async move { up.then_some(()) }
    })
    .await;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(pki::ca_client_config(&pki.paths).unwrap())
        .resolve("www.foobar.com", lb.https_addr())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let url = format!("https://www.foobar.com:{}/", lb.https_addr().port());
    assert!(lb.set_draining("A", true));
    only_and_all(&client, &url, &BTreeSet::from(["B".to_string()]), "drain A").await;

    // A new backend set that keeps A and B and adds C: A stays drained, and B's health
    // series never reads 0 while the new generation's checks run (no dip that could fire
    // a backend-down alert).
    let reloaded = AtomicBool::new(false);
    let reload = async {
        let r = lb.reload(Some(config(&pki, &[&a, &b, &c]))).await;
        reloaded.store(true, Ordering::SeqCst);
        r
    };
    let watch = async {
        let (mut samples, mut zeros) = (0, 0);
        while !reloaded.load(Ordering::SeqCst) {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            samples += 1;
            if text.contains(r#"rampart_backend_up{backend="B"} 0"#) {
                zeros += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (samples, zeros)
    };
    let (report, (samples, zeros)) = tokio::join!(reload, watch);
    report.unwrap();
    assert!(samples > 0);
    assert_eq!(
        zeros, 0,
        "B read as down in {zeros} of {samples} samples during the reload"
    );
    let a_status = lb
        .backend_status()
        .into_iter()
        .find(|s| s.name == "A")
        .unwrap();
    assert!(a_status.draining && !a_status.available, "{a_status:?}");
    only_and_all(
        &client,
        &url,
        &BTreeSet::from(["B".to_string(), "C".to_string()]),
        "a reload",
    )
    .await;

    assert!(lb.set_draining("A", false));
    only_and_all(
        &client,
        &url,
        &BTreeSet::from(["A".to_string(), "B".to_string(), "C".to_string()]),
        "enable A",
    )
    .await;
    lb.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_requests_in_flight_and_refuses_new_connections() {
    let pki = TestPki::new(test_support::topology_in_block(114));
    let slow = Duration::from_millis(800);
    let a = backend("A", 21, slow).await;
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb = lb::start(config(&pki, &[&a]), &mut registry, &http)
        .await
        .unwrap();
    eventually("A up", WAIT, || {
        let up = lb.healthy();
        async move { up.then_some(()) }
    })
    .await;
    let addr = lb.https_addr();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(pki::ca_client_config(&pki.paths).unwrap())
        .resolve("www.foobar.com", addr)
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let url = format!("https://www.foobar.com:{}/slow", addr.port());
    let mut in_flight = Vec::new();
    for _ in 0..3 {
        let (client, url) = (client.clone(), url.clone());
        in_flight.push(tokio::spawn(async move {
            let r = client.get(&url).send().await?;
            let status = r.status();
            r.text().await.map(|t| (status, t))
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let drain = tokio::spawn(async move {
        serve::RoleHandle::shutdown(&lb).await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The listener is closed: a new connection is refused.
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted while draining"
    );
    for r in in_flight {
        let (status, body) = r.await.unwrap().unwrap();
        assert_eq!((status.as_u16(), body.as_str()), (200, "A"));
    }
    tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("drain is bounded by drain_timeout_ms")
        .unwrap();
    println!("drained in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_drain_time_is_cut_at_the_drain_timeout() {
    let pki = TestPki::new(test_support::topology_in_block(114));
    // The backend answers /slow after 30 s; the drain gives requests 500 ms.
    let a = backend("A", 22, Duration::from_secs(30)).await;
    let mut limits = pki.topology.limits.clone();
    let https = limits.listeners.get_mut("https").unwrap();
    https.drain_timeout_ms = 500;
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let lb = lb::start(config_with(&pki, &[&a], limits), &mut registry, &http)
        .await
        .unwrap();
    eventually("A up", WAIT, || {
        let up = lb.healthy();
        async move { up.then_some(()) }
    })
    .await;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(pki::ca_client_config(&pki.paths).unwrap())
        .resolve("www.foobar.com", lb.https_addr())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let url = format!("https://www.foobar.com:{}/slow", lb.https_addr().port());
    let stuck = tokio::spawn(async move { client.get(&url).send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    // Far below the backend's 30 s: the drain does not wait for it.
    tokio::time::timeout(Duration::from_secs(15), serve::RoleHandle::shutdown(&lb))
        .await
        .expect("the drain ends at drain_timeout_ms, not when the request does");
    let outcome = tokio::time::timeout(Duration::from_secs(15), stuck)
        .await
        .expect("the client learns the connection closed")
        .unwrap();
    println!(
        "drain cut after {:?}; client saw {outcome:?}",
        started.elapsed()
    );
    assert!(outcome.is_err(), "{outcome:?}");
}
