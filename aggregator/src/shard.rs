//! Shards: each is one task owning a disjoint set of services (by hash of the name). It merges snapshots as they
//! arrive and, on a 10 ms tick, seals what is complete or past its grace. Only the shard's tick advances time.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use strobe_proto::clock;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::alerts::Alerts;
use crate::health::Health;
use crate::hub::Hub;
use crate::model::{InstanceSecond, SealedSecond};
use crate::rules::{Evaluator, RulesStore};
use crate::windows::{Applied, ServiceWindows, WindowSettings};

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
}

/// Everything a shard holds for one service.
struct ServiceState {
    windows: ServiceWindows,
    evaluator: Evaluator,
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
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(ShardCommand::Snapshot(snapshot)) = command else {
                    debug!(message = "Shard stopping.", shard = index);
                    return;
                };
                let service = snapshot.instance.service.clone();
                let state = services.entry(service.clone()).or_insert_with(|| ServiceState {
                    windows: ServiceWindows::new(service, context.settings),
                    evaluator: Evaluator::default(),
                });
                apply(&mut state.windows, snapshot, &context);
                // A snapshot may complete its second: seal at once rather than at the next tick.
                for sealed in state.windows.seal_ready(clock::unix_millis()) {
                    publish(sealed, &mut state.evaluator, &context);
                }
            }
            _ = tick.tick() => {
                let now = clock::unix_millis();
                for state in services.values_mut() {
                    for sealed in state.windows.seal_ready(now) {
                        publish(sealed, &mut state.evaluator, &context);
                    }
                }
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
                    }
                    !idle
                });
            }
        }
    }
}

fn apply(windows: &mut ServiceWindows, snapshot: InstanceSecond, context: &ShardContext) {
    let health = &context.health;
    match windows.apply(snapshot) {
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
        Applied::Correction(sealed) => {
            health.snapshots_accepted.fetch_add(1, Ordering::Relaxed);
            health.corrections.fetch_add(1, Ordering::Relaxed);
            context.hub.publish_second(sealed);
        }
    }
}

/// Evaluates the rules on a sealed second, then publishes it. Alert events go to the manager without waiting.
fn publish(sealed: SealedSecond, evaluator: &mut Evaluator, context: &ShardContext) {
    let now = clock::unix_millis();
    let rules = context.rules.current();
    for event in evaluator.on_sealed(&rules, &sealed, now) {
        context.alerts.event(event);
    }
    let delay = now - (sealed.t + 1) * 1000;
    context
        .health
        .seconds_sealed
        .fetch_add(1, Ordering::Relaxed);
    context
        .health
        .seal_delay_ms_sum
        .fetch_add(delay.max(0) as u64, Ordering::Relaxed);
    context.hub.publish_second(sealed);
}
