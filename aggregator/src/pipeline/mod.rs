//! The pipeline: from a validated snapshot to a sealed second.
//!
//! - [`shard`]: the scheduler: N tasks, each owning the services that hash to it; queue, tick, routing.
//! - [`service`]: one service's state in its shard and its transitions: a snapshot applied, a second sealed (rules,
//!   canary, publish), a correction published, the service evicted.
//! - [`windows`]: when a second is sealed, who is expected, dedup, corrections (pure).
//! - [`merge`]: the merge of one series in one split (pure).
//! - [`budget`]: the bytes a stream, and all streams, may have queued for the shards.
//! - [`replays`]: agents replaying after a reconnect, as their streams read them: what sealing waits for.

pub(crate) mod budget;
pub(crate) mod merge;
pub(crate) mod replays;
pub(crate) mod service;
pub(crate) mod shard;
pub(crate) mod windows;
