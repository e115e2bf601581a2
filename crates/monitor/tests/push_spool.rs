//! An agent cut off from the monitoring service for a minute delivers the gap afterwards:
//! lb-01's agent pushes to mon-01 (in-process, 127.112.0.0/24, real PKI) through a TCP relay
//! the test controls; the relay drops every connection for 60 s, then lets them through
//! again. The spool must hand the monitor every push of the outage, at its own time.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use monitor::{start_agent, start_monitor, AgentConfig, MonitorConfig};
use pki::Identity;
use prometheus_client::registry::Registry;
use serde_json::Value;
use test_support::{eventually, topology_in_block, TestPki};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const OUTAGE: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(60);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A TCP relay on `listen` to `to`, connecting from `from`; while `cut` is set, every
/// connection (open or new) is closed.
async fn relay(
    listen: SocketAddr,
    to: SocketAddr,
    from: IpAddr,
    cut: Arc<AtomicBool>,
) -> SocketAddr {
    let l = TcpListener::bind(listen).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut a, _)) = l.accept().await else {
                continue;
            };
            if cut.load(Ordering::SeqCst) {
                continue; // dropped: closed at once
            }
            let cut = cut.clone();
            tokio::spawn(async move {
                let s = TcpSocket::new_v4().unwrap();
                s.bind(SocketAddr::new(from, 0)).unwrap();
                let Ok(mut b): Result<TcpStream, _> = s.connect(to).await else {
                    return;
                };
                let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
                tokio::pin!(copy);
                // Bounded: the copy ends with either side, or within 100 ms of a cut.
                loop {
                    tokio::select! {
                        _ = &mut copy => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            if cut.load(Ordering::SeqCst) {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// One sample `(time, value)` list of `name` of lb-01 from the monitor's series API.
async fn samples(client: &reqwest::Client, base: &str, name: &str) -> Option<Vec<(f64, f64)>> {
    let url = format!("{base}/api/v1/series?name={name}&host=lb-01");
    let doc: Value = client.get(url).send().await.ok()?.json().await.ok()?;
    let s = doc["series"].as_array()?.first()?["samples"]
        .as_array()?
        .clone();
    Some(
        s.iter()
            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
            .collect(),
    )
}

/// The agent's own push metrics from its `/metrics`, by name and `result` label.
async fn agent_metric(client: &reqwest::Client, url: &str, line_prefix: &str) -> Option<f64> {
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_cut_off_is_delivered_afterwards() {
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
    let monitor = start_monitor(mcfg).await.unwrap();

    let cut = Arc::new(AtomicBool::new(false));
    let relay_addr = relay(
        "127.112.0.99:0".parse().unwrap(),
        monitor.addr(),
        ip("127.112.0.10"),
        cut.clone(),
    )
    .await;

    let spool_dir = tempfile::tempdir().unwrap();
    let mut acfg = AgentConfig::from_topology(
        &t,
        "lb-01",
        pki.paths.clone(),
        test_support::net(&t, "lb-01"),
    )
    .unwrap();
    acfg.port = 0;
    acfg.monitor.1 = relay_addr;
    acfg.spool_dir = Some(spool_dir.path().join("lb-01"));
    let agent = start_agent(acfg, Registry::default(), vec![])
        .await
        .unwrap();

    let tls = pki::mtls_client_config(&pki.paths, &Identity::Admin, &[b"http/1.1"]).unwrap();
    // Pooled connections are dropped after 30 s idle, below the listeners' 60 s keep-alive
    // timeout (as a client should, RFC 9112 §9.3.1): the first query after the 60 s
    // outage would otherwise go out on a connection the server is closing at that moment,
    // and fail with an incomplete message.
    let admin = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve("mon-01", monitor.addr())
        .resolve("lb-01", agent.addr())
        .timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let base = format!("https://mon-01:{}", monitor.addr().port());
    let metrics = format!("https://lb-01:{}/metrics", agent.addr().port());
    let series = "process_start_time_seconds";

    eventually("lb-01's pushes stored", WAIT, || async {
        let s = samples(&admin, &base, series).await?;
        (s.len() >= 3).then_some(())
    })
    .await;

    // The outage.
    cut.store(true, Ordering::SeqCst);
    let cut_at = unix_now();
    tokio::time::sleep(OUTAGE).await;
    let before = samples(&admin, &base, series).await.unwrap();
    let spooled = agent_metric(
        &admin,
        &metrics,
        "rampart_agent_spool_records{target=\"monitor\"} ",
    )
    .await
    .unwrap();
    assert!(
        spooled >= 10.0,
        "the agent spooled only {spooled} pushes during the outage"
    );
    let failed = agent_metric(
        &admin,
        &metrics,
        "rampart_agent_pushes_total{target=\"monitor\",result=\"failed\"}",
    )
    .await
    .unwrap();
    assert!(failed > 0.0, "no delivery failed: the relay did not cut");
    let restored_at = unix_now();
    cut.store(false, Ordering::SeqCst);

    // The spool drains, oldest first.
    eventually("the spool drained", WAIT, || async {
        let n = agent_metric(
            &admin,
            &metrics,
            "rampart_agent_spool_records{target=\"monitor\"} ",
        )
        .await?;
        (n == 0.0).then_some(())
    })
    .await;
    let after = eventually("the outage's samples stored", WAIT, || async {
        let s = samples(&admin, &base, series).await?;
        s.iter().any(|(t, _)| *t > restored_at).then_some(s)
    })
    .await;
    let during = |s: &[(f64, f64)]| {
        s.iter()
            .filter(|(t, _)| *t > cut_at + 1.0 && *t < restored_at - 1.0)
            .count()
    };
    assert!(
        during(&before) <= 1,
        "samples arrived during the outage: {}",
        during(&before)
    );
    assert!(during(&after) > 0, "no sample of the outage was delivered");
    // Nothing lost: from the first push to the last, no hole wider than a few push
    // intervals (without the spool the outage would leave a 60 s hole).
    let widest = after
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .fold(0.0, f64::max);
    assert!(
        widest < 10.0,
        "a {widest:.1} s hole in lb-01's samples after the outage"
    );
    for (label, want) in [("refused", 0.0), ("lost", 0.0)] {
        let v = agent_metric(
            &admin,
            &metrics,
            &format!("rampart_agent_pushes_total{{target=\"monitor\",result=\"{label}\"}}"),
        )
        .await
        .unwrap();
        assert_eq!(v, want, "pushes {label}");
    }
    let dropped = agent_metric(
        &admin,
        &metrics,
        "rampart_agent_spool_dropped_total{target=\"monitor\"} ",
    )
    .await
    .unwrap();
    assert_eq!(dropped, 0.0);
    // The monitor refused none of the delivered samples as too old or otherwise bad; a
    // push whose answer the cut swallowed comes again and is refused as out of order, which
    // is the monitor keeping each sample once.
    let ingest = monitor.state().ingest_stats();
    let bad: Vec<_> = ingest["lb-01"]
        .rejected_samples
        .iter()
        .filter(|(reason, _)| **reason != "out_of_order")
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
    // A network interface recreated meanwhile (the netns tests do) restarts its counters:
    // stored as resets, not refused.
    println!(
        "counter resets stored for lb-01: {}",
        ingest["lb-01"].counter_resets
    );
    // The spool directory is empty again.
    let left = std::fs::read_dir(spool_dir.path().join("lb-01"))
        .unwrap()
        .count();
    assert_eq!(left, 0);
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
