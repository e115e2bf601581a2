//! The HTTP listener's handler: every request is answered `301 Moved Permanently` to the
//! same host and target over HTTPS (RFC 9110 §15.4.2; RFC 6797 §7.2 for why plain HTTP
//! only redirects and never carries HSTS).

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};

use crate::proxy::{local, Body};

/// Redirects to `https://{host}{:https_port unless 443}{path?query}`.
#[derive(Debug, Clone)]
pub(crate) struct Redirect {
    site_domain: Arc<str>,
    https_port: u16,
}

impl Redirect {
    pub(crate) fn new(site_domain: &str, https_port: u16) -> Redirect {
        Redirect {
            site_domain: site_domain.into(),
            https_port,
        }
    }

    /// The `Location` for `req`: its `Host` (or request-target authority) without the port,
    /// falling back to the site domain when absent or not a plain host name or address.
    pub(crate) fn location<B>(&self, req: &Request<B>) -> String {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .map(strip_port)
            .filter(|h| is_host(h))
            .unwrap_or(&self.site_domain);
        let port = if self.https_port == 443 {
            String::new()
        } else {
            format!(":{}", self.https_port)
        };
        let target = match req.uri().path_and_query().map(|pq| pq.as_str()) {
            Some(pq) if pq.starts_with('/') => pq,
            _ => "/",
        };
        format!("https://{host}{port}{target}")
    }
}

/// `host[:port]` → `host`; `[v6]:port` → `[v6]`.
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        }
    } else {
        authority.split(':').next().unwrap_or(authority)
    }
}

/// A DNS name, IPv4 address or bracketed IPv6 address — nothing that could change the
/// structure of the `Location` URL.
fn is_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl<B> tower::Service<Request<B>> for Redirect {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let location = self.location(&req);
        let mut resp = local(StatusCode::MOVED_PERMANENTLY, &format!("see {location}"));
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        ready(Ok(resp))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(host: Option<&str>, uri: &str) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn keeps_host_path_and_query() {
        let r = Redirect::new("www.foobar.com", 443);
        assert_eq!(
            r.location(&req(Some("foobar.com:80"), "/a/b?c=1")),
            "https://foobar.com/a/b?c=1"
        );
    }

    #[test]
    fn adds_non_default_https_port() {
        let r = Redirect::new("www.foobar.com", 8443);
        assert_eq!(
            r.location(&req(Some("www.foobar.com:8080"), "/")),
            "https://www.foobar.com:8443/"
        );
        assert_eq!(
            r.location(&req(Some("[::1]:8080"), "/x")),
            "https://[::1]:8443/x"
        );
    }

    #[test]
    fn falls_back_to_the_site_domain() {
        let r = Redirect::new("www.foobar.com", 443);
        assert_eq!(r.location(&req(None, "/p")), "https://www.foobar.com/p");
        assert_eq!(
            r.location(&req(Some("evil.com/@x"), "/p")),
            "https://www.foobar.com/p"
        );
    }
}
