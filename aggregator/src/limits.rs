//! Bounds on what agents and browsers may send or cost, each a named value with a default. A leaf: the validator
//! and the stores read it, and it imports nothing of the crate.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bounds on what agents and browsers may send or cost. Data past a bound is dropped and counted, with a reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most series in one snapshot; the rest are dropped and reported.
    pub max_series_per_snapshot: usize,
    /// Most tags on one series.
    pub max_tags_per_series: usize,
    /// Longest metric name, tag key or tag value, and identity field, in bytes.
    pub max_name_bytes: usize,
    /// Most significant digits a histogram may declare (memory grows tenfold per digit).
    pub max_histogram_sigfig: u8,
    /// Largest highest-trackable value a histogram may declare.
    pub max_histogram_value: u64,
    /// Largest histogram scale (recorded integers per unit).
    pub max_histogram_scale: u32,
    /// How far in the future a snapshot's second may be.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Most series one agent stream may name in its series dictionary.
    pub max_series_per_stream: usize,
    /// How old a snapshot's second may be (an agent replays at most this much after an outage; older is refused).
    #[serde(with = "humantime_serde")]
    pub max_snapshot_age: Duration,
    /// Most bytes of merged state (cells and histogram counts) one service may hold in its open and recent seconds,
    /// checked before allocating: a histogram reaching to the largest values, sent for thousands of series and
    /// seconds, would otherwise take gigabytes. Past it, series are dropped and counted.
    pub max_decoded_bytes_per_service: usize,
    /// Bytes of merged state all services together may hold (their open and recent seconds), checked like
    /// `max_decoded_bytes_per_service`: what bounds the aggregator's memory for merging whatever the number of
    /// services. Past it, series are dropped and counted.
    pub max_decoded_bytes: usize,
    /// HTTP/2 receive window of one agent connection (all its streams), in bytes: what the aggregator may hold
    /// of a connection's data not yet read (a stream waiting for its queue share, say).
    pub agent_connection_window: u32,
    /// HTTP/2 receive window of one agent stream, in bytes. A message larger than it still arrives, in steps. A
    /// stream waiting for its queue share holds up to this much of its connection's window unread, so it is kept
    /// below the connection's (at 256 KiB, 10,000 agents over 16 connections stalled: see the README).
    pub agent_stream_window: u32,
    /// Largest message a websocket client may send (subscriptions are small); larger ones close its connection.
    pub max_websocket_message_bytes: usize,
    /// Most services one websocket subscription may name.
    pub max_subscribed_services: usize,
    /// Most websocket clients at once, in all...
    pub max_websocket_clients: usize,
    /// ...and from one IP address; more are answered 503.
    pub max_websocket_clients_per_address: usize,
    /// How often the aggregator pings each agent connection (HTTP/2); one that does not answer within as long again
    /// is closed, so a vanished agent's streams end and free their queue share.
    #[serde(with = "humantime_serde")]
    pub agent_keepalive: Duration,
    /// Most distinct series one service may have (all instances together, for as long as any of its streams or
    /// recent seconds lives): its cardinality limit. New series past it are dropped and counted.
    pub max_series_per_service: usize,
    /// Bytes of backfill kept per service (full frames, compressed; the overview separately), on top of the
    /// `history` time.
    pub max_history_bytes_per_service: usize,
    /// Bytes of backfill kept by all services together: each keeps at most its equal share (at most half of it in
    /// overviews), so the history's memory does not grow with the number of services (past each service's newest
    /// frame of each kind, which it keeps whatever its share).
    pub max_history_bytes: usize,
    /// Bytes of full-second JSON one websocket backfill sends at most: the newest seconds of the services it covers
    /// (overviews and alert states come whole).
    pub max_backfill_bytes: usize,
    /// Frames a websocket client may fall behind before it loses frames (and is told so); on the broadcast of one
    /// service's full seconds, which a client naming a few services hears, an eighth of it (at least 16).
    pub subscriber_buffer_frames: usize,
    /// Bytes of one agent stream's snapshots queued between its socket and its shard; past it, that stream waits.
    pub max_queued_bytes_per_stream: usize,
    /// Bytes of all streams' snapshots queued between the sockets and the shards; past it, streams wait.
    pub max_queued_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_series_per_snapshot: 10_000,
            max_tags_per_series: 32,
            max_name_bytes: 200,
            max_histogram_sigfig: 3,
            max_histogram_value: 1 << 53,
            max_histogram_scale: 1_000_000,
            max_future_skew: Duration::from_secs(5),
            max_series_per_stream: 100_000,
            max_snapshot_age: Duration::from_secs(600),
            max_series_per_service: 50_000,
            agent_keepalive: Duration::from_secs(10),
            max_websocket_message_bytes: 64 * 1024,
            max_subscribed_services: 1_000,
            max_websocket_clients: 10_000,
            max_websocket_clients_per_address: 256,
            max_decoded_bytes_per_service: 256 << 20,
            max_decoded_bytes: 1 << 30,
            agent_connection_window: 8 << 20,
            agent_stream_window: 1 << 20,
            max_history_bytes_per_service: 4 * 1024 * 1024,
            max_history_bytes: 256 * 1024 * 1024,
            max_backfill_bytes: 64 * 1024 * 1024,
            subscriber_buffer_frames: 4096,
            max_queued_bytes_per_stream: 4 * 1024 * 1024,
            max_queued_bytes: 256 * 1024 * 1024,
        }
    }
}
