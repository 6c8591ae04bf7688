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
    /// Where to POST. Shown (API, logs) only as scheme and host: the path and query of many webhook URLs (Slack's,
    /// for one) are themselves the secret.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub(crate) webhook: String,
    /// Body format.
    pub(crate) format: Format,
    /// HMAC-SHA256 keys for the `X-Strobe-Signature` header: the current one first, and during a rotation the
    /// previous one (each signs; a receiver accepts either).
    #[serde(skip)]
    pub(crate) secrets: Vec<String>,
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

/// A URL as it may be shown: scheme and host (and port), the rest elided; user info never. Read the way the
/// HTTP client reads it (`url`), so odd forms (backslashes, say) cannot smuggle the path into what is shown.
pub(crate) fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => match (parsed.host_str(), parsed.port()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}/…", parsed.scheme()),
            (Some(host), None) => format!("{}://{host}/…", parsed.scheme()),
            (None, _) => "(redacted)".to_owned(),
        },
        Err(_) => "(redacted)".to_owned(),
    }
}

fn serialize_redacted_url<S: serde::Serializer>(
    url: &str,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redacted_url(url))
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_shown_as_scheme_and_host_only() {
        for (url, shown) in [
            (
                "https://hooks.slack.com/services/T0/B0/secretpart",
                "https://hooks.slack.com/…",
            ),
            (
                "http://user:pw@10.0.0.1:9000/x?token=y",
                "http://10.0.0.1:9000/…",
            ),
            ("http://host", "http://host/…"),
            (
                "https://hooks.slack.com\\services\\T0\\B0\\SECRET",
                "https://hooks.slack.com/…",
            ),
            ("not a url", "(redacted)"),
        ] {
            assert_eq!(super::redacted_url(url), shown);
        }
    }
}
