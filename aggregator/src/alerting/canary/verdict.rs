//! What the canary says about a candidate, as the API, the websocket and alert evidence show it. A leaf: imports
//! nothing of the crate.

use std::sync::Arc;

use serde::Serialize;

/// Where a candidate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum VerdictState {
    /// Fewer candidate instance-seconds than a verdict needs.
    Collecting,
    /// Nothing is credibly worse than its floor, but the evidence cannot rule that out yet either.
    InsufficientTraffic,
    /// Every check rules out its floor: the candidate is credibly no worse than the floors allow.
    Healthy,
    /// Significantly worse: see the evidence.
    Bad,
    /// The baseline is gone and the candidate remains.
    Promoted,
    /// The candidate is gone and the baseline remains.
    RolledBack,
}

/// One check's numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Evidence {
    /// `error_ratio`, `p50` or `p99`.
    pub(crate) metric: &'static str,
    /// Candidate value (ratio, or milliseconds).
    pub(crate) candidate: f64,
    /// Baseline value.
    pub(crate) baseline: f64,
    /// The floor `bad` is tested against: how many times the baseline's value the candidate's must credibly
    /// exceed (for errors, the quiet floor on a quiet baseline, and the absolute increase as a factor).
    pub(crate) floor: f64,
    /// Standard errors the estimate is above its floor.
    pub(crate) z: f64,
    /// Mixture likelihood ratio against the floor; bad needs `>= 3 / alpha` (alpha is split over the checks).
    pub(crate) likelihood_ratio: f64,
    /// Candidate samples (requests or latency values).
    pub(crate) candidate_samples: u64,
    /// Baseline samples.
    pub(crate) baseline_samples: u64,
    /// Whether this check says bad.
    pub(crate) bad: bool,
    /// Whether the check's always-valid upper bound is under its floor (the candidate is credibly fine on it).
    pub(crate) ruled_out: bool,
}

/// The canary's verdict on one candidate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Verdict {
    /// Service.
    pub(crate) service: Arc<str>,
    /// The new version.
    pub(crate) candidate: Arc<str>,
    /// The version it is compared with.
    pub(crate) baseline: Arc<str>,
    /// Where it stands.
    pub(crate) state: VerdictState,
    /// First second the candidate reported.
    pub(crate) since: i64,
    /// The second this verdict is about.
    pub(crate) t: i64,
    /// The check that made it bad.
    pub(crate) reason: Option<Evidence>,
    /// Every check with enough data, newest numbers.
    pub(crate) checks: Vec<Evidence>,
    /// Who deployed the candidate (its instances' `deployer` label).
    pub(crate) deployer: Option<Arc<str>>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A healthy verdict on `v2` against `v1`.
    pub(crate) fn verdict(service: &str) -> Verdict {
        Verdict {
            service: service.into(),
            candidate: "v2".into(),
            baseline: "v1".into(),
            state: VerdictState::Healthy,
            since: 1,
            t: 2,
            reason: None,
            checks: Vec::new(),
            deployer: None,
        }
    }
}
