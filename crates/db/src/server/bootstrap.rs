//! Datadir initialisation, the admin connection and the primary's schema and accounts.

use std::path::PathBuf;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use tokio::process::Command;

use super::options::Paths;
use super::{startup_error, ServerConfig, ADMIN_TIMEOUT};
use crate::observe::HEARTBEAT_TABLE;
use crate::{Credentials, DbError};

/// How long `mariadb-install-db` may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The primary's schema and accounts. The application and replication accounts are
/// `REQUIRE SSL` (MariaDB KB: "Securing Connections for Client and Server"): the server
/// refuses them on a connection without TLS, whichever way it arrived. Binary-logged on
/// purpose: a replica starting from an empty `gtid_slave_pos` replays the primary's binary
/// log from its first event, so it receives the same database, table and accounts (and
/// GTIDs stay one history). Every statement is idempotent, so restarts re-run them
/// harmlessly.
pub(super) async fn bootstrap_primary(
    cfg: &ServerConfig,
    creds: &Credentials,
    admin: &mut Conn,
) -> Result<(), DbError> {
    let db = &cfg.database;
    let statements = [
        format!(
            "CREATE DATABASE IF NOT EXISTS `{db}` \
             CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.guestbook (\
             id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, \
             author VARCHAR(64) NOT NULL, \
             `text` TEXT NOT NULL, \
             created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)\
             ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.{HEARTBEAT_TABLE} (\
             id TINYINT UNSIGNED NOT NULL PRIMARY KEY, \
             server_id INT UNSIGNED NOT NULL, \
             ts TIMESTAMP(6) NOT NULL\
             ) ENGINE=InnoDB"
        ),
        format!(
            "CREATE USER IF NOT EXISTS '{u}'@'localhost' IDENTIFIED BY '{pw}' REQUIRE SSL",
            u = creds.app_user,
            pw = creds.app_password
        ),
        // An account made before TLS: from now on, TLS or nothing.
        format!(
            "ALTER USER '{u}'@'localhost' REQUIRE SSL",
            u = creds.app_user
        ),
        format!(
            "GRANT SELECT, INSERT ON `{db}`.* TO '{u}'@'localhost'",
            u = creds.app_user
        ),
        format!(
            "GRANT SLAVE MONITOR ON *.* TO '{u}'@'localhost'",
            u = creds.app_user
        ),
        // The heartbeat is written with the application account: it has no READ_ONLY
        // ADMIN, so only a writable (promoted) server ever writes one.
        format!(
            "GRANT UPDATE ON `{db}`.{HEARTBEAT_TABLE} TO '{u}'@'localhost'",
            u = creds.app_user
        ),
        format!(
            "CREATE USER IF NOT EXISTS '{u}'@'localhost' IDENTIFIED BY '{pw}' REQUIRE SSL",
            u = creds.repl_user,
            pw = creds.repl_password
        ),
        format!(
            "ALTER USER '{u}'@'localhost' REQUIRE SSL",
            u = creds.repl_user
        ),
        format!(
            "GRANT REPLICATION SLAVE ON *.* TO '{u}'@'localhost'",
            u = creds.repl_user
        ),
        // The failover controller, over the network through the relay: what it runs and
        // nothing else (MariaDB KB "GRANT", privileges since 10.5.2; RELOAD for
        // `RESET SLAVE ALL` at a promotion). READ_ONLY ADMIN lets
        // an account write while read_only is ON; this one has no data privilege, so it
        // changes nothing but the server's settings.
        format!(
            "CREATE USER IF NOT EXISTS '{u}'@'localhost' IDENTIFIED BY '{pw}' REQUIRE SSL",
            u = creds.ctl_user,
            pw = creds.ctl_password
        ),
        format!(
            "GRANT READ_ONLY ADMIN, REPLICATION SLAVE ADMIN, REPLICATION MASTER ADMIN, \
             SLAVE MONITOR, BINLOG MONITOR, RELOAD ON *.* TO '{u}'@'localhost'",
            u = creds.ctl_user
        ),
        format!(
            "GRANT SELECT ON `{db}`.{HEARTBEAT_TABLE} TO '{u}'@'localhost'",
            u = creds.ctl_user
        ),
    ];
    for s in &statements {
        admin_exec(&cfg.host, admin, s).await?;
    }
    tracing::info!(host = %cfg.host, database = %db, "primary bootstrapped");
    Ok(())
}

/// Root's connection options for `host`'s server socket in `state_dir` (the failover
/// controller's administrative connection).
pub(crate) fn admin_opts_for(
    state_dir: &std::path::Path,
    host: &str,
    password: &str,
) -> OptsBuilder {
    admin_opts(&Paths::new(state_dir, host), password)
}

pub(super) fn admin_opts(p: &Paths, password: &str) -> OptsBuilder {
    OptsBuilder::default()
        .socket(Some(p.socket.to_string_lossy().into_owned()))
        .prefer_socket(false)
        .user(Some("root"))
        .pass(Some(password.to_string()))
}

/// Connects as `root` with the admin password. A datadir just made by
/// `mariadb-install-db --auth-root-authentication-method=normal` has `root@localhost`
/// without a password: then the password is set and the other `root` accounts dropped,
/// with `sql_log_bin=0` so these local changes create no GTID of their own.
pub(super) async fn admin_connect(
    cfg: &ServerConfig,
    p: &Paths,
    creds: &Credentials,
) -> Result<Conn, DbError> {
    let connect = |opts: OptsBuilder| async move {
        match tokio::time::timeout(ADMIN_TIMEOUT, Conn::new(opts)).await {
            Ok(r) => r.map_err(|e| DbError::mysql(&cfg.host, e)),
            Err(_) => Err(DbError::Timeout {
                what: format!("connecting to MariaDB on {} as root", cfg.host),
                seconds: ADMIN_TIMEOUT.as_secs(),
            }),
        }
    };
    match connect(admin_opts(p, &creds.admin_password)).await {
        Ok(c) => Ok(c),
        Err(DbError::Mysql {
            source: mysql_async::Error::Server(ref e),
            ..
        }) if e.code == 1045 => {
            let mut c = connect(admin_opts(p, "")).await?;
            let others: Vec<String> = tokio::time::timeout(
                ADMIN_TIMEOUT,
                c.query("SELECT host FROM mysql.user WHERE user = 'root' AND host <> 'localhost'"),
            )
            .await
            .map_err(|_| DbError::Timeout {
                what: format!("listing root accounts on {}", cfg.host),
                seconds: ADMIN_TIMEOUT.as_secs(),
            })?
            .map_err(|e| DbError::mysql(&cfg.host, e))?;
            admin_exec(&cfg.host, &mut c, "SET SESSION sql_log_bin = 0").await?;
            admin_exec(
                &cfg.host,
                &mut c,
                &format!(
                    "ALTER USER 'root'@'localhost' IDENTIFIED BY '{}'",
                    creds.admin_password
                ),
            )
            .await?;
            for h in others.iter().filter(|h| !h.contains('\'')) {
                admin_exec(
                    &cfg.host,
                    &mut c,
                    &format!("DROP USER IF EXISTS 'root'@'{h}'"),
                )
                .await?;
            }
            admin_exec(&cfg.host, &mut c, "SET SESSION sql_log_bin = 1").await?;
            tracing::info!(host = %cfg.host, "root account secured");
            Ok(c)
        }
        Err(e) => Err(e),
    }
}

pub(crate) async fn admin_exec(host: &str, c: &mut Conn, sql: &str) -> Result<(), DbError> {
    match tokio::time::timeout(ADMIN_TIMEOUT, c.query_drop(sql)).await {
        Ok(r) => r.map_err(|e| DbError::mysql(host, e)),
        Err(_) => Err(DbError::Timeout {
            what: format!("statement on {host}"),
            seconds: ADMIN_TIMEOUT.as_secs(),
        }),
    }
}

pub(super) async fn install_db(cfg: &ServerConfig, p: &Paths) -> Result<(), DbError> {
    let tool = find_install_db().ok_or_else(|| {
        startup_error(
            &cfg.host,
            "mariadb-install-db not found: install the mariadb-server package".into(),
            &p.log,
        )
    })?;
    // Without `data/mysql` the directory is not a usable datadir (an interrupted first
    // start); begin again from nothing.
    if p.data.exists() {
        std::fs::remove_dir_all(&p.data)
            .map_err(|e| DbError::io(format!("removing {}", p.data.display()), e))?;
    }
    let log = || {
        std::fs::File::create(&p.install_log)
            .and_then(|f| f.try_clone().map(|g| (f, g)))
            .map_err(|e| DbError::io(format!("creating {}", p.install_log.display()), e))
    };
    let (out, err) = log()?;
    let run = Command::new(&tool)
        .arg(format!("--defaults-file={}", p.cnf.display()))
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db")
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .status();
    let status = match tokio::time::timeout(INSTALL_TIMEOUT, run).await {
        Ok(r) => r.map_err(|e| DbError::io(format!("running {}", tool.display()), e))?,
        Err(_) => {
            return Err(startup_error(
                &cfg.host,
                format!(
                    "{} did not finish in {} s",
                    tool.display(),
                    INSTALL_TIMEOUT.as_secs()
                ),
                &p.install_log,
            ))
        }
    };
    if !status.success() {
        // The bootstrap server writes its reasons to `log-error`; install.log holds only
        // the tool's generic advice.
        return Err(startup_error(
            &cfg.host,
            format!(
                "{} failed ({status}); its output is in {}",
                tool.display(),
                p.install_log.display()
            ),
            &p.log,
        ));
    }
    tracing::info!(host = %cfg.host, datadir = %p.data.display(), "datadir initialised");
    Ok(())
}

fn find_install_db() -> Option<PathBuf> {
    ["mariadb-install-db", "mysql_install_db"]
        .into_iter()
        .find_map(|name| crate::find_program(name, &["/usr/bin", "/usr/local/bin", "/usr/sbin"]))
}
