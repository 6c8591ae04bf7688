//! Strobe's sidecar agent: takes a service's metrics, folds them into one-second snapshots aligned to wall-clock
//! seconds, and streams them to the aggregator.
//!
//! # Layout
//! - [`statsd`]: the DogStatsD line parser (pure).
//! - [`window`]: one-second windows: counters, last gauges, HDR histograms (pure).
//! - [`shipper`]: the gRPC stream to the aggregator, with replay of unacknowledged seconds and jittered backoff.
//! - [`Agent`]: binds the DogStatsD UDP socket and runs the fold loop and the shipper.
//!
//! Inputs record, the window folds, the shipper exports: the three never share a lock.

pub mod facade;
pub mod scrape;
pub mod shipper;
pub mod statsd;
pub mod window;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strobe_proto as pb;
use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::info;

pub use shipper::{ShipperConfig, ShipperReport, ShipperTally, run_shipper, run_shipper_on};
pub use statsd::ParseLimits;
pub use strobe_proto::clock::AgentClock;
pub use window::{Folder, Window, WindowLimits};

/// Everything the agent needs to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Service name.
    pub service: String,
    /// Version of the service: deploy id, image tag or git sha.
    pub version: String,
    /// Zone the instance runs in (may be empty).
    pub zone: String,
    /// Instance id; empty means `host-pid`.
    pub instance: String,
    /// Extra identity labels, for example `deployer`.
    pub labels: std::collections::BTreeMap<String, String>,
    /// UDP address for DogStatsD.
    pub statsd_addr: SocketAddr,
    /// Largest UDP packet read, in bytes.
    pub max_packet_bytes: usize,
    /// Line parser bounds.
    pub parse_limits: ParseLimits,
    /// Prometheus pages (`http://127.0.0.1:9100/metrics`) scraped every second.
    pub scrape: Vec<String>,
    /// How long one scrape may take.
    #[serde(with = "humantime_serde")]
    pub scrape_timeout: std::time::Duration,
    /// Most series in one second.
    pub max_series_per_second: usize,
    /// Largest histogram value in the metric's unit.
    pub max_histogram_value: f64,
    /// The gRPC stream to the aggregator.
    pub shipper: ShipperConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        let window = WindowLimits::default();
        Self {
            service: String::new(),
            version: String::new(),
            zone: String::new(),
            instance: String::new(),
            labels: Default::default(),
            statsd_addr: SocketAddr::from(([127, 0, 0, 1], 8125)),
            max_packet_bytes: 65_535,
            parse_limits: ParseLimits::default(),
            scrape: Vec::new(),
            scrape_timeout: std::time::Duration::from_millis(800),
            max_series_per_second: window.max_series,
            max_histogram_value: window.max_histogram_value,
            shipper: ShipperConfig::default(),
        }
    }
}

impl AgentConfig {
    /// The identity sent in the stream's hello, with the instance defaulted to `host-pid`.
    pub fn identity(&self) -> pb::Identity {
        let instance = if self.instance.is_empty() {
            default_instance_id()
        } else {
            self.instance.clone()
        };
        pb::Identity {
            service: self.service.clone(),
            version: self.version.clone(),
            zone: self.zone.clone(),
            instance,
            labels: self.labels.clone().into_iter().collect(),
        }
    }

    fn window_limits(&self) -> WindowLimits {
        WindowLimits {
            max_series: self.max_series_per_second,
            max_histogram_value: self.max_histogram_value,
        }
    }
}

/// `host-pid`, the default instance id.
pub fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Why the agent could not start.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The service name is empty.
    #[error("the service name must not be empty")]
    MissingService,
    /// The version is empty.
    #[error("the version must not be empty")]
    MissingVersion,
    /// The DogStatsD socket could not be bound.
    #[error("cannot bind DogStatsD on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A bound agent, ready to run.
pub struct Agent {
    config: AgentConfig,
    socket: UdpSocket,
    /// In-process series (the `metrics` facade), folded in at every second.
    registry: Option<Arc<facade::Registry>>,
}

impl Agent {
    /// Validates the config and binds the DogStatsD socket.
    pub async fn bind(config: AgentConfig) -> Result<Self, AgentError> {
        if config.service.trim().is_empty() {
            return Err(AgentError::MissingService);
        }
        if config.version.trim().is_empty() {
            return Err(AgentError::MissingVersion);
        }
        let socket = UdpSocket::bind(config.statsd_addr)
            .await
            .map_err(|source| AgentError::Bind {
                addr: config.statsd_addr,
                source,
            })?;
        Ok(Self {
            config,
            socket,
            registry: None,
        })
    }

    /// The address DogStatsD packets go to.
    pub fn statsd_addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap_or(self.config.statsd_addr)
    }

    /// Folds and ships until `shutdown` completes, then closes the open second and drains what is unacknowledged.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> ShipperReport {
        let identity = self.config.identity();
        info!(
            message = "Agent running.",
            service = %identity.service, version = %identity.version, instance = %identity.instance,
            statsd = %self.statsd_addr(), aggregator = %self.config.shipper.aggregator,
        );
        let (tx, rx) = mpsc::channel(16);
        let shipper = tokio::spawn(run_shipper(identity, self.config.shipper.clone(), rx));
        fold_loop(
            &self.socket,
            &self.config,
            self.registry.as_deref(),
            tx,
            shutdown,
        )
        .await;
        match shipper.await {
            Ok(report) => report,
            Err(error) => {
                tracing::error!(message = "Shipper failed; unsent seconds are lost.", %error);
                ShipperReport::default()
            }
        }
    }
}

async fn fold_loop(
    socket: &UdpSocket,
    config: &AgentConfig,
    registry: Option<&facade::Registry>,
    tx: mpsc::Sender<pb::Snapshot>,
    shutdown: impl Future<Output = ()>,
) {
    // Windows close on the aggregator's clock as the shipper learns it (this machine's until then).
    let clock = &config.shipper.clock;
    let mut folder = Folder::new(clock.unix_second(), config.window_limits());
    // The clock offset the open window was stamped with: when the offset moves, the open window moves with it
    // (before it rolls), so its contents land in their second on the corrected clock.
    let mut stamped_with = clock.offset_ms();
    let mut roll = |folder: &mut Folder| {
        let now = clock.offset_ms();
        let moved = now - std::mem::replace(&mut stamped_with, now);
        let shift = (moved as f64 / 1000.0).round() as i64;
        if shift != 0 {
            folder.restamp(shift, clock.accepted_up_to(), clock.take_held());
        }
        folder.roll(clock.unix_second(), clock.accepted_up_to())
    };
    let mut packet = vec![0u8; config.max_packet_bytes.max(512)];
    // Prometheus pages, scraped in their own tasks; their samples are folded here like packets.
    let (scraped_tx, mut scraped) = mpsc::channel::<Vec<scrape::Scraped>>(16);
    let mut scrapers = tokio::task::JoinSet::new();
    for url in &config.scrape {
        scrapers.spawn(scrape::scrape_loop(
            url.clone(),
            config.scrape_timeout,
            clock.clone(),
            scraped_tx.clone(),
        ));
    }
    drop(scraped_tx);
    tokio::pin!(shutdown);
    // A hair past the boundary, so the roll sees the new second.
    let boundary =
        tokio::time::sleep(clock.until_next_second() + std::time::Duration::from_millis(1));
    tokio::pin!(boundary);
    loop {
        tokio::select! {
            received = socket.recv_from(&mut packet) => {
                let len = match received {
                    Ok((len, _)) => len,
                    Err(error) => {
                        // Transient (an ICMP error surfacing, say); the socket stays usable.
                        tracing::warn!(message = "UDP receive failed.", %error);
                        continue;
                    }
                };
                ship(&tx, roll(&mut folder)).await;
                let window = folder.open();
                statsd::parse_packet(&packet[..len], &config.parse_limits, |line| match line {
                    Ok(line) => window.record(&line),
                    Err(_) => window.count_malformed(),
                });
            }
            Some(samples) = scraped.recv() => {
                ship(&tx, roll(&mut folder)).await;
                let window = folder.open();
                for sample in &samples {
                    let tags: Vec<(&str, &str)> =
                        sample.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    for (value, count) in &sample.values {
                        // A count of n is a sample rate of 1/n: the window weighs by the rate.
                        let rate = 1.0 / (*count).max(1) as f64;
                        window.record_values(&sample.name, &tags, sample.kind, std::iter::once(*value), rate);
                    }
                }
            }
            _ = &mut boundary => {
                // What the service recorded in process belongs to the second that is closing.
                if let Some(registry) = registry {
                    registry.drain_into(folder.open());
                }
                ship(&tx, roll(&mut folder)).await;
                boundary.as_mut().reset(
                    tokio::time::Instant::now() + clock.until_next_second() + std::time::Duration::from_millis(1),
                );
            }
            _ = &mut shutdown => {
                if let Some(registry) = registry {
                    registry.drain_into(folder.open());
                }
                let open = std::mem::replace(folder.open(), Window::new(0, config.window_limits()));
                ship(&tx, Some(open.close())).await;
                return;
            }
        }
    }
}

async fn ship(
    tx: &mpsc::Sender<pb::Snapshot>,
    closed: Option<(pb::Snapshot, window::WindowStats)>,
) {
    if let Some((snapshot, _)) = closed
        && let Err(lost) = tx.send(snapshot).await
    {
        // The shipper stops only when this sender is dropped, so this means it failed: say which second is lost.
        tracing::error!(
            message = "Shipper stopped; snapshot not sent.",
            second = lost.0.second
        );
    }
}

/// Why the in-process agent could not start.
#[derive(Debug, Error)]
pub enum InstallError {
    /// The agent could not be bound.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Another `metrics` recorder is installed already.
    #[error("a metrics recorder is installed already")]
    RecorderInstalled,
}

/// An agent running inside the service, fed by the `metrics` facade.
pub struct InProcessAgent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<ShipperReport>,
}

impl InProcessAgent {
    /// Closes the open second, waits for its acknowledgement (at most the drain timeout) and stops.
    pub async fn shutdown(mut self) -> ShipperReport {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok(); // the agent may have stopped already
        }
        (&mut self.task).await.unwrap_or_default()
    }
}

/// Makes Strobe the global `metrics` recorder of this process and runs the agent in it (on the current tokio
/// runtime): `metrics::counter!`, `gauge!` and `histogram!` reach the aggregator every second, no sidecar needed.
/// DogStatsD on `config.statsd_addr` and scrapes keep working beside it.
pub async fn install(config: AgentConfig) -> Result<InProcessAgent, InstallError> {
    let registry = Arc::new(facade::Registry::default());
    let mut agent = Agent::bind(config).await?;
    metrics::set_global_recorder(facade::StrobeRecorder::new(registry.clone()))
        .map_err(|_| InstallError::RecorderInstalled)?;
    agent.registry = Some(registry);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        stopped.await.ok();
    }));
    Ok(InProcessAgent {
        stop: Some(stop),
        task,
    })
}
