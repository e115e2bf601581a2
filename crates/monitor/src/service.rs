//! The monitoring service: ingest, store, rule evaluation, API and dashboard.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pki::Identity;
use serde::{Deserialize, Serialize};
use serde_json::json;
use topology::{AlertRule, Service};

use crate::alert::{Alert, Event, State as AlertState};
use crate::promapi;
use crate::serve::{self, Peer};
use crate::store::{Ingested, Rate, Refused, Store, MAX_SERIES_PER_HOST};
use crate::{exposition, unix_now, MonitorConfig, MonitorError, REQUESTS_METRIC};

/// The largest push body accepted, in bytes; larger ones get `413 Payload Too Large`.
pub const MAX_PUSH_BYTES: usize = 1024 * 1024;
/// Seconds without a push after which a host is stale: three times the agents' 1 s push
/// interval.
pub const STALE_AFTER_SECONDS: f64 = 3.0;
/// Alert history entries kept.
pub const HISTORY_LEN: usize = 200;
/// The name the QPS rule's alerts carry in logs and the API.
pub const ALERT_NAME: &str = "HighQPS";
/// The name the firewall drop-surge rule's alerts carry.
pub const DROP_ALERT_NAME: &str = "FirewallDropSurge";
/// The kernel firewall's drop counter the drop-surge rule rates (all reasons summed).
pub const DROPS_METRIC: &str = "rampart_firewall_dropped_packets_total";
/// The load balancer's per-backend health gauge (1 up, 0 down).
pub const BACKEND_UP_METRIC: &str = "rampart_backend_up";

/// A built-in rule besides HighQPS: what it measures per agent host. Each is fed to the
/// same [`Alert`] state machine (above the threshold for `for_seconds` → firing; resolved
/// at or below the clear threshold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// `FirewallDropSurge`: dropped packets per second of the host's kernel firewall
    /// (rate of [`DROPS_METRIC`], all reasons); no value while the host is stale.
    FirewallDrops,
    /// `HostDown`: seconds since the host's last push (since the monitor started when it
    /// never pushed).
    HostDown,
    /// `BackendDown`: how many backends the host's load balancer has marked down (latest
    /// [`BACKEND_UP_METRIC`] samples equal to 0, of the series in the host's newest push: a
    /// backend a reload removed is not counted); hosts without backends have no value.
    BackendDown,
    /// `SiteUnavailable`: the share of the host's load balancer's backends that are down
    /// (1 = every backend down: the site answers 503 only).
    SiteUnavailable,
}

impl RuleKind {
    /// The alert name.
    pub fn name(self) -> &'static str {
        match self {
            RuleKind::FirewallDrops => DROP_ALERT_NAME,
            RuleKind::HostDown => "HostDown",
            RuleKind::BackendDown => "BackendDown",
            RuleKind::SiteUnavailable => "SiteUnavailable",
        }
    }

    /// The rule as a PromQL-style expression, for the API.
    fn expr(self, r: &AlertRule) -> String {
        match self {
            RuleKind::FirewallDrops => format!(
                "sum by (host) (rate({DROPS_METRIC}[{}s])) > {}",
                r.window_seconds, r.threshold_rps
            ),
            RuleKind::HostDown => format!("time() - last_push(host) > {}", r.threshold_rps),
            RuleKind::BackendDown => {
                format!(
                    "count by (host) ({BACKEND_UP_METRIC} == 0) > {}",
                    r.threshold_rps
                )
            }
            RuleKind::SiteUnavailable => format!(
                "1 - avg by (host) ({BACKEND_UP_METRIC}) > {}",
                r.threshold_rps
            ),
        }
    }
}

/// The default thresholds of the built-in rules other than HighQPS and FirewallDropSurge
/// (which come from the topology): HostDown after 10 s without a push, resolved once a push
/// is at most 3 s old; BackendDown as soon as one backend is down for 5 s; SiteUnavailable
/// when every backend of a load balancer is down for 5 s.
pub fn default_rules() -> Vec<(RuleKind, AlertRule)> {
    vec![
        (
            RuleKind::HostDown,
            AlertRule {
                clear_for_seconds: 0,
                threshold_rps: 10.0,
                for_seconds: 0,
                clear_rps: 3.0,
                window_seconds: 1,
            },
        ),
        (
            RuleKind::BackendDown,
            AlertRule {
                clear_for_seconds: 0,
                threshold_rps: 0.5,
                for_seconds: 5,
                clear_rps: 0.0,
                window_seconds: 1,
            },
        ),
        (
            RuleKind::SiteUnavailable,
            AlertRule {
                clear_for_seconds: 0,
                threshold_rps: 0.99,
                for_seconds: 5,
                clear_rps: 0.5,
                window_seconds: 1,
            },
        ),
    ]
}
/// Seconds between two log lines about refused samples of one host and reason; the
/// counts in `/api/v1/ingest` include every refusal.
pub const REFUSAL_LOG_INTERVAL_SECONDS: f64 = 60.0;

const DASHBOARD: &str = include_str!("dashboard.html");

/// A running monitoring service. Dropping it stops the listener and the rule evaluation.
#[derive(Debug)]
pub struct MonitorHandle {
    addr: SocketAddr,
    filter: Arc<firewall::Filter>,
    state: Arc<MonitorState>,
    tasks: ::serve::RoleTasks,
}

impl MonitorHandle {
    /// The listener's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listener's filter (its firewall counters).
    pub fn filters(&self) -> Vec<Arc<firewall::Filter>> {
        vec![self.filter.clone()]
    }

    /// The service's state (store, alerts), e.g. for `rampart status`.
    pub fn state(&self) -> Arc<MonitorState> {
        self.state.clone()
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        self.tasks.cancel();
    }
}

impl ::serve::RoleHandle for MonitorHandle {
    fn role(&self) -> &'static str {
        "monitor"
    }
    fn addrs(&self) -> Vec<(Service, SocketAddr)> {
        vec![(Service::Ingest, self.addr)]
    }
    fn healthy(&self) -> bool {
        self.tasks.running()
    }
    fn filters(&self) -> Vec<Arc<firewall::Filter>> {
        vec![self.filter.clone()]
    }
    fn shutdown(&self) -> ::serve::BoxFuture<()> {
        let tasks = self.tasks.clone();
        Box::pin(async move { tasks.shutdown().await })
    }
}

/// Starts the monitoring service on `cfg.address:cfg.port` (mutual TLS, ALPN h2 and
/// http/1.1) and its rule evaluation, once a second.
///
/// Routes: `POST /api/v1/push` (agent hosts only; the body is an OpenMetrics/Prometheus
/// text exposition of at most [`MAX_PUSH_BYTES`]), `GET /` (dashboard), `GET /api/v1/qps`,
/// `GET /api/v1/qps_range?seconds=&step=` (see [`MonitorState::qps_range`]),
/// `GET /api/v1/alerts`, `GET /api/v1/series?name=&host=`, `GET /api/v1/ingest` (series
/// per agent host, refused samples by reason and counter resets; admin only), `GET /healthz`
/// (any verified client). Wrong identities get 403.
///
/// Errors: TLS material missing or invalid, the address cannot be bound.
pub async fn start_monitor(cfg: MonitorConfig) -> Result<MonitorHandle, MonitorError> {
    let tls = pki::mtls_server_config(&cfg.pki, &cfg.host, &[b"h2", b"http/1.1"])?;
    let bind = SocketAddr::new(cfg.net.address(), cfg.port);
    let listener = cfg
        .net
        .listen(Service::Ingest, cfg.port)
        .await
        .map_err(|source| MonitorError::Bind { addr: bind, source })?;
    let filter = listener.filter().clone();
    let addr = listener
        .local_addr()
        .map_err(|source| MonitorError::Bind { addr: bind, source })?;
    let tasks = ::serve::RoleTasks::new();
    let alerting = crate::rules::load(&cfg.rule_files)?;
    let mut state = MonitorState::new(cfg.rule, cfg.agent_hosts)
        .with_retention(cfg.retention_seconds as f64)
        .with_alerting_rules(alerting)
        .with_drop_rule(cfg.drop_rule)
        .with_rules(default_rules());
    if let Some(path) = cfg.silences_file.clone() {
        state = state.with_silences_file(path);
    }
    if !cfg.webhook_urls.is_empty() || cfg.email.is_some() {
        let (notifier, rx) = crate::notify::channel();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(pki::ca_client_config(&cfg.pki)?)
            .local_address(Some(cfg.net.address()))
            .build()?;
        let external = format!("https://{}:{}/", cfg.host, addr.port());
        tasks.spawn(crate::notify::deliver(
            rx,
            client,
            cfg.webhook_urls.clone(),
            cfg.email.clone(),
            cfg.grouping,
            external,
            tasks.token(),
        ));
        state = state.with_notifier(notifier);
    }
    let state = Arc::new(state);
    if let Some(path) = cfg.snapshot.clone() {
        match state.restore(&path, unix_now()) {
            Ok(Some(series)) => tracing::info!(
                "monitoring history restored from {}: {series} series",
                path.display()
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                "monitoring history not restored from {}: {e}; starting empty",
                path.display()
            ),
        }
        let (snap_state, token) = (state.clone(), tasks.token());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(crate::SNAPSHOT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick.tick().await;
            loop {
                let last = tokio::select! {
                    _ = tick.tick() => false,
                    _ = token.cancelled() => true,
                };
                let (st, p) = (snap_state.clone(), path.clone());
                let written = tokio::task::spawn_blocking(move || st.snapshot(&p)).await;
                if let Ok(Err(e)) = written {
                    tracing::warn!("writing the monitoring snapshot {}: {e}", path.display());
                }
                if last {
                    return;
                }
            }
        });
    }
    serve::spawn(listener, Arc::new(tls), app(state.clone()), &tasks);
    let eval_state = state.clone();
    let token = tasks.token();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => eval_state.evaluate(unix_now()),
                _ = token.cancelled() => return,
            }
        }
    });
    tracing::info!("monitoring service {} listening on {addr}", cfg.host);
    Ok(MonitorHandle {
        addr,
        filter,
        state,
        tasks,
    })
}

/// One entry of the alert history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    /// The rule (`HighQPS`, `FirewallDropSurge`, a rule file's `alert`).
    pub alert: String,
    /// The host.
    pub host: String,
    /// `firing` or `resolved`.
    pub event: Event,
    /// Unix seconds.
    pub at: f64,
    /// The value that caused it (requests/s, or dropped packets/s).
    pub value: Option<f64>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    alerts: BTreeMap<String, Alert>,
    /// The other rules' alerts, by rule name and host.
    rule_alerts: BTreeMap<(&'static str, String), Alert>,
    stale: BTreeMap<String, bool>,
    history: VecDeque<HistoryEntry>,
    /// When refused samples of a host and reason were last logged.
    refusal_logged: BTreeMap<(String, Refused), f64>,
    /// The PromQL alerting rules (built-in and rule files) with their alerts.
    alerting: Vec<crate::rules::AlertingRule>,
}

/// The service's state: the store, each agent host's alert and the alert history. All
/// methods take the time from the caller, so they are tested with an explicit clock.
#[derive(Debug)]
pub struct MonitorState {
    rule: AlertRule,
    rules: Vec<(RuleKind, AlertRule)>,
    notifier: Option<crate::notify::Notifier>,
    started: f64,
    agent_hosts: Vec<String>,
    inner: Mutex<Inner>,
    /// Silences: they suppress notifications, not alerts.
    silences: Mutex<crate::silence::Silences>,
    /// Where the silences are kept across restarts ([`MonitorState::with_silences_file`]);
    /// the mutex orders the writes.
    silences_file: Option<Mutex<std::path::PathBuf>>,
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file, never a
/// torn one: a temporary file beside it, fsync, rename over `path`, fsync of the directory
/// (rename(2), fsync(2)).
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A host's QPS as reported by the API.
#[derive(Debug, Clone, Serialize)]
pub struct HostQps {
    /// Requests per second over the rule's window; `null` with fewer than two pushes in it.
    pub qps: Option<f64>,
    /// Seconds the rate was actually computed over (first to last push in the window).
    pub rate_window_seconds: Option<f64>,
    /// Seconds since the last push; `null` when the host never pushed.
    pub last_push_age_seconds: Option<f64>,
    /// No push for more than [`STALE_AFTER_SECONDS`].
    pub stale: bool,
}

/// One agent host's ingest as reported by `/api/v1/ingest`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostIngest {
    /// Series stored now, at most the series budget ([`MAX_SERIES_PER_HOST`]).
    pub series: usize,
    /// Samples refused since the service started, by reason (`non_finite`,
    /// `negative_counter`, `counter_too_large`, `series_budget`, `too_far_in_future`,
    /// `too_old`, `out_of_order`); reasons that never happened are absent.
    pub rejected_samples: BTreeMap<&'static str, u64>,
    /// Counter resets stored since the service started: counters lower than their
    /// series' previous value (a restarted process, a recreated network interface),
    /// which `rate` and `increase` count from zero again as Prometheus does.
    pub counter_resets: u64,
}

/// A validated `/api/v1/qps_range` query: the last `seconds`, one point every `step` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeQuery {
    seconds: u64,
    step: u64,
}

impl RangeQuery {
    /// Seconds of history when the query names none: the dashboard's 5-minute chart.
    pub const DEFAULT_SECONDS: u64 = 300;
    /// Seconds between points when the query names none: one per agent push.
    pub const DEFAULT_STEP_SECONDS: u64 = 1;
    /// The longest range, seconds: the dashboard's 15 minutes (longer ranges go through
    /// `/api/v1/query_range`).
    pub const MAX_SECONDS: u64 = 900;
    /// The longest step, seconds.
    pub const MAX_STEP_SECONDS: u64 = 60;
    /// The most points per host one query returns. The bounds on `seconds` and `step` keep
    /// every valid query within it (at most `MAX_SECONDS + 1` points, checked at compile
    /// time), so no query is refused for its point count alone.
    pub const MAX_POINTS: u64 = 1_000;

    /// `seconds` in `1..=MAX_SECONDS` and `step` in `1..=MAX_STEP_SECONDS`.
    ///
    /// Errors: [`RangeError::Seconds`] or [`RangeError::Step`] naming the value out of range.
    pub fn new(seconds: u64, step: u64) -> Result<RangeQuery, RangeError> {
        if !(1..=Self::MAX_SECONDS).contains(&seconds) {
            return Err(RangeError::Seconds(seconds));
        }
        if !(1..=Self::MAX_STEP_SECONDS).contains(&step) {
            return Err(RangeError::Step(step));
        }
        Ok(RangeQuery { seconds, step })
    }

    /// Points per host: `end`, `end - step`, ... back to `end - seconds`.
    pub fn points(self) -> u64 {
        self.seconds / self.step + 1
    }
}

// The most points a valid query gets is `MAX_SECONDS + 1`, at a step of 1 s.
const _: () = assert!(RangeQuery::MAX_SECONDS < RangeQuery::MAX_POINTS);

/// Why a `/api/v1/qps_range` query was refused (`400 Bad Request` with `{"error": reason}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// `seconds` outside `1..=`[`RangeQuery::MAX_SECONDS`].
    #[error("seconds must be an integer from 1 to {max}, got {0}", max = RangeQuery::MAX_SECONDS)]
    Seconds(u64),
    /// `step` outside `1..=`[`RangeQuery::MAX_STEP_SECONDS`].
    #[error("step must be an integer from 1 to {max}, got {0}", max = RangeQuery::MAX_STEP_SECONDS)]
    Step(u64),
    /// The query string did not parse (a parameter is not a non-negative integer).
    #[error("{0}")]
    Malformed(String),
}

/// The `/api/v1/qps_range` document: each agent host's QPS at evenly spaced past times.
#[derive(Debug, Clone, Serialize)]
pub struct QpsRange {
    /// The rule's rate window, seconds, as in `/api/v1/qps`: each point is the rate over
    /// the `window_seconds` up to its time.
    pub window_seconds: u64,
    /// Seconds between points.
    pub step_seconds: u64,
    /// Unix seconds: `end` minus the requested range; no point is older.
    pub start: f64,
    /// Unix seconds: the time of the request, the newest point's time.
    pub end: f64,
    /// Per agent host, `[unix seconds, requests/s]` pairs, oldest first. Times where the
    /// rate is unknown (fewer than two pushes in the window) are omitted, so a host that
    /// never pushed has `[]`.
    pub hosts: BTreeMap<String, Vec<[f64; 2]>>,
}

impl MonitorState {
    /// A service state for `rule` and the hosts allowed to push.
    pub fn new(rule: AlertRule, agent_hosts: Vec<String>) -> MonitorState {
        let now = unix_now();
        MonitorState {
            inner: Mutex::new(Inner {
                store: Store::new(),
                alerts: agent_hosts
                    .iter()
                    .map(|h| (h.clone(), Alert::new(now)))
                    .collect(),
                rule_alerts: BTreeMap::new(),
                stale: BTreeMap::new(),
                history: VecDeque::new(),
                refusal_logged: BTreeMap::new(),
                alerting: Vec::new(),
            }),
            rule,
            rules: Vec::new(),
            notifier: None,
            started: now,
            agent_hosts,
            silences: Mutex::new(crate::silence::Silences::default()),
            silences_file: None,
        }
    }

    /// Keeps the silences in `path` ([`crate::silence::Silences::encode`], written
    /// atomically after every change) and loads the ones already there, so silences
    /// survive a restart. A file that cannot be read or decoded is logged; the service
    /// then starts without silences, and the next change overwrites the file.
    pub fn with_silences_file(mut self, path: std::path::PathBuf) -> MonitorState {
        match std::fs::read(&path) {
            Ok(bytes) => match crate::silence::Silences::decode(&bytes) {
                Ok(loaded) => {
                    tracing::info!(
                        "{} silence(s) restored from {}",
                        loaded.list(unix_now()).len(),
                        path.display()
                    );
                    *self.silences.lock().unwrap_or_else(|e| e.into_inner()) = loaded;
                }
                Err(e) => tracing::warn!("silences not restored from {}: {e}", path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("silences not restored from {}: {e}", path.display()),
        }
        self.silences_file = Some(Mutex::new(path));
        self
    }

    /// Writes the silences to their file, when there is one (blocking: call it off the
    /// async runtime). Errors: the file cannot be written.
    pub fn save_silences(&self) -> std::io::Result<()> {
        let Some(file) = &self.silences_file else {
            return Ok(());
        };
        let path = file.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = self
            .silences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .encode(unix_now());
        write_atomically(&path, &bytes)
    }

    /// Keeps `seconds` of history (default [`crate::store::DEFAULT_RETENTION_SECONDS`]).
    pub fn with_retention(self, seconds: f64) -> MonitorState {
        self.lock().store = Store::with_retention(seconds);
        self
    }

    /// Evaluates `rules` (PromQL alerting rules, [`crate::rules`]) every second besides the
    /// built-in threshold rules.
    pub fn with_alerting_rules(self, rules: Vec<crate::rules::AlertingRule>) -> MonitorState {
        self.lock().alerting = rules;
        self
    }

    /// Sends every firing and resolved alert to `notifier` as well.
    pub fn with_notifier(mut self, notifier: crate::notify::Notifier) -> MonitorState {
        self.notifier = Some(notifier);
        self
    }

    /// Queues a notification of `event` (`since`: when the alert entered the state it just
    /// left, the start of firing for a resolved alert).
    fn notify(
        &self,
        alert: &str,
        host: &str,
        event: Event,
        value: Option<f64>,
        since: f64,
        at: f64,
    ) {
        let labels = [
            ("alertname".to_string(), alert.to_string()),
            ("host".to_string(), host.to_string()),
            ("instance".to_string(), host.to_string()),
        ];
        let silenced = self
            .silences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .silenced(&labels, at);
        if silenced {
            tracing::info!("notification of {alert} {host} {event:?} silenced");
            return;
        }
        if let Some(n) = &self.notifier {
            n.send(crate::notify::Notification {
                alert: alert.to_string(),
                host: host.to_string(),
                event,
                value,
                starts_at: if event == Event::Firing { at } else { since },
                at,
            });
        }
    }

    /// Writes the store to `path` atomically (a temporary file, fsync, rename, fsync of the
    /// directory), in
    /// [`Store::encode_snapshot`]'s format. The store is locked only while it is encoded.
    pub fn snapshot(&self, path: &std::path::Path) -> std::io::Result<()> {
        let bytes = self.lock().store.encode_snapshot();
        write_atomically(path, &bytes)
    }

    /// Replaces the store with the snapshot at `path` (what expired by `now` left out).
    /// `Ok(None)` when there is no snapshot; otherwise the number of series restored.
    ///
    /// Errors: the file cannot be read, or is not a whole snapshot.
    pub fn restore(&self, path: &std::path::Path, now: f64) -> Result<Option<usize>, String> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let retention = self.lock().store.retention();
        let store = Store::decode_snapshot(&bytes, now, retention)?;
        let series = self.agent_hosts.iter().map(|h| store.series_count(h)).sum();
        self.lock().store = store;
        Ok(Some(series))
    }

    /// Adds built-in rules ([`RuleKind`]) with their thresholds.
    pub fn with_rules(mut self, rules: Vec<(RuleKind, AlertRule)>) -> MonitorState {
        self.rules.extend(rules);
        self
    }

    /// Adds the firewall drop-surge rule: per agent host, the rate of
    /// [`DROPS_METRIC`] (summed over reasons) against `rule`'s threshold, with the same
    /// pending/firing/resolved states and clear threshold as the QPS rule. Hosts that
    /// export no drop counters (loopback mode) have a rate of 0 and never fire.
    pub fn with_drop_rule(self, rule: AlertRule) -> MonitorState {
        self.with_rules(vec![(RuleKind::FirewallDrops, rule)])
    }

    /// `kind`'s value for `host` at `now` (see [`RuleKind`]).
    fn rule_value(
        &self,
        inner: &Inner,
        kind: RuleKind,
        rule: &AlertRule,
        host: &str,
        now: f64,
    ) -> Option<f64> {
        let stale = inner.stale.get(host).copied().unwrap_or(true);
        let backends = || -> Vec<f64> {
            inner
                .store
                .series(BACKEND_UP_METRIC, Some(host))
                .into_iter()
                // A backend whose series left the pushes (a reload removed it) is gone,
                // not down.
                .filter(|s| !s.stale)
                .filter_map(|s| s.samples.last().map(|(_, v)| v))
                .collect()
        };
        match kind {
            RuleKind::FirewallDrops => (!stale)
                .then(|| {
                    inner
                        .store
                        .rate(host, DROPS_METRIC, now, rule.window_seconds as f64)
                        .map(|r| r.per_second)
                })
                .flatten(),
            RuleKind::HostDown => {
                Some((now - inner.store.last_push(host).unwrap_or(self.started)).max(0.0))
            }
            RuleKind::BackendDown => {
                let up = backends();
                (!stale && !up.is_empty()).then(|| up.iter().filter(|v| **v < 0.5).count() as f64)
            }
            RuleKind::SiteUnavailable => {
                let up = backends();
                (!stale && !up.is_empty())
                    .then(|| up.iter().filter(|v| **v < 0.5).count() as f64 / up.len() as f64)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (each update is one call).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parses and stores one push from `host` received at `now` (a sample's timestamp, when
    /// present, is in milliseconds since the Unix epoch as in the Prometheus text format
    /// 0.0.4, and the sample is stored at that time); returns what was stored
    /// and refused ([`Store::ingest`]: single bad samples are refused and counted, the rest
    /// stored), or why the whole push was rejected (it does not parse, or repeats a series).
    /// Refusals are logged at most once per host and reason every
    /// [`REFUSAL_LOG_INTERVAL_SECONDS`].
    pub fn ingest(&self, host: &str, now: f64, text: &str) -> Result<Ingested, String> {
        let mut samples = exposition::parse(text).map_err(|e| e.to_string())?;
        // A push's timestamps are the text format's milliseconds since the epoch.
        for s in &mut samples {
            s.timestamp = s.timestamp.map(|ms| ms / 1000.0);
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        let got = inner
            .store
            .ingest(host, now, samples)
            .map_err(|e| e.to_string())?;
        for (&reason, (count, first)) in &got.refused {
            let key = (host.to_string(), reason);
            let due = inner
                .refusal_logged
                .get(&key)
                .is_none_or(|&at| !(at..at + REFUSAL_LOG_INTERVAL_SECONDS).contains(&now));
            if due {
                let total = inner.store.refused().get(&key).copied().unwrap_or(0);
                tracing::warn!(
                    "push from {host}: {count} sample(s) refused ({}, e.g. {first}); {total} \
                     refused for this reason so far",
                    reason.as_str()
                );
                inner.refusal_logged.insert(key, now);
            }
        }
        Ok(got)
    }

    /// Each agent host's series count and refused samples by reason (the
    /// `/api/v1/ingest` document's `hosts`).
    pub fn ingest_stats(&self) -> BTreeMap<String, HostIngest> {
        let inner = self.lock();
        let mut out: BTreeMap<String, HostIngest> = self
            .agent_hosts
            .iter()
            .map(|h| {
                let stats = HostIngest {
                    series: inner.store.series_count(h),
                    rejected_samples: BTreeMap::new(),
                    counter_resets: inner.store.counter_resets(h),
                };
                (h.clone(), stats)
            })
            .collect();
        for ((host, reason), n) in inner.store.refused() {
            if let Some(stats) = out.get_mut(host) {
                stats.rejected_samples.insert(reason.as_str(), *n);
            }
        }
        out
    }

    /// The QPS of every agent host at `now`.
    pub fn qps(&self, now: f64) -> BTreeMap<String, HostQps> {
        let inner = self.lock();
        self.agent_hosts
            .iter()
            .map(|h| (h.clone(), self.host_qps(&inner.store, h, now)))
            .collect()
    }

    /// The QPS of every agent host at `end`, `end - step`, ... not before `end - seconds`:
    /// each point computed as [`MonitorState::qps`] would have at that time, from the
    /// samples stored now (so at most [`RangeQuery::MAX_SECONDS`] back). The analogue of
    /// Prometheus `query_range` for `sum by (host) (rate(rampart_http_requests_total[w]))`.
    pub fn qps_range(&self, end: f64, q: RangeQuery) -> QpsRange {
        let inner = self.lock();
        let times: Vec<f64> = (0..q.points())
            .rev()
            .map(|k| end - (k * q.step) as f64)
            .collect();
        let hosts = self
            .agent_hosts
            .iter()
            .map(|h| {
                let points = times
                    .iter()
                    .filter_map(|&t| Some([t, self.rate_at(&inner.store, h, t)?.per_second]))
                    .collect();
                (h.clone(), points)
            })
            .collect();
        QpsRange {
            window_seconds: self.rule.window_seconds,
            step_seconds: q.step,
            start: end - q.seconds as f64,
            end,
            hosts,
        }
    }

    /// The rate a host's QPS is: its requests counter over the rule's window up to `now`.
    fn rate_at(&self, store: &Store, host: &str, now: f64) -> Option<Rate> {
        store.rate(host, REQUESTS_METRIC, now, self.rule.window_seconds as f64)
    }

    fn host_qps(&self, store: &Store, host: &str, now: f64) -> HostQps {
        let rate = self.rate_at(store, host, now);
        let age = store.last_push(host).map(|t| (now - t).max(0.0));
        HostQps {
            qps: rate.map(|r| r.per_second),
            rate_window_seconds: rate.map(|r| r.span_seconds),
            last_push_age_seconds: age,
            stale: age.is_none_or(|a| a > STALE_AFTER_SECONDS),
        }
    }

    /// Evaluates the rule for every agent host at `now`: feeds each alert its QPS (no data
    /// when stale), logs firing, resolved and staleness changes, and records history.
    pub fn evaluate(&self, now: f64) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        for host in &self.agent_hosts {
            let q = self.host_qps(&inner.store, host, now);
            let was_stale = inner.stale.insert(host.clone(), q.stale);
            match (was_stale, q.stale) {
                (Some(false), true) => tracing::warn!(
                    "host {host} is stale: no push for {:.1}s",
                    q.last_push_age_seconds.unwrap_or(f64::INFINITY)
                ),
                (Some(true), false) => tracing::info!("host {host} is pushing again"),
                _ => {}
            }
            let value = if q.stale { None } else { q.qps };
            let alert = inner
                .alerts
                .entry(host.clone())
                .or_insert_with(|| Alert::new(now));
            let since = alert.since();
            let Some(event) = alert.observe(&self.rule, now, value) else {
                continue;
            };
            self.notify(ALERT_NAME, host, event, value, since, now);
            let shown = value.map_or_else(|| "none".to_string(), |v| format!("{v:.2}"));
            match event {
                Event::Firing => tracing::warn!(
                    "alert firing: {ALERT_NAME} host={host} qps={shown} threshold={} for={}s",
                    self.rule.threshold_rps,
                    self.rule.for_seconds
                ),
                Event::Resolved => tracing::info!(
                    "alert resolved: {ALERT_NAME} host={host} qps={shown} clear={}",
                    self.rule.clear_rps
                ),
            }
            if inner.history.len() == HISTORY_LEN {
                inner.history.pop_front();
            }
            inner.history.push_back(HistoryEntry {
                alert: ALERT_NAME.to_string(),
                host: host.clone(),
                event,
                at: now,
                value,
            });
        }
        for (kind, rule) in &self.rules {
            let name = kind.name();
            for host in &self.agent_hosts {
                let value = self.rule_value(inner, *kind, rule, host, now);
                let alert = inner
                    .rule_alerts
                    .entry((name, host.clone()))
                    .or_insert_with(|| Alert::new(now));
                let since = alert.since();
                let Some(event) = alert.observe(rule, now, value) else {
                    continue;
                };
                self.notify(name, host, event, value, since, now);
                let shown = value.map_or_else(|| "none".to_string(), |v| format!("{v:.2}"));
                match event {
                    Event::Firing => tracing::warn!(
                        "alert firing: {name} host={host} value={shown} threshold={} for={}s",
                        rule.threshold_rps,
                        rule.for_seconds
                    ),
                    Event::Resolved => tracing::info!(
                        "alert resolved: {name} host={host} value={shown} clear={}",
                        rule.clear_rps
                    ),
                }
                if inner.history.len() == HISTORY_LEN {
                    inner.history.pop_front();
                }
                inner.history.push_back(HistoryEntry {
                    alert: name.to_string(),
                    host: host.clone(),
                    event,
                    at: now,
                    value,
                });
            }
        }
        let Inner {
            store,
            alerting,
            history,
            ..
        } = inner;
        for rule in alerting.iter_mut() {
            for t in rule.evaluate(store, now) {
                let host = t.alert.label("instance").to_string();
                let value = Some(t.alert.value);
                let since = t.alert.fired_at.unwrap_or(t.alert.active_at);
                self.notify(&rule.name, &host, t.event, value, since, now);
                let labels: Vec<String> = t
                    .alert
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                match t.event {
                    Event::Firing => tracing::warn!(
                        "alert firing: {} {} value={:.3} for={}s",
                        rule.name,
                        labels.join(","),
                        t.alert.value,
                        rule.for_seconds
                    ),
                    Event::Resolved => {
                        tracing::info!("alert resolved: {} {}", rule.name, labels.join(","))
                    }
                }
                if history.len() == HISTORY_LEN {
                    history.pop_front();
                }
                history.push_back(HistoryEntry {
                    alert: rule.name.clone(),
                    host,
                    event: t.event,
                    at: now,
                    value,
                });
            }
        }
    }

    /// The `/api/v1/alerts` document.
    pub fn alerts_json(&self) -> serde_json::Value {
        let inner = self.lock();
        let alerts: Vec<_> = inner
            .alerts
            .iter()
            .map(|(host, a)| {
                json!({
                    "host": host,
                    "state": a.state(),
                    "since": a.since(),
                    "value": a.value(),
                    "stale": inner.stale.get(host).copied().unwrap_or(true),
                })
            })
            .collect();
        let by_rule = |name: &str| -> Vec<serde_json::Value> {
            inner
                .rule_alerts
                .iter()
                .filter(|((n, _), _)| *n == name)
                .map(|((_, host), a)| {
                    json!({
                        "host": host,
                        "state": a.state(),
                        "since": a.since(),
                        "value": a.value(),
                    })
                })
                .collect()
        };
        let drop_rule = self
            .rules
            .iter()
            .find(|(k, _)| *k == RuleKind::FirewallDrops)
            .map(|(_, r)| r);
        let rules: Vec<_> = self
            .rules
            .iter()
            .map(|(kind, r)| {
                json!({
                    "name": kind.name(),
                    "expr": kind.expr(r),
                    "threshold": r.threshold_rps,
                    "for_seconds": r.for_seconds,
                    "clear": r.clear_rps,
                    "alerts": by_rule(kind.name()),
                })
            })
            .collect();
        // Every alert that is not inactive, across all rules.
        let mut active: Vec<serde_json::Value> = inner
            .alerts
            .iter()
            .filter(|(_, a)| a.state() != AlertState::Inactive)
            .map(|(host, a)| json!({"alert": ALERT_NAME, "host": host, "state": a.state(), "since": a.since(), "value": a.value()}))
            .collect();
        active.extend(
            inner
                .rule_alerts
                .iter()
                .filter(|(_, a)| a.state() != AlertState::Inactive)
                .map(|((name, host), a)| json!({"alert": name, "host": host, "state": a.state(), "since": a.since(), "value": a.value()})),
        );
        for rule in &inner.alerting {
            for a in rule.alerts.values() {
                let labels: BTreeMap<&str, &str> = a
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                active.push(json!({
                    "alert": rule.name,
                    "host": a.label("instance"),
                    "state": a.state.as_str(),
                    "since": a.active_at,
                    "value": a.value,
                    "labels": labels,
                    "annotations": rule
                        .annotations
                        .iter()
                        .map(|(k, v)| (k.clone(), crate::rules::expand(v, a)))
                        .collect::<BTreeMap<_, _>>(),
                }));
            }
        }
        json!({
            "rule": self.rule_json(),
            "alerts": alerts,
            "firewall_drops": {
                "rule": drop_rule.map(|r| json!({
                    "name": DROP_ALERT_NAME,
                    "expr": RuleKind::FirewallDrops.expr(r),
                    "threshold_pps": r.threshold_rps,
                    "for_seconds": r.for_seconds,
                    "clear_pps": r.clear_rps,
                    "window_seconds": r.window_seconds,
                })),
                "alerts": by_rule(DROP_ALERT_NAME),
            },
            "rules": rules,
            "active": active,
            "history": inner.history,
        })
    }

    /// The `/api/v1/rules` data: one group `rampart` (evaluated every second) holding
    /// HighQPS and the built-in rules as Prometheus alerting rules, each with its alerts.
    pub fn rules_json(&self) -> serde_json::Value {
        let doc = self.alerts_json();
        let active = doc["active"].as_array().cloned().unwrap_or_default();
        let mut rules = vec![(
            ALERT_NAME,
            doc["rule"]["expr"].clone(),
            self.rule.for_seconds,
            self.rule.clear_for_seconds,
        )];
        for (kind, r) in &self.rules {
            rules.push((
                kind.name(),
                json!(kind.expr(r)),
                r.for_seconds,
                r.clear_for_seconds,
            ));
        }
        let now = crate::notify::rfc3339(unix_now());
        let rules: Vec<serde_json::Value> = rules
            .into_iter()
            .map(|(name, expr, for_s, keep)| {
                let alerts: Vec<serde_json::Value> = active
                    .iter()
                    .filter(|a| a["alert"] == name)
                    .map(prom_alert)
                    .collect();
                let state = if alerts.iter().any(|a| a["state"] == "firing") {
                    "firing"
                } else if alerts.is_empty() {
                    "inactive"
                } else {
                    "pending"
                };
                json!({
                    "type": "alerting",
                    "name": name,
                    "query": expr,
                    "duration": for_s,
                    "keepFiringFor": keep,
                    "labels": {},
                    "annotations": {},
                    "alerts": alerts,
                    "state": state,
                    "health": "ok",
                    "lastEvaluation": now,
                    "evaluationTime": 0,
                })
            })
            .collect();
        let mut groups =
            vec![json!({"name": "rampart", "file": "built-in", "interval": 1, "rules": rules})];
        let inner = self.lock();
        let mut by_group: Vec<((String, String), Vec<serde_json::Value>)> = Vec::new();
        for r in &inner.alerting {
            let alerts: Vec<serde_json::Value> = active
                .iter()
                .filter(|a| a["alert"] == r.name.as_str() && a["labels"].is_object())
                .map(prom_alert)
                .collect();
            let state = if r
                .alerts
                .values()
                .any(|a| a.state == crate::rules::AlertState::Firing)
            {
                "firing"
            } else if r.alerts.is_empty() {
                "inactive"
            } else {
                "pending"
            };
            let rule = json!({
                "type": "alerting",
                "name": r.name,
                "query": r.expr,
                "duration": r.for_seconds,
                "keepFiringFor": r.keep_firing_for_seconds,
                "labels": r.labels,
                "annotations": r.annotations,
                "alerts": alerts,
                "state": state,
                "health": if r.last_error.is_some() { "err" } else { "ok" },
                "lastError": r.last_error.clone().unwrap_or_default(),
                "lastEvaluation": now,
                "evaluationTime": 0,
            });
            let key = (r.file.clone(), r.group.clone());
            match by_group.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(rule),
                None => by_group.push((key, vec![rule])),
            }
        }
        for ((file, name), rules) in by_group {
            groups.push(json!({"name": name, "file": file, "interval": 1, "rules": rules}));
        }
        json!({ "groups": groups })
    }

    fn rule_json(&self) -> serde_json::Value {
        let r = &self.rule;
        json!({
            "name": ALERT_NAME,
            "expr": format!(
                "sum by (host) (rate({REQUESTS_METRIC}[{}s])) > {}",
                r.window_seconds, r.threshold_rps
            ),
            "threshold_rps": r.threshold_rps,
            "for_seconds": r.for_seconds,
            "clear_rps": r.clear_rps,
            "window_seconds": r.window_seconds,
        })
    }

    /// The state of `host`'s alert, if it is an agent host.
    pub fn alert_state(&self, host: &str) -> Option<AlertState> {
        self.lock().alerts.get(host).map(|a| a.state())
    }
}

/// The service's routes over `state`, without a socket (for tests and embedding): each
/// request must carry a [`Peer`](crate::Peer) extension, which the TLS listener inserts per
/// connection from the verified client certificate; requests without one get 403.
pub fn app(state: Arc<MonitorState>) -> Router {
    let ingest = Router::new()
        .route("/api/v1/push", post(push))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_agent));
    let admin = Router::new()
        .route("/", get(dashboard))
        .route("/assets/{file}", get(crate::dashboard::asset))
        .route("/api/v1/qps", get(qps))
        .route("/api/v1/qps_range", get(qps_range))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/series", get(series).post(series))
        .route("/api/v1/query", get(prom_query).post(prom_query))
        .route(
            "/api/v1/query_range",
            get(prom_query_range).post(prom_query_range),
        )
        .route("/api/v1/labels", get(prom_labels).post(prom_labels))
        .route("/api/v1/label/{name}/values", get(prom_label_values))
        .route("/api/v1/rules", get(prom_rules))
        .route("/api/v1/status/buildinfo", get(prom_buildinfo))
        .route("/api/v2/silences", get(silences_list).post(silences_add))
        .route(
            "/api/v2/silence/{id}",
            axum::routing::delete(silence_expire).get(silence_get),
        )
        .route("/api/v1/ingest", get(ingest_report))
        .route_layer(middleware::from_fn(require_admin));
    Router::new()
        .merge(ingest)
        .merge(admin)
        .route("/healthz", get(healthz))
        .with_state(state)
}

fn forbidden(msg: &str) -> Response {
    (StatusCode::FORBIDDEN, format!("forbidden: {msg}\n")).into_response()
}

async fn require_agent(
    State(st): State<Arc<MonitorState>>,
    peer: Option<Extension<Peer>>,
    req: Request,
    next: Next,
) -> Response {
    match peer.and_then(|Extension(p)| p.0) {
        Some(Identity::Host(h)) if st.agent_hosts.contains(&h) => next.run(req).await,
        _ => forbidden("only agent hosts may push"),
    }
}

async fn require_admin(peer: Option<Extension<Peer>>, req: Request, next: Next) -> Response {
    match peer.and_then(|Extension(p)| p.0) {
        Some(Identity::Admin) => next.run(req).await,
        _ => forbidden("admin only"),
    }
}

async fn push(
    State(st): State<Arc<MonitorState>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(Identity::Host(host)) = peer.0 else {
        return forbidden("only agent hosts may push");
    };
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("push larger than {MAX_PUSH_BYTES} bytes\n"),
        )
            .into_response()
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_PUSH_BYTES as u64) {
        return too_large();
    }
    let bytes: Bytes = match Limited::new(body, MAX_PUSH_BYTES).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Err(e) => return (StatusCode::BAD_REQUEST, format!("reading body: {e}\n")).into_response(),
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return (StatusCode::BAD_REQUEST, "body is not UTF-8\n").into_response();
    };
    match st.ingest(&host, unix_now(), text) {
        Ok(got) => {
            let refused: BTreeMap<_, _> = got
                .refused
                .iter()
                .map(|(r, (n, _))| (r.as_str(), *n))
                .collect();
            Json(json!({
                "accepted": got.stored,
                "refused": refused,
                "counter_resets": got.resets,
            }))
            .into_response()
        }
        Err(reason) => {
            tracing::debug!("push from {host} rejected: {reason}");
            (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response()
        }
    }
}

async fn qps(State(st): State<Arc<MonitorState>>) -> Json<serde_json::Value> {
    Json(json!({
        "window_seconds": st.rule.window_seconds,
        "hosts": st.qps(unix_now()),
    }))
}

/// Query of `/api/v1/qps_range`; absent parameters take the [`RangeQuery`] defaults.
#[derive(Debug, Deserialize)]
struct RangeParams {
    seconds: Option<u64>,
    step: Option<u64>,
}

/// `GET /api/v1/qps_range?seconds=300&step=1` (admin only): the last `seconds` of each
/// agent host's QPS, one point every `step` seconds, ending now; see
/// [`MonitorState::qps_range`].
///
/// `200` with `{"window_seconds": rule window s, "step_seconds": s, "start": unix s,
/// "end": unix s, "hosts": {"lb-01": [[unix s, requests/s], ...], ...}}` ([`QpsRange`]).
/// `seconds` is `1..=900` (default 300), `step` `1..=60` (default 1), so at most 901 points
/// per host; otherwise, or when a parameter is not an integer, `400` with
/// `{"error": reason}`. Other parameters are ignored.
async fn qps_range(
    State(st): State<Arc<MonitorState>>,
    params: Result<Query<RangeParams>, QueryRejection>,
) -> Response {
    let q = params
        .map_err(|e| RangeError::Malformed(e.body_text()))
        .and_then(|Query(p)| {
            RangeQuery::new(
                p.seconds.unwrap_or(RangeQuery::DEFAULT_SECONDS),
                p.step.unwrap_or(RangeQuery::DEFAULT_STEP_SECONDS),
            )
        });
    match q {
        Ok(q) => Json(st.qps_range(unix_now(), q)).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

/// `GET /api/v1/ingest` (admin only): `{"series_budget": series per host, "hosts":
/// {"lb-01": {"series": n, "rejected_samples": {"non_finite": n, ...}, "counter_resets": n},
/// ...}}`
/// ([`HostIngest`]).
async fn ingest_report(State(st): State<Arc<MonitorState>>) -> Json<serde_json::Value> {
    Json(json!({
        "series_budget": MAX_SERIES_PER_HOST,
        "hosts": st.ingest_stats(),
    }))
}

/// `/api/v1/alerts`: Prometheus' envelope (`status`, `data.alerts[]` with `labels`,
/// `annotations`, `state`, `activeAt`, `value`) plus Rampart's own keys (`rule`, `alerts`
/// per host, `rules`, `active`, `history`, `firewall_drops`) beside it.
async fn alerts(State(st): State<Arc<MonitorState>>) -> Json<serde_json::Value> {
    let mut doc = st.alerts_json();
    let prom: Vec<serde_json::Value> = doc["active"]
        .as_array()
        .map(|a| a.iter().map(prom_alert).collect())
        .unwrap_or_default();
    doc["status"] = json!("success");
    doc["data"] = json!({ "alerts": prom });
    Json(doc)
}

/// One entry of `active` as a Prometheus alert.
fn prom_alert(a: &serde_json::Value) -> serde_json::Value {
    let labels = if a["labels"].is_object() {
        a["labels"].clone()
    } else {
        json!({
            "alertname": a["alert"],
            "host": a["host"],
            "instance": a["host"],
            "job": crate::store::JOB,
        })
    };
    let annotations = if a["annotations"].is_object() {
        a["annotations"].clone()
    } else {
        json!({})
    };
    json!({
        "labels": labels,
        "annotations": annotations,
        "state": a["state"],
        "activeAt": crate::notify::rfc3339(a["since"].as_f64().unwrap_or(0.0)),
        "value": promapi::fmt_value(a["value"].as_f64().unwrap_or(f64::NAN)),
    })
}

/// `/api/v1/series`: with `match[]` (or without `name`), Prometheus' series endpoint;
/// with `name=` (and optional `host=`), the stored samples of the last 15 minutes of the
/// series with that name: `{"series":[{"name","host","labels","samples":[[t, v], ...]}]}`.
async fn series(
    State(st): State<Arc<MonitorState>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let p = match promapi::Params::from_request(&method, &uri, &body) {
        Ok(p) => p,
        Err(e) => return promapi::bad(&e),
    };
    let now = unix_now();
    let Some(name) = p.get("name").filter(|_| p.get("match[]").is_none()) else {
        return promapi::series(|since| st.lock().store.all_series_labels(since), &p, now);
    };
    let inner = st.lock();
    let series: Vec<_> = inner
        .store
        .series(name, p.get("host"))
        .into_iter()
        .map(|s| {
            let labels: BTreeMap<_, _> = s.labels.iter().cloned().collect();
            let samples: Vec<[f64; 2]> = s
                .samples
                .between(now - RangeQuery::MAX_SECONDS as f64, now)
                .map(|(t, v)| [t, v])
                .collect();
            json!({ "name": name, "host": s.host, "labels": labels, "samples": samples })
        })
        .collect();
    Json(json!({ "series": series })).into_response()
}

/// `GET|POST /api/v1/query` (Prometheus instant query).
async fn prom_query(
    State(st): State<Arc<MonitorState>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    match promapi::Params::from_request(&method, &uri, &body) {
        Ok(p) => promapi::instant_query(&st.lock().store, &p, unix_now()),
        Err(e) => promapi::bad(&e),
    }
}

/// `GET|POST /api/v1/query_range` (Prometheus range query).
async fn prom_query_range(
    State(st): State<Arc<MonitorState>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    match promapi::Params::from_request(&method, &uri, &body) {
        Ok(p) => promapi::range_query(&st.lock().store, &p),
        Err(e) => promapi::bad(&e),
    }
}

/// `GET|POST /api/v1/labels`.
async fn prom_labels(
    State(st): State<Arc<MonitorState>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    match promapi::Params::from_request(&method, &uri, &body) {
        Ok(p) => promapi::labels(|s| st.lock().store.all_series_labels(s), &p, unix_now()),
        Err(e) => promapi::bad(&e),
    }
}

/// `GET /api/v1/label/<name>/values`.
async fn prom_label_values(
    State(st): State<Arc<MonitorState>>,
    Path(name): Path<String>,
    uri: Uri,
) -> Response {
    match promapi::Params::from_request(&Method::GET, &uri, &Bytes::new()) {
        Ok(p) => promapi::label_values(
            |s| st.lock().store.all_series_labels(s),
            &name,
            &p,
            unix_now(),
        ),
        Err(e) => promapi::bad(&e),
    }
}

/// `GET /api/v1/rules`: every rule as a Prometheus alerting rule in one group.
async fn prom_rules(State(st): State<Arc<MonitorState>>) -> Response {
    promapi::success(st.rules_json())
}

/// `GET /api/v2/silences` (Alertmanager v2): every silence, `gettableSilence` shape.
async fn silences_list(State(st): State<Arc<MonitorState>>) -> Response {
    let list = st
        .silences
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .list(unix_now());
    Json(list).into_response()
}

/// `GET /api/v2/silence/{id}`.
async fn silence_get(State(st): State<Arc<MonitorState>>, Path(id): Path<String>) -> Response {
    let list = st
        .silences
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .list(unix_now());
    match list.into_iter().find(|s| s["id"] == id.as_str()) {
        Some(s) => Json(s).into_response(),
        None => (StatusCode::NOT_FOUND, format!("silence {id} not found\n")).into_response(),
    }
}

/// `POST /api/v2/silences` with a `postableSilence`: `200 {"silenceID": id}`, or `400`
/// with the reason.
async fn silences_add(State(st): State<Arc<MonitorState>>, body: Bytes) -> Response {
    let post: crate::silence::PostableSilence = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let added = st
        .silences
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .add(post, unix_now());
    match added {
        Ok(id) => {
            tracing::info!("silence {id} added");
            persist_silences(&st).await;
            Json(json!({ "silenceID": id })).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

/// `DELETE /api/v2/silence/{id}`: expires it now; `404` when unknown.
async fn silence_expire(State(st): State<Arc<MonitorState>>, Path(id): Path<String>) -> Response {
    let found = st
        .silences
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .expire(&id, unix_now());
    if found {
        tracing::info!("silence {id} expired");
        persist_silences(&st).await;
        StatusCode::OK.into_response()
    } else {
        (StatusCode::NOT_FOUND, format!("silence {id} not found\n")).into_response()
    }
}

/// Writes the silences file after a change; a failure is logged (the change holds in
/// memory and is written with the next one).
async fn persist_silences(st: &Arc<MonitorState>) {
    let st = st.clone();
    match tokio::task::spawn_blocking(move || st.save_silences()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("writing the silences file: {e}"),
        Err(e) => tracing::warn!("writing the silences file: {e}"),
    }
}

async fn prom_buildinfo() -> Response {
    promapi::buildinfo()
}

async fn healthz(peer: Option<Extension<Peer>>) -> Response {
    match peer.and_then(|Extension(p)| p.0) {
        Some(_) => "ok\n".into_response(),
        None => forbidden("no client identity"),
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn rule() -> AlertRule {
        AlertRule {
            clear_for_seconds: 0,
            threshold_rps: 5.0,
            for_seconds: 2,
            clear_rps: 2.0,
            window_seconds: 4,
        }
    }

    fn state() -> Arc<MonitorState> {
        Arc::new(MonitorState::new(
            rule(),
            vec!["lb-01".into(), "web-01".into()],
        ))
    }

    fn req(method: &str, uri: &str, peer: Option<Identity>, body: &str) -> Request {
        let mut r = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_string()))
            .unwrap();
        r.extensions_mut().insert(Peer(peer));
        r
    }

    async fn status(st: &Arc<MonitorState>, r: Request) -> StatusCode {
        app(st.clone()).oneshot(r).await.unwrap().status()
    }

    #[tokio::test]
    async fn routes_authorise_by_identity() {
        let st = state();
        let lb = Some(Identity::Host("lb-01".into()));
        let body = "rampart_http_requests_total{code=\"2xx\"} 1\n";
        assert_eq!(
            status(&st, req("POST", "/api/v1/push", lb.clone(), body)).await,
            StatusCode::OK
        );
        for who in [
            Some(Identity::Admin),
            Some(Identity::Host("mon-01".into())),
            None,
        ] {
            assert_eq!(
                status(&st, req("POST", "/api/v1/push", who, body)).await,
                StatusCode::FORBIDDEN
            );
        }
        assert_eq!(
            status(&st, req("POST", "/api/v1/push", lb.clone(), "garbage\n")).await,
            StatusCode::BAD_REQUEST
        );
        let big = "x".repeat(MAX_PUSH_BYTES + 1);
        assert_eq!(
            status(&st, req("POST", "/api/v1/push", lb.clone(), &big)).await,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        for path in [
            "/",
            "/api/v1/qps",
            "/api/v1/qps_range",
            "/api/v1/alerts",
            "/api/v1/series?name=x",
            "/api/v1/ingest",
        ] {
            assert_eq!(
                status(&st, req("GET", path, Some(Identity::Admin), "")).await,
                StatusCode::OK
            );
            assert_eq!(
                status(&st, req("GET", path, lb.clone(), "")).await,
                StatusCode::FORBIDDEN
            );
        }
        assert_eq!(
            status(&st, req("GET", "/healthz", lb, "")).await,
            StatusCode::OK
        );
    }

    /// lb-01 pushes every second from `T0` to `T0 + 60`: 2 requests/s until `T0 + 30`,
    /// then 10 requests/s. The rule's window is 4 s.
    const T0: f64 = 1_000.0;

    fn state_with_a_rate_change() -> Arc<MonitorState> {
        let st = state();
        let mut count = 0.0;
        for i in 0..=60 {
            if i > 0 {
                count += if i <= 30 { 2.0 } else { 10.0 };
            }
            let body = format!("rampart_http_requests_total{{code=\"2xx\"}} {count}\n");
            st.ingest("lb-01", T0 + f64::from(i), &body).unwrap();
        }
        st
    }

    #[test]
    fn qps_range_follows_the_counter_and_omits_unknown_points() {
        let st = state_with_a_rate_change();
        let end = T0 + 60.0;
        // 90 s back: the first 31 times are before lb-01's second push.
        let r = st.qps_range(end, RangeQuery::new(90, 1).unwrap());
        assert_eq!((r.window_seconds, r.step_seconds), (4, 1));
        assert_eq!((r.start, r.end), (T0 - 30.0, end));
        let lb = &r.hosts["lb-01"];
        let times: Vec<f64> = lb.iter().map(|p| p[0]).collect();
        let want: Vec<f64> = (1..=60).map(|i| T0 + f64::from(i)).collect();
        assert_eq!(times, want, "one point per second from the second push on");
        for &[t, qps] in lb {
            let expected = if t <= T0 + 30.0 {
                2.0
            } else if t >= T0 + 34.0 {
                10.0
            } else {
                // the window straddles the change
                continue;
            };
            assert!((qps - expected).abs() < 1e-9, "qps {qps} at {t}");
        }
        let [_, ramp] = lb[31];
        assert!(ramp > 2.0 && ramp < 10.0, "{ramp}");
        // the newest point is what /api/v1/qps reports at the same time
        assert_eq!(Some(lb[59][1]), st.qps(end)["lb-01"].qps);
        // web-01 never pushed: no points, not zeros
        assert!(r.hosts["web-01"].is_empty());

        // every 5 s: end, end - 5, ... end - 60 = T0, where one push is too few
        let r = st.qps_range(end, RangeQuery::new(60, 5).unwrap());
        let times: Vec<f64> = r.hosts["lb-01"].iter().map(|p| p[0]).collect();
        let want: Vec<f64> = (1..=12).map(|i| T0 + f64::from(5 * i)).collect();
        assert_eq!(times, want);

        let doc = serde_json::to_value(&r).unwrap();
        assert_eq!(doc["step_seconds"], 5);
        assert_eq!(doc["hosts"]["lb-01"][11], json!([end, 10.0]));
        assert_eq!(doc["hosts"]["web-01"], json!([]));
    }

    #[test]
    fn qps_range_parameters_are_bounded() {
        assert_eq!(RangeQuery::new(0, 1), Err(RangeError::Seconds(0)));
        assert_eq!(RangeQuery::new(901, 1), Err(RangeError::Seconds(901)));
        assert_eq!(RangeQuery::new(300, 0), Err(RangeError::Step(0)));
        assert_eq!(RangeQuery::new(300, 61), Err(RangeError::Step(61)));
        assert_eq!(RangeQuery::new(1, 60).unwrap().points(), 1);
        let widest = RangeQuery::new(RangeQuery::MAX_SECONDS, 1).unwrap();
        assert_eq!(widest.points(), 901);
        assert!(widest.points() <= RangeQuery::MAX_POINTS);
        let st = state_with_a_rate_change();
        let r = st.qps_range(T0 + 60.0, widest);
        assert_eq!(r.hosts["lb-01"].len(), 60);
    }

    #[tokio::test]
    async fn qps_range_route_validates_and_is_admin_only() {
        let st = state_with_a_rate_change();
        let get = |uri: &str, who: Option<Identity>| {
            let (st, r) = (st.clone(), req("GET", uri, who, ""));
            async move {
                let resp = app(st).oneshot(r).await.unwrap();
                let code = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (
                    code,
                    serde_json::from_slice::<serde_json::Value>(&body).ok(),
                )
            }
        };
        let admin = Some(Identity::Admin);
        // The store's samples are at T0..T0+60, long before the request's clock: no points.
        let (code, doc) = get("/api/v1/qps_range", admin.clone()).await;
        assert_eq!(code, StatusCode::OK);
        let doc = doc.unwrap();
        assert_eq!(doc["window_seconds"], 4);
        assert_eq!(doc["step_seconds"], RangeQuery::DEFAULT_STEP_SECONDS);
        let span = doc["end"].as_f64().unwrap() - doc["start"].as_f64().unwrap();
        assert_eq!(span, RangeQuery::DEFAULT_SECONDS as f64);
        assert_eq!(doc["hosts"]["lb-01"], json!([]));
        for (query, needle) in [
            ("seconds=0", "seconds must be"),
            ("seconds=901&step=1", "seconds must be"),
            ("step=61", "step must be"),
            ("step=0", "step must be"),
            ("seconds=abc", "seconds"),
            ("seconds=-5", "seconds"),
            ("seconds=1.5", "seconds"),
        ] {
            let (code, doc) = get(&format!("/api/v1/qps_range?{query}"), admin.clone()).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{query}");
            let reason = doc.as_ref().and_then(|d| d["error"].as_str()).unwrap_or("");
            assert!(reason.contains(needle), "{query}: {doc:?}");
        }
        for who in [Some(Identity::Host("lb-01".into())), None] {
            let (code, _) = get("/api/v1/qps_range?seconds=60", who).await;
            assert_eq!(code, StatusCode::FORBIDDEN);
        }
    }

    #[test]
    fn evaluation_fires_and_resolves_with_history() {
        let st = state();
        let push = |t: f64, v: f64| {
            st.ingest(
                "lb-01",
                t,
                &format!("rampart_http_requests_total{{code=\"2xx\"}} {v}\n"),
            )
            .unwrap();
        };
        let t0 = 1_000.0;
        // 10 requests/s for 6 s
        for i in 0..=6 {
            let t = t0 + f64::from(i);
            push(t, 10.0 * f64::from(i));
            st.evaluate(t);
        }
        assert_eq!(st.alert_state("lb-01"), Some(AlertState::Firing));
        // idle: the counter stays put, the rate falls to 0 once the window has passed
        for i in 7..=14 {
            let t = t0 + f64::from(i);
            push(t, 60.0);
            st.evaluate(t);
        }
        assert_eq!(st.alert_state("lb-01"), Some(AlertState::Inactive));
        let doc = st.alerts_json();
        let events: Vec<_> = doc["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["event"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(events, ["firing", "resolved"]);
        // web-01 never pushed: stale, no alert
        let q = st.qps(t0 + 14.0);
        assert!(q["web-01"].stale && q["web-01"].qps.is_none());
        assert!(!q["lb-01"].stale);
        assert_eq!(q["lb-01"].qps, Some(0.0));
        // lb-01 stops pushing: stale after 3 s
        assert!(st.qps(t0 + 18.0)["lb-01"].stale);
    }

    #[test]
    fn a_surge_of_firewall_drops_fires_its_own_alert_and_resolves() {
        let st = MonitorState::new(rule(), vec!["lb-01".into(), "web-01".into()]).with_drop_rule(
            AlertRule {
                clear_for_seconds: 0,
                threshold_rps: 50.0,
                for_seconds: 2,
                clear_rps: 40.0,
                window_seconds: 4,
            },
        );
        let push = |t: f64, drops: f64| {
            let text = format!(
                "rampart_http_requests_total{{code=\"2xx\"}} 1\n\
                 rampart_firewall_dropped_packets_total{{reason=\"policy\"}} {drops}\n\
                 rampart_firewall_dropped_packets_total{{reason=\"rate\"}} 0\n"
            );
            st.ingest("web-01", t, &text).unwrap();
        };
        let t0 = 5_000.0;
        // 100 dropped packets a second for 6 s, then none for 8 s.
        for i in 0..=14 {
            let t = t0 + f64::from(i);
            push(t, 100.0 * f64::from(i.min(6)));
            st.evaluate(t);
        }
        let doc = st.alerts_json();
        let events: Vec<(String, String, String)> = doc["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["alert"].as_str().unwrap().to_string(),
                    h["host"].as_str().unwrap().to_string(),
                    h["event"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let drop = |e: &str| {
            (
                DROP_ALERT_NAME.to_string(),
                "web-01".to_string(),
                e.to_string(),
            )
        };
        assert_eq!(events, [drop("firing"), drop("resolved")], "{doc}");
        assert_eq!(doc["firewall_drops"]["rule"]["threshold_pps"], 50.0);
        // the QPS rule saw 0 requests/s and stayed quiet
        assert_eq!(st.alert_state("web-01"), Some(AlertState::Inactive));
    }

    #[test]
    fn a_restarted_monitor_keeps_its_history_from_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("monitor.snapshot");
        let st = state();
        let t0 = unix_now() - 20.0;
        for i in 0..=10 {
            let t = t0 + f64::from(i);
            st.ingest(
                "lb-01",
                t,
                &format!("rampart_http_requests_total{{code=\"2xx\"}} {}\n", 7 * i),
            )
            .unwrap();
        }
        let before = st.qps(t0 + 10.0)["lb-01"].qps;
        assert_eq!(before, Some(7.0));
        st.snapshot(&path).unwrap();

        let again = state();
        assert_eq!(again.restore(&path, unix_now()).unwrap(), Some(1));
        assert_eq!(again.qps(t0 + 10.0)["lb-01"].qps, before);
        // No snapshot: nothing restored; a damaged one: an error, the store stays empty.
        assert_eq!(
            again.restore(&dir.path().join("none"), unix_now()).unwrap(),
            None
        );
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&path, bytes).unwrap();
        let third = state();
        assert!(third.restore(&path, unix_now()).is_err());
        assert!(third.qps(t0 + 10.0)["lb-01"].qps.is_none());
    }

    #[test]
    fn host_down_backend_down_and_site_unavailable_fire_and_resolve() {
        let st = MonitorState::new(rule(), vec!["lb-01".into(), "web-01".into()])
            .with_rules(default_rules());
        let t0 = unix_now();
        let push = |t: f64, host: &str, up: [u8; 2]| {
            let text = format!(
                "rampart_http_requests_total{{code=\"2xx\"}} 1\n\
                 rampart_backend_up{{backend=\"web-01\"}} {}\n\
                 rampart_backend_up{{backend=\"web-02\"}} {}\n",
                up[0], up[1]
            );
            let text = if host == "lb-01" {
                text
            } else {
                "rampart_http_requests_total{code=\"2xx\"} 1\n".to_string()
            };
            st.ingest(host, t, &text).unwrap();
        };
        let active = |st: &MonitorState| -> Vec<(String, String)> {
            let doc = st.alerts_json();
            let mut v: Vec<(String, String)> = doc["active"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["state"] == "firing")
                .map(|a| {
                    (
                        a["alert"].as_str().unwrap().to_string(),
                        a["host"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            v.sort();
            v
        };
        let pair = |a: &str, h: &str| (a.to_string(), h.to_string());
        // Both hosts push every second, all backends up: nothing fires.
        for i in 0..4 {
            let t = t0 + f64::from(i);
            push(t, "lb-01", [1, 1]);
            push(t, "web-01", [1, 1]);
            st.evaluate(t);
        }
        assert_eq!(active(&st), vec![]);
        // web-01 stops pushing; lb-01 marks web-01 down, then both.
        for i in 4..12 {
            let t = t0 + f64::from(i);
            push(t, "lb-01", [0, 1]);
            st.evaluate(t);
        }
        assert_eq!(
            active(&st),
            vec![pair("BackendDown", "lb-01")],
            "web-01 has been silent 8 s: not yet down"
        );
        for i in 12..20 {
            let t = t0 + f64::from(i);
            push(t, "lb-01", [0, 0]);
            st.evaluate(t);
        }
        assert_eq!(
            active(&st),
            vec![
                pair("BackendDown", "lb-01"),
                pair("HostDown", "web-01"),
                pair("SiteUnavailable", "lb-01")
            ]
        );
        // Everything back.
        for i in 20..24 {
            let t = t0 + f64::from(i);
            push(t, "lb-01", [1, 1]);
            push(t, "web-01", [1, 1]);
            st.evaluate(t);
        }
        assert_eq!(active(&st), vec![]);
        let names: Vec<String> = st.alerts_json()["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["HostDown", "BackendDown", "SiteUnavailable"]);
    }

    #[test]
    fn a_backend_removed_from_the_pushes_resolves_backend_down() {
        let st = MonitorState::new(rule(), vec!["lb-01".into()]).with_rules(default_rules());
        let t0 = unix_now();
        let firing = |st: &MonitorState| -> Vec<String> {
            st.alerts_json()["active"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["state"] == "firing")
                .map(|a| a["alert"].as_str().unwrap().to_string())
                .collect()
        };
        // web-02 is down...
        for i in 0..10 {
            let t = t0 + f64::from(i);
            st.ingest(
                "lb-01",
                t,
                "rampart_backend_up{backend=\"web-01\"} 1\n\
                 rampart_backend_up{backend=\"web-02\"} 0\n",
            )
            .unwrap();
            st.evaluate(t);
        }
        assert_eq!(firing(&st), ["BackendDown"]);
        // ...then a reload removes it: its series leaves the pushes, its last sample
        // (0) is no longer a down backend.
        for i in 10..25 {
            let t = t0 + f64::from(i);
            st.ingest("lb-01", t, "rampart_backend_up{backend=\"web-01\"} 1\n")
                .unwrap();
            st.evaluate(t);
        }
        assert_eq!(firing(&st), Vec::<String>::new());
    }

    /// lb-01's push at `t`: its start time (when given) and its requests counter.
    fn body(started: Option<f64>, requests: &str) -> String {
        let mut b = format!("rampart_http_requests_total{{code=\"2xx\"}} {requests}\n");
        if let Some(s) = started {
            b.push_str(&format!("process_start_time_seconds {s}\n"));
        }
        b
    }

    async fn push_as(st: &Arc<MonitorState>, host: &str, text: String) -> serde_json::Value {
        let r = req(
            "POST",
            "/api/v1/push",
            Some(Identity::Host(host.into())),
            &text,
        );
        let resp = app(st.clone()).oneshot(r).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{text}");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// A genuine agent counts 1 request/s; between its pushes a forger with the same
    /// identity pushes NaN, ±Inf, 1e300 and negative counters. Before ingest refused them
    /// each of these took the 4 s rate far above the rule's 5 requests/s; now the stored
    /// rate stays at 1/s and the alert never leaves `inactive`. (A counter that goes down
    /// is a reset, as in Prometheus, so a pusher holding a host's certificate can still
    /// move that host's rate, as it could by counting faster; the certificate is the
    /// boundary.)
    #[test]
    fn forged_counters_cannot_fire_the_qps_alert() {
        let st = state();
        let started = Some(500.0);
        let forgeries: [(&str, Option<f64>); 5] = [
            ("NaN", started),
            ("+Inf", started),
            ("-Inf", None),
            ("1e300", Some(400.0)),
            ("-1000", started),
        ];
        let mut count = 1_000.0;
        for i in 0..=20 {
            let t = T0 + f64::from(i);
            count += 1.0;
            st.ingest("lb-01", t, &body(started, &count.to_string()))
                .unwrap();
            if let Some((value, forged_start)) = forgeries.get(i as usize % 10) {
                let got = st
                    .ingest("lb-01", t + 0.5, &body(*forged_start, value))
                    .unwrap();
                assert_eq!(got.refused_total(), 1, "{value}");
            }
            st.evaluate(t);
            assert_eq!(st.alert_state("lb-01"), Some(AlertState::Inactive), "t={t}");
            if let Some(qps) = st.qps(t)["lb-01"].qps {
                assert!(qps <= 1.0 + 1e-9, "qps {qps} at t={t}");
            }
        }
        let doc = serde_json::to_value(st.ingest_stats()).unwrap();
        assert_eq!(doc["lb-01"]["series"], 2);
        assert_eq!(
            doc["lb-01"]["rejected_samples"],
            json!({
                "non_finite": 7,
                "counter_too_large": 2,
                "negative_counter": 2,
            })
        );
        assert_eq!(doc["lb-01"]["counter_resets"], 0);
        assert_eq!(
            doc["web-01"],
            json!({ "series": 0, "rejected_samples": {}, "counter_resets": 0 })
        );
    }

    #[tokio::test]
    async fn refusals_are_answered_and_reported() {
        let st = state();
        push_as(&st, "lb-01", body(Some(500.0), "10")).await;
        // Samples are kept at millisecond resolution: a second push within the same
        // millisecond would be out of order.
        tokio::time::sleep(Duration::from_millis(3)).await;
        let doc = push_as(&st, "lb-01", body(Some(500.0), "NaN")).await;
        assert_eq!(
            doc,
            json!({ "accepted": 1, "refused": { "non_finite": 1 }, "counter_resets": 0 })
        );
        let r = req("GET", "/api/v1/ingest", Some(Identity::Admin), "");
        let resp = app(st.clone()).oneshot(r).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(doc["series_budget"], MAX_SERIES_PER_HOST);
        assert_eq!(doc["hosts"]["lb-01"]["rejected_samples"]["non_finite"], 1);
    }

    /// The Prometheus HTTP API: envelopes, result types and errors as documented.
    #[tokio::test]
    async fn the_prometheus_api_answers_like_prometheus() {
        let st = state();
        let t0 = unix_now() - 120.0;
        for i in 0..=100 {
            let t = t0 + f64::from(i);
            let text = format!(
                "rampart_http_requests_total{{code=\"2xx\"}} {}\n\
                 rampart_http_requests_total{{code=\"5xx\"}} {}\n\
                 rampart_backend_up{{backend=\"web-01\"}} 1\n",
                20 * i,
                i
            );
            st.ingest("lb-01", t, &text).unwrap();
        }
        let get = |uri: String, who: Option<Identity>| {
            let (st, r) = (st.clone(), req("GET", &uri, who, ""));
            async move {
                let resp = app(st).oneshot(r).await.unwrap();
                let code = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (
                    code,
                    serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default(),
                )
            }
        };
        let admin = || Some(Identity::Admin);
        let enc = |q: &str| {
            q.replace(' ', "%20")
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace('[', "%5B")
                .replace(']', "%5D")
                .replace('=', "%3D")
                .replace('+', "%2B")
        };
        let at = t0 + 100.0;
        let (code, doc) = get(
            format!(
                "/api/v1/query?query={}&time={at}",
                enc("sum by (instance) (rate(rampart_http_requests_total[30s]))")
            ),
            admin(),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{doc}");
        assert_eq!(doc["status"], "success");
        assert_eq!(doc["data"]["resultType"], "vector");
        let r = &doc["data"]["result"][0];
        assert_eq!(r["metric"], json!({"instance": "lb-01"}));
        assert_eq!(r["value"][0].as_f64(), Some((at * 1000.0).round() / 1000.0));
        let qps: f64 = r["value"][1].as_str().unwrap().parse().unwrap();
        assert!((qps - 21.0).abs() < 1e-6, "{qps}");
        // a scalar
        let (_, doc) = get(
            format!("/api/v1/query?query={}&time={at}", enc("1 + 1")),
            admin(),
        )
        .await;
        assert_eq!(
            doc["data"],
            json!({"resultType": "scalar", "result": [(at * 1000.0).round() / 1000.0, "2"]})
        );
        // a range: one point every 10 s over 60 s
        let (code, doc) = get(
            format!(
                "/api/v1/query_range?query={}&start={}&end={at}&step=10s",
                enc("rampart_backend_up"),
                at - 60.0
            ),
            admin(),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{doc}");
        assert_eq!(doc["data"]["resultType"], "matrix");
        let r = &doc["data"]["result"][0];
        assert_eq!(r["metric"]["__name__"], "rampart_backend_up");
        assert_eq!(r["metric"]["job"], "rampart");
        assert_eq!(r["values"].as_array().unwrap().len(), 7);
        assert_eq!(r["values"][0][1], "1");
        // series, labels, label values
        let (_, doc) = get(
            format!(
                "/api/v1/series?match[]={}",
                enc(r#"rampart_http_requests_total{code="5xx"}"#)
            ),
            admin(),
        )
        .await;
        assert_eq!(
            doc["data"],
            json!([{"__name__": "rampart_http_requests_total", "code": "5xx", "instance": "lb-01", "job": "rampart"}])
        );
        let (_, doc) = get("/api/v1/labels".into(), admin()).await;
        assert_eq!(
            doc["data"],
            json!(["__name__", "backend", "code", "instance", "job"])
        );
        let (_, doc) = get("/api/v1/label/code/values".into(), admin()).await;
        assert_eq!(doc["data"], json!(["2xx", "5xx"]));
        // errors
        for (q, needle) in [
            (
                format!("/api/v1/query?query={}", enc("sum(")),
                "parenthesis",
            ),
            (
                format!("/api/v1/query?query={}", enc("topk(1, rampart_backend_up)")),
                "topk",
            ),
            ("/api/v1/query?query=up&time=yesterday".to_string(), "time"),
            (
                "/api/v1/query_range?query=up&start=0&end=11000&step=1".to_string(),
                "11000",
            ),
            (
                "/api/v1/query_range?query=up&start=0&end=10".to_string(),
                "step",
            ),
            ("/api/v1/series".to_string(), "match[]"),
        ] {
            let (code, doc) = get(q.clone(), admin()).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{q}: {doc}");
            assert_eq!(doc["status"], "error");
            assert_eq!(doc["errorType"], "bad_data");
            assert!(
                doc["error"].as_str().unwrap().contains(needle),
                "{q}: {doc}"
            );
        }
        // rules, alerts, buildinfo; admin only
        let (_, doc) = get("/api/v1/rules".into(), admin()).await;
        assert_eq!(doc["data"]["groups"][0]["rules"][0]["name"], ALERT_NAME);
        assert_eq!(doc["data"]["groups"][0]["rules"][0]["type"], "alerting");
        let (_, doc) = get("/api/v1/alerts".into(), admin()).await;
        assert_eq!(doc["status"], "success");
        assert!(doc["data"]["alerts"].is_array());
        assert!(doc["alerts"].is_array(), "the per-host QPS alerts stay");
        let (_, doc) = get("/api/v1/status/buildinfo".into(), admin()).await;
        assert_eq!(doc["status"], "success");
        let (code, _) = get(
            "/api/v1/query?query=up".into(),
            Some(Identity::Host("lb-01".into())),
        )
        .await;
        assert_eq!(code, StatusCode::FORBIDDEN);
    }

    /// A rule file's alert goes pending, fires after `for`, shows in the alerts, rules and
    /// history, and resolves.
    #[test]
    fn rule_file_alerts_fire_and_resolve() {
        let text = "groups:\n- name: site\n  rules:\n  - alert: TooManyErrors\n    expr: sum by (instance) (rate(rampart_http_requests_total{code=\"5xx\"}[5s])) > 1\n    for: 3s\n    labels: {severity: critical}\n    annotations: {summary: \"errors on {{ $labels.instance }}\"}\n";
        let rules = crate::rules::parse(text, "site.yml").unwrap();
        let st = MonitorState::new(rule(), vec!["lb-01".into(), "web-01".into()])
            .with_alerting_rules(rules);
        let t0 = unix_now() - 100.0;
        let mut errors = 0.0;
        let mut states = Vec::new();
        for i in 0..=30 {
            let t = t0 + f64::from(i);
            // 10 errors/s from 5 to 15 s, none after
            if (5..=15).contains(&i) {
                errors += 10.0;
            }
            st.ingest(
                "web-01",
                t,
                &format!("rampart_http_requests_total{{code=\"5xx\"}} {errors}\n"),
            )
            .unwrap();
            st.evaluate(t);
            let doc = st.alerts_json();
            let a = doc["active"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["alert"] == "TooManyErrors")
                .cloned();
            states.push(
                a.as_ref()
                    .map(|a| a["state"].as_str().unwrap().to_string())
                    .unwrap_or_default(),
            );
            if i == 12 {
                let a = a.unwrap_or_default();
                assert_eq!(a["labels"]["severity"], "critical");
                assert_eq!(a["annotations"]["summary"], "errors on web-01");
                let rules = st.rules_json();
                let g = &rules["groups"][1];
                assert_eq!(
                    (g["name"].as_str(), g["file"].as_str()),
                    (Some("site"), Some("site.yml"))
                );
                assert_eq!(g["rules"][0]["state"], "firing");
            }
        }
        let first_pending = states.iter().position(|s| s == "pending").unwrap();
        let first_firing = states.iter().position(|s| s == "firing").unwrap();
        assert_eq!(first_firing - first_pending, 3, "{states:?}");
        assert_eq!(states.last().map(String::as_str), Some(""), "{states:?}");
        let events: Vec<_> = st.alerts_json()["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["alert"] == "TooManyErrors")
            .map(|h| {
                (
                    h["host"].as_str().unwrap().to_string(),
                    h["event"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            events,
            [
                ("web-01".to_string(), "firing".to_string()),
                ("web-01".to_string(), "resolved".to_string())
            ]
        );
    }

    /// A silence posted through the Alertmanager v2 API suppresses the notification of a
    /// matching alert (the alert still fires); expired, the next one goes out.
    #[tokio::test]
    async fn silences_suppress_notifications() {
        let (notifier, mut rx) = crate::notify::channel();
        let st = Arc::new(
            MonitorState::new(rule(), vec!["lb-01".into(), "web-01".into()])
                .with_notifier(notifier),
        );
        let call = |method: &str, uri: &str, body: String| {
            let (st, r) = (st.clone(), req(method, uri, Some(Identity::Admin), &body));
            async move {
                let resp = app(st).oneshot(r).await.unwrap();
                let code = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (
                    code,
                    serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default(),
                )
            }
        };
        let now = unix_now();
        let silence = json!({
            "matchers": [{"name": "host", "value": "lb-0.", "isRegex": true, "isEqual": true}],
            "startsAt": crate::notify::rfc3339(now - 100.0),
            "endsAt": crate::notify::rfc3339(now + 3_600.0),
            "createdBy": "ops",
            "comment": "load test",
        });
        let (code, doc) = call("POST", "/api/v2/silences", silence.to_string()).await;
        assert_eq!(code, StatusCode::OK, "{doc}");
        let id = doc["silenceID"].as_str().unwrap().to_string();
        let (_, list) = call("GET", "/api/v2/silences", String::new()).await;
        assert_eq!(list[0]["status"]["state"], "active");
        assert_eq!(list[0]["comment"], "load test");
        let (code, _) = call(
            "POST",
            "/api/v2/silences",
            json!({"matchers": []}).to_string(),
        )
        .await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
        // HighQPS fires for lb-01 (10 requests/s above 5): silenced
        let t0 = now - 40.0;
        for i in 0..=6 {
            let t = t0 + f64::from(i);
            st.ingest(
                "lb-01",
                t,
                &format!("rampart_http_requests_total{{code=\"2xx\"}} {}\n", 10 * i),
            )
            .unwrap();
            st.evaluate(t);
        }
        assert_eq!(st.alert_state("lb-01"), Some(AlertState::Firing));
        assert!(rx.try_recv().is_err(), "silenced");
        let (code, _) = call("DELETE", &format!("/api/v2/silence/{id}"), String::new()).await;
        assert_eq!(code, StatusCode::OK);
        let (code, _) = call("DELETE", "/api/v2/silence/unknown", String::new()).await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        // idle: the alert resolves, and the notification is not silenced any more
        // (on the test clock, after the silence ended)
        for i in 7..=20 {
            let t = now + 100.0 + f64::from(i);
            st.ingest("lb-01", t, "rampart_http_requests_total{code=\"2xx\"} 60\n")
                .unwrap();
            st.evaluate(t);
        }
        let n = rx.try_recv().expect("the resolved notification");
        assert_eq!((n.alert.as_str(), n.event), (ALERT_NAME, Event::Resolved));
    }

    /// A push's timestamps are milliseconds: a spooled sample lands at its own second.
    #[test]
    fn push_timestamps_are_milliseconds() {
        let st = state();
        let got = st
            .ingest(
                "lb-01",
                T0 + 30.0,
                &format!(
                    "rampart_http_requests_total{{code=\"2xx\"}} 7 {}\n",
                    (T0 as i64) * 1000 + 500
                ),
            )
            .unwrap();
        assert_eq!(got.stored, 1);
        let inner = st.lock();
        let pts: Vec<_> = inner.store.series(REQUESTS_METRIC, None)[0]
            .samples
            .points()
            .collect();
        assert_eq!(pts, [(T0 + 0.5, 7.0)]);
    }

    /// The agent's node restarts: its start time moves forward and its counter starts
    /// from zero. The decrease is a reset, and the QPS across it is the real one.
    #[test]
    fn a_restarted_agent_resets_its_counter() {
        let st = state();
        for i in 0..=10 {
            let (started, count) = if i <= 5 {
                (500.0, 1_000.0 + 2.0 * f64::from(i))
            } else {
                (T0 + 5.5, 2.0 * f64::from(i - 5))
            };
            let got = st
                .ingest(
                    "lb-01",
                    T0 + f64::from(i),
                    &body(Some(started), &count.to_string()),
                )
                .unwrap();
            assert_eq!((got.stored, got.refused_total()), (2, 0), "push {i}");
        }
        let qps = st.qps(T0 + 10.0)["lb-01"].qps.unwrap();
        assert!((qps - 2.0).abs() < 1e-9, "{qps}");
        let stats = &st.ingest_stats()["lb-01"];
        assert!(stats.rejected_samples.is_empty());
        assert_eq!(stats.counter_resets, 1);
    }
}
