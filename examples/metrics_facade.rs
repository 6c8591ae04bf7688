//! A Rust service instrumented with the `metrics` crate, its agent in process: no sidecar, no UDP.
//!
//! `cargo run --example metrics_facade -- http://127.0.0.1:7070 10` serves fake requests for 10 seconds (a
//! counter per route, a latency histogram, an in-flight gauge), then stops its agent (which waits for the last
//! seconds to be acknowledged) and prints what it recorded.

use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let aggregator = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:7070".to_owned());
    let seconds: u64 = args.next().map_or(Ok(10), |s| s.parse())?;

    let mut config = strobe_agent::AgentConfig {
        service: "facade-example".to_owned(),
        version: "v1".to_owned(),
        instance: "facade-1".to_owned(),
        statsd_addr: "127.0.0.1:0".parse()?,
        metrics_addr: None, // the service's own page would serve its health
        ..Default::default()
    };
    config.shipper.aggregator = aggregator;
    let agent = strobe_agent::install(config).await?;

    let (mut requests, mut latencies) = (0u64, 0u64);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while Instant::now() < until {
        tick.tick().await;
        let route = if requests % 4 == 0 {
            "/checkout"
        } else {
            "/search"
        };
        metrics::counter!("http.requests", "route" => route).increment(1);
        metrics::histogram!("http.latency_ms").record((requests % 50) as f64 + 5.0);
        metrics::gauge!("http.inflight").set((requests % 7) as f64);
        requests += 1;
        latencies += 1;
    }
    let report = agent.shutdown().await;
    println!(
        "recorded requests={requests} latencies={latencies} acknowledged_seconds={}",
        report.acknowledged
    );
    Ok(())
}
