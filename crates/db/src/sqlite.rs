//! The embedded engine: one SQLite file shared by every application host, no replication.
//! Used when MariaDB is not installed (`engine = "auto"`) or asked for (`engine = "sqlite"`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::{DbError, Message};

/// Schema of the guestbook. `created_at` is RFC 3339 UTC with milliseconds, set by SQLite.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS guestbook (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    author     TEXT NOT NULL,
    text       TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);";

/// How long a writer waits for another process's lock before failing (SQLite
/// `busy_timeout`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// `<state>/db/<database>.sqlite3`, the file every application host opens.
pub fn sqlite_path(state_dir: &Path, database: &str) -> PathBuf {
    state_dir.join("db").join(format!("{database}.sqlite3"))
}

/// An open store. Cheap to clone; every call runs on the blocking pool.
#[derive(Clone)]
pub(crate) struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

/// How long opening the shared file may retry a busy database.
const OPEN_RETRY_FOR: Duration = Duration::from_secs(15);

/// Opens the file with a busy timeout, switches it to WAL unless it already is, and
/// creates the schema in one immediate transaction (which takes the write lock up front,
/// waiting for the busy timeout, instead of failing on a lock upgrade half-way).
///
/// Only the first opener of a fresh file switches the journal mode: the switch needs the
/// database to itself and answers SQLITE_BUSY at once rather than through the busy handler
/// (sqlite.org/wal.html, "Activating And Configuring WAL Mode"; the mode persists in the
/// file), so later openers only read it. A switch another opener wins is seen on the next
/// attempt ([`SqliteStore::open`] retries busy set-ups).
fn set_up(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.pragma_query_value(None, "journal_mode", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        let now: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !now.eq_ignore_ascii_case("wal") {
            // The file system cannot hold a WAL (no shared memory): the rollback journal
            // with the busy timeout still serialises the hosts, only more slowly.
            tracing::warn!("{}: journal mode stays {now}, not WAL", path.display());
        }
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(&format!("BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;"))?;
    Ok(conn)
}

/// SQLITE_BUSY or SQLITE_LOCKED.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

impl SqliteStore {
    /// Opens (creating if needed) the file in WAL mode with a busy timeout and the schema.
    pub(crate) async fn open(path: PathBuf) -> Result<SqliteStore, DbError> {
        let p = path.clone();
        let conn = blocking(&path, move || {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Err(DbError::io(format!("creating {}", dir.display()), e)))?;
            }
            // Several application hosts open the one file at the same moment. Switching the
            // journal mode needs the database to itself and SQLite answers SQLITE_BUSY at
            // once there, without its busy handler (sqlite.org/wal.html, "Activating WAL
            // mode"): retry the whole set-up, bounded, instead of failing the node.
            let started = std::time::Instant::now();
            let mut pause = std::time::Duration::from_millis(10);
            loop {
                match set_up(&p) {
                    Ok(conn) => return Ok(conn),
                    Err(e) if is_busy(&e) && started.elapsed() < OPEN_RETRY_FOR => {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(std::time::Duration::from_millis(200));
                    }
                    Err(e) => return Err(Ok(e)),
                }
            }
        })
        .await?;
        Ok(SqliteStore {
            path,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    pub(crate) async fn insert(&self, author: String, text: String) -> Result<Message, DbError> {
        self.with(move |c| {
            c.query_row(
                "INSERT INTO guestbook (author, text) VALUES (?1, ?2) \
                 RETURNING id, author, text, created_at",
                params![author, text],
                row_to_message,
            )
        })
        .await
    }

    pub(crate) async fn get(&self, id: u64) -> Result<Option<Message>, DbError> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        self.with(move |c| {
            c.query_row(
                "SELECT id, author, text, created_at FROM guestbook WHERE id = ?1",
                params![id],
                row_to_message,
            )
            .optional()
        })
        .await
    }

    pub(crate) async fn list(&self, limit: u32) -> Result<Vec<Message>, DbError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, author, text, created_at FROM guestbook ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit], row_to_message)?;
            rows.collect()
        })
        .await
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        blocking(&self.path, move || {
            // A poisoned lock only means another call panicked; the connection is still usable.
            let c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&c).map_err(Ok)
        })
        .await
    }
}

/// Runs `f` on the blocking pool; `Err(Ok(e))` is an SQLite error of `path`, `Err(Err(e))`
/// any other error.
async fn blocking<T, F>(path: &Path, f: F) -> Result<T, DbError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Result<rusqlite::Error, DbError>> + Send + 'static,
{
    let path = path.to_path_buf();
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(Ok(source))) => Err(DbError::Sqlite { path, source }),
        Ok(Err(Err(e))) => Err(e),
        Err(join) => Err(DbError::io(
            format!("SQLite task on {}", path.display()),
            std::io::Error::other(join.to_string()),
        )),
    }
}

fn row_to_message(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    let id: i64 = row.get(0)?;
    Ok(Message {
        id: u64::try_from(id).unwrap_or_default(),
        author: row.get(1)?,
        text: row.get(2)?,
        created_at: row.get(3)?,
    })
}
