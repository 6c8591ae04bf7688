//! Automatic canary analysis: whenever a service reports a version newer than the one serving most of its traffic
//! (the baseline), that candidate is compared with it every second on error ratio, p50 and p99 latency, with tests
//! that stay valid when looked at every second on traffic whose requests move together ([`stats`]). No rule needs
//! writing. Pure: the pipeline feeds it each sealed second's per-version numbers ([`inputs`]); [`alert`] words what
//! a verdict change means for people.
//!
//! Versions are ordered by the second they were first seen (then by natural order, so `v9` < `v10`). The baseline
//! is the version serving the most requests, kept while it still serves at least `min_baseline_share` of them.
//! Every present version first seen after the baseline is a candidate with its own comparison, so a third version
//! neither restarts nor relabels the second one's.

pub(crate) mod alert;
pub(crate) mod inputs;
pub(crate) mod stats;
pub(crate) mod verdict;

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use inputs::InstanceCounts;
pub(crate) use inputs::VersionSecond;
use stats::{
    NoiseModel, Test, ar1_mean_variance, log_quantile_sampling_variance, normal_quantile,
    pooled_excess, pooled_lag1, shock_variance,
};
pub(crate) use verdict::{Evidence, Verdict, VerdictState};

/// Thresholds of the canary analysis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanarySettings {
    /// Whether to run it at all.
    pub enabled: bool,
    /// False-alarm probability per comparison, all checks together, however often it looks.
    pub alpha: f64,
    /// Requests each side needs before the error ratio is judged.
    pub min_requests: u64,
    /// Latency samples each side needs before latency is judged.
    pub min_latency_samples: u64,
    /// Candidate instance-seconds before any verdict.
    pub min_candidate_instance_seconds: u64,
    /// The candidate is bad only if its error ratio is credibly more than this many times the baseline's...
    pub min_error_ratio_factor: f64,
    /// ...and more than this much higher in absolute terms (0.005 = half a percentage point): at the baseline's
    /// ratio both floors are one ratio, and the higher one is tested.
    pub min_error_ratio_increase: f64,
    /// The error floors on a quiet baseline: when its instances' own error counts show no shocks, with errors
    /// enough that a shock would show, the candidate is bad once its error ratio is credibly above this many times
    /// the baseline's...
    pub quiet_error_ratio_factor: f64,
    /// ...and this much higher in absolute terms.
    pub quiet_error_ratio_increase: f64,
    /// Bad only if the candidate's p50 is credibly more than this many times the baseline's.
    pub min_p50_factor: f64,
    /// Bad only if the candidate's p99 is credibly more than this many times the baseline's.
    pub min_p99_factor: f64,
    /// The baseline must serve at least this share of the service's requests (else another version takes over).
    pub min_baseline_share: f64,
    /// How much instances of one version differ for good (sigma of a fixed per-instance multiplier, in log units,
    /// of latency and of error ratio): a side of `k` instances is never known better than this over `sqrt(k)`,
    /// however long it runs.
    pub instance_spread: f64,
    /// How much of a version's own history its noise model is fitted on.
    #[serde(with = "humantime_serde")]
    pub history: Duration,
    /// Least history for a fit; with less, shocks are assumed as large and lasting as production shows them.
    #[serde(with = "humantime_serde")]
    pub min_history: Duration,
    /// A version gone this long ends its comparison (promoted or rolled back).
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// A candidate convicted as bad must be gone this long to count as rolled back (a crash-looping candidate
    /// comes and goes, and stays convicted meanwhile).
    #[serde(with = "humantime_serde")]
    pub bad_settle: Duration,
}

impl Default for CanarySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            alpha: 0.01,
            min_requests: 100,
            min_latency_samples: 100,
            min_candidate_instance_seconds: 3,
            min_error_ratio_factor: 1.75,
            min_error_ratio_increase: 0.0035,
            quiet_error_ratio_factor: 1.25,
            quiet_error_ratio_increase: 0.001,
            min_p50_factor: 1.25,
            min_p99_factor: 1.2,
            min_baseline_share: 0.1,
            instance_spread: 0.03,
            history: Duration::from_secs(600),
            min_history: Duration::from_secs(120),
            settle: Duration::from_secs(10),
            bad_settle: Duration::from_secs(120),
        }
    }
}

/// Spread of the mixing distribution, in log ratio: the tests are most sensitive to effects around 1.6x beyond
/// the floor. Fixed, as the guarantee needs.
const TAU: f64 = 0.5;

/// Seconds of a comparison kept for corrections (late data replaces what was counted for them).
const CORRECTABLE_SECONDS: usize = 16;

/// Instances of a version whose own seconds are kept for finding shocks of single instances (a sample: shocks
/// of one instance show as well in eight as in all).
const TRACKED_INSTANCES: usize = 8;

/// A tracked instance silent this long gives its place to another (it was replaced or scaled away).
const TRACKED_STALE_SECONDS: i64 = 30;

/// The smallest per-instance error shock a quiet baseline must have been able to see: a relative spread of the
/// error rate of 0.25 over 30 seconds (persistent shocks in production are larger).
const QUIET_SHOCK_VARIANCE: f64 = 0.25 * 0.25;

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// What the canary remembers of one second of one version, for fitting its noise model.
#[derive(Debug, Clone, Copy)]
struct HistorySecond {
    instances: u32,
    requests: f64,
    errors: f64,
    /// Log p50 and its sampling variance, when the second had enough latency samples.
    log_p50: Option<(f64, f64)>,
}

/// Tracked instances' own seconds: when each last reported, and its requests and errors per second.
type TrackedInstances = BTreeMap<Arc<str>, (i64, VecDeque<(f64, f64)>)>;

#[derive(Debug)]
struct VersionTrack {
    first_seen: i64,
    last_seen: i64,
    /// Requests in the newest second it reported.
    requests_now: f64,
    history: VecDeque<HistorySecond>,
    /// Some of its instances' own requests and errors per second, over `history`, with when each last reported.
    instances: TrackedInstances,
    /// Its latency over the last half `history` (`.1`) and the half before (`.0`), and when `.1` began.
    latency: (Option<Histogram<u64>>, Option<Histogram<u64>>, i64),
}

impl VersionTrack {
    /// Remembers a second it reported (after any comparison used the history before it).
    fn remember(&mut self, t: i64, second: &VersionSecond, history: i64) {
        self.history.push_back(HistorySecond::of(second));
        let keep = usize::try_from(history).unwrap_or(usize::MAX);
        while self.history.len() > keep {
            self.history.pop_front();
        }
        self.instances.retain(|_, (seen, _)| t - *seen <= history);
        for counts in &second.per_instance {
            self.track_instance(t, counts, keep);
        }
        let (previous, current, since) = &mut self.latency;
        if t - *since >= (history / 2).max(1) {
            *previous = current.take();
            *since = t;
        }
        if let Some((h, _)) = &second.latency {
            add_histogram(current, h);
        }
    }

    /// Keeps `counts` if its instance is tracked, or takes a place for it (free, or a stale instance's).
    fn track_instance(&mut self, t: i64, counts: &InstanceCounts, keep: usize) {
        if !self.instances.contains_key(&counts.id) {
            if self.instances.len() >= TRACKED_INSTANCES {
                let stale = self
                    .instances
                    .iter()
                    .find(|(_, (seen, _))| t - seen > TRACKED_STALE_SECONDS)
                    .map(|(id, _)| id.clone());
                let Some(stale) = stale else {
                    return;
                };
                self.instances.remove(&stale);
            }
            self.instances
                .insert(counts.id.clone(), (t, VecDeque::new()));
        }
        if let Some((seen, seconds)) = self.instances.get_mut(&counts.id) {
            *seen = t;
            seconds.push_back((counts.requests, counts.errors));
            while seconds.len() > keep {
                seconds.pop_front();
            }
        }
    }

    /// Everything it reported over its history, as the start of a comparison's baseline.
    fn prior(&self) -> Side {
        let mut side = Side::new();
        for h in &self.history {
            side.requests += h.requests;
            side.errors += h.errors;
            side.seconds += 1.0;
            side.instance_seconds += f64::from(h.instances);
        }
        for block in [&self.latency.0, &self.latency.1].into_iter().flatten() {
            add_histogram(&mut side.latency, block);
        }
        side
    }
}

/// Adds `h` into `sum` (started as an auto-resizing copy).
fn add_histogram(sum: &mut Option<Histogram<u64>>, h: &Histogram<u64>) {
    match sum {
        Some(sum) => {
            if sum.add(h).is_err() {
                tracing::warn!(message = "Canary left a latency histogram out of its sum.");
            }
        }
        None => {
            let mut copy = h.clone();
            copy.auto(true);
            *sum = Some(copy);
        }
    }
}

/// Latency samples a second needs for its p50 to enter a noise model.
const MIN_SECOND_SAMPLES: u64 = 20;

/// Spread of log latency around the median, from a histogram's p10 and p90 (normal: 2.563 sigma apart).
fn body_spread(h: &Histogram<u64>) -> f64 {
    let (lo, hi) = (
        h.value_at_quantile(0.1).max(1),
        h.value_at_quantile(0.9).max(1),
    );
    ((hi as f64).ln() - (lo as f64).ln()) / (2.0 * normal_quantile(0.9))
}

/// Spread of log latency in the tail, from p90 and p99.
fn tail_spread(h: &Histogram<u64>) -> f64 {
    let (lo, hi) = (
        h.value_at_quantile(0.9).max(1),
        h.value_at_quantile(0.99).max(1),
    );
    ((hi as f64).ln() - (lo as f64).ln()) / (normal_quantile(0.99) - normal_quantile(0.9))
}

impl HistorySecond {
    fn of(second: &VersionSecond) -> Self {
        let log_p50 = second
            .latency
            .as_ref()
            .filter(|(h, _)| h.len() >= MIN_SECOND_SAMPLES)
            .map(|(h, _)| {
                let p50 = h.value_at_quantile(0.5).max(1) as f64;
                let var =
                    log_quantile_sampling_variance(0.5, body_spread(h).max(0.01), h.len() as f64);
                (p50.ln(), var)
            });
        HistorySecond {
            instances: second.instances,
            requests: second.requests,
            errors: second.errors,
            log_p50,
        }
    }
}

/// What a fit of a version's history has to go on: its seconds with requests (the error model's) and those of them
/// with a p50, that is with [`MIN_SECOND_SAMPLES`] latencies or more (the latency model's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FitBasis {
    seconds: usize,
    latency_seconds: usize,
}

impl FitBasis {
    fn of(track: &VersionTrack) -> Self {
        FitBasis {
            seconds: track.history.iter().filter(|h| h.requests > 0.0).count(),
            latency_seconds: track.history.iter().filter(|h| h.log_p50.is_some()).count(),
        }
    }

    /// Whether both models could be fitted on it.
    fn complete(self, min_seconds: usize) -> bool {
        self.seconds >= min_seconds && self.latency_seconds >= min_seconds
    }

    /// Whether a fit on it fits the error model where a fit on `before` could not.
    fn adds_errors_to(self, before: FitBasis, min_seconds: usize) -> bool {
        self.seconds >= min_seconds && before.seconds < min_seconds
    }

    /// Whether a fit on it fits the latency model where a fit on `before` could not.
    fn adds_latency_to(self, before: FitBasis, min_seconds: usize) -> bool {
        self.latency_seconds >= min_seconds && before.latency_seconds < min_seconds
    }
}

/// The noise models a comparison uses, fitted once from the baseline's history when it starts.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Models {
    errors: NoiseModel,
    latency: NoiseModel,
    /// Whether the error rate is quiet: its instances' own seconds show no shock and have errors enough that one
    /// would show (see `instance_errors_model`); the quiet error floors apply to `bad`.
    quiet_errors: bool,
}

impl Models {
    /// Fits from `history` (oldest first): errors on the relative error rate, latency on log p50 (a latency shock
    /// multiplies every request of its second, so p99 moves with it). Too little history: the cautious model.
    fn fit(track: &VersionTrack, min_seconds: usize) -> Self {
        let history = &track.history;
        let instances = if history.is_empty() {
            1.0
        } else {
            history.iter().map(|h| f64::from(h.instances)).sum::<f64>() / history.len() as f64
        };
        let (requests, errors) = history
            .iter()
            .fold((0.0, 0.0), |(r, e), h| (r + h.requests, e + h.errors));
        let errors_model = if errors > 0.0 && requests > 0.0 {
            let rate = errors / requests;
            let relative: Vec<(f64, f64)> = history
                .iter()
                .filter(|h| h.requests > 0.0)
                .map(|h| (h.errors / (h.requests * rate), 1.0 / (h.requests * rate)))
                .collect();
            NoiseModel::fit(&relative, instances, min_seconds)
        } else if history.len() >= min_seconds {
            // No errors at all yet: nothing to fit shocks on; sampling variance carries the test.
            Some(NoiseModel {
                shock_variance: 0.0,
                persistence: 0.0,
                instances,
            })
        } else {
            None
        };
        let latency: Vec<(f64, f64)> = history.iter().filter_map(|h| h.log_p50).collect();
        // Where its instances' own seconds can show a shock of one instance, they decide (see
        // `instance_errors_model`); a version's sum dilutes such shocks by its number of instances.
        let instance_model = instance_errors_model(&track.instances, min_seconds);
        let errors_model = instance_model.map(|(model, _)| model).or(errors_model);
        Models {
            quiet_errors: instance_model.is_some_and(|(_, quiet)| quiet),
            errors: errors_model.unwrap_or(NoiseModel::CAUTIOUS_ERRORS),
            latency: NoiseModel::fit(&latency, instances, min_seconds)
                .unwrap_or(NoiseModel::CAUTIOUS),
        }
    }
}

/// The error rate's shocks as the tracked instances' own seconds show them: each instance with `min_seconds` of
/// its own, rates relative to theirs together, single seconds and 10- and 30-second batches pooled over the
/// instances, each centred on its own mean. That is a shock of one instance undiluted, as a one-instance candidate
/// carries it (a version's sum dilutes it by its number of instances and hides it among sampling noise). `None`
/// when it sees no shock and the instances have too few errors for a shock of [`QUIET_SHOCK_VARIANCE`] over 30
/// seconds to show.
/// Persistence as in `NoiseModel::fit`; the model is per instance, never assumed to average out over instances.
/// With it, whether the rate is quiet: no shock at any scale, and none of that size within a standard error.
fn instance_errors_model(
    instances: &TrackedInstances,
    min_seconds: usize,
) -> Option<(NoiseModel, bool)> {
    // Instances with `min_history` of their own; rates relative to theirs (their own errors decide whether a
    // shock would show).
    let long: Vec<&VecDeque<(f64, f64)>> = instances
        .values()
        .map(|(_, seconds)| seconds)
        .filter(|seconds| seconds.len() >= min_seconds.max(30))
        .collect();
    let (requests, errors) = long
        .iter()
        .flat_map(|seconds| seconds.iter())
        .fold((0.0, 0.0), |(r, e), (requests, errors)| {
            (r + requests, e + errors)
        });
    let rate = errors / requests;
    if !(rate > 0.0 && rate.is_finite()) {
        return None;
    }
    let relative: Vec<Vec<(f64, f64)>> = long
        .iter()
        .map(|seconds| {
            seconds
                .iter()
                .filter(|(requests, _)| *requests > 0.0)
                .map(|(requests, errors)| (errors / (requests * rate), 1.0 / (requests * rate)))
                .collect()
        })
        .collect();
    let thirty = pooled_excess(&relative, 30, 3.0)?;
    // Power: a shock of `QUIET_SHOCK_VARIANCE` would have been seen (three standard errors), and what was seen,
    // plus a standard error, stays under it.
    let powerful = thirty.threshold <= QUIET_SHOCK_VARIANCE;
    let bounded = thirty.excess.max(0.0) + thirty.threshold / 3.0 <= QUIET_SHOCK_VARIANCE;
    let ten = pooled_excess(&relative, 10, 3.0)?;
    let one = pooled_excess(&relative, 1, 3.0)?;
    // As for a version's sum (`NoiseModel::fit`): persistence from the lag-1 covariance when single seconds show
    // the shock, production's when only batches do.
    let per_second = (one.excess > one.threshold).then_some(one.excess);
    let persistence = match per_second {
        Some(shock) if shock > 0.0 => (pooled_lag1(&relative) / shock).clamp(0.0, 0.995),
        _ => NoiseModel::CAUTIOUS.persistence,
    };
    let shock = [(10.0, ten), (30.0, thirty)]
        .into_iter()
        .filter(|(_, p)| p.excess > p.threshold)
        .map(|(batch, p)| p.excess / ar1_mean_variance(batch, persistence))
        .fold(per_second.unwrap_or(0.0), f64::max);
    if shock == 0.0 && !powerful {
        // Nothing seen, but nothing could have been: the version's sum decides.
        return None;
    }
    let model = NoiseModel {
        shock_variance: shock,
        persistence: if shock > 0.0 { persistence } else { 0.0 },
        instances: 1.0,
    };
    Some((model, shock == 0.0 && bounded))
}

/// A version's second as a comparison counts it (nothing of it, if absent): without its instances' own counts,
/// which only its history keeps.
fn counted(second: Option<&VersionSecond>) -> VersionSecond {
    second.map_or_else(VersionSecond::default, |s| VersionSecond {
        instances: s.instances,
        requests: s.requests,
        errors: s.errors,
        latency: s.latency.clone(),
        deployer: s.deployer.clone(),
        per_instance: Vec::new(),
    })
}

/// One side of a comparison: everything it reported since the comparison began.
#[derive(Debug)]
struct Side {
    requests: f64,
    errors: f64,
    latency: Option<Histogram<u64>>,
    scale: u32,
    /// Seconds it reported in.
    seconds: f64,
    instance_seconds: f64,
}

impl Side {
    fn new() -> Self {
        Self {
            requests: 0.0,
            errors: 0.0,
            latency: None,
            scale: 1,
            seconds: 0.0,
            instance_seconds: 0.0,
        }
    }

    /// Mean instances over the seconds it reported in.
    fn instances(&self) -> f64 {
        if self.seconds > 0.0 {
            self.instance_seconds / self.seconds
        } else {
            1.0
        }
    }

    fn add(&mut self, second: &VersionSecond) {
        if second.instances == 0 {
            return;
        }
        self.requests += second.requests;
        self.errors += second.errors;
        self.seconds += 1.0;
        self.instance_seconds += f64::from(second.instances);
        if let Some((h, scale)) = &second.latency {
            self.scale = *scale;
            add_histogram(&mut self.latency, h);
        }
    }

    /// Takes back a second added before (a correction replaces it).
    fn subtract(&mut self, second: &VersionSecond) {
        if second.instances == 0 {
            return;
        }
        self.requests -= second.requests;
        self.errors -= second.errors;
        self.seconds -= 1.0;
        self.instance_seconds -= f64::from(second.instances);
        if let (Some(sum), Some((h, _))) = (&mut self.latency, &second.latency)
            && sum.subtract(h).is_err()
        {
            tracing::warn!(message = "Canary could not take a corrected second out of its sum.");
        }
    }
}

#[derive(Debug)]
struct Deployment {
    candidate: Arc<str>,
    baseline: Arc<str>,
    models: Models,
    candidate_side: Side,
    /// The baseline's seconds since the comparison began.
    baseline_side: Side,
    /// The same plus the baseline's history before the comparison (what the tests compare with).
    baseline_total: Side,
    /// What the noise models were fitted on: until both had enough seconds, a model short of them is the cautious
    /// one, and the models are fitted again once the baseline's history has them.
    fitted_on: FitBasis,
    /// The newest seconds as counted, for corrections.
    recent: VecDeque<(i64, VersionSecond, VersionSecond)>,
    verdict: Verdict,
}

impl Deployment {
    fn feed(&mut self, t: i64, c: VersionSecond, b: VersionSecond) {
        self.candidate_side.add(&c);
        self.baseline_side.add(&b);
        self.baseline_total.add(&b);
        self.recent.push_back((t, c, b));
        while self.recent.len() > CORRECTABLE_SECONDS {
            self.recent.pop_front();
        }
    }

    /// Judges the evidence so far; returns the verdict if its state changed.
    fn judge(&mut self, t: i64, s: &CanarySettings) -> Option<Verdict> {
        let verdict = &mut self.verdict;
        verdict.t = t;
        if verdict.state == VerdictState::Bad {
            return None;
        }
        let before = verdict.state;
        if self.candidate_side.instance_seconds < s.min_candidate_instance_seconds as f64 {
            return None;
        }
        let checks = checks(
            &self.candidate_side,
            &self.baseline_total,
            &self.baseline_side,
            &self.models,
            s,
        );
        // Errors always; latency too once either side has reported any.
        let has_latency =
            self.candidate_side.latency.is_some() || self.baseline_side.latency.is_some();
        let expected = if has_latency { 3 } else { 1 };
        if let Some(reason) = checks.iter().find(|e| e.bad) {
            verdict.state = VerdictState::Bad;
            verdict.reason = Some(reason.clone());
        } else if checks.len() == expected && checks.iter().all(|e| e.ruled_out) {
            verdict.state = VerdictState::Healthy;
        } else {
            verdict.state = VerdictState::InsufficientTraffic;
        }
        verdict.checks = checks;
        (verdict.state != before).then(|| verdict.clone())
    }
}

/// One service's canary state, owned by its shard.
#[derive(Debug, Default)]
pub(crate) struct Canary {
    versions: BTreeMap<Arc<str>, VersionTrack>,
    baseline: Option<Arc<str>>,
    /// Running comparisons, by candidate.
    deployments: BTreeMap<Arc<str>, Deployment>,
}

/// Orders versions by when they were first seen, then naturally (`v9` before `v10`).
fn version_order(a: (&Arc<str>, i64), b: (&Arc<str>, i64)) -> Ordering {
    a.1.cmp(&b.1).then_with(|| natural_cmp(a.0, b.0))
}

/// Compares strings with their digit runs as numbers.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        match (a.chars().next(), b.chars().next()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.len() - a.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                let db = b.len() - b.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                let (na, nb) = (
                    a[..da].trim_start_matches('0'),
                    b[..db].trim_start_matches('0'),
                );
                let order = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if order != Ordering::Equal {
                    return order;
                }
                (a, b) = (&a[da..], &b[db..]);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(&y);
                }
                (a, b) = (&a[x.len_utf8()..], &b[y.len_utf8()..]);
            }
        }
    }
}

impl Canary {
    #[cfg(test)]
    /// The current verdict on `candidate`, if a comparison is running.
    pub(crate) fn verdict(&self, candidate: &str) -> Option<&Verdict> {
        self.deployments.get(candidate).map(|d| &d.verdict)
    }

    /// The service stopped reporting altogether. A candidate convicted as bad counts as rolled back (nothing of it
    /// serves any more), so its alert resolves; any other comparison just ends. No second is judged.
    pub(crate) fn on_service_gone(&mut self, t: i64) -> Vec<Verdict> {
        self.versions.clear();
        self.baseline = None;
        std::mem::take(&mut self.deployments)
            .into_values()
            .filter(|d| d.verdict.state == VerdictState::Bad)
            .map(|d| Verdict {
                state: VerdictState::RolledBack,
                t,
                ..d.verdict
            })
            .collect()
    }

    /// Late snapshots changed an already observed second: its numbers replace what the comparisons counted for it.
    /// The next sealed second is judged with them.
    pub(crate) fn correct(&mut self, t: i64, seconds: BTreeMap<Arc<str>, VersionSecond>) {
        for d in self.deployments.values_mut() {
            let Some((_, c, b)) = d.recent.iter_mut().find(|(second, _, _)| *second == t) else {
                continue;
            };
            let new_c = counted(seconds.get(&d.candidate));
            let new_b = counted(seconds.get(&d.baseline));
            d.candidate_side.subtract(c);
            d.candidate_side.add(&new_c);
            d.baseline_side.subtract(b);
            d.baseline_side.add(&new_b);
            d.baseline_total.subtract(b);
            d.baseline_total.add(&new_b);
            *c = new_c;
            *b = new_b;
        }
    }

    /// Feeds one sealed second; returns the verdicts that changed (ended comparisons first).
    pub(crate) fn observe(
        &mut self,
        service: &Arc<str>,
        t: i64,
        seconds: BTreeMap<Arc<str>, VersionSecond>,
        settings: &CanarySettings,
    ) -> Vec<Verdict> {
        for (version, second) in &seconds {
            if second.instances == 0 {
                continue;
            }
            let track = self
                .versions
                .entry(version.clone())
                .or_insert_with(|| VersionTrack {
                    first_seen: t,
                    last_seen: t,
                    requests_now: 0.0,
                    history: VecDeque::new(),
                    instances: BTreeMap::new(),
                    latency: (None, None, t),
                });
            track.last_seen = t;
            track.requests_now = second.requests;
        }
        let changes = self.compare(service, t, &seconds, settings);
        // Remembered after the comparisons, so a new one's baseline history ends before its first second.
        let history = secs(settings.history).max(2);
        for (version, second) in &seconds {
            if let Some(track) = self.versions.get_mut(version)
                && second.instances > 0
            {
                track.remember(t, second, history);
            }
        }
        changes
    }

    /// Picks the baseline and the candidates, ends the comparisons that are over and feeds the others.
    fn compare(
        &mut self,
        service: &Arc<str>,
        t: i64,
        seconds: &BTreeMap<Arc<str>, VersionSecond>,
        settings: &CanarySettings,
    ) -> Vec<Verdict> {
        let settle = secs(settings.settle).max(1);
        let bad_settle = secs(settings.bad_settle).max(settle);
        let keep = bad_settle.saturating_mul(2);
        let deployments = &self.deployments;
        self.versions.retain(|v, track| {
            t - track.last_seen <= keep
                || deployments
                    .values()
                    .any(|d| d.candidate == *v || d.baseline == *v)
        });
        let present = |track: &VersionTrack| t - track.last_seen < settle;

        // The baseline: kept while present and serving its share, else the version serving the most now.
        let total: f64 = self
            .versions
            .values()
            .filter(|v| v.last_seen == t)
            .map(|v| v.requests_now)
            .sum();
        let serving = |track: &VersionTrack| {
            present(track)
                && (total <= 0.0 || track.requests_now >= settings.min_baseline_share * total)
        };
        let keeps = self
            .baseline
            .as_ref()
            .and_then(|b| self.versions.get(b))
            .is_some_and(serving);
        if !keeps {
            self.baseline = self
                .versions
                .iter()
                .filter(|(_, v)| present(v))
                .max_by(|a, b| {
                    a.1.requests_now
                        .total_cmp(&b.1.requests_now)
                        .then_with(|| version_order((b.0, b.1.first_seen), (a.0, a.1.first_seen)))
                })
                .map(|(v, _)| v.clone());
        }

        let mut changes = Vec::new();
        self.end_comparisons(t, settle, bad_settle, &mut changes);

        let Some(baseline) = self.baseline.clone() else {
            return changes;
        };
        let Some(base_track) = self.versions.get(&baseline) else {
            return changes;
        };
        let base_first = base_track.first_seen;
        let mut candidates: Vec<(&Arc<str>, &VersionTrack)> = self
            .versions
            .iter()
            .filter(|(v, track)| {
                **v != baseline
                    && present(track)
                    && version_order((v, track.first_seen), (&baseline, base_first))
                        == Ordering::Greater
            })
            .collect();
        candidates.sort_by(|a, b| version_order((a.0, a.1.first_seen), (b.0, b.1.first_seen)));
        let candidates: Vec<(Arc<str>, i64)> = candidates
            .into_iter()
            .map(|(v, track)| (v.clone(), track.first_seen))
            .collect();
        // A model cannot be fitted on fewer seconds: a deployment marked fitted with less would keep the cautious
        // models for good.
        let min_history = usize::try_from(settings.min_history.as_secs())
            .unwrap_or(usize::MAX)
            .max(stats::FEWEST_FIT_SECONDS);
        let b = counted(seconds.get(&baseline));
        for (candidate, first_seen) in candidates {
            let c = counted(seconds.get(&candidate));
            let deployment = self
                .deployments
                .entry(candidate.clone())
                .or_insert_with(|| Deployment {
                    candidate: candidate.clone(),
                    baseline: baseline.clone(),
                    models: Models::fit(base_track, min_history),
                    candidate_side: Side::new(),
                    baseline_side: Side::new(),
                    baseline_total: base_track.prior(),
                    fitted_on: FitBasis::of(base_track),
                    recent: VecDeque::new(),
                    verdict: Verdict {
                        service: service.clone(),
                        candidate: candidate.clone(),
                        baseline: baseline.clone(),
                        state: VerdictState::Collecting,
                        since: first_seen,
                        t,
                        reason: None,
                        checks: Vec::new(),
                        deployer: None,
                    },
                });
            if deployment.baseline != baseline {
                // A convicted candidate whose baseline changed keeps its verdict until it is gone.
                continue;
            }
            if !deployment.fitted_on.complete(min_history) {
                // Started without enough history, or with too few seconds that had a p50 (a service too quiet for
                // one then): the cautious models give way to fitted ones once the baseline's own seconds (which do
                // not depend on the candidate) are enough.
                // Each model is fitted once on enough seconds, and then fixed.
                let now = FitBasis::of(base_track);
                let before = deployment.fitted_on;
                let errors = now.adds_errors_to(before, min_history);
                let latency = now.adds_latency_to(before, min_history);
                if errors || latency {
                    let fitted = Models::fit(base_track, min_history);
                    if errors {
                        deployment.models.errors = fitted.errors;
                        deployment.models.quiet_errors = fitted.quiet_errors;
                        deployment.fitted_on.seconds = now.seconds;
                    }
                    if latency {
                        deployment.models.latency = fitted.latency;
                        deployment.fitted_on.latency_seconds = now.latency_seconds;
                    }
                }
            }
            deployment.verdict.deployer =
                deployment.verdict.deployer.clone().or(c.deployer.clone());
            deployment.feed(t, c, b.clone());
            changes.extend(deployment.judge(t, settings));
        }
        changes
    }

    /// Ends the comparisons whose candidate became the baseline (promoted), is gone (rolled back: at once unless
    /// convicted, after `bad_settle` if convicted), or whose baseline was replaced by another version (ended as
    /// they stand, unless convicted).
    fn end_comparisons(
        &mut self,
        t: i64,
        settle: i64,
        bad_settle: i64,
        changes: &mut Vec<Verdict>,
    ) {
        let versions = &self.versions;
        let baseline = self.baseline.clone();
        let gone_for = |v: &Arc<str>| {
            versions
                .get(v)
                .map_or(i64::MAX, |track| t - track.last_seen)
        };
        let ended: Vec<Arc<str>> = self
            .deployments
            .values()
            .filter(|d| {
                let bad = d.verdict.state == VerdictState::Bad;
                let promoted = baseline.as_ref() == Some(&d.candidate);
                let gone = gone_for(&d.candidate) >= if bad { bad_settle } else { settle };
                let rebased = baseline.as_ref() != Some(&d.baseline) && !bad;
                promoted || gone || rebased
            })
            .map(|d| d.candidate.clone())
            .collect();
        for candidate in ended {
            let Some(d) = self.deployments.remove(&candidate) else {
                continue;
            };
            let mut verdict = d.verdict;
            verdict.state = if baseline.as_ref() == Some(&candidate) {
                VerdictState::Promoted
            } else if gone_for(&candidate) >= settle {
                VerdictState::RolledBack
            } else {
                verdict.state
            };
            verdict.t = t;
            changes.push(verdict);
        }
    }
}

/// Every check with enough data, each with its test against its floor. `b` is the baseline with its history
/// (what the tests compare with: it knows the baseline's level precisely), `b_now` the baseline's seconds since the
/// comparison began: a candidate is bad only if it is also worse than the floor against those (a point estimate, so
/// a service-wide shock that hits both versions during the deploy does not convict the candidate).
fn checks(c: &Side, b: &Side, b_now: &Side, models: &Models, s: &CanarySettings) -> Vec<Evidence> {
    let alpha = s.alpha / 3.0;
    let mut out = Vec::new();
    // Instances differ for good by `instance_spread`: what a side's mean keeps of that never shrinks with time.
    let spread = s.instance_spread * s.instance_spread;
    let offsets = spread / c.instances() + spread / b.instances();
    let min_requests = s.min_requests as f64;
    if c.requests >= min_requests && b.requests >= min_requests {
        let (floor_factor, floor_increase) = if models.quiet_errors {
            (
                s.quiet_error_ratio_factor.min(s.min_error_ratio_factor),
                s.quiet_error_ratio_increase.min(s.min_error_ratio_increase),
            )
        } else {
            (s.min_error_ratio_factor, s.min_error_ratio_increase)
        };
        let now_ratio = |side: &Side| (side.errors.max(0.0) + 0.5) / (side.requests + 1.0);
        let concurrent = b_now.requests < min_requests || {
            let (r_c, r_now) = (now_ratio(c), now_ratio(b_now));
            r_c >= floor_factor * r_now && r_c - r_now >= floor_increase
        };
        // Log error ratio, with half an error added to each side so that none is zero.
        let (x_c, x_b) = (c.errors.max(0.0) + 0.5, b.errors.max(0.0) + 0.5);
        let (r_c, r_b) = (x_c / (c.requests + 1.0), x_b / (b.requests + 1.0));
        let sampling = 1.0 / x_c + 1.0 / x_b;
        let shocks = shock_variance(&models.errors, c.seconds, c.instances())
            + shock_variance(&models.errors, b.seconds, b.instances())
            + offsets;
        // One floor for both: "more than `factor` times the baseline's ratio" and "more than `increase` above
        // it" are one ratio, whichever is higher, at the baseline's (precisely known) ratio.
        let factor = floor_factor.max(1.0 + floor_increase / r_b).max(1.0);
        let healthy_floor = s
            .min_error_ratio_factor
            .max(1.0 + s.min_error_ratio_increase / r_b)
            .max(factor)
            .ln();
        let ratio = Test {
            estimate: (r_c / r_b).ln(),
            variance: sampling + shocks,
            floor: factor.ln(),
            tau: TAU,
        };
        out.push(Evidence {
            metric: "error_ratio",
            candidate: c.errors / c.requests,
            baseline: b.errors / b.requests,
            floor: factor,
            z: ratio.z(),
            likelihood_ratio: ratio.likelihood_ratio(),
            candidate_samples: c.requests.round() as u64,
            baseline_samples: b.requests.round() as u64,
            bad: ratio.rejects(alpha) && concurrent,
            // `healthy` rules out the regular floors, also on a quiet baseline.
            ruled_out: ratio.upper_bound(alpha) < healthy_floor,
        });
    }
    if let (Some(hc), Some(hb)) = (&c.latency, &b.latency)
        && hc.len() >= s.min_latency_samples
        && hb.len() >= s.min_latency_samples
    {
        let scale = f64::from(b.scale.max(1));
        for (metric, q, factor) in [
            ("p50", 0.5, s.min_p50_factor),
            ("p99", 0.99, s.min_p99_factor),
        ] {
            let (q_c, q_b) = (
                hc.value_at_quantile(q).max(1) as f64,
                hb.value_at_quantile(q).max(1) as f64,
            );
            let concurrent = b_now
                .latency
                .as_ref()
                .filter(|h| h.len() >= s.min_latency_samples)
                .is_none_or(|h| q_c >= factor * h.value_at_quantile(q).max(1) as f64);
            let spread = |h: &Histogram<u64>| {
                if q < 0.9 {
                    body_spread(h)
                } else {
                    tail_spread(h)
                }
                .max(0.02)
            };
            let sampling = log_quantile_sampling_variance(q, spread(hc), hc.len() as f64)
                + log_quantile_sampling_variance(q, spread(hb), hb.len() as f64);
            // Histogram buckets are 1% wide: each quantile is known to within one.
            let resolution = 2.0 * 0.01f64.powi(2);
            let shocks = shock_variance(&models.latency, c.seconds, c.instances())
                + shock_variance(&models.latency, b.seconds, b.instances())
                + offsets;
            let test = Test {
                estimate: (q_c / q_b).ln(),
                variance: sampling + resolution + shocks,
                floor: factor.max(1.0).ln(),
                tau: TAU,
            };
            out.push(Evidence {
                metric,
                candidate: q_c / scale,
                baseline: q_b / scale,
                floor: factor.max(1.0),
                z: test.z(),
                likelihood_ratio: test.likelihood_ratio(),
                candidate_samples: hc.len(),
                baseline_samples: hb.len(),
                bad: test.rejects(alpha) && concurrent,
                ruled_out: test.upper_bound(alpha) < test.floor,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use rand_distr::{Binomial, Distribution, LogNormal, Normal, Poisson};

    /// How requests of one instance-second move together (a test's copy of the simulator's traffic shapes).
    #[derive(Clone, Copy)]
    struct Shocks {
        latency_sigma: f64,
        error_cv: f64,
        /// AR(1) time constant in seconds; 0 = fresh every second.
        persistence_secs: f64,
    }

    const INDEPENDENT: Shocks = Shocks {
        latency_sigma: 0.0,
        error_cv: 0.0,
        persistence_secs: 0.0,
    };
    const SHOCKED: Shocks = Shocks {
        latency_sigma: 0.2,
        error_cv: 0.5,
        persistence_secs: 0.0,
    };
    const PERSISTENT: Shocks = Shocks {
        persistence_secs: 30.0,
        ..SHOCKED
    };

    #[derive(Clone, Copy)]
    struct Traffic {
        /// Requests per second on the whole side.
        rps: f64,
        error_ratio: f64,
        median_ms: f64,
        sigma: f64,
    }

    const BASE: Traffic = Traffic {
        rps: 250.0,
        error_ratio: 0.005,
        median_ms: 20.0,
        sigma: 0.5,
    };

    /// One version's instances, each with its own shock process.
    struct Fleet {
        traffic: Traffic,
        shocks: Shocks,
        /// Per instance: the latency and error shocks' standard normal states.
        states: Vec<(f64, f64)>,
    }

    impl Fleet {
        fn new(traffic: Traffic, shocks: Shocks, instances: usize) -> Self {
            Self {
                traffic,
                shocks,
                states: vec![(0.0, 0.0); instances],
            }
        }

        fn second(&mut self, rng: &mut SmallRng) -> VersionSecond {
            let phi = if self.shocks.persistence_secs > 0.0 {
                (-1.0 / self.shocks.persistence_secs).exp()
            } else {
                0.0
            };
            let fresh = Normal::new(0.0, (1.0 - phi * phi).sqrt()).unwrap();
            let err_sigma = (1.0 + self.shocks.error_cv.powi(2)).ln().sqrt();
            let per_instance = self.traffic.rps / self.states.len() as f64;
            let mut h = Histogram::<u64>::new(2).unwrap();
            let (mut requests, mut errors) = (0u64, 0u64);
            let mut counts = Vec::new();
            for (k, (z_lat, z_err)) in self.states.iter_mut().enumerate() {
                *z_lat = phi * *z_lat + fresh.sample(rng);
                *z_err = phi * *z_err + fresh.sample(rng);
                let n = Poisson::new(per_instance).map_or(0.0, |p| p.sample(rng)) as u64;
                let p = (self.traffic.error_ratio
                    * (err_sigma * *z_err - err_sigma * err_sigma / 2.0).exp())
                .clamp(0.0, 1.0);
                let failed = Binomial::new(n, p).unwrap().sample(rng);
                counts.push(InstanceCounts {
                    id: format!("i{k}").into(),
                    requests: n as f64,
                    errors: failed as f64,
                });
                errors += failed;
                requests += n;
                let median = self.traffic.median_ms * (self.shocks.latency_sigma * *z_lat).exp();
                let latency = LogNormal::new(median.ln(), self.traffic.sigma).unwrap();
                for _ in 0..n {
                    h.record((latency.sample(rng) * 1000.0) as u64 + 1).unwrap();
                }
            }
            VersionSecond {
                instances: u32::try_from(self.states.len()).unwrap(),
                requests: requests as f64,
                errors: errors as f64,
                latency: (requests > 0).then_some((h, 1000)),
                deployer: None,
                per_instance: counts,
            }
        }
    }

    /// A version's track after `seconds` of `fleet` (its history as the canary keeps it).
    fn track_of(seconds: impl Iterator<Item = VersionSecond>) -> VersionTrack {
        let mut track = VersionTrack {
            first_seen: 0,
            last_seen: 0,
            requests_now: 0.0,
            history: VecDeque::new(),
            instances: BTreeMap::new(),
            latency: (None, None, 0),
        };
        for (t, second) in seconds.enumerate() {
            track.remember(t as i64, &second, 600);
        }
        track
    }

    /// Runs the baseline alone for `warmup` seconds, then baseline and candidate for `seconds`; returns every
    /// verdict change with the seconds since the candidate's first.
    fn run(
        seed: u64,
        candidate: Traffic,
        shocks: Shocks,
        warmup: i64,
        seconds: i64,
    ) -> Vec<(i64, Verdict)> {
        run_canary(seed, candidate, shocks, warmup, seconds).0
    }

    /// As [`run`], also returning the canary as it stands at the end.
    fn run_canary(
        seed: u64,
        candidate: Traffic,
        shocks: Shocks,
        warmup: i64,
        seconds: i64,
    ) -> (Vec<(i64, Verdict)>, Canary) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let settings = CanarySettings::default();
        let service: Arc<str> = "svc".into();
        let mut canary = Canary::default();
        let mut baseline = Fleet::new(BASE, shocks, 4);
        let mut canary_fleet = Fleet::new(candidate, shocks, 1);
        let mut changes = Vec::new();
        for t in 0..warmup + seconds {
            let mut versions = BTreeMap::from([(Arc::from("v1"), baseline.second(&mut rng))]);
            if t >= warmup {
                versions.insert(Arc::from("v2"), canary_fleet.second(&mut rng));
            }
            for v in canary.observe(&service, t, versions, &settings) {
                changes.push((t - warmup, v));
            }
        }
        (changes, canary)
    }

    fn first_bad(changes: &[(i64, Verdict)]) -> Option<(i64, &'static str)> {
        changes
            .iter()
            .find(|(_, v)| v.state == VerdictState::Bad)
            .map(|(after, v)| (*after, v.reason.as_ref().map_or("", |r| r.metric)))
    }

    fn with_p99_factor(factor: f64) -> Traffic {
        Traffic {
            sigma: BASE.sigma + factor.ln() / normal_quantile(0.99),
            ..BASE
        }
    }

    #[test]
    fn bad_candidates_are_caught_within_seconds_on_independent_requests() {
        let five_x_errors = Traffic {
            error_ratio: BASE.error_ratio * 5.0,
            ..BASE
        };
        let slow_median = Traffic {
            median_ms: 40.0,
            ..BASE
        };
        for (traffic, metric) in [
            (five_x_errors, "error_ratio"),
            (with_p99_factor(2.0), "p99"),
            (slow_median, "p50"),
        ] {
            for seed in 0..4 {
                let changes = run(seed, traffic, INDEPENDENT, 150, 30);
                let (after, why) = first_bad(&changes)
                    .unwrap_or_else(|| panic!("{metric} seed {seed}: {changes:?}"));
                assert!(after <= 8, "{metric} seed {seed}: bad only after {after} s");
                assert!(
                    why == metric || metric != "error_ratio",
                    "{metric} seed {seed}: flagged for {why}"
                );
            }
        }
    }

    #[test]
    fn bad_candidates_are_still_caught_on_shocked_traffic() {
        // (Within a minute: a one-instance candidate's shocks are its own, and only seconds average them out.)
        let five_x_errors = Traffic {
            error_ratio: BASE.error_ratio * 5.0,
            ..BASE
        };
        for traffic in [five_x_errors, with_p99_factor(2.0)] {
            for seed in 0..3 {
                let changes = run(10 + seed, traffic, SHOCKED, 150, 120);
                let (after, _) = first_bad(&changes).unwrap_or_else(|| panic!("seed {seed}"));
                assert!(after <= 60, "seed {seed}: bad only after {after} s");
            }
        }
    }

    /// The traffic that paged a third of healthy deploys before: shocks shared by the requests of a second,
    /// lasting about 30 s. Identical versions for 30 minutes, then the candidate is credibly healthy.
    #[test]
    fn identical_versions_on_persistent_shocks_are_never_convicted() {
        for (seed, shocks) in [
            (100, PERSISTENT),
            (101, PERSISTENT),
            (102, SHOCKED),
            (103, SHOCKED),
        ] {
            let changes = run(seed, BASE, shocks, 300, 1800);
            assert_eq!(first_bad(&changes), None, "seed {seed}: {changes:?}");
        }
        let changes = run(104, BASE, INDEPENDENT, 300, 1200);
        assert_eq!(first_bad(&changes), None);
        assert_eq!(
            changes.last().map(|(_, v)| v.state),
            Some(VerdictState::Healthy),
            "{changes:?}"
        );
    }

    #[test]
    fn a_thin_candidate_is_insufficient_traffic_not_healthy() {
        let thin = Traffic { rps: 2.0, ..BASE };
        let (changes, canary) = run_canary(5, thin, INDEPENDENT, 150, 50);
        let states: Vec<VerdictState> = changes.iter().map(|(_, v)| v.state).collect();
        assert_eq!(
            canary.verdict("v2").map(|v| v.state),
            Some(VerdictState::InsufficientTraffic),
            "{states:?}"
        );
        assert!(!states.contains(&VerdictState::Healthy));
    }

    /// Feeds seconds in which each listed version reports `BASE` traffic (or `bad` for the ones marked bad).
    struct Feeder {
        rng: SmallRng,
        canary: Canary,
        states: Vec<(String, VerdictState)>,
        settings: CanarySettings,
    }

    impl Feeder {
        fn new() -> Self {
            Self {
                rng: SmallRng::seed_from_u64(1),
                canary: Canary::default(),
                states: Vec::new(),
                settings: CanarySettings::default(),
            }
        }

        fn feed(&mut self, t: std::ops::Range<i64>, versions: &[(&str, f64, bool)]) {
            let service: Arc<str> = "svc".into();
            for t in t {
                let seconds = versions
                    .iter()
                    .map(|(v, rps, bad)| {
                        let traffic = Traffic {
                            rps: *rps,
                            error_ratio: if *bad { 0.2 } else { BASE.error_ratio },
                            ..BASE
                        };
                        (
                            Arc::from(*v),
                            Fleet::new(traffic, INDEPENDENT, 2).second(&mut self.rng),
                        )
                    })
                    .collect();
                for v in self.canary.observe(&service, t, seconds, &self.settings) {
                    self.states.push((v.candidate.to_string(), v.state));
                }
            }
        }
    }

    #[test]
    fn promotion_and_rollback_end_the_comparison() {
        let mut f = Feeder::new();
        f.feed(0..5, &[("v1", 500.0, false)]);
        f.feed(5..400, &[("v1", 500.0, false), ("v2", 300.0, false)]);
        // v2 takes most of the traffic, then v1 is gone: promoted.
        f.feed(400..420, &[("v1", 100.0, false), ("v2", 700.0, false)]);
        f.feed(420..440, &[("v2", 800.0, false)]);
        // Then v3 comes and goes again: rolled back.
        f.feed(440..450, &[("v2", 800.0, false), ("v3", 100.0, false)]);
        f.feed(450..470, &[("v2", 800.0, false)]);
        let v2: Vec<VerdictState> = f
            .states
            .iter()
            .filter(|(c, _)| c == "v2")
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(
            v2.first(),
            Some(&VerdictState::InsufficientTraffic),
            "{:?}",
            f.states
        );
        assert!(v2.contains(&VerdictState::Healthy), "{:?}", f.states);
        assert_eq!(v2.last(), Some(&VerdictState::Promoted), "{:?}", f.states);
        assert_eq!(
            f.states.iter().rfind(|(c, _)| c == "v3").map(|(_, s)| *s),
            Some(VerdictState::RolledBack),
            "{:?}",
            f.states
        );
        assert!(f.canary.verdict("v2").is_none() && f.canary.verdict("v3").is_none());
    }

    #[test]
    fn a_third_version_gets_its_own_comparison_and_a_bad_second_stays_bad() {
        let mut f = Feeder::new();
        f.feed(0..200, &[("v1", 800.0, false)]);
        f.feed(200..230, &[("v1", 800.0, false), ("v2", 200.0, true)]);
        assert_eq!(
            f.canary.verdict("v2").map(|v| v.state),
            Some(VerdictState::Bad)
        );
        // v3 arrives while the bad v2 still serves: v2 is neither rolled back nor restarted.
        f.feed(
            230..260,
            &[
                ("v1", 800.0, false),
                ("v2", 200.0, true),
                ("v3", 200.0, false),
            ],
        );
        assert_eq!(
            f.canary.verdict("v2").map(|v| v.state),
            Some(VerdictState::Bad)
        );
        let v3 = f.canary.verdict("v3").expect("v3 compared");
        assert_eq!(&*v3.baseline, "v1");
        assert_ne!(v3.state, VerdictState::Bad);
        assert!(
            !f.states
                .iter()
                .any(|(c, s)| c == "v2" && *s == VerdictState::RolledBack)
        );
    }

    #[test]
    fn a_crash_looping_bad_candidate_stays_convicted() {
        let mut f = Feeder::new();
        f.feed(0..200, &[("v1", 800.0, false)]);
        f.feed(200..220, &[("v1", 800.0, false), ("v2", 200.0, true)]);
        // Up 5 s, down 20 s, five times.
        for cycle in 0..5 {
            let start = 220 + cycle * 25;
            f.feed(start..start + 20, &[("v1", 800.0, false)]);
            f.feed(
                start + 20..start + 25,
                &[("v1", 800.0, false), ("v2", 200.0, true)],
            );
        }
        let v2: Vec<VerdictState> = f
            .states
            .iter()
            .filter(|(c, _)| c == "v2")
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(v2.last(), Some(&VerdictState::Bad), "{:?}", f.states);
        assert!(!v2.contains(&VerdictState::RolledBack), "{:?}", f.states);
        // Gone for good: rolled back after bad_settle.
        f.feed(345..500, &[("v1", 800.0, false)]);
        assert_eq!(
            f.states.last().map(|(c, s)| (c.as_str(), *s)),
            Some(("v2", VerdictState::RolledBack))
        );
    }

    #[test]
    fn versions_are_ordered_by_first_seen_then_naturally() {
        assert_eq!(natural_cmp("v9", "v10"), Ordering::Less);
        assert_eq!(natural_cmp("v1.10.0", "v1.9.3"), Ordering::Greater);
        assert_eq!(natural_cmp("abc", "abd"), Ordering::Less);
        assert_eq!(natural_cmp("v010", "v10"), Ordering::Equal);
        let (v9, v10): (Arc<str>, Arc<str>) = ("v9".into(), "v10".into());
        assert_eq!(version_order((&v10, 5), (&v9, 6)), Ordering::Less);
        // v9 and v10 first seen together with v9 the bigger: v10 is the candidate.
        let mut f = Feeder::new();
        f.feed(0..30, &[("v9", 800.0, false), ("v10", 200.0, false)]);
        assert!(f.canary.verdict("v10").is_some() && f.canary.verdict("v9").is_none());
    }

    #[test]
    fn late_data_replaces_what_was_counted_for_its_second() {
        let settings = CanarySettings::default();
        let service: Arc<str> = "svc".into();
        let mut rng = SmallRng::seed_from_u64(3);
        let mut canary = Canary::default();
        let mut base = Fleet::new(BASE, INDEPENDENT, 4);
        for t in 0..3 {
            let seconds = BTreeMap::from([(Arc::from("v1"), base.second(&mut rng))]);
            canary.observe(&service, t, seconds, &settings);
        }
        let partial = VersionSecond {
            requests: 100.0,
            errors: 1.0,
            ..Fleet::new(BASE, INDEPENDENT, 1).second(&mut rng)
        };
        let b = base.second(&mut rng);
        canary.observe(
            &service,
            3,
            BTreeMap::from([(Arc::from("v1"), b.clone()), (Arc::from("v2"), partial)]),
            &settings,
        );
        let whole = VersionSecond {
            requests: 400.0,
            errors: 4.0,
            ..Fleet::new(BASE, INDEPENDENT, 2).second(&mut rng)
        };
        let samples = whole.latency.as_ref().map(|(h, _)| h.len());
        canary.correct(
            3,
            BTreeMap::from([(Arc::from("v1"), b), (Arc::from("v2"), whole)]),
        );
        let d = &canary.deployments["v2"];
        assert_eq!(
            (d.candidate_side.requests, d.candidate_side.errors),
            (400.0, 4.0)
        );
        assert_eq!(d.candidate_side.instance_seconds, 2.0);
        assert_eq!(
            d.candidate_side.latency.as_ref().map(Histogram::len),
            samples
        );
        // A correction for a second the comparison never counted changes nothing.
        canary.correct(1, BTreeMap::new());
        assert_eq!(canary.deployments["v2"].candidate_side.requests, 400.0);
    }

    #[test]
    fn a_fitted_model_sees_persistent_shocks_in_the_baselines_history() {
        let mut rng = SmallRng::seed_from_u64(9);
        let mut fleet = Fleet::new(BASE, PERSISTENT, 4);
        let models = Models::fit(&track_of((0..600).map(|_| fleet.second(&mut rng))), 120);
        assert!(models.latency.persistence > 0.8, "{models:?}");
        assert!(models.latency.shock_variance > 0.002, "{models:?}");
        let mut calm = Fleet::new(BASE, INDEPENDENT, 4);
        let models = Models::fit(&track_of((0..600).map(|_| calm.second(&mut rng))), 120);
        assert_eq!(models.latency.shock_variance, 0.0, "{models:?}");
        assert_eq!(
            Models::fit(&track_of(std::iter::empty()), 120).latency,
            NoiseModel::CAUTIOUS
        );
    }

    /// A `min_history` shorter than a fit needs (two seconds, as the integration tests set it) does not leave a
    /// comparison that began with that much history on the cautious models for good: they are fitted once the
    /// baseline has the seconds a fit takes.
    #[test]
    fn a_comparison_begun_on_less_history_than_a_fit_takes_is_fitted_later() {
        let settings = CanarySettings {
            min_history: Duration::from_secs(2),
            ..CanarySettings::default()
        };
        for warmup in 1..=4 {
            let mut rng = SmallRng::seed_from_u64(warmup);
            let service: Arc<str> = "svc".into();
            let mut canary = Canary::default();
            let mut baseline = Fleet::new(BASE, INDEPENDENT, 4);
            let mut candidate = Fleet::new(BASE, INDEPENDENT, 4);
            for t in 0..warmup + 10 {
                let mut versions = BTreeMap::from([(Arc::from("v1"), baseline.second(&mut rng))]);
                if t >= warmup {
                    versions.insert(Arc::from("v2"), candidate.second(&mut rng));
                }
                canary.observe(&service, t as i64, versions, &settings);
            }
            let d = &canary.deployments["v2"];
            assert!(d.fitted_on.complete(3), "warmup {warmup}");
            assert_ne!(d.models.latency, NoiseModel::CAUTIOUS, "warmup {warmup}");
        }
    }

    /// A comparison that began while the baseline was too quiet for a p50 in its seconds (history enough, but no
    /// second with the latencies a p50 takes) does not keep the cautious latency model for good: it is fitted once
    /// the baseline has the seconds with a p50 that a fit takes.
    #[test]
    fn a_comparison_begun_on_seconds_without_a_p50_fits_latency_once_they_have_one() {
        let settings = CanarySettings {
            min_history: Duration::from_secs(5),
            ..CanarySettings::default()
        };
        // Under 20 requests a second: no p50. The candidate smaller still, so the baseline stays the baseline.
        let quiet = Traffic { rps: 10.0, ..BASE };
        let mut rng = SmallRng::seed_from_u64(5);
        let service: Arc<str> = "svc".into();
        let mut canary = Canary::default();
        let mut baseline = Fleet::new(quiet, INDEPENDENT, 2);
        let mut candidate = Fleet::new(Traffic { rps: 1.0, ..BASE }, INDEPENDENT, 1);
        let mut observe =
            |canary: &mut Canary, t: i64, rng: &mut SmallRng, baseline: &mut Fleet| {
                let versions = BTreeMap::from([
                    (Arc::from("v1"), baseline.second(rng)),
                    (Arc::from("v2"), candidate.second(rng)),
                ]);
                canary.observe(&service, t, versions, &settings);
            };
        for t in 0..10 {
            let versions = BTreeMap::from([(Arc::from("v1"), baseline.second(&mut rng))]);
            canary.observe(&service, t, versions, &settings);
        }
        observe(&mut canary, 10, &mut rng, &mut baseline);
        let d = &canary.deployments["v2"];
        assert_eq!(
            d.models.latency,
            NoiseModel::CAUTIOUS,
            "no second had a p50"
        );
        assert!(!d.fitted_on.complete(5));
        baseline.traffic = BASE;
        for t in 11..20 {
            observe(&mut canary, t, &mut rng, &mut baseline);
        }
        let d = &canary.deployments["v2"];
        assert!(d.fitted_on.complete(5), "{:?}", d.fitted_on);
        assert_ne!(d.models.latency, NoiseModel::CAUTIOUS);
    }

    /// The quiet error floors apply only where the baseline's instances, each on its own, show no error shocks
    /// and have errors enough that one would show; one instance's persistent shocks, diluted four times in the
    /// version's sum, show undiluted there.
    #[test]
    fn the_quiet_error_floor_needs_instances_that_show_no_shocks() {
        let mut rng = SmallRng::seed_from_u64(21);
        for seed in 0..3 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut calm = Fleet::new(BASE, INDEPENDENT, 4);
            let models = Models::fit(&track_of((0..600).map(|_| calm.second(&mut rng))), 120);
            assert!(models.quiet_errors, "seed {seed}: {models:?}");
            assert_eq!(models.errors.shock_variance, 0.0);
        }
        let mut shocked = Fleet::new(BASE, PERSISTENT, 4);
        let models = Models::fit(&track_of((0..600).map(|_| shocked.second(&mut rng))), 120);
        assert!(!models.quiet_errors, "{models:?}");
        assert_eq!(
            models.errors.instances, 1.0,
            "the instances' own model: {models:?}"
        );
        assert!(models.errors.shock_variance > 0.1, "{models:?}");
        // Without instances' own counts, or with too few errors to see a shock: the regular floors.
        let mut calm = Fleet::new(BASE, INDEPENDENT, 4);
        let unsplit = (0..600).map(|_| VersionSecond {
            per_instance: Vec::new(),
            ..calm.second(&mut rng)
        });
        assert!(!Models::fit(&track_of(unsplit), 120).quiet_errors);
        let mut thin = Fleet::new(Traffic { rps: 10.0, ..BASE }, INDEPENDENT, 4);
        let models = Models::fit(&track_of((0..600).map(|_| thin.second(&mut rng))), 120);
        assert!(!models.quiet_errors, "{models:?}");
    }

    /// On a quiet baseline, twice the errors (under the regular 1.75x floor's reach) is convicted in minutes.
    #[test]
    fn a_quiet_baseline_convicts_twice_the_errors() {
        let two_x_errors = Traffic {
            error_ratio: BASE.error_ratio * 2.0,
            ..BASE
        };
        for seed in 0..3 {
            let changes = run(200 + seed, two_x_errors, INDEPENDENT, 600, 300);
            let (after, why) = first_bad(&changes).unwrap_or_else(|| panic!("seed {seed}"));
            assert_eq!(why, "error_ratio", "seed {seed}");
            assert!(after <= 300, "seed {seed}: {after}");
        }
    }
}
