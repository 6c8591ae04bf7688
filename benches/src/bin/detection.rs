//! Detection-latency benchmark: an aggregator, a simulated fleet over real gRPC, a websocket client and a real
//! webhook receiver. Bad versions are deployed at known instants; the time from their first request to the alert
//! on the websocket, to the webhook, and to the canary's `bad` verdict is measured over many trials. Identical
//! ("A/A") candidates run alongside for the whole run to count false verdicts.
//!
//! `cargo run --release -p strobe-benches --bin detection -- --agents 10000 --trials 60 --aa-duration 10m`
//!
//! The defaults are the easy shape (equal services of 3 series, every snapshot at the second's end); LOAD.md's
//! production shape is `--traffic persistent --sizes zipf --series 100 --histograms 20 --spread 300ms
//! --late-share 0.01`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use strobe_aggregator::{Aggregator, AggregatorConfig};
use strobe_sim::loadgen::{Arrival, Deploy, Fleet, LoadSpec, service_name};
use strobe_sim::sim::Behavior;
use strobe_sim::traffic::Shape;
use tokio_tungstenite::tungstenite::Message;

/// The same allocator as the `strobe` binary, so the aggregator here costs what it costs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Simulated instances.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Services they are spread over.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Requests per second of each instance.
    #[arg(long, default_value_t = 50.0)]
    rps: f64,
    /// New instances per deploy.
    #[arg(long, default_value_t = 5)]
    candidates: usize,
    /// Bad deploys (cycling: 5x errors, 2x p99, 1.5x p99).
    #[arg(long, default_value_t = 30)]
    trials: usize,
    /// Services running an identical candidate for the whole run.
    #[arg(long, default_value_t = 10)]
    aa_trials: usize,
    /// How long the identical candidates run (the run lasts at least this long).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    aa_duration: Duration,
    /// HTTP/2 connections the fleet uses.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How requests move together: independent, latency-shocks, shocked, persistent or shared.
    #[arg(long, default_value = "independent", value_parser = |s: &str| Shape::named(s).ok_or("unknown traffic shape"))]
    traffic: Shape,
    /// Service sizes: `equal`, or `zipf` (a few large services and a long tail, as fleets are). Trials deploy
    /// into the services in order, so with `zipf` the first ones go to the largest.
    #[arg(long, default_value = "equal", value_parser = ["zipf", "equal"])]
    sizes: String,
    /// Series per instance and second (the request count, errors and latency included).
    #[arg(long, default_value_t = 3)]
    series: usize,
    /// Of which histograms (the latency one included).
    #[arg(long, default_value_t = 1)]
    histograms: usize,
    /// Snapshots spread over this long after each second ends (0: all at its end).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    spread: Duration,
    /// Share of instance-seconds sent 0.3 to 0.8 s late (a GC pause).
    #[arg(long, default_value_t = 0.0)]
    late_share: f64,
    /// How long the fleet runs before the first deploy: the canary fits its noise model on the baseline's history
    /// (`min_history`, two minutes by default), as it would on a long-running aggregator.
    #[arg(long, default_value = "130s", value_parser = humantime::parse_duration)]
    warmup: Duration,
}

const HEALTHY: Behavior = Behavior {
    rps: 50.0,
    error_ratio: 0.01,
    latency_median_ms: 20.0,
    latency_sigma: 0.5,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Errors5x,
    P99x2,
    P99x1_5,
}

impl Kind {
    fn behavior(self, healthy: Behavior) -> Behavior {
        let sigma_for = |factor: f64| healthy.latency_sigma + factor.ln() / 2.326;
        match self {
            Kind::Errors5x => Behavior {
                error_ratio: healthy.error_ratio * 5.0,
                ..healthy
            },
            Kind::P99x2 => Behavior {
                latency_sigma: sigma_for(2.0),
                ..healthy
            },
            Kind::P99x1_5 => Behavior {
                latency_sigma: sigma_for(1.5),
                ..healthy
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Errors5x => "5x error ratio",
            Kind::P99x2 => "2x p99",
            Kind::P99x1_5 => "1.5x p99",
        }
    }
}

/// Wall-clock arrival times (unix ms) of what the observers saw, by (service, version): the first of each.
#[derive(Default)]
struct Seen {
    ws_alert: HashMap<(String, String), f64>,
    webhook: HashMap<(String, String), f64>,
    /// For each first webhook: milliseconds from the end of the second the alert was decided on to its arrival
    /// (the pipeline's own share, whatever the statistics of the trial).
    webhook_pipeline: HashMap<(String, String), f64>,
    verdict_bad: HashMap<(String, String), f64>,
    verdict_reason: HashMap<String, String>,
    /// The second each first bad verdict was about, and the candidate's samples then.
    verdict_detail: HashMap<(String, String), (i64, String)>,
    rule_alerts: HashMap<String, u32>,
    /// Frames the server dropped because this client fell behind.
    lagged: u64,
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn rules(receiver: SocketAddr) -> String {
    format!(
        r#"[[rules]]
name = "error-ratio"
metric = "request.errors"
stat = "ratio"
over = "request.count"
above = 0.03
for = "0s"
keep_firing_for = "1s"
split_by = ["version"]
owner = "bench"

[[rules]]
name = "p99"
metric = "request.latency"
stat = "p99"
above = 100.0
for = "0s"
keep_firing_for = "1s"
split_by = ["version"]
owner = "bench"

[[owners]]
name = "bench"
escalation = [{{ after = "0s", webhook = "http://{receiver}/hook", format = "json" }}]
"#
    )
}

async fn start_receiver(seen: Arc<Mutex<Seen>>) -> Result<SocketAddr> {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/hook",
        post(move |body: String| {
            let seen = seen.clone();
            async move {
                let at = unix_ms();
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
                    && v["transition"] == "firing"
                    && let Some(service) = v["strobe"]["service"].as_str()
                {
                    let version = v["strobe"]["labels"]["version"]
                        .as_str()
                        .unwrap_or_default();
                    let key = (service.to_owned(), version.to_owned());
                    // A rule with `for = 0s` fires on its first breaching second; a canary alert on the second of
                    // its verdict.
                    let decided = if v["strobe"]["rule"] == "canary" {
                        v["strobe"]["evidence"]["t"].as_i64()
                    } else {
                        v["strobe"]["since"].as_i64()
                    };
                    let mut seen = seen.lock().unwrap();
                    if !seen.webhook.contains_key(&key) {
                        seen.webhook.insert(key.clone(), at);
                        if let Some(t) = decided {
                            seen.webhook_pipeline
                                .insert(key, at - ((t + 1) * 1000) as f64);
                        }
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn watch_stream(http: SocketAddr, seen: Arc<Mutex<Seen>>) -> Result<()> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{http}/api/v1/stream?overview=true"))
            .await?;
    tokio::spawn(async move {
        while let Some(Ok(message)) = ws.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let at = unix_ms();
            let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let mut seen = seen.lock().unwrap();
            match frame["type"].as_str() {
                Some("alert") if frame["alert"]["state"] == "firing" => {
                    let service = frame["alert"]["service"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let version = frame["alert"]["labels"]["version"]
                        .as_str()
                        .unwrap_or_default();
                    if frame["alert"]["kind"] == "rule" {
                        *seen.rule_alerts.entry(service.clone()).or_default() += 1;
                    }
                    seen.ws_alert
                        .entry((service, version.to_owned()))
                        .or_insert(at);
                }
                Some("deploy") if frame["deploy"]["state"] == "bad" => {
                    let service = frame["deploy"]["service"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let version = frame["deploy"]["candidate"].as_str().unwrap_or_default();
                    seen.verdict_reason
                        .insert(service.clone(), frame["deploy"]["reason"].to_string());
                    let detail = (
                        frame["deploy"]["t"].as_i64().unwrap_or_default(),
                        format!(
                            "{} n={}",
                            frame["deploy"]["reason"]["metric"].as_str().unwrap_or("?"),
                            frame["deploy"]["reason"]["candidate_samples"]
                        ),
                    );
                    seen.verdict_detail
                        .entry((service.clone(), version.to_owned()))
                        .or_insert(detail);
                    seen.verdict_bad
                        .entry((service, version.to_owned()))
                        .or_insert(at);
                }
                Some("lagged") => seen.lagged += frame["dropped"].as_u64().unwrap_or(0),
                _ => {}
            }
        }
    });
    Ok(())
}

/// A thread with its own runtime for the webhook receiver and the websocket client.
struct Observers {
    runtime: tokio::runtime::Handle,
    receiver: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl Observers {
    fn start(seen: Arc<Mutex<Seen>>) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let for_thread = seen.clone();
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            let receiver = runtime.block_on(start_receiver(for_thread));
            let _ = tx.send(receiver.map(|addr| (runtime.handle().clone(), addr)));
            runtime.block_on(std::future::pending::<()>());
        });
        let (runtime, receiver) = rx.recv()??;
        Ok(Self {
            runtime,
            receiver,
            seen,
        })
    }

    /// Connects the websocket client on the observers' runtime.
    async fn watch(&self, http: SocketAddr) -> Result<()> {
        self.runtime
            .spawn(watch_stream(http, self.seen.clone()))
            .await?
    }
}

fn percentiles(label: &str, mut values: Vec<f64>) {
    if values.is_empty() {
        println!("{label:<44} no samples");
        return;
    }
    values.sort_by(f64::total_cmp);
    let at =
        |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    println!(
        "{label:<44} n={:<3} p50={:>6.0} ms  p90={:>6.0} ms  p99={:>6.0} ms  max={:>6.0} ms",
        values.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // As the `strobe` binary does (its arenas on small pages); the runtime's few allocations before this stay.
    strobe_aggregator::use_small_pages()?;
    let args = Args::parse();
    tracing_subscriber_init();
    let healthy = Behavior {
        rps: args.rps,
        ..HEALTHY
    };
    let seen = Arc::new(Mutex::new(Seen::default()));
    // The observers (webhook receiver, websocket client) stand for other machines: they get a runtime and a thread
    // of their own, so the load on the measured side does not delay them.
    let observers = Observers::start(seen.clone())?;
    let receiver = observers.receiver;
    let rules_path =
        std::env::temp_dir().join(format!("strobe-detection-{}.toml", std::process::id()));
    std::fs::write(&rules_path, rules(receiver))?;
    let mut config = AggregatorConfig {
        grpc_addr: "127.0.0.1:0".parse()?,
        http_addr: "127.0.0.1:0".parse()?,
        rules: Some(rules_path),
        ..AggregatorConfig::default()
    };
    config.canary.settle = Duration::from_secs(3);
    let aggregator = Aggregator::bind(config).await?;
    let (grpc, http) = (aggregator.grpc_addr(), aggregator.http_addr());
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(aggregator.run(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    observers.watch(http).await?;

    let spec = LoadSpec {
        aggregator: format!("http://{grpc}"),
        agents: args.agents,
        services: args.services,
        zipf: args.sizes == "zipf",
        series: args.series,
        histograms: args.histograms,
        connections: args.connections,
        behavior: healthy,
        traffic: args.traffic,
        arrival: Arrival {
            spread: args.spread,
            late_share: args.late_share,
        },
    };
    let arrival = spec.arrival.describe();
    // The fleet stands for thousands of other machines: it gets a runtime of its own, so its ten thousand shipper
    // tasks compete with the aggregator for the CPU (as other processes would) and not in the aggregator's task
    // queues (as no real fleet could).
    let fleet_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fleet")
        .enable_all()
        .build()?;
    let fleet = fleet_runtime
        .spawn(Fleet::start(spec))
        .await?
        .context("starting the fleet")?;
    println!(
        "fleet: {} instances over {} services ({} sizes), {} series each ({} histograms), {} req/s each; deploys of \
         {} instances; traffic {}; arrival {arrival}; warming up {} s",
        args.agents,
        args.services,
        args.sizes,
        args.series,
        args.histograms,
        args.rps,
        args.candidates,
        args.traffic,
        args.warmup.as_secs()
    );
    tokio::time::sleep(args.warmup).await;
    let run_started = std::time::Instant::now();

    // Identical candidates on the last services, for the whole run.
    let aa_services: Vec<usize> =
        (args.services.saturating_sub(args.aa_trials)..args.services).collect();
    for &service in &aa_services {
        fleet.deploy(Deploy {
            service,
            version: "v2-same".into(),
            instances: args.candidates,
            behavior: healthy,
            at: unix_ms() / 1000.0 + 1.0,
            retire: 0,
            retire_after: 0.0,
            deployer: None,
        });
    }

    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let kinds = [Kind::Errors5x, Kind::P99x2, Kind::P99x1_5];
    let mut results: Vec<(Kind, (String, String), f64)> = Vec::new();
    let bad_services = args.services.saturating_sub(args.aa_trials).max(1);
    for trial in 0..args.trials {
        let kind = kinds[trial % kinds.len()];
        let key = (service_name(trial % bad_services), format!("v-bad-{trial}"));
        let at = (unix_ms() / 1000.0).floor() + 1.0 + rng.random::<f64>();
        fleet.deploy(Deploy {
            service: trial % bad_services,
            version: key.1.clone(),
            instances: args.candidates,
            behavior: kind.behavior(healthy),
            at,
            retire: 0,
            retire_after: 0.0,
            deployer: None,
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let seen = seen.lock().unwrap();
            let done = seen.verdict_bad.contains_key(&key)
                && (kind == Kind::P99x1_5
                    || (seen.ws_alert.contains_key(&key) && seen.webhook.contains_key(&key)));
            if done || std::time::Instant::now() > deadline {
                break;
            }
        }
        results.push((kind, key, at * 1000.0));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let remaining = args.aa_duration.saturating_sub(run_started.elapsed());
    println!(
        "bad trials done; identical candidates keep running for {} s more",
        remaining.as_secs()
    );
    tokio::time::sleep(remaining).await;

    report(&seen.lock().unwrap(), &results, &aa_services, &args, &fleet);
    println!("\naggregator (from /metrics):");
    let metrics = strobe_benches::scrape_metrics(http).await?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("strobe_seal_delay_seconds")
            || l.starts_with("strobe_snapshot_arrival_delay_seconds")
            || l.starts_with("strobe_corrections_total")
            || l.starts_with("strobe_seconds_sealed_total")
            || l.starts_with("strobe_snapshots_")
    }) {
        println!("  {line}");
    }
    fleet_runtime.spawn(fleet.stop()).await?;
    fleet_runtime.shutdown_background();
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}

fn report(
    seen: &Seen,
    results: &[(Kind, (String, String), f64)],
    aa_services: &[usize],
    args: &Args,
    fleet: &Fleet,
) {
    let kinds = [Kind::Errors5x, Kind::P99x2, Kind::P99x1_5];
    println!("\neach trial: first bad request at second+fraction; ms after it to ...");
    for (kind, key, at) in results {
        let after = |map: &HashMap<(String, String), f64>| {
            map.get(key)
                .map_or("-".to_owned(), |seen| format!("{:.0}", seen - at))
        };
        let first = (at / 1000.0).floor() as i64;
        let verdict = seen
            .verdict_detail
            .get(key)
            .map_or("no verdict".to_owned(), |(t, why)| {
                format!("second +{}, {why}", t - first)
            });
        println!(
            "  {:<9} {} +{:.2}: ws {:>5} webhook {:>5} verdict {:>5} ({verdict})",
            kind.name(),
            key.0,
            (at / 1000.0).fract(),
            after(&seen.ws_alert),
            after(&seen.webhook),
            after(&seen.verdict_bad),
        );
    }
    println!("\nfirst bad request -> ...");
    for kind in kinds {
        let mine: Vec<&(Kind, (String, String), f64)> =
            results.iter().filter(|(k, _, _)| *k == kind).collect();
        let delays = |map: &HashMap<(String, String), f64>| -> Vec<f64> {
            mine.iter()
                .filter_map(|(_, s, at)| map.get(s).map(|seen| seen - at))
                .collect()
        };
        if kind != Kind::P99x1_5 {
            percentiles(
                &format!("{}: websocket alert", kind.name()),
                delays(&seen.ws_alert),
            );
            percentiles(
                &format!("{}: webhook received", kind.name()),
                delays(&seen.webhook),
            );
        }
        percentiles(
            &format!("{}: canary verdict bad", kind.name()),
            delays(&seen.verdict_bad),
        );
        let missed = mine
            .iter()
            .filter(|(_, s, _)| !seen.verdict_bad.contains_key(s))
            .count();
        println!(
            "{:<44} missed={missed} of {}",
            format!("{}: canary", kind.name()),
            mine.len()
        );
    }
    percentiles(
        "end of the deciding second -> webhook",
        results
            .iter()
            .filter_map(|(_, key, _)| seen.webhook_pipeline.get(key).copied())
            .collect(),
    );
    let false_verdicts = aa_services
        .iter()
        .filter(|s| {
            seen.verdict_bad
                .contains_key(&(service_name(**s), "v2-same".to_owned()))
        })
        .count();
    for s in aa_services {
        if let Some(reason) = seen.verdict_reason.get(&service_name(*s)) {
            println!("false verdict on {}: {reason}", service_name(*s));
        }
    }
    let aa_rule_alerts: u32 = aa_services
        .iter()
        .filter_map(|s| seen.rule_alerts.get(&service_name(*s)))
        .sum();
    println!(
        "\nA/A: {} identical candidates for {} s: {false_verdicts} bad verdicts; {aa_rule_alerts} threshold-rule alerts (rules with for=0s)",
        aa_services.len(),
        args.aa_duration.as_secs()
    );
    println!(
        "websocket observer: {} frames dropped by the server for lag",
        seen.lagged
    );
    println!(
        "load: {} snapshots sent, {} dropped by the generator",
        fleet.stats.sent.load(std::sync::atomic::Ordering::Relaxed),
        fleet
            .stats
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}

fn tracing_subscriber_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("STROBE_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .with_writer(std::io::stderr)
        .try_init();
}
