//! Statistics for the canary, safe to look at every second. Pure.
//!
//! Proportions (error ratio, or the share of requests slower than a baseline quantile) are compared with a mixture
//! sequential probability ratio test (mSPRT, as in Johari et al., "Always valid inference"): with the difference
//! of two proportions `d` estimated as `d_hat` with variance `V`, and a normal mixing distribution of standard
//! deviation `tau` over the alternative, the likelihood ratio is
//!
//! ```text
//! L = sqrt(V / (V + tau^2)) * exp(tau^2 * d_hat^2 / (2 V (V + tau^2)))
//! ```
//!
//! and rejecting the null (no difference) when `L >= 1 / alpha` keeps the false-alarm probability under `alpha`
//! however often one looks. Only the one-sided alternative (candidate worse) is acted on.

use hdrhistogram::Histogram;

/// The result of comparing two proportions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Comparison {
    /// Candidate proportion.
    pub(crate) candidate: f64,
    /// Baseline proportion.
    pub(crate) baseline: f64,
    /// The classical z statistic of the difference (for people; the decision uses `likelihood_ratio`).
    pub(crate) z: f64,
    /// The mSPRT likelihood ratio.
    pub(crate) likelihood_ratio: f64,
}

impl Comparison {
    /// Whether the candidate is worse with always-valid confidence `1 - alpha`.
    pub(crate) fn candidate_worse(&self, alpha: f64) -> bool {
        self.candidate > self.baseline && self.likelihood_ratio >= 1.0 / alpha
    }
}

/// Compares `x_c / n_c` with `x_b / n_b`; `tau` is the spread of differences the test is tuned to detect.
pub(crate) fn compare_proportions(
    x_c: f64,
    n_c: f64,
    x_b: f64,
    n_b: f64,
    tau: f64,
) -> Option<Comparison> {
    if n_c <= 0.0 || n_b <= 0.0 || tau.is_nan() || tau <= 0.0 {
        return None;
    }
    let p_c = (x_c / n_c).clamp(0.0, 1.0);
    let p_b = (x_b / n_b).clamp(0.0, 1.0);
    // Pooled variance keeps V > 0 when one side has no events; a half-event floor keeps it > 0 when neither has.
    let pooled = ((x_c + x_b) / (n_c + n_b)).clamp(0.5 / (n_c + n_b), 1.0 - 0.5 / (n_c + n_b));
    let v = pooled * (1.0 - pooled) * (1.0 / n_c + 1.0 / n_b);
    let d = p_c - p_b;
    let t2 = tau * tau;
    let log_l = 0.5 * (v / (v + t2)).ln() + t2 * d * d / (2.0 * v * (v + t2));
    Some(Comparison {
        candidate: p_c,
        baseline: p_b,
        z: d / v.sqrt(),
        likelihood_ratio: log_l.min(700.0).exp(),
    })
}

/// How many recorded values are in buckets above the one holding `threshold` (in recorded units).
pub(crate) fn count_above(hist: &Histogram<u64>, threshold: u64) -> u64 {
    let top = hist.highest_equivalent(threshold);
    hist.iter_recorded()
        .filter(|v| v.value_iterated_to() > top)
        .map(|v| v.count_at_value())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn known_answers() {
        // (x_c, n_c, x_b, n_b, tau, expected z, worse at alpha 0.001)
        let table = [
            (10.0, 1000.0, 10.0, 1000.0, 0.01, 0.0, false),
            (50.0, 1000.0, 10.0, 1000.0, 0.02, 5.24, true),
            (5.0, 100.0, 1.0, 100.0, 0.02, 1.65, false),
            (0.0, 1000.0, 0.0, 1000.0, 0.01, 0.0, false),
            (10.0, 1000.0, 50.0, 1000.0, 0.02, -5.24, false),
        ];
        for (x_c, n_c, x_b, n_b, tau, z, worse) in table {
            let c = compare_proportions(x_c, n_c, x_b, n_b, tau).unwrap();
            assert!(
                (c.z - z).abs() < 0.05,
                "{x_c}/{n_c} vs {x_b}/{n_b}: z {}",
                c.z
            );
            assert_eq!(
                c.candidate_worse(0.001),
                worse,
                "{x_c}/{n_c} vs {x_b}/{n_b}: {c:?}"
            );
        }
        assert!(compare_proportions(1.0, 0.0, 1.0, 10.0, 0.01).is_none());
    }

    #[test]
    fn counts_above_a_threshold() {
        let mut h = Histogram::<u64>::new(2).unwrap();
        for v in 1..=100u64 {
            h.record(v * 1000).unwrap();
        }
        assert_eq!(count_above(&h, 90_000), 10);
        assert_eq!(count_above(&h, 0), 100);
        assert_eq!(count_above(&h, 1_000_000), 0);
    }

    /// Under the null (identical rates), looking every second for ten minutes raises a false alarm in at most about
    /// `alpha` of the trials: the whole point of an always-valid test.
    #[test]
    fn false_alarm_rate_under_the_null_when_looking_every_second() {
        let mut rng = SmallRng::seed_from_u64(42);
        let alpha = 0.01;
        let trials = 400;
        let mut alarms = 0;
        for _ in 0..trials {
            let (mut x_c, mut n_c, mut x_b, mut n_b) = (0.0, 0.0, 0.0, 0.0);
            for _second in 0..600 {
                for _ in 0..50 {
                    n_c += 1.0;
                    x_c += f64::from(u8::from(rng.random::<f64>() < 0.02));
                }
                for _ in 0..150 {
                    n_b += 1.0;
                    x_b += f64::from(u8::from(rng.random::<f64>() < 0.02));
                }
                let c = compare_proportions(x_c, n_c, x_b, n_b, 0.02).unwrap();
                if c.candidate_worse(alpha) {
                    alarms += 1;
                    break;
                }
            }
        }
        // alpha * trials = 4; a fixed-z test at 1.96 looked at 600 times would alarm in most trials.
        assert!(alarms <= 8, "{alarms} false alarms in {trials} trials");
    }
}
