//! Strobe's wire format: the `strobe.v1` protobuf messages and the tonic client and server for the
//! agent-to-aggregator stream, generated from `strobe.proto` at build time. Hand-written beside them: the
//! HdrHistogram V2 cookie both ends check, the HTTP/2 window sizes both ends set, and [`clock`], the wall-clock
//! second arithmetic both ends share.

#![allow(unreachable_pub, clippy::all)]

/// The `strobe.v1` package.
pub mod v1 {
    tonic::include_proto!("strobe.v1");
}

pub use v1::*;

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

/// HTTP/2 flow-control window of one agent connection (all its streams together), in bytes, on both ends:
/// thousands of streams may share a connection, and one second's burst should not wait on window updates.
pub const HTTP2_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// HTTP/2 flow-control window of one agent stream, in bytes, on both ends.
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
        /// The newest offsets the aggregator's acks showed.
        samples: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<i64>>>,
        skew_ms: i64,
        /// The newest second of this agent the aggregator acknowledged (taken where it was stamped: a correction
        /// of the clock must not stamp a new second onto it).
        accepted_up_to: std::sync::Arc<std::sync::atomic::AtomicI64>,
        /// Set when the aggregator refused a second of this agent for now (ahead of its clock): the shipper moves
        /// such seconds itself when the clock is corrected, so the window loop may move its record of them too.
        held: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    /// An offset smaller than this is left alone (network delay and jitter are in every sample).
    pub const CLOCK_TOLERANCE_MS: i64 = 500;

    impl AgentClock {
        /// A clock whose local reading is off by `skew_ms` (0 for a real agent).
        pub fn with_skew(skew_ms: i64) -> Self {
            Self {
                skew_ms,
                ..Self::default()
            }
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

        /// Takes the aggregator's clock reading from an ack just received. Each reading is the true offset minus
        /// how long the ack took to arrive and be read (which under load is hundreds of ms), so the estimate is
        /// the largest of the last eight (the least delayed, as NTP prefers the fastest exchange). When it differs
        /// from the applied offset by more than [`CLOCK_TOLERANCE_MS`], it becomes the applied one (0 when it is
        /// within the tolerance of 0), and is returned.
        pub fn observe_aggregator(&self, aggregator_ms: i64) -> Option<i64> {
            if aggregator_ms <= 0 {
                return None;
            }
            let sample = aggregator_ms.saturating_sub(self.local_millis());
            let mut samples = self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            samples.push_back(sample);
            while samples.len() > 8 {
                samples.pop_front();
            }
            if samples.len() < 3 {
                return None;
            }
            let estimate = samples.iter().copied().max().unwrap_or(0);
            let target = if estimate.abs() <= CLOCK_TOLERANCE_MS {
                0
            } else {
                estimate
            };
            let applied = self.offset_ms();
            ((target - applied).abs() > CLOCK_TOLERANCE_MS).then(|| {
                self.set_offset_ms(target);
                target
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::clock::AgentClock;

    #[test]
    fn an_agent_clock_follows_the_aggregator_once_it_is_clearly_off() {
        let clock = AgentClock::with_skew(3_000);
        let aggregator = || super::clock::unix_millis();
        assert_eq!(clock.observe_aggregator(aggregator()), None);
        assert_eq!(clock.observe_aggregator(aggregator()), None);
        let offset = clock.observe_aggregator(aggregator()).expect("corrected");
        assert!((offset + 3_000).abs() < 100, "{offset}");
        assert!((clock.millis() - aggregator()).abs() < 100);
        // In step now: nothing changes, and small disagreements are left alone.
        for _ in 0..5 {
            assert_eq!(clock.observe_aggregator(aggregator() + 50), None);
        }
        // Acks read late under load (here 300-450 ms) do not make a right clock look wrong.
        let fine = AgentClock::default();
        for delay in [300, 450, 320, 400, 310, 440, 350, 305, 420] {
            assert_eq!(fine.observe_aggregator(aggregator() - delay), None);
        }
        assert_eq!(fine.offset_ms(), 0);
        assert_eq!(fine.observe_aggregator(0), None);
    }
}
