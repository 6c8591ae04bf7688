//! The agent's own health, served on `/metrics` (Prometheus text) by [`serve`]: what its inputs took and refused,
//! and what its stream to the aggregator sent, had acknowledged, dropped and holds now.
//!
//! The same counters travel to the aggregator in every snapshot ([`strobe_proto::AgentStats`]), which sums them per
//! service; this page is for the one instance, and keeps counting while the aggregator is away.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::shipper::ShipperTally;
use crate::window::WindowStats;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct InputLabels {
    input: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ScrapeLabels {
    url: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OtlpLabels {
    transport: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PointLabels {
    kind: &'static str,
}

/// Counters about one agent, shared by its inputs, fold loop and shipper.
pub struct AgentHealth {
    registry: Registry,
    lines: Family<InputLabels, Counter>,
    malformed: Family<ReasonLabels, Counter>,
    series_over_limit: Counter,
    values_clamped: Counter,
    seconds_closed: Counter,
    scrapes: Family<ScrapeLabels, Counter>,
    otlp_requests: Family<OtlpLabels, Counter>,
    otlp_points: Family<PointLabels, Counter>,
    /// What the shipper counts live.
    pub(crate) tally: Arc<ShipperTally>,
    /// The DogStatsD socket's inode, to find its drops in `/proc/net/udp`.
    statsd_inode: Arc<std::sync::OnceLock<u64>>,
}

impl std::fmt::Debug for AgentHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHealth").finish_non_exhaustive()
    }
}

impl Default for AgentHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentHealth {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("strobe_agent");
        let lines = Family::<InputLabels, Counter>::default();
        registry.register(
            "lines_received",
            "Samples taken by input: DogStatsD lines, scraped samples, OTLP data points, in-process records",
            lines.clone(),
        );
        let malformed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "lines_malformed",
            "Lines or values refused, by reason",
            malformed.clone(),
        );
        let series_over_limit = Counter::default();
        registry.register(
            "series_over_limit",
            "Samples dropped because their second already held max_series_per_second series",
            series_over_limit.clone(),
        );
        let values_clamped = Counter::default();
        registry.register(
            "values_clamped",
            "Histogram values clamped to max_histogram_value",
            values_clamped.clone(),
        );
        let seconds_closed = Counter::default();
        registry.register(
            "seconds_closed",
            "One-second snapshots closed and handed to the shipper",
            seconds_closed.clone(),
        );
        let scrapes = Family::<ScrapeLabels, Counter>::default();
        registry.register(
            "scrapes",
            "Prometheus scrapes by page and outcome",
            scrapes.clone(),
        );
        let otlp_requests = Family::<OtlpLabels, Counter>::default();
        registry.register(
            "otlp_requests",
            "OTLP export requests by transport and outcome",
            otlp_requests.clone(),
        );
        let otlp_points = Family::<PointLabels, Counter>::default();
        registry.register(
            "otlp_points",
            "OTLP data points taken, by kind (or why not)",
            otlp_points.clone(),
        );
        let tally = Arc::new(ShipperTally::default());
        registry.register_collector(Box::new(TallyCollector(tally.clone())));
        let statsd_inode = Arc::new(std::sync::OnceLock::new());
        registry.register_collector(Box::new(KernelDrops(statsd_inode.clone())));
        Self {
            registry,
            lines,
            malformed,
            series_over_limit,
            values_clamped,
            seconds_closed,
            scrapes,
            otlp_requests,
            otlp_points,
            tally,
            statsd_inode,
        }
    }

    /// Watches the kernel's drop count of the DogStatsD socket (Linux; elsewhere nothing is reported).
    pub fn watch_statsd_socket(&self, socket: &tokio::net::UdpSocket) {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd()));
            let inode = link.ok().and_then(|l| {
                l.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            });
            if let Some(inode) = inode {
                self.statsd_inode.set(inode).ok();
            }
        }
        #[cfg(not(unix))]
        let _ = socket;
    }

    /// Counts lines (or samples) taken by `input` (`statsd`, `scrape`, `otlp`, `in_process`).
    pub fn count_lines(&self, input: &'static str, n: u64) {
        self.lines.get_or_create(&InputLabels { input }).inc_by(n);
    }

    /// Counts one refused line.
    pub fn count_malformed(&self, reason: &'static str) {
        self.malformed.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Adds what a closed second refused or clamped.
    pub fn count_closed(&self, stats: &WindowStats) {
        self.seconds_closed.inc();
        self.series_over_limit.inc_by(stats.series_over_limit);
        self.values_clamped.inc_by(stats.values_clamped);
        for (reason, n) in [
            ("type_conflict", stats.type_conflicts),
            ("non_finite", stats.non_finite),
            ("too_many_tags", stats.too_many_tags),
            ("too_long_part", stats.too_long_part),
        ] {
            if n > 0 {
                self.malformed
                    .get_or_create(&ReasonLabels { reason })
                    .inc_by(n);
            }
        }
    }

    /// Counts one scrape of `url`.
    pub fn count_scrape(&self, url: &str, ok: bool) {
        self.scrapes
            .get_or_create(&ScrapeLabels {
                url: url.to_owned(),
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Counts one OTLP export request.
    pub fn count_otlp_request(&self, transport: &'static str, outcome: &'static str) {
        self.otlp_requests
            .get_or_create(&OtlpLabels { transport, outcome })
            .inc();
    }

    /// Counts OTLP data points of `kind` (`sum`, `gauge`, ..., or a reason they were skipped).
    pub fn count_otlp_points(&self, kind: &'static str, n: u64) {
        if n > 0 {
            self.otlp_points
                .get_or_create(&PointLabels { kind })
                .inc_by(n);
        }
    }

    /// The shipper's live counters, to pass to [`crate::run_shipper_counted`].
    pub fn tally(&self) -> Arc<ShipperTally> {
        self.tally.clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(message = "Could not render the agent's metrics.", %error);
        }
        text
    }
}

/// The shipper's atomics, read at every scrape.
#[derive(Debug)]
struct TallyCollector(Arc<ShipperTally>);

impl Collector for TallyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tally = &self.0;
        for (name, help, value) in [
            (
                "snapshots_acknowledged",
                "Snapshots the aggregator acknowledged (counted)",
                tally.acknowledged.load(Relaxed),
            ),
            (
                "snapshots_refused",
                "Snapshots the aggregator refused whole (not sent again)",
                tally.refused_snapshots.load(Relaxed),
            ),
            (
                "series_refused",
                "Series the aggregator dropped from snapshots it took",
                tally.refused_series.load(Relaxed),
            ),
            (
                "snapshots_dropped",
                "Snapshots lost unsent: the oldest when the replay buffer was full, or unacknowledged at shutdown",
                tally.dropped.load(Relaxed),
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        for (name, help, value) in [
            (
                "replay_buffer_snapshots",
                "Snapshots waiting for their acknowledgement (replayed after a reconnect)",
                tally.buffered.load(Relaxed),
            ),
            (
                "connected",
                "1 while the stream to the aggregator is up",
                tally.connected.load(Relaxed),
            ),
        ] {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Packets the kernel dropped on the DogStatsD socket because its receive buffer was full, read at every scrape.
#[derive(Debug)]
struct KernelDrops(Arc<std::sync::OnceLock<u64>>);

/// The `drops` column of the socket with `inode` in `/proc/net/udp` or `/proc/net/udp6`.
fn udp_drops(inode: u64) -> Option<u64> {
    let inode = inode.to_string();
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
                (fields.get(9) == Some(&inode.as_str())).then(|| fields.get(12)?.parse().ok())?
            })
        })
}

impl Collector for KernelDrops {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(drops) = self.0.get().and_then(|&inode| udp_drops(inode)) else {
            return Ok(());
        };
        let counter = ConstCounter::new(drops);
        counter.encode(encoder.encode_descriptor(
            "statsd_kernel_drops",
            "DogStatsD packets the kernel dropped because the socket's receive buffer was full",
            None,
            counter.metric_type(),
        )?)
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, health: Arc<AgentHealth>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(health);
    if let Err(error) = axum::serve(listener, app).await {
        tracing::warn!(message = "The agent's /metrics server stopped.", %error);
    }
}

async fn metrics(State(health): State<Arc<AgentHealth>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.render(),
    )
}
