//! The guestbook application under `/api`: sign (`POST /api/messages`), read
//! (`GET /api/messages`, `GET /api/messages/{id}`) and `GET /api/whoami`.
//!
//! Every error is JSON `{"error": "..."}`: 400 for a body or path that cannot be decoded,
//! 413 for a body over [`MAX_BODY_BYTES`], 422 for a message that fails validation, 404 for
//! an unknown message or route, 503 when the database fails (the detail goes to the log).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, State};
use axum::http::{header::LOCATION, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::store::{DbInfo, Message, Store, StoreError};

/// Largest accepted request body in bytes (16 KiB); larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// How many messages `GET /api/messages` returns.
pub const LIST_LIMIT: u32 = 50;
/// Longest author name, in characters (Unicode scalar values).
pub const MAX_AUTHOR_CHARS: usize = 64;
/// Longest message text, in characters.
pub const MAX_TEXT_CHARS: usize = 1000;

/// An API error: a status and the reason sent as `{"error": reason}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    reason: String,
}

impl ApiError {
    fn new(status: StatusCode, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            reason: reason.into(),
        }
    }

    /// 404 `not found`.
    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not found")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
        }
        (self.status, axum::Json(Body { error: self.reason })).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let status = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, r.body_text())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Invalid(reason) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, reason),
            StoreError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "database request failed");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
            }
        }
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
struct Json<T>(T);

/// `axum::extract::Path` whose rejections are [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
struct Path<T>(T);

#[derive(Clone)]
struct ApiState {
    host: String,
    store: Arc<dyn Store>,
}

/// The `/api` routes (to be nested under `/api`) for `host` over `store`; unknown paths
/// answer 404 JSON.
pub(crate) fn routes(host: &str, store: Arc<dyn Store>) -> Router {
    Router::new()
        .route("/messages", get(list_messages).post(create_message))
        .route("/messages/{id}", get(get_message))
        .route("/whoami", get(whoami))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ApiState {
            host: host.to_string(),
            store,
        })
}

/// What `/api` answers on a host without the application role: 404 JSON for everything.
pub(crate) fn absent() -> Router {
    Router::new().fallback(|| async { ApiError::not_found() })
}

/// The body of `POST /api/messages`.
#[derive(Debug, Deserialize)]
struct NewMessage {
    author: String,
    text: String,
}

/// A message that passed validation: trimmed, `\r\n` folded to `\n`.
#[derive(Debug, PartialEq)]
struct Valid {
    author: String,
    text: String,
}

/// Checks a new message: `author` 1..=64 characters without control characters, `text`
/// 1..=1000 characters whose only control character is newline; both trimmed first.
/// Returns the reason for the 422 on failure.
fn validate(m: &NewMessage) -> Result<Valid, String> {
    let author = m.author.trim();
    let text = m.text.replace("\r\n", "\n");
    let text = text.trim();
    let author_len = author.chars().count();
    if author_len == 0 {
        return Err("author must not be empty".into());
    }
    if author_len > MAX_AUTHOR_CHARS {
        return Err(format!(
            "author is {author_len} characters, at most {MAX_AUTHOR_CHARS} allowed"
        ));
    }
    if author.chars().any(char::is_control) {
        return Err("author must not contain control characters".into());
    }
    let text_len = text.chars().count();
    if text_len == 0 {
        return Err("text must not be empty".into());
    }
    if text_len > MAX_TEXT_CHARS {
        return Err(format!(
            "text is {text_len} characters, at most {MAX_TEXT_CHARS} allowed"
        ));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err("text must not contain control characters other than newline".into());
    }
    Ok(Valid {
        author: author.to_string(),
        text: text.to_string(),
    })
}

async fn create_message(
    State(s): State<ApiState>,
    Json(new): Json<NewMessage>,
) -> Result<Response, ApiError> {
    let valid =
        validate(&new).map_err(|reason| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, reason))?;
    let message = s.store.insert_message(&valid.author, &valid.text).await?;
    let mut resp = (StatusCode::CREATED, axum::Json(&message)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/messages/{}", message.id)) {
        resp.headers_mut().insert(LOCATION, v);
    }
    Ok(resp)
}

#[derive(Serialize)]
struct MessageList {
    messages: Vec<Message>,
}

async fn list_messages(State(s): State<ApiState>) -> Result<axum::Json<MessageList>, ApiError> {
    let messages = s.store.list_messages(LIST_LIMIT).await?;
    Ok(axum::Json(MessageList { messages }))
}

async fn get_message(
    State(s): State<ApiState>,
    Path(id): Path<u64>,
) -> Result<axum::Json<Message>, ApiError> {
    match s.store.get_message(id).await? {
        Some(m) => Ok(axum::Json(m)),
        None => Err(ApiError::not_found()),
    }
}

#[derive(Serialize)]
struct WhoAmI {
    served_by: String,
    db: DbInfo,
}

async fn whoami(State(s): State<ApiState>) -> Result<axum::Json<WhoAmI>, ApiError> {
    let db = s.store.info().await?;
    Ok(axum::Json(WhoAmI {
        served_by: s.host.clone(),
        db,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(author: &str, text: &str) -> Result<Valid, String> {
        validate(&NewMessage {
            author: author.into(),
            text: text.into(),
        })
    }

    #[test]
    fn validation_rules() {
        assert_eq!(
            check("  ann ", " hi\r\nthere "),
            Ok(Valid {
                author: "ann".into(),
                text: "hi\nthere".into()
            })
        );
        assert!(check("", "x").is_err());
        assert!(check("   ", "x").is_err());
        assert!(check("a", " \n ").is_err());
        assert!(check(&"é".repeat(64), "x").is_ok());
        assert!(check(&"é".repeat(65), "x").is_err());
        assert!(check("a", &"ü".repeat(1000)).is_ok());
        assert!(check("a", &"ü".repeat(1001)).is_err());
        assert!(check("a\nb", "x").is_err());
        assert!(check("a", "x\u{7}y").is_err());
        assert!(check("a", "x\ty").is_err());
    }
}
