//! The plain HTTP listener proxying to the backends (`HttpMode::Proxy`): HTTP/1.1 only by
//! default, a client starting with HTTP/2's preface refused (GOAWAY HTTP_1_1_REQUIRED); HTTP/2 with prior knowledge
//! (h2c, RFC 9113 §3.3) beside HTTP/1.1 when `h2c` is on. Real clients (reqwest, a raw
//! TCP socket) against the load balancer in front of two real backends.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::IpAddr;
use std::time::Duration;

use http::{StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{served_by, setup, Setup, CLIENT_IP};

/// HTTP/2's connection preface (RFC 9113 §3.4), then an empty SETTINGS frame (§6.5), as
/// an h2c client with prior knowledge opens.
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

async fn proxy(h2c: bool) -> Setup {
    setup(2, false, |cfg| {
        cfg.http_mode = lb::HttpMode::Proxy;
        cfg.h2c = h2c;
    })
    .await
}

/// A client of the plain HTTP listener; HTTP/2 with prior knowledge when `h2`.
fn client(s: &Setup, h2: bool) -> reqwest::Client {
    let b = reqwest::Client::builder()
        .resolve("www.foobar.com", s.lb.http_addr().unwrap())
        .local_address(CLIENT_IP.parse::<IpAddr>().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    let b = if h2 {
        b.http2_prior_knowledge()
    } else {
        b.http1_only()
    };
    b.build().unwrap()
}

fn url(s: &Setup) -> String {
    format!(
        "http://www.foobar.com:{}/index.html",
        s.lb.http_addr().unwrap().port()
    )
}

/// Writes `bytes` on a new connection to the HTTP listener and returns everything the
/// load balancer sends back until it closes (bounded: panics after 15 s).
async fn raw_exchange(s: &Setup, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = tokio::net::TcpStream::connect(s.lb.http_addr().unwrap())
        .await
        .unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 4096];
        for _ in 0..1000 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => back.extend_from_slice(&buf[..n]),
            }
        }
        panic!("the load balancer kept sending");
    })
    .await
    .expect("the load balancer neither answered nor closed the connection");
    back
}

fn closed(s: &Setup, reason: &str) -> f64 {
    s.metric(&format!(
        "rampart_lb_connections_closed_total{{listener=\"http\",reason=\"{reason}\"}}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_proxy_listener_is_http11_only_by_default_and_refuses_the_h2c_preface() {
    let s = proxy(false).await;
    let r = client(&s, false).get(url(&s)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), Version::HTTP_11);
    assert!(served_by(&r).starts_with("web-0"));

    // An h2c client with prior knowledge: GOAWAY HTTP_1_1_REQUIRED, then the close.
    let err = client(&s, true).get(url(&s)).send().await.unwrap_err();
    println!("h2c client against the HTTP/1.1-only listener: {err:?}");
    let back = raw_exchange(&s, H2_PREFACE_AND_SETTINGS).await;
    assert_eq!(
        back,
        serve::h1::H2_REFUSAL,
        "the answer to the HTTP/2 preface"
    );
    assert_eq!(closed(&s, "h2c_refused"), 2.0);
    assert_eq!(closed(&s, "bad_request"), 0.0);

    // HTTP/1.1 on the same listener still works afterwards.
    let r = client(&s, false).get(url(&s)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_h2c_the_plain_proxy_listener_serves_http2_with_prior_knowledge_and_http11() {
    let s = proxy(true).await;
    let h2 = client(&s, true);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let r = h2.get(url(&s)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.version(), Version::HTTP_2);
        seen.insert(served_by(&r));
    }
    assert_eq!(seen.len(), 2, "both backends answer: {seen:?}");
    let r = client(&s, false).get(url(&s)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), Version::HTTP_11);
    assert_eq!(closed(&s, "h2c_refused"), 0.0);
}
