//! Threshold rules: the file format ([`config`]), evaluation and lifecycle ([`eval`], pure), and the per-service
//! [`Evaluator`] a shard runs on every sealed second, which turns lifecycle changes into [`AlertEvent`]s.

pub mod config;
pub mod eval;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::model::SealedSecond;

pub use config::{Format, Owner, Rule, RuleSet, RulesError, Step, parse_rules};
use eval::{Group, Tracker, Transition};
pub use store::{RulesStore, StoreError};

/// What happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Breaching, not yet for long enough.
    Pending,
    /// Stopped breaching before firing.
    Cleared,
    /// Firing: people are told.
    Firing,
    /// Over: everyone who was told is told.
    Resolved,
}

/// A lifecycle change, from a shard to the alert manager.
#[derive(Debug, Clone)]
pub struct AlertEvent {
    /// Stable id: the same for pending, firing and resolved of one breach.
    pub id: String,
    /// What happened.
    pub kind: EventKind,
    /// The rule's name (or `canary` for automatic verdicts).
    pub rule: Arc<str>,
    /// Whose escalation chains to walk (merged by `after`).
    pub owners: Vec<String>,
    /// The service.
    pub service: Arc<str>,
    /// Version, zone and tags of the group.
    pub labels: BTreeMap<String, String>,
    /// The metric and statistic, for people.
    pub summary: String,
    /// The value that crossed (or the last value seen).
    pub value: Option<f64>,
    /// The threshold.
    pub threshold: f64,
    /// First second of the breach.
    pub since: i64,
    /// Wall clock of the event, unix milliseconds.
    pub at_ms: i64,
    /// Extra evidence (canary verdicts), free-form JSON.
    pub evidence: Option<serde_json::Value>,
    /// What to do about it.
    pub hint: Option<String>,
}

/// A stable alert id from what identifies one breach.
pub fn alert_id(
    rule: &str,
    service: &str,
    labels: &BTreeMap<String, String>,
    since: i64,
) -> String {
    let mut h = Sha256::new();
    for part in [rule, service] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for (k, v) in labels {
        h.update(k.as_bytes());
        h.update([1]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    h.update(since.to_be_bytes());
    hex::encode(&h.finalize()[..8])
}

/// One service's rule trackers, owned by the shard that owns the service.
#[derive(Debug, Default)]
pub struct Evaluator {
    trackers: HashMap<(Arc<str>, Group), Tracker>,
}

impl Evaluator {
    /// Evaluates every rule on a freshly sealed second; returns the lifecycle changes.
    pub fn on_sealed(
        &mut self,
        rules: &RuleSet,
        sealed: &SealedSecond,
        now_ms: i64,
    ) -> Vec<AlertEvent> {
        let mut events = Vec::new();
        // Rules removed or no longer applying: resolve what fires, forget the rest.
        self.trackers.retain(|(name, group), tracker| {
            let alive = rules
                .rules
                .iter()
                .any(|r| r.name == *name && r.applies_to(&sealed.service));
            if !alive && let Some(Transition::Resolved { since }) = tracker.resolve_now() {
                events.push(event(
                    EventKind::Resolved,
                    name,
                    Vec::new(),
                    sealed,
                    group,
                    tracker.last_value,
                    f64::NAN,
                    since,
                    now_ms,
                    String::new(),
                ));
            }
            alive
        });
        for rule in rules.rules.iter().filter(|r| r.applies_to(&sealed.service)) {
            let values = eval::evaluate(rule, sealed);
            let mut seen: Vec<&Group> = Vec::with_capacity(values.len());
            for (group, value) in &values {
                seen.push(group);
                let tracker = self
                    .trackers
                    .entry((rule.name.clone(), group.clone()))
                    .or_default();
                if let Some(transition) = tracker.observe(rule, sealed.t, Some(*value)) {
                    events.push(rule_event(
                        rule,
                        sealed,
                        group,
                        Some(*value),
                        transition,
                        now_ms,
                    ));
                }
            }
            // Groups that had no data this second.
            for ((name, group), tracker) in self.trackers.iter_mut() {
                if *name != rule.name || seen.contains(&group) {
                    continue;
                }
                if let Some(transition) = tracker.observe(rule, sealed.t, None) {
                    events.push(rule_event(
                        rule,
                        sealed,
                        group,
                        tracker.last_value,
                        transition,
                        now_ms,
                    ));
                }
            }
        }
        self.trackers.retain(|_, t| !t.is_quiet());
        events
    }
}

fn rule_event(
    rule: &Rule,
    sealed: &SealedSecond,
    group: &Group,
    value: Option<f64>,
    transition: Transition,
    now_ms: i64,
) -> AlertEvent {
    let (kind, since) = match transition {
        Transition::Pending { since } => (EventKind::Pending, since),
        Transition::Cleared { since } => (EventKind::Cleared, since),
        Transition::Firing { since } => (EventKind::Firing, since),
        Transition::Resolved { since } => (EventKind::Resolved, since),
    };
    let summary = match &rule.over {
        Some(over) => format!(
            "{} / {} {:?} {}",
            rule.metric, over, rule.comparison, rule.threshold
        ),
        None => format!(
            "{} {} {:?} {}",
            rule.metric, rule.stat, rule.comparison, rule.threshold
        ),
    }
    .to_lowercase();
    event(
        kind,
        &rule.name,
        rule.owner.iter().cloned().collect(),
        sealed,
        group,
        value,
        rule.threshold,
        since,
        now_ms,
        summary,
    )
}

#[allow(clippy::too_many_arguments)]
fn event(
    kind: EventKind,
    rule: &Arc<str>,
    owners: Vec<String>,
    sealed: &SealedSecond,
    group: &Group,
    value: Option<f64>,
    threshold: f64,
    since: i64,
    now_ms: i64,
    summary: String,
) -> AlertEvent {
    let labels = group.labels();
    AlertEvent {
        id: alert_id(rule, &sealed.service, &labels, since),
        kind,
        rule: rule.clone(),
        owners,
        service: sealed.service.clone(),
        labels,
        summary,
        value,
        threshold,
        since,
        at_ms: now_ms,
        evidence: None,
        hint: None,
    }
}

#[cfg(test)]
mod tests {
    use super::eval::tests::summary;
    use super::*;
    use crate::model::Stats;

    fn second(t: i64, errors: f64) -> SealedSecond {
        let counter = |metric: &str, version: Option<&str>, sum: f64| {
            summary(metric, version, Stats::Counter { sum })
        };
        SealedSecond {
            service: "svc".into(),
            t,
            correction: false,
            series: vec![
                counter("errors", None, errors),
                counter("errors", Some("v2"), errors),
            ],
            instances: vec![],
        }
    }

    #[test]
    fn evaluator_fires_resolves_with_stable_ids_and_resolves_removed_rules() {
        let rules = parse_rules(
            "[[rules]]\nname = \"e\"\nmetric = \"errors\"\nstat = \"sum\"\nabove = 5.0\nkeep_firing_for = \"1s\"\nsplit_by = [\"version\"]\n",
        )
        .unwrap();
        let mut evaluator = Evaluator::default();
        assert!(
            evaluator
                .on_sealed(&rules, &second(10, 1.0), 11_000)
                .is_empty()
        );
        let fired = evaluator.on_sealed(&rules, &second(11, 9.0), 12_004);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].kind, EventKind::Firing);
        assert_eq!(
            fired[0].labels.get("version").map(String::as_str),
            Some("v2")
        );
        assert_eq!(fired[0].since, 11);
        let resolved = evaluator.on_sealed(&rules, &second(12, 0.0), 13_004);
        assert_eq!(resolved[0].kind, EventKind::Resolved);
        assert_eq!(resolved[0].id, fired[0].id);
        // Fire again, then remove the rule: it resolves.
        let again = evaluator.on_sealed(&rules, &second(13, 9.0), 14_004);
        assert_ne!(again[0].id, fired[0].id, "a new breach is a new alert");
        let gone = evaluator.on_sealed(&RuleSet::default(), &second(14, 9.0), 15_004);
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].kind, gone[0].id.as_str()),
            (EventKind::Resolved, again[0].id.as_str())
        );
    }
}
