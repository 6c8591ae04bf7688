//! `strobe demo`: an aggregator and a simulated fleet in one process, talking real gRPC over loopback, with a bad
//! deploy of one service staged partway through.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use strobe_agent::ShipperConfig;
use strobe_aggregator::{Aggregator, AggregatorConfig, AggregatorError};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;

use crate::sim::{Behavior, SimInstance, identity, run_instance};
use crate::traffic::{ServiceShocks, Shape};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The aggregator's settings (addresses included).
    pub aggregator: AggregatorConfig,
    /// When the bad version of `checkout` starts rolling out.
    pub bad_deploy_after: Duration,
    /// How the fleet's requests move together.
    pub traffic: Shape,
}

/// The bad version's behaviour: 16x the errors, and a p99 about six times the healthy one (same traffic).
pub fn bad(healthy: Behavior) -> Behavior {
    Behavior {
        error_ratio: 0.08,
        latency_median_ms: 45.0,
        latency_sigma: 0.9,
        ..healthy
    }
}

/// Traffic per instance of a service: a little variety between services.
fn service_behavior(service: &str) -> Behavior {
    Behavior {
        rps: Behavior::HEALTHY.rps * (1.0 + 0.5 * (service.len() % 3) as f64),
        ..Behavior::HEALTHY
    }
}

const SERVICES: [(&str, &str); 3] = [("checkout", "v41"), ("search", "v7"), ("payments", "v3")];
const ZONES: [&str; 2] = ["eu-1", "eu-2"];

/// The healthy fleet: three services, four instances each, over two zones, with traffic of `shape`.
pub fn healthy_fleet(shape: Shape) -> Vec<SimInstance> {
    let mut fleet = Vec::new();
    for (seed, (service, version)) in SERVICES.into_iter().enumerate() {
        let shared = ServiceShocks::new(seed as u64);
        for n in 1..=4 {
            let zone = ZONES[n % 2];
            fleet.push(SimInstance {
                identity: identity(service, version, zone, &format!("{service}-{n}")),
                behavior: service_behavior(service),
                traffic: (shape, shared.clone()),
            });
        }
    }
    fleet
}

/// The demo's rules: error ratio and p99 per version for every service, paging a local receiver.
pub fn demo_rules(receiver: SocketAddr) -> String {
    format!(
        r#"# Strobe demo rules. Edit this file while the demo runs: it is reloaded within a second.

[[rules]]
name = "error-ratio"
metric = "request.errors"
stat = "ratio"
over = "request.count"
above = 0.03
for = "2s"
split_by = ["version"]
owner = "demo-oncall"

[[rules]]
name = "p99-latency"
metric = "request.latency"
stat = "p99"
above = 200.0
for = "2s"
split_by = ["version"]
owner = "demo-oncall"

[[owners]]
name = "demo-oncall"
escalation = [
  {{ after = "0s",  webhook = "http://{receiver}/developer", format = "json" }},
  {{ after = "30s", webhook = "http://{receiver}/team-lead", format = "slack" }},
]
"#
    )
}

/// A local webhook receiver that prints one line per notification it gets.
async fn start_receiver() -> std::io::Result<SocketAddr> {
    use axum::extract::Path;
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/{who}",
        post(|Path(who): Path<String>, body: String| async move {
            let line = match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) if v.get("text").is_some() => {
                    v["text"].as_str().unwrap_or_default().to_owned()
                }
                Ok(v) => {
                    let a = &v["strobe"];
                    format!(
                        "{} {} on {} {} value={} detected_after_ms={}",
                        v["transition"].as_str().unwrap_or_default().to_uppercase(),
                        a["rule"].as_str().unwrap_or_default(),
                        a["service"].as_str().unwrap_or_default(),
                        a["labels"],
                        a["value"],
                        a["detected_after_ms"],
                    )
                }
                Err(_) => body,
            };
            println!("webhook -> {who}: {line}");
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// Unless the config names a rules file: writes the demo's rules to a temporary file and starts the local webhook
/// receiver they point at (it prints what it receives). The path is in `config.aggregator.rules` afterwards.
pub async fn prepare_rules(config: &mut DemoConfig) -> Result<(), DemoError> {
    if config.aggregator.rules.is_some() {
        return Ok(());
    }
    let receiver = start_receiver().await.map_err(|source| DemoError::Setup {
        what: "the webhook receiver",
        source,
    })?;
    let path = std::env::temp_dir().join(format!("strobe-demo-rules-{}.toml", std::process::id()));
    std::fs::write(&path, demo_rules(receiver)).map_err(|source| DemoError::Setup {
        what: "the rules file",
        source,
    })?;
    println!(
        "strobe demo: rules in {} (edit them live), webhooks printed below",
        path.display()
    );
    config.aggregator.rules = Some(path);
    Ok(())
}

/// Runs the demo until `shutdown` completes; `ready` is told the HTTP address once it is bound.
pub async fn run_demo(
    mut config: DemoConfig,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    // The fleet starts with its aggregator, so by the deploy the baseline has only that long of history: the
    // canary is told to fit its noise model on it (a long-running aggregator has minutes).
    let canary = &mut config.aggregator.canary;
    canary.min_history = canary.min_history.min(
        config
            .bad_deploy_after
            .saturating_sub(Duration::from_secs(1))
            .max(Duration::from_secs(3)),
    );
    prepare_rules(&mut config).await?;
    let aggregator = Aggregator::bind(config.aggregator).await?;
    let grpc = aggregator.grpc_addr();
    ready(aggregator.http_addr());
    let (stop_tx, stop_rx) = watch::channel(false);
    let shipper = ShipperConfig {
        aggregator: format!("http://{grpc}"),
        ..ShipperConfig::default()
    };
    // On shutdown the fleet stops first (each agent flushes its last second), then the aggregator.
    let fleet_stop = stop_tx.clone();
    let server = tokio::spawn(aggregator.run(async move {
        shutdown.await;
        let _ = fleet_stop.send(true);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }));
    let mut fleet = JoinSet::new();
    // One retire switch per instance; every sender lives as long as the deploy task, so no stop fires by a drop.
    let mut retire = Vec::new();
    let shape = config.traffic;
    let fleet_instances = healthy_fleet(shape);
    // The new version shares checkout's service-wide shocks.
    let checkout_shocks = fleet_instances[0].traffic.1.clone();
    for (seed, instance) in fleet_instances.into_iter().enumerate() {
        let (retire_tx, retire_rx) = watch::channel(false);
        retire.push((instance.identity.instance.clone(), retire_tx));
        let stop = merge_stops(stop_rx.clone(), retire_rx);
        fleet.spawn(run_instance(instance, shipper.clone(), seed as u64, stop));
    }
    let bad_after = config.bad_deploy_after;
    let stop_for_deploy = stop_rx.clone();
    let deploy = tokio::spawn(async move {
        tokio::time::sleep(bad_after).await;
        info!(message = "Deploying checkout v42 (bad) to two of four instances.");
        let mut new = JoinSet::new();
        for n in 5..=6 {
            let instance = SimInstance {
                identity: identity("checkout", "v42", ZONES[n % 2], &format!("checkout-{n}")),
                behavior: bad(service_behavior("checkout")),
                traffic: (shape, checkout_shocks.clone()),
            };
            new.spawn(run_instance(
                instance,
                shipper.clone(),
                100 + n as u64,
                stop_for_deploy.clone(),
            ));
        }
        for (instance, switch) in &retire {
            if instance == "checkout-3" || instance == "checkout-4" {
                let _ = switch.send(true);
            }
        }
        while new.join_next().await.is_some() {}
    });
    let result = server.await.unwrap_or(Ok(()));
    let _ = stop_tx.send(true);
    deploy.abort();
    fleet.abort_all();
    Ok(result?)
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The aggregator failed.
    #[error(transparent)]
    Aggregator(#[from] AggregatorError),
    /// A local helper could not be set up.
    #[error("cannot set up {what}: {source}")]
    Setup {
        /// Which helper.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A receiver that turns true when either input does.
fn merge_stops(
    mut a: watch::Receiver<bool>,
    mut b: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = a.wait_for(|s| *s) => {}
            _ = b.wait_for(|s| *s) => {}
        }
        let _ = tx.send(true);
    });
    rx
}
