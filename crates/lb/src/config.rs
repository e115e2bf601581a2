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
    /// The backends, balanced round robin in this order.
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
    /// Where to append the access log (one line per request on either listener, see
    /// [`crate::start`]); created with mode 0644 when missing, its directory must exist.
    /// `None`: no access log. [`LbConfig::from_topology`] leaves it `None` — the topology
    /// does not place files; the node sets it to `<state>/hosts/<host>/access.log`.
    pub access_log: Option<PathBuf>,
    /// Standalone mode: the site certificate and key files (instead of `pki`'s), and for
    /// TLS backends the CA file their certificates are verified against (no client
    /// certificate). `None`: the lab's PKI.
    pub standalone: Option<StandaloneTls>,
    /// Whether the HTTP (redirect) listener runs. True in the lab.
    pub http_enabled: bool,
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
    /// `(address, t.ports.web)` in topology order, the topology's health check and the
    /// `plain_backends` switch; no access log (`access_log: None`).
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
            .map(|h| Backend {
                name: h.name.clone(),
                addr: SocketAddr::new(h.address, t.ports.web),
                server_name: None,
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
            access_log: None,
            standalone: None,
            http_enabled: true,
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

/// What `rampart lb` is started with (standalone mode: a load balancer alone, in front of
/// any HTTP backends, like `caddy reverse-proxy`).
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    /// The HTTPS listener.
    pub listen: std::net::SocketAddr,
    /// The HTTP listener redirecting to HTTPS, on the same address; `None`: none.
    pub http_listen: Option<std::net::SocketAddr>,
    /// Certificate, key and backend CA.
    pub tls: StandaloneTls,
    /// Backend addresses, in order (named `b1`, `b2`, … in metrics and logs).
    pub backends: Vec<std::net::SocketAddr>,
    /// The names the site answers to (others get 421); empty: any host.
    pub site_names: Vec<String>,
    /// Health-check path (GET, 2xx = up). Default `/`.
    pub health_path: String,
    /// Access log file, if any.
    pub access_log: Option<PathBuf>,
}

impl LbConfig {
    /// The configuration of a standalone load balancer: the topology model's defaults for
    /// every limit (`[limits]`, `[balancer]`, health check rise/fall/interval), a firewall
    /// policy that admits anyone on the two listeners, TLS from files.
    ///
    /// Errors: the HTTP listener is on another address than the HTTPS one (one network seam
    /// has one address).
    pub fn standalone(o: StandaloneOptions) -> Result<LbConfig, String> {
        use std::sync::Arc;
        use topology::{Callers, Policy, Rule, Service, Sources};
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
            .map(|(i, addr)| Backend {
                name: format!("b{}", i + 1),
                addr: *addr,
                server_name: tls_backends.then(|| addr.ip().to_string()),
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
            balancer: t.balancer.clone(),
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
            access_log: o.access_log,
            standalone: Some(o.tls),
            http_enabled: o.http_listen.is_some(),
            extra_certs: Vec::new(),
            resumption: resumption(&t.site.tls),
            acme: None,
        })
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
        let cfg = LbConfig::from_topology(
            &t,
            "lb-01",
            pki::PkiPaths::new("/nonexistent"),
            net(&t, "lb-01"),
        )
        .unwrap();
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

    fn net(t: &Topology, host: &str) -> firewall::Net {
        let policy = Arc::new(Policy::compile(t));
        let address = t
            .host(host)
            .map(|h| h.address)
            .unwrap_or([127, 91, 0, 1].into());
        firewall::Net::loopback(host, address, policy, t.limits.clone())
    }
}
