//! The failover controller: desired state (`cluster.json`) against observed state (each
//! server's [`NodeObservation`]), reconciled every probe interval.
//!
//! Each tick it observes every database server. With a writable primary it keeps
//! semi-synchronous replication on when a replica can acknowledge and brings back replicas
//! that stopped replicating, refusing one whose history diverged from the primary's
//! (errant transactions). When the primary has been unreachable (or restarted, hence
//! read-only) for `fail_after` and no replica still receives from it — and it has seen
//! that primary writable in the current epoch, so a starting cluster is left alone — it
//! fails over:
//!
//! 1. refuses when the primary's semi-synchronous replication had fallen back to
//!    asynchronous (acknowledged writes may exist on no replica) unless forced;
//! 2. fences the old primary: `read_only = ON` if it answers; else, in netns mode, cuts its
//!    host off at its firewall ([`Fencing::Firewall`]: recorded in `fences.json` first,
//!    lifted only once the controller has reached it again, made it read-only and pointed
//!    it at the new primary), or in loopback mode `SIGKILL` of its `mariadbd` (found by its
//!    pid file; it comes back read-only), unless that process is a restart since the
//!    primary was last seen writable (every server starts read-only: it is fenced
//!    already, and a kill would only interrupt its crash recovery);
//! 3. waits until each candidate has applied its relay log (`gtid_slave_pos` covers
//!    `Gtid_IO_Pos`) and, when the old primary answers, holds its whole binary log;
//! 4. picks the most advanced candidate, writes `cluster.json` with epoch + 1, makes it
//!    writable and points every other server at it.
//!
//! Orchestrator lost data by promoting before relay logs were applied; this controller
//! never promotes a server that has not applied all it received.
//!
//! The controller in a node ([`ControllerConfig::net`] set) reaches every server over the
//! network, from its host's address through the database host's firewall to its MariaDB
//! relay, as the controller account: a partition cuts it off like any other peer. The
//! operator's `rampart db` commands reach the servers on their Unix sockets instead.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::{Conn, OptsBuilder};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use topology::{Role, Topology};

use crate::cluster::{load_fences, store_fences, ClusterState, Fence, PromotionLock};
use crate::egress::LocalEgress;
use crate::gtid::GtidPos;
use crate::observe::{observe, NodeObservation};
use crate::server::{admin_exec, admin_opts_for, make_writable, point_at_primary};
use crate::{mariadbd_defaults_file, mariadbd_pid_file, Credentials, DbError};

/// How long a candidate gets to apply its relay log (and catch up with a fenced primary).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on connecting to a server for a probe.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections at once through one probe egress (one probe connection, plus one being
/// replaced).
const PROBE_EGRESS_MAX: usize = 4;
/// How often a recorded fence is checked to be still in force while its host is
/// unreachable.
const FENCE_RECHECK: Duration = Duration::from_secs(1);

/// How the controller fences a primary it cannot reach before it promotes a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fencing {
    /// `SIGKILL` of the primary's `mariadbd`, found by its pid file in the state directory
    /// (loopback mode: every server runs on this machine). Its node restarts it read-only.
    Kill,
    /// Cut its host off at the host's firewall (netns mode, the lab's control plane as the
    /// fencing device, like a power switch in STONITH): the table `inet rampart_fence`
    /// ([`firewall::nft::fence_ruleset`]) loaded with `ip netns exec <namespace> nft`,
    /// letting through only the controller's own connections to the MariaDB relay.
    Firewall {
        /// Namespace of every database host, by host name.
        namespaces: Vec<(String, String)>,
    },
}

/// What the controller needs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The lab's state directory (`db/cluster.json`, credentials, server sockets).
    pub state_dir: PathBuf,
    /// The application's database (holds the heartbeat table).
    pub database: String,
    /// Every database host and its address, in topology order.
    pub nodes: Vec<(String, IpAddr)>,
    /// `ports.mysql_egress`: where a server's replication leaves its host.
    pub egress_port: u16,
    /// Time between two observations of every server. Default 250 ms.
    pub probe_interval: Duration,
    /// How long the primary must stay lost before a failover. Default 1 s.
    pub fail_after: Duration,
    /// `ports.mysql`: every database host's MariaDB relay.
    pub mysql_port: u16,
    /// The controller host's network seam. `Some`: every server is reached over the
    /// network from that host's address, through the database host's firewall to its
    /// MariaDB relay, as the controller account (`ctl_user` of the credentials); `None`:
    /// on each server's Unix socket in the state directory as `root` (the operator's
    /// commands on the machine that holds the lab).
    pub net: Option<firewall::Net>,
    /// How an unreachable primary is fenced. Default [`Fencing::Kill`].
    pub fencing: Fencing,
}

impl ControllerConfig {
    /// The controller of `t`'s database tier with the timings of `[database.failover]`;
    /// `None` when the topology has no `db-primary`.
    pub fn from_topology(t: &Topology, state_dir: &std::path::Path) -> Option<ControllerConfig> {
        t.db_primary()?;
        Some(ControllerConfig {
            state_dir: state_dir.to_path_buf(),
            database: t.database.name.clone(),
            nodes: t
                .hosts
                .iter()
                .filter(|h| h.has(Role::DbPrimary) || h.has(Role::DbReplica))
                .map(|h| (h.name.clone(), h.address))
                .collect(),
            egress_port: t.ports.mysql_egress,
            probe_interval: Duration::from_millis(t.database.failover.probe_interval_ms),
            fail_after: Duration::from_millis(t.database.failover.fail_after_ms),
            mysql_port: t.ports.mysql,
            net: None,
            fencing: Fencing::Kill,
        })
    }

    /// Netns mode's fencing for `t` (already laid out with [`Topology::in_netns`]): each
    /// database host's namespace `<prefix>-<host>`.
    pub fn firewall_fencing(t: &Topology) -> Fencing {
        Fencing::Firewall {
            namespaces: t
                .hosts
                .iter()
                .filter(|h| h.has(Role::DbPrimary) || h.has(Role::DbReplica))
                .map(|h| (h.name.clone(), t.netns.namespace(&h.name)))
                .collect(),
        }
    }
}

/// What the controller last saw and did, for `rampart db status` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControllerStatus {
    /// Epoch of `cluster.json`.
    pub epoch: u64,
    /// The primary `cluster.json` names.
    pub primary: String,
    /// Promotions since the cluster was created (`rampart_db_failovers_total`).
    pub failovers: u64,
    /// Whether the primary's last observation had semi-synchronous replication ON.
    pub semi_sync_ok: bool,
    /// The last promotion, described (`web-01 → web-02 at epoch 2: ...`).
    pub last_failover: Option<String>,
    /// Why the last needed failover was refused, while it is.
    pub refused: Option<String>,
    /// Servers kept out of replication because their history diverged from the primary's.
    pub errant: Vec<String>,
    /// Hosts cut off at their firewall (netns mode), until they rejoin.
    #[serde(default)]
    pub fenced: Vec<String>,
}

/// Why a promotion did not happen.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The primary's semi-synchronous replication had fallen back to asynchronous: the
    /// replicas may miss acknowledged writes.
    #[error(
        "semi-synchronous replication on {primary} had fallen back to asynchronous: promoting \
         a replica may lose acknowledged writes; run `rampart db failover --force` to accept that"
    )]
    Unsafe {
        /// The primary.
        primary: String,
    },
    /// No server qualifies (none reachable, none replicating, or the asked one is not the
    /// most advanced).
    #[error("no replica can be promoted: {0}")]
    NoCandidate(String),
    /// The unreachable primary could not be cut off at its firewall: promoting would risk
    /// two writable primaries.
    #[error("cannot fence {host} at its firewall: {reason}")]
    Fence {
        /// The old primary.
        host: String,
        /// What failed.
        reason: String,
    },
    /// The state or a server failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A running controller.
pub struct Controller {
    status: Arc<Mutex<ControllerStatus>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Controller {
    /// The last status.
    pub fn status(&self) -> ControllerStatus {
        lock(&self.status).clone()
    }

    pub(crate) fn status_cell(&self) -> Arc<Mutex<ControllerStatus>> {
        self.status.clone()
    }

    /// Stops the reconciler loop.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts the reconciler loop (see the module docs). With [`ControllerConfig::net`], first
/// opens one egress per database server (connections leave from the controller host's
/// address).
///
/// Errors: [`DbError::Credentials`] when the credentials file cannot be read;
/// [`DbError::Config`] when the lab's CA certificate is missing (network path);
/// [`DbError::Io`] when an egress cannot be bound.
pub async fn start_controller(cfg: ControllerConfig) -> Result<Controller, DbError> {
    let creds = Credentials::load(&cfg.state_dir)?;
    let status = Arc::new(Mutex::new(ControllerStatus::default()));
    let stop = CancellationToken::new();
    let mut r = Reconciler::new(cfg, creds, status.clone()).await?;
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(r.cfg.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = r.tick().await {
                tracing::warn!(error = %e, "database controller");
            }
        }
    });
    Ok(Controller { status, stop, task })
}

/// A planned change of primary: fences the primary (`read_only = ON`), waits until the
/// target (`to`, else the most advanced replica) has everything it wrote, promotes it and
/// points the others at it. Writes pause from the fence to the promotion; nothing
/// acknowledged is lost.
pub async fn switchover(
    cfg: ControllerConfig,
    to: Option<String>,
) -> Result<ClusterState, FailoverError> {
    let creds = Credentials::load(&cfg.state_dir)?;
    let mut r = Reconciler::new(
        cfg,
        creds,
        Arc::new(Mutex::new(ControllerStatus::default())),
    )
    .await?;
    let _lock = PromotionLock::acquire(&r.cfg.state_dir)?;
    let cluster = r.cluster()?;
    r.observe_all().await;
    r.promote(&cluster, to.as_deref(), true).await
}

/// A commanded failover: like the automatic one (the old primary fenced, read-only or
/// killed), refused when semi-synchronous replication was off unless `force`.
pub async fn failover(cfg: ControllerConfig, force: bool) -> Result<ClusterState, FailoverError> {
    let creds = Credentials::load(&cfg.state_dir)?;
    let mut r = Reconciler::new(
        cfg,
        creds,
        Arc::new(Mutex::new(ControllerStatus::default())),
    )
    .await?;
    let _lock = PromotionLock::acquire(&r.cfg.state_dir)?;
    let cluster = r.cluster()?;
    let obs = r.observe_all().await;
    if let Some(Some(o)) = r.index(&cluster.primary).map(|i| obs[i].clone()) {
        r.semi_sync_ok = o.semi_sync_master_status;
    }
    r.promote(&cluster, None, force).await
}

struct Probe {
    host: String,
    address: IpAddr,
    opts: OptsBuilder,
    conn: Option<Conn>,
}

impl Probe {
    async fn conn(&mut self) -> Result<&mut Conn, DbError> {
        if self.conn.is_none() {
            let c = tokio::time::timeout(PROBE_CONNECT_TIMEOUT, Conn::new(self.opts.clone()))
                .await
                .map_err(|_| DbError::Timeout {
                    what: format!("connecting to {}", self.host),
                    seconds: PROBE_CONNECT_TIMEOUT.as_secs(),
                })?
                .map_err(|e| DbError::mysql(&self.host, e))?;
            self.conn = Some(c);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| DbError::Config("no connection".into()))
    }

    /// The server's state, or `None` when it does not answer. A failure on a connection
    /// kept from before is tried once more on a new one: a server that restarted since
    /// answers the new connection, and must not look unreachable (and be fenced by a kill)
    /// because the old one broke.
    async fn observe(&mut self, database: &str) -> Option<NodeObservation> {
        loop {
            let reused = self.conn.is_some();
            let c = self.conn().await.ok()?;
            match observe(c, database).await {
                Ok(o) => return Some(o),
                Err(e) => {
                    tracing::debug!(host = %self.host, error = %e, reused, "probe failed");
                    self.conn = None;
                    if !reused {
                        return None;
                    }
                }
            }
        }
    }

    /// Runs `sql` (an idempotent `SET GLOBAL`), retried once on a new connection when a kept
    /// one failed, as [`Probe::observe`] does.
    async fn exec(&mut self, sql: &str) -> Result<(), DbError> {
        let host = self.host.clone();
        loop {
            let reused = self.conn.is_some();
            let c = self.conn().await?;
            let r = admin_exec(&host, c, sql).await;
            if r.is_ok() || !reused {
                if r.is_err() {
                    self.conn = None;
                }
                return r;
            }
            self.conn = None;
        }
    }
}

struct Reconciler {
    cfg: ControllerConfig,
    creds: Credentials,
    probes: Vec<Probe>,
    /// The network path's egresses (with [`ControllerConfig::net`]).
    _egress: Vec<LocalEgress>,
    /// When each fenced host's cut was last checked to be in force.
    fence_checked: Vec<(String, Instant)>,
    status: Arc<Mutex<ControllerStatus>>,
    /// Since when the primary has been unreachable or read-only.
    primary_bad_since: Option<Instant>,
    /// The primary's semi-synchronous status at its last observation as a writable primary.
    semi_sync_ok: bool,
    refusal_logged: bool,
    /// The epoch in which this controller last saw the primary writable. It acts only on
    /// a primary it has seen writable in the current epoch: a cluster still starting (the
    /// primary bootstrapping, read-only) is not failed over, and neither is one whose
    /// primary was already gone when the controller started (`rampart db failover`
    /// decides then).
    seen_writable: Option<u64>,
    /// Loopback mode: the pid of the primary's `mariadbd` when this controller last saw it
    /// writable. A different process there later is a restart, which starts read-only
    /// (fenced already): fencing by kill leaves it to finish its crash recovery.
    writable_pid: Option<i32>,
}

impl Reconciler {
    async fn new(
        cfg: ControllerConfig,
        creds: Credentials,
        status: Arc<Mutex<ControllerStatus>>,
    ) -> Result<Reconciler, DbError> {
        let mut egress = Vec::new();
        let mut probes = Vec::new();
        let ca = pki::PkiPaths::new(crate::pki_dir(&cfg.state_dir)).ca_cert();
        if cfg.net.is_some() && !ca.is_file() {
            return Err(DbError::Config(format!(
                "the CA certificate {} is missing: the lab's PKI issues it (`rampart up`)",
                ca.display()
            )));
        }
        for (h, a) in &cfg.nodes {
            let opts = match &cfg.net {
                Some(net) => {
                    let to = std::net::SocketAddr::new(*a, cfg.mysql_port);
                    let e = LocalEgress::open(net.clone(), to, PROBE_EGRESS_MAX).await?;
                    let opts =
                        crate::tcp_opts(e.addr(), h, &ca, &creds.ctl_user, &creds.ctl_password);
                    egress.push(e);
                    opts
                }
                None => admin_opts_for(&cfg.state_dir, h, &creds.admin_password),
            };
            probes.push(Probe {
                host: h.clone(),
                address: *a,
                opts,
                conn: None,
            });
        }
        Ok(Reconciler {
            cfg,
            creds,
            probes,
            _egress: egress,
            fence_checked: Vec::new(),
            status,
            primary_bad_since: None,
            semi_sync_ok: false,
            refusal_logged: false,
            seen_writable: None,
            writable_pid: None,
        })
    }

    fn cluster(&self) -> Result<ClusterState, DbError> {
        ClusterState::load(&self.cfg.state_dir)?.ok_or_else(|| {
            DbError::Config(format!(
                "{} does not exist yet: start the database nodes first",
                crate::cluster_path(&self.cfg.state_dir).display()
            ))
        })
    }

    fn index(&self, host: &str) -> Option<usize> {
        self.probes.iter().position(|p| p.host == host)
    }

    async fn observe_all(&mut self) -> Vec<Option<NodeObservation>> {
        let mut out = Vec::with_capacity(self.probes.len());
        for p in &mut self.probes {
            out.push(p.observe(&self.cfg.database).await);
        }
        out
    }

    async fn tick(&mut self) -> Result<(), DbError> {
        let Some(cluster) = ClusterState::load(&self.cfg.state_dir)? else {
            return Ok(());
        };
        {
            let mut s = lock(&self.status);
            s.epoch = cluster.epoch;
            s.primary = cluster.primary.clone();
            s.failovers = cluster.failovers;
        }
        let obs = self.observe_all().await;
        self.keep_fences(&obs).await?;
        let Some(pi) = self.index(&cluster.primary) else {
            return Ok(());
        };
        match obs[pi].clone() {
            Some(p) if !p.read_only && !p.replicating => {
                self.primary_bad_since = None;
                self.refusal_logged = false;
                self.seen_writable = Some(cluster.epoch);
                if matches!(self.cfg.fencing, Fencing::Kill) {
                    self.writable_pid = self.pid_of(&cluster.primary);
                }
                self.semi_sync_ok = p.semi_sync_master_status;
                lock(&self.status).semi_sync_ok = p.semi_sync_master_status;
                lock(&self.status).refused = None;
                // Fenced for a promotion that never happened (no replica could take
                // over): it is still the primary, so its clients get it back.
                let stale = load_fences(&self.cfg.state_dir)?
                    .into_iter()
                    .any(|f| f.host == cluster.primary && f.epoch > cluster.epoch);
                if stale {
                    let host = cluster.primary.clone();
                    if let Err(e) = self.lift_fence(&host).await {
                        tracing::error!(%host, "{e}");
                    }
                }
                self.keep_replicas(pi, &p, &obs).await;
            }
            _ if self.seen_writable != Some(cluster.epoch) => {
                self.primary_bad_since = None;
            }
            other => {
                let since = *self.primary_bad_since.get_or_insert_with(Instant::now);
                if since.elapsed() < self.cfg.fail_after {
                    return Ok(());
                }
                // The replicas must have lost it too: none still receives from it.
                let confirmed = obs
                    .iter()
                    .enumerate()
                    .all(|(i, o)| i == pi || o.as_ref().is_none_or(|o| !o.io_running));
                if other.is_none() && !confirmed {
                    return Ok(());
                }
                // A commanded switchover or failover may be under way: never two
                // promotions at once, and never from a stale epoch.
                let Some(_lock) = PromotionLock::try_acquire(&self.cfg.state_dir)? else {
                    return Ok(());
                };
                if ClusterState::load(&self.cfg.state_dir)?.as_ref() != Some(&cluster) {
                    return Ok(());
                }
                match self.promote(&cluster, None, false).await {
                    Ok(next) => {
                        self.primary_bad_since = None;
                        lock(&self.status).refused = None;
                        tracing::warn!(old = %cluster.primary, new = %next.primary, epoch = next.epoch, "database failover done");
                    }
                    Err(FailoverError::NoCandidate(why))
                        if other.as_ref().is_some_and(|o| !o.replicating) =>
                    {
                        // Restarted read-only with no replica to take over: it is the
                        // most advanced server there is; make it writable again.
                        tracing::warn!(host = %cluster.primary, "no replica to promote ({why}); the primary takes writes again");
                        let has_replica =
                            obs.iter().enumerate().any(|(i, o)| i != pi && o.is_some());
                        let host = cluster.primary.clone();
                        let c = self.probes[pi].conn().await?;
                        make_writable(&host, c, has_replica).await?;
                        self.primary_bad_since = None;
                    }
                    Err(e) => {
                        if !self.refusal_logged {
                            tracing::error!(primary = %cluster.primary, "failover refused: {e}");
                            self.refusal_logged = true;
                        }
                        lock(&self.status).refused = Some(e.to_string());
                    }
                }
            }
        }
        Ok(())
    }

    /// Keeps every recorded fence in force while its host stays unreachable: the cut is
    /// checked (at most every [`FENCE_RECHECK`]) and loaded again when missing (e.g. the
    /// namespace's ruleset was replaced by hand).
    async fn keep_fences(&mut self, obs: &[Option<NodeObservation>]) -> Result<(), DbError> {
        let fences = load_fences(&self.cfg.state_dir)?;
        lock(&self.status).fenced = fences.iter().map(|f| f.host.clone()).collect();
        let Fencing::Firewall { namespaces } = self.cfg.fencing.clone() else {
            return Ok(());
        };
        for f in fences {
            let reachable = self.index(&f.host).is_some_and(|i| obs[i].is_some());
            let due = self
                .fence_checked
                .iter()
                .find(|(h, _)| *h == f.host)
                .is_none_or(|(_, at)| at.elapsed() >= FENCE_RECHECK);
            if reachable || !due {
                continue;
            }
            self.fence_checked.retain(|(h, _)| *h != f.host);
            self.fence_checked.push((f.host.clone(), Instant::now()));
            let Some(ns) = namespace_of(&namespaces, &f.host) else {
                continue;
            };
            let (allow, why) = (self.fence_allow(), fence_comment(&f.host, f.epoch));
            let r = tokio::task::spawn_blocking(move || {
                let nft = firewall::nft::Nft::in_netns(&ns);
                if nft.fenced() {
                    Ok(false)
                } else {
                    nft.fence(allow, &why).map(|()| true)
                }
            })
            .await;
            match r {
                Ok(Ok(true)) => tracing::warn!(host = %f.host, "fence was missing: cut off again"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::error!(host = %f.host, "cannot keep the fence: {e}"),
                Err(e) => tracing::error!(host = %f.host, "fence check: {e}"),
            }
        }
        Ok(())
    }

    /// What a fence lets through: the controller's connections to the MariaDB relay.
    fn fence_allow(&self) -> Option<(IpAddr, u16)> {
        self.cfg
            .net
            .as_ref()
            .map(|n| (n.address(), self.cfg.mysql_port))
    }

    /// Cuts the unreachable `host` off at its firewall before a promotion to `epoch`:
    /// recorded in `fences.json` first (durable intent), then loaded.
    async fn cut_off(&mut self, host: &str, epoch: u64) -> Result<(), FailoverError> {
        let fail = |reason: String| FailoverError::Fence {
            host: host.to_string(),
            reason,
        };
        let Fencing::Firewall { namespaces } = &self.cfg.fencing else {
            return Err(fail("this controller has no firewall fencing".into()));
        };
        let ns = namespace_of(namespaces, host)
            .ok_or_else(|| fail("no namespace is known for it".into()))?;
        let mut fences = load_fences(&self.cfg.state_dir)?;
        fences.retain(|f| f.host != host);
        fences.push(Fence {
            host: host.to_string(),
            epoch,
            since_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        store_fences(&self.cfg.state_dir, &fences)?;
        let (allow, why) = (self.fence_allow(), fence_comment(host, epoch));
        tokio::task::spawn_blocking(move || firewall::nft::Nft::in_netns(&ns).fence(allow, &why))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?;
        self.fence_checked.retain(|(h, _)| h != host);
        self.fence_checked.push((host.to_string(), Instant::now()));
        tracing::warn!(
            host,
            epoch,
            "fencing the unreachable primary: cut off at its firewall"
        );
        lock(&self.status).fenced = fences.into_iter().map(|f| f.host).collect();
        Ok(())
    }

    /// Lifts `host`'s fence (it is read-only and replicating from the primary): the cut is
    /// removed, then the record.
    async fn lift_fence(&mut self, host: &str) -> Result<(), DbError> {
        if let Fencing::Firewall { namespaces } = &self.cfg.fencing {
            if let Some(ns) = namespace_of(namespaces, host) {
                tokio::task::spawn_blocking(move || firewall::nft::Nft::in_netns(&ns).unfence())
                    .await
                    .map_err(|e| DbError::Config(format!("lifting the fence: {e}")))?
                    .map_err(|e| DbError::Config(format!("lifting the fence: {e}")))?;
            }
        }
        let mut fences = load_fences(&self.cfg.state_dir)?;
        fences.retain(|f| f.host != host);
        store_fences(&self.cfg.state_dir, &fences)?;
        lock(&self.status).fenced = fences.into_iter().map(|f| f.host).collect();
        tracing::warn!(
            host,
            "fence lifted: read-only and replicating from the primary"
        );
        Ok(())
    }

    /// With a writable primary `p` (index `pi`): semi-synchronous replication on when a
    /// replica receives, and every other reachable server replicating from it unless its
    /// history diverged (then it is made read-only, reported and kept out; a fenced one
    /// stays cut off). A fenced server that answers again is made read-only, pointed at the
    /// primary and only then let back in.
    async fn keep_replicas(
        &mut self,
        pi: usize,
        p: &NodeObservation,
        obs: &[Option<NodeObservation>],
    ) {
        let fenced: Vec<String> = lock(&self.status).fenced.clone();
        let mut errant = Vec::new();
        let mut receiving = false;
        for (i, o) in obs.iter().enumerate() {
            let Some(o) = o else { continue };
            if i == pi {
                continue;
            }
            receiving |= o.io_running;
            let host = self.probes[i].host.clone();
            // Errant: transactions the primary's binary log lacks (by originating server,
            // so a replica observed just after the primary and ahead of it is not; a
            // former primary's lone writes after the promotion point are), or refused by
            // the primary as a diverged history (1236).
            if o.last_io_errno == 1236 || !o.errant_against(p).is_empty() {
                // Never a second writable server, even one that is kept out.
                if !o.read_only {
                    match self.probes[i].exec("SET GLOBAL read_only = ON").await {
                        Ok(()) => tracing::warn!(%host, "diverged server made read-only"),
                        Err(e) => {
                            tracing::error!(%host, "cannot make the diverged server read-only: {e}")
                        }
                    }
                }
                errant.push(host);
                continue;
            }
            let is_fenced = fenced.contains(&host);
            if !o.replicating || !o.read_only || is_fenced {
                let address = self.probes[i].address;
                let mut ok = o.read_only;
                if !o.read_only {
                    ok = self.probes[i]
                        .exec("SET GLOBAL read_only = ON")
                        .await
                        .is_ok();
                }
                if ok && !o.replicating {
                    let port = self.cfg.egress_port;
                    let creds = self.creds.clone();
                    ok = match self.probes[i].conn().await {
                        Ok(c) => match point_at_primary(&host, c, address, port, &creds).await {
                            Ok(()) => {
                                tracing::info!(%host, "replica rejoined the primary");
                                true
                            }
                            Err(e) => {
                                tracing::warn!(%host, "cannot point at the primary: {e}");
                                false
                            }
                        },
                        Err(_) => false,
                    };
                }
                if ok && is_fenced {
                    if let Err(e) = self.lift_fence(&host).await {
                        tracing::error!(%host, "{e}");
                    }
                }
            }
        }
        if receiving && !p.semi_sync_master_enabled {
            let _ = self.probes[pi]
                .exec("SET GLOBAL rpl_semi_sync_master_enabled = ON")
                .await;
        }
        let mut s = lock(&self.status);
        if s.errant != errant {
            for h in errant.iter().filter(|h| !s.errant.contains(h)) {
                tracing::error!(host = %h, "has transactions the primary does not have (errant GTIDs): kept out of replication; rebuild it from a backup");
            }
            s.errant = errant;
        }
    }

    /// Fences the primary of `cluster`, waits for the candidates, promotes one (`to`, else
    /// the most advanced), publishes epoch + 1 and repoints the others.
    async fn promote(
        &mut self,
        cluster: &ClusterState,
        to: Option<&str>,
        force: bool,
    ) -> Result<ClusterState, FailoverError> {
        let old = cluster.primary.clone();
        tracing::warn!(primary = %old, epoch = cluster.epoch, "changing the database primary");
        let oi = self
            .index(&old)
            .ok_or_else(|| FailoverError::NoCandidate(format!("{old} is not a database host")))?;
        // A replica must be there to take over before anything is fenced.
        let mut any = false;
        for i in (0..self.probes.len()).filter(|i| *i != oi) {
            if to.is_some_and(|t| self.probes[i].host != t) {
                continue;
            }
            if let Some(o) = self.probes[i].observe(&self.cfg.database).await {
                any |= o.replicating;
            }
        }
        if !any {
            return Err(FailoverError::NoCandidate(format!(
                "no replica of {old} answers"
            )));
        }
        // 1. Fence.
        let mut restarting = false;
        let old_final: Option<GtidPos> = match self.probes[oi].observe(&self.cfg.database).await {
            Some(_) => {
                self.probes[oi].exec("SET GLOBAL read_only = ON").await?;
                let o = self.probes[oi]
                    .observe(&self.cfg.database)
                    .await
                    .ok_or_else(|| {
                        FailoverError::NoCandidate(format!("{old} stopped answering while fenced"))
                    })?;
                Some(GtidPos::parse(&o.gtid_binlog_pos).unwrap_or_default())
            }
            None => {
                if !self.semi_sync_ok && !force {
                    return Err(FailoverError::Unsafe { primary: old });
                }
                match self.cfg.fencing {
                    Fencing::Kill => restarting = !self.kill_old(&old),
                    Fencing::Firewall { .. } => self.cut_off(&old, cluster.epoch + 1).await?,
                }
                None
            }
        };
        // 2. Candidates that applied all they received (and hold all the fenced primary
        // wrote, when it answers).
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        let mut ready: Vec<(usize, GtidPos)> = Vec::new();
        let wanted: Vec<usize> = (0..self.probes.len())
            .filter(|i| *i != oi && to.is_none_or(|t| self.probes[*i].host == t))
            .collect();
        if wanted.is_empty() {
            return Err(FailoverError::NoCandidate(format!(
                "{} is not another database host",
                to.unwrap_or("-")
            )));
        }
        let mut pending = wanted.clone();
        while !pending.is_empty() && Instant::now() < deadline {
            let mut still = Vec::new();
            for i in pending {
                match self.probes[i].observe(&self.cfg.database).await {
                    Some(o) if o.replicating || !o.read_only => {
                        let applied = GtidPos::parse(&o.gtid_slave_pos).unwrap_or_default();
                        let received = GtidPos::parse(&o.gtid_io_pos).unwrap_or_default();
                        // With log_slave_updates the binary log holds everything applied.
                        let current = GtidPos::parse(&o.gtid_binlog_pos).unwrap_or_default();
                        let has_old = old_final.as_ref().is_none_or(|f| current.contains(f));
                        if applied.contains(&received)
                            && has_old
                            && (o.sql_running || applied == received)
                        {
                            ready.push((i, current));
                        } else {
                            still.push(i);
                        }
                    }
                    // Unreachable or not a replica: not a candidate.
                    _ => {}
                }
            }
            pending = still;
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let Some((ci, _)) = ready.iter().max_by_key(|(_, p)| p.progress()).cloned() else {
            if old_final.is_some() {
                // Nothing can take over: the old primary stays the primary.
                let host = old.clone();
                let c = self.probes[oi].conn().await?;
                let _ = make_writable(&host, c, true).await;
            }
            return Err(FailoverError::NoCandidate(format!(
                "no replica of {old} answered and applied its relay log within {} s",
                CATCH_UP_TIMEOUT.as_secs()
            )));
        };
        // Never one behind another candidate that is ready.
        let best = ready[ready.iter().position(|(i, _)| *i == ci).unwrap_or(0)]
            .1
            .clone();
        if ready.iter().any(|(_, p)| !best.contains(p)) {
            return Err(FailoverError::NoCandidate(
                "the replicas' histories diverged".into(),
            ));
        }
        let new = self.probes[ci].host.clone();
        // 3. Publish, 4. promote, 5. repoint.
        let next = ClusterState {
            epoch: cluster.epoch + 1,
            primary: new.clone(),
            nodes: cluster.nodes.clone(),
            failovers: cluster.failovers + 1,
        };
        next.store(&self.cfg.state_dir)?;
        let others: Vec<usize> = (0..self.probes.len()).filter(|i| *i != ci).collect();
        let mut reachable_others = Vec::new();
        for i in &others {
            if self.probes[*i].observe(&self.cfg.database).await.is_some() {
                reachable_others.push(*i);
            }
        }
        let c = self.probes[ci].conn().await?;
        make_writable(&new, c, !reachable_others.is_empty()).await?;
        let creds = self.creds.clone();
        for i in reachable_others {
            let (host, address) = (self.probes[i].host.clone(), self.probes[i].address);
            let port = self.cfg.egress_port;
            if let Ok(c) = self.probes[i].conn().await {
                if let Err(e) = point_at_primary(&host, c, address, port, &creds).await {
                    tracing::warn!(%host, "cannot point at the new primary: {e}");
                }
            }
        }
        let what = format!(
            "{old} → {new} at epoch {}{}",
            next.epoch,
            match (&old_final, &self.cfg.fencing) {
                (Some(_), _) => " (old primary fenced read-only)",
                (None, Fencing::Kill) if restarting => {
                    " (old primary restarting, read-only until it follows)"
                }
                (None, Fencing::Kill) => " (old primary unreachable, stopped)",
                (None, Fencing::Firewall { .. }) => {
                    " (old primary unreachable, cut off at its firewall)"
                }
            }
        );
        tracing::warn!("database primary changed: {what}");
        {
            let mut s = lock(&self.status);
            s.epoch = next.epoch;
            s.primary = new;
            s.failovers = next.failovers;
            s.last_failover = Some(what);
        }
        Ok(next)
    }

    /// The pid of `host`'s `mariadbd` from its pid file, when that process runs our
    /// option file (loopback mode).
    fn pid_of(&self, host: &str) -> Option<i32> {
        let pid_file = mariadbd_pid_file(&self.cfg.state_dir, host);
        let cnf = mariadbd_defaults_file(&self.cfg.state_dir, host);
        crate::server::read_pid(&pid_file).filter(|p| crate::server::is_ours(*p, &cnf))
    }

    /// Loopback-mode fencing of an unreachable primary: `SIGKILL` to the `mariadbd` of its
    /// pid file (only when that process runs our option file). Its node restarts it
    /// read-only, and it follows `cluster.json` from then on. Returns false, killing
    /// nothing, when that process is not the one last seen writable
    /// ([`kill_fences`]): a restart, read-only from its option file and perhaps still in
    /// crash recovery, which a kill would only interrupt.
    fn kill_old(&self, host: &str) -> bool {
        let Some(pid) = self.pid_of(host) else {
            return true;
        };
        if !kill_fences(pid, self.writable_pid) {
            tracing::warn!(
                host,
                pid,
                "the unreachable primary restarted since it was last writable: it starts read-only, not killed"
            );
            return false;
        }
        tracing::warn!(host, pid, "fencing the unreachable primary: SIGKILL");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        true
    }
}

/// Whether killing `running`, the pid now in an unreachable primary's pid file, fences
/// anything: yes unless it is known to differ from `writable`, the pid of the process last
/// seen taking writes. Every `mariadbd` starts with `read_only = ON` (its option file), so
/// a process started since then has taken no write and takes none until the controller
/// makes it writable. Unknown (`None`): kill, the safe side.
fn kill_fences(running: i32, writable: Option<i32>) -> bool {
    writable.is_none_or(|w| w == running)
}

fn namespace_of(namespaces: &[(String, String)], host: &str) -> Option<String> {
    namespaces
        .iter()
        .find(|(h, _)| h == host)
        .map(|(_, ns)| ns.clone())
}

fn fence_comment(host: &str, epoch: u64) -> String {
    format!("rampart: {host} fenced by the failover controller before epoch {epoch}")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::kill_fences;

    #[test]
    fn only_the_process_seen_writable_is_killed() {
        // The one that took writes, or one nobody recorded: killed.
        assert!(kill_fences(4242, Some(4242)));
        assert!(kill_fences(4242, None));
        // A restart since (another pid): read-only from its start, left to recover.
        assert!(!kill_fences(4300, Some(4242)));
    }
}
