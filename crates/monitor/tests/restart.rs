//! The monitoring service restarted keeps the last hour and its silences: mon-01 started
//! in-process (127.111.2.0/24, real PKI, mutual TLS) with a snapshot file and a silences
//! file, as the node starts it; lb-01 pushes an hour of timestamped samples over HTTPS; an
//! operator adds a silence; the service is stopped the way the node stops its roles
//! (`RoleHandle::shutdown`) and started again on the same files. The hour comes back
//! through `/api/v1/query_range` point for point, `rate()` over it is unchanged, the
//! silence is still listed and active, and lb-01's next push continues the series.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use monitor::{start_monitor, MonitorConfig};
use pki::Identity;
use serde_json::{json, Value};
use test_support::TestPki;

const PROBE: &str = "rampart_restart_probe_total";
/// One hour of one-second samples.
const HOUR: u32 = 3_600;
/// The probe counts 5 per second.
const PER_SECOND: f64 = 5.0;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn client(pki: &TestPki, who: &Identity, from: Option<std::net::IpAddr>) -> reqwest::Client {
    let tls = pki::mtls_client_config(&pki.paths, who, &[b"http/1.1"]).unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .local_address(from)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// `/api/v1/query_range` of `query` over `[start, end]` at `step` seconds: each series'
/// `(time, value)` points.
async fn query_range(
    admin: &reqwest::Client,
    addr: SocketAddr,
    query: &str,
    start: f64,
    end: f64,
    step: f64,
) -> Vec<Vec<(f64, f64)>> {
    let doc: Value = admin
        .post(format!("https://mon-01:{}/api/v1/query_range", addr.port()))
        .form(&[
            ("query", query.to_string()),
            ("start", start.to_string()),
            ("end", end.to_string()),
            ("step", step.to_string()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["status"], "success", "{doc}");
    doc["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p[0].as_f64().unwrap(),
                        p[1].as_str().unwrap().parse().unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

async fn silences(admin: &reqwest::Client, addr: SocketAddr) -> Vec<Value> {
    admin
        .get(format!("https://mon-01:{}/api/v2/silences", addr.port()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn admin_for(pki: &TestPki, addr: SocketAddr) -> reqwest::Client {
    let tls = pki::mtls_client_config(&pki.paths, &Identity::Admin, &[b"http/1.1"]).unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve("mon-01", addr)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_monitor_keeps_the_last_hour_and_its_silences() {
    let text = topology::DEFAULT_TOML.replace("127.80.0.", "127.111.2.");
    let t = topology::Topology::parse(&text, "restart test topology").unwrap();
    let pki = TestPki::new(t.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = MonitorConfig::from_topology(
        &t,
        "mon-01",
        pki.paths.clone(),
        test_support::net(&t, "mon-01"),
    )
    .unwrap();
    cfg.port = 0;
    cfg.snapshot = Some(dir.path().join("monitor.snapshot"));
    cfg.silences_file = Some(dir.path().join("silences.json"));
    let monitor = start_monitor(cfg.clone()).await.unwrap();

    // An hour of lb-01's samples, one a second, each at its own time, in one push: the
    // counter at 5/s and a gauge.
    let lb = t.host("lb-01").unwrap().address;
    let pusher = client(&pki, &Identity::Host("lb-01".into()), Some(lb));
    let end = unix_now().floor() - 1.0;
    let start = end - f64::from(HOUR - 1);
    let mut body = String::new();
    for i in 0..HOUR {
        let ms = (start + f64::from(i)) as i64 * 1000;
        body.push_str(&format!(
            "{PROBE}{{code=\"2xx\"}} {} {ms}\nrampart_restart_probe_gauge {} {ms}\n",
            f64::from(i) * PER_SECOND,
            i % 7
        ));
    }
    let push = |addr: SocketAddr, body: String| {
        let pusher = pusher.clone();
        async move {
            let r = pusher
                .post(format!("https://{addr}/api/v1/push"))
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let got = push(monitor.addr(), body).await;
    assert_eq!(
        got,
        json!({ "accepted": 2 * HOUR, "refused": {}, "counter_resets": 0 })
    );

    let admin = admin_for(&pki, monitor.addr());
    let before = query_range(&admin, monitor.addr(), PROBE, start, end, 1.0).await;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].len(), HOUR as usize, "an hour of points before");
    let rate_query = format!("rate({PROBE}[1m])");
    let rate_before = query_range(&admin, monitor.addr(), &rate_query, start, end, 60.0).await;

    // An operator's silence.
    let now = unix_now();
    let silence = json!({
        "matchers": [{"name": "alertname", "value": "HighQPS", "isRegex": false}],
        "startsAt": "2020-01-01T00:00:00Z",
        "endsAt": monitor::notify::rfc3339(now + 7_200.0),
        "createdBy": "ops",
        "comment": "load test",
    });
    let r = admin
        .post(format!(
            "https://mon-01:{}/api/v2/silences",
            monitor.addr().port()
        ))
        .json(&silence)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["silenceID"]
        .as_str()
        .unwrap()
        .to_string();
    let listed_before = silences(&admin, monitor.addr()).await;

    // Stopped as the node stops its roles, then started again on the same files.
    serve::RoleHandle::shutdown(&monitor).await;
    drop(monitor);
    let monitor = start_monitor(cfg).await.unwrap();
    let admin = admin_for(&pki, monitor.addr());

    let after = query_range(&admin, monitor.addr(), PROBE, start, end, 1.0).await;
    assert_eq!(after, before, "the hour comes back point for point");
    let rate_after = query_range(&admin, monitor.addr(), &rate_query, start, end, 60.0).await;
    assert_eq!(rate_after, rate_before);
    assert!(!rate_after.is_empty() && rate_after[0].len() >= 59);
    for (t, v) in &rate_after[0] {
        assert!((v - PER_SECOND).abs() < 1e-6, "rate {v} at {t}");
    }
    let gauge = query_range(
        &admin,
        monitor.addr(),
        "rampart_restart_probe_gauge",
        start,
        end,
        1.0,
    )
    .await;
    assert_eq!(gauge[0].len(), HOUR as usize);

    let listed = silences(&admin, monitor.addr()).await;
    assert_eq!(listed, listed_before, "the silences come back as they were");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["status"]["state"], "active");

    // lb-01's next sample continues the series (not out of order, not a reset).
    let next = format!(
        "{PROBE}{{code=\"2xx\"}} {} {}\n",
        f64::from(HOUR) * PER_SECOND,
        (end + 1.0) as i64 * 1000
    );
    let got = push(monitor.addr(), next).await;
    assert_eq!(
        got,
        json!({ "accepted": 1, "refused": {}, "counter_resets": 0 })
    );

    // Expiring the silence is kept too.
    let r = admin
        .delete(format!(
            "https://mon-01:{}/api/v2/silence/{id}",
            monitor.addr().port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    serve::RoleHandle::shutdown(&monitor).await;
    drop(monitor);
    let text = std::fs::read_to_string(dir.path().join("silences.json")).unwrap();
    assert!(text.contains("\"expired\""), "{text}");
}
