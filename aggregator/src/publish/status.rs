//! The service-status registry behind `/api/v1/services` and `/api/v1/series`: per service, the newest sealed
//! second, its instances, and each version's first and last second. Written by shards on every live seal, read by
//! the API; one `RwLock`, never held across anything but the update or a copy.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;

use crate::model::SealedSecond;

/// What the API says about a service.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ServiceStatus {
    /// Service name.
    pub(crate) service: Arc<str>,
    /// Newest sealed second.
    pub(crate) last_second: i64,
    /// Instances that reported the newest sealed second.
    pub(crate) instances: Vec<InstanceStatus>,
    /// Versions seen: instances in the newest second and the first second each version reported.
    pub(crate) versions: BTreeMap<Arc<str>, VersionStatus>,
    /// The newest sealed second's frame, shared with the stream (read by `/api/v1/series`).
    #[serde(skip)]
    pub(crate) latest: Utf8Bytes,
}

/// One instance in the newest sealed second.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct InstanceStatus {
    /// Instance id.
    pub(crate) id: Arc<str>,
    /// Version.
    pub(crate) version: Arc<str>,
    /// Zone, if any.
    pub(crate) zone: Option<Arc<str>>,
}

/// One version of a service.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct VersionStatus {
    /// Instances running it in the newest sealed second.
    pub(crate) instances: u32,
    /// The first second it reported, as seen by this aggregator.
    pub(crate) first_seen: i64,
    /// The newest second it reported.
    pub(crate) last_seen: i64,
}

/// Every service's status.
pub(crate) struct StatusRegistry {
    services: RwLock<BTreeMap<Arc<str>, ServiceStatus>>,
    /// Versions not seen for this long are forgotten.
    version_memory_seconds: i64,
}

impl StatusRegistry {
    pub(crate) fn new(version_memory_seconds: i64) -> Self {
        Self {
            services: RwLock::new(BTreeMap::new()),
            version_memory_seconds,
        }
    }

    /// Each version's first second, as known now.
    pub(crate) fn first_seen(&self, service: &str) -> BTreeMap<Arc<str>, i64> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        services.get(service).map(first_seen).unwrap_or_default()
    }

    /// Updates the service's status with a live sealed second; returns each version's first second.
    pub(crate) fn update(
        &self,
        sealed: &SealedSecond,
        frame: &Utf8Bytes,
    ) -> BTreeMap<Arc<str>, i64> {
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        let status = services
            .entry(sealed.service.clone())
            .or_insert_with(|| ServiceStatus {
                service: sealed.service.clone(),
                last_second: sealed.t,
                instances: Vec::new(),
                versions: BTreeMap::new(),
                latest: frame.clone(),
            });
        status.last_second = sealed.t;
        status.instances = sealed
            .instances
            .iter()
            .map(|i| InstanceStatus {
                id: i.id.clone(),
                version: i.version.clone(),
                zone: i.zone.clone(),
            })
            .collect();
        status.latest = frame.clone();
        for v in status.versions.values_mut() {
            v.instances = 0;
        }
        for instance in &sealed.instances {
            let v = status
                .versions
                .entry(instance.version.clone())
                .or_insert(VersionStatus {
                    instances: 0,
                    first_seen: sealed.t,
                    last_seen: sealed.t,
                });
            v.instances += 1;
            v.last_seen = sealed.t;
        }
        let horizon = sealed.t.saturating_sub(self.version_memory_seconds);
        status.versions.retain(|_, v| v.last_seen > horizon);
        first_seen(status)
    }

    /// Every service's status.
    pub(crate) fn all(&self) -> Vec<ServiceStatus> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        services.values().cloned().collect()
    }

    /// Forgets services that sealed nothing in the last `version_memory_seconds` before second `now`.
    pub(crate) fn prune(&self, now: i64) {
        let horizon = now.saturating_sub(self.version_memory_seconds);
        let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
        services.retain(|_, status| status.last_second > horizon);
    }

    /// One service's status.
    pub(crate) fn get(&self, name: &str) -> Option<ServiceStatus> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        services.get(name).cloned()
    }
}

/// Each version's first second.
fn first_seen(status: &ServiceStatus) -> BTreeMap<Arc<str>, i64> {
    status
        .versions
        .iter()
        .map(|(v, st)| (v.clone(), st.first_seen))
        .collect()
}
