//! What the load balancer is started with, and how it is derived from a topology.

use std::net::SocketAddr;
use std::path::PathBuf;

use topology::{HealthCheck, Role, Topology};

/// One upstream web server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Host name, e.g. `web-01`. Used as the TLS server name the backend's certificate must
    /// carry, in logs and as the `backend` label of `rampart_backend_up`. Unique per
    /// [`LbConfig`].
    pub name: String,
    /// Where the backend's web listener is.
    pub addr: SocketAddr,
    /// The name the backend's TLS certificate must carry, sent as SNI; `None`: `name`
    /// (lab backends are named after their host). Unused for plain backends.
    pub server_name: Option<String>,
    /// Relative share of requests, 1–256 (`[balancer.backends.<host>] weight`); 1 when
    /// made with [`Backend::new`].
    pub weight: u32,
    /// Used only while no non-backup backend is available
    /// (`[balancer.backends.<host>] backup`).
    pub backup: bool,
}

impl Backend {
    /// A primary backend of weight 1 whose certificate carries `name`.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Backend {
        Backend {
            name: name.into(),
            addr,
            server_name: None,
            weight: 1,
            backup: false,
        }
    }
}

/// Everything [`crate::start`] needs.
#[derive(Debug, Clone)]
pub struct LbConfig {
    /// This host's name, e.g. `lb-01`: the identity presented to backends (its host
    /// certificate) and the host whose firewall rules guard the listeners.
    pub host: String,
    /// This host's network seam: both listeners are bound through it (its address, the
    /// policy's https/http rules, the `limits.https`/`limits.http` limits) and every
    /// upstream connection leaves from its address.
    pub net: firewall::Net,
    /// HTTPS listener port; 0 picks an ephemeral port (see [`crate::LbHandle::https_addr`]).
    pub https_port: u16,
    /// HTTP listener port (redirects only); 0 picks an ephemeral port.
    pub http_port: u16,
    /// The public site name, e.g. `www.foobar.com`: the redirect target when a request
    /// carries no usable `Host`.
    pub site_domain: String,
    /// The backends, in this order (the order of round robin and of the metrics).
    pub backends: Vec<Backend>,
    /// The insecure variant: plain HTTP/1.1 to the backends instead of mutual TLS.
    pub plain_backends: bool,
    /// Active health-check settings (path, interval, timeout, rise, fall).
    pub health: HealthCheck,
    /// Where the CA, the site certificate and this host's certificate are.
    pub pki: pki::PkiPaths,
    /// Per-backend queueing and buffering (`[balancer]` of the topology).
    pub balancer: topology::BalancerLimits,
    /// Longest pause between two chunks of a request body before 408
    /// (`limits.https.body_timeout_ms`).
    pub request_body_timeout: std::time::Duration,
    /// Longest time to receive a whole request body before 408
    /// (`limits.https.body_deadline_ms`).
    pub request_body_deadline: std::time::Duration,
    /// Names the site answers to (domain, then aliases): other hosts get 421 on HTTPS and
    /// are never redirected to.
    pub site_names: Vec<String>,
    /// Header fields added to HTTPS responses that lack them (`site.response_headers`).
    pub response_headers: Vec<(String, String)>,
    /// Size cap and rotation of the access log (`[access_log]` of the topology).
    pub access_log_rotation: crate::Rotation,
    /// The access log's line format (`[access_log] format`).
    pub access_log_format: topology::AccessLogFormat,
    /// Where to append the access log (one line per request on either listener, see
    /// [`crate::start`]); created with mode 0644 when missing, its directory must exist.
    /// `None`: no access log. [`LbConfig::from_topology`] leaves it `None` — the topology
    /// does not place files; the node sets it to `<state>/hosts/<host>/access.log`.
    pub access_log: Option<PathBuf>,
    /// Standalone mode: the site certificate and key files (instead of `pki`'s), and for
    /// TLS backends the CA file their certificates are verified against (no client
    /// certificate). `None`: the lab's PKI.
    pub standalone: Option<StandaloneTls>,
    /// Whether the HTTP listener runs. True in the lab.
    pub http_enabled: bool,
    /// What the HTTP listener does: redirect to HTTPS (the lab, and the default) or
    /// proxy plain HTTP to the backends like the HTTPS listener (`rampart lb
    /// --http-proxy`; then `X-Forwarded-Proto`/`Forwarded` say `http`).
    pub http_mode: HttpMode,
    /// [`HttpMode::Proxy`] only: the HTTP listener also serves HTTP/2 with prior knowledge
    /// ("h2c", RFC 9113 §3.3; `rampart lb --h2c`), like nginx `listen … http2` or HAProxy
    /// `bind … proto h2`. Default false: HTTP/1.1 only, and a client that starts with the
    /// HTTP/2 preface gets GOAWAY HTTP_1_1_REQUIRED and is closed (see
    /// [`serve::HttpOptions::h2c`]).
    pub h2c: bool,
    /// Where the local admin socket is bound (`rampart lb drain|enable|status`; see
    /// [`crate::admin`]); its directory must exist and the path fit a Unix socket address
    /// (107 bytes) — otherwise a warning is logged and the load balancer runs without it.
    /// `None`: no admin socket.
    /// [`LbConfig::from_topology`] leaves it `None`; the node sets it to
    /// `<state>/hosts/<host>/lb-admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// Further certificates chosen by SNI after the site certificate (the topology's
    /// `[[site.tls.certificates]]`); standalone mode lists its own in [`StandaloneTls`].
    pub extra_certs: Vec<pki::CertFiles>,
    /// Session resumption on the HTTPS listener (`[site.tls]` session cache and tickets).
    /// Fixed when the listener starts: a reload keeps the cache and the ticket keys.
    pub resumption: pki::Resumption,
    /// The site certificate from an ACME server (`[site.acme]`); needs the HTTP listener
    /// for the HTTP-01 challenge. `None`: certificates from files only.
    pub acme: Option<crate::AcmeConfig>,
}

impl LbConfig {
    /// The configuration of host `host` in topology `t`: its address, the site's ports
    /// (443/80 when unresolved), the site domain, every host holding `web` as a backend at
    /// `(address, t.ports.web)` in topology order with its `[balancer.backends.<host>]`
    /// weight and backup flag, the topology's health check and the `plain_backends`
    /// switch; no access log (`access_log: None`).
    ///
    /// `None` when `host` is not in the topology or does not hold the `lb` role.
    pub fn from_topology(
        t: &Topology,
        host: &str,
        pki: pki::PkiPaths,
        net: firewall::Net,
    ) -> Option<LbConfig> {
        let me = t.host(host)?;
        if !me.has(Role::Lb) {
            return None;
        }
        let backends = t
            .hosts_with(Role::Web)
            .map(|h| {
                let o = t.balancer.balancing.backend(&h.name);
                Backend {
                    weight: o.weight,
                    backup: o.backup,
                    ..Backend::new(h.name.clone(), SocketAddr::new(h.address, t.ports.web))
                }
            })
            .collect();
        Some(LbConfig {
            host: me.name.clone(),
            net,
            https_port: t.https_port(),
            http_port: t.http_port(),
            site_domain: t.site.domain.clone(),
            backends,
            plain_backends: t.site.plain_backends,
            health: t.health_check.clone(),
            balancer: t.balancer.clone(),
            request_body_timeout: t.limits.listener(topology::Service::Https).body_timeout(),
            request_body_deadline: t.limits.listener(topology::Service::Https).body_deadline(),
            site_names: t.site.names(),
            response_headers: t
                .site
                .response_headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            access_log_rotation: crate::Rotation {
                max_bytes: t.access_log.max_bytes,
                keep: t.access_log.keep,
            },
            access_log_format: t.access_log.format,
            access_log: None,
            standalone: None,
            http_enabled: true,
            http_mode: HttpMode::Redirect,
            h2c: false,
            admin_socket: None,
            extra_certs: t
                .site
                .tls
                .certificates
                .iter()
                .map(|c| pki::CertFiles {
                    cert: c.cert.clone(),
                    key: c.key.clone(),
                })
                .collect(),
            resumption: resumption(&t.site.tls),
            acme: t.site.acme.as_ref().map(|a| crate::AcmeConfig {
                directory_url: a.directory_url.clone(),
                contact: a.contact.clone(),
                ca_bundle: a.ca_bundle.clone(),
                names: t.site.names(),
                dir: pki.dir.join("acme"),
                renew_at: a.renew_at,
            }),
            pki,
        })
    }
}

/// What the HTTP listener does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpMode {
    /// `301` to the same path on HTTPS (and HTTP-01 challenges under ACME).
    #[default]
    Redirect,
    /// Forward to the backends like the HTTPS listener, plain HTTP/1.1 to the client.
    Proxy,
}

/// What `rampart lb` is started with (standalone mode: a load balancer alone, in front of
/// any HTTP backends, like `caddy reverse-proxy`).
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    /// The HTTPS listener.
    pub listen: std::net::SocketAddr,
    /// The HTTP listener, on the same address; `None`: none.
    pub http_listen: Option<std::net::SocketAddr>,
    /// What the HTTP listener does: redirect to HTTPS or proxy plain HTTP.
    pub http_mode: HttpMode,
    /// The proxying HTTP listener also serves HTTP/2 with prior knowledge (`--h2c`; see
    /// [`LbConfig::h2c`]).
    pub h2c: bool,
    /// Certificate, key and backend CA.
    pub tls: StandaloneTls,
    /// Backends, in order (named `b1`, `b2`, … in metrics, logs and `rampart lb drain`).
    pub backends: Vec<BackendSpec>,
    /// Algorithm, hash header, sticky cookie (`--balance`, `--hash-header`,
    /// `--sticky-cookie`); the other keys keep the topology model's defaults.
    pub balancing: topology::Balancing,
    /// The names the site answers to (others get 421); empty: any host.
    pub site_names: Vec<String>,
    /// Health-check path (GET, 2xx = up). Default `/`.
    pub health_path: String,
    /// Access log file, if any.
    pub access_log: Option<PathBuf>,
    /// Its line format (`--access-log-format`).
    pub access_log_format: topology::AccessLogFormat,
    /// The admin socket (`--admin-socket`), if any.
    pub admin_socket: Option<PathBuf>,
}

impl LbConfig {
    /// The configuration of a standalone load balancer: the topology model's defaults for
    /// every limit (`[limits]`, `[balancer]`, health check rise/fall/interval), a firewall
    /// policy that admits anyone on the two listeners, TLS from files.
    ///
    /// Errors: the HTTP listener is on another address than the HTTPS one (one network seam
    /// has one address); h2c on an HTTP listener that does not proxy; a hash header without the `consistent_hash` algorithm; every
    /// backend a backup.
    pub fn standalone(o: StandaloneOptions) -> Result<LbConfig, String> {
        if o.balancing.hash_header.is_some()
            && o.balancing.algorithm != topology::Algorithm::ConsistentHash
        {
            return Err(format!(
                "--hash-header is only used by --balance consistent-hash, not {}",
                o.balancing.algorithm.as_str().replace('_', "-")
            ));
        }
        for (flag, v) in [
            ("--hash-header", &o.balancing.hash_header),
            ("--sticky-cookie", &o.balancing.sticky_cookie),
        ] {
            if let Some(v) = v {
                if !topology::is_token(v) {
                    return Err(format!(
                        "{flag} {v:?} is not a valid name (letters, digits, '-')"
                    ));
                }
            }
        }
        if !o.backends.is_empty() && o.backends.iter().all(|b| b.backup) {
            return Err("every --backend is a backup: leave at least one without ,backup".into());
        }
        use std::sync::Arc;
        use topology::{Callers, Policy, Rule, Service, Sources};
        if o.http_mode == HttpMode::Proxy && o.http_listen.is_none() {
            return Err("--http-proxy needs --http-listen ADDR (the listener that proxies)".into());
        }
        if o.h2c && o.http_mode != HttpMode::Proxy {
            return Err(
                "--h2c needs --http-proxy (only a proxying HTTP listener serves HTTP/2)".into(),
            );
        }
        if let Some(h) = o.http_listen {
            if h.ip() != o.listen.ip() {
                return Err(format!(
                    "--http-listen {h} must use the address of --listen {} (one listening address)",
                    o.listen
                ));
            }
        }
        let t = Topology::default_topology();
        let rule = |service, port| Rule {
            host: "lb".into(),
            service,
            port,
            sources: Sources::Any,
            callers: Callers::Anyone,
            comment: "standalone load balancer".into(),
        };
        let mut rules = vec![rule(Service::Https, o.listen.port())];
        if let Some(h) = o.http_listen {
            rules.push(rule(Service::Http, h.port()));
        }
        let policy = Arc::new(Policy {
            rules,
            extra: Vec::new(),
        });
        let net = firewall::Net::new(
            "lb",
            o.listen.ip(),
            policy,
            t.limits.clone(),
            firewall::Isolation::Kernel,
        );
        let tls_backends = o.tls.backend_ca.is_some();
        let backends = o
            .backends
            .iter()
            .enumerate()
            .map(|(i, spec)| Backend {
                server_name: tls_backends.then(|| spec.addr.ip().to_string()),
                weight: spec.weight,
                backup: spec.backup,
                ..Backend::new(format!("b{}", i + 1), spec.addr)
            })
            .collect();
        let mut health = t.health_check.clone();
        health.path = o.health_path;
        let https = t.limits.listener(topology::Service::Https);
        Ok(LbConfig {
            host: "lb".into(),
            net,
            https_port: o.listen.port(),
            http_port: o.http_listen.map_or(0, |h| h.port()),
            site_domain: o.site_names.first().cloned().unwrap_or_default(),
            backends,
            plain_backends: !tls_backends,
            health,
            pki: pki::PkiPaths::new("/nonexistent"),
            balancer: topology::BalancerLimits {
                balancing: o.balancing,
                ..t.balancer.clone()
            },
            request_body_timeout: https.body_timeout(),
            request_body_deadline: https.body_deadline(),
            site_names: o.site_names,
            response_headers: t
                .site
                .response_headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            access_log_rotation: crate::Rotation {
                max_bytes: t.access_log.max_bytes,
                keep: t.access_log.keep,
            },
            access_log_format: o.access_log_format,
            access_log: o.access_log,
            standalone: Some(o.tls),
            http_enabled: o.http_listen.is_some(),
            http_mode: o.http_mode,
            h2c: o.h2c,
            admin_socket: o.admin_socket,
            extra_certs: Vec::new(),
            resumption: resumption(&t.site.tls),
            acme: None,
        })
    }
}

/// One `--backend` of `rampart lb`: `ADDR[,weight=N][,backup]`, e.g.
/// `10.0.0.11:8080,weight=3` or `10.0.0.13:8080,backup` (nginx `server … weight=N backup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Where the backend listens.
    pub addr: SocketAddr,
    /// Relative share of requests, 1–256. Default 1.
    pub weight: u32,
    /// Used only while no other backend is available. Default false.
    pub backup: bool,
}

impl std::str::FromStr for BackendSpec {
    type Err = String;

    /// Errors name the part that is wrong and the expected shape.
    fn from_str(text: &str) -> Result<BackendSpec, String> {
        let mut parts = text.split(',');
        let addr = parts.next().unwrap_or_default().trim();
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not IP:PORT (ADDR[,weight=N][,backup])"))?;
        let mut spec = BackendSpec {
            addr,
            weight: 1,
            backup: false,
        };
        for part in parts.map(str::trim) {
            if part == "backup" {
                spec.backup = true;
            } else if let Some(w) = part.strip_prefix("weight=") {
                spec.weight = w
                    .parse()
                    .ok()
                    .filter(|w| (1..=topology::MAX_WEIGHT).contains(w))
                    .ok_or_else(|| format!("weight {w:?} is not 1 to 256"))?;
            } else {
                return Err(format!(
                    "unknown backend option {part:?} (ADDR[,weight=N][,backup])"
                ));
            }
        }
        Ok(spec)
    }
}

fn resumption(t: &topology::SiteTls) -> pki::Resumption {
    pki::Resumption {
        cache_entries: t.session_cache_entries,
        tickets: t.session_tickets,
    }
}

/// Standalone mode's TLS material (see [`LbConfig::standalone`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandaloneTls {
    /// Certificate/key pairs presented to clients, each for the names it covers (SNI); the
    /// first is the default for clients without SNI or asking for another name.
    pub certs: Vec<pki::CertFiles>,
    /// A directory of further pairs, `NAME.pem` (or `NAME.crt`) with `NAME.key`, read in
    /// file-name order after `certs` (and read again on every reload); its first pair is
    /// the default when `certs` is empty.
    pub cert_dir: Option<PathBuf>,
    /// TLS to backends, verified against this PEM CA file; `None`: plain HTTP backends.
    pub backend_ca: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::IpAddr;
    use std::sync::Arc;
    use topology::Policy;

    const TOML: &str = r#"
[site]
https_port = 8443
http_port = 8080

[[hosts]]
name = "lb-01"
address = "127.91.0.10"
roles = ["lb"]

[[hosts]]
name = "web-01"
address = "127.91.0.11"
roles = ["web", "app", "db-primary"]

[[hosts]]
name = "web-02"
address = "127.91.0.12"
roles = ["web", "app"]
"#;

    #[test]
    fn from_topology_takes_every_web_host_as_backend() {
        let t = Topology::parse(TOML, "test.toml").unwrap();
        let cfg = lab_config(&t);
        assert_eq!(cfg.net.address(), "127.91.0.10".parse::<IpAddr>().unwrap());
        assert_eq!((cfg.https_port, cfg.http_port), (8443, 8080));
        assert_eq!(cfg.site_domain, "www.foobar.com");
        let names: Vec<_> = cfg.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["web-01", "web-02"]);
        assert_eq!(cfg.backends[1].addr, "127.91.0.12:9443".parse().unwrap());
    }

    #[test]
    fn from_topology_refuses_hosts_without_lb() {
        let t = Topology::parse(TOML, "test.toml").unwrap();
        let paths = pki::PkiPaths::new("/nonexistent");
        assert!(LbConfig::from_topology(&t, "web-01", paths.clone(), net(&t, "web-01")).is_none());
        assert!(LbConfig::from_topology(&t, "nobody", paths, net(&t, "lb-01")).is_none());
    }

    #[test]
    fn backend_specs_parse_weight_and_backup() {
        let b: BackendSpec = "10.0.0.1:80,weight=3,backup".parse().unwrap();
        assert_eq!(
            b,
            BackendSpec {
                addr: "10.0.0.1:80".parse().unwrap(),
                weight: 3,
                backup: true
            }
        );
        let plain: BackendSpec = "[::1]:8080".parse().unwrap();
        assert_eq!((plain.weight, plain.backup), (1, false));
        for bad in [
            "10.0.0.1",
            "10.0.0.1:80,weight=0",
            "10.0.0.1:80,weight=x",
            "10.0.0.1:80,slow",
        ] {
            assert!(bad.parse::<BackendSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn from_topology_takes_weights_and_backups() {
        let text = format!(
            "[balancer]\nalgorithm = \"least_connections\"\n[balancer.backends.web-02]\nweight = 4\nbackup = true\n{TOML}"
        );
        let t = Topology::parse(&text, "test.toml").unwrap();
        let cfg = lab_config(&t);
        assert_eq!((cfg.backends[0].weight, cfg.backends[0].backup), (1, false));
        assert_eq!((cfg.backends[1].weight, cfg.backends[1].backup), (4, true));
        assert_eq!(
            cfg.balancer.balancing.algorithm,
            topology::Algorithm::LeastConnections
        );
    }

    fn standalone_options(http_mode: HttpMode, h2c: bool) -> StandaloneOptions {
        StandaloneOptions {
            listen: "127.98.2.30:8443".parse().unwrap(),
            http_listen: Some("127.98.2.30:8080".parse().unwrap()),
            http_mode,
            h2c,
            tls: StandaloneTls {
                certs: Vec::new(),
                cert_dir: None,
                backend_ca: None,
            },
            backends: vec!["127.98.2.31:80".parse().unwrap()],
            balancing: topology::Balancing::default(),
            site_names: Vec::new(),
            health_path: "/".into(),
            access_log: None,
            access_log_format: topology::AccessLogFormat::default(),
            admin_socket: None,
        }
    }

    #[test]
    fn standalone_h2c_is_off_by_default_and_only_on_a_proxying_http_listener() {
        let cfg = LbConfig::standalone(standalone_options(HttpMode::Proxy, false)).unwrap();
        assert!(!cfg.h2c);
        let cfg = LbConfig::standalone(standalone_options(HttpMode::Proxy, true)).unwrap();
        assert!(cfg.h2c);
        let e = LbConfig::standalone(standalone_options(HttpMode::Redirect, true)).unwrap_err();
        assert!(e.contains("--h2c needs --http-proxy"), "{e}");
        let t = Topology::parse(TOML, "test.toml").unwrap();
        let cfg = lab_config(&t);
        assert!(!cfg.h2c, "the lab's HTTP listener only redirects");
    }

    /// lb-01's configuration from `t` (certificates never read).
    fn lab_config(t: &Topology) -> LbConfig {
        LbConfig::from_topology(
            t,
            "lb-01",
            pki::PkiPaths::new("/nonexistent"),
            net(t, "lb-01"),
        )
        .unwrap()
    }

    fn net(t: &Topology, host: &str) -> firewall::Net {
        let policy = Arc::new(Policy::compile(t));
        let address = t
            .host(host)
            .map(|h| h.address)
            .unwrap_or([127, 91, 0, 1].into());
        firewall::Net::loopback(host, address, policy, t.limits.clone())
    }
}
