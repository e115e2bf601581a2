//! What the access log records beyond the request line — the upstream timings — and the
//! line formats other than `combined`: `common` (NCSA Common Log Format) and `json`.
//!
//! Timings, all in seconds: `tls` the client connection's TLS handshake (the same for
//! every request on a connection; `-` on plain HTTP), `queue` the wait for a backend slot
//! (over every attempt), `connect` TCP connect plus TLS handshake to the backend when the
//! request opened a new upstream connection (`-` when it reused a pooled one), `upstream`
//! from sending the request to the end of the buffered response of the attempt that
//! answered, and `rt` from the request's arrival to the response headers. Responses the
//! load balancer makes itself have `-` for the upstream ones.

use std::fmt::Write as _;
use std::time::Duration;

use crate::access_log::Entry;

/// The upstream timings of a forwarded response, in its extensions (never sent).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UpstreamTiming {
    /// Waiting for a backend slot, over every attempt.
    pub(crate) queue: Duration,
    /// Connect + handshake of a new upstream connection; `None` when a pooled one was used.
    pub(crate) connect: Option<Duration>,
    /// Sending the request to the end of the buffered response.
    pub(crate) response: Duration,
}

fn secs(s: &mut String, d: Option<Duration>) {
    match d {
        Some(d) => push_secs(s, d),
        None => s.push('-'),
    }
}

/// Appends `d` in seconds with four decimals, rounded to the nearest 100 µs (`0.0031`, as
/// `{:.4}` of the seconds would print it). Integer arithmetic: formatting an `f64` with a
/// fixed precision went through core's exact float printing, about a tenth of the access
/// log's cost per line.
pub(crate) fn push_secs(s: &mut String, d: Duration) {
    let units = (d.as_micros() + 50) / 100;
    // Writing to a String cannot fail.
    let _ = write!(s, "{}.{:04}", units / 10_000, units % 10_000);
}

/// The timing fields of a `combined` line after `rt=`: ` tls=… queue=… connect=…
/// upstream=…`.
pub(crate) fn push_timings(s: &mut String, e: &Entry<'_>) {
    s.push_str(" tls=");
    secs(s, e.tls_handshake);
    s.push_str(" queue=");
    secs(s, e.timing.map(|t| t.queue));
    s.push_str(" connect=");
    secs(s, e.timing.and_then(|t| t.connect));
    s.push_str(" upstream=");
    secs(s, e.timing.map(|t| t.response));
}

/// The entry as one JSON object and a newline. Strings are the request's bytes, invalid
/// UTF-8 replaced by U+FFFD; absent values are `null`; times in seconds.
pub(crate) fn json_line(e: &Entry<'_>) -> String {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let time = time::OffsetDateTime::from(e.time)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let target = e
        .uri
        .path_and_query()
        .map_or_else(|| e.uri.to_string(), |pq| pq.as_str().to_string());
    let value = serde_json::json!({
        "time": time,
        "client": e.client.to_string(),
        "method": e.method.as_str(),
        "path": target,
        "protocol": crate::access_log::version_str(e.version),
        "status": e.status.as_u16(),
        "bytes": e.body_bytes,
        "referer": e.referer.map(|v| text(v.as_bytes())),
        "user_agent": e.user_agent.map(|v| text(v.as_bytes())),
        "backend": e.backend,
        "listener": e.listener.as_str(),
        "request_time": e.response_time.as_secs_f64(),
        "tls_handshake_time": e.tls_handshake.map(|d| d.as_secs_f64()),
        "queue_time": e.timing.map(|t| t.queue.as_secs_f64()),
        "connect_time": e.timing.and_then(|t| t.connect).map(|d| d.as_secs_f64()),
        "upstream_time": e.timing.map(|t| t.response.as_secs_f64()),
    });
    let mut line = value.to_string();
    line.push('\n');
    line
}
