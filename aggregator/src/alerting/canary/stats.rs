//! Statistics for the canary, safe to look at every second on traffic whose requests move together. Pure.
//!
//! **The unit.** Requests of one second (and one instance) share shocks: a slow dependency, a GC pause, a cache
//! miss storm. So the variance of a comparison is not the binomial one of independent requests: it is the sampling
//! variance *plus* the variance of per-second shocks, and shocks persist over tens of seconds (modelled as AR(1)).
//! [`NoiseModel`] holds a statistic's per-second shock variance and its persistence, fitted from the baseline's own
//! seconds before the candidate appeared and then fixed for the comparison.
//!
//! **The test.** Each check estimates a log ratio `theta` (candidate over baseline: error ratio, p50, p99) from
//! everything both sides reported since the comparison began, with variance `V` (sampling + shocks, see
//! [`shock_variance`]). The null is shifted to the floor: "the candidate is at most `factor` times worse"
//! (`theta <= ln factor`), so noise around "no difference" cannot convict. It is tested with the mixture sequential
//! probability ratio test of Robbins (1970) as used for A/B tests by Johari, Pekelis and Walsh ("Always valid
//! inference", 2017): with a normal mixing distribution of spread `tau` (fixed per check),
//!
//! ```text
//! L = sqrt(V / (V + tau^2)) * exp(tau^2 * (theta - theta0)^2 / (2 V (V + tau^2)))
//! ```
//!
//! and the candidate is convicted when `theta > theta0` and `L >= 1 / alpha`, `alpha` being split over the checks.
//! The same mixture gives an always-valid confidence bound: a candidate is `healthy` only once the upper bound of
//! every check is under its floor.

/// Fewest seconds a [`NoiseModel`] is fitted on, whatever `min_history` says.
pub(crate) const FEWEST_FIT_SECONDS: usize = 3;

/// The per-second shock structure of one statistic (a log error ratio or a log quantile) on one side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NoiseModel {
    /// Variance of the per-second shock of the side's statistic (log units squared), sampling noise removed.
    pub(crate) shock_variance: f64,
    /// AR(1) coefficient of the shocks from one second to the next (0 = fresh every second).
    pub(crate) persistence: f64,
    /// Mean instances of the side the model was fitted on (shocks of fewer instances average out less).
    pub(crate) instances: f64,
}

impl NoiseModel {
    /// What is assumed before a baseline has history: shocks as large and persistent as production shows them
    /// (a multiplier with sigma 0.3 lasting about 30 s), on one instance.
    pub(crate) const CAUTIOUS: NoiseModel = NoiseModel {
        shock_variance: 0.09,
        persistence: 0.967,
        instances: 1.0,
    };

    /// The same for a relative error rate: an error probability whose coefficient of variation is 1 (the upper
    /// end of what production shows), lasting about 30 s.
    pub(crate) const CAUTIOUS_ERRORS: NoiseModel = NoiseModel {
        shock_variance: 1.0,
        ..NoiseModel::CAUTIOUS
    };

    /// Fits the model to a side's per-second values of a statistic, each with its own sampling variance (`values`
    /// oldest first, consecutive seconds). `None` with fewer than `min_seconds` values.
    ///
    /// Shocks are looked for at three time scales: single seconds, and means over 10 and 30 seconds. A shock too
    /// small to see under one second's sampling noise can still dominate over minutes if it persists (an error
    /// probability that wanders on a side with a handful of errors a second); means over longer batches show it.
    /// At each scale, what the values vary beyond sampling counts only when it is clearly more than an estimate's
    /// own noise: three standard errors, for single seconds and for batches. A spurious shock fitted on independent
    /// traffic costs a comparison its power (it is assumed to persist); a real one missed costs false alarms, and
    /// batches are where persistent error shocks show at a few errors a second. Measured with the canary benchmark
    /// (1.75x error floor, 250 req/s): at four standard errors, persistent-shock A/A runs gave 5 false `bad` of 400;
    /// at three, 4; at two and a half, 2, but one independent-traffic regression in 40 then took 158 s instead of
    /// a few (a spurious shock).
    pub(crate) fn fit(values: &[(f64, f64)], instances: f64, min_seconds: usize) -> Option<Self> {
        if values.len() < min_seconds.max(FEWEST_FIT_SECONDS) {
            return None;
        }
        let n = values.len() as f64;
        let mean = values.iter().map(|(v, _)| v).sum::<f64>() / n;
        let lag1 = values
            .windows(2)
            .map(|w| (w[0].0 - mean) * (w[1].0 - mean))
            .sum::<f64>()
            / (n - 1.0);
        let per_second = excess_at_scale(values, 1, 3.0);
        // The lag-1 covariance is the shocks' alone (sampling noise is fresh every second): phi = cov / shock. Shocks
        // seen only over longer batches are persistent by that very fact: assume production's persistence.
        let persistence = match per_second {
            Some(shock) if shock > 0.0 => (lag1 / shock).clamp(0.0, 0.995),
            _ => NoiseModel::CAUTIOUS.persistence,
        };
        let mut shock = per_second.unwrap_or(0.0);
        for batch in [10, 30] {
            if let Some(excess) = excess_at_scale(values, batch, 3.0) {
                shock = shock.max(excess / ar1_mean_variance(batch as f64, persistence));
            }
        }
        Some(NoiseModel {
            shock_variance: shock,
            persistence: if shock > 0.0 { persistence } else { 0.0 },
            instances: instances.max(1.0),
        })
    }
}

/// Standard error of a variance estimated with `freedom` degrees of freedom from values whose sampling variance is
/// `sampling`: `sampling * sqrt(2 / freedom)` for normal values, plus the fourth cumulant of counts (a Poisson
/// count's relative rate has one of `sampling^3`), which dominates below about one event per value: error counts
/// of a few a minute look overdispersed by chance far more often than the normal formula says. Negligible for
/// quantile estimates, whose sampling variance is small.
fn variance_error(sampling: f64, freedom: f64) -> f64 {
    sampling * ((2.0 + sampling) / freedom).sqrt()
}

/// The means of consecutive `batch`-second runs of `values`, each with its sampling variance.
fn batch_means(values: &[(f64, f64)], batch: usize) -> Vec<(f64, f64)> {
    values
        .chunks_exact(batch.max(1))
        .map(|chunk| {
            let k = chunk.len() as f64;
            (
                chunk.iter().map(|(v, _)| v).sum::<f64>() / k,
                chunk.iter().map(|(_, s)| s).sum::<f64>() / (k * k),
            )
        })
        .collect()
}

/// How much more the means of consecutive `batch`-second runs of `values` vary than sampling makes them, if that is
/// more than `sigmas` standard errors of the variance estimate (and there are at least four batches): one series,
/// pooled with nothing.
fn excess_at_scale(values: &[(f64, f64)], batch: usize, sigmas: f64) -> Option<f64> {
    pooled(std::iter::once(values), batch, sigmas, 3)
        .filter(|p| p.excess > p.threshold)
        .map(|p| p.excess)
}

/// What the batches of several instances' own series show, pooled (see [`pooled_excess`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PooledExcess {
    /// Variance of the batch means beyond sampling.
    pub(crate) excess: f64,
    /// The excess that counts as a shock.
    pub(crate) threshold: f64,
}

/// How much each instance's `batch`-second means vary around that instance's own mean beyond sampling (`excess`),
/// and the excess that would count as a shock (`threshold`: `sigmas` standard errors of the pooled variance
/// estimate). Centring each instance on its own mean leaves out what sets instances apart for good (an offset, not
/// a shock). `None` with fewer than four degrees of freedom (an instance needs two batches to add any).
pub(crate) fn pooled_excess(
    instances: &[Vec<(f64, f64)>],
    batch: usize,
    sigmas: f64,
) -> Option<PooledExcess> {
    pooled(instances.iter().map(Vec::as_slice), batch, sigmas, 4)
}

/// The excess and its threshold over the batches of each series, each centred on its own mean; `None` with fewer
/// than `min_freedom` degrees of freedom.
fn pooled<'a>(
    series: impl IntoIterator<Item = &'a [(f64, f64)]>,
    batch: usize,
    sigmas: f64,
    min_freedom: usize,
) -> Option<PooledExcess> {
    let (mut squares, mut freedom, mut sampling) = (0.0, 0usize, 0.0);
    for values in series {
        let means = batch_means(values, batch);
        if means.len() < 2 {
            continue;
        }
        let m = means.len() as f64;
        let mean = means.iter().map(|(v, _)| v).sum::<f64>() / m;
        squares += means.iter().map(|(v, _)| (v - mean).powi(2)).sum::<f64>();
        // Centred on its own mean, a series' squares hold (m - 1) / m of its batches' sampling variance.
        sampling += (m - 1.0) / m * means.iter().map(|(_, s)| s).sum::<f64>();
        freedom += means.len() - 1;
    }
    if freedom < min_freedom.max(1) {
        return None;
    }
    let sampling = sampling / freedom as f64;
    Some(PooledExcess {
        excess: squares / freedom as f64 - sampling,
        threshold: sigmas * variance_error(sampling, freedom as f64),
    })
}

/// The lag-1 covariance of several instances' own series, each centred on its own mean, pooled.
pub(crate) fn pooled_lag1(instances: &[Vec<(f64, f64)>]) -> f64 {
    let (mut sum, mut pairs) = (0.0, 0usize);
    for values in instances.iter().filter(|v| v.len() >= 2) {
        let mean = values.iter().map(|(v, _)| v).sum::<f64>() / values.len() as f64;
        sum += values
            .windows(2)
            .map(|w| (w[0].0 - mean) * (w[1].0 - mean))
            .sum::<f64>();
        pairs += values.len() - 1;
    }
    if pairs == 0 { 0.0 } else { sum / pairs as f64 }
}

/// Variance of the mean of `n` consecutive values of a unit-variance AR(1) process with coefficient `phi`.
pub(crate) fn ar1_mean_variance(n: f64, phi: f64) -> f64 {
    if n <= 0.0 {
        return f64::INFINITY;
    }
    let phi = phi.clamp(0.0, 0.999);
    if phi == 0.0 {
        return 1.0 / n;
    }
    let long_run = (1.0 + phi) / (1.0 - phi);
    let edge = 2.0 * phi * (1.0 - phi.powf(n)) / ((1.0 - phi) * (1.0 - phi));
    ((n * long_run - edge) / (n * n)).clamp(1.0 / n, 1.0)
}

/// Variance that per-second shocks add to the mean over `seconds` of a statistic on a side of `instances`
/// instances, under `model`. Instance shocks average out over instances; assuming they all do would be optimistic
/// when shocks are service-wide, so fewer instances than the model was fitted on scale it up and more never down.
pub(crate) fn shock_variance(model: &NoiseModel, seconds: f64, instances: f64) -> f64 {
    let spread = (model.instances / instances.max(1.0)).max(1.0);
    model.shock_variance * spread * ar1_mean_variance(seconds, model.persistence)
}

/// Sampling variance of the log of a `q`-quantile estimated from `n` values whose log has spread `sigma` (normal
/// approximation: `q (1 - q) / (n * pdf(z_q)^2) * sigma^2`).
pub(crate) fn log_quantile_sampling_variance(q: f64, sigma: f64, n: f64) -> f64 {
    if n <= 0.0 {
        return f64::INFINITY;
    }
    let z = normal_quantile(q);
    let pdf = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
    q * (1.0 - q) / (n * pdf * pdf) * sigma * sigma
}

/// The standard normal quantile (Acklam's rational approximation, relative error under 1.2e-9).
pub(crate) fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// One check's estimate against its floor, with the mixture test and bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Test {
    /// The estimate (a log ratio, or a difference).
    pub(crate) estimate: f64,
    /// Its variance.
    pub(crate) variance: f64,
    /// The floor: the null is `estimate <= floor`.
    pub(crate) floor: f64,
    /// Spread of the normal mixing distribution (the effect sizes the test is tuned to).
    pub(crate) tau: f64,
}

impl Test {
    /// The mixture likelihood ratio against the floor (1 when there is no information yet).
    pub(crate) fn likelihood_ratio(&self) -> f64 {
        let (v, t2) = (self.variance, self.tau * self.tau);
        if !(v.is_finite() && v > 0.0 && t2 > 0.0 && self.estimate.is_finite()) {
            return 1.0;
        }
        let d = self.estimate - self.floor;
        let log_l = 0.5 * (v / (v + t2)).ln() + t2 * d * d / (2.0 * v * (v + t2));
        log_l.min(700.0).exp()
    }

    /// Whether the estimate is above the floor with always-valid confidence `1 - alpha`.
    pub(crate) fn rejects(&self, alpha: f64) -> bool {
        self.estimate > self.floor && self.likelihood_ratio() >= 1.0 / alpha
    }

    /// The always-valid upper confidence bound at level `1 - alpha`: the largest value the mixture test would not
    /// reject as a null. Infinite when there is no information.
    pub(crate) fn upper_bound(&self, alpha: f64) -> f64 {
        let (v, t2) = (self.variance, self.tau * self.tau);
        if !(v.is_finite() && v > 0.0 && t2 > 0.0 && self.estimate.is_finite()) {
            return f64::INFINITY;
        }
        let budget = (1.0 / alpha).ln() + 0.5 * ((v + t2) / v).ln();
        self.estimate + (2.0 * v * (v + t2) / t2 * budget).sqrt()
    }

    /// How many standard errors the estimate is above the floor (for people).
    pub(crate) fn z(&self) -> f64 {
        if self.variance > 0.0 && self.variance.is_finite() {
            (self.estimate - self.floor) / self.variance.sqrt()
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Normal};

    #[test]
    fn normal_quantiles_match_tables() {
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959_964),
            (0.99, 2.326_348),
            (0.01, -2.326_348),
        ] {
            assert!((normal_quantile(p) - z).abs() < 1e-5, "{p}");
        }
    }

    #[test]
    fn the_mean_of_an_ar1_process_varies_as_theory_says() {
        assert!((ar1_mean_variance(10.0, 0.0) - 0.1).abs() < 1e-12);
        assert!((ar1_mean_variance(1.0, 0.9) - 1.0).abs() < 1e-9);
        // Long runs: the long-run variance (1 + phi) / (1 - phi) over n.
        let long = ar1_mean_variance(100_000.0, 0.5);
        assert!((long * 100_000.0 - 3.0).abs() < 0.01, "{long}");
        // And by simulation, for a persistent process over a minute.
        let mut rng = SmallRng::seed_from_u64(7);
        let phi: f64 = 0.95;
        let fresh = Normal::new(0.0, (1.0 - phi * phi).sqrt()).unwrap();
        let means: Vec<f64> = (0..4000)
            .map(|_| {
                let mut z: f64 = rng.sample(rand_distr::StandardNormal);
                let mut sum = 0.0;
                for _ in 0..60 {
                    sum += z;
                    z = phi * z + fresh.sample(&mut rng);
                }
                sum / 60.0
            })
            .collect();
        let var = means.iter().map(|m| m * m).sum::<f64>() / means.len() as f64;
        let theory = ar1_mean_variance(60.0, phi);
        assert!((var / theory - 1.0).abs() < 0.1, "{var} vs {theory}");
    }

    #[test]
    fn sparse_independent_counts_are_not_taken_for_shocks() {
        // Ten minutes at 0.05 errors a second (10 req/s, 0.5% errors), nothing but Poisson noise: with the normal
        // formula for a variance's standard error, 38 of these 200 fits saw a shock.
        let lambda = 0.05;
        let counts = rand_distr::Poisson::new(lambda).unwrap();
        let spurious = (0..200u64)
            .filter(|seed| {
                let mut rng = SmallRng::seed_from_u64(*seed);
                let values: Vec<(f64, f64)> = (0..600)
                    .map(|_| {
                        let n: f64 = counts.sample(&mut rng);
                        (n / lambda, 1.0 / lambda)
                    })
                    .collect();
                NoiseModel::fit(&values, 4.0, 120).is_some_and(|m| m.shock_variance > 0.0)
            })
            .count();
        assert!(
            spurious <= 6,
            "{spurious} of 200 fits saw shocks in pure noise"
        );
    }

    #[test]
    fn a_fitted_model_recovers_shock_size_and_persistence() {
        let mut rng = SmallRng::seed_from_u64(11);
        let (phi, sigma, sampling): (f64, f64, f64) = (0.9, 0.2, 0.01);
        let fresh = Normal::new(0.0, sigma * (1.0 - phi * phi).sqrt()).unwrap();
        let noise = Normal::new(0.0, sampling.sqrt()).unwrap();
        let mut z: f64 = 0.0;
        let values: Vec<(f64, f64)> = (0..20_000)
            .map(|_| {
                z = phi * z + fresh.sample(&mut rng);
                (z + noise.sample(&mut rng), sampling)
            })
            .collect();
        let model = NoiseModel::fit(&values, 4.0, 60).unwrap();
        assert!(
            (model.shock_variance / (sigma * sigma) - 1.0).abs() < 0.15,
            "{model:?}"
        );
        assert!((model.persistence - phi).abs() < 0.03, "{model:?}");
        assert!(NoiseModel::fit(&values[..10], 4.0, 60).is_none());
    }

    #[test]
    fn the_test_rejects_only_above_the_floor_and_its_bound_covers() {
        let clear = Test {
            estimate: 1.0,
            variance: 0.01,
            floor: 0.3,
            tau: 0.7,
        };
        assert!(clear.rejects(0.001));
        let at_floor = Test {
            estimate: 0.3,
            ..clear
        };
        assert!(!at_floor.rejects(0.001));
        let below = Test {
            estimate: -1.0,
            ..clear
        };
        assert!(!below.rejects(0.001));
        assert!(below.upper_bound(0.001) < 0.3);
        let no_data = Test {
            variance: f64::INFINITY,
            ..clear
        };
        assert_eq!(no_data.likelihood_ratio(), 1.0);
        assert_eq!(no_data.upper_bound(0.001), f64::INFINITY);
        // The bound and the test agree: a null at the bound is just not rejected.
        let bound = clear.upper_bound(0.001);
        let at_bound = Test {
            floor: bound,
            estimate: clear.estimate,
            ..clear
        };
        assert!((at_bound.likelihood_ratio() - 1000.0).abs() / 1000.0 < 1e-6);
    }

    /// Under the null at the floor, a Gaussian statistic accumulated and looked at every second for an hour raises
    /// a false alarm in at most about `alpha` of the trials.
    #[test]
    fn looking_every_second_keeps_the_level() {
        let mut rng = SmallRng::seed_from_u64(42);
        let alpha = 0.01;
        let trials = 1000;
        let mut alarms = 0;
        for _ in 0..trials {
            let mut sum = 0.0;
            for n in 1..=3600 {
                sum += rng.sample::<f64, _>(rand_distr::StandardNormal) * 0.5;
                let n = f64::from(n);
                let test = Test {
                    estimate: 0.2 + sum / n,
                    variance: 0.25 / n,
                    floor: 0.2,
                    tau: 0.7,
                };
                if test.rejects(alpha) {
                    alarms += 1;
                    break;
                }
            }
        }
        assert!(alarms <= 15, "{alarms} false alarms in {trials} trials");
    }

    /// The level under persistent shocks, which are not the Brownian motion the mixture is built on: the true
    /// ratio sits at the floor, the per-second values carry AR(1) shocks (30 s) and sampling noise, the variance is
    /// the model's, and the test looks every second for 30 minutes.
    #[test]
    fn looking_every_second_keeps_the_level_under_persistent_shocks() {
        let mut rng = SmallRng::seed_from_u64(43);
        let (alpha, trials, seconds) = (0.01, 1000, 1800);
        let phi = (-1.0f64 / 30.0).exp();
        let (shock, sampling): (f64, f64) = (0.04, 0.01);
        let fresh = Normal::new(0.0, (shock * (1.0 - phi * phi)).sqrt()).unwrap();
        let noise = Normal::new(0.0, sampling.sqrt()).unwrap();
        let mut alarms = 0;
        for _ in 0..trials {
            let mut z: f64 = rng.sample::<f64, _>(rand_distr::StandardNormal) * shock.sqrt();
            let mut sum = 0.0;
            for n in 1..=seconds {
                sum += z + noise.sample(&mut rng);
                z = phi * z + fresh.sample(&mut rng);
                let n = f64::from(n);
                let model = NoiseModel {
                    shock_variance: shock,
                    persistence: phi,
                    instances: 1.0,
                };
                let test = Test {
                    estimate: 0.2 + sum / n,
                    variance: sampling / n + shock_variance(&model, n, 1.0),
                    floor: 0.2,
                    tau: 0.5,
                };
                if test.rejects(alpha) {
                    alarms += 1;
                    break;
                }
            }
        }
        assert!(alarms <= 15, "{alarms} false alarms in {trials} trials");
    }
}
