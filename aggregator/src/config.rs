//! The aggregator's configuration: addresses, timing and every limit, each a named value with a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::alerts::DeliverySettings;
use crate::canary::CanarySettings;
use crate::overview::MainMetrics;

/// Everything the aggregator needs to run. Deserialises from the `[aggregator]` table of the TOML config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregatorConfig {
    /// Where agents connect (gRPC).
    pub grpc_addr: SocketAddr,
    /// Dashboard, JSON API and websocket.
    pub http_addr: SocketAddr,
    /// How long after a second ends it stays open for instances that have not reported yet...
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// ...and past that, while snapshots for it still reach the shard this often (a burst being decoded)...
    #[serde(with = "humantime_serde")]
    pub grace_quiet: Duration,
    /// ...but never longer than this after it ends.
    #[serde(with = "humantime_serde")]
    pub grace_max: Duration,
    /// How long sealed seconds are kept for backfill.
    #[serde(with = "humantime_serde")]
    pub history: Duration,
    /// How long a sealed second still accepts late snapshots (as corrections).
    #[serde(with = "humantime_serde")]
    pub late_window: Duration,
    /// Shards (tasks owning services); 0 means one per core.
    pub shards: usize,
    /// Tokens agents must present; empty means no check.
    pub agent_tokens: Vec<String>,
    /// The rules file (TOML), reloaded when it changes.
    pub rules: Option<PathBuf>,
    /// Webhook timeouts and retries.
    pub webhooks: DeliverySettings,
    /// The request, error and latency metrics the overview and the canary read.
    pub metrics: MainMetrics,
    /// Automatic new-version-versus-old comparison.
    pub canary: CanarySettings,
    /// Input bounds.
    pub limits: Limits,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7080)),
            grace: Duration::from_millis(250),
            grace_quiet: Duration::from_millis(50),
            grace_max: Duration::from_secs(1),
            history: Duration::from_secs(600),
            late_window: Duration::from_secs(10),
            shards: 0,
            agent_tokens: Vec::new(),
            rules: None,
            webhooks: DeliverySettings::default(),
            metrics: MainMetrics::default(),
            canary: CanarySettings::default(),
            limits: Limits::default(),
        }
    }
}

impl AggregatorConfig {
    /// Shards to run: the configured number, or one per core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

/// Bounds on what agents and browsers may send or cost. Data past a bound is dropped and counted, with a reason.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most series in one snapshot; the rest are dropped and reported.
    pub max_series_per_snapshot: usize,
    /// Most tags on one series.
    pub max_tags_per_series: usize,
    /// Longest metric name, tag key or tag value, and identity field, in bytes.
    pub max_name_bytes: usize,
    /// Most significant digits a histogram may declare (memory grows tenfold per digit).
    pub max_histogram_sigfig: u8,
    /// Largest highest-trackable value a histogram may declare.
    pub max_histogram_value: u64,
    /// Largest histogram scale (recorded integers per unit).
    pub max_histogram_scale: u32,
    /// How far in the future a snapshot's second may be.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Most distinct series one service may have in one second (all instances together).
    pub max_series_per_service: usize,
    /// Frames a websocket client may fall behind before it loses frames (and is told so).
    pub subscriber_buffer_frames: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_series_per_snapshot: 10_000,
            max_tags_per_series: 32,
            max_name_bytes: 200,
            max_histogram_sigfig: 3,
            max_histogram_value: 1 << 53,
            max_histogram_scale: 1_000_000,
            max_future_skew: Duration::from_secs(5),
            max_series_per_service: 50_000,
            subscriber_buffer_frames: 4096,
        }
    }
}
