//! The alert manager: one task owning every alert record. It takes lifecycle events from the shards and
//! acknowledgements from the API, walks each firing alert up its owner's escalation chain, and hands
//! notifications to delivery. Each (alert, transition, step) is notified at most once.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

use super::delivery::Notification;
use crate::alerting::escalation::Owner;
use crate::alerting::event::{AlertEvent, EventKind};
use crate::alerting::event::{AlertRecord, AlertState, NotifyTransition};
use crate::alerting::rules::RulesStore;
use crate::health::Health;

/// How long resolved alerts stay listed.
const RESOLVED_RETENTION: Duration = Duration::from_secs(3600);
/// Most alerts listed; the oldest resolved go first.
const MAX_RECORDS: usize = 1000;

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
}

/// Where the manager sends every alert record that changed (the publishing side implements it). Must not block.
pub(crate) trait RecordSink: Send + Sync {
    /// An alert's new state.
    fn publish_alert(&self, record: &AlertRecord);
}

/// A handle to the alert manager; cheap to clone, never blocks the caller.
#[derive(Clone)]
pub(crate) struct Alerts {
    tx: mpsc::UnboundedSender<Command>,
    health: Arc<Health>,
}

impl Alerts {
    /// Starts the manager in `tasks`. Notifications go to `sink`; changed records to `records`.
    pub(crate) fn spawn(
        rules: Arc<RulesStore>,
        records: Arc<dyn RecordSink>,
        sink: mpsc::UnboundedSender<Notification>,
        health: Arc<Health>,
        tasks: &mut JoinSet<()>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let manager = Manager {
            rules,
            records,
            sink,
            entries: BTreeMap::new(),
        };
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

    /// Acknowledges a firing alert: escalation stops, and everyone told so far is told.
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
    chain: Option<Arc<Owner>>,
    fired_at: Option<Instant>,
    next_step: usize,
    told: Vec<usize>,
    sent: HashSet<(NotifyTransition, usize)>,
    ended_at: Option<Instant>,
}

impl Entry {
    /// A pending alert nobody has been told about.
    fn new(event: &AlertEvent) -> Self {
        Self {
            record: new_record(event),
            chain: None,
            fired_at: None,
            next_step: 0,
            told: Vec::new(),
            sent: HashSet::new(),
            ended_at: None,
        }
    }
}

struct Manager {
    rules: Arc<RulesStore>,
    records: Arc<dyn RecordSink>,
    sink: mpsc::UnboundedSender<Notification>,
    entries: BTreeMap<String, Entry>,
}

impl Manager {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            let due = self.next_due();
            tokio::select! {
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Event(event)) => self.on_event(event),
                    Some(Command::Ack { id, by, reply }) => {
                        // The asker may have gone (a closed HTTP request); the ack stands either way.
                        reply.send(self.on_ack(&id, &by)).ok();
                    }
                    Some(Command::List { reply }) => {
                        let mut all: Vec<AlertRecord> = self.entries.values().map(|e| e.record.clone()).collect();
                        all.sort_by(|a, b| b.since.cmp(&a.since).then_with(|| a.id.cmp(&b.id)));
                        reply.send(all).ok(); // nobody waiting any more is fine
                    }
                },
                _ = sleep_until_opt(due) => {}
            }
            self.escalate_due();
            self.prune();
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| e.record.state == AlertState::Firing)
            .filter_map(|e| {
                let step = e.chain.as_ref()?.escalation.get(e.next_step)?;
                Some(e.fired_at? + step.after)
            })
            .min()
    }

    fn on_event(&mut self, event: AlertEvent) {
        match event.kind {
            EventKind::Pending => {
                let entry = self
                    .entries
                    .entry(event.id.clone())
                    .or_insert_with(|| Entry::new(&event));
                self.records.publish_alert(&entry.record);
            }
            EventKind::Cleared => {
                if let Some(mut entry) = self.entries.remove(&event.id) {
                    entry.record.state = AlertState::Cleared;
                    entry.record.value = event.value;
                    self.records.publish_alert(&entry.record);
                }
            }
            EventKind::Firing => {
                let chain = self.chain_of(&event);
                let entry = self
                    .entries
                    .entry(event.id.clone())
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
                entry.fired_at = Some(Instant::now());
                info!(
                    message = "Alert firing.", alert = %event.id, rule = %event.rule, service = %event.service,
                    detected_after_ms = event.at_ms - event.since * 1000,
                );
                self.records.publish_alert(&entry.record);
                // Steps due at once go out in escalate_due, right after this event.
            }
            EventKind::Resolved => {
                let Some(entry) = self.entries.get_mut(&event.id) else {
                    return;
                };
                if !matches!(
                    entry.record.state,
                    AlertState::Firing | AlertState::Acknowledged
                ) {
                    return;
                }
                entry.record.state = AlertState::Resolved;
                entry.record.resolved_at_ms = Some(event.at_ms);
                if event.value.is_some() {
                    entry.record.value = event.value;
                }
                entry.ended_at = Some(Instant::now());
                info!(message = "Alert resolved.", alert = %event.id, rule = %event.rule, service = %event.service);
                self.records.publish_alert(&entry.record);
                let told = entry.told.clone();
                for step in told {
                    notify(&self.sink, entry, NotifyTransition::Resolved, step);
                }
            }
        }
    }

    /// The escalation chain of an event's owners: one owner's chain, or several merged in order of `after`.
    fn chain_of(&self, event: &AlertEvent) -> Option<Arc<Owner>> {
        let rules = self.rules.current();
        let mut chains = Vec::new();
        for name in &event.owners {
            match rules.owners.get(name) {
                Some(owner) => chains.push(owner.clone()),
                None => {
                    warn!(message = "Alert owner has no escalation chain.", owner = %name, alert = %event.id)
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
        info!(message = "Alert acknowledged.", alert = %id, by = %by);
        self.records.publish_alert(&entry.record);
        let told = entry.told.clone();
        for step in told {
            notify(&self.sink, entry, NotifyTransition::Acknowledged, step);
        }
        Ok(entry.record.clone())
    }

    fn escalate_due(&mut self) {
        let now = Instant::now();
        for entry in self.entries.values_mut() {
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
                entry.record.notified.push(step.webhook.clone());
                notify(&self.sink, entry, NotifyTransition::Firing, index);
            }
        }
    }

    fn prune(&mut self) {
        let now = Instant::now();
        self.entries.retain(|_, e| {
            e.ended_at
                .is_none_or(|ended| now.duration_since(ended) < RESOLVED_RETENTION)
        });
        while self.entries.len() > MAX_RECORDS {
            let oldest = self
                .entries
                .iter()
                .filter(|(_, e)| e.ended_at.is_some())
                .min_by_key(|(_, e)| e.ended_at)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => self.entries.remove(&id),
                None => break,
            };
        }
    }
}

fn notify(
    sink: &mpsc::UnboundedSender<Notification>,
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
    let notification = Notification {
        record: entry.record.clone(),
        transition,
        step: target.clone(),
    };
    if sink.send(notification).is_err() {
        // Delivery stops only at shutdown; the notification is not sent, and says so.
        warn!(message = "Delivery stopped; notification not sent.", alert = %entry.record.id, transition = transition.as_str());
    }
}

fn new_record(event: &AlertEvent) -> AlertRecord {
    AlertRecord {
        id: event.id.clone(),
        rule: event.rule.clone(),
        kind: if event.evidence.is_some() {
            "canary"
        } else {
            "rule"
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
            kind: "rule",
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

    /// Records go nowhere: these tests read the notifications.
    struct Discard;

    impl RecordSink for Discard {
        fn publish_alert(&self, _: &AlertRecord) {}
    }

    fn setup() -> (Alerts, mpsc::UnboundedReceiver<Notification>, JoinSet<()>) {
        let dir = std::env::temp_dir().join(format!("strobe-manager-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("rules-{}.toml", rand::random::<u64>()));
        std::fs::write(&path, RULES).unwrap();
        let store = RulesStore::open(Some(path)).unwrap();
        let (sink, notes) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let health = Arc::new(Health::default());
        let alerts = Alerts::spawn(store, Arc::new(Discard), sink, health, &mut tasks);
        (alerts, notes, tasks)
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
}
