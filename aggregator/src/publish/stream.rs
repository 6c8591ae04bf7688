//! The live stream: a broadcast of frames and, per service, the recent frames a new subscriber is backfilled with.
//!
//! Locking: the service map is read-locked to find a service's history (write-locked once, to add it); each has its own
//! mutex, held by a publisher only to insert one frame and by a backfill only to copy that service's frame handles
//! (reference-counted, no JSON is copied). Filtering, sorting and sending a backfill happen after every lock is
//! released, so a slow or large backfill never holds up a shard's publish.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::frame::{Frame, FrameKind};

/// One service's stored frames.
#[derive(Default)]
struct ServiceHistory {
    seconds: VecDeque<Frame>,
    /// Bytes of JSON in `seconds`.
    seconds_bytes: usize,
    overview: VecDeque<Frame>,
    /// Bytes of JSON in `overview`.
    overview_bytes: usize,
}

/// Broadcast plus per-service history.
///
/// Two broadcasts: full second frames on one, every other frame (overviews, alerts, verdicts) on the other. A
/// subscriber that wants no full frames (the overview page, by far the most common) listens to the second only and
/// is never woken for the full frames, which are as many as the overviews (one per service and second).
pub(crate) struct LiveStream {
    live: broadcast::Sender<Frame>,
    seconds: broadcast::Sender<Frame>,
    history: RwLock<HashMap<Arc<str>, Arc<Mutex<ServiceHistory>>>>,
    history_seconds: i64,
    /// Most bytes of frames kept per service and kind (full seconds, overview), whichever of time and bytes binds
    /// first: a service with 50,000 series would otherwise keep gigabytes.
    history_bytes: usize,
}

impl LiveStream {
    /// A stream keeping `history_seconds` of frames per service; subscribers may lag `buffer_frames` frames.
    pub(crate) fn new(history_seconds: i64, history_bytes: usize, buffer_frames: usize) -> Self {
        let (live, _) = broadcast::channel(buffer_frames.max(16));
        let (seconds, _) = broadcast::channel(buffer_frames.max(16));
        Self {
            live,
            seconds,
            history: RwLock::new(HashMap::new()),
            history_seconds,
            history_bytes,
        }
    }

    fn service_history(&self, service: &Arc<str>) -> Arc<Mutex<ServiceHistory>> {
        if let Some(h) = self
            .history
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
        {
            return h.clone();
        }
        self.history
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(service.clone())
            .or_default()
            .clone()
    }

    /// Stores a second's frame and its overview in the service's history, then broadcasts both.
    pub(crate) fn publish_second(&self, second: Frame, overview: Option<Frame>) {
        self.remember(&second, false);
        if let Some(overview) = &overview {
            self.remember(overview, true);
        }
        self.broadcast(second);
        if let Some(overview) = overview {
            self.broadcast(overview);
        }
    }

    /// Stores an overview frame alone (relayed from another node, whose second frame comes on its own), then
    /// broadcasts it.
    pub(crate) fn publish_overview(&self, overview: Frame) {
        self.remember(&overview, true);
        self.broadcast(overview);
    }

    /// Keeps a copy of `frame` in its service's history, among the overviews or among the seconds.
    fn remember(&self, frame: &Frame, overview: bool) {
        let history = self.service_history(&frame.service);
        let mut history = history.lock().unwrap_or_else(|e| e.into_inner());
        let history = &mut *history;
        let (frames, bytes) = if overview {
            (&mut history.overview, &mut history.overview_bytes)
        } else {
            (&mut history.seconds, &mut history.seconds_bytes)
        };
        keep(
            frames,
            bytes,
            frame.clone(),
            (self.history_seconds, self.history_bytes),
        );
    }

    /// Sends a frame to every subscriber connected now. Having none is normal, not an error.
    pub(crate) fn broadcast(&self, frame: Frame) {
        let channel = if frame.kind == FrameKind::Second {
            &self.seconds
        } else {
            &self.live
        };
        if channel.receiver_count() > 0 {
            // Fails only when every receiver went away since the count: nobody to tell.
            channel.send(frame).ok();
        }
    }

    /// A receiver of every frame broadcast from now on; of full second frames only if `seconds`.
    pub(crate) fn subscribe(&self, seconds: bool) -> LiveReceiver {
        LiveReceiver {
            live: self.live.subscribe(),
            seconds: seconds.then(|| self.seconds.subscribe()),
        }
    }

    /// Copies of the stored second and overview frames of the services and kinds `stores` accepts, each service's
    /// in second order. Only the stores accepted are locked and copied.
    pub(crate) fn stored(&self, mut stores: impl FnMut(FrameKind, &str) -> bool) -> Vec<Frame> {
        let services: Vec<(Arc<Mutex<ServiceHistory>>, bool, bool)> = self
            .history
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(service, history)| {
                let seconds = stores(FrameKind::Second, service);
                let overviews = stores(FrameKind::Overview, service);
                (seconds || overviews).then(|| (history.clone(), seconds, overviews))
            })
            .collect();
        let mut frames = Vec::new();
        for (history, seconds, overviews) in services {
            let history = history.lock().unwrap_or_else(|e| e.into_inner());
            if seconds {
                frames.extend(history.seconds.iter().cloned());
            }
            if overviews {
                frames.extend(history.overview.iter().cloned());
            }
        }
        frames
    }

    /// Subscribers connected now.
    pub(crate) fn subscriber_count(&self) -> usize {
        self.live.receiver_count()
    }

    /// Listens to full second frames from now on (a subscription that now names services), if it did not; or
    /// stops listening to them (the frames of them still waiting are dropped: unwanted).
    pub(crate) fn want_seconds(&self, receiver: &mut LiveReceiver, wanted: bool) {
        if !wanted {
            receiver.seconds = None;
        } else if receiver.seconds.is_none() {
            receiver.seconds = Some(self.seconds.subscribe());
        }
    }

    /// Drops frames older than the history as of second `now`, and the services left with none: a service that
    /// went away leaves nothing behind once its history has passed.
    pub(crate) fn prune(&self, now: i64) {
        let horizon = now.saturating_sub(self.history_seconds);
        let mut services = self.history.write().unwrap_or_else(|e| e.into_inner());
        services.retain(|_, history| {
            let mut history = history.lock().unwrap_or_else(|e| e.into_inner());
            let history = &mut *history;
            for (frames, size) in [
                (&mut history.seconds, &mut history.seconds_bytes),
                (&mut history.overview, &mut history.overview_bytes),
            ] {
                while frames.front().is_some_and(|f| f.t <= horizon) {
                    if let Some(old) = frames.pop_front() {
                        *size -= old.json.len();
                    }
                }
            }
            !(history.seconds.is_empty() && history.overview.is_empty())
        });
    }
}

/// One subscriber's end of the live stream: every frame but full seconds, and full seconds if it wants any.
pub(crate) struct LiveReceiver {
    live: broadcast::Receiver<Frame>,
    seconds: Option<broadcast::Receiver<Frame>>,
}

impl LiveReceiver {
    /// The next frame of either broadcast (the other frames first when both have one waiting). Frames of one
    /// broadcast come in the order they were sent; between the two, in either.
    pub(crate) async fn recv(&mut self) -> Result<Frame, RecvError> {
        match &mut self.seconds {
            None => self.live.recv().await,
            Some(seconds) => tokio::select! {
                biased;
                frame = self.live.recv() => frame,
                frame = seconds.recv() => frame,
            },
        }
    }

    /// A frame already waiting, if any (the other frames first).
    pub(crate) fn try_recv(&mut self) -> Result<Frame, broadcast::error::TryRecvError> {
        match self.live.try_recv() {
            Err(broadcast::error::TryRecvError::Empty) => match &mut self.seconds {
                Some(seconds) => seconds.try_recv(),
                None => Err(broadcast::error::TryRecvError::Empty),
            },
            other => other,
        }
    }

    /// Whether no frame waits on either broadcast.
    pub(crate) fn is_empty(&self) -> bool {
        self.live.is_empty() && self.seconds.as_ref().is_none_or(|s| s.is_empty())
    }
}

/// Inserts a frame in second order (replacing a frame of the same second), then drops the oldest frames while the
/// history is longer than `seconds` or larger than `bytes` (the newest frame always stays).
fn keep(
    frames: &mut VecDeque<Frame>,
    size: &mut usize,
    frame: Frame,
    (seconds, bytes): (i64, usize),
) {
    *size += frame.json.len();
    // Found by bisection (the frames are in second order, one per second): every publish of every service comes
    // here, and a new second, the usual case, matched no frame after a walk through all of them.
    let at = frames.partition_point(|f| f.t < frame.t);
    match frames.get_mut(at) {
        Some(slot) if slot.t == frame.t => {
            *size -= slot.json.len();
            *slot = frame;
        }
        _ => frames.insert(at, frame),
    }
    let newest = frames.back().map_or(0, |f| f.t);
    while frames.len() > 1
        && frames
            .front()
            .is_some_and(|f| f.t <= newest.saturating_sub(seconds) || *size > bytes)
    {
        if let Some(old) = frames.pop_front() {
            *size -= old.json.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(t: i64, bytes: usize) -> Frame {
        Frame {
            kind: FrameKind::Second,
            service: "svc".into(),
            t,
            correction: false,
            json: "x".repeat(bytes).into(),
            relayed: false,
        }
    }

    fn of_kind(kind: FrameKind, t: i64) -> Frame {
        Frame {
            kind,
            ..frame(t, 10)
        }
    }

    /// A receiver without full seconds is sent every other frame and none of them; once it asks for them, it gets
    /// those broadcast from then on, and the frames of one broadcast keep their order; none once it stops asking.
    #[test]
    fn a_receiver_hears_full_seconds_only_once_it_wants_them() {
        let stream = LiveStream::new(600, usize::MAX, 64);
        let mut overview_only = stream.subscribe(false);
        let mut everything = stream.subscribe(true);
        stream.broadcast(of_kind(FrameKind::Second, 1));
        stream.broadcast(of_kind(FrameKind::Overview, 1));
        stream.broadcast(of_kind(FrameKind::Alert, 1));
        let drain = |r: &mut LiveReceiver| {
            let mut got = Vec::new();
            while let Ok(f) = r.try_recv() {
                got.push((f.kind, f.t));
            }
            assert!(r.is_empty());
            got
        };
        assert_eq!(
            drain(&mut overview_only),
            [(FrameKind::Overview, 1), (FrameKind::Alert, 1)]
        );
        let mut all = drain(&mut everything);
        all.sort_by_key(|(kind, _)| *kind as u8);
        assert_eq!(
            all,
            [
                (FrameKind::Second, 1),
                (FrameKind::Overview, 1),
                (FrameKind::Alert, 1)
            ]
        );
        stream.want_seconds(&mut overview_only, true);
        stream.broadcast(of_kind(FrameKind::Second, 2));
        stream.broadcast(of_kind(FrameKind::Second, 3));
        stream.broadcast(of_kind(FrameKind::Overview, 2));
        assert_eq!(
            drain(&mut overview_only),
            [
                (FrameKind::Overview, 2),
                (FrameKind::Second, 2),
                (FrameKind::Second, 3)
            ]
        );
        stream.want_seconds(&mut overview_only, false);
        stream.broadcast(of_kind(FrameKind::Second, 4));
        stream.broadcast(of_kind(FrameKind::Overview, 4));
        assert_eq!(drain(&mut overview_only), [(FrameKind::Overview, 4)]);
    }

    #[test]
    fn history_is_bounded_by_time_and_by_bytes_whichever_binds_first() {
        let (mut frames, mut size) = (VecDeque::new(), 0);
        for t in 0..10 {
            keep(&mut frames, &mut size, frame(t, 100), (5, 10_000));
        }
        assert_eq!(
            frames.iter().map(|f| f.t).collect::<Vec<_>>(),
            [5, 6, 7, 8, 9]
        );
        assert_eq!(size, 500);
        keep(&mut frames, &mut size, frame(10, 350), (5, 700));
        assert_eq!(
            frames.iter().map(|f| f.t).collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );
        assert_eq!(size, 650);
        keep(&mut frames, &mut size, frame(9, 50), (5, 700));
        assert_eq!(size, 600, "a correction replaces its second's bytes");
        keep(&mut frames, &mut size, frame(11, 5_000), (5, 700));
        assert_eq!(
            frames.len(),
            1,
            "the newest frame stays even when it alone is over the bound"
        );
        assert_eq!(size, 5_000);
    }
}
