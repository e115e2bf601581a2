//! The state directory: everything a lab creates lives under one directory.
//!
//! ```text
//! <state>/lab.json               mode, start time
//! <state>/topology.toml          the topology as resolved by `up` (ports fixed)
//! <state>/pki/                   CA, site, host and admin certificates (pki crate)
//! <state>/db/                    credentials, the SQLite file when there is no MariaDB
//! <state>/hosts/<name>/node.pid  the node process
//! <state>/hosts/<name>/node.log  its log
//! <state>/hosts/<name>/status.json   written by the node every second
//! <state>/hosts/mon-01/monitor.snapshot, silences.json   the monitor's history and silences
//! <state>/hosts/<name>/www/      the application files the web server serves
//! <state>/hosts/<name>/mariadb/  datadir, socket, pid file, error log (db crate)
//! ```

use std::path::{Path, PathBuf};

use crate::LabError;

/// The layout of a state directory. Cheap to clone; creates nothing by itself.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root`, made absolute against the current directory so child
    /// processes and printed paths do not depend on where they run.
    pub fn new(root: impl AsRef<Path>) -> StateDir {
        let root = root.as_ref();
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(root))
                .unwrap_or_else(|_| root.to_path_buf())
        };
        StateDir { root }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `lab.json`.
    pub fn lab_file(&self) -> PathBuf {
        self.root.join("lab.json")
    }

    /// `topology.toml`, the resolved topology the nodes read.
    pub fn topology_file(&self) -> PathBuf {
        self.root.join("topology.toml")
    }

    /// `pki/`.
    pub fn pki(&self) -> pki::PkiPaths {
        pki::PkiPaths::new(self.root.join("pki"))
    }

    /// `hosts/<name>/`.
    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.root.join("hosts").join(host)
    }

    /// `hosts/<name>/node.pid`.
    pub fn node_pid_file(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("node.pid")
    }

    /// `hosts/<name>/node.log`.
    pub fn node_log(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("node.log")
    }

    /// `hosts/<name>/status.json`.
    pub fn node_status_file(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("status.json")
    }

    /// `hosts/<name>/www/`.
    pub fn docroot(&self, host: &str) -> PathBuf {
        self.host_dir(host).join("www")
    }

    /// Creates `path`'s directory tree.
    pub(crate) fn create_dir(path: &Path) -> Result<(), LabError> {
        std::fs::create_dir_all(path).map_err(|e| LabError::io(path, e))
    }

    /// Writes `contents` to `path` atomically (temporary file + rename), so readers never
    /// see a half-written file.
    pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), LabError> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, contents).map_err(|e| LabError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| LabError::io(path, e))
    }

    /// Reads a pid file; `None` when it is missing or does not hold a number.
    pub(crate) fn read_pid(path: &Path) -> Option<u32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }
}

/// Whether process `pid` exists and is not a zombie (reads `/proc/<pid>/stat`).
pub(crate) fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
