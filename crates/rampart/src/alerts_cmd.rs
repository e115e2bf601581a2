//! `rampart alerts` and `rampart silence …`: the running lab's monitoring service, read and
//! told with the admin certificate from the state directory (as `rampart status` does).
//! Silences use the service's Alertmanager v2 API (`/api/v2/silences`).

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use lab::StateDir;
use serde_json::{json, Value};

/// `rampart silence` subcommands.
#[derive(Subcommand)]
pub enum SilenceCmd {
    /// Silence the notifications of matching alerts, e.g.
    /// `rampart silence add alertname=HighQPS host=~'web-.*' --for 2h --comment deploy`.
    Add {
        /// Matchers `name=value`, `name!=value`, `name=~regex`, `name!~regex` (all must
        /// match; labels: alertname, host, instance and the rule's labels).
        #[arg(required = true)]
        matchers: Vec<String>,
        /// How long, a duration such as `30m`, `2h`, `1d`.
        #[arg(long = "for")]
        duration: String,
        /// Why.
        #[arg(long)]
        comment: String,
        /// Who (default: $USER).
        #[arg(long)]
        author: Option<String>,
    },
    /// Every silence: id, state, matchers, end, author, comment.
    List {
        /// One JSON array (Alertmanager's gettableSilence objects).
        #[arg(long)]
        json: bool,
    },
    /// End a silence now.
    Expire {
        /// Its id (from `silence list` or `silence add`).
        id: String,
    },
}

/// One matcher as Alertmanager v2 posts it.
pub fn parse_matcher(text: &str) -> anyhow::Result<Value> {
    for (op, is_regex, is_equal) in [
        ("=~", true, true),
        ("!~", true, false),
        ("!=", false, false),
        ("=", false, true),
    ] {
        if let Some((name, value)) = text.split_once(op) {
            let name = name.trim();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                anyhow::bail!("matcher {text:?}: {name:?} is not a label name");
            }
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            return Ok(
                json!({"name": name, "value": value, "isRegex": is_regex, "isEqual": is_equal}),
            );
        }
    }
    anyhow::bail!("matcher {text:?}: write name=value, name!=value, name=~regex or name!~regex")
}

struct Monitor {
    client: reqwest::Client,
    base: String,
}

fn monitor(state: &StateDir) -> anyhow::Result<Monitor> {
    let (_, t) = lab::fw::running(state)?;
    let mon = t.monitor().context("the topology has no monitor host")?;
    let tls = pki::mtls_client_config(&state.pki(), &pki::Identity::Admin, &[b"http/1.1"])
        .context("loading the admin certificate")?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTPS client")?;
    Ok(Monitor {
        client,
        base: format!("https://{}:{}", mon.address, t.ports.ingest),
    })
}

async fn send(req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let resp = req
        .send()
        .await
        .context("reaching the monitoring service")?;
    let code = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !code.is_success() {
        anyhow::bail!("the monitoring service answered {code}: {}", text.trim());
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `rampart alerts [--json]`: the alerts that are pending or firing.
pub fn alerts(state: &StateDir, as_json: bool) -> anyhow::Result<()> {
    let m = monitor(state)?;
    let doc = runtime()?.block_on(send(m.client.get(format!("{}/api/v1/alerts", m.base))))?;
    let alerts = doc["data"]["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&alerts)?);
        return Ok(());
    }
    if alerts.is_empty() {
        println!("no active alerts");
        return Ok(());
    }
    println!(
        "{:<22} {:<10} {:<8} {:<26} {:>12}  labels",
        "alert", "host", "state", "active since", "value"
    );
    for a in &alerts {
        let l = &a["labels"];
        let extra: Vec<String> = l
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| {
                        !matches!(k.as_str(), "alertname" | "host" | "instance" | "job")
                    })
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        let host = l["host"].as_str().or(l["instance"].as_str()).unwrap_or("");
        println!(
            "{:<22} {:<10} {:<8} {:<26} {:>12}  {}",
            l["alertname"].as_str().unwrap_or(""),
            host,
            a["state"].as_str().unwrap_or(""),
            a["activeAt"].as_str().unwrap_or(""),
            a["value"].as_str().unwrap_or(""),
            extra.join(",")
        );
    }
    Ok(())
}

/// `rampart silence add|list|expire`.
pub fn silence(state: &StateDir, cmd: SilenceCmd) -> anyhow::Result<()> {
    let m = monitor(state)?;
    let rt = runtime()?;
    match cmd {
        SilenceCmd::Add {
            matchers,
            duration,
            comment,
            author,
        } => {
            let seconds = topology::parse_duration_seconds(&duration)
                .filter(|s| *s > 0)
                .with_context(|| {
                    format!("--for {duration:?}: write a duration such as 30m or 2h")
                })?;
            let matchers = matchers
                .iter()
                .map(|m| parse_matcher(m))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let author = author
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "rampart".into());
            let body = json!({
                "matchers": matchers,
                "startsAt": rfc3339(now),
                "endsAt": rfc3339(now + seconds),
                "createdBy": author,
                "comment": comment,
            });
            let doc = rt.block_on(send(
                m.client
                    .post(format!("{}/api/v2/silences", m.base))
                    .json(&body),
            ))?;
            println!("{}", doc["silenceID"].as_str().unwrap_or(""));
        }
        SilenceCmd::List { json } => {
            let doc = rt.block_on(send(m.client.get(format!("{}/api/v2/silences", m.base))))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            let list = doc.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no silences");
            }
            for s in list {
                let matchers: Vec<String> = s["matchers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| {
                        let op = match (m["isRegex"].as_bool(), m["isEqual"].as_bool()) {
                            (Some(true), Some(false)) => "!~",
                            (Some(true), _) => "=~",
                            (_, Some(false)) => "!=",
                            _ => "=",
                        };
                        format!(
                            "{}{op}{}",
                            m["name"].as_str().unwrap_or(""),
                            m["value"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                println!(
                    "{}  {:<8} until {}  {}  by {}: {}",
                    s["id"].as_str().unwrap_or(""),
                    s["status"]["state"].as_str().unwrap_or(""),
                    s["endsAt"].as_str().unwrap_or(""),
                    matchers.join(" "),
                    s["createdBy"].as_str().unwrap_or(""),
                    s["comment"].as_str().unwrap_or("")
                );
            }
        }
        SilenceCmd::Expire { id } => {
            rt.block_on(send(
                m.client.delete(format!("{}/api/v2/silence/{id}", m.base)),
            ))?;
            println!("expired {id}");
        }
    }
    Ok(())
}

/// RFC 3339 UTC of Unix seconds (days from the civil calendar, Howard Hinnant's
/// `civil_from_days`).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn matchers_and_times() {
        assert_eq!(
            parse_matcher("host=~web-.*").unwrap(),
            json!({"name": "host", "value": "web-.*", "isRegex": true, "isEqual": true})
        );
        assert_eq!(
            parse_matcher("alertname!=HostDown").unwrap()["isEqual"],
            false
        );
        assert_eq!(parse_matcher("a!~b").unwrap()["isRegex"], true);
        assert_eq!(parse_matcher("host=\"lb-01\"").unwrap()["value"], "lb-01");
        assert!(parse_matcher("nothing").is_err());
        assert!(parse_matcher("=x").is_err());
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
