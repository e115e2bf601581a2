//! The monitoring service with a real agent over mutual TLS on 127.111.0.0/24: the
//! Prometheus HTTP API answers PromQL over pushed series, a rule file's alert fires and
//! reaches a webhook receiver the test starts, and an invalid rule file stops the start
//! with a message naming the file and rule.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use monitor::{start_agent, start_monitor, AgentConfig, MonitorConfig};
use pki::Identity;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::Value;
use test_support::{eventually, topology_in_block, TestPki};

const WAIT: Duration = Duration::from_secs(30);

type Requests = Family<Vec<(String, String)>, Counter>;

const RULES: &str = "groups:
- name: site
  rules:
  - alert: BusySite
    expr: sum by (instance) (rate(rampart_http_requests_total[5s])) > 2
    for: 2s
    labels: {severity: warning}
    annotations: {summary: '{{ $labels.instance }} is busy'}
";

#[tokio::test]
async fn promql_over_pushed_series_and_a_rule_file_alert_at_the_webhook() {
    let t = topology_in_block(111);
    let pki = TestPki::new(t.clone());
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("site.yml");
    std::fs::write(&rules, RULES).unwrap();

    // webhook receiver
    let received: Arc<std::sync::Mutex<Vec<(f64, Value)>>> = Arc::default();
    let hook = tokio::net::TcpListener::bind("127.111.0.99:0")
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
                    let unix = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs_f64();
                    received.lock().unwrap().push((unix, v));
                    "ok"
                }
            }
        }),
    );
    let receiver = tokio::spawn(async move { axum::serve(hook, app).await });

    let mut mcfg = MonitorConfig::from_topology(
        &t,
        "mon-01",
        pki.paths.clone(),
        test_support::net(&t, "mon-01"),
    )
    .unwrap();
    mcfg.port = 0;
    mcfg.webhook_urls = vec![hook_url];
    // an invalid rule file: refused at start, naming the file and the rule
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, RULES.replace("> 2", "> topk(1, x)")).unwrap();
    let mut bad_cfg = mcfg.clone();
    bad_cfg.rule_files = vec![bad.clone()];
    let err = start_monitor(bad_cfg).await.unwrap_err().to_string();
    assert!(
        err.contains("bad.yml") && err.contains("BusySite") && err.contains("topk"),
        "{err}"
    );
    mcfg.rule_files = vec![rules];
    let monitor = start_monitor(mcfg).await.unwrap();

    let mut acfg = AgentConfig::from_topology(
        &t,
        "lb-01",
        pki.paths.clone(),
        test_support::net(&t, "lb-01"),
    )
    .unwrap();
    acfg.port = 0;
    acfg.monitor.1 = monitor.addr();
    let mut registry = Registry::default();
    let requests = Requests::default();
    registry.register(
        "rampart_http_requests",
        "Client requests.",
        requests.clone(),
    );
    let _agent = start_agent(acfg, registry, vec![]).await.unwrap();

    let tls = pki::mtls_client_config(&pki.paths, &Identity::Admin, &[b"h2", b"http/1.1"]).unwrap();
    let admin = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve("mon-01", monitor.addr())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = |p: &str| format!("https://mon-01:{}{p}", monitor.addr().port());

    // About 10 requests/s, bounded to 60 s.
    let busy = Arc::new(AtomicBool::new(true));
    let load = tokio::spawn({
        let (requests, busy) = (requests.clone(), busy.clone());
        async move {
            let labels = vec![
                ("role".to_string(), "lb".to_string()),
                ("code".to_string(), "2xx".to_string()),
            ];
            for _ in 0..600 {
                if !busy.load(Ordering::Relaxed) {
                    break;
                }
                requests.get_or_create(&labels).inc();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // PromQL over the pushed series, by GET and by POST form as Grafana sends it
    let q = "sum by (instance, job) (rate(rampart_http_requests_total[5s]))";
    let doc = eventually("a QPS from /api/v1/query", WAIT, || async {
        let r = admin
            .get(url("/api/v1/query"))
            .query(&[("query", q)])
            .send()
            .await
            .ok()?;
        let doc: Value = r.json().await.ok()?;
        let v: f64 = doc["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()?;
        (v > 0.0).then_some(doc)
    })
    .await;
    assert_eq!(doc["status"], "success");
    assert_eq!(
        doc["data"]["result"][0]["metric"],
        serde_json::json!({"instance": "lb-01", "job": "rampart"})
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let r = admin
        .post(url("/api/v1/query_range"))
        .form(&[
            ("query", q),
            ("start", &(now - 10.0).to_string()),
            ("end", &now.to_string()),
            ("step", "1s"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["data"]["resultType"], "matrix");
    assert!(
        !doc["data"]["result"][0]["values"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{doc}"
    );
    // a bad query is Prometheus' 400 bad_data
    let r = admin
        .get(url("/api/v1/query"))
        .query(&[("query", "rate(")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["errorType"], "bad_data");
    // only the admin reads
    let tls = pki::mtls_client_config(&pki.paths, &Identity::Host("lb-01".into()), &[b"http/1.1"])
        .unwrap();
    let agent_client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve("mon-01", monitor.addr())
        .build()
        .unwrap();
    let r = agent_client
        .get(url("/api/v1/query"))
        .query(&[("query", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // the rule-file alert fires and reaches the webhook
    let firing = eventually("BusySite firing at the webhook", WAIT, || async {
        let got = received.lock().unwrap().clone();
        got.into_iter()
            .find(|(_, v)| v["status"] == "firing" && v["groupLabels"]["alertname"] == "BusySite")
    })
    .await;
    assert_eq!(firing.1["alerts"][0]["labels"]["host"], "lb-01");
    let doc: Value = admin
        .get(url("/api/v1/alerts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let a = doc["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "BusySite")
        .cloned()
        .unwrap();
    assert_eq!(a["annotations"]["summary"], "lb-01 is busy");
    assert_eq!(a["labels"]["severity"], "warning");
    // how long after `for` expired the webhook got it (printed, not asserted)
    let history = doc["history"].as_array().unwrap();
    let fired_at = history
        .iter()
        .find(|h| h["alert"] == "BusySite" && h["event"] == "firing")
        .and_then(|h| h["at"].as_f64())
        .unwrap();
    let arrived = firing.0;
    println!(
        "webhook: BusySite arrived {:.2} s after it fired",
        arrived - fired_at
    );
    let rules: Value = admin
        .get(url("/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        names.contains(&"BusySite") && names.contains(&"HighErrorRate"),
        "{names:?}"
    );

    busy.store(false, Ordering::Relaxed);
    load.await.unwrap();
    receiver.abort();
}
