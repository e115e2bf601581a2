//! How the load balancer spreads requests over its backends (`[balancer]` keys `algorithm`,
//! `hash_header`, `sticky_cookie`, `slow_start_ms`, the passive outlier ejection, retry
//! budget and WebSocket tunnel keys, and one `[balancer.backends.<host>]` table per weighted or backup
//! backend). Defaults are written once here, documented on the fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::raw::RawBalancer;
use crate::ConfigError;

/// The balancing algorithm of a backend pool (`balancer.algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Strict rotation over the available backends; weights are ignored (one atomic
    /// counter per request).
    RoundRobin,
    /// Smooth weighted round robin (nginx's `upstream` default): over any window of
    /// `Σ weight` requests each backend gets `weight` of them, interleaved rather than in
    /// runs. Slow start ramps a returning backend's weight. The default.
    #[default]
    WeightedRoundRobin,
    /// The backend with the fewest requests in flight relative to its weight (HAProxy
    /// `leastconn`); ties go round robin.
    LeastConnections,
    /// Two backends drawn at random, the one with fewer outstanding requests (in flight
    /// plus queued, relative to weight) wins (Mitzenmacher's power of two choices;
    /// Envoy `LEAST_REQUEST`).
    PowerOfTwoChoices,
    /// Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018) on a
    /// ring of 160 points per unit of weight: a key (the client address, or
    /// `hash_header`) goes to the first backend clockwise from its hash whose load stays
    /// within 1.25 × the average; a backend that goes down moves only its own keys.
    ConsistentHash,
}

impl Algorithm {
    /// Every algorithm with its configuration name, in documentation order.
    pub const ALL: [(Algorithm, &'static str); 5] = [
        (Algorithm::RoundRobin, "round_robin"),
        (Algorithm::WeightedRoundRobin, "weighted_round_robin"),
        (Algorithm::LeastConnections, "least_connections"),
        (Algorithm::PowerOfTwoChoices, "power_of_two_choices"),
        (Algorithm::ConsistentHash, "consistent_hash"),
    ];

    /// The configuration name, e.g. `least_connections`.
    pub fn as_str(self) -> &'static str {
        Algorithm::ALL
            .iter()
            .find(|(a, _)| *a == self)
            .map_or("weighted_round_robin", |(_, n)| n)
    }

    /// Parses a configuration name; `-` is accepted for `_` (`least-connections`), and
    /// the short forms `rr`, `wrr`, `leastconn`, `p2c` and `hash`.
    pub fn parse(name: &str) -> Option<Algorithm> {
        let n = name.trim().to_ascii_lowercase().replace('-', "_");
        let short = match n.as_str() {
            "rr" => Some(Algorithm::RoundRobin),
            "wrr" => Some(Algorithm::WeightedRoundRobin),
            "leastconn" | "least_conn" => Some(Algorithm::LeastConnections),
            "p2c" => Some(Algorithm::PowerOfTwoChoices),
            "hash" => Some(Algorithm::ConsistentHash),
            _ => None,
        };
        short.or_else(|| {
            Algorithm::ALL
                .iter()
                .find(|(_, s)| *s == n)
                .map(|(a, _)| *a)
        })
    }
}

/// One backend's balancing options (`[balancer.backends.<host>]`; HAProxy `server … weight
/// N backup`, nginx `server … weight=N backup`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendOptions {
    /// Relative share of requests, 1 to 256 (HAProxy's range). Default 1.
    pub weight: u32,
    /// A backup backend gets requests only while no primary (non-backup) backend is
    /// available. Default false.
    pub backup: bool,
}

impl Default for BackendOptions {
    fn default() -> BackendOptions {
        BackendOptions {
            weight: 1,
            backup: false,
        }
    }
}

/// Largest backend weight (HAProxy `weight` 0–256; 0 is expressed by draining instead).
pub const MAX_WEIGHT: u32 = 256;

/// Balancing, passive health and retry settings (part of `[balancer]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Balancing {
    /// The algorithm. Default `weighted_round_robin`.
    pub algorithm: Algorithm,
    /// `consistent_hash` only: hash this request header's value instead of the client
    /// address (a request without it falls back to the client address). Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// Cookie stickiness (HAProxy `cookie NAME insert`): a response from a backend the
    /// request's cookie did not name sets `NAME=<token of that backend>`; later requests
    /// carrying it go to that backend while it is available, otherwise the algorithm picks
    /// another and the cookie is re-pinned. Works with every algorithm. Default none (off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sticky_cookie: Option<String>,
    /// A backend returning from down or from ejection starts at 1/10 of its weight and
    /// reaches it linearly over this long (nginx `slow_start`, HAProxy `slowstart`);
    /// weighted algorithms only. Milliseconds, default 10 000; 0 turns it off.
    pub slow_start_ms: u64,
    /// Passive outlier ejection (Envoy `consecutive_5xx` + `consecutive_gateway_failure`):
    /// a backend is taken out of rotation after this many consecutive failed requests
    /// (connect errors, resets, 5xx answers). Default 5; 0 turns ejection off.
    pub eject_consecutive_failures: u32,
    /// First ejection's length; each further ejection doubles it (Envoy
    /// `base_ejection_time`). Milliseconds, default 10 000.
    pub ejection_base_ms: u64,
    /// Longest ejection (Envoy `max_ejection_time`); a backend that stays this long
    /// without an ejection starts again from `ejection_base_ms`. Milliseconds, default
    /// 300 000.
    pub ejection_max_ms: u64,
    /// At most this share of the backends is ejected at once, and always at least one may
    /// be (Envoy `max_ejection_percent`). Percent, default 50.
    pub max_ejected_percent: u32,
    /// Retries of failed requests may add at most this share to the requests sent
    /// (linkerd/Envoy retry budget). Percent, default 20.
    pub retry_budget_percent: u32,
    /// Retries always allowed per second regardless of the share (the budget's floor).
    /// Default 10.
    pub retry_min_per_second: u32,
    /// A WebSocket tunnel with no byte in either direction for this long is closed (nginx
    /// `proxy_read_timeout`, HAProxy `timeout tunnel`). Milliseconds, default 300 000.
    pub tunnel_idle_timeout_ms: u64,
    /// After one side of a WebSocket tunnel closed its sending half, the other direction
    /// may stay quiet this long before the tunnel is closed (HAProxy `timeout client-fin`
    /// / `timeout server-fin`: a WebSocket peer answers a Close at once, RFC 6455 §5.5.1);
    /// `tunnel_idle_timeout_ms` when that is shorter. Milliseconds, default 10 000.
    pub tunnel_half_closed_timeout_ms: u64,
    /// Per-backend options by host name; hosts not listed have the defaults.
    pub backends: BTreeMap<String, BackendOptions>,
}

impl Default for Balancing {
    fn default() -> Balancing {
        Balancing {
            algorithm: Algorithm::default(),
            hash_header: None,
            sticky_cookie: None,
            slow_start_ms: 10_000,
            eject_consecutive_failures: 5,
            ejection_base_ms: 10_000,
            ejection_max_ms: 300_000,
            max_ejected_percent: 50,
            retry_budget_percent: 20,
            retry_min_per_second: 10,
            tunnel_idle_timeout_ms: 300_000,
            tunnel_half_closed_timeout_ms: 10_000,
            backends: BTreeMap::new(),
        }
    }
}

impl Balancing {
    /// The options of backend `name` (the defaults when it has no table).
    pub fn backend(&self, name: &str) -> BackendOptions {
        self.backends.get(name).cloned().unwrap_or_default()
    }
}

/// `[balancer.backends.<host>]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackendOptions {
    pub weight: Option<u32>,
    pub backup: Option<bool>,
}

fn err(file: &str, key: String, reason: impl Into<String>, fix: &str) -> ConfigError {
    ConfigError::new(file, key, reason, fix)
}

/// Whether `s` is a valid HTTP field name / cookie name (an RFC 9110 §5.6.2 token).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The balancing keys of `[balancer]` → [`Balancing`]. Backend names are checked against
/// the hosts later ([`check_backend_names`]).
pub(crate) fn validate_balancing(raw: &RawBalancer, file: &str) -> Result<Balancing, ConfigError> {
    let d = Balancing::default();
    let algorithm = match &raw.algorithm {
        None => d.algorithm,
        Some(name) => Algorithm::parse(name).ok_or_else(|| {
            let names: Vec<&str> = Algorithm::ALL.iter().map(|(_, n)| *n).collect();
            err(
                file,
                "balancer.algorithm".into(),
                format!("unknown algorithm {name:?}"),
                &format!("use one of {}", names.join(", ")),
            )
        })?,
    };
    for (key, v) in [
        ("hash_header", &raw.hash_header),
        ("sticky_cookie", &raw.sticky_cookie),
    ] {
        if let Some(v) = v {
            if !is_token(v) {
                return Err(err(
                    file,
                    format!("balancer.{key}"),
                    format!("{v:?} is not a valid name"),
                    "use letters, digits and '-', e.g. \"X-User-Id\"",
                ));
            }
        }
    }
    if raw.hash_header.is_some() && algorithm != Algorithm::ConsistentHash {
        return Err(err(
            file,
            "balancer.hash_header".into(),
            format!("only used by consistent_hash, not {}", algorithm.as_str()),
            "set algorithm = \"consistent_hash\" or remove hash_header",
        ));
    }
    let b = Balancing {
        algorithm,
        hash_header: raw.hash_header.as_ref().map(|h| h.to_ascii_lowercase()),
        sticky_cookie: raw.sticky_cookie.clone(),
        slow_start_ms: raw.slow_start_ms.unwrap_or(d.slow_start_ms),
        eject_consecutive_failures: raw
            .eject_consecutive_failures
            .unwrap_or(d.eject_consecutive_failures),
        ejection_base_ms: raw.ejection_base_ms.unwrap_or(d.ejection_base_ms),
        ejection_max_ms: raw.ejection_max_ms.unwrap_or(d.ejection_max_ms),
        max_ejected_percent: raw.max_ejected_percent.unwrap_or(d.max_ejected_percent),
        retry_budget_percent: raw.retry_budget_percent.unwrap_or(d.retry_budget_percent),
        retry_min_per_second: raw.retry_min_per_second.unwrap_or(d.retry_min_per_second),
        tunnel_idle_timeout_ms: raw
            .tunnel_idle_timeout_ms
            .unwrap_or(d.tunnel_idle_timeout_ms),
        tunnel_half_closed_timeout_ms: raw
            .tunnel_half_closed_timeout_ms
            .unwrap_or(d.tunnel_half_closed_timeout_ms),
        backends: BTreeMap::new(),
    };
    if b.tunnel_idle_timeout_ms == 0 {
        return Err(err(
            file,
            "balancer.tunnel_idle_timeout_ms".into(),
            "must be positive",
            "remove the key for the default (300000)",
        ));
    }
    if b.tunnel_half_closed_timeout_ms == 0 {
        return Err(err(
            file,
            "balancer.tunnel_half_closed_timeout_ms".into(),
            "must be positive (a half-closed tunnel would be closed at once)",
            "remove the key for the default (10000)",
        ));
    }
    if b.ejection_base_ms == 0 || b.ejection_max_ms < b.ejection_base_ms {
        return Err(err(
            file,
            "balancer.ejection_max_ms".into(),
            format!(
                "ejection_base_ms {} must be positive and at most ejection_max_ms {}",
                b.ejection_base_ms, b.ejection_max_ms
            ),
            "e.g. ejection_base_ms = 10000, ejection_max_ms = 300000",
        ));
    }
    if b.max_ejected_percent > 100 {
        return Err(err(
            file,
            "balancer.max_ejected_percent".into(),
            "above 100",
            "use 0 to 100 (default 50)",
        ));
    }
    let mut backends = BTreeMap::new();
    for (name, o) in raw.backends.iter().flatten() {
        let opts = BackendOptions {
            weight: o.weight.unwrap_or(1),
            backup: o.backup.unwrap_or(false),
        };
        if opts.weight == 0 || opts.weight > MAX_WEIGHT {
            return Err(err(
                file,
                format!("balancer.backends.{name}.weight"),
                format!("{} is outside 1–{MAX_WEIGHT}", opts.weight),
                "use 1 to 256; `rampart lb drain` takes a backend out",
            ));
        }
        backends.insert(name.clone(), opts);
    }
    Ok(Balancing { backends, ..b })
}

/// Every `[balancer.backends.<host>]` names a host holding `web`; at least one backend is
/// not a backup.
pub(crate) fn check_backend_names(
    b: &Balancing,
    web_hosts: &[&str],
    file: &str,
) -> Result<(), ConfigError> {
    for name in b.backends.keys() {
        if !web_hosts.contains(&name.as_str()) {
            return Err(err(
                file,
                format!("balancer.backends.{name}"),
                format!("{name:?} is not a host with the web role"),
                "name a web host of the topology, or remove the table",
            ));
        }
    }
    if !web_hosts.is_empty() && web_hosts.iter().all(|h| b.backend(h).backup) {
        return Err(err(
            file,
            "balancer.backends".into(),
            "every backend is a backup",
            "leave at least one web host without backup = true",
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Topology;

    fn hosts() -> &'static str {
        let t = crate::DEFAULT_TOML;
        &t[t.find("[[hosts]]").unwrap()..]
    }

    #[test]
    fn algorithm_names_parse_in_both_spellings() {
        for (a, name) in Algorithm::ALL {
            assert_eq!(Algorithm::parse(name), Some(a));
            assert_eq!(Algorithm::parse(&name.replace('_', "-")), Some(a));
            assert_eq!(a.as_str(), name);
        }
        assert_eq!(Algorithm::parse("p2c"), Some(Algorithm::PowerOfTwoChoices));
        assert_eq!(Algorithm::parse("random"), None);
    }

    #[test]
    fn defaults_and_a_weighted_pool_round_trip() {
        let t = Topology::default_topology();
        assert_eq!(t.balancer.balancing, Balancing::default());
        let text = format!(
            "[balancer]\nalgorithm = \"consistent_hash\"\nhash_header = \"X-User\"\n\
             sticky_cookie = \"lb\"\n[balancer.backends.web-01]\nweight = 3\n\
             [balancer.backends.web-02]\nbackup = true\n{}",
            hosts()
        );
        let t = Topology::parse(&text, "x.toml").unwrap();
        let b = &t.balancer.balancing;
        assert_eq!(b.algorithm, Algorithm::ConsistentHash);
        assert_eq!(b.hash_header.as_deref(), Some("x-user"));
        assert_eq!(b.backend("web-01").weight, 3);
        assert!(b.backend("web-02").backup);
        assert_eq!(b.backend("web-03"), BackendOptions::default());
        assert_eq!(Topology::parse(&t.to_toml(), "x").unwrap(), t);
    }

    #[test]
    fn the_half_closed_tunnel_timeout_defaults_to_ten_seconds_and_is_read() {
        let t = Topology::default_topology();
        assert_eq!(t.balancer.balancing.tunnel_half_closed_timeout_ms, 10_000);
        let text = format!(
            "[balancer]\ntunnel_half_closed_timeout_ms = 2500\n{}",
            hosts()
        );
        let t = Topology::parse(&text, "x.toml").unwrap();
        assert_eq!(t.balancer.balancing.tunnel_half_closed_timeout_ms, 2_500);
        assert_eq!(Topology::parse(&t.to_toml(), "x").unwrap(), t);
        let e = Topology::parse(
            &format!("[balancer]\ntunnel_half_closed_timeout_ms = 0\n{}", hosts()),
            "x.toml",
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("x.toml"), "{text}");
        assert!(
            text.contains("balancer.tunnel_half_closed_timeout_ms"),
            "{text}"
        );
        assert!(text.contains("10000"), "{text}");
    }

    #[test]
    fn bad_balancing_keys_name_the_key() {
        for (toml, key) in [
            ("[balancer]\nalgorithm = \"fastest\"\n", "balancer.algorithm"),
            ("[balancer]\nhash_header = \"X-U\"\n", "balancer.hash_header"),
            ("[balancer]\nsticky_cookie = \"a b\"\n", "balancer.sticky_cookie"),
            (
                "[balancer.backends.web-01]\nweight = 0\n",
                "balancer.backends.web-01.weight",
            ),
            (
                "[balancer.backends.mon-01]\nweight = 2\n",
                "balancer.backends.mon-01",
            ),
            (
                "[balancer.backends.web-01]\nbackup = true\n[balancer.backends.web-02]\nbackup = true\n",
                "balancer.backends",
            ),
            (
                "[balancer]\nejection_base_ms = 5000\nejection_max_ms = 1000\n",
                "balancer.ejection_max_ms",
            ),
            (
                "[balancer]\ntunnel_half_closed_timeout_ms = 0\n",
                "balancer.tunnel_half_closed_timeout_ms",
            ),
        ] {
            let e = Topology::parse(&format!("{toml}{}", hosts()), "x.toml").unwrap_err();
            assert!(e.key.starts_with(key), "{toml}: {e}");
        }
        // A misspelt key is a syntax error naming its line.
        let e = Topology::parse(
            &format!("[balancer.backends.web-01]\nweigth = 2\n{}", hosts()),
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.reason.contains("weigth"), "{e}");
    }
}
