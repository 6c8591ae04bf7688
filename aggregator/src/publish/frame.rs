//! One JSON text frame of the stream, serialised once and shared by every subscriber, and the per-subscriber
//! record of what it was already sent.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;

/// What a frame carries, for subscription filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum FrameKind {
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
pub(crate) struct Frame {
    /// What it carries.
    pub(crate) kind: FrameKind,
    /// The service the frame is about.
    pub(crate) service: Arc<str>,
    /// The second it covers.
    pub(crate) t: i64,
    /// Whether it replaces an already sent frame for the same second.
    pub(crate) correction: bool,
    /// The serialised frame.
    pub(crate) json: Utf8Bytes,
    /// Read from another node of the cluster (never relayed on again).
    pub(crate) relayed: bool,
}

impl Frame {
    /// Serialises `body` once into a frame; a failure is logged and yields nothing.
    pub(crate) fn encode(
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
                relayed: false,
            }),
            Err(error) => {
                tracing::error!(message = "Frame serialisation failed.", ?kind, %error);
                None
            }
        }
    }
}

/// The newest second a subscriber has been sent, per frame kind and service, to skip live frames that its
/// backfill already carried.
#[derive(Debug, Default)]
pub(crate) struct Delivered {
    newest: HashMap<(FrameKind, Arc<str>), i64>,
}

impl Delivered {
    /// Notes frames sent from the backfill.
    pub(crate) fn record(&mut self, frames: &[Frame]) {
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
    pub(crate) fn already_sent(&self, frame: &Frame) -> bool {
        !frame.correction
            && matches!(frame.kind, FrameKind::Second | FrameKind::Overview)
            && self
                .newest
                .get(&(frame.kind, frame.service.clone()))
                .is_some_and(|t| frame.t <= *t)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn frame(kind: FrameKind, service: &str, t: i64, correction: bool) -> Frame {
        Frame {
            kind,
            service: service.into(),
            t,
            correction,
            json: "{}".into(),
            relayed: false,
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
}
