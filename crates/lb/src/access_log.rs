//! The access log: one line per request on either listener, written to a file by a
//! dedicated thread so the request path never waits on disk.
//!
//! The line is nginx's `combined` format followed by what a load balancer operator needs:
//!
//! ```text
//! 127.0.0.1 - - [22/Nov/2026:03:40:01 +0000] "GET /api/messages?x=1 HTTP/2.0" 200 1234 "referer" "user-agent" backend=web-01 rt=0.0031 listener=https
//! ```
//!
//! Every field the client controls (method, request target, `Referer`, `User-Agent`) is
//! escaped like nginx's `escape=default`, except that `"` and `\` are written `\"` and `\\`:
//! any other byte outside printable ASCII becomes `\xHH`, so one request is always exactly
//! one line (nginx `ngx_http_log_module`, `log_format ... escape=`).
//!
//! The request path formats the line and appends it to a shared, bounded buffer (a short
//! lock, no system call, no wake-up); when [`MAX_PENDING_BYTES`] are already waiting the
//! line is dropped and counted in `rampart_lb_access_log_dropped_total`. One thread owns the
//! file: it takes the whole buffer every [`FLUSH_INTERVAL`], or as soon as [`FLUSH_BYTES`]
//! wait, and writes it in one go (nginx's `access_log … buffer= flush=`). Waking a thread
//! and writing once per line cost about as much CPU as proxying the request itself.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write as _};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

use crate::access_format::UpstreamTiming;
use crate::layers::{AfterResponse, OnResponse};
use crate::proxy::ServedBy;
use topology::AccessLogFormat;

/// Bytes of lines that may wait for the writer; past this the request path drops lines.
pub(crate) const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;

/// The writer takes what waits at least this often.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// The writer is woken early once this many bytes wait.
pub(crate) const FLUSH_BYTES: usize = 64 * 1024;

/// Size of the writer's buffer, bytes.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Which listener a request arrived on (`listener=` in the line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// The HTTPS listener (proxied requests).
    Https,
    /// The HTTP listener (redirects only).
    Http,
}

impl Listener {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Listener::Https => "https",
            Listener::Http => "http",
        }
    }
}

/// The sending side of the access log, shared by every connection of both listeners. The
/// writer thread ends, after a last write, once every clone is dropped.
#[derive(Debug, Clone)]
pub(crate) struct AccessLog(Arc<Sender>);

/// Closes the buffer when the last [`AccessLog`] clone goes away.
#[derive(Debug)]
struct Sender(Arc<Shared>);

impl Drop for Sender {
    fn drop(&mut self) {
        let shared = &self.0;
        shared
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .closed = true;
        shared.wake.notify_one();
    }
}

#[derive(Debug)]
struct Shared {
    format: AccessLogFormat,
    pending: std::sync::Mutex<Pending>,
    wake: std::sync::Condvar,
    dropped: Counter,
    reopen: std::sync::atomic::AtomicBool,
}

/// Lines waiting for the writer.
#[derive(Debug, Default)]
struct Pending {
    /// Whole lines, each ending in `\n`; at most [`MAX_PENDING_BYTES`].
    lines: Vec<u8>,
    /// Every sender is gone: write what is left and stop.
    closed: bool,
}

/// Size cap and rotation of the access log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The file is rotated before a line would take it past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept: `access.log.1` (newest) … `access.log.<keep>`; older ones are
    /// deleted. At least 1.
    pub keep: u32,
}

/// Registers `rampart_lb_access_log_dropped` (a counter; `_total` is appended) in
/// `registry`. It stays 0 when there is no access log.
pub(crate) fn register_dropped(registry: &mut Registry) -> Counter {
    let dropped = Counter::default();
    registry.register(
        "rampart_lb_access_log_dropped",
        "Access log lines dropped because the writer fell behind",
        dropped.clone(),
    );
    dropped
}

impl AccessLog {
    /// Opens `path` for appending (created with mode 0644 before the umask when missing) and
    /// starts the writer thread. Lines that cannot be queued are counted in `dropped`.
    ///
    /// Errors: the file cannot be opened (missing directory, permissions) or the thread
    /// cannot be spawned.
    pub(crate) async fn open(
        path: &Path,
        rotation: Rotation,
        format: AccessLogFormat,
        dropped: Counter,
    ) -> io::Result<AccessLog> {
        let file = open_append(path)?;
        let shared = Arc::new(Shared {
            format,
            pending: std::sync::Mutex::new(Pending::default()),
            wake: std::sync::Condvar::new(),
            dropped,
            reopen: std::sync::atomic::AtomicBool::new(false),
        });
        let path = path.to_path_buf();
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("lb-access-log".into())
            .spawn(move || write_lines(file, &path, rotation, &writer))?;
        Ok(AccessLog(Arc::new(Sender(shared))))
    }

    /// Makes the writer reopen the file at its path before the next line (after an
    /// external rotation renamed it; the node calls this on SIGHUP).
    pub(crate) fn reopen(&self) {
        (self.0)
            .0
            .reopen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queues `line` (one line, ending in `\n`) without waiting on the writer; drops and
    /// counts it when [`MAX_PENDING_BYTES`] already wait.
    fn send(&self, line: &str) {
        let shared = &(self.0).0;
        let mut pending = shared
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.lines.len() + line.len() > MAX_PENDING_BYTES {
            drop(pending);
            shared.dropped.inc();
            return;
        }
        let before = pending.lines.len();
        pending.lines.extend_from_slice(line.as_bytes());
        let crossed = before < FLUSH_BYTES && pending.lines.len() >= FLUSH_BYTES;
        drop(pending);
        if crossed {
            shared.wake.notify_one();
        }
    }
}

/// The writer thread: every [`FLUSH_INTERVAL`] (or when [`FLUSH_BYTES`] wait) takes the
/// waiting lines and appends them, rotating before a line would take the file past
/// `rotation.max_bytes`; stops after a last write when every sender is gone. A write error
/// is logged once until writing succeeds again; the lines it hit are lost.
fn write_lines(file: File, path: &Path, rotation: Rotation, shared: &Shared) {
    let mut written = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
    let mut failing = false;
    let mut report = |result: io::Result<()>| match result {
        Ok(()) => failing = false,
        Err(e) => {
            if !failing {
                tracing::warn!(path = %path.display(), error = %e, "access log write failed");
            }
            failing = true;
        }
    };
    // Swapped with the shared buffer, so both keep their capacity.
    let mut batch: Vec<u8> = Vec::new();
    loop {
        let closed = {
            let pending = shared
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (mut pending, _) = shared
                .wake
                .wait_timeout_while(pending, FLUSH_INTERVAL, |p| {
                    !p.closed && p.lines.len() < FLUSH_BYTES
                })
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::swap(&mut pending.lines, &mut batch);
            pending.closed
        };
        for line in batch.split_inclusive(|&b| b == b'\n') {
            let rotate = written > 0 && written + line.len() as u64 > rotation.max_bytes;
            if rotate
                || shared
                    .reopen
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
            {
                report(out.flush());
                if rotate {
                    report(rotate_files(path, rotation.keep.max(1)));
                }
                match open_append(path) {
                    Ok(f) => {
                        written = f.metadata().map(|m| m.len()).unwrap_or(0);
                        out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, f);
                    }
                    Err(e) => report(Err(e)),
                }
            }
            written += line.len() as u64;
            report(out.write_all(line));
        }
        batch.clear();
        report(out.flush());
        if closed {
            break;
        }
    }
}

/// Opens `path` for appending, created with mode 0644 (before the umask) when missing.
fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)
}

/// `path.<keep-1>` → `path.<keep>` … `path` → `path.1` (the oldest beyond `keep` is
/// overwritten, so at most `keep` rotated files exist).
fn rotate_files(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |i: u32| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{i}"));
        std::path::PathBuf::from(p)
    };
    for i in (1..keep).rev() {
        match std::fs::rename(numbered(i), numbered(i + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(path, numbered(1))
}

/// One request as the access log records it.
#[derive(Debug)]
pub(crate) struct Entry<'a> {
    /// The client's address (the TCP peer).
    pub(crate) client: IpAddr,
    /// When the request arrived.
    pub(crate) time: SystemTime,
    pub(crate) method: &'a Method,
    pub(crate) uri: &'a Uri,
    pub(crate) version: Version,
    pub(crate) status: StatusCode,
    /// The response's declared body length, bytes.
    pub(crate) body_bytes: Option<u64>,
    pub(crate) referer: Option<&'a HeaderValue>,
    pub(crate) user_agent: Option<&'a HeaderValue>,
    /// The backend that answered; `None` for responses the load balancer made itself.
    pub(crate) backend: Option<&'a str>,
    /// From the request's arrival to the response headers.
    pub(crate) response_time: Duration,
    pub(crate) listener: Listener,
    /// The client connection's TLS handshake; `None` on plain HTTP.
    pub(crate) tls_handshake: Option<Duration>,
    /// Queue, connect and upstream times of a forwarded response.
    pub(crate) timing: Option<&'a UpstreamTiming>,
}

impl Entry<'_> {
    /// The line in `format`, ending in `\n`.
    pub(crate) fn line_as(&self, format: AccessLogFormat) -> String {
        match format {
            AccessLogFormat::Combined => self.line(),
            AccessLogFormat::Common => self.common_line(),
            AccessLogFormat::Json => crate::access_format::json_line(self),
        }
    }

    /// The NCSA Common Log Format line: `client - - [time] "request" status bytes`.
    pub(crate) fn common_line(&self) -> String {
        let mut s = String::with_capacity(160);
        self.push_common(&mut s);
        s.push('\n');
        s
    }

    /// Appends the Common Log Format fields (no newline).
    fn push_common(&self, s: &mut String) {
        // Writing to a String cannot fail.
        let _ = write!(s, "{} - - [", self.client);
        push_time(s, self.time);
        s.push_str("] \"");
        push_escaped(s, self.method.as_str().as_bytes());
        s.push(' ');
        match self.uri.path_and_query() {
            Some(pq) => push_escaped(s, pq.as_str().as_bytes()),
            None => push_escaped(s, self.uri.to_string().as_bytes()),
        }
        s.push(' ');
        s.push_str(version_str(self.version));
        let _ = write!(s, "\" {} ", self.status.as_u16());
        match self.body_bytes {
            Some(n) => {
                let _ = write!(s, "{n}");
            }
            None => s.push('-'),
        }
    }

    /// The `combined` line, ending in `\n`.
    pub(crate) fn line(&self) -> String {
        let mut s = String::with_capacity(256);
        self.push_common(&mut s);
        s.push_str(" \"");
        push_header(&mut s, self.referer);
        s.push_str("\" \"");
        push_header(&mut s, self.user_agent);
        s.push_str("\" backend=");
        s.push_str(self.backend.unwrap_or("-"));
        s.push_str(" rt=");
        crate::access_format::push_secs(&mut s, self.response_time);
        crate::access_format::push_timings(&mut s, self);
        s.push_str(" listener=");
        s.push_str(self.listener.as_str());
        s.push('\n');
        s
    }
}

pub(crate) fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

fn push_header(s: &mut String, value: Option<&HeaderValue>) {
    match value {
        Some(v) => push_escaped(s, v.as_bytes()),
        None => s.push('-'),
    }
}

/// Appends `bytes` with `"` → `\"`, `\` → `\\`, and every byte outside printable ASCII
/// (below 0x20 or from 0x7f) → `\xHH` (upper-case hex, like nginx).
pub(crate) fn push_escaped(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => {
                s.push_str("\\x");
                s.push(char::from(HEX[usize::from(b >> 4)]));
                s.push(char::from(HEX[usize::from(b & 0x0f)]));
            }
        }
    }
}

/// nginx's `$time_local` shape, in UTC: `22/Nov/2026:03:40:01 +0000`.
const TIME_FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000"
);

/// Appends `at` in UTC in the shape of nginx's `$time_local`: `22/Nov/2026:03:40:01 +0000`.
/// The text of the last second formatted is kept per thread (as nginx caches its time
/// strings), so a busy log formats a date once a second, not once a line.
fn push_time(s: &mut String, at: SystemTime) {
    thread_local! {
        static LAST: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    // Only years beyond 9999 fail to format.
    let format = || {
        time::OffsetDateTime::from(at)
            .format(TIME_FORMAT)
            .unwrap_or_else(|_| "-".to_string())
    };
    let Ok(since_epoch) = at.duration_since(SystemTime::UNIX_EPOCH) else {
        return s.push_str(&format());
    };
    let second = since_epoch.as_secs();
    LAST.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            *text = format();
            *cached = second;
        }
        s.push_str(text);
    });
}

/// Writes one access log line per request of a listener; without an access log
/// configured it passes requests through untouched.
#[derive(Debug, Clone)]
pub(crate) struct AccessLogLayer {
    log: Option<AccessLog>,
    listener: Listener,
    client: IpAddr,
    tls_handshake: Option<Duration>,
}

impl AccessLogLayer {
    /// The layer for one connection on `listener`: the client's address and how long its
    /// TLS handshake took (`None` on plain TCP) go into every line of the connection.
    pub(crate) fn new(log: Option<AccessLog>, listener: Listener, conn: &serve::ConnInfo) -> Self {
        AccessLogLayer {
            log,
            listener,
            client: conn.peer.ip(),
            tls_handshake: conn.tls_handshake,
        }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLogged<S>;
    fn layer(&self, inner: S) -> AccessLogged<S> {
        AccessLogged {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`AccessLogLayer`].
#[derive(Debug, Clone)]
pub(crate) struct AccessLogged<S> {
    inner: S,
    layer: AccessLogLayer,
}

impl<S, B, ResB> Service<Request<B>> for AccessLogged<S>
where
    S: Service<Request<B>, Response = Response<ResB>, Error = Infallible>,
    ResB: http_body::Body,
{
    type Response = Response<ResB>;
    type Error = Infallible;
    type Future = AfterResponse<S::Future, LineParts>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(log) = self.layer.log.clone() else {
            return AfterResponse::new(self.inner.call(req), None);
        };
        // Cheap clones (reference-counted bytes) taken before the request moves on.
        let pending = LineParts {
            log,
            listener: self.layer.listener,
            client: self.layer.client,
            started: Instant::now(),
            time: SystemTime::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            referer: req.headers().get(header::REFERER).cloned(),
            user_agent: req.headers().get(header::USER_AGENT).cloned(),
            tls_handshake: self.layer.tls_handshake,
        };
        AfterResponse::new(self.inner.call(req), Some(pending))
    }
}

/// What a request's log line needs from the request, kept until its response is ready.
pub(crate) struct LineParts {
    log: AccessLog,
    listener: Listener,
    client: IpAddr,
    started: Instant,
    time: SystemTime,
    method: Method,
    uri: Uri,
    version: Version,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    tls_handshake: Option<Duration>,
}

impl<B: http_body::Body> OnResponse<B> for LineParts {
    /// Writes the request's line.
    fn on_response(self, resp: &Response<B>) {
        let body_bytes = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .or_else(|| resp.body().size_hint().exact());
        let entry = Entry {
            client: resp
                .extensions()
                .get::<crate::proxy::ForwardedClient>()
                .map_or(self.client, |c| c.0),
            time: self.time,
            method: &self.method,
            uri: &self.uri,
            version: self.version,
            status: resp.status(),
            body_bytes,
            referer: self.referer.as_ref(),
            user_agent: self.user_agent.as_ref(),
            backend: resp.extensions().get::<ServedBy>().map(|s| &*s.0),
            response_time: self.started.elapsed(),
            listener: self.listener,
            tls_handshake: self.tls_handshake,
            timing: resp.extensions().get::<UpstreamTiming>(),
        };
        self.log.send(&entry.line_as((self.log.0).0.format));
    }
}

#[cfg(test)]
mod rotation_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_writer_that_falls_behind_costs_dropped_lines_not_memory() {
        // No writer thread: nothing drains the buffer.
        let dropped = Counter::default();
        let shared = Arc::new(Shared {
            format: AccessLogFormat::Combined,
            pending: std::sync::Mutex::new(Pending::default()),
            wake: std::sync::Condvar::new(),
            dropped: dropped.clone(),
            reopen: std::sync::atomic::AtomicBool::new(false),
        });
        let log = AccessLog(Arc::new(Sender(shared.clone())));
        let line = format!("{}\n", "x".repeat(99));
        let sent = MAX_PENDING_BYTES / line.len() + 50;
        for _ in 0..sent {
            log.send(&line);
        }
        let waiting = shared.pending.lock().unwrap().lines.len();
        assert!(waiting <= MAX_PENDING_BYTES, "{waiting} bytes wait");
        assert_eq!(waiting / line.len() + dropped.get() as usize, sent);
        assert!(dropped.get() >= 50);
        drop(log);
        assert!(shared.pending.lock().unwrap().closed, "last sender closes");
    }

    #[tokio::test]
    async fn rotates_at_the_cap_keeps_at_most_keep_files_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let rotation = Rotation {
            max_bytes: 1000,
            keep: 2,
        };
        let log = AccessLog::open(
            &path,
            rotation,
            AccessLogFormat::Combined,
            Counter::default(),
        )
        .await
        .unwrap();
        let line = format!("{}\n", "x".repeat(99));
        for _ in 0..100 {
            // Paced so the bounded queue never drops a line.
            log.send(&line);
            tokio::task::yield_now().await;
        }
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        test_support::eventually("rotated files", std::time::Duration::from_secs(5), || {
            let n = names();
            async move { (n == ["access.log", "access.log.1", "access.log.2"]).then_some(()) }
        })
        .await;
        for n in names() {
            let len = std::fs::metadata(dir.path().join(&n)).unwrap().len();
            assert!(len <= 1000, "{n} is {len} bytes");
        }
        // An external rotation renames the file; after reopen the writer starts a new one.
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        log.reopen();
        log.send(&line);
        test_support::eventually("reopened", std::time::Duration::from_secs(5), || {
            let ok = std::fs::metadata(&path).is_ok();
            async move { ok.then_some(()) }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use std::time::UNIX_EPOCH;
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    fn escaped(bytes: &[u8]) -> String {
        let mut s = String::new();
        push_escaped(&mut s, bytes);
        s
    }

    #[test]
    fn seconds_print_with_four_decimals_like_the_float_format() {
        let secs = |d: Duration| {
            let mut s = String::new();
            crate::access_format::push_secs(&mut s, d);
            s
        };
        assert_eq!(secs(Duration::ZERO), "0.0000");
        assert_eq!(secs(Duration::from_micros(49)), "0.0000");
        assert_eq!(secs(Duration::from_micros(50)), "0.0001");
        assert_eq!(secs(Duration::from_millis(31)), "0.0310");
        assert_eq!(secs(Duration::from_micros(3_141_590)), "3.1416");
        assert_eq!(secs(Duration::from_secs(12_345)), "12345.0000");
        // Away from the exact half-way points, the same text as `{:.4}` of the seconds.
        for micros in (0..2_000_000u64).step_by(7_919).chain([99_949, 1_000_149]) {
            let d = Duration::from_micros(micros);
            assert_eq!(secs(d), format!("{:.4}", d.as_secs_f64()), "{micros} µs");
        }
    }

    #[test]
    fn escapes_quotes_backslashes_and_non_printable_bytes() {
        assert_eq!(escaped(b"curl/8.5.0"), "curl/8.5.0");
        assert_eq!(escaped(br#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escaped(b"line\r\nnext\t"), r"line\x0D\x0Anext\x09");
        assert_eq!(escaped(b"\x00\x1f\x7f\x80\xff"), r"\x00\x1F\x7F\x80\xFF");
        assert_eq!(escaped("é".as_bytes()), r"\xC3\xA9");
        assert_eq!(escaped(b" ~"), " ~");
        assert!(!escaped(&(0..=255).collect::<Vec<u8>>()).contains('\n'));
    }

    #[test]
    fn formats_time_like_nginx_in_utc() {
        let at = |secs| {
            let mut s = String::new();
            push_time(&mut s, UNIX_EPOCH + Duration::from_secs(secs));
            s
        };
        assert_eq!(at(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(at(951_868_799), "29/Feb/2000:23:59:59 +0000");
        assert_eq!(at(951_868_800), "01/Mar/2000:00:00:00 +0000");
        assert_eq!(at(1_795_318_801), "22/Nov/2026:03:40:01 +0000");
        // The per-second cache: the same second again, a later fraction of it, and back.
        assert_eq!(at(1_795_318_801), "22/Nov/2026:03:40:01 +0000");
        let mut s = String::new();
        push_time(
            &mut s,
            UNIX_EPOCH + Duration::from_millis(1_795_318_801_999),
        );
        assert_eq!(s, "22/Nov/2026:03:40:01 +0000");
        assert_eq!(at(0), "01/Jan/1970:00:00:00 +0000");
        // 2100 is not a leap year.
        assert_eq!(at(4_107_542_399), "28/Feb/2100:23:59:59 +0000");
        assert_eq!(at(4_107_542_400), "01/Mar/2100:00:00:00 +0000");
        assert_eq!(at(4_133_980_799), "31/Dec/2100:23:59:59 +0000");
    }

    #[test]
    fn formats_a_combined_line_with_backend_rt_and_listener() {
        let uri = Uri::from_static("https://www.foobar.com/api/messages?x=1");
        let referer = HeaderValue::from_static("https://www.foobar.com/");
        let agent = HeaderValue::from_static(r#"evil" agent\"#);
        let entry = Entry {
            client: "127.0.0.1".parse().unwrap(),
            time: UNIX_EPOCH + Duration::from_secs(1_795_318_801),
            method: &Method::GET,
            uri: &uri,
            version: Version::HTTP_2,
            status: StatusCode::OK,
            body_bytes: Some(1234),
            referer: Some(&referer),
            user_agent: Some(&agent),
            backend: Some("web-01"),
            response_time: Duration::from_micros(3100),
            listener: Listener::Https,
            tls_handshake: Some(Duration::from_micros(1200)),
            timing: Some(&UpstreamTiming {
                queue: Duration::from_micros(100),
                connect: Some(Duration::from_micros(800)),
                response: Duration::from_micros(2000),
            }),
        };
        assert_eq!(
            entry.line(),
            "127.0.0.1 - - [22/Nov/2026:03:40:01 +0000] \"GET /api/messages?x=1 HTTP/2.0\" \
             200 1234 \"https://www.foobar.com/\" \"evil\\\" agent\\\\\" backend=web-01 \
             rt=0.0031 tls=0.0012 queue=0.0001 connect=0.0008 upstream=0.0020 listener=https\n"
        );
        assert_eq!(
            entry.line_as(AccessLogFormat::Common),
            "127.0.0.1 - - [22/Nov/2026:03:40:01 +0000] \"GET /api/messages?x=1 HTTP/2.0\" \
             200 1234\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&entry.line_as(AccessLogFormat::Json)).unwrap();
        assert_eq!(json["time"], "2026-11-22T03:40:01Z");
        assert_eq!(json["client"], "127.0.0.1");
        assert_eq!(json["method"], "GET");
        assert_eq!(json["path"], "/api/messages?x=1");
        assert_eq!(json["status"], 200);
        assert_eq!(json["bytes"], 1234);
        assert_eq!(json["user_agent"], r#"evil" agent\"#);
        assert_eq!(json["backend"], "web-01");
        assert_eq!(json["connect_time"], 0.0008);
        assert_eq!(json["tls_handshake_time"], 0.0012);
        let redirect = Entry {
            uri: &Uri::from_static("/a"),
            version: Version::HTTP_11,
            status: StatusCode::MOVED_PERMANENTLY,
            body_bytes: None,
            referer: None,
            user_agent: None,
            backend: None,
            response_time: Duration::ZERO,
            listener: Listener::Http,
            tls_handshake: None,
            timing: None,
            ..entry
        };
        assert_eq!(
            redirect.line(),
            "127.0.0.1 - - [22/Nov/2026:03:40:01 +0000] \"GET /a HTTP/1.1\" 301 - \"-\" \"-\" \
             backend=- rt=0.0000 tls=- queue=- connect=- upstream=- listener=http\n"
        );
        assert_eq!(
            redirect.line_as(AccessLogFormat::Common),
            "127.0.0.1 - - [22/Nov/2026:03:40:01 +0000] \"GET /a HTTP/1.1\" 301 -\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&redirect.line_as(AccessLogFormat::Json)).unwrap();
        assert_eq!(json["backend"], serde_json::Value::Null);
        assert_eq!(json["bytes"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn layer_writes_one_line_per_request_with_the_serving_backend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut registry = Registry::default();
        let rotation = Rotation {
            max_bytes: 1 << 20,
            keep: 1,
        };
        let log = AccessLog::open(
            &path,
            rotation,
            AccessLogFormat::Combined,
            register_dropped(&mut registry),
        )
        .await
        .unwrap();
        let conn = serve::ConnInfo {
            peer: "192.0.2.7:40000".parse().unwrap(),
            identity: None,
            service: topology::Service::Https,
            tls_handshake: Some(Duration::from_micros(2500)),
        };
        let svc = ServiceBuilder::new()
            .layer(AccessLogLayer::new(Some(log), Listener::Https, &conn))
            .service(service_fn(|_req: Request<()>| async {
                let mut resp = Response::new(Full::new(Bytes::from_static(b"hello")));
                resp.extensions_mut().insert(ServedBy("web-02".into()));
                Ok::<_, Infallible>(resp)
            }));
        let req = Request::builder()
            .uri("/x?y=1")
            .header("user-agent", "t")
            .body(())
            .unwrap();
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // The layer and with it the last sender are gone: the writer flushes and ends.
        let text = test_support::eventually("the access log line", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            async move { text.ends_with('\n').then_some(text) }
        })
        .await;
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("192.0.2.7 - - ["), "{text}");
        assert!(
            text.contains("\"GET /x?y=1 HTTP/1.1\" 200 5 \"-\" \"t\" backend=web-02 rt="),
            "{text}"
        );
        assert!(text.ends_with(" listener=https\n"), "{text}");
        // The connection's handshake time, given when the layer was made, is in the line.
        assert!(text.contains(" tls=0.0025 "), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        // 0644 before the umask: never executable, never writable by group or others.
        assert_eq!(mode & 0o133, 0, "{mode:o}");
    }
}
