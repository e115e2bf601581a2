//! The agent's push spool: a bounded FIFO of compressed pushes waiting for the monitoring
//! service, on disk when a directory is configured (one file per push, named by a
//! sequence number, so a restarted agent resumes where it stopped), in memory otherwise.
//!
//! Every collected push goes through the spool; the sender delivers the oldest first and
//! removes a record only once the monitor has answered it. The spool holds at most
//! `max_bytes` of records: appending beyond that drops the oldest records, which are
//! counted ([`SpoolStats::dropped`]), never the newest.
//!
//! Blocking: every method does file I/O when a directory is configured; async callers run
//! them with `spawn_blocking`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Suffix of a record file: gzip-compressed text exposition.
const SUFFIX: &str = ".prom.gz";

/// A spool's counters, read by the agent's own metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpoolStats {
    /// Records waiting.
    pub records: u64,
    /// Bytes of the records waiting.
    pub bytes: u64,
    /// Records dropped (oldest first) to stay within the byte bound, since start.
    pub dropped: u64,
}

/// Errors of the on-disk spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file or the directory could not be read, written or removed.
    #[error("spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Inner {
    /// Sequence number and size of each record, oldest first.
    index: VecDeque<(u64, u64)>,
    /// The records themselves when there is no directory (same order as `index`).
    memory: VecDeque<Vec<u8>>,
    next: u64,
    bytes: u64,
    dropped: u64,
}

/// A bounded FIFO of records (see the module documentation).
#[derive(Debug)]
pub struct Spool {
    dir: Option<PathBuf>,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

impl Spool {
    /// A spool in memory holding at most `max_bytes`.
    pub fn memory(max_bytes: u64) -> Spool {
        Spool {
            dir: None,
            max_bytes,
            inner: Mutex::new(Inner {
                index: VecDeque::new(),
                memory: VecDeque::new(),
                next: 0,
                bytes: 0,
                dropped: 0,
            }),
        }
    }

    /// A spool in `dir` (created with mode 0700 when missing) holding at most `max_bytes`;
    /// the records already there (from an earlier run) are kept, oldest first, and the
    /// oldest are dropped if they exceed the bound. Files that are not records are left
    /// alone.
    ///
    /// Errors: the directory cannot be created or listed.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let io = |source| SpoolError::Io {
            path: dir.to_path_buf(),
            source,
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let len = entry.metadata().map_err(io)?.len();
            found.push((seq, len));
        }
        found.sort_unstable();
        let spool = Spool {
            dir: Some(dir.to_path_buf()),
            max_bytes,
            inner: Mutex::new(Inner {
                next: found.last().map_or(0, |(s, _)| s + 1),
                bytes: found.iter().map(|(_, l)| l).sum(),
                index: found.into(),
                memory: VecDeque::new(),
                dropped: 0,
            }),
        };
        {
            let mut inner = spool.lock();
            spool.trim(&mut inner, 0);
        }
        Ok(spool)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, seq: u64) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{seq:020}{SUFFIX}")))
    }

    /// Drops the oldest records until `incoming` more bytes fit.
    fn trim(&self, inner: &mut Inner, incoming: u64) {
        while inner.bytes + incoming > self.max_bytes {
            let Some((seq, len)) = inner.index.pop_front() else {
                break;
            };
            inner.memory.pop_front();
            if let Some(p) = self.path(seq) {
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::warn!("spool: removing {}: {e}", p.display());
                }
            }
            inner.bytes -= len;
            inner.dropped += 1;
        }
    }

    /// Appends a record, dropping the oldest ones when the bound is exceeded. A record
    /// larger than the whole bound is dropped itself (and counted).
    ///
    /// Errors: the record file cannot be written (the record is lost; nothing else
    /// changes).
    pub fn append(&self, record: &[u8]) -> Result<(), SpoolError> {
        let len = record.len() as u64;
        let mut inner = self.lock();
        if len > self.max_bytes {
            inner.dropped += 1;
            return Ok(());
        }
        self.trim(&mut inner, len);
        let seq = inner.next;
        if let Some(p) = self.path(seq) {
            // Written under a temporary name and renamed, so a crash never leaves half a
            // record under a record's name.
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, record)
                .and_then(|()| std::fs::rename(&tmp, &p))
                .map_err(|source| SpoolError::Io {
                    path: p.clone(),
                    source,
                })?;
        } else {
            inner.memory.push_back(record.to_vec());
        }
        inner.next += 1;
        inner.index.push_back((seq, len));
        inner.bytes += len;
        Ok(())
    }

    /// The oldest record and its sequence number, `None` when the spool is empty.
    ///
    /// Errors: its file cannot be read (it is then removed and counted as dropped, so a
    /// damaged file cannot block the spool; the caller tries again).
    pub fn oldest(&self) -> Result<Option<(u64, Vec<u8>)>, SpoolError> {
        let mut inner = self.lock();
        let Some(&(seq, len)) = inner.index.front() else {
            return Ok(None);
        };
        let Some(p) = self.path(seq) else {
            return Ok(inner.memory.front().map(|r| (seq, r.clone())));
        };
        match std::fs::read(&p) {
            Ok(data) => Ok(Some((seq, data))),
            Err(source) => {
                inner.index.pop_front();
                inner.bytes -= len;
                inner.dropped += 1;
                let _ = std::fs::remove_file(&p);
                Err(SpoolError::Io { path: p, source })
            }
        }
    }

    /// Removes record `seq` once delivered (or refused for good); a no-op when it is no
    /// longer the oldest (it was dropped meanwhile).
    pub fn remove(&self, seq: u64) {
        let mut inner = self.lock();
        let Some(&(front, len)) = inner.index.front() else {
            return;
        };
        if front != seq {
            return;
        }
        inner.index.pop_front();
        inner.memory.pop_front();
        inner.bytes -= len;
        if let Some(p) = self.path(seq) {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!("spool: removing {}: {e}", p.display());
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> SpoolStats {
        let inner = self.lock();
        SpoolStats {
            records: inner.index.len() as u64,
            bytes: inner.bytes,
            dropped: inner.dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &Spool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for _ in 0..100 {
            let Some((seq, r)) = s.oldest().unwrap() else {
                break;
            };
            s.remove(seq);
            out.push(r);
        }
        out
    }

    #[test]
    fn fifo_bounded_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 10).unwrap();
        for r in [&b"aaaa"[..], b"bbbb", b"cccc"] {
            s.append(r).unwrap();
        }
        // 12 bytes do not fit in 10: the oldest went.
        assert_eq!(
            s.stats(),
            SpoolStats {
                records: 2,
                bytes: 8,
                dropped: 1
            }
        );
        drop(s);
        // A new run finds the records on disk, in order, and continues the numbering.
        let s = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(s.stats().records, 2);
        s.append(b"dd").unwrap();
        assert_eq!(
            drain(&s),
            [b"bbbb".to_vec(), b"cccc".to_vec(), b"dd".to_vec()]
        );
        assert_eq!(s.stats().bytes, 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // Larger than the bound: dropped, counted.
        s.append(&[0; 11]).unwrap();
        assert_eq!(s.stats().dropped, 1);
        assert_eq!(s.stats().records, 0);
    }

    #[test]
    fn memory_spool_behaves_the_same() {
        let s = Spool::memory(6);
        s.append(b"abc").unwrap();
        s.append(b"def").unwrap();
        s.append(b"g").unwrap();
        assert_eq!(s.stats().dropped, 1);
        // Removing anything but the oldest is a no-op.
        s.remove(99);
        assert_eq!(drain(&s), [b"def".to_vec(), b"g".to_vec()]);
    }

    #[test]
    fn a_smaller_bound_at_reopen_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 100).unwrap();
        for _ in 0..5 {
            s.append(&[1; 10]).unwrap();
        }
        drop(s);
        let s = Spool::open(dir.path(), 25).unwrap();
        assert_eq!(
            s.stats(),
            SpoolStats {
                records: 2,
                bytes: 20,
                dropped: 3
            }
        );
    }
}
