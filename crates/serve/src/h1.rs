//! The HTTP/1.1 server side of a connection (RFC 9112), written for the edge: buffers are
//! taken when bytes arrive and given back when the connection goes idle, so an idle
//! keep-alive connection holds no read or write buffer (hyper's HTTP/1 connection keeps
//! 8 KiB + 8 KiB for its whole life; HAProxy and nginx release theirs the same way).
//!
//! One request at a time (pipelined requests wait in the read buffer, RFC 9112 §9.3.2):
//! - the head is parsed with `httparse`, at most [`crate::MAX_HTTP1_HEAD_BYTES`] and
//!   [`MAX_HEADERS`] fields (`431`, RFC 6585 §5), unparsable: `400`; field values are
//!   slices of the read buffer, not copies;
//! - the first head of a connection that starts with HTTP/2's preface (RFC 9113 §3.4) is
//!   handed back ([`Done::Http2`]) when HTTP/2 may be spoken here, refused otherwise;
//! - a head that does not complete within the header-read timeout after its first byte
//!   closes the connection without an answer (as hyper does);
//! - the request body (RFC 9112 §6: `Transfer-Encoding: chunked` last, or one
//!   `Content-Length`; anything else is `400`) is read only once the service polls it,
//!   which is also when `100 Continue` goes out (RFC 9110 §10.1.1);
//! - the answer is framed by the body's exact length when known, else chunked (HTTP/1.1)
//!   or by closing (HTTP/1.0); `HEAD`, `1xx`, `204` and `304` answers have no body
//!   (RFC 9112 §6.3); a `Date` field is added when missing (RFC 9110 §6.6.1);
//! - persistence follows RFC 9112 §9.3: HTTP/1.1 unless `Connection: close`, HTTP/1.0
//!   only with `Connection: keep-alive`; a body the service did not read is read and
//!   discarded after the answer when at most 64 KiB of it remains and it ends within 2 s
//!   (nginx discards such bodies too), else the connection closes after the answer, as it
//!   does when the client still waits for `100 Continue` or the body's framing broke;
//! - a `101` answer to a request that asked for an upgrade hands the connection to
//!   [`crate::upgrade::on`].

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::body::upgrade::{Pending, Upgraded};
use crate::body::{Http1Body, RequestBody};
use crate::io::Rewind;
use crate::Ended;

/// Most header fields in a request head (hyper's default; nginx and HAProxy allow 100
/// and 101).
pub const MAX_HEADERS: usize = 100;

/// Bytes asked of the connection per read.
const READ_SIZE: usize = 8 * 1024;

/// Answer bodies up to this size are copied behind the head and go out in one write.
const COPY_BODY_BYTES: usize = 16 * 1024;

/// Longest chunk-size or trailer line accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Largest trailer section (all its lines) accepted after a chunked body's last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// A request body the service answered without reading is read and discarded after the
/// answer, so the connection can carry the next request, when at most this much of it
/// remains (nginx discards the body of a request it answered early the same way); a longer
/// one closes the connection.
const DRAIN_BYTES: u64 = 64 * 1024;

/// Longest time spent discarding such a body before closing instead.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// HTTP/2's connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a client that opened with HTTP/2's preface gets where HTTP/1.1 alone is served:
/// an empty SETTINGS frame (the server's preface, RFC 9113 §3.4, §6.5), then GOAWAY
/// (§6.8) for stream 0 with the error HTTP_1_1_REQUIRED (0xd, §7).
pub const H2_REFUSAL: &[u8] = &[
    0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, no parameters
    0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY, 8 bytes of payload
    0, 0, 0, 0, // last stream id 0
    0, 0, 0, 0xd, // HTTP_1_1_REQUIRED
];

/// A connection the serve path can wait on for readability without a read buffer.
pub trait ReadReady {
    /// Ready when a read would not wait (data, end of stream or an error arrived, or bytes
    /// are already decoded and held).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for crate::io::EdgeIo {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        crate::io::EdgeIo::poll_read_ready(self, cx)
    }
}

impl<T: ReadReady> ReadReady for Box<tokio_rustls::server::TlsStream<T>> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (io, tls) = self.get_ref();
        // Plaintext already decrypted (or a close_notify) is ready now.
        if !tls.wants_read() {
            return Poll::Ready(Ok(()));
        }
        io.poll_read_ready(cx)
    }
}

/// How a connection's HTTP/1.1 service ended without an error.
pub(crate) enum Done<I, F> {
    /// Closed: by the client, after `Connection: close`, or on a graceful shutdown.
    Closed,
    /// Handed to the request's upgrade (a `101` answer).
    Upgraded,
    /// The client spoke HTTP/2: its connection (with the bytes read so far to replay) and
    /// the request handler, for an HTTP/2 server.
    Http2(Rewind<I>, F),
}

/// What ends a connection with an error: an [`Ended`] reason the role counts, or an I/O or
/// body error (logged only).
#[derive(Debug)]
pub(crate) enum Failed {
    Ended(Ended),
    Io(io::Error),
}

impl From<io::Error> for Failed {
    fn from(e: io::Error) -> Self {
        Failed::Io(e)
    }
}

/// Settings of the HTTP/1.1 side of one listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Longest wait for the rest of a head once its first byte came.
    pub(crate) header_read_timeout: Duration,
    /// Largest request head, bytes.
    pub(crate) max_head: usize,
    /// The first bytes may be HTTP/2's preface, served as HTTP/2.
    pub(crate) http2: bool,
}

/// Serves HTTP/1.1 on `io`: each request goes to `handle`, whose answer is written back.
/// `graceful`: finish the request in flight (its answer says `Connection: close`), then
/// close; an idle connection closes at once.
pub(crate) async fn serve<I, F, Fut, B>(
    mut io: I,
    settings: Settings,
    graceful: &CancellationToken,
    mut handle: F,
) -> Result<Done<I, F>, Failed>
where
    I: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
    F: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut buf = BytesMut::new();
    let mut out: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        // 1. Wait for bytes. Between requests with nothing buffered, the connection is
        //    idle: it gives its buffers back and waits for readability alone.
        //    A request that has already arrived is served even when a close was asked
        //    (idle timeout, drain): its answer says `Connection: close`. Closing on it
        //    would lose a request the client may not retry (the keep-alive race,
        //    RFC 9112 §9.3.1).
        if buf.is_empty() && !first {
            let mut ready = pin!(std::future::poll_fn(|cx| io.poll_read_ready(cx)));
            if poll_once(ready.as_mut()).await.is_pending() {
                if graceful.is_cancelled() {
                    return close(&mut io).await;
                }
                buf = BytesMut::new();
                out = Vec::new();
                tokio::select! {
                    biased;
                    r = ready => r?,
                    () = graceful.cancelled() => return close(&mut io).await,
                }
            }
        }
        // 2. Read until a whole head is buffered; 3. serve the request and its answer,
        //    boxed, so an idle connection's task holds no request state. Built in a block:
        //    a local of this function that lived across the await would keep its slot
        //    (moved out or not) in this future for the connection's whole life.
        let exchange = {
            let mut deadline: Option<tokio::time::Instant> = None;
            let parsed = loop {
                if !buf.is_empty() {
                    if first {
                        let n = buf.len().min(H2_PREFACE.len());
                        if buf[..n] == H2_PREFACE[..n] {
                            if n == H2_PREFACE.len() {
                                if settings.http2 {
                                    let io = Rewind::new(buf.freeze(), io);
                                    return Ok(Done::Http2(io, handle));
                                }
                                // An HTTP/2 client learns why (RFC 9113 §3.4: the server's
                                // preface is a SETTINGS frame; §7: HTTP_1_1_REQUIRED).
                                let _ = io.write_all(H2_REFUSAL).await;
                                let _ = io.shutdown().await;
                                return Err(Failed::Ended(Ended::H2cRefused));
                            }
                        } else {
                            first = false;
                        }
                    }
                    if !first {
                        match parse_head(&mut buf) {
                            Ok(Some(head)) => break head,
                            Ok(None) if buf.len() >= settings.max_head => {
                                return refuse(&mut io, &mut out, Ended::HeadTooLarge).await
                            }
                            Ok(None) => {}
                            Err(why) => return refuse(&mut io, &mut out, why).await,
                        }
                    }
                    deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + settings.header_read_timeout
                    });
                }
                buf.reserve(READ_SIZE);
                // Never read past the head cap: a head that has not ended within it is
                // refused above, whatever sizes its bytes arrive in. (Never zero: a full
                // buffer has been refused or parsed before this point.)
                let room = settings.max_head.saturating_sub(buf.len()).max(1);
                let mut limited = (&mut buf).limit(room);
                let n = match deadline {
                    None => io.read_buf(&mut limited).await?,
                    Some(at) => {
                        match tokio::time::timeout_at(at, io.read_buf(&mut limited)).await {
                            Ok(r) => r?,
                            Err(_) => return Err(Failed::Ended(Ended::HeaderTimeout)),
                        }
                    }
                };
                if n == 0 {
                    // The client closed, between requests or within a head.
                    return Ok(Done::Closed);
                }
                if deadline.is_none() {
                    deadline = Some(tokio::time::Instant::now() + settings.header_read_timeout);
                }
            };
            first = false;
            Box::pin(exchange(
                &mut io,
                &mut buf,
                &mut out,
                parsed,
                &mut handle,
                graceful,
            ))
        };
        let step = exchange.await?;
        match step {
            Step::Next => {}
            Step::Close => return close(&mut io).await,
            Step::Upgrade(tx) => {
                let io: Box<dyn crate::upgrade::Io> = Box::new(io);
                let _ = tx.send(Rewind::new(buf.freeze(), io));
                return Ok(Done::Upgraded);
            }
        }
    }
}

/// What follows an answer on the connection.
enum Step {
    /// The next request.
    Next,
    Close,
    /// The answer was `101`: the connection goes to the request's upgrade.
    Upgrade(oneshot::Sender<Upgraded>),
}

/// Serves one request: hands it to `handle`, reads its body as the service polls it,
/// and writes the answer.
async fn exchange<I, F, Fut, B>(
    io: &mut I,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    parsed: Parsed,
    handle: &mut F,
    graceful: &CancellationToken,
) -> Result<Step, Failed>
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Parsed {
        mut request,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
    } = parsed;
    let is_head = request.method() == Method::HEAD;
    let version = request.version();
    let upgrade = upgrade.then(|| {
        let (tx, rx) = oneshot::channel::<Upgraded>();
        request
            .extensions_mut()
            .insert(Pending(Arc::new(Mutex::new(Some(rx)))));
        tx
    });
    let (response, body_left) = match framing {
        None => {
            let Ok(response) = handle(request.map(|()| RequestBody::empty())).await;
            (response, BodyLeft::Read)
        }
        Some(mut decoder) => {
            let (tx, rx) = mpsc::channel(1);
            let (wanted_tx, wanted_rx) = oneshot::channel();
            let remaining = match decoder {
                Decoder::Length(n) => Some(n),
                _ => None,
            };
            let request = request.map(|()| {
                RequestBody::http1(Http1Body {
                    chunks: rx,
                    wanted: Some(wanted_tx),
                    remaining,
                })
            });
            let answer = handle(request);
            let mut answer = pin!(answer);
            let mut pumped: Option<io::Result<Pumped>> = None;
            let expect_continue = expect_continue && version == Version::HTTP_11;
            let mut continued = false;
            let response = {
                let pump = pump_body(
                    io,
                    buf,
                    &mut decoder,
                    tx,
                    wanted_rx,
                    expect_continue.then_some(&mut continued),
                );
                let mut pump = pin!(pump);
                loop {
                    tokio::select! {
                        biased;
                        Ok(r) = answer.as_mut() => break r,
                        r = pump.as_mut(), if pumped.is_none() => pumped = Some(r),
                    }
                }
            };
            match pumped {
                // The connection broke under the body: nothing more can be said on it.
                Some(Err(e)) => return Err(Failed::Io(e)),
                Some(Ok(Pumped::Whole)) => (response, BodyLeft::Read),
                // Broken framing (the service answered it).
                Some(Ok(Pumped::Broken)) => (response, BodyLeft::Unreadable),
                // A body left unread, perhaps begun. It can be discarded after the answer
                // unless the client still waits for `100 Continue` (RFC 9110 §10.1.1: it
                // may then never send the body) or too much of it remains.
                Some(Ok(Pumped::Unread)) | None => {
                    let small = match decoder {
                        Decoder::Length(n) => n <= DRAIN_BYTES,
                        Decoder::Chunked(_) => true,
                    };
                    if small && (!expect_continue || continued) {
                        (response, BodyLeft::Discard(decoder))
                    } else {
                        (response, BodyLeft::Unreadable)
                    }
                }
            }
        }
    };

    // 4. The answer.
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let upgraded = status == StatusCode::SWITCHING_PROTOCOLS && upgrade.is_some();
    let mut persist =
        keep_alive && !matches!(body_left, BodyLeft::Unreadable) && !graceful.is_cancelled();
    if status == StatusCode::SWITCHING_PROTOCOLS && !upgraded {
        persist = false;
    }
    let no_body = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = head_framing(&parts.headers, &body, no_body, version, &mut persist);
    out.clear();
    // Room for the head and a body that is copied behind it, so the buffer (given back
    // while idle) grows once per request, not field by field.
    let copied = match framing {
        Framing::Length(n) if n <= COPY_BODY_BYTES as u64 => n as usize,
        _ => 0,
    };
    out.reserve(256 + 64 * parts.headers.len() + copied);
    encode_head(
        out,
        version,
        status,
        &parts.headers,
        framing,
        &mut persist,
        upgraded,
    );
    drop(parts);
    if no_body {
        drop(body);
        io.write_all(out).await?;
        io.flush().await?;
    } else {
        write_body(io, out, body, framing).await?;
    }
    if let (true, BodyLeft::Discard(decoder)) = (persist && !upgraded, body_left) {
        persist = discard_body(io, buf, decoder).await;
    }
    Ok(match upgrade {
        Some(tx) if upgraded => Step::Upgrade(tx),
        _ if persist => Step::Next,
        _ => Step::Close,
    })
}

/// What became of a request's body by the time its answer is ready.
enum BodyLeft {
    /// None, or read to its end.
    Read,
    /// Left unread, framing intact and small enough: discarded after the answer.
    Discard(Decoder),
    /// Left unread for good (broken framing, too long, or `100 Continue` never sent): the
    /// connection closes after the answer.
    Unreadable,
}

/// Reads and discards the rest of a request body the service did not read, at most
/// [`DRAIN_BYTES`] within [`DRAIN_TIME`]. True when it ended within those bounds and the
/// connection can carry the next request.
async fn discard_body<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    mut decoder: Decoder,
) -> bool {
    let drain = async {
        let mut discarded = 0u64;
        loop {
            match decoder.decode(buf) {
                Decoded::Data(data) => {
                    discarded += data.len() as u64;
                    if discarded > DRAIN_BYTES {
                        return false;
                    }
                }
                Decoded::Done => return true,
                Decoded::Invalid => return false,
                Decoded::NeedMore => {
                    buf.reserve(READ_SIZE);
                    match io.read_buf(buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(_) => {}
                    }
                }
            }
        }
    };
    tokio::time::timeout(DRAIN_TIME, drain)
        .await
        .unwrap_or(false)
}

/// Shuts the sending side down (TLS: close_notify first) and reports a closed connection.
async fn close<I: AsyncWrite + Unpin, F>(io: &mut I) -> Result<Done<I, F>, Failed> {
    let _ = io.shutdown().await;
    Ok(Done::Closed)
}

/// Answers an unusable head (`400`, `431`) and closes.
async fn refuse<I: AsyncWrite + Unpin, F>(
    io: &mut I,
    out: &mut Vec<u8>,
    why: Ended,
) -> Result<Done<I, F>, Failed> {
    let status = match why {
        Ended::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    out.clear();
    encode_head(
        out,
        Version::HTTP_11,
        status,
        &HeaderMap::new(),
        Framing::Length(0),
        &mut false,
        false,
    );
    let _ = io.write_all(out).await;
    let _ = io.shutdown().await;
    Err(Failed::Ended(why))
}

/// Polls `fut` once.
async fn poll_once<F: Future + Unpin>(mut fut: F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await
}

/// A parsed request head and what the connection must do with it.
struct Parsed {
    request: Request<()>,
    framing: Option<Decoder>,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
}

/// Parses the head at the front of `buf`, taking it out of `buf` when complete.
/// `Ok(None)`: incomplete. Errors are the reason the connection is refused.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Parsed>, Ended> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Ended::HeadTooLarge),
        Err(_) => return Err(Ended::BadRequest),
    };
    // Offsets into the buffer, so the values can be slices of it once it is frozen.
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let method =
        Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| Ended::BadRequest)?;
    let target = at(req.path.unwrap_or("").as_bytes());
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut fields: Vec<(HeaderName, std::ops::Range<usize>)> =
        Vec::with_capacity(req.headers.len());
    let mut facts = Facts::default();
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| Ended::BadRequest)?;
        facts.see(&name, h.value);
        fields.push((name, at(h.value)));
    }
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| Ended::BadRequest)?;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, range) in fields {
        let value =
            HeaderValue::from_maybe_shared(head.slice(range)).map_err(|_| Ended::BadRequest)?;
        headers.append(name, value);
    }

    // Framing (RFC 9112 §6.1–6.3): chunked last, or one length. Both: refused, as nginx
    // does (RFC 9112 §6.1 allows it; a reader in front that went by the length would see
    // a different request boundary than we would).
    let framing = match facts.transfer_encoding {
        Some(chunked_last) => {
            if version == Version::HTTP_10
                || !chunked_last
                || facts.content_length.is_some()
                || facts.bad_length
            {
                return Err(Ended::BadRequest);
            }
            Some(Decoder::CHUNKED)
        }
        None if facts.bad_length => return Err(Ended::BadRequest),
        None => match facts.content_length {
            None | Some(0) => None,
            Some(n) => Some(Decoder::Length(n)),
        },
    };
    let keep_alive = match version {
        Version::HTTP_10 => facts.keep_alive && !facts.close,
        _ => !facts.close,
    };
    let upgrade = version == Version::HTTP_11 && facts.upgrade_field && facts.upgrade_token;
    let expect_continue = facts.expect_continue;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Parsed {
        request,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
    }))
}

/// What a request's fields say about its framing and persistence, gathered while the
/// fields are read (one pass, no lookups afterwards).
#[derive(Debug, Default)]
struct Facts {
    /// `Transfer-Encoding` was present, and whether its last field's last coding is
    /// `chunked` (RFC 9112 §6.3 item 4: otherwise a request's length cannot be known).
    transfer_encoding: Option<bool>,
    /// The `Content-Length`: every value (and list element) must be the same number
    /// (RFC 9112 §6.3 item 5).
    content_length: Option<u64>,
    /// A `Content-Length` was unparsable or conflicted with another.
    bad_length: bool,
    /// `Connection` tokens (RFC 9110 §7.6.1).
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
    /// An `Upgrade` field (RFC 9110 §7.8).
    upgrade_field: bool,
    /// `Expect: 100-continue` (RFC 9110 §10.1.1).
    expect_continue: bool,
}

impl Facts {
    fn see(&mut self, name: &HeaderName, value: &[u8]) {
        let list = || value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
        if *name == header::CONTENT_LENGTH {
            if !fold_content_length(&mut self.content_length, value) {
                self.bad_length = true;
            }
        } else if *name == header::TRANSFER_ENCODING {
            let last = list().next_back().unwrap_or_default();
            self.transfer_encoding = Some(last.eq_ignore_ascii_case(b"chunked"));
        } else if *name == header::CONNECTION {
            for token in list() {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    self.upgrade_token = true;
                }
            }
        } else if *name == header::UPGRADE {
            self.upgrade_field = true;
        } else if *name == header::EXPECT {
            self.expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
}

/// Folds one `Content-Length` field value into `seen`, the value of the fields before it:
/// a comma-separated list whose elements are all the same decimal number, equal to `seen`
/// if set (RFC 9110 §8.6, RFC 9112 §6.3 item 5). Returns false when an element is empty, is
/// not ASCII digits alone (a sign, an inner space) or overflows u64, or when two values
/// differ; `seen` keeps the values that were valid. Both sides of the load balancer read
/// lengths through this one function, so a request and a response are framed alike.
pub fn fold_content_length(seen: &mut Option<u64>, value: &[u8]) -> bool {
    let mut ok = true;
    for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        let n = (!part.is_empty() && part.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(part).ok()?.parse::<u64>().ok())
            .flatten();
        match n {
            Some(n) if seen.is_none_or(|l| l == n) => *seen = Some(n),
            _ => ok = false,
        }
    }
    ok
}

/// How an HTTP/1.1 message body is delimited, and how far it has been read: the one body
/// reader of both sides of the load balancer (requests here, backend answers in its
/// exchange), so a message is framed alike whichever way it travels (RFC 9112 §6.3, §7.1).
/// A body delimited by the connection's close has no decoder: its reader takes every byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// This many bytes are still to come (`Content-Length`).
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Chunked),
}

/// Where a chunked body's decoding stands (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines up to the empty one, this many bytes of them
    /// read so far (at most 16 KiB). Trailer fields are read and dropped.
    Trailers(usize),
    /// The body has ended.
    Done,
}

/// One step of [`Decoder::decode`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The next piece of the body.
    Data(Bytes),
    /// The buffer holds no more of the body: read more and call again.
    NeedMore,
    /// The body has ended; bytes left in the buffer belong to the next message.
    Done,
    /// The framing is broken (a bad chunk-size line, a chunk not ended by CRLF, a line
    /// not ended by CRLF alone or longer than 4 KiB, a trailer section over 16 KiB): the
    /// connection cannot carry another message.
    Invalid,
}

impl Decoder {
    /// A chunked body, before its first chunk-size line.
    pub const CHUNKED: Decoder = Decoder::Chunked(Chunked::Size);

    /// Decodes from the front of `buf`, taking what it used. Never returns an empty
    /// [`Decoded::Data`].
    pub fn decode(&mut self, buf: &mut BytesMut) -> Decoded {
        loop {
            match self {
                Decoder::Length(0) => return Decoded::Done,
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Decoded::NeedMore;
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    return Decoded::Data(buf.split_to(n).freeze());
                }
                Decoder::Chunked(state) => match *state {
                    Chunked::Done => return Decoded::Done,
                    Chunked::Size => {
                        let end = match line_end(buf) {
                            Ok(end) => end,
                            Err(wait_or_refuse) => return wait_or_refuse,
                        };
                        let line = &buf[..end];
                        let digits = line
                            .iter()
                            .position(|b| *b == b';' || *b == b' ' || *b == b'\t')
                            .map_or(line, |i| &line[..i]);
                        if digits.is_empty() || digits.len() > 15 {
                            return Decoded::Invalid;
                        }
                        let mut size = 0u64;
                        for d in digits {
                            let v = match d {
                                b'0'..=b'9' => d - b'0',
                                b'a'..=b'f' => d - b'a' + 10,
                                b'A'..=b'F' => d - b'A' + 10,
                                _ => return Decoded::Invalid,
                            };
                            size = size * 16 + u64::from(v);
                        }
                        buf.advance(end + 2);
                        *state = if size == 0 {
                            Chunked::Trailers(0)
                        } else {
                            Chunked::Data(size)
                        };
                    }
                    Chunked::Data(left) => {
                        if buf.is_empty() {
                            return Decoded::NeedMore;
                        }
                        let n = left.min(buf.len() as u64) as usize;
                        *state = if left == n as u64 {
                            Chunked::DataEnd
                        } else {
                            Chunked::Data(left - n as u64)
                        };
                        return Decoded::Data(buf.split_to(n).freeze());
                    }
                    Chunked::DataEnd => {
                        if buf.len() < 2 {
                            return Decoded::NeedMore;
                        }
                        if &buf[..2] != b"\r\n" {
                            return Decoded::Invalid;
                        }
                        buf.advance(2);
                        *state = Chunked::Size;
                    }
                    Chunked::Trailers(seen) => {
                        let end = match line_end(buf) {
                            Ok(end) => end,
                            Err(wait_or_refuse) => return wait_or_refuse,
                        };
                        if seen + end + 2 > MAX_TRAILERS {
                            return Decoded::Invalid;
                        }
                        buf.advance(end + 2);
                        *state = if end == 0 {
                            Chunked::Done
                        } else {
                            Chunked::Trailers(seen + end + 2)
                        };
                    }
                },
            }
        }
    }
}

/// Where the line at the front of `buf` ends (its CRLF), for a chunk-size or trailer line:
/// `Err(NeedMore)` while it may still come, `Err(Invalid)` once it is longer than
/// [`MAX_CHUNK_LINE`].
///
/// A line is ended by CRLF alone (RFC 9112 §7.1): a bare LF, or a control character other
/// than HTAB inside the line (a bare CR, NUL), is `Err(Invalid)` at once. Readers that took
/// a bare LF as a line end would frame the body differently, so such a body is refused
/// rather than waited on.
fn line_end(buf: &[u8]) -> Result<usize, Decoded> {
    let scanned = &buf[..buf.len().min(MAX_CHUNK_LINE + 2)];
    for (i, &b) in scanned.iter().enumerate() {
        match b {
            b'\r' if scanned.get(i + 1) == Some(&b'\n') => return Ok(i),
            // A CR as the last byte read so far: its LF may still come.
            b'\r' if i + 1 == scanned.len() => break,
            b'\t' => {}
            0..=0x1f | 0x7f => return Err(Decoded::Invalid),
            _ => {}
        }
    }
    if buf.len() > MAX_CHUNK_LINE {
        Err(Decoded::Invalid)
    } else {
        Err(Decoded::NeedMore)
    }
}

/// How reading a request body ended, short of a broken connection.
enum Pumped {
    /// Read to its end.
    Whole,
    /// Not read to its end: the service dropped it. The decoder says what remains.
    Unread,
    /// Its framing was broken (the service got an error): the connection cannot carry
    /// another request.
    Broken,
}

/// Reads the request body from the connection into `tx` once the service first polls it
/// (`wanted`), advancing `decoder`. With `continued` (the client sent `Expect:
/// 100-continue`), answers `100 Continue` first unless body bytes already came, and sets
/// it once the client may send the body. Errors: the connection failed (the service got
/// the error too).
async fn pump_body<I: AsyncRead + AsyncWrite + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    decoder: &mut Decoder,
    tx: mpsc::Sender<io::Result<Bytes>>,
    wanted: oneshot::Receiver<()>,
    continued: Option<&mut bool>,
) -> io::Result<Pumped> {
    if wanted.await.is_err() {
        return Ok(Pumped::Unread);
    }
    if let Some(continued) = continued {
        if buf.is_empty() {
            io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            io.flush().await?;
        }
        *continued = true;
    }
    loop {
        match decoder.decode(buf) {
            Decoded::Data(data) => {
                if tx.send(Ok(data)).await.is_err() {
                    return Ok(Pumped::Unread);
                }
            }
            Decoded::Done => return Ok(Pumped::Whole),
            Decoded::Invalid => {
                let _ = tx
                    .send(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed chunked request body",
                    )))
                    .await;
                return Ok(Pumped::Broken);
            }
            Decoded::NeedMore => {
                buf.reserve(READ_SIZE);
                let n = tokio::select! {
                    r = io.read_buf(buf) => r,
                    () = tx.closed() => return Ok(Pumped::Unread),
                };
                match n {
                    Ok(0) => {
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed within the request body",
                        );
                        let _ = tx.send(Err(io::ErrorKind::UnexpectedEof.into())).await;
                        return Err(e);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string()))).await;
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// How an answer's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (`HEAD`, `1xx`, `204`, `304`), fields left as the service set them.
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 with no known length).
    Close,
}

/// Chooses the answer's framing (and whether the connection can persist with it).
fn head_framing<B: Body>(
    headers: &HeaderMap,
    body: &B,
    no_body: bool,
    version: Version,
    persist: &mut bool,
) -> Framing {
    if no_body {
        return Framing::None;
    }
    if let Some(n) = body.size_hint().exact() {
        return Framing::Length(n);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        return Framing::Length(n);
    }
    if version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        *persist = false;
        Framing::Close
    }
}

/// Writes the status line and fields of an answer into `out`.
fn encode_head(
    out: &mut Vec<u8>,
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    persist: &mut bool,
    upgraded: bool,
) {
    out.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    let mut has_connection = false;
    let mut said_close = false;
    let no_length = status.is_informational() || status == StatusCode::NO_CONTENT;
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            if framing != Framing::None || no_length {
                continue;
            }
        } else if *name == header::TRANSFER_ENCODING {
            continue;
        } else if *name == header::CONNECTION {
            has_connection = true;
            if !upgraded {
                if !*persist {
                    // Said below, once.
                    continue;
                }
                // The service's own `Connection: close` ends the connection too.
                if value
                    .to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
                {
                    *persist = false;
                    said_close = true;
                }
            }
        } else if *name == header::DATE {
            has_date = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    if !upgraded {
        if !*persist {
            if !said_close {
                out.extend_from_slice(b"connection: close\r\n");
            }
        } else if version == Version::HTTP_10 && !has_connection {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::write(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the head in `out` and then the body, as `framing` says. A body that is ready
/// at once and small goes out in the same write as the head.
async fn write_body<I, B>(
    io: &mut I,
    out: &mut Vec<u8>,
    body: B,
    framing: Framing,
) -> Result<(), Failed>
where
    I: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = pin!(body);
    let mut written: u64 = 0;
    loop {
        let frame = {
            // Errors become boxed at once: `B::Error` need not be `Send`.
            let mut next = pin!(std::future::poll_fn(|cx| {
                body.as_mut()
                    .poll_frame(cx)
                    .map(|f| f.map(|r| r.map_err(Into::into)))
            }));
            match poll_once(next.as_mut()).await {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    // Nothing more now: what is held goes out while the body waits.
                    io.write_all(out).await?;
                    out.clear();
                    io.flush().await?;
                    next.await
                }
            }
        };
        let frame = match frame {
            None => break,
            Some(Err(e)) => {
                let e: Box<dyn std::error::Error + Send + Sync> = e;
                return Err(Failed::Io(io::Error::other(e)));
            }
            Some(Ok(frame)) => frame,
        };
        let Ok(mut data) = frame.into_data() else {
            // Trailers: HTTP/1.1 answers here carry none.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if let Framing::Length(n) = framing {
            if written + data.len() as u64 > n {
                return Err(Failed::Io(io::Error::other(
                    "answer body longer than its length",
                )));
            }
        }
        written += data.len() as u64;
        if framing == Framing::Chunked {
            write_hex(out, data.len());
        }
        if out.len() + data.len() <= COPY_BODY_BYTES {
            out.extend_from_slice(&data);
        } else {
            io.write_all(out).await?;
            out.clear();
            while data.has_remaining() {
                io.write_buf(&mut data).await?;
            }
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    io.write_all(out).await?;
    out.clear();
    io.flush().await?;
    if let Framing::Length(n) = framing {
        if written != n {
            return Err(Failed::Io(io::Error::other(
                "answer body shorter than its length",
            )));
        }
    }
    Ok(())
}

/// Appends `n` as a chunk-size line (hex, CRLF).
fn write_hex(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = HEX[v & 15];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The `Date` field's value (RFC 9110 §5.6.7 IMF-fixdate), made once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub(super) fn write(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            out.extend_from_slice(c.1.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<Option<Parsed>, Ended> {
        parse_head(&mut BytesMut::from(text.as_bytes()))
    }

    #[test]
    fn heads_are_parsed_with_their_framing_and_persistence() {
        let p = parse("GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.request.uri(), "/a?b");
        assert_eq!(p.request.headers()["host"], "x");
        assert!(p.framing.is_none() && p.keep_alive && !p.upgrade);
        let p = parse("POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.framing, Some(Decoder::Length(5)));
        assert!(!p.keep_alive);
        let p = parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.keep_alive);
        let p = parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!p.keep_alive);
        let p = parse("GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.upgrade);
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn smuggling_shapes_are_refused_rfc_9112_section_6_3() {
        let p = parse("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.framing, Some(Decoder::CHUNKED));
        for bad in [
            // A length and chunked, in either order.
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
        ] {
            assert_eq!(parse(bad).err(), Some(Ended::BadRequest), "{bad:?}");
        }
        let p = parse("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(p.framing, Some(Decoder::Length(3)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: y\r\n")).collect();
        assert_eq!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(),
            Some(Ended::HeadTooLarge)
        );
    }

    fn decode_all(mut d: Decoder, wire: &[u8], step: usize) -> Result<Vec<u8>, ()> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match d.decode(&mut buf) {
                Decoded::Data(b) => body.extend_from_slice(&b),
                Decoded::Done => return Ok(body),
                Decoded::Invalid => return Err(()),
                Decoded::NeedMore => {
                    if fed == wire.len() {
                        return Err(());
                    }
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_in_any_split_rfc_9112_section_7_1() {
        let wire = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            assert_eq!(
                decode_all(Decoder::CHUNKED, wire, step).unwrap(),
                b"hello0123456789",
                "step {step}"
            );
        }
        for bad in [
            &b"5\r\nhelloXX0\r\n\r\n"[..],
            b"z\r\n",
            b"12345678901234567\r\n",
        ] {
            assert!(decode_all(Decoder::CHUNKED, bad, 1).is_err());
        }
        assert_eq!(
            decode_all(Decoder::Length(3), b"abcdef", 2).unwrap(),
            b"abc"
        );
        // A line that is not ended by CRLF alone is refused as soon as it is seen, not
        // waited on: a bare LF, a bare CR, NUL, in a size line or a trailer line.
        for bad in [
            &b"3\nabc\r\n"[..],
            b"3;x=y\n",
            b"3;x\r=y\r\n",
            b"3;\0\r\n",
            b"0\r\nx-t: 1\n\r\n",
        ] {
            let mut d = Decoder::CHUNKED;
            let mut buf = BytesMut::from(bad);
            let last = std::iter::repeat_with(|| d.decode(&mut buf))
                .find(|step| !matches!(step, Decoded::Data(_)))
                .unwrap();
            assert_eq!(last, Decoded::Invalid, "{bad:?}");
        }
        // A CR that ends what has come so far waits for its LF.
        let mut d = Decoder::CHUNKED;
        assert_eq!(
            d.decode(&mut BytesMut::from(&b"3;x\r"[..])),
            Decoded::NeedMore
        );
    }

    fn head(
        status: StatusCode,
        headers: &[(&str, &str)],
        framing: Framing,
        persist: bool,
    ) -> String {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut out = Vec::new();
        encode_head(
            &mut out,
            Version::HTTP_11,
            status,
            &map,
            framing,
            &mut { persist },
            false,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn answer_heads_carry_one_framing_and_a_date() {
        let h = head(
            StatusCode::OK,
            &[
                ("content-length", "99"),
                ("transfer-encoding", "chunked"),
                ("x-a", "1"),
            ],
            Framing::Length(2),
            true,
        );
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
        assert!(
            h.contains("x-a: 1\r\n") && h.contains("content-length: 2\r\n"),
            "{h}"
        );
        assert!(!h.contains("99") && !h.contains("transfer-encoding"), "{h}");
        assert!(h.contains("\r\ndate: ") && h.ends_with("\r\n\r\n"), "{h}");
        let h = head(
            StatusCode::NOT_FOUND,
            &[("connection", "close")],
            Framing::Chunked,
            false,
        );
        assert_eq!(h.matches("connection: close").count(), 1, "{h}");
        assert!(h.contains("transfer-encoding: chunked\r\n"), "{h}");
        // The service's own `Connection: close` ends a connection that could persist.
        let mut map = HeaderMap::new();
        map.insert(header::CONNECTION, HeaderValue::from_static("Close"));
        let (mut out, mut persist) = (Vec::new(), true);
        let (v, ok) = (Version::HTTP_11, StatusCode::OK);
        encode_head(
            &mut out,
            v,
            ok,
            &map,
            Framing::Length(0),
            &mut persist,
            false,
        );
        let h = String::from_utf8(out).unwrap();
        assert!(!persist, "{h}");
        assert_eq!(
            h.to_ascii_lowercase().matches("connection: close").count(),
            1,
            "{h}"
        );
        // A HEAD answer keeps the length the service gave; a 204 has none.
        let h = head(
            StatusCode::OK,
            &[("content-length", "99")],
            Framing::None,
            true,
        );
        assert!(h.contains("content-length: 99\r\n"), "{h}");
        let h = head(
            StatusCode::NO_CONTENT,
            &[("content-length", "0")],
            Framing::None,
            true,
        );
        assert!(!h.contains("content-length"), "{h}");
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut out = Vec::new();
        write_hex(&mut out, 0x1a2f);
        write_hex(&mut out, 0);
        assert_eq!(out, b"1a2f\r\n0\r\n");
    }
}
