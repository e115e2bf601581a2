//! The HTTP/1.1 exchange with a backend (RFC 9112) over a pool of kept-alive connections.
//!
//! The proxy reads a request's whole body before it chooses a backend and buffers the
//! response up to a limit, so one exchange is short and regular: take an idle connection
//! (or open one), write the request head and body in one write, parse the response head in
//! place with `httparse`, then read the body as its framing says (`Content-Length`,
//! `chunked`, or until the connection closes; RFC 9112 §6.3) and give the connection back.
//! It all runs on the task that serves the client's request: there is no connection task
//! and no channel between tasks per request, which is where a general-purpose client
//! (hyper-util's pooled client, used here before) spent its time on this path.
//!
//! The pool is keyed by backend name within one configuration generation; a generation
//! has one connector (address, TLS settings, server name and client certificate fixed), so
//! the name is the connection's full identity. Idle connections are kept last-in
//! first-out (the warmest first), at most `max_idle` per backend, and closed after
//! `idle_timeout`, which the configuration keeps below the backends' own keep-alive
//! timeout so that a pooled connection is never one the backend is closing.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::retry::Failure;
use crate::upstream::{ConnectError, Connector, UpstreamIo};
use serve::h1::{Decoded, Decoder};

/// Largest response head accepted from a backend (status line and fields), as the
/// listener's own request head cap.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most fields in a response head; more is a malformed answer.
const MAX_HEADERS: usize = 128;

/// Request bodies up to this size are copied behind the head so that both leave in one
/// write; larger ones are written after it.
const COALESCE_BODY: usize = 16 * 1024;

/// What went wrong in one exchange; [`ExchangeError::failure`] says whether another
/// backend may be tried.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// No connection could be made: nothing was sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection failed while writing the request or reading the response.
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The backend closed the connection before the response was complete.
    #[error("connection closed before the response was complete")]
    Closed,
    /// The answer was not a valid HTTP/1.1 response.
    #[error("malformed response: {0}")]
    Protocol(&'static str),
    /// No byte of the body came for the configured idle time.
    #[error("response body stalled")]
    Stalled,
}

impl ExchangeError {
    /// How the failure counts for retries and outlier detection (see [`Failure`]).
    pub(crate) fn failure(&self) -> Failure {
        match self {
            ExchangeError::Connect(_) => Failure::Connect,
            ExchangeError::Closed => Failure::Reset,
            ExchangeError::Io(e) => Failure::of_chain(e),
            ExchangeError::Protocol(_) | ExchangeError::Stalled => Failure::Other,
        }
    }
}

/// The request as it goes to the backend: its method, its head as bytes (a finished
/// [`RequestHead`]) and the whole body.
pub(crate) struct Outgoing<'a> {
    pub(crate) method: &'a Method,
    pub(crate) head: &'a [u8],
    pub(crate) body: &'a Bytes,
}

/// A request head being written for a backend, as the bytes HTTP/1.1 sends (RFC 9112 §3,
/// §5): `METHOD target HTTP/1.1`, one line per field, a blank line. Fields go in through
/// [`FieldSink`](crate::proxy::FieldSink), straight from the client's request: no
/// header map is built for the way upstream.
pub(crate) struct RequestHead {
    bytes: Vec<u8>,
    /// The method gives content a meaning (RFC 9110 §9.3: not GET, HEAD, DELETE, OPTIONS,
    /// TRACE), so an empty body is still announced with `Content-Length: 0`.
    body_expected: bool,
}

impl RequestHead {
    /// The request line for `method` and `target` (origin form, RFC 9112 §3.2.1).
    pub(crate) fn new(method: &Method, target: &PathAndQuery) -> RequestHead {
        let mut b = Vec::with_capacity(1024);
        b.extend_from_slice(method.as_str().as_bytes());
        b.push(b' ');
        b.extend_from_slice(target.as_str().as_bytes());
        b.extend_from_slice(b" HTTP/1.1\r\n");
        let body_expected = !matches!(
            *method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
        );
        RequestHead {
            bytes: b,
            body_expected,
        }
    }

    /// The whole head: the fields so far, `Content-Length: body_len` (RFC 9110 §8.6: the
    /// body is always read whole first, so its length is known; left out when it is 0 and
    /// the method gives content no meaning, as a user agent should per §8.6) and the blank
    /// line.
    pub(crate) fn finish(mut self, body_len: usize) -> Vec<u8> {
        if body_len > 0 || self.body_expected {
            let mut n = itoa::Buffer::new();
            crate::proxy::FieldSink::field(
                &mut self,
                &header::CONTENT_LENGTH,
                n.format(body_len).as_bytes(),
            );
        }
        self.bytes.extend_from_slice(b"\r\n");
        self.bytes
    }
}

impl crate::proxy::FieldSink for RequestHead {
    fn field(&mut self, name: &HeaderName, value: &[u8]) {
        self.bytes.extend_from_slice(name.as_str().as_bytes());
        self.bytes.extend_from_slice(b": ");
        self.bytes.extend_from_slice(value);
        self.bytes.extend_from_slice(b"\r\n");
    }
}

/// A response head and the reader of its body.
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// How long opening the connection took, when this exchange opened it.
    pub(crate) connect: Option<Duration>,
    pub(crate) body: BodyReader,
}

/// The pool of idle connections to every backend of one configuration generation.
/// Cheap to clone.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    connector: Connector,
    idle_timeout: Duration,
    max_idle: usize,
    /// Backend name → idle connections, oldest first. Every backend has its entry from the
    /// start, so checking a connection in or out allocates nothing.
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One connection with what was read from it and not yet consumed.
struct Conn {
    io: UpstreamIo,
    buf: BytesMut,
}

impl Pool {
    /// A pool over `connector` for its backends, keeping at most `max_idle` idle
    /// connections per backend, each for at most `idle_timeout`. When called inside a Tokio runtime it
    /// also starts a task that closes expired idle connections; the task ends with the
    /// pool.
    pub(crate) fn new(connector: Connector, idle_timeout: Duration, max_idle: usize) -> Pool {
        let idle = connector
            .backend_names()
            .map(|b| (Arc::from(b), Vec::new()))
            .collect();
        let inner = Arc::new(PoolInner {
            connector,
            idle_timeout,
            max_idle,
            idle: Mutex::new(idle),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reap(Arc::downgrade(&inner)));
        }
        Pool { inner }
    }

    /// Sends `req` to `backend` and reads the response head. A pooled connection is used
    /// when one is idle and still open; if it turns out to have been closed by the backend
    /// before any byte of the answer arrived, an idempotent request (RFC 9110 §9.2.2) is
    /// sent again once on a new connection. The caller bounds the time this takes.
    ///
    /// Errors: [`ExchangeError`]; its [`failure`](ExchangeError::failure) tells whether the
    /// request may go to another backend.
    pub(crate) async fn send(
        &self,
        backend: &Arc<str>,
        req: &Outgoing<'_>,
    ) -> Result<Head, ExchangeError> {
        if let Some(conn) = self.checkout(backend) {
            match self.exchange(backend, conn, req, None).await {
                Ok(head) => return Ok(head),
                // A stale connection: the backend closed it while it was idle.
                Err(Attempt::NothingBack(e)) if !crate::retry::idempotent(req.method) => {
                    return Err(e)
                }
                Err(Attempt::NothingBack(_)) => {}
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        let started = Instant::now();
        // Boxed: connecting (a TLS handshake to a TLS backend) is the largest state of a
        // request's future and the rare one; every request's future would carry its size.
        let io = Box::pin(self.inner.connector.connect_pooled(backend)).await?;
        let conn = Conn {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
        };
        let connect = Some(started.elapsed());
        match self.exchange(backend, conn, req, connect).await {
            Ok(head) => Ok(head),
            Err(Attempt::NothingBack(e) | Attempt::Failed(e)) => Err(e),
        }
    }

    /// An idle connection to `backend` that is neither expired nor closed by the peer.
    fn checkout(&self, backend: &str) -> Option<Conn> {
        let mut idle = lock(&self.inner.idle);
        let list = idle.get_mut(backend)?;
        while let Some(Idle { mut conn, since }) = list.pop() {
            if since.elapsed() < self.inner.idle_timeout && conn.io.idle_and_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Gives `conn` back after a complete exchange.
    fn checkin(&self, backend: &str, conn: Conn) {
        if !conn.buf.is_empty() {
            // Bytes past the end of the response: the connection is out of step.
            return;
        }
        let mut idle = lock(&self.inner.idle);
        let Some(list) = idle.get_mut(backend) else {
            return;
        };
        if list.len() >= self.inner.max_idle {
            // The oldest goes: the warmest are kept.
            list.remove(0);
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    async fn exchange(
        &self,
        backend: &Arc<str>,
        mut conn: Conn,
        req: &Outgoing<'_>,
        connect: Option<Duration>,
    ) -> Result<Head, Attempt> {
        // A backend may answer before it has read the whole body (an early 413) and close
        // the connection, which can make the rest of the write fail; its answer is then
        // still in the receive buffer. So a failed write is followed by a read, and only
        // when no answer comes is the write's error the outcome.
        let mut unsent = write_request(&mut conn.io, req).await.err();
        let partial = unsent.is_some();
        let head_only = req.method == Method::HEAD;
        let ResponseHead {
            status,
            version,
            headers,
            hop,
        } = loop {
            let parsed = match (read_head(&mut conn).await, unsent.take()) {
                (Ok(parsed), _) => parsed,
                (Err(_), Some(e)) => return Err(Attempt::NothingBack(ExchangeError::Io(e))),
                (Err(e), None) => return Err(e),
            };
            // 1xx answers before the final one are skipped (RFC 9110 §15.2); 101 was not
            // asked for (upgrades take their own path).
            if parsed.status.is_informational() {
                if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Attempt::Failed(ExchangeError::Protocol(
                        "101 to a request that asked for no upgrade",
                    )));
                }
                continue;
            }
            break parsed;
        };
        let framing = framing(&status, head_only, &hop).map_err(Attempt::Failed)?;
        // After a partial request the connection is out of step: never reused.
        let keep_alive = !partial && framing != Framing::Close && persistent(version, &hop);
        Ok(Head {
            status,
            headers,
            connect,
            body: BodyReader {
                conn: Some(conn),
                framing,
                keep_alive,
                pool: self.clone(),
                backend: backend.clone(),
            },
        })
    }
}

/// How one try on a connection failed: with nothing read back (the connection may have
/// been stale), or after the backend started answering.
enum Attempt {
    NothingBack(ExchangeError),
    Failed(ExchangeError),
}

/// Closes idle connections that outlived the pool's idle timeout, every half of it, until
/// the pool is dropped.
async fn reap(pool: Weak<PoolInner>) {
    let period = match pool.upgrade() {
        Some(p) => (p.idle_timeout / 2).max(Duration::from_millis(100)),
        None => return,
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(p) = pool.upgrade() else { return };
        let expired: Vec<Idle> = {
            let mut idle = lock(&p.idle);
            let mut out = Vec::new();
            for list in idle.values_mut() {
                // Oldest first: the expired ones are a prefix.
                let n = list
                    .iter()
                    .take_while(|i| i.since.elapsed() >= p.idle_timeout)
                    .count();
                out.extend(list.drain(..n));
            }
            out
        };
        // Closed outside the lock.
        drop(expired);
    }
}

/// Writes the request head and the body: in one write when the body is small.
async fn write_request(io: &mut UpstreamIo, req: &Outgoing<'_>) -> io::Result<()> {
    if req.body.is_empty() {
        io.write_all(req.head).await?;
    } else if req.body.len() <= COALESCE_BODY {
        let mut out = Vec::with_capacity(req.head.len() + req.body.len());
        out.extend_from_slice(req.head);
        out.extend_from_slice(req.body);
        io.write_all(&out).await?;
    } else {
        io.write_all(req.head).await?;
        io.write_all(req.body).await?;
    }
    io.flush().await
}

/// A parsed response head: status, version, the end-to-end fields (the hop-by-hop ones
/// left out) and what the hop-by-hop and framing fields said.
struct ResponseHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    hop: HopFields,
}

/// Fields a response usually gains between the backend and the client: X-Request-Id and a
/// sticky cookie (the proxy), HSTS and the default `site.response_headers` (four; the
/// HTTPS listener). The response's header map is made with room for them.
const ADDED_FIELDS: usize = 7;

/// Reads and parses one response head from `conn`. Its fields go into a [`HeaderMap`] for
/// the client's response, except the hop-by-hop ones (RFC 9110 §7.6.1: the fixed set and
/// those `Connection` names), which are read into a [`HopFields`] instead: the response
/// is forwarded without them, and nothing has to be removed from the map afterwards.
async fn read_head(conn: &mut Conn) -> Result<ResponseHead, Attempt> {
    let mut got_any = !conn.buf.is_empty();
    loop {
        if !conn.buf.is_empty() {
            // Uninitialised: the parser writes the fields it finds, and nothing is spent
            // on the slots a short head does not use.
            let mut fields = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut []);
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut resp,
                &conn.buf,
                &mut fields,
            ) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = resp
                        .code
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .ok_or(Attempt::Failed(ExchangeError::Protocol("bad status code")))?;
                    let version = if resp.version == Some(0) {
                        Version::HTTP_10
                    } else {
                        Version::HTTP_11
                    };
                    // Where each kept value lies in the head, so that the values can be
                    // slices of it (no copy) once the parser's borrow of the buffer ends.
                    let base = conn.buf.as_ptr() as usize;
                    let mut hop = HopFields::default();
                    let mut kept = Vec::with_capacity(resp.headers.len());
                    for f in resp.headers.iter() {
                        let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| {
                            Attempt::Failed(ExchangeError::Protocol("bad field name"))
                        })?;
                        if hop.see(&name, f.value) {
                            let start = f.value.as_ptr() as usize - base;
                            kept.push((name, start, start + f.value.len()));
                        }
                    }
                    let head = conn.buf.split_to(len).freeze();
                    // Room for the fields added on the way to the client: a map filled to
                    // its capacity grows by rehashing it all.
                    let mut headers = HeaderMap::with_capacity(kept.len() + ADDED_FIELDS);
                    for (name, start, end) in kept {
                        if !hop.listed.is_empty() && hop.listed.contains(&name) {
                            continue;
                        }
                        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                            .map_err(|_| {
                                Attempt::Failed(ExchangeError::Protocol("bad field value"))
                            })?;
                        headers.append(name, value);
                    }
                    return Ok(ResponseHead {
                        status,
                        version,
                        headers,
                        hop,
                    });
                }
                Ok(httparse::Status::Partial) if conn.buf.len() < MAX_HEAD_BYTES => {}
                Ok(httparse::Status::Partial) => {
                    return Err(Attempt::Failed(ExchangeError::Protocol(
                        "response head too large",
                    )))
                }
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Attempt::Failed(ExchangeError::Protocol(
                        "too many header fields",
                    )))
                }
                Err(_) => {
                    return Err(Attempt::Failed(ExchangeError::Protocol(
                        "unparsable response head",
                    )))
                }
            }
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(8 * 1024);
        }
        let n = match conn.io.read_buf(&mut conn.buf).await {
            Ok(n) => n,
            Err(e) if got_any => return Err(Attempt::Failed(ExchangeError::Io(e))),
            Err(e) => return Err(Attempt::NothingBack(ExchangeError::Io(e))),
        };
        if n == 0 {
            return Err(if got_any {
                Attempt::Failed(ExchangeError::Closed)
            } else {
                Attempt::NothingBack(ExchangeError::Closed)
            });
        }
        got_any = true;
    }
}

/// What a response's hop-by-hop and framing fields say, gathered field by field while
/// the head is read (`Content-Length` is end-to-end and stays in the head as well).
#[derive(Debug, Default)]
struct HopFields {
    /// `Transfer-Encoding` was present, and whether its last coding is `chunked`
    /// (RFC 9112 §6.3: only then is the body chunked).
    transfer_encoding: Option<bool>,
    /// The `Content-Length`, once seen (a list of identical values is one value,
    /// RFC 9110 §8.6).
    content_length: Option<u64>,
    /// A `Content-Length` was unparsable or conflicted with another.
    bad_length: bool,
    /// `Connection: close` was present.
    close: bool,
    /// `Connection: keep-alive` was present (HTTP/1.0 persistence).
    keep_alive: bool,
    /// Other fields `Connection` names, to leave out (RFC 9110 §7.6.1).
    listed: Vec<HeaderName>,
}

impl HopFields {
    /// Takes in the field `name: value`; true when it is end-to-end (to forward).
    fn see(&mut self, name: &HeaderName, value: &[u8]) -> bool {
        match name.as_str() {
            "content-length" => {
                if !serve::h1::fold_content_length(&mut self.content_length, value) {
                    self.bad_length = true;
                }
                true
            }
            "transfer-encoding" => {
                // The last field's last coding decides.
                let last = value.rsplit(|&b| b == b',').next().unwrap_or(value);
                self.transfer_encoding = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                false
            }
            "connection" => {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep_alive = true;
                    } else if let Ok(listed) = HeaderName::from_bytes(token) {
                        self.listed.push(listed);
                    }
                }
                false
            }
            _ => crate::proxy::hop_by_hop_index(name).is_none(),
        }
    }
}

/// How the end of a response body is found (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// By its length or chunks, read with the decoder the request side uses too.
    Decode(Decoder),
    /// Until the backend closes the connection (which is then not reused).
    Close,
}

/// How the body of a response with `status` to a request (`head_only`: HEAD) whose
/// fields said `hop` ends (RFC 9112 §6.3).
///
/// Errors: an invalid or conflicting `Content-Length`.
fn framing(
    status: &StatusCode,
    head_only: bool,
    hop: &HopFields,
) -> Result<Framing, ExchangeError> {
    if head_only || *status == StatusCode::NO_CONTENT || *status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Decode(Decoder::Length(0)));
    }
    // Chunked must be the last coding; otherwise the body runs to the close.
    match hop.transfer_encoding {
        Some(true) => return Ok(Framing::Decode(Decoder::CHUNKED)),
        Some(false) => return Ok(Framing::Close),
        None => {}
    }
    if hop.bad_length {
        return Err(ExchangeError::Protocol("invalid Content-Length"));
    }
    Ok(hop
        .content_length
        .map_or(Framing::Close, |n| Framing::Decode(Decoder::Length(n))))
}

/// Whether the connection stays open after this response (RFC 9112 §9.3).
fn persistent(version: Version, hop: &HopFields) -> bool {
    !hop.close && (version == Version::HTTP_11 || hop.keep_alive)
}

/// Reads one response body from its connection; the connection goes back to the pool
/// when the body ended cleanly and the response allows it. Dropped early, it closes the
/// connection.
pub(crate) struct BodyReader {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Pool,
    backend: Arc<str>,
}

impl BodyReader {
    /// The next piece of the body, `None` at its end. Each read from the backend waits at
    /// most `idle` for a byte.
    pub(crate) async fn next(&mut self, idle: Duration) -> Result<Option<Bytes>, ExchangeError> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(None);
            };
            match &mut self.framing {
                Framing::Close => {
                    if conn.buf.is_empty() && fill(conn, idle).await? == 0 {
                        self.keep_alive = false;
                        self.conn = None;
                        return Ok(None);
                    }
                    return Ok(Some(conn.buf.split().freeze()));
                }
                Framing::Decode(decoder) => match decoder.decode(&mut conn.buf) {
                    Decoded::Data(data) => {
                        // The last of a length-delimited body: the connection can go back
                        // at once, before the caller asks for the end.
                        if *decoder == Decoder::Length(0) {
                            self.finish();
                        }
                        return Ok(Some(data));
                    }
                    Decoded::Done => {
                        self.finish();
                        return Ok(None);
                    }
                    Decoded::NeedMore => {
                        if fill(conn, idle).await? == 0 {
                            return Err(self.fail(ExchangeError::Closed));
                        }
                    }
                    Decoded::Invalid => {
                        return Err(self.fail(ExchangeError::Protocol("bad chunked framing")))
                    }
                },
            }
        }
    }

    /// The body ended: the connection goes back to the pool if it may be reused.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive {
                self.pool.checkin(&self.backend, conn);
            }
        }
    }

    fn fail(&mut self, e: ExchangeError) -> ExchangeError {
        self.conn = None;
        e
    }
}

/// Reads more of the response into the connection's buffer; 0 at end of stream.
async fn fill(conn: &mut Conn, idle: Duration) -> Result<usize, ExchangeError> {
    if conn.buf.capacity() - conn.buf.len() < 4096 {
        conn.buf.reserve(16 * 1024);
    }
    match tokio::time::timeout(idle, conn.io.read_buf(&mut conn.buf)).await {
        Err(_) => Err(ExchangeError::Stalled),
        Ok(Err(e)) => Err(ExchangeError::Io(e)),
        Ok(Ok(n)) => Ok(n),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One read of a [`Streamed`] body in progress; gives the reader back with its result.
type NextPiece = Pin<
    Box<
        dyn std::future::Future<Output = (BodyReader, Result<Option<Bytes>, ExchangeError>)> + Send,
    >,
>;

/// The rest of a response body as an [`http_body::Body`], read from the backend as the
/// client takes it; holds `permit` (the backend slot) until it ends or is dropped.
pub(crate) struct Streamed {
    prefix: Option<Bytes>,
    /// The prefix's room in the response buffer budget.
    _held: Option<crate::buffer_budget::Held>,
    reader: Option<BodyReader>,
    idle: Duration,
    pending: Option<NextPiece>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Streamed {
    /// `prefix` (what was buffered, holding `held` of the response buffer budget), then
    /// the rest of `reader`.
    pub(crate) fn new(
        prefix: Bytes,
        held: Option<crate::buffer_budget::Held>,
        reader: BodyReader,
        idle: Duration,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Streamed {
        Streamed {
            prefix: Some(prefix),
            _held: held,
            reader: Some(reader),
            idle,
            pending: None,
            _permit: permit,
        }
    }
}

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, ExchangeError>>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.as_mut() {
            if !prefix.is_empty() {
                let frame = crate::buffer_budget::next_frame(prefix);
                return Poll::Ready(Some(Ok(http_body::Frame::data(frame))));
            }
            this.prefix = None;
        }
        if this.pending.is_none() {
            let Some(mut reader) = this.reader.take() else {
                return Poll::Ready(None);
            };
            let idle = this.idle;
            this.pending = Some(Box::pin(async move {
                let r = reader.next(idle).await;
                (reader, r)
            }));
        }
        let Some(fut) = this.pending.as_mut() else {
            return Poll::Ready(None);
        };
        let (reader, result) = std::task::ready!(fut.as_mut().poll(cx));
        this.pending = None;
        match result {
            Ok(Some(data)) => {
                this.reader = Some(reader);
                Poll::Ready(Some(Ok(http_body::Frame::data(data))))
            }
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// What a head with `fields` says, read as [`read_head`] reads it.
    fn headers(fields: &[(&str, &str)]) -> HopFields {
        let mut hop = HopFields::default();
        for (n, v) in fields {
            hop.see(&HeaderName::from_bytes(n.as_bytes()).unwrap(), v.as_bytes());
        }
        hop
    }

    #[test]
    fn an_empty_body_is_announced_only_where_the_method_gives_content_a_meaning() {
        let head = |method: Method, body_len: usize| {
            let bytes = RequestHead::new(&method, &PathAndQuery::from_static("/")).finish(body_len);
            String::from_utf8(bytes).unwrap()
        };
        for method in [Method::GET, Method::HEAD, Method::DELETE, Method::OPTIONS] {
            assert_eq!(
                head(method.clone(), 0),
                format!("{method} / HTTP/1.1\r\n\r\n")
            );
        }
        assert!(head(Method::DELETE, 2).ends_with("content-length: 2\r\n\r\n"));
        for method in [Method::POST, Method::PUT, Method::PATCH] {
            assert!(head(method, 0).ends_with("content-length: 0\r\n\r\n"));
        }
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let ok = StatusCode::OK;
        assert_eq!(
            framing(&ok, false, &headers(&[("content-length", "12")])).unwrap(),
            Framing::Decode(Decoder::Length(12))
        );
        assert_eq!(
            framing(&ok, false, &headers(&[("content-length", "12, 12")])).unwrap(),
            Framing::Decode(Decoder::Length(12))
        );
        assert!(framing(&ok, false, &headers(&[("content-length", "12, 13")])).is_err());
        assert!(framing(&ok, false, &headers(&[("content-length", "-1")])).is_err());
        // Digits alone, as the request side reads them: a sign or an inner space is refused.
        for bad in ["+12", "1 2", "", "12,", "0x1"] {
            let hop = headers(&[("content-length", bad)]);
            assert!(framing(&ok, false, &hop).is_err(), "{bad:?}");
        }
        // Transfer-Encoding wins over Content-Length.
        assert_eq!(
            framing(
                &ok,
                false,
                &headers(&[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3")
                ])
            )
            .unwrap(),
            Framing::Decode(Decoder::CHUNKED)
        );
        assert_eq!(
            framing(&ok, false, &headers(&[("transfer-encoding", "gzip")])).unwrap(),
            Framing::Close
        );
        assert_eq!(framing(&ok, false, &headers(&[])).unwrap(), Framing::Close);
        // No body after HEAD, 204 and 304 whatever the fields say.
        assert_eq!(
            framing(&ok, true, &headers(&[("content-length", "12")])).unwrap(),
            Framing::Decode(Decoder::Length(0))
        );
        assert_eq!(
            framing(
                &StatusCode::NOT_MODIFIED,
                false,
                &headers(&[("content-length", "9")])
            )
            .unwrap(),
            Framing::Decode(Decoder::Length(0))
        );
    }

    #[test]
    fn persistence_follows_version_and_connection() {
        assert!(persistent(Version::HTTP_11, &headers(&[])));
        assert!(!persistent(
            Version::HTTP_11,
            &headers(&[("connection", "Close")])
        ));
        assert!(!persistent(Version::HTTP_10, &headers(&[])));
        assert!(persistent(
            Version::HTTP_10,
            &headers(&[("connection", "keep-alive")])
        ));
    }

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A backend that answers the n-th request it receives (over all connections) with
    /// `script[n]` and closes the connection after it when the entry says so; counts the
    /// connections it accepted.
    async fn scripted(script: Vec<(&'static [u8], bool)>) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (script, next) = (script.clone(), next.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request head (the tests send no body).
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                        buf.drain(..end + 4);
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        let Some((answer, close)) = script.get(n).copied() else {
                            return;
                        };
                        if s.write_all(answer).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn pool(addr: SocketAddr) -> Pool {
        let policy = Arc::new(topology::Policy::compile(
            &topology::Topology::default_topology(),
        ));
        let net = firewall::Net::loopback(
            "lb-01",
            [127, 0, 0, 1].into(),
            policy,
            topology::Limits::default(),
        );
        let connector = Connector::new(
            net,
            [("web-01".to_string(), (addr, "web-01".to_string()))].into(),
            None,
        );
        Pool::new(connector, Duration::from_secs(4), 8)
    }

    async fn get(
        pool: &Pool,
        method: Method,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ExchangeError> {
        send(pool, method, Bytes::new()).await
    }

    async fn send(
        pool: &Pool,
        method: Method,
        body: Bytes,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ExchangeError> {
        let mut head = RequestHead::new(&method, &PathAndQuery::from_static("/x"));
        crate::proxy::FieldSink::field(&mut head, &header::HOST, b"web-01");
        let head = head.finish(body.len());
        let out = Outgoing {
            method: &method,
            head: &head,
            body: &body,
        };
        let mut head = pool.send(&Arc::from("web-01"), &out).await?;
        let mut all = BytesMut::new();
        while let Some(piece) = head.body.next(Duration::from_secs(5)).await? {
            all.extend_from_slice(&piece);
        }
        Ok((head.status, head.headers, all.freeze()))
    }

    #[tokio::test]
    async fn a_chunked_body_with_trailers_is_read_and_the_connection_reused() {
        let chunked: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
        let (addr, accepted) = scripted(vec![(chunked, false), (chunked, false)]).await;
        let p = pool(addr);
        for _ in 0..2 {
            let (status, _, body) = get(&p, Method::GET).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"hello world");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the second request reused the connection"
        );
    }

    #[tokio::test]
    async fn hop_by_hop_fields_of_the_answer_are_left_out_and_still_obeyed() {
        // `Connection` names X-Private and asks for the close; Keep-Alive and the
        // chunked coding are for this hop only. The body is still read as chunked.
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\n\
            X-Private: secret\r\nKeep-Alive: timeout=5\r\nX-Public: yes\r\n\
            Transfer-Encoding: chunked\r\nProxy-Connection: keep-alive\r\n\r\n\
            2\r\nok\r\n0\r\n\r\n";
        let (addr, accepted) = scripted(vec![(answer, false), (answer, false)]).await;
        let p = pool(addr);
        for _ in 0..2 {
            let (status, headers, body) = get(&p, Method::GET).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"ok");
            let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
            assert_eq!(names, ["x-public"]);
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "Connection: close was obeyed: the connection was not reused"
        );
    }

    #[tokio::test]
    async fn informational_answers_are_skipped_and_head_has_no_body() {
        let (addr, _) = scripted(vec![
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok", false),
            // A HEAD answer names the length of the body it does not send.
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", false),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        ])
        .await;
        let p = pool(addr);
        let (status, headers, body) = get(&p, Method::GET).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"ok"[..]));
        assert_eq!(headers.get("x-a").unwrap(), "b");
        let (status, _, body) = get(&p, Method::HEAD).await.unwrap();
        assert_eq!((status, body.len()), (StatusCode::OK, 0));
        let (status, _, body) = get(&p, Method::GET).await.unwrap();
        assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
    }

    #[tokio::test]
    async fn connection_close_and_close_delimited_bodies_are_not_pooled() {
        let (addr, accepted) = scripted(vec![
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
                true,
            ),
            (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nyo", false),
        ])
        .await;
        let p = pool(addr);
        assert_eq!(&get(&p, Method::GET).await.unwrap().2[..], b"abc");
        assert_eq!(&get(&p, Method::GET).await.unwrap().2[..], b"until the end");
        assert_eq!(&get(&p, Method::GET).await.unwrap().2[..], b"hi");
        assert_eq!(&get(&p, Method::GET).await.unwrap().2[..], b"yo");
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_backend_closed_is_replaced_for_an_idempotent_request() {
        // The backend closes each connection right after answering although it announced
        // keep-alive (as one that reached its idle timeout would).
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (addr, accepted) = scripted(vec![(ok, true), (ok, true), (ok, true)]).await;
        let p = pool(addr);
        for _ in 0..3 {
            assert_eq!(&get(&p, Method::GET).await.unwrap().2[..], b"ok");
            // Let the close arrive before the next checkout half of the time at most;
            // both orders must work.
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// A chunked answer whose trailer section runs past 16 KiB (lines of 1 KiB).
    fn big_trailers() -> &'static [u8] {
        let mut wire =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n".to_vec();
        for i in 0..17 {
            wire.extend_from_slice(format!("x-t{i:02}: {}\r\n", "v".repeat(1015)).as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        wire.leak()
    }

    #[tokio::test]
    async fn malformed_answers_are_protocol_errors_and_a_cut_body_is_a_reset() {
        let (addr, _) = scripted(vec![
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabc", true),
            (b"nonsense\r\n\r\n", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                true,
            ),
            // Framed by the request side's decoder: a chunk line ended by a bare LF, and
            // a trailer section over 16 KiB, are broken framing, not a wait.
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
                false,
            ),
            (big_trailers(), false),
        ])
        .await;
        let p = pool(addr);
        for want in [
            Failure::Other,
            Failure::Other,
            Failure::Reset,
            Failure::Other,
            Failure::Other,
            Failure::Other,
        ] {
            let e = get(&p, Method::GET).await.unwrap_err();
            assert_eq!(e.failure(), want, "{e}");
        }
    }

    #[tokio::test]
    async fn an_early_answer_is_returned_when_the_backend_stops_reading_the_body() {
        // The backend answers 413 after the head and closes with the body unread (the
        // kernel then resets the connection): the write of the body fails, the answer
        // is still there to read.
        let (addr, accepted) = scripted(vec![
            (
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig",
                true,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        ])
        .await;
        let p = pool(addr);
        let body = Bytes::from(vec![b'x'; 8 * 1024 * 1024]);
        let (status, _, answer) = send(&p, Method::POST, body).await.unwrap();
        assert_eq!(
            (status, &answer[..]),
            (StatusCode::PAYLOAD_TOO_LARGE, &b"big"[..])
        );
        // That connection is not reused.
        assert_eq!(&get(&p, Method::GET).await.unwrap().2[..], b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
