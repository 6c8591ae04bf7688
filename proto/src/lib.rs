//! Strobe's wire format: the `strobe.v1` protobuf messages and the tonic client and server for the
//! agent-to-aggregator stream. Generated from `strobe.proto` at build time; nothing here is hand-written
//! but this comment and the re-exports.

#![allow(unreachable_pub, clippy::all)]

/// The `strobe.v1` package.
pub mod v1 {
    tonic::include_proto!("strobe.v1");
}

pub use v1::*;

/// Cookie of an uncompressed HdrHistogram V2 encoding of 8-byte counts (the first four bytes, big-endian): the V2
/// cookie base `0x1c849303` with the word size in bits 4..8, as Java's and Rust's HdrHistogram write it.
pub const HDR_V2_COOKIE: u32 = 0x1c84_9313;

/// Whether `cookie` is an uncompressed V2 encoding of any word size (the base with bits 4..8 ignored).
pub fn is_hdr_v2_cookie(cookie: u32) -> bool {
    cookie & !0xf0 == 0x1c84_9303
}

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
}
