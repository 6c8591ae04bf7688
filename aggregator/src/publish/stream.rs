//! The live stream: a broadcast of frames and, per service, the recent frames a new subscriber is backfilled with.
//!
//! Locking: the service map is read-locked to find a service's history (write-locked once, to add it); each has its own
//! mutex, held by a publisher only to insert one frame and by a backfill only to copy that service's frame handles
//! (reference-counted, no JSON is copied). Filtering, sorting and sending a backfill happen after every lock is
//! released, so a slow or large backfill never holds up a shard's publish.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::frame::{Frame, FrameKind};

/// One service's stored frames.
#[derive(Default)]
struct ServiceHistory {
    /// Full seconds, packed (see [`Frame::packed`]).
    seconds: VecDeque<Frame>,
    /// Bytes of packed JSON in `seconds`.
    seconds_bytes: usize,
    overview: VecDeque<Frame>,
    /// Bytes of JSON in `overview`.
    overview_bytes: usize,
    /// Taken out of the service map by a prune: a publish that found it just before must store into the new one.
    gone: bool,
}

impl ServiceHistory {
    /// The overviews or the full seconds, their bytes, and the most bytes they may hold with `share` of the total:
    /// overviews at most half of it, full seconds the rest.
    fn store(
        &mut self,
        overview: bool,
        limits: &HistoryLimits,
        share: usize,
    ) -> (&mut VecDeque<Frame>, &mut usize, usize) {
        if overview {
            let cap = limits.per_service.min(share / 2);
            (&mut self.overview, &mut self.overview_bytes, cap)
        } else {
            let cap = limits
                .per_service
                .min(share.saturating_sub(self.overview_bytes));
            (&mut self.seconds, &mut self.seconds_bytes, cap)
        }
    }
}

/// How much history the hub keeps for backfill.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HistoryLimits {
    /// Seconds of frames kept per service.
    pub(crate) seconds: i64,
    /// Most bytes kept per service and kind (full seconds, overview), whichever of time and bytes binds first: a
    /// service with 50,000 series would otherwise keep gigabytes.
    pub(crate) per_service: usize,
    /// Most bytes kept by all services together: each keeps at most its equal share (of which at most half in
    /// overviews), so the history is bounded however many services there are (each keeps its newest frame of each
    /// kind, whatever its share).
    pub(crate) total: usize,
    /// Most bytes of full-second JSON one backfill sends (the newest seconds first).
    pub(crate) backfill: usize,
}

impl Default for HistoryLimits {
    /// Ten minutes, no bound in bytes.
    fn default() -> Self {
        Self {
            seconds: 600,
            per_service: usize::MAX,
            total: usize::MAX,
            backfill: usize::MAX,
        }
    }
}

/// Which full second frames a receiver hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seconds<'a> {
    /// None (an overview page).
    None,
    /// Every service's.
    All,
    /// These services' (sorted, no repeats): a dashboard's view of one service.
    Of(&'a [String]),
}

/// Most services a receiver hears full seconds of on their own broadcasts; naming more, it hears them all (and its
/// socket keeps those it wants, as every subscriber once did).
const MAX_SERVICE_FEEDS: usize = 16;

/// Broadcast plus per-service history.
///
/// Broadcasts: full second frames of every service on one, every other frame (overviews, alerts, verdicts) on
/// another, and the full frames of each service that a receiver asked for by name on one of that service's own.
/// A subscriber that wants no full frames (the overview page, by far the most common) listens to the second only and
/// is never woken for the full frames, which are as many as the overviews (one per service and second); one that
/// wants one service's (a service's view) is woken for that service's alone, and does not fall behind, losing its
/// own frames, when thousands of other services publish theirs.
pub(crate) struct LiveStream {
    live: broadcast::Sender<Frame>,
    seconds: broadcast::Sender<Frame>,
    /// Each named service's full seconds, while some receiver listens to them.
    service_seconds: RwLock<HashMap<Arc<str>, broadcast::Sender<Frame>>>,
    /// Frames a receiver may fall behind on one service's broadcast (a frame a second, and its corrections).
    service_buffer: usize,
    history: RwLock<HashMap<Arc<str>, Arc<Mutex<ServiceHistory>>>>,
    limits: HistoryLimits,
    /// Bytes of frames kept now, all services and kinds.
    held: AtomicUsize,
}

impl LiveStream {
    /// A stream keeping the history `limits` allow; subscribers may lag `buffer_frames` frames.
    pub(crate) fn new(limits: HistoryLimits, buffer_frames: usize) -> Self {
        let (live, _) = broadcast::channel(buffer_frames.max(16));
        let (seconds, _) = broadcast::channel(buffer_frames.max(16));
        Self {
            live,
            seconds,
            service_seconds: RwLock::new(HashMap::new()),
            // An eighth of the all-services buffer: 512 frames at the default, several minutes of one service (a
            // restart releases the seconds of its outage at once).
            service_buffer: (buffer_frames / 8).max(16),
            history: RwLock::new(HashMap::new()),
            limits,
            held: AtomicUsize::new(0),
        }
    }

    /// Bytes of frames kept for backfill now, all services and kinds (full seconds packed).
    pub(crate) fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The service's history (added if new), and how many services have one, read under the same lock.
    fn service_history(&self, service: &Arc<str>) -> (Arc<Mutex<ServiceHistory>>, usize) {
        {
            let services = self.history.read().unwrap_or_else(|e| e.into_inner());
            if let Some(h) = services.get(service) {
                return (h.clone(), services.len());
            }
        }
        let mut services = self.history.write().unwrap_or_else(|e| e.into_inner());
        let h = services.entry(service.clone()).or_default().clone();
        (h, services.len())
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

    /// Keeps a copy of `frame` in its service's history, among the overviews or among the seconds (packed).
    fn remember(&self, frame: &Frame, overview: bool) {
        // Packed before any lock is taken: the store's lock is held only to insert.
        let frame = if overview {
            frame.clone()
        } else {
            frame.packed()
        };
        loop {
            let (history, services) = self.service_history(&frame.service);
            let services = services.max(1);
            let mut history = history.lock().unwrap_or_else(|e| e.into_inner());
            if history.gone {
                // Pruned since it was looked up: stored there, the frame and its bytes would be lost with it.
                continue;
            }
            let (frames, bytes, cap) =
                history.store(overview, &self.limits, self.limits.total / services);
            let before = *bytes;
            keep(frames, bytes, frame, (self.limits.seconds, cap));
            self.note_held(before, *bytes);
            return;
        }
    }

    /// Moves the count of bytes held by one store's change from `before` to `after`.
    fn note_held(&self, before: usize, after: usize) {
        if after >= before {
            self.held.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.held.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Sends a frame to every subscriber connected now. Having none is normal, not an error.
    pub(crate) fn broadcast(&self, frame: Frame) {
        if frame.kind != FrameKind::Second {
            if self.live.receiver_count() > 0 {
                // Fails only when every receiver went away since the count: nobody to tell.
                self.live.send(frame).ok();
            }
            return;
        }
        {
            let services = self
                .service_seconds
                .read()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(own) = services.get(&frame.service)
                && own.receiver_count() > 0
            {
                own.send(frame.clone()).ok();
            }
        }
        if self.seconds.receiver_count() > 0 {
            self.seconds.send(frame).ok();
        }
    }

    /// A receiver of every frame broadcast from now on but full seconds, and of the full seconds `seconds` names.
    pub(crate) fn subscribe(&self, seconds: Seconds<'_>) -> LiveReceiver {
        let mut receiver = LiveReceiver {
            live: self.live.subscribe(),
            seconds: Feed::None,
        };
        self.want_seconds(&mut receiver, seconds);
        receiver
    }

    /// Copies of the stored second and overview frames of the services and kinds `stores` accepts, each service's
    /// in second order (full seconds still packed: each is unpacked as it is sent). Only the stores accepted are
    /// locked and copied.
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

    /// Listens to the full second frames `wanted` names from now on. A few services already seen are each heard on
    /// their own broadcast; more, or one not seen yet (it may start publishing any moment), on the broadcast of
    /// every service's, which a receiver then keeps while it wants any full seconds. What it listened to and still
    /// wants it keeps listening to, so nothing is lost in between, and frames waiting of what it no longer wants
    /// are dropped, except when it moves from services' own broadcasts to the one of every service's: then returns
    /// true, and frames of those services published meanwhile may be missing (read them from the history).
    pub(crate) fn want_seconds(&self, receiver: &mut LiveReceiver, wanted: Seconds<'_>) -> bool {
        let names = match wanted {
            Seconds::None => {
                receiver.seconds = Feed::None;
                return false;
            }
            Seconds::Of(names)
                if !names.is_empty()
                    && names.len() <= MAX_SERVICE_FEEDS
                    && !matches!(receiver.seconds, Feed::All(_)) =>
            {
                names
            }
            Seconds::All | Seconds::Of(_) => return self.hear_all(receiver),
        };
        let known: Vec<Arc<str>> = {
            let history = self.history.read().unwrap_or_else(|e| e.into_inner());
            names
                .iter()
                .filter_map(|name| history.get_key_value(name.as_str()).map(|(k, _)| k.clone()))
                .collect()
        };
        if known.len() < names.len() {
            return self.hear_all(receiver);
        }
        let mut had = match std::mem::replace(&mut receiver.seconds, Feed::None) {
            Feed::Services(feeds) => feeds,
            Feed::None | Feed::All(_) => Vec::new(),
        };
        let mut feeds = Vec::with_capacity(known.len());
        for service in known {
            if let Some(at) = had.iter().position(|(name, _)| *name == service) {
                feeds.push(had.swap_remove(at));
                continue;
            }
            let mut services = self
                .service_seconds
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let own = services
                .entry(service.clone())
                .or_insert_with(|| broadcast::channel(self.service_buffer).0);
            feeds.push((service, own.subscribe()));
        }
        receiver.seconds = Feed::Services(feeds);
        false
    }

    /// Makes `receiver` hear every service's full seconds; true if it moved there from services' own broadcasts.
    fn hear_all(&self, receiver: &mut LiveReceiver) -> bool {
        let moved = matches!(receiver.seconds, Feed::Services(_));
        if !matches!(receiver.seconds, Feed::All(_)) {
            receiver.seconds = Feed::All(self.seconds.subscribe());
        }
        moved
    }

    /// Services with a broadcast of their own full seconds now (tests).
    #[cfg(test)]
    fn service_feeds(&self) -> usize {
        self.service_seconds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Drops frames older than the history as of second `now`, and the services left with none: a service that
    /// went away leaves nothing behind once its history has passed. Also brings every service within its share as
    /// of now (a service that went quiet keeps what it stored under a larger share until then).
    pub(crate) fn prune(&self, now: i64) {
        let horizon = now.saturating_sub(self.limits.seconds);
        // Broadcasts of one service's full seconds that nobody listens to any more.
        self.service_seconds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, own| own.receiver_count() > 0);
        let mut services = self.history.write().unwrap_or_else(|e| e.into_inner());
        let share = self.limits.total / services.len().max(1);
        services.retain(|_, history| {
            let mut history = history.lock().unwrap_or_else(|e| e.into_inner());
            // Overviews first: the full seconds' cap is what the overviews leave.
            for overview in [true, false] {
                let (frames, size, cap) = history.store(overview, &self.limits, share);
                let before = *size;
                while frames.front().is_some_and(|f| f.t <= horizon) {
                    if let Some(old) = frames.pop_front() {
                        *size -= old.held_bytes();
                    }
                }
                trim(frames, size, cap);
                self.note_held(before, *size);
            }
            history.gone = history.seconds.is_empty() && history.overview.is_empty();
            !history.gone
        });
    }
}

/// One subscriber's end of the live stream: every frame but full seconds, and the full seconds it wants.
pub(crate) struct LiveReceiver {
    live: broadcast::Receiver<Frame>,
    seconds: Feed,
}

/// Where a receiver hears full seconds.
enum Feed {
    None,
    /// The broadcast of every service's.
    All(broadcast::Receiver<Frame>),
    /// Each named service's own broadcast (never empty).
    Services(Vec<(Arc<str>, broadcast::Receiver<Frame>)>),
}

impl LiveReceiver {
    /// The next frame of any of its broadcasts (the other frames first when several have one waiting). Frames of
    /// one broadcast come in the order they were sent; between broadcasts, in any.
    pub(crate) async fn recv(&mut self) -> Result<Frame, RecvError> {
        match &mut self.seconds {
            Feed::None => self.live.recv().await,
            Feed::All(seconds) => tokio::select! {
                biased;
                frame = self.live.recv() => frame,
                frame = seconds.recv() => frame,
            },
            // One service's view, the usual case: nothing allocated per frame.
            Feed::Services(feeds) if feeds.len() == 1 => tokio::select! {
                biased;
                frame = self.live.recv() => frame,
                frame = feeds[0].1.recv() => frame,
            },
            Feed::Services(feeds) => tokio::select! {
                biased;
                frame = self.live.recv() => frame,
                // Each `recv` is cancel safe: the ones not chosen lose nothing.
                (frame, _, _) = futures_util::future::select_all(
                    feeds.iter_mut().map(|(_, feed)| Box::pin(feed.recv())),
                ) => frame,
            },
        }
    }

    /// A frame already waiting, if any (the other frames first).
    pub(crate) fn try_recv(&mut self) -> Result<Frame, broadcast::error::TryRecvError> {
        use broadcast::error::TryRecvError;
        match self.live.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => return other,
        }
        match &mut self.seconds {
            Feed::None => Err(TryRecvError::Empty),
            Feed::All(seconds) => seconds.try_recv(),
            Feed::Services(feeds) => {
                for (_, feed) in feeds.iter_mut() {
                    match feed.try_recv() {
                        Err(TryRecvError::Empty) => {}
                        other => return other,
                    }
                }
                Err(TryRecvError::Empty)
            }
        }
    }

    /// Whether no frame waits on any of its broadcasts.
    pub(crate) fn is_empty(&self) -> bool {
        self.live.is_empty()
            && match &self.seconds {
                Feed::None => true,
                Feed::All(seconds) => seconds.is_empty(),
                Feed::Services(feeds) => feeds.iter().all(|(_, feed)| feed.is_empty()),
            }
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
    *size += frame.held_bytes();
    // Found by bisection (the frames are in second order, one per second): every publish of every service comes
    // here, and a new second, the usual case, matched no frame after a walk through all of them.
    let at = frames.partition_point(|f| f.t < frame.t);
    match frames.get_mut(at) {
        Some(slot) if slot.t == frame.t => {
            *size -= slot.held_bytes();
            *slot = frame;
        }
        _ => frames.insert(at, frame),
    }
    let newest = frames.back().map_or(0, |f| f.t);
    while frames.len() > 1
        && frames
            .front()
            .is_some_and(|f| f.t <= newest.saturating_sub(seconds))
    {
        if let Some(old) = frames.pop_front() {
            *size -= old.held_bytes();
        }
    }
    trim(frames, size, bytes);
}

/// Drops the oldest frames while they are more than one and over `bytes` together.
fn trim(frames: &mut VecDeque<Frame>, size: &mut usize, bytes: usize) {
    while frames.len() > 1 && *size > bytes {
        if let Some(old) = frames.pop_front() {
            *size -= old.held_bytes();
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
        let stream = LiveStream::new(HistoryLimits::default(), 64);
        let mut overview_only = stream.subscribe(Seconds::None);
        let mut everything = stream.subscribe(Seconds::All);
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
        stream.want_seconds(&mut overview_only, Seconds::All);
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
        stream.want_seconds(&mut overview_only, Seconds::None);
        stream.broadcast(of_kind(FrameKind::Second, 4));
        stream.broadcast(of_kind(FrameKind::Overview, 4));
        assert_eq!(drain(&mut overview_only), [(FrameKind::Overview, 4)]);
    }

    /// A receiver of a few named services' full seconds hears them on those services' own broadcasts: no other
    /// service's, and it does not fall behind (losing its own) under a flood of other services' full seconds that
    /// overruns the broadcast of every service's. Naming a service not seen yet, it hears every service's; moving
    /// from named broadcasts to every service's is said (frames may have been missed), and once hearing every
    /// service's it stays there. Broadcasts nobody listens to go at the next prune.
    #[test]
    fn a_receiver_of_named_services_hears_their_full_seconds_alone() {
        let stream = LiveStream::new(HistoryLimits::default(), 64);
        let second = |service: &str, t| Frame {
            service: service.into(),
            ..frame(t, 10)
        };
        stream.publish_second(second("a", 1), None);
        stream.publish_second(second("b", 1), None);
        let a = ["a".to_owned()];
        let mut one = stream.subscribe(Seconds::Of(&a));
        let mut all = stream.subscribe(Seconds::All);
        assert_eq!(stream.service_feeds(), 1);
        for t in 2..500 {
            stream.broadcast(second("b", t));
            if t % 100 == 0 {
                stream.broadcast(second("a", t));
            }
        }
        let heard: Vec<(String, i64)> = std::iter::from_fn(|| one.try_recv().ok())
            .map(|f| (f.service.to_string(), f.t))
            .collect();
        assert_eq!(
            heard,
            [100, 200, 300, 400].map(|t| ("a".to_owned(), t)),
            "a's alone, none lost"
        );
        assert!(one.is_empty());
        assert!(
            matches!(
                all.try_recv(),
                Err(broadcast::error::TryRecvError::Lagged(_))
            ),
            "the broadcast of every service's was overrun"
        );
        let c = ["c".to_owned()];
        let mut unseen = stream.subscribe(Seconds::Of(&c));
        assert_eq!(
            stream.service_feeds(),
            1,
            "no broadcast for a service not seen"
        );
        stream.broadcast(second("c", 1));
        assert_eq!(
            unseen.try_recv().map(|f| f.service.to_string()).ok(),
            Some("c".to_owned())
        );
        let both = ["a".to_owned(), "b".to_owned()];
        assert!(!stream.want_seconds(&mut one, Seconds::Of(&both)));
        assert_eq!(stream.service_feeds(), 2);
        stream.broadcast(second("a", 600));
        assert!(
            stream.want_seconds(&mut one, Seconds::All),
            "moved off the named broadcasts"
        );
        assert!(
            one.try_recv().is_err(),
            "what waited on the named broadcasts is dropped (the history has it)"
        );
        assert!(!stream.want_seconds(&mut one, Seconds::Of(&a)));
        stream.broadcast(second("b", 601));
        assert_eq!(
            one.try_recv().map(|f| (f.service.to_string(), f.t)).ok(),
            Some(("b".to_owned(), 601)),
            "once hearing every service's, it keeps hearing them (its socket keeps those it wants)"
        );
        drop((one, unseen));
        stream.prune(0);
        assert_eq!(stream.service_feeds(), 0);
    }

    fn text(frame: Frame) -> String {
        frame.into_text().expect("unpacks").to_string()
    }

    /// A stream keeping at most `total` bytes of history in all.
    fn bounded(total: usize) -> LiveStream {
        LiveStream::new(
            HistoryLimits {
                total,
                ..HistoryLimits::default()
            },
            64,
        )
    }

    /// Noise that does not compress, `len` bytes of it.
    fn noise(seed: u64, len: usize) -> String {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                char::from(b"0123456789abcdef"[(x >> 60) as usize])
            })
            .collect()
    }

    /// Full seconds are stored packed (a second's series repeat the same keys and names, so it shrinks several
    /// times), broadcast as they are, and come out of the history exactly as they went in; overviews stay plain.
    #[test]
    fn full_seconds_are_kept_packed_and_come_back_as_they_were() {
        let stream = LiveStream::new(HistoryLimits::default(), 64);
        let mut live = stream.subscribe(Seconds::All);
        let series = r#"{"instances":193,"kind":"counter","metric":"cache.hits","service":"svc","sum":10099.0,"tags":{"route":"/cart","status":"2xx"},"version":null,"zone":null}"#;
        let json = format!(
            r#"{{"type":"second","t":7,"service":"svc","series":[{}]}}"#,
            vec![series; 200].join(",")
        );
        let second = Frame {
            json: json.clone().into(),
            ..frame(7, 0)
        };
        let overview = Frame {
            json: r#"{"type":"overview"}"#.into(),
            ..of_kind(FrameKind::Overview, 7)
        };
        stream.publish_second(second, Some(overview));

        let sent = std::iter::from_fn(|| live.try_recv().ok())
            .find(|f| f.kind == FrameKind::Second)
            .expect("the second was broadcast");
        assert!(
            sent.plain().is_some_and(|j| j.as_str() == json),
            "broadcast plain, as published"
        );
        let stored = stream.stored(|_, _| true);
        let kept = stored
            .iter()
            .find(|f| f.kind == FrameKind::Second)
            .expect("the second was stored");
        assert!(kept.plain().is_none(), "stored packed");
        assert!(
            kept.held_bytes() * 4 < json.len(),
            "{} bytes kept for {}",
            kept.held_bytes(),
            json.len()
        );
        let overview = stored
            .iter()
            .find(|f| f.kind == FrameKind::Overview)
            .expect("the overview was stored");
        assert!(overview.plain().is_some(), "overviews stay plain");
        assert_eq!(
            stream.held_bytes(),
            kept.held_bytes() + overview.held_bytes()
        );
        assert!(text(kept.clone()) == json, "unpacks to what was published");
        assert!(
            text(kept.packed()) == json,
            "packing a packed frame keeps it"
        );
    }

    /// However many services there are, their histories together stay within the total: each keeps at most its
    /// equal share (overviews at most half of it), its newest frames; pruning gives every byte back.
    #[test]
    fn all_services_together_keep_at_most_the_total() {
        let total = 60_000;
        let stream = bounded(total);
        let services = ["a", "b", "c", "d"];
        for t in 0..100 {
            for (i, service) in services.iter().enumerate() {
                let seed = (t * 10 + i as i64) as u64;
                let second = Frame {
                    service: (*service).into(),
                    json: noise(seed, 1_000).into(),
                    ..frame(t, 0)
                };
                let overview = Frame {
                    service: (*service).into(),
                    json: noise(seed + 1_000_000, 400).into(),
                    ..of_kind(FrameKind::Overview, t)
                };
                stream.publish_second(second, Some(overview));
            }
        }
        let stored = stream.stored(|_, _| true);
        let held = |kind: FrameKind, service: &str| -> (usize, Vec<i64>) {
            let frames: Vec<&Frame> = stored
                .iter()
                .filter(|f| f.kind == kind && &*f.service == service)
                .collect();
            (
                frames.iter().map(|f| f.held_bytes()).sum(),
                frames.iter().map(|f| f.t).collect(),
            )
        };
        let share = total / services.len();
        let mut sum = 0;
        for service in services {
            let (overview_bytes, overview_ts) = held(FrameKind::Overview, service);
            let (second_bytes, second_ts) = held(FrameKind::Second, service);
            assert!(overview_bytes <= share / 2, "{service}: {overview_bytes}");
            assert!(
                overview_bytes + second_bytes <= share,
                "{service}: {overview_bytes} + {second_bytes} over {share}"
            );
            // Far fewer than the 100 seconds published, and the newest of them.
            assert!(second_ts.len() < 20 && second_ts.last() == Some(&99));
            assert!(overview_ts.len() < 40 && overview_ts.last() == Some(&99));
            sum += overview_bytes + second_bytes;
        }
        assert_eq!(stream.held_bytes(), sum, "the gauge counts what is held");
        stream.prune(10_000);
        assert_eq!(stream.held_bytes(), 0);
        assert!(stream.stored(|_, _| true).is_empty());
    }

    /// A service that filled a large share alone, then others that came: the prune brings it within its share of
    /// now, and the whole within the total.
    #[test]
    fn a_service_that_filled_a_larger_share_is_brought_within_its_share_at_the_prune() {
        let total = 60_000;
        let stream = bounded(total);
        let second = |service: &str, t: i64| Frame {
            service: service.into(),
            json: noise(t as u64 + service.len() as u64 * 1_000, 1_000).into(),
            ..frame(t, 0)
        };
        for t in 0..100 {
            stream.publish_second(second("alone", t), None);
        }
        assert!(stream.held_bytes() > total * 9 / 10, "it had the whole");
        for service in ["b", "cc", "ddd"] {
            stream.publish_second(second(service, 99), None);
        }
        assert!(
            stream.held_bytes() > total,
            "until the prune, over the total"
        );
        stream.prune(100);
        let stored = stream.stored(|_, _| true);
        let alone: Vec<&Frame> = stored.iter().filter(|f| &*f.service == "alone").collect();
        assert!(alone.iter().map(|f| f.held_bytes()).sum::<usize>() <= total / 4);
        assert_eq!(alone.last().map(|f| f.t), Some(99), "its newest kept");
        assert!(stream.held_bytes() <= total);
        assert_eq!(
            stream.held_bytes(),
            stored.iter().map(|f| f.held_bytes()).sum::<usize>()
        );
    }

    /// A correction replaces its second's frame, and its bytes in the count.
    #[test]
    fn a_correction_replaces_its_seconds_bytes_in_the_count() {
        let stream = LiveStream::new(HistoryLimits::default(), 64);
        for (len, correction) in [(2_000, false), (300, true), (5_000, true)] {
            let second = Frame {
                json: noise(len as u64, len).into(),
                correction,
                ..frame(5, 0)
            };
            stream.publish_second(second, None);
            let stored = stream.stored(|_, _| true);
            assert_eq!(stored.len(), 1);
            assert_eq!(stream.held_bytes(), stored[0].held_bytes());
            assert!(stored[0].text_len() == len);
        }
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
