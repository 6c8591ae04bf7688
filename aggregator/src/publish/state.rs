//! The newest state of every alert and of every service's canary verdict, with their frames, for backfill and the
//! API. Each map has its own mutex, held only to insert or to copy handles out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::frame::Frame;
use crate::alerting::canary::Verdict;

/// Candidates of one service whose verdicts are kept (a service deploys often; the newest matter).
const MAX_CANDIDATES_PER_SERVICE: usize = 4;

/// A service and one of its candidate versions.
type Candidate = (Arc<str>, Arc<str>);
use crate::alerting::event::{AlertRecord, AlertState};

/// Most alert states kept for backfill.
const MAX_ALERT_FRAMES: usize = 1000;

/// Alert and deploy states.
#[derive(Default)]
pub(crate) struct EventStates {
    /// The newest frame of each alert, by id.
    alerts: Mutex<BTreeMap<String, Frame>>,
    /// The newest canary verdict on each (service, candidate), and its frame.
    deploys: Mutex<BTreeMap<Candidate, (Verdict, Frame)>>,
}

impl EventStates {
    /// Keeps an alert's newest frame; a cleared alert (nobody was ever told) is forgotten.
    pub(crate) fn alert(&self, record: &AlertRecord, frame: &Frame) {
        let mut alerts = self.alerts.lock().unwrap_or_else(|e| e.into_inner());
        if record.state == AlertState::Cleared {
            alerts.remove(&record.id);
        } else {
            alerts.insert(record.id.clone(), frame.clone());
        }
        // A guard against unbounded growth; ids are hashes, so which one goes is arbitrary.
        while alerts.len() > MAX_ALERT_FRAMES {
            alerts.pop_first();
        }
    }

    /// Keeps the newest verdict on each candidate (the newest `MAX_CANDIDATES_PER_SERVICE` of a service).
    pub(crate) fn deploy(&self, verdict: &Verdict, frame: &Frame) {
        let mut deploys = self.deploys.lock().unwrap_or_else(|e| e.into_inner());
        let service = verdict.service.clone();
        deploys.insert(
            (service.clone(), verdict.candidate.clone()),
            (verdict.clone(), frame.clone()),
        );
        let mine = || {
            deploys
                .range((service.clone(), Arc::from(""))..)
                .take_while(|((s, _), _)| *s == service)
        };
        if mine().count() > MAX_CANDIDATES_PER_SERVICE
            && let Some(oldest) = mine()
                .min_by_key(|(_, (v, _))| v.since)
                .map(|(key, _)| key.clone())
        {
            deploys.remove(&oldest);
        }
    }

    /// Forgets the verdicts of services `live` says are gone.
    pub(crate) fn prune_deploys(&self, live: impl Fn(&str) -> bool) {
        let mut deploys = self.deploys.lock().unwrap_or_else(|e| e.into_inner());
        deploys.retain(|(service, _), _| live(service));
    }

    /// The newest verdict on every candidate that had one.
    pub(crate) fn verdicts(&self) -> Vec<Verdict> {
        let deploys = self.deploys.lock().unwrap_or_else(|e| e.into_inner());
        deploys.values().map(|(v, _)| v.clone()).collect()
    }

    /// Copies of the alert frames, then the deploy frames.
    pub(crate) fn frames(&self) -> Vec<Frame> {
        let mut frames: Vec<Frame> = self
            .alerts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let deploys = self.deploys.lock().unwrap_or_else(|e| e.into_inner());
        frames.extend(deploys.values().map(|(_, f)| f.clone()));
        frames
    }
}
