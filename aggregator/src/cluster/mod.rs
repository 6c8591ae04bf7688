//! Several aggregator nodes as one: membership in etcd, ownership by rendezvous hashing, alert state handed over
//! through etcd, and the fan-in of other nodes' streams ([`relay`]).
//!
//! - **Membership.** Each node puts `<prefix>members/<id>` (its gRPC and HTTP addresses) under a lease it keeps
//!   alive, and watches `<prefix>members/`. A node that dies stops keeping its lease alive; etcd deletes its key
//!   when the lease expires (`lease_ttl`), and every node sees it go.
//! - **Ownership.** A service belongs to the live member with the highest rendezvous score
//!   ([`rendezvous::owner`]). A hello for a service owned elsewhere is answered with a `Redirect` to the owner. When
//!   membership changes, each shard drops the services it no longer owns (their open seconds unacknowledged, so the
//!   agents replay them to the new owner, which counts them once).
//! - **Alert state** of each service is written to `<prefix>alerts/<service>` by its owner whenever it changes. A
//!   node taking a service reads it before it takes the service's first snapshot, so an alert firing on a node that
//!   died keeps its id, acknowledgement and escalation, is not paged again, and is resolved or escalated by the new
//!   owner; the node giving a service away forgets its alerts without resolving them.
//! - **etcd unavailable.** The node keeps the services it has (and the view it last had), refuses hellos for any
//!   other service (the agent retries), and says so: a warning in the log, `strobe_cluster_etcd_up 0` on `/metrics`,
//!   and `/api/v1/cluster` (which the dashboard shows). When etcd is back it registers again.

pub(crate) mod relay;
pub(crate) mod rendezvous;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::alerting::alerts::{Alerts, Handover, SavedAlert};
use crate::health::Health;

/// How to join a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// etcd endpoints (`http://HOST:2379`); none: this node runs alone.
    pub etcd: Vec<String>,
    /// Key prefix of this cluster in etcd.
    pub prefix: String,
    /// How long after its last keep-alive a node's membership expires.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long a webhook waits for the alert state that records it to be written to etcd before it goes out
    /// anyway (etcd down must not stop paging). Written first, a page the next owner finds unconfirmed is sent
    /// again under the same id and idempotency key, never as a new alert.
    #[serde(with = "humantime_serde")]
    pub state_write_wait: Duration,
    /// This node's id (default: `host-pid`); must be unique in the cluster.
    pub node_id: Option<String>,
    /// The gRPC address agents are redirected to (default: the bound address).
    pub advertise_grpc: Option<String>,
    /// The HTTP address other nodes read this node's stream from (default: the bound address).
    pub advertise_http: Option<String>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            etcd: Vec::new(),
            prefix: "/strobe/".to_owned(),
            lease_ttl: Duration::from_secs(2),
            state_write_wait: Duration::from_secs(1),
            node_id: None,
            advertise_grpc: None,
            advertise_http: None,
        }
    }
}

/// Why the cluster settings are refused.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The lease TTL is under a second or not whole seconds.
    #[error("the etcd lease TTL must be whole seconds, at least 1s")]
    BadTtl,
    /// An etcd endpoint is not a plain-HTTP URL.
    #[error(
        "etcd endpoint {0:?} must look like http://HOST:PORT (TLS and auth to etcd are not supported yet)"
    )]
    BadEndpoint(String),
    /// The node id has characters a key segment cannot hold.
    #[error("node id {0:?} must be letters, digits, '.', '_' or '-'")]
    BadNodeId(String),
    /// Bound to every interface and nothing else to tell other nodes and agents.
    #[error(
        "{what} is bound to {addr}, which other nodes and agents cannot dial: set --advertise-{what} to an address they can"
    )]
    Unadvertisable {
        /// `grpc` or `http`.
        what: &'static str,
        /// The bound address.
        addr: std::net::SocketAddr,
    },
}

/// A service's newest alert state for etcd, and who waits for it to be written.
struct Write {
    key: String,
    value: Vec<u8>,
    written: Option<oneshot::Sender<()>>,
}

/// What a node knows of an alert-state key: the revision it last read (at `adopt`) or wrote there, and the values
/// it wrote without hearing the answer (the newest few: finding one there is finding its own write).
#[derive(Debug, Clone, Default)]
struct Fence {
    revision: i64,
    unconfirmed: VecDeque<Vec<u8>>,
}

/// How many unanswered writes of one key are remembered.
const UNCONFIRMED_KEPT: usize = 8;

/// How long a write of a service this node no longer keeps is tried (its last state, handed over at a move).
const HANDOVER_TRIES: Duration = Duration::from_secs(10);

/// How one write went.
enum Written {
    Yes,
    /// Not known to be written (etcd down or slow).
    Failed,
    /// Not written, and not to be: this node no longer keeps the service and its new owner wrote since.
    Fenced,
}

/// Per key: the newest value waiting to be written, everyone waiting for it (or for an older value it replaced),
/// and when it was first tried.
struct Pending {
    value: Vec<u8>,
    waiters: Vec<oneshot::Sender<()>>,
    since: Option<tokio::time::Instant>,
}

type Waiting = BTreeMap<String, Pending>;

/// Keeps the newest value per key, and every waiter.
fn wait_for(waiting: &mut Waiting, write: Write) {
    let entry = waiting.entry(write.key).or_insert_with(|| Pending {
        value: Vec::new(),
        waiters: Vec::new(),
        since: None,
    });
    entry.value = write.value;
    entry.waiters.extend(write.written);
}

/// One node as the others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Member {
    /// Unique node id.
    pub(crate) id: String,
    /// Where agents stream (`http://host:port` or `https://`).
    pub(crate) grpc: String,
    /// Where the dashboard, API and stream are (`http://host:port` or `https://`).
    pub(crate) http: String,
}

/// Where a service's agents should stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// Here.
    Local,
    /// At this member.
    Remote(Member),
    /// Nowhere yet: membership is unknown (etcd unreachable) and the service is not already here.
    Unavailable(&'static str),
}

/// This node's view of the cluster, shared by ingest, the shards, the alert manager and the HTTP API.
pub(crate) struct Cluster {
    me: Member,
    settings: ClusterSettings,
    /// The live members, by id.
    members: RwLock<BTreeMap<String, Member>>,
    /// Bumped on every membership change; shards compare it to decide when to re-check what they own.
    epoch: AtomicU64,
    changes: watch::Sender<u64>,
    etcd_up: AtomicBool,
    /// This node's lease while it is a member (0: none).
    lease: std::sync::atomic::AtomicI64,
    /// Set when the node shuts down: it leaves and does not join again.
    leaving: AtomicBool,
    /// Services with streams or state here: kept while etcd is away.
    local: Mutex<HashSet<Arc<str>>>,
    /// Services whose alert state was taken over from etcd, once per stay here.
    adopted: Mutex<HashMap<Arc<str>, Arc<OnceCell<()>>>>,
    /// Per alert-state key: the revision this node last read or wrote there. While this node keeps a service it
    /// writes its state over anything (the owner's state wins); once it does not, only over what it last read or
    /// wrote, so a node that gave a service away never overwrites what its new owner wrote since. Kept for every
    /// service adopted here (a few dozen bytes each).
    alert_revisions: Mutex<HashMap<String, Fence>>,
    /// Alert state to write, newest per service.
    writes: mpsc::UnboundedSender<Write>,
    writes_rx: Mutex<Option<mpsc::UnboundedReceiver<Write>>>,
    client: tokio::sync::Mutex<Option<Client>>,
    health: Arc<Health>,
    /// The token this node presents to the others (a read or admin token of the cluster).
    peer_token: Option<String>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A node of the cluster `settings` describe, reachable at `grpc` and `http` (already bound); `None` when no
    /// etcd endpoint is set (the node runs alone). Nothing is contacted until [`Cluster::run`].
    pub(crate) fn new(
        settings: &ClusterSettings,
        grpc: std::net::SocketAddr,
        http: std::net::SocketAddr,
        tls: bool,
        peer_token: Option<String>,
        health: Arc<Health>,
    ) -> Result<Option<Arc<Self>>, ClusterError> {
        if settings.etcd.is_empty() {
            return Ok(None);
        }
        if settings.lease_ttl < Duration::from_secs(1) || settings.lease_ttl.subsec_nanos() != 0 {
            return Err(ClusterError::BadTtl);
        }
        for endpoint in &settings.etcd {
            if !endpoint.starts_with("http://") {
                return Err(ClusterError::BadEndpoint(endpoint.clone()));
            }
        }
        for (what, advertised, bound) in [
            ("grpc", &settings.advertise_grpc, grpc),
            ("http", &settings.advertise_http, http),
        ] {
            if advertised.is_none() && bound.ip().is_unspecified() {
                return Err(ClusterError::Unadvertisable { what, addr: bound });
            }
        }
        let scheme = if tls { "https" } else { "http" };
        let url = |advertised: &Option<String>, bound: std::net::SocketAddr| match advertised {
            Some(a) if a.contains("://") => a.clone(),
            Some(a) => format!("{scheme}://{a}"),
            None => format!("{scheme}://{bound}"),
        };
        let id = settings
            .node_id
            .clone()
            .unwrap_or_else(strobe_proto::host_pid);
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(ClusterError::BadNodeId(id));
        }
        let me = Member {
            id,
            grpc: url(&settings.advertise_grpc, grpc),
            http: url(&settings.advertise_http, http),
        };
        let (writes, writes_rx) = mpsc::unbounded_channel();
        let (changes, _) = watch::channel(0);
        Ok(Some(Arc::new(Self {
            me,
            settings: settings.clone(),
            members: RwLock::new(BTreeMap::new()),
            epoch: AtomicU64::new(0),
            changes,
            etcd_up: AtomicBool::new(false),
            lease: std::sync::atomic::AtomicI64::new(0),
            leaving: AtomicBool::new(false),
            local: Mutex::new(HashSet::new()),
            adopted: Mutex::new(HashMap::new()),
            alert_revisions: Mutex::new(HashMap::new()),
            writes,
            writes_rx: Mutex::new(Some(writes_rx)),
            client: tokio::sync::Mutex::new(None),
            health,
            peer_token,
        })))
    }

    /// This node.
    pub(crate) fn me(&self) -> &Member {
        &self.me
    }

    /// The live members as last seen.
    pub(crate) fn members(&self) -> Vec<Member> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Bumped on every membership change.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Wakes on every membership change.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The owner of `service` in the current view.
    pub(crate) fn owner(&self, service: &str) -> Option<Member> {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        let id = rendezvous::owner(service, members.keys().map(String::as_str))?;
        members.get(id).cloned()
    }

    /// Where a hello for `service` goes.
    pub(crate) fn route(&self, service: &str) -> Route {
        let here = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(service);
        if !self.etcd_up.load(Ordering::Relaxed) {
            return if here {
                Route::Local
            } else {
                Route::Unavailable(
                    "cluster membership (etcd) is unreachable: this node takes no new services until it is back",
                )
            };
        }
        match self.owner(service) {
            None => Route::Unavailable("no live cluster member yet"),
            Some(owner) if owner.id == self.me.id => Route::Local,
            Some(owner) => Route::Remote(owner),
        }
    }

    /// Whether this node should keep `service` (shards ask after a membership change): its owner, or etcd is away
    /// and it is already here.
    pub(crate) fn keeps(&self, service: &str) -> bool {
        matches!(self.route(service), Route::Local)
    }

    /// Notes that `service` is served here (a stream was taken).
    pub(crate) fn note_local(&self, service: &Arc<str>) {
        self.local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(service.clone());
    }

    /// `service` left this node (it moved away, or went quiet and was forgotten): it is no longer kept while etcd
    /// is away, and its alert state is read again when it returns (it may have been handed over and changed
    /// elsewhere meanwhile).
    pub(crate) fn forget(&self, service: &str) {
        self.local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(service);
        self.adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(service);
        // Its fence stays: the manager's last state for it, written after this, must still not overwrite what a new
        // owner wrote meanwhile. Unanswered writes are forgotten (they bound the fence's size).
        if let Some(fence) = self
            .alert_revisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&self.alert_key(service))
        {
            fence.unconfirmed.clear();
        }
    }

    fn alert_key(&self, service: &str) -> String {
        format!("{}alerts/{service}", self.settings.prefix)
    }

    /// Writes one service's alert state: over anything while this node keeps the service (the owner's state
    /// wins); once it does not, only if nobody wrote it since this node last read or wrote it.
    async fn write_fenced(&self, client: &mut Client, key: &str, value: &[u8]) -> Written {
        let service = key.rsplit('/').next().unwrap_or_default();
        let mut fence = self.fence(key);
        // Twice at most: again after finding this node's own unanswered write there, or, while it keeps the
        // service, another node's (an old owner's late write), which the owner's state replaces.
        for _ in 0..2 {
            let txn = Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, fence.revision)])
                .and_then([TxnOp::put(key, value, None)]);
            match tokio::time::timeout(ETCD_CALL, client.txn(txn)).await {
                Ok(Ok(response)) if response.succeeded() => {
                    fence.revision = response.header().map_or(0, |h| h.revision());
                    fence.unconfirmed.clear();
                    self.set_fence(key, fence);
                    return Written::Yes;
                }
                Ok(Ok(_)) => {
                    let read = tokio::time::timeout(ETCD_CALL, client.get(key, None)).await;
                    let Ok(Ok(response)) = read else {
                        return Written::Failed;
                    };
                    let current = response.kvs().first();
                    let mine =
                        current.is_some_and(|kv| fence.unconfirmed.iter().any(|v| v == kv.value()));
                    if !mine && !self.keeps(service) {
                        self.health.cluster_alert_state_fenced.inc();
                        warn!(message = "Alert state not written: the service's new owner wrote it since.", %key);
                        return Written::Fenced;
                    }
                    if !mine {
                        warn!(message = "Alert state written by another node while this one holds the service; replaced with this node's.", %key);
                    }
                    fence.revision = current.map_or(0, |kv| kv.mod_revision());
                    fence.unconfirmed.clear();
                }
                _ => {
                    // The answer is lost: the write may have been made. Remember it, to know it again.
                    if fence.unconfirmed.len() >= UNCONFIRMED_KEPT {
                        fence.unconfirmed.pop_front();
                    }
                    fence.unconfirmed.push_back(value.to_vec());
                    self.set_fence(key, fence);
                    return Written::Failed;
                }
            }
        }
        Written::Failed
    }

    /// What this node knows of `key` (nothing read or written: revision 0, the key's when absent).
    fn fence(&self, key: &str) -> Fence {
        self.alert_revisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    fn set_fence(&self, key: &str, fence: Fence) {
        self.alert_revisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), fence);
    }

    /// Takes over `service`'s alert state from etcd, once per stay here; returns when the alert manager holds it.
    /// When etcd cannot say, the service is not taken (the hello is refused and the agent tries again): starting
    /// without its alerts would page again for what was already told.
    pub(crate) async fn adopt(&self, service: &Arc<str>, alerts: &Alerts) -> Result<(), String> {
        let cell = self
            .adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(service.clone())
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let key = self.alert_key(service);
            let client = self.client.lock().await.clone();
            let Some(mut client) = client else {
                return Err("etcd not connected".to_owned());
            };
            let saved = match tokio::time::timeout(ETCD_CALL, client.get(key.clone(), None)).await {
                Ok(Ok(response)) => {
                    let kv = response.kvs().first();
                    // What was read now is what this node's writes may go over once it no longer keeps the service.
                    let fence = Fence {
                        revision: kv.map_or(0, |kv| kv.mod_revision()),
                        unconfirmed: VecDeque::new(),
                    };
                    self.set_fence(&key, fence);
                    kv.map(|kv| serde_json::from_slice::<Vec<SavedAlert>>(kv.value()))
                        .transpose()
                        .map_err(|e| format!("alert state of {service} unreadable: {e}"))?
                        .unwrap_or_default()
                }
                Ok(Err(error)) => return Err(format!("reading alert state of {service}: {error}")),
                Err(_) => return Err(format!("reading alert state of {service}: timed out")),
            };
            if !saved.is_empty() {
                info!(message = "Took over alert state.", %service, alerts = saved.len());
            }
            alerts.adopt(service.clone(), saved).await;
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Keeps membership and writes alert state until the task is dropped.
    pub(crate) async fn run(self: Arc<Self>) {
        let writes = self
            .writes_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(writes) = writes {
            tokio::spawn(self.clone().write_alert_state(writes));
        }
        let mut delay = Duration::from_millis(200);
        loop {
            if self.leaving.load(Ordering::Relaxed) {
                // Left at shutdown: stay down until the aggregator stops this task with the others.
                return std::future::pending().await;
            }
            match self.clone().member_session().await {
                Ok(()) => return,
                Err(_) if self.leaving.load(Ordering::Relaxed) => continue,
                Err(error) => {
                    if self.etcd_up.swap(false, Ordering::Relaxed) {
                        warn!(message = "etcd unreachable: keeping the services here, taking no new ones.", %error);
                    } else {
                        tracing::debug!(message = "etcd still unreachable.", %error);
                    }
                    self.health.cluster_etcd_up.set(0);
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// One registration: connect, lease, put, list, then keep alive and watch until something fails.
    async fn member_session(self: Arc<Self>) -> Result<(), etcd_client::Error> {
        let ttl = self.settings.lease_ttl;
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(ETCD_CALL)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
        let mut client = Client::connect(&self.settings.etcd, Some(options)).await?;
        let lease = client.lease_grant(ttl.as_secs() as i64, None).await?.id();
        if self.leaving.load(Ordering::Relaxed) {
            client.lease_revoke(lease).await.ok(); // leaving anyway
            return Err(etcd_client::Error::LeaseKeepAliveError("leaving".into()));
        }
        let key = format!("{}members/{}", self.settings.prefix, self.me.id);
        let value = serde_json::to_vec(&self.me).unwrap_or_default();
        client
            .put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        let members_prefix = format!("{}members/", self.settings.prefix);
        let listing = client
            .get(
                members_prefix.clone(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let mut view = BTreeMap::new();
        for kv in listing.kvs() {
            if let Ok(member) = serde_json::from_slice::<Member>(kv.value()) {
                view.insert(member.id.clone(), member);
            }
        }
        self.set_view(view);
        let mut watch = client
            .watch(
                members_prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        let (mut keeper, mut kept) = client.lease_keep_alive(lease).await?;
        self.lease.store(lease, Ordering::Relaxed);
        *self.client.lock().await = Some(client.clone());
        self.etcd_up.store(true, Ordering::Relaxed);
        self.health.cluster_etcd_up.set(1);
        info!(message = "Joined the cluster.", node = %self.me.id, members = self.members().len(), lease_ttl_s = ttl.as_secs());
        let mut tick = tokio::time::interval(ttl / 3);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    keeper.keep_alive().await?;
                }
                answer = kept.message() => match answer? {
                    // A TTL of 0: the lease is gone (expired while this node was away).
                    Some(response) if response.ttl() > 0 => {}
                    _ => return Err(etcd_client::Error::LeaseKeepAliveError("lease expired".into())),
                },
                message = watch.message() => {
                    let Some(response) = message? else {
                        return Err(etcd_client::Error::WatchError("watch ended".into()));
                    };
                    let mut view: BTreeMap<String, Member> =
                        self.members.read().unwrap_or_else(|e| e.into_inner()).clone();
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let id = kv
                            .key_str()
                            .ok()
                            .and_then(|k| k.rsplit('/').next())
                            .unwrap_or_default()
                            .to_owned();
                        match event.event_type() {
                            EventType::Put => {
                                if let Ok(member) = serde_json::from_slice::<Member>(kv.value()) {
                                    view.insert(member.id.clone(), member);
                                }
                            }
                            EventType::Delete => {
                                view.remove(&id);
                            }
                        }
                    }
                    // This node's own key can only go if its lease expired: register again.
                    if !view.contains_key(&self.me.id) {
                        return Err(etcd_client::Error::LeaseKeepAliveError("membership expired".into()));
                    }
                    self.set_view(view);
                }
            }
        }
    }

    /// Leaves the cluster at shutdown: the lease is revoked, so the other nodes take this node's services at once
    /// instead of after the lease's TTL (agents then replay to them what was not acknowledged here).
    pub(crate) async fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        // This node no longer counts itself: its shards give every service away, its streams move.
        let others: BTreeMap<String, Member> = self
            .members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(id, _)| **id != self.me.id)
            .map(|(id, m)| (id.clone(), m.clone()))
            .collect();
        self.set_view(others);
        let lease = self.lease.swap(0, Ordering::Relaxed);
        let client = self.client.lock().await.clone();
        if let (Some(mut client), true) = (client, lease != 0) {
            match tokio::time::timeout(ETCD_CALL, client.lease_revoke(lease)).await {
                Ok(Ok(_)) => info!(message = "Left the cluster.", node = %self.me.id),
                _ => {
                    warn!(message = "Could not leave the cluster; the other nodes take over when the lease expires.", node = %self.me.id)
                }
            }
        }
    }

    fn set_view(&self, view: BTreeMap<String, Member>) {
        let mut members = self.members.write().unwrap_or_else(|e| e.into_inner());
        if *members == view {
            return;
        }
        info!(message = "Cluster membership changed.", members = ?view.keys().collect::<Vec<_>>());
        self.health.cluster_members.set(view.len() as i64);
        *members = view;
        drop(members);
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        // Services this node no longer keeps read their alert state again if they return.
        let adopted: Vec<Arc<str>> = self
            .adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for service in adopted {
            if !self.keeps(&service) {
                self.adopted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&service);
            }
        }
        self.changes.send_replace(epoch);
    }

    /// Writes alert state as it comes, the newest per service, retrying what fails (one failing key does not hold
    /// up the others).
    async fn write_alert_state(self: Arc<Self>, mut writes: mpsc::UnboundedReceiver<Write>) {
        let mut waiting = Waiting::new();
        loop {
            if waiting.is_empty() {
                match writes.recv().await {
                    Some(write) => wait_for(&mut waiting, write),
                    None => return,
                }
            }
            while let Ok(write) = writes.try_recv() {
                wait_for(&mut waiting, write);
            }
            let client = self.client.lock().await.clone();
            let Some(mut client) = client else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut failed = Waiting::new();
            let now = tokio::time::Instant::now();
            for (key, mut pending) in std::mem::take(&mut waiting) {
                let outcome = if pending.value.len() > MAX_HANDOVER_BYTES {
                    warn!(message = "Alert state too large to hand over through etcd; not written.", %key, bytes = pending.value.len());
                    Written::Fenced
                } else {
                    self.write_fenced(&mut client, &key, &pending.value).await
                };
                match outcome {
                    Written::Yes => {
                        for written in pending.waiters.drain(..) {
                            written.send(()).ok(); // nobody waiting any more is fine
                        }
                    }
                    Written::Failed => {
                        // Tried again while the service is here, and for a while after it left (its last state,
                        // handed over at a move: the fence keeps that from overwriting the new owner's).
                        let service = key.rsplit('/').next().unwrap_or_default();
                        let since = *pending.since.get_or_insert(now);
                        if self.keeps(service) || now.duration_since(since) < HANDOVER_TRIES {
                            failed.insert(key, pending);
                        }
                    }
                    Written::Fenced => {} // the waiters are let go
                }
            }
            if !failed.is_empty() {
                // Newer values that came meanwhile win over the failed ones.
                while let Ok(write) = writes.try_recv() {
                    wait_for(&mut failed, write);
                }
                waiting = failed;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Largest alert state of one service written to etcd (its default request limit is 1.5 MiB).
const MAX_HANDOVER_BYTES: usize = 1 << 20;

impl Handover for Cluster {
    fn publish(&self, service: &str, alerts: Vec<SavedAlert>) -> Option<oneshot::Receiver<()>> {
        let key = self.alert_key(service);
        match serde_json::to_vec(&alerts) {
            Ok(value) => {
                let (written, answer) = oneshot::channel();
                let write = Write {
                    key,
                    value,
                    written: Some(written),
                };
                self.writes.send(write).ok(); // the writer stops only at shutdown
                Some(answer)
            }
            Err(error) => {
                warn!(message = "Alert state not serialised for handover.", %service, %error);
                None
            }
        }
    }

    fn write_wait(&self) -> Duration {
        self.settings.state_write_wait
    }

    fn moved_away(&self, service: &str) -> bool {
        matches!(self.route(service), Route::Remote(_))
    }
}

impl crate::publish::http::ClusterView for Cluster {
    fn status_json(&self) -> serde_json::Value {
        serde_json::json!({
            "enabled": true,
            "node": self.me.id,
            "etcd": if self.etcd_up.load(Ordering::Relaxed) { "up" } else { "unreachable" },
            "members": self.members(),
        })
    }

    fn node_id(&self) -> String {
        self.me.id.clone()
    }

    fn peers(&self) -> Vec<(String, String)> {
        self.members()
            .into_iter()
            .filter(|m| m.id != self.me.id)
            .map(|m| (m.id, m.http))
            .collect()
    }

    fn peer_token(&self) -> Option<String> {
        self.peer_token.clone()
    }
}

/// How long one etcd call may take.
const ETCD_CALL: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    /// A single-member etcd on free loopback ports (the test command installs Debian's `etcd-server`); killed when
    /// dropped.
    struct Etcd {
        child: std::process::Child,
        url: String,
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    async fn etcd() -> Etcd {
        let (client, peer) = (free_port(), free_port());
        let dir =
            std::env::temp_dir().join(format!("strobe-fence-{}-{client}", std::process::id()));
        // A run long gone with the same process id and port left its data: start from none.
        std::fs::remove_dir_all(&dir).ok();
        let child = std::process::Command::new("etcd")
            .arg("--name=fence")
            .arg(format!("--data-dir={}", dir.display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=fence=http://127.0.0.1:{peer}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("etcd is installed: run scripts/test, which installs Debian's etcd-server");
        let etcd = Etcd {
            child,
            url: format!("http://127.0.0.1:{client}"),
        };
        for _ in 0..100 {
            if let Ok(mut c) = Client::connect([etcd.url.clone()], None).await
                && c.get("ready", None).await.is_ok()
            {
                return etcd;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd did not start");
    }

    async fn value(client: &mut Client, key: &str) -> Vec<u8> {
        let response = client.get(key, None).await.unwrap();
        response
            .kvs()
            .first()
            .map(|kv| kv.value().to_vec())
            .unwrap_or_default()
    }

    /// Writes of a service's alert state against a real etcd: while this node keeps the service, its state goes
    /// over anything; once it does not, a write another node made since stands (each refusal counted), and this
    /// node's own unanswered write, found there, is known as its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn alert_state_writes_are_fenced_by_revision() {
        let etcd = etcd().await;
        let settings = ClusterSettings {
            etcd: vec![etcd.url.clone()],
            node_id: Some("me".into()),
            ..ClusterSettings::default()
        };
        let health = Arc::new(Health::default());
        let addr = "127.0.0.1:1".parse().unwrap();
        let cluster = Cluster::new(&settings, addr, addr, false, None, health.clone())
            .unwrap()
            .unwrap();
        cluster.etcd_up.store(true, Ordering::Relaxed);
        let member = |id: &str| {
            let m = Member {
                id: id.into(),
                grpc: "http://127.0.0.1:1".into(),
                http: "http://127.0.0.1:1".into(),
            };
            (id.to_owned(), m)
        };
        let mut client = Client::connect([etcd.url.clone()], None).await.unwrap();
        let key = cluster.alert_key("svc");
        let revision = |client: &mut Client| {
            let key = key.clone();
            let mut client = client.clone();
            async move { client.get(key, None).await.unwrap().kvs()[0].mod_revision() }
        };

        // Held here: the owner's state goes over whatever is there.
        cluster.set_view(BTreeMap::from([member("me")]));
        assert!(cluster.keeps("svc"));
        client.put(key.as_str(), "foreign", None).await.unwrap();
        let written = cluster.write_fenced(&mut client, &key, b"mine-1").await;
        assert!(matches!(written, Written::Yes));
        assert_eq!(value(&mut client, &key).await, b"mine-1");

        // Given away, and the new owner wrote since: its state stands, every time, each refusal counted.
        cluster.set_view(BTreeMap::from([member("other")]));
        assert!(!cluster.keeps("svc"));
        client.put(key.as_str(), "new owner's", None).await.unwrap();
        for (n, mine) in [b"mine-2", b"mine-3"].into_iter().enumerate() {
            let written = cluster.write_fenced(&mut client, &key, mine).await;
            assert!(matches!(written, Written::Fenced));
            assert_eq!(value(&mut client, &key).await, b"new owner's");
            assert_eq!(health.cluster_alert_state_fenced.get(), n as u64 + 1);
        }
        // Given away, and nobody wrote since this node last did: its last state is handed over.
        cluster.set_fence(
            &key,
            Fence {
                revision: revision(&mut client).await,
                unconfirmed: VecDeque::new(),
            },
        );
        let written = cluster
            .write_fenced(&mut client, &key, b"handed over")
            .await;
        assert!(matches!(written, Written::Yes));
        assert_eq!(value(&mut client, &key).await, b"handed over");

        // A write of this node's whose answer was lost, found there, is its own: the next one goes over it.
        let mut fence = cluster.fence(&key);
        fence.unconfirmed.push_back(b"lost".to_vec());
        cluster.set_fence(&key, fence);
        client.put(key.as_str(), "lost", None).await.unwrap();
        let written = cluster.write_fenced(&mut client, &key, b"mine-4").await;
        assert!(matches!(written, Written::Yes));
        assert_eq!(value(&mut client, &key).await, b"mine-4");
        assert_eq!(health.cluster_alert_state_fenced.get(), 2);
    }
}
