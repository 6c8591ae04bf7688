//! The pure kernels of the hot path behind a deliberately small surface, so `benches/` can measure them without
//! the crate's internal types becoming public API. Nothing in the product calls this module.

use std::sync::Arc;

use strobe_proto as pb;

use crate::ingest::validate::validate_snapshot;
use crate::limits::Limits;
use crate::model::{Instance, InstanceSecond};
use crate::pipeline::windows::{Arrivals, ServiceWindows};

pub use crate::pipeline::windows::WindowSettings;

/// Who sent a snapshot, as ingest knows it after the hello.
#[derive(Debug, Clone)]
pub struct Sender(Arc<Instance>);

impl Sender {
    /// An instance of `service` running `version` in `zone`.
    pub fn new(service: &str, id: &str, version: &str, zone: Option<&str>) -> Self {
        Self(Arc::new(Instance {
            service: service.into(),
            id: id.into(),
            version: version.into(),
            zone: zone.map(Into::into),
            deployer: None,
        }))
    }
}

/// A snapshot that passed validation, ready to merge.
#[derive(Debug, Clone)]
pub struct Validated(InstanceSecond);

impl Validated {
    /// Series kept.
    pub fn series(&self) -> usize {
        self.0.series.len()
    }
}

/// Validates one snapshot as ingest does, against the default limits, at `now_second`.
pub fn validate(snapshot: pb::Snapshot, sender: &Sender, now_second: i64) -> Option<Validated> {
    validate_snapshot(
        snapshot,
        &sender.0,
        &mut Default::default(),
        &Limits::default(),
        now_second,
    )
    .ok()
    .map(|v| Validated(v.second))
}

/// Merges every snapshot into one service's windows and seals everything; returns the series of the sealed
/// seconds (overall and split).
pub fn merge_and_seal(service: &str, settings: WindowSettings, snapshots: Vec<Validated>) -> usize {
    let mut windows = ServiceWindows::new(service.into(), settings);
    for snapshot in snapshots {
        windows.apply(snapshot.0);
    }
    windows
        .seal_ready(i64::MAX / 2, &Arrivals::default())
        .iter()
        .map(|s| s.second.series.len())
        .sum()
}
