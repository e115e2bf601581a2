//! The application files: the embedded copies written by [`deploy_site`], and the static
//! file service over the docroot with validators (`ETag`, `Last-Modified`) and conditional
//! requests (RFC 9110 §8.8 and §13).

use std::hash::Hasher;
use std::path::Path;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{
    CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

/// The application files shipped inside the binary: `(file name, contents)`.
pub const SITE_FILES: &[(&str, &[u8])] = &[
    ("index.html", include_bytes!("../site/index.html")),
    ("app.js", include_bytes!("../site/app.js")),
    ("style.css", include_bytes!("../site/style.css")),
    ("404.html", include_bytes!("../site/404.html")),
    ("favicon.svg", include_bytes!("../site/favicon.svg")),
];

/// The page served with status 404 for a missing file, relative to the docroot.
pub const NOT_FOUND_PAGE: &str = "404.html";

/// Writes the embedded application files ([`SITE_FILES`]) into `docroot`, creating it.
///
/// A file whose content is already identical is left untouched, so its modification time
/// (and with it `Last-Modified`) survives restarts; others are written to a temporary name
/// and renamed into place, so the server never serves a half-written file.
///
/// Errors: the I/O error of creating the directory or writing a file.
pub fn deploy_site(docroot: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(docroot)?;
    for (name, contents) in SITE_FILES {
        let path = docroot.join(name);
        if std::fs::read(&path).is_ok_and(|old| old == *contents) {
            continue;
        }
        let tmp = docroot.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

/// Largest body (bytes) whose `ETag` is a hash of its content; larger files get one made of
/// their size and modification time.
const MAX_HASHED: u64 = 1 << 20;

/// Content codings whose names the outer layer appends to an `ETag`.
const CODINGS: &[&str] = &["gzip", "br", "deflate", "zstd"];

/// Middleware around the static file service:
/// - adds `charset=utf-8` to textual content types that lack a charset;
/// - tags `200` responses with a strong `ETag` (length and SipHash of the content, which is
///   the same on every web server holding the same files) and `Cache-Control: no-cache`;
/// - answers `If-None-Match` (weak comparison, any content-coding variant of the tag) with
///   `304 Not Modified`, and then ignores `If-Modified-Since` (RFC 9110 §13.1.3).
pub(crate) async fn conditional(mut req: Request, next: Next) -> Response {
    let if_none_match = req.headers().get(IF_NONE_MATCH).cloned();
    if if_none_match.is_some() {
        req.headers_mut().remove(IF_MODIFIED_SINCE);
    }
    let head = req.method() == Method::HEAD;
    if head {
        // The tag needs the content, which a HEAD response does not carry.
        *req.method_mut() = Method::GET;
    }
    let mut resp = next.run(req).await;
    add_charset(resp.headers_mut());
    if resp.status() != StatusCode::OK {
        return if head { without_body(resp) } else { resp };
    }
    let (mut parts, body) = resp.into_parts();
    let length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (tag, body) = match length {
        Some(n) if n <= MAX_HASHED => match axum::body::to_bytes(body, n as usize).await {
            Ok(bytes) => {
                let mut h = std::hash::DefaultHasher::new();
                h.write(&bytes);
                (
                    Some(format!("{n:x}-{:016x}", h.finish())),
                    Body::from(bytes),
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading a static file failed");
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
        },
        _ => {
            let modified = parts
                .headers
                .get(LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            let tag = match (length, modified) {
                (Some(n), Some(m)) => Some(format!("{n:x}-t{:x}", m.as_secs())),
                _ => None,
            };
            (tag, body)
        }
    };
    let Some(tag) = tag else {
        let resp = Response::from_parts(parts, body);
        return if head { without_body(resp) } else { resp };
    };
    parts
        .headers
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(matched) = if_none_match
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| matching_tag(v, &tag))
    {
        let mut headers = parts.headers;
        headers.remove(CONTENT_LENGTH);
        headers.remove(CONTENT_TYPE);
        if let Ok(v) = HeaderValue::from_str(&matched) {
            headers.insert(ETAG, v);
        }
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut().extend(headers);
        return resp;
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{tag}\"")) {
        parts.headers.insert(ETAG, v);
    }
    let resp = Response::from_parts(parts, body);
    if head {
        without_body(resp)
    } else {
        resp
    }
}

/// Middleware outside the compression layer: a compressed response is a different
/// representation, so its strong `ETag` gets the coding appended (`"tag"` → `"tag-gzip"`),
/// as RFC 9110 §8.8.3 requires of strong validators.
pub(crate) async fn tag_encoding(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let coding = resp
        .headers()
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let tag = resp
        .headers()
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let (Some(coding), Some(tag)) = (coding, tag) {
        if let Some(inner) = tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            if let Ok(v) = HeaderValue::from_str(&format!("\"{inner}-{coding}\"")) {
                resp.headers_mut().insert(ETAG, v);
            }
        }
    }
    resp
}

/// The entity tag of `if_none_match` that matches `tag` by weak comparison (RFC 9110
/// §8.8.3.2), ignoring a content-coding suffix, in strong form; `"*"` matches anything.
fn matching_tag(if_none_match: &str, tag: &str) -> Option<String> {
    for candidate in if_none_match.split(',').map(str::trim) {
        if candidate == "*" {
            return Some(format!("\"{tag}\""));
        }
        let opaque = candidate.strip_prefix("W/").unwrap_or(candidate);
        let Some(inner) = opaque.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
            continue;
        };
        let base = CODINGS
            .iter()
            .find_map(|c| inner.strip_suffix(&format!("-{c}")))
            .unwrap_or(inner);
        if base == tag {
            return Some(opaque.to_string());
        }
    }
    None
}

fn add_charset(headers: &mut HeaderMap) {
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let textual = ct.starts_with("text/")
        || ct.starts_with("application/javascript")
        || ct.starts_with("application/json")
        || ct.starts_with("image/svg+xml");
    if textual && !ct.contains("charset") {
        if let Ok(v) = HeaderValue::from_str(&format!("{ct}; charset=utf-8")) {
            headers.insert(CONTENT_TYPE, v);
        }
    }
}

fn without_body(resp: Response) -> Response {
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, Body::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_comparison_with_codings() {
        assert_eq!(matching_tag("\"a-1\"", "a-1").as_deref(), Some("\"a-1\""));
        assert_eq!(
            matching_tag("W/\"x\", \"a-1-gzip\"", "a-1").as_deref(),
            Some("\"a-1-gzip\"")
        );
        assert_eq!(matching_tag("W/\"a-1\"", "a-1").as_deref(), Some("\"a-1\""));
        assert_eq!(matching_tag("*", "a-1").as_deref(), Some("\"a-1\""));
        assert_eq!(matching_tag("\"a-2\"", "a-1"), None);
        assert_eq!(matching_tag("a-1", "a-1"), None);
    }

    #[test]
    fn deploy_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        deploy_site(&root).unwrap();
        let before = std::fs::metadata(root.join("index.html"))
            .unwrap()
            .modified()
            .unwrap();
        deploy_site(&root).unwrap();
        let after = std::fs::metadata(root.join("index.html"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after);
        for (name, contents) in SITE_FILES {
            assert_eq!(std::fs::read(root.join(name)).unwrap(), *contents);
        }
    }
}

/// Longest path segment a file name can have (`NAME_MAX` on Linux, path_resolution(7));
/// a longer segment names no file.
pub(crate) const MAX_SEGMENT_BYTES: usize = 255;

/// Answers 404 for a path with a segment longer than [`MAX_SEGMENT_BYTES`] (after
/// percent-decoding, as the file service decodes it), before the file system would fail
/// with `ENAMETOOLONG` and the file service with 500.
pub(crate) async fn bounded_segments(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let too_long =
        req.uri().path().split('/').any(|seg| {
            seg.len() > MAX_SEGMENT_BYTES && percent_decoded_len(seg) > MAX_SEGMENT_BYTES
        });
    if too_long {
        return (http::StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    next.run(req).await
}

/// Length in bytes of `seg` once `%XX` escapes are decoded.
fn percent_decoded_len(seg: &str) -> usize {
    let escapes = seg.matches('%').count();
    seg.len().saturating_sub(2 * escapes)
}

#[cfg(test)]
mod segment_tests {
    #[test]
    fn decoded_length_counts_escapes_once() {
        assert_eq!(super::percent_decoded_len("a%20b"), 3);
        assert_eq!(super::percent_decoded_len(&"x".repeat(300)), 300);
    }
}
