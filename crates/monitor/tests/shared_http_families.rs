//! The shared HTTP request families of a host holding both the `lb` and `web` roles, as the
//! node registers them, pass the service's strict exposition parser with one family per name.

#![allow(clippy::unwrap_used)]

use http::StatusCode;
use monitor::exposition;
use prometheus_client::registry::Registry;

#[test]
fn lb_and_web_on_one_host_expose_one_family_that_parses() {
    let mut registry = Registry::default();
    let http = telemetry::HttpMetrics::register(&mut registry);
    let (lb, web) = (http.clone(), http.clone());
    for _ in 0..3 {
        lb.observe("lb", StatusCode::OK, 0.004);
    }
    lb.observe("lb", StatusCode::PERMANENT_REDIRECT, 0.0001);
    web.observe("web", StatusCode::OK, 0.002);
    web.observe("web", StatusCode::NOT_FOUND, 0.001);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for family in [
        "# TYPE rampart_http_requests counter",
        "# TYPE rampart_http_request_duration_seconds histogram",
    ] {
        assert_eq!(text.lines().filter(|l| *l == family).count(), 1, "{text}");
    }

    let samples = exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let requests = |role: &str, code: &str| -> Vec<f64> {
        samples
            .iter()
            .filter(|s| {
                s.name == "rampart_http_requests_total"
                    && s.labels
                        == vec![
                            ("code".to_string(), code.to_string()),
                            ("role".to_string(), role.to_string()),
                        ]
            })
            .map(|s| s.value)
            .collect()
    };
    assert_eq!(requests("lb", "2xx"), vec![3.0]);
    assert_eq!(requests("lb", "3xx"), vec![1.0]);
    assert_eq!(requests("web", "2xx"), vec![1.0]);
    assert_eq!(requests("web", "4xx"), vec![1.0]);
    let counts: Vec<_> = samples
        .iter()
        .filter(|s| s.name == "rampart_http_request_duration_seconds_count")
        .map(|s| (s.labels.clone(), s.value))
        .collect();
    assert_eq!(counts.len(), 2, "{counts:?}");
}
