//! Shards: each is one task owning a disjoint set of services (by hash of the name). It merges snapshots as they
//! arrive, seals a second the moment its last expected instance reports, and on a 10 ms tick seals what is past its
//! grace (stretched while the shard is still receiving that second). After sealing it runs the rules and the canary
//! on the second, then publishes it. One task per shard, so the merge path takes no lock (one service's state is
//! only ever touched by its shard).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use strobe_proto::clock;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::alerts::Alerts;
use crate::canary::{Canary, CanarySettings, Verdict, VerdictState, VersionSecond};
use crate::health::Health;
use crate::hub::Hub;
use crate::merge::Cell;
use crate::model::Split;
use crate::model::{InstanceSecond, SealedSecond};
use crate::overview::MainMetrics;
use crate::rules::{AlertEvent, Evaluator, EventKind, RuleSet, RulesStore, alert_id};
use crate::windows::OpenSecond;
use crate::windows::{Applied, Arrivals, ServiceWindows, WindowSettings};

/// How often a shard checks for seconds to seal.
const TICK: Duration = Duration::from_millis(10);
/// A service with nothing sealed for this long is forgotten by its shard.
const IDLE_SECONDS: i64 = 120;
/// Snapshots queued per shard before ingest waits.
const QUEUE: usize = 8192;

/// Work for a shard.
#[derive(Debug)]
pub enum ShardCommand {
    /// Merge one instance's second.
    Snapshot(InstanceSecond),
}

/// What every shard shares.
pub struct ShardContext {
    /// Where sealed seconds go.
    pub hub: Arc<Hub>,
    /// The aggregator's counters.
    pub health: Arc<Health>,
    /// Grace, late window, cell limit.
    pub settings: WindowSettings,
    /// The rules in force.
    pub rules: Arc<RulesStore>,
    /// Where rule lifecycle events go.
    pub alerts: Alerts,
    /// Canary thresholds.
    pub canary: CanarySettings,
    /// The request, error and latency metrics.
    pub metrics: MainMetrics,
}

/// Everything a shard holds for one service.
struct ServiceState {
    windows: ServiceWindows,
    evaluator: Evaluator,
    canary: Canary,
    /// Corrected seconds not yet published: many late snapshots for one second become one correction per tick.
    corrections: BTreeSet<i64>,
}

/// Handles to the running shards.
#[derive(Clone)]
pub struct Shards {
    senders: Arc<[mpsc::Sender<ShardCommand>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Shards {
    /// Starts `count` shard tasks; they end when every handle is dropped.
    pub fn spawn(count: usize, context: Arc<ShardContext>) -> (Self, Vec<JoinHandle<()>>) {
        let mut senders = Vec::with_capacity(count);
        let mut tasks = Vec::with_capacity(count);
        for index in 0..count.max(1) {
            let (tx, rx) = mpsc::channel(QUEUE);
            senders.push(tx);
            tasks.push(tokio::spawn(run_shard(index, rx, context.clone())));
        }
        let shards = Self {
            senders: senders.into(),
            hasher: Default::default(),
        };
        (shards, tasks)
    }

    /// The shard owning `service`.
    pub fn for_service(&self, service: &str) -> mpsc::Sender<ShardCommand> {
        let index = (self.hasher.hash_one(service) % self.senders.len() as u64) as usize;
        self.senders[index].clone()
    }
}

async fn run_shard(
    index: usize,
    mut commands: mpsc::Receiver<ShardCommand>,
    context: Arc<ShardContext>,
) {
    let mut services: HashMap<Arc<str>, ServiceState> = HashMap::new();
    let mut arrivals = Arrivals::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(ShardCommand::Snapshot(snapshot)) = command else {
                    debug!(message = "Shard stopping.", shard = index);
                    return;
                };
                let now = clock::unix_millis();
                arrivals.record(snapshot.t, now);
                context.health.arrival_delay.observe((now - (snapshot.t + 1) * 1000).max(0) as u64);
                let service = snapshot.instance.service.clone();
                let state = services.entry(service.clone()).or_insert_with(|| ServiceState {
                    windows: ServiceWindows::new(service, context.settings),
                    evaluator: Evaluator::default(),
                    canary: Canary::default(),
                    corrections: BTreeSet::new(),
                });
                apply(state, snapshot, &context);
                // A snapshot may complete its second: seal at once rather than at the next tick.
                for sealed in state.windows.seal_ready(now, &arrivals) {
                    publish(sealed, state, &context);
                }
            }
            _ = tick.tick() => {
                let now = clock::unix_millis();
                for state in services.values_mut() {
                    for t in std::mem::take(&mut state.corrections) {
                        if let Some(corrected) = state.windows.corrected(t) {
                            // Late data still counts as evidence for the canary (not for threshold rules, which
                            // judged the second when it was sealed, like a Prometheus rule evaluation).
                            if context.canary.enabled && let Some(second) = state.windows.sealed(t) {
                                let versions = version_seconds(second, &corrected, &context.metrics);
                                state.canary.correct(t, versions);
                            }
                            context.hub.publish_second(corrected);
                        }
                    }
                    for sealed in state.windows.seal_ready(now, &arrivals) {
                        publish(sealed, state, &context);
                    }
                }
                arrivals.forget_before(now.div_euclid(1000) - context.settings.late_window_secs - 1);
                let horizon = now.div_euclid(1000) - IDLE_SECONDS;
                services.retain(|service, s| {
                    let idle = s.windows.is_idle(horizon);
                    if idle {
                        // A service that stopped reporting resolves whatever it had firing.
                        let gone = SealedSecond {
                            service: service.clone(),
                            t: horizon,
                            correction: false,
                            series: Vec::new(),
                            instances: Vec::new(),
                        };
                        for event in s.evaluator.on_sealed(&Default::default(), &gone, now) {
                            context.alerts.event(event);
                        }
                        if let Some(verdict) = s.canary.verdict().filter(|v| v.state == VerdictState::Bad) {
                            let ended = Verdict { state: VerdictState::RolledBack, t: horizon, ..verdict.clone() };
                            context.hub.publish_deploy(&ended);
                            if let Some(event) = canary_alert(&ended, &context.rules.current(), now) {
                                context.alerts.event(event);
                            }
                        }
                    }
                    !idle
                });
            }
        }
    }
}

/// Each version's requests, errors and merged latency in one sealed second, from the version-split cells.
fn version_seconds(
    second: &OpenSecond,
    sealed: &SealedSecond,
    metrics: &MainMetrics,
) -> BTreeMap<Arc<str>, VersionSecond> {
    let mut versions: BTreeMap<Arc<str>, VersionSecond> = BTreeMap::new();
    for instance in &sealed.instances {
        let v = versions.entry(instance.version.clone()).or_default();
        v.instances += 1;
        if v.deployer.is_none() {
            v.deployer = instance.deployer.clone();
        }
    }
    for ((split, key), cell) in second.cells() {
        let Split::Version(version) = split else {
            continue;
        };
        let v = versions.entry(version.clone()).or_default();
        match cell {
            Cell::Counter { sum, .. } if *key.metric == *metrics.requests => v.requests += sum,
            Cell::Counter { sum, .. } if *key.metric == *metrics.errors => v.errors += sum,
            Cell::Histogram { hist, scale, .. }
                if *key.metric == *metrics.latency && key.tags.is_empty() =>
            {
                v.latency = Some((hist.as_ref().clone(), *scale));
            }
            _ => {}
        }
    }
    versions
}

/// The alert event a verdict change means: firing when it turns bad, resolved when a bad candidate's comparison
/// ends (rolled back, promoted or replaced).
fn canary_alert(verdict: &Verdict, rules: &RuleSet, now_ms: i64) -> Option<AlertEvent> {
    let kind = match verdict.state {
        VerdictState::Bad => EventKind::Firing,
        VerdictState::Promoted | VerdictState::RolledBack if verdict.reason.is_some() => {
            EventKind::Resolved
        }
        _ => return None,
    };
    let labels = BTreeMap::from([("version".to_owned(), verdict.candidate.to_string())]);
    let mut owners: Vec<String> = rules
        .service_owner(&verdict.service)
        .map(str::to_owned)
        .into_iter()
        .collect();
    if let Some(deployer) = &verdict.deployer
        && rules.owners.contains_key(deployer.as_ref())
        && !owners.iter().any(|o| **o == **deployer)
    {
        owners.push(deployer.to_string());
    }
    let reason = verdict.reason.as_ref();
    let summary = match reason {
        Some(r) if r.metric == "error_ratio" => format!(
            "bad deploy: {} of {} has error ratio {:.2}% vs {:.2}% on {}",
            verdict.candidate,
            verdict.service,
            100.0 * r.candidate,
            100.0 * r.baseline,
            verdict.baseline
        ),
        Some(r) => format!(
            "bad deploy: {} of {} has {} latency {:.1} ms vs {:.1} ms on {}",
            verdict.candidate, verdict.service, r.metric, r.candidate, r.baseline, verdict.baseline
        ),
        None => format!("bad deploy: {} of {}", verdict.candidate, verdict.service),
    };
    Some(AlertEvent {
        id: alert_id("canary", &verdict.service, &labels, verdict.since),
        kind,
        rule: "canary".into(),
        owners,
        service: verdict.service.clone(),
        labels,
        summary,
        value: reason.map(|r| r.candidate),
        threshold: reason.map_or(f64::NAN, |r| r.baseline),
        since: verdict.since,
        at_ms: now_ms,
        evidence: serde_json::to_value(verdict).ok(),
        hint: Some(format!(
            "roll {} back to {}{}",
            verdict.service,
            verdict.baseline,
            verdict
                .deployer
                .as_ref()
                .map_or(String::new(), |d| format!(" (deployed by {d})"))
        )),
    })
}

fn apply(state: &mut ServiceState, snapshot: InstanceSecond, context: &ShardContext) {
    let health = &context.health;
    match state.windows.apply(snapshot) {
        Applied::Merged { dropped } => {
            health.snapshots_accepted.fetch_add(1, Ordering::Relaxed);
            if dropped > 0 {
                health.count_dropped(
                    "series_conflict_or_max_series_per_service",
                    u64::from(dropped),
                );
            }
        }
        Applied::Duplicate => {
            health.snapshots_duplicate.fetch_add(1, Ordering::Relaxed);
        }
        Applied::TooLate => {
            health.snapshots_too_late.fetch_add(1, Ordering::Relaxed);
        }
        Applied::Correction(t) => {
            health.snapshots_accepted.fetch_add(1, Ordering::Relaxed);
            if state.corrections.insert(t) {
                health.corrections.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Evaluates the rules and the canary on a sealed second, then publishes it. Alert events go to the manager
/// without waiting.
fn publish(sealed: SealedSecond, state: &mut ServiceState, context: &ShardContext) {
    let now = clock::unix_millis();
    let rules = context.rules.current();
    for event in state.evaluator.on_sealed(&rules, &sealed, now) {
        context.alerts.event(event);
    }
    if context.canary.enabled
        && let Some(second) = state.windows.sealed(sealed.t)
    {
        let versions = version_seconds(second, &sealed, &context.metrics);
        for verdict in state
            .canary
            .observe(&sealed.service, sealed.t, versions, &context.canary)
        {
            context.hub.publish_deploy(&verdict);
            if let Some(event) = canary_alert(&verdict, &rules, now) {
                context.alerts.event(event);
            }
        }
    }
    let delay = now - (sealed.t + 1) * 1000;
    context
        .health
        .seconds_sealed
        .fetch_add(1, Ordering::Relaxed);
    context.health.seal_delay.observe(delay.max(0) as u64);
    context.hub.publish_second(sealed);
}
