//! Interoperation files for a team moving to Prometheus and Grafana (`rampart monitor
//! export DIR`): a `prometheus.yml` scraping every agent of a topology over mutual TLS, a
//! rule file in the Prometheus format holding the built-in alert rules as PromQL, and a
//! Grafana dashboard (JSON model, schema 39) of the same overview the monitor's dashboard
//! shows.
//!
//! Formats: Prometheus "Configuration" (`scrape_configs`, `tls_config`, `rule_files`),
//! "Alerting rules" (`groups`, `alert`, `expr`, `for`, `keep_firing_for`, labels,
//! annotations); Grafana "JSON model". Strings are written YAML double-quoted (JSON string
//! syntax, which YAML 1.2 accepts), so no value can break the file's structure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pki::PkiPaths;
use serde_json::{json, Value};
use topology::{Role, Topology};

use crate::rules::BUILTIN_RULES;

/// The scrape job of the agents (its `job` label).
pub const JOB: &str = "rampart-agent";
/// The files [`export`] writes, in this order.
pub const FILES: [&str; 3] = [
    "prometheus.yml",
    "rampart-rules.yml",
    "grafana-dashboard.json",
];

/// A YAML double-quoted scalar.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `prometheus.yml`: one scrape job over HTTPS with the given client certificate (the
/// agents' `/metrics` answer only the monitor host and the admin), one target per agent
/// host at its topology address with its `instance` label set to the host's name (as
/// the monitor's own series carry it, so the same PromQL, rules and dashboards work on
/// both; Prometheus keeps a target label named `instance` instead of the address), the
/// rule file, and a scrape and evaluation interval of `interval_seconds`.
pub fn prometheus_yml(
    t: &Topology,
    pki: &PkiPaths,
    cert: &Path,
    key: &Path,
    interval_seconds: u64,
) -> String {
    let mut y = String::new();
    y.push_str("# Prometheus configuration for the Rampart topology: every agent's /metrics.\n");
    y.push_str("# Run Prometheus on the monitor host: agents accept scrapes from it only.\n");
    y.push_str(&format!(
        "global:\n  scrape_interval: {interval_seconds}s\n  evaluation_interval: {interval_seconds}s\n"
    ));
    y.push_str(&format!("rule_files:\n  - {}\n", q(FILES[1])));
    y.push_str(&format!("scrape_configs:\n  - job_name: {}\n", q(JOB)));
    y.push_str("    scheme: https\n    metrics_path: /metrics\n    tls_config:\n");
    y.push_str(&format!(
        "      ca_file: {}\n      cert_file: {}\n      key_file: {}\n",
        q(&pki.ca_cert().display().to_string()),
        q(&cert.display().to_string()),
        q(&key.display().to_string())
    ));
    y.push_str("    static_configs:\n");
    for h in t.hosts_with(Role::Agent) {
        let target = std::net::SocketAddr::new(h.address, t.ports.agent);
        y.push_str(&format!(
            "      - targets: [{}]\n        labels:\n          instance: {}\n",
            q(&target.to_string()),
            q(&h.name)
        ));
    }
    y
}

/// One alert rule of the rule file.
struct Rule {
    alert: String,
    expr: String,
    for_seconds: u64,
    keep_firing_seconds: u64,
    /// `labels:`: at least `severity`.
    labels: BTreeMap<String, String>,
    /// `annotations:`: at least `summary`.
    annotations: BTreeMap<String, String>,
}

impl Rule {
    /// A rule of the service's own state machines, written out as PromQL: `severity` and a
    /// summary prefixed with the instance.
    fn service(
        alert: &str,
        expr: String,
        for_seconds: u64,
        keep_firing_seconds: u64,
        severity: &str,
        summary: &str,
    ) -> Rule {
        Rule {
            alert: alert.into(),
            expr,
            for_seconds,
            keep_firing_seconds,
            labels: BTreeMap::from([("severity".into(), severity.into())]),
            annotations: BTreeMap::from([(
                "summary".into(),
                format!("{{{{ $labels.instance }}}}: {summary}"),
            )]),
        }
    }
}

/// The built-in alert rules as PromQL over the agents' series (see the module
/// documentation of [`crate::collect`] and the roles' metrics): first the rules the
/// monitor runs as state machines of its own (HighQPS and FirewallDropSurge with the
/// topology's thresholds, BackendDown, SiteUnavailable, and HostDown as Prometheus' `up`),
/// then every rule of [`BUILTIN_RULES`] as it is written there, so the two rule sets
/// cannot drift apart.
fn rules(t: &Topology) -> Vec<Rule> {
    let qps = &t.qps_alert;
    let drops = &t.drop_alert;
    // A rate window holding at least two scrapes.
    let w = |s: u64| format!("{}s", s.max(30));
    let mut rules = vec![
        Rule::service(
            "HighQPS",
            format!(
                "sum by (instance) (rate(rampart_http_requests_total[{}])) > {}",
                w(qps.window_seconds),
                qps.threshold_rps
            ),
            qps.for_seconds,
            qps.clear_for_seconds,
            "warning",
            "QPS above the bound",
        ),
        Rule::service(
            "BackendDown",
            "rampart_backend_up == 0".into(),
            15,
            0,
            "warning",
            "a backend fails its health checks",
        ),
        Rule::service(
            "SiteUnavailable",
            "max by (instance) (rampart_backend_up) == 0".into(),
            5,
            0,
            "critical",
            "no backend of a load balancer is up",
        ),
        Rule::service(
            "HostDown",
            format!("up{{job=\"{JOB}\"}} == 0"),
            30,
            0,
            "critical",
            "an agent does not answer scrapes",
        ),
        Rule::service(
            "FirewallDropSurge",
            format!(
                "sum by (instance) (rate(rampart_firewall_dropped_packets_total[{w}]) or rate(rampart_firewall_connections_total{{verdict=\"refused\"}}[{w}])) > {}",
                drops.threshold_rps,
                w = w(drops.window_seconds)
            ),
            drops.for_seconds,
            drops.clear_for_seconds,
            "warning",
            "firewall drops above the bound",
        ),
    ];
    // The embedded file parses (checked by its own tests); were it ever not to, the
    // export would hold the service's rules only, and promtool's rule count shows it.
    let file = crate::rules::parse(BUILTIN_RULES, "built-in").unwrap_or_default();
    rules.extend(file.into_iter().map(|r| Rule {
        alert: r.name,
        expr: r.expr,
        for_seconds: r.for_seconds as u64,
        keep_firing_seconds: r.keep_firing_for_seconds as u64,
        labels: r.labels,
        annotations: r.annotations,
    }));
    rules
}

/// The rule file (Prometheus alerting-rule format), one group `rampart`.
pub fn rules_yml(t: &Topology) -> String {
    let mut y = String::from("groups:\n  - name: rampart\n    rules:\n");
    for r in rules(t) {
        y.push_str(&format!(
            "      - alert: {}\n        expr: {}\n",
            r.alert,
            q(&r.expr)
        ));
        if r.for_seconds > 0 {
            y.push_str(&format!("        for: {}s\n", r.for_seconds));
        }
        if r.keep_firing_seconds > 0 {
            y.push_str(&format!(
                "        keep_firing_for: {}s\n",
                r.keep_firing_seconds
            ));
        }
        for (key, map) in [("labels", &r.labels), ("annotations", &r.annotations)] {
            y.push_str(&format!("        {key}:\n"));
            for (k, v) in map {
                y.push_str(&format!("          {k}: {}\n", q(v)));
            }
        }
    }
    y
}

/// One dashboard panel: title, Grafana unit, `(PromQL expression, legend)` per query.
pub type Panel = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

/// The Grafana dashboard's panels.
pub fn panels() -> Vec<Panel> {
    vec![
        ("QPS per server", "reqps", vec![(
            "sum by (instance) (rate(rampart_http_requests_total[1m]))",
            "{{instance}}",
        )]),
        ("Latency p50 / p99", "s", vec![
            ("histogram_quantile(0.5, sum by (instance, le) (rate(rampart_http_request_duration_seconds_bucket[1m])))", "p50 {{instance}}"),
            ("histogram_quantile(0.99, sum by (instance, le) (rate(rampart_http_request_duration_seconds_bucket[1m])))", "p99 {{instance}}"),
        ]),
        ("Error ratio (5xx)", "percentunit", vec![(
            "sum by (instance) (rate(rampart_http_requests_total{code=\"5xx\"}[1m])) / sum by (instance) (rate(rampart_http_requests_total[1m]))",
            "{{instance}}",
        )]),
        ("Backends up", "short", vec![("rampart_backend_up", "{{instance}} {{backend}}")]),
        ("CPU busy (cores)", "short", vec![(
            "sum by (instance) (rate(rampart_host_cpu_seconds_total{mode!=\"idle\"}[1m]))",
            "{{instance}}",
        )]),
        ("Memory used", "bytes", vec![(
            "rampart_host_memory_total_bytes - rampart_host_memory_available_bytes",
            "{{instance}}",
        )]),
        ("Disk available", "percentunit", vec![(
            "rampart_host_filesystem_avail_bytes / rampart_host_filesystem_size_bytes",
            "{{instance}} {{mountpoint}}",
        )]),
        ("Firewall drops", "pps", vec![
            ("sum by (instance) (rate(rampart_firewall_dropped_packets_total[1m]))", "kernel {{instance}}"),
            ("sum by (instance) (rate(rampart_firewall_connections_total{verdict=\"refused\"}[1m]))", "refused {{instance}}"),
        ]),
        ("Network", "Bps", vec![
            ("sum by (instance) (rate(rampart_host_network_receive_bytes_total{device!=\"lo\"}[1m]))", "rx {{instance}}"),
            ("sum by (instance) (rate(rampart_host_network_transmit_bytes_total{device!=\"lo\"}[1m]))", "tx {{instance}}"),
        ]),
        ("Replication lag", "s", vec![(
            "max by (instance) (rampart_db_replication_lag_seconds)",
            "{{instance}}",
        )]),
    ]
}

/// The Grafana dashboard JSON model: a Prometheus data-source variable and one time-series
/// panel per entry of [`panels`], two a row, refreshed every 5 s.
pub fn grafana_dashboard() -> Value {
    let panels: Vec<Value> = panels()
        .into_iter()
        .enumerate()
        .map(|(i, (title, unit, targets))| {
            let refs = ["A", "B", "C", "D"];
            json!({
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "gridPos": { "h": 8, "w": 12, "x": (i % 2) * 12, "y": (i / 2) * 8 },
                "datasource": { "type": "prometheus", "uid": "${datasource}" },
                "fieldConfig": { "defaults": { "unit": unit }, "overrides": [] },
                "targets": targets.iter().zip(refs).map(|((expr, legend), r)| json!({
                    "datasource": { "type": "prometheus", "uid": "${datasource}" },
                    "expr": expr,
                    "legendFormat": legend,
                    "refId": r,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "title": "Rampart",
        "uid": "rampart-overview",
        "schemaVersion": 39,
        "version": 1,
        "editable": true,
        "refresh": "5s",
        "time": { "from": "now-1h", "to": "now" },
        "timezone": "browser",
        "tags": ["rampart"],
        "templating": { "list": [{
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
        }]},
        "annotations": { "list": [] },
        "panels": panels,
    })
}

/// Writes [`FILES`] into `dir` (created when missing): Prometheus scrapes with `cert` and
/// `key` (the admin's by default). Returns the paths written.
///
/// Errors: the directory cannot be created or a file written.
pub fn export(
    t: &Topology,
    pki: &PkiPaths,
    cert: &Path,
    key: &Path,
    dir: &Path,
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let dashboard =
        serde_json::to_string_pretty(&grafana_dashboard()).map_err(std::io::Error::other)?;
    let contents = [
        prometheus_yml(t, pki, cert, key, 5),
        rules_yml(t),
        dashboard + "\n",
    ];
    let mut written = Vec::new();
    for (name, text) in FILES.iter().zip(contents) {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn promtool(args: &[&str]) -> Option<(bool, String)> {
        let Some(p) = test_support::find_binary("promtool") else {
            test_support::skip("promtool is not installed (apt-get install prometheus)");
            return None;
        };
        let out = Command::new(p).args(args).output().unwrap();
        Some((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    #[test]
    fn exported_files_pass_promtool() {
        let t = Topology::default_topology();
        let pki = test_support::TestPki::new(t.clone());
        let dir = tempfile::tempdir().unwrap();
        let files = export(
            &t,
            &pki.paths,
            &pki.paths.admin_cert(),
            &pki.paths.admin_key(),
            dir.path(),
        )
        .unwrap();
        assert_eq!(files.len(), 3);
        let yml = std::fs::read_to_string(&files[0]).unwrap();
        for h in ["lb-01", "web-01", "web-02"] {
            assert!(yml.contains(&format!("instance: \"{h}\"")), "{yml}");
        }
        assert!(yml.contains("\"127.80.0.10:9100\""), "{yml}");
        // The dashboard is JSON with a query per panel.
        let dash: Value =
            serde_json::from_str(&std::fs::read_to_string(&files[2]).unwrap()).unwrap();
        assert_eq!(dash["panels"].as_array().unwrap().len(), panels().len());

        let Some((ok, report)) = promtool(&["check", "config", files[0].to_str().unwrap()]) else {
            return;
        };
        assert!(ok, "promtool check config:\n{report}\n{yml}");
        // The rule file holds the service's rules and every rule of the built-in file,
        // under the same names.
        let exported = std::fs::read_to_string(&files[1]).unwrap();
        let built_in = crate::rules::parse(BUILTIN_RULES, "built-in").unwrap();
        assert_eq!(rules(&t).len(), 5 + built_in.len());
        for name in built_in
            .iter()
            .map(|r| r.name.as_str())
            .chain(["HighQPS", "BackendDown", "SiteUnavailable", "HostDown"])
            .chain(["FirewallDropSurge"])
        {
            assert!(
                exported.contains(&format!("- alert: {name}\n")),
                "{name} missing:\n{exported}"
            );
        }
        let (ok, report) = promtool(&["check", "rules", files[1].to_str().unwrap()]).unwrap();
        assert!(ok, "promtool check rules:\n{report}");
        assert!(
            report.contains(&format!("{} rules found", rules(&t).len())),
            "{report}"
        );
        // Every dashboard query parses as PromQL: checked as recording rules.
        let mut rec = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (i, (_, _, targets)) in panels().into_iter().enumerate() {
            for (j, (expr, _)) in targets.into_iter().enumerate() {
                rec.push_str(&format!(
                    "      - record: panel_{i}_{j}\n        expr: {}\n",
                    q(expr)
                ));
            }
        }
        let rec_path = dir.path().join("dashboard-queries.yml");
        std::fs::write(&rec_path, &rec).unwrap();
        let (ok, report) = promtool(&["check", "rules", rec_path.to_str().unwrap()]).unwrap();
        assert!(ok, "dashboard queries:\n{report}\n{rec}");
    }
}
