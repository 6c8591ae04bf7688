//! Webhook bodies for each format (Strobe JSON shaped like Alertmanager's webhook v4, Slack, PagerDuty Events v2)
//! and the HMAC-SHA256 signature. Pure.

use std::time::{Duration, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::alerting::escalation::{Format, Step};
use crate::alerting::event::{AlertRecord, NotifyTransition};

/// The signature header: `sha256=<hex>` of HMAC-SHA256(secret, timestamp + "." + body), one per active secret,
/// comma-separated (two during a rotation).
pub(crate) const SIGNATURE_HEADER: &str = "x-strobe-signature";
/// The timestamp header: unix seconds when the request was signed; receivers refuse old ones (replays).
pub(crate) const TIMESTAMP_HEADER: &str = "x-strobe-timestamp";

fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

/// The body for one notification of one step.
pub(crate) fn body(record: &AlertRecord, transition: NotifyTransition, step: &Step) -> Value {
    match step.format {
        Format::Json => json_body(record, transition),
        Format::Slack => slack_body(record, transition),
        Format::Pagerduty => pagerduty_body(
            record,
            transition,
            step.routing_key.as_deref().unwrap_or_default(),
        ),
    }
}

fn labels(record: &AlertRecord) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert("alertname".into(), record.rule.to_string().into());
    labels.insert("service".into(), record.service.to_string().into());
    for (k, v) in &record.labels {
        labels.insert(k.clone(), v.clone().into());
    }
    Value::Object(labels)
}

fn headline(record: &AlertRecord) -> String {
    let value = record.value.map_or("n/a".to_owned(), |v| format!("{v:.4}"));
    let group: Vec<String> = record
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let group = if group.is_empty() {
        String::new()
    } else {
        format!(" [{}]", group.join(", "))
    };
    format!(
        "{} on {}{}: {} (value {value})",
        record.rule, record.service, group, record.summary
    )
}

fn json_body(record: &AlertRecord, transition: NotifyTransition) -> Value {
    let status = match transition {
        NotifyTransition::Resolved => "resolved",
        _ => "firing",
    };
    let ends_at = record
        .resolved_at_ms
        .map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), rfc3339);
    json!({
        "version": "4",
        "status": status,
        "transition": transition,
        "receiver": record.owners.join(","),
        "groupKey": record.id,
        "groupLabels": { "alertname": record.rule.to_string() },
        "commonLabels": labels(record),
        "commonAnnotations": { "summary": headline(record) },
        "externalURL": "",
        "truncatedAlerts": 0,
        "alerts": [{
            "status": status,
            "labels": labels(record),
            "annotations": { "summary": headline(record), "description": record.summary },
            "startsAt": rfc3339(record.since * 1000),
            "endsAt": ends_at,
            "generatorURL": "",
            "fingerprint": record.id,
        }],
        "strobe": record,
    })
}

fn slack_body(record: &AlertRecord, transition: NotifyTransition) -> Value {
    let (icon, word) = match transition {
        NotifyTransition::Firing => (":rotating_light:", "FIRING"),
        NotifyTransition::Acknowledged => (":eyes:", "ACKNOWLEDGED"),
        NotifyTransition::Resolved => (":white_check_mark:", "RESOLVED"),
    };
    let mut text = format!("{icon} *{word}* {}", headline(record));
    if let Some(ms) = record.detected_after_ms {
        text.push_str(&format!("\ndetected {ms} ms after the breach began"));
    }
    if let Some(by) = &record.acknowledged_by {
        text.push_str(&format!("\nacknowledged by {by}"));
    }
    if let Some(hint) = &record.hint {
        text.push_str(&format!("\n{hint}"));
    }
    json!({
        "text": text,
        "blocks": [{ "type": "section", "text": { "type": "mrkdwn", "text": text } }],
    })
}

fn pagerduty_body(record: &AlertRecord, transition: NotifyTransition, routing_key: &str) -> Value {
    let action = match transition {
        NotifyTransition::Firing => "trigger",
        NotifyTransition::Acknowledged => "acknowledge",
        NotifyTransition::Resolved => "resolve",
    };
    let mut body = json!({
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": record.id,
    });
    if transition == NotifyTransition::Firing {
        body["payload"] = json!({
            "summary": headline(record),
            "source": record.service.to_string(),
            "severity": "critical",
            "timestamp": rfc3339(record.fired_at_ms.unwrap_or(record.since * 1000)),
            "component": record.service.to_string(),
            "class": record.rule.to_string(),
            "custom_details": record,
        });
    }
    body
}

/// `sha256=<hex>` of HMAC-SHA256(secret, timestamp + "." + body): the timestamp is signed with the body, so a
/// captured request cannot be replayed later with a fresh timestamp.
pub(crate) fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so construction cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The signature header's value for every active secret; none without secrets.
pub(crate) fn signature_header(secrets: &[String], timestamp: i64, body: &[u8]) -> Option<String> {
    (!secrets.is_empty()).then(|| {
        secrets
            .iter()
            .map(|secret| sign(secret, timestamp, body))
            .collect::<Vec<_>>()
            .join(",")
    })
}

#[cfg(test)]
/// Whether one of the signatures in `header` is right for `body` at `timestamp` (constant-time comparison).
pub(crate) fn verify(secret: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    header.split(',').any(|signature| {
        let Some(hex_sig) = signature.trim().strip_prefix("sha256=") else {
            return false;
        };
        let Ok(expected) = hex::decode(hex_sig) else {
            return false;
        };
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else {
            return false;
        };
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerting::event::AlertKind;
    use crate::alerting::event::AlertState;

    fn record() -> AlertRecord {
        AlertRecord {
            id: "abc".into(),
            rule: "checkout-p99".into(),
            kind: AlertKind::Rule,
            service: "checkout".into(),
            labels: [("version".to_owned(), "v42".to_owned())].into(),
            summary: "request.latency p99 above 250".into(),
            state: AlertState::Firing,
            value: Some(480.0),
            threshold: 250.0,
            since: 1_764_320_401,
            fired_at_ms: Some(1_764_320_402_130),
            detected_after_ms: Some(1130),
            acknowledged_by: None,
            acknowledged_at_ms: None,
            resolved_at_ms: None,
            owners: vec!["oncall".into()],
            notified: vec![],
            evidence: None,
            hint: None,
        }
    }

    fn step(format: Format) -> Step {
        Step {
            after: Duration::ZERO,
            webhook: "http://x/".into(),
            format,
            secrets: vec![],
            routing_key: Some("key".into()),
        }
    }

    #[test]
    fn formats_carry_what_their_receivers_need() {
        let r = record();
        let json = body(&r, NotifyTransition::Firing, &step(Format::Json));
        assert_eq!(json["version"], "4");
        assert_eq!(json["status"], "firing");
        assert_eq!(json["alerts"][0]["labels"]["alertname"], "checkout-p99");
        assert_eq!(json["alerts"][0]["labels"]["version"], "v42");
        assert_eq!(json["alerts"][0]["startsAt"], "2025-11-28T09:00:01.000Z");
        assert_eq!(json["strobe"]["detected_after_ms"], 1130);
        let slack = body(&r, NotifyTransition::Resolved, &step(Format::Slack));
        assert!(slack["text"].as_str().unwrap().contains("RESOLVED"));
        assert_eq!(slack["blocks"][0]["type"], "section");
        let trigger = body(&r, NotifyTransition::Firing, &step(Format::Pagerduty));
        assert_eq!(
            (
                trigger["event_action"].as_str(),
                trigger["dedup_key"].as_str()
            ),
            (Some("trigger"), Some("abc"))
        );
        assert_eq!(trigger["payload"]["severity"], "critical");
        let ack = body(&r, NotifyTransition::Acknowledged, &step(Format::Pagerduty));
        assert_eq!(ack["event_action"], "acknowledge");
        assert!(ack.get("payload").is_none());
        let resolve = body(&r, NotifyTransition::Resolved, &step(Format::Pagerduty));
        assert_eq!(resolve["event_action"], "resolve");
    }

    #[test]
    fn signatures_cover_the_timestamp_verify_with_either_secret_and_tampering_fails() {
        let body = b"{\"a\":1}";
        let sig = sign("secret", 1000, body);
        assert!(sig.starts_with("sha256="));
        assert!(verify("secret", 1000, body, &sig));
        assert!(!verify("secret", 1001, body, &sig), "another timestamp");
        assert!(!verify("secret", 1000, b"{\"a\":2}", &sig));
        assert!(!verify("other", 1000, body, &sig));
        assert!(!verify("secret", 1000, body, "sha256=zz"));
        let rotating = signature_header(&["new".into(), "old".into()], 1000, body).unwrap();
        assert!(verify("new", 1000, body, &rotating));
        assert!(verify("old", 1000, body, &rotating));
        assert!(signature_header(&[], 1000, body).is_none());
    }
}
