//! The web role's metrics: request counts by status class and request durations (the metric
//! contract shared with the load balancer and the monitoring service), plus rejected
//! backend clients.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of `rampart_http_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `web` here.
    pub role: &'static str,
    /// Status class: `1xx` .. `5xx`.
    pub code: &'static str,
}

/// Labels of `rampart_http_request_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RoleLabels {
    /// Always `web` here.
    pub role: &'static str,
}

/// Labels of `rampart_web_rejected_clients_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RejectLabels {
    /// `handshake` (TLS failed or timed out) or `identity` (a valid certificate of a
    /// client that is not an allowed load balancer).
    pub reason: &'static str,
}

type HistogramFamily = Family<RoleLabels, Histogram, fn() -> Histogram>;

/// The web role's metric families. Cloning shares the underlying series.
#[derive(Debug, Clone)]
pub struct WebMetrics {
    /// `rampart_http_requests_total{role="web",code}`: client requests answered, health
    /// checks excluded.
    pub requests: Family<RequestLabels, Counter>,
    /// `rampart_http_request_duration_seconds{role="web"}`: seconds from request to
    /// response headers, health checks excluded.
    pub duration: HistogramFamily,
    /// `rampart_web_rejected_clients_total{reason}`: connections closed after the firewall
    /// let them in, because the TLS handshake failed or the client was not a load balancer.
    pub rejected: Family<RejectLabels, Counter>,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for WebMetrics {
    fn default() -> Self {
        WebMetrics::new()
    }
}

impl WebMetrics {
    /// Fresh, unregistered families.
    pub fn new() -> WebMetrics {
        WebMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            rejected: Family::default(),
        }
    }

    /// Registers the families in `registry` (names as documented on the fields;
    /// prometheus-client appends `_total` to counters).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rampart_http_requests",
            "Client HTTP requests answered, by role and status class",
            self.requests.clone(),
        );
        registry.register(
            "rampart_http_request_duration_seconds",
            "Time from request to response headers",
            self.duration.clone(),
        );
        registry.register(
            "rampart_web_rejected_clients",
            "Web listener connections closed after the firewall: failed TLS handshake or a client that is not a load balancer",
            self.rejected.clone(),
        );
    }

    /// Counts one request answered with `status` after `seconds`.
    pub fn observe(&self, status: http::StatusCode, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                role: "web",
                code: status_class(status),
            })
            .inc();
        self.duration
            .get_or_create(&RoleLabels { role: "web" })
            .observe(seconds);
    }

    /// Counts one rejected client connection.
    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    /// Requests counted so far with status class `code` (e.g. `"2xx"`).
    pub fn requests_with(&self, code: &'static str) -> u64 {
        self.requests
            .get_or_create(&RequestLabels { role: "web", code })
            .get()
    }
}

/// `2xx` for 200..=299 and so on (RFC 9110 §15).
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Middleware: records every request except the health check (`health_path`).
pub(crate) async fn record(
    State((metrics, health_path)): State<(WebMetrics, String)>,
    req: Request,
    next: Next,
) -> Response {
    if req.uri().path() == health_path {
        return next.run(req).await;
    }
    let start = Instant::now();
    let resp = next.run(req).await;
    metrics.observe(resp.status(), start.elapsed().as_secs_f64());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(status_class(http::StatusCode::OK), "2xx");
        assert_eq!(status_class(http::StatusCode::NOT_MODIFIED), "3xx");
        assert_eq!(status_class(http::StatusCode::NOT_FOUND), "4xx");
        assert_eq!(status_class(http::StatusCode::SERVICE_UNAVAILABLE), "5xx");
    }

    #[test]
    fn encodes_contract_names() {
        let m = WebMetrics::new();
        let mut reg = Registry::default();
        m.register(&mut reg);
        m.observe(http::StatusCode::OK, 0.01);
        m.reject("identity");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("rampart_http_requests_total{role=\"web\",code=\"2xx\"} 1"));
        assert!(out.contains("rampart_http_request_duration_seconds_count{role=\"web\"} 1"));
        assert!(out.contains("rampart_web_rejected_clients_total{reason=\"identity\"} 1"));
    }
}
