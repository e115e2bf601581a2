//! Notifications: every firing and resolved alert is POSTed to each configured webhook as
//! Alertmanager's webhook receiver payload (version 4, see Alertmanager's
//! "configuration / webhook_config"), so anything written for Alertmanager receives
//! Rampart's alerts unchanged.
//!
//! Events go through a bounded queue ([`QUEUE`]); when it is full (every receiver down for a
//! long time) new events are dropped and counted rather than held in memory without bound.
//! Each POST has a 5 s timeout and is tried up to three times (after 1 s and 2 s).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::alert::Event;

/// Events waiting to be delivered, at most.
pub const QUEUE: usize = 1024;

/// One alert transition to notify.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// The rule, e.g. `HighQPS`.
    pub alert: &'static str,
    /// The host the alert is about.
    pub host: String,
    /// Firing or resolved.
    pub event: Event,
    /// The value that caused it.
    pub value: Option<f64>,
    /// Unix seconds when the alert started firing.
    pub starts_at: f64,
    /// Unix seconds of the transition.
    pub at: f64,
}

/// The sending side handed to the monitor's state: never blocks.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Notification>,
    dropped: Arc<AtomicU64>,
}

impl Notifier {
    /// Queues `n`; when the queue is full it is dropped, counted and logged.
    pub fn send(&self, n: Notification) {
        if self.tx.try_send(n).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!("alert notification queue full: {dropped} notifications dropped");
        }
    }

    /// Notifications dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A notifier and the receiving end its delivery task ([`deliver`]) reads.
pub fn channel() -> (Notifier, mpsc::Receiver<Notification>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (
        Notifier {
            tx,
            dropped: Arc::default(),
        },
        rx,
    )
}

/// Delivers queued notifications to every URL in `urls` with `client` until `stop`.
pub async fn deliver(
    mut rx: mpsc::Receiver<Notification>,
    client: reqwest::Client,
    urls: Vec<String>,
    external_url: String,
    stop: CancellationToken,
) {
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv() => match n { Some(n) => n, None => return },
        };
        let body = payload(&n, &external_url);
        for url in &urls {
            let mut delay = Duration::from_secs(1);
            for attempt in 1..=3 {
                let r = client
                    .post(url)
                    .timeout(Duration::from_secs(5))
                    .json(&body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => break,
                    other => {
                        let why = match other {
                            Ok(r) => format!("HTTP {}", r.status()),
                            Err(e) => e.to_string(),
                        };
                        if attempt == 3 {
                            tracing::warn!(
                                "webhook {url}: {} {} of {} not delivered: {why}",
                                n.alert,
                                event_str(n.event),
                                n.host
                            );
                        } else {
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                    }
                }
            }
        }
    }
}

fn event_str(e: Event) -> &'static str {
    match e {
        Event::Firing => "firing",
        Event::Resolved => "resolved",
    }
}

/// RFC 3339 time of Unix seconds `t` (UTC).
pub(crate) fn rfc3339(t: f64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos((t * 1e9) as i128)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "0001-01-01T00:00:00Z".into())
}

/// The Alertmanager webhook payload (version 4) of one notification: one group per alert
/// name and host, one alert in it.
pub fn payload(n: &Notification, external_url: &str) -> serde_json::Value {
    let status = event_str(n.event);
    let labels = json!({
        "alertname": n.alert,
        "host": n.host,
        "severity": if n.alert == "HighQPS" || n.alert == "FirewallDropSurge" { "warning" } else { "critical" },
    });
    let value = n
        .value
        .map_or_else(|| "none".to_string(), |v| format!("{v:.2}"));
    let annotations = json!({
        "summary": format!("{} {status} on {}", n.alert, n.host),
        "value": value,
    });
    let fingerprint = {
        // FNV-1a of the label set: stable per alert name and host.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in format!("{}\u{0}{}", n.alert, n.host).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    };
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{}\", host=\"{}\"}}", n.alert, n.host),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "rampart",
        "groupLabels": {"alertname": n.alert, "host": n.host},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": external_url,
        "alerts": [{
            "status": status,
            "labels": labels,
            "annotations": annotations,
            "startsAt": rfc3339(n.starts_at),
            "endsAt": if n.event == Event::Resolved { rfc3339(n.at) } else { "0001-01-01T00:00:00Z".to_string() },
            "generatorURL": format!("{external_url}api/v1/alerts"),
            "fingerprint": fingerprint,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_alertmanagers() {
        let n = Notification {
            alert: "HostDown",
            host: "web-01".into(),
            event: Event::Resolved,
            value: Some(1.5),
            starts_at: 1_700_000_000.0,
            at: 1_700_000_060.0,
        };
        let p = payload(&n, "https://mon-01:9090/");
        assert_eq!(p["version"], "4");
        assert_eq!(p["status"], "resolved");
        let a = &p["alerts"][0];
        assert_eq!(a["labels"]["alertname"], "HostDown");
        assert_eq!(a["labels"]["host"], "web-01");
        assert_eq!(a["startsAt"], "2023-11-14T22:13:20Z");
        assert_eq!(a["endsAt"], "2023-11-14T22:14:20Z");
        assert_eq!(a["annotations"]["value"], "1.50");
        assert_eq!(a["fingerprint"].as_str().unwrap().len(), 16);
    }
}
