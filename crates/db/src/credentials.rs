//! The database accounts' passwords, generated once per lab and shared by every node.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DbError;

/// Account names and passwords of the data tier, stored in `<state>/db/credentials.json`
/// (mode 0600). Passwords are 32 lowercase hex characters (128 bits from `/dev/urandom`),
/// so they never need quoting in SQL.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// The application's account (`SELECT, INSERT` on the site database, `SLAVE MONITOR`
    /// to read replication lag).
    pub app_user: String,
    /// Its password.
    pub app_password: String,
    /// The replication account (`REPLICATION SLAVE`), used by replicas' IO threads.
    pub repl_user: String,
    /// Its password.
    pub repl_password: String,
    /// The failover controller's account: only what it runs (`READ_ONLY ADMIN` to fence
    /// and promote, `REPLICATION SLAVE ADMIN` for `STOP/START SLAVE`, `CHANGE MASTER TO`
    /// and `gtid_slave_pos`, `RELOAD` for `RESET SLAVE ALL`, `REPLICATION MASTER ADMIN`
    /// for the semi-synchronous master
    /// side, `SLAVE MONITOR` and `BINLOG MONITOR` to observe, `SELECT` on the heartbeat
    /// table); no data privilege. Empty in a file written before it existed:
    /// [`Credentials::ensure`] then adds it.
    #[serde(default)]
    pub ctl_user: String,
    /// Its password.
    #[serde(default)]
    pub ctl_password: String,
    /// The password given to every server's `root@localhost`, which the node uses for
    /// bootstrap and health checks. Every connection through the firewall relay arrives
    /// over the server's Unix socket from the (root) node process, so `root` must not be
    /// left on `unix_socket` authentication or an empty password.
    pub admin_password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("app_user", &self.app_user)
            .field("repl_user", &self.repl_user)
            .field("ctl_user", &self.ctl_user)
            .finish_non_exhaustive()
    }
}

/// The failover controller's account name.
const CTL_USER: &str = "rampart_ctl";

/// `<state>/db/credentials.json`.
pub fn credentials_path(state_dir: &Path) -> PathBuf {
    state_dir.join("db").join("credentials.json")
}

impl Credentials {
    /// Loads `<state>/db/credentials.json`, creating it first (directory 0700, file 0600,
    /// fresh random passwords) when it does not exist. `rampart up` calls this once before
    /// starting nodes; nodes call [`Credentials::load`].
    ///
    /// Errors: [`DbError::Io`] when the directory or file cannot be written or
    /// `/dev/urandom` cannot be read; [`DbError::Credentials`] for an existing malformed file.
    pub fn ensure(state_dir: &Path) -> Result<Credentials, DbError> {
        let path = credentials_path(state_dir);
        let creds = if path.exists() {
            let mut creds = Credentials::read(state_dir)?;
            if !creds.ctl_user.is_empty() {
                return Credentials::load(state_dir);
            }
            // Written before the controller had an account of its own.
            creds.ctl_user = CTL_USER.into();
            creds.ctl_password = random_hex(16)?;
            creds
        } else {
            Credentials {
                app_user: "rampart_app".into(),
                app_password: random_hex(16)?,
                repl_user: "rampart_repl".into(),
                repl_password: random_hex(16)?,
                ctl_user: CTL_USER.into(),
                ctl_password: random_hex(16)?,
                admin_password: random_hex(16)?,
            }
        };
        let dir = state_dir.join("db");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| DbError::io(format!("creating {}", dir.display()), e))?;
        let text = serde_json::to_string_pretty(&creds).map_err(|e| DbError::Credentials {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // Write a private temporary file, then rename: readers never see a partial file.
        let tmp = dir.join("credentials.json.tmp");
        let _ = fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| DbError::io(format!("writing {}", path.display()), e))?;
        Ok(creds)
    }

    /// Loads `<state>/db/credentials.json`.
    ///
    /// Errors: [`DbError::Credentials`] when it is missing (run `rampart up`, which creates
    /// it), unreadable, readable by group or others, or malformed.
    pub fn load(state_dir: &Path) -> Result<Credentials, DbError> {
        let creds = Credentials::read(state_dir)?;
        let bad = |reason: String| DbError::Credentials {
            path: credentials_path(state_dir),
            reason,
        };
        for (key, user) in [
            ("app_user", &creds.app_user),
            ("repl_user", &creds.repl_user),
            ("ctl_user", &creds.ctl_user),
        ] {
            if user.is_empty()
                || user.len() > 32
                || !user.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(bad(format!(
                    "{key} must be 1 to 32 letters, digits or '_' (`rampart up` adds a missing \
                     ctl_user)"
                )));
            }
        }
        for (key, pw) in [
            ("app_password", &creds.app_password),
            ("repl_password", &creds.repl_password),
            ("ctl_password", &creds.ctl_password),
            ("admin_password", &creds.admin_password),
        ] {
            if pw.len() < 16 || !pw.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!(
                    "{key} must be at least 16 hex characters; delete the file to regenerate it \
                     (only before the data directories exist)"
                )));
            }
        }
        Ok(creds)
    }

    /// The file parsed, its mode checked, its values not yet.
    fn read(state_dir: &Path) -> Result<Credentials, DbError> {
        let path = credentials_path(state_dir);
        let bad = |reason: String| DbError::Credentials {
            path: path.clone(),
            reason,
        };
        let meta = fs::metadata(&path).map_err(|e| {
            bad(format!(
                "{e}; it is created by `rampart up` (Credentials::ensure) before nodes start"
            ))
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "mode {:o} lets others read the passwords: chmod 600 it",
                meta.permissions().mode() & 0o777
            )));
        }
        let text = fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))
    }
}

/// `bytes` random bytes from `/dev/urandom` as lowercase hex.
fn random_hex(bytes: usize) -> Result<String, DbError> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| DbError::io("reading /dev/urandom", e))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn random_hex_has_the_asked_length() {
        let a = random_hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(16).unwrap());
    }
}
