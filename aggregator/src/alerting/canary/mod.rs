//! Automatic canary analysis: whenever a service reports more than one version, the newest (the candidate) is
//! compared every second with the version it replaces (the baseline: most instance-seconds so far), on error ratio
//! and on p50 and p99 latency, with tests that stay valid when looked at every second. No rule needs writing.
//! Pure: the pipeline feeds it each sealed second's per-version numbers ([`inputs`]); [`alert`] words what a
//! verdict change means for people.

pub(crate) mod alert;
pub(crate) mod inputs;
pub(crate) mod stats;
pub(crate) mod verdict;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

pub(crate) use inputs::VersionSecond;
use stats::{compare_proportions, count_above};
pub(crate) use verdict::{Evidence, Verdict, VerdictState};

/// Thresholds of the canary analysis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanarySettings {
    /// Whether to run it at all.
    pub enabled: bool,
    /// False-alarm probability per deployment and check, however often it looks.
    pub alpha: f64,
    /// Requests each side needs before the error ratio is judged.
    pub min_requests: u64,
    /// Latency samples each side needs before latency is judged.
    pub min_latency_samples: u64,
    /// The candidate's error ratio must be at least this many times the baseline's to be bad...
    pub min_error_ratio_factor: f64,
    /// ...and at least this much higher in absolute terms (0.005 = half a percentage point).
    pub min_error_ratio_increase: f64,
    /// The candidate's p50 must be at least this many times the baseline's to be bad.
    pub min_p50_factor: f64,
    /// The candidate's p99 must be at least this many times the baseline's to be bad.
    pub min_p99_factor: f64,
    /// Once this much data is there, only the newest window counts.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// A version gone this long ends the comparison (promoted or rolled back).
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
}

impl Default for CanarySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            alpha: 0.001,
            min_requests: 100,
            min_latency_samples: 100,
            min_error_ratio_factor: 2.0,
            min_error_ratio_increase: 0.005,
            min_p50_factor: 1.25,
            min_p99_factor: 1.3,
            window: Duration::from_secs(120),
            settle: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Default)]
struct VersionTrack {
    first_seen: i64,
    last_seen: i64,
    instance_seconds: u64,
}

#[derive(Debug)]
struct Side {
    requests: f64,
    errors: f64,
    latency: Option<Histogram<u64>>,
    scale: u32,
}

impl Side {
    fn new() -> Self {
        Self {
            requests: 0.0,
            errors: 0.0,
            latency: None,
            scale: 1,
        }
    }

    /// Adds a second. Returns false when its histogram could not be added (the sum no longer matches the window).
    #[must_use]
    fn add(&mut self, second: &VersionSecond) -> bool {
        self.requests += second.requests;
        self.errors += second.errors;
        let Some((h, scale)) = &second.latency else {
            return true;
        };
        self.scale = *scale;
        match &mut self.latency {
            Some(sum) => sum.add(h).is_ok(),
            None => {
                let mut sum = h.clone();
                sum.auto(true);
                self.latency = Some(sum);
                true
            }
        }
    }

    /// Subtracts a second added before. Returns false when its histogram could not be subtracted.
    #[must_use]
    fn subtract(&mut self, second: &VersionSecond) -> bool {
        self.requests -= second.requests;
        self.errors -= second.errors;
        match (&mut self.latency, &second.latency) {
            (Some(sum), Some((h, _))) => sum.subtract(h).is_ok(),
            _ => true,
        }
    }

    /// The sum of `seconds`, built afresh: the way back to a consistent side after an add or subtract failed.
    fn rebuilt<'a>(seconds: impl Iterator<Item = &'a VersionSecond>) -> Self {
        let mut side = Side::new();
        for second in seconds {
            if !side.add(second) {
                // A histogram that cannot join a fresh auto-resizing sum is left out of the latency check.
                tracing::warn!(message = "Canary left a latency histogram out of its sum.");
            }
        }
        side
    }
}

impl Deployment {
    /// Rebuilds both sides from the window when incremental updates failed.
    fn repair(&mut self, consistent: bool) {
        if consistent {
            return;
        }
        tracing::debug!(message = "Canary sums rebuilt from the window.", candidate = %self.candidate);
        self.candidate_side = Side::rebuilt(self.window.iter().map(|(_, c, _)| c));
        self.baseline_side = Side::rebuilt(self.window.iter().map(|(_, _, b)| b));
    }
}

#[derive(Debug)]
struct Deployment {
    candidate: Arc<str>,
    baseline: Arc<str>,
    window: VecDeque<(i64, VersionSecond, VersionSecond)>,
    candidate_side: Side,
    baseline_side: Side,
    verdict: Verdict,
}

/// One service's canary state, owned by its shard.
#[derive(Debug, Default)]
pub(crate) struct Canary {
    versions: BTreeMap<Arc<str>, VersionTrack>,
    deployment: Option<Deployment>,
}

impl Canary {
    #[cfg(test)]
    /// The current verdict, if a comparison is running.
    pub(crate) fn verdict(&self) -> Option<&Verdict> {
        self.deployment.as_ref().map(|d| &d.verdict)
    }

    /// The service stopped reporting altogether. A candidate convicted as bad counts as rolled back (nothing of it
    /// serves any more), so its alert resolves; any other comparison just ends. No second is judged.
    pub(crate) fn on_service_gone(&mut self, t: i64) -> Option<Verdict> {
        self.versions.clear();
        let deployment = self.deployment.take()?;
        (deployment.verdict.state == VerdictState::Bad).then_some(Verdict {
            state: VerdictState::RolledBack,
            t,
            ..deployment.verdict
        })
    }

    /// Late snapshots changed an already observed second: its numbers replace what the comparison counted for it.
    /// The next sealed second is judged with them.
    pub(crate) fn correct(&mut self, t: i64, mut seconds: BTreeMap<Arc<str>, VersionSecond>) {
        let Some(d) = &mut self.deployment else {
            return;
        };
        let Some((_, c, b)) = d.window.iter_mut().find(|(second, _, _)| *second == t) else {
            return;
        };
        let new_c = seconds.remove(&d.candidate).unwrap_or_default();
        let new_b = seconds.remove(&d.baseline).unwrap_or_default();
        let consistent = d.candidate_side.subtract(c)
            & d.candidate_side.add(&new_c)
            & d.baseline_side.subtract(b)
            & d.baseline_side.add(&new_b);
        *c = new_c;
        *b = new_b;
        d.repair(consistent);
    }

    /// Feeds one sealed second; returns the verdicts that changed (a finished deployment's last one first).
    pub(crate) fn observe(
        &mut self,
        service: &Arc<str>,
        t: i64,
        mut seconds: BTreeMap<Arc<str>, VersionSecond>,
        settings: &CanarySettings,
    ) -> Vec<Verdict> {
        let mut changes = Vec::new();
        for (version, second) in &seconds {
            if second.instances == 0 {
                continue;
            }
            let track = self
                .versions
                .entry(version.clone())
                .or_insert(VersionTrack {
                    first_seen: t,
                    ..VersionTrack::default()
                });
            track.last_seen = t;
            track.instance_seconds += u64::from(second.instances);
        }
        let settle = i64::try_from(settings.settle.as_secs()).unwrap_or(i64::MAX);
        self.versions
            .retain(|_, v| t - v.last_seen <= settle.max(1) * 6);
        let present: Vec<(&Arc<str>, &VersionTrack)> = self
            .versions
            .iter()
            .filter(|(_, v)| t - v.last_seen < settle.max(1))
            .collect();

        // Who is compared with whom: the newest version against the biggest of the others.
        let pair = if present.len() >= 2 {
            let candidate = present
                .iter()
                .max_by_key(|(v, track)| (track.first_seen, (*v).clone()))
                .map(|(v, _)| (*v).clone());
            let baseline = present
                .iter()
                .filter(|(v, _)| Some(*v) != candidate.as_ref())
                .max_by_key(|(v, track)| (track.instance_seconds, (*v).clone()))
                .map(|(v, _)| (*v).clone());
            candidate.zip(baseline)
        } else {
            None
        };

        // End a deployment whose pair changed or vanished.
        if let Some(d) = &self.deployment {
            let same = pair
                .as_ref()
                .is_some_and(|(c, b)| *c == d.candidate && *b == d.baseline);
            if !same {
                let Some(mut ended) = self.deployment.take().map(|d| d.verdict) else {
                    return changes;
                };
                let candidate_here = present.iter().any(|(v, _)| **v == ended.candidate);
                let baseline_here = present.iter().any(|(v, _)| **v == ended.baseline);
                ended.state = match (candidate_here, baseline_here) {
                    (true, false) => VerdictState::Promoted,
                    (false, true) => VerdictState::RolledBack,
                    // Replaced by a newer candidate, or everything went: the comparison simply ends.
                    _ if ended.state == VerdictState::Bad => VerdictState::RolledBack,
                    _ => ended.state,
                };
                ended.t = t;
                changes.push(ended);
            }
        }
        let Some((candidate, baseline)) = pair else {
            return changes;
        };
        let deployer = seconds.get(&candidate).and_then(|s| s.deployer.clone());
        let since = self.versions.get(&candidate).map_or(t, |v| v.first_seen);
        let deployment = self.deployment.get_or_insert_with(|| Deployment {
            candidate: candidate.clone(),
            baseline: baseline.clone(),
            window: VecDeque::new(),
            candidate_side: Side::new(),
            baseline_side: Side::new(),
            verdict: Verdict {
                service: service.clone(),
                candidate: candidate.clone(),
                baseline: baseline.clone(),
                state: VerdictState::Collecting,
                since,
                t,
                reason: None,
                checks: Vec::new(),
                deployer: deployer.clone(),
            },
        });
        let c = seconds.remove(&candidate).unwrap_or_default();
        let b = seconds.remove(&baseline).unwrap_or_default();
        let mut consistent = deployment.candidate_side.add(&c) & deployment.baseline_side.add(&b);
        deployment.window.push_back((t, c, b));
        let window = i64::try_from(settings.window.as_secs()).unwrap_or(i64::MAX);
        while deployment
            .window
            .front()
            .is_some_and(|(old, _, _)| *old <= t - window)
        {
            if let Some((_, c, b)) = deployment.window.pop_front() {
                consistent &=
                    deployment.candidate_side.subtract(&c) & deployment.baseline_side.subtract(&b);
            }
        }
        deployment.repair(consistent);
        let checks = judge(
            &deployment.candidate_side,
            &deployment.baseline_side,
            settings,
        );
        let before = deployment.verdict.state;
        let verdict = &mut deployment.verdict;
        verdict.t = t;
        verdict.deployer = verdict.deployer.clone().or(deployer);
        if verdict.state != VerdictState::Bad {
            if let Some(reason) = checks.iter().find(|e| e.bad) {
                verdict.state = VerdictState::Bad;
                verdict.reason = Some(reason.clone());
            } else if !checks.is_empty() {
                verdict.state = VerdictState::Healthy;
            }
        }
        verdict.checks = checks;
        if verdict.state != before {
            changes.push(verdict.clone());
        }
        changes
    }
}

/// Runs every check that has enough data.
fn judge(candidate: &Side, baseline: &Side, s: &CanarySettings) -> Vec<Evidence> {
    let mut checks = Vec::new();
    let min_requests = s.min_requests as f64;
    if candidate.requests >= min_requests && baseline.requests >= min_requests {
        let p_b = baseline.errors / baseline.requests;
        let tau = (2.0 * p_b).max(s.min_error_ratio_increase).max(0.005);
        if let Some(c) = compare_proportions(
            candidate.errors,
            candidate.requests,
            baseline.errors,
            baseline.requests,
            tau,
        ) {
            let big_enough = c.candidate >= c.baseline * s.min_error_ratio_factor
                && c.candidate - c.baseline >= s.min_error_ratio_increase;
            checks.push(Evidence {
                metric: "error_ratio",
                candidate: c.candidate,
                baseline: c.baseline,
                z: c.z,
                likelihood_ratio: c.likelihood_ratio,
                candidate_samples: candidate.requests.round() as u64,
                baseline_samples: baseline.requests.round() as u64,
                bad: big_enough && c.candidate_worse(s.alpha),
            });
        }
    }
    if let (Some(hc), Some(hb)) = (&candidate.latency, &baseline.latency)
        && hc.len() >= s.min_latency_samples
        && hb.len() >= s.min_latency_samples
    {
        let scale = f64::from(baseline.scale.max(1));
        for (metric, q, factor) in [
            ("p50", 0.5, s.min_p50_factor),
            ("p99", 0.99, s.min_p99_factor),
        ] {
            // Share of each side slower than the baseline's quantile: about 1 - q for the baseline; a candidate
            // whose quantile is higher has a larger share. A quantile test on the bucket counts, no resampling.
            let threshold = hb.value_at_quantile(q);
            let (n_c, n_b) = (hc.len() as f64, hb.len() as f64);
            let x_c = count_above(hc, threshold) as f64;
            let x_b = count_above(hb, threshold) as f64;
            let tau = (1.0 - q).clamp(0.01, 0.2);
            let Some(c) = compare_proportions(x_c, n_c, x_b, n_b, tau) else {
                continue;
            };
            let cand_q = hc.value_at_quantile(q) as f64 / scale;
            let base_q = threshold as f64 / scale;
            checks.push(Evidence {
                metric,
                candidate: cand_q,
                baseline: base_q,
                z: c.z,
                likelihood_ratio: c.likelihood_ratio,
                candidate_samples: hc.len(),
                baseline_samples: hb.len(),
                bad: cand_q >= base_q * factor && c.candidate_worse(s.alpha),
            });
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use rand_distr::{Binomial, Distribution, LogNormal};

    fn latency_second(values: &[u64]) -> VersionSecond {
        let mut h = Histogram::<u64>::new(2).unwrap();
        for v in values {
            h.record(*v).unwrap();
        }
        VersionSecond {
            instances: 1,
            requests: values.len() as f64,
            errors: 0.0,
            latency: Some((h, 1000)),
            deployer: None,
        }
    }

    #[test]
    fn a_side_that_cannot_subtract_says_so_and_is_rebuilt_from_its_seconds() {
        let small = latency_second(&[1_000]);
        let big = latency_second(&[1_000, 2_000, 3_000]);
        let mut side = Side::new();
        assert!(side.add(&small));
        assert!(
            !side.subtract(&big),
            "more counts out than in must be refused"
        );
        let rebuilt = Side::rebuilt([&small, &big].into_iter());
        assert_eq!(rebuilt.requests, 4.0);
        assert_eq!(rebuilt.latency.as_ref().map(Histogram::len), Some(4));
    }

    struct Traffic {
        rps: u64,
        error_ratio: f64,
        median_ms: f64,
        sigma: f64,
    }

    const BASE: Traffic = Traffic {
        rps: 400,
        error_ratio: 0.01,
        median_ms: 20.0,
        sigma: 0.5,
    };

    fn second(rng: &mut SmallRng, traffic: &Traffic, instances: u32) -> VersionSecond {
        let errors = Binomial::new(traffic.rps, traffic.error_ratio)
            .unwrap()
            .sample(rng);
        let mut h = Histogram::<u64>::new(2).unwrap();
        let latency = LogNormal::new(traffic.median_ms.ln(), traffic.sigma).unwrap();
        for _ in 0..traffic.rps {
            h.record((latency.sample(rng) * 1000.0) as u64).unwrap();
        }
        VersionSecond {
            instances,
            requests: traffic.rps as f64,
            errors: errors as f64,
            latency: Some((h, 1000)),
            deployer: None,
        }
    }

    /// Runs baseline-only for 30 s, then baseline and candidate for `seconds`; returns every verdict change with
    /// the number of seconds since the candidate's first second.
    fn run(seed: u64, candidate: &Traffic, seconds: i64) -> Vec<(i64, Verdict)> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let settings = CanarySettings::default();
        let service: Arc<str> = "svc".into();
        let mut canary = Canary::default();
        let mut changes = Vec::new();
        for t in 0..30 {
            let seconds = BTreeMap::from([(Arc::from("v1"), second(&mut rng, &BASE, 8))]);
            changes.extend(
                canary
                    .observe(&service, t, seconds, &settings)
                    .into_iter()
                    .map(|v| (t, v)),
            );
        }
        for t in 30..30 + seconds {
            let seconds = BTreeMap::from([
                (Arc::from("v1"), second(&mut rng, &BASE, 8)),
                (Arc::from("v2"), second(&mut rng, candidate, 1)),
            ]);
            changes.extend(
                canary
                    .observe(&service, t, seconds, &settings)
                    .into_iter()
                    .map(|v| (t - 30, v)),
            );
        }
        changes
    }

    fn first_bad(changes: &[(i64, Verdict)]) -> Option<(i64, &'static str)> {
        changes
            .iter()
            .find(|(_, v)| v.state == VerdictState::Bad)
            .map(|(after, v)| (*after, v.reason.as_ref().map_or("", |r| r.metric)))
    }

    #[test]
    fn bad_candidates_are_caught_within_seconds() {
        let five_x_errors = Traffic {
            error_ratio: 0.05,
            ..BASE
        };
        let two_x_p99 = Traffic {
            sigma: 0.5 + 2f64.ln() / 2.326,
            ..BASE
        };
        let slow_median = Traffic {
            median_ms: 40.0,
            ..BASE
        };
        for (traffic, metric) in [
            (five_x_errors, "error_ratio"),
            (two_x_p99, "p99"),
            (slow_median, "p50"),
        ] {
            for seed in 0..5 {
                let changes = run(seed, &traffic, 20);
                let (after, why) = first_bad(&changes)
                    .unwrap_or_else(|| panic!("{metric} seed {seed}: {changes:?}"));
                assert!(after <= 3, "{metric} seed {seed}: bad only after {after} s");
                assert!(
                    why == metric || metric == "p99",
                    "{metric} seed {seed}: flagged for {why}"
                );
            }
        }
    }

    #[test]
    fn identical_candidates_are_healthy_for_ten_minutes() {
        for seed in 0..10 {
            let changes = run(100 + seed, &BASE, 600);
            assert_eq!(first_bad(&changes), None, "seed {seed}");
            assert!(
                changes
                    .iter()
                    .any(|(_, v)| v.state == VerdictState::Healthy),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn late_data_replaces_what_was_counted_for_its_second() {
        let settings = CanarySettings::default();
        let service: Arc<str> = "svc".into();
        let mut rng = SmallRng::seed_from_u64(3);
        let mut canary = Canary::default();
        for t in 0..3 {
            let seconds = BTreeMap::from([(Arc::from("v1"), second(&mut rng, &BASE, 8))]);
            canary.observe(&service, t, seconds, &settings);
        }
        // Second 3 sealed with only part of the candidate (one of its instances was late)...
        let partial = VersionSecond {
            requests: 100.0,
            errors: 1.0,
            ..second(&mut rng, &BASE, 1)
        };
        let base = second(&mut rng, &BASE, 8);
        let sealed = BTreeMap::from([(Arc::from("v1"), base.clone()), (Arc::from("v2"), partial)]);
        canary.observe(&service, 3, sealed, &settings);
        // ...then the late instance's data arrived.
        let whole = VersionSecond {
            requests: 400.0,
            errors: 4.0,
            ..second(&mut rng, &BASE, 2)
        };
        let latency_samples = whole.latency.as_ref().map(|(h, _)| h.len());
        canary.correct(
            3,
            BTreeMap::from([(Arc::from("v1"), base), (Arc::from("v2"), whole)]),
        );
        let d = canary.deployment.as_ref().unwrap();
        assert_eq!(d.candidate_side.requests, 400.0);
        assert_eq!(d.candidate_side.errors, 4.0);
        assert_eq!(
            d.candidate_side.latency.as_ref().map(Histogram::len),
            latency_samples
        );
        assert_eq!(d.window.back().map(|(_, c, _)| c.requests), Some(400.0));
        // A correction for a second the comparison never counted changes nothing.
        canary.correct(1, BTreeMap::new());
        assert_eq!(
            canary.deployment.as_ref().unwrap().candidate_side.requests,
            400.0
        );
    }

    #[test]
    fn promotion_and_rollback_end_the_comparison() {
        let settings = CanarySettings::default();
        let service: Arc<str> = "svc".into();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut canary = Canary::default();
        let mut states = Vec::new();
        let mut feed = |canary: &mut Canary, t: i64, versions: &[&str]| {
            let seconds = versions
                .iter()
                .map(|v| (Arc::from(*v), second(&mut rng, &BASE, 2)))
                .collect();
            for v in canary.observe(&service, t, seconds, &settings) {
                states.push((v.candidate.to_string(), v.state));
            }
        };
        for t in 0..5 {
            feed(&mut canary, t, &["v1"]);
        }
        for t in 5..15 {
            feed(&mut canary, t, &["v1", "v2"]);
        }
        for t in 15..40 {
            feed(&mut canary, t, &["v2"]);
        }
        // Then v3 comes and goes again: rolled back.
        for t in 40..50 {
            feed(&mut canary, t, &["v2", "v3"]);
        }
        for t in 50..70 {
            feed(&mut canary, t, &["v2"]);
        }
        assert_eq!(
            states,
            vec![
                ("v2".into(), VerdictState::Healthy),
                ("v2".into(), VerdictState::Promoted),
                ("v3".into(), VerdictState::Healthy),
                ("v3".into(), VerdictState::RolledBack),
            ]
        );
        assert!(canary.verdict().is_none());
    }
}
