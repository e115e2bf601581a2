//! Active health checks: one task per backend sends `GET {path}` over a fresh connection
//! made exactly like request connections (from this host's address, mutual TLS), every
//! `interval_ms`, failing after `timeout_ms`. A 2xx answer is a success.
//!
//! Thresholds follow HAProxy's `rise`/`fall` (and Pingora's consecutive success/failure
//! counts): a down backend comes up after `rise` consecutive successes, an up backend goes
//! down after `fall` consecutive failures; an outcome of the other kind resets the count.
//! Backends start **down**, so a freshly started load balancer answers 503 until each
//! backend has passed `rise` checks (about `rise × interval_ms`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::Empty;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use topology::HealthCheck;

use crate::balancer::Balancer;
use crate::upstream::{ConnectError, Connector};

/// The rise/fall state machine of one backend.
#[derive(Debug, Clone)]
pub(crate) struct Thresholds {
    rise: u32,
    fall: u32,
    up: bool,
    successes: u32,
    failures: u32,
}

impl Thresholds {
    /// Starts down. `rise` and `fall` below 1 are treated as 1.
    pub(crate) fn new(rise: u32, fall: u32) -> Thresholds {
        Thresholds {
            rise: rise.max(1),
            fall: fall.max(1),
            up: false,
            successes: 0,
            failures: 0,
        }
    }

    /// Records one check outcome; returns the new state when it changed.
    pub(crate) fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= self.rise {
                self.up = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= self.fall {
                self.up = false;
                return Some(false);
            }
        }
        None
    }
}

/// Why one check failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One check: a new connection, `GET path` with `Connection: close`, 2xx or an error.
async fn probe(connector: &Connector, backend: &str, path: &str) -> Result<(), ProbeError> {
    let io = connector.connect(backend).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    let driver = tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, backend)
        .header(header::USER_AGENT, "rampart-lb-health-check")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let result = sender.send_request(req).await;
    drop(sender);
    driver.abort();
    let status = result?.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}

/// Checks backend number `index` of `balancer` until `shutdown` changes or its sender is
/// dropped, publishing transitions to the balancer (and so to `rampart_backend_up`).
pub(crate) async fn run(
    balancer: Arc<Balancer>,
    index: usize,
    connector: Connector,
    cfg: HealthCheck,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(name) = balancer.backends().get(index).map(|b| b.name.clone()) else {
        return;
    };
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let mut ticker = tokio::time::interval(Duration::from_millis(cfg.interval_ms.max(1)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut state = Thresholds::new(cfg.rise, cfg.fall);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => {}
        }
        // A probe in flight when the generation stops is abandoned, not waited for.
        let outcome = tokio::select! {
            _ = shutdown.changed() => return,
            o = tokio::time::timeout(timeout, probe(&connector, &name, &cfg.path)) => {
                o.unwrap_or(Err(ProbeError::Timeout(timeout)))
            }
        };
        if let Err(e) = &outcome {
            tracing::debug!(backend = %name, error = %e, "health check failed");
        }
        match state.observe(outcome.is_ok()) {
            Some(true) => {
                tracing::info!(backend = %name, rise = cfg.rise, "backend up");
                balancer.set_up(index, true);
            }
            Some(false) => {
                let reason = outcome.err().map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(backend = %name, fall = cfg.fall, last_error = %reason, "backend down");
                balancer.set_up(index, false);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rises_after_rise_consecutive_successes() {
        let mut t = Thresholds::new(2, 3);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(true));
        assert_eq!(t.observe(true), None);
    }

    #[test]
    fn falls_after_fall_consecutive_failures() {
        let mut t = Thresholds::new(1, 3);
        assert_eq!(t.observe(true), Some(true));
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(false));
        assert_eq!(t.observe(false), None);
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut t = Thresholds::new(0, 0);
        assert_eq!(t.observe(true), Some(true));
        assert_eq!(t.observe(false), Some(false));
    }
}
