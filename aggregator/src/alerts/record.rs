//! What the API, the websocket and webhooks say about an alert.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

/// An alert's state as people see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyTransition {
    /// The alert fired (or escalated to this target).
    Firing,
    /// Someone acknowledged it.
    Acknowledged,
    /// It is over.
    Resolved,
}

impl NotifyTransition {
    /// The lowercase name used in headers.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyTransition::Firing => "firing",
            NotifyTransition::Acknowledged => "acknowledged",
            NotifyTransition::Resolved => "resolved",
        }
    }
}

/// One alert.
#[derive(Debug, Clone, Serialize)]
pub struct AlertRecord {
    /// Stable id.
    pub id: String,
    /// Rule name, or `canary`.
    pub rule: Arc<str>,
    /// `rule` or `canary`.
    pub kind: &'static str,
    /// Service.
    pub service: Arc<str>,
    /// Version, zone, tags of the group.
    pub labels: BTreeMap<String, String>,
    /// Metric, statistic and threshold in words.
    pub summary: String,
    /// Current state.
    pub state: AlertState,
    /// The value when it last changed state.
    pub value: Option<f64>,
    /// The threshold.
    pub threshold: f64,
    /// First second of the breach (unix seconds).
    pub since: i64,
    /// When it fired (unix milliseconds).
    pub fired_at_ms: Option<i64>,
    /// From the start of the first breaching second to firing.
    pub detected_after_ms: Option<i64>,
    /// Who acknowledged.
    pub acknowledged_by: Option<String>,
    /// When (unix milliseconds).
    pub acknowledged_at_ms: Option<i64>,
    /// When it resolved (unix milliseconds).
    pub resolved_at_ms: Option<i64>,
    /// Owners whose chains are notified.
    pub owners: Vec<String>,
    /// Webhooks told so far, in order.
    pub notified: Vec<String>,
    /// Evidence (canary verdicts).
    pub evidence: Option<serde_json::Value>,
    /// What to do about it (for example a rollback hint).
    pub hint: Option<String>,
}
