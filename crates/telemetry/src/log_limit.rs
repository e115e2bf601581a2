//! Logs that cannot flood: a per-callsite rate limit for the node's log, with a count of
//! what it suppressed. An attacker who makes every request fail must not turn each into a
//! log line (a full disk takes the status file and the database with it).
//!
//! [`RateLimit`] is a `tracing_subscriber` per-layer filter: each callsite (one `warn!`
//! in the source, say) may emit `burst` events per `window`; further events in the window
//! are dropped and counted. [`RateLimit::take_suppressed`] hands the counts to a periodic
//! summary line (`log lines suppressed by the rate limit`), and
//! [`RateLimit::suppressed_total`] feeds `rampart_log_suppressed_total`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// Events one callsite may emit per window. Default 10.
pub const DEFAULT_BURST: u32 = 10;
/// The window. Default 10 s.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// Callsites tracked at most (there are only as many as `tracing` macros in the binary);
/// beyond it new callsites pass unlimited rather than grow the table.
const MAX_SITES: usize = 4096;

/// See the module docs. Cheap to clone; clones share their state.
#[derive(Debug, Clone)]
pub struct RateLimit(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    burst: u32,
    window: Duration,
    sites: Mutex<HashMap<Identifier, Site>>,
    suppressed: AtomicU64,
}

#[derive(Debug)]
struct Site {
    name: String,
    window_start: Instant,
    count: u32,
    suppressed: u64,
}

impl RateLimit {
    /// `burst` events per callsite per `window`.
    pub fn new(burst: u32, window: Duration) -> RateLimit {
        RateLimit(Arc::new(Inner {
            burst: burst.max(1),
            window,
            sites: Mutex::new(HashMap::new()),
            suppressed: AtomicU64::new(0),
        }))
    }

    /// The process's limiter ([`DEFAULT_BURST`] per [`DEFAULT_WINDOW`]), shared by the log
    /// set-up and the node.
    pub fn global() -> &'static RateLimit {
        static GLOBAL: OnceLock<RateLimit> = OnceLock::new();
        GLOBAL.get_or_init(|| RateLimit::new(DEFAULT_BURST, DEFAULT_WINDOW))
    }

    /// Events suppressed since start.
    pub fn suppressed_total(&self) -> u64 {
        self.0.suppressed.load(Ordering::Relaxed)
    }

    /// `(callsite, events suppressed)` for every callsite with suppressions since the last
    /// call; the counts restart at 0.
    pub fn take_suppressed(&self) -> Vec<(String, u64)> {
        let mut sites = self.0.sites.lock().unwrap_or_else(|e| e.into_inner());
        sites
            .values_mut()
            .filter(|s| s.suppressed > 0)
            .map(|s| (s.name.clone(), std::mem::take(&mut s.suppressed)))
            .collect()
    }

    fn admit(&self, meta: &'static Metadata<'static>) -> bool {
        let now = Instant::now();
        let mut sites = self.0.sites.lock().unwrap_or_else(|e| e.into_inner());
        if sites.len() >= MAX_SITES && !sites.contains_key(&meta.callsite()) {
            return true;
        }
        let site = sites.entry(meta.callsite()).or_insert_with(|| Site {
            name: format!(
                "{} {}:{}",
                meta.target(),
                meta.file().unwrap_or("?"),
                meta.line().unwrap_or(0)
            ),
            window_start: now,
            count: 0,
            suppressed: 0,
        });
        if now.duration_since(site.window_start) >= self.0.window {
            site.window_start = now;
            site.count = 0;
        }
        if site.count < self.0.burst {
            site.count += 1;
            true
        } else {
            site.suppressed += 1;
            self.0.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

impl<S> Filter<S> for RateLimit {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        self.admit(event.metadata())
    }
}

/// `rampart_log_suppressed_total`: log events the rate limit dropped.
#[derive(Debug)]
struct Suppressed(RateLimit);

impl prometheus_client::collector::Collector for Suppressed {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let m = enc.encode_descriptor(
            "rampart_log_suppressed",
            "Log events dropped by the per-callsite rate limit.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        prometheus_client::metrics::counter::ConstCounter::new(self.0.suppressed_total()).encode(m)
    }
}

/// Registers `rampart_log_suppressed_total` for `limit` in `registry`.
pub fn register(registry: &mut prometheus_client::registry::Registry, limit: RateLimit) {
    registry.register_collector(Box::new(Suppressed(limit)));
}

/// Logs one summary line per callsite that had suppressed events, every `period`, until
/// the returned task is dropped or aborted. Runs on the current tokio runtime.
pub fn spawn_summaries(limit: RateLimit, period: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tick.tick().await;
            for (callsite, suppressed) in limit.take_suppressed() {
                tracing::warn!(suppressed, %callsite, "log lines suppressed by the rate limit");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_from_one_callsite_is_cut_to_the_burst_and_counted() {
        let limit = RateLimit::new(10, Duration::from_secs(3600));
        let lines = Lines::default();
        let sink = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || sink.clone())
            .with_filter(limit.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..10_000 {
                tracing::warn!(i, "request failed");
            }
            for _ in 0..5 {
                tracing::warn!("another callsite");
            }
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("request failed").count(), 10, "{text}");
        assert_eq!(text.matches("another callsite").count(), 5);
        assert_eq!(limit.suppressed_total(), 9_990);
        let taken = limit.take_suppressed();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1, 9_990);
        assert!(taken[0].0.contains("log_limit.rs"), "{taken:?}");
        assert!(limit.take_suppressed().is_empty(), "counts restart");
    }

    #[test]
    fn the_budget_comes_back_after_the_window() {
        let limit = RateLimit::new(2, Duration::from_millis(50));
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::sink)
                .with_filter(limit.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..5 {
                tracing::warn!("x");
            }
            std::thread::sleep(Duration::from_millis(60));
            tracing::warn!("x");
        });
        assert_eq!(limit.suppressed_total(), 3);
    }
}
