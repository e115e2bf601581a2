//! The web role: a web server for the application files (static, from a docroot) and the
//! foobar guestbook application under `/api`, reached only by the load balancers over mutual
//! TLS (or plain HTTP in the insecure variant), behind the host's firewall.
//!
//! This crate owns the web listener (firewall filter, TLS, client identity check), the HTTP
//! stack (static files, validators, compression, `X-Served-By`, request metrics) and the
//! application's HTTP API and pages. It never talks to MariaDB itself (all data goes through
//! a [`Store`], normally `db::DbClient`) and never serves a client other than an allowed
//! load balancer identity when TLS is on.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod api;
mod files;
mod metrics;
mod server;
mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use http::{HeaderName, HeaderValue, StatusCode};
use tower_http::compression::CompressionLayer;
use tower_http::services::{ServeDir, ServeFile};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use api::{ApiError, LIST_LIMIT, MAX_AUTHOR_CHARS, MAX_BODY_BYTES, MAX_TEXT_CHARS};
pub use files::{deploy_site, NOT_FOUND_PAGE, SITE_FILES};
pub use metrics::{RejectLabels, WebMetrics};
pub use server::{start, WebError, WebHandle};
pub use store::{DbInfo, MemoryStore, Message, Store, StoreError, StoreFuture};
pub use telemetry::{status_class, HttpMetrics, RequestLabels, RoleLabels};

/// The response header naming the host that answered (every response carries it).
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

/// Seconds a request may take from arrival to response headers before it is answered with
/// 503 (a stuck database call, typically).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything [`start`] needs to run one host's web server.
#[derive(Clone)]
pub struct WebConfig {
    /// This host's name (e.g. `web-01`): the TLS server name and the `X-Served-By` value.
    pub host: String,
    /// The host's network seam: the listener is bound through it (its address, the
    /// policy's `(host, web)` rule and the `limits.web` limits).
    pub net: firewall::Net,
    /// TCP port (`topology.ports.web`; 0 picks a free one, for tests).
    pub port: u16,
    /// Directory of the application files; fill it with [`deploy_site`] first.
    pub docroot: PathBuf,
    /// The PKI directory holding this host's certificate and the CA.
    pub pki: pki::PkiPaths,
    /// The insecure variant: plain HTTP, no TLS and no client identity check.
    pub plain: bool,
    /// The health-check path (`topology.health_check.path`, e.g. `/healthz`): answers 200
    /// `ok`, not counted in the request metrics.
    pub health_path: String,
    /// The application's store; `Some` on hosts with the `app` role. `None`: `/api/*`
    /// answers 404.
    pub store: Option<Arc<dyn Store>>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("host", &self.host)
            .field("address", &self.net.address())
            .field("port", &self.port)
            .field("docroot", &self.docroot)
            .field("plain", &self.plain)
            .field("health_path", &self.health_path)
            .field("store", &self.store.is_some())
            .finish_non_exhaustive()
    }
}

/// What the HTTP stack needs, without any socket: built by [`start`], or directly in tests.
#[derive(Clone)]
pub struct AppState {
    /// Host name for `X-Served-By` and `/api/whoami`.
    pub host: String,
    /// Directory of the application files.
    pub docroot: PathBuf,
    /// Health-check path (answers 200 `ok`, not counted).
    pub health_path: String,
    /// The application's store; `None` → `/api/*` answers 404.
    pub store: Option<Arc<dyn Store>>,
    /// Request metrics recorded by the stack.
    pub metrics: WebMetrics,
}

/// The whole web server as an axum [`Router`], for serving or for tests with
/// `tower::ServiceExt::oneshot`. Layers, outermost first: `X-Served-By`, access log
/// (`tracing`, debug level), health check,
/// request metrics, request timeout ([`REQUEST_TIMEOUT`] → 503), `ETag` coding suffix,
/// compression (gzip, br), then `/api` or the static files (with validators and the 404
/// page).
pub fn router(state: AppState) -> Router {
    let api = match &state.store {
        Some(store) => api::routes(&state.host, store.clone()),
        None => api::absent(),
    };
    let statics = ServeDir::new(&state.docroot)
        .append_index_html_on_directories(true)
        .not_found_service(ServeFile::new(state.docroot.join(NOT_FOUND_PAGE)));
    let statics = tower::ServiceBuilder::new()
        .layer(axum::middleware::from_fn(files::bounded_segments))
        .layer(axum::middleware::from_fn(files::conditional))
        .service(statics);
    let served_by = HeaderValue::from_str(&state.host)
        .unwrap_or_else(|_| HeaderValue::from_static("invalid-host-name"));
    Router::new()
        .nest("/api", api)
        .fallback_service(statics)
        .layer(CompressionLayer::new())
        .layer(axum::middleware::from_fn(files::tag_encoding))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::from_fn_with_state(
            (state.metrics.clone(), state.health_path.clone()),
            metrics::record,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.health_path.clone(),
            health,
        ))
        .layer(TraceLayer::new_for_http())
        .layer(SetResponseHeaderLayer::overriding(SERVED_BY, served_by))
}

/// Answers `GET`/`HEAD` on the health path with 200 `ok` before anything else runs.
async fn health(
    axum::extract::State(path): axum::extract::State<String>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let method = req.method();
    if req.uri().path() == path && (method == http::Method::GET || method == http::Method::HEAD) {
        return (
            [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "ok",
        )
            .into_response();
    }
    next.run(req).await
}
