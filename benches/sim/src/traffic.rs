//! Production-shaped traffic within a second (the team's LOAD.md): the requests of one instance-second share a shock,
//! a latency multiplier and an error probability drawn around the mean; shocks persist over seconds (AR(1)); part
//! of them is service-wide (a shared dependency slows every instance and version alike); each instance has a small
//! fixed offset of its own. Every simulator, the load generator and the canary benchmark draw from these shapes and
//! name the one they ran.

use std::sync::{Arc, Mutex, PoisonError};

use rand::Rng;
use rand_distr::StandardNormal;

/// How the requests of one instance-second move together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Its name in flags and reports.
    pub name: &'static str,
    /// Sigma of the per-second latency multiplier (lognormal; 0: none).
    pub latency_sigma: f64,
    /// Coefficient of variation of the per-second error probability around its mean (lognormal, so that it can
    /// persist; 0: none).
    pub error_cv: f64,
    /// Time constant of the shocks' AR(1) persistence, in seconds (0: a fresh shock every second).
    pub persistence_secs: f64,
    /// Share of the shocks' variance that is service-wide.
    pub shared: f64,
    /// Sigma of each instance's fixed latency offset (lognormal).
    pub instance_sigma: f64,
}

impl Shape {
    /// Every request independent: what simulators usually generate, and what production is not.
    pub const INDEPENDENT: Shape = Shape {
        name: "independent",
        latency_sigma: 0.0,
        error_cv: 0.0,
        persistence_secs: 0.0,
        shared: 0.0,
        instance_sigma: 0.0,
    };
    /// Latency shocks alone, small: a multiplier with sigma 0.1, fresh every second.
    pub const LATENCY_SHOCKS: Shape = Shape {
        name: "latency-shocks",
        latency_sigma: 0.1,
        ..Shape::INDEPENDENT
    };
    /// Per-second shocks: latency multiplier sigma 0.2, error probability CV 0.5, fresh every second.
    pub const SHOCKED: Shape = Shape {
        name: "shocked",
        latency_sigma: 0.2,
        error_cv: 0.5,
        ..Shape::INDEPENDENT
    };
    /// The shocks of `SHOCKED`, lasting about 30 s (AR(1)), with instances 5% apart.
    pub const PERSISTENT: Shape = Shape {
        name: "persistent",
        persistence_secs: 30.0,
        instance_sigma: 0.05,
        ..Shape::SHOCKED
    };
    /// `PERSISTENT` with half of the shocks service-wide.
    pub const SHARED: Shape = Shape {
        name: "shared",
        shared: 0.5,
        ..Shape::PERSISTENT
    };

    /// Every named shape.
    pub const ALL: [Shape; 5] = [
        Shape::INDEPENDENT,
        Shape::LATENCY_SHOCKS,
        Shape::SHOCKED,
        Shape::PERSISTENT,
        Shape::SHARED,
    ];

    /// The shape called `name`.
    pub fn named(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name == name)
    }

    /// AR(1) coefficient from one second to the next.
    fn phi(&self) -> f64 {
        if self.persistence_secs > 0.0 {
            (-1.0 / self.persistence_secs).exp()
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (latency shock sigma {}, error CV {}, persistence {} s, service-wide {}, instance sigma {})",
            self.name,
            self.latency_sigma,
            self.error_cv,
            self.persistence_secs,
            self.shared,
            self.instance_sigma
        )
    }
}

/// What one instance-second's requests share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecondShock {
    /// Multiplies every latency of the second.
    pub latency: f64,
    /// Multiplies the error probability of the second (mean 1).
    pub errors: f64,
}

impl SecondShock {
    /// No shock.
    pub const NONE: SecondShock = SecondShock {
        latency: 1.0,
        errors: 1.0,
    };
}

/// A pair of unit-variance AR(1) processes (latency, errors).
#[derive(Debug, Clone, Copy, Default)]
struct Ar1 {
    latency: f64,
    errors: f64,
}

impl Ar1 {
    fn start(rng: &mut impl Rng) -> Self {
        Ar1 {
            latency: rng.sample(StandardNormal),
            errors: rng.sample(StandardNormal),
        }
    }

    fn step(&mut self, phi: f64, rng: &mut impl Rng) {
        let fresh = (1.0 - phi * phi).sqrt();
        self.latency = phi * self.latency + fresh * rng.sample::<f64, _>(StandardNormal);
        self.errors = phi * self.errors + fresh * rng.sample::<f64, _>(StandardNormal);
    }
}

/// A service's shared shock process: stepped once per second, read by all its instances.
#[derive(Debug, Clone)]
pub struct ServiceShocks(Arc<Mutex<(i64, Ar1, rand::rngs::SmallRng)>>);

impl ServiceShocks {
    /// A process seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let state = Ar1::start(&mut rng);
        Self(Arc::new(Mutex::new((i64::MIN, state, rng))))
    }

    /// The shared state at second `t` (stepped forward as needed; at most a minute's steps at once).
    fn at(&self, t: i64, phi: f64) -> Ar1 {
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, state, rng) = &mut *guard;
        if *last == i64::MIN {
            *last = t;
        }
        let steps = (t - *last).clamp(0, 60);
        for _ in 0..steps {
            state.step(phi, rng);
        }
        *last = (*last).max(t);
        *state
    }
}

/// One instance's shocks.
#[derive(Debug, Clone)]
pub struct InstanceShocks {
    shape: Shape,
    own: Ar1,
    offset: f64,
    service: ServiceShocks,
}

impl InstanceShocks {
    /// An instance of the service whose shared process is `service`.
    pub fn new(shape: Shape, service: ServiceShocks, rng: &mut impl Rng) -> Self {
        Self {
            shape,
            own: Ar1::start(rng),
            offset: shape.instance_sigma * rng.sample::<f64, _>(StandardNormal),
            service,
        }
    }

    /// The shock of second `t` (call once per second, in order).
    pub fn second(&mut self, t: i64, rng: &mut impl Rng) -> SecondShock {
        let shape = self.shape;
        if shape.latency_sigma == 0.0 && shape.error_cv == 0.0 && shape.instance_sigma == 0.0 {
            return SecondShock::NONE;
        }
        let phi = shape.phi();
        self.own.step(phi, rng);
        let shared = if shape.shared > 0.0 {
            self.service.at(t, phi)
        } else {
            Ar1::default()
        };
        let (w_own, w_shared) = ((1.0 - shape.shared).sqrt(), shape.shared.sqrt());
        let z_latency = w_own * self.own.latency + w_shared * shared.latency;
        let z_errors = w_own * self.own.errors + w_shared * shared.errors;
        // A lognormal multiplier with mean 1 and the shape's coefficient of variation.
        let s = (1.0 + shape.error_cv * shape.error_cv).ln().sqrt();
        SecondShock {
            latency: (shape.latency_sigma * z_latency + self.offset).exp(),
            errors: (s * z_errors - s * s / 2.0).exp(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn log_latencies(shape: Shape, seconds: i64, seed: u64) -> Vec<f64> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut shocks = InstanceShocks::new(shape, ServiceShocks::new(seed), &mut rng);
        (0..seconds)
            .map(|t| shocks.second(t, &mut rng).latency.ln())
            .collect()
    }

    #[test]
    fn shapes_have_the_spread_and_persistence_they_name() {
        let values = log_latencies(Shape::PERSISTENT, 50_000, 1);
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        assert!((var.sqrt() - 0.2).abs() < 0.03, "sigma {}", var.sqrt());
        let lag1 = values
            .windows(2)
            .map(|w| (w[0] - mean) * (w[1] - mean))
            .sum::<f64>()
            / n
            / var;
        assert!((lag1 - (-1.0f64 / 30.0).exp()).abs() < 0.03, "lag1 {lag1}");
        let fresh = log_latencies(Shape::SHOCKED, 50_000, 2);
        let lag1: f64 = fresh.windows(2).map(|w| w[0] * w[1]).sum::<f64>() / 50_000.0 / 0.04;
        assert!(lag1.abs() < 0.05, "lag1 {lag1}");
        assert!(
            log_latencies(Shape::INDEPENDENT, 10, 3)
                .iter()
                .all(|v| *v == 0.0)
        );
    }

    #[test]
    fn shared_shocks_move_instances_of_a_service_together() {
        let mut rng = SmallRng::seed_from_u64(4);
        let service = ServiceShocks::new(9);
        let mut a = InstanceShocks::new(Shape::SHARED, service.clone(), &mut rng);
        let mut b = InstanceShocks::new(Shape::SHARED, service, &mut rng);
        let pairs: Vec<(f64, f64)> = (0..20_000)
            .map(|t| {
                (
                    a.second(t, &mut rng).latency.ln(),
                    b.second(t, &mut rng).latency.ln(),
                )
            })
            .collect();
        let n = pairs.len() as f64;
        let (ma, mb) = (
            pairs.iter().map(|p| p.0).sum::<f64>() / n,
            pairs.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let cov = pairs.iter().map(|(x, y)| (x - ma) * (y - mb)).sum::<f64>() / n;
        let var = pairs.iter().map(|(x, _)| (x - ma).powi(2)).sum::<f64>() / n;
        assert!((cov / var - 0.5).abs() < 0.15, "correlation {}", cov / var);
        assert_eq!(Shape::named("shared"), Some(Shape::SHARED));
        assert_eq!(Shape::named("nope"), None);
    }
}
