//! The answer when no backend can take a request (every one down by its health checks,
//! ejected or draining): `503 Service Unavailable` at once — the request never waits in a
//! queue — with `Retry-After: 5` (RFC 9110 §10.2.3) and a short page saying what happened.
//! The operator's signal is `rampart_backend_up` at 0 for every backend (the monitor's
//! SiteUnavailable alert) and `rampart_lb_rejected_requests_total{reason="no_backend"}`.

use http::{Response, StatusCode};

use crate::proxy::{Body, Upstreams};

/// Seconds a client is asked to wait before trying again.
pub(crate) const RETRY_AFTER_SECONDS: &str = "5";

/// The page's text.
pub(crate) const TEXT: &str = "503 Service Unavailable: no backend server is available right now \
(all are down, ejected or draining). This is the load balancer answering; try again in a few seconds.";

/// The 503 for a request (or WebSocket handshake) no backend can take, counted as
/// `no_backend` and logged.
pub(crate) fn no_backend(up: &Upstreams) -> Response<Body> {
    tracing::warn!(side = "upstream", "no backend is available");
    up.reject_for_now(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_backend",
        TEXT,
        RETRY_AFTER_SECONDS,
    )
}
