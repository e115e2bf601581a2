#![allow(clippy::unwrap_used, missing_docs)]
//! `Credentials::ensure` / `load`: created once, private, stable, validated.

use std::os::unix::fs::PermissionsExt;

use db::{credentials_path, Credentials, DbError};

#[test]
fn ensure_creates_a_private_file_once() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Credentials::load(dir.path()),
        Err(DbError::Credentials { .. })
    ));
    let first = Credentials::ensure(dir.path()).unwrap();
    let path = credentials_path(dir.path());
    assert_eq!(path, dir.path().join("db/credentials.json"));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    for pw in [
        &first.app_password,
        &first.repl_password,
        &first.ctl_password,
        &first.admin_password,
    ] {
        assert_eq!(pw.len(), 32);
        assert!(pw.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    assert_ne!(first.app_password, first.repl_password);
    assert_eq!(Credentials::ensure(dir.path()).unwrap(), first);
    assert_eq!(Credentials::load(dir.path()).unwrap(), first);
    // Debug never shows passwords.
    assert!(!format!("{first:?}").contains(&first.app_password));
}

#[test]
fn load_refuses_readable_or_malformed_files() {
    let dir = tempfile::tempdir().unwrap();
    Credentials::ensure(dir.path()).unwrap();
    let path = credentials_path(dir.path());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Credentials::load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::write(&path, "{\"app_user\": \"x\"}").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        Credentials::load(dir.path()),
        Err(DbError::Credentials { .. })
    ));
}

#[test]
fn ensure_adds_the_controller_account_to_an_older_file() {
    let dir = tempfile::tempdir().unwrap();
    let first = Credentials::ensure(dir.path()).unwrap();
    assert_eq!(first.ctl_user, "rampart_ctl");
    let path = credentials_path(dir.path());
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("ctl_user");
    o.remove("ctl_password");
    std::fs::write(&path, v.to_string()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        Credentials::load(dir.path()).is_err(),
        "no controller account"
    );
    let upgraded = Credentials::ensure(dir.path()).unwrap();
    assert_eq!(upgraded.ctl_user, "rampart_ctl");
    assert_eq!(upgraded.ctl_password.len(), 32);
    // Everything else kept (the servers hold those passwords).
    assert_eq!(upgraded.app_password, first.app_password);
    assert_eq!(upgraded.admin_password, first.admin_password);
    assert_eq!(Credentials::load(dir.path()).unwrap(), upgraded);
}
