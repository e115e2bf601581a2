use std::path::PathBuf;

/// Errors of `up`, `down`, `status` and the node process.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The topology is invalid (exit code 64 at the binary edge).
    #[error(transparent)]
    Config(#[from] topology::ConfigError),
    /// A file of the state directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Certificates could not be created or loaded.
    #[error("certificates: {0}")]
    Pki(#[from] pki::PkiError),
    /// The data tier failed.
    #[error("database: {0}")]
    Db(#[from] db::DbError),
    /// A role failed to start.
    #[error("{role} on {host}: {reason}")]
    Role {
        /// The host.
        host: String,
        /// The role.
        role: String,
        /// Why.
        reason: String,
    },
    /// A lab with a different topology is already running from this state directory.
    #[error("a lab with a different topology is already running from {0} (run `rampart down` first, or `rampart status`)")]
    AlreadyUp(PathBuf),
    /// No lab has been brought up from this state directory.
    #[error("nothing is running from {0} (run `rampart up` first)")]
    NotUp(PathBuf),
    /// Parts did not become healthy in time.
    #[error("not healthy after {seconds} s: {what} (see the logs under {logs})")]
    NotHealthy {
        /// Seconds waited.
        seconds: u64,
        /// What was still not healthy.
        what: String,
        /// Where the logs are.
        logs: PathBuf,
    },
    /// A requested feature is not available.
    #[error("{0}")]
    Unsupported(String),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

impl LabError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LabError::Io {
            path: path.into(),
            source,
        }
    }
}
