//! The HTTP listener's handler: every request is answered `301 Moved Permanently` to the
//! same host and target over HTTPS (RFC 9110 §15.4.2; RFC 6797 §7.2 for why plain HTTP
//! only redirects and never carries HSTS).

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};

use crate::proxy::{local, request_host, Body, HostError};

/// Redirects to `https://{host}{:https_port unless 443}{path?query}` when the request's
/// host is one of the site's names; any other valid host gets 421 and a missing, repeated
/// or invalid one 400, so the redirect never names a host outside the configuration (a
/// reflected `Host` would make a cacheable open redirect).
#[derive(Debug, Clone)]
pub(crate) struct Redirect {
    site_names: Arc<[String]>,
    https_port: u16,
}

impl Redirect {
    pub(crate) fn new(site_names: &[String], https_port: u16) -> Redirect {
        Redirect {
            site_names: site_names.iter().map(|n| n.to_ascii_lowercase()).collect(),
            https_port,
        }
    }

    /// The `Location` for `req`, or the status refusing it.
    pub(crate) fn location<B>(&self, req: &Request<B>) -> Result<String, StatusCode> {
        let host = request_host(req.version(), req.uri(), req.headers(), &self.site_names)
            .map_err(|e| match e {
                HostError::Bad => StatusCode::BAD_REQUEST,
                HostError::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            })?;
        let port = if self.https_port == 443 {
            String::new()
        } else {
            format!(":{}", self.https_port)
        };
        let target = match req.uri().path_and_query().map(|pq| pq.as_str()) {
            Some(pq) if pq.starts_with('/') => pq,
            _ => "/",
        };
        Ok(format!("https://{host}{port}{target}"))
    }
}

impl<B> tower::Service<Request<B>> for Redirect {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let resp = match self.location(&req) {
            Ok(location) => {
                let mut resp = local(StatusCode::MOVED_PERMANENTLY, &format!("see {location}"));
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                resp
            }
            Err(status) => local(status, "this server does not serve that host"),
        };
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

    fn names() -> Vec<String> {
        vec!["www.foobar.com".into(), "foobar.com".into()]
    }

    #[test]
    fn keeps_host_path_and_query() {
        let r = Redirect::new(&names(), 443);
        assert_eq!(
            r.location(&req(Some("foobar.com:80"), "/a/b?c=1")),
            Ok("https://foobar.com/a/b?c=1".into())
        );
        assert_eq!(
            r.location(&req(Some("WWW.FOOBAR.COM."), "/")),
            Ok("https://www.foobar.com/".into())
        );
    }

    #[test]
    fn adds_non_default_https_port() {
        let r = Redirect::new(&names(), 8443);
        assert_eq!(
            r.location(&req(Some("www.foobar.com:8080"), "/")),
            Ok("https://www.foobar.com:8443/".into())
        );
    }

    #[test]
    fn never_redirects_outside_the_site_names() {
        let r = Redirect::new(&names(), 443);
        let no = |host| r.location(&req(host, "/p"));
        assert_eq!(
            no(Some("evil.example")),
            Err(StatusCode::MISDIRECTED_REQUEST)
        );
        assert_eq!(no(Some("[::1]:8080")), Err(StatusCode::MISDIRECTED_REQUEST));
        assert_eq!(no(Some("evil.com/@x")), Err(StatusCode::BAD_REQUEST));
        assert_eq!(
            no(Some("www.foobar.com:99999x")),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(no(None), Err(StatusCode::BAD_REQUEST));
    }
}
