//! The aggregator's own data types: validated snapshots, series identity, splits, sealed summaries, and which
//! metrics are a service's requests, errors and latency. A leaf: imports nothing of the crate. Only `ingest` touches
//! protobuf types; everything downstream speaks these.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use serde::{Deserialize, Serialize};

pub(crate) mod hdr;
pub(crate) mod table;

use hdr::CheckedV2;

/// Something each service has one of while anyone holds it (a series table, a replay book), by service name: looked
/// up once per stream or service, not per snapshot. One nobody holds is gone, and the next lookup starts another.
#[derive(Debug)]
pub(crate) struct PerService<T> {
    held: Mutex<HashMap<Arc<str>, Weak<T>>>,
}

impl<T> Default for PerService<T> {
    fn default() -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> PerService<T> {
    /// `service`'s, made by `make` if nobody holds one.
    pub(crate) fn of(&self, service: &Arc<str>, make: impl FnOnce() -> T) -> Arc<T> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(one) = held.get(service).and_then(Weak::upgrade) {
            return one;
        }
        // Forget dead entries now and then, so services that came and went do not accumulate.
        if held.len() >= 64 && held.len().is_power_of_two() {
            held.retain(|_, w| w.strong_count() > 0);
        }
        let one = Arc::new(make());
        held.insert(service.clone(), Arc::downgrade(&one));
        one
    }
}

/// Which instances a merged cell covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Split {
    /// Every instance of the service.
    All,
    /// The instances running one version.
    Version(Arc<str>),
    /// The instances in one zone.
    Zone(Arc<str>),
}

/// A metric name with its sorted tags. Its hash is computed once, when the key is built (once per series per
/// stream, thanks to the series dictionary, and then interned in the service's [`table::SeriesTable`]); equality
/// tries the pointers first.
#[derive(Debug, Clone)]
pub(crate) struct SeriesKey {
    /// Metric name.
    pub(crate) metric: Arc<str>,
    /// Tags sorted by key, keys unique.
    pub(crate) tags: Arc<[(Arc<str>, Arc<str>)]>,
    hash: u64,
}

/// The seed of series-key hashes: random per process, so hostile names cannot be chosen to collide.
fn key_hasher() -> &'static foldhash::quality::FixedState {
    static SEED: std::sync::OnceLock<foldhash::quality::FixedState> = std::sync::OnceLock::new();
    SEED.get_or_init(|| {
        use std::hash::BuildHasher;
        foldhash::quality::FixedState::with_seed(
            foldhash::quality::RandomState::default().hash_one(0u8),
        )
    })
}

impl SeriesKey {
    /// The key of `metric` with `tags` (already sorted, keys unique).
    pub(crate) fn new(metric: Arc<str>, tags: Arc<[(Arc<str>, Arc<str>)]>) -> Self {
        use std::hash::BuildHasher;
        let hash = key_hasher().hash_one((&*metric, &*tags));
        Self { metric, tags, hash }
    }

    /// The hash the key of `metric` with `tags` (sorted, keys unique) has, computed without building it (a string
    /// hashes the same borrowed as shared).
    pub(crate) fn hash_of(metric: &str, tags: &[(&str, &str)]) -> u64 {
        use std::hash::BuildHasher;
        key_hasher().hash_one((metric, tags))
    }

    /// Whether this is the key of `metric` with `tags`.
    pub(crate) fn spells(&self, metric: &str, tags: &[(&str, &str)]) -> bool {
        &*self.metric == metric
            && self.tags.len() == tags.len()
            && self
                .tags
                .iter()
                .zip(tags)
                .all(|((k, v), (key, value))| &**k == *key && &**v == *value)
    }
}

impl PartialEq for SeriesKey {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: &Arc<str>, b: &Arc<str>| Arc::ptr_eq(a, b) || a == b;
        self.hash == other.hash
            && same(&self.metric, &other.metric)
            && (Arc::ptr_eq(&self.tags, &other.tags) || self.tags == other.tags)
    }
}

impl Eq for SeriesKey {}

impl std::hash::Hash for SeriesKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for SeriesKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SeriesKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.metric, &self.tags).cmp(&(&other.metric, &other.tags))
    }
}

/// One series' value from one instance for one second, validated.
#[derive(Debug, Clone)]
pub(crate) enum SeriesValue {
    /// Sum of increments within the second.
    Counter(f64),
    /// Last value within the second.
    Gauge(f64),
    /// A checked HdrHistogram V2 encoding of integers; the metric's value is `recorded / scale`.
    Histogram {
        /// The encoding, checked and not yet decoded.
        v2: CheckedV2,
        /// Recorded integers per unit.
        scale: u32,
    },
}

/// Who sent a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Instance {
    /// Service name.
    pub(crate) service: Arc<str>,
    /// Instance id, unique within the service.
    pub(crate) id: Arc<str>,
    /// Version the instance runs.
    pub(crate) version: Arc<str>,
    /// Zone, if the agent gave one.
    pub(crate) zone: Option<Arc<str>>,
    /// Who deployed this instance's version (the identity's `deployer` label), if known.
    pub(crate) deployer: Option<Arc<str>>,
}

/// One instance's validated series for one second.
#[derive(Debug, Clone)]
pub(crate) struct InstanceSecond {
    /// Who sent it.
    pub(crate) instance: Arc<Instance>,
    /// Start of the second, unix seconds.
    pub(crate) t: i64,
    /// The series that passed validation, by their number in `table`.
    pub(crate) series: Vec<(table::SeriesId, SeriesValue)>,
    /// The service's series table the ids are from.
    pub(crate) table: Arc<table::SeriesTable>,
    /// What the agent counted about its own inputs during this second.
    pub(crate) agent: AgentCounts,
    /// Its requests and errors (the main metrics' counters, summed over tag sets), once the shard has read them;
    /// `None` when it reported neither.
    pub(crate) requests: Option<RequestCounts>,
}

/// One instance's requests and failed requests in one second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct RequestCounts {
    /// Requests.
    pub(crate) requests: f64,
    /// Failed requests.
    pub(crate) errors: f64,
}

/// An agent's own counters for one second (its inputs' health), as it reports them in each snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AgentCounts {
    /// Lines (or samples) received.
    pub(crate) lines_received: u64,
    /// Lines refused as malformed.
    pub(crate) lines_malformed: u64,
    /// Series dropped by the agent's cardinality or size limits.
    pub(crate) series_over_limit: u64,
    /// Snapshots the agent dropped from its full replay buffer.
    pub(crate) snapshots_dropped: u64,
    /// Values clamped to the histogram's range.
    pub(crate) values_clamped: u64,
}

/// The statistics of one merged cell, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum Stats {
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
pub(crate) struct SeriesSummary {
    /// Service name.
    pub(crate) service: Arc<str>,
    /// Metric name.
    pub(crate) metric: Arc<str>,
    /// Tags as a JSON object (shared by the splits of one series: one map per series, not per split).
    pub(crate) tags: Arc<BTreeMap<Arc<str>, Arc<str>>>,
    /// `null` for the merge over all versions, else the version of this split.
    pub(crate) version: Option<Arc<str>>,
    /// `null` for the merge over all zones, else the zone of this split.
    pub(crate) zone: Option<Arc<str>>,
    /// How many instances contributed.
    pub(crate) instances: u32,
    /// The merged statistics (serialised flat, with `kind`).
    #[serde(flatten)]
    pub(crate) stats: Stats,
}

/// A service's merged second, ready to publish.
#[derive(Debug, Clone)]
pub(crate) struct SealedSecond {
    /// Service name.
    pub(crate) service: Arc<str>,
    /// Start of the second, unix seconds.
    pub(crate) t: i64,
    /// True when this replaces an already published second (a late snapshot arrived).
    pub(crate) correction: bool,
    /// Every merged series: overall, by version, by zone.
    pub(crate) series: Vec<SeriesSummary>,
    /// Instances that reported, with their version and zone.
    pub(crate) instances: Vec<Arc<Instance>>,
}

/// Which metrics the overview (and the canary) read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MainMetrics {
    /// Counter of requests.
    pub requests: String,
    /// Counter of failed requests.
    pub errors: String,
    /// Histogram of request latency.
    pub latency: String,
}

impl Default for MainMetrics {
    fn default() -> Self {
        Self {
            requests: "request.count".into(),
            errors: "request.errors".into(),
            latency: "request.latency".into(),
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn summary(tags: &[(&str, &str)], version: Option<&str>, stats: Stats) -> SeriesSummary {
        SeriesSummary {
            service: "checkout".into(),
            metric: "request.latency".into(),
            tags: Arc::new(
                tags.iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            version: version.map(Into::into),
            zone: None,
            instances: 3,
            stats,
        }
    }

    #[test]
    fn a_series_summary_is_one_flat_object_with_its_kind() {
        let cases = [
            (
                summary(
                    &[("route", "/pay")],
                    Some("v2"),
                    Stats::Counter { sum: 12.5 },
                ),
                r#"{"service":"checkout","metric":"request.latency","tags":{"route":"/pay"},"version":"v2","zone":null,"instances":3,"kind":"counter","sum":12.5}"#,
            ),
            (
                summary(
                    &[],
                    None,
                    Stats::Gauge {
                        min: 1.0,
                        max: 3.0,
                        mean: 2.0,
                        sum: 6.0,
                    },
                ),
                r#"{"service":"checkout","metric":"request.latency","tags":{},"version":null,"zone":null,"instances":3,"kind":"gauge","min":1.0,"max":3.0,"mean":2.0,"sum":6.0}"#,
            ),
            (
                summary(
                    &[("a", "1"), ("b", "2")],
                    None,
                    Stats::Histogram {
                        count: 40,
                        mean: 10.25,
                        p50: 9.0,
                        p90: 15.0,
                        p99: 20.0,
                        p999: 21.0,
                        max: f64::NAN,
                    },
                ),
                r#"{"service":"checkout","metric":"request.latency","tags":{"a":"1","b":"2"},"version":null,"zone":null,"instances":3,"kind":"histogram","count":40,"mean":10.25,"p50":9.0,"p90":15.0,"p99":20.0,"p999":21.0,"max":null}"#,
            ),
        ];
        for (summary, json) in cases {
            assert_eq!(serde_json::to_string(&summary).unwrap(), json);
            // A value of its own too (the REST API's path).
            assert_eq!(
                serde_json::to_value(&summary).unwrap(),
                serde_json::from_str::<serde_json::Value>(json).unwrap()
            );
            assert_eq!(
                serde_json::to_string(&summary.stats).unwrap(),
                json.split_once(r#""instances":3,"#)
                    .map(|(_, stats)| format!("{{{stats}"))
                    .unwrap()
            );
        }
    }
}
