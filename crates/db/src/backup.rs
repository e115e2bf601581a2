//! Logical backups: `mariadb-dump --single-transaction --gtid --master-data=2` of the
//! application's database from a replica (the primary when none answers), compressed with
//! `gzip` into `<state>/backups/<database>-<host>-<UTC time>.sql.gz`; restore by replaying a
//! dump into the primary (binary-logged, so the replicas receive it too).
//!
//! Root's password reaches the tools in a 0600 option file (`--defaults-extra-file`), never
//! on a command line.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cluster::ClusterState;
use crate::observe::HEARTBEAT_TABLE;
use crate::{mariadbd_socket, Credentials, DbError};

/// `<state>/backups`.
pub fn backups_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("backups")
}

/// A 0600 option file with root's password, removed on drop.
struct PasswordFile(PathBuf);

impl PasswordFile {
    fn new(state_dir: &Path, creds: &Credentials) -> Result<PasswordFile, DbError> {
        let dir = state_dir.join("db");
        let path = dir.join(format!(".client-{}.cnf", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| DbError::io(format!("creating {}", path.display()), e))?;
        writeln!(f, "[client]\nuser=root\npassword={}", creds.admin_password)
            .map_err(|e| DbError::io(format!("writing {}", path.display()), e))?;
        Ok(PasswordFile(path))
    }
}

impl Drop for PasswordFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tool(name: &str) -> Result<PathBuf, DbError> {
    crate::find_program(name, &["/usr/bin", "/usr/local/bin"]).ok_or_else(|| {
        DbError::Config(format!(
            "{name} not found: install the mariadb-client package"
        ))
    })
}

fn check(what: &str, status: std::io::Result<std::process::ExitStatus>) -> Result<(), DbError> {
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(DbError::Config(format!("{what} failed ({s})"))),
        Err(e) => Err(DbError::io(what.to_string(), e)),
    }
}

/// Dumps `database` from a replica of the cluster (in `nodes` order; the primary when no
/// replica's server socket answers) into a new dated, gzip-compressed file under
/// `<state>/backups/`, and returns its path. The heartbeat table
/// ([`HEARTBEAT_TABLE`], the servers' own liveness row) is left out. Blocking: run it off
/// the async runtime.
///
/// Errors: [`DbError::Config`] when a tool is missing or fails, [`DbError::Io`].
pub fn backup(state_dir: &Path, database: &str) -> Result<PathBuf, DbError> {
    let creds = Credentials::load(state_dir)?;
    let cluster = ClusterState::load(state_dir)?
        .ok_or_else(|| DbError::Config("no cluster.json: start the database nodes first".into()))?;
    let mut order: Vec<&String> = cluster
        .nodes
        .iter()
        .filter(|n| **n != cluster.primary)
        .collect();
    order.push(&cluster.primary);
    let host = order
        .into_iter()
        .find(|h| std::os::unix::net::UnixStream::connect(mariadbd_socket(state_dir, h)).is_ok())
        .ok_or_else(|| DbError::Config("no database server answers".into()))?
        .clone();
    let dir = backups_dir(state_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| DbError::io(format!("creating {}", dir.display()), e))?;
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    let path = dir.join(format!("{database}-{host}-{stamp}.sql.gz"));
    let pw = PasswordFile::new(state_dir, &creds)?;
    let out = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| DbError::io(format!("creating {}", path.display()), e))?;
    let mut dump = Command::new(tool("mariadb-dump")?)
        .arg(format!("--defaults-extra-file={}", pw.0.display()))
        .arg(format!(
            "--socket={}",
            mariadbd_socket(state_dir, &host).display()
        ))
        .args(["--single-transaction", "--gtid", "--master-data=2"])
        // The heartbeat row is the servers' own state, rewritten every period: restoring it
        // would race the writer (the dump's INSERT after its CREATE meets the row the writer
        // put back in between) and say nothing true. Bootstrap creates the table.
        .arg(format!("--ignore-table={database}.{HEARTBEAT_TABLE}"))
        .args(["--databases", database])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| DbError::io("starting mariadb-dump", e))?;
    let Some(dump_out) = dump.stdout.take() else {
        return Err(DbError::Config("mariadb-dump has no output".into()));
    };
    let gzip = Command::new(tool("gzip")?)
        .arg("-c")
        .stdin(dump_out)
        .stdout(out)
        .status();
    let dumped = dump.wait();
    let result = check("gzip", gzip).and(check("mariadb-dump", dumped));
    if result.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    result?;
    tracing::info!(host, file = %path.display(), "database backup written");
    Ok(path)
}

/// Replays the gzip-compressed dump `file` into the primary `cluster.json` names, as root,
/// binary-logged (the replicas receive the same). The dump's tables replace the current
/// ones. Blocking: run it off the async runtime.
///
/// Errors: [`DbError::Config`] when a tool is missing or fails, [`DbError::Io`].
pub fn restore(state_dir: &Path, file: &Path) -> Result<(), DbError> {
    let creds = Credentials::load(state_dir)?;
    let cluster = ClusterState::load(state_dir)?
        .ok_or_else(|| DbError::Config("no cluster.json: start the database nodes first".into()))?;
    let input = std::fs::File::open(file)
        .map_err(|e| DbError::io(format!("opening {}", file.display()), e))?;
    let pw = PasswordFile::new(state_dir, &creds)?;
    let mut gunzip = Command::new(tool("gzip")?)
        .arg("-dc")
        .stdin(input)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| DbError::io("starting gzip", e))?;
    let Some(sql) = gunzip.stdout.take() else {
        return Err(DbError::Config("gzip has no output".into()));
    };
    let load = Command::new(tool("mariadb")?)
        .arg(format!("--defaults-extra-file={}", pw.0.display()))
        .arg(format!(
            "--socket={}",
            mariadbd_socket(state_dir, &cluster.primary).display()
        ))
        .stdin(sql)
        .status();
    check("mariadb", load).and(check("gzip -d", gunzip.wait()))?;
    tracing::info!(primary = %cluster.primary, file = %file.display(), "database restored");
    Ok(())
}
