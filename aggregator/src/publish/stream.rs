//! The live stream: a broadcast of frames and, per service, the recent frames a new subscriber is backfilled with.
//!
//! Locking: the service map is read-locked to find a service's history (write-locked once, to add it); each has its own
//! mutex, held by a publisher only to insert one frame and by a backfill only to copy that service's frame handles
//! (reference-counted, no JSON is copied). Filtering, sorting and sending a backfill happen after every lock is
//! released, so a slow or large backfill never holds up a shard's publish.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::broadcast;

use super::frame::Frame;

/// One service's stored frames.
#[derive(Default)]
struct ServiceHistory {
    seconds: VecDeque<Frame>,
    overview: VecDeque<Frame>,
}

/// Broadcast plus per-service history.
pub(crate) struct LiveStream {
    live: broadcast::Sender<Frame>,
    history: RwLock<HashMap<Arc<str>, Arc<Mutex<ServiceHistory>>>>,
    history_seconds: i64,
}

impl LiveStream {
    /// A stream keeping `history_seconds` of frames per service; subscribers may lag `buffer_frames` frames.
    pub(crate) fn new(history_seconds: i64, buffer_frames: usize) -> Self {
        let (live, _) = broadcast::channel(buffer_frames.max(16));
        Self {
            live,
            history: RwLock::new(HashMap::new()),
            history_seconds,
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
        {
            let history = self.service_history(&second.service);
            let mut history = history.lock().unwrap_or_else(|e| e.into_inner());
            keep(&mut history.seconds, second.clone(), self.history_seconds);
            if let Some(overview) = &overview {
                keep(
                    &mut history.overview,
                    overview.clone(),
                    self.history_seconds,
                );
            }
        }
        self.broadcast(second);
        if let Some(overview) = overview {
            self.broadcast(overview);
        }
    }

    /// Sends a frame to every subscriber connected now. Having none is normal, not an error.
    pub(crate) fn broadcast(&self, frame: Frame) {
        if self.live.receiver_count() > 0 {
            // Fails only when every receiver went away since the count: nobody to tell.
            self.live.send(frame).ok();
        }
    }

    /// A receiver of every frame broadcast from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Frame> {
        self.live.subscribe()
    }

    /// Copies of every stored second and overview frame, each service's in second order.
    pub(crate) fn stored(&self) -> Vec<Frame> {
        let services: Vec<Arc<Mutex<ServiceHistory>>> = self
            .history
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut frames = Vec::new();
        for history in services {
            let history = history.lock().unwrap_or_else(|e| e.into_inner());
            frames.extend(history.seconds.iter().chain(&history.overview).cloned());
        }
        frames
    }

    /// Subscribers connected now.
    pub(crate) fn subscriber_count(&self) -> usize {
        self.live.receiver_count()
    }
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
        .is_some_and(|f| f.t <= newest.saturating_sub(history_seconds))
    {
        frames.pop_front();
    }
}
