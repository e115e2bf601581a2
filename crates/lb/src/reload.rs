//! Live reload of the load balancer: certificates and the request-path configuration
//! change while the listeners keep running and no request fails.
//!
//! What a request uses lives in one [`Upstreams`] value (backends and their health, the
//! upstream connection pool and TLS, `[balancer]` limits, site names, body timeouts). The
//! listeners hold an [`ArcSwap`] of it and every request takes the current value when it
//! starts ([`Current`]); a reload builds a complete new value (a *generation*), starts its
//! health checks, waits until the backends that serve now are up in it too (bounded by
//! `rise × interval + timeout + 1 s`), then swaps it in atomically. Requests already
//! running keep the generation they started with until they finish; the old generation's
//! health checks stop and its pooled connections close once its last request is done.
//!
//! Certificates are swapped in the SNI resolver ([`pki::SniResolver::replace`]) of the same
//! rustls config, so the session cache and the ticket keys survive a reload and
//! established TLS connections keep their certificate.
//!
//! A reload is all or nothing: every certificate, key, backend and the upstream TLS
//! material are read and checked before anything changes; on an error the running
//! configuration stays, the error is logged and returned. Settings of the listeners
//! themselves (addresses, ports, session resumption, limits, access log, response
//! headers, the HTTP listener's redirect) are fixed at start: a reload that changes them
//! says so in its report and log and keeps them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use pki::{CertSummary, SniResolver};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serve::RequestBody;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::balancer::Balancer;
use crate::layers::Metrics;
use crate::proxy::{Proxy, RejectLabels, Scheme, Upstreams};
use crate::upstream::Connector;
use crate::{check_backends, health, rate_limit, tls, LbConfig, LbError};

/// The request-path state every request reads: swapped whole by a reload.
pub(crate) type Live = Arc<ArcSwap<Upstreams>>;

/// What stays the same across generations (registered once).
pub(crate) struct Fixed {
    pub(crate) metrics: Metrics,
    pub(crate) rejected: Family<RejectLabels, Counter>,
    /// The per-backend request series, registered once; every generation records into them.
    pub(crate) backend_families: crate::backend_metrics::Families,
    /// The WebSocket tunnels of every generation.
    pub(crate) tunnels: crate::websocket::Tunnels,
    /// The response bytes held for clients, by every generation together.
    pub(crate) buffer_budget: crate::buffer_budget::BufferBudget,
}

/// The TLS client config to backends: the host certificate for mutual TLS in the lab, a CA
/// file in standalone mode, or none for plain backends. Reads files: call it off the
/// runtime's worker threads during a reload.
pub(crate) fn upstream_tls(cfg: &LbConfig) -> Result<Option<TlsConnector>, LbError> {
    let config = match &cfg.standalone {
        None if cfg.plain_backends => None,
        None => Some(pki::mtls_client_config(
            &cfg.pki,
            &pki::Identity::Host(cfg.host.clone()),
            &[b"http/1.1"],
        )?),
        Some(files) => match &files.backend_ca {
            Some(ca) => Some(pki::client_config_with_ca(ca, &[b"http/1.1"])?),
            None => None,
        },
    };
    Ok(config.map(|c| TlsConnector::from(Arc::new(c))))
}

/// A generation: the request-path state and the switch that stops its health checks.
pub(crate) struct Generation {
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) stop: watch::Sender<bool>,
}

/// Builds the request-path state of `cfg` and starts one health checker per backend
/// (stopped by the generation's `stop`). Its backends start down. `cert_names`, the exact
/// names on the certificates after the default, are served besides `cfg.site_names` (unless those are
/// empty: then every host is). `previous`, the generation being replaced, lends its
/// per-source rate-limit buckets when the limits did not change, and its balancer's epoch
/// (see [`Reloader::reload`] for what else carries over).
pub(crate) fn build(
    cfg: &LbConfig,
    fixed: &Fixed,
    upstream_tls: Option<TlsConnector>,
    cert_names: &[String],
    previous: Option<&Upstreams>,
) -> Generation {
    let limits = &cfg.balancer;
    let max_conns = limits.backend_max_connections as usize;
    let mut balancer = Balancer::new(
        &cfg.backends,
        |name| fixed.metrics.backend_up(name),
        &fixed.backend_families,
        max_conns,
        limits.backend_queue_max as usize,
        Duration::from_millis(limits.backend_queue_timeout_ms),
        &limits.balancing,
    );
    // One clock for every generation, so passive health carries over a reload as is.
    if let Some(p) = previous {
        balancer = balancer.sharing_epoch(p.balancer.epoch());
    }
    let balancer = Arc::new(balancer);
    let connector = Connector::new(
        cfg.net.clone(),
        cfg.backends
            .iter()
            .map(|b| {
                let sni = b.server_name.clone().unwrap_or_else(|| b.name.clone());
                (b.name.clone(), (b.addr, sni))
            })
            .collect::<HashMap<_, _>>(),
        upstream_tls,
    );
    let upstreams = Arc::new(Upstreams {
        balancer: balancer.clone(),
        pool: crate::exchange::Pool::new(
            connector.clone(),
            Duration::from_millis(limits.upstream_idle_timeout_ms),
            max_conns,
        ),
        site_names: served_names(&cfg.site_names, cert_names),
        max_body: limits.max_request_body_bytes,
        body_timeout: cfg.request_body_timeout,
        body_deadline: cfg.request_body_deadline,
        response_buffer: limits.response_buffer_bytes,
        buffer_budget: fixed.buffer_budget.clone(),
        rejected: fixed.rejected.clone(),
        rate_limit: (limits.rate_limit_per_source > 0).then(|| {
            let (rate, burst) = (
                f64::from(limits.rate_limit_per_source),
                f64::from(limits.rate_limit_burst),
            );
            // The same limits after a reload keep the buckets: a reload must not hand
            // every source a fresh burst.
            previous
                .and_then(|p| p.rate_limit.clone())
                .filter(|l| l.has_limits(rate, burst))
                .unwrap_or_else(|| Arc::new(rate_limit::RateLimit::new(rate, burst)))
        }),
        trusted_proxies: limits.trusted_proxies.clone(),
        retry_budget: crate::retry::RetryBudget::new(
            limits.balancing.retry_budget_percent,
            limits.balancing.retry_min_per_second,
        ),
        retries_refused: fixed.backend_families.refused.clone(),
        connector: connector.clone(),
        tunnel_idle: Duration::from_millis(limits.balancing.tunnel_idle_timeout_ms),
        tunnel_half_closed: Duration::from_millis(limits.balancing.tunnel_half_closed_timeout_ms),
        tunnels: fixed.tunnels.clone(),
    });
    for b in &cfg.backends {
        fixed.tunnels.declare(&b.name);
    }
    let (stop, stop_rx) = watch::channel(false);
    for index in 0..cfg.backends.len() {
        tokio::spawn(health::run(
            balancer.clone(),
            index,
            connector.clone(),
            cfg.health.clone(),
            stop_rx.clone(),
        ));
    }
    Generation { upstreams, stop }
}

/// `site_names` then the certificate names not among them, lower case; empty (any host)
/// when `site_names` is.
fn served_names(site_names: &[String], cert_names: &[String]) -> Vec<String> {
    let mut names: Vec<String> = site_names.iter().map(|n| n.to_ascii_lowercase()).collect();
    if names.is_empty() {
        return names;
    }
    for n in cert_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// The forwarding service of one connection: each request goes to the generation current
/// when it arrives and stays with it to the end.
#[derive(Clone)]
pub(crate) struct Current {
    live: Live,
    client: Arc<crate::proxy::Client>,
}

impl Current {
    pub(crate) fn new(live: Live, client_ip: IpAddr, scheme: Scheme) -> Current {
        Current {
            live,
            client: Arc::new(crate::proxy::Client::new(client_ip, scheme)),
        }
    }
}

impl tower::Service<Request<RequestBody>> for Current {
    type Response = Response<crate::proxy::Body>;
    type Error = Infallible;
    type Future = <Proxy as tower::Service<Request<RequestBody>>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        Proxy::new(self.live.load_full(), self.client.clone()).call(req)
    }
}

/// `rampart_lb_backend_active_requests` / `_queue_length` of the current generation.
pub(crate) struct LiveBackendLoad(pub(crate) Live);

impl std::fmt::Debug for LiveBackendLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveBackendLoad")
    }
}

impl prometheus_client::collector::Collector for LiveBackendLoad {
    fn encode(
        &self,
        enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        crate::layers::BackendLoad(self.0.load().balancer.clone()).encode(enc)
    }
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// The generation now serving (1 at start, +1 per successful reload).
    pub generation: u64,
    /// The certificates now served, the default first.
    pub certificates: Vec<CertSummary>,
    /// The backends now balanced over, by name.
    pub backends: Vec<String>,
    /// Backends of the new configuration not up when it was swapped in (health checks
    /// continue; they serve once up).
    pub down: Vec<String>,
    /// Settings that differ but only take effect on a restart (kept as they were).
    pub needs_restart: Vec<&'static str>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("resolver", &self.resolver)
            .finish_non_exhaustive()
    }
}

/// The mutable part of a running load balancer.
pub(crate) struct Reloader {
    pub(crate) live: Live,
    pub(crate) resolver: Arc<SniResolver>,
    fixed: Fixed,
    /// Serialises reloads; holds the configuration in force and its generation number.
    state: tokio::sync::Mutex<(LbConfig, u64)>,
    /// Stops the current generation's health checks (also at shutdown).
    stop: std::sync::Mutex<watch::Sender<bool>>,
    /// The generation serving now.
    pub(crate) generation: std::sync::atomic::AtomicU64,
}

impl Reloader {
    pub(crate) fn new(
        cfg: LbConfig,
        generation: Generation,
        resolver: Arc<SniResolver>,
        fixed: Fixed,
    ) -> Reloader {
        Reloader {
            live: Arc::new(ArcSwap::new(generation.upstreams)),
            resolver,
            fixed,
            state: tokio::sync::Mutex::new((cfg, 1)),
            stop: std::sync::Mutex::new(generation.stop),
            generation: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Stops the current generation's health checks (shutdown).
    pub(crate) fn stop(&self) {
        if let Ok(stop) = self.stop.lock() {
            stop.send_replace(true);
        }
    }

    /// Applies `cfg` (see the module documentation). `None`: the configuration in force,
    /// its certificate files read again.
    pub(crate) async fn reload(&self, cfg: Option<LbConfig>) -> Result<ReloadReport, LbError> {
        let mut state = self.state.lock().await;
        let cfg = cfg.unwrap_or_else(|| state.0.clone());
        let result = self.apply(&state.0, cfg, state.1 + 1).await;
        match &result {
            Ok((report, cfg)) => {
                state.0 = cfg.clone();
                state.1 = report.generation;
                self.generation
                    .store(report.generation, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    generation = report.generation,
                    certificates = %report.certificates.iter().map(|c| format!("{} [{}]", c.cert.display(), c.names.join(" "))).collect::<Vec<_>>().join(", "),
                    backends = %report.backends.join(","),
                    down = %report.down.join(","),
                    needs_restart = %report.needs_restart.join(","),
                    "load balancer reloaded"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the running configuration and certificates are kept");
            }
        }
        result.map(|(r, _)| r)
    }

    async fn apply(
        &self,
        old: &LbConfig,
        cfg: LbConfig,
        generation: u64,
    ) -> Result<(ReloadReport, LbConfig), LbError> {
        check_backends(&cfg.backends)?;
        // Every file first, off the worker threads; nothing changes if one is bad.
        let (store, upstream_tls, cfg) = tokio::task::spawn_blocking(move || {
            let store = tls::load(&cfg)?;
            let up = upstream_tls(&cfg)?;
            Ok::<_, LbError>((store, up, cfg))
        })
        .await
        .map_err(|e| LbError::Reload(format!("loading task failed: {e}")))??;
        let needs_restart = needs_restart(old, &cfg);
        let certificates = store.summary().to_vec();
        let cert_names = store.extra_names();
        self.resolver.replace(store);

        let current = self.live.load_full();
        let generation_state = build(&cfg, &self.fixed, upstream_tls, &cert_names, Some(&current));
        drop(current);
        let new = generation_state.upstreams.clone();
        let old_up: Vec<(Arc<str>, std::net::SocketAddr)> = self
            .live
            .load()
            .balancer
            .backends()
            .iter()
            .filter(|b| b.is_up())
            .map(|b| (b.name.clone(), b.addr))
            .collect();
        // Wait until what serves now serves in the new generation too.
        let bound = Duration::from_millis(
            u64::from(cfg.health.rise.max(1)) * cfg.health.interval_ms + cfg.health.timeout_ms,
        ) + Duration::from_secs(1);
        let ready = || {
            let backends = new.balancer.backends();
            let kept_up = old_up.iter().all(|(name, addr)| {
                backends
                    .iter()
                    .find(|b| b.name == *name && b.addr == *addr)
                    .is_none_or(|b| b.is_up())
            });
            let any_up = backends.iter().any(|b| b.is_up());
            kept_up && (any_up || old_up.is_empty())
        };
        let deadline = tokio::time::Instant::now() + bound;
        while !ready() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Drain flags set at runtime (`rampart lb drain`), ejections, the failure counts
        // behind them and slow-start ramps survive the reload (taken as late as possible:
        // the live generation keeps counting until the swap).
        new.balancer.carry_over_from(&self.live.load().balancer);
        let old_gen = self.live.swap(new.clone());
        if let Ok(mut stop) = self.stop.lock() {
            let previous = std::mem::replace(&mut *stop, generation_state.stop);
            previous.send_replace(true);
        }
        // A health check of the old generation still in flight must not overwrite the
        // verdicts written below.
        old_gen.balancer.retire();
        // From now on the series report the new generation's verdicts (its checkers only
        // write on a change, so a backend that stayed down there is written here).
        for b in new.balancer.backends() {
            self.fixed
                .metrics
                .backend_up(&b.name)
                .set(i64::from(b.is_up()));
        }
        // Series of backends that left are removed, not frozen at their last value: a
        // scrape or push no longer carries them, so the monitor sees them go stale (as
        // Prometheus does a series missing from a scrape). Their counters stay: a counter
        // is monotonic for the life of the process, and the same backend may come back.
        for b in old_gen.balancer.backends() {
            if !new.balancer.backends().iter().any(|n| n.name == b.name) {
                self.fixed.metrics.forget_backend(&b.name);
                self.fixed.tunnels.forget(&b.name);
            }
        }
        let report = ReloadReport {
            generation,
            certificates,
            backends: new
                .balancer
                .backends()
                .iter()
                .map(|b| b.name.to_string())
                .collect(),
            down: new
                .balancer
                .backends()
                .iter()
                .filter(|b| !b.is_up())
                .map(|b| b.name.to_string())
                .collect(),
            needs_restart,
        };
        Ok((report, cfg))
    }
}

/// Names of the settings that differ between `old` and `new` but are fixed while the
/// listeners run.
fn needs_restart(old: &LbConfig, new: &LbConfig) -> Vec<&'static str> {
    let mut v = Vec::new();
    let mut differs = |what, d: bool| {
        if d {
            v.push(what);
        }
    };
    differs("address", old.net.address() != new.net.address());
    differs("https_port", old.https_port != new.https_port);
    differs(
        "http_port",
        old.http_port != new.http_port || old.http_enabled != new.http_enabled,
    );
    differs("session resumption", old.resumption != new.resumption);
    differs("access_log", old.access_log != new.access_log);
    differs(
        "buffer_total_bytes",
        old.balancer.buffer_total_bytes != new.balancer.buffer_total_bytes,
    );
    differs("acme", old.acme != new.acme);
    differs(
        "response_headers",
        old.response_headers != new.response_headers,
    );
    differs(
        "redirect names",
        old.site_domain != new.site_domain || old.site_names != new.site_names,
    );
    v
}
