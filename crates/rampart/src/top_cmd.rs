//! `rampart top`: a live terminal view (ratatui) of the running lab from the monitor's API —
//! hosts with their health, QPS, p99 latency and 5xx rate, and the active alerts — redrawn
//! every second until `q`, Esc or Ctrl-C.

use std::time::Duration;

use anyhow::Context;
use lab::StateDir;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::widgets::{Block, Borders, Row, Table};
use ratatui::Frame;
use serde_json::Value;

/// One host row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostRow {
    name: String,
    up: bool,
    qps: Option<f64>,
    p99_seconds: Option<f64>,
    errors_per_second: Option<f64>,
}

/// One active alert.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AlertRow {
    name: String,
    host: String,
    state: String,
    since: String,
}

/// What one frame shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TopData {
    hosts: Vec<HostRow>,
    alerts: Vec<AlertRow>,
    /// The last error talking to the monitor, if any.
    error: Option<String>,
}

/// The PromQL instant queries `top` asks: p99 latency and 5xx per second, by instance.
const P99: &str = "histogram_quantile(0.99, sum by (instance, le) (rate(rampart_http_request_duration_seconds_bucket[30s])))";
const ERRORS: &str = "sum by (instance) (rate(rampart_http_requests_total{code=\"5xx\"}[30s]))";

/// `instance` → value of an instant-query answer (`data.result[]`).
fn by_instance(doc: &Value) -> std::collections::BTreeMap<String, f64> {
    doc["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let name = s["metric"]["instance"].as_str()?.to_string();
            let v: f64 = s["value"][1].as_str()?.parse().ok()?;
            v.is_finite().then_some((name, v))
        })
        .collect()
}

impl TopData {
    /// Builds a frame's data from the monitor's answers: `/api/v1/qps`, `/api/v1/alerts`
    /// and the [`P99`] and [`ERRORS`] instant queries.
    pub(crate) fn from_api(qps: &Value, alerts: &Value, p99: &Value, errors: &Value) -> TopData {
        let (p99, errors) = (by_instance(p99), by_instance(errors));
        let hosts = qps["hosts"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, h)| HostRow {
                name: name.clone(),
                up: h["stale"] == Value::Bool(false),
                qps: h["qps"].as_f64(),
                p99_seconds: p99.get(name).copied(),
                errors_per_second: errors.get(name).copied(),
            })
            .collect();
        let alerts = alerts["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| AlertRow {
                name: a["labels"]["alertname"].as_str().unwrap_or("?").to_string(),
                host: a["labels"]["instance"]
                    .as_str()
                    .or(a["labels"]["host"].as_str())
                    .unwrap_or("")
                    .to_string(),
                state: a["state"].as_str().unwrap_or("?").to_string(),
                since: a["activeAt"].as_str().unwrap_or("").to_string(),
            })
            .collect();
        TopData {
            hosts,
            alerts,
            error: None,
        }
    }
}

fn num(v: Option<f64>, scale: f64, unit: &str) -> String {
    v.map_or("–".into(), |v| format!("{:.2}{unit}", v * scale))
}

/// Draws one frame: the hosts table above the alerts table, an error line when the last
/// poll failed.
pub(crate) fn render(f: &mut Frame, d: &TopData) {
    let [hosts_area, alerts_area] =
        Layout::vertical([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(f.area());
    let head = Style::default().add_modifier(Modifier::BOLD);
    let rows = d.hosts.iter().map(|h| {
        let health = if h.up { "up" } else { "no pushes" };
        Row::new(vec![
            h.name.clone(),
            health.to_string(),
            num(h.qps, 1.0, ""),
            num(h.p99_seconds, 1000.0, " ms"),
            num(h.errors_per_second, 1.0, ""),
        ])
        .style(if h.up {
            Style::default()
        } else {
            Style::default().fg(Color::Red)
        })
    });
    let title = match &d.error {
        Some(e) => format!(" rampart top — hosts — {e} "),
        None => " rampart top — hosts (q quits) ".to_string(),
    };
    let hosts = Table::new(
        rows,
        [
            Constraint::Length(12),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(12),
            Constraint::Length(10),
        ],
    )
    .header(Row::new(vec!["host", "health", "QPS", "p99", "5xx/s"]).style(head))
    .block(Block::default().borders(Borders::ALL).title(title));
    f.render_widget(hosts, hosts_area);
    let rows = d.alerts.iter().map(|a| {
        let color = if a.state == "firing" {
            Color::Red
        } else {
            Color::Yellow
        };
        Row::new(vec![
            a.name.clone(),
            a.host.clone(),
            a.state.clone(),
            a.since.clone(),
        ])
        .style(Style::default().fg(color))
    });
    let alerts = Table::new(
        rows,
        [
            Constraint::Length(18),
            Constraint::Length(12),
            Constraint::Length(10),
            Constraint::Min(10),
        ],
    )
    .header(Row::new(vec!["alert", "host", "state", "since"]).style(head))
    .block(
        Block::default()
            .borders(Borders::ALL)
            .title(format!(" active alerts: {} ", d.alerts.len())),
    );
    f.render_widget(alerts, alerts_area);
}

/// Polls the monitor once.
async fn poll(client: &reqwest::Client, api: &str) -> anyhow::Result<TopData> {
    let get = |path: String| async move {
        let r = client.get(path).send().await?.error_for_status()?;
        anyhow::Ok(r.json::<Value>().await?)
    };
    let q = |expr: &str| format!("{api}query?query={}", urlencode(expr));
    let (qps, alerts, p99, errors) = tokio::try_join!(
        get(format!("{api}qps")),
        get(format!("{api}alerts")),
        get(q(P99)),
        get(q(ERRORS)),
    )?;
    Ok(TopData::from_api(&qps, &alerts, &p99, &errors))
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters kept).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs the live view against the running lab of `state` until `q`, Esc or Ctrl-C.
pub(crate) fn run(state: &StateDir) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let status = rt.block_on(lab::status(state))?;
    let api = status.endpoints.monitor_api.clone();
    let pki = pki::PkiPaths::new(state.root().join("pki"));
    let tls = pki::mtls_client_config(&pki, &pki::Identity::Admin, &[b"http/1.1"])
        .context("loading the admin certificate")?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut terminal = ratatui::init();
    let mut data = TopData::default();
    let result = (|| -> anyhow::Result<()> {
        loop {
            match rt.block_on(poll(&client, &api)) {
                Ok(d) => data = d,
                Err(e) => data.error = Some(format!("{e:#}")),
            }
            terminal.draw(|f| render(f, &data))?;
            if event::poll(Duration::from_secs(1))? {
                if let Event::Key(k) = event::read()? {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use serde_json::json;

    #[test]
    fn one_frame_from_canned_answers() {
        let qps = json!({"window_seconds": 10, "hosts": {
            "lb-01": {"qps": 123.456, "stale": false, "last_push_age_seconds": 0.4},
            "web-01": {"qps": null, "stale": true, "last_push_age_seconds": null}
        }});
        let alerts = json!({"status": "success", "data": {"alerts": [
            {"labels": {"alertname": "HighQPS", "instance": "lb-01"}, "state": "firing",
             "activeAt": "2026-12-03T20:00:00Z", "value": "123.4"}
        ]}});
        let p99 = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"instance": "lb-01"}, "value": [1.0, "0.0125"]}
        ]}});
        let errors = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"instance": "lb-01"}, "value": [1.0, "NaN"]}
        ]}});
        let d = TopData::from_api(&qps, &alerts, &p99, &errors);
        let mut term = Terminal::new(TestBackend::new(80, 16)).unwrap();
        term.draw(|f| render(f, &d)).unwrap();
        let buf = term.backend().buffer();
        let lines: Vec<String> = (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect()
            })
            .collect();
        let screen = lines.join("\n");
        let line = |needle: &str| {
            lines
                .iter()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} on screen:\n{screen}"))
                .clone()
        };
        let lb = line("lb-01    ");
        assert!(
            lb.contains("up") && lb.contains("123.46") && lb.contains("12.50 ms"),
            "{lb}"
        );
        // NaN is no number: shown as a dash.
        assert!(lb.contains('–'), "{lb}");
        assert!(line("web-01").contains("no pushes"));
        let alert = line("HighQPS");
        assert!(
            alert.contains("lb-01") && alert.contains("firing"),
            "{alert}"
        );
        assert!(screen.contains("active alerts: 1"), "{screen}");
    }

    #[test]
    fn query_parameters_are_encoded() {
        assert_eq!(urlencode("a b{c=\"5xx\"}"), "a%20b%7Bc%3D%225xx%22%7D");
    }
}
