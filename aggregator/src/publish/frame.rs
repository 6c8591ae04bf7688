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

/// A frame's JSON: as it is sent, or packed (snappy) while it waits in a service's history for a backfill. A full
/// second repeats the same keys, names and tags in every series: a 100-series service's second (72.8 KB) packs
/// into 8.3 KB in about 50 us and unpacks in about 25 us, so the history holds nine times the seconds in the same
/// memory. Live frames are never packed: each is sent as is to every subscriber.
#[derive(Debug, Clone)]
pub(crate) enum FrameText {
    /// The JSON text itself.
    Plain(Utf8Bytes),
    /// The JSON text, snappy-compressed (raw format).
    Packed(Arc<[u8]>),
}

impl From<String> for FrameText {
    fn from(json: String) -> Self {
        FrameText::Plain(json.into())
    }
}

impl From<&str> for FrameText {
    fn from(json: &str) -> Self {
        FrameText::Plain(json.into())
    }
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
    /// The serialised frame: as sent, or packed while it waits in the history.
    pub(crate) json: FrameText,
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

    /// The JSON, if it is not packed (a frame fresh from [`Frame::encode`] or a relay never is).
    pub(crate) fn plain(&self) -> Option<&Utf8Bytes> {
        match &self.json {
            FrameText::Plain(json) => Some(json),
            FrameText::Packed(_) => None,
        }
    }

    /// A copy to keep in a history: its JSON packed. One already packed is shared, not packed again; one that
    /// cannot be packed (larger than snappy takes, about 4 GB) stays plain.
    pub(crate) fn packed(&self) -> Frame {
        let json = match &self.json {
            FrameText::Plain(json) => match snap::raw::Encoder::new().compress_vec(json.as_bytes())
            {
                Ok(packed) => FrameText::Packed(packed.into()),
                Err(_) => self.json.clone(),
            },
            FrameText::Packed(_) => self.json.clone(),
        };
        Frame {
            json,
            service: self.service.clone(),
            ..*self
        }
    }

    /// Bytes of JSON held, packed or not.
    pub(crate) fn held_bytes(&self) -> usize {
        match &self.json {
            FrameText::Plain(json) => json.len(),
            FrameText::Packed(packed) => packed.len(),
        }
    }

    /// Bytes of JSON text it sends (unpacked, if packed: read from the packed header).
    pub(crate) fn text_len(&self) -> usize {
        match &self.json {
            FrameText::Plain(json) => json.len(),
            FrameText::Packed(packed) => snap::raw::decompress_len(packed).unwrap_or(packed.len()),
        }
    }

    /// The JSON text to send, unpacked if it was packed. None only if packed bytes do not unpack, which nothing
    /// but a bug here could cause: logged, and the frame is skipped.
    pub(crate) fn into_text(self) -> Option<Utf8Bytes> {
        match self.json {
            FrameText::Plain(json) => Some(json),
            FrameText::Packed(packed) => {
                let unpacked = snap::raw::Decoder::new()
                    .decompress_vec(&packed)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| String::from_utf8(bytes).map_err(|e| e.to_string()));
                match unpacked {
                    Ok(json) => Some(json.into()),
                    Err(error) => {
                        tracing::error!(
                            message = "A stored frame did not unpack; skipped.",
                            service = %self.service, t = self.t, %error,
                        );
                        None
                    }
                }
            }
        }
    }
}

/// The newest second a subscriber has been sent, per frame kind and service, to skip live frames that its
/// backfill already carried; and, apart, the newest full second it was sent live of each service, to skip what it
/// already has when it reads a service's full seconds from the history again.
#[derive(Debug, Default)]
pub(crate) struct Delivered {
    newest: HashMap<(FrameKind, Arc<str>), i64>,
    live_seconds: HashMap<Arc<str>, i64>,
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

    /// Notes a full second sent live.
    pub(crate) fn note_live(&mut self, frame: &Frame) {
        if frame.kind == FrameKind::Second {
            let newest = self
                .live_seconds
                .entry(frame.service.clone())
                .or_insert(frame.t);
            *newest = (*newest).max(frame.t);
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

    /// Whether a full second read from the history again is one the subscriber has, from its backfill or live, or
    /// the correction of one it has (a correction published in that instant is the one thing this can miss).
    pub(crate) fn has_second(&self, frame: &Frame) -> bool {
        let newest = [
            self.newest
                .get(&(FrameKind::Second, frame.service.clone()))
                .copied(),
            self.live_seconds.get(&frame.service).copied(),
        ];
        newest.into_iter().flatten().any(|t| frame.t <= t)
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

    /// Full seconds sent live do not hold back a live second that comes out of order (a cluster's hand-over), but a
    /// read of the history again skips every second up to the newest sent, its corrections included.
    #[test]
    fn full_seconds_sent_live_are_skipped_only_when_the_history_is_read_again() {
        let mut delivered = Delivered::default();
        delivered.note_live(&frame(FrameKind::Second, "a", 101, false));
        delivered.note_live(&frame(FrameKind::Overview, "b", 50, false));
        let late = frame(FrameKind::Second, "a", 100, false);
        assert!(
            !delivered.already_sent(&late),
            "an out-of-order live second still goes out"
        );
        assert!(delivered.has_second(&late));
        assert!(delivered.has_second(&frame(FrameKind::Second, "a", 99, true)));
        assert!(!delivered.has_second(&frame(FrameKind::Second, "a", 102, false)));
        assert!(
            !delivered.has_second(&frame(FrameKind::Second, "b", 40, false)),
            "only full seconds are noted"
        );
        delivered.record(&[frame(FrameKind::Second, "b", 45, false)]);
        assert!(
            delivered.has_second(&frame(FrameKind::Second, "b", 45, true)),
            "the backfill's count too"
        );
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
