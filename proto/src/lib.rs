//! Strobe's wire format: the `strobe.v1` protobuf messages and the tonic client and server for the
//! agent-to-aggregator stream, generated from `strobe.proto` at build time. Hand-written beside them: the
//! HdrHistogram V2 cookie both ends check, the HTTP/2 window sizes the agent sets, [`host_pid`] (an instance's
//! default name), [`clock`], the wall-clock second arithmetic both ends share, and [`codec`], prost's codec with a snapshot's series vector sized up front.

#![allow(unreachable_pub, clippy::all)]

/// The `strobe.v1` package.
pub mod v1 {
    tonic::include_proto!("strobe.v1");
}

pub use v1::*;

pub mod codec;

/// Cookie of an HdrHistogram V2 encoding that is not deflate-compressed (its first four bytes, big-endian): the V2
/// cookie base `0x1c849303` with `0x10` set, the flag Java's and Rust's HdrHistogram write for the ZigZag LEB128
/// encoding of the counts.
pub const HDR_V2_COOKIE: u32 = 0x1c84_9313;

/// `host-pid`: how an agent names its instance and an aggregator its cluster node when not told (`$HOSTNAME`, else
/// `/etc/hostname`, else `localhost`).
pub fn host_pid() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Whether `cookie` is a V2 encoding that is not deflate-compressed: the base, whatever bits 4..8 hold (the older
/// formats kept a word size there; V2 writers set `0x10`). The compressed cookie has another base and is refused.
pub fn is_hdr_v2_cookie(cookie: u32) -> bool {
    cookie & !0xf0 == 0x1c84_9303
}

/// HTTP/2 flow-control window of one agent connection (all its streams together), in bytes, at the agent's end
/// (the aggregator's are its `agent_connection_window` and `agent_stream_window` limits): thousands of streams may
/// share a connection, and one second's burst should not wait on window updates.
pub const HTTP2_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// HTTP/2 flow-control window of one agent stream, in bytes, at the agent's end.
pub const HTTP2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// Wall-clock second alignment, shared by both ends of the wire: a snapshot covers `[t, t + 1)` in unix seconds.
pub mod clock {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// Milliseconds since the unix epoch, now.
    pub fn unix_millis() -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(_) => 0,
        }
    }

    /// When each of a stream's newest seconds was first seen, in milliseconds (sent, on the agent; read, on the
    /// aggregator): the two ends of an answer's round trip, which bound an agent's clock offset. Bounded: past
    /// `capacity` the oldest second is forgotten, and a second older than every one kept is not noted (answers come
    /// for the newest seconds).
    #[derive(Debug, Clone)]
    pub struct FirstSeen {
        stamps: std::collections::VecDeque<(i64, i64)>,
        capacity: usize,
    }

    impl FirstSeen {
        /// Nothing seen yet; at most `capacity` seconds kept.
        pub fn new(capacity: usize) -> Self {
            Self {
                stamps: std::collections::VecDeque::with_capacity(capacity),
                capacity,
            }
        }

        /// Notes that `second` was seen at `at_ms`, unless it already was (its first sighting counts).
        pub fn note(&mut self, second: i64, at_ms: i64) {
            if self.stamps.iter().any(|(t, _)| *t == second) {
                return;
            }
            if self.stamps.len() >= self.capacity {
                let Some((oldest, _)) = self.stamps.iter().enumerate().min_by_key(|(_, (t, _))| *t)
                else {
                    return;
                };
                if self.stamps[oldest].0 > second {
                    return;
                }
                self.stamps.remove(oldest);
            }
            self.stamps.push_back((second, at_ms));
        }

        /// When `second` was first seen, if kept.
        pub fn get(&self, second: i64) -> Option<i64> {
            self.stamps
                .iter()
                .rev()
                .find(|(t, _)| *t == second)
                .map(|(_, at)| *at)
        }

        /// When `second` was first seen, if kept; forgotten.
        pub fn take(&mut self, second: i64) -> Option<i64> {
            let i = self.stamps.iter().position(|(t, _)| *t == second)?;
            self.stamps.remove(i).map(|(_, at)| at)
        }
    }

    /// The unix second that contains now.
    pub fn unix_second() -> i64 {
        unix_millis().div_euclid(1000)
    }

    /// How long until the next whole wall-clock second begins.
    pub fn until_next_second() -> Duration {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Duration::from_nanos(u64::from(1_000_000_000 - nanos))
    }

    /// A clock that is this machine's plus an offset learnt from the aggregator (shared: the shipper sets it, the
    /// window loop reads it). A fixed `skew` can be added to the local reading, to test an agent whose clock is off.
    #[derive(Debug, Clone, Default)]
    pub struct AgentClock {
        offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
        /// The newest readings of the aggregator's clock, as bounds on the offset.
        samples: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<OffsetBounds>>>,
        skew_ms: i64,
        /// The newest second of this agent the aggregator acknowledged (taken where it was stamped: a correction
        /// of the clock must not stamp a new second onto it).
        accepted_up_to: std::sync::Arc<std::sync::atomic::AtomicI64>,
        /// Set when the aggregator refused a second of this agent for now (ahead of its clock): the shipper moves
        /// such seconds itself when the clock is corrected, so the window loop may move its record of them too.
        held: std::sync::Arc<std::sync::atomic::AtomicBool>,
        /// Set once an answer of this connection's aggregator said when it read the snapshot: from then on an answer
        /// without an upper bound (its read time not kept there, or its send time not remembered here) is left
        /// out, so that slow answers alone never decide the offset as they do for an aggregator that never says.
        bounded: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    /// An offset smaller than this is left alone (network delay and jitter are in every sample).
    pub const CLOCK_TOLERANCE_MS: i64 = 500;

    /// What one answer says about the offset (the aggregator's time minus the local reading): it was stamped before
    /// it was read here, and the snapshot it answers was received there after it was sent from here, so the offset
    /// is at least `stamp - read` and at most `received - sent` (unknown when either time is not known).
    #[derive(Debug, Clone, Copy)]
    struct OffsetBounds {
        at_least: i64,
        at_most: Option<i64>,
    }

    impl AgentClock {
        /// A clock whose local reading is off by `skew_ms` (0 for a real agent).
        pub fn with_skew(skew_ms: i64) -> Self {
            Self {
                skew_ms,
                ..Self::default()
            }
        }

        /// A clock of its own with this one's skew: nothing it learns or applies is shared with this one (one per
        /// simulated agent, as each real agent has its own).
        pub fn fresh(&self) -> Self {
            Self::with_skew(self.skew_ms)
        }

        /// The local reading, ms since the epoch (the machine's clock plus any test skew).
        pub fn local_millis(&self) -> i64 {
            unix_millis().saturating_add(self.skew_ms)
        }

        /// The aggregator's time as this agent knows it, ms since the epoch.
        pub fn millis(&self) -> i64 {
            self.local_millis()
                .saturating_add(self.offset_ms.load(std::sync::atomic::Ordering::Relaxed))
        }

        /// The second that contains now, on the aggregator's clock.
        pub fn unix_second(&self) -> i64 {
            self.millis().div_euclid(1000)
        }

        /// How long until the next second begins, on the aggregator's clock.
        pub fn until_next_second(&self) -> Duration {
            let into = u64::try_from(self.millis().rem_euclid(1000)).unwrap_or(0);
            Duration::from_millis(1000 - into)
        }

        /// Notes that the aggregator acknowledged this agent's seconds up to `second`.
        pub fn note_accepted(&self, second: i64) {
            self.accepted_up_to
                .fetch_max(second, std::sync::atomic::Ordering::Relaxed);
        }

        /// Notes that the aggregator refused a second of this agent for now.
        pub fn note_held(&self) {
            self.held.store(true, std::sync::atomic::Ordering::Relaxed);
        }

        /// Whether seconds were refused for now since the last call (and forgets it).
        pub fn take_held(&self) -> bool {
            self.held.swap(false, std::sync::atomic::Ordering::Relaxed)
        }

        /// The newest second of this agent the aggregator acknowledged, if any.
        pub fn accepted_up_to(&self) -> Option<i64> {
            let second = self
                .accepted_up_to
                .load(std::sync::atomic::Ordering::Relaxed);
            (second != 0).then_some(second)
        }

        /// The offset applied now, ms.
        pub fn offset_ms(&self) -> i64 {
            self.offset_ms.load(std::sync::atomic::Ordering::Relaxed)
        }

        /// Sets the offset (the aggregator's time minus the local reading), ms.
        pub fn set_offset_ms(&self, offset: i64) {
            self.offset_ms
                .store(offset, std::sync::atomic::Ordering::Relaxed);
        }

        /// Takes the aggregator's clock readings from an answer just read: `aggregator_ms` when it was made, and
        /// `received_ms` when the snapshot it answers was received, which this agent first sent at `sent_local_ms`
        /// (its local reading then). Under load an answer can take hundreds of ms to arrive and be read, so one
        /// answer only bounds the offset (see `OffsetBounds`); over the last eight, the lower bound is the largest
        /// of theirs (the least delayed exchange, as NTP prefers), the upper the smallest. The applied offset stays
        /// while it is within [`CLOCK_TOLERANCE_MS`] of those bounds, so answers that are merely slow (a busy
        /// aggregator, a busy agent) never move it. Otherwise it becomes 0 if 0 is within the tolerance, else the
        /// lower bound (within the upper), and is returned. Readings with no upper bound at all (an older
        /// aggregator) fall back to the least delayed reading; readings that contradict each other (a clock
        /// stepped) are dropped but the newest.
        pub fn observe_aggregator(
            &self,
            aggregator_ms: i64,
            received_ms: Option<i64>,
            sent_local_ms: Option<i64>,
        ) -> Option<i64> {
            if aggregator_ms <= 0 {
                return None;
            }
            let bounds = OffsetBounds {
                at_least: aggregator_ms.saturating_sub(self.local_millis()),
                at_most: received_ms
                    .filter(|r| *r > 0)
                    .zip(sent_local_ms)
                    .map(|(received, sent)| received.saturating_sub(sent)),
            };
            let mut samples = self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // An aggregator that says when it read the snapshot gives upper bounds; an answer of it without one
            // (a second this agent no longer remembers sending, after a long backlog or a replay) says too little.
            if received_ms.is_some_and(|r| r > 0) {
                self.bounded
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if bounds.at_most.is_none() && self.bounded.load(std::sync::atomic::Ordering::Relaxed) {
                return None;
            }
            samples.push_back(bounds);
            while samples.len() > 8 {
                samples.pop_front();
            }
            if samples.len() < 3 {
                return None;
            }
            let at_least = samples.iter().map(|b| b.at_least).max().unwrap_or(0);
            let applied = self.offset_ms();
            let Some(at_most) = samples.iter().filter_map(|b| b.at_most).min() else {
                // No upper bound at all (an aggregator that does not say when it read snapshots): the least
                // delayed reading is the estimate, as before there were bounds.
                let target = if at_least.abs() <= CLOCK_TOLERANCE_MS {
                    0
                } else {
                    at_least
                };
                return ((target - applied).abs() > CLOCK_TOLERANCE_MS).then(|| {
                    self.set_offset_ms(target);
                    target
                });
            };
            if at_least > at_most.saturating_add(CLOCK_TOLERANCE_MS) {
                // Readings that contradict each other: a clock stepped (or the aggregator changed) within the
                // window. Start again from the newest.
                let newest = samples.pop_back();
                samples.clear();
                samples.extend(newest);
                return None;
            }
            let fits = |offset: i64| {
                offset >= at_least.saturating_sub(CLOCK_TOLERANCE_MS)
                    && offset <= at_most.saturating_add(CLOCK_TOLERANCE_MS)
            };
            if fits(applied) {
                return None;
            }
            let target = if fits(0) { 0 } else { at_least.min(at_most) };
            (target != applied).then(|| {
                self.set_offset_ms(target);
                target
            })
        }

        /// Forgets the readings taken so far (a new connection, perhaps to another aggregator).
        pub fn forget_readings(&self) {
            self.bounded
                .store(false, std::sync::atomic::Ordering::Relaxed);
            self.samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::clock::{AgentClock, FirstSeen};

    #[test]
    fn first_sightings_are_kept_for_the_newest_seconds() {
        let mut seen = FirstSeen::new(3);
        seen.note(10, 1_000);
        seen.note(10, 1_500); // a duplicate: the first sighting counts
        seen.note(12, 3_000);
        seen.note(11, 2_000);
        assert_eq!(seen.get(10), Some(1_000));
        seen.note(13, 4_000); // full: 10, the oldest second, goes
        assert_eq!(seen.get(10), None);
        seen.note(9, 500); // older than every second kept: not noted
        assert_eq!(seen.get(9), None);
        assert_eq!(seen.take(11), Some(2_000));
        assert_eq!(seen.take(11), None);
        assert_eq!(seen.get(13), Some(4_000));
    }

    #[test]
    fn an_agent_clock_follows_the_aggregator_once_it_is_clearly_off() {
        let aggregator = || super::clock::unix_millis();
        // 3 s ahead: answers about snapshots received 20 ms after they were sent, stamped a second later (acks
        // come at the seal) and read at once.
        let ahead = AgentClock::with_skew(3_000);
        let answer = |clock: &AgentClock| {
            let sent = clock.local_millis() - 1_020;
            let received = aggregator() - 1_000;
            clock.observe_aggregator(aggregator(), Some(received), Some(sent))
        };
        assert_eq!(answer(&ahead), None);
        assert_eq!(answer(&ahead), None);
        let offset = answer(&ahead).expect("corrected");
        assert!((offset + 3_000).abs() < 100, "{offset}");
        assert!((ahead.millis() - aggregator()).abs() < 100);
        // In step now: nothing changes.
        for _ in 0..5 {
            assert_eq!(answer(&ahead), None);
        }
        // Behind by 3 s: moved forward from the stamps alone.
        let behind = AgentClock::with_skew(-3_000);
        corrected_on_the_third(&behind, 3_000, None, None);
        assert_eq!(behind.observe_aggregator(0, None, None), None);
        // An aggregator that does not say when it read snapshots: 3 s ahead is still corrected.
        let ahead_of_old = AgentClock::with_skew(3_000);
        corrected_on_the_third(&ahead_of_old, -3_000, Some(0), Some(1));
    }

    /// Three answers from an aggregator on the right time (with `received` and `sent` as given): the first two move
    /// `clock` nowhere, the third moves it by about `expected` ms.
    fn corrected_on_the_third(
        clock: &AgentClock,
        expected: i64,
        received: Option<i64>,
        sent: Option<i64>,
    ) {
        let aggregator = super::clock::unix_millis;
        for _ in 0..2 {
            assert_eq!(clock.observe_aggregator(aggregator(), received, sent), None);
        }
        let offset = clock
            .observe_aggregator(aggregator(), received, sent)
            .expect("corrected");
        assert!((offset - expected).abs() < 100, "{offset}");
    }

    #[test]
    fn slow_answers_move_no_clock() {
        let aggregator = || super::clock::unix_millis();
        // Answers read 600-900 ms after they were made, about snapshots read there 300 ms after they were sent.
        let slow = |clock: &AgentClock, delay: i64| {
            let sent = clock.local_millis() - 1_300;
            let received = aggregator() - 1_000;
            clock.observe_aggregator(aggregator() - delay, Some(received), Some(sent))
        };
        let fine = AgentClock::default();
        for delay in [600, 900, 620, 700, 610, 840, 650, 605, 720, 880] {
            assert_eq!(slow(&fine, delay), None);
        }
        assert_eq!(fine.offset_ms(), 0);
        // An agent 3 s behind, once corrected, is not moved back by slow answers either.
        let behind = AgentClock::with_skew(-3_000);
        for _ in 0..3 {
            behind.observe_aggregator(aggregator(), None, None);
        }
        let corrected = behind.offset_ms();
        assert!((corrected - 3_000).abs() < 100, "{corrected}");
        for delay in [600, 900, 620, 700, 610, 840, 650, 605, 720, 880] {
            assert_eq!(slow(&behind, delay), None);
        }
        assert_eq!(behind.offset_ms(), corrected);
    }

    /// An aggregator that says when it read snapshots may still send an answer without it (an ack whose read time
    /// it no longer holds). Slow answers of that kind, however many, must not be taken for an aggregator that never
    /// says, whose answers alone decide the offset: under an overloaded aggregator that moved clocks by the ack
    /// delay and back (about 600 ms, every few seconds).
    #[test]
    fn slow_answers_without_their_read_time_move_no_clock_once_answers_had_it() {
        let aggregator = || super::clock::unix_millis();
        let clock = AgentClock::default();
        for _ in 0..3 {
            let sent = clock.local_millis() - 1_300;
            let received = aggregator() - 1_000;
            assert_eq!(
                clock.observe_aggregator(aggregator() - 650, Some(received), Some(sent)),
                None
            );
        }
        for delay in [600, 900, 620, 700, 610, 840, 650, 605, 720, 880] {
            assert_eq!(
                clock.observe_aggregator(aggregator() - delay, Some(0), Some(1)),
                None
            );
            assert_eq!(
                clock.observe_aggregator(aggregator() - delay, Some(aggregator()), None),
                None
            );
        }
        assert_eq!(clock.offset_ms(), 0);
        // A new connection (perhaps to an aggregator that never says) starts again from nothing.
        let ahead = AgentClock::with_skew(3_000);
        ahead.observe_aggregator(aggregator(), Some(aggregator()), Some(ahead.local_millis()));
        ahead.forget_readings();
        // Corrected from the stamps alone.
        corrected_on_the_third(&ahead, -3_000, Some(0), Some(1));
    }
}
