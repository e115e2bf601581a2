use std::fmt;

/// A topology that cannot be used, with enough context for a person to fix it.
///
/// Rendered as `FILE[:LINE]: KEY: REASON (fix: FIX)`. The binary maps it to exit code 64
/// (`EX_DATAERR`-style "bad configuration").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the topology came from (`<built-in default>` for the default).
    pub file: String,
    /// 1-based line of the problem, when the parser knows it.
    pub line: Option<usize>,
    /// The dotted key that is wrong, e.g. `hosts[1].address`.
    pub key: String,
    /// What is wrong.
    pub reason: String,
    /// What to do about it.
    pub fix: String,
}

impl ConfigError {
    pub(crate) fn new(
        file: &str,
        key: impl Into<String>,
        reason: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.to_string(),
            line: None,
            key: key.into(),
            reason: reason.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": {}: {} (fix: {})", self.key, self.reason, self.fix)
    }
}

impl std::error::Error for ConfigError {}
