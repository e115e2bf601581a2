//! The real listener on loopback addresses in 127.92.0.0/24: firewall, mutual TLS and the
//! load-balancer identity check, and the plain variant.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use pki::Identity;
use prometheus_client::registry::Registry;
use test_support::TestPki;
use web::{HttpMetrics, MemoryStore, WebConfig, WebHandle};

const LB: &str = "127.92.0.10";
const WEB: &str = "127.92.0.11";
const OTHER: &str = "127.92.0.12";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Running {
    pki: TestPki,
    handle: WebHandle,
    registry: Registry,
}

async fn start(plain: bool) -> Running {
    // lb-01 127.92.0.10 [lb], web-01 127.92.0.11 [web, app, db-primary],
    // web-02 127.92.0.12 [web, app, db-replica], mon-01 127.92.0.20 [monitor].
    let pki = TestPki::new(test_support::topology_in_block(92));
    let docroot = pki.dir.path().join("www-web-01");
    web::deploy_site(&docroot).unwrap();
    let mut registry = Registry::default();
    let http = HttpMetrics::register(&mut registry);
    let handle = web::start(
        WebConfig {
            host: "web-01".into(),
            net: net(&pki, plain),
            port: 0,
            docroot,
            pki: pki.paths.clone(),
            plain,
            health_path: "/healthz".into(),
            store: Some(Arc::new(MemoryStore::new("web-01"))),
        },
        &mut registry,
        &http,
    )
    .await
    .unwrap();
    Running {
        pki,
        handle,
        registry,
    }
}

fn tls_client(r: &Running, identity: &Identity, from: &str) -> reqwest::Client {
    let tls = pki::mtls_client_config(&r.pki.paths, identity, &[b"h2", b"http/1.1"]).unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve("web-01", r.handle.addr())
        .local_address(ip(from))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn url(r: &Running, scheme: &str, path: &str) -> String {
    format!("{scheme}://web-01:{}{path}", r.handle.addr().port())
}

fn metrics_text(r: &Running) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r.registry).unwrap();
    out
}

#[tokio::test]
async fn load_balancer_identity_is_served() {
    let r = start(false).await;
    let client = tls_client(&r, &Identity::Host("lb-01".into()), LB);
    let resp = client
        .get(url(&r, "https", "/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-served-by"], "web-01");
    assert_eq!(resp.text().await.unwrap(), "ok");

    let resp = client
        .post(url(&r, "https", "/api/messages"))
        .json(&serde_json::json!({"author": "lb", "text": "through mTLS"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client.get(url(&r, "https", "/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    assert_eq!(serve::RoleHandle::filters(&r.handle)[0].refused(), 0);
    assert!(serve::RoleHandle::filters(&r.handle)[0].accepted() >= 1);
    let text = metrics_text(&r);
    assert!(
        text.contains("rampart_http_requests_total{role=\"web\",code=\"2xx\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn other_identities_are_rejected() {
    let r = start(false).await;
    for identity in [Identity::Host("web-02".into()), Identity::Admin] {
        let client = tls_client(&r, &identity, LB);
        let resp = client
            .get(url(&r, "https", "/healthz"))
            .send()
            .await
            .unwrap();
        // The serve path answers for the policy: 403, never the application.
        assert_eq!(resp.status(), 403, "{identity:?}");
        assert!(resp.headers().get("x-served-by").is_none());
    }
    let text = metrics_text(&r);
    assert!(
        text.contains("rampart_web_rejected_clients_total{reason=\"identity\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn non_load_balancer_source_is_refused_by_the_firewall() {
    let r = start(false).await;
    let client = tls_client(&r, &Identity::Host("lb-01".into()), OTHER);
    let result = client.get(url(&r, "https", "/healthz")).send().await;
    assert!(result.is_err(), "served from {OTHER}: {result:?}");
    let filter = &serve::RoleHandle::filters(&r.handle)[0];
    test_support::eventually("the refusal is counted", Duration::from_secs(5), || async {
        (filter.refused() >= 1).then_some(())
    })
    .await;
    assert_eq!(filter.accepted(), 0);
}

#[tokio::test]
async fn plain_variant_serves_http_to_the_load_balancer_only() {
    let r = start(true).await;
    let client = |from: &str| {
        reqwest::Client::builder()
            .resolve("web-01", r.handle.addr())
            .local_address(ip(from))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let resp = client(LB)
        .get(url(&r, "http", "/api/whoami"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["served_by"], "web-01");
    assert!(client(OTHER)
        .get(url(&r, "http", "/healthz"))
        .send()
        .await
        .is_err());
    serve::RoleHandle::shutdown(&r.handle).await;
}

/// web-01's network seam; the policy follows the topology's `plain_backends` switch (mutual
/// TLS callers, or any caller from the load balancer's address).
fn net(pki: &TestPki, plain: bool) -> firewall::Net {
    let mut t = pki.topology.clone();
    t.site.plain_backends = plain;
    let policy = Arc::new(topology::Policy::compile(&t));
    firewall::Net::loopback("web-01", ip(WEB), policy, t.limits.clone())
}

#[tokio::test]
async fn missing_docroot_is_an_error() {
    let pki = TestPki::new(test_support::topology_in_block(92));
    let err = web::start(
        WebConfig {
            host: "web-01".into(),
            net: net(&pki, false),
            port: 0,
            docroot: pki.dir.path().join("nothing-here"),
            pki: pki.paths.clone(),
            plain: false,
            health_path: "/healthz".into(),
            store: None,
        },
        &mut Registry::default(),
        &HttpMetrics::register(&mut Registry::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, web::WebError::Docroot(_)), "{err}");
}
