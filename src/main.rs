//! The `strobe` binary: parses the command line and runs the library that does the work.

mod cli;
mod demo_cluster;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use cli::{Cli, Command, FileConfig};
use tracing_subscriber::EnvFilter;

/// Thousands of small, short-lived allocations a second (snapshots, series, frames) cross threads; mimalloc handles
/// that pattern with a fraction of the system allocator's lock traffic.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before the allocator's arenas grow (see `use_small_pages`).
    let pages = strobe_aggregator::use_small_pages();
    let cli = Cli::parse();
    let default_log = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    let log = cli.log.as_deref().unwrap_or(default_log);
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    match pages {
        Ok(pages) => tracing::debug!(message = "Memory pages.", ?pages),
        Err(error) => {
            tracing::warn!(message = "Could not turn transparent huge pages off.", %error)
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("strobe: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("strobe: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let file = FileConfig::load(cli.config.as_deref())?;
    match cli.command {
        Command::Aggregator(args) => {
            let aggregator =
                strobe_aggregator::Aggregator::bind(args.apply(file.aggregator)?).await?;
            // One machine-readable line on stdout, so scripts and tests can find ports chosen with :0.
            println!(
                "strobe aggregator grpc={} http={}",
                aggregator.grpc_addr(),
                aggregator.http_addr()
            );
            aggregator.run(shutdown_signal()).await?;
        }
        Command::Agent(args) => {
            let agent = strobe_agent::Agent::bind(args.apply(file.agent)).await?;
            let addresses: Vec<String> = agent
                .addresses()
                .iter()
                .map(|(name, addr)| format!("{name}={addr}"))
                .collect();
            println!("strobe agent {}", addresses.join(" "));
            let report = agent.run(shutdown_signal()).await;
            tracing::info!(
                message = "Agent stopped.",
                acknowledged = report.acknowledged,
                dropped = report.dropped
            );
        }
        Command::Demo(args) => {
            let mut aggregator = file.aggregator;
            aggregator.http_addr = args.http_addr;
            aggregator.grpc_addr = args.grpc_addr;
            let mut cluster = None;
            if args.nodes > 1 {
                cluster = Some(demo_cluster::DemoCluster::start(&mut aggregator).await?);
            }
            let mut config = strobe_sim::demo::DemoConfig {
                aggregator,
                bad_deploy_after: args.bad_deploy_after,
                traffic: args.traffic,
            };
            strobe_sim::demo::prepare_rules(&mut config).await?;
            if let Some(cluster) = &mut cluster {
                cluster.spawn_nodes(args.nodes, &config.aggregator).await?;
            }
            let after = args.bad_deploy_after;
            strobe_sim::demo::run_demo(
                config,
                |http| {
                    println!("strobe demo: dashboard at http://{http}/  (checkout v42, a bad deploy, rolls out in {}s)", after.as_secs());
                },
                shutdown_signal(),
            )
            .await?;
        }
        Command::Loadgen(args) => {
            strobe_sim::loadgen::run_loadgen(args.plan(), shutdown_signal()).await?;
        }
    }
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            // Without a Ctrl-C handler, SIGTERM (below) still stops the process.
            tracing::warn!(message = "Cannot listen for Ctrl-C.", %error);
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
