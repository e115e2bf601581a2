//! The one lifecycle of every role a node starts: a [`RoleTasks`] (one cancellation token
//! and the tasks it stops) inside each role's handle, and the [`RoleHandle`] trait through
//! which the node reads every role's addresses and health and stops it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use firewall::Filter;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use topology::Service;

use crate::BoxFuture;

/// What the node needs of every role it runs.
pub trait RoleHandle: Send + Sync {
    /// The role's name, as in the topology (`lb`, `web`, `db-primary`, …).
    fn role(&self) -> &'static str;
    /// The role's listeners: service and bound address.
    fn addrs(&self) -> Vec<(Service, SocketAddr)>;
    /// Whether the role can do its job now (the load balancer: a backend is up; the
    /// database: the server answers and a replica replicates; a listener-only role: its
    /// accept loops run).
    fn healthy(&self) -> bool;
    /// The firewall filters of the role's listeners (their counters).
    fn filters(&self) -> Vec<Arc<Filter>>;
    /// Stops the role: cancels its token, lets its listeners drain, waits for its tasks.
    fn shutdown(&self) -> BoxFuture<()>;
}

/// The cancellation token of one role and the tasks it stops. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RoleTasks {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl RoleTasks {
    /// A new token and an empty task set.
    pub fn new() -> RoleTasks {
        RoleTasks::default()
    }

    /// The token every task of the role watches.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The task set (for [`crate::serve_http`]).
    pub fn tracker(&self) -> TaskTracker {
        self.tracker.clone()
    }

    /// Spawns `task` as one of the role's tasks.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Whether every task still runs (none has ended before shutdown).
    pub fn running(&self) -> bool {
        !self.token.is_cancelled()
    }

    /// Cancels the token and waits until every task has ended.
    pub async fn shutdown(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Cancels the token without waiting (for `Drop`).
    pub fn cancel(&self) {
        self.token.cancel();
    }
}

/// The async runtime of a process that runs roles (`rampart lb`, a lab node), with
/// `threads` workers, by default as many as the CPUs in the process's affinity mask
/// (`available_parallelism` reads `sched_getaffinity(2)`), so that a process pinned to
/// fewer CPUs (`taskset`, a cgroup's cpuset) runs no more threads than it may use.
///
/// With one, it is tokio's current-thread runtime: every connection is driven by the one
/// thread that accepts it, so a process pinned to one CPU pays no cross-thread wake-ups at
/// all (a multi-thread runtime with one worker still hands work between the worker and the
/// thread blocked in `block_on`). Blocking work still goes to `spawn_blocking`'s pool.
///
/// Errors: the runtime cannot be built (threads or the I/O driver cannot be created).
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match worker_threads(threads) {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

/// The worker threads [`runtime`] starts: `threads`, else the CPUs this process may run on,
/// at least 1.
pub fn worker_threads(threads: Option<usize>) -> usize {
    threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1)
}
