//! Cross-cutting concerns wrapped around the request handlers: request metrics and the
//! HSTS header (a `map_response` function). Both wrap the handlers, so handlers stay about routing.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use telemetry::{HttpMetrics, RoleHttpMetrics};
use tower::{Layer, Service};

/// Labels of `rampart_backend_up`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BackendLabels {
    backend: String,
}

/// The load balancer's metrics: the node's shared HTTP request families (observed with
/// `role="lb"`) and its own `rampart_backend_up` family.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    http: RoleHttpMetrics,
    backend_up: Family<BackendLabels, Gauge>,
}

const ROLE: &str = "lb";

impl Metrics {
    /// Registers `rampart_backend_up` in `registry`; requests are recorded in `http`, which
    /// the caller registered.
    pub(crate) fn register(registry: &mut Registry, http: HttpMetrics) -> Metrics {
        let m = Metrics {
            http: http.for_role(ROLE),
            backend_up: Family::default(),
        };
        registry.register(
            "rampart_backend_up",
            "Whether the load balancer's health checks consider a backend up (1) or down (0)",
            m.backend_up.clone(),
        );
        m
    }

    /// The `rampart_backend_up` series of `backend`.
    pub(crate) fn backend_up(&self, backend: &str) -> Gauge {
        self.backend_up
            .get_or_create(&BackendLabels {
                backend: backend.to_string(),
            })
            .clone()
    }

    /// Removes the `rampart_backend_up` series of `backend` (a reload removed it), so
    /// scrapes and pushes stop carrying it, as a removed target's series go stale in
    /// Prometheus. A later [`Metrics::backend_up`] creates it again, at 0.
    pub(crate) fn forget_backend(&self, backend: &str) {
        self.backend_up.remove(&BackendLabels {
            backend: backend.to_string(),
        });
    }

    fn record(&self, status: http::StatusCode, started: Instant) {
        self.http.observe(status, started.elapsed().as_secs_f64());
    }
}

/// Counts every response by status class and observes the time to response headers.
#[derive(Debug, Clone)]
pub(crate) struct MetricsLayer(pub(crate) Metrics);

impl<S> Layer<S> for MetricsLayer {
    type Service = Metered<S>;
    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            metrics: std::sync::Arc::new(self.0.clone()),
        }
    }
}

/// See [`MetricsLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Metered<S> {
    inner: S,
    metrics: std::sync::Arc<Metrics>,
}

impl<S, B, ResB> Service<Request<B>> for Metered<S>
where
    S: Service<Request<B>, Response = Response<ResB>, Error = Infallible>,
{
    type Response = Response<ResB>;
    type Error = Infallible;
    type Future = AfterResponse<S::Future, Record>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let record = Record {
            metrics: self.metrics.clone(),
            started: Instant::now(),
        };
        AfterResponse::new(self.inner.call(req), Some(record))
    }
}

/// A request's metrics, recorded when its response head is ready.
pub(crate) struct Record {
    metrics: std::sync::Arc<Metrics>,
    started: Instant,
}

impl<B> OnResponse<B> for Record {
    fn on_response(self, resp: &Response<B>) {
        self.metrics.record(resp.status(), self.started);
    }
}

/// What a layer does with a response head once the service it wraps has produced it.
pub(crate) trait OnResponse<B> {
    /// Called once, with the response before it goes on.
    fn on_response(self, resp: &Response<B>);
}

pin_project_lite::pin_project! {
    /// The response future of a layer that only looks at the response: the wrapped
    /// service's future, then `after` (when there is one) on its response. No allocation
    /// per request.
    pub(crate) struct AfterResponse<F, A> {
        #[pin]
        inner: F,
        after: Option<A>,
    }
}

impl<F, A> AfterResponse<F, A> {
    /// `inner`, then `after` on its response.
    pub(crate) fn new(inner: F, after: Option<A>) -> Self {
        AfterResponse { inner, after }
    }
}

impl<F, A, ResB> Future for AfterResponse<F, A>
where
    F: Future<Output = Result<Response<ResB>, Infallible>>,
    A: OnResponse<ResB>,
{
    type Output = Result<Response<ResB>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(resp) = std::task::ready!(this.inner.poll(cx));
        if let Some(after) = this.after.take() {
            after.on_response(&resp);
        }
        Poll::Ready(Ok(resp))
    }
}

/// The security header fields of HTTPS responses (`site.response_headers`): each is added
/// when the backend's response does not carry it.
#[derive(Debug, Clone)]
pub(crate) struct SecurityHeaders(Vec<(http::HeaderName, HeaderValue)>);

impl SecurityHeaders {
    /// From `(name, value)` pairs; pairs that are not valid header fields are skipped
    /// (the topology validates them).
    pub(crate) fn new(pairs: &[(String, String)]) -> SecurityHeaders {
        SecurityHeaders(
            pairs
                .iter()
                .filter_map(|(n, v)| {
                    Some((
                        http::HeaderName::from_bytes(n.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
        )
    }

    /// Adds every field `resp` lacks.
    pub(crate) fn apply<B>(&self, mut resp: Response<B>) -> Response<B> {
        for (name, value) in &self.0 {
            if let http::header::Entry::Vacant(slot) = resp.headers_mut().entry(name) {
                slot.insert(value.clone());
            }
        }
        resp
    }
}

/// `rampart_lb_backend_active_requests{backend}` and `rampart_lb_backend_queue_length{backend}`,
/// read from the balancer at each scrape.
#[derive(Debug)]
pub(crate) struct BackendLoad(pub(crate) std::sync::Arc<crate::balancer::Balancer>);

impl prometheus_client::collector::Collector for BackendLoad {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        for (name, help, active) in [
            (
                "rampart_lb_backend_active_requests",
                "Requests in flight to a backend (at most balancer.backend_max_connections).",
                true,
            ),
            (
                "rampart_lb_backend_queue_length",
                "Requests waiting for a backend slot.",
                false,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for b in self.0.backends() {
                let v = if active { b.active() } else { b.queued() } as i64;
                ConstGauge::new(v).encode(m.encode_family(&[("backend", &*b.name)])?)?;
            }
        }
        Ok(())
    }
}

/// Adds `Strict-Transport-Security: max-age=31536000` (one year) to a response of the HTTPS
/// listener (RFC 6797 §6.1; never sent over plain HTTP, §7.2). Used as
/// `ServiceBuilder::map_response(add_hsts)`.
pub(crate) fn add_hsts<B>(mut resp: Response<B>) -> Response<B> {
    resp.headers_mut().insert(
        http::header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static(HSTS),
    );
    resp
}

const HSTS: &str = "max-age=31536000";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::StatusCode;
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    #[tokio::test]
    async fn layers_count_and_add_hsts() {
        let mut registry = Registry::default();
        let http = HttpMetrics::register(&mut registry);
        let metrics = Metrics::register(&mut registry, http);
        let svc = ServiceBuilder::new()
            .layer(MetricsLayer(metrics))
            .map_response(add_hsts)
            .service(service_fn(|_req: Request<()>| async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(())
                        .unwrap(),
                )
            }));
        let resp = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(resp.headers()["strict-transport-security"], HSTS);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"rampart_http_requests_total{role="lb",code="4xx"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"rampart_http_request_duration_seconds_count{role="lb"} 1"#));
    }
}
