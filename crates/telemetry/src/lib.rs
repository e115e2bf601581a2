//! The metric families shared by every HTTP-serving role of a node: the request counter
//! `rampart_http_requests_total{role,code}` and the latency histogram
//! `rampart_http_request_duration_seconds{role}`. A node holding several roles (a load
//! balancer and a web server, say) registers these families once in its one registry and
//! hands the same [`HttpMetrics`] to every role, so the exposition carries each family
//! exactly once (OpenMetrics 1.0 forbids two metric families with the same name).
//!
//! This crate owns those two families, their label sets, their histogram buckets and the
//! status-class mapping. It never registers anything on its own: only the caller of
//! [`HttpMetrics::register`] decides which registry holds them, and it never knows which
//! roles exist beyond the `role` label value each caller passes in.

#![forbid(unsafe_code)]

pub mod log_limit;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of `rampart_http_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The role that answered: `lb` or `web`.
    pub role: &'static str,
    /// Status class of the response: `1xx` .. `5xx`, see [`status_class`].
    pub code: &'static str,
}

/// Labels of `rampart_http_request_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RoleLabels {
    /// The role that answered: `lb` or `web`.
    pub role: &'static str,
}

type DurationFamily = Family<RoleLabels, Histogram, fn() -> Histogram>;

/// Number of histogram buckets of `rampart_http_request_duration_seconds`.
pub const DURATION_BUCKETS: u16 = 16;

/// Upper bound of the first duration bucket, in seconds (0.5 ms); each next bucket doubles
/// it, so the last finite bound is 0.5 ms × 2^15 ≈ 16.4 s.
pub const DURATION_FIRST_BUCKET_SECONDS: f64 = 0.0005;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(
        DURATION_FIRST_BUCKET_SECONDS,
        2.0,
        DURATION_BUCKETS,
    ))
}

/// The node's HTTP request families. Cloning shares the underlying series, so every role
/// of a node holds a clone of the one value [`HttpMetrics::register`] returned.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: DurationFamily,
}

impl HttpMetrics {
    /// Creates the two families and registers them in `registry`:
    /// - `rampart_http_requests` as a counter family (prometheus-client appends `_total`,
    ///   so it is exposed as `rampart_http_requests_total{role,code}`);
    /// - `rampart_http_request_duration_seconds{role}`, a histogram in seconds with
    ///   [`DURATION_BUCKETS`] buckets from [`DURATION_FIRST_BUCKET_SECONDS`] doubling.
    ///
    /// Call it once per registry: registering twice puts two families of the same name in
    /// the exposition.
    pub fn register(registry: &mut Registry) -> HttpMetrics {
        let metrics = HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
        };
        registry.register(
            "rampart_http_requests",
            "HTTP requests answered, by role and status class",
            metrics.requests.clone(),
        );
        registry.register(
            "rampart_http_request_duration_seconds",
            "Time from request to response headers, by role",
            metrics.duration.clone(),
        );
        metrics
    }

    /// Counts one request answered by `role` with `status`, `seconds` after it arrived
    /// (time to response headers).
    pub fn observe(&self, role: &'static str, status: http::StatusCode, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                role,
                code: status_class(status),
            })
            .inc();
        self.duration
            .get_or_create(&RoleLabels { role })
            .observe(seconds);
    }

    /// `role`'s series, for a hot path that observes many requests (see
    /// [`RoleHttpMetrics`]). Creates the role's duration series (empty) at once.
    pub fn for_role(&self, role: &'static str) -> RoleHttpMetrics {
        RoleHttpMetrics {
            role,
            family: self.clone(),
            by_class: std::sync::Arc::new(Default::default()),
            duration: self.duration.get_or_create(&RoleLabels { role }).clone(),
        }
    }

    /// Requests counted so far for `role` with status class `class` (e.g. `"2xx"`); 0 when
    /// none was. Reading never adds a series to the exposition.
    pub fn requests(&self, role: &'static str, class: &'static str) -> u64 {
        self.requests
            .get(&RequestLabels { role, code: class })
            .map_or(0, |counter| counter.get())
    }
}

/// One role's series of the two families, looked up once: observing a request through it
/// costs two atomic adds and a bucket search, with no label hashing or family lock (the
/// families' `get_or_create` does both). A series appears in the exposition the first time
/// it is observed, as with [`HttpMetrics::observe`].
#[derive(Clone, Debug)]
pub struct RoleHttpMetrics {
    role: &'static str,
    family: HttpMetrics,
    /// `1xx` .. `5xx`, created on first use.
    by_class: std::sync::Arc<[std::sync::OnceLock<Counter>; 5]>,
    duration: Histogram,
}

impl RoleHttpMetrics {
    /// Counts one request answered with `status`, `seconds` after it arrived (time to
    /// response headers); the same series as [`HttpMetrics::observe`] for this role.
    pub fn observe(&self, status: http::StatusCode, seconds: f64) {
        let class = status_class(status);
        let index = usize::from(class.as_bytes()[0] - b'1').min(4);
        self.by_class[index]
            .get_or_init(|| {
                self.family
                    .requests
                    .get_or_create(&RequestLabels {
                        role: self.role,
                        code: class,
                    })
                    .clone()
            })
            .inc();
        self.duration.observe(seconds);
    }
}

/// The status class of `status`: `1xx` for 100..=199, `2xx` for 200..=299, `3xx`, `4xx`,
/// and `5xx` for everything else (RFC 9110 §15: the first digit defines the class).
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::StatusCode;

    fn encode(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn classes() {
        assert_eq!(status_class(StatusCode::CONTINUE), "1xx");
        assert_eq!(status_class(StatusCode::OK), "2xx");
        assert_eq!(status_class(StatusCode::NOT_MODIFIED), "3xx");
        assert_eq!(status_class(StatusCode::NOT_FOUND), "4xx");
        assert_eq!(status_class(StatusCode::SERVICE_UNAVAILABLE), "5xx");
    }

    #[test]
    fn encodes_contract_names() {
        let mut registry = Registry::default();
        let m = HttpMetrics::register(&mut registry);
        m.observe("web", StatusCode::OK, 0.01);
        let out = encode(&registry);
        assert!(
            out.contains("# TYPE rampart_http_requests counter\n"),
            "{out}"
        );
        assert!(
            out.contains("rampart_http_requests_total{role=\"web\",code=\"2xx\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("# TYPE rampart_http_request_duration_seconds histogram\n"),
            "{out}"
        );
        assert!(
            out.contains("rampart_http_request_duration_seconds_count{role=\"web\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "rampart_http_request_duration_seconds_bucket{le=\"0.0005\",role=\"web\"} 0\n"
            ),
            "{out}"
        );
        // 16 finite buckets plus +Inf.
        let buckets = out
            .lines()
            .filter(|l| l.starts_with("rampart_http_request_duration_seconds_bucket{"))
            .count();
        assert_eq!(buckets, usize::from(DURATION_BUCKETS) + 1, "{out}");
        assert_eq!(m.requests("web", "2xx"), 1);
        assert_eq!(m.requests("web", "4xx"), 0);
    }

    #[test]
    fn two_roles_share_one_family() {
        let mut registry = Registry::default();
        let http = HttpMetrics::register(&mut registry);
        let lb = http.clone();
        let web = http.clone();
        lb.observe("lb", StatusCode::PERMANENT_REDIRECT, 0.001);
        web.observe("web", StatusCode::OK, 0.002);
        web.observe("web", StatusCode::OK, 0.003);
        let out = encode(&registry);
        let count = |needle: &str| out.lines().filter(|l| *l == needle).count();
        assert_eq!(count("# TYPE rampart_http_requests counter"), 1, "{out}");
        assert_eq!(
            count("# TYPE rampart_http_request_duration_seconds histogram"),
            1,
            "{out}"
        );
        assert_eq!(
            count("rampart_http_requests_total{role=\"lb\",code=\"3xx\"} 1"),
            1,
            "{out}"
        );
        assert_eq!(
            count("rampart_http_requests_total{role=\"web\",code=\"2xx\"} 2"),
            1,
            "{out}"
        );
        assert_eq!(http.requests("lb", "3xx"), 1);
        assert_eq!(http.requests("web", "2xx"), 2);
    }
}
