//! Rule evaluation on one sealed second, and the per-group lifecycle ok -> pending -> firing -> resolved.
//! Pure: no I/O, no tokio; the time is an argument.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::model::{SealedSecond, SeriesSummary, Stats};

use super::config::{Rule, SplitBy, Stat};

/// The value of one statistic of one series.
pub(crate) fn stat_value(summary: &SeriesSummary, stat: Stat) -> Option<f64> {
    match (&summary.stats, stat) {
        (Stats::Counter { sum }, Stat::Rate | Stat::Sum) => Some(*sum),
        (Stats::Histogram { count, .. }, Stat::Rate | Stat::Sum) => Some(*count as f64),
        (Stats::Histogram { count: 0, .. }, _) => None,
        (Stats::Histogram { mean, .. }, Stat::Mean) => Some(*mean),
        (Stats::Histogram { max, .. }, Stat::Max) => Some(*max),
        (Stats::Histogram { p50, .. }, Stat::P50) => Some(*p50),
        (Stats::Histogram { p90, .. }, Stat::P90) => Some(*p90),
        (Stats::Histogram { p99, .. }, Stat::P99) => Some(*p99),
        (Stats::Histogram { p999, .. }, Stat::P999) => Some(*p999),
        (Stats::Gauge { mean, .. }, Stat::Mean) => Some(*mean),
        (Stats::Gauge { max, .. }, Stat::Max) => Some(*max),
        (Stats::Gauge { min, .. }, Stat::Min) => Some(*min),
        (Stats::Gauge { sum, .. }, Stat::Rate | Stat::Sum) => Some(*sum),
        _ => None,
    }
}

/// One evaluated group of a rule: which split and tags, and its labels for people.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Group {
    /// `version` / `zone` of the split, when the rule splits.
    pub(crate) version: Option<Arc<str>>,
    /// Zone of the split.
    pub(crate) zone: Option<Arc<str>>,
    /// The series' tags.
    pub(crate) tags: BTreeMap<Arc<str>, Arc<str>>,
}

impl Group {
    /// The group a merged series belongs to.
    pub(crate) fn of(series: &SeriesSummary) -> Self {
        Self {
            version: series.version.clone(),
            zone: series.zone.clone(),
            tags: (*series.tags).clone(),
        }
    }

    /// The group, borrowed.
    pub(crate) fn borrowed(&self) -> GroupRef<'_> {
        (&self.version, &self.zone, &self.tags)
    }

    /// Labels identifying the group: version, zone and tags.
    pub(crate) fn labels(&self) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> = self
            .tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(v) = &self.version {
            labels.insert("version".into(), v.to_string());
        }
        if let Some(z) = &self.zone {
            labels.insert("zone".into(), z.to_string());
        }
        labels
    }
}

fn split_matches(rule: &Rule, s: &SeriesSummary) -> bool {
    match (&s.version, &s.zone) {
        (None, None) => rule.split_by.is_empty(),
        (Some(_), None) => rule.split_by.contains(&SplitBy::Version),
        (None, Some(_)) => rule.split_by.contains(&SplitBy::Zone),
        (Some(_), Some(_)) => false,
    }
}

fn tags_match(rule: &Rule, s: &SeriesSummary) -> bool {
    rule.tags
        .iter()
        .all(|(k, v)| s.tags.get(k.as_str()).is_some_and(|t| **t == **v))
}

/// A group, borrowed from the series it is read from or from a [`Group`]: what a ratio pairs numerators and
/// denominators by, and what the evaluator looks its trackers up by, without cloning anything.
pub(crate) type GroupRef<'a> = (
    &'a Option<Arc<str>>,
    &'a Option<Arc<str>>,
    &'a BTreeMap<Arc<str>, Arc<str>>,
);

/// The group of a merged series, borrowed.
pub(crate) fn group_ref(s: &SeriesSummary) -> GroupRef<'_> {
    (&s.version, &s.zone, &s.tags)
}

/// The rule's value for every group present in the second, with the series (the numerator's, for a ratio) whose
/// group it is ([`Group::of`]). Nothing is cloned: a large service has tens of thousands of groups a second, and
/// most of them are only compared with the threshold.
pub(crate) fn evaluate<'a>(rule: &Rule, sealed: &'a SealedSecond) -> Vec<(&'a SeriesSummary, f64)> {
    if !rule.applies_to(&sealed.service) {
        return Vec::new();
    }
    let wanted = |s: &&SeriesSummary| split_matches(rule, s) && tags_match(rule, s);
    match (&rule.stat, &rule.over) {
        (Stat::Ratio, Some(over)) => {
            let denominators: HashMap<GroupRef<'_>, f64, foldhash::fast::RandomState> = sealed
                .series
                .iter()
                .filter(|s| *s.metric == **over)
                .filter(wanted)
                .filter_map(|s| stat_value(s, Stat::Sum).map(|v| (group_ref(s), v)))
                .collect();
            sealed
                .series
                .iter()
                .filter(|s| *s.metric == *rule.metric)
                .filter(wanted)
                .filter_map(|s| {
                    let denominator = *denominators.get(&group_ref(s))?;
                    let numerator = stat_value(s, Stat::Sum)?;
                    (denominator > 0.0).then(|| (s, numerator / denominator))
                })
                .collect()
        }
        (stat, _) => sealed
            .series
            .iter()
            .filter(|s| *s.metric == *rule.metric)
            .filter(wanted)
            .filter_map(|s| stat_value(s, *stat).map(|v| (s, v)))
            .collect(),
    }
}

/// A change of an alert's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Transition {
    /// The condition holds, not yet for long enough.
    Pending {
        /// First second of the breach.
        since: i64,
    },
    /// The condition stopped before firing.
    Cleared {
        /// First second of the abandoned breach.
        since: i64,
    },
    /// The condition held for the rule's `for`.
    Firing {
        /// First second of the breach.
        since: i64,
    },
    /// The condition has been clear for the rule's `keep_firing_for`.
    Resolved {
        /// First second of the breach that fired.
        since: i64,
    },
}

/// Lifecycle of one (rule, service, group).
#[derive(Debug, Clone, Default)]
pub(crate) struct Tracker {
    breach_since: Option<i64>,
    firing_since: Option<i64>,
    clear_since: Option<i64>,
    /// The most recent value seen.
    pub(crate) last_value: Option<f64>,
    /// The second of that value.
    pub(crate) valued_in: Option<i64>,
}

impl Tracker {
    /// Whether nothing is going on (can be forgotten).
    pub(crate) fn is_quiet(&self) -> bool {
        self.breach_since.is_none() && self.firing_since.is_none()
    }

    /// Feeds second `t`'s value (`None`: no data, which is not a breach).
    pub(crate) fn observe(
        &mut self,
        rule: &Rule,
        t: i64,
        value: Option<f64>,
    ) -> Option<Transition> {
        if value.is_some() {
            self.last_value = value;
            self.valued_in = Some(t);
        }
        let breach = value.is_some_and(|v| rule.breaches(v));
        if breach {
            self.clear_since = None;
            let since = *self.breach_since.get_or_insert(t);
            if self.firing_since.is_some() {
                return None;
            }
            let held = t - since + 1;
            if held >= i64::from(rule.for_secs.max(1)) {
                self.firing_since = Some(since);
                return Some(Transition::Firing { since });
            }
            return (held == 1).then_some(Transition::Pending { since });
        }
        let abandoned = self.breach_since.take();
        match self.firing_since {
            Some(since) => {
                let clear = *self.clear_since.get_or_insert(t);
                if t - clear + 1 >= i64::from(rule.keep_firing_for_secs.max(1)) {
                    self.firing_since = None;
                    self.clear_since = None;
                    return Some(Transition::Resolved { since });
                }
                None
            }
            None => abandoned.map(|since| Transition::Cleared { since }),
        }
    }

    /// Forces resolution (the rule was removed).
    pub(crate) fn resolve_now(&mut self) -> Option<Transition> {
        self.breach_since = None;
        self.clear_since = None;
        self.firing_since
            .take()
            .map(|since| Transition::Resolved { since })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::alerting::rules::config::{Comparison, DEFAULT_KEEP_FIRING_FOR_SECS};

    fn rule(stat: Stat, threshold: f64, for_secs: u32) -> Rule {
        Rule {
            name: "r".into(),
            service: Some("svc".into()),
            metric: "m".into(),
            stat,
            over: None,
            comparison: Comparison::Above,
            threshold,
            for_secs,
            keep_firing_for_secs: DEFAULT_KEEP_FIRING_FOR_SECS,
            split_by: vec![],
            tags: BTreeMap::new(),
            owner: None,
        }
    }

    /// One series of service `svc`, from one instance, for rule tests here and in `rules`.
    pub(in crate::alerting::rules) fn summary(
        metric: &str,
        version: Option<&str>,
        stats: Stats,
    ) -> SeriesSummary {
        SeriesSummary {
            service: "svc".into(),
            metric: metric.into(),
            tags: Default::default(),
            version: version.map(Into::into),
            zone: None,
            instances: 1,
            stats,
        }
    }

    fn sealed(series: Vec<SeriesSummary>) -> SealedSecond {
        SealedSecond {
            service: "svc".into(),
            t: 1,
            correction: false,
            series,
            instances: vec![],
        }
    }

    fn hist(p99: f64) -> Stats {
        Stats::Histogram {
            count: 100,
            mean: 1.0,
            p50: 1.0,
            p90: 2.0,
            p99,
            p999: p99,
            max: p99,
        }
    }

    #[test]
    fn values_by_stat_split_and_ratio() {
        let second = sealed(vec![
            summary("m", None, hist(300.0)),
            summary("m", Some("v1"), hist(100.0)),
            summary("m", Some("v2"), hist(900.0)),
            summary("errors", None, Stats::Counter { sum: 5.0 }),
            summary("requests", None, Stats::Counter { sum: 100.0 }),
            summary("errors", Some("v2"), Stats::Counter { sum: 4.0 }),
            summary("requests", Some("v2"), Stats::Counter { sum: 0.0 }),
        ]);
        let whole = rule(Stat::P99, 250.0, 0);
        assert_eq!(
            evaluate(&whole, &second)
                .iter()
                .map(|(_, v)| *v)
                .collect::<Vec<_>>(),
            [300.0]
        );
        let split = Rule {
            split_by: vec![SplitBy::Version],
            ..rule(Stat::P99, 250.0, 0)
        };
        let mut by_version: Vec<(Option<Arc<str>>, f64)> = evaluate(&split, &second)
            .into_iter()
            .map(|(s, v)| (Group::of(s).version, v))
            .collect();
        by_version.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            by_version,
            vec![(Some("v1".into()), 100.0), (Some("v2".into()), 900.0)]
        );
        let ratio = Rule {
            metric: "errors".into(),
            over: Some("requests".into()),
            ..rule(Stat::Ratio, 0.02, 0)
        };
        assert_eq!(
            evaluate(&ratio, &second)
                .iter()
                .map(|(_, v)| *v)
                .collect::<Vec<_>>(),
            [0.05]
        );
        // A zero denominator gives no value, not a division by zero.
        let ratio_split = Rule {
            split_by: vec![SplitBy::Version],
            ..ratio.clone()
        };
        assert!(evaluate(&ratio_split, &second).is_empty());
        let other_service = Rule {
            service: Some("other".into()),
            ..rule(Stat::P99, 1.0, 0)
        };
        assert!(evaluate(&other_service, &second).is_empty());
        assert_eq!(
            stat_value(
                &summary(
                    "g",
                    None,
                    Stats::Gauge {
                        min: 1.0,
                        max: 3.0,
                        mean: 2.0,
                        sum: 4.0
                    }
                ),
                Stat::Min
            ),
            Some(1.0)
        );
        assert_eq!(
            stat_value(&summary("c", None, Stats::Counter { sum: 1.0 }), Stat::P99),
            None
        );
    }

    #[test]
    fn lifecycle_table() {
        use Transition::*;
        // (for_secs, keep_firing_for_secs, values per second from t=10, expected transitions)
        type Case = (u32, u32, Vec<Option<f64>>, Vec<(i64, Transition)>);
        let bad = Some(10.0);
        let good = Some(0.0);
        let cases: Vec<Case> = vec![
            // for 0s: the first bad second fires; the first good second resolves with keep 1s.
            (
                0,
                1,
                vec![good, bad, bad, good],
                vec![(11, Firing { since: 11 }), (13, Resolved { since: 11 })],
            ),
            // for 2s: pending, then firing on the second bad second.
            (
                2,
                1,
                vec![bad, bad, good],
                vec![
                    (10, Pending { since: 10 }),
                    (11, Firing { since: 10 }),
                    (12, Resolved { since: 10 }),
                ],
            ),
            // for 3s interrupted: pending, cleared, pending again.
            (
                3,
                1,
                vec![bad, bad, good, bad],
                vec![
                    (10, Pending { since: 10 }),
                    (12, Cleared { since: 10 }),
                    (13, Pending { since: 13 }),
                ],
            ),
            // keep firing 3s: a flap inside the window does not resolve or re-fire.
            (
                0,
                3,
                vec![bad, good, good, bad, good, good, good],
                vec![(10, Firing { since: 10 }), (16, Resolved { since: 10 })],
            ),
            // no data is not a breach.
            (
                0,
                1,
                vec![bad, None],
                vec![(10, Firing { since: 10 }), (11, Resolved { since: 10 })],
            ),
        ];
        for (for_secs, keep, values, expected) in cases {
            let r = Rule {
                keep_firing_for_secs: keep,
                ..rule(Stat::P99, 5.0, for_secs)
            };
            let mut tracker = Tracker::default();
            let got: Vec<(i64, Transition)> = values
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    let t = 10 + i as i64;
                    tracker.observe(&r, t, *v).map(|tr| (t, tr))
                })
                .collect();
            assert_eq!(
                got, expected,
                "for {for_secs} keep {keep} values {values:?}"
            );
        }
    }

    #[test]
    fn below_rules_fire_on_low_values() {
        let r = Rule {
            comparison: Comparison::Below,
            ..rule(Stat::Rate, 10.0, 0)
        };
        let mut t = Tracker::default();
        assert_eq!(t.observe(&r, 1, Some(50.0)), None);
        assert_eq!(
            t.observe(&r, 2, Some(3.0)),
            Some(Transition::Firing { since: 2 })
        );
        assert_eq!(t.resolve_now(), Some(Transition::Resolved { since: 2 }));
    }
}
