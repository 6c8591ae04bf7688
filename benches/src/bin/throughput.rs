//! Throughput benchmark: a real `strobe aggregator` and a real `strobe loadgen`, as separate processes, and two
//! websocket clients (one subscribed to every full frame, one to the overview). After a warm-up it measures, for
//! a number of seconds:
//! - instances per sealed second (live frames, and after corrections), min and median;
//! - seal delay p50 and p99 (from the aggregator's `/metrics` histogram), live frame after second end p50, p90 and p99,
//!   also for the ten largest services and the rest apart;
//! - when snapshots were merged at their shard, after their second ended (p50, p90, p99; the same `/metrics`), and
//!   what sealed the live seconds (`strobe_seconds_sealed_by_total`);
//! - the aggregator's CPU (cores) and peak RSS, from `/proc`;
//! - instance-seconds lost: expected (agents x seconds) minus those counted in a sealed or corrected second.
//!
//! With `--outage D` it kills the aggregator (SIGKILL) `--outage-at` seconds into the measured window, keeps it
//! down `D` seconds while the agents buffer, starts it again on the same addresses, and reports what an outage at
//! this scale costs: instance-seconds lost (counted by neither aggregator), how long after the restart live frames
//! are fresh again, when the outage's seconds were all published, and the second aggregator's CPU and peak RSS.
//!
//! With `--stall D` it stops the aggregator (SIGSTOP) for `D` seconds instead, connections kept, and reports how
//! long after it went on live frames were fresh again.
//!
//! `--subscribers N` adds N overview clients (seal -> client latency); `--view-subscribers N` adds N clients each
//! watching one service's full seconds (what they received of their service and of others, and lagged notices).
//!
//! `cargo build --release && cargo run --release -p strobe-benches --bin throughput -- --agents 10000 --seconds 300`

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::StreamExt;
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
struct Args {
    /// The `strobe` binary (build it with `cargo build --release` first).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/strobe"))]
    strobe: PathBuf,
    /// Simulated agents.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Series per agent.
    #[arg(long, default_value_t = 100)]
    series: usize,
    /// Of which histograms.
    #[arg(long, default_value_t = 20)]
    histograms: usize,
    /// Services the agents are spread over.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Seconds ignored at the start: at 10,000 agents the aggregator takes 2 to 12 s, once 25 s, to digest the fleet's
    /// connecting at once (their first seconds name every series, its memory grows); a 15 s warm-up measured that.
    #[arg(long, default_value_t = 30)]
    warmup: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Service sizes: `zipf` (a few large services, a long tail, as fleets are) or `equal`.
    #[arg(long, default_value = "zipf", value_parser = ["zipf", "equal"])]
    sizes: String,
    /// How requests move together (the load generator's `--traffic`).
    #[arg(long, default_value = "persistent")]
    traffic: String,
    /// Snapshots spread over this long after each second (the load generator's `--spread`).
    #[arg(long, default_value = "300ms")]
    spread: String,
    /// Pin the aggregator to CPU 0 and the load generator and this benchmark to CPU 1 (with `taskset`): the
    /// aggregator's capacity on one core of its own, without the load generator's bursts on the same core.
    #[arg(long)]
    pin: bool,
    /// Print every line of the load generator (timestamped, on stderr) and the live instances of every second.
    #[arg(long)]
    verbose: bool,
    /// HTTP/2 connections the load generator multiplexes its agents over (real agents have one each).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Share of instance-seconds sent 0.3 to 0.8 s late (the load generator's `--late-share`).
    #[arg(long, default_value_t = 0.01)]
    late_share: f64,
    /// More websocket clients subscribed to the overview, each measuring seal -> client (its arrival minus the
    /// frame's `published_ms`) on every live overview frame.
    #[arg(long, default_value_t = 0)]
    subscribers: usize,
    /// More websocket clients each watching one service's full seconds (a dashboard's view of a service; the
    /// services taken in turn), connected a third of the way into the warm-up: each counts the full seconds of its
    /// service and of others it receives, and the "lagged" notices (frames the server dropped for it).
    #[arg(long, default_value_t = 0)]
    view_subscribers: usize,
    /// Kill the aggregator (SIGKILL) and keep it down this many seconds, then start it again (0: no outage).
    #[arg(long, default_value_t = 0)]
    outage: u64,
    /// Stop the aggregator (SIGSTOP) for this many seconds, then let it go on (SIGCONT): a stall of the host (a
    /// noisy neighbour, a VM paused), with its connections kept. 0: none.
    #[arg(long, default_value_t = 0, conflicts_with = "outage")]
    stall: u64,
    /// Seconds into the measured window at which `--outage` kills the aggregator, or `--stall` stops it.
    #[arg(long, default_value_t = 15)]
    outage_at: u64,
    /// Print the fleet's first seconds one by one, read from the aggregator every second for this long from the
    /// load generator's start: its CPU, what it merged, sealed and corrected, and how late it sealed (0: not).
    #[arg(long, default_value_t = 0)]
    start_trace: u64,
}

/// A second is fresh when at least this share of the fleet is in its live frame (the load sends 1% of
/// instance-seconds late by default, which its corrections count; single seconds of steady state dip to 96.5% now
/// and then)...
const FRESH_SHARE: f64 = 0.95;
/// ...and every service's live frame of it came within this long after it ended.
const FRESH_DELAY_MS: i64 = 2_000;

#[derive(Deserialize)]
struct FrameHead {
    #[serde(rename = "type")]
    kind: String,
    t: Option<i64>,
    service: Option<String>,
    #[serde(default)]
    correction: bool,
    #[allow(dead_code)]
    series: Option<IgnoredAny>,
    versions: Option<Vec<OverviewRow>>,
}

#[derive(Deserialize)]
struct OverviewRow {
    version: Option<IgnoredAny>,
    instances: u64,
}

#[derive(Default)]
struct Seen {
    /// (service, t, aggregator) -> instances in the live overview, and the most in any correction. The aggregator
    /// is 0, or 1 once it was restarted (`--outage`).
    instances: HashMap<(String, i64, u8), (u64, u64)>,
    /// Live "second" frames: their service and milliseconds after their second ended.
    frame_delays: Vec<(String, i64)>,
    /// Every live "second" frame: its aggregator (as in `instances`), its second, and milliseconds after it ended.
    frames: Vec<(u8, i64, i64)>,
    /// The restarted aggregator's overview frames (live or corrections): the last arrival for each second.
    restarted_last: HashMap<i64, i64>,
    /// Which aggregator is up: 0, or 1 once it was restarted.
    epoch: u8,
    /// Bytes received on the full-frame connection.
    bytes: u64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Starts `bin` with `args`, on the CPUs `cpus` only (a `taskset` list) if given.
fn spawn(bin: &PathBuf, args: &[String], cpus: Option<&str>) -> Result<Child> {
    let mut command = match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

/// CPU ticks (user + system) and peak RSS (KiB) of a process.
fn proc_usage(pid: u32) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks, hwm))
}

/// Quantile of a Prometheus histogram (cumulative buckets), as the upper bound of the bucket that holds it.
fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let wanted = q * total;
    buckets
        .iter()
        .find(|(_, cumulative)| *cumulative >= wanted)
        .map_or(f64::NAN, |(le, _)| *le)
}

/// From one scrape of the aggregator's metrics: its seal delay and snapshot arrival delay histograms, and the agent
/// streams catching up now and left behind after a replay so far.
struct Scraped {
    seal: Vec<(f64, f64)>,
    arrival: Vec<(f64, f64)>,
    catching_up: f64,
    behind: f64,
    /// Bytes of merged state and of backfill held.
    decoded: f64,
    history: f64,
    /// Seconds sealed so far, by what sealed them (as [`SEALED_BY`] names them).
    sealed_by: [f64; 4],
    /// Snapshots merged, seconds sealed and corrections published so far.
    accepted: f64,
    sealed: f64,
    corrections: f64,
    /// The seal delay histogram's sum (seconds).
    seal_sum: f64,
}

/// The values of `strobe_seconds_sealed_by_total`'s label.
const SEALED_BY: [&str; 4] = ["complete", "quiet", "trickle", "longest_wait"];

/// Scrapes the aggregator whose HTTP API is at `http`.
async fn scrape(http: &str) -> Result<Scraped> {
    let text = strobe_benches::scrape_metrics(http.parse()?).await?;
    let value = |name| metric_value(&text, name).unwrap_or(f64::NAN);
    Ok(Scraped {
        seal: histogram_buckets(&text, "strobe_seal_delay_seconds")?,
        arrival: histogram_buckets(&text, "strobe_snapshot_arrival_delay_seconds")?,
        catching_up: value("strobe_agent_streams_catching_up"),
        behind: value("strobe_agent_streams_behind_total"),
        decoded: value("strobe_decoded_bytes"),
        history: value("strobe_history_bytes"),
        sealed_by: SEALED_BY.map(|by| {
            metric_value(
                &text,
                &format!("strobe_seconds_sealed_by_total{{by=\"{by}\"}}"),
            )
            .unwrap_or(0.0)
        }),
        accepted: value("strobe_snapshots_accepted_total"),
        sealed: value("strobe_seconds_sealed_total"),
        corrections: value("strobe_corrections_total"),
        seal_sum: value("strobe_seal_delay_seconds_sum"),
    })
}

/// One second of the fleet's start, as `--start-trace` prints it.
struct StartSecond {
    /// Seconds after the load generator started.
    at: f64,
    cores: f64,
    accepted: f64,
    sealed: f64,
    corrections: f64,
    /// Mean seal delay of the seconds sealed in it (seconds).
    seal_delay: f64,
}

/// Reads the aggregator (`pid`, HTTP API at `http`) every second for `seconds` from `started_ms`: what changed in
/// each. A scrape that fails ends the trace (what was read is kept).
async fn start_trace(http: String, pid: u32, started_ms: i64, seconds: u64) -> Vec<StartSecond> {
    let mut rows = Vec::new();
    let mut last: Option<(i64, u64, Scraped)> = None;
    for _ in 0..=seconds {
        let (Ok(scraped), Ok((ticks, _))) = (scrape(&http).await, proc_usage(pid)) else {
            break;
        };
        let at_ms = now_ms();
        if let Some((was_ms, was_ticks, was)) = &last {
            let elapsed = (at_ms - was_ms).max(1) as f64 / 1000.0;
            let per_second = |now: f64, then: f64| (now - then) / elapsed;
            let sealed = scraped.sealed - was.sealed;
            rows.push(StartSecond {
                at: (at_ms - started_ms) as f64 / 1000.0,
                cores: (ticks - was_ticks) as f64 / 100.0 / elapsed,
                accepted: per_second(scraped.accepted, was.accepted),
                sealed: per_second(scraped.sealed, was.sealed),
                corrections: per_second(scraped.corrections, was.corrections),
                seal_delay: if sealed > 0.0 {
                    (scraped.seal_sum - was.seal_sum) / sealed
                } else {
                    f64::NAN
                },
            });
        }
        last = Some((at_ms, ticks, scraped));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    rows
}

/// The value of the unlabelled metric `name` in OpenMetrics `text`, if there.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The slowest live frame of each second from aggregator `epoch`, in ms after the second ended.
fn slowest_frames(frames: &[(u8, i64, i64)], epoch: u8) -> BTreeMap<i64, i64> {
    let mut worst: BTreeMap<i64, i64> = BTreeMap::new();
    for (_, t, delay) in frames.iter().filter(|(e, ..)| *e == epoch) {
        let w = worst.entry(*t).or_insert(i64::MIN);
        *w = (*w).max(*delay);
    }
    worst
}

/// Stops process `pid` (SIGSTOP) `after` seconds from now for `seconds`, then lets it go on (SIGCONT); returns when
/// it went on (wall clock, ms).
async fn stall(pid: u32, after: u64, seconds: u64) -> Result<i64> {
    let signal = |name: &str| -> Result<()> {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} {pid}: {status}");
        Ok(())
    };
    tokio::time::sleep(Duration::from_secs(after)).await;
    signal("STOP")?;
    println!("stall: aggregator stopped (SIGSTOP) for {seconds} s");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    signal("CONT")?;
    Ok(now_ms())
}

/// For `--verbose`: each of `seconds`, its live instances (`live`) and its slowest live frame from aggregator `epoch`.
fn second_by_second(
    live: &BTreeMap<i64, u64>,
    frames: &[(u8, i64, i64)],
    epoch: u8,
    seconds: std::ops::Range<i64>,
) -> Vec<String> {
    let worst = slowest_frames(frames, epoch);
    seconds
        .map(|t| {
            format!(
                "{t}: live {} worst {} ms",
                live.get(&t).copied().unwrap_or(0),
                worst.get(&t).copied().unwrap_or(-1)
            )
        })
        .collect()
}

/// The first second of `seconds` from which every later one in it is fresh: at least [`FRESH_SHARE`] of the
/// `expected` instances in its live frame (`live`, by second) and each of its live frames (`frames`, of aggregator
/// `epoch`) at most [`FRESH_DELAY_MS`] after it ended. `seconds.end` when its last one is not.
fn fresh_from(
    live: &BTreeMap<i64, u64>,
    frames: &[(u8, i64, i64)],
    epoch: u8,
    seconds: std::ops::Range<i64>,
    expected: u64,
) -> i64 {
    let worst = slowest_frames(frames, epoch);
    let fresh = |t: i64| {
        live.get(&t).copied().unwrap_or(0) as f64 >= FRESH_SHARE * expected as f64
            && worst.get(&t).is_some_and(|w| *w <= FRESH_DELAY_MS)
    };
    let stale = seconds.clone().rev().find(|t| !fresh(*t));
    stale.map_or(seconds.start, |t| t + 1)
}

/// The cumulative buckets of histogram `name` in OpenMetrics `text`.
fn histogram_buckets(text: &str, name: &str) -> Result<Vec<(f64, f64)>> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        buckets.push((le, count.trim().parse()?));
    }
    Ok(buckets)
}

/// The difference of two cumulative histograms (what was observed in between).
fn between(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, n)| {
            let old = before.iter().find(|(l, _)| l == le).map_or(0.0, |b| b.1);
            (*le, n - old)
        })
        .collect()
}

/// Follows the aggregator's stream at `url`, connecting again while it is away (`--outage`).
async fn watch(url: String, seen: Arc<Mutex<Seen>>, full: bool) -> Result<()> {
    loop {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await {
            read_frames(ws, &seen, full).await.ok();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn read_frames(
    mut ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    seen: &Mutex<Seen>,
    full: bool,
) -> Result<()> {
    while let Some(message) = ws.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let arrived = now_ms();
        let Ok(frame) = serde_json::from_str::<FrameHead>(text.as_str()) else {
            continue;
        };
        let mut seen = seen.lock().expect("lock");
        let epoch = seen.epoch;
        if full {
            seen.bytes += text.len() as u64;
        }
        match (frame.kind.as_str(), frame.t, frame.service) {
            ("second", Some(t), Some(service)) if full && !frame.correction => {
                let delay = arrived - (t + 1) * 1000;
                seen.frame_delays.push((service, delay));
                seen.frames.push((epoch, t, delay));
            }
            ("overview", Some(t), Some(service)) if !full => {
                let instances = frame
                    .versions
                    .iter()
                    .flatten()
                    .find(|row| row.version.is_none())
                    .map_or(0, |row| row.instances);
                if epoch > 0 {
                    let last = seen.restarted_last.entry(t).or_default();
                    *last = (*last).max(arrived);
                }
                let entry = seen.instances.entry((service, t, epoch)).or_default();
                if frame.correction {
                    entry.1 = entry.1.max(instances);
                } else {
                    entry.0 = entry.0.max(instances);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A websocket client with a small read buffer: tungstenite zero-fills all of it on each read, and a thousand of
/// these share the cores with the aggregator being measured.
async fn connect_small(
    url: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), false).await?;
    Ok(ws)
}

/// One of `--subscribers`: an overview client that notes how long each live overview frame took from its publish.
async fn subscriber(
    url: String,
    delays: Arc<Mutex<Vec<i64>>>,
    connected: Arc<std::sync::atomic::AtomicUsize>,
) -> Result<()> {
    #[derive(Deserialize)]
    struct Published {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        correction: bool,
        #[serde(default)]
        published_ms: i64,
    }
    let mut ws = connect_small(&url).await?;
    connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    while let Some(message) = ws.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let arrived = now_ms();
        if let Ok(frame) = serde_json::from_str::<Published>(text.as_str())
            && frame.kind == "overview"
            && !frame.correction
            && frame.published_ms > 0
        {
            delays
                .lock()
                .expect("lock")
                .push(arrived - frame.published_ms);
        }
    }
    Ok(())
}

/// What the `--view-subscribers` received, all together.
#[derive(Default)]
struct ViewCounts {
    connected: std::sync::atomic::AtomicUsize,
    own: std::sync::atomic::AtomicU64,
    others: std::sync::atomic::AtomicU64,
    lagged: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
}

impl ViewCounts {
    /// Full seconds of their own service and of others, lagged notices, frames dropped.
    fn snapshot(&self) -> [u64; 4] {
        use std::sync::atomic::Ordering::Relaxed;
        [
            self.own.load(Relaxed),
            self.others.load(Relaxed),
            self.lagged.load(Relaxed),
            self.dropped.load(Relaxed),
        ]
    }
}

/// One of `--view-subscribers`: a client of one service's full seconds.
async fn view_subscriber(url: String, service: String, counts: Arc<ViewCounts>) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        service: String,
        #[serde(default)]
        dropped: u64,
    }
    let mut ws = connect_small(&url).await?;
    counts.connected.fetch_add(1, Relaxed);
    while let Some(message) = ws.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let Ok(head) = serde_json::from_str::<Head>(text.as_str()) else {
            continue;
        };
        match head.kind.as_str() {
            "second" if head.service == service => counts.own.fetch_add(1, Relaxed),
            "second" => counts.others.fetch_add(1, Relaxed),
            "lagged" => {
                counts.dropped.fetch_add(head.dropped, Relaxed);
                counts.lagged.fetch_add(1, Relaxed)
            }
            _ => 0,
        };
    }
    Ok(())
}

/// Each service's instances, from the load generator's own assignment.
fn service_sizes(args: &Args) -> HashMap<String, u64> {
    let assignment =
        strobe_sim::loadgen::assign_services(args.agents, args.services, args.sizes == "zipf");
    let mut size_of: HashMap<String, u64> = HashMap::new();
    for service in assignment {
        *size_of
            .entry(strobe_sim::loadgen::service_name(service))
            .or_default() += 1;
    }
    size_of
}

/// The aggregator's arguments with the addresses it was given (`:0`) replaced by those it took.
fn restart_args(args: &[String], grpc: &str, http: &str) -> Vec<String> {
    let mut out = args.to_vec();
    for (flag, address) in [("--grpc-addr", grpc), ("--http-addr", http)] {
        if let Some(at) = out.iter().position(|a| a == flag) {
            out[at + 1] = address.to_owned();
        }
    }
    out
}

/// `--outage`: measures for `args.seconds` from now, killing the aggregator `outage_at` seconds in and starting it
/// again `outage` seconds later on the same addresses, then prints what the outage cost.
async fn outage(
    args: &Args,
    mut aggregator: Child,
    restart: Vec<String>,
    http: &str,
    seen: &Mutex<Seen>,
) -> Result<()> {
    if args.seconds < args.outage_at + args.outage + 20 {
        bail!("--seconds must leave at least 20 s after the restart (--outage-at + --outage + 20)");
    }
    let first_second = now_ms() / 1000;
    tokio::time::sleep(Duration::from_secs(args.outage_at)).await;
    let killed_ms = now_ms();
    aggregator
        .kill()
        .await
        .context("cannot kill the aggregator")?;
    println!(
        "outage: aggregator killed (SIGKILL); down {} s",
        args.outage
    );
    tokio::time::sleep(Duration::from_secs(args.outage)).await;
    seen.lock().expect("lock").epoch = 1;
    let mut aggregator = spawn(&args.strobe, &restart, args.pin.then_some("0"))?;
    let mut lines = BufReader::new(aggregator.stdout.take().context("aggregator stdout")?).lines();
    lines
        .next_line()
        .await?
        .context("the restarted aggregator printed nothing")?;
    let restarted_ms = now_ms();
    let pid = aggregator.id().context("aggregator pid")?;
    tokio::time::sleep(Duration::from_secs(
        args.seconds - args.outage_at - args.outage,
    ))
    .await;
    let last_second = now_ms() / 1000 - 1;
    let (ticks, _) = proc_usage(pid)?;
    let cores = ticks as f64 / 100.0 / ((now_ms() - restarted_ms) as f64 / 1000.0);
    // Let corrections of the last measured seconds arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, rss_kib) = proc_usage(pid)?;
    let metrics = strobe_benches::scrape_metrics(http.parse()?).await?;
    let too_late = metric_value(&metrics, "strobe_snapshots_too_late_total")
        .map_or_else(|| "?".to_owned(), |n| n.to_string());
    // Where data that never reached the subscriber may have gone: frames it was too slow for, refusals.
    let elsewhere: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            (l.starts_with("strobe_websocket_frames_dropped_total")
                || l.starts_with("strobe_dropped_total")
                || l.starts_with("strobe_snapshots_duplicate_total"))
                && !l.ends_with(" 0")
        })
        .collect();
    aggregator.kill().await.ok();

    let size_of = service_sizes(args);
    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    // Counted in a second: what each aggregator counted of each service (live or corrected), added up (an
    // instance-second counted by both would be counted twice, so the sum is held to the service's size).
    let mut counted: HashMap<(&str, i64), u64> = HashMap::new();
    let mut live_after: BTreeMap<i64, u64> = BTreeMap::new();
    for ((service, t, epoch), (live, corrected)) in &seen.instances {
        *counted.entry((service.as_str(), *t)).or_default() += (*live).max(*corrected);
        if *epoch == 1 {
            *live_after.entry(*t).or_default() += live;
        }
    }
    let mut counted_at: BTreeMap<i64, u64> = BTreeMap::new();
    for ((service, t), n) in counted {
        let size = size_of.get(service).copied().unwrap_or(0);
        *counted_at.entry(t).or_default() += n.min(size);
    }
    let expected = args.agents as u64;
    let (killed_s, restarted_s) = (killed_ms / 1000, restarted_ms / 1000);
    let (mut lost_in, mut lost_out) = (0u64, 0u64);
    let mut missing_at = Vec::new();
    for t in first_second..last_second {
        let missing = expected.saturating_sub(counted_at.get(&t).copied().unwrap_or(0));
        if missing > 0 {
            missing_at.push((t - killed_s, missing));
        }
        if (killed_s - 1..=restarted_s + 1).contains(&t) {
            lost_in += missing;
        } else {
            lost_out += missing;
        }
    }
    let fresh_from = fresh_from(
        &live_after,
        &seen.frames,
        1,
        restarted_s..last_second,
        expected,
    );
    let backlog_done = (killed_s..=restarted_s)
        .filter_map(|t| seen.restarted_last.get(&t))
        .max()
        .map(|at| at - restarted_ms);
    let measured = (last_second - first_second).max(0) as u64;
    println!(
        "outage of {} s at {} agents x {} series: instance-seconds expected {}, lost {} ({} of them in the \
         outage's seconds, {} outside)",
        (restarted_ms - killed_ms) / 1000,
        args.agents,
        args.series,
        expected * measured,
        lost_in + lost_out,
        lost_in,
        lost_out,
    );
    if fresh_from < last_second {
        println!(
            "live frames fresh again (>= {}% of instances live, every frame <= {} ms after its second) from the \
             second that ended {:.1} s after the restart",
            FRESH_SHARE * 100.0,
            FRESH_DELAY_MS,
            ((fresh_from + 1) * 1000 - restarted_ms) as f64 / 1000.0
        );
    } else {
        println!("live frames not fresh again by the end of the run");
    }
    match backlog_done {
        Some(ms) => println!(
            "the outage's seconds: last frame {:.1} s after the restart",
            ms as f64 / 1000.0
        ),
        None => println!("the outage's seconds: none published by the restarted aggregator"),
    }
    println!(
        "restarted aggregator: {cores:.2} cores since its start, peak RSS {:.2} GiB, snapshots too late {too_late}",
        rss_kib as f64 / 1024.0 / 1024.0
    );
    if args.verbose {
        let row = second_by_second(&live_after, &seen.frames, 1, restarted_s - 2..last_second);
        eprintln!("after the restart: {row:#?}");
        eprintln!("instance-seconds lost, by second after the kill: {missing_at:?}");
        eprintln!("restarted aggregator's drops: {elsewhere:?}");
        // Who is missing from the seconds with losses: service, its size, then (aggregator, live, corrected).
        for (t, _) in missing_at.iter().take(12) {
            let t = killed_s + t;
            let mut rows: Vec<String> = size_of
                .iter()
                .filter_map(|(service, size)| {
                    let by: Vec<(u8, u64, u64)> = (0..=1u8)
                        .filter_map(|e| {
                            seen.instances
                                .get(&(service.to_string(), t, e))
                                .map(|(l, c)| (e, *l, *c))
                        })
                        .collect();
                    let n: u64 = by.iter().map(|(_, l, c)| (*l).max(*c)).sum();
                    (n < *size).then(|| format!("{service} of {size}: {by:?}"))
                })
                .collect();
            rows.sort();
            eprintln!("missing at kill+{}: {rows:?}", t - killed_s);
        }
    }
    Ok(())
}

fn percentile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.stall == 0 || args.outage_at + args.stall < args.seconds,
        "--stall {} at --outage-at {} must end within the {} s measured",
        args.stall,
        args.outage_at,
        args.seconds
    );
    if args.pin {
        let pinned = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .context("taskset (util-linux) is needed for --pin")?;
        if !pinned.success() {
            bail!("taskset could not pin this process to CPU 1");
        }
    }
    let mut aggregator_args: Vec<String> = [
        "aggregator",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--log",
        "warn",
    ]
    .map(String::from)
    .to_vec();
    // Every subscriber comes from this one address: past the default per-address bound, raise it for this run.
    let config =
        std::env::temp_dir().join(format!("strobe-throughput-{}.toml", std::process::id()));
    if args.subscribers + args.view_subscribers > 200 {
        std::fs::write(
            &config,
            format!(
                "[aggregator.limits]\nmax_websocket_clients_per_address = {}\n",
                args.subscribers + args.view_subscribers + 16
            ),
        )?;
        aggregator_args.extend(["--config".to_owned(), config.display().to_string()]);
    }
    let mut aggregator = spawn(&args.strobe, &aggregator_args, args.pin.then_some("0"))?;
    let mut lines = BufReader::new(aggregator.stdout.take().context("aggregator stdout")?).lines();
    let first = lines
        .next_line()
        .await?
        .context("aggregator printed nothing")?;
    let field = |name: &str| {
        first
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_owned)
    };
    let (Some(grpc), Some(http)) = (field("grpc="), field("http=")) else {
        bail!("unexpected aggregator line: {first}");
    };
    let agg_pid = aggregator.id().context("aggregator pid")?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let full = tokio::spawn(watch(
        format!("ws://{http}/api/v1/stream"),
        seen.clone(),
        true,
    ));
    let overview = tokio::spawn(watch(
        format!("ws://{http}/api/v1/stream?overview=true"),
        seen.clone(),
        false,
    ));
    let fan_out = Arc::new(Mutex::new(Vec::new()));
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let subscribers: Vec<_> = (0..args.subscribers)
        .map(|_| {
            tokio::spawn(subscriber(
                format!("ws://{http}/api/v1/stream?overview=true"),
                fan_out.clone(),
                connected.clone(),
            ))
        })
        .collect();
    let mut loadgen = spawn(
        &args.strobe,
        &[
            "loadgen".to_owned(),
            "--aggregator".to_owned(),
            format!("http://{grpc}"),
            "--agents".to_owned(),
            args.agents.to_string(),
            "--series".to_owned(),
            args.series.to_string(),
            "--histograms".to_owned(),
            args.histograms.to_string(),
            "--services".to_owned(),
            args.services.to_string(),
            "--traffic".to_owned(),
            args.traffic.clone(),
            "--spread".to_owned(),
            args.spread.clone(),
            "--late-share".to_owned(),
            args.late_share.to_string(),
            "--connections".to_owned(),
            args.connections.to_string(),
            "--log".to_owned(),
            "warn".to_owned(),
        ]
        .into_iter()
        .chain((args.sizes == "zipf").then(|| "--zipf".to_owned()))
        .collect::<Vec<_>>(),
        args.pin.then_some("1"),
    )?;
    let loadgen_pid = loadgen.id().context("loadgen pid")?;
    let loadgen_started_ms = now_ms();
    let trace = (args.start_trace > 0).then(|| {
        tokio::spawn(start_trace(
            http.clone(),
            agg_pid,
            loadgen_started_ms,
            // (Read until the window ends at most; an outage's run does not print it.)
            args.start_trace.min(args.warmup + args.seconds),
        ))
    });
    let mut loadgen_out = BufReader::new(loadgen.stdout.take().context("loadgen stdout")?).lines();
    let last_progress = Arc::new(Mutex::new(String::new()));
    // Snapshots the load generator dropped unsent (its queue to a shipper full: the generator's process starved).
    let unsent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let last = last_progress.clone();
        let unsent = unsent.clone();
        let verbose = args.verbose;
        tokio::spawn(async move {
            let debug = verbose;
            while let Ok(Some(line)) = loadgen_out.next_line().await {
                if debug {
                    eprintln!("{} {line}", now_ms());
                }
                let dropped = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("generator_dropped="))
                    .and_then(|n| n.parse::<u64>().ok());
                if let Some(n) = dropped {
                    unsent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                *last.lock().expect("lock") = line;
            }
        });
    }
    println!(
        "throughput: {} agents x {} series ({} histograms) over {} services ({} sizes), {} traffic, arrival spread {} with {}% late; warm-up {} s, measuring {} s",
        args.agents,
        args.series,
        args.histograms,
        args.services,
        args.sizes,
        args.traffic,
        args.spread,
        args.late_share * 100.0,
        args.warmup,
        args.seconds
    );
    let views = Arc::new(ViewCounts::default());
    let mut viewers = Vec::new();
    if args.view_subscribers > 0 {
        // Once every service has published: a view is opened on a service that is listed.
        tokio::time::sleep(Duration::from_secs(args.warmup / 3)).await;
        viewers = (0..args.view_subscribers)
            .map(|k| {
                let service = strobe_sim::loadgen::service_name(k % args.services.max(1));
                tokio::spawn(view_subscriber(
                    format!("ws://{http}/api/v1/stream?services={service}"),
                    service,
                    views.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(args.warmup - args.warmup / 3)).await;
    } else {
        tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    }
    let views_before = views.snapshot();
    if args.outage > 0 {
        let report = outage(
            &args,
            aggregator,
            restart_args(&aggregator_args, &grpc, &http),
            &http,
            &seen,
        )
        .await;
        println!(
            "the load generator dropped {} snapshots unsent over the whole run (counted as lost above when in the \
             measured window)",
            unsent.load(std::sync::atomic::Ordering::Relaxed)
        );
        println!(
            "(loadgen's last progress line: {})",
            last_progress.lock().expect("lock")
        );
        std::fs::remove_file(&config).ok();
        full.abort();
        overview.abort();
        loadgen.kill().await.ok();
        return report;
    }
    let first_second = now_ms() / 1000;
    let (cpu0, _) = proc_usage(agg_pid)?;
    let (lg0, _) = proc_usage(loadgen_pid)?;
    let before = scrape(&http).await?;
    seen.lock().expect("lock").frame_delays.clear();
    fan_out.lock().expect("lock").clear();
    let stall = (args.stall > 0).then(|| tokio::spawn(stall(agg_pid, args.outage_at, args.stall)));
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let mut fan_out = std::mem::take(&mut *fan_out.lock().expect("lock"));
    let last_second = now_ms() / 1000 - 1;
    let (cpu1, _) = proc_usage(agg_pid)?;
    let (lg1, _) = proc_usage(loadgen_pid)?;
    let after = scrape(&http).await?;
    // Let corrections of the last measured seconds arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, rss_kib) = proc_usage(agg_pid)?;
    let ticks_per_second = 100.0;
    let agg_cores = (cpu1 - cpu0) as f64 / ticks_per_second / args.seconds as f64;
    let lg_cores = (lg1 - lg0) as f64 / ticks_per_second / args.seconds as f64;
    let seal = between(&before.seal, &after.seal);
    let arrival = between(&before.arrival, &after.arrival);

    let (instances, frame_delays, frames, bytes) = {
        let mut seen = seen.lock().expect("lock");
        (
            std::mem::take(&mut seen.instances),
            std::mem::take(&mut seen.frame_delays),
            std::mem::take(&mut seen.frames),
            seen.bytes,
        )
    };
    // How long the whole fleet connecting at once took to digest: when live frames were fresh from, in the warm-up.
    let mut live_at: BTreeMap<i64, u64> = BTreeMap::new();
    for ((_, t, _), (live, _)) in &instances {
        *live_at.entry(*t).or_default() += live;
    }
    let started_s = loadgen_started_ms / 1000;
    let start_fresh = fresh_from(
        &live_at,
        &frames,
        0,
        started_s..first_second,
        args.agents as u64,
    );
    // Per second of the measured window: instances live and after corrections, summed over services.
    let mut per_second: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
    for ((_, t, _), (live, corrected)) in &instances {
        if (first_second..last_second).contains(t) {
            let entry = per_second.entry(*t).or_default();
            entry.0 += live;
            entry.1 += (*live).max(*corrected);
        }
    }
    let expected = args.agents as u64;
    let mut live: Vec<i64> = (first_second..last_second)
        .map(|t| per_second.get(&t).map_or(0, |v| v.0) as i64)
        .collect();
    let mut total: Vec<i64> = (first_second..last_second)
        .map(|t| per_second.get(&t).map_or(0, |v| v.1) as i64)
        .collect();
    if args.verbose {
        eprintln!("live instances per second: {live:?}");
    }
    live.sort_unstable();
    total.sort_unstable();
    let lost: i64 = total
        .iter()
        .map(|n| expected as i64 - n)
        .filter(|d| *d > 0)
        .sum();
    let live_share = live.iter().sum::<i64>() as f64 / (expected as f64 * live.len().max(1) as f64);
    // Live share by service size, from the generator's own assignment: the ten largest services against the rest,
    // each live instance-second over the instance-seconds expected.
    let size_of = service_sizes(&args);
    let mut live_of: HashMap<&str, u64> = HashMap::new();
    for ((service, t, _), (live, _)) in &instances {
        if (first_second..last_second).contains(t) {
            *live_of.entry(service.as_str()).or_default() += live;
        }
    }
    let measured = (last_second - first_second).max(0) as u64;
    // Services by size, largest first (ties by name): the ten first are "the largest" for the live share and the
    // frame delays alike.
    let mut by_size: Vec<(&str, u64)> = size_of.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    by_size.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let sizes: Vec<(u64, u64)> = by_size
        .iter()
        .map(|(service, size)| (*size, live_of.get(service).copied().unwrap_or(0)))
        .collect();
    let share = |rows: &[(u64, u64)]| {
        let (live, expected) = rows.iter().fold((0, 0), |(l, e), (size, live)| {
            (l + live, e + size * measured)
        });
        100.0 * live as f64 / expected.max(1) as f64
    };
    let head = sizes.len().min(10);
    // Frame delays by service size too: the ten largest services (whose shards merge the most) against the rest.
    let largest: std::collections::HashSet<&str> = by_size
        .iter()
        .take(head)
        .map(|(service, _)| *service)
        .collect();
    let (mut delays_head, mut delays_rest) = (Vec::new(), Vec::new());
    for (service, delay) in &frame_delays {
        if largest.contains(service.as_str()) {
            delays_head.push(*delay);
        } else {
            delays_rest.push(*delay);
        }
    }
    delays_head.sort_unstable();
    delays_rest.sort_unstable();
    let mut delays: Vec<i64> = frame_delays.iter().map(|(_, d)| *d).collect();
    delays.sort_unstable();
    println!(
        "| agents x series | instances per second, live (min / median) | after corrections (min / median) | live share | seal delay p50 / p99 | frame after second p50 / p90 / p99 | aggregator CPU | aggregator peak RSS | loadgen CPU | lost |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} x {} | {} / {} | {} / {} | {:.2}% | {} / {} s | {} / {} / {} ms | {:.2} cores | {:.2} GiB | {:.2} cores | {} of {} |",
        args.agents,
        args.series,
        live.first().copied().unwrap_or(0),
        percentile(&live, 0.5),
        total.first().copied().unwrap_or(0),
        percentile(&total, 0.5),
        100.0 * live_share,
        histogram_quantile(&seal, 0.5),
        histogram_quantile(&seal, 0.99),
        percentile(&delays, 0.5),
        percentile(&delays, 0.9),
        percentile(&delays, 0.99),
        agg_cores,
        rss_kib as f64 / 1024.0 / 1024.0,
        lg_cores,
        lost,
        expected * live.len() as u64,
    );
    println!(
        "live share by service size: the {} largest ({} to {} instances) {:.2}%, the other {} ({} to {} instances) {:.2}%",
        head,
        sizes.get(head.saturating_sub(1)).map_or(0, |r| r.0),
        sizes.first().map_or(0, |r| r.0),
        share(&sizes[..head]),
        sizes.len() - head,
        sizes.last().map_or(0, |r| r.0),
        sizes.get(head).map_or(0, |r| r.0),
        share(&sizes[head..]),
    );
    println!(
        "(full-frame client received {:.1} MB/s; loadgen's last progress line: {})",
        bytes as f64 / 1e6 / (args.seconds + args.warmup) as f64,
        last_progress.lock().expect("lock")
    );
    println!(
        "live frame after second end by service size, p50 / p90 / p99: the {} largest {} / {} / {} ms, the other {} {} / {} / {} ms",
        head,
        percentile(&delays_head, 0.5),
        percentile(&delays_head, 0.9),
        percentile(&delays_head, 0.99),
        sizes.len() - head,
        percentile(&delays_rest, 0.5),
        percentile(&delays_rest, 0.9),
        percentile(&delays_rest, 0.99),
    );
    println!(
        "snapshots merged at their shard, after their second ended (bucket bounds): p50 / p90 / p99 {} / {} / {} s",
        histogram_quantile(&arrival, 0.5),
        histogram_quantile(&arrival, 0.9),
        histogram_quantile(&arrival, 0.99),
    );
    if let Some(stall) = stall {
        let resumed_ms = stall.await??;
        let resumed_s = resumed_ms / 1000;
        let again = fresh_from(
            &live_at,
            &frames,
            0,
            resumed_s..last_second,
            args.agents as u64,
        );
        if again < last_second {
            println!(
                "stalled {} s: live frames fresh again from the second that ended {:.1} s after the aggregator went on",
                args.stall,
                ((again + 1) * 1000 - resumed_ms) as f64 / 1000.0
            );
        } else {
            println!(
                "stalled {} s: live frames not fresh again by the end of the run",
                args.stall
            );
        }
        if args.verbose {
            let stopped_s = resumed_s - args.stall as i64;
            let row = second_by_second(&live_at, &frames, 0, stopped_s - 2..last_second);
            eprintln!("around the stall: {row:#?}");
        }
    }
    if start_fresh < first_second {
        println!(
            "the fleet's start: live frames fresh (>= {}% of instances live, every frame <= {} ms after its second) \
             from the second that ended {:.1} s after the load generator started",
            FRESH_SHARE * 100.0,
            FRESH_DELAY_MS,
            ((start_fresh + 1) * 1000 - loadgen_started_ms) as f64 / 1000.0
        );
    } else {
        println!("the fleet's start: live frames not fresh by the end of the warm-up");
    }
    if let Some(trace) = trace {
        let rows = trace.await.unwrap_or_default();
        println!(
            "the fleet's start, second by second (s after the load generator started; aggregator cores; snapshots \
             merged, seconds sealed and corrections published a second; mean delay of the seconds sealed):"
        );
        for r in rows {
            println!(
                "  {:5.1} s  {:4.2} cores  {:6.0} merged  {:4.0} sealed  {:4.0} corrections  seal delay {:.2} s",
                r.at, r.cores, r.accepted, r.sealed, r.corrections, r.seal_delay
            );
        }
    }
    println!(
        "agent streams catching up (replaying, or behind after a replay) at the window's start / end: {} / {}; \
         left behind after a replay: {} before the window, {} in it",
        before.catching_up,
        after.catching_up,
        before.behind,
        after.behind - before.behind
    );
    let sealed: Vec<String> = SEALED_BY
        .iter()
        .zip(after.sealed_by.iter().zip(before.sealed_by))
        .map(|(by, (after, before))| format!("{by} {:.0}", after - before))
        .collect();
    println!(
        "live seconds sealed in the window, by what sealed them: {}",
        sealed.join(", ")
    );
    println!(
        "the aggregator's memory at the window's end: merged state {:.0} MB, backfill {:.0} MB",
        after.decoded / 1e6,
        after.history / 1e6
    );
    if args.subscribers > 0 {
        fan_out.sort_unstable();
        println!(
            "{} overview subscribers ({} connected): seal -> client p50 / p99 / max {} / {} / {} ms over {} frames \
             delivered",
            args.subscribers,
            connected.load(std::sync::atomic::Ordering::Relaxed),
            percentile(&fan_out, 0.5),
            percentile(&fan_out, 0.99),
            fan_out.last().copied().unwrap_or(0),
            fan_out.len()
        );
    }
    if args.view_subscribers > 0 {
        let [own, others, lagged, dropped] = views.snapshot();
        let [own0, others0, lagged0, dropped0] = views_before;
        println!(
            "{} service-view subscribers ({} connected): in the window {} full seconds of their service, {} of \
             others, {} \"lagged\" notices ({} frames dropped for them)",
            args.view_subscribers,
            views.connected.load(std::sync::atomic::Ordering::Relaxed),
            own - own0,
            others - others0,
            lagged - lagged0,
            dropped - dropped0
        );
    }
    for subscriber in subscribers.into_iter().chain(viewers) {
        subscriber.abort();
    }
    std::fs::remove_file(&config).ok();
    full.abort();
    overview.abort();
    loadgen.kill().await.ok();
    aggregator.kill().await.ok();
    Ok(())
}
