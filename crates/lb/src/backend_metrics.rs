//! Per-backend metrics (HAProxy's per-server stats, Envoy's per-host stats), in the
//! Prometheus text format on the node's `/metrics`:
//!
//! - `rampart_lb_backend_responses_total{backend,code}` — answers by status class
//!   (`1xx` … `5xx`);
//! - `rampart_lb_backend_response_duration_seconds{backend}` — histogram of the time from
//!   sending a request to the end of its buffered response (0.5 ms doubling to 16 s, the
//!   buckets of `rampart_http_request_duration_seconds`);
//! - `rampart_lb_backend_failures_total{backend,kind}` — attempts that got no answer
//!   (`connect`, `reset`, `other`);
//! - `rampart_lb_backend_retries_total{backend}` — requests retried elsewhere after
//!   failing on this backend;
//! - `rampart_lb_retries_refused_total` — retries the retry budget refused;
//! - `rampart_lb_backend_ejections_total{backend}` — times passive outlier detection
//!   ejected the backend;
//! - read at each scrape, for the backends of the generation serving now:
//!   `rampart_lb_backend_ejected{backend}` (1 while ejected),
//!   `rampart_lb_backend_draining{backend}`, `rampart_lb_backend_connections{backend,state}`
//!   (`active`: carrying a request; `idle`: open in the pool).
//!
//! Health state is `rampart_backend_up{backend}`; requests in flight and queued are
//! `rampart_lb_backend_active_requests` and `rampart_lb_backend_queue_length`.
//!
//! The counters and the histogram are kept per backend name for the life of the process
//! (a Prometheus counter is monotonic): every configuration generation that has a backend
//! records into the same series, so a reload neither restarts them nor drops them (a
//! backend a reload removed keeps its last counts; the gauges, read from the serving
//! generation, stop being exported for it). A generation takes its backends' series once
//! when it is built, so the request path only increments atomics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::retry::Failure;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    backend: String,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    backend: String,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        telemetry::DURATION_FIRST_BUCKET_SECONDS,
        2.0,
        telemetry::DURATION_BUCKETS,
    ))
}

/// The registered families; [`Families::backend`] makes one backend's series.
#[derive(Debug, Clone)]
pub(crate) struct Families {
    responses: Family<CodeLabels, Counter>,
    durations: Family<BackendLabels, Histogram, fn() -> Histogram>,
    failures: Family<KindLabels, Counter>,
    retries: Family<BackendLabels, Counter>,
    ejections: Family<BackendLabels, Counter>,
    /// Retries refused by the budget.
    pub(crate) refused: Counter,
}

impl Families {
    /// Families registered nowhere (unit tests).
    pub(crate) fn unregistered() -> Families {
        Families {
            responses: Family::default(),
            durations: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            failures: Family::default(),
            retries: Family::default(),
            ejections: Family::default(),
            refused: Counter::default(),
        }
    }

    /// Registers the families in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> Families {
        let f = Families::unregistered();
        registry.register(
            "rampart_lb_backend_responses",
            "Answers from a backend by status class",
            f.responses.clone(),
        );
        registry.register(
            "rampart_lb_backend_response_duration_seconds",
            "Time from sending a request to a backend to the end of its buffered response",
            f.durations.clone(),
        );
        registry.register(
            "rampart_lb_backend_failures",
            "Attempts at a backend that got no answer: connect failed, connection reset or closed early, other error",
            f.failures.clone(),
        );
        registry.register(
            "rampart_lb_backend_retries",
            "Requests tried again on another backend after failing on this one",
            f.retries.clone(),
        );
        registry.register(
            "rampart_lb_backend_ejections",
            "Times passive outlier detection ejected a backend",
            f.ejections.clone(),
        );
        registry.register(
            "rampart_lb_retries_refused",
            "Retries refused because the retry budget was spent",
            f.refused.clone(),
        );
        f
    }

    /// The ejection counter of backend `name` (held by its [`crate::outlier::Outlier`]).
    pub(crate) fn ejections(&self, name: &str) -> Counter {
        self.ejections
            .get_or_create(&BackendLabels {
                backend: name.to_string(),
            })
            .clone()
    }

    /// The series of backend `name`.
    pub(crate) fn backend(&self, name: &str) -> BackendMetrics {
        let code = |code| {
            self.responses
                .get_or_create(&CodeLabels {
                    backend: name.to_string(),
                    code,
                })
                .clone()
        };
        let kind = |kind| {
            self.failures
                .get_or_create(&KindLabels {
                    backend: name.to_string(),
                    kind,
                })
                .clone()
        };
        let label = BackendLabels {
            backend: name.to_string(),
        };
        BackendMetrics {
            by_class: [
                code("1xx"),
                code("2xx"),
                code("3xx"),
                code("4xx"),
                code("5xx"),
            ],
            duration: self.durations.get_or_create(&label).clone(),
            failures: [kind("connect"), kind("reset"), kind("other")],
            retries: self.retries.get_or_create(&label).clone(),
        }
    }
}

/// One backend's request series.
#[derive(Debug, Clone)]
pub(crate) struct BackendMetrics {
    by_class: [Counter; 5],
    duration: Histogram,
    failures: [Counter; 3],
    retries: Counter,
}

impl BackendMetrics {
    /// An answer with `status` after `seconds`.
    pub(crate) fn answered(&self, status: http::StatusCode, seconds: f64) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }

    /// An attempt that failed.
    pub(crate) fn failed(&self, failure: Failure) {
        let i = match failure {
            Failure::Connect => 0,
            Failure::Reset => 1,
            Failure::Other => 2,
        };
        self.failures[i].inc();
    }

    /// A request retried elsewhere after failing here.
    pub(crate) fn retried(&self) {
        self.retries.inc();
    }
}

/// The scrape-time gauges of every backend.
struct Scraped {
    /// The current generation's backends and connector (see [`crate::reload`]).
    live: crate::reload::Live,
}

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraped").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for Scraped {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        let current = self.live.load();
        let backends = current.balancer.backends();
        for (name, help, value) in [
            (
                "rampart_lb_backend_ejected",
                "Whether a backend is ejected by passive outlier detection (1) or not (0)",
                0,
            ),
            (
                "rampart_lb_backend_draining",
                "Whether a backend is draining: no new requests (1) or not (0)",
                1,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (i, b) in backends.iter().enumerate() {
                let v = if value == 0 {
                    current.balancer.is_ejected(i)
                } else {
                    b.is_draining()
                };
                ConstGauge::new(i64::from(v)).encode(m.encode_family(&[("backend", &*b.name)])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "rampart_lb_backend_connections",
            "Open connections to a backend: carrying a request (active) or idle in the pool",
            None,
            MetricType::Gauge,
        )?;
        for b in backends {
            let open = current.connector.open_connections(&b.name);
            let active = b.active().min(open);
            for (state, v) in [("active", active), ("idle", open - active)] {
                ConstGauge::new(v as i64)
                    .encode(m.encode_family(&[("backend", &*b.name), ("state", state)])?)?;
            }
        }
        Ok(())
    }
}

/// Registers the scrape-time gauges of the live generation's backends in `registry`.
pub(crate) fn register_scraped(registry: &mut Registry, live: crate::reload::Live) {
    registry.register_collector(Box::new(Scraped { live }));
}
