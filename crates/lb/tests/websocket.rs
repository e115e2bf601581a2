//! WebSocket upgrades through the load balancer: a real WebSocket client (tokio-tungstenite)
//! over TLS to the load balancer, echo backends behind it over mutual TLS.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::Message;

use common::{setup, Setup};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens `wss://www.foobar.com/ws` through the load balancer.
async fn connect(s: &Setup) -> (Ws, http::Response<Option<Vec<u8>>>) {
    let mut tls = pki::ca_client_config(&s.pki.paths).unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.lb.https_addr())
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("www.foobar.com").unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://www.foobar.com:{}/ws", s.lb.https_addr().port());
    tokio_tungstenite::client_async(url, stream).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_pass_both_ways_and_an_idle_tunnel_is_closed() {
    let s = setup(2, true, |cfg| {
        cfg.balancer.balancing.tunnel_idle_timeout_ms = 1_500;
    })
    .await;
    let (mut ws, resp) = connect(&s).await;
    assert_eq!(resp.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("hello")).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    let text = echo.into_text().unwrap().to_string();
    assert!(text.ends_with(": hello"), "{text}");
    let backend = text.split(':').next().unwrap().to_string();
    assert!(backend.starts_with("web-0"), "{text}");
    for i in 0..20 {
        let payload = vec![i as u8; 1000 + i * 500];
        ws.send(Message::binary(payload.clone())).await.unwrap();
        let back = ws.next().await.unwrap().unwrap().into_data();
        assert_eq!(back.as_ref(), payload.as_slice());
    }
    // Plain requests keep working beside the tunnel.
    let r = s.client(false).get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), http::StatusCode::OK);

    // Quiet for longer than tunnel_idle_timeout_ms: the load balancer closes the tunnel.
    let t = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(15), ws.next())
        .await
        .expect("the idle tunnel was never closed");
    println!("idle tunnel closed after {:?}: {end:?}", t.elapsed());
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    // A new tunnel opens fine afterwards.
    let (mut ws, _) = connect(&s).await;
    ws.send(Message::text("again")).await.unwrap();
    assert!(ws
        .next()
        .await
        .unwrap()
        .unwrap()
        .into_text()
        .unwrap()
        .ends_with(": again"));
}
