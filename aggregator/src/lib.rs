//! Strobe's aggregator: ingests one-second snapshots from agents over gRPC, merges each second across all
//! instances of a service (overall, by version, by zone), seals it within a short grace, and serves it live to
//! browsers over a websocket, with history for backfill.
//!
//! # Layout
//! - [`ingest`]: the tonic service; [`validate`] turns wire messages into [`model`] types, enforcing limits.
//! - [`shard`]: tasks that own services; [`windows`] decides when a second is sealed; [`merge`] merges cells.
//! - [`hub`]: frames serialised once, history, broadcast; [`overview`] summarises a second per version.
//! - [`http`]: dashboard, API, websocket.
//! - [`rules`]: threshold rules, evaluated by the owning shard on every sealed second.
//! - [`canary`]: automatic comparison of a new version with the one it replaces, every sealed second.
//! - [`alerts`]: alert records, escalation chains, acknowledgements, webhook delivery.
//! - [`health`]: the aggregator's own counters. [`config`]: every setting and limit.
//!
//! `validate`, `merge` and `windows` are pure (no I/O, no tokio); time is passed in.

pub mod alerts;
pub mod canary;
pub mod config;
pub mod health;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod merge;
pub mod model;
pub mod overview;
pub mod rules;
pub mod shard;
pub mod validate;
pub mod windows;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub use config::{AggregatorConfig, Limits};

use crate::alerts::{Alerts, Deliverer, Notification};
use crate::health::Health;
use crate::hub::Hub;
use crate::rules::RulesStore;
use crate::shard::{ShardContext, Shards};
use crate::windows::WindowSettings;

/// How long connections may take to close after shutdown is asked for.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    /// The rules file could not be loaded at start-up.
    #[error(transparent)]
    Rules(#[from] rules::StoreError),
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
    rules: Arc<RulesStore>,
}

impl Aggregator {
    /// Binds both listeners.
    pub async fn bind(config: AggregatorConfig) -> Result<Self, AggregatorError> {
        let grpc = listen("gRPC", config.grpc_addr).await?;
        let http = listen("HTTP", config.http_addr).await?;
        let history = i64::try_from(config.history.as_secs()).unwrap_or(i64::MAX);
        let hub = Arc::new(Hub::new(
            history,
            config.limits.subscriber_buffer_frames,
            config.metrics.clone(),
        ));
        let rules = RulesStore::open(config.rules.clone())?;
        Ok(Self {
            config,
            grpc,
            http,
            hub,
            health: Arc::new(Health::default()),
            rules,
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

    /// The aggregator's own counters (what `/metrics` shows).
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AggregatorError> {
        let settings = WindowSettings {
            grace_ms: i64::try_from(self.config.grace.as_millis()).unwrap_or(i64::MAX),
            grace_quiet_ms: i64::try_from(self.config.grace_quiet.as_millis()).unwrap_or(i64::MAX),
            grace_max_ms: i64::try_from(self.config.grace_max.as_millis()).unwrap_or(i64::MAX),
            late_window_secs: i64::try_from(self.config.late_window.as_secs()).unwrap_or(i64::MAX),
            max_cells: self.config.limits.max_series_per_service.saturating_mul(3),
        };
        let deliverer = Deliverer::new(self.config.webhooks.clone(), self.health.clone());
        let (sink, mut notifications) = tokio::sync::mpsc::unbounded_channel::<Notification>();
        tokio::spawn(async move {
            while let Some(notification) = notifications.recv().await {
                deliverer.enqueue(notification);
            }
        });
        let alerts = Alerts::spawn(self.rules.clone(), self.hub.clone(), sink);
        let watcher = tokio::spawn(self.rules.clone().watch());
        let context = Arc::new(ShardContext {
            hub: self.hub.clone(),
            health: self.health.clone(),
            settings,
            rules: self.rules.clone(),
            alerts: alerts.clone(),
            canary: self.config.canary.clone(),
            metrics: self.config.metrics.clone(),
        });
        let shard_count = self.config.shard_count();
        let (shards, _tasks) = Shards::spawn(shard_count, context);
        let ingest = ingest::IngestService {
            shards,
            limits: self.config.limits.clone(),
            agent_tokens: self.config.agent_tokens.clone().into(),
            health: self.health.clone(),
        };
        let max_message = self.config.limits.max_message_bytes;
        let grpc_service = strobe_proto::ingest_server::IngestServer::new(ingest)
            .max_decoding_message_size(max_message);
        let app = http::router(Arc::new(http::AppState {
            hub: self.hub.clone(),
            health: self.health.clone(),
            rules: self.rules.clone(),
            alerts,
        }));
        info!(
            message = "Aggregator listening.",
            grpc = %self.grpc_addr(), http = %self.http_addr(), shards = shard_count,
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let grpc = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(grpc_service)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.grpc),
                stopped(stop_rx.clone()),
            );
        let http = axum::serve(self.http, app).with_graceful_shutdown(stopped(stop_rx.clone()));
        let servers = async {
            let (grpc, http) =
                tokio::join!(grpc, async { http.await.map_err(AggregatorError::Http) });
            grpc.map_err(AggregatorError::from).and(http)
        };
        // Open agent streams and websockets would hold a graceful shutdown forever: bound it.
        let deadline = async {
            stopped(stop_rx).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let result = tokio::select! {
            result = servers => result,
            _ = deadline => {
                info!(message = "Connections still open after the shutdown grace; closing them.");
                Ok(())
            }
        };
        watcher.abort();
        result
    }
}
