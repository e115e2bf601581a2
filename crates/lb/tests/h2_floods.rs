//! HTTP/2 floods against the load balancer's HTTPS listener, with raw frames written by
//! the test (RFC 9113 §4.1 frame layout, RFC 7541 HPACK with static-table entries): rapid
//! reset (CVE-2023-44487), CONTINUATION flood (VU#421644) and a stream flood past
//! `SETTINGS_MAX_CONCURRENT_STREAMS`. Each must be refused without the backends doing the
//! work, and the load balancer must keep answering other clients.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_rustls::client::TlsStream;

use common::{setup, Setup};

type Tls = TlsStream<tokio::net::TcpStream>;

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK block for `GET https://www.foobar.com/` (static table 2, 7, 4; `:authority`
/// as a literal without indexing, name index 1).
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x84, 0x01, 14];
    b.extend_from_slice(b"www.foobar.com");
    b
}

/// What the server sent on a connection.
#[derive(Debug, Default)]
struct Seen {
    goaway: Option<u32>,
    rst: HashMap<u32, usize>,
    responses: usize,
    closed: bool,
}

/// Opens a TLS connection with ALPN h2, exchanges the preface and SETTINGS (acknowledging
/// the server's), and returns the write half plus a task reading frames for up to 15 s,
/// until the connection closes or `streams` streams got an answer or a reset.
async fn open(s: &Setup, streams: usize) -> (WriteHalf<Tls>, tokio::task::JoinHandle<Seen>) {
    let mut tls = pki::ca_client_config(&s.pki.paths).unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.lb.https_addr())
        .await
        .unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("www.foobar.com").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // The server's SETTINGS comes first (RFC 9113 §3.4); acknowledge it.
    loop {
        let (kind, flags, _, _) = read_frame(&mut stream).await.unwrap();
        if kind == SETTINGS && flags & 1 == 0 {
            break;
        }
    }
    stream.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
    let (read, write) = tokio::io::split(stream);
    (write, tokio::spawn(read_all(read, streams)))
}

async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

async fn read_all(mut r: ReadHalf<Tls>, streams: usize) -> Seen {
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if seen.responses + seen.rst.values().sum::<usize>() >= streams {
            return seen;
        }
        match tokio::time::timeout_at(deadline, read_frame(&mut r)).await {
            Err(_) => return seen,
            Ok(Err(_)) => {
                seen.closed = true;
                return seen;
            }
            Ok(Ok((kind, _, _, payload))) => match kind {
                GOAWAY if payload.len() >= 8 => {
                    seen.goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
                RST_STREAM if payload.len() >= 4 => {
                    let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    *seen.rst.entry(code).or_default() += 1;
                }
                HEADERS => seen.responses += 1,
                _ => {}
            },
        }
    }
}

/// The site still answers a normal HTTP/2 client.
async fn still_serving(s: &Setup) {
    let r = s.client(true).get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), http::StatusCode::OK);
}

fn backend_requests(s: &Setup) -> u64 {
    s.backends
        .iter()
        .map(|b| b.requests.load(Ordering::SeqCst))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut_off_before_the_backends_do_the_work() {
    const STREAMS: u32 = 2_000;
    let s = setup(2, true, |_| {}).await;
    let (mut w, reader) = open(&s, STREAMS as usize).await;
    let block = get_block();
    let mut sent = 0;
    for i in 0..STREAMS {
        let id = 1 + 2 * i;
        let mut burst = frame(HEADERS, END_HEADERS | END_STREAM, id, &block);
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        if w.write_all(&burst).await.is_err() {
            break;
        }
        sent += 1;
    }
    let _ = w.flush().await;
    let seen = reader.await.unwrap();
    let worked = backend_requests(&s);
    println!(
        "rapid reset: {sent} of {STREAMS} streams written, server: {seen:?}, backends saw {worked}"
    );
    assert!(
        seen.goaway.is_some() || seen.closed,
        "the connection was never closed: {seen:?}"
    );
    assert!(
        worked < u64::from(STREAMS) / 4,
        "backends saw {worked} requests"
    );
    still_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_refused() {
    const FRAMES: usize = 4_000; // 4 000 × 16 KiB = 62.5 MiB of header block if accepted
    let s = setup(2, true, |_| {}).await;
    let (mut w, reader) = open(&s, 1).await;
    // HEADERS without END_HEADERS, then CONTINUATION frames of literal header fields that
    // never end.
    let mut field = vec![0x00, 5];
    field.extend_from_slice(b"x-pad");
    field.push(100);
    field.extend_from_slice(&[b'a'; 100]);
    let chunk: Vec<u8> = field
        .iter()
        .copied()
        .cycle()
        .take(field.len() * 150)
        .collect();
    let mut written = 0;
    if w.write_all(&frame(HEADERS, 0, 1, &get_block()))
        .await
        .is_ok()
    {
        for _ in 0..FRAMES {
            if w.write_all(&frame(CONTINUATION, 0, 1, &chunk))
                .await
                .is_err()
            {
                break;
            }
            written += 1;
        }
    }
    let _ = w.flush().await;
    drop(w);
    let seen = reader.await.unwrap();
    println!(
        "CONTINUATION flood: {written} of {FRAMES} frames of {} bytes written, server: {seen:?}",
        chunk.len()
    );
    assert!(
        seen.goaway.is_some() || seen.closed,
        "the connection was never closed: {seen:?}"
    );
    assert!(written < FRAMES, "every CONTINUATION frame was accepted");
    assert_eq!(seen.responses, 0);
    assert_eq!(backend_requests(&s), 0);
    still_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_concurrency_limit_are_refused() {
    const STREAMS: u32 = 300;
    let s = setup(2, true, |_| {}).await;
    // Backends slow enough that no stream ends while the flood is read.
    for b in &s.backends {
        b.set_delay(Duration::from_secs(3));
    }
    let (mut w, reader) = open(&s, STREAMS as usize).await;
    let block = get_block();
    let mut all = Vec::new();
    for i in 0..STREAMS {
        all.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1 + 2 * i, &block));
    }
    w.write_all(&all).await.unwrap();
    w.flush().await.unwrap();
    let seen = reader.await.unwrap();
    let refused = seen.rst.get(&REFUSED_STREAM).copied().unwrap_or(0);
    let worked = backend_requests(&s);
    println!(
        "stream flood: {STREAMS} streams opened at once; server: {seen:?}; backends saw {worked}"
    );
    // 128 concurrent streams per connection (serve's SETTINGS_MAX_CONCURRENT_STREAMS).
    assert!(
        refused >= (STREAMS - 128) as usize || seen.goaway.is_some(),
        "{seen:?}"
    );
    assert!(worked <= 128, "backends saw {worked} requests");
    for b in &s.backends {
        b.set_delay(Duration::ZERO);
    }
    still_serving(&s).await;
}
