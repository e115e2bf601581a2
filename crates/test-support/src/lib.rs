//! Shared pieces of Rampart's tests: printing a skip with its reason, checking for external
//! binaries and root, waiting for a condition with a bound ("eventually"), a throwaway
//! PKI for a topology, and plain HTTP/1.1 test backends.
//!
//! This crate is for tests only (`[dev-dependencies]`); it never starts roles itself and
//! never touches anything outside the temporary directories it creates.

#![forbid(unsafe_code)]

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use topology::Topology;

/// How often [`eventually`] polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Directories searched by [`have_binary`] besides `$PATH` (system binaries such as `nft`
/// and `mariadbd` live there and are often missing from a user's `PATH`).
const EXTRA_BIN_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/local/sbin"];

/// Prints `SKIP: {reason}` to stderr. The caller returns right after, so the test passes
/// without having run; `cargo test -- --nocapture` shows the reason.
pub fn skip(reason: &str) {
    eprintln!("SKIP: {reason}");
}

/// Whether an executable file called `name` is in a `$PATH` directory or in `/usr/sbin`,
/// `/sbin` or `/usr/local/sbin`.
pub fn have_binary(name: &str) -> bool {
    find_binary(name).is_some()
}

/// The full path of the executable `name`, searched as in [`have_binary`].
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(EXTRA_BIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs with effective user id 0, read from the `Uid:` line of
/// `/proc/self/status` (fields: real, effective, saved, filesystem; see proc(5)).
/// `false` when the file cannot be read.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_uid(&status))
        == Some(0)
}

/// The effective uid in the text of `/proc/<pid>/status`.
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
}

/// Calls `f` every [`POLL_INTERVAL`] until it returns `Some`, and returns that value.
///
/// Panics with `what` and `timeout` when `timeout` passes first; an `f` that is slow to
/// return is not interrupted, so the total wait may exceed `timeout` by one call.
pub async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = f().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A complete PKI for `topology` in a temporary directory, deleted on drop.
#[derive(Debug)]
pub struct TestPki {
    /// The temporary directory; keep the value alive while the files are in use.
    pub dir: tempfile::TempDir,
    /// The PEM files (under `dir/pki`).
    pub paths: pki::PkiPaths,
    /// The topology the certificates were issued for.
    pub topology: Topology,
}

impl TestPki {
    /// Issues the CA, site, host and admin certificates for `topology` with
    /// [`pki::ensure`]. Panics when the temporary directory or issuance fails.
    pub fn new(topology: Topology) -> TestPki {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let paths = pki::ensure(&dir.path().join("pki"), &topology)
            .unwrap_or_else(|e| panic!("issuing test PKI: {e}"));
        TestPki {
            dir,
            paths,
            topology,
        }
    }
}

/// The default topology with every host moved from 127.80.0.x to 127.`second_octet`.0.x,
/// so tests that bind host addresses do not collide with each other or a running lab.
///
/// `topology_in_block(80)` is the default topology itself. Panics when the result does not
/// validate.
pub fn topology_in_block(second_octet: u8) -> Topology {
    let text = topology::DEFAULT_TOML.replace("127.80.0.", &format!("127.{second_octet}.0."));
    let file = format!("default topology in 127.{second_octet}.0.0/24");
    Topology::parse(&text, &file).unwrap_or_else(|e| panic!("{e}"))
}

/// The network seam of `host` in `t` (loopback mode, the compiled policy, the topology's
/// limits). Panics when `host` is not in `t`.
pub fn net(t: &Topology, host: &str) -> firewall::Net {
    let address = t
        .host(host)
        .unwrap_or_else(|| panic!("{host} is not in the topology"))
        .address;
    let policy = std::sync::Arc::new(topology::Policy::compile(t));
    firewall::Net::loopback(host, address, policy, t.limits.clone())
}

/// The request a [`http_backend`] answers.
pub type BackendRequest = http::Request<hyper::body::Incoming>;
/// The response a [`http_backend`] gives.
pub type BackendResponse = http::Response<http_body_util::Full<bytes::Bytes>>;

/// Starts a plain HTTP/1.1 backend on `at` (port chosen by the kernel) that answers every
/// request with `answer(request)`, on a task of the calling runtime that lives as long as
/// the runtime; returns its address. Keep-alive as hyper's HTTP/1 server does it.
///
/// Panics when `at` cannot be bound (a test machine without that loopback address).
pub async fn http_backend<F, Fut>(at: IpAddr, answer: F) -> SocketAddr
where
    F: Fn(BackendRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = BackendResponse> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(at, 0))
        .await
        .unwrap_or_else(|e| panic!("test backend: cannot bind {at}: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("test backend: no local address: {e}"));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: BackendRequest| {
                    let response = answer(req);
                    async move { Ok::<_, std::convert::Infallible>(response.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A [`BackendResponse`] with `status` and `body`.
pub fn text_response(status: u16, body: &'static str) -> BackendResponse {
    let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
        body.as_bytes(),
    )));
    *r.status_mut() = http::StatusCode::from_u16(status)
        .unwrap_or_else(|_| panic!("text_response: {status} is not a status code"));
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tx\nUid:\t1000\t0\t1000\t1000\nGid:\t5\t5\t5\t5\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
        // Whatever the machine, reading our own status works.
        let _ = is_root();
    }

    #[test]
    fn finds_a_shell() {
        assert!(have_binary("sh"));
        assert!(!have_binary("rampart-no-such-binary"));
    }

    #[test]
    fn block_moves_every_host() {
        let t = topology_in_block(91);
        assert_eq!(t.hosts.len(), Topology::default_topology().hosts.len());
        for h in &t.hosts {
            assert!(h.address.to_string().starts_with("127.91.0."), "{}", h.name);
        }
    }

    #[tokio::test]
    async fn eventually_returns_the_first_some() {
        let calls = AtomicU32::new(0);
        let v = eventually("third call", Duration::from_secs(10), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            (n >= 3).then_some(n)
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "never")]
    async fn eventually_panics_with_what() {
        eventually("never", Duration::from_millis(250), || async { None::<()> }).await;
    }

    #[test]
    fn test_pki_issues_every_host() {
        let t = topology_in_block(92);
        let pki = TestPki::new(t);
        assert!(pki.paths.ca_cert().exists());
        for h in &pki.topology.hosts {
            assert!(pki.paths.host_cert(&h.name).exists());
        }
        let cert = pki::load_certs(&pki.paths.host_cert("web-01")).unwrap();
        assert_eq!(
            pki::peer_identity(&cert[0]),
            Some(pki::Identity::Host("web-01".to_string()))
        );
    }
}
