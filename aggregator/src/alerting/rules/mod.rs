//! Threshold rules: the file format ([`config`]), evaluation and lifecycle ([`eval`], pure), and the per-service
//! [`Evaluator`] a shard runs on every sealed second, which turns lifecycle changes into [`AlertEvent`]s.

pub(crate) mod config;
pub(crate) mod eval;
pub(crate) mod store;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::model::{SealedSecond, SeriesSummary};

use crate::alerting::event::{AlertEvent, EventKind, alert_id};
#[cfg(test)]
use config::parse_rules;
pub(crate) use config::{Rule, RuleSet, WebhookPolicy};
use eval::{Group, Tracker, Transition};
pub(crate) use store::{RulesStore, StoreError};

/// One service's rule trackers, owned by the shard that owns the service.
#[derive(Debug, Default)]
pub(crate) struct Evaluator {
    trackers: HashMap<(Arc<str>, Group), Tracker>,
}

impl Evaluator {
    /// Evaluates every rule on a freshly sealed second; returns the lifecycle changes.
    pub(crate) fn on_sealed(
        &mut self,
        rules: &RuleSet,
        sealed: &SealedSecond,
        now_ms: i64,
    ) -> Vec<AlertEvent> {
        let mut events = Vec::new();
        let applying: Vec<&Arc<Rule>> = rules.applying(&sealed.service).collect();
        // Rules removed or no longer applying: resolve what fires, forget the rest.
        self.trackers.retain(|(name, group), tracker| {
            let alive = applying.iter().any(|r| r.name == *name);
            if !alive && let Some(Transition::Resolved { since }) = tracker.resolve_now() {
                events.push(event(
                    EventKind::Resolved,
                    name,
                    Vec::new(),
                    &sealed.service,
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
        for rule in applying {
            // Only groups that breach, or whose alert is under way, are tracked: a group within its threshold and
            // without a tracker would get a tracker that changes nothing and is forgotten at the end of the
            // second. A large service has tens of thousands of groups; keeping a tracker for each, and checking
            // each against the list of groups seen, took seconds per second (the `rules` kernel bench).
            // (Looked up by reference, and only once a value within the threshold needs it: cloning every group
            // to look it up cost more than the rest together. A second has one series per metric, split and tags,
            // so each group has one value per rule: the set taken before the loop stays true through it.)
            let mut tracked: Option<HashSet<eval::GroupRef<'_>, foldhash::fast::RandomState>> =
                None;
            let trackers = &self.trackers;
            let due: Vec<(&SeriesSummary, f64)> = eval::evaluate(rule, sealed)
                .into_iter()
                .filter(|(series, value)| {
                    rule.breaches(*value)
                        || tracked
                            .get_or_insert_with(|| {
                                trackers
                                    .keys()
                                    .filter(|(name, _)| *name == rule.name)
                                    .map(|(_, group)| group.borrowed())
                                    .collect()
                            })
                            .contains(&eval::group_ref(series))
                })
                .collect();
            drop(tracked);
            for (series, value) in due {
                let key = (rule.name.clone(), Group::of(series));
                let tracker = self.trackers.entry(key.clone()).or_default();
                let transition = tracker.observe(rule, sealed.t, Some(value));
                let (_, group) = key;
                if let Some(transition) = transition {
                    events.push(rule_event(
                        rule,
                        sealed,
                        &group,
                        Some(value),
                        transition,
                        now_ms,
                    ));
                }
            }
            // Tracked groups that had no data this second.
            for ((name, group), tracker) in self.trackers.iter_mut() {
                if *name != rule.name || tracker.valued_in == Some(sealed.t) {
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

    /// The service stopped reporting: whatever fires resolves (everyone told is told), and every tracker is
    /// forgotten. No second is evaluated; there is none.
    pub(crate) fn on_service_gone(&mut self, service: &Arc<str>, now_ms: i64) -> Vec<AlertEvent> {
        let mut events = Vec::new();
        for ((name, group), mut tracker) in self.trackers.drain() {
            if let Some(Transition::Resolved { since }) = tracker.resolve_now() {
                events.push(event(
                    EventKind::Resolved,
                    &name,
                    Vec::new(),
                    service,
                    &group,
                    tracker.last_value,
                    f64::NAN,
                    since,
                    now_ms,
                    String::new(),
                ));
            }
        }
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
        &sealed.service,
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
    service: &Arc<str>,
    group: &Group,
    value: Option<f64>,
    threshold: f64,
    since: i64,
    now_ms: i64,
    summary: String,
) -> AlertEvent {
    let labels = group.labels();
    AlertEvent {
        id: alert_id(rule, service, &labels, since),
        kind,
        rule: rule.clone(),
        owners,
        service: service.clone(),
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

    /// Fires on more than 5 errors in a second, per version, and stops 1 s after it stops breaching.
    fn errors_by_version() -> RuleSet {
        parse_rules(
            "[[rules]]\nname = \"e\"\nmetric = \"errors\"\nstat = \"sum\"\nabove = 5.0\nkeep_firing_for = \"1s\"\nsplit_by = [\"version\"]\n",
        )
        .unwrap()
    }

    #[test]
    fn evaluator_fires_resolves_with_stable_ids_and_resolves_removed_rules() {
        let rules = errors_by_version();
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

    #[test]
    fn a_service_that_goes_away_resolves_what_fires_and_forgets_the_rest() {
        let rules = errors_by_version();
        let mut evaluator = Evaluator::default();
        let fired = evaluator.on_sealed(&rules, &second(11, 9.0), 12_004);
        assert_eq!(fired[0].kind, EventKind::Firing);
        let service: Arc<str> = "svc".into();
        let gone = evaluator.on_service_gone(&service, 200_000);
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].kind, gone[0].id.as_str(), gone[0].at_ms),
            (EventKind::Resolved, fired[0].id.as_str(), 200_000)
        );
        assert!(evaluator.on_service_gone(&service, 200_001).is_empty());
    }

    /// What evaluating `sealed` changes, evaluated the simple way: every group that has a value gets a tracker, and
    /// the groups without one this second are looked for in the list of those with one. The evaluator tracks only
    /// the groups that need it; it must change exactly the same.
    fn evaluated_simply(
        trackers: &mut HashMap<(Arc<str>, Group), Tracker>,
        rules: &RuleSet,
        sealed: &SealedSecond,
    ) -> Vec<String> {
        let mut events = Vec::new();
        for rule in &rules.rules {
            let values = eval::evaluate(rule, sealed);
            let seen: Vec<Group> = values.iter().map(|(s, _)| Group::of(s)).collect();
            for (series, value) in &values {
                let group = Group::of(series);
                let tracker = trackers
                    .entry((rule.name.clone(), group.clone()))
                    .or_default();
                if let Some(transition) = tracker.observe(rule, sealed.t, Some(*value)) {
                    events.push(rule_event(
                        rule,
                        sealed,
                        &group,
                        Some(*value),
                        transition,
                        0,
                    ));
                }
            }
            for ((name, group), tracker) in trackers.iter_mut() {
                if *name != rule.name || seen.contains(group) {
                    continue;
                }
                if let Some(transition) = tracker.observe(rule, sealed.t, None) {
                    let value = tracker.last_value;
                    events.push(rule_event(rule, sealed, group, value, transition, 0));
                }
            }
        }
        trackers.retain(|_, t| !t.is_quiet());
        let mut events: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
        events.sort();
        events
    }

    #[test]
    fn only_tracking_the_groups_that_need_it_changes_nothing() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        let rules = parse_rules(
            r#"
[[rules]]
name = "slow"
metric = "latency"
stat = "p99"
above = 500.0
for = "2s"
keep_firing_for = "2s"
split_by = ["version"]

[[rules]]
name = "errors"
metric = "errors"
stat = "ratio"
over = "requests"
above = 0.05
split_by = ["version", "zone"]

[[rules]]
name = "quiet"
metric = "requests"
stat = "rate"
below = 50.0
"#,
        )
        .unwrap();
        let mut rng = SmallRng::seed_from_u64(7);
        let (mut evaluator, mut simple) = (Evaluator::default(), HashMap::new());
        // 40 routes whose latency and errors flip between good and bad now and then, each present in most seconds.
        let mut bad = [false; 40];
        let mut events = 0;
        for t in 0..300 {
            let mut series = Vec::new();
            for (route, bad) in bad.iter_mut().enumerate() {
                if rng.random_bool(0.15) {
                    *bad = !*bad;
                }
                if rng.random_bool(0.1) {
                    continue;
                }
                for (version, zone) in [
                    (None, None),
                    (Some("v1"), None),
                    (Some("v2"), None),
                    (None, Some("z1")),
                ] {
                    let mut one = |metric: &str, stats: Stats| {
                        let mut s = summary(metric, version, stats);
                        s.zone = zone.map(Into::into);
                        s.tags = Arc::new([("route".into(), format!("/r{route}").into())].into());
                        series.push(s);
                    };
                    let requests = rng.random_range(0.0..200.0_f64).floor();
                    let errors = requests * if *bad { 0.2 } else { 0.01 };
                    one("requests", Stats::Counter { sum: requests });
                    one("errors", Stats::Counter { sum: errors });
                    let p99 = if *bad { 900.0 } else { 100.0 };
                    one(
                        "latency",
                        Stats::Histogram {
                            count: 10,
                            mean: p99 / 2.0,
                            p50: p99 / 2.0,
                            p90: p99,
                            p99,
                            p999: p99,
                            max: p99,
                        },
                    );
                }
            }
            let sealed = SealedSecond {
                service: "svc".into(),
                t,
                correction: false,
                series,
                instances: vec![],
            };
            let mut tracked: Vec<String> = evaluator
                .on_sealed(&rules, &sealed, 0)
                .iter()
                .map(|e| format!("{e:?}"))
                .collect();
            tracked.sort();
            assert_eq!(
                tracked,
                evaluated_simply(&mut simple, &rules, &sealed),
                "second {t}"
            );
            events += tracked.len();
        }
        // Every kind of change happened, many times.
        assert!(events > 1_000, "{events} events");
        // And what is tracked after it is the same: the groups under way.
        let keys = |m: &HashMap<(Arc<str>, Group), Tracker>| {
            let mut k: Vec<String> = m.keys().map(|k| format!("{k:?}")).collect();
            k.sort();
            k
        };
        assert!(!simple.is_empty());
        assert_eq!(keys(&evaluator.trackers), keys(&simple));
    }
}
