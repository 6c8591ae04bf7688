//! Owners and their escalation chains: who is told, through which webhook, in which format, after how long.
//! Parsed from the rules file; read by the alert manager and delivery. A leaf: imports nothing of the crate.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Webhook body formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Format {
    /// Strobe's JSON, shaped like Alertmanager's webhook v4.
    Json,
    /// Slack incoming webhook (`text` and `blocks`).
    Slack,
    /// PagerDuty Events API v2.
    Pagerduty,
}

/// One step of an escalation chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Step {
    /// Time after firing at which this step is notified, unless acknowledged.
    #[serde(with = "humantime_serde")]
    pub(crate) after: Duration,
    /// Where to POST.
    pub(crate) webhook: String,
    /// Body format.
    pub(crate) format: Format,
    /// HMAC-SHA256 key for the `X-Strobe-Signature` header.
    #[serde(skip)]
    pub(crate) secret: Option<String>,
    /// PagerDuty routing key.
    #[serde(skip)]
    pub(crate) routing_key: Option<String>,
}

/// Someone alerts are for, with their escalation chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Owner {
    /// Unique name.
    pub(crate) name: String,
    /// Steps in order of `after`.
    pub(crate) escalation: Vec<Step>,
}
