//! The aggregator's own data types: validated snapshots, series identity, splits and sealed summaries.
//! Only `ingest` and `validate` touch protobuf types; everything downstream speaks these.

use std::collections::BTreeMap;
use std::sync::Arc;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Which instances a merged cell covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    /// Every instance of the service.
    All,
    /// The instances running one version.
    Version(Arc<str>),
    /// The instances in one zone.
    Zone(Arc<str>),
}

/// A metric name with its sorted tags.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    /// Metric name.
    pub metric: Arc<str>,
    /// Tags sorted by key, keys unique.
    pub tags: Arc<[(Arc<str>, Arc<str>)]>,
}

/// One series' value from one instance for one second, validated.
#[derive(Debug, Clone)]
pub enum SeriesValue {
    /// Sum of increments within the second.
    Counter(f64),
    /// Last value within the second.
    Gauge(f64),
    /// A decoded histogram of integers; the metric's value is `recorded / scale`.
    Histogram {
        /// The decoded counts.
        hist: Box<Histogram<u64>>,
        /// Recorded integers per unit.
        scale: u32,
    },
}

/// Who sent a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Instance {
    /// Service name.
    pub service: Arc<str>,
    /// Instance id, unique within the service.
    pub id: Arc<str>,
    /// Version the instance runs.
    pub version: Arc<str>,
    /// Zone, if the agent gave one.
    pub zone: Option<Arc<str>>,
    /// Who deployed this instance's version (the identity's `deployer` label), if known.
    pub deployer: Option<Arc<str>>,
}

/// One instance's validated series for one second.
#[derive(Debug, Clone)]
pub struct InstanceSecond {
    /// Who sent it.
    pub instance: Arc<Instance>,
    /// Start of the second, unix seconds.
    pub t: i64,
    /// The series that passed validation.
    pub series: Vec<(SeriesKey, SeriesValue)>,
}

/// The statistics of one merged cell, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Stats {
    /// Counter: the sum over instances, which is the rate per second.
    Counter {
        /// Sum of the instances' deltas.
        sum: f64,
    },
    /// Gauge: the spread of the instances' last values.
    Gauge {
        /// Smallest instance value.
        min: f64,
        /// Largest instance value.
        max: f64,
        /// Mean of the instance values.
        mean: f64,
        /// Sum of the instance values.
        sum: f64,
    },
    /// Histogram: merged bucket by bucket, then read.
    Histogram {
        /// Number of recorded values.
        count: u64,
        /// Mean value.
        mean: f64,
        /// Median.
        p50: f64,
        /// 90th percentile.
        p90: f64,
        /// 99th percentile.
        p99: f64,
        /// 99.9th percentile.
        p999: f64,
        /// Largest value (within HDR precision).
        max: f64,
    },
}

/// One merged series of one sealed second, in the stream's JSON shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesSummary {
    /// Service name.
    pub service: Arc<str>,
    /// Metric name.
    pub metric: Arc<str>,
    /// Tags as a JSON object.
    pub tags: BTreeMap<Arc<str>, Arc<str>>,
    /// `null` for the merge over all versions, else the version of this split.
    pub version: Option<Arc<str>>,
    /// `null` for the merge over all zones, else the zone of this split.
    pub zone: Option<Arc<str>>,
    /// How many instances contributed.
    pub instances: u32,
    /// The merged statistics (serialised flat, with `kind`).
    #[serde(flatten)]
    pub stats: Stats,
}

/// A service's merged second, ready to publish.
#[derive(Debug, Clone)]
pub struct SealedSecond {
    /// Service name.
    pub service: Arc<str>,
    /// Start of the second, unix seconds.
    pub t: i64,
    /// True when this replaces an already published second (a late snapshot arrived).
    pub correction: bool,
    /// Every merged series: overall, by version, by zone.
    pub series: Vec<SeriesSummary>,
    /// Instances that reported, with their version and zone.
    pub instances: Vec<Arc<Instance>>,
}
