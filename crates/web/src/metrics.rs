//! The web role's metrics: request counts by status class and request durations, recorded
//! in the node's shared families from `telemetry` (the metric contract shared with the load
//! balancer and the monitoring service), plus this role's own rejected-clients family.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use telemetry::HttpMetrics;

/// The `role` label value of this role's series in the shared HTTP families.
pub const ROLE: &str = "web";

/// Labels of `rampart_web_rejected_clients_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RejectLabels {
    /// `handshake` (TLS failed or timed out) or `identity` (a valid certificate of a
    /// client that is not an allowed load balancer).
    pub reason: &'static str,
}

/// The web role's metrics. Cloning shares the underlying series.
#[derive(Debug, Clone)]
pub struct WebMetrics {
    /// The node's shared request families, observed with `role="web"`:
    /// `rampart_http_requests_total{role="web",code}` and
    /// `rampart_http_request_duration_seconds{role="web"}`; client requests only, health
    /// checks excluded. Registered by whoever created it, never by [`WebMetrics::register`].
    pub http: HttpMetrics,
    /// `rampart_web_rejected_clients_total{reason}`: connections closed after the firewall
    /// let them in, because the TLS handshake failed or the client was not a load balancer.
    pub rejected: Family<RejectLabels, Counter>,
}

impl WebMetrics {
    /// Records requests in `http` (already registered, or not, by the caller) and keeps a
    /// fresh, unregistered rejected-clients family.
    pub fn new(http: HttpMetrics) -> WebMetrics {
        WebMetrics {
            http,
            rejected: Family::default(),
        }
    }

    /// Registers this role's own family, `rampart_web_rejected_clients` (exposed as
    /// `rampart_web_rejected_clients_total`), in `registry`. The shared request families are
    /// not registered here: see [`telemetry::HttpMetrics::register`].
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rampart_web_rejected_clients",
            "Web listener connections closed after the firewall: failed TLS handshake or a client that is not a load balancer",
            self.rejected.clone(),
        );
    }

    /// Counts one request answered with `status` after `seconds`.
    pub fn observe(&self, status: http::StatusCode, seconds: f64) {
        self.http.observe(ROLE, status, seconds);
    }

    /// Counts one rejected client connection.
    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    /// Requests of this role counted so far with status class `code` (e.g. `"2xx"`).
    pub fn requests_with(&self, code: &'static str) -> u64 {
        self.http.requests(ROLE, code)
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
    fn encodes_contract_names() {
        let mut reg = Registry::default();
        let m = WebMetrics::new(HttpMetrics::register(&mut reg));
        m.register(&mut reg);
        m.observe(http::StatusCode::OK, 0.01);
        m.reject("identity");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("rampart_http_requests_total{role=\"web\",code=\"2xx\"} 1"));
        assert!(out.contains("rampart_http_request_duration_seconds_count{role=\"web\"} 1"));
        assert!(out.contains("rampart_web_rejected_clients_total{reason=\"identity\"} 1"));
        assert_eq!(m.requests_with("2xx"), 1);
    }
}
