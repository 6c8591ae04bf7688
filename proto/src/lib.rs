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
}
