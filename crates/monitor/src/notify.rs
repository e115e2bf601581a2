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
    pub alert: String,
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

/// When grouped notifications leave (after Alertmanager's route settings, with the
/// group being one alert name on one host, `group_by: [alertname, host]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grouping {
    /// How long a new group waits for more changes before its first notification
    /// (Alertmanager `group_wait`; default 1 s, so one leaves within about 2 s of a rule's
    /// `for` expiring with the 1 s evaluation).
    pub group_wait: Duration,
    /// The least time between two notifications of one group (`group_interval`; default
    /// 2 s): a change sooner waits, and only the latest state is sent.
    pub group_interval: Duration,
    /// How often a still-firing alert is notified again (`repeat_interval`; default 4 h).
    pub repeat_interval: Duration,
}

impl From<topology::AlertGrouping> for Grouping {
    fn from(g: topology::AlertGrouping) -> Grouping {
        Grouping {
            group_wait: Duration::from_secs(g.group_wait_seconds),
            group_interval: Duration::from_secs(g.group_interval_seconds),
            repeat_interval: Duration::from_secs(g.repeat_interval_seconds),
        }
    }
}

impl Default for Grouping {
    fn default() -> Grouping {
        Grouping {
            group_wait: Duration::from_secs(1),
            group_interval: Duration::from_secs(2),
            repeat_interval: Duration::from_secs(4 * 3600),
        }
    }
}

/// The most groups tracked at once; a notification for a new group beyond it is sent at
/// once, ungrouped.
pub const MAX_GROUPS: usize = 10_000;

struct Group {
    latest: Notification,
    /// When the latest change is due to be sent.
    due: Option<tokio::time::Instant>,
    last_sent: Option<(tokio::time::Instant, Event)>,
}

/// The grouping state, on an explicit clock: changes go in with [`Grouper::offer`], due
/// notifications come out of [`Grouper::take_due`].
pub struct Grouper {
    grouping: Grouping,
    groups: std::collections::HashMap<(String, String), Group>,
}

impl Grouper {
    /// No groups yet.
    pub fn new(grouping: Grouping) -> Grouper {
        Grouper {
            grouping,
            groups: Default::default(),
        }
    }

    /// Takes a change at `now`. Returns it back when it must be sent at once (a new group
    /// while [`MAX_GROUPS`] are tracked).
    pub fn offer(&mut self, n: Notification, now: tokio::time::Instant) -> Option<Notification> {
        let key = (n.alert.clone(), n.host.clone());
        if !self.groups.contains_key(&key) && self.groups.len() >= MAX_GROUPS {
            return Some(n);
        }
        let g = self.groups.entry(key).or_insert_with(|| Group {
            latest: n.clone(),
            due: None,
            last_sent: None,
        });
        g.latest = n;
        if g.due.is_none() {
            g.due = Some(match g.last_sent {
                None => now + self.grouping.group_wait,
                Some((at, _)) => (at + self.grouping.group_interval).max(now),
            });
        }
        None
    }

    /// The next time something is due (a change, or a repeat of a firing alert); `None`
    /// when nothing is pending.
    pub fn next_due(&self) -> Option<tokio::time::Instant> {
        self.groups
            .values()
            .filter_map(|g| {
                g.due.or_else(|| match g.last_sent {
                    Some((at, Event::Firing)) => Some(at + self.grouping.repeat_interval),
                    _ => None,
                })
            })
            .min()
    }

    /// The notifications due at `now`: each group's latest change once its wait is over
    /// (a resolved alert whose firing was never sent — it flapped within `group_wait` —
    /// is dropped), and firing alerts not sent for `repeat_interval`.
    pub fn take_due(&mut self, now: tokio::time::Instant) -> Vec<Notification> {
        let repeat = self.grouping.repeat_interval;
        let mut out = Vec::new();
        for g in self.groups.values_mut() {
            let due = g.due.is_some_and(|d| d <= now);
            let again = g.due.is_none()
                && matches!(g.last_sent, Some((at, Event::Firing)) if at + repeat <= now);
            if !(due || again) {
                continue;
            }
            g.due = None;
            let already = g.last_sent.map(|(_, e)| e);
            if g.latest.event == Event::Resolved && already != Some(Event::Firing) {
                g.last_sent = Some((now, Event::Resolved));
                continue;
            }
            g.last_sent = Some((now, g.latest.event));
            out.push(g.latest.clone());
        }
        self.groups
            .retain(|_, g| g.due.is_some() || matches!(g.last_sent, Some((_, Event::Firing))));
        out
    }
}

/// Delivers queued notifications, grouped by `grouping`, to every URL in `urls` with
/// `client`, and by email when `email` is set, until `stop`.
pub async fn deliver(
    mut rx: mpsc::Receiver<Notification>,
    client: reqwest::Client,
    urls: Vec<String>,
    email: Option<topology::EmailSettings>,
    grouping: Grouping,
    external_url: String,
    stop: CancellationToken,
) {
    let mut grouper = Grouper::new(grouping);
    loop {
        let now = tokio::time::Instant::now();
        let next = grouper.next_due().unwrap_or(now + grouping.repeat_interval);
        let out = tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv() => {
                let Some(n) = n else { return };
                // the time it arrived, not the time the wait began
                grouper.offer(n, tokio::time::Instant::now()).into_iter().collect::<Vec<_>>()
            }
            _ = tokio::time::sleep_until(next) => grouper.take_due(tokio::time::Instant::now()),
        };
        for n in out {
            send_one(&client, &urls, email.as_ref(), &external_url, n).await;
        }
    }
}

/// Sends one notification by email (when set) and to every webhook (three tries each).
async fn send_one(
    client: &reqwest::Client,
    urls: &[String],
    email: Option<&topology::EmailSettings>,
    external_url: &str,
    n: Notification,
) {
    if let Some(e) = email {
        if let Err(why) = send_email(e, &n, external_url).await {
            tracing::warn!(
                "email to {}: {} {} of {} not delivered: {why}",
                e.to.join(", "),
                n.alert,
                event_str(n.event),
                n.host
            );
        }
    }
    let body = payload(&n, external_url);
    for url in urls {
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

/// Seconds an SMTP exchange may take.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Mails `n` through `e.smtp` (SMTP, RFC 5321, with lettre): subject
/// `[FIRING] HighQPS on lb-01` / `[RESOLVED] …`, a text body with the value and times.
/// With `e.tls` STARTTLS (RFC 3207, required: a server that does not offer it is an
/// error) or implicit TLS (RFC 8314), the server's certificate verified for its host
/// name against the public web roots and `e.ca_file`; with `e.username`, SMTP AUTH
/// (RFC 4954, PLAIN or LOGIN) with the first line of `e.password_file`, read now.
///
/// Errors: an address that does not parse, an unreadable CA or password file, or the
/// SMTP exchange failing (the message).
pub async fn send_email(
    e: &topology::EmailSettings,
    n: &Notification,
    external_url: &str,
) -> Result<(), String> {
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let (host, port) = e
        .smtp
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("smtp {:?} is not host:port", e.smtp))?;
    let status = event_str(n.event).to_uppercase();
    let mut msg = Message::builder()
        .from(
            e.from
                .parse()
                .map_err(|x| format!("from {:?}: {x}", e.from))?,
        )
        .subject(format!("[{status}] {} on {}", n.alert, n.host));
    for to in &e.to {
        msg = msg.to(to.parse().map_err(|x| format!("to {to:?}: {x}"))?);
    }
    let value = n
        .value
        .map_or_else(|| "none".to_string(), |v| format!("{v:.3}"));
    let body = format!(
        "{} is {} on {}.\nvalue: {value}\nstarted: {}\n{}alerts: {external_url}api/v1/alerts\n",
        n.alert,
        event_str(n.event),
        n.host,
        rfc3339(n.starts_at),
        if n.event == Event::Resolved {
            format!("resolved: {}\n", rfc3339(n.at))
        } else {
            String::new()
        },
    );
    let msg = msg.body(body).map_err(|x| x.to_string())?;
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .timeout(Some(SMTP_TIMEOUT));
    if e.tls != topology::SmtpTls::None {
        use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
        let mut params = TlsParameters::builder(host.to_string());
        if let Some(ca) = &e.ca_file {
            let pem = tokio::fs::read(ca)
                .await
                .map_err(|x| format!("ca_file {}: {x}", ca.display()))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|x| format!("ca_file {}: {x}", ca.display()))?;
            params = params.add_root_certificate(cert);
        }
        let params = params.build_rustls().map_err(|x| x.to_string())?;
        builder = builder.tls(match e.tls {
            topology::SmtpTls::Starttls => Tls::Required(params),
            _ => Tls::Wrapper(params),
        });
    }
    if let (Some(user), Some(file)) = (&e.username, &e.password_file) {
        let text = tokio::fs::read_to_string(file)
            .await
            .map_err(|x| format!("password_file {}: {x}", file.display()))?;
        let password = text.lines().next().unwrap_or("").to_string();
        builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
            user.clone(),
            password,
        ));
    }
    let mailer = builder.build();
    mailer
        .send(msg)
        .await
        .map(|_| ())
        .map_err(|x| x.to_string())
}

fn event_str(e: Event) -> &'static str {
    match e {
        Event::Firing => "firing",
        Event::Resolved => "resolved",
    }
}

/// RFC 3339 time of Unix seconds `t` (UTC).
pub fn rfc3339(t: f64) -> String {
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

    /// A minimal SMTP receiver on loopback (RFC 5321's happy path): returns the DATA of
    /// the first message.
    async fn smtp_sink(listener: tokio::net::TcpListener) -> String {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (sock, _) = listener.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"220 sink ESMTP\r\n").await.unwrap();
        let mut data = String::new();
        let mut in_data = false;
        // bounded: at most 10 000 lines
        for _ in 0..10_000 {
            let Ok(Some(line)) = lines.next_line().await else {
                break;
            };
            if in_data {
                if line == "." {
                    in_data = false;
                    w.write_all(b"250 queued\r\n").await.unwrap();
                } else {
                    data.push_str(&line);
                    data.push('\n');
                }
                continue;
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" | "HELO" => b"250 sink\r\n",
                "DATA" => {
                    in_data = true;
                    b"354 go on\r\n"
                }
                "QUIT" => {
                    w.write_all(b"221 bye\r\n").await.unwrap();
                    break;
                }
                _ => b"250 ok\r\n",
            };
            w.write_all(reply).await.unwrap();
        }
        data
    }

    /// What [`starttls_sink`] saw.
    #[derive(Debug, Default)]
    struct Seen {
        /// The message's DATA, received after STARTTLS.
        data: String,
        /// Whether AUTH PLAIN carried the expected user and password.
        authenticated: bool,
    }

    /// An SMTP receiver that offers STARTTLS (RFC 3207) with `tls` and, once upgraded,
    /// AUTH PLAIN (RFC 4954) for `rampart@foobar.com` / `s3cret` only; mail is accepted
    /// only over TLS after a successful AUTH.
    async fn starttls_sink(
        listener: tokio::net::TcpListener,
        tls: tokio_rustls::TlsAcceptor,
    ) -> Seen {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (sock, _) = listener.accept().await.unwrap();
        let mut plain = BufReader::new(sock);
        plain
            .get_mut()
            .write_all(b"220 sink ESMTP\r\n")
            .await
            .unwrap();
        // bounded: at most 100 commands before STARTTLS
        for _ in 0..100 {
            let mut line = String::new();
            if plain.read_line(&mut line).await.unwrap_or(0) == 0 {
                return Seen::default();
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => b"250-sink\r\n250 STARTTLS\r\n",
                "STAR" => b"220 go ahead\r\n",
                "QUIT" => return Seen::default(),
                _ => b"530 STARTTLS first\r\n",
            };
            plain.get_mut().write_all(reply).await.unwrap();
            if verb == "STAR" {
                break;
            }
        }
        let stream = tls.accept(plain.into_inner()).await.unwrap();
        let mut lines = BufReader::new(stream);
        let mut seen = Seen::default();
        let mut in_data = false;
        // bounded: at most 10 000 lines
        for _ in 0..10_000 {
            let mut line = String::new();
            if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                break;
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            if in_data {
                if line == "." {
                    in_data = false;
                    lines.get_mut().write_all(b"250 queued\r\n").await.unwrap();
                } else {
                    seen.data.push_str(&line);
                    seen.data.push('\n');
                }
                continue;
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => b"250-sink\r\n250 AUTH PLAIN\r\n",
                // base64 of "\0rampart@foobar.com\0s3cret"
                "AUTH" if line == "AUTH PLAIN AHJhbXBhcnRAZm9vYmFyLmNvbQBzM2NyZXQ=" => {
                    seen.authenticated = true;
                    b"235 ok\r\n"
                }
                "AUTH" => b"535 bad credentials\r\n",
                "MAIL" if !seen.authenticated => b"530 authenticate first\r\n",
                "DATA" => {
                    in_data = true;
                    b"354 go on\r\n"
                }
                "QUIT" => {
                    lines.get_mut().write_all(b"221 bye\r\n").await.unwrap();
                    break;
                }
                _ => b"250 ok\r\n",
            };
            lines.get_mut().write_all(reply).await.unwrap();
        }
        seen
    }

    /// A CA and a certificate it signed for `ip`, as PEM (CA certificate, leaf, leaf key).
    fn smtp_server_cert(ip: &str) -> (String, String, String) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "test mail CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let leaf = rcgen::CertificateParams::new(vec![ip.to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (ca_cert.pem(), cert.pem(), key.serialize_pem())
    }

    /// STARTTLS with the server verified against `ca_file`, then AUTH PLAIN with the
    /// password from `password_file`: the message arrives over TLS. A wrong password, a
    /// server that does not offer STARTTLS, and an untrusted server certificate are errors.
    #[tokio::test]
    async fn a_notification_is_mailed_with_starttls_and_authentication() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = smtp_server_cert("127.111.0.2");
        std::fs::write(dir.path().join("ca.pem"), &ca).unwrap();
        std::fs::write(dir.path().join("password"), "s3cret\n").unwrap();
        let certs = rustls_pemfile::certs(&mut cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut key.as_bytes())
            .unwrap()
            .unwrap();
        let server = rustls::ServerConfig::builder_with_provider(pki::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
        let n = note("web-01", Event::Firing, 1_700_000_000.0);
        let start = || async {
            let listener = tokio::net::TcpListener::bind("127.111.0.2:0")
                .await
                .unwrap();
            let port = listener.local_addr().unwrap().port();
            (port, tokio::spawn(starttls_sink(listener, tls.clone())))
        };
        let settings = |port: u16, password: &str| topology::EmailSettings {
            smtp: format!("127.111.0.2:{port}"),
            from: "rampart@foobar.com".into(),
            to: vec!["ops@foobar.com".into()],
            tls: topology::SmtpTls::Starttls,
            ca_file: Some(dir.path().join("ca.pem")),
            username: Some("rampart@foobar.com".into()),
            password_file: Some(dir.path().join(password)),
        };

        let (port, sink) = start().await;
        send_email(&settings(port, "password"), &n, "https://mon-01:9090/")
            .await
            .unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), sink)
            .await
            .unwrap()
            .unwrap();
        assert!(seen.authenticated);
        assert!(
            seen.data.contains("Subject: [FIRING] HostDown on web-01"),
            "{seen:?}"
        );

        // A wrong password is refused by the server.
        std::fs::write(dir.path().join("wrong"), "hunter2\n").unwrap();
        let (port, sink) = start().await;
        let e = send_email(&settings(port, "wrong"), &n, "https://mon-01:9090/")
            .await
            .unwrap_err();
        assert!(
            e.contains("535") || e.to_lowercase().contains("credentials"),
            "{e}"
        );
        let _ = tokio::time::timeout(Duration::from_secs(10), sink).await;

        // A server certificate the CA file does not vouch for: no mail, no password sent.
        let (port, sink) = start().await;
        let untrusted = topology::EmailSettings {
            ca_file: None,
            ..settings(port, "password")
        };
        assert!(send_email(&untrusted, &n, "https://mon-01:9090/")
            .await
            .is_err());
        sink.abort();

        // A server without STARTTLS: refused rather than sent in clear.
        let listener = tokio::net::TcpListener::bind("127.111.0.2:0")
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let plain = tokio::spawn(smtp_sink(listener));
        assert!(
            send_email(&settings(port, "password"), &n, "https://mon-01:9090/")
                .await
                .is_err()
        );
        plain.abort();
    }

    fn note(host: &str, event: Event, at: f64) -> Notification {
        Notification {
            alert: "HostDown".to_string(),
            host: host.into(),
            event,
            value: Some(1.0),
            starts_at: at,
            at,
        }
    }

    /// Grouping on an explicit clock: a flap within group_wait sends nothing; a firing
    /// alert goes out after group_wait and again after repeat_interval; a change soon
    /// after a notification waits for group_interval.
    #[test]
    fn grouping_waits_collapses_and_repeats() {
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut g = Grouper::new(Grouping {
            group_wait: Duration::from_secs(1),
            group_interval: Duration::from_secs(2),
            repeat_interval: Duration::from_secs(60),
        });
        let hosts = |v: Vec<Notification>| -> Vec<(String, Event)> {
            v.into_iter().map(|n| (n.host, n.event)).collect()
        };
        assert_eq!(g.next_due(), None);
        assert!(g.offer(note("web-02", Event::Firing, 0.0), at(0)).is_none());
        assert!(g
            .offer(note("web-02", Event::Resolved, 0.0), at(0))
            .is_none());
        assert!(g.offer(note("web-01", Event::Firing, 0.0), at(0)).is_none());
        assert_eq!(g.next_due(), Some(at(1)));
        assert!(g.take_due(at(0)).is_empty(), "group_wait not over");
        assert_eq!(
            hosts(g.take_due(at(1))),
            [("web-01".to_string(), Event::Firing)],
            "web-02 flapped: nothing"
        );
        // resolved half a second later: waits for group_interval after the last send
        g.offer(
            note("web-01", Event::Resolved, 1.5),
            at(1) + Duration::from_millis(500),
        );
        assert_eq!(g.next_due(), Some(at(3)));
        assert!(g.take_due(at(2)).is_empty());
        assert_eq!(
            hosts(g.take_due(at(3))),
            [("web-01".to_string(), Event::Resolved)]
        );
        assert_eq!(g.next_due(), None, "resolved groups are forgotten");
        // a lasting alert is repeated
        g.offer(note("web-03", Event::Firing, 10.0), at(10));
        assert_eq!(
            hosts(g.take_due(at(11))),
            [("web-03".to_string(), Event::Firing)]
        );
        assert_eq!(g.next_due(), Some(at(71)));
        assert!(g.take_due(at(70)).is_empty());
        assert_eq!(
            hosts(g.take_due(at(71))),
            [("web-03".to_string(), Event::Firing)]
        );
    }

    #[tokio::test]
    async fn a_notification_is_mailed_over_smtp() {
        let listener = tokio::net::TcpListener::bind("127.111.0.1:0")
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let sink = tokio::spawn(smtp_sink(listener));
        let settings = topology::EmailSettings {
            smtp: format!("127.111.0.1:{port}"),
            from: "rampart@foobar.com".into(),
            to: vec!["ops@foobar.com".into(), "oncall@foobar.com".into()],
            ..Default::default()
        };
        let n = Notification {
            alert: "HostDown".to_string(),
            host: "web-01".into(),
            event: Event::Firing,
            value: Some(12.0),
            starts_at: 1_700_000_000.0,
            at: 1_700_000_000.0,
        };
        send_email(&settings, &n, "https://mon-01:9090/")
            .await
            .unwrap();
        let data = tokio::time::timeout(Duration::from_secs(10), sink)
            .await
            .unwrap()
            .unwrap();
        assert!(
            data.contains("Subject: [FIRING] HostDown on web-01"),
            "{data}"
        );
        assert!(
            data.contains("To: ops@foobar.com, oncall@foobar.com"),
            "{data}"
        );
        assert!(data.contains("value: 12.000"), "{data}");
        // nothing listening: an error, not a hang
        let closed = topology::EmailSettings {
            smtp: format!("127.111.0.1:{port}"),
            ..settings
        };
        assert!(send_email(&closed, &n, "https://mon-01:9090/")
            .await
            .is_err());
    }

    #[test]
    fn the_payload_is_alertmanagers() {
        let n = Notification {
            alert: "HostDown".to_string(),
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
