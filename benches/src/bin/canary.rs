//! The canary benchmark: the canary itself (the aggregator's code, fed as a shard feeds it) on simulated deploys
//! under each traffic shape, without the network. For every shape and request rate it reports the share of
//! identical-version deploys (A/A, 30 minutes each) that get a false `bad` verdict, how many are credibly `healthy`
//! by their end, and, for real regressions (5x and 2x errors, 2x and 1.5x p99), the time to a `bad` verdict.
//!
//! `cargo run --release -p strobe-benches --bin canary` (see the README for the table and how long it takes).

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Binomial, Distribution, Poisson, StandardNormal};
use strobe_aggregator::CanarySettings;
use strobe_aggregator::kernels::{CanaryRun, VersionInput};
use strobe_sim::traffic::{InstanceShocks, ServiceShocks, Shape};

#[derive(Debug, Parser)]
struct Args {
    /// A/A deploys per shape and rate.
    #[arg(long, default_value_t = 200)]
    deploys: usize,
    /// Deploys per regression, shape and rate.
    #[arg(long, default_value_t = 40)]
    trials: usize,
    /// How long each A/A deploy runs.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// How long a regression is given to be caught.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    give_up: std::time::Duration,
    /// The baseline's history before each deploy (a long-running aggregator has `history`, 10 minutes).
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    warmup: std::time::Duration,
    /// Requests per second per side (comma-separated).
    #[arg(long, default_values_t = DEFAULT_RATES, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Traffic shapes (comma-separated names; default all).
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The canary's alpha (default: the aggregator's default).
    #[arg(long)]
    alpha: Option<f64>,
    /// The canary's `min_error_ratio_factor` (default: the aggregator's default).
    #[arg(long)]
    error_factor: Option<f64>,
    /// The canary's `min_error_ratio_increase` (default: the aggregator's default).
    #[arg(long)]
    error_increase: Option<f64>,
    /// The canary's `min_p99_factor` (default: the aggregator's default).
    #[arg(long)]
    p99_factor: Option<f64>,
}

/// The request rates run unless `--rates` says otherwise.
const DEFAULT_RATES: [f64; 3] = [10.0, 250.0, 2500.0];

/// The healthy service: 0.5% errors, 20 ms median, lognormal sigma 0.5 (p99 about 64 ms).
const ERROR_RATIO: f64 = 0.005;
const MEDIAN_MS: f64 = 20.0;
const SIGMA: f64 = 0.5;
/// Baseline instances (the candidate is one instance with the same traffic as all of them together).
const BASELINE_INSTANCES: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Effect {
    name: &'static str,
    errors: f64,
    p99: f64,
}

const SAME: Effect = Effect {
    name: "identical",
    errors: 1.0,
    p99: 1.0,
};
const EFFECTS: [Effect; 4] = [
    Effect {
        name: "5x errors",
        errors: 5.0,
        p99: 1.0,
    },
    Effect {
        name: "2x errors",
        errors: 2.0,
        p99: 1.0,
    },
    Effect {
        name: "2x p99",
        errors: 1.0,
        p99: 2.0,
    },
    Effect {
        name: "1.5x p99",
        errors: 1.0,
        p99: 1.5,
    },
];

/// Instances of one version: each with its own shocks, sharing the service's.
struct Side {
    rps_each: f64,
    error_ratio: f64,
    sigma: f64,
    shocks: Vec<InstanceShocks>,
}

impl Side {
    fn new(
        instances: usize,
        rps: f64,
        effect: Effect,
        shape: Shape,
        service: &ServiceShocks,
        rng: &mut SmallRng,
    ) -> Self {
        Self {
            rps_each: rps / instances as f64,
            error_ratio: (ERROR_RATIO * effect.errors).min(1.0),
            // A p99 `effect.p99` times higher at the same median.
            sigma: SIGMA + effect.p99.ln() / 2.326,
            shocks: (0..instances)
                .map(|_| InstanceShocks::new(shape, service.clone(), rng))
                .collect(),
        }
    }

    fn second(&mut self, t: i64, rng: &mut SmallRng, h: &mut Histogram<u64>) -> VersionInput {
        h.reset();
        let (mut requests, mut errors) = (0u64, 0u64);
        let mut per_instance = Vec::with_capacity(self.shocks.len());
        for shocks in &mut self.shocks {
            let shock = shocks.second(t, rng);
            let n = Poisson::new(self.rps_each).map_or(0.0, |p| p.sample(rng)) as u64;
            let p = (self.error_ratio * shock.errors).clamp(0.0, 1.0);
            let failed = Binomial::new(n, p).map_or(0, |b| b.sample(rng));
            per_instance.push((n as f64, failed as f64));
            errors += failed;
            requests += n;
            let mu = (MEDIAN_MS * shock.latency * 1000.0).ln();
            for _ in 0..n {
                let z: f64 = rng.sample(StandardNormal);
                let us = (mu + self.sigma * z).exp().clamp(1.0, 3.6e9);
                // Within the histogram's range by the clamp: recording cannot fail.
                let _ = h.record(us as u64);
            }
        }
        VersionInput {
            instances: u32::try_from(self.shocks.len()).unwrap_or(u32::MAX),
            requests: requests as f64,
            errors: errors as f64,
            latency: (requests > 0).then(|| (h.clone(), 1000)),
            per_instance,
        }
    }
}

/// What one deploy came to.
#[derive(Debug, Clone, Copy, Default)]
struct Outcome {
    /// Seconds from the candidate's first second to `bad`.
    bad_after: Option<i64>,
    /// The check that said `bad`.
    bad_check: Option<&'static str>,
    /// Seconds to the first `healthy`.
    healthy_after: Option<i64>,
    /// The state at the end.
    healthy_at_end: bool,
}

fn deploy(
    settings: &CanarySettings,
    seed: u64,
    shape: Shape,
    rps: f64,
    effect: Effect,
    warmup: i64,
    seconds: i64,
) -> Outcome {
    let mut rng = SmallRng::seed_from_u64(seed);
    let service = ServiceShocks::new(seed ^ 0x5eed);
    let mut baseline = Side::new(BASELINE_INSTANCES, rps, SAME, shape, &service, &mut rng);
    let mut candidate = Side::new(1, rps, effect, shape, &service, &mut rng);
    let mut run = CanaryRun::new(settings.clone());
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds");
    let mut outcome = Outcome::default();
    let mut last = "";
    for t in 0..warmup + seconds {
        let mut versions = vec![("v1".to_owned(), baseline.second(t, &mut rng, &mut h))];
        if t >= warmup {
            versions.push(("v2".to_owned(), candidate.second(t, &mut rng, &mut h)));
        }
        for (_, state, check) in run.observe(t, versions) {
            last = state;
            if state == "bad" && outcome.bad_after.is_none() {
                outcome.bad_after = Some(t - warmup);
                outcome.bad_check = check;
            }
            if state == "healthy" && outcome.healthy_after.is_none() {
                outcome.healthy_after = Some(t - warmup);
            }
        }
        if outcome.bad_after.is_some() && effect != SAME {
            break;
        }
    }
    outcome.healthy_at_end = last == "healthy";
    outcome
}

/// Runs `n` deploys on `threads` threads.
fn deploys(
    n: usize,
    threads: usize,
    seed: u64,
    run: impl Fn(u64) -> Outcome + Sync,
) -> Vec<Outcome> {
    let threads = threads.max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let run = &run;
                scope.spawn(move || {
                    (k..n)
                        .step_by(threads)
                        .map(|i| run(seed.wrapping_mul(1_000_003).wrapping_add(i as u64)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn quantile(values: &mut [i64], q: f64) -> Option<i64> {
    values.sort_unstable();
    let n = values.len();
    (n > 0).then(|| values[((q * n as f64).ceil() as usize).clamp(1, n) - 1])
}

fn main() -> Result<()> {
    let args = Args::parse();
    let shapes: Vec<Shape> = if args.shapes.is_empty() {
        Shape::ALL.to_vec()
    } else {
        args.shapes
            .iter()
            .map(|s| Shape::named(s).ok_or_else(|| anyhow::anyhow!("unknown traffic shape {s}")))
            .collect::<Result<_>>()?
    };
    let mut settings = CanarySettings::default();
    if let Some(alpha) = args.alpha {
        settings.alpha = alpha;
    }
    if let Some(factor) = args.error_factor {
        settings.min_error_ratio_factor = factor;
    }
    if let Some(increase) = args.error_increase {
        settings.min_error_ratio_increase = increase;
    }
    if let Some(factor) = args.p99_factor {
        settings.min_p99_factor = factor;
    }
    let warmup = i64::try_from(args.warmup.as_secs())?;
    let duration = i64::try_from(args.duration.as_secs())?;
    let give_up = i64::try_from(args.give_up.as_secs())?;
    println!(
        "canary benchmark: baseline {BASELINE_INSTANCES} instances, candidate 1, same req/s per side; {}% errors, \
         {MEDIAN_MS} ms median, sigma {SIGMA}; {} s of baseline history before each deploy; canary alpha {}, floors {}x / +{} errors ({}x / +{} on a quiet \
         baseline), {}x p50, {}x p99, other settings default",
        ERROR_RATIO * 100.0,
        warmup,
        settings.alpha,
        settings.min_error_ratio_factor,
        settings.min_error_ratio_increase,
        settings.quiet_error_ratio_factor,
        settings.quiet_error_ratio_increase,
        settings.min_p50_factor,
        settings.min_p99_factor
    );
    for shape in &shapes {
        println!("shape: {shape}");
    }
    println!(
        "\n| shape | req/s per side | A/A deploys ({} min) | false `bad` | `healthy` by the end | time to `healthy` p50 | {} |",
        duration / 60,
        EFFECTS
            .map(|e| format!("{}: caught, p50 / p99", e.name))
            .join(" | ")
    );
    println!("|---|---|---|---|---|---|{}", "---|".repeat(EFFECTS.len()));
    for (s, shape) in shapes.iter().enumerate() {
        for (r, &rps) in args.rates.iter().enumerate() {
            let started = Instant::now();
            // Seeded by the shape's place among all shapes and the rate's among the default rates, so a run of some
            // of them repeats the full run's deploys.
            let shape_index = Shape::ALL
                .iter()
                .position(|known| known.name == shape.name)
                .unwrap_or(s);
            // A rate not among the defaults gets a seed of its own.
            let rate_index = DEFAULT_RATES
                .iter()
                .position(|known| *known == rps)
                .unwrap_or(DEFAULT_RATES.len() + r);
            let seed = (shape_index * 100 + rate_index) as u64;
            let aa = deploys(args.deploys, args.threads, seed, |seed| {
                deploy(&settings, seed, *shape, rps, SAME, warmup, duration)
            });
            let false_bad = aa.iter().filter(|o| o.bad_after.is_some()).count();
            if false_bad > 0 {
                let checks: Vec<&str> = aa.iter().filter_map(|o| o.bad_check).collect();
                eprintln!(
                    "  ({} at {rps} req/s: false `bad` by {})",
                    shape.name,
                    checks.join(", ")
                );
            }
            let healthy = aa.iter().filter(|o| o.healthy_at_end).count();
            let mut to_healthy: Vec<i64> = aa.iter().filter_map(|o| o.healthy_after).collect();
            let mut cells = Vec::new();
            for (e, effect) in EFFECTS.iter().enumerate() {
                let outcomes = deploys(
                    args.trials,
                    args.threads,
                    seed * 10 + e as u64 + 1,
                    |seed| deploy(&settings, seed, *shape, rps, *effect, warmup, give_up),
                );
                let mut times: Vec<i64> = outcomes.iter().filter_map(|o| o.bad_after).collect();
                let caught = times.len();
                let p50 = quantile(&mut times, 0.5);
                let p99 = quantile(&mut times, 0.99);
                let show = |v: Option<i64>| v.map_or("-".to_owned(), |v| format!("{v} s"));
                cells.push(format!(
                    "{caught}/{}, {} / {}",
                    outcomes.len(),
                    show(p50),
                    show(p99)
                ));
            }
            println!(
                "| {} | {} | {} | {} ({:.1}%) | {:.0}% | {} | {} |",
                shape.name,
                rps,
                aa.len(),
                false_bad,
                100.0 * false_bad as f64 / aa.len().max(1) as f64,
                100.0 * healthy as f64 / aa.len().max(1) as f64,
                quantile(&mut to_healthy, 0.5).map_or("-".to_owned(), |v| format!("{v} s")),
                cells.join(" | ")
            );
            eprintln!(
                "  ({} at {rps} req/s took {:.0} s)",
                shape.name,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
