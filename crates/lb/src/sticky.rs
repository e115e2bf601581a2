//! Cookie stickiness (HAProxy `cookie NAME insert indirect`): the load balancer names the
//! backend that served a client in a cookie of its own and sends the client's next
//! requests there while that backend is available.
//!
//! The cookie's value is an opaque token per backend — the first 16 hex digits of the
//! xxHash64 of the backend's name — so it reveals no address and is the same on every load
//! balancer of a pair. The cookie is `NAME=TOKEN; Path=/; HttpOnly; Secure;
//! SameSite=Lax` (RFC 6265 §4.1), a session cookie; it is set on a response only when the
//! request did not already carry that backend's token (a new client, or one re-pinned
//! because its backend went down, was drained or ejected). The load balancer's own cookie
//! is passed on to the backend like any other.

use http::header::{HeaderMap, HeaderValue, COOKIE};

use crate::selection::hash;

/// The cookie's name and every backend's token, in backend order.
#[derive(Debug)]
pub(crate) struct Sticky {
    name: String,
    tokens: Vec<String>,
}

impl Sticky {
    /// For backends named `names`, in order.
    pub(crate) fn new(name: &str, names: &[&str]) -> Sticky {
        Sticky {
            name: name.to_string(),
            tokens: names
                .iter()
                .map(|n| format!("{:016x}", hash(n.as_bytes())))
                .collect(),
        }
    }

    /// The backend index the request's cookie names, if it carries a known token. Every
    /// `Cookie` field is searched (HTTP/2 sends one per crumb, RFC 9113 §8.2.3).
    pub(crate) fn pinned(&self, headers: &HeaderMap) -> Option<usize> {
        for field in headers.get_all(COOKIE) {
            let Ok(text) = field.to_str() else { continue };
            for pair in text.split(';') {
                let Some((name, value)) = pair.trim().split_once('=') else {
                    continue;
                };
                if name == self.name {
                    let value = value.trim().trim_matches('"');
                    return self.tokens.iter().position(|t| t == value);
                }
            }
        }
        None
    }

    /// The `Set-Cookie` value pinning a client to backend `index`.
    pub(crate) fn set_cookie(&self, index: usize) -> Option<HeaderValue> {
        let token = self.tokens.get(index)?;
        HeaderValue::from_str(&format!(
            "{}={token}; Path=/; HttpOnly; Secure; SameSite=Lax",
            self.name
        ))
        .ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_set_cookie_round_trips_to_its_backend() {
        let s = Sticky::new("lb", &["web-01", "web-02"]);
        for i in 0..2 {
            let set = s.set_cookie(i).unwrap();
            let pair = set.to_str().unwrap().split(';').next().unwrap().to_string();
            let mut h = HeaderMap::new();
            h.append(COOKIE, HeaderValue::from_static("a=1"));
            h.append(
                COOKIE,
                HeaderValue::from_str(&format!("x=y; {pair}")).unwrap(),
            );
            assert_eq!(s.pinned(&h), Some(i));
        }
        assert!(s
            .set_cookie(0)
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("; Path=/; HttpOnly; Secure; SameSite=Lax"));
        assert_ne!(s.set_cookie(0), s.set_cookie(1));
        assert_eq!(s.set_cookie(2), None);
    }

    #[test]
    fn unknown_tokens_and_other_cookies_pin_nothing() {
        let s = Sticky::new("lb", &["web-01"]);
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_static("lb=0123456789abcdef; lbx=1"),
        );
        assert_eq!(s.pinned(&h), None);
        h.insert(COOKIE, HeaderValue::from_static("xlb=1"));
        assert_eq!(s.pinned(&h), None);
        assert_eq!(s.pinned(&HeaderMap::new()), None);
    }
}
