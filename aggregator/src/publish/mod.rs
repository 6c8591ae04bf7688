//! Publishing: where sealed seconds, alert states and verdicts go, and how browsers and the API read them.
//!
//! - [`Hub`]: the fan-out point between shards and subscribers. Serialises each sealed second once into a frame and
//!   an overview frame, stores them, and broadcasts; publishing never waits on a subscriber.
//! - [`frame`]: the shared frame and the per-subscriber dedup; `stream`: broadcast and history; `status`: the
//!   service-status registry; `state`: the newest alert and verdict states. Each has its own lock, and none is held
//!   while a subscriber filters, sorts or sends (see `stream`).
//! - [`overview`]: one summary per service and version per second (pure).
//! - [`http`]: the axum router: dashboard, JSON API, websocket, `/metrics`.
//!
//! Depends on the leaves and on `alerting` (the types it shows, the acknowledgement handle); nothing here reaches the
//! pipeline.

pub(crate) mod frame;
pub(crate) mod http;
pub(crate) mod overview;
pub(crate) mod remote_write;
mod state;
mod status;
mod stream;

use std::sync::Arc;

use serde::Serialize;

pub(crate) use frame::{Delivered, Frame, FrameKind};
pub(crate) use status::ServiceStatus;

use crate::alerting::alerts::RecordSink;
use crate::alerting::canary::Verdict;
use crate::alerting::event::AlertRecord;
use crate::model::{MainMetrics, SealedSecond, SeriesSummary};
use state::EventStates;
use status::StatusRegistry;
use stream::LiveStream;
pub(crate) use stream::{HistoryLimits, LiveReceiver, Seconds};

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
pub(crate) struct Hub {
    stream: LiveStream,
    status: StatusRegistry,
    events: EventStates,
    metrics: MainMetrics,
    /// Most bytes of full-second JSON one backfill sends.
    backfill_bytes: usize,
    /// Long-term export, when configured.
    export: Option<Arc<remote_write::RemoteWrite>>,
}

impl Hub {
    /// A hub keeping the history `history` allows; subscribers may lag `buffer_frames` frames.
    pub(crate) fn new(history: HistoryLimits, buffer_frames: usize, metrics: MainMetrics) -> Self {
        Self {
            stream: LiveStream::new(history, buffer_frames),
            status: StatusRegistry::new(history.seconds),
            backfill_bytes: history.backfill,
            events: EventStates::default(),
            metrics,
            export: None,
        }
    }

    /// Also hands every sealed second (and correction) to `export`.
    pub(crate) fn with_export(mut self, export: Option<Arc<remote_write::RemoteWrite>>) -> Self {
        self.export = export;
        self
    }

    /// Serialises, stores and broadcasts one sealed second and its overview.
    pub(crate) fn publish_second(&self, sealed: SealedSecond) {
        if let Some(export) = &self.export {
            export.offer(&sealed);
        }
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
        let first_seen = match frame.plain() {
            Some(json) if !sealed.correction => self.status.update(&sealed, json),
            _ => self.status.first_seen(&sealed.service),
        };
        let overview = overview::summarize(
            &sealed,
            &self.metrics,
            &first_seen,
            strobe_proto::clock::unix_millis(),
        );
        let overview = Frame::encode(
            FrameKind::Overview,
            &sealed.service,
            sealed.t,
            sealed.correction,
            &overview,
        );
        self.stream.publish_second(frame, overview);
    }

    /// Stores and broadcasts a frame another node of the cluster produced (read by its relay), marked as relayed so
    /// that it is never relayed on. Seconds and overviews join the history, alert states the alert backfill;
    /// verdicts are broadcast.
    pub(crate) fn publish_relayed(&self, text: &str) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        struct Envelope {
            #[serde(rename = "type")]
            kind: String,
            t: Option<i64>,
            service: Option<Arc<str>>,
            #[serde(default)]
            correction: bool,
            alert: Option<AlertRecord>,
            deploy: Option<DeployEnvelope>,
        }
        #[derive(serde::Deserialize)]
        struct DeployEnvelope {
            service: Arc<str>,
            t: i64,
        }
        let envelope: Envelope = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let frame = |kind, service: Arc<str>, t, correction| Frame {
            kind,
            service,
            t,
            correction,
            json: text.to_owned().into(),
            relayed: true,
        };
        match envelope.kind.as_str() {
            "second" | "overview" => {
                let (Some(service), Some(t)) = (envelope.service, envelope.t) else {
                    return Err("a second without service or t".to_owned());
                };
                if envelope.kind == "second" {
                    self.stream.publish_second(
                        frame(FrameKind::Second, service, t, envelope.correction),
                        None,
                    );
                } else {
                    self.stream.publish_overview(frame(
                        FrameKind::Overview,
                        service,
                        t,
                        envelope.correction,
                    ));
                }
            }
            "alert" => {
                let record = envelope.alert.ok_or("an alert frame without its alert")?;
                let f = frame(
                    FrameKind::Alert,
                    record.service.clone(),
                    record.since,
                    false,
                );
                self.events.alert(&record, &f);
                self.stream.broadcast(f);
            }
            "deploy" => {
                let deploy = envelope
                    .deploy
                    .ok_or("a deploy frame without its verdict")?;
                self.stream
                    .broadcast(frame(FrameKind::Deploy, deploy.service, deploy.t, false));
            }
            // Notices to one subscriber (lagged, errors) are not the cluster's.
            _ => {}
        }
        Ok(())
    }

    /// Serialises and broadcasts a canary verdict; keeps the newest per service for backfill and the API.
    pub(crate) fn publish_deploy(&self, verdict: &Verdict) {
        let body = serde_json::json!({ "type": "deploy", "deploy": verdict });
        let Some(frame) =
            Frame::encode(FrameKind::Deploy, &verdict.service, verdict.t, false, &body)
        else {
            return;
        };
        self.events.deploy(verdict, &frame);
        self.stream.broadcast(frame);
    }

    /// Forgets what is older than the history as of second `now`: frames, then services that sealed nothing in it
    /// (their status and verdicts). Alert states are bounded on their own and resolve through the alert manager.
    pub(crate) fn prune(&self, now: i64) {
        self.stream.prune(now);
        self.status.prune(now);
        self.events
            .prune_deploys(|service| self.status.get(service).is_some());
    }

    /// The newest canary verdict of every service that had one.
    pub(crate) fn deploys(&self) -> Vec<Verdict> {
        self.events.verdicts()
    }

    /// A live receiver and, consistently with it, the stored frames `wanted` accepts: the receiver is taken first,
    /// so nothing published meanwhile falls between the two (what comes both ways is skipped by [`Delivered`]).
    pub(crate) fn subscribe(
        &self,
        seconds: Seconds<'_>,
        stores: impl FnMut(FrameKind, &str) -> bool,
        wanted: impl FnMut(&Frame) -> bool,
    ) -> (LiveReceiver, Vec<Frame>) {
        let receiver = self.stream.subscribe(seconds);
        (receiver, self.backfill(stores, wanted))
    }

    /// Makes `receiver` listen to the full second frames `wanted` names from now on; true if full seconds of
    /// services it listened to before may have been missed meanwhile (see [`LiveStream::want_seconds`]).
    pub(crate) fn want_seconds(&self, receiver: &mut LiveReceiver, wanted: Seconds<'_>) -> bool {
        self.stream.want_seconds(receiver, wanted)
    }

    /// The stored frames `wanted` accepts: seconds and overviews oldest first, then alert and verdict states. Only
    /// the services' stores of seconds and of overviews that `stores` accepts (by kind and service) are read: their
    /// frame handles are copied under each store's lock, then filtered and sorted with no lock held. Full seconds
    /// come from the newest back, as many as `max_backfill_bytes` of JSON takes: kept compressed, every service's
    /// seconds together would unpack into gigabytes for a client that subscribes to everything.
    pub(crate) fn backfill(
        &self,
        stores: impl FnMut(FrameKind, &str) -> bool,
        mut wanted: impl FnMut(&Frame) -> bool,
    ) -> Vec<Frame> {
        let mut frames = self.stream.stored(stores);
        frames.retain(&mut wanted);
        frames.sort_by_key(|f| std::cmp::Reverse(f.t));
        let mut budget = self.backfill_bytes;
        frames.retain(|f| {
            if f.kind != FrameKind::Second {
                return true;
            }
            let len = f.text_len();
            // The first second that does not fit ends the full seconds: the backfill is the newest ones, no gaps.
            let fits = len <= budget;
            budget = if fits { budget - len } else { 0 };
            fits
        });
        frames.sort_by_key(|f| f.t);
        let mut states = self.events.frames();
        states.retain(&mut wanted);
        frames.extend(states);
        frames
    }

    /// Every service's status.
    pub(crate) fn services(&self) -> Vec<ServiceStatus> {
        self.status.all()
    }

    /// One service's status.
    pub(crate) fn service(&self, name: &str) -> Option<ServiceStatus> {
        self.status.get(name)
    }

    /// Subscribers connected now.
    pub(crate) fn subscriber_count(&self) -> usize {
        self.stream.subscriber_count()
    }

    /// Bytes of frames kept for backfill now (see `LiveStream`).
    pub(crate) fn history_bytes(&self) -> usize {
        self.stream.held_bytes()
    }
}

impl RecordSink for Hub {
    /// Serialises and broadcasts an alert's new state; keeps the newest state of each alert for backfill.
    fn publish_alert(&self, record: &AlertRecord) {
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
        self.events.alert(record, &frame);
        self.stream.broadcast(frame);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use super::*;

    fn sealed(t: i64, correction: bool) -> SealedSecond {
        SealedSecond {
            service: "svc".into(),
            t,
            correction,
            series: Vec::new(),
            instances: Vec::new(),
        }
    }

    #[test]
    fn publishing_stores_history_for_backfill_and_replaces_corrections() {
        let hub = Hub::new(HistoryLimits::default(), 64, MainMetrics::default());
        let (mut live, backfill) = hub.subscribe(Seconds::All, |_, _| true, |_| true);
        assert!(backfill.is_empty());
        hub.publish_second(sealed(10, false));
        hub.publish_second(sealed(11, false));
        hub.publish_second(sealed(10, true));
        let seconds: Vec<(i64, bool)> = hub
            .backfill(|_, _| true, |f| f.kind == FrameKind::Second)
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

    /// A backfill's full seconds are the newest its budget takes, with no gap; overviews come whole.
    #[test]
    fn a_backfill_sends_the_newest_full_seconds_its_budget_takes() {
        let one = |t| {
            Frame::encode(
                FrameKind::Second,
                &"svc".into(),
                t,
                false,
                &SecondFrame {
                    kind: "second",
                    t,
                    service: "svc",
                    correction: false,
                    series: &[],
                },
            )
            .expect("encodes")
            .text_len()
        };
        let len = one(10);
        let hub = Hub::new(
            HistoryLimits {
                backfill: 3 * len + len / 2,
                ..HistoryLimits::default()
            },
            64,
            MainMetrics::default(),
        );
        for t in 10..20 {
            hub.publish_second(sealed(t, false));
        }
        let frames = hub.backfill(|_, _| true, |_| true);
        let of = |kind| {
            frames
                .iter()
                .filter(|f| f.kind == kind)
                .map(|f| f.t)
                .collect::<Vec<_>>()
        };
        assert_eq!(of(FrameKind::Second), [17, 18, 19]);
        assert_eq!(of(FrameKind::Overview), (10..20).collect::<Vec<_>>());
        assert!(
            frames.windows(2).all(|w| w[0].t <= w[1].t),
            "in second order"
        );
    }

    #[test]
    fn a_service_that_went_away_is_forgotten_once_its_history_has_passed() {
        let hub = Hub::new(HistoryLimits::default(), 64, MainMetrics::default());
        hub.publish_second(sealed(1_000, false));
        hub.publish_deploy(&crate::alerting::canary::verdict::tests::verdict("svc"));
        hub.prune(1_500);
        assert_eq!(hub.services().len(), 1);
        assert!(!hub.backfill(|_, _| true, |_| true).is_empty());
        hub.prune(1_600);
        assert!(hub.services().is_empty());
        assert!(hub.deploys().is_empty());
        assert!(hub.backfill(|_, _| true, |_| true).is_empty());
    }

    /// A backfill that takes its time (here: its filter waits until a shard has published) holds no lock a publish
    /// needs. If it did, the publish below could not finish and the filter would give up waiting.
    #[test]
    fn a_slow_backfill_does_not_hold_up_publishing() {
        let hub = Arc::new(Hub::new(
            HistoryLimits::default(),
            64,
            MainMetrics::default(),
        ));
        hub.publish_second(sealed(10, false));
        hub.publish_deploy(&crate::alerting::canary::verdict::tests::verdict("svc"));
        let (done_tx, done_rx) = mpsc::channel();
        let publisher = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                hub.publish_second(sealed(11, false));
                hub.publish_second(sealed(12, false));
                hub.publish_deploy(&crate::alerting::canary::verdict::tests::verdict("svc"));
                done_tx.send(()).ok();
            })
        };
        let mut waited = false;
        let frames = hub.backfill(
            |_, _| true,
            |_| {
                if !waited {
                    waited = true;
                    done_rx
                        .recv_timeout(Duration::from_secs(30))
                        .expect("publishing waited for the backfill");
                }
                true
            },
        );
        publisher.join().expect("publisher thread");
        assert!(waited && !frames.is_empty());
        assert_eq!(
            hub.backfill(|_, _| true, |f| f.kind == FrameKind::Second)
                .len(),
            3,
            "the publishes made during the backfill are stored"
        );
    }
}
