//! Strobe's aggregator: ingests one-second snapshots from agents over gRPC, merges each second across all
//! instances of a service (overall, by version, by zone), seals it within a short grace, judges it (threshold rules
//! and the canary), and serves it live to browsers over a websocket, with history for backfill.
//!
//! # Layout
//! Rooms, each depending only on the ones listed before it (no two rooms import each other):
//! - leaves: [`model`] (data types, the main metrics), [`limits`], [`auth`] (tokens, roles, origins), [`tls`];
//! - [`health`] (counters, typed drop reasons), on `model`;
//! - [`alerting`]: rules, canary, the alert manager and webhook delivery, and the alert currency they trade in;
//! - [`publish`]: the hub (frames, history, broadcast, status, alert and verdict states), the overview, HTTP;
//! - [`cluster`]: membership in etcd, which node owns which service, relays and alert hand-over;
//! - [`pipeline`]: shards (the scheduler), per-service transitions, windows, merge;
//! - [`ingest`]: the tonic service and the validator, the only code that touches protobuf types;
//! - this file and [`config`]: the composition root that wires them.
//!
//! `model`, `limits`, `ingest::validate`, `pipeline::windows`, `pipeline::merge`, the rules' evaluation, the canary
//! and `publish::overview` are pure (no I/O, no tokio); time is passed in.
//!
//! The public surface is [`Aggregator`], its configuration and errors, [`auth`] and [`tls`] (their types are part
//! of the configuration), [`kernels`] (the pure hot-path functions, public so the benchmarks can measure them) and
//! [`use_small_pages`] (for the binaries' `main`); everything else is `pub(crate)`.

pub(crate) mod alerting;
#[cfg(test)]
mod architecture_tests;
pub mod auth;
pub(crate) mod cluster;
pub mod config;
pub(crate) mod health;
pub(crate) mod ingest;
pub mod kernels;
pub mod limits;
pub(crate) mod model;
pub(crate) mod pipeline;
pub(crate) mod publish;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use std::future::IntoFuture as _;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use alerting::alerts::StateError;
pub use alerting::alerts::delivery::DeliverySettings;
pub use alerting::canary::CanarySettings;
pub use cluster::{ClusterError, ClusterSettings};
pub use config::AggregatorConfig;
pub use limits::Limits;
pub use model::MainMetrics;
pub use publish::remote_write::{RemoteWriteError, RemoteWriteSettings};

use crate::alerting::alerts::state::StateFile;
use crate::alerting::alerts::{Alerts, Deliverer, Notification, Persistence};
use crate::alerting::rules::{RulesStore, StoreError};
use crate::health::Health;
use crate::pipeline::budget::QueueBudget;
use crate::pipeline::service::ServiceContext;
use crate::pipeline::shard::Shards;
use crate::pipeline::windows::WindowSettings;
use crate::publish::Hub;

/// The longest `correction_interval` taken (the backoff of later corrections of one second goes to a second at
/// most; every correction is due by the end of its second's late window, and the second is kept a second longer).
const MAX_CORRECTION_INTERVAL: std::time::Duration = std::time::Duration::from_millis(900);

/// The least `shard_stall` taken: shards tick every 10 ms, and a bound near that would fail `/healthz` at once.
const MIN_SHARD_STALL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long connections may take to close after shutdown is asked for.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the hub forgets frames and services past the history.
const PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// The HTTP server's own runtime, when it has threads of its own. Dropping it (at the end of `run`, or with `run`'s
/// future) stops what still runs on it without waiting, as a runtime may not block inside another.
struct HttpRuntime(Option<tokio::runtime::Runtime>);

impl HttpRuntime {
    /// `threads` worker threads named `strobe-http`; none (0) keeps HTTP on the caller's runtime.
    fn new(threads: usize) -> Result<Self, AggregatorError> {
        if threads == 0 {
            return Ok(Self(None));
        }
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("strobe-http")
            .enable_all()
            .build()
            .map(|runtime| Self(Some(runtime)))
            .map_err(AggregatorError::Http)
    }

    /// This runtime's handle, or the caller's when it has no threads.
    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .map_or_else(tokio::runtime::Handle::current, |runtime| {
                runtime.handle().clone()
            })
    }

    /// `listener`, registered with this runtime's I/O driver if it has threads (so accepting, as the connections'
    /// I/O, is this runtime's work alone).
    fn adopt(&self, listener: tokio::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
        let Some(runtime) = &self.0 else {
            return Ok(listener);
        };
        let listener = listener.into_std()?;
        let _inside = runtime.enter();
        tokio::net::TcpListener::from_std(listener)
    }

    /// `server`, running on this runtime if it has threads. A panic in it goes on in the caller, as it would had it
    /// run there.
    fn serve(
        &self,
        server: impl Future<Output = Result<(), std::io::Error>> + Send + 'static,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), std::io::Error>> + Send>> {
        match &self.0 {
            Some(runtime) => {
                let task = runtime.spawn(server);
                Box::pin(async move {
                    match task.await {
                        Ok(served) => served,
                        Err(error) if error.is_panic() => {
                            std::panic::resume_unwind(error.into_panic())
                        }
                        Err(error) => Err(std::io::Error::other(error)),
                    }
                })
            }
            None => Box::pin(server),
        }
    }
}

impl Drop for HttpRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Why the aggregator could not start or stopped.
#[derive(Debug, Error)]
pub enum AggregatorError {
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The cluster settings are wrong.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// The remote write settings are wrong.
    #[error(transparent)]
    RemoteWrite(#[from] publish::remote_write::RemoteWriteError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    /// The rules file could not be loaded at start-up.
    #[error(transparent)]
    Rules(#[from] StoreError),
    /// A setting is out of its range.
    #[error("{name} must be {range}, not {value}")]
    Setting {
        /// The setting.
        name: &'static str,
        /// What it must be.
        range: &'static str,
        /// What it was.
        value: String,
    },
    /// A task that must run until shutdown stopped (it panicked).
    #[error("an internal task stopped: {0}")]
    TaskEnded(String),
    /// A token specification is malformed.
    #[error("token: {0}")]
    Token(#[from] auth::TokenError),
    /// The HTTP API would be reachable from other machines with no token.
    #[error(
        "HTTP on {0} is reachable from other machines and no --read-token or --admin-token is set: anyone could \
         read every stream, change the rules and silence alerts. Set tokens, bind to loopback, or pass \
         --insecure-no-auth to accept that"
    )]
    InsecureHttp(SocketAddr),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The alert state directory could not be created.
    #[error(transparent)]
    State(#[from] StateError),
    /// The webhook client could not be built (TLS roots, for example).
    #[error("webhook client: {0}")]
    Webhooks(#[from] reqwest::Error),
}

/// What [`use_small_pages`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// Transparent huge pages are off for this process.
    Small,
    /// `MIMALLOC_ALLOW_THP` is set: the operator chose, and the allocator's own option decides (within what a
    /// parent process allowed).
    AsConfigured,
    /// Not Linux: nothing to turn off.
    Unsupported,
}

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`), unless `MIMALLOC_ALLOW_THP` is
/// set and not empty (mimalloc reads an empty one as on). Call it first thing in `main`: pages faulted in before it
/// keep their size, and child processes inherit it.
///
/// mimalloc asks for huge pages for its arenas (`MADV_HUGEPAGE`), and the first touch of each zeroes 2 MiB at once:
/// while 10,000 agents connected at once, that zeroing was about a quarter of the aggregator's CPU and the start
/// took several times as long (measured in the README, *A sixth machine*); in steady state it was negligible.
pub fn use_small_pages() -> std::io::Result<Pages> {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some_and(|value| !value.is_empty()) {
        return Ok(Pages::AsConfigured);
    }
    #[cfg(target_os = "linux")]
    {
        rustix::thread::disable_transparent_huge_pages(true).map_err(std::io::Error::from)?;
        Ok(Pages::Small)
    }
    #[cfg(not(target_os = "linux"))]
    Ok(Pages::Unsupported)
}

async fn listen(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AggregatorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AggregatorError::Bind { what, addr, source })
}

/// A bound aggregator, ready to run.
pub struct Aggregator {
    config: AggregatorConfig,
    grpc: TcpListener,
    http: TcpListener,
    hub: Arc<Hub>,
    health: Arc<Health>,
    export: Option<Arc<publish::remote_write::RemoteWrite>>,
    cluster: Option<Arc<cluster::Cluster>>,
    rules: Arc<RulesStore>,
    tokens: Arc<auth::Tokens>,
    tls: Option<tls::ServerTls>,
}

impl Aggregator {
    /// Binds both listeners.
    pub async fn bind(config: AggregatorConfig) -> Result<Self, AggregatorError> {
        if config.shard_stall < MIN_SHARD_STALL {
            return Err(AggregatorError::Setting {
                name: "shard_stall",
                range: "at least 1s (shards tick every 10 ms; a bound near that fails /healthz all the time)",
                value: humantime::format_duration(config.shard_stall).to_string(),
            });
        }
        for (name, share) in [
            ("grace_quorum", config.grace_quorum),
            ("grace_trickle", config.grace_trickle),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(AggregatorError::Setting {
                    name,
                    range: "a share from 0 to 1",
                    value: share.to_string(),
                });
            }
        }
        let tokens = auth::Tokens::new(
            &config.read_tokens,
            &config.admin_tokens,
            &config.agent_tokens,
        )?;
        if !tokens.http_required() {
            if !config.http_addr.ip().is_loopback() && !config.insecure_no_auth {
                return Err(AggregatorError::InsecureHttp(config.http_addr));
            }
            warn!(
                message = "HTTP API has no tokens: anyone who reaches it can read every stream, change the rules and acknowledge alerts.",
                http = %config.http_addr,
                loopback_only = config.http_addr.ip().is_loopback(),
            );
        }
        if !tokens.agent_required() {
            warn!(message = "No agent token: anyone who reaches the gRPC port can send data.", grpc = %config.grpc_addr);
        }
        let tls = tls::ServerTls::new(&config.tls)?;
        let grpc = listen("gRPC", config.grpc_addr).await?;
        let http = listen("HTTP", config.http_addr).await?;
        let history = i64::try_from(config.history.as_secs()).unwrap_or(i64::MAX);
        let health = Arc::new(Health::default());
        // A second is final (no correction can come) once its grace and late window have passed, and its late
        // window after its seal.
        let export = publish::remote_write::RemoteWrite::new(
            config.remote_write.clone(),
            config.grace_max + config.late_window,
            config.late_window,
            health.clone(),
        )?;
        let hub = Arc::new(
            Hub::new(
                publish::HistoryLimits {
                    seconds: history,
                    per_service: config.limits.max_history_bytes_per_service,
                    total: config.limits.max_history_bytes,
                    backfill: config.limits.max_backfill_bytes,
                },
                config.limits.subscriber_buffer_frames,
                config.metrics.clone(),
            )
            .with_export(export.clone()),
        );
        let rules = RulesStore::open_with(
            config.rules.clone(),
            alerting::rules::WebhookPolicy::new(
                config.webhook_allow.clone(),
                // Anyone who reaches the port may change the rules: keep their webhooks out of the network.
                config.insecure_no_auth && config.admin_tokens.is_empty(),
            ),
        )?;
        // A node presents the cluster's first read token to the others (which share the token config); never an admin
        // token, which could change their rules.
        let peer_token = config
            .read_tokens
            .iter()
            .find_map(|spec| auth::secret_of(spec));
        if !config.cluster.etcd.is_empty()
            && peer_token.is_none()
            && !config.admin_tokens.is_empty()
        {
            warn!(
                message = "Cluster with tokens but no read token: other nodes' streams cannot be relayed here. Give every node a read token."
            );
        }
        let cluster = cluster::Cluster::new(
            &config.cluster,
            grpc.local_addr().unwrap_or(config.grpc_addr),
            http.local_addr().unwrap_or(config.http_addr),
            tls.is_some(),
            peer_token,
            health.clone(),
        )?;
        Ok(Self {
            config,
            grpc,
            http,
            hub,
            health,
            export,
            cluster,
            rules,
            tokens: Arc::new(tokens),
            tls,
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.config.grpc_addr)
    }

    /// The bound HTTP address (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().unwrap_or(self.config.http_addr)
    }

    /// Serves until `shutdown` completes. Every task it starts is owned here and joined (or aborted after the
    /// shutdown grace) before it returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AggregatorError> {
        // First, before anything is spawned: HTTP's runtime, and the HTTP listener moved onto it.
        let (grpc_addr, http_addr) = (self.grpc_addr(), self.http_addr());
        let http_runtime = HttpRuntime::new(self.config.http_threads)?;
        let http_listener = http_runtime
            .adopt(self.http)
            .map_err(AggregatorError::Http)?;
        let settings = WindowSettings {
            grace_ms: i64::try_from(self.config.grace.as_millis()).unwrap_or(i64::MAX),
            grace_quiet_ms: i64::try_from(self.config.grace_quiet.as_millis()).unwrap_or(i64::MAX),
            grace_quorum: self.config.grace_quorum,
            grace_trickle: self.config.grace_trickle,
            grace_max_ms: i64::try_from(self.config.grace_max.as_millis()).unwrap_or(i64::MAX),
            grace_max_behind_ms: i64::try_from(self.config.grace_max_behind.as_millis())
                .unwrap_or(i64::MAX),
            late_window_secs: i64::try_from(self.config.late_window.as_secs()).unwrap_or(i64::MAX),
            replay_gather_ms: i64::try_from(self.config.replay_gather.as_millis())
                .unwrap_or(i64::MAX),
            replay_stall_ms: i64::try_from(self.config.replay_stall.as_millis())
                .unwrap_or(i64::MAX),
            replay_wait_ms: i64::try_from(self.config.replay_wait.as_millis()).unwrap_or(i64::MAX),
            max_cells: self.config.limits.max_series_per_service.saturating_mul(3),
            max_bytes: self.config.limits.max_decoded_bytes_per_service,
        };
        // Long-lived tasks (shards, alert manager, delivery, rules watcher) live in `tasks`; per-connection ones
        // (agent streams) in `streams`.
        let mut tasks = JoinSet::new();
        let streams = TaskTracker::new();
        let deliverer = Deliverer::new(self.config.webhooks.clone(), self.health.clone())?;
        let (sink, mut notifications) = tokio::sync::mpsc::unbounded_channel::<Notification>();
        tasks.spawn(async move {
            while let Some(notification) = notifications.recv().await {
                deliverer.enqueue(notification);
            }
        });
        let persistence = match &self.config.state_dir {
            Some(dir) => Some(Persistence {
                file: StateFile::open(dir)?,
                restore_grace: self.config.alert_restore_grace,
                canary_restore_grace: self.config.alert_restore_grace
                    + self.config.canary.min_history
                    + self.config.canary.settle,
                outage_tolerance: self.config.alert_outage_tolerance,
            }),
            None => {
                info!(message = "No state directory: alert state is kept in memory only.");
                None
            }
        };
        let alerts = Alerts::spawn(
            self.rules.clone(),
            self.hub.clone(),
            sink,
            self.health.clone(),
            alerting::alerts::manager::Keeping {
                persistence,
                handover: self
                    .cluster
                    .clone()
                    .map(|c| c as Arc<dyn alerting::alerts::Handover>),
                resolved: alerting::alerts::manager::ResolvedKept {
                    retention: self.config.resolved_alert_retention,
                    most: self.config.max_resolved_alerts,
                },
            },
            &mut tasks,
        );
        if let Some(cluster) = &self.cluster {
            tasks.spawn(cluster.clone().run());
            tasks.spawn(cluster::relay::run(
                cluster.clone(),
                self.hub.clone(),
                publish::http::ClusterView::peer_token(cluster.as_ref()),
            ));
        }
        tasks.spawn(self.rules.clone().watch());
        if let Some(export) = self.export.clone() {
            tasks.spawn(export.run());
        }
        let hub = self.hub.clone();
        tasks.spawn(async move {
            // Services that went away leave the hub once their history has passed.
            let mut every = tokio::time::interval(PRUNE_INTERVAL);
            loop {
                every.tick().await;
                hub.prune(strobe_proto::clock::unix_second());
            }
        });
        let replays = Arc::new(pipeline::replays::Replays::default());
        let context = Arc::new(ServiceContext {
            replays: replays.clone(),
            started_ms: strobe_proto::clock::unix_millis(),
            hub: self.hub.clone(),
            health: self.health.clone(),
            settings,
            rules: self.rules.clone(),
            alerts: alerts.clone(),
            canary: self.config.canary.clone(),
            metrics: self.config.metrics.clone(),
            correction_interval_ms: i64::try_from(
                self.config
                    .correction_interval
                    .min(MAX_CORRECTION_INTERVAL)
                    .as_millis(),
            )
            .unwrap_or(i64::MAX),
            cluster: self.cluster.clone(),
            decoded: pipeline::windows::DecodedBytes::new(
                self.config.limits.max_decoded_bytes,
                self.health.decoded_bytes.clone(),
            ),
        });
        let shard_count = self.config.shard_count();
        let shards = Shards::spawn(shard_count, self.config.shard_stall, context, &mut tasks);
        let ingest = ingest::IngestService {
            shards,
            limits: self.config.limits.clone(),
            agent_tokens: self.tokens.clone(),
            health: self.health.clone(),
            streams: streams.clone(),
            budget: QueueBudget::new(
                self.config.limits.max_queued_bytes,
                self.config.limits.max_queued_bytes_per_stream,
            ),
            tables: Arc::new(model::table::SeriesTables::new(
                self.config.limits.max_series_per_service,
            )),
            replays,
            catch_up: pipeline::replays::CatchUp {
                caught_up_ms: i64::try_from(self.config.replay_caught_up.as_millis())
                    .unwrap_or(i64::MAX),
                longest_ms: i64::try_from(self.config.replay_wait.as_millis()).unwrap_or(i64::MAX),
            },
            cluster: self.cluster.clone(),
            alerts: alerts.clone(),
        };
        let max_message = self.config.limits.max_message_bytes;
        let grpc_service = strobe_proto::ingest_server::IngestServer::new(ingest)
            .max_decoding_message_size(max_message);
        let app = publish::http::router(Arc::new(publish::http::AppState {
            hub: self.hub.clone(),
            health: self.health.clone(),
            rules: self.rules.clone(),
            alerts,
            limits: publish::http::WebsocketLimits {
                max_websocket_message_bytes: self.config.limits.max_websocket_message_bytes,
                max_subscribed_services: self.config.limits.max_subscribed_services,
                max_websocket_clients: self.config.limits.max_websocket_clients,
                max_websocket_clients_per_address: self
                    .config
                    .limits
                    .max_websocket_clients_per_address,
            },
            websocket_clients: Default::default(),
            tokens: self.tokens.clone(),
            allowed_origins: self.config.allowed_origins.clone(),
            any_host: self.config.insecure_no_auth,
            cluster: self
                .cluster
                .clone()
                .map(|c| c as Arc<dyn publish::http::ClusterView>),
            peers: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        }));
        info!(
            message = "Aggregator listening.",
            grpc = %grpc_addr, http = %http_addr, shards = shard_count,
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let leaving = self.cluster.clone();
        let stopper = tokio::spawn(async move {
            shutdown.await;
            // A node of a cluster leaves first, so its services move at once rather than after its lease expires.
            if let Some(cluster) = leaving {
                cluster.leave().await;
            }
            // Every receiver is a server below; if they are all gone there is nobody left to stop.
            stop_tx.send(true).ok();
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            // An error means the sender is gone, which only happens once shutdown was asked for.
            rx.wait_for(|stop| *stop).await.ok();
        };
        // Thousands of agent streams share a few HTTP/2 connections when they come through a proxy or a load
        // generator: windows sized so one second's burst is not throttled by flow-control round trips, and small
        // enough that what an aggregator behind holds unread stays bounded (HTTP/2 allows 64 KiB to 2 GiB).
        let limits = &self.config.limits;
        let window = |bytes: u32| bytes.clamp(65_535, i32::MAX as u32);
        let keepalive = limits.agent_keepalive;
        let grpc_router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(keepalive))
            .initial_connection_window_size(window(limits.agent_connection_window))
            .initial_stream_window_size(window(limits.agent_stream_window))
            .add_service(grpc_service);
        let make_app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        type Served<E> = std::pin::Pin<Box<dyn Future<Output = Result<(), E>> + Send>>;
        let (grpc, http): (Served<tonic::transport::Error>, Served<std::io::Error>) = match self.tls
        {
            Some(server_tls) => {
                tasks.spawn(server_tls.cert.clone().watch());
                let incoming = tokio_stream::wrappers::ReceiverStream::new(tls::accept_tls(
                    self.grpc,
                    server_tls.grpc,
                    &mut tasks,
                    &tokio::runtime::Handle::current(),
                ))
                .map(|(stream, _)| Ok::<_, std::io::Error>(stream));
                let listener = tls::TlsListener::new(
                    http_listener,
                    server_tls.http,
                    &mut tasks,
                    &http_runtime.handle(),
                )
                .map_err(AggregatorError::Http)?;
                (
                    Box::pin(
                        grpc_router
                            .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())),
                    ),
                    Box::pin(
                        axum::serve(axum::serve::ListenerExt::tap_io(listener, |_| {}), make_app)
                            .with_graceful_shutdown(stopped(stop_rx.clone()))
                            .into_future(),
                    ),
                )
            }
            None => (
                Box::pin(grpc_router.serve_with_incoming_shutdown(
                    TcpListenerStream::new(self.grpc),
                    stopped(stop_rx.clone()),
                )),
                Box::pin(
                    // As the TLS listener does: a websocket frame is a small write, which without TCP_NODELAY waits
                    // (Nagle) for the client's acknowledgement of the one before whenever that is still in flight.
                    axum::serve(
                        axum::serve::ListenerExt::tap_io(http_listener, |tcp| {
                            tcp.set_nodelay(true).ok();
                        }),
                        make_app,
                    )
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
                ),
            ),
        };
        // HTTP and the websockets run on threads of their own, so the kernel shares a core between publishing and
        // ingest. On one runtime, a sealed second's frames waited in the task queue behind every agent stream
        // with a snapshot to decode, and the cores are busiest exactly when seconds seal.
        let http = http_runtime.serve(http);
        let servers = async {
            let (grpc, http) =
                tokio::join!(grpc, async { http.await.map_err(AggregatorError::Http) });
            grpc.map_err(AggregatorError::from).and(http)
        };
        let asked = stop_rx.clone();
        // Open agent streams and websockets would hold a graceful shutdown forever: bound it.
        let deadline = async {
            stopped(stop_rx).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::pin!(servers, deadline);
        // A task that panics during shutdown still makes the exit non-zero (a shard or the alert manager failing
        // to finish is worth a restart's look), after the rest has stopped.
        let mut panicked_in_shutdown = None;
        let result = loop {
            tokio::select! {
                result = &mut servers => break result,
                _ = &mut deadline => {
                    info!(message = "Connections still open after the shutdown grace; closing them.");
                    break Ok(());
                }
                // Shards (restarted by their supervisor after a panic), the alert manager, delivery, the rules
                // watcher and the hub's pruning run until shutdown; one that ends before leaves the aggregator
                // unable to do its job: stop, and say so with a non-zero exit, so the process supervisor restarts
                // it. Once shutdown is under way tasks end as their handles go (the shards with the gRPC server,
                // while websockets still drain): that is the shutdown, not a failure.
                Some(ended) = tasks.join_next() => {
                    if *asked.borrow() {
                        if let Err(error) = &ended
                            && error.is_panic()
                        {
                            tracing::error!(message = "An internal task panicked during shutdown.", %error);
                            panicked_in_shutdown = Some(error.to_string());
                        }
                        continue;
                    }
                    let why = match ended {
                        Ok(()) => "it returned".to_owned(),
                        Err(error) => error.to_string(),
                    };
                    tracing::error!(message = "An internal task stopped; shutting down.", reason = %why);
                    break Err(AggregatorError::TaskEnded(why));
                }
            }
        };
        stopper.abort();
        streams.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, streams.wait())
            .await
            .is_err()
        {
            warn!(
                message = "Agent streams still open after the shutdown grace; abandoning them.",
                open = streams.len()
            );
        }
        tasks.shutdown().await;
        match (result, panicked_in_shutdown) {
            (Ok(()), Some(why)) => Err(AggregatorError::TaskEnded(why)),
            (result, _) => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Afterwards the process runs on small pages, unless the operator set mimalloc's own option.
    #[cfg(target_os = "linux")]
    #[test]
    fn small_pages_turn_transparent_huge_pages_off_for_the_process() {
        match use_small_pages().unwrap() {
            Pages::Small => assert!(rustix::thread::transparent_huge_pages_are_disabled().unwrap()),
            Pages::AsConfigured => {
                assert!(std::env::var_os("MIMALLOC_ALLOW_THP").is_some_and(|v| !v.is_empty()));
            }
            Pages::Unsupported => panic!("Linux has transparent huge pages to turn off"),
        }
    }

    /// With threads, the server runs on them, and the runtime can be dropped inside another (as `run`'s future is
    /// when its caller gives up on it); without, it runs where it is awaited.
    #[tokio::test]
    async fn http_runs_on_threads_of_its_own_unless_it_has_none() {
        for (threads, own) in [(1, true), (0, false)] {
            let runtime = HttpRuntime::new(threads).expect("a runtime");
            let (tx, rx) = tokio::sync::oneshot::channel();
            runtime
                .serve(async move {
                    tx.send(std::thread::current().name().map(str::to_owned))
                        .ok();
                    Ok(())
                })
                .await
                .expect("served");
            let name = rx.await.expect("the server ran");
            assert_eq!(name.as_deref() == Some("strobe-http"), own, "{name:?}");
            drop(runtime);
        }
    }

    /// A listener bound here accepts on the HTTP runtime once adopted; a server still running when the runtime goes
    /// is stopped, not waited for; a server's panic goes on in its caller.
    #[tokio::test]
    async fn the_http_runtime_accepts_stops_and_passes_panics_on() {
        let runtime = HttpRuntime::new(1).expect("a runtime");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bound");
        let address = listener.local_addr().expect("an address");
        let listener = runtime.adopt(listener).expect("adopted");
        let accepted = runtime.serve(async move { listener.accept().await.map(|_| ()) });
        let _client = tokio::net::TcpStream::connect(address)
            .await
            .expect("connected");
        accepted.await.expect("accepted on the HTTP runtime");

        let pending = runtime.serve(std::future::pending());
        drop(runtime);
        assert!(pending.await.is_err(), "stopped with its runtime");

        let runtime = HttpRuntime::new(1).expect("a runtime");
        let panicking = tokio::spawn(runtime.serve(async { panic!("a server's panic") }));
        let ended = panicking.await.expect_err("the panic went on");
        assert!(ended.is_panic());
    }

    /// A grace quorum that is not a share, or a shard stall near the shards' tick, is refused before anything binds.
    #[tokio::test]
    async fn settings_out_of_range_are_refused_before_anything_binds() {
        let quorum = |q: f64| AggregatorConfig {
            grace_quorum: q,
            ..AggregatorConfig::default()
        };
        let trickle = |share: f64| AggregatorConfig {
            grace_trickle: share,
            ..AggregatorConfig::default()
        };
        let stall = |ms: u64| AggregatorConfig {
            shard_stall: std::time::Duration::from_millis(ms),
            ..AggregatorConfig::default()
        };
        for (config, setting) in [
            (quorum(f64::NAN), "grace_quorum"),
            (quorum(-0.1), "grace_quorum"),
            (quorum(1.5), "grace_quorum"),
            (trickle(f64::NAN), "grace_trickle"),
            (trickle(-0.5), "grace_trickle"),
            (stall(0), "shard_stall"),
            (stall(50), "shard_stall"),
        ] {
            let err = Aggregator::bind(config).await.err().expect("refused");
            assert!(
                matches!(err, AggregatorError::Setting { name, .. } if name == setting),
                "{setting}: {err}"
            );
        }
    }
}
