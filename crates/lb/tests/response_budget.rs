//! The buffer budget: clients that ask for large answers over HTTP/2 and never open their
//! flow-control window make the load balancer hold no more than
//! `balancer.buffer_total_bytes` of answers, however many streams they open; past it,
//! answers are streamed from the backend as the client reads, and a request body that
//! does not fit gets 503. Once the windows open, every answer arrives whole and the budget
//! is given back.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use rustls::pki_types::ServerName;

use common::{setup, WAIT};
use test_support::eventually;

const BUDGET: u64 = 1 << 20;
const ANSWER: usize = 600 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_streams_and_large_bodies_hold_no_more_than_the_buffer_budget() {
    let s = setup(2, false, |cfg| {
        cfg.balancer.buffer_total_bytes = BUDGET;
    })
    .await;
    let mut tls = pki::ca_client_config(&s.pki.paths).unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.lb.https_addr())
        .await
        .unwrap();
    let io = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("www.foobar.com").unwrap(), tcp)
        .await
        .unwrap();
    // Stream windows of 0: the load balancer may send answer heads but no answer data.
    let (mut client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .initial_connection_window_size(8 << 20)
        .handshake::<_, Bytes>(io)
        .await
        .unwrap();
    let (settings_tx, mut settings_rx) = tokio::sync::mpsc::channel::<u32>(1);
    let driver = tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        loop {
            tokio::select! {
                r = conn.as_mut() => return r,
                Some(size) = settings_rx.recv() => conn.as_mut().get_mut().set_initial_window_size(size).unwrap(),
            }
        }
    });
    // Three answers of 600 KiB each: 1.8 MiB against a 1 MiB budget.
    let mut pending = Vec::new();
    for _ in 0..3 {
        let req = http::Request::get(format!("https://www.foobar.com/bytes/{ANSWER}"))
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        pending.push(resp);
    }
    let mut answers = Vec::new();
    for resp in pending {
        let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        answers.push(resp.into_body());
    }
    // Every answer's head has come, none of its data could: the load balancer holds what
    // it buffered, within the budget, and streamed the rest.
    let held = s.metric("rampart_lb_buffered_bytes");
    assert!(
        held > 0.0 && held <= BUDGET as f64,
        "held {held} of a {BUDGET}-byte budget\n{}",
        s.metrics()
    );
    assert!(
        s.metric("rampart_lb_buffer_exhausted_total") >= 1.0,
        "{}",
        s.metrics()
    );
    // With the budget taken by answers nobody reads, a request body that does not fit in
    // what is left is refused at once, not held. (60 KiB: under the 64 KiB the server
    // reads and discards after an early answer, so the connection stays open and the
    // client reads the answer; a larger body is refused the same way, then the close.)
    let big = s
        .client(false)
        .post(s.url("/echo"))
        .body(vec![b'z'; 60 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 503);
    assert_eq!(big.headers()["retry-after"], "1");
    assert_eq!(
        s.metric("rampart_lb_rejected_requests_total{reason=\"buffer_full\"}"),
        1.0
    );
    // Windows open: every answer arrives whole.
    settings_tx.send(8 << 20).await.unwrap();
    let want: Vec<u8> = (0..ANSWER).map(|i| (i % 251) as u8).collect();
    for mut body in answers {
        let mut got = Vec::with_capacity(ANSWER);
        while let Some(chunk) = tokio::time::timeout(WAIT, body.data()).await.unwrap() {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        assert!(
            got == want,
            "an answer of {} bytes is not the backend's",
            got.len()
        );
    }
    eventually("the budget given back", WAIT, || {
        let held = s.metric("rampart_lb_buffered_bytes");
        async move { (held == 0.0).then_some(()) }
    })
    .await;
    drop(client);
    driver.abort();
}
