//! The agent and the monitoring service started in-process on 127.94.0.0/24 with a real PKI:
//! pushes arrive and become QPS (now and as history), identities are enforced, the QPS alert
//! fires and resolves.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use monitor::{start_agent, start_monitor, AgentConfig, AgentHandle, MonitorConfig, MonitorHandle};
use pki::Identity;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::Value;
use test_support::{eventually, topology_in_block, TestPki};
use topology::AlertRule;

const WAIT: Duration = Duration::from_secs(30);

type Requests = Family<Vec<(String, String)>, Counter>;

struct Lab {
    pki: TestPki,
    monitor: MonitorHandle,
    agent: AgentHandle,
    requests: Requests,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// mon-01 with `rule`, and lb-01's agent whose registry holds `rampart_http_requests`.
async fn start(rule: Option<AlertRule>, webhook: Option<String>) -> Lab {
    let t = topology_in_block(94);
    let pki = TestPki::new(t.clone());
    let mut mcfg = MonitorConfig::from_topology(
        &t,
        "mon-01",
        pki.paths.clone(),
        test_support::net(&t, "mon-01"),
    )
    .unwrap();
    mcfg.port = 0;
    if let Some(rule) = rule {
        mcfg.rule = rule;
    }
    mcfg.webhook_urls = webhook.into_iter().collect();
    let monitor = start_monitor(mcfg).await.unwrap();

    let mut acfg = AgentConfig::from_topology(
        &t,
        "lb-01",
        pki.paths.clone(),
        test_support::net(&t, "lb-01"),
    )
    .unwrap();
    assert_eq!(acfg.net.address(), ip("127.94.0.10"));
    acfg.port = 0;
    acfg.monitor.1 = monitor.addr();
    let mut registry = Registry::default();
    let requests = Requests::default();
    registry.register(
        "rampart_http_requests",
        "Client requests.",
        requests.clone(),
    );
    let agent = start_agent(acfg, registry, vec![]).await.unwrap();
    Lab {
        pki,
        monitor,
        agent,
        requests,
    }
}

impl Lab {
    /// A client presenting `who`, connecting from `from`, resolving mon-01 and lb-01.
    fn client(&self, who: Identity, from: &str) -> reqwest::Client {
        let tls = pki::mtls_client_config(&self.pki.paths, &who, &[b"h2", b"http/1.1"]).unwrap();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .resolve("mon-01", self.monitor.addr())
            .resolve("lb-01", self.agent.addr())
            .local_address(Some(ip(from)))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    fn admin(&self) -> reqwest::Client {
        self.client(Identity::Admin, "127.0.0.1")
    }

    fn url(&self, path: &str) -> String {
        format!("https://mon-01:{}{path}", self.monitor.addr().port())
    }

    fn count(&self, n: u64) {
        let labels = vec![
            ("role".to_string(), "lb".to_string()),
            ("code".to_string(), "2xx".to_string()),
        ];
        self.requests.get_or_create(&labels).inc_by(n);
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> Option<Value> {
    let r = client.get(url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

async fn status(req: reqwest::RequestBuilder) -> u16 {
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn pushes_become_qps_and_identities_are_enforced() {
    let lab = start(None, None).await;
    let admin = lab.admin();
    let qps_url = lab.url("/api/v1/qps");

    // lb-01 counts requests; its QPS shows up at the monitor.
    let doc = eventually("lb-01 with qps > 0 in /api/v1/qps", WAIT, || async {
        lab.count(5);
        let doc = get_json(&admin, &qps_url).await?;
        let qps = doc["hosts"]["lb-01"]["qps"].as_f64()?;
        (qps > 0.0).then_some(doc)
    })
    .await;
    assert_eq!(doc["window_seconds"], 10);
    assert_eq!(doc["hosts"]["lb-01"]["stale"], false);
    assert!(
        doc["hosts"]["lb-01"]["rate_window_seconds"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // web-01 and web-02 run no agent here.
    assert_eq!(doc["hosts"]["web-01"]["stale"], true);
    assert!(doc["hosts"]["web-01"]["last_push_age_seconds"].is_null());

    // The same rate as history: lb-01's recent points, one a second; none for web-01.
    let range_url = lab.url("/api/v1/qps_range?seconds=60&step=1");
    let range = eventually("lb-01 with qps > 0 in /api/v1/qps_range", WAIT, || async {
        let doc = get_json(&admin, &range_url).await?;
        let points = doc["hosts"]["lb-01"].as_array()?;
        let busy = points
            .iter()
            .any(|p| p[1].as_f64().is_some_and(|q| q > 0.0));
        busy.then_some(doc)
    })
    .await;
    assert_eq!(range["window_seconds"], 10);
    assert_eq!(range["step_seconds"], 1);
    assert_eq!(range["hosts"]["web-01"], serde_json::json!([]));
    let too_long = admin.get(lab.url("/api/v1/qps_range?seconds=901"));
    assert_eq!(status(too_long).await, 400);

    // Samples are stored under the pushing certificate's host.
    let series_url = lab.url("/api/v1/series?name=rampart_http_requests_total&host=lb-01");
    let series = get_json(&admin, &series_url).await.unwrap();
    let s = &series["series"][0];
    assert_eq!(s["host"], "lb-01");
    assert_eq!(s["labels"]["code"], "2xx");
    assert!(!s["samples"].as_array().unwrap().is_empty());

    // Only agent hosts may push.
    let body = "rampart_http_requests_total{code=\"2xx\"} 1\n";
    let push = lab.url("/api/v1/push");
    assert_eq!(status(admin.post(&push).body(body)).await, 403);
    let mon = lab.client(Identity::Host("mon-01".into()), "127.0.0.1");
    assert_eq!(status(mon.post(&push).body(body)).await, 403);
    // ...and agent hosts may not read.
    let lb = lab.client(Identity::Host("lb-01".into()), "127.94.0.10");
    assert_eq!(status(lb.get(&qps_url)).await, 403);
    assert_eq!(status(lb.get(&range_url)).await, 403);
    assert_eq!(status(lb.get(lab.url("/"))).await, 403);
    // A push from an agent host is validated and size-capped.
    assert_eq!(status(lb.post(&push).body("not metrics\n")).await, 400);
    let big = "m 1\n".repeat(300_000);
    assert_eq!(status(lb.post(&push).body(big)).await, 413);
    assert_eq!(status(lb.post(&push).body(body)).await, 200);

    // The dashboard is one HTML page for the admin.
    let r = admin.get(lab.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/html"), "{ct}");
    let html = r.text().await.unwrap();
    // Charts are drawn by the vendored uPlot from the Prometheus API.
    assert!(
        html.contains("/api/v1/query_range") && html.contains("/assets/uPlot.iife.min.js"),
        "{html}"
    );
    let js = admin
        .get(lab.url("/assets/uPlot.iife.min.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.text().await.unwrap().contains("uPlot"));

    // The agent's /metrics: the classic text format unless OpenMetrics is asked for ...
    let metrics_url = format!("https://lb-01:{}/metrics", lab.agent.addr().port());
    let r = admin.get(&metrics_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let classic = r.text().await.unwrap();
    assert!(classic.contains("# TYPE rampart_http_requests_total counter"));
    assert!(!classic.contains("# EOF"));
    // ... and OpenMetrics, with host and firewall metrics, for a scraper that asks.
    let r = admin
        .get(&metrics_url)
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"));
    let samples = monitor::exposition::parse(&text).unwrap();
    let names: Vec<_> = samples.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "rampart_http_requests_total",
        "rampart_host_cpu_seconds_total",
        "rampart_host_memory_available_bytes",
        "rampart_host_network_receive_bytes_total",
        "rampart_firewall_connections_total",
    ] {
        assert!(
            names.contains(&want),
            "{want} missing from /metrics:\n{text}"
        );
    }
    // Other hosts may not scrape an agent.
    let web = lab.client(Identity::Host("web-01".into()), "127.0.0.1");
    assert_eq!(status(web.get(&metrics_url)).await, 403);
    assert!(lab.agent.filters()[0].accepted() > 0);
}

#[tokio::test]
async fn qps_alert_fires_and_resolves() {
    let rule = AlertRule {
        clear_for_seconds: 0,
        threshold_rps: 5.0,
        for_seconds: 2,
        clear_rps: 2.0,
        window_seconds: 3,
    };
    // An Alertmanager-style webhook receiver: records every payload with its arrival time.
    let received: Arc<std::sync::Mutex<Vec<(std::time::Instant, Value)>>> = Arc::default();
    let hook = tokio::net::TcpListener::bind("127.94.0.99:0")
        .await
        .unwrap();
    let hook_url = format!("http://{}/hook", hook.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let received = received.clone();
            move |axum::Json(v): axum::Json<Value>| {
                let received = received.clone();
                async move {
                    received
                        .lock()
                        .unwrap()
                        .push((std::time::Instant::now(), v));
                    "ok"
                }
            }
        }),
    );
    let receiver = tokio::spawn(async move { axum::serve(hook, app).await });
    let lab = Arc::new(start(Some(rule), Some(hook_url)).await);
    let admin = lab.admin();
    let alerts_url = lab.url("/api/v1/alerts");
    let lb_state = |doc: &Value| {
        doc["alerts"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["host"] == "lb-01"))
            .and_then(|a| a["state"].as_str().map(str::to_string))
    };

    // About 40 requests/s, bounded to 60 s.
    let busy = Arc::new(AtomicBool::new(true));
    let load = tokio::spawn({
        let (lab, busy) = (lab.clone(), busy.clone());
        async move {
            for _ in 0..600 {
                if !busy.load(Ordering::Relaxed) {
                    break;
                }
                lab.count(4);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let doc = eventually("lb-01's HighQPS alert firing", WAIT, || async {
        let doc = get_json(&admin, &alerts_url).await?;
        (lb_state(&doc)? == "firing").then_some(doc)
    })
    .await;
    assert_eq!(doc["rule"]["threshold_rps"], 5.0);
    assert_eq!(doc["history"][0]["event"], "firing");
    assert_eq!(doc["history"][0]["host"], "lb-01");

    busy.store(false, Ordering::Relaxed);
    load.await.unwrap();
    let doc = eventually("lb-01's HighQPS alert resolved", WAIT, || async {
        let doc = get_json(&admin, &alerts_url).await?;
        (lb_state(&doc)? == "inactive").then_some(doc)
    })
    .await;
    let history = doc["history"].as_array().unwrap();
    let last = history.last().unwrap();
    assert_eq!(last["event"], "resolved");
    assert!(last["value"].as_f64().unwrap() <= 2.0);

    // The webhook got the firing and then the resolved notification, as Alertmanager
    // sends them.
    let got = eventually("firing and resolved at the webhook", WAIT, || async {
        let got = received.lock().unwrap().clone();
        let statuses: Vec<String> = got
            .iter()
            .filter(|(_, v)| v["alerts"][0]["labels"]["alertname"] == "HighQPS")
            .map(|(_, v)| v["status"].as_str().unwrap_or("").to_string())
            .collect();
        (statuses == ["firing", "resolved"]).then_some(got)
    })
    .await;
    let firing = &got[0].1;
    assert_eq!(firing["version"], "4");
    assert_eq!(firing["alerts"][0]["labels"]["host"], "lb-01");
    assert_eq!(firing["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    let resolved = &got[1].1;
    assert_eq!(
        resolved["alerts"][0]["startsAt"],
        firing["alerts"][0]["startsAt"]
    );
    eprintln!(
        "webhook: firing to resolved notifications {:.1} s apart",
        (got[1].0 - got[0].0).as_secs_f64()
    );
    receiver.abort();
}
