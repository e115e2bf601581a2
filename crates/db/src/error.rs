//! The one error type of the data tier.

use std::path::PathBuf;

/// Everything the data tier can fail with. Each message says what failed and, where there
/// is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The topology asks for MariaDB (or `auto` was resolved to it) but no `mariadbd` binary
    /// was found in `PATH`, `/usr/sbin` or `/usr/local/sbin`.
    #[error(
        "MariaDB is not installed (no mariadbd in PATH, /usr/sbin or /usr/local/sbin): \
         install the mariadb-server package, or set engine = \"sqlite\" under [database]"
    )]
    MariadbNotInstalled,
    /// A file, directory, socket or child-process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The credentials file is missing, unreadable or malformed.
    #[error("credentials {path}: {reason}")]
    Credentials {
        /// `<state>/db/credentials.json`.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A MariaDB server returned an error or the connection to it failed.
    #[error("MariaDB on {node}: {source}")]
    Mysql {
        /// The database host the statement went to.
        node: String,
        /// The driver's error.
        #[source]
        source: mysql_async::Error,
    },
    /// The SQLite store failed.
    #[error("SQLite {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The driver's error.
        #[source]
        source: rusqlite::Error,
    },
    /// `mariadb-install-db` or `mariadbd` did not come up; carries the end of its log.
    #[error("MariaDB on {host} did not start: {reason}\n--- last lines of {} ---\n{tail}", log.display())]
    Startup {
        /// The database host.
        host: String,
        /// What went wrong.
        reason: String,
        /// The log that explains it.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// An operation did not finish within its bound.
    #[error("{what} timed out after {seconds} s")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The bound, seconds.
        seconds: u64,
    },
    /// The caller passed a value the data tier refuses (for example an author longer than
    /// [`crate::MAX_AUTHOR_CHARS`]). Maps to an HTTP 400 in the application.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A row read back from the database did not have the expected shape.
    #[error("unexpected data from {node}: {reason}")]
    Data {
        /// The database host.
        node: String,
        /// What did not match.
        reason: String,
    },
    /// The configuration cannot be served (for example a Unix socket path longer than the
    /// 107 bytes `sun_path` holds, or a database name that is not a plain identifier).
    #[error("configuration: {0}")]
    Config(String),
}

impl DbError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> DbError {
        DbError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn mysql(node: &str, source: mysql_async::Error) -> DbError {
        DbError::Mysql {
            node: node.to_string(),
            source,
        }
    }

    /// Whether the error is the caller's fault ([`DbError::Invalid`]) rather than the data
    /// tier's.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, DbError::Invalid(_))
    }
}
