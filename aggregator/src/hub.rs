//! Where sealed seconds go: serialised once into a frame, kept in per-service history for backfill, and broadcast
//! to every subscriber. Publishing never waits on a subscriber: a slow one lags and loses frames.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::alerts::{AlertRecord, AlertState};
use crate::model::{Instance, SealedSecond, SeriesSummary};

/// Most alert states kept for backfill.
const MAX_ALERT_FRAMES: usize = 1000;

/// One JSON text frame of the stream, shared by every subscriber.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The service the frame is about.
    pub service: Arc<str>,
    /// The second it covers.
    pub t: i64,
    /// Whether it replaces an already sent frame for the same second.
    pub correction: bool,
    /// The serialised frame.
    pub json: Utf8Bytes,
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
    /// The newest sealed second's series.
    #[serde(skip)]
    pub latest: Arc<Vec<SeriesSummary>>,
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
    history: DashMap<Arc<str>, VecDeque<Frame>>,
    history_seconds: i64,
    services: RwLock<BTreeMap<Arc<str>, ServiceStatus>>,
    /// The newest frame of each alert, by id, for backfill.
    alerts: Mutex<BTreeMap<String, Frame>>,
    /// Serialises history updates with the broadcast, so a subscriber never sees a frame twice or not at all
    /// between its backfill and its live stream.
    publish: Mutex<()>,
}

impl Hub {
    /// A hub keeping `history_seconds` of frames per service; subscribers may lag `buffer_frames` frames.
    pub fn new(history_seconds: i64, buffer_frames: usize) -> Self {
        let (live, _) = broadcast::channel(buffer_frames.max(16));
        Self {
            live,
            history: DashMap::new(),
            history_seconds,
            services: RwLock::new(BTreeMap::new()),
            alerts: Mutex::new(BTreeMap::new()),
            publish: Mutex::new(()),
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
        let json = match serde_json::to_string(&body) {
            Ok(json) => json,
            Err(error) => {
                tracing::error!(message = "Frame serialisation failed.", %error);
                return;
            }
        };
        let frame = Frame {
            service: sealed.service.clone(),
            t: sealed.t,
            correction: sealed.correction,
            json: json.into(),
        };
        if !sealed.correction {
            self.update_status(&sealed);
        }
        let _guard = self.publish.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut history = self.history.entry(sealed.service.clone()).or_default();
            if let Some(slot) = history.iter_mut().rev().find(|f| f.t == frame.t) {
                *slot = frame.clone();
            } else {
                let at = history.partition_point(|f| f.t < frame.t);
                history.insert(at, frame.clone());
            }
            let newest = history.back().map_or(frame.t, |f| f.t);
            while history
                .front()
                .is_some_and(|f| f.t <= newest - self.history_seconds)
            {
                history.pop_front();
            }
        }
        // No subscribers is not an error.
        let _ = self.live.send(frame);
    }

    /// Serialises and broadcasts an alert's new state; keeps the newest state of each alert for backfill.
    pub fn publish_alert(&self, record: &AlertRecord) {
        let json =
            match serde_json::to_string(&serde_json::json!({ "type": "alert", "alert": record })) {
                Ok(json) => json,
                Err(error) => {
                    tracing::error!(message = "Alert serialisation failed.", %error);
                    return;
                }
            };
        let frame = Frame {
            service: record.service.clone(),
            t: record.since,
            correction: false,
            json: json.into(),
        };
        let _guard = self.publish.lock().unwrap_or_else(|e| e.into_inner());
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

    fn update_status(&self, sealed: &SealedSecond) {
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        let status = services
            .entry(sealed.service.clone())
            .or_insert_with(|| ServiceStatus {
                service: sealed.service.clone(),
                last_second: sealed.t,
                instances: Vec::new(),
                versions: BTreeMap::new(),
                latest: Arc::new(Vec::new()),
            });
        status.last_second = sealed.t;
        status.instances = sealed
            .instances
            .iter()
            .map(|i| instance_status(i))
            .collect();
        status.latest = Arc::new(sealed.series.clone());
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
    }

    /// A live receiver and, consistently with it, the history of the services `wanted` accepts.
    pub fn subscribe(
        &self,
        wanted: impl Fn(&str) -> bool,
    ) -> (broadcast::Receiver<Frame>, Vec<Frame>) {
        let _guard = self.publish.lock().unwrap_or_else(|e| e.into_inner());
        let receiver = self.live.subscribe();
        (receiver, self.backfill(wanted))
    }

    /// The history of the services `wanted` accepts, oldest first.
    pub fn backfill(&self, wanted: impl Fn(&str) -> bool) -> Vec<Frame> {
        let mut frames: Vec<Frame> = self
            .history
            .iter()
            .filter(|entry| wanted(entry.key()))
            .flat_map(|entry| entry.value().iter().cloned().collect::<Vec<_>>())
            .collect();
        frames.sort_by_key(|f| f.t);
        let alerts = self.alerts.lock().unwrap_or_else(|e| e.into_inner());
        frames.extend(alerts.values().filter(|f| wanted(&f.service)).cloned());
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

fn instance_status(instance: &Instance) -> InstanceStatus {
    InstanceStatus {
        id: instance.id.clone(),
        version: instance.version.clone(),
        zone: instance.zone.clone(),
    }
}
