//! Limits of the network edge: the timeouts and connection caps every listener is served
//! with, and the load balancer's per-backend queueing and buffering. Defaults are written
//! once here, documented on the fields; `[limits]` overrides them for every listener and
//! `[limits.<service>]` (e.g. `[limits.https]`) for one.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::raw::{RawBalancer, RawLimits, RawListenerLimits};
use crate::{ConfigError, Service};

/// What one listener is served with. Timeouts in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerLimits {
    /// Time a client has to complete the TLS handshake after the TCP connection is
    /// accepted. Default 10 000 (nginx `ssl_handshake_timeout` 60 s, HAProxy
    /// `timeout client`; shorter here because a handshake never needs more on a LAN).
    pub tls_handshake_timeout_ms: u64,
    /// Time from accept (after the handshake) to the first byte of the first request,
    /// i.e. the protocol-detection window between HTTP/1 and HTTP/2. Default 10 000.
    pub first_byte_timeout_ms: u64,
    /// Time an HTTP/1 client has to send a complete request head once it started one
    /// (nginx `client_header_timeout`, HAProxy `timeout http-request`). Default 10 000.
    pub header_read_timeout_ms: u64,
    /// Time a connection may stay open with no request in flight and nothing read
    /// (keep-alive idle; nginx `keepalive_timeout`, HAProxy `timeout http-keep-alive`).
    /// Default 60 000. A web listener's value must exceed the load balancer's
    /// `balancer.upstream_idle_timeout_ms`, so the load balancer never reuses a pooled
    /// connection the backend is closing.
    pub idle_timeout_ms: u64,
    /// Longest pause between two chunks of a request body (nginx `client_body_timeout`);
    /// past it the request is answered 408. Default 10 000.
    pub body_timeout_ms: u64,
    /// Longest time to receive a whole request body where bodies are read before they are
    /// forwarded (the load balancer); past it 408, so a body trickling in just under
    /// `body_timeout_ms` cannot hold a connection forever (HAProxy `timeout
    /// http-request` with `option http-buffer-request`). Default 30 000.
    pub body_deadline_ms: u64,
    /// Connections served at once on this listener. At the cap a new connection is
    /// admitted by closing the connection that has been idle longest (no request in
    /// flight: a slow or silent client), as nginx reuses keep-alive connections when its
    /// `worker_connections` run out; when every connection is busy, the new one is reset
    /// and counted. Defaults: https 10 000, http 2 000, web 1 024, ingest 256, mysql 256,
    /// agent 64, mysql_egress 8.
    pub max_connections: u32,
    /// Connections one source address may hold on this listener; above it new ones from
    /// that address are reset and counted (HAProxy `src_conn_cur`, nginx `limit_conn`).
    /// Default 1 024.
    pub max_connections_per_source: u32,
    /// On shutdown, time open connections get to finish their requests before they are
    /// closed. Default 5 000.
    pub drain_timeout_ms: u64,
}

impl ListenerLimits {
    /// [`ListenerLimits::tls_handshake_timeout_ms`] as a duration.
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
    /// [`ListenerLimits::first_byte_timeout_ms`] as a duration.
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.first_byte_timeout_ms)
    }
    /// [`ListenerLimits::header_read_timeout_ms`] as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    /// [`ListenerLimits::idle_timeout_ms`] as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    /// [`ListenerLimits::body_timeout_ms`] as a duration.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }
    /// [`ListenerLimits::body_deadline_ms`] as a duration.
    pub fn body_deadline(&self) -> Duration {
        Duration::from_millis(self.body_deadline_ms)
    }
    /// [`ListenerLimits::drain_timeout_ms`] as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// The built-in defaults for `service`.
    pub fn default_for(service: Service) -> ListenerLimits {
        let max_connections = match service {
            Service::Https => 10_000,
            Service::Http => 2_000,
            Service::Web => 1_024,
            Service::Ingest | Service::Mysql => 256,
            Service::Agent => 64,
            Service::MysqlEgress => 8,
        };
        ListenerLimits {
            tls_handshake_timeout_ms: 10_000,
            first_byte_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            body_timeout_ms: 10_000,
            body_deadline_ms: 30_000,
            max_connections,
            max_connections_per_source: 1_024,
            drain_timeout_ms: 5_000,
        }
    }
}

/// The limits of every listener plus the process-wide descriptor reserve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// File descriptors every node keeps in reserve: accepted connections are admitted
    /// only while more than this many remain below the process's open-file limit
    /// (`RLIMIT_NOFILE`), so a flood of connections never leaves health checks, the
    /// status file or the logs without a descriptor. Default 1 024.
    pub fd_reserve: u32,
    /// The resolved limits of each service's listeners.
    #[serde(flatten)]
    pub listeners: BTreeMap<String, ListenerLimits>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            fd_reserve: 1_024,
            listeners: Service::ALL
                .iter()
                .map(|s| (s.as_str().to_string(), ListenerLimits::default_for(*s)))
                .collect(),
        }
    }
}

impl Limits {
    /// The limits of `service`'s listeners.
    pub fn listener(&self, service: Service) -> ListenerLimits {
        self.listeners
            .get(service.as_str())
            .cloned()
            .unwrap_or_else(|| ListenerLimits::default_for(service))
    }
}

/// The load balancer's upstream side (HAProxy `maxconn`/`timeout queue` on a server line,
/// nginx `proxy_request_buffering`/`proxy_buffering`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalancerLimits {
    /// Requests in flight to one backend from one load balancer; more wait in the queue.
    /// Default 128. The sum over load balancers must stay below the web listener's
    /// `max_connections`, so health checks always find a connection slot.
    pub backend_max_connections: u32,
    /// Requests that may wait for one backend; beyond it 503 at once. Default 4 096.
    pub backend_queue_max: u32,
    /// Longest wait in a backend's queue before 503. Milliseconds, default 10 000.
    pub backend_queue_timeout_ms: u64,
    /// Largest request body the load balancer accepts (413 beyond; nginx
    /// `client_max_body_size`). The whole body is read before a backend is chosen.
    /// Bytes, default 1 048 576.
    pub max_request_body_bytes: u64,
    /// A response body up to this size is read from the backend in full before it is sent
    /// on, so a slow client never holds a backend connection. Bytes, default 1 048 576.
    pub response_buffer_bytes: u64,
    /// Request bodies and responses the load balancer holds at once, over every
    /// connection and stream, at most this much together: past it a response is streamed
    /// from its backend as its client reads (holding the backend's slot meanwhile), and a
    /// request body that does not fit gets 503 with `Retry-After`. It bounds what clients
    /// that send large bodies, or ask for large answers and never read them, can make the
    /// load balancer hold. Bytes, default 268 435 456 (256 MiB); at least
    /// `response_buffer_bytes` and `max_request_body_bytes`.
    pub buffer_total_bytes: u64,
    /// Idle pooled connections to backends are closed after this long; must be below the
    /// web listeners' `idle_timeout_ms`. Milliseconds, default 4 000.
    pub upstream_idle_timeout_ms: u64,
    /// Requests a second one client address may send (a token bucket per address); over
    /// it the load balancer answers 429 with `Retry-After`. 0 turns the limit off.
    /// Default 0.
    pub rate_limit_per_source: u32,
    /// Requests one address may send at once above that rate. Default twice the rate.
    pub rate_limit_burst: u32,
    /// Proxies in front of the load balancer whose `X-Forwarded-For` is believed (nginx
    /// `set_real_ip_from` with `real_ip_recursive on`, Caddy `trusted_proxies`): for a
    /// request from one of these networks, the client is the rightmost address of its
    /// `X-Forwarded-For` that is not itself a trusted proxy. That client is what the
    /// per-source rate limit counts, what `consistent_hash` hashes and what the access log
    /// names; the forwarded fields sent on still end with the address the request came
    /// from. Default none: every client is the address its connection comes from.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Algorithm, stickiness, slow start, outlier ejection, retry budget and per-backend
    /// weights (the same `[balancer]` table; see [`crate::Balancing`]).
    #[serde(flatten)]
    pub balancing: crate::Balancing,
}

impl Default for BalancerLimits {
    fn default() -> BalancerLimits {
        BalancerLimits {
            backend_max_connections: 128,
            backend_queue_max: 4_096,
            backend_queue_timeout_ms: 10_000,
            max_request_body_bytes: 1 << 20,
            response_buffer_bytes: 1 << 20,
            buffer_total_bytes: 256 << 20,
            upstream_idle_timeout_ms: 4_000,
            rate_limit_per_source: 0,
            rate_limit_burst: 0,
            trusted_proxies: Vec::new(),
            balancing: crate::Balancing::default(),
        }
    }
}

/// Size cap and rotation of the load balancer's access log (`[access_log]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessLogLimits {
    /// The file is renamed to `access.log.1` before a line would take it past this size.
    /// Bytes, default 67 108 864 (64 MiB).
    pub max_bytes: u64,
    /// Rotated files kept (`access.log.1` … `.<keep>`), default 3. The log of one load
    /// balancer never takes more than `max_bytes × (keep + 1)`.
    pub keep: u32,
    /// Line format: `combined` (nginx `combined` plus backend and timings), `common` (the
    /// NCSA Common Log Format, nothing else) or `json` (one object per line). Default
    /// `combined`.
    pub format: AccessLogFormat,
}

/// The access log's line format (`[access_log] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// nginx `combined` followed by `backend=`, `rt=`, `tls=`, `queue=`, `connect=`,
    /// `upstream=` and `listener=`.
    #[default]
    Combined,
    /// The NCSA Common Log Format: client, identity, user, time, request line, status,
    /// bytes.
    Common,
    /// One JSON object per line with every field.
    Json,
}

impl AccessLogFormat {
    /// Parses `combined`, `common` or `json`.
    pub fn parse(name: &str) -> Option<AccessLogFormat> {
        match name.trim().to_ascii_lowercase().as_str() {
            "combined" => Some(AccessLogFormat::Combined),
            "common" => Some(AccessLogFormat::Common),
            "json" => Some(AccessLogFormat::Json),
            _ => None,
        }
    }
}

impl Default for AccessLogLimits {
    fn default() -> AccessLogLimits {
        AccessLogLimits {
            max_bytes: 64 << 20,
            keep: 3,
            format: AccessLogFormat::Combined,
        }
    }
}

/// `[access_log]` → [`AccessLogLimits`].
pub(crate) fn validate_access_log(
    raw: crate::raw::RawAccessLog,
    file: &str,
) -> Result<AccessLogLimits, ConfigError> {
    let d = AccessLogLimits::default();
    let a = AccessLogLimits {
        max_bytes: raw.max_bytes.unwrap_or(d.max_bytes),
        keep: raw.keep.unwrap_or(d.keep),
        format: match &raw.format {
            None => d.format,
            Some(f) => AccessLogFormat::parse(f).ok_or_else(|| {
                err(
                    file,
                    "access_log.format".into(),
                    format!("unknown format {f:?}"),
                    "use combined, common or json",
                )
            })?,
        },
    };
    if a.max_bytes < 4096 {
        return Err(err(
            file,
            "access_log.max_bytes".into(),
            "below 4096 bytes",
            "use at least 4096 (default 67108864)",
        ));
    }
    if a.keep == 0 {
        return Err(err(
            file,
            "access_log.keep".into(),
            "must be at least 1",
            "keep at least one rotated file (default 3)",
        ));
    }
    Ok(a)
}

fn err(file: &str, key: String, reason: impl Into<String>, fix: &str) -> ConfigError {
    ConfigError::new(file, key, reason, fix)
}

fn apply(
    out: &mut ListenerLimits,
    raw: &RawListenerLimits,
    prefix: &str,
    file: &str,
) -> Result<(), ConfigError> {
    let timeouts = [
        (
            "tls_handshake_timeout_ms",
            raw.tls_handshake_timeout_ms,
            &mut out.tls_handshake_timeout_ms,
        ),
        (
            "first_byte_timeout_ms",
            raw.first_byte_timeout_ms,
            &mut out.first_byte_timeout_ms,
        ),
        (
            "header_read_timeout_ms",
            raw.header_read_timeout_ms,
            &mut out.header_read_timeout_ms,
        ),
        (
            "idle_timeout_ms",
            raw.idle_timeout_ms,
            &mut out.idle_timeout_ms,
        ),
        (
            "body_timeout_ms",
            raw.body_timeout_ms,
            &mut out.body_timeout_ms,
        ),
        (
            "body_deadline_ms",
            raw.body_deadline_ms,
            &mut out.body_deadline_ms,
        ),
        (
            "drain_timeout_ms",
            raw.drain_timeout_ms,
            &mut out.drain_timeout_ms,
        ),
    ];
    for (key, value, slot) in timeouts {
        if let Some(v) = value {
            if v < 100 {
                return Err(err(
                    file,
                    format!("{prefix}.{key}"),
                    format!("{v} ms is below 100 ms"),
                    "use at least 100 (milliseconds)",
                ));
            }
            *slot = v;
        }
    }
    for (key, value, slot) in [
        (
            "max_connections",
            raw.max_connections,
            &mut out.max_connections,
        ),
        (
            "max_connections_per_source",
            raw.max_connections_per_source,
            &mut out.max_connections_per_source,
        ),
    ] {
        if let Some(v) = value {
            if v == 0 {
                return Err(err(
                    file,
                    format!("{prefix}.{key}"),
                    "must be at least 1",
                    "use a positive number of connections",
                ));
            }
            *slot = v;
        }
    }
    Ok(())
}

/// `[limits]` → [`Limits`]: built-in per-service defaults, then the `[limits]` keys for
/// every listener, then `[limits.<service>]`.
pub(crate) fn validate_limits(raw: RawLimits, file: &str) -> Result<Limits, ConfigError> {
    let fd_reserve = raw.fd_reserve.unwrap_or(1_024);
    if fd_reserve < 64 {
        return Err(err(
            file,
            "limits.fd_reserve".into(),
            format!("{fd_reserve} is below 64"),
            "keep at least 64 descriptors in reserve (default 1024)",
        ));
    }
    let mut listeners = BTreeMap::new();
    for service in Service::ALL {
        let mut l = ListenerLimits::default_for(service);
        apply(&mut l, &raw.common, "limits", file)?;
        if let Some(own) = raw.per_service(service) {
            apply(&mut l, own, &format!("limits.{service}"), file)?;
        }
        listeners.insert(service.as_str().to_string(), l);
    }
    Ok(Limits {
        fd_reserve,
        listeners,
    })
}

/// `[balancer]` → [`BalancerLimits`].
pub(crate) fn validate_balancer(
    raw: RawBalancer,
    file: &str,
) -> Result<BalancerLimits, ConfigError> {
    let d = BalancerLimits::default();
    let balancing = crate::balancing::validate_balancing(&raw, file)?;
    let mut trusted_proxies = Vec::new();
    for (i, s) in raw.trusted_proxies.iter().flatten().enumerate() {
        let net = crate::model::net_or_address(s).ok_or_else(|| {
            err(
                file,
                format!("balancer.trusted_proxies[{i}]"),
                format!("{s:?} is not an address or CIDR network"),
                "list the proxies in front of the load balancer, e.g. \"10.0.0.0/8\" or \"192.0.2.7\"",
            )
        })?;
        trusted_proxies.push(net);
    }
    let b = BalancerLimits {
        backend_max_connections: raw
            .backend_max_connections
            .unwrap_or(d.backend_max_connections),
        backend_queue_max: raw.backend_queue_max.unwrap_or(d.backend_queue_max),
        backend_queue_timeout_ms: raw
            .backend_queue_timeout_ms
            .unwrap_or(d.backend_queue_timeout_ms),
        max_request_body_bytes: raw
            .max_request_body_bytes
            .unwrap_or(d.max_request_body_bytes),
        response_buffer_bytes: raw.response_buffer_bytes.unwrap_or(d.response_buffer_bytes),
        buffer_total_bytes: raw.buffer_total_bytes.unwrap_or(d.buffer_total_bytes),
        upstream_idle_timeout_ms: raw
            .upstream_idle_timeout_ms
            .unwrap_or(d.upstream_idle_timeout_ms),
        rate_limit_per_source: raw.rate_limit_per_source.unwrap_or(0),
        rate_limit_burst: raw
            .rate_limit_burst
            .unwrap_or_else(|| raw.rate_limit_per_source.unwrap_or(0).saturating_mul(2)),
        trusted_proxies,
        balancing,
    };
    for (key, v) in [
        (
            "backend_max_connections",
            u64::from(b.backend_max_connections),
        ),
        ("backend_queue_timeout_ms", b.backend_queue_timeout_ms),
        ("upstream_idle_timeout_ms", b.upstream_idle_timeout_ms),
    ] {
        if v == 0 {
            return Err(err(
                file,
                format!("balancer.{key}"),
                "must be positive",
                "remove the key for the default",
            ));
        }
    }
    let one = b.response_buffer_bytes.max(b.max_request_body_bytes);
    if b.buffer_total_bytes < one {
        return Err(err(
            file,
            "balancer.buffer_total_bytes".into(),
            format!(
                "{} is below response_buffer_bytes or max_request_body_bytes ({one})",
                b.buffer_total_bytes
            ),
            "give everything buffered together at least room for one body (default 268435456)",
        ));
    }
    Ok(b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::{Service, Topology};

    /// The default topology's hosts only, so a test can add its own `[limits]`.
    fn hosts() -> &'static str {
        let t = crate::DEFAULT_TOML;
        &t[t.find("[[hosts]]").unwrap()..]
    }

    #[test]
    fn defaults_per_service_and_overrides() {
        let hosts = hosts();
        let t = Topology::default_topology();
        assert_eq!(t.limits.listener(Service::Https).max_connections, 10_000);
        assert_eq!(t.limits.listener(Service::Web).max_connections, 1_024);
        assert_eq!(t.limits.listener(Service::Web).idle_timeout_ms, 60_000);
        let text = format!(
            "{hosts}\n[limits]\nidle_timeout_ms = 30000\n[limits.https]\nmax_connections = 500\n"
        );
        let t = Topology::parse(&text, "t").unwrap();
        assert_eq!(t.limits.listener(Service::Https).max_connections, 500);
        assert_eq!(t.limits.listener(Service::Https).idle_timeout_ms, 30_000);
        assert_eq!(t.limits.listener(Service::Web).idle_timeout_ms, 30_000);
        assert_eq!(t.limits.listener(Service::Http).max_connections, 2_000);
    }

    #[test]
    fn bad_limits_name_the_key() {
        let hosts = hosts();
        let e = Topology::parse(
            &format!("{hosts}\n[limits.web]\nheader_read_timeout_ms = 5\n"),
            "t",
        )
        .unwrap_err();
        assert_eq!(e.key, "limits.web.header_read_timeout_ms");
        let e = Topology::parse(&format!("{hosts}\n[limits.nope]\n"), "t").unwrap_err();
        assert!(e.reason.contains("nope"), "{e}");
    }

    #[test]
    fn pool_idle_must_stay_below_the_backends_idle_timeout() {
        let hosts = hosts();
        let e = Topology::parse(
            &format!("{hosts}\n[limits.web]\nidle_timeout_ms = 3000\n"),
            "t",
        )
        .unwrap_err();
        assert_eq!(e.key, "balancer.upstream_idle_timeout_ms");
        let e = Topology::parse(
            &format!("{hosts}\n[balancer]\nbackend_max_connections = 1024\n"),
            "t",
        )
        .unwrap_err();
        assert_eq!(e.key, "balancer.backend_max_connections");
    }

    #[test]
    fn the_response_buffer_budget_holds_at_least_one_response() {
        let hosts = hosts();
        let t = Topology::default_topology();
        assert_eq!(t.balancer.buffer_total_bytes, 256 << 20);
        let e = Topology::parse(
            &format!("{hosts}\n[balancer]\nbuffer_total_bytes = 65536\n"),
            "t",
        )
        .unwrap_err();
        assert_eq!(e.key, "balancer.buffer_total_bytes");
    }

    #[test]
    fn trusted_proxies_are_networks_or_addresses() {
        let hosts = hosts();
        let text = format!(
            "{hosts}\n[balancer]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n"
        );
        let t = Topology::parse(&text, "t").unwrap();
        let nets: Vec<String> = t
            .balancer
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
        assert_eq!(Topology::parse(&t.to_toml(), "x").unwrap(), t);
        assert!(Topology::default_topology()
            .balancer
            .trusted_proxies
            .is_empty());
        let e = Topology::parse(
            &format!("{hosts}\n[balancer]\ntrusted_proxies = [\"10.0.0.0/8\", \"cdn\"]\n"),
            "t",
        )
        .unwrap_err();
        assert_eq!(e.key, "balancer.trusted_proxies[1]");
        assert!(e.reason.contains("\"cdn\""), "{e}");
    }

    #[test]
    fn limits_round_trip() {
        let hosts = hosts();
        let text = format!("{hosts}\n[limits.agent]\nmax_connections = 7\n");
        let t = Topology::parse(&text, "t").unwrap();
        assert_eq!(Topology::parse(&t.to_toml(), "x").unwrap(), t);
    }
}
