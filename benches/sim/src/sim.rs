//! Simulated service instances: each second, a realistic second of traffic (Poisson-ish request counts, binomial
//! errors, lognormal latencies) folded by the agent's own window code and shipped over real gRPC.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Binomial, Distribution, LogNormal, Normal};
use strobe_agent::statsd::MetricType;
use strobe_agent::{ShipperConfig, Window, WindowLimits, run_shipper};
use strobe_proto as pb;
use strobe_proto::clock;

use crate::traffic::{InstanceShocks, SecondShock, ServiceShocks, Shape};
use tokio::sync::{mpsc, watch};

/// How one simulated instance behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Behavior {
    /// Mean requests per second.
    pub rps: f64,
    /// Fraction of requests that fail.
    pub error_ratio: f64,
    /// Median latency in milliseconds.
    pub latency_median_ms: f64,
    /// Spread of the lognormal latency (sigma of the underlying normal).
    pub latency_sigma: f64,
}

impl Behavior {
    /// A healthy web service: 200 req/s, 0.5% errors, 20 ms median, p99 about 65 ms.
    pub const HEALTHY: Behavior = Behavior {
        rps: 200.0,
        error_ratio: 0.005,
        latency_median_ms: 20.0,
        latency_sigma: 0.5,
    };
}

/// One simulated instance.
#[derive(Debug, Clone)]
pub struct SimInstance {
    /// Identity sent to the aggregator.
    pub identity: pb::Identity,
    /// Traffic it produces.
    pub behavior: Behavior,
    /// How its requests move together, and its service's shared shocks.
    pub traffic: (Shape, ServiceShocks),
}

/// Metric names the simulation writes, the defaults the dashboard and canary read.
pub mod metrics {
    /// Counter of requests.
    pub const REQUESTS: &str = "request.count";
    /// Counter of failed requests.
    pub const ERRORS: &str = "request.errors";
    /// Histogram of request latency, milliseconds.
    pub const LATENCY: &str = "request.latency";
}

/// Generates one second of an instance's traffic into a window; `shock` is what its requests share this second.
pub fn simulate_second(
    window: &mut Window,
    behavior: &Behavior,
    shock: SecondShock,
    rng: &mut impl Rng,
) {
    let noise = Normal::new(0.0, behavior.rps.sqrt().max(1.0)).map_or(0.0, |n| n.sample(rng));
    let requests = (behavior.rps + noise).round().max(0.0) as u64;
    let error_ratio = (behavior.error_ratio * shock.errors).clamp(0.0, 1.0);
    let errors = Binomial::new(requests, error_ratio).map_or(0, |b| b.sample(rng));
    window.record_values(
        metrics::REQUESTS,
        &[],
        MetricType::Counter,
        std::iter::once(requests as f64),
        1.0,
    );
    window.record_values(
        metrics::ERRORS,
        &[],
        MetricType::Counter,
        std::iter::once(errors as f64),
        1.0,
    );
    let median = behavior.latency_median_ms * shock.latency;
    if let Ok(latency) = LogNormal::new(median.ln(), behavior.latency_sigma) {
        let samples: Vec<f64> = (0..requests).map(|_| latency.sample(rng)).collect();
        window.record_values(
            metrics::LATENCY,
            &[],
            MetricType::Timer,
            samples.into_iter(),
            1.0,
        );
    }
}

/// Runs an instance until `stop` turns true: at every second boundary it folds the second that just ended and
/// hands it to its shipper. Returns what the shipper reported.
pub async fn run_instance(
    instance: SimInstance,
    shipper: ShipperConfig,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) -> strobe_agent::ShipperReport {
    let (tx, rx) = mpsc::channel(16);
    // Its own clock (with the skew asked for), as a real agent has: configs cloned for a fleet would share one.
    let shipper = ShipperConfig {
        clock: shipper.clock.fresh(),
        ..shipper
    };
    let shipping = tokio::spawn(run_shipper(instance.identity.clone(), shipper, rx));
    let mut rng = SmallRng::seed_from_u64(seed);
    let (shape, service) = instance.traffic.clone();
    let mut shocks = InstanceShocks::new(shape, service, &mut rng);
    loop {
        let boundary = tokio::time::sleep(clock::until_next_second() + Duration::from_millis(1));
        tokio::select! {
            _ = boundary => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let second = clock::unix_second() - 1;
        let mut window = Window::new(second, WindowLimits::default());
        let shock = shocks.second(second, &mut rng);
        simulate_second(&mut window, &instance.behavior, shock, &mut rng);
        let (snapshot, _) = window.close();
        if tx.send(snapshot).await.is_err() {
            break;
        }
    }
    drop(tx);
    shipping.await.unwrap_or_default()
}

/// An identity for a simulated instance.
pub fn identity(service: &str, version: &str, zone: &str, instance: &str) -> pb::Identity {
    pb::Identity {
        service: service.to_owned(),
        version: version.to_owned(),
        zone: zone.to_owned(),
        instance: instance.to_owned(),
        labels: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_second_has_the_configured_shape() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut window = Window::new(1, WindowLimits::default());
        let behavior = Behavior {
            rps: 10_000.0,
            error_ratio: 0.1,
            latency_median_ms: 50.0,
            latency_sigma: 0.5,
        };
        simulate_second(&mut window, &behavior, SecondShock::NONE, &mut rng);
        let (snap, _) = window.close();
        let counter = |name: &str| match snap
            .series
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.value.clone())
        {
            Some(pb::series::Value::Counter(v)) => v,
            other => panic!("{name}: {other:?}"),
        };
        let requests = counter(metrics::REQUESTS);
        let errors = counter(metrics::ERRORS);
        assert!((requests - 10_000.0).abs() < 500.0, "{requests}");
        assert!((errors / requests - 0.1).abs() < 0.02, "{errors}");
    }
}
