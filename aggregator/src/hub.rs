//! Where sealed seconds go: serialised once into a frame, kept in per-service history for backfill, and broadcast
//! to every subscriber. Publishing never waits on a subscriber: a slow one lags and loses frames.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::alerts::{AlertRecord, AlertState};
use crate::canary::Verdict;
use crate::model::{Instance, SealedSecond, SeriesSummary};
use crate::overview::{self, MainMetrics};

/// Most alert states kept for backfill.
const MAX_ALERT_FRAMES: usize = 1000;

/// What a frame carries, for subscription filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Every merged series of one service's second.
    Second,
    /// One summary per service and version of one second.
    Overview,
    /// An alert's new state.
    Alert,
    /// A canary verdict's new state.
    Deploy,
}

/// One JSON text frame of the stream, shared by every subscriber.
#[derive(Debug, Clone)]
pub struct Frame {
    /// What it carries.
    pub kind: FrameKind,
    /// The service the frame is about.
    pub service: Arc<str>,
    /// The second it covers.
    pub t: i64,
    /// Whether it replaces an already sent frame for the same second.
    pub correction: bool,
    /// The serialised frame.
    pub json: Utf8Bytes,
}

impl Frame {
    /// Serialises `body` once into a frame; a failure is logged and yields nothing.
    fn encode(
        kind: FrameKind,
        service: &Arc<str>,
        t: i64,
        correction: bool,
        body: &impl Serialize,
    ) -> Option<Frame> {
        match serde_json::to_string(body) {
            Ok(json) => Some(Frame {
                kind,
                service: service.clone(),
                t,
                correction,
                json: json.into(),
            }),
            Err(error) => {
                tracing::error!(message = "Frame serialisation failed.", ?kind, %error);
                None
            }
        }
    }
}

/// What the API says about a service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    /// Service name.
    pub service: Arc<str>,
    /// Newest sealed second.
    pub last_second: i64,
    /// Instances that reported the newest sealed second.
    pub instances: Vec<InstanceStatus>,
    /// Versions seen: instances in the newest second and the first second each version reported.
    pub versions: BTreeMap<Arc<str>, VersionStatus>,
    /// The newest sealed second's frame, shared with the stream (read by `/api/v1/series`).
    #[serde(skip)]
    pub latest: Utf8Bytes,
}

/// One instance in the newest sealed second.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// Instance id.
    pub id: Arc<str>,
    /// Version.
    pub version: Arc<str>,
    /// Zone, if any.
    pub zone: Option<Arc<str>>,
}

/// One version of a service.
#[derive(Debug, Clone, Serialize)]
pub struct VersionStatus {
    /// Instances running it in the newest sealed second.
    pub instances: u32,
    /// The first second it reported, as seen by this aggregator.
    pub first_seen: i64,
    /// The newest second it reported.
    pub last_seen: i64,
}

#[derive(Serialize)]
struct SecondFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    t: i64,
    service: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    correction: bool,
    series: &'a [SeriesSummary],
}

/// The fan-out point between shards and subscribers.
pub struct Hub {
    live: broadcast::Sender<Frame>,
    history: DashMap<Arc<str>, ServiceHistory>,
    metrics: MainMetrics,
    history_seconds: i64,
    services: RwLock<BTreeMap<Arc<str>, ServiceStatus>>,
    /// The newest frame of each alert, by id, for backfill.
    alerts: Mutex<BTreeMap<String, Frame>>,
    /// The newest canary verdict of each service, and its frame.
    deploys: Mutex<BTreeMap<Arc<str>, (Verdict, Frame)>>,
}

impl Hub {
    /// A hub keeping `history_seconds` of frames per service; subscribers may lag `buffer_frames` frames.
    pub fn new(history_seconds: i64, buffer_frames: usize, metrics: MainMetrics) -> Self {
        let (live, _) = broadcast::channel(buffer_frames.max(16));
        Self {
            live,
            history: DashMap::new(),
            metrics,
            history_seconds,
            services: RwLock::new(BTreeMap::new()),
            alerts: Mutex::new(BTreeMap::new()),
            deploys: Mutex::new(BTreeMap::new()),
        }
    }

    /// Serialises, stores and broadcasts one sealed second.
    pub fn publish_second(&self, sealed: SealedSecond) {
        let body = SecondFrame {
            kind: "second",
            t: sealed.t,
            service: &sealed.service,
            correction: sealed.correction,
            series: &sealed.series,
        };
        let Some(frame) = Frame::encode(
            FrameKind::Second,
            &sealed.service,
            sealed.t,
            sealed.correction,
            &body,
        ) else {
            return;
        };
        let first_seen = if sealed.correction {
            self.first_seen(&sealed.service)
        } else {
            self.update_status(&sealed, &frame.json)
        };
        let overview = overview::summarize(&sealed, &self.metrics, &first_seen);
        let overview = Frame::encode(
            FrameKind::Overview,
            &sealed.service,
            sealed.t,
            sealed.correction,
            &overview,
        );
        {
            let mut history = self.history.entry(sealed.service.clone()).or_default();
            keep(&mut history.seconds, frame.clone(), self.history_seconds);
            if let Some(overview) = &overview {
                keep(
                    &mut history.overview,
                    overview.clone(),
                    self.history_seconds,
                );
            }
        }
        // No subscribers is not an error.
        let _ = self.live.send(frame);
        if let Some(overview) = overview {
            let _ = self.live.send(overview);
        }
    }

    fn first_seen(&self, service: &str) -> BTreeMap<Arc<str>, i64> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        services
            .get(service)
            .map(|s| {
                s.versions
                    .iter()
                    .map(|(v, st)| (v.clone(), st.first_seen))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Serialises and broadcasts an alert's new state; keeps the newest state of each alert for backfill.
    pub fn publish_alert(&self, record: &AlertRecord) {
        let body = serde_json::json!({ "type": "alert", "alert": record });
        let Some(frame) = Frame::encode(
            FrameKind::Alert,
            &record.service,
            record.since,
            false,
            &body,
        ) else {
            return;
        };
        {
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
        let _ = self.live.send(frame);
    }

    /// Serialises and broadcasts a canary verdict; keeps the newest per service for backfill and the API.
    pub fn publish_deploy(&self, verdict: &Verdict) {
        let body = serde_json::json!({ "type": "deploy", "deploy": verdict });
        let Some(frame) =
            Frame::encode(FrameKind::Deploy, &verdict.service, verdict.t, false, &body)
        else {
            return;
        };
        self.deploys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(verdict.service.clone(), (verdict.clone(), frame.clone()));
        let _ = self.live.send(frame);
    }

    /// The newest canary verdict of every service that had one.
    pub fn deploys(&self) -> Vec<Verdict> {
        let deploys = self.deploys.lock().unwrap_or_else(|e| e.into_inner());
        deploys.values().map(|(v, _)| v.clone()).collect()
    }

    /// Updates the service's status; returns each version's first second.
    fn update_status(&self, sealed: &SealedSecond, frame: &Utf8Bytes) -> BTreeMap<Arc<str>, i64> {
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        let status = services
            .entry(sealed.service.clone())
            .or_insert_with(|| ServiceStatus {
                service: sealed.service.clone(),
                last_second: sealed.t,
                instances: Vec::new(),
                versions: BTreeMap::new(),
                latest: frame.clone(),
            });
        status.last_second = sealed.t;
        status.instances = sealed
            .instances
            .iter()
            .map(|i| instance_status(i))
            .collect();
        status.latest = frame.clone();
        for v in status.versions.values_mut() {
            v.instances = 0;
        }
        for instance in &sealed.instances {
            let v = status
                .versions
                .entry(instance.version.clone())
                .or_insert(VersionStatus {
                    instances: 0,
                    first_seen: sealed.t,
                    last_seen: sealed.t,
                });
            v.instances += 1;
            v.last_seen = sealed.t;
        }
        // Versions not seen for the whole history are forgotten.
        let horizon = sealed.t - self.history_seconds;
        status.versions.retain(|_, v| v.last_seen > horizon);
        status
            .versions
            .iter()
            .map(|(v, st)| (v.clone(), st.first_seen))
            .collect()
    }

    /// A live receiver and, consistently with it, the stored frames `wanted` accepts.
    pub fn subscribe(
        &self,
        wanted: impl Fn(&Frame) -> bool,
    ) -> (broadcast::Receiver<Frame>, Vec<Frame>) {
        let receiver = self.live.subscribe();
        (receiver, self.backfill(wanted))
    }

    /// The stored frames `wanted` accepts: seconds and overviews oldest first, then the alerts' newest states.
    pub fn backfill(&self, wanted: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let mut frames: Vec<Frame> = Vec::new();
        for entry in self.history.iter() {
            let history = entry.value();
            frames.extend(
                history
                    .seconds
                    .iter()
                    .chain(&history.overview)
                    .filter(|f| wanted(f))
                    .cloned(),
            );
        }
        frames.sort_by_key(|f| f.t);
        let alerts = self.alerts.lock().unwrap_or_else(|e| e.into_inner());
        frames.extend(alerts.values().filter(|f| wanted(f)).cloned());
        let deploys = self.deploys.lock().unwrap_or_else(|e| e.into_inner());
        frames.extend(
            deploys
                .values()
                .map(|(_, f)| f)
                .filter(|f| wanted(f))
                .cloned(),
        );
        frames
    }

    /// Every service's status.
    pub fn services(&self) -> Vec<ServiceStatus> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        services.values().cloned().collect()
    }

    /// One service's status.
    pub fn service(&self, name: &str) -> Option<ServiceStatus> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        services.get(name).cloned()
    }

    /// Subscribers connected now.
    pub fn subscriber_count(&self) -> usize {
        self.live.receiver_count()
    }
}

/// The newest second a subscriber has been sent, per frame kind and service, to skip live frames that its
/// backfill already carried.
#[derive(Debug, Default)]
pub struct Delivered {
    newest: HashMap<(FrameKind, Arc<str>), i64>,
}

impl Delivered {
    /// Notes frames sent from the backfill.
    pub fn record(&mut self, frames: &[Frame]) {
        for f in frames
            .iter()
            .filter(|f| matches!(f.kind, FrameKind::Second | FrameKind::Overview))
        {
            let newest = self
                .newest
                .entry((f.kind, f.service.clone()))
                .or_insert(f.t);
            *newest = (*newest).max(f.t);
        }
    }

    /// Whether a live frame repeats one already sent (corrections and alert states always go out).
    pub fn already_sent(&self, frame: &Frame) -> bool {
        !frame.correction
            && matches!(frame.kind, FrameKind::Second | FrameKind::Overview)
            && self
                .newest
                .get(&(frame.kind, frame.service.clone()))
                .is_some_and(|t| frame.t <= *t)
    }
}

/// One service's stored frames.
#[derive(Default)]
struct ServiceHistory {
    seconds: VecDeque<Frame>,
    overview: VecDeque<Frame>,
}

/// Inserts a frame in second order (replacing a frame of the same second) and drops what is older than the history.
fn keep(frames: &mut VecDeque<Frame>, frame: Frame, history_seconds: i64) {
    if let Some(slot) = frames.iter_mut().rev().find(|f| f.t == frame.t) {
        *slot = frame;
    } else {
        let at = frames.partition_point(|f| f.t < frame.t);
        frames.insert(at, frame);
    }
    let newest = frames.back().map_or(0, |f| f.t);
    while frames
        .front()
        .is_some_and(|f| f.t <= newest - history_seconds)
    {
        frames.pop_front();
    }
}

fn instance_status(instance: &Instance) -> InstanceStatus {
    InstanceStatus {
        id: instance.id.clone(),
        version: instance.version.clone(),
        zone: instance.zone.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameKind, service: &str, t: i64, correction: bool) -> Frame {
        Frame {
            kind,
            service: service.into(),
            t,
            correction,
            json: "{}".into(),
        }
    }

    #[test]
    fn live_frames_already_in_the_backfill_are_skipped_once() {
        let mut delivered = Delivered::default();
        delivered.record(&[
            frame(FrameKind::Second, "a", 10, false),
            frame(FrameKind::Second, "a", 11, false),
            frame(FrameKind::Overview, "a", 9, false),
        ]);
        let table = [
            (frame(FrameKind::Second, "a", 11, false), true),
            (frame(FrameKind::Second, "a", 12, false), false),
            (frame(FrameKind::Second, "a", 11, true), false),
            (frame(FrameKind::Overview, "a", 10, false), false),
            (frame(FrameKind::Second, "b", 5, false), false),
            (frame(FrameKind::Alert, "a", 1, false), false),
        ];
        for (f, skipped) in table {
            assert_eq!(
                delivered.already_sent(&f),
                skipped,
                "{:?} {} {}",
                f.kind,
                f.service,
                f.t
            );
        }
    }

    #[test]
    fn publishing_stores_history_for_backfill_and_replaces_corrections() {
        let hub = Hub::new(600, 64, MainMetrics::default());
        let sealed = |t: i64, correction: bool| SealedSecond {
            service: "svc".into(),
            t,
            correction,
            series: Vec::new(),
            instances: Vec::new(),
        };
        let (mut live, backfill) = hub.subscribe(|_| true);
        assert!(backfill.is_empty());
        hub.publish_second(sealed(10, false));
        hub.publish_second(sealed(11, false));
        hub.publish_second(sealed(10, true));
        let seconds: Vec<(i64, bool)> = hub
            .backfill(|f| f.kind == FrameKind::Second)
            .iter()
            .map(|f| (f.t, f.correction))
            .collect();
        assert_eq!(seconds, vec![(10, true), (11, false)]);
        // Every publish reached the live receiver too: a second and an overview each time.
        let mut kinds = Vec::new();
        while let Ok(f) = live.try_recv() {
            kinds.push(f.kind);
        }
        assert_eq!(kinds.len(), 6);
    }
}
