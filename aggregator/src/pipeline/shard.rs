//! Shards: the scheduler. Each shard is one task owning a disjoint set of services (by hash of the name); it decides
//! when each service's transitions run ([`ServiceState`]): a snapshot is applied as it arrives and may seal its
//! second at once; a 10 ms tick publishes gathered corrections, seals what is past its grace (stretched while the
//! shard is still receiving that second) and evicts services gone quiet. One task per shard, so the merge path
//! takes no lock (one service's state is only ever touched by its shard).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use strobe_proto::clock;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, error};

use super::budget::Reservation;
use super::service::{Acker, ServiceContext, ServiceState};
use super::windows::Arrivals;
use crate::health::millis_as_seconds;
use crate::model::InstanceSecond;

/// How often a shard checks for seconds to seal.
const TICK: Duration = Duration::from_millis(10);
/// A service to which nothing arrived and in which nothing sealed for this long (wall clock) is forgotten by its shard.
const IDLE_SECONDS: i64 = 120;
/// How long a service dropped as idle is remembered with its newest sealed second (milliseconds): the default
/// `max_snapshot_age`, past which ingest refuses a snapshot anyway.
const EVICTED_MS: i64 = 600_000;
/// Snapshots queued per shard before ingest waits.
const QUEUE: usize = 8192;

/// Work for a shard.
#[derive(Debug)]
pub(crate) enum ShardCommand {
    /// Merge one instance's second; its queue reservation is released once it is merged; the acker hears when it
    /// is counted.
    Snapshot(InstanceSecond, Reservation, Acker),
    /// Panic outside any service's transition (tests of the supervisor only).
    #[cfg(test)]
    Panic,
    /// Block the shard's thread this long, as a call that does not return would (tests of `/healthz` only).
    #[cfg(test)]
    Block(Duration),
}

/// Handles to the running shards.
#[derive(Clone)]
pub(crate) struct Shards {
    senders: Arc<[mpsc::Sender<ShardCommand>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Shards {
    /// Starts `count` shard tasks in `tasks`; each ends when every handle is dropped. One that does not go round
    /// its loop for `stall` fails `/healthz`.
    pub(crate) fn spawn(
        count: usize,
        stall: Duration,
        context: Arc<ServiceContext>,
        tasks: &mut JoinSet<()>,
    ) -> Self {
        context.health.shard_beats.watch(count.max(1), stall);
        let mut senders = Vec::with_capacity(count);
        for index in 0..count.max(1) {
            let (tx, rx) = mpsc::channel(QUEUE);
            senders.push(tx);
            tasks.spawn(supervise(index, rx, context.clone()));
        }
        Self {
            senders: senders.into(),
            hasher: Default::default(),
        }
    }

    /// The shard owning `service`.
    pub(crate) fn for_service(&self, service: &str) -> mpsc::Sender<ShardCommand> {
        let index = (self.hasher.hash_one(service) % self.senders.len() as u64) as usize;
        self.senders[index].clone()
    }
}

/// Runs one service's transition, containing a panic to that service: the caller drops the service's state (its
/// open seconds are lost; the next snapshot starts it afresh), which is logged and counted, and the shard, with
/// every other service it owns, goes on. Returns whether the transition completed.
fn contain(service: &str, context: &ServiceContext, transition: impl FnOnce()) -> bool {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(transition)) {
        Ok(()) => true,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            context.health.service_panics.inc();
            error!(message = "Service state dropped after a panic; its open seconds are lost.", service, panic = %what);
            false
        }
    }
}

/// Forgets a service whose transition panicked, ending what it had going (alerts resolve, a bad candidate rolls
/// back) as if it had gone away; that too is contained.
fn drop_service(
    services: &mut HashMap<Arc<str>, ServiceState>,
    service: &Arc<str>,
    now_ms: i64,
    context: &ServiceContext,
) {
    if let Some(state) = services.remove(service) {
        contain(service, context, || {
            state.evict(service, now_ms.div_euclid(1000), now_ms, context)
        });
    }
}

/// After a membership change: the services another node owns now leave this one. Their state is dropped as is
/// (open seconds unacknowledged, so their agents, told the state is lost, reconnect, are redirected and replay them
/// to the new owner), and their alerts are left to the new owner, not resolved.
fn give_away(
    services: &mut HashMap<Arc<str>, ServiceState>,
    cluster: &crate::cluster::Cluster,
    context: &ServiceContext,
) {
    let leaving: Vec<Arc<str>> = services
        .keys()
        .filter(|name| !cluster.keeps(name))
        .cloned()
        .collect();
    for name in leaving {
        let mut state = services.remove(&name);
        if let Some(state) = state.as_mut() {
            // Late snapshots already merged into sealed seconds are published (and acknowledged) now: sent again
            // to the new owner, which never saw those seconds, they would replace them with a part. (Before the
            // disown: whatever they make the canary say is disowned with the rest.)
            contain(&name, context, || {
                state.publish_corrections(i64::MAX, context)
            });
        }
        cluster.forget(&name);
        // Disowned before its streams hear STATE_LOST (when `state` goes): a stream then asks the alert manager
        // whether the last state is handed over, and that question must come after this.
        context.alerts.disown(name.clone());
        drop(state);
        context.health.cluster_services_moved.inc();
        tracing::info!(message = "Service moved to another node.", service = %name, owner = ?cluster.owner(&name).map(|m| m.id));
    }
}

/// Runs a shard, and runs it again if it panics outside any service's transition (which `contain` catches): the
/// services it held lose their open seconds (logged, counted as `strobe_shard_restarts_total`), the queue and every
/// other shard go on. Returns when the shard's queue closes (shutdown).
async fn supervise(
    index: usize,
    mut commands: mpsc::Receiver<ShardCommand>,
    context: Arc<ServiceContext>,
) {
    use futures_util::FutureExt;
    // Owned here, so that after a panic each service is evicted properly: what it had firing resolves, its canary
    // comparisons end.
    let mut services: HashMap<Arc<str>, ServiceState> = HashMap::new();
    loop {
        let run = std::panic::AssertUnwindSafe(run_shard(
            index,
            &mut commands,
            &mut services,
            context.clone(),
        ));
        match run.catch_unwind().await {
            Ok(()) => return,
            Err(_) => {
                context.health.shard_restarts.inc();
                error!(
                    message = "Shard panicked outside any service; restarted, its services' open seconds are lost.",
                    shard = index
                );
                let now = clock::unix_millis();
                let names: Vec<Arc<str>> = services.keys().cloned().collect();
                for name in names {
                    drop_service(&mut services, &name, now, &context);
                }
            }
        }
    }
}

async fn run_shard(
    index: usize,
    commands: &mut mpsc::Receiver<ShardCommand>,
    services: &mut HashMap<Arc<str>, ServiceState>,
    context: Arc<ServiceContext>,
) {
    let mut arrivals = Arrivals::new(context.settings.grace_quiet_ms);
    // Services dropped as idle: their newest sealed second, and when they were dropped. A straggler of a second
    // sealed before would otherwise open it again and publish it with only itself in it.
    let mut evicted: HashMap<Arc<str>, (i64, i64)> = HashMap::new();
    // The membership this shard last checked its services against.
    let mut epoch = context.cluster.as_ref().map_or(0, |c| c.epoch());
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => {
                let (snapshot, reservation, acker) = match command {
                    Some(ShardCommand::Snapshot(snapshot, reservation, acker)) => (snapshot, reservation, acker),
                    #[cfg(test)]
                    Some(ShardCommand::Panic) => panic!("a bug outside any service"),
                    #[cfg(test)]
                    Some(ShardCommand::Block(how_long)) => {
                        std::thread::sleep(how_long);
                        continue;
                    }
                    None => {
                        debug!(message = "Shard stopping.", shard = index);
                        return;
                    }
                };
                let now = clock::unix_millis();
                arrivals.awake(now);
                arrivals.record(snapshot.t, now);
                let end_ms = snapshot.t.saturating_add(1).saturating_mul(1000);
                context.health.arrival_delay.observe(millis_as_seconds(now.saturating_sub(end_ms)));
                let service = snapshot.instance.service.clone();
                // In a cluster, a service this node no longer keeps is not started again by a snapshot that was
                // already on its way: its stream hears the state is lost, reconnects and is redirected.
                if !services.contains_key(&service)
                    && let Some(cluster) = &context.cluster
                    && !cluster.keeps(&service)
                {
                    acker.send(super::service::STATE_LOST).ok(); // the stream may have ended already
                    drop(reservation);
                    continue;
                }
                let state = services.entry(service.clone()).or_insert_with(|| {
                    let mut state = ServiceState::new(
                        service.clone(),
                        context.settings,
                        context.decoded.clone(),
                        context.replays.of(&service),
                        context.started_ms,
                    );
                    if let Some((sealed, _)) = evicted.remove(&service) {
                        state.sealed_before_eviction(sealed);
                    }
                    state
                });
                let ok = contain(&service, &context, || {
                    state.apply(snapshot, acker, now, &context);
                    // A snapshot may complete its second: seal at once rather than at the next tick.
                    state.seal_ready(now, &arrivals, &context);
                });
                drop(reservation);
                if !ok {
                    drop_service(services, &service, now, &context);
                }
            }
            _ = tick.tick() => {
                context.health.shard_beats.beat(index);
                // Services that moved leave before anything else of theirs is sealed here.
                if let Some(cluster) = &context.cluster
                    && cluster.epoch() != epoch
                {
                    epoch = cluster.epoch();
                    give_away(services, cluster, &context);
                }
                let now = clock::unix_millis();
                arrivals.awake(now);
                let mut failed = Vec::new();
                for (service, state) in services.iter_mut() {
                    let ok = contain(service, &context, || {
                        // Publishes the corrections due, then seals.
                        state.seal_ready(now, &arrivals, &context);
                    });
                    if !ok {
                        failed.push(service.clone());
                    }
                }
                for service in failed {
                    drop_service(services, &service, now, &context);
                }
                let second = now.div_euclid(1000);
                arrivals.forget_before(second - context.settings.late_window_secs - 1);
                let horizon = second - IDLE_SECONDS;
                let idle: Vec<Arc<str>> = services
                    .iter()
                    .filter(|(_, s)| s.is_idle(now, IDLE_SECONDS * 1000))
                    .map(|(name, _)| name.clone())
                    .collect();
                evicted.retain(|_, (_, at)| now.saturating_sub(*at) < EVICTED_MS);
                for name in idle {
                    if let Some(state) = services.remove(&name) {
                        if let Some(sealed) = state.last_sealed() {
                            evicted.insert(name.clone(), (sealed, now));
                        }
                        // Contained like every other transition: a bug here costs this service, not the shard.
                        contain(&name, &context, || state.evict(&name, horizon, now, &context));
                        if let Some(cluster) = &context.cluster {
                            cluster.forget(&name);
                        }
                    }
                }

            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerting::alerts::{Alerts, RecordSink};
    use crate::alerting::event::AlertRecord;
    use crate::alerting::rules::RulesStore;
    use crate::health::Health;
    use crate::pipeline::windows::WindowSettings;
    use crate::publish::Hub;

    struct Discard;

    impl RecordSink for Discard {
        fn publish_alert(&self, _: &AlertRecord) {}
    }

    /// A shard's context, and the alert manager's notifications (unread; held open for the test's length).
    fn context(
        health: &Arc<Health>,
        tasks: &mut JoinSet<()>,
    ) -> (
        ServiceContext,
        mpsc::UnboundedReceiver<crate::alerting::alerts::Notification>,
    ) {
        let (sink, notes) = mpsc::unbounded_channel();
        let rules = RulesStore::open(None).expect("no file");
        let context = ServiceContext {
            hub: Arc::new(Hub::new(Default::default(), 64, Default::default())),
            health: health.clone(),
            settings: WindowSettings {
                grace_ms: 250,
                grace_quiet_ms: 50,
                grace_quorum: 0.9,
                grace_trickle: 0.05,
                grace_max_ms: 1000,
                grace_max_behind_ms: 3000,
                late_window_secs: 10,
                replay_gather_ms: 6_000,
                replay_stall_ms: 10_000,
                replay_wait_ms: 120_000,
                max_cells: 100,
                max_bytes: usize::MAX,
            },
            decoded: crate::pipeline::windows::DecodedBytes::unbounded(),
            replays: Default::default(),
            started_ms: 0,
            rules: rules.clone(),
            alerts: Alerts::spawn(
                rules,
                Arc::new(Discard),
                sink,
                health.clone(),
                Default::default(),
                tasks,
            ),
            canary: Default::default(),
            metrics: Default::default(),
            correction_interval_ms: 250,
            cluster: None,
        };
        (context, notes)
    }

    #[tokio::test]
    async fn a_panicking_transition_is_contained_and_counted() {
        let mut tasks = tokio::task::JoinSet::new();
        let health = Arc::new(Health::default());
        let (context, _notes) = context(&health, &mut tasks);
        assert!(contain("fine", &context, || {}));
        assert!(!contain("broken", &context, || panic!("a bug")));
        assert!(
            health
                .render(0, 0)
                .contains("strobe_service_panics_total 1")
        );

        // A panic outside any service: the supervisor restarts the shard, which keeps serving its queue.
        let (tx, rx) = mpsc::channel(4);
        let shard = tokio::spawn(supervise(0, rx, Arc::new(context)));
        tx.send(ShardCommand::Panic).await.unwrap();
        tx.send(ShardCommand::Panic).await.unwrap();
        for _ in 0..100 {
            if health
                .render(0, 0)
                .contains("strobe_shard_restarts_total 2")
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            health
                .render(0, 0)
                .contains("strobe_shard_restarts_total 2")
        );
        assert!(!shard.is_finished(), "the supervisor gave up");
        drop(tx);
        shard.await.expect("ends cleanly when its queue closes");
    }

    /// A shard stuck in one call stops ticking: `/healthz`'s check names it once it has been silent past the bound,
    /// and no longer once it goes round its loop again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_shard_fails_liveness_until_it_ticks_again() {
        let mut tasks = JoinSet::new();
        let health = Arc::new(Health::default());
        let (context, _notes) = context(&health, &mut tasks);
        let context = Arc::new(context);
        let shards = Shards::spawn(2, Duration::from_millis(200), context, &mut tasks);
        let stalled = || -> Vec<usize> {
            health
                .shard_beats
                .stalled()
                .into_iter()
                .map(|(i, _)| i)
                .collect()
        };
        shards.senders[0]
            .send(ShardCommand::Block(Duration::from_millis(1500)))
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..140 {
            seen = stalled();
            if seen.contains(&0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            seen.contains(&0),
            "the blocked shard is not reported: {seen:?}"
        );
        for _ in 0..500 {
            if !stalled().contains(&0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!stalled().contains(&0), "still reported after it ticked");
        drop(shards);
    }

    /// After a reconnect, the old stream can deliver a snapshot after the new one's: the new stream still hears of
    /// its seconds once they are sealed (its agent sends only a few seconds ahead of their acknowledgements, and
    /// would wait for them for good), and the old one of its own.
    #[tokio::test]
    async fn both_streams_of_a_reconnected_instance_hear_of_their_sealed_seconds() {
        let mut tasks = JoinSet::new();
        let health = Arc::new(Health::default());
        let (context, _notes) = context(&health, &mut tasks);
        let service: Arc<str> = "svc".into();
        let mut state = ServiceState::new(
            service.clone(),
            context.settings,
            context.decoded.clone(),
            context.replays.of(&service),
            0,
        );
        let instance = Arc::new(crate::model::Instance {
            service: service.clone(),
            id: "i1".into(),
            version: "v1".into(),
            zone: None,
            deployer: None,
        });
        let table = Arc::new(crate::model::table::SeriesTable::new(10));
        let second = |t| InstanceSecond {
            instance: instance.clone(),
            agent: Default::default(),
            requests: None,
            t,
            series: vec![],
            table: table.clone(),
        };
        let (new_stream, mut new_acks) = mpsc::unbounded_channel();
        let (old_stream, mut old_acks) = mpsc::unbounded_channel();
        let t = 1_000;
        let now = (t + 1) * 1000;
        state.apply(second(t), new_stream, now, &context);
        // The old stream, still open, delivers its last snapshot (an older second) after the new one's.
        state.apply(second(t - 1), old_stream, now + 10, &context);
        state.seal_ready(now + 5_000, &Arrivals::default(), &context);
        let heard = |acks: &mut mpsc::UnboundedReceiver<i64>| {
            std::iter::from_fn(|| acks.try_recv().ok()).collect::<Vec<_>>()
        };
        assert!(heard(&mut new_acks).contains(&t), "the new stream's second");
        assert!(
            heard(&mut old_acks).contains(&(t - 1)),
            "the old stream's second"
        );
    }
}
