//! WebSocket upgrades through the load balancer: a real WebSocket client (tokio-tungstenite)
//! over TLS to the load balancer (and over plain HTTP to its proxying HTTP listener), echo
//! backends behind it over mutual TLS. Tunnels across a reload and a stop, and their gauge.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::Message;

use common::{served_by, setup, setup_with_limits, Setup};

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

/// Sends `text` on `ws` (over TLS or plain HTTP) and returns the echo
/// (`<backend>: <text>`).
async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("no echo")
        .unwrap()
        .unwrap();
    back.into_text().unwrap().to_string()
}

/// `rampart_lb_websocket_tunnels{backend="name"}`.
fn tunnels(s: &Setup, backend: &str) -> f64 {
    s.metric(&format!(
        "rampart_lb_websocket_tunnels{{backend=\"{backend}\"}}"
    ))
}

async fn wait_tunnels(s: &Setup, backend: &str, want: f64) {
    test_support::eventually(
        &format!("{want} tunnel(s) to {backend}"),
        common::WAIT,
        || {
            let n = tunnels(s, backend);
            async move { (n == want).then_some(()) }
        },
    )
    .await;
}

/// Waits (bounded) for the end of `ws` as the client sees it; panics on a data message.
async fn closed_by_peer(ws: &mut Ws) -> String {
    let end = tokio::time::timeout(Duration::from_secs(15), ws.next())
        .await
        .expect("the client never saw the tunnel close");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    format!("{end:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_survives_a_reload_that_drops_its_backend_and_is_counted_until_it_ends() {
    let s = setup(2, true, |_| {}).await;
    let (mut ws, _) = connect(&s).await;
    let first = echo(&mut ws, "before").await;
    let backend = first.split(':').next().unwrap().to_string();
    let other = if backend == "web-01" {
        "web-02"
    } else {
        "web-01"
    };
    wait_tunnels(&s, &backend, 1.0).await;
    assert_eq!(tunnels(&s, other), 0.0);

    // The new generation has only the other backend.
    let mut cfg = s.cfg.clone();
    cfg.backends.retain(|b| b.name == other);
    let report = s.lb.reload(Some(cfg)).await.unwrap();
    assert_eq!(
        (report.generation, report.backends.clone()),
        (2, vec![other.to_string()])
    );
    let r = s.client(false).get(s.url("/")).send().await.unwrap();
    assert_eq!(
        served_by(&r),
        other,
        "new requests go to the new generation"
    );

    // The old generation's tunnel still carries messages both ways, and still counts.
    for i in 0..5 {
        let text = format!("after reload {i}");
        assert_eq!(echo(&mut ws, &text).await, format!("{backend}: {text}"));
    }
    assert_eq!(tunnels(&s, &backend), 1.0);
    let (mut ws2, _) = connect(&s).await;
    assert!(echo(&mut ws2, "new").await.starts_with(other));
    wait_tunnels(&s, other, 1.0).await;

    // Closed by the client: the gauge goes back down.
    ws.close(None).await.unwrap();
    closed_by_peer(&mut ws).await;
    drop(ws);
    wait_tunnels(&s, &backend, 0.0).await;
    assert_eq!(tunnels(&s, other), 1.0);
    ws2.close(None).await.unwrap();
    closed_by_peer(&mut ws2).await;
    drop(ws2);
    wait_tunnels(&s, other, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_stop_an_open_tunnel_gets_the_drain_time_then_is_closed_before_the_stop_returns() {
    let s = setup_with_limits(
        2,
        true,
        |limits| limits.listeners.get_mut("https").unwrap().drain_timeout_ms = 3_000,
        |_| {},
    )
    .await;
    let (mut ws, _) = connect(&s).await;
    let backend = echo(&mut ws, "hello")
        .await
        .split(':')
        .next()
        .unwrap()
        .to_string();
    // A tunnel of generation 1, stopped while generation 2 serves.
    s.lb.reload(Some(s.cfg.clone())).await.unwrap();
    wait_tunnels(&s, &backend, 1.0).await;

    let started = Instant::now();
    let stop = tokio::spawn(serve::RoleHandle::shutdown(&s.lb));
    // Within the drain time the tunnel still works, and the stop waits for it.
    assert_eq!(
        echo(&mut ws, "draining").await,
        format!("{backend}: draining")
    );
    assert!(
        !stop.is_finished(),
        "the stop did not wait for the open tunnel"
    );

    // Then the load balancer closes it: the client sees the end, not a hang.
    let end = closed_by_peer(&mut ws).await;
    tokio::time::timeout(Duration::from_secs(15), stop)
        .await
        .expect("the stop never finished")
        .unwrap();
    println!(
        "tunnel closed and stop done after {:?} (drain 3 s): {end}",
        started.elapsed()
    );
    assert_eq!(
        tunnels(&s, &backend),
        0.0,
        "the stop returned with a tunnel open"
    );
    // The backend's side was closed too: its WebSocket connection ended.
    let b = s.backends.iter().find(|b| b.name == backend).unwrap();
    test_support::eventually("the backend saw the tunnel close", common::WAIT, || {
        let n = b.ws_ended.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n == 1).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_that_ends_during_the_drain_lets_the_stop_finish_early() {
    // A drain far longer than the test's bound: the stop ends when the tunnel does.
    let s = setup_with_limits(
        1,
        true,
        |limits| limits.listeners.get_mut("https").unwrap().drain_timeout_ms = 600_000,
        |_| {},
    )
    .await;
    let (mut ws, _) = connect(&s).await;
    assert_eq!(echo(&mut ws, "hi").await, "web-01: hi");
    let stop = tokio::spawn(serve::RoleHandle::shutdown(&s.lb));
    assert_eq!(echo(&mut ws, "still").await, "web-01: still");
    assert!(
        !stop.is_finished(),
        "the stop did not wait for the open tunnel"
    );
    // The close handshake, then the client closes its socket.
    ws.close(None).await.unwrap();
    closed_by_peer(&mut ws).await;
    drop(ws);
    tokio::time::timeout(Duration::from_secs(30), stop)
        .await
        .expect("the stop waited for the drain timer, not for the tunnel")
        .unwrap();
    assert_eq!(tunnels(&s, "web-01"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_passes_through_the_plain_http_proxy_listener() {
    let s = setup(2, true, |cfg| cfg.http_mode = lb::HttpMode::Proxy).await;
    let http = s.lb.http_addr().unwrap();
    let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    let url = format!("ws://www.foobar.com:{}/ws", http.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    assert_eq!(resp.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    let first = echo(&mut ws, "hello").await;
    let backend = first.split(':').next().unwrap().to_string();
    assert_eq!(first, format!("{backend}: hello"));
    assert!(backend.starts_with("web-0"), "{first}");
    wait_tunnels(&s, &backend, 1.0).await;
    for i in 0..20 {
        let payload = vec![i as u8; 1000 + i * 500];
        ws.send(Message::binary(payload.clone())).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no echo")
            .unwrap()
            .unwrap()
            .into_data();
        assert_eq!(back.as_ref(), payload.as_slice());
    }
    // Closed by the client: the tunnel ends and is no longer counted.
    ws.close(None).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(15), ws.next())
        .await
        .expect("the client never saw the tunnel close");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    drop(ws);
    wait_tunnels(&s, &backend, 0.0).await;
}

/// Opens `ws://www.foobar.com/ws` through the plain HTTP proxy listener, has the backend
/// end its side (a Close, after which the echo backend drops its connection), and returns
/// the client's stream once the load balancer passed that end on: the tunnel is then
/// half closed, the client's sending half still open and quiet.
async fn half_closed_by_the_backend(
    s: &Setup,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let http = s.lb.http_addr().unwrap();
    let tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    let url = format!("ws://www.foobar.com:{}/ws", http.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    assert_eq!(echo(&mut ws, "hi").await, "web-01: hi");
    wait_tunnels(s, "web-01", 1.0).await;
    let ended_before = s.backends[0]
        .ws_ended
        .load(std::sync::atomic::Ordering::SeqCst);
    ws.close(None).await.unwrap();
    // The backend's end of stream reaches the client: the load balancer forwarded it.
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        for _ in 0..100 {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
        panic!("the backend's side never ended");
    })
    .await;
    assert!(end.is_ok(), "the client never saw the backend's side end");
    assert_eq!(
        s.backends[0]
            .ws_ended
            .load(std::sync::atomic::Ordering::SeqCst),
        ended_before + 1
    );
    ws
}

/// `tunnel_half_closed_timeout_ms` is honoured both ways: a long one keeps a half-closed
/// tunnel open past the 10 s default, and after a reload to a short one a half-closed
/// tunnel is closed although its idle timeout is an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_half_closed_tunnel_timeout_is_the_configured_one() {
    let s = setup(1, false, |cfg| {
        cfg.http_mode = lb::HttpMode::Proxy;
        cfg.balancer.balancing.tunnel_idle_timeout_ms = 3_600_000;
        cfg.balancer.balancing.tunnel_half_closed_timeout_ms = 600_000;
    })
    .await;
    let ws = half_closed_by_the_backend(&s).await;
    // Longer than the 10 s default: with a 10-minute limit the tunnel is still open.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        tunnels(&s, "web-01"),
        1.0,
        "a half-closed tunnel was closed before tunnel_half_closed_timeout_ms"
    );
    drop(ws);
    wait_tunnels(&s, "web-01", 0.0).await;

    let mut cfg = s.cfg.clone();
    cfg.balancer.balancing.tunnel_half_closed_timeout_ms = 300;
    s.lb.reload(Some(cfg)).await.unwrap();
    let ws = half_closed_by_the_backend(&s).await;
    // Closed by the load balancer while the client still holds its side open.
    wait_tunnels(&s, "web-01", 0.0).await;
    drop(ws);
}
