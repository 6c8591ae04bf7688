//! The newest state of every alert and of every service's canary verdict, with their frames, for backfill and the
//! API. Each map has its own mutex, held only to insert or to copy handles out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::frame::Frame;
use crate::alerting::canary::Verdict;
use crate::alerting::event::{AlertRecord, AlertState};

/// Most alert states kept for backfill.
const MAX_ALERT_FRAMES: usize = 1000;

/// Alert and deploy states.
#[derive(Default)]
pub(crate) struct EventStates {
    /// The newest frame of each alert, by id.
    alerts: Mutex<BTreeMap<String, Frame>>,
    /// The newest canary verdict of each service, and its frame.
    deploys: Mutex<BTreeMap<Arc<str>, (Verdict, Frame)>>,
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

    /// Keeps a service's newest verdict.
    pub(crate) fn deploy(&self, verdict: &Verdict, frame: &Frame) {
        self.deploys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(verdict.service.clone(), (verdict.clone(), frame.clone()));
    }

    /// The newest verdict of every service that had one.
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
