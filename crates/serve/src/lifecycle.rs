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
