//! The alert currency every room trades in: lifecycle events from rules and the canary ([`AlertEvent`]), stable
//! ids, and what the API, the websocket and webhooks say about an alert ([`AlertRecord`]). A leaf: imports nothing
//! of the crate.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An alert's state as people see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AlertState {
    /// Breaching, not yet for the rule's `for`.
    Pending,
    /// Firing and nobody has acknowledged it.
    Firing,
    /// Firing and acknowledged: escalation stopped.
    Acknowledged,
    /// Over.
    Resolved,
    /// Stopped breaching before it fired; nobody was told.
    Cleared,
}

/// Which transition a notification announces; each reaches each target at most once per alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum NotifyTransition {
    /// The alert fired (or escalated to this target).
    Firing,
    /// Someone acknowledged it.
    Acknowledged,
    /// It is over.
    Resolved,
}

impl NotifyTransition {
    /// The lowercase name used in headers.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NotifyTransition::Firing => "firing",
            NotifyTransition::Acknowledged => "acknowledged",
            NotifyTransition::Resolved => "resolved",
        }
    }
}

/// Where an alert comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AlertKind {
    /// A threshold rule.
    Rule,
    /// The automatic new-version-versus-old comparison.
    Canary,
}

/// One alert.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AlertRecord {
    /// Stable id.
    pub(crate) id: String,
    /// Rule name, or `canary`.
    pub(crate) rule: Arc<str>,
    /// `rule` or `canary`.
    pub(crate) kind: AlertKind,
    /// Service.
    pub(crate) service: Arc<str>,
    /// Version, zone, tags of the group.
    pub(crate) labels: BTreeMap<String, String>,
    /// Metric, statistic and threshold in words.
    pub(crate) summary: String,
    /// Current state.
    pub(crate) state: AlertState,
    /// The value when it last changed state.
    pub(crate) value: Option<f64>,
    /// The threshold.
    pub(crate) threshold: f64,
    /// First second of the breach (unix seconds).
    pub(crate) since: i64,
    /// When it fired (unix milliseconds).
    pub(crate) fired_at_ms: Option<i64>,
    /// From the start of the first breaching second to firing.
    pub(crate) detected_after_ms: Option<i64>,
    /// Who acknowledged.
    pub(crate) acknowledged_by: Option<String>,
    /// When (unix milliseconds).
    pub(crate) acknowledged_at_ms: Option<i64>,
    /// When it resolved (unix milliseconds).
    pub(crate) resolved_at_ms: Option<i64>,
    /// Owners whose chains are notified.
    pub(crate) owners: Vec<String>,
    /// Webhooks told so far, in order.
    pub(crate) notified: Vec<String>,
    /// Evidence (canary verdicts).
    pub(crate) evidence: Option<serde_json::Value>,
    /// What to do about it (for example a rollback hint).
    pub(crate) hint: Option<String>,
}

/// What happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EventKind {
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
pub(crate) struct AlertEvent {
    /// Stable id: the same for pending, firing and resolved of one breach.
    pub(crate) id: String,
    /// What happened.
    pub(crate) kind: EventKind,
    /// The rule's name (or `canary` for automatic verdicts).
    pub(crate) rule: Arc<str>,
    /// Whose escalation chains to walk (merged by `after`).
    pub(crate) owners: Vec<String>,
    /// The service.
    pub(crate) service: Arc<str>,
    /// Version, zone and tags of the group.
    pub(crate) labels: BTreeMap<String, String>,
    /// The metric and statistic, for people.
    pub(crate) summary: String,
    /// The value that crossed (or the last value seen).
    pub(crate) value: Option<f64>,
    /// The threshold.
    pub(crate) threshold: f64,
    /// First second of the breach.
    pub(crate) since: i64,
    /// Wall clock of the event, unix milliseconds.
    pub(crate) at_ms: i64,
    /// Extra evidence (canary verdicts), free-form JSON.
    pub(crate) evidence: Option<serde_json::Value>,
    /// What to do about it.
    pub(crate) hint: Option<String>,
}

/// What identifies an alert across breaches and restarts: its rule, service and labels (hex).
pub(crate) fn alert_key(rule: &str, service: &str, labels: &BTreeMap<String, String>) -> String {
    hex::encode(&key_hash(rule, service, labels).finalize()[..8])
}

/// A stable alert id from what identifies one breach: the key and the breach's first second. After a restart the
/// alert manager keeps the id it persisted for a breach still going on (matched by [`alert_key`]).
pub(crate) fn alert_id(
    rule: &str,
    service: &str,
    labels: &BTreeMap<String, String>,
    since: i64,
) -> String {
    let mut h = key_hash(rule, service, labels);
    h.update(since.to_be_bytes());
    hex::encode(&h.finalize()[..8])
}

fn key_hash(rule: &str, service: &str, labels: &BTreeMap<String, String>) -> Sha256 {
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
    h
}
