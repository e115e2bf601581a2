//! Pushing to the monitoring service: every interval the agent encodes its registry in the
//! classic text format with each sample stamped with the collection time (milliseconds
//! since the Unix epoch, as the text format 0.0.4 defines timestamps), gzip-compresses it
//! (RFC 1952) and appends it to the [`Spool`]; a separate sender delivers the spool oldest
//! first over the given HTTPS client (`Content-Encoding: gzip`).
//!
//! Collection never waits for delivery: while the monitor is unreachable the pushes pile up
//! in the spool (bounded; the oldest dropped and counted) and are delivered in order once it
//! answers again, so the monitor's store gets the samples of the outage at their own times.
//!
//! The monitor's answer decides a record's fate: 2xx delivered; any other 4xx but 408 and
//! 429 refused for good (dropped, counted, logged: sending it again cannot succeed); a 5xx,
//! 408, 429 or a transport error leaves it at the head of the spool and is retried after
//! [`RETRY_AFTER`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::header;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::Notify;

use crate::negotiate::TEXT_004_CONTENT_TYPE;
use crate::spool::Spool;

/// Longest one delivery may take, connection included.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait before retrying the head of the spool after a failed delivery.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Default bound of an agent's spool: 64 MiB, about four hours of one host's pushes at one
/// per second.
pub const DEFAULT_SPOOL_BYTES: u64 = 64 * 1024 * 1024;
/// At most one failure log line per this period while deliveries keep failing.
const FAILURE_LOG_PERIOD: Duration = Duration::from_secs(30);
/// At most this many records delivered per wake-up before yielding to the timer.
const MAX_DELIVERIES_PER_WAKE: usize = 10_000;

/// Delivery counters, shared by the sender and the agent's own metrics.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Records the monitor accepted.
    pub delivered: AtomicU64,
    /// Records the monitor refused for good (4xx).
    pub refused: AtomicU64,
    /// Failed delivery attempts (transport errors, 5xx, 408, 429).
    pub failures: AtomicU64,
    /// Collections that could not be encoded or spooled.
    pub lost: AtomicU64,
}

/// What a push's body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushFormat {
    /// Rampart's ingest: the text format 0.0.4 with millisecond timestamps, gzip.
    Text,
    /// Prometheus remote-write 1.0 ([`crate::remote_write`]), these labels added to every
    /// series (e.g. `instance`, `job`).
    RemoteWrite {
        /// The extra labels.
        labels: Vec<(String, String)>,
    },
}

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct PushTarget {
    /// The URL, e.g. `https://mon-01:9090/api/v1/push`.
    pub url: String,
    /// The body's format.
    pub format: PushFormat,
    /// The HTTPS client (mutual TLS, timeouts set).
    pub client: reqwest::Client,
    /// Time between collections.
    pub interval: Duration,
}

/// The current time in milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Encodes `registry` as one push in `format`: the text format 0.0.4 with every sample
/// stamped `ms`, gzip-compressed; or a snappy-compressed remote-write request. `None` when
/// encoding fails (logged).
pub fn encode_push(registry: &Registry, ms: i64, format: &PushFormat) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut om = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut om, registry) {
        tracing::error!("encoding metrics: {e}");
        return None;
    }
    if let PushFormat::RemoteWrite { labels } = format {
        let samples = match crate::exposition::parse(&om) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("reading back the exposition: {e}");
                return None;
            }
        };
        let req = crate::remote_write::write_request(&samples, labels, ms);
        return match crate::remote_write::encode(&req) {
            Ok(body) => Some(body),
            Err(e) => {
                tracing::error!("snappy: {e}");
                None
            }
        };
    }
    let text = crate::negotiate::stamp(&crate::negotiate::to_text_004(&om), ms);
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(text.as_bytes()).ok()?;
    gz.finish().ok()
}

/// Spawns the collection loop and the sender on `tasks`.
pub fn spawn(
    tasks: &::serve::RoleTasks,
    registry: Arc<Registry>,
    target: PushTarget,
    spool: Arc<Spool>,
    stats: Arc<PushStats>,
) {
    let wake = Arc::new(Notify::new());
    let token = tasks.token();
    let collect = collect_loop(
        registry,
        target.interval,
        target.format.clone(),
        spool.clone(),
        stats.clone(),
        wake.clone(),
    );
    tasks.spawn(async move {
        tokio::select! {
            _ = collect => {}
            _ = token.cancelled() => {}
        }
    });
    let token = tasks.token();
    let send = send_loop(target, spool, stats, wake);
    tasks.spawn(async move {
        tokio::select! {
            _ = send => {}
            _ = token.cancelled() => {}
        }
    });
}

async fn collect_loop(
    registry: Arc<Registry>,
    every: Duration,
    format: PushFormat,
    spool: Arc<Spool>,
    stats: Arc<PushStats>,
    wake: Arc<Notify>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ms = now_ms();
        let registry = registry.clone();
        let spool = spool.clone();
        let format = format.clone();
        let done = tokio::task::spawn_blocking(move || {
            let record =
                encode_push(&registry, ms, &format).ok_or("encoding failed".to_string())?;
            spool.append(&record).map_err(|e| e.to_string())
        })
        .await;
        match done {
            Ok(Ok(())) => wake.notify_one(),
            Ok(Err(e)) => {
                stats.lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("push not spooled: {e}");
            }
            Err(e) => {
                stats.lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!("push not spooled: {e}");
            }
        }
    }
}

/// What the monitor made of one record.
enum Outcome {
    Delivered,
    Refused(String),
    Retry(String),
}

async fn deliver(target: &PushTarget, record: Vec<u8>) -> Outcome {
    let req = target.client.post(&target.url);
    let req = match target.format {
        PushFormat::Text => req
            .header(header::CONTENT_TYPE, TEXT_004_CONTENT_TYPE)
            .header(header::CONTENT_ENCODING, "gzip"),
        PushFormat::RemoteWrite { .. } => req
            .header(header::CONTENT_TYPE, crate::remote_write::CONTENT_TYPE)
            .header(header::CONTENT_ENCODING, "snappy")
            .header(
                "X-Prometheus-Remote-Write-Version",
                crate::remote_write::VERSION,
            ),
    };
    let result = req.body(record).send().await;
    match result {
        Ok(r) if r.status().is_success() => Outcome::Delivered,
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            let why = format!("{status}: {}", text.trim());
            let retry = status.is_server_error() || matches!(status.as_u16(), 408 | 429);
            if retry {
                Outcome::Retry(why)
            } else {
                Outcome::Refused(why)
            }
        }
        Err(e) => Outcome::Retry(error_chain(&e)),
    }
}

async fn send_loop(
    target: PushTarget,
    spool: Arc<Spool>,
    stats: Arc<PushStats>,
    wake: Arc<Notify>,
) {
    let mut failing: u64 = 0;
    let mut last_log: Option<Instant> = None;
    loop {
        // New records wake the sender; the timeout retries the head after a failure.
        let _ = tokio::time::timeout(RETRY_AFTER, wake.notified()).await;
        for _ in 0..MAX_DELIVERIES_PER_WAKE {
            let s = spool.clone();
            let head = match tokio::task::spawn_blocking(move || s.oldest()).await {
                Ok(Ok(Some(head))) => head,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    tracing::warn!("{e} (record dropped)");
                    continue;
                }
                Err(e) => {
                    tracing::error!("reading the spool: {e}");
                    break;
                }
            };
            let (seq, record) = head;
            let outcome = deliver(&target, record).await;
            let failed = match outcome {
                Outcome::Delivered => {
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Outcome::Refused(why) => {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("push to {} refused, dropped: {why}", target.url);
                    None
                }
                Outcome::Retry(why) => Some(why),
            };
            match failed {
                None => {
                    let s = spool.clone();
                    let _ = tokio::task::spawn_blocking(move || s.remove(seq)).await;
                    if failing > 0 {
                        tracing::info!(
                            "push to {} recovered after {failing} failed attempts",
                            target.url
                        );
                        failing = 0;
                        last_log = None;
                    }
                }
                Some(why) => {
                    failing += 1;
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    if last_log.is_none_or(|t| t.elapsed() >= FAILURE_LOG_PERIOD) {
                        let waiting = spool.stats();
                        tracing::warn!(
                            "push to {} failed ({failing} in a row; {} pushes, {} bytes spooled): {why}",
                            target.url,
                            waiting.records,
                            waiting.bytes
                        );
                        last_log = Some(Instant::now());
                    }
                    tokio::time::sleep(RETRY_AFTER).await;
                    break;
                }
            }
        }
    }
}

/// An error and its sources on one line (reqwest hides the cause in `source()`).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The agent's own delivery metrics, one `target` label value per push target
/// (`monitor`, `remote_write`): `rampart_agent_spool_records`,
/// `rampart_agent_spool_bytes`, `rampart_agent_spool_dropped_total` (pushes dropped
/// oldest-first to keep the spool within its bound), `rampart_agent_pushes_total{result}`
/// (`delivered`, `refused`, `failed` attempts, `lost` collections).
#[derive(Debug, Default)]
pub struct PushCollector {
    /// `(target, spool, counters)` per push target.
    pub targets: Vec<(&'static str, Arc<Spool>, Arc<PushStats>)>,
}

impl Collector for PushCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.targets.is_empty() {
            return Ok(());
        }
        let stats: Vec<_> = self
            .targets
            .iter()
            .map(|(t, spool, c)| (*t, spool.stats(), c))
            .collect();
        let mut m = enc.encode_descriptor(
            "rampart_agent_spool_records",
            "Pushes waiting in the spool.",
            None,
            MetricType::Gauge,
        )?;
        for (t, s, _) in &stats {
            ConstGauge::new(s.records as i64).encode(m.encode_family(&[("target", *t)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "rampart_agent_spool",
            "Bytes of the pushes waiting in the spool (compressed).",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        for (t, s, _) in &stats {
            ConstGauge::new(s.bytes as i64).encode(m.encode_family(&[("target", *t)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "rampart_agent_spool_dropped",
            "Pushes dropped, oldest first, to keep the spool within its bound.",
            None,
            MetricType::Counter,
        )?;
        for (t, s, _) in &stats {
            ConstCounter::new(s.dropped).encode(m.encode_family(&[("target", *t)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "rampart_agent_pushes",
            "Push outcomes: delivered, refused by the receiver, failed attempts, lost collections.",
            None,
            MetricType::Counter,
        )?;
        for (t, _, c) in &stats {
            for (result, v) in [
                ("delivered", &c.delivered),
                ("refused", &c.refused),
                ("failed", &c.failures),
                ("lost", &c.lost),
            ] {
                ConstCounter::new(v.load(Ordering::Relaxed))
                    .encode(m.encode_family(&[("target", *t), ("result", result)])?)?;
            }
        }
        Ok(())
    }
}
