//! The alert manager: one task owning every alert record. It takes lifecycle events from the shards and
//! acknowledgements from the API, walks each firing alert up its owner's escalation chain, and hands
//! notifications to delivery. Each (alert, transition, step) is notified at most once.
//!
//! With a state file, every change that matters after a restart (firing, acknowledged, escalated, resolved, what
//! delivery finished) is written before the next command is taken, and an acknowledgement is on disk before it is
//! answered. After a restart, an alert that was firing keeps its id and acknowledgement and resumes its escalation
//! where it stopped; the breach still going on finds it by rule, service and labels. One that no rule confirms
//! within the restore grace (plus the rule's `for`) is resolved, and everyone told is told.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::delivery::{Notification, OnSettled};
use super::state::{SavedAlert, StateFile};
use crate::alerting::escalation::Owner;
use crate::alerting::event::{AlertEvent, AlertKind, EventKind, alert_key};
use crate::alerting::event::{AlertRecord, AlertState, NotifyTransition};
use crate::alerting::rules::RulesStore;
use crate::health::Health;

/// How long an alert taken over without a state directory's settings waits for its rule to confirm it.
const DEFAULT_RESTORE_GRACE: Duration = Duration::from_secs(120);

/// A pending alert whose rule went away without clearing it (its service gone, a panic) is forgotten after this.
const STALE_PENDING: Duration = Duration::from_secs(3600);

/// How long resolved alerts stay listed, and how many at most (the oldest go first); firing, acknowledged and
/// pending ones always are, and so is a resolved one until delivery is finished with every notification of it
/// (its resolve included), so that the state saved and handed over still holds what is left to send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResolvedKept {
    /// `resolved_alert_retention`.
    pub(crate) retention: Duration,
    /// `max_resolved_alerts`.
    pub(crate) most: usize,
}

/// Where the manager keeps its alerts' state, and how long it lists resolved ones.
#[derive(Default)]
pub(crate) struct Keeping {
    /// Across restarts, if anywhere.
    pub(crate) persistence: Option<Persistence>,
    /// For the node that takes a service over next (cluster only).
    pub(crate) handover: Option<Arc<dyn Handover>>,
    /// Resolved alerts listed.
    pub(crate) resolved: ResolvedKept,
}

impl Default for ResolvedKept {
    /// An hour, a thousand.
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(3600),
            most: 1000,
        }
    }
}

/// Why an acknowledgement failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AckError {
    /// No alert has that id.
    #[error("no alert with id {0:?}")]
    NotFound(String),
    /// The alert is not firing (pending, cleared or resolved).
    #[error("alert {0:?} is not firing")]
    NotFiring(String),
}

enum Command {
    Event(AlertEvent),
    Ack {
        id: String,
        by: String,
        reply: oneshot::Sender<Result<AlertRecord, AckError>>,
    },
    List {
        reply: oneshot::Sender<Vec<AlertRecord>>,
    },
    /// Take over a service's alerts (handed over by its previous owner); answers once they are held.
    Adopt {
        service: Arc<str>,
        saved: Vec<SavedAlert>,
        reply: oneshot::Sender<()>,
    },
    /// The service moved to another node: forget its alerts without resolving them (the new owner has them).
    Disown {
        service: Arc<str>,
    },
    /// Answers when `service`'s last state, handed over at its `Disown`, is written (or its wait is over).
    HandedOver {
        service: Arc<str>,
        reply: oneshot::Sender<watch::Receiver<bool>>,
    },
    /// Delivery is finished with one notification.
    Settled {
        id: String,
        transition: NotifyTransition,
        step: usize,
    },
}

/// Where the manager sends every alert record that changed (the publishing side implements it). Must not block.
pub(crate) trait RecordSink: Send + Sync {
    /// An alert's new state.
    fn publish_alert(&self, record: &AlertRecord);
}

/// Persistence of the manager: where, and how long a restored alert waits to be confirmed.
pub(crate) struct Persistence {
    /// The state file.
    pub(crate) file: StateFile,
    /// How long after a restart a firing alert waits for its rule (on top of the rule's `for`) before it is
    /// resolved as no longer breaching.
    pub(crate) restore_grace: Duration,
    /// The same for canary alerts: the canary starts from no history after a restart and needs longer to convict
    /// again.
    pub(crate) canary_restore_grace: Duration,
    /// A state file older than this at start is history, not state: its firing and acknowledged alerts are
    /// resolved (everyone told is told) instead of carried over, so that a breach now pages afresh. While an alert
    /// is firing or acknowledged the file is written at least every [`heartbeat`] of it, so its age is how long the
    /// aggregator was down (to within that).
    pub(crate) outage_tolerance: Duration,
}

/// How often the state file is written again, unchanged, while an alert is open: a quarter of the outage tolerance,
/// at most a minute and at least a second.
fn heartbeat(outage_tolerance: Duration) -> Duration {
    (outage_tolerance / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Where each service's alert state goes whenever it changes, for the node that takes the service over next
/// (the cluster implements it with etcd). Must not block.
pub(crate) trait Handover: Send + Sync {
    /// The service's alerts now (empty: none). The answer, if any, fires once they are written where the next
    /// owner reads them.
    fn publish(&self, service: &str, alerts: Vec<SavedAlert>) -> Option<oneshot::Receiver<()>>;

    /// How long a notification waits for the state that records it to be written before it goes out anyway.
    fn write_wait(&self) -> Duration;

    /// Whether `service` is now owned by another live node (its alerts are that node's to evaluate and send). Not
    /// while ownership is unknown (etcd away): then what is here stays here.
    fn moved_away(&self, service: &str) -> bool;
}

/// Notifications queued together, to go out once the state that records them is written, or at `deadline`.
struct Release {
    after: Vec<oneshot::Receiver<()>>,
    deadline: Instant,
    notifications: Vec<Notification>,
}

/// Passes notifications on to delivery in the order they were queued, each batch only once the state that records
/// it is written (or at its deadline, `write_wait` after it was queued: alerting does not stop when the store
/// does). A page sent before its alert is on record could, after a crash, be sent again by the next owner under a
/// new id; written first, it is sent again at most under its own id and idempotency key.
async fn forward(
    mut releases: mpsc::UnboundedReceiver<Release>,
    sink: mpsc::UnboundedSender<Notification>,
) {
    while let Some(release) = releases.recv().await {
        if !release.after.is_empty() {
            let written = async {
                for write in release.after {
                    write.await.ok(); // a write given up (the service moved) releases as well
                }
            };
            if tokio::time::timeout_at(release.deadline, written)
                .await
                .is_err()
            {
                warn!(message = "Alert state not written in time; notifying anyway.");
            }
        }
        for notification in release.notifications {
            if sink.send(notification).is_err() {
                // Delivery stops only at shutdown; the notification is not sent, and says so.
                warn!(message = "Delivery stopped; notification not sent.");
            }
        }
    }
}

/// A handle to the alert manager; cheap to clone, never blocks the caller.
#[derive(Clone)]
pub(crate) struct Alerts {
    tx: mpsc::UnboundedSender<Command>,
    health: Arc<Health>,
}

impl Alerts {
    /// Starts the manager in `tasks`, restoring what `persistence` saved. Notifications go to `sink`; changed
    /// records to `records`.
    pub(crate) fn spawn(
        rules: Arc<RulesStore>,
        records: Arc<dyn RecordSink>,
        sink: mpsc::UnboundedSender<Notification>,
        health: Arc<Health>,
        keeping: Keeping,
        tasks: &mut JoinSet<()>,
    ) -> Self {
        let Keeping {
            persistence,
            handover,
            resolved: kept,
        } = keeping;
        let (tx, rx) = mpsc::unbounded_channel();
        let (gate, releases) = mpsc::unbounded_channel();
        let write_wait = handover.as_ref().map_or(Duration::ZERO, |h| h.write_wait());
        tasks.spawn(forward(releases, sink));
        let mut manager = Manager {
            rules,
            records,
            outbox: Vec::new(),
            writing: Vec::new(),
            write_wait,
            handing: HashMap::new(),
            gate,
            entries: BTreeMap::new(),
            commands: tx.downgrade(),
            persistence,
            dirty: false,
            health: health.clone(),
            handover,
            handed_over: HashMap::new(),
            kept,
        };
        if manager.handover.is_some() {
            // In a cluster a service's alerts come with the service (from etcd), not from this node's file: this
            // node may no longer own what it had.
            info!(
                message = "Cluster: alert state is taken over per service as services arrive, not restored from the state file."
            );
        } else {
            manager.restore();
        }
        tasks.spawn(manager.run(rx));
        Self { tx, health }
    }

    /// Hands over a lifecycle event (from a shard or the canary). Only fails once the manager has stopped (at
    /// shutdown); the event is then counted and logged as lost.
    pub(crate) fn event(&self, event: AlertEvent) {
        if let Err(mpsc::error::SendError(Command::Event(event))) =
            self.tx.send(Command::Event(event))
        {
            self.health.alert_events_lost.inc();
            warn!(message = "Alert manager stopped; event lost.", alert = %event.id, rule = %event.rule);
        }
    }

    /// Acknowledges a firing alert: escalation stops, and everyone told so far is told. With a state file, the
    /// acknowledgement is on disk when this returns.
    pub(crate) async fn ack(&self, id: &str, by: &str) -> Result<AlertRecord, AckError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Ack {
            id: id.to_owned(),
            by: by.to_owned(),
            reply,
        };
        if self.tx.send(command).is_err() {
            return Err(AckError::NotFound(id.to_owned()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(AckError::NotFound(id.to_owned())))
    }

    /// Takes over `service`'s alerts handed over by its previous owner; returns once the manager holds them.
    pub(crate) async fn adopt(&self, service: Arc<str>, saved: Vec<SavedAlert>) {
        let (reply, answer) = oneshot::channel();
        if self
            .tx
            .send(Command::Adopt {
                service,
                saved,
                reply,
            })
            .is_ok()
        {
            answer.await.ok(); // the manager stopped: shutdown
        }
    }

    /// Forgets `service`'s alerts without resolving them: it moved to another node, which has them.
    pub(crate) fn disown(&self, service: Arc<str>) {
        self.tx.send(Command::Disown { service }).ok(); // the manager stopped: shutdown
    }

    /// Returns once `service`'s last state, handed over when it was disowned, is written where its next owner
    /// reads it, or `write_wait` has passed (at once when nothing is being handed over). A stream of a service that
    /// moved waits for this before it lets its agent go to the new owner, so the new owner reads the last state.
    pub(crate) async fn handed_over(&self, service: Arc<str>) {
        let (reply, answer) = oneshot::channel();
        if self
            .tx
            .send(Command::HandedOver { service, reply })
            .is_err()
        {
            return; // the manager stopped: shutdown
        }
        if let Ok(mut done) = answer.await {
            done.wait_for(|done| *done).await.ok(); // a closed channel is done as well
        }
    }

    /// Every listed alert, newest first.
    pub(crate) async fn list(&self) -> Vec<AlertRecord> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::List { reply }).is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }
}

struct Entry {
    record: AlertRecord,
    /// Rule, service and labels ([`alert_key`]).
    key: String,
    chain: Option<Arc<Owner>>,
    fired_at: Option<Instant>,
    next_step: usize,
    told: Vec<usize>,
    sent: HashSet<(NotifyTransition, usize)>,
    settled: HashSet<(NotifyTransition, usize)>,
    ended_at: Option<Instant>,
    /// Restored from disk and not yet seen breaching again: resolved at this instant unless an event comes.
    confirm_by: Option<Instant>,
}

impl Entry {
    /// A pending alert nobody has been told about.
    fn new(event: &AlertEvent) -> Self {
        Self {
            record: new_record(event),
            key: alert_key(&event.rule, &event.service, &event.labels),
            chain: None,
            fired_at: None,
            next_step: 0,
            told: Vec::new(),
            sent: HashSet::new(),
            settled: HashSet::new(),
            ended_at: None,
            confirm_by: None,
        }
    }

    fn is_open(&self) -> bool {
        matches!(
            self.record.state,
            AlertState::Pending | AlertState::Firing | AlertState::Acknowledged
        )
    }

    fn saved(&self) -> SavedAlert {
        let sorted = |set: &HashSet<(NotifyTransition, usize)>| {
            let mut v: Vec<_> = set.iter().copied().collect();
            v.sort_by_key(|(t, step)| (*step, t.as_str()));
            v
        };
        SavedAlert {
            record: self.record.clone(),
            key: self.key.clone(),
            next_step: self.next_step,
            told: self.told.clone(),
            queued: sorted(&self.sent),
            settled: sorted(&self.settled),
        }
    }
}

struct Manager {
    rules: Arc<RulesStore>,
    records: Arc<dyn RecordSink>,
    /// Notifications queued since the last save; they go out after it (see [`forward`]).
    outbox: Vec<Notification>,
    /// Handover writes started since the last release.
    writing: Vec<oneshot::Receiver<()>>,
    /// How long a release waits for them at most.
    write_wait: Duration,
    /// Services disowned whose last state is being written: done once it is (or its wait is over).
    handing: HashMap<Arc<str>, watch::Receiver<bool>>,
    gate: mpsc::UnboundedSender<Release>,
    entries: BTreeMap<String, Entry>,
    /// The manager's own queue, for delivery to report settled notifications (weak: it does not keep it open).
    commands: mpsc::WeakUnboundedSender<Command>,
    persistence: Option<Persistence>,
    /// Something worth persisting changed since the last save.
    dirty: bool,
    health: Arc<Health>,
    /// Where each service's state goes for the next owner (cluster only).
    handover: Option<Arc<dyn Handover>>,
    /// What was last handed over, per service (JSON), to send only what changed.
    handed_over: HashMap<Arc<str>, String>,
    /// How long, and how many, resolved alerts stay listed.
    kept: ResolvedKept,
}

/// Commands the manager takes in before its upkeep and save, at most: a burst is saved once, and a flood still
/// lets due escalations run.
const MAX_COMMANDS_AT_ONCE: usize = 1024;

impl Manager {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        // What the state file had queued and not delivered is on record already, and so are the resolves of a file
        // older than the outage tolerance (saved by `restore`).
        self.release();
        // In a cluster: how often alerts of services that moved away without their shard knowing (evicted as idle
        // here before the move) are let go, so that only the owner pages for them.
        let mut moves = tokio::time::interval(Duration::from_secs(1));
        moves.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let beat = self
            .persistence
            .as_ref()
            .map_or(Duration::from_secs(60), |p| heartbeat(p.outage_tolerance));
        let mut beats = tokio::time::interval(beat);
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = self.next_due();
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    self.handle(command);
                    // What is queued already (an incident's burst of events, a run of deliveries settling) is
                    // taken in before the upkeep and the save below, each a pass over every held alert: one save
                    // per burst, not one per event (500 alerts firing at once were 500 saves, of 1 to 500 alerts each).
                    for _ in 1..MAX_COMMANDS_AT_ONCE {
                        let Ok(command) = commands.try_recv() else { break };
                        self.handle(command);
                    }
                }
                _ = sleep_until_opt(due) => {}
                _ = moves.tick(), if self.handover.is_some() => self.disown_moved(),
                // Single node only: in a cluster the file is not read at start (alerts come with their services).
                _ = beats.tick(), if self.persistence.is_some() && self.handover.is_none() => {
                    // The file's time says the aggregator was up: written again while an alert is open.
                    if self.entries.values().any(|e| {
                            matches!(e.record.state, AlertState::Firing | AlertState::Acknowledged)
                        })
                    {
                        self.dirty = true;
                    }
                }
            }
            self.escalate_due();
            self.resolve_unconfirmed();
            self.prune();
            self.save();
            self.release();
        }
    }

    /// Takes in one command.
    fn handle(&mut self, command: Command) {
        match command {
            Command::Event(event) => self.on_event(event),
            Command::Ack { id, by, reply } => {
                let answer = self.on_ack(&id, &by);
                self.save();
                self.release();
                // The asker may have gone (a closed HTTP request); the ack stands either way.
                reply.send(answer).ok();
            }
            Command::List { reply } => {
                let mut all: Vec<AlertRecord> =
                    self.entries.values().map(|e| e.record.clone()).collect();
                all.sort_by(|a, b| b.since.cmp(&a.since).then_with(|| a.id.cmp(&b.id)));
                reply.send(all).ok(); // nobody waiting any more is fine
            }
            Command::Adopt {
                service,
                saved,
                reply,
            } => {
                self.adopt(&service, saved);
                reply.send(()).ok(); // the asker may have gone
            }
            Command::Disown { service } => self.disown(&service),
            Command::HandedOver { service, reply } => {
                // A service that moved while idle here (no shard disowned it) may still have alerts here.
                if !self.handing.contains_key(&service)
                    && self
                        .handover
                        .as_ref()
                        .is_some_and(|h| h.moved_away(&service))
                    && self.entries.values().any(|e| e.record.service == service)
                {
                    self.disown(&service);
                }
                let done = self
                    .handing
                    .get(&service)
                    .cloned()
                    .unwrap_or_else(|| watch::channel(true).1);
                if *done.borrow() {
                    self.handing.remove(&service);
                }
                reply.send(done).ok(); // the asker may have gone
            }
            Command::Settled {
                id,
                transition,
                step,
            } => {
                if let Some(entry) = self.entries.get_mut(&id) {
                    self.dirty |= entry.settled.insert((transition, step));
                }
            }
        }
    }

    /// Hands `service`'s newest state to the next owner and forgets its alerts without resolving them; its
    /// streams wait for that write ([`Alerts::handed_over`]).
    fn disown(&mut self, service: &str) {
        self.hand_over();
        let saved: Vec<SavedAlert> = self
            .entries
            .values()
            .filter(|e| *e.record.service == *service)
            .map(Entry::saved)
            .collect();
        // With alerts here: their last state once more, whether or not it changed since the last write, to know
        // when it is in. Without (none, or disowned already): nothing to hand over, and nothing written over what
        // was.
        if let Some(handover) = self.handover.as_ref().filter(|_| !saved.is_empty())
            && let Some(written) = handover.publish(service, saved)
        {
            let (done, waiting) = watch::channel(false);
            let deadline = Instant::now() + self.write_wait;
            tokio::spawn(async move {
                tokio::time::timeout_at(deadline, written).await.ok();
                done.send(true).ok(); // nobody waiting is fine
            });
            // Those handed over already are forgotten here (their streams found them done or are gone).
            self.handing.retain(|_, done| !*done.borrow());
            self.handing.insert(Arc::from(service), waiting);
        }
        let before = self.entries.len();
        self.entries.retain(|_, e| *e.record.service != *service);
        self.handed_over.remove(service);
        info!(message = "Service moved to another node; its alerts are left to it.", %service, alerts = before - self.entries.len());
    }

    /// Disowns every service with alerts here that another node owns now.
    fn disown_moved(&mut self) {
        let Some(handover) = &self.handover else {
            return;
        };
        let moved: BTreeSet<Arc<str>> = self
            .entries
            .values()
            .map(|e| e.record.service.clone())
            .filter(|s| handover.moved_away(s))
            .collect();
        for service in moved {
            self.disown(&service);
        }
    }

    /// Sends what was queued since the last release on to delivery, behind the writes that record it.
    fn release(&mut self) {
        if self.outbox.is_empty() {
            self.writing.clear();
            return;
        }
        let release = Release {
            after: std::mem::take(&mut self.writing),
            deadline: Instant::now() + self.write_wait,
            notifications: std::mem::take(&mut self.outbox),
        };
        self.gate.send(release).ok(); // the forwarder stops only at shutdown
    }

    /// Loads the state file: firing and acknowledged alerts wait for their rule to confirm them, notifications
    /// queued but not finished go out again, escalation resumes where it stopped.
    fn restore(&mut self) {
        let Some(persistence) = &self.persistence else {
            return;
        };
        let loaded = match persistence.file.load() {
            Ok(loaded) => loaded,
            Err(failure) => {
                error!(message = "Alert state unreadable; starting without it.", error = %failure);
                match persistence.file.set_aside() {
                    Ok(aside) => {
                        warn!(message = "Unreadable alert state kept aside.", path = %aside.display())
                    }
                    Err(error) => {
                        error!(message = "Unreadable alert state could not be set aside.", %error)
                    }
                }
                return;
            }
        };
        let (grace, canary_grace) = (persistence.restore_grace, persistence.canary_restore_grace);
        let tolerance = persistence.outage_tolerance;
        let path = persistence.file.path().display().to_string();
        let now_ms = strobe_proto::clock::unix_millis();
        let age = loaded.saved_at_ms.map_or(Duration::ZERO, |at| {
            Duration::from_millis(u64::try_from(now_ms.saturating_sub(at)).unwrap_or(0))
        });
        let (open, requeued) = self.take_saved(loaded.alerts, grace, canary_grace);
        info!(
            message = "Alert state restored.", %path,
            alerts = self.entries.len(), firing = open, notifications_queued_again = requeued,
        );
        if open > 0 && age > tolerance {
            // Nobody watched the rules for longer than the tolerance: whether those breaches went on is unknown, and
            // an acknowledgement that old must not silence the incident of today.
            warn!(
                message = "Alert state older than alert_outage_tolerance: its open alerts are resolved, not carried over.",
                %path, age_secs = age.as_secs(), tolerance_secs = tolerance.as_secs(), open,
            );
            let open: Vec<String> = self
                .entries
                .iter()
                .filter(|(_, e)| e.is_open())
                .map(|(id, _)| id.clone())
                .collect();
            for id in open {
                self.resolve(&id, None, now_ms);
            }
            // On record before the resolves go out (the run's first release), so that a restart right after
            // does not send them again.
            self.save();
        }
    }

    /// A service's alerts handed over by its previous owner: held as after a restart (waiting for their rule to
    /// confirm them, unfinished notifications queued again, escalation resumed).
    fn adopt(&mut self, service: &Arc<str>, saved: Vec<SavedAlert>) {
        let (grace, canary_grace) = self
            .persistence
            .as_ref()
            .map_or((DEFAULT_RESTORE_GRACE, DEFAULT_RESTORE_GRACE), |p| {
                (p.restore_grace, p.canary_restore_grace)
            });
        // What this manager already holds is newer than what was handed over.
        let saved: Vec<SavedAlert> = saved
            .into_iter()
            .filter(|s| *s.record.service == **service && !self.entries.contains_key(&s.record.id))
            .collect();
        if saved.is_empty() {
            return;
        }
        let (open, requeued) = self.take_saved(saved, grace, canary_grace);
        info!(message = "Alerts taken over.", %service, open, notifications_queued_again = requeued);
        // What was taken over is what the store holds: not written back unless it changes here.
        let held = self.saved_by_service().remove(service).unwrap_or_default();
        self.handed_over.insert(
            service.clone(),
            serde_json::to_string(&held).unwrap_or_default(),
        );
        self.dirty = true;
    }

    /// Holds saved alerts: open ones wait for their rule; returns (open, notifications queued again).
    fn take_saved(
        &mut self,
        saved: Vec<SavedAlert>,
        grace: Duration,
        canary_grace: Duration,
    ) -> (usize, usize) {
        let now = Instant::now();
        let now_ms = strobe_proto::clock::unix_millis();
        let ago = |ms: i64| {
            now.checked_sub(Duration::from_millis(
                u64::try_from(now_ms - ms).unwrap_or(0),
            ))
            .unwrap_or(now)
        };
        let rules = self.rules.current();
        let (mut open, mut requeued) = (0, 0);
        for saved in saved {
            let mut record = saved.record;
            // State written by older versions named targets by URL: never show one.
            for target in &mut record.notified {
                if target.contains("://") {
                    *target = crate::alerting::escalation::redacted_url(target);
                }
            }
            let ended_at = match record.state {
                // Pending alerts start again from their rule; nobody was told.
                AlertState::Pending | AlertState::Cleared => continue,
                AlertState::Resolved => Some(ago(record.resolved_at_ms.unwrap_or(now_ms))),
                AlertState::Firing | AlertState::Acknowledged => None,
            };
            let rule_for = rules
                .rules
                .iter()
                .find(|r| *r.name == *record.rule)
                .map_or(0, |r| u64::from(r.for_secs));
            let mut entry = Entry {
                chain: self.chain_of(&record.owners, &record.id),
                fired_at: record.fired_at_ms.map(ago),
                key: saved.key,
                next_step: saved.next_step,
                told: saved.told,
                sent: saved.queued.into_iter().collect(),
                settled: saved.settled.into_iter().collect(),
                ended_at,
                confirm_by: ended_at.is_none().then(|| match record.kind {
                    AlertKind::Canary => now + canary_grace,
                    AlertKind::Rule => now + grace + Duration::from_secs(rule_for),
                }),
                record,
            };
            // Again in the order they were first queued for each target: firing, then acknowledged, then resolved.
            let mut unsettled: Vec<_> = entry.sent.difference(&entry.settled).copied().collect();
            unsettled.sort_by_key(|(transition, step)| (*step, transition_rank(*transition)));
            for (transition, step) in unsettled {
                entry.sent.remove(&(transition, step));
                notify(
                    &mut self.outbox,
                    &self.commands,
                    &mut entry,
                    transition,
                    step,
                );
                requeued += 1;
            }
            if entry.is_open() {
                open += 1;
                self.records.publish_alert(&entry.record);
            }
            self.entries.insert(entry.record.id.clone(), entry);
        }
        (open, requeued)
    }

    /// Writes the state file if something changed; a failure is logged and counted, and retried at the next
    /// change (alerting goes on without it).
    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        self.hand_over();
        let Some(persistence) = &self.persistence else {
            self.dirty = false;
            return;
        };
        let saved = self.entries.values().map(Entry::saved).collect();
        match persistence.file.save(saved) {
            Ok(()) => self.dirty = false,
            Err(error) => {
                self.health.alert_state_save_failures.inc();
                error!(message = "Alert state not saved.", %error);
            }
        }
    }

    /// Every held alert as saved, by service.
    fn saved_by_service(&self) -> BTreeMap<Arc<str>, Vec<SavedAlert>> {
        let mut by_service: BTreeMap<Arc<str>, Vec<SavedAlert>> = BTreeMap::new();
        for entry in self.entries.values() {
            by_service
                .entry(entry.record.service.clone())
                .or_default()
                .push(entry.saved());
        }
        by_service
    }

    /// Sends each service's alerts whose state changed to the handover store (a service left with none sends an
    /// empty list, so the next owner does not take over stale alerts).
    fn hand_over(&mut self) {
        let Some(handover) = &self.handover else {
            return;
        };
        let mut by_service = self.saved_by_service();
        let gone: Vec<Arc<str>> = self
            .handed_over
            .keys()
            .filter(|s| !by_service.contains_key(*s))
            .cloned()
            .collect();
        for service in gone {
            by_service.insert(service, Vec::new());
        }
        for (service, alerts) in by_service {
            let json = serde_json::to_string(&alerts).unwrap_or_default();
            if self.handed_over.get(&service) == Some(&json) {
                continue;
            }
            if let Some(written) = handover.publish(&service, alerts) {
                self.writing.push(written);
            }
            if json == "[]" {
                self.handed_over.remove(&service);
            } else {
                self.handed_over.insert(service, json);
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        let escalations = self
            .entries
            .values()
            .filter(|e| e.record.state == AlertState::Firing)
            .filter_map(|e| {
                let step = e.chain.as_ref()?.escalation.get(e.next_step)?;
                Some(e.fired_at? + step.after)
            });
        let confirmations = self.entries.values().filter_map(|e| e.confirm_by);
        escalations.chain(confirmations).min()
    }

    /// The id an event belongs to: its own, or that of the open alert with the same rule, service and labels (an
    /// alert restored after a restart, which keeps the id it was paged with).
    fn route(&self, event: &AlertEvent) -> String {
        if self.entries.contains_key(&event.id) {
            return event.id.clone();
        }
        let key = alert_key(&event.rule, &event.service, &event.labels);
        // Only a firing or acknowledged alert (restored ones are never pending): a stale pending entry must not
        // swallow a new breach.
        self.entries
            .iter()
            .find(|(_, e)| {
                e.key == key
                    && matches!(
                        e.record.state,
                        AlertState::Firing | AlertState::Acknowledged
                    )
            })
            .map_or_else(|| event.id.clone(), |(id, _)| id.clone())
    }

    fn on_event(&mut self, event: AlertEvent) {
        let id = self.route(&event);
        if let Some(entry) = self.entries.get_mut(&id)
            && entry.confirm_by.take().is_some()
        {
            info!(message = "Restored alert confirmed by its rule.", alert = %id, rule = %event.rule);
        }
        match event.kind {
            EventKind::Pending => {
                let entry = self.entries.entry(id).or_insert_with(|| Entry::new(&event));
                self.records.publish_alert(&entry.record);
            }
            EventKind::Cleared => {
                let Some(entry) = self.entries.get(&id) else {
                    return;
                };
                if entry.record.state == AlertState::Pending {
                    if let Some(mut entry) = self.entries.remove(&id) {
                        entry.record.state = AlertState::Cleared;
                        entry.record.value = event.value;
                        self.records.publish_alert(&entry.record);
                    }
                } else {
                    // A restored alert whose breach, seen again, stopped before the rule's `for`: it is over.
                    self.resolve(&id, event.value, event.at_ms);
                }
            }
            EventKind::Firing => {
                let chain = self.chain_of(&event.owners, &event.id);
                let entry = self
                    .entries
                    .entry(id.clone())
                    .or_insert_with(|| Entry::new(&event));
                if entry.record.state != AlertState::Pending {
                    return;
                }
                entry.record.state = AlertState::Firing;
                entry.record.value = event.value;
                entry.record.evidence = event.evidence.clone().or(entry.record.evidence.take());
                entry.record.fired_at_ms = Some(event.at_ms);
                entry.record.detected_after_ms = Some(event.at_ms - event.since * 1000);
                entry.chain = chain;
                let now = Instant::now();
                entry.fired_at = Some(now);
                self.dirty = true;
                info!(
                    message = "Alert firing.", alert = %id, rule = %event.rule, service = %event.service,
                    detected_after_ms = event.at_ms - event.since * 1000,
                );
                self.records.publish_alert(&entry.record);
                // The steps due at once are notified now, not at the upkeep after the batch of commands this event
                // came in: a resolution or an acknowledgement later in the batch would find nobody told.
                escalate(entry, now, &mut self.outbox, &self.commands);
            }
            EventKind::Resolved => self.resolve(&id, event.value, event.at_ms),
        }
    }

    /// Ends a firing or acknowledged alert and tells everyone who was told it fired.
    fn resolve(&mut self, id: &str, value: Option<f64>, at_ms: i64) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        if !matches!(
            entry.record.state,
            AlertState::Firing | AlertState::Acknowledged
        ) {
            return;
        }
        entry.record.state = AlertState::Resolved;
        entry.record.resolved_at_ms = Some(at_ms);
        if value.is_some() {
            entry.record.value = value;
        }
        entry.ended_at = Some(Instant::now());
        entry.confirm_by = None;
        self.dirty = true;
        info!(message = "Alert resolved.", alert = %id, rule = %entry.record.rule, service = %entry.record.service);
        self.records.publish_alert(&entry.record);
        tell_everyone_told(
            &mut self.outbox,
            &self.commands,
            entry,
            NotifyTransition::Resolved,
        );
    }

    /// Resolves restored alerts that no rule confirmed in time: their breach ended while the aggregator was down.
    fn resolve_unconfirmed(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.confirm_by.is_some_and(|at| at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            info!(message = "Restored alert not seen breaching again; resolving it.", alert = %id);
            self.resolve(&id, None, strobe_proto::clock::unix_millis());
        }
    }

    /// The escalation chain of an alert's owners: one owner's chain, or several merged in order of `after`.
    fn chain_of(&self, owners: &[String], id: &str) -> Option<Arc<Owner>> {
        let rules = self.rules.current();
        let mut chains = Vec::new();
        for name in owners {
            match rules.owners.get(name) {
                Some(owner) => chains.push(owner.clone()),
                None => {
                    warn!(message = "Alert owner has no escalation chain.", owner = %name, alert = %id)
                }
            }
        }
        match chains.len() {
            0 => None,
            1 => chains.pop(),
            _ => {
                let mut escalation: Vec<_> = chains
                    .iter()
                    .flat_map(|o| o.escalation.iter().cloned())
                    .collect();
                escalation.sort_by_key(|s| s.after);
                escalation.dedup_by(|a, b| a.webhook == b.webhook);
                let name = chains
                    .iter()
                    .map(|o| o.name.as_str())
                    .collect::<Vec<_>>()
                    .join("+");
                Some(Arc::new(Owner { name, escalation }))
            }
        }
    }

    fn on_ack(&mut self, id: &str, by: &str) -> Result<AlertRecord, AckError> {
        let entry = self
            .entries
            .get_mut(id)
            .ok_or_else(|| AckError::NotFound(id.to_owned()))?;
        match entry.record.state {
            AlertState::Acknowledged => return Ok(entry.record.clone()),
            AlertState::Firing => {}
            _ => return Err(AckError::NotFiring(id.to_owned())),
        }
        entry.record.state = AlertState::Acknowledged;
        entry.record.acknowledged_by = Some(by.to_owned());
        entry.record.acknowledged_at_ms = Some(strobe_proto::clock::unix_millis());
        self.dirty = true;
        info!(message = "Alert acknowledged.", alert = %id, by = %by);
        self.records.publish_alert(&entry.record);
        tell_everyone_told(
            &mut self.outbox,
            &self.commands,
            entry,
            NotifyTransition::Acknowledged,
        );
        Ok(entry.record.clone())
    }

    fn escalate_due(&mut self) {
        let now = Instant::now();
        for entry in self.entries.values_mut() {
            self.dirty |= escalate(entry, now, &mut self.outbox, &self.commands);
        }
    }

    fn prune(&mut self) {
        let now = Instant::now();
        let before = self.entries.len();
        let retention = self.kept.retention;
        let stale_pending = strobe_proto::clock::unix_second()
            .saturating_sub(i64::try_from(STALE_PENDING.as_secs()).unwrap_or(i64::MAX));
        let unsettled = |e: &Entry| e.sent.iter().any(|n| !e.settled.contains(n));
        self.entries.retain(|_, e| {
            e.ended_at
                .is_none_or(|ended| now.duration_since(ended) < retention || unsettled(e))
                && !(e.record.state == AlertState::Pending && e.record.since < stale_pending)
        });
        // Past the most kept, the oldest resolved go, however many fire: sorted once, not searched once per alert.
        // Restored ones all ended "now" (the monotonic clock cannot go back past the start): their wall-clock end
        // orders them.
        let resolved = self
            .entries
            .values()
            .filter(|e| e.ended_at.is_some())
            .count();
        if resolved > self.kept.most {
            let mut oldest: Vec<(Instant, i64, String)> = self
                .entries
                .iter()
                .filter(|(_, e)| !unsettled(e))
                .filter_map(|(id, e)| {
                    let ended_ms = e.record.resolved_at_ms.unwrap_or(i64::MAX);
                    e.ended_at.map(|ended| (ended, ended_ms, id.clone()))
                })
                .collect();
            oldest.sort_unstable();
            for (_, _, id) in oldest.into_iter().take(resolved - self.kept.most) {
                self.entries.remove(&id);
            }
        }
        self.dirty |= self.entries.len() != before;
    }
}

/// Tells every escalation step that was told the alert fired about `transition`.
fn tell_everyone_told(
    outbox: &mut Vec<Notification>,
    commands: &mpsc::WeakUnboundedSender<Command>,
    entry: &mut Entry,
    transition: NotifyTransition,
) {
    for step in entry.told.clone() {
        notify(outbox, commands, entry, transition, step);
    }
}

/// Notifies the steps of `entry`'s escalation that are due at `now`, while it fires; whether any was.
fn escalate(
    entry: &mut Entry,
    now: Instant,
    outbox: &mut Vec<Notification>,
    commands: &mpsc::WeakUnboundedSender<Command>,
) -> bool {
    let mut any = false;
    while entry.record.state == AlertState::Firing {
        let (Some(chain), Some(fired_at)) = (&entry.chain, entry.fired_at) else {
            break;
        };
        let Some(step) = chain.escalation.get(entry.next_step) else {
            break;
        };
        if fired_at + step.after > now {
            break;
        }
        let index = entry.next_step;
        entry.next_step += 1;
        entry.told.push(index);
        // Named by owner and step, never by URL (a webhook URL can be a secret).
        entry
            .record
            .notified
            .push(format!("{} step {}", chain.name, index + 1));
        any = true;
        notify(outbox, commands, entry, NotifyTransition::Firing, index);
    }
    any
}

fn notify(
    outbox: &mut Vec<Notification>,
    commands: &mpsc::WeakUnboundedSender<Command>,
    entry: &mut Entry,
    transition: NotifyTransition,
    step: usize,
) {
    let Some(target) = entry.chain.as_ref().and_then(|c| c.escalation.get(step)) else {
        return;
    };
    if !entry.sent.insert((transition, step)) {
        return;
    }
    let (commands, id) = (commands.clone(), entry.record.id.clone());
    let on_settled = OnSettled(Arc::new(move || {
        if let Some(commands) = commands.upgrade() {
            // The manager is gone only at shutdown; the state file then keeps it as queued, sent again next start.
            commands
                .send(Command::Settled {
                    id: id.clone(),
                    transition,
                    step,
                })
                .ok();
        }
    }));
    let notification = Notification {
        record: entry.record.clone(),
        transition,
        step: target.clone(),
        on_settled: Some(on_settled),
    };
    outbox.push(notification);
}

/// The order in which one target hears of one alert.
fn transition_rank(transition: NotifyTransition) -> u8 {
    match transition {
        NotifyTransition::Firing => 0,
        NotifyTransition::Acknowledged => 1,
        NotifyTransition::Resolved => 2,
    }
}

fn new_record(event: &AlertEvent) -> AlertRecord {
    AlertRecord {
        id: event.id.clone(),
        rule: event.rule.clone(),
        kind: if event.evidence.is_some() {
            AlertKind::Canary
        } else {
            AlertKind::Rule
        },
        service: event.service.clone(),
        labels: event.labels.clone(),
        summary: event.summary.clone(),
        state: AlertState::Pending,
        value: event.value,
        threshold: event.threshold,
        since: event.since,
        fired_at_ms: None,
        detected_after_ms: None,
        acknowledged_by: None,
        acknowledged_at_ms: None,
        resolved_at_ms: None,
        owners: event.owners.clone(),
        notified: Vec::new(),
        evidence: event.evidence.clone(),
        hint: event.hint.clone(),
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Test helpers shared with other modules' tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A firing alert record.
    pub(crate) fn record(id: &str) -> AlertRecord {
        AlertRecord {
            id: id.into(),
            rule: "r".into(),
            kind: AlertKind::Rule,
            service: "svc".into(),
            labels: BTreeMap::new(),
            summary: "m sum above 1".into(),
            state: AlertState::Firing,
            value: Some(5.0),
            threshold: 1.0,
            since: 100,
            fired_at_ms: Some(101_000),
            detected_after_ms: Some(1000),
            acknowledged_by: None,
            acknowledged_at_ms: None,
            resolved_at_ms: None,
            owners: vec!["team".into()],
            notified: Vec::new(),
            evidence: None,
            hint: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
[[rules]]
name = "r"
metric = "m"
stat = "sum"
above = 1.0
owner = "team"

[[owners]]
name = "team"
escalation = [
  { after = "0s", webhook = "http://127.0.0.1:1/dev" },
  { after = "30s", webhook = "http://127.0.0.1:1/lead", format = "slack" },
  { after = "90s", webhook = "http://127.0.0.1:1/boss" },
]
"#;

    fn event(id: &str, kind: EventKind) -> AlertEvent {
        AlertEvent {
            id: id.into(),
            kind,
            rule: "r".into(),
            owners: vec!["team".into()],
            service: "svc".into(),
            labels: BTreeMap::new(),
            summary: "m sum above 1".into(),
            value: Some(5.0),
            threshold: 1.0,
            since: 100,
            at_ms: 101_005,
            evidence: None,
            hint: None,
        }
    }

    /// An event of the alert of `route` (alerts are told apart by their labels, not by the id events carry).
    fn event_of_route(id: &str, kind: EventKind, route: &str) -> AlertEvent {
        let mut event = event(id, kind);
        event.labels.insert("route".into(), route.into());
        event
    }

    /// Records go nowhere: these tests read the notifications.
    struct Discard;

    impl RecordSink for Discard {
        fn publish_alert(&self, _: &AlertRecord) {}
    }

    fn setup() -> (Alerts, mpsc::UnboundedReceiver<Notification>, JoinSet<()>) {
        setup_with(None)
    }

    fn setup_with(
        persistence: Option<Persistence>,
    ) -> (Alerts, mpsc::UnboundedReceiver<Notification>, JoinSet<()>) {
        setup_handing_over(persistence, None)
    }

    fn setup_handing_over(
        persistence: Option<Persistence>,
        handover: Option<Arc<dyn Handover>>,
    ) -> (Alerts, mpsc::UnboundedReceiver<Notification>, JoinSet<()>) {
        setup_keeping(persistence, handover, ResolvedKept::default())
    }

    fn setup_keeping(
        persistence: Option<Persistence>,
        handover: Option<Arc<dyn Handover>>,
        kept: ResolvedKept,
    ) -> (Alerts, mpsc::UnboundedReceiver<Notification>, JoinSet<()>) {
        let dir = std::env::temp_dir().join(format!("strobe-manager-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("rules-{}.toml", rand::random::<u64>()));
        std::fs::write(&path, RULES).unwrap();
        let store = RulesStore::open(Some(path)).unwrap();
        let (sink, notes) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let health = Arc::new(Health::default());
        let alerts = Alerts::spawn(
            store,
            Arc::new(Discard),
            sink,
            health,
            Keeping {
                persistence,
                handover,
                resolved: kept,
            },
            &mut tasks,
        );
        (alerts, notes, tasks)
    }

    /// A handover store whose writes finish only when the test says so.
    #[derive(Default)]
    struct HeldStore {
        writes: std::sync::Mutex<Vec<oneshot::Sender<()>>>,
        /// How many alerts each write held, in order.
        published: std::sync::Mutex<Vec<usize>>,
        /// Every service is owned by another node now.
        moved: std::sync::atomic::AtomicBool,
    }

    impl Handover for HeldStore {
        fn publish(&self, _: &str, alerts: Vec<SavedAlert>) -> Option<oneshot::Receiver<()>> {
            self.published.lock().unwrap().push(alerts.len());
            let (written, answer) = oneshot::channel();
            self.writes.lock().unwrap().push(written);
            Some(answer)
        }

        fn write_wait(&self) -> Duration {
            Duration::from_secs(1)
        }

        fn moved_away(&self, _: &str) -> bool {
            self.moved.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    /// A service another node owns now (it moved while idle here, so no shard gave it away): its alerts are let go
    /// within a second, and this node no longer escalates them.
    #[tokio::test(start_paused = true)]
    async fn alerts_of_a_service_another_node_owns_now_are_let_go() {
        let store = Arc::new(HeldStore::default());
        let (alerts, mut notes, _tasks) = setup_handing_over(None, Some(store.clone()));
        alerts.event(event("a", EventKind::Pending));
        alerts.event(event("a", EventKind::Firing));
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(
            drain(&mut notes),
            vec![("a".into(), "firing", "dev".into())]
        );
        assert_eq!(alerts.list().await.len(), 1);
        // Its state was handed over as it changed (nothing changed since, so nothing more is written).
        assert!(!store.writes.lock().unwrap().is_empty());
        store
            .moved
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert!(alerts.list().await.is_empty(), "let go");
        tokio::time::sleep(Duration::from_secs(60)).await;
        settle().await;
        assert!(
            drain(&mut notes).is_empty(),
            "its escalation (30 s) is the new owner's"
        );
        // The shard's own give-away coming after it writes nothing over the state handed over.
        let published = store.published.lock().unwrap().len();
        alerts.disown("svc".into());
        alerts.handed_over("svc".into()).await;
        assert_eq!(store.published.lock().unwrap().len(), published);
        assert!(
            !store.published.lock().unwrap().contains(&0),
            "never an empty state"
        );
    }

    /// Resolved alerts stay listed for `resolved_alert_retention`, at most `max_resolved_alerts` of them (the
    /// newest), however many fire; firing ones are never dropped for the count, nor a resolved one while a
    /// notification of it is still being delivered.
    #[tokio::test(start_paused = true)]
    async fn resolved_alerts_are_kept_by_time_and_count_while_firing_ones_always_are() {
        let kept = ResolvedKept {
            retention: Duration::from_secs(600),
            most: 3,
        };
        let (alerts, mut notes, _tasks) = setup_keeping(None, None, kept);
        // Delivery finishes with every notification sent so far; how many there were.
        let deliver = |notes: &mut mpsc::UnboundedReceiver<Notification>| {
            let mut n = 0;
            while let Ok(note) = notes.try_recv() {
                if let Some(settled) = note.on_settled {
                    (settled.0)();
                }
                n += 1;
            }
            n
        };
        for i in 0..10 {
            for kind in [EventKind::Pending, EventKind::Firing] {
                alerts.event(event_of_route(&format!("a{i}"), kind, &format!("/r{i}")));
            }
        }
        settle().await;
        assert_eq!(deliver(&mut notes), 10, "each firing alert paged");
        assert_eq!(alerts.list().await.len(), 10);
        for i in 0..6 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            alerts.event(event_of_route(
                &format!("a{i}"),
                EventKind::Resolved,
                &format!("/r{i}"),
            ));
            settle().await;
            assert_eq!(deliver(&mut notes), 1, "its resolve told");
            settle().await;
        }
        // One more resolved whose resolve is still being delivered: kept past the count.
        tokio::time::sleep(Duration::from_secs(1)).await;
        alerts.event(event_of_route("a6", EventKind::Resolved, "/r6"));
        settle().await;
        let held: Vec<Notification> = std::iter::from_fn(|| notes.try_recv().ok()).collect();
        assert_eq!(held.len(), 1);
        let listed = alerts.list().await;
        let ids = |state: AlertState| {
            let mut ids: Vec<String> = listed
                .iter()
                .filter(|r| r.state == state)
                .map(|r| r.id.clone())
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(ids(AlertState::Firing), ["a7", "a8", "a9"]);
        assert_eq!(
            ids(AlertState::Resolved),
            ["a4", "a5", "a6"],
            "the newest three resolved, the one still being told among them"
        );
        // Past the retention: the resolved ones go, but not before the last resolve is delivered.
        tokio::time::sleep(Duration::from_secs(601)).await;
        alerts.event(event_of_route("b", EventKind::Pending, "/b"));
        settle().await;
        let resolved = |list: &[AlertRecord]| {
            list.iter()
                .filter(|r| r.state == AlertState::Resolved)
                .map(|r| r.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(resolved(&alerts.list().await), ["a6"], "still being told");
        for note in held {
            if let Some(settled) = note.on_settled {
                (settled.0)();
            }
        }
        settle().await;
        alerts.event(event_of_route("c", EventKind::Pending, "/c"));
        settle().await;
        let left = alerts.list().await;
        assert!(resolved(&left).is_empty(), "past the retention");
        assert_eq!(
            left.iter()
                .filter(|r| r.state == AlertState::Firing)
                .count(),
            3
        );
    }

    /// An incident's burst of events is taken in at once: its state is saved (and handed over) once, holding every
    /// alert, not once per event; every page still goes out once that write is done.
    #[tokio::test(start_paused = true)]
    async fn a_burst_of_events_is_saved_once() {
        let store = Arc::new(HeldStore::default());
        let (alerts, mut notes, _tasks) = setup_handing_over(None, Some(store.clone()));
        for i in 0..500 {
            for kind in [EventKind::Pending, EventKind::Firing] {
                alerts.event(event_of_route(&format!("a{i}"), kind, &format!("/r{i}")));
            }
        }
        settle().await;
        assert_eq!(*store.published.lock().unwrap(), vec![500]);
        assert!(drain(&mut notes).is_empty(), "held until the write is done");
        for written in store.writes.lock().unwrap().drain(..) {
            written.send(()).ok();
        }
        settle().await;
        assert_eq!(drain(&mut notes).len(), 500);
        assert_eq!(alerts.list().await.len(), 500);
    }

    /// An alert that fires and ends in the same batch of commands (a manager behind during an incident, an ack
    /// racing the page) still pages its first step, then tells it the end.
    #[tokio::test(start_paused = true)]
    async fn an_alert_that_fires_and_ends_in_one_batch_is_paged_then_told() {
        let (alerts, mut notes, _tasks) = setup();
        for kind in [EventKind::Pending, EventKind::Firing, EventKind::Resolved] {
            alerts.event(event("a", kind));
        }
        settle().await;
        assert_eq!(
            drain(&mut notes),
            vec![
                ("a".into(), "firing", "dev".into()),
                ("a".into(), "resolved", "dev".into())
            ]
        );
        for kind in [EventKind::Pending, EventKind::Firing] {
            alerts.event(event_of_route("b", kind, "/b"));
        }
        let acked = alerts.ack("b", "alice").await.expect("firing");
        assert_eq!(acked.state, AlertState::Acknowledged);
        settle().await;
        assert_eq!(
            drain(&mut notes),
            vec![
                ("b".into(), "firing", "dev".into()),
                ("b".into(), "acknowledged", "dev".into())
            ]
        );
    }

    /// A disowned service's last state is written before its streams let their agents go to the new owner:
    /// `handed_over` answers once that write is confirmed, or after `write_wait`, and at once for a service not
    /// being handed over.
    #[tokio::test(start_paused = true)]
    async fn a_moved_service_is_handed_over_before_its_agents_go() {
        let store = Arc::new(HeldStore::default());
        let (alerts, _notes, _tasks) = setup_handing_over(None, Some(store.clone()));
        alerts.event(event("a", EventKind::Pending));
        alerts.event(event("a", EventKind::Firing));
        settle().await;
        store.writes.lock().unwrap().clear();
        alerts.disown("svc".into());
        let handed = tokio::spawn({
            let alerts = alerts.clone();
            async move { alerts.handed_over("svc".into()).await }
        });
        settle().await;
        assert!(
            !handed.is_finished(),
            "not before the last state is written"
        );
        let writes = std::mem::take(&mut *store.writes.lock().unwrap());
        assert_eq!(writes.len(), 1, "its last state, written once more");
        assert_eq!(
            store.published.lock().unwrap().last(),
            Some(&1),
            "with its alert"
        );
        for written in writes {
            written.send(()).unwrap();
        }
        settle().await;
        assert!(handed.is_finished());
        // A store that does not answer holds it for `write_wait`, no longer.
        alerts.event(event("b", EventKind::Pending));
        alerts.event(event("b", EventKind::Firing));
        settle().await;
        alerts.disown("svc".into());
        let handed = tokio::spawn({
            let alerts = alerts.clone();
            async move { alerts.handed_over("svc".into()).await }
        });
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!handed.is_finished());
        tokio::time::sleep(Duration::from_millis(200)).await;
        settle().await;
        assert!(handed.is_finished());
        // Nothing being handed over: at once.
        alerts.handed_over("other".into()).await;
    }

    /// A page goes out only once the state that records it is written for the next owner (so a crash between the
    /// two can only send it again under its own id), or after `write_wait` when the store does not answer.
    #[tokio::test(start_paused = true)]
    async fn a_page_waits_for_its_alert_state_to_be_handed_over() {
        let store = Arc::new(HeldStore::default());
        let (alerts, mut notes, _tasks) = setup_handing_over(None, Some(store.clone()));
        alerts.event(event("a", EventKind::Pending));
        alerts.event(event("a", EventKind::Firing));
        settle().await;
        assert!(
            drain(&mut notes).is_empty(),
            "not before its state is written"
        );
        let writes = std::mem::take(&mut *store.writes.lock().unwrap());
        assert!(!writes.is_empty());
        for written in writes {
            written.send(()).unwrap();
        }
        settle().await;
        assert_eq!(
            drain(&mut notes),
            vec![("a".into(), "firing", "dev".into())]
        );
        // A store that does not answer holds a page for `write_wait`, no longer.
        let other = |kind| AlertEvent {
            service: "other".into(),
            ..event("b", kind)
        };
        alerts.event(other(EventKind::Pending));
        alerts.event(other(EventKind::Firing));
        settle().await;
        assert!(drain(&mut notes).is_empty());
        assert!(!store.writes.lock().unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(999)).await;
        settle().await;
        assert!(drain(&mut notes).is_empty());
        tokio::time::sleep(Duration::from_millis(100)).await;
        settle().await;
        assert_eq!(
            drain(&mut notes),
            vec![("b".into(), "firing", "dev".into())]
        );
    }

    fn drain(
        rx: &mut mpsc::UnboundedReceiver<Notification>,
    ) -> Vec<(String, &'static str, String)> {
        let mut out = Vec::new();
        while let Ok(n) = rx.try_recv() {
            out.push((
                n.record.id.clone(),
                n.transition.as_str(),
                n.step.webhook.rsplit('/').next().unwrap().to_owned(),
            ));
        }
        out
    }

    async fn settle() {
        // Let the manager task run; with paused time this advances only as far as needed.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn escalates_when_nobody_acknowledges_and_resolves_to_everyone_told() {
        let (alerts, mut notes, _tasks) = setup();
        alerts.event(event("a", EventKind::Pending));
        alerts.event(event("a", EventKind::Firing));
        settle().await;
        assert_eq!(
            drain(&mut notes),
            vec![("a".into(), "firing", "dev".into())]
        );
        tokio::time::sleep(Duration::from_secs(29)).await;
        settle().await;
        assert!(drain(&mut notes).is_empty(), "not before 30 s");
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(
            drain(&mut notes),
            vec![("a".into(), "firing", "lead".into())]
        );
        // A repeated firing event changes nothing.
        alerts.event(event("a", EventKind::Firing));
        alerts.event(event("a", EventKind::Resolved));
        settle().await;
        assert_eq!(
            drain(&mut notes),
            vec![
                ("a".into(), "resolved", "dev".into()),
                ("a".into(), "resolved", "lead".into())
            ]
        );
        tokio::time::sleep(Duration::from_secs(120)).await;
        settle().await;
        assert!(
            drain(&mut notes).is_empty(),
            "no escalation after resolution"
        );
        let listed = alerts.list().await;
        assert_eq!(listed[0].state, AlertState::Resolved);
        assert_eq!(listed[0].notified.len(), 2);
        assert_eq!(listed[0].detected_after_ms, Some(1005));
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledgement_stops_escalation() {
        let (alerts, mut notes, _tasks) = setup();
        alerts.event(event("b", EventKind::Firing));
        settle().await;
        assert_eq!(drain(&mut notes).len(), 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let acked = alerts.ack("b", "alice").await.unwrap();
        assert_eq!(acked.state, AlertState::Acknowledged);
        assert_eq!(acked.acknowledged_by.as_deref(), Some("alice"));
        settle().await;
        assert_eq!(
            drain(&mut notes),
            vec![("b".into(), "acknowledged", "dev".into())]
        );
        tokio::time::sleep(Duration::from_secs(300)).await;
        settle().await;
        assert!(
            drain(&mut notes).is_empty(),
            "acknowledged alerts do not escalate"
        );
        alerts.event(event("b", EventKind::Resolved));
        settle().await;
        assert_eq!(
            drain(&mut notes),
            vec![("b".into(), "resolved", "dev".into())]
        );
        assert_eq!(
            alerts.ack("b", "alice").await.err(),
            Some(AckError::NotFiring("b".into()))
        );
        assert_eq!(
            alerts.ack("zzz", "alice").await.err(),
            Some(AckError::NotFound("zzz".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pending_that_clears_tells_nobody() {
        let (alerts, mut notes, _tasks) = setup();
        alerts.event(event("c", EventKind::Pending));
        alerts.event(event("c", EventKind::Cleared));
        settle().await;
        assert!(drain(&mut notes).is_empty());
        assert!(alerts.list().await.is_empty());
    }

    fn persistence(dir: &std::path::Path) -> Persistence {
        Persistence {
            file: StateFile::open(dir).unwrap(),
            restore_grace: Duration::from_secs(60),
            canary_restore_grace: Duration::from_secs(300),
            outage_tolerance: Duration::from_secs(3600),
        }
    }

    /// Takes every notification, marking those for `settle` as delivered (the way delivery reports back).
    async fn take(
        rx: &mut mpsc::UnboundedReceiver<Notification>,
        settle: &[&str],
    ) -> Vec<(String, &'static str, String)> {
        let mut out = Vec::new();
        while let Ok(n) = rx.try_recv() {
            let target = n.step.webhook.rsplit('/').next().unwrap().to_owned();
            if settle.contains(&n.transition.as_str()) {
                (n.on_settled.as_ref().unwrap().0)();
            }
            out.push((n.record.id.clone(), n.transition.as_str(), target));
        }
        settled().await;
        out
    }

    async fn settled() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_restart_a_firing_alert_keeps_its_id_and_acknowledgement_and_is_not_paged_again()
     {
        let dir = std::env::temp_dir().join(format!(
            "strobe-restore-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        {
            let (alerts, mut notes, mut tasks) = setup_with(Some(persistence(&dir)));
            alerts.event(event("a", EventKind::Pending));
            alerts.event(event("a", EventKind::Firing));
            settled().await;
            assert_eq!(
                take(&mut notes, &["firing"]).await,
                vec![("a".into(), "firing", "dev".into())]
            );
            tokio::time::sleep(Duration::from_secs(10)).await;
            alerts.ack("a", "alice").await.unwrap();
            settled().await;
            // Delivery never finishes with the acknowledgement before the "crash".
            assert_eq!(
                take(&mut notes, &[]).await,
                vec![("a".into(), "acknowledged", "dev".into())]
            );
            tasks.abort_all();
        }
        let (alerts, mut notes, _tasks) = setup_with(Some(persistence(&dir)));
        settled().await;
        assert_eq!(
            take(&mut notes, &["acknowledged"]).await,
            vec![("a".into(), "acknowledged", "dev".into())],
            "what delivery had not finished goes out again, and only that"
        );
        let listed = alerts.list().await;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state, AlertState::Acknowledged);
        assert_eq!(listed[0].acknowledged_by.as_deref(), Some("alice"));
        // The breach, still going on, is seen again under the id its new first second gives it.
        let mut again = event("a-after-restart", EventKind::Pending);
        again.since = 500;
        alerts.event(again.clone());
        again.kind = EventKind::Firing;
        alerts.event(again.clone());
        tokio::time::sleep(Duration::from_secs(300)).await;
        settled().await;
        assert!(
            take(&mut notes, &[]).await.is_empty(),
            "not paged again, no escalation, not resolved while breaching"
        );
        let listed = alerts.list().await;
        assert_eq!((listed.len(), listed[0].id.as_str()), (1, "a"));
        again.kind = EventKind::Resolved;
        alerts.event(again);
        settled().await;
        assert_eq!(
            take(&mut notes, &[]).await,
            vec![("a".into(), "resolved", "dev".into())]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Alert `id` pending, firing (the page settled) and acknowledged by alice (settled).
    async fn fire_and_acknowledge(
        alerts: &Alerts,
        notes: &mut mpsc::UnboundedReceiver<Notification>,
        id: &str,
    ) {
        alerts.event(event(id, EventKind::Pending));
        alerts.event(event(id, EventKind::Firing));
        settled().await;
        assert_eq!(take(notes, &["firing"]).await.len(), 1);
        alerts.ack(id, "alice").await.unwrap();
        settled().await;
        assert_eq!(take(notes, &["acknowledged"]).await.len(), 1);
    }

    /// The state file in `dir`, as JSON.
    fn state_file_body(dir: &std::path::Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("alerts.json")).unwrap()).unwrap()
    }

    /// Makes the state file in `dir` look written `ms` before now.
    fn age_state_file(dir: &std::path::Path, ms: i64) {
        let mut body = state_file_body(dir);
        body["saved_at_ms"] = (strobe_proto::clock::unix_millis() - ms).into();
        std::fs::write(dir.join("alerts.json"), serde_json::to_vec(&body).unwrap()).unwrap();
    }

    /// State written longer ago than `alert_outage_tolerance` is not carried over: its acknowledged alert is resolved
    /// at start (the one told is told), and the same breach seen now is a new alert that pages.
    #[tokio::test(start_paused = true)]
    async fn after_an_outage_past_the_tolerance_open_alerts_are_resolved_and_a_breach_pages_afresh()
    {
        let dir = std::env::temp_dir().join(format!(
            "strobe-outage-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        {
            let (alerts, mut notes, mut tasks) = setup_with(Some(persistence(&dir)));
            fire_and_acknowledge(&alerts, &mut notes, "a").await;
            tasks.abort_all();
        }
        // The file as an aggregator down for two hours left it.
        age_state_file(&dir, 2 * 3_600_000);

        let (alerts, mut notes, _tasks) = setup_with(Some(persistence(&dir)));
        settled().await;
        assert_eq!(
            take(&mut notes, &["resolved"]).await,
            vec![("a".into(), "resolved", "dev".into())],
            "resolved at start, and the one told is told"
        );
        let mut again = event("a-now", EventKind::Pending);
        again.since = 500;
        alerts.event(again.clone());
        again.kind = EventKind::Firing;
        alerts.event(again);
        settled().await;
        assert_eq!(
            take(&mut notes, &[]).await,
            vec![("a-now".into(), "firing", "dev".into())],
            "the breach now is a new alert, paged: the old acknowledgement does not silence it"
        );
        let mut listed: Vec<(String, AlertState)> = alerts
            .list()
            .await
            .into_iter()
            .map(|r| (r.id, r.state))
            .collect();
        listed.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            listed,
            [
                ("a".to_owned(), AlertState::Resolved),
                ("a-now".to_owned(), AlertState::Firing)
            ]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// While an alert is open the state file is written again at least every minute, unchanged, so that its age at
    /// the next start is the outage's, not the time since the alert last changed (an acknowledgement an hour old on
    /// an aggregator that never stopped is carried over a restart).
    #[tokio::test(start_paused = true)]
    async fn the_state_file_is_rewritten_while_an_alert_is_open() {
        let dir = std::env::temp_dir().join(format!(
            "strobe-heartbeat-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let (alerts, mut notes, mut tasks) = setup_with(Some(persistence(&dir)));
        fire_and_acknowledge(&alerts, &mut notes, "a").await;
        // Nothing changes from here on; the file is made to look two hours old.
        age_state_file(&dir, 2 * 3_600_000);
        tokio::time::sleep(Duration::from_secs(61)).await;
        settled().await;
        assert!(
            state_file_body(&dir)["saved_at_ms"].as_i64().unwrap()
                > strobe_proto::clock::unix_millis() - 60_000,
            "written again within a minute"
        );
        assert_eq!(
            alerts.list().await[0].state,
            AlertState::Acknowledged,
            "unchanged"
        );
        // So a restart now carries the acknowledgement over (an age of two hours would resolve it).
        tasks.abort_all();
        let (alerts, mut notes, _tasks) = setup_with(Some(persistence(&dir)));
        settled().await;
        assert_eq!(take(&mut notes, &[]).await, vec![], "nobody told anything");
        assert_eq!(alerts.list().await[0].state, AlertState::Acknowledged);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_restart_escalation_resumes_and_an_alert_no_rule_confirms_is_resolved() {
        let dir = std::env::temp_dir().join(format!(
            "strobe-unconfirmed-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        {
            let (alerts, mut notes, mut tasks) = setup_with(Some(persistence(&dir)));
            let mut firing = event("b", EventKind::Firing);
            firing.at_ms = strobe_proto::clock::unix_millis();
            alerts.event(firing);
            settled().await;
            assert_eq!(take(&mut notes, &["firing"]).await.len(), 1);
            tasks.abort_all();
        }
        let (alerts, mut notes, _tasks) = setup_with(Some(persistence(&dir)));
        settled().await;
        let repeated = take(&mut notes, &[]).await;
        assert!(repeated.is_empty(), "dev is not paged twice: {repeated:?}");
        tokio::time::sleep(Duration::from_secs(31)).await;
        settled().await;
        assert_eq!(
            take(&mut notes, &["firing"]).await,
            vec![("b".into(), "firing", "lead".into())],
            "the next step is due 30 s after it fired"
        );
        // No rule reports it again within the grace: it is over, and both targets told are told.
        tokio::time::sleep(Duration::from_secs(31)).await;
        settled().await;
        assert_eq!(
            take(&mut notes, &[]).await,
            vec![
                ("b".into(), "resolved", "dev".into()),
                ("b".into(), "resolved", "lead".into())
            ]
        );
        assert_eq!(alerts.list().await[0].state, AlertState::Resolved);
        std::fs::remove_dir_all(&dir).ok();
    }
}
