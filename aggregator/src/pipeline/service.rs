//! One service's state inside its shard, and the transitions that move it: a snapshot applied, a second sealed
//! (rules and canary judge it, then it is published), a late second's correction published, the service evicted.
//! The shard only decides when each happens.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hdrhistogram::Histogram;
use strobe_proto::clock;

use crate::alerting::alerts::Alerts;
use crate::alerting::canary::alert::canary_alert;
use crate::alerting::canary::inputs::{SeriesNumber, VersionSecond, per_version, version_seconds};
use crate::alerting::canary::{Canary, CanarySettings};
use crate::alerting::rules::{Evaluator, RulesStore};
use crate::health::{DropReason, Health, millis_as_seconds};
use crate::model::{InstanceSecond, MainMetrics, SealedSecond, Split};
use crate::pipeline::merge::Cell;
use crate::pipeline::windows::{Applied, Arrivals, OpenSecond, ServiceWindows, WindowSettings};
use crate::publish::Hub;

/// What every service's transitions need, shared by all shards.
pub(crate) struct ServiceContext {
    /// Where sealed seconds, corrections and verdicts go.
    pub(crate) hub: Arc<Hub>,
    /// The aggregator's counters.
    pub(crate) health: Arc<Health>,
    /// Grace, late window, cell limit.
    pub(crate) settings: WindowSettings,
    /// The rules in force.
    pub(crate) rules: Arc<RulesStore>,
    /// Where rule and canary lifecycle events go (never waits).
    pub(crate) alerts: Alerts,
    /// Canary thresholds.
    pub(crate) canary: CanarySettings,
    /// The request, error and latency metrics.
    pub(crate) metrics: MainMetrics,
}

/// Everything a shard holds for one service.
pub(crate) struct ServiceState {
    windows: ServiceWindows,
    evaluator: Evaluator,
    canary: Canary,
    /// Corrected seconds not yet published: many late snapshots for one second become one correction per tick.
    corrections: BTreeSet<i64>,
}

impl ServiceState {
    pub(crate) fn new(service: Arc<str>, settings: WindowSettings) -> Self {
        Self {
            windows: ServiceWindows::new(service, settings),
            evaluator: Evaluator::default(),
            canary: Canary::default(),
            corrections: BTreeSet::new(),
        }
    }

    /// Merges one instance's second, counting what happened to it.
    pub(crate) fn apply(&mut self, snapshot: InstanceSecond, health: &Health) {
        let (service, agent) = (snapshot.instance.service.clone(), snapshot.agent);
        let applied = self.windows.apply(snapshot);
        if matches!(applied, Applied::Merged { .. } | Applied::Correction { .. }) {
            // Counted once per merged snapshot, so a replay does not count an agent's numbers twice.
            health.count_agent(&service, &agent);
        }
        match applied {
            Applied::Merged { dropped } => {
                health.snapshots_accepted.inc();
                if dropped > 0 {
                    health.count_dropped(
                        DropReason::SeriesConflictOrServiceLimit,
                        u64::from(dropped),
                    );
                }
            }
            Applied::Duplicate => {
                health.snapshots_duplicate.inc();
            }
            Applied::TooLate => {
                health.snapshots_too_late.inc();
            }
            Applied::Correction { t, dropped } => {
                health.snapshots_accepted.inc();
                if dropped > 0 {
                    health.count_dropped(
                        DropReason::SeriesConflictOrServiceLimit,
                        u64::from(dropped),
                    );
                }
                if self.corrections.insert(t) {
                    health.corrections.inc();
                }
            }
        }
    }

    /// Seals what is ready at `now_ms`: each sealed second is judged by the rules and the canary, then published.
    pub(crate) fn seal_ready(
        &mut self,
        now_ms: i64,
        arrivals: &Arrivals,
        context: &ServiceContext,
    ) {
        for sealed in self.windows.seal_ready(now_ms, arrivals) {
            self.on_sealed(sealed, context);
        }
    }

    /// Publishes the corrections gathered since the last tick. Late data counts for the canary's evidence, not for
    /// threshold rules, which judged the second when it was sealed (like a Prometheus rule evaluation).
    pub(crate) fn publish_corrections(&mut self, context: &ServiceContext) {
        for t in std::mem::take(&mut self.corrections) {
            let Some(corrected) = self.windows.corrected(t) else {
                continue;
            };
            if context.canary.enabled
                && let Some(second) = self.windows.sealed(t)
            {
                let versions = canary_inputs(second, &corrected, &context.metrics);
                self.canary.correct(t, versions);
            }
            context.hub.publish_second(corrected);
        }
    }

    /// Whether the service sealed nothing since `horizon` and has nothing open.
    pub(crate) fn is_idle(&self, horizon: i64) -> bool {
        self.windows.is_idle(horizon)
    }

    /// The service went away: whatever fires resolves, a bad candidate counts as rolled back. Nothing is sealed.
    pub(crate) fn evict(
        mut self,
        service: &Arc<str>,
        t: i64,
        now_ms: i64,
        context: &ServiceContext,
    ) {
        for event in self.evaluator.on_service_gone(service, now_ms) {
            context.alerts.event(event);
        }
        if let Some(ended) = self.canary.on_service_gone(t) {
            context.hub.publish_deploy(&ended);
            if let Some(event) = canary_alert(&ended, &context.rules.current(), now_ms) {
                context.alerts.event(event);
            }
        }
    }

    /// Evaluates the rules and the canary on a freshly sealed second, then publishes it. Alert events go to the
    /// manager without waiting.
    fn on_sealed(&mut self, sealed: SealedSecond, context: &ServiceContext) {
        let now = clock::unix_millis();
        let rules = context.rules.current();
        for event in self.evaluator.on_sealed(&rules, &sealed, now) {
            context.alerts.event(event);
        }
        if context.canary.enabled
            && let Some(second) = self.windows.sealed(sealed.t)
        {
            let versions = canary_inputs(second, &sealed, &context.metrics);
            for verdict in self
                .canary
                .observe(&sealed.service, sealed.t, versions, &context.canary)
            {
                context.hub.publish_deploy(&verdict);
                if let Some(event) = canary_alert(&verdict, &rules, now) {
                    context.alerts.event(event);
                }
            }
        }
        let delay = now.saturating_sub(sealed.t.saturating_add(1).saturating_mul(1000));
        context.health.seconds_sealed.inc();
        context.health.seal_delay.observe(millis_as_seconds(delay));
        context.hub.publish_second(sealed);
    }
}

/// The canary's per-version numbers of a sealed second, read from its version-split cells (merged histograms, so
/// its latency tests see every bucket).
fn canary_inputs(
    second: &OpenSecond,
    sealed: &SealedSecond,
    metrics: &MainMetrics,
) -> BTreeMap<Arc<str>, VersionSecond> {
    let series = second.cells().iter().filter_map(|((split, key), cell)| {
        let Split::Version(version) = split else {
            return None;
        };
        let value: SeriesNumber<(&Histogram<u64>, u32)> = match cell {
            Cell::Counter { sum, .. } => SeriesNumber::Counter(*sum),
            Cell::Histogram { hist, scale, .. } => SeriesNumber::Latency((hist.as_ref(), *scale)),
            _ => SeriesNumber::Other,
        };
        Some((Some(version), &*key.metric, key.tags.is_empty(), value))
    });
    version_seconds(per_version(&sealed.instances, series, metrics))
}
