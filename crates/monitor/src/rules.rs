//! Alerting rules in the Prometheus rule-file format (Prometheus docs, "Alerting rules"):
//!
//! ```yaml
//! groups:
//!   - name: site
//!     interval: 1s          # accepted; every rule is evaluated every second
//!     rules:
//!       - alert: HighErrorRate
//!         expr: sum by (instance) (rate(x_total{code="5xx"}[1m])) > 1
//!         for: 30s
//!         keep_firing_for: 10s
//!         labels: {severity: critical}
//!         annotations: {summary: "..."}
//! ```
//!
//! Each result series of `expr` is one alert, labelled with the series' labels (less
//! `__name__`), the rule's `labels` and `alertname`. An alert is *pending* from the first
//! evaluation that returns it, *firing* once it has been returned for `for`, and
//! *resolved* when it is no longer returned — after `keep_firing_for` more when firing (a
//! separate clear time against flapping). Pending alerts that vanish are dropped.
//!
//! Recording rules (`record:`) are refused, as are expressions outside the PromQL subset
//! ([`crate::promql`]): [`load`] checks both, naming the file, group and rule.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::alert::Event;
use crate::promql::{self, Labels, Range, Source, Value};

/// The built-in rules over the agents' series, in the rule-file format (shown in
/// `/api/v1/rules` under the file name `built-in`).
pub const BUILTIN_RULES: &str = include_str!("builtin_rules.yml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    groups: Vec<RawGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    interval: Option<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    alert: Option<String>,
    record: Option<String>,
    expr: serde_yaml::Value,
    #[serde(rename = "for")]
    for_: Option<String>,
    keep_firing_for: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Why a rule file was refused: the file, and what is wrong where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule file {file}: {reason}")]
pub struct RuleError {
    /// The file (or `built-in`).
    pub file: String,
    /// The group and rule, and what is wrong.
    pub reason: String,
}

/// Where an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    /// Returned by the expression for less than `for`.
    Pending,
    /// Returned for `for` or longer (or within `keep_firing_for` of that).
    Firing,
}

impl AlertState {
    /// `pending` or `firing`.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
        }
    }
}

/// One alert of a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveAlert {
    /// Labels: the series' (less `__name__`), the rule's, `alertname`; sorted.
    pub labels: Labels,
    /// Pending or firing.
    pub state: AlertState,
    /// Unix seconds the alert became pending.
    pub active_at: f64,
    /// Unix seconds it started firing.
    pub fired_at: Option<f64>,
    /// Unix seconds the expression last returned it.
    pub last_seen: f64,
    /// The expression's last value for it.
    pub value: f64,
}

impl ActiveAlert {
    /// The value of label `name`, or `""`.
    pub fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// A state change to log, record and notify.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The alert after the change (for a resolved alert, as it was last).
    pub alert: ActiveAlert,
    /// Firing or resolved.
    pub event: Event,
}

/// One alerting rule with its alerts.
#[derive(Debug, Clone)]
pub struct AlertingRule {
    /// The file it came from (`built-in` for [`BUILTIN_RULES`]).
    pub file: String,
    /// Its group.
    pub group: String,
    /// `alert:`.
    pub name: String,
    /// `expr:`.
    pub expr: String,
    /// `for:`, seconds.
    pub for_seconds: f64,
    /// `keep_firing_for:`, seconds.
    pub keep_firing_for_seconds: f64,
    /// `labels:`.
    pub labels: BTreeMap<String, String>,
    /// `annotations:`.
    pub annotations: BTreeMap<String, String>,
    /// Current alerts, by their labels.
    pub alerts: BTreeMap<Labels, ActiveAlert>,
    /// The last evaluation's error, if it failed.
    pub last_error: Option<String>,
}

/// The most alerts one rule keeps; further result series are ignored (and the rule's
/// `last_error` says so).
pub const MAX_ALERTS_PER_RULE: usize = 1_000;

impl AlertingRule {
    /// Evaluates the rule at `now` and returns the alerts that started firing or resolved.
    pub fn evaluate(&mut self, src: &dyn Source, now: f64) -> Vec<Transition> {
        let mut seen: BTreeMap<Labels, f64> = BTreeMap::new();
        self.last_error = None;
        match promql::query(src, &self.expr, Range::instant(now)) {
            Ok((Value::Vector(v), _)) => {
                for s in v {
                    let Some(x) = s.values[0] else { continue };
                    let mut l: BTreeMap<String, String> = s
                        .labels
                        .into_iter()
                        .filter(|(k, _)| k != "__name__")
                        .collect();
                    l.extend(self.labels.clone());
                    l.insert("alertname".into(), self.name.clone());
                    seen.insert(l.into_iter().collect(), x);
                }
            }
            Ok((Value::Scalar(s), _)) => {
                // a scalar result is one alert without series labels when it is not 0
                if s[0] != 0.0 && !s[0].is_nan() {
                    let mut l = self.labels.clone();
                    l.insert("alertname".into(), self.name.clone());
                    seen.insert(l.into_iter().collect(), s[0]);
                }
            }
            Ok(_) => self.last_error = Some("the expression is not a vector".into()),
            Err(e) => self.last_error = Some(e.to_string()),
        }
        let mut out = Vec::new();
        for (labels, value) in seen {
            if !self.alerts.contains_key(&labels) && self.alerts.len() >= MAX_ALERTS_PER_RULE {
                self.last_error = Some(format!("more than {MAX_ALERTS_PER_RULE} alerts"));
                continue;
            }
            let a = self.alerts.entry(labels.clone()).or_insert(ActiveAlert {
                labels,
                state: AlertState::Pending,
                active_at: now,
                fired_at: None,
                last_seen: now,
                value,
            });
            a.last_seen = now;
            a.value = value;
            if a.state == AlertState::Pending && now - a.active_at >= self.for_seconds {
                a.state = AlertState::Firing;
                a.fired_at = Some(now);
                out.push(Transition {
                    alert: a.clone(),
                    event: Event::Firing,
                });
            }
        }
        let keep = self.keep_firing_for_seconds;
        let mut gone = Vec::new();
        for (labels, a) in &self.alerts {
            if a.last_seen < now {
                let held = a.state == AlertState::Firing && now - a.last_seen < keep;
                if !held {
                    gone.push(labels.clone());
                }
            }
        }
        for labels in gone {
            if let Some(a) = self.alerts.remove(&labels) {
                if a.state == AlertState::Firing {
                    out.push(Transition {
                        alert: a,
                        event: Event::Resolved,
                    });
                }
            }
        }
        out
    }
}

/// An annotation with `{{ $labels.NAME }}` and `{{ $value }}` filled in (the two forms
/// of Prometheus' template language Rampart expands; anything else stays as written).
pub fn expand(template: &str, alert: &ActiveAlert) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            out.push_str(&rest[open..]);
            return out;
        };
        let inner = after[..close].trim();
        match inner.strip_prefix("$labels.") {
            Some(name) => out.push_str(alert.label(name)),
            None if inner == "$value" => out.push_str(&alert.value.to_string()),
            None => out.push_str(&rest[open..open + 2 + close + 2]),
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

/// A Prometheus duration (`30s`, `5m`, `1h30m`, `500ms`) in seconds.
fn duration(text: &str) -> Option<f64> {
    promql_parser::util::parse_duration(text)
        .ok()
        .map(|d| d.as_secs_f64())
}

/// Parses and validates rule-file `text` from `file`: every rule an alerting rule with an
/// `alert` name, an `expr` in the supported PromQL subset (checked by evaluating it over
/// no data), and valid `for`/`keep_firing_for` durations.
///
/// Errors: the first problem, naming the group and rule.
pub fn parse(text: &str, file: &str) -> Result<Vec<AlertingRule>, RuleError> {
    let fail = |reason: String| RuleError {
        file: file.to_string(),
        reason,
    };
    let raw: RawFile = serde_yaml::from_str(text).map_err(|e| fail(e.to_string()))?;
    let mut out = Vec::new();
    for g in raw.groups {
        if let Some(i) = &g.interval {
            if duration(i).is_none() {
                return Err(fail(format!(
                    "group {:?}: interval {i:?} is not a duration",
                    g.name
                )));
            }
        }
        for (i, r) in g.rules.into_iter().enumerate() {
            let at = format!(
                "group {:?}, rule {} ({})",
                g.name,
                i + 1,
                r.alert
                    .as_deref()
                    .or(r.record.as_deref())
                    .unwrap_or("unnamed")
            );
            if r.record.is_some() {
                return Err(fail(format!("{at}: recording rules are not supported")));
            }
            let Some(name) = r.alert.filter(|a| !a.is_empty()) else {
                return Err(fail(format!("{at}: `alert` (the alert's name) is missing")));
            };
            let expr = match r.expr {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Number(n) => n.to_string(),
                _ => return Err(fail(format!("{at}: `expr` must be a PromQL expression"))),
            };
            if let Err(e) = promql::query(&NoData, &expr, Range::instant(0.0)) {
                return Err(fail(format!("{at}: expr {expr:?}: {e}")));
            }
            let dur = |v: Option<String>, key: &str| -> Result<f64, RuleError> {
                match v {
                    None => Ok(0.0),
                    Some(t) => duration(&t).ok_or_else(|| {
                        fail(format!(
                            "{at}: `{key}` {t:?} is not a duration like 30s or 5m"
                        ))
                    }),
                }
            };
            out.push(AlertingRule {
                file: file.to_string(),
                group: g.name.clone(),
                name,
                expr,
                for_seconds: dur(r.for_, "for")?,
                keep_firing_for_seconds: dur(r.keep_firing_for, "keep_firing_for")?,
                labels: r.labels,
                annotations: r.annotations,
                alerts: BTreeMap::new(),
                last_error: None,
            });
        }
    }
    Ok(out)
}

/// The built-in rules and those of `files`, in that order.
///
/// Errors: a file cannot be read or is invalid ([`parse`]).
pub fn load(files: &[std::path::PathBuf]) -> Result<Vec<AlertingRule>, RuleError> {
    let mut rules = parse(BUILTIN_RULES, "built-in")?;
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| RuleError {
            file: f.display().to_string(),
            reason: e.to_string(),
        })?;
        rules.extend(parse(&text, &Path::new(f).display().to_string())?);
    }
    Ok(rules)
}

/// A source without series, to validate expressions.
struct NoData;

impl Source for NoData {
    fn select(&self, _: &[&promql_parser::label::Matcher], _: f64, _: f64) -> promql::Selected {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Gauge(f64);

    impl Source for Gauge {
        fn select(
            &self,
            m: &[&promql_parser::label::Matcher],
            start: f64,
            end: f64,
        ) -> promql::Selected {
            let labels = vec![
                ("__name__".to_string(), "temp".to_string()),
                ("instance".to_string(), "web-01".to_string()),
            ];
            if !m.iter().all(|m| {
                m.is_match(
                    labels
                        .iter()
                        .find(|l| l.0 == m.name)
                        .map_or("", |l| l.1.as_str()),
                )
            }) {
                return Vec::new();
            }
            vec![(labels, vec![(start.max(end - 1.0), self.0), (end, self.0)])]
        }
    }

    #[test]
    fn the_built_in_rules_are_valid() {
        let rules = parse(BUILTIN_RULES, "built-in").unwrap();
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        for want in [
            "QPSDroppedToZero",
            "HighErrorRate",
            "HighLatencyP99",
            "DiskNearlyFull",
            "ReplicationBroken",
            "ReplicationLagging",
            "SemiSyncOff",
            "FailoverHappened",
            "CertificateExpiring",
            "BufferBudgetExhausted",
            "ListenerRefusingConnections",
            "ListenerFull",
            "AccessLogDropping",
            "MetricsDropped",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(rules.iter().all(|r| r.annotations.contains_key("summary")));
    }

    /// Certificates ending in 2, 10 and 30 days: CertificateExpiring fires critical for
    /// the first, warning for the second, not for the third, once its `for` has passed.
    #[test]
    fn certificate_expiring_warns_at_14_days_and_is_critical_at_3() {
        let mut rules: Vec<AlertingRule> = parse(BUILTIN_RULES, "built-in")
            .unwrap()
            .into_iter()
            .filter(|r| r.name == "CertificateExpiring")
            .collect();
        assert_eq!(rules.len(), 2);
        let now = 1_800_000_000.0;
        let day = 86_400.0;
        let mut store = crate::store::Store::new();
        for t in [now, now + 30.0, now + 60.0] {
            let samples = [("host/web-01", 2.0), ("www.foobar.com", 10.0), ("ca", 30.0)]
                .iter()
                .map(|(cert, days)| crate::exposition::Sample {
                    name: "rampart_tls_certificate_not_after_timestamp_seconds".into(),
                    labels: vec![
                        ("certificate".into(), cert.to_string()),
                        ("role".into(), "lb".into()),
                    ],
                    value: now + days * day,
                    timestamp: None,
                })
                .collect();
            store.ingest("lb-01", t, samples).unwrap();
        }
        let mut fired = Vec::new();
        for t in [now, now + 30.0, now + 60.0] {
            for r in &mut rules {
                for e in r.evaluate(&store, t) {
                    assert_eq!(e.event, Event::Firing);
                    let get = |k: &str| {
                        e.alert
                            .labels
                            .iter()
                            .find(|l| l.0 == k)
                            .map(|l| l.1.clone())
                            .unwrap()
                    };
                    fired.push((t, get("certificate"), get("severity")));
                }
                assert_eq!(r.last_error, None);
            }
        }
        fired.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
        assert_eq!(
            fired,
            [
                (
                    now + 60.0,
                    "host/web-01".to_string(),
                    "critical".to_string()
                ),
                (
                    now + 60.0,
                    "www.foobar.com".to_string(),
                    "warning".to_string()
                ),
            ]
        );
    }

    /// The saturation alerts: each fires when its counter grows and not while it stays
    /// flat, with the labels its summary names, and resolves once the increase has left
    /// its window and `keep_firing_for` has passed.
    #[test]
    fn saturation_counters_raise_their_alerts() {
        /// Alert, counter, the counter's labels, the expanded summary.
        type Case = (
            &'static str,
            &'static str,
            &'static [(&'static str, &'static str)],
            &'static str,
        );
        let cases: [Case; 5] = [
            (
                "BufferBudgetExhausted",
                "rampart_lb_buffer_exhausted_total",
                &[],
                "lb-01's load balancer ran out of buffer budget (balancer.buffer_total_bytes)",
            ),
            (
                "ListenerRefusingConnections",
                "rampart_listener_limited_connections_total",
                &[("service", "https"), ("reason", "per_source")],
                "https on lb-01 resets new connections (limit per_source)",
            ),
            (
                "ListenerFull",
                "rampart_listener_evicted_connections_total",
                &[("service", "https")],
                "https on lb-01 is full and evicts idle connections",
            ),
            (
                "AccessLogDropping",
                "rampart_lb_access_log_dropped_total",
                &[],
                "lb-01 dropped access log lines (the disk is too slow or full)",
            ),
            (
                "MetricsDropped",
                "rampart_agent_spool_dropped_total",
                &[("target", "monitor")],
                "lb-01 dropped pushes for monitor: its series have a gap",
            ),
        ];
        let all = parse(BUILTIN_RULES, "built-in").unwrap();
        for (name, metric, labels, summary) in cases {
            let mut rule = all.iter().find(|r| r.name == name).unwrap().clone();
            let mut store = crate::store::Store::new();
            let start = 1_800_000_000.0;
            // Flat at 7 for two minutes, one more at +120 s, then flat for an hour.
            let value = |t: f64| if t < start + 120.0 { 7.0 } else { 8.0 };
            let mut events = Vec::new();
            for step in 0..=360 {
                let t = start + f64::from(step) * 10.0;
                let sample = crate::exposition::Sample {
                    name: metric.into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    value: value(t),
                    timestamp: None,
                };
                store.ingest("lb-01", t, vec![sample]).unwrap();
                for e in rule.evaluate(&store, t) {
                    assert_eq!(e.alert.label("instance"), "lb-01", "{name}");
                    for (k, v) in labels {
                        assert_eq!(e.alert.label(k), *v, "{name}");
                    }
                    assert_eq!(e.alert.label("severity"), "warning", "{name}");
                    let text = expand(&rule.annotations["summary"], &e.alert);
                    assert_eq!(text, summary, "{name}");
                    events.push((t - start, e.event));
                }
                assert_eq!(rule.last_error, None, "{name}");
            }
            assert_eq!(events.len(), 2, "{name}: {events:?}");
            assert_eq!(events[0], (120.0, Event::Firing), "{name}");
            assert_eq!(events[1].1, Event::Resolved, "{name}");
            assert!(
                events[1].0 > 120.0 && events[1].0 < 3600.0,
                "{name}: {events:?}"
            );
        }
    }

    #[test]
    fn pending_firing_kept_and_resolved() {
        let text = "groups:\n- name: g\n  interval: 1s\n  rules:\n  - alert: Hot\n    expr: temp > 30\n    for: 3s\n    keep_firing_for: 2s\n    labels: {severity: critical}\n";
        let mut r = parse(text, "t.yml").unwrap().remove(0);
        assert_eq!((r.for_seconds, r.keep_firing_for_seconds), (3.0, 2.0));
        let mut events = Vec::new();
        let mut states = Vec::new();
        for (t, temp) in [
            (0, 40.0),
            (1, 40.0),
            (2, 40.0),
            (3, 40.0),
            (4, 20.0),
            (5, 40.0),
            (6, 20.0),
            (7, 20.0),
            (8, 20.0),
        ] {
            let t = f64::from(t);
            for e in r.evaluate(&Gauge(temp), t) {
                events.push((t, e.event));
            }
            states.push(r.alerts.values().next().map(|a| a.state));
        }
        use AlertState::*;
        assert_eq!(
            states,
            [
                Some(Pending),
                Some(Pending),
                Some(Pending),
                Some(Firing),
                Some(Firing),
                Some(Firing),
                Some(Firing),
                None,
                None
            ]
        );
        assert_eq!(events, [(3.0, Event::Firing), (7.0, Event::Resolved)]);
        let labels = parse(text, "t.yml").unwrap().remove(0);
        let mut labels = labels;
        let got = {
            labels.for_seconds = 0.0;
            labels.evaluate(&Gauge(40.0), 0.0)
        };
        assert_eq!(
            expand(
                "{{ $labels.instance }} at {{$value}} {{ other }}",
                &got[0].alert
            ),
            "web-01 at 40 {{ other }}"
        );
        assert_eq!(
            got[0].alert.labels,
            [
                ("alertname".into(), "Hot".into()),
                ("instance".into(), "web-01".into()),
                ("severity".into(), "critical".into())
            ]
        );
    }

    #[test]
    fn bad_rule_files_name_the_file_and_rule() {
        let bad = |text: &str, needle: &str| {
            let e = parse(text, "conf/site.yml").unwrap_err().to_string();
            assert!(e.contains("conf/site.yml") && e.contains(needle), "{e}");
        };
        let rule = |body: &str| format!("groups:\n- name: g\n  rules:\n  - {body}\n");
        bad(&rule("alert: A\n    expr: sum(up"), "rule 1 (A)");
        bad(&rule("alert: A\n    expr: topk(1, up)"), "topk");
        bad(&rule("record: r\n    expr: up"), "recording rules");
        bad(&rule("alert: A\n    expr: up\n    for: soon"), "`for`");
        bad(&rule("alert: A\n    expr: up\n    unknown: 1"), "unknown");
        bad("groups: 5", "groups");
        assert!(load(&[std::path::PathBuf::from("/nonexistent/rules.yml")])
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/rules.yml"));
    }
}
