//! Command line: parses flags (each also `STROBE_<FLAG>` in the environment) over an optional TOML file, then
//! hands a finished config to the library that does the work.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use strobe_agent::AgentConfig;
use strobe_aggregator::AggregatorConfig;
use strobe_sim::traffic::Shape;

/// Strobe: per-second metrics for continuous delivery.
#[derive(Debug, Parser)]
#[command(name = "strobe", version, about)]
pub(crate) struct Cli {
    /// TOML file with `[aggregator]` and `[agent]` tables; flags and environment override it.
    #[arg(long, env = "STROBE_CONFIG", global = true, help_heading = "Global")]
    pub(crate) config: Option<PathBuf>,
    /// Log filter, in `RUST_LOG` syntax (default `info`; `warn` for the demo, whose terminal shows webhooks).
    #[arg(long, env = "STROBE_LOG", global = true, help_heading = "Global")]
    pub(crate) log: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run an aggregator: takes agents' seconds, merges them, alerts, serves the dashboard.
    #[command(
        after_help = "Example:\n  strobe aggregator --http-addr 0.0.0.0:7080 --grpc-addr 0.0.0.0:7070 \\\n    --rules rules.toml --agent-token-file agent.tokens --read-token-file read.tokens\n\nEvery flag is also an environment variable (shown); the [aggregator] table of --config holds these and more (see strobe.example.toml)."
    )]
    Aggregator(Box<AggregatorArgs>),
    /// Run an agent next to a service: DogStatsD, Prometheus scrapes, OTLP in; one snapshot a second out.
    #[command(
        after_help = "Example:\n  strobe agent --service checkout --version v42 --zone eu-1 \\\n    --aggregator http://aggregator:7070 --otlp-addr 127.0.0.1:4317 --scrape http://127.0.0.1:8080/metrics\n\nEvery flag is also an environment variable (shown); the [agent] table of --config holds these and more (see strobe.example.toml)."
    )]
    Agent(AgentArgs),
    /// Run an aggregator and a simulated fleet with a staged bad deploy, and serve the dashboard.
    Demo(DemoArgs),
    /// Stream simulated load from thousands of instances to an aggregator, optionally staging a deploy.
    Loadgen(LoadgenArgs),
}

/// What a staged deploy's new instances do.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum DeployKind {
    /// Exactly like the old version.
    Same,
    /// Five times the error ratio.
    Errors,
    /// Twice the p99 latency.
    Latency,
}

/// `strobe loadgen` flags.
#[derive(Debug, Args)]
pub(crate) struct LoadgenArgs {
    /// The aggregator's gRPC address.
    #[arg(
        long,
        env = "STROBE_AGGREGATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub(crate) aggregator: String,
    /// Simulated instances.
    #[arg(long, default_value_t = 1000)]
    pub(crate) agents: usize,
    /// Series per instance per second (request count, errors and latency included).
    #[arg(long, default_value_t = 3)]
    pub(crate) series: usize,
    /// How many of those are histograms (latency included).
    #[arg(long, default_value_t = 1)]
    pub(crate) histograms: usize,
    /// Services the instances are spread over (`svc-000`...).
    #[arg(long, default_value_t = 10)]
    pub(crate) services: usize,
    /// Service sizes by Zipf's law (a few large services, a long tail) instead of equal.
    #[arg(long)]
    pub(crate) zipf: bool,
    /// HTTP/2 connections the streams share.
    #[arg(long, default_value_t = 16)]
    pub(crate) connections: usize,
    /// Requests per second per instance.
    #[arg(long, default_value_t = 50.0)]
    pub(crate) rps: f64,
    /// Error ratio of healthy instances.
    #[arg(long, default_value_t = 0.01)]
    pub(crate) error_ratio: f64,
    /// Stop after this long (default: run until interrupted).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Stage a deploy of a new version this long after start.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) deploy_after: Option<Duration>,
    /// Which service (index) gets the deploy.
    #[arg(long, default_value_t = 0)]
    pub(crate) deploy_service: usize,
    /// New instances.
    #[arg(long, default_value_t = 2)]
    pub(crate) deploy_instances: usize,
    /// How the new version behaves.
    #[arg(long, value_enum, default_value = "errors")]
    pub(crate) deploy_kind: DeployKind,
    /// Old instances stopped when the new ones start (or `--retire-after` later).
    #[arg(long, default_value_t = 0)]
    pub(crate) retire: usize,
    /// Delay between the new instances' start and the old ones' stop.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub(crate) retire_after: Duration,
    /// `deployer` label of the new instances.
    #[arg(long)]
    pub(crate) deployer: Option<String>,
    /// How requests move together: independent, latency-shocks, shocked, persistent or shared.
    #[arg(long, default_value = "independent", value_parser = traffic_shape)]
    pub(crate) traffic: Shape,
    /// Spread each second's snapshots uniformly over this long after the second ends (0: all at once; at most 800 ms).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
    pub(crate) spread: Duration,
    /// Share of instance-seconds sent 0.3 to 0.8 s late (a GC pause), from 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) late_share: f64,
}

/// A traffic shape by name.
pub(crate) fn traffic_shape(name: &str) -> Result<Shape, String> {
    Shape::named(name).ok_or_else(|| {
        let names: Vec<&str> = Shape::ALL.iter().map(|s| s.name).collect();
        format!(
            "unknown traffic shape {name:?}; one of {}",
            names.join(", ")
        )
    })
}

/// `strobe aggregator` flags.
#[derive(Debug, Args)]
pub(crate) struct AggregatorArgs {
    /// gRPC address agents connect to [default: 127.0.0.1:7070].
    #[arg(help_heading = "Listening", long, env = "STROBE_GRPC_ADDR")]
    pub(crate) grpc_addr: Option<SocketAddr>,
    /// HTTP address for the dashboard, API and websocket [default: 127.0.0.1:7080].
    #[arg(help_heading = "Listening", long, env = "STROBE_HTTP_ADDR")]
    pub(crate) http_addr: Option<SocketAddr>,
    /// How long a second stays open for late instances, e.g. `250ms`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_GRACE", value_parser = humantime::parse_duration)]
    pub(crate) grace: Option<Duration>,
    /// Past the grace, a second stays open while its snapshots still arrive this often, e.g. `50ms`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_GRACE_QUIET", value_parser = humantime::parse_duration)]
    pub(crate) grace_quiet: Option<Duration>,
    /// Past the grace, a quiet shard seals a second only once this share of the instances expected has reported
    /// (0 to 1; all but one always suffice), e.g. `0.9`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_GRACE_QUORUM")]
    pub(crate) grace_quorum: Option<f64>,
    /// Past the grace, snapshots of a second still arriving at most at this share of its burst's rate (0 to 1) are
    /// a trickle of late ones, and count as quiet once `1 - grace_trickle` of the instances expected have reported;
    /// 0: only no arrival counts as quiet. E.g. `0.05`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_GRACE_TRICKLE")]
    pub(crate) grace_trickle: Option<f64>,
    /// The longest a second stays open after it ends (unless its service is behind: see `--grace-max-behind`), e.g.
    /// `1s`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_GRACE_MAX", value_parser = humantime::parse_duration)]
    pub(crate) grace_max: Option<Duration>,
    /// The longest a second of a service that is behind stays open after its first snapshot (or after its shard
    /// went on from a stall), e.g. `3s`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_GRACE_MAX_BEHIND", value_parser = humantime::parse_duration)]
    pub(crate) grace_max_behind: Option<Duration>,
    /// Late snapshots of one sealed second become one correction at most this often, e.g. `250ms`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_CORRECTION_INTERVAL", value_parser = humantime::parse_duration)]
    pub(crate) correction_interval: Option<Duration>,
    /// How much history to keep for backfill, e.g. `10m`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_HISTORY", value_parser = humantime::parse_duration)]
    pub(crate) history: Option<Duration>,
    /// How long after its seal a second still takes late snapshots (as corrections), e.g. `10s`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_LATE_WINDOW", value_parser = humantime::parse_duration)]
    pub(crate) late_window: Option<Duration>,
    /// After the aggregator starts (and after each replaying agent's reconnect), how long older seconds wait for
    /// replaying agents to reconnect, e.g. `8s`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_REPLAY_GATHER", value_parser = humantime::parse_duration)]
    pub(crate) replay_gather: Option<Duration>,
    /// A second stops waiting for a replaying instance that has not moved on for this long, e.g. `10s`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_REPLAY_STALL", value_parser = humantime::parse_duration)]
    pub(crate) replay_stall: Option<Duration>,
    /// The longest a second waits for replaying instances after its first snapshot (and an instance behind after its
    /// replay is waited for, after its first hello), e.g. `5m`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_REPLAY_WAIT", value_parser = humantime::parse_duration)]
    pub(crate) replay_wait: Option<Duration>,
    /// A replaying stream is caught up once it delivers a second within this of its end; until then its later
    /// seconds are waited for too, e.g. `1s`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_REPLAY_CAUGHT_UP", value_parser = humantime::parse_duration)]
    pub(crate) replay_caught_up: Option<Duration>,
    /// Export every sealed second to this Prometheus remote write endpoint, e.g.
    /// `http://prometheus:9090/api/v1/write`.
    #[arg(help_heading = "Export", long, env = "STROBE_REMOTE_WRITE")]
    pub(crate) remote_write: Option<String>,
    /// One exported sample per series per this step, e.g. `10s` [default: 1s].
    #[arg(help_heading = "Export", long, env = "STROBE_REMOTE_WRITE_STEP", value_parser = humantime::parse_duration)]
    pub(crate) remote_write_step: Option<Duration>,
    /// An etcd endpoint of the cluster to join (repeatable), e.g. `http://127.0.0.1:2379` [default: run alone].
    #[arg(
        help_heading = "Cluster",
        long = "etcd",
        env = "STROBE_ETCD",
        value_delimiter = ','
    )]
    pub(crate) etcd: Vec<String>,
    /// Key prefix of this cluster in etcd [default: /strobe/].
    #[arg(help_heading = "Cluster", long, env = "STROBE_ETCD_PREFIX")]
    pub(crate) etcd_prefix: Option<String>,
    /// How long a node that stops answering stays a member, whole seconds, e.g. `2s` [default: 2s].
    #[arg(help_heading = "Cluster", long, env = "STROBE_ETCD_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub(crate) etcd_lease_ttl: Option<Duration>,
    /// This node's id in the cluster [default: host-pid].
    #[arg(help_heading = "Cluster", long, env = "STROBE_NODE_ID")]
    pub(crate) node_id: Option<String>,
    /// The gRPC address agents are redirected to, `HOST:PORT` or a URL [default: the bound address].
    #[arg(help_heading = "Cluster", long, env = "STROBE_ADVERTISE_GRPC")]
    pub(crate) advertise_grpc: Option<String>,
    /// The HTTP address other nodes read this node's stream from [default: the bound address].
    #[arg(help_heading = "Cluster", long, env = "STROBE_ADVERTISE_HTTP")]
    pub(crate) advertise_http: Option<String>,
    /// Shards (0: four per core).
    #[arg(help_heading = "Seconds", long, env = "STROBE_SHARDS")]
    pub(crate) shards: Option<usize>,
    /// `/healthz` fails once a shard has not gone round its loop (every 10 ms) for this long, e.g. `10s`.
    #[arg(help_heading = "Seconds", long, env = "STROBE_SHARD_STALL", value_parser = humantime::parse_duration)]
    pub(crate) shard_stall: Option<Duration>,
    /// Threads serving HTTP and the websockets, apart from ingest and sealing (0: on the same threads)
    /// [default: 1].
    #[arg(help_heading = "Listening", long, env = "STROBE_HTTP_THREADS")]
    pub(crate) http_threads: Option<usize>,
    /// Rules file (TOML); reloaded when it changes.
    #[arg(help_heading = "Alerts", long, env = "STROBE_RULES")]
    pub(crate) rules: Option<PathBuf>,
    /// Directory for alert state (firing alerts, acknowledgements, notification log) kept across restarts.
    /// Default: `<rules file>.state` beside the rules file.
    #[arg(help_heading = "Alerts", long, env = "STROBE_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Token an agent must present, `[NAME:]SECRET[=SERVICE,GLOB*...]` (repeat the flag for more; more than one in
    /// the environment: use a token file).
    // No value delimiter: a token's service list has commas of its own (`T=checkout,search`).
    #[arg(
        help_heading = "Access",
        long = "agent-token",
        env = "STROBE_AGENT_TOKEN"
    )]
    pub(crate) agent_tokens: Vec<String>,
    /// File of agent tokens, one per line (`#` comments), so they stay out of `ps`.
    #[arg(
        help_heading = "Access",
        long = "agent-token-file",
        env = "STROBE_AGENT_TOKEN_FILE"
    )]
    pub(crate) agent_token_files: Vec<PathBuf>,
    /// Token that may read (dashboard, websocket, every GET): `[NAME:]SECRET` (repeatable).
    #[arg(
        help_heading = "Access",
        long = "read-token",
        env = "STROBE_READ_TOKEN"
    )]
    pub(crate) read_tokens: Vec<String>,
    /// File of read tokens, one per line.
    #[arg(
        help_heading = "Access",
        long = "read-token-file",
        env = "STROBE_READ_TOKEN_FILE"
    )]
    pub(crate) read_token_files: Vec<PathBuf>,
    /// Token that may change rules and acknowledge alerts (and read): `[NAME:]SECRET` (repeatable).
    #[arg(
        help_heading = "Access",
        long = "admin-token",
        env = "STROBE_ADMIN_TOKEN"
    )]
    pub(crate) admin_tokens: Vec<String>,
    /// File of admin tokens, one per line.
    #[arg(
        help_heading = "Access",
        long = "admin-token-file",
        env = "STROBE_ADMIN_TOKEN_FILE"
    )]
    pub(crate) admin_token_files: Vec<PathBuf>,
    /// Serve the HTTP API without tokens on a non-loopback address.
    #[arg(help_heading = "Access", long, env = "STROBE_INSECURE_NO_AUTH")]
    pub(crate) insecure_no_auth: bool,
    /// A browser origin besides the aggregator's own allowed to open the websocket and send changes (repeatable),
    /// e.g. `https://ops.example.com`.
    #[arg(
        help_heading = "Access",
        long = "allowed-origin",
        env = "STROBE_ALLOWED_ORIGIN",
        value_delimiter = ','
    )]
    pub(crate) allowed_origins: Vec<String>,
    /// Hosts webhooks may point at (repeatable): names, `*.suffix`, IP addresses or CIDR blocks.
    #[arg(
        help_heading = "Alerts",
        long = "webhook-allow",
        env = "STROBE_WEBHOOK_ALLOW",
        value_delimiter = ','
    )]
    pub(crate) webhook_allow: Vec<String>,
    /// Serve both ports over TLS with this certificate chain (PEM; reloaded when it changes), with --tls-key.
    #[arg(help_heading = "TLS", long, env = "STROBE_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The certificate's key (PEM).
    #[arg(help_heading = "TLS", long, env = "STROBE_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Ask agents for client certificates from this CA (PEM): mutual TLS.
    #[arg(help_heading = "TLS", long, env = "STROBE_TLS_CLIENT_CA")]
    pub(crate) tls_client_ca: Option<PathBuf>,
}

/// Tokens from files: one per line, blank lines and `#` comments skipped.
fn tokens_from_files(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut tokens = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading token file {}", file.display()))?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    Ok(tokens)
}

/// `strobe agent` flags.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// Service name.
    #[arg(help_heading = "Identity", long, env = "STROBE_SERVICE")]
    pub(crate) service: Option<String>,
    /// Version: deploy id, image tag or git sha.
    #[arg(help_heading = "Identity", long, env = "STROBE_VERSION")]
    pub(crate) version: Option<String>,
    /// Zone the instance runs in.
    #[arg(help_heading = "Identity", long, env = "STROBE_ZONE")]
    pub(crate) zone: Option<String>,
    /// Instance id (default: host-pid).
    #[arg(help_heading = "Identity", long, env = "STROBE_INSTANCE")]
    pub(crate) instance: Option<String>,
    /// Extra identity label `key=value` (repeatable), e.g. `deployer=alice`.
    #[arg(help_heading = "Identity", long = "label", env = "STROBE_LABEL", value_delimiter = ',', value_parser = parse_label)]
    pub(crate) labels: Vec<(String, String)>,
    /// The aggregator's gRPC address, `http://` or `https://`; nodes of a cluster comma-separated, tried in turn
    /// [default: http://127.0.0.1:7070].
    #[arg(help_heading = "Aggregator", long, env = "STROBE_AGGREGATOR")]
    pub(crate) aggregator: Option<String>,
    /// UDP address for DogStatsD [default: 127.0.0.1:8125].
    #[arg(help_heading = "Inputs", long, env = "STROBE_STATSD_ADDR")]
    pub(crate) statsd_addr: Option<SocketAddr>,
    /// Token sent to the aggregator.
    #[arg(help_heading = "Aggregator", long, env = "STROBE_TOKEN")]
    pub(crate) token: Option<String>,
    /// A Prometheus page to scrape every second (repeatable), e.g. `http://127.0.0.1:9100/metrics`.
    #[arg(
        help_heading = "Inputs",
        long = "scrape",
        env = "STROBE_SCRAPE",
        value_delimiter = ','
    )]
    pub(crate) scrape: Vec<String>,
    /// Where to serve the agent's own `/metrics`, or `none` [default: 127.0.0.1:9102].
    #[arg(help_heading = "Agent health", long, env = "STROBE_METRICS_ADDR", value_parser = optional_addr)]
    pub(crate) metrics_addr: Option<OptionalAddr>,
    /// Receive OTLP metrics over gRPC here, e.g. `127.0.0.1:4317` [default: off].
    #[arg(help_heading = "Inputs", long, env = "STROBE_OTLP_ADDR")]
    pub(crate) otlp_addr: Option<SocketAddr>,
    /// Receive OTLP metrics over HTTP/protobuf (`POST /v1/metrics`) here, e.g. `127.0.0.1:4318` [default: off].
    #[arg(help_heading = "Inputs", long, env = "STROBE_OTLP_HTTP_ADDR")]
    pub(crate) otlp_http_addr: Option<SocketAddr>,
    /// CA certificate (PEM) to trust for an `https://` aggregator (default: the public web roots).
    #[arg(help_heading = "Aggregator", long, env = "STROBE_CA_CERT")]
    pub(crate) ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for an aggregator that asks for one (mutual TLS), with --tls-key.
    #[arg(
        help_heading = "Aggregator",
        long = "tls-cert",
        env = "STROBE_AGENT_TLS_CERT"
    )]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(
        help_heading = "Aggregator",
        long = "tls-key",
        env = "STROBE_AGENT_TLS_KEY"
    )]
    pub(crate) tls_key: Option<PathBuf>,
    /// Pretend this machine's clock is off by this many ms (for testing how the agent follows the aggregator's).
    #[arg(
        help_heading = "Agent health",
        long,
        hide = true,
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub(crate) simulate_clock_skew_ms: i64,
}

/// `strobe demo` flags.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// HTTP address for the dashboard.
    #[arg(long, env = "STROBE_HTTP_ADDR", default_value = "127.0.0.1:7080")]
    pub(crate) http_addr: SocketAddr,
    /// gRPC address of the demo's aggregator (port 0: any free port).
    #[arg(long, env = "STROBE_GRPC_ADDR", default_value = "127.0.0.1:0")]
    pub(crate) grpc_addr: SocketAddr,
    /// When the bad deploy starts, e.g. `30s`.
    #[arg(long, env = "STROBE_BAD_DEPLOY_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) bad_deploy_after: Duration,
    /// How requests move together: independent, latency-shocks, shocked, persistent or shared.
    #[arg(long, default_value = "independent", value_parser = traffic_shape)]
    pub(crate) traffic: Shape,
    /// Aggregator nodes: more than 1 runs a local etcd and a cluster (node 1 here, the others as child processes
    /// that can be killed to watch failover).
    #[arg(long, env = "STROBE_DEMO_NODES", default_value_t = 1)]
    pub(crate) nodes: usize,
}

impl LoadgenArgs {
    /// The plan the flags describe.
    pub(crate) fn plan(self) -> strobe_sim::loadgen::LoadPlan {
        use strobe_sim::loadgen::{Arrival, Deploy, LoadPlan, LoadSpec};
        use strobe_sim::sim::Behavior;
        let healthy = Behavior {
            rps: self.rps,
            error_ratio: self.error_ratio,
            ..Behavior::HEALTHY
        };
        let behavior = match self.deploy_kind {
            DeployKind::Same => healthy,
            DeployKind::Errors => Behavior {
                error_ratio: (healthy.error_ratio * 5.0).min(1.0),
                ..healthy
            },
            DeployKind::Latency => Behavior {
                latency_sigma: healthy.latency_sigma + 2f64.ln() / 2.326,
                ..healthy
            },
        };
        LoadPlan {
            spec: LoadSpec {
                aggregator: self.aggregator,
                agents: self.agents,
                services: self.services,
                zipf: self.zipf,
                series: self.series.max(3),
                histograms: self.histograms.max(1),
                connections: self.connections,
                behavior: healthy,
                traffic: self.traffic,
                arrival: Arrival {
                    spread: self.spread,
                    late_share: self.late_share,
                },
            },
            deploy_after: self.deploy_after,
            deploy: Deploy {
                service: self.deploy_service,
                version: "v2".into(),
                instances: self.deploy_instances,
                behavior,
                at: 0.0,
                retire: self.retire,
                retire_after: self.retire_after.as_secs_f64(),
                deployer: self.deployer,
            },
            duration: self.duration,
        }
    }
}

/// A socket address, or `none` for "do not listen".
#[derive(Debug, Clone, Copy)]
pub(crate) struct OptionalAddr(pub(crate) Option<SocketAddr>);

fn optional_addr(raw: &str) -> Result<OptionalAddr, String> {
    if raw.eq_ignore_ascii_case("none") || raw.eq_ignore_ascii_case("off") {
        return Ok(OptionalAddr(None));
    }
    raw.parse()
        .map(|addr| OptionalAddr(Some(addr)))
        .map_err(|e| format!("{e}: expected HOST:PORT or `none`"))
}

fn parse_label(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {raw:?} is not key=value"))
}

/// The TOML config file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct FileConfig {
    /// The `[aggregator]` table.
    pub(crate) aggregator: AggregatorConfig,
    /// The `[agent]` table.
    pub(crate) agent: AgentConfig,
}

impl FileConfig {
    /// Reads the file, or the defaults when none is given.
    pub(crate) fn load(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

impl AggregatorArgs {
    /// Flags over the file's values; token files are read here.
    pub(crate) fn apply(self, mut config: AggregatorConfig) -> Result<AggregatorConfig> {
        if let Some(v) = self.grpc_addr {
            config.grpc_addr = v;
        }
        if let Some(v) = self.http_addr {
            config.http_addr = v;
        }
        if let Some(v) = self.grace {
            config.grace = v;
        }
        if let Some(v) = self.grace_quiet {
            config.grace_quiet = v;
        }
        if let Some(v) = self.grace_quorum {
            config.grace_quorum = v;
        }
        if let Some(v) = self.grace_trickle {
            config.grace_trickle = v;
        }
        if let Some(v) = self.grace_max {
            config.grace_max = v;
        }
        if let Some(v) = self.grace_max_behind {
            config.grace_max_behind = v;
        }
        if let Some(v) = self.history {
            config.history = v;
        }
        if let Some(v) = self.correction_interval {
            config.correction_interval = v;
        }
        if let Some(v) = self.late_window {
            config.late_window = v;
        }
        if let Some(v) = self.replay_gather {
            config.replay_gather = v;
        }
        if let Some(v) = self.replay_stall {
            config.replay_stall = v;
        }
        if let Some(v) = self.replay_wait {
            config.replay_wait = v;
        }
        if let Some(v) = self.replay_caught_up {
            config.replay_caught_up = v;
        }
        if self.remote_write.is_some() {
            config.remote_write.url = self.remote_write;
        }
        if !self.etcd.is_empty() {
            config.cluster.etcd = self.etcd;
        }
        if let Some(v) = self.etcd_prefix {
            config.cluster.prefix = v;
        }
        if let Some(v) = self.etcd_lease_ttl {
            config.cluster.lease_ttl = v;
        }
        if self.node_id.is_some() {
            config.cluster.node_id = self.node_id;
        }
        if self.advertise_grpc.is_some() {
            config.cluster.advertise_grpc = self.advertise_grpc;
        }
        if self.advertise_http.is_some() {
            config.cluster.advertise_http = self.advertise_http;
        }
        if let Some(v) = self.remote_write_step {
            config.remote_write.step = v;
        }
        if let Some(v) = self.http_threads {
            config.http_threads = v;
        }
        if let Some(v) = self.shard_stall {
            config.shard_stall = v;
        }
        if let Some(v) = self.shards {
            config.shards = v;
        }
        if self.rules.is_some() {
            config.rules = self.rules;
        }
        if self.state_dir.is_some() {
            config.state_dir = self.state_dir;
        }
        if config.state_dir.is_none()
            && let Some(rules) = &config.rules
        {
            let mut name = rules.file_name().unwrap_or_default().to_owned();
            name.push(".state");
            config.state_dir = Some(rules.with_file_name(name));
        }
        if !self.agent_tokens.is_empty() {
            config.agent_tokens = self.agent_tokens;
        }
        config
            .agent_tokens
            .extend(tokens_from_files(&self.agent_token_files)?);
        if !self.read_tokens.is_empty() {
            config.read_tokens = self.read_tokens;
        }
        config
            .read_tokens
            .extend(tokens_from_files(&self.read_token_files)?);
        if !self.admin_tokens.is_empty() {
            config.admin_tokens = self.admin_tokens;
        }
        config
            .admin_tokens
            .extend(tokens_from_files(&self.admin_token_files)?);
        config.insecure_no_auth |= self.insecure_no_auth;
        if !self.allowed_origins.is_empty() {
            config.allowed_origins = self.allowed_origins;
        }
        if !self.webhook_allow.is_empty() {
            config.webhook_allow = self.webhook_allow;
        }
        if self.tls_cert.is_some() {
            config.tls.cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            config.tls.key = self.tls_key;
        }
        if self.tls_client_ca.is_some() {
            config.tls.client_ca = self.tls_client_ca;
        }
        Ok(config)
    }
}

impl AgentArgs {
    /// Flags over the file's values.
    pub(crate) fn apply(self, mut config: AgentConfig) -> AgentConfig {
        let set = |slot: &mut String, v: Option<String>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut config.service, self.service);
        set(&mut config.version, self.version);
        set(&mut config.zone, self.zone);
        set(&mut config.instance, self.instance);
        set(&mut config.shipper.aggregator, self.aggregator);
        config.labels.extend(self.labels);
        if let Some(v) = self.statsd_addr {
            config.statsd_addr = v;
        }
        if self.token.is_some() {
            config.shipper.token = self.token;
        }
        if !self.scrape.is_empty() {
            config.scrape = self.scrape;
        }
        if let Some(OptionalAddr(addr)) = self.metrics_addr {
            config.metrics_addr = addr;
        }
        if self.otlp_addr.is_some() {
            config.otlp_grpc_addr = self.otlp_addr;
        }
        if self.otlp_http_addr.is_some() {
            config.otlp_http_addr = self.otlp_http_addr;
        }
        if self.ca_cert.is_some() {
            config.shipper.ca_cert = self.ca_cert;
        }
        if self.tls_cert.is_some() {
            config.shipper.tls_cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            config.shipper.tls_key = self.tls_key;
        }
        if self.simulate_clock_skew_ms != 0 {
            config.shipper.clock = strobe_agent::AgentClock::with_skew(self.simulate_clock_skew_ms);
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            [aggregator]
            grace = "100ms"
            grace_max = "2s"
            http_addr = "127.0.0.1:9999"
            [aggregator.limits]
            max_series_per_snapshot = 5
            [agent]
            service = "from-file"
            version = "v1"
            "#,
        )
        .unwrap();
        let cli = Cli::parse_from([
            "strobe",
            "aggregator",
            "--http-addr",
            "127.0.0.1:1234",
            "--grace-quiet",
            "20ms",
            "--grace-trickle",
            "0.1",
            "--http-threads",
            "0",
            "--shard-stall",
            "30s",
        ]);
        let Command::Aggregator(args) = cli.command else {
            panic!()
        };
        let config = args.apply(file.aggregator).unwrap();
        assert_eq!(config.grace, Duration::from_millis(100));
        assert_eq!(config.grace_max, Duration::from_secs(2));
        assert_eq!(config.grace_quiet, Duration::from_millis(20));
        assert_eq!(config.grace_trickle, 0.1);
        assert_eq!(config.http_threads, 0);
        assert_eq!(config.shard_stall, Duration::from_secs(30));
        assert_eq!(config.http_addr.port(), 1234);
        assert_eq!(config.limits.max_series_per_snapshot, 5);
        let cli = Cli::parse_from([
            "strobe",
            "agent",
            "--version",
            "v2",
            "--label",
            "deployer=alice",
        ]);
        let Command::Agent(args) = cli.command else {
            panic!()
        };
        let agent = args.apply(file.agent);
        assert_eq!(
            (agent.service.as_str(), agent.version.as_str()),
            ("from-file", "v2")
        );
        assert_eq!(
            agent.labels.get("deployer").map(String::as_str),
            Some("alice")
        );
    }

    /// The cluster flags: `--etcd` repeatable (and comma-separated, as its env var is), the prefix and lease
    /// defaulted, the advertised addresses passed through; without `--etcd` the node runs alone.
    #[test]
    fn cluster_flags_reach_the_cluster_settings() {
        let cli = Cli::parse_from([
            "strobe",
            "aggregator",
            "--etcd",
            "http://10.0.0.1:2379",
            "--etcd",
            "http://10.0.0.2:2379,http://10.0.0.3:2379",
            "--etcd-lease-ttl",
            "5s",
            "--advertise-grpc",
            "agg-0.strobe:7070",
            "--advertise-http",
            "agg-0.strobe:8080",
        ]);
        let Command::Aggregator(args) = cli.command else {
            panic!()
        };
        let cluster = args.apply(Default::default()).unwrap().cluster;
        assert_eq!(
            cluster.etcd,
            [
                "http://10.0.0.1:2379",
                "http://10.0.0.2:2379",
                "http://10.0.0.3:2379"
            ]
        );
        assert_eq!(cluster.prefix, "/strobe/");
        assert_eq!(cluster.lease_ttl, Duration::from_secs(5));
        assert_eq!(cluster.advertise_grpc.as_deref(), Some("agg-0.strobe:7070"));
        assert_eq!(cluster.advertise_http.as_deref(), Some("agg-0.strobe:8080"));
        let cli = Cli::parse_from(["strobe", "aggregator"]);
        let Command::Aggregator(args) = cli.command else {
            panic!()
        };
        let alone = args.apply(Default::default()).unwrap().cluster;
        assert!(alone.etcd.is_empty());
        assert_eq!(alone.lease_ttl, Duration::from_secs(2));
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let err = toml::from_str::<FileConfig>("[aggregator]\ngrase = \"1s\"\n").unwrap_err();
        assert!(err.to_string().contains("grase"), "{err}");
    }

    #[test]
    fn the_example_config_parses() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/strobe.example.toml"))
                .unwrap();
        let file: FileConfig = toml::from_str(&text).unwrap();
        assert_eq!(file.aggregator.grace, AggregatorConfig::default().grace);
        // Every limit is spelled out there, at its default: the example is the reference.
        let spelled: std::collections::BTreeSet<String> = text
            .split("[aggregator.limits]")
            .nth(1)
            .and_then(|rest| rest.split("\n[").next())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split('=').next())
            .map(|key| key.trim().to_owned())
            .filter(|key| !key.is_empty() && !key.starts_with('#'))
            .collect();
        let known = toml::Value::try_from(strobe_aggregator::Limits::default()).unwrap();
        let known: std::collections::BTreeSet<String> =
            known.as_table().unwrap().keys().cloned().collect();
        assert_eq!(spelled, known);
        assert_eq!(file.aggregator.limits, strobe_aggregator::Limits::default());
        assert_eq!(
            file.aggregator.cluster,
            strobe_aggregator::ClusterSettings::default()
        );
        // The agent's limits too, at their defaults.
        let agent = toml::Value::try_from(&file.agent).unwrap();
        let default = toml::Value::try_from(AgentConfig::default()).unwrap();
        for key in [
            "max_packet_bytes",
            "statsd_receive_buffer_bytes",
            "max_series_per_second",
            "max_histogram_value",
            "facade_max_values_per_second",
            "scrape_max_bytes",
            "otlp_max_request_bytes",
            "otlp_max_series",
            "parse_limits",
        ] {
            assert_eq!(agent.get(key), default.get(key), "agent {key}");
            assert!(
                text.contains(&format!("\n{key} ")) || key == "parse_limits",
                "{key} spelled"
            );
        }
        for key in [
            "max_buffered_seconds",
            "max_seconds_in_flight",
            "max_message_bytes",
            "max_dictionary_series",
        ] {
            assert_eq!(
                agent["shipper"].get(key),
                default["shipper"].get(key),
                "shipper {key}"
            );
        }
    }
}
