//! The aggregator's configuration: addresses, timing and every setting, each a named value with a default. The
//! composition root's view: it gathers each room's own settings type; no room imports this module.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::alerting::alerts::DeliverySettings;
use crate::alerting::alerts::manager::ResolvedKept;
use crate::alerting::canary::CanarySettings;
use crate::limits::Limits;
use crate::model::MainMetrics;
use crate::tls::TlsSettings;

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
    /// ...once at least this share (0 to 1) of the instances expected on time have reported it (all but one always
    /// suffice)...
    pub grace_quorum: f64,
    /// (Snapshots still arriving at most at this share, 0 to 1, of the second's burst rate, the most that reached its
    /// shard within one `grace_quiet`, are a trickle of late ones: the shard counts as quiet, and the quorum is then
    /// at least `1 - grace_trickle`, all but one not being enough. 0: only no arrival counts as quiet.)...
    pub grace_trickle: f64,
    /// ...but never longer than this after it ends (unless behind: see `grace_max_behind`).
    #[serde(with = "humantime_serde")]
    pub grace_max: Duration,
    /// A second of a service that is behind waits from its first snapshot instead (when that came more than `grace`
    /// after the second ended), or from when its shard went on after a stop of more than 500 ms during which its
    /// longest wait ran out (a paused host): in the same way, but at most this long, for its own burst is queued behind
    /// the seconds before it. With `grace_max` there, after a 3 s stall of the aggregator at 10,000 agents, seconds
    /// were sealed with a fifth to two thirds of their instances and the rest turned into corrections, which cost more
    /// than merging on time.
    #[serde(with = "humantime_serde")]
    pub grace_max_behind: Duration,
    /// How long sealed seconds are kept for backfill.
    #[serde(with = "humantime_serde")]
    pub history: Duration,
    /// How long after it was sealed a second still accepts late snapshots (as corrections), however old it is.
    #[serde(with = "humantime_serde")]
    pub late_window: Duration,
    /// After the aggregator starts, how long seconds that ended before it wait for the agents replaying them to
    /// reconnect (agents back off for 5 s at most, and give a connection 2 s); and as long again after each hello of
    /// an agent of the service replaying (thousands reconnecting at once are answered over more than that).
    #[serde(with = "humantime_serde")]
    pub replay_gather: Duration,
    /// A second waits for an instance replaying towards it (it said so when it reconnected) until that instance
    /// has not moved to a newer second for this long...
    #[serde(with = "humantime_serde")]
    pub replay_stall: Duration,
    /// ...and at most this long after the second's first snapshot. Also the longest an instance's streams are
    /// waited for while behind after its replay (see `replay_caught_up`), from its first hello. 5 min: at 10,000
    /// agents on 2 cores, catching up after a minute's outage took 3 to 4 (2 min was not enough).
    #[serde(with = "humantime_serde")]
    pub replay_wait: Duration,
    /// A replaying stream (of a replay of at least 5 s) is caught up once it delivers a second within this of its end
    /// (about `grace_max`: the next second comes about as late). Until then, the seconds queued behind its replay are
    /// late too, and are waited for like the replay: otherwise, after an outage of a large fleet, each live second is
    /// sealed with the few instances that caught up first and the rest turn into corrections, which cost more than
    /// merging them on time and keep the aggregator behind.
    #[serde(with = "humantime_serde")]
    pub replay_caught_up: Duration,
    /// Late snapshots of one sealed second are gathered this long and published as one correction (at most
    /// 900 ms; larger values are capped); later corrections of the same second wait twice as long each, up to 1 s.
    #[serde(with = "humantime_serde")]
    pub correction_interval: Duration,
    /// Shards (tasks owning services); 0 means four per core.
    pub shards: usize,
    /// `/healthz` fails (503) once a shard has not gone round its loop for this long (it does every 10 ms): stuck,
    /// or its threads starved.
    #[serde(with = "humantime_serde")]
    pub shard_stall: Duration,
    /// Threads serving HTTP and the websockets, apart from the ones ingesting and sealing; 0 serves them on the
    /// same threads.
    pub http_threads: usize,
    /// Tokens agents must present, `[NAME:]SECRET[=SERVICE,GLOB*...]` (bound to those services); empty means no
    /// check.
    pub agent_tokens: Vec<String>,
    /// Tokens that may read (dashboard, websocket, every GET), `[NAME:]SECRET`.
    pub read_tokens: Vec<String>,
    /// Tokens that may change rules and acknowledge alerts (and read), `[NAME:]SECRET`.
    pub admin_tokens: Vec<String>,
    /// Serve the HTTP API without tokens on a non-loopback address (refused otherwise).
    pub insecure_no_auth: bool,
    /// Browser origins besides the aggregator's own that may open the websocket and send changes, such as
    /// `https://ops.example.com`.
    pub allowed_origins: Vec<String>,
    /// Hosts webhooks may point at (names, `*.suffix`, IP addresses, CIDR blocks); empty allows any host but the
    /// ones always refused (cloud metadata, link-local).
    pub webhook_allow: Vec<String>,
    /// The rules file (TOML), reloaded when it changes.
    pub rules: Option<PathBuf>,
    /// Where alert state (firing alerts, acknowledgements, the notification log) is kept across restarts; none
    /// keeps it in memory only. `strobe aggregator` defaults it to `<rules file>.state` beside the rules file.
    pub state_dir: Option<PathBuf>,
    /// After a restart, how long a restored firing alert waits (on top of its rule's `for`) to be seen breaching
    /// again before it is resolved.
    #[serde(with = "humantime_serde")]
    pub alert_restore_grace: Duration,
    /// An aggregator down longer than this does not carry its alerts over: at start, a state file written longer
    /// ago has its firing and acknowledged alerts resolved (and everyone told is told), so a breach seen now pages
    /// again and an acknowledgement from before a long outage does not silence it. While an alert is firing or
    /// acknowledged the file is written every minute, or every quarter of this if that is shorter (but at most once a
    /// second), so its age is the outage's. Prometheus bounds
    /// the `for` state it restores likewise (`--rules.alert.for-outage-tolerance`, 1 h). The state file only: in a
    /// cluster, alerts handed over through etcd are taken over as they are.
    #[serde(with = "humantime_serde")]
    pub alert_outage_tolerance: Duration,
    /// How long a resolved alert stays listed (`/api/v1/alerts`, the dashboard's list, the state kept across
    /// restarts)...
    #[serde(with = "humantime_serde")]
    pub resolved_alert_retention: Duration,
    /// ...and how many resolved alerts at most, the oldest going first; firing, acknowledged and pending alerts are
    /// always listed, however many, and so is a resolved one whose notifications are still being delivered.
    pub max_resolved_alerts: usize,
    /// Webhook timeouts and retries.
    pub webhooks: DeliverySettings,
    /// The request, error and latency metrics the overview and the canary read.
    pub metrics: MainMetrics,
    /// Automatic new-version-versus-old comparison.
    pub canary: CanarySettings,
    /// Input bounds.
    pub limits: Limits,
    /// TLS for both ports (none: plain TCP).
    pub tls: TlsSettings,
    /// Export of every sealed second to Prometheus-compatible storage (off unless `url` is set).
    pub remote_write: crate::RemoteWriteSettings,
    /// Several nodes as one, on etcd (off unless `etcd` names an endpoint).
    pub cluster: crate::ClusterSettings,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7080)),
            grace: Duration::from_millis(250),
            grace_quiet: Duration::from_millis(50),
            grace_quorum: 0.9,
            grace_trickle: 0.05,
            grace_max: Duration::from_secs(1),
            grace_max_behind: Duration::from_secs(3),
            history: Duration::from_secs(600),
            late_window: Duration::from_secs(10),
            replay_gather: Duration::from_secs(8),
            replay_stall: Duration::from_secs(10),
            replay_wait: Duration::from_secs(300),
            replay_caught_up: Duration::from_secs(1),
            correction_interval: Duration::from_millis(250),
            shards: 0,
            shard_stall: Duration::from_secs(10),
            http_threads: 1,
            agent_tokens: Vec::new(),
            read_tokens: Vec::new(),
            admin_tokens: Vec::new(),
            insecure_no_auth: false,
            allowed_origins: Vec::new(),
            webhook_allow: Vec::new(),
            rules: None,
            state_dir: None,
            alert_restore_grace: Duration::from_secs(120),
            alert_outage_tolerance: Duration::from_secs(3600),
            resolved_alert_retention: ResolvedKept::default().retention,
            max_resolved_alerts: ResolvedKept::default().most,
            webhooks: DeliverySettings::default(),
            metrics: MainMetrics::default(),
            canary: CanarySettings::default(),
            limits: Limits::default(),
            tls: TlsSettings::default(),
            remote_write: Default::default(),
            cluster: Default::default(),
        }
    }
}

/// Shards per core when none are configured. Measured at 10,000 agents x 100 series (production-shaped, load
/// generator on the same 2 cores), two runs each: 89% and 92% of instances in their live frame with 2 shards, 98% and
/// 95% with 8, seal delay p50 2.5 s against 1 s. Why was not isolated; the likely causes are that a shard is one
/// task, so everything queued to it waits while it seals a large service, and that services are placed by hash, so
/// with a Zipf-sized fleet a few shards get most of the snapshots.
pub const SHARDS_PER_CORE: usize = 4;

/// At most this many shards when none are configured (each ticks every 10 ms; past this, more shards spread the
/// services no better).
pub const MAX_DEFAULT_SHARDS: usize = 64;

impl AggregatorConfig {
    /// Shards to run: the configured number, or [`SHARDS_PER_CORE`] per core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            (SHARDS_PER_CORE * std::thread::available_parallelism().map_or(2, |n| n.get()))
                .min(MAX_DEFAULT_SHARDS)
        }
    }
}
