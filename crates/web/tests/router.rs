//! The whole HTTP stack through `web::router`, without sockets, against an in-memory store.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::Router;
use http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use tower::ServiceExt;
use web::{AppState, HttpMetrics, MemoryStore, Store, WebMetrics};

struct Fixture {
    _dir: tempfile::TempDir,
    app: Router,
    metrics: WebMetrics,
    store: Arc<MemoryStore>,
}

fn fixture_with(store: Option<Arc<MemoryStore>>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let docroot = dir.path().join("www");
    web::deploy_site(&docroot).unwrap();
    let metrics = WebMetrics::new(HttpMetrics::register(&mut Registry::default()));
    let memory = store
        .clone()
        .unwrap_or_else(|| Arc::new(MemoryStore::new("web-01")));
    let app = web::router(AppState {
        host: "web-01".into(),
        docroot,
        health_path: "/healthz".into(),
        store: store.map(|s| s as Arc<dyn Store>),
        metrics: metrics.clone(),
    });
    Fixture {
        _dir: dir,
        app,
        metrics,
        store: memory,
    }
}

fn fixture() -> Fixture {
    fixture_with(Some(Arc::new(MemoryStore::new("web-01"))))
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(&name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }
}

async fn send(app: &Router, req: Request<Body>) -> Reply {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes().to_vec();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

async fn post_json(app: &Router, body: &str) -> Reply {
    let req = Request::post("/api/messages")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    send(app, req).await
}

fn message(author: &str, text: &str) -> String {
    serde_json::json!({ "author": author, "text": text }).to_string()
}

#[tokio::test]
async fn static_files_have_content_types_and_served_by() {
    let f = fixture();
    for (path, ct) in [
        ("/", "text/html; charset=utf-8"),
        ("/index.html", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/favicon.svg", "image/svg+xml; charset=utf-8"),
    ] {
        let r = get(&f.app, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.header(header::CONTENT_TYPE), ct, "{path}");
        assert_eq!(r.header(web::SERVED_BY), "web-01");
        assert!(r.headers.contains_key(header::LAST_MODIFIED), "{path}");
    }
    let r = get(&f.app, "/").await;
    assert!(r.text().contains("foobar guestbook"));
}

#[tokio::test]
async fn etag_and_last_modified_revalidate() {
    let f = fixture();
    let first = get(&f.app, "/style.css").await;
    let etag = first.header(header::ETAG).to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let again = get(&f.app, "/style.css").await;
    assert_eq!(again.header(header::ETAG), etag, "stable tag");

    let req = Request::get("/style.css")
        .header(header::IF_NONE_MATCH, &etag)
        .body(Body::empty())
        .unwrap();
    let r = send(&f.app, req).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(r.body.is_empty());
    assert_eq!(r.header(header::ETAG), etag);
    assert_eq!(r.header(web::SERVED_BY), "web-01");

    // A stale tag wins over a matching If-Modified-Since (RFC 9110 §13.1.3).
    let req = Request::get("/style.css")
        .header(header::IF_NONE_MATCH, "\"stale\"")
        .header(
            header::IF_MODIFIED_SINCE,
            first.header(header::LAST_MODIFIED),
        )
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&f.app, req).await.status, StatusCode::OK);

    let req = Request::get("/style.css")
        .header(
            header::IF_MODIFIED_SINCE,
            first.header(header::LAST_MODIFIED),
        )
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&f.app, req).await.status, StatusCode::NOT_MODIFIED);

    // HEAD carries the same validators and no body.
    let req = Request::head("/style.css").body(Body::empty()).unwrap();
    let r = send(&f.app, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header(header::ETAG), etag);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn compresses_when_asked_and_tags_the_coding() {
    let f = fixture();
    let plain = get(&f.app, "/app.js").await;
    assert!(!plain.headers.contains_key(header::CONTENT_ENCODING));
    let tag = plain.header(header::ETAG).to_string();

    let req = Request::get("/app.js")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(Body::empty())
        .unwrap();
    let r = send(&f.app, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header(header::CONTENT_ENCODING), "gzip");
    assert_eq!(&r.body[..2], &[0x1f, 0x8b], "gzip magic");
    assert!(r.body.len() < plain.body.len());
    let gz_tag = r.header(header::ETAG).to_string();
    assert_eq!(gz_tag, format!("{}-gzip\"", tag.trim_end_matches('"')));

    // The compressed variant's tag revalidates too.
    let req = Request::get("/app.js")
        .header(header::ACCEPT_ENCODING, "gzip")
        .header(header::IF_NONE_MATCH, &gz_tag)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&f.app, req).await.status, StatusCode::NOT_MODIFIED);

    let req = Request::get("/app.js")
        .header(header::ACCEPT_ENCODING, "br")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        send(&f.app, req).await.header(header::CONTENT_ENCODING),
        "br"
    );
}

#[tokio::test]
async fn missing_file_gets_the_404_page() {
    let f = fixture();
    let r = get(&f.app, "/no/such/page").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header(header::CONTENT_TYPE), "text/html; charset=utf-8");
    assert!(r.text().contains("Not found"));
    assert_eq!(r.header(web::SERVED_BY), "web-01");
    assert_eq!(
        get(&f.app, "/../Cargo.toml").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn health_is_ok_and_not_counted() {
    let f = fixture();
    let r = get(&f.app, "/healthz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "ok");
    assert_eq!(r.header(web::SERVED_BY), "web-01");
    assert_eq!(f.metrics.requests_with("2xx"), 0);
    get(&f.app, "/").await;
    get(&f.app, "/nope").await;
    assert_eq!(f.metrics.requests_with("2xx"), 1);
    assert_eq!(f.metrics.requests_with("4xx"), 1);
}

#[tokio::test]
async fn create_then_get_and_list() {
    let f = fixture();
    let r = post_json(&f.app, &message("ann", "hello\nworld")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let created = r.json();
    let id = created["id"].as_u64().unwrap();
    assert_eq!(r.header(header::LOCATION), format!("/api/messages/{id}"));
    assert_eq!(r.header(header::CONTENT_TYPE), "application/json");
    assert_eq!(created["author"], "ann");
    assert_eq!(created["text"], "hello\nworld");
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));

    let got = get(&f.app, &format!("/api/messages/{id}")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json(), created);

    let missing = get(&f.app, "/api/messages/999").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["error"], "not found");

    let bad = get(&f.app, "/api/messages/abc").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.json()["error"].is_string());
}

#[tokio::test]
async fn list_is_newest_first_and_limited() {
    let f = fixture();
    for i in 0..60 {
        f.store
            .insert_message("bot", &format!("n{i}"))
            .await
            .unwrap();
    }
    let r = get(&f.app, "/api/messages").await;
    assert_eq!(r.status, StatusCode::OK);
    let list = r.json()["messages"].as_array().unwrap().clone();
    assert_eq!(list.len(), web::LIST_LIMIT as usize);
    assert_eq!(list[0]["text"], "n59");
    assert_eq!(list[49]["text"], "n10");
}

#[tokio::test]
async fn validation_and_decoding_errors() {
    let f = fixture();
    for (body, status) in [
        ("{not json", StatusCode::BAD_REQUEST),
        ("{\"author\": \"a\"}", StatusCode::BAD_REQUEST),
        (&message("", "x") as &str, StatusCode::UNPROCESSABLE_ENTITY),
        (&message("a", "   "), StatusCode::UNPROCESSABLE_ENTITY),
        (
            &message(&"x".repeat(65), "y"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            &message("a", &"y".repeat(1001)),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (&message("a", "bell\u{7}"), StatusCode::UNPROCESSABLE_ENTITY),
        (
            &message("a", &"y".repeat(20_000)),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ] {
        let r = post_json(&f.app, body).await;
        assert_eq!(r.status, status, "{}", &body[..body.len().min(40)]);
        assert!(r.json()["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let r = post_json(&f.app, &message(&"x".repeat(65), "y")).await;
    assert!(r.json()["error"].as_str().unwrap().contains("author"));

    let req = Request::post("/api/messages")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(message("a", "b")))
        .unwrap();
    let r = send(&f.app, req).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"].is_string());
    assert!(f.store.list_messages(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn whoami_names_host_and_db_nodes() {
    let f = fixture();
    let r = get(&f.app, "/api/whoami").await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    assert_eq!(body["served_by"], "web-01");
    assert_eq!(body["db"]["write_node"], "web-01");
    assert_eq!(body["db"]["read_node"], "web-01");
    assert!(body["db"]["lag_seconds"].is_null());
    assert!(body["db"]["engine"].is_string());
}

#[tokio::test]
async fn database_failure_is_503_json() {
    let f = fixture();
    f.store.set_failing(true);
    for r in [
        get(&f.app, "/api/messages").await,
        get(&f.app, "/api/whoami").await,
        post_json(&f.app, &message("a", "b")).await,
    ] {
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.json()["error"], "database unavailable");
    }
    assert_eq!(f.metrics.requests_with("5xx"), 3);
}

#[tokio::test]
async fn api_without_store_or_route_is_404_json() {
    let f = fixture_with(None);
    let r = get(&f.app, "/api/messages").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"], "not found");

    let f = fixture();
    let r = get(&f.app, "/api/nothing-here").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"], "not found");
    let req = Request::builder()
        .method(Method::DELETE)
        .uri("/api/messages")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        send(&f.app, req).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn guestbook_over_the_sqlite_client() {
    let dir = tempfile::tempdir().unwrap();
    let topology = test_support::topology_in_block(92);
    let cfg = db::ClientConfig::from_topology(
        &topology,
        "web-01",
        dir.path(),
        test_support::net(&topology, "web-01"),
        db::Engine::Sqlite,
    )
    .unwrap();
    let client = db::connect_client(cfg).await.unwrap();
    let docroot = dir.path().join("www");
    web::deploy_site(&docroot).unwrap();
    let app = web::router(AppState {
        host: "web-01".into(),
        docroot,
        health_path: "/healthz".into(),
        store: Some(Arc::new(client)),
        metrics: WebMetrics::new(HttpMetrics::register(&mut Registry::default())),
    });

    let first = post_json(&app, &message("ann", "first")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = post_json(&app, &message("bob", "second")).await;
    assert_eq!(second.status, StatusCode::CREATED);
    let id = second.json()["id"].as_u64().unwrap();
    assert_eq!(
        second.header(header::LOCATION),
        format!("/api/messages/{id}")
    );

    let got = get(&app, &format!("/api/messages/{id}")).await;
    assert_eq!(got.json()["text"], "second");
    let list = get(&app, "/api/messages").await.json();
    let texts: Vec<_> = list["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, ["second", "first"]);
    let who = get(&app, "/api/whoami").await.json();
    assert_eq!(who["served_by"], "web-01");
    assert_eq!(who["db"]["engine"], "sqlite");
    assert_eq!(who["db"]["write_node"], "web-01");
}

#[tokio::test]
async fn an_overlong_path_segment_is_404_not_500() {
    let f = fixture();
    for path in [
        format!("/{}", "a".repeat(256)),
        format!("/dir/{}.html", "b".repeat(1000)),
        format!("/{}", "%41".repeat(300)),
    ] {
        let r = get(&f.app, &path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(get(&f.app, "/").await.status, StatusCode::OK);
}
