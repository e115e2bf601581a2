//! The published cluster state, `<state>/db/cluster.json`: which node is the primary, under
//! which epoch. Written only by the failover controller (and once, at the first start, from
//! the topology); read by every database node (a restarted node follows it) and by the
//! application's client (which never goes back to a lower epoch).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use topology::{Role, Topology};

use crate::DbError;

/// `<state>/db/cluster.json`.
pub fn cluster_path(state_dir: &Path) -> PathBuf {
    state_dir.join("db").join("cluster.json")
}

/// Holds `<state>/db/promotion.lock` (`flock(2)`, exclusive) while it lives: one promotion
/// at a time, between the controller's loop and `rampart db switchover|failover`.
pub(crate) struct PromotionLock(#[allow(dead_code)] std::fs::File);

impl PromotionLock {
    fn open(state_dir: &Path) -> Result<std::fs::File, DbError> {
        let path = state_dir.join("db").join("promotion.lock");
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| DbError::io(format!("opening {}", path.display()), e))
    }

    /// Waits for the lock (a promotion in progress finishes within seconds).
    pub(crate) fn acquire(state_dir: &Path) -> Result<PromotionLock, DbError> {
        let f = PromotionLock::open(state_dir)?;
        f.lock()
            .map_err(|e| DbError::io("locking promotion.lock".to_string(), e))?;
        Ok(PromotionLock(f))
    }

    /// The lock if free now; `None` while another promotion holds it.
    pub(crate) fn try_acquire(state_dir: &Path) -> Result<Option<PromotionLock>, DbError> {
        let f = PromotionLock::open(state_dir)?;
        match f.try_lock() {
            Ok(()) => Ok(Some(PromotionLock(f))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(DbError::io("locking promotion.lock".to_string(), e))
            }
        }
    }
}

/// The desired shape of the database tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    /// Increases by one with every promotion; a fencing token: clients and nodes reject a
    /// state with a lower epoch than one they have seen. The first state has epoch 1.
    pub epoch: u64,
    /// Host name of the node that takes writes.
    pub primary: String,
    /// Every database host, in topology order.
    pub nodes: Vec<String>,
    /// Promotions done by the controller since the cluster was created (automatic and
    /// commanded), for the `rampart_db_failovers_total` series.
    #[serde(default)]
    pub failovers: u64,
}

impl ClusterState {
    /// The first state of `t`'s database tier: epoch 1, the `db-primary` host as primary.
    /// `None` when the topology has no `db-primary`.
    pub fn initial(t: &Topology) -> Option<ClusterState> {
        Some(ClusterState {
            epoch: 1,
            primary: t.db_primary()?.name.clone(),
            nodes: t
                .hosts
                .iter()
                .filter(|h| h.has(Role::DbPrimary) || h.has(Role::DbReplica))
                .map(|h| h.name.clone())
                .collect(),
            failovers: 0,
        })
    }

    /// Reads `<state>/db/cluster.json`; `Ok(None)` when it does not exist.
    ///
    /// Errors: [`DbError::Io`] when it cannot be read, [`DbError::Config`] when it is not
    /// a cluster state (the message names the file).
    pub fn load(state_dir: &Path) -> Result<Option<ClusterState>, DbError> {
        let path = cluster_path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                DbError::Config(format!(
                    "{}: not a cluster state ({e}); remove it to start again from the topology",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DbError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// The stored state, or `initial` stored and returned when there is none yet.
    pub fn load_or_init(state_dir: &Path, initial: &ClusterState) -> Result<ClusterState, DbError> {
        match ClusterState::load(state_dir)? {
            Some(s) => Ok(s),
            None => {
                initial.store(state_dir)?;
                Ok(initial.clone())
            }
        }
    }

    /// Writes the state atomically: a temporary file in the same directory, `fsync`,
    /// `rename(2)` over `cluster.json`, then `fsync` of the directory, so a reader sees the
    /// old or the new state, whole, and a crash keeps one of them.
    pub fn store(&self, state_dir: &Path) -> Result<(), DbError> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| DbError::Config(e.to_string()))?;
        write_atomic(&cluster_path(state_dir), &text)
    }
}

/// Writes `path` atomically: a temporary file in the same directory, `fsync`, `rename(2)`,
/// then `fsync` of the directory, so a reader sees the old or the new content, whole, and a
/// crash keeps one of them.
fn write_atomic(path: &Path, text: &[u8]) -> Result<(), DbError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| DbError::io(format!("creating {}", dir.display()), e))?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{seq}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| DbError::io(format!("writing {}", path.display()), e))
}

/// `<state>/db/fences.json`.
pub fn fences_path(state_dir: &Path) -> PathBuf {
    state_dir.join("db").join("fences.json")
}

/// A database host cut off at its firewall by the failover controller (netns mode): the
/// old primary it could not reach, fenced before a replica was promoted to `epoch`.
/// Recorded in `<state>/db/fences.json` before the cut is made and removed only after the
/// controller reached the host again, made it read-only and pointed it at the primary, so
/// a controller restarted in between finds it and keeps it cut off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fence {
    /// The fenced host.
    pub host: String,
    /// The epoch of the promotion the fence made safe.
    pub epoch: u64,
    /// When the fence was recorded, seconds since the Unix epoch.
    pub since_unix: u64,
}

/// The fences in force (`<state>/db/fences.json`; none when it does not exist).
///
/// Errors: [`DbError::Io`] when it cannot be read, [`DbError::Config`] when it is not the
/// JSON this module writes.
pub fn load_fences(state_dir: &Path) -> Result<Vec<Fence>, DbError> {
    let path = fences_path(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| DbError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(DbError::io(format!("reading {}", path.display()), e)),
    }
}

/// Replaces the fences in force, atomically.
pub(crate) fn store_fences(state_dir: &Path, fences: &[Fence]) -> Result<(), DbError> {
    let text = serde_json::to_vec_pretty(fences).map_err(|e| DbError::Config(e.to_string()))?;
    write_atomic(&fences_path(state_dir), &text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn store_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ClusterState::load(dir.path()).unwrap(), None);
        let s = ClusterState {
            epoch: 1,
            primary: "web-01".into(),
            nodes: vec!["web-01".into(), "web-02".into()],
            failovers: 0,
        };
        assert_eq!(ClusterState::load_or_init(dir.path(), &s).unwrap(), s);
        let next = ClusterState {
            epoch: 2,
            primary: "web-02".into(),
            failovers: 1,
            ..s.clone()
        };
        next.store(dir.path()).unwrap();
        assert_eq!(ClusterState::load(dir.path()).unwrap(), Some(next.clone()));
        assert_eq!(ClusterState::load_or_init(dir.path(), &s).unwrap(), next);
        std::fs::write(cluster_path(dir.path()), "{").unwrap();
        assert!(ClusterState::load(dir.path()).is_err());
    }

    #[test]
    fn fences_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_fences(dir.path()).unwrap(), vec![]);
        let f = Fence {
            host: "db-01".into(),
            epoch: 2,
            since_unix: 1,
        };
        store_fences(dir.path(), std::slice::from_ref(&f)).unwrap();
        assert_eq!(load_fences(dir.path()).unwrap(), vec![f]);
        store_fences(dir.path(), &[]).unwrap();
        assert_eq!(load_fences(dir.path()).unwrap(), vec![]);
    }
}
