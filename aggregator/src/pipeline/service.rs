//! One service's state inside its shard, and the transitions that move it: a snapshot applied, a second sealed
//! (rules and canary judge it, then it is published), a late second's correction published, the service evicted.
//! The shard only decides when each happens.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

use strobe_proto::clock;

use crate::alerting::alerts::Alerts;
use crate::alerting::canary::alert::canary_alert;
use crate::alerting::canary::inputs::{
    InstanceCounts, SeriesNumber, VersionSecond, per_version, version_seconds,
};
use crate::alerting::canary::{Canary, CanarySettings};
use crate::alerting::rules::{Evaluator, RulesStore};
use crate::health::{DropReason, Health, millis_as_seconds};
use crate::model::hdr::HdrAccumulator;
use crate::model::table::SeriesTable;
use crate::model::{InstanceSecond, MainMetrics, RequestCounts, SeriesValue};
use crate::pipeline::merge::Cell;
use crate::pipeline::windows::{
    Applied, Arrivals, DecodedBytes, Sealed, ServiceWindows, WindowSettings,
};
use crate::publish::Hub;

/// What every service's transitions need, shared by all shards.
pub(crate) struct ServiceContext {
    /// Where sealed seconds, corrections and verdicts go.
    pub(crate) hub: Arc<Hub>,
    /// The aggregator's counters.
    pub(crate) health: Arc<Health>,
    /// Grace, late window, cell limit.
    pub(crate) settings: WindowSettings,
    /// The bound on merged state of all services together.
    pub(crate) decoded: DecodedBytes,
    /// Every service's agents replaying after a reconnect, as their streams note them.
    pub(crate) replays: Arc<crate::pipeline::replays::Replays>,
    /// When the aggregator started (wall clock, ms): seconds that ended well before it are replays.
    pub(crate) started_ms: i64,
    /// The rules in force.
    pub(crate) rules: Arc<RulesStore>,
    /// Where rule and canary lifecycle events go (never waits).
    pub(crate) alerts: Alerts,
    /// Canary thresholds.
    pub(crate) canary: CanarySettings,
    /// The request, error and latency metrics.
    pub(crate) metrics: MainMetrics,
    /// Late snapshots of one second are published as one correction at most this often (milliseconds).
    pub(crate) correction_interval_ms: i64,
    /// The cluster, if this node is part of one: which services it still owns.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// Everything a shard holds for one service.
pub(crate) struct ServiceState {
    windows: ServiceWindows,
    evaluator: Evaluator,
    canary: Canary,
    /// Corrected seconds not yet published, with when each is due: the late snapshots of one second that arrive
    /// within its [`correction_delay`] become one correction.
    corrections: BTreeMap<i64, i64>,
    /// How many corrections of each recently corrected second were published: each waits twice as long as the one
    /// before (see [`correction_delay`]).
    published: BTreeMap<i64, u32>,
    /// Streams whose late snapshots were merged into a sealed second, told when its correction is published.
    correction_ackers: BTreeMap<i64, Vec<Acker>>,
    /// Each instance's streams, told every second of it that is counted (sealed, or merged into a sealed second):
    /// only then does the agent get its ack, so a crash before the seal loses nothing the agent let go of. Usually
    /// one; after a reconnect the old stream may still deliver a snapshot after the new one's, and the new one must
    /// hear of its seconds all the same (its agent sends only a few seconds ahead of their acks).
    ackers: HashMap<Arc<str>, Vec<Acker>>,
    /// Which of the service's series are its request and error counters.
    roles: RequestRoles,
}

/// Which of a service's series ids are the request and error counters ([`MainMetrics`]), read from its series table
/// once per id: reading an instance's requests and errors from its snapshot then costs an index per counter.
#[derive(Debug, Default)]
struct RequestRoles {
    /// The table the roles are of (ids mean other series in another table).
    table: Weak<SeriesTable>,
    roles: Vec<Role>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Requests,
    Errors,
    Other,
}

impl RequestRoles {
    /// The instance's requests and errors in `snapshot` (each counter summed over its tag sets); `None` when it
    /// has neither.
    fn count(&mut self, snapshot: &InstanceSecond, metrics: &MainMetrics) -> Option<RequestCounts> {
        if !std::ptr::eq(self.table.as_ptr(), Arc::as_ptr(&snapshot.table)) {
            self.table = Arc::downgrade(&snapshot.table);
            self.roles.clear();
        }
        let mut counts: Option<RequestCounts> = None;
        for (id, value) in &snapshot.series {
            let SeriesValue::Counter(v) = value else {
                continue;
            };
            let index = id.index();
            if index >= self.roles.len() {
                let keys = snapshot.table.keys();
                while self.roles.len() <= index {
                    let role = match keys.at(self.roles.len()) {
                        Some(key) if *key.metric == *metrics.requests => Role::Requests,
                        Some(key) if *key.metric == *metrics.errors => Role::Errors,
                        _ => Role::Other,
                    };
                    self.roles.push(role);
                }
            }
            match self.roles[index] {
                Role::Requests => counts.get_or_insert_default().requests += v,
                Role::Errors => counts.get_or_insert_default().errors += v,
                Role::Other => {}
            }
        }
        counts
    }
}

/// Where a stream hears which of its seconds are counted.
pub(crate) type Acker = tokio::sync::mpsc::UnboundedSender<i64>;

/// Sent to a stream's acker when the service's state is gone (a panic, a shard restart, eviction, shutdown): what
/// it sent and was not yet counted is lost here, so the stream must end and the agent reconnect and replay, rather
/// than let a later ack drop those seconds from its buffer.
pub(crate) const STATE_LOST: i64 = i64::MIN;

/// How long the late snapshots of a second are gathered before its correction number `published + 1` goes out:
/// `interval`, then twice that for each correction of it already published, up to a second (or `interval`, if
/// longer). A few stragglers are published within `interval`; a service far behind, whose seconds take late
/// snapshots for seconds on end, costs one summary and one frame per corrected second and subscriber a second
/// rather than four (past capacity, summarising and serialising corrections grew to a fifth of the aggregator's
/// CPU, which kept it behind). Acks of late snapshots wait for their correction, so the cap also bounds how long an
/// agent waits for one (its shutdown drain waits 2 s).
pub(crate) fn correction_delay(interval_ms: i64, published: u32) -> i64 {
    interval_ms
        .saturating_mul(1 << published.min(10))
        .min(interval_ms.max(MAX_CORRECTION_BACKOFF_MS))
}

/// The longest [`correction_delay`] grows to.
const MAX_CORRECTION_BACKOFF_MS: i64 = 1000;

impl Drop for ServiceState {
    fn drop(&mut self) {
        for acker in self
            .ackers
            .values()
            .flatten()
            .chain(self.correction_ackers.values().flatten())
        {
            acker.send(STATE_LOST).ok();
        }
    }
}

impl ServiceState {
    /// A service first heard of (here, or again after it was idle), in an aggregator started at `started_ms`.
    pub(crate) fn new(
        service: Arc<str>,
        settings: WindowSettings,
        all: DecodedBytes,
        replays: Arc<crate::pipeline::replays::ReplayBook>,
        started_ms: i64,
    ) -> Self {
        Self {
            windows: ServiceWindows::new(service, settings)
                .started_at(started_ms)
                .following(replays)
                .sharing(all),
            evaluator: Evaluator::default(),
            canary: Canary::default(),
            corrections: BTreeMap::new(),
            published: BTreeMap::new(),
            correction_ackers: BTreeMap::new(),
            ackers: HashMap::new(),
            roles: RequestRoles::default(),
        }
    }

    /// Merges one instance's second at `now_ms`, counting what happened to it.
    pub(crate) fn apply(
        &mut self,
        mut snapshot: InstanceSecond,
        acker: Acker,
        now_ms: i64,
        context: &ServiceContext,
    ) {
        let health = &context.health;
        let (service, agent) = (snapshot.instance.service.clone(), snapshot.agent);
        let t = snapshot.t;
        // Once per stream, not per snapshot: the same stream's acker is usually there already.
        match self.ackers.get_mut(&snapshot.instance.id) {
            Some(known) if known.iter().any(|k| k.same_channel(&acker)) => {}
            Some(known) => {
                known.retain(|k| !k.is_closed());
                known.push(acker.clone());
            }
            None => {
                self.ackers
                    .insert(snapshot.instance.id.clone(), vec![acker.clone()]);
            }
        }
        if context.canary.enabled {
            snapshot.requests = self.roles.count(&snapshot, &context.metrics);
        }
        let applied = self.windows.apply(snapshot, now_ms);
        match applied {
            // Already counted (a duplicate of a sealed second), or never to be counted (too late: sending it again
            // would not help, it is counted in `strobe_snapshots_too_late_total`): answered now.
            Applied::Duplicate { sealed: true } | Applied::TooLate => {
                acker.send(t).ok(); // a stream that went away needs no answer
            }
            // Merged into a sealed second: answered when the correction is published.
            Applied::Correction { .. } => self.correction_ackers.entry(t).or_default().push(acker),
            // An open second (a duplicate of one included) waits for its seal.
            _ => {}
        }
        let (dropped, over_budget, over_total) = match applied {
            Applied::Merged {
                dropped,
                over_budget,
                over_total,
            }
            | Applied::Correction {
                dropped,
                over_budget,
                over_total,
                ..
            } => {
                // Counted once per merged snapshot, so a replay does not count an agent's numbers twice.
                health.count_agent(&service, &agent);
                health.snapshots_accepted.inc();
                (dropped, over_budget, over_total)
            }
            Applied::Duplicate { .. } => {
                health.snapshots_duplicate.inc();
                (0, 0, 0)
            }
            Applied::TooLate => {
                health.snapshots_too_late.inc();
                (0, 0, 0)
            }
        };
        if dropped > 0 {
            health.count_dropped(DropReason::SeriesConflictOrServiceLimit, u64::from(dropped));
        }
        if over_budget > 0 {
            health.count_dropped(
                DropReason::MaxDecodedBytesPerService,
                u64::from(over_budget),
            );
        }
        if over_total > 0 {
            health.count_dropped(DropReason::MaxDecodedBytes, u64::from(over_total));
        }
        if let Applied::Correction { t, .. } = applied
            && let std::collections::btree_map::Entry::Vacant(due) = self.corrections.entry(t)
        {
            let before = self.published.get(&t).copied().unwrap_or(0);
            let delay = correction_delay(context.correction_interval_ms, before);
            // Never past the end of its late window: the second is kept a second longer, so it is still there.
            let last_call = self.windows.takes_late_until(t).unwrap_or(i64::MAX);
            due.insert(now_ms.saturating_add(delay).min(last_call));
            health.corrections.inc();
        }
    }

    /// Publishes the corrections due at `now_ms`, then seals what is ready: each sealed second is judged by the rules
    /// and the canary, then published.
    pub(crate) fn seal_ready(
        &mut self,
        now_ms: i64,
        arrivals: &Arrivals,
        context: &ServiceContext,
    ) {
        // Corrections due go out first: sealing also forgets seconds past their late window, and a shard that
        // stalled could otherwise forget one whose correction is waiting.
        self.publish_corrections(now_ms, context);
        for sealed in self.windows.seal_ready(now_ms, arrivals) {
            self.on_sealed(sealed, context);
        }
    }

    /// Publishes the corrections due at `now_ms`. Late data counts for the canary's evidence, not for threshold
    /// rules, which judged the second when it was sealed (like a Prometheus rule evaluation).
    pub(crate) fn publish_corrections(&mut self, now_ms: i64, context: &ServiceContext) {
        // Every tick, for every service: nothing allocated or walked unless a correction is due.
        if !self.corrections.values().any(|at| *at <= now_ms) {
            return;
        }
        let due: Vec<i64> = self
            .corrections
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(t, _)| *t)
            .collect();
        for t in due {
            self.corrections.remove(&t);
            let Some(corrected) = self.windows.corrected(t) else {
                // It left the late window first: nothing more can be done with it; sending it again would not help.
                for acker in self.correction_ackers.remove(&t).unwrap_or_default() {
                    acker.send(t).ok();
                }
                continue;
            };
            if context.canary.enabled {
                let versions = canary_inputs(&corrected, &context.metrics);
                self.canary.correct(t, versions);
            }
            context.hub.publish_second(corrected.second);
            for acker in self.correction_ackers.remove(&t).unwrap_or_default() {
                acker.send(t).ok();
            }
            *self.published.entry(t).or_default() += 1;
        }
        // Forget the counts of seconds no longer taking late snapshots.
        let windows = &self.windows;
        self.published
            .retain(|t, _| windows.takes_late_until(*t).is_some());
    }

    /// The newest second sealed here.
    pub(crate) fn last_sealed(&self) -> Option<i64> {
        self.windows.last_sealed()
    }

    /// A state started again after the last one was dropped as idle, having sealed up to `t`.
    pub(crate) fn sealed_before_eviction(&mut self, t: i64) {
        self.windows.sealed_before_eviction(t);
    }

    /// Whether nothing arrived or sealed for `idle_ms` before `now_ms` and nothing is open.
    pub(crate) fn is_idle(&self, now_ms: i64, idle_ms: i64) -> bool {
        self.windows.is_idle(now_ms, idle_ms)
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
        for ended in self.canary.on_service_gone(t) {
            context.hub.publish_deploy(&ended);
            if let Some(event) = canary_alert(&ended, &context.rules.current(), now_ms) {
                context.alerts.event(event);
            }
        }
    }

    /// Evaluates the rules and the canary on a freshly sealed second, then publishes it. Alert events go to the
    /// manager without waiting.
    fn on_sealed(&mut self, merged: Sealed, context: &ServiceContext) {
        let now = clock::unix_millis();
        let reporters: Vec<Arc<str>> = merged
            .second
            .instances
            .iter()
            .map(|i| i.id.clone())
            .collect();
        let rules = context.rules.current();
        for event in self.evaluator.on_sealed(&rules, &merged.second, now) {
            context.alerts.event(event);
        }
        if context.canary.enabled {
            let versions = canary_inputs(&merged, &context.metrics);
            let sealed = &merged.second;
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
        let sealed = merged.second;
        let delay = now.saturating_sub(sealed.t.saturating_add(1).saturating_mul(1000));
        context.health.seconds_sealed.inc();
        if let Some(by) = merged.by {
            context.health.count_sealed_by(by);
        }
        context.health.seal_delay.observe(millis_as_seconds(delay));
        let t = sealed.t;
        context.hub.publish_second(sealed);
        // Counted and published: every instance in it may let go of this second. Streams that ended leave.
        for id in &reporters {
            for acker in self.ackers.get(id).into_iter().flatten() {
                acker.send(t).ok();
            }
        }
        self.ackers.retain(|_, ackers| {
            ackers.retain(|acker| !acker.is_closed());
            !ackers.is_empty()
        });
    }
}

/// The canary's per-version numbers of a sealed second, read from its version-split cells (a sole version's are the
/// overall cells; merged histograms, so its latency tests see every bucket).
fn canary_inputs(merged: &Sealed, metrics: &MainMetrics) -> BTreeMap<Arc<str>, VersionSecond> {
    let series = merged.splits.by_version().map(|(version, key, cell)| {
        let value: SeriesNumber<(&HdrAccumulator, u32)> = match cell {
            Cell::Counter { sum, .. } => SeriesNumber::Counter(*sum),
            Cell::Histogram { acc, scale, .. } => SeriesNumber::Latency((acc, *scale)),
            _ => SeriesNumber::Other,
        };
        (Some(version), &*key.metric, key.tags.is_empty(), value)
    });
    let mut seconds = version_seconds(per_version(&merged.second.instances, series, metrics));
    for (instance, counts) in &merged.requests {
        if let Some(second) = seconds.get_mut(&instance.version) {
            second.per_instance.push(InstanceCounts {
                id: instance.id.clone(),
                requests: counts.requests,
                errors: counts.errors,
            });
        }
    }
    seconds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Instance, SeriesKey};

    /// An instance's requests and errors are the main metrics' counters summed over their tag sets, read by id; a
    /// new table (the service's old one gone) means new ids.
    #[test]
    fn requests_and_errors_are_read_per_instance_by_series_id() {
        let metrics = MainMetrics::default();
        let table = Arc::new(SeriesTable::new(100));
        let key = |metric: &str, route: Option<&str>| {
            let tags: Arc<[(Arc<str>, Arc<str>)]> = match route {
                Some(r) => Arc::new([("route".into(), r.into())]),
                None => Arc::new([]),
            };
            SeriesKey::new(metric.into(), tags)
        };
        let ids: Vec<_> = [
            key("cache.hits", None),
            key("request.count", Some("/a")),
            key("request.count", Some("/b")),
            key("request.errors", Some("/a")),
        ]
        .into_iter()
        .map(|k| table.intern(k).unwrap())
        .collect();
        let instance = Arc::new(Instance {
            service: "svc".into(),
            id: "i1".into(),
            version: "v1".into(),
            zone: None,
            deployer: None,
        });
        let snapshot = |table: &Arc<SeriesTable>, values: &[(usize, f64)]| InstanceSecond {
            instance: instance.clone(),
            t: 1,
            series: values
                .iter()
                .map(|(i, v)| (ids[*i], SeriesValue::Counter(*v)))
                .collect(),
            table: table.clone(),
            agent: Default::default(),
            requests: None,
        };
        let mut roles = RequestRoles::default();
        let counted = roles.count(
            &snapshot(&table, &[(0, 7.0), (1, 10.0), (2, 5.0), (3, 2.0)]),
            &metrics,
        );
        assert_eq!(
            counted,
            Some(RequestCounts {
                requests: 15.0,
                errors: 2.0
            })
        );
        // Only errors this second; then neither.
        let counted = roles.count(&snapshot(&table, &[(3, 1.0)]), &metrics);
        assert_eq!(counted.map(|c| (c.requests, c.errors)), Some((0.0, 1.0)));
        assert_eq!(roles.count(&snapshot(&table, &[(0, 3.0)]), &metrics), None);
        // Another table numbers other series: id 1 there is `cache.hits`, not requests.
        let other = Arc::new(SeriesTable::new(100));
        for k in [key("x", None), key("cache.hits", None)] {
            other.intern(k).unwrap();
        }
        assert_eq!(roles.count(&snapshot(&other, &[(1, 4.0)]), &metrics), None);
    }

    #[test]
    fn corrections_of_one_second_back_off_to_a_second() {
        let delays: Vec<i64> = (0..6).map(|n| correction_delay(250, n)).collect();
        assert_eq!(delays, [250, 500, 1000, 1000, 1000, 1000]);
        // A configured interval past the cap is kept as it is.
        assert_eq!(correction_delay(900, 0), 900);
        assert_eq!(correction_delay(900, 3), 1000);
        assert_eq!(
            correction_delay(100, 4),
            1000,
            "a short interval still grows to a second"
        );
        // Late snapshots arriving all through a late window of 10 s: the second is corrected 11 times (the last
        // when its window ends), not 40.
        let mut at = 0;
        let mut published = 0;
        while at + correction_delay(250, published) <= 10_000 {
            at += correction_delay(250, published);
            published += 1;
        }
        assert_eq!(published, 11);
    }
}
