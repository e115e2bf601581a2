//! What the application needs from the data tier, as a trait: the real implementation is
//! `db::DbClient`; [`MemoryStore`] keeps messages in memory for tests and database-less runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

pub use db::{DbInfo, Message};

/// A boxed, sendable future returned by [`Store`] methods (keeps the trait usable as
/// `Arc<dyn Store>`).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A data-tier failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not answer (down, unreachable, timed out). The text is the detail
    /// for the log; clients only see a short reason (503).
    #[error("{0}")]
    Unavailable(String),
    /// The database refused the values themselves; the text is shown to the client (422).
    #[error("{0}")]
    Invalid(String),
}

/// The guestbook's storage. Implemented by `db::DbClient` (writes on the primary, reads on
/// a replica) and by [`MemoryStore`].
pub trait Store: Send + Sync + 'static {
    /// Stores a new message and returns it with its id and creation time.
    fn insert_message<'a>(&'a self, author: &'a str, text: &'a str) -> StoreFuture<'a, Message>;
    /// The newest `limit` messages, newest first.
    fn list_messages(&self, limit: u32) -> StoreFuture<'_, Vec<Message>>;
    /// The message with `id`, `None` when there is none.
    fn get_message(&self, id: u64) -> StoreFuture<'_, Option<Message>>;
    /// The engine and the nodes serving writes and reads.
    fn info(&self) -> StoreFuture<'_, DbInfo>;
}

impl Store for db::DbClient {
    fn insert_message<'a>(&'a self, author: &'a str, text: &'a str) -> StoreFuture<'a, Message> {
        Box::pin(async move {
            db::DbClient::insert_message(self, author, text)
                .await
                .map_err(StoreError::from)
        })
    }

    fn list_messages(&self, limit: u32) -> StoreFuture<'_, Vec<Message>> {
        Box::pin(async move {
            db::DbClient::list_messages(self, limit)
                .await
                .map_err(StoreError::from)
        })
    }

    fn get_message(&self, id: u64) -> StoreFuture<'_, Option<Message>> {
        Box::pin(async move {
            db::DbClient::get_message(self, id)
                .await
                .map_err(StoreError::from)
        })
    }

    fn info(&self) -> StoreFuture<'_, DbInfo> {
        Box::pin(async move { db::DbClient::info(self).await.map_err(StoreError::from) })
    }
}

impl From<db::DbError> for StoreError {
    fn from(e: db::DbError) -> StoreError {
        match e {
            db::DbError::Invalid(reason) => StoreError::Invalid(reason),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// An in-memory [`Store`]: ids count up from 1, nothing survives the process. For tests and
/// for running the web role without a database host.
#[derive(Debug, Default)]
pub struct MemoryStore {
    host: String,
    messages: Mutex<Vec<Message>>,
    failing: std::sync::atomic::AtomicBool,
}

impl MemoryStore {
    /// An empty store whose [`DbInfo`] names `host` as write and read node.
    pub fn new(host: &str) -> MemoryStore {
        MemoryStore {
            host: host.to_string(),
            ..MemoryStore::default()
        }
    }

    /// Makes every later call fail with a [`StoreError`] (`true`) or succeed again
    /// (`false`), to exercise the callers' error paths.
    pub fn set_failing(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::Relaxed);
    }

    fn check(&self) -> Result<std::sync::MutexGuard<'_, Vec<Message>>, StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::Unavailable(
                "in-memory store set to fail".into(),
            ));
        }
        self.messages
            .lock()
            .map_err(|_| StoreError::Unavailable("in-memory store poisoned".into()))
    }
}

impl Store for MemoryStore {
    fn insert_message<'a>(&'a self, author: &'a str, text: &'a str) -> StoreFuture<'a, Message> {
        let result = self.check().map(|mut messages| {
            let m = Message {
                id: messages.len() as u64 + 1,
                author: author.to_string(),
                text: text.to_string(),
                created_at: rfc3339_now(),
            };
            messages.push(m.clone());
            m
        });
        Box::pin(std::future::ready(result))
    }

    fn list_messages(&self, limit: u32) -> StoreFuture<'_, Vec<Message>> {
        let result = self.check().map(|messages| {
            messages
                .iter()
                .rev()
                .take(limit as usize)
                .cloned()
                .collect()
        });
        Box::pin(std::future::ready(result))
    }

    fn get_message(&self, id: u64) -> StoreFuture<'_, Option<Message>> {
        let result = self
            .check()
            .map(|messages| messages.iter().find(|m| m.id == id).cloned());
        Box::pin(std::future::ready(result))
    }

    fn info(&self) -> StoreFuture<'_, DbInfo> {
        let result = self.check().map(|_| DbInfo {
            engine: "memory".into(),
            write_node: self.host.clone(),
            read_node: self.host.clone(),
            lag_seconds: None,
        });
        Box::pin(std::future::ready(result))
    }
}

/// The current time as RFC 3339 UTC with second precision.
fn rfc3339_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}
