//! What a verdict change means for people: the alert event that pages the service's owner and the deployer when a
//! candidate turns bad, and resolves it when a bad candidate's comparison ends. Pure.

use std::collections::BTreeMap;

use super::verdict::{Verdict, VerdictState};
use crate::alerting::event::{AlertEvent, EventKind, alert_id};
use crate::alerting::rules::RuleSet;

/// The alert event a verdict change means: firing when it turns bad, resolved when a bad candidate's comparison
/// ends (rolled back, promoted or replaced).
pub(crate) fn canary_alert(verdict: &Verdict, rules: &RuleSet, now_ms: i64) -> Option<AlertEvent> {
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
    let evidence = match serde_json::to_value(verdict) {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::error!(message = "Verdict not serialisable as evidence.", %error);
            None
        }
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
        evidence,
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
