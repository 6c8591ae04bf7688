//! Strobe's sidecar agent: takes a service's metrics, folds them into one-second snapshots aligned to wall-clock
//! seconds, and streams them to the aggregator.
//!
//! # Layout
//! - [`statsd`]: the DogStatsD line parser (pure).
//! - [`window`]: one-second windows: counters, last gauges, HDR histograms (pure).
//! - [`scrape`]: Prometheus pages read every second; [`otlp`]: the OpenTelemetry exporter's pushes; [`facade`]: the
//!   Rust `metrics` facade in process. Each turns its input into samples the fold loop records like DogStatsD lines.
//! - [`shipper`]: the gRPC stream to the aggregator, with replay of unacknowledged seconds and jittered backoff.
//! - [`health`]: the agent's own counters on `/metrics`.
//! - [`Agent`]: binds the sockets and runs the fold loop, the inputs' servers and the shipper.
//!
//! Inputs record, the window folds, the shipper exports: the three never share a lock (the in-process facade's
//! cells are the exception: the service's threads write them, the fold task drains them).

pub mod facade;
pub mod health;
pub mod otlp;
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

pub use shipper::{
    RegisteredSeries, ShipperConfig, ShipperReport, ShipperTally, run_shipper, run_shipper_counted,
    run_shipper_on, spell_into,
};
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
    /// Kernel receive buffer asked for the DogStatsD socket, in bytes (0: the system default).
    pub statsd_receive_buffer_bytes: usize,
    /// Line parser bounds.
    pub parse_limits: ParseLimits,
    /// Prometheus pages (`http://127.0.0.1:9100/metrics`) scraped every second.
    pub scrape: Vec<String>,
    /// How long one scrape may take.
    #[serde(with = "humantime_serde")]
    pub scrape_timeout: std::time::Duration,
    /// Largest page a scrape reads, in bytes (a larger one fails the scrape).
    pub scrape_max_bytes: usize,
    /// Where the agent's own `/metrics` is served (`None`, `"none"` in TOML: not served).
    #[serde(with = "addr_or_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// OTLP/gRPC metrics receiver (`None`: off).
    pub otlp_grpc_addr: Option<SocketAddr>,
    /// OTLP/HTTP metrics receiver, protobuf at `/v1/metrics` (`None`: off).
    pub otlp_http_addr: Option<SocketAddr>,
    /// Largest OTLP export request, in bytes.
    pub otlp_max_request_bytes: usize,
    /// Most cumulative OTLP series remembered between exports (to difference them).
    pub otlp_max_series: usize,
    /// Most series in one second.
    pub max_series_per_second: usize,
    /// Largest histogram value in the metric's unit.
    pub max_histogram_value: f64,
    /// In process (the `metrics` facade): most values one histogram keeps in one second; more are counted
    /// (`series_over_limit`) and dropped.
    pub facade_max_values_per_second: usize,
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
            statsd_receive_buffer_bytes: 8 << 20,
            parse_limits: ParseLimits::default(),
            scrape: Vec::new(),
            scrape_timeout: std::time::Duration::from_millis(800),
            scrape_max_bytes: 16 << 20,
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9102))),
            otlp_grpc_addr: None,
            otlp_http_addr: None,
            otlp_max_request_bytes: 4 << 20,
            otlp_max_series: 100_000,
            max_series_per_second: window.max_series,
            max_histogram_value: window.max_histogram_value,
            facade_max_values_per_second: facade::MAX_VALUES_PER_SECOND,
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
            max_tags: self.parse_limits.max_tags,
            max_part_bytes: self.parse_limits.max_part_bytes,
        }
    }
}

/// An optional address written as `"HOST:PORT"` or `"none"`.
mod addr_or_none {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        addr: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str("none"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let raw = String::deserialize(d)?;
        if raw.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        raw.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

/// `host-pid`, the default instance id.
pub fn default_instance_id() -> String {
    strobe_proto::host_pid()
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
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener: `DogStatsD`, `/metrics`, `OTLP/gRPC`, `OTLP/HTTP`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds the DogStatsD socket with a receive buffer of `buffer_bytes`, so that a burst of packets waits in the kernel
/// instead of being dropped while the fold loop is busy (Linux caps it at `net.core.rmem_max`; the size obtained is
/// logged).
fn bind_statsd(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if buffer_bytes > 0 {
        if let Err(error) = socket.set_recv_buffer_size(buffer_bytes) {
            tracing::warn!(message = "Could not size the DogStatsD receive buffer.", %error, asked = buffer_bytes);
        }
        let reported = socket.recv_buffer_size().unwrap_or(0);
        // Linux reports twice what it grants (the other half is its bookkeeping).
        let got = if cfg!(target_os = "linux") {
            reported / 2
        } else {
            reported
        };
        if got < buffer_bytes {
            tracing::warn!(
                message = "The DogStatsD receive buffer is smaller than asked; raise net.core.rmem_max to avoid drops in bursts.",
                asked = buffer_bytes,
                got,
            );
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The TCP listeners an agent serves besides DogStatsD.
#[derive(Default)]
struct Listeners {
    metrics: Option<tokio::net::TcpListener>,
    otlp_grpc: Option<tokio::net::TcpListener>,
    otlp_http: Option<tokio::net::TcpListener>,
}

async fn bind_tcp(
    what: &'static str,
    addr: Option<SocketAddr>,
) -> Result<Option<tokio::net::TcpListener>, AgentError> {
    let Some(addr) = addr else { return Ok(None) };
    tokio::net::TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| AgentError::Bind { what, addr, source })
}

/// A bound agent, ready to run.
pub struct Agent {
    config: AgentConfig,
    socket: UdpSocket,
    listeners: Listeners,
    health: Arc<health::AgentHealth>,
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
        let socket = bind_statsd(config.statsd_addr, config.statsd_receive_buffer_bytes).map_err(
            |source| AgentError::Bind {
                what: "DogStatsD",
                addr: config.statsd_addr,
                source,
            },
        )?;
        let listeners = Listeners {
            metrics: bind_tcp("/metrics", config.metrics_addr).await?,
            otlp_grpc: bind_tcp("OTLP/gRPC", config.otlp_grpc_addr).await?,
            otlp_http: bind_tcp("OTLP/HTTP", config.otlp_http_addr).await?,
        };
        let health = Arc::new(health::AgentHealth::new());
        health.watch_statsd_socket(&socket);
        Ok(Self {
            config,
            socket,
            listeners,
            health,
            registry: None,
        })
    }

    /// The address DogStatsD packets go to.
    pub fn statsd_addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap_or(self.config.statsd_addr)
    }

    /// Every bound address as `name=addr` (`statsd`, `metrics`, `otlp`, `otlp_http`), for the startup line.
    pub fn addresses(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut out = vec![("statsd", self.statsd_addr())];
        for (name, listener) in [
            ("metrics", &self.listeners.metrics),
            ("otlp", &self.listeners.otlp_grpc),
            ("otlp_http", &self.listeners.otlp_http),
        ] {
            if let Some(addr) = listener.as_ref().and_then(|l| l.local_addr().ok()) {
                out.push((name, addr));
            }
        }
        out
    }

    /// The agent's own counters (what `/metrics` serves).
    pub fn health(&self) -> Arc<health::AgentHealth> {
        self.health.clone()
    }

    /// Folds and ships until `shutdown` completes, then closes the open second and drains what is unacknowledged.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> ShipperReport {
        let identity = self.config.identity();
        info!(
            message = "Agent running.",
            service = %identity.service, version = %identity.version, instance = %identity.instance,
            listening = ?self.addresses(), aggregator = %self.config.shipper.aggregator,
        );
        let (tx, rx) = mpsc::channel(16);
        let shipper = tokio::spawn(run_shipper_counted(
            identity,
            self.config.shipper.clone(),
            rx,
            self.health.tally(),
        ));
        // Samples from the scrapers and the OTLP receiver, folded by the loop like packets.
        let (samples_tx, samples_rx) = mpsc::channel::<Vec<scrape::Scraped>>(64);
        let mut servers = tokio::task::JoinSet::new();
        if let Some(listener) = self.listeners.metrics.take() {
            servers.spawn(health::serve(listener, self.health.clone()));
        }
        if self.listeners.otlp_grpc.is_some() || self.listeners.otlp_http.is_some() {
            let receiver = otlp::OtlpReceiver::new(
                otlp::OtlpState::new(unix_nanos_now(), self.config.otlp_max_series),
                samples_tx.clone(),
                self.health.clone(),
            );
            let limit = self.config.otlp_max_request_bytes;
            if let Some(listener) = self.listeners.otlp_grpc.take() {
                let service = receiver.clone().grpc(limit);
                servers.spawn(async move {
                    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                    if let Err(error) = tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(incoming)
                        .await
                    {
                        tracing::warn!(message = "The OTLP/gRPC receiver stopped.", %error);
                    }
                });
            }
            if let Some(listener) = self.listeners.otlp_http.take() {
                let app = receiver.http(limit);
                servers.spawn(async move {
                    if let Err(error) = axum::serve(listener, app).await {
                        tracing::warn!(message = "The OTLP/HTTP receiver stopped.", %error);
                    }
                });
            }
        }
        fold_loop(
            &self.socket,
            &self.config,
            self.registry.as_deref(),
            &self.health,
            (samples_tx, samples_rx),
            tx,
            shutdown,
        )
        .await;
        servers.abort_all();
        match shipper.await {
            Ok(report) => report,
            Err(error) => {
                tracing::error!(message = "Shipper failed; unsent seconds are lost.", %error);
                ShipperReport::default()
            }
        }
    }
}

fn unix_nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

type SampleChannel = (
    mpsc::Sender<Vec<scrape::Scraped>>,
    mpsc::Receiver<Vec<scrape::Scraped>>,
);

async fn fold_loop(
    socket: &UdpSocket,
    config: &AgentConfig,
    registry: Option<&facade::Registry>,
    health: &Arc<health::AgentHealth>,
    (samples_tx, mut samples): SampleChannel,
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
    let mut scrapers = tokio::task::JoinSet::new();
    for url in &config.scrape {
        scrapers.spawn(scrape::scrape_loop(
            url.clone(),
            config.scrape_timeout,
            config.scrape_max_bytes,
            clock.clone(),
            samples_tx.clone(),
            health.clone(),
        ));
    }
    drop(samples_tx);
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
                ship(&tx, health, roll(&mut folder)).await;
                let window = folder.open();
                let mut lines = 0;
                statsd::parse_packet(&packet[..len], &config.parse_limits, |line| {
                    lines += 1;
                    match line {
                        Ok(line) => window.record(&line),
                        Err(error) => {
                            window.count_malformed();
                            health.count_malformed(error.reason());
                        }
                    }
                });
                health.count_lines("statsd", lines);
            }
            Some(samples) = samples.recv() => {
                ship(&tx, health, roll(&mut folder)).await;
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
                ship(&tx, health, roll(&mut folder)).await;
                boundary.as_mut().reset(
                    tokio::time::Instant::now() + clock.until_next_second() + std::time::Duration::from_millis(1),
                );
            }
            _ = &mut shutdown => {
                if let Some(registry) = registry {
                    registry.drain_into(folder.open());
                }
                let open = std::mem::replace(folder.open(), Window::new(0, config.window_limits()));
                ship(&tx, health, Some(open.close())).await;
                return;
            }
        }
    }
}

async fn ship(
    tx: &mpsc::Sender<pb::Snapshot>,
    health: &health::AgentHealth,
    closed: Option<(pb::Snapshot, window::WindowStats)>,
) {
    let Some((snapshot, stats)) = closed else {
        return;
    };
    health.count_closed(&stats);
    if let Err(lost) = tx.send(snapshot).await {
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
/// DogStatsD on `config.statsd_addr`, scrapes and OTLP keep working beside it; the agent's own `/metrics` is served
/// on `config.metrics_addr` as for a sidecar (set it to `None` when the service serves its own page).
pub async fn install(config: AgentConfig) -> Result<InProcessAgent, InstallError> {
    let registry = Arc::new(facade::Registry::new(config.facade_max_values_per_second));
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
