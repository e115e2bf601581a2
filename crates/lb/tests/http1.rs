//! The HTTP/1.1 server side of the load balancer's listeners, spoken byte by byte over a
//! raw TCP connection to the plain proxy listener (RFC 9112): pipelining, chunked request
//! bodies, `100 Continue`, HTTP/1.0 persistence, framing that could smuggle a request, and
//! HTTP/2's preface where HTTP/1.1 alone is served. Two real backends behind it echo the
//! request body.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{setup, Setup};

async fn proxy() -> Setup {
    setup(2, false, |cfg| cfg.http_mode = lb::HttpMode::Proxy).await
}

async fn connect(s: &Setup) -> TcpStream {
    TcpStream::connect(s.lb.http_addr().unwrap()).await.unwrap()
}

fn closed(s: &Setup, reason: &str) -> f64 {
    s.metric(&format!(
        "rampart_lb_connections_closed_total{{listener=\"http\",reason=\"{reason}\"}}"
    ))
}

/// Reads answers off one connection, keeping what arrived past the current one.
struct Answers {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// One answer: its head (status line and fields, lower-cased names as sent) and body.
#[derive(Debug)]
struct Answer {
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head[9..12].parse().unwrap()
    }

    fn field(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

impl Answers {
    fn new(tcp: TcpStream) -> Answers {
        Answers {
            tcp,
            buf: Vec::new(),
        }
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), self.tcp.read(&mut chunk))
            .await
            .expect("no answer within 10 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next answer, framed by `content-length` or chunked.
    async fn next(&mut self) -> Answer {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                self.fill().await > 0,
                "closed within a head: {:?}",
                self.text()
            );
        };
        let head = String::from_utf8(self.buf.drain(..end).collect()).unwrap();
        let mut answer = Answer {
            head,
            body: Vec::new(),
        };
        if let Some(n) = answer.field("content-length") {
            let n: usize = n.parse().unwrap();
            while self.buf.len() < n {
                assert!(self.fill().await > 0, "closed within a body");
            }
            answer.body = self.buf.drain(..n).collect();
        } else if answer.field("transfer-encoding") == Some("chunked") {
            loop {
                let line = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await > 0, "closed within a chunk size");
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&self.buf[..line]).unwrap().trim(),
                    16,
                )
                .unwrap();
                self.buf.drain(..line + 2);
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await > 0, "closed within a chunk");
                }
                answer.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        }
        answer
    }

    /// Whether the load balancer closes the connection (within 10 s) with nothing more.
    async fn closes(&mut self) -> bool {
        self.buf.is_empty() && self.fill().await == 0
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

fn post(body: &str, extra: &str) -> String {
    format!(
        "POST /echo HTTP/1.1\r\nHost: www.foobar.com\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let s = proxy().await;
    let mut tcp = connect(&s).await;
    let all = [
        post("first", ""),
        post("second", ""),
        post("third", "Connection: close\r\n"),
    ]
    .concat();
    tcp.write_all(all.as_bytes()).await.unwrap();
    let mut answers = Answers::new(tcp);
    for (i, want) in ["first", "second", "third"].into_iter().enumerate() {
        let a = answers.next().await;
        assert_eq!(a.status(), 200, "{a:?}");
        assert_eq!(a.body, want.as_bytes(), "answer {i} out of order: {a:?}");
        assert!(a.field("date").is_some(), "{a:?}");
        if i == 2 {
            assert_eq!(a.field("connection"), Some("close"), "{a:?}");
        }
    }
    assert!(answers.closes().await, "open after Connection: close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_request_body_sent_in_pieces_reaches_the_backend_whole() {
    let s = proxy().await;
    let mut tcp = connect(&s).await;
    let pieces: [&[u8]; 6] = [
        b"POST /echo HTTP/1.1\r\nHost: www.foobar.com\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5;note=x\r\nhel",
        b"lo\r\n",
        b"7\r\n, world\r\n",
        b"0\r\nx-trailer: 1\r\n",
        b"\r\n",
    ];
    for p in pieces {
        tcp.write_all(p).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut answers = Answers::new(tcp);
    let a = answers.next().await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert_eq!(a.body, b"hello, world");
    // The connection is still usable.
    answers
        .tcp
        .write_all(post("again", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(answers.next().await.body, b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let s = proxy().await;
    let mut tcp = connect(&s).await;
    tcp.write_all(
        b"POST /echo HTTP/1.1\r\nHost: www.foobar.com\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answers = Answers::new(tcp);
    let interim = answers.next().await;
    assert_eq!(interim.status(), 100, "{interim:?}");
    answers.tcp.write_all(b"ping").await.unwrap();
    let a = answers.next().await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert_eq!(a.body, b"ping");

    // A body refused by its announced length is refused at once: no 100 Continue first
    // (the client never has to send it), then the close.
    let mut tcp = connect(&s).await;
    tcp.write_all(
        b"POST /echo HTTP/1.1\r\nHost: www.foobar.com\r\nContent-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answers = Answers::new(tcp);
    let a = answers.next().await;
    assert_eq!(a.status(), 413, "{a:?}");
    assert!(
        answers.closes().await,
        "open after a body that was never read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_request_leaves_the_connection_in_step() {
    let s = proxy().await;
    let mut tcp = connect(&s).await;
    tcp.write_all(b"HEAD /index.html HTTP/1.1\r\nHost: www.foobar.com\r\n\r\n")
        .await
        .unwrap();
    let mut answers = Answers::new(tcp);
    let a = answers.next().await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert!(a.field("transfer-encoding").is_none(), "{a:?}");
    answers
        .tcp
        .write_all(post("after head", "").as_bytes())
        .await
        .unwrap();
    let a = answers.next().await;
    assert_eq!(a.body, b"after head", "{a:?}");
}

/// A request the load balancer answers before reading its body (421, another host) keeps
/// its connection when the body is small: the body is read and discarded after the answer,
/// then the next request is served. A large one closes the connection after the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_body_answered_unread_is_discarded_and_the_connection_kept() {
    let s = proxy().await;
    let early = |len: usize| {
        format!(
            "POST /echo HTTP/1.1\r\nHost: elsewhere.test\r\nContent-Length: {len}\r\n\r\n{}",
            "x".repeat(len)
        )
    };
    let mut tcp = connect(&s).await;
    tcp.write_all(early(1000).as_bytes()).await.unwrap();
    let mut answers = Answers::new(tcp);
    let a = answers.next().await;
    assert_eq!(a.status(), 421, "{a:?}");
    assert_ne!(a.field("connection"), Some("close"), "{a:?}");
    answers
        .tcp
        .write_all(post("after the discarded body", "").as_bytes())
        .await
        .unwrap();
    let a = answers.next().await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert_eq!(a.body, b"after the discarded body", "{a:?}");

    // Over the bound: the answer says close, and the connection closes.
    let mut tcp = connect(&s).await;
    tcp.write_all(early(100 * 1024).as_bytes()).await.unwrap();
    let mut answers = Answers::new(tcp);
    let a = answers.next().await;
    assert_eq!(a.status(), 421, "{a:?}");
    assert_eq!(a.field("connection"), Some("close"), "{a:?}");
    assert!(answers.closes().await, "open after a large unread body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_connections_persist_only_with_keep_alive() {
    let s = proxy().await;
    let get =
        |extra: &str| format!("GET /index.html HTTP/1.0\r\nHost: www.foobar.com\r\n{extra}\r\n");

    let mut tcp = connect(&s).await;
    tcp.write_all(get("").as_bytes()).await.unwrap();
    let mut answers = Answers::new(tcp);
    let a = answers.next().await;
    assert!(a.head.starts_with("HTTP/1.0 200 "), "{a:?}");
    assert_eq!(a.field("connection"), Some("close"), "{a:?}");
    assert!(answers.closes().await, "an HTTP/1.0 connection stayed open");

    let mut tcp = connect(&s).await;
    tcp.write_all(get("Connection: keep-alive\r\n").as_bytes())
        .await
        .unwrap();
    let mut answers = Answers::new(tcp);
    let a = answers.next().await;
    assert_eq!(a.field("connection"), Some("keep-alive"), "{a:?}");
    answers.tcp.write_all(get("").as_bytes()).await.unwrap();
    assert_eq!(answers.next().await.status(), 200);
    assert!(answers.closes().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_is_the_host_checked_and_forwarded() {
    // RFC 9112 §3.2.2: the target's authority replaces a received Host. The site-name check
    // reads the authority, so the backend must get that too, never the Host behind it.
    let s = setup(2, false, |cfg| {
        cfg.http_mode = lb::HttpMode::Proxy;
        cfg.site_names = vec!["www.foobar.com".into()];
    })
    .await;
    let mut tcp = connect(&s).await;
    tcp.write_all(b"GET http://www.foobar.com/echo HTTP/1.1\r\nHost: evil.example\r\n\r\nGET http://evil.example/echo HTTP/1.1\r\nHost: www.foobar.com\r\n\r\n")
        .await
        .unwrap();
    let mut answers = Answers::new(tcp);
    let a = answers.next().await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert_eq!(a.field("x-seen-host"), Some("www.foobar.com"), "{a:?}");
    let b = answers.next().await;
    assert_eq!(b.status(), 421, "{b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_and_connect_are_answered_405_with_allow_and_never_forwarded() {
    // TRACE would echo the forwarding fields and the client's cookies to a script;
    // CONNECT would make the site an open tunnel. Both get 405 with the Allow field
    // (RFC 9110 §15.5.6) and the connection goes on.
    let s = proxy().await;
    let mut tcp = connect(&s).await;
    tcp.write_all(
        b"TRACE /echo HTTP/1.1\r\nHost: www.foobar.com\r\nCookie: session=secret\r\n\r\n\
          CONNECT www.foobar.com:443 HTTP/1.1\r\nHost: www.foobar.com:443\r\n\r\n\
          GET /echo HTTP/1.1\r\nHost: www.foobar.com\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answers = Answers::new(tcp);
    for method in ["TRACE", "CONNECT"] {
        let a = answers.next().await;
        assert_eq!(a.status(), 405, "{method}: {a:?}");
        assert_eq!(
            a.field("allow"),
            Some("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"),
            "{method}: {a:?}"
        );
    }
    let a = answers.next().await;
    assert_eq!(a.status(), 200, "{a:?}");
    for method in ["TRACE", "CONNECT"] {
        let seen = s
            .backends
            .iter()
            .map(|b| b.ids(method).len())
            .sum::<usize>();
        assert_eq!(seen, 0, "a {method} reached a backend");
    }
    assert_eq!(
        s.metric("rampart_lb_rejected_requests_total{reason=\"method\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_that_could_smuggle_a_request_is_refused_with_400() {
    let s = proxy().await;
    let shapes = [
        "POST /echo HTTP/1.1\r\nHost: www.foobar.com\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc",
        "POST /echo HTTP/1.1\r\nHost: www.foobar.com\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST /echo HTTP/1.0\r\nHost: www.foobar.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        // A length and chunked: a reader in front going by the length would take the
        // request after the last chunk for body.
        "POST /echo HTTP/1.1\r\nHost: www.foobar.com\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: www.foobar.com\r\n\r\n",
        "POST /echo HTTP/1.1\r\nHost: www.foobar.com\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: www.foobar.com\r\n\r\n",
        // Chunk lines ended by a bare LF: refused when seen, not waited on until a timeout.
        "POST /echo HTTP/1.1\r\nHost: www.foobar.com\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\nGET /smuggled HTTP/1.1\r\nHost: www.foobar.com\r\n\r\n",
    ];
    for (i, shape) in shapes.iter().enumerate() {
        let mut tcp = connect(&s).await;
        tcp.write_all(shape.as_bytes()).await.unwrap();
        let mut answers = Answers::new(tcp);
        let a = answers.next().await;
        assert_eq!(a.status(), 400, "shape {i}: {a:?}");
        assert!(
            answers.closes().await,
            "shape {i}: a second answer followed"
        );
    }
    // The first four are refused at the head; the broken chunks are the body's fault, so
    // the proxy answers them (400 bad_framing) and the connection closes after.
    assert_eq!(closed(&s, "bad_request"), 4.0);
    let smuggled = s.backends.iter().map(|b| b.ids("GET").len()).sum::<usize>();
    assert_eq!(smuggled, 0, "a request hidden in a body reached a backend");
}
