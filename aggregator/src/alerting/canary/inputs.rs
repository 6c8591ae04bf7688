//! The numbers the canary compares, and the overview shows: per version (and for the whole service), the instances,
//! requests and errors of one second and its latency. One extraction serves both; `L` is how latency is carried
//! (the merged histogram for the canary, its quantiles for the overview). Pure.

use std::collections::BTreeMap;
use std::sync::Arc;

use hdrhistogram::Histogram;

use crate::model::hdr::HdrAccumulator;
use crate::model::{Instance, MainMetrics};

/// One series of a second, as the extraction sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SeriesNumber<L> {
    /// A counter's sum over instances.
    Counter(f64),
    /// A histogram with data.
    Latency(L),
    /// Anything else (gauges, empty histograms).
    Other,
}

/// One series of a second: its version split (`None` = the whole service), metric, whether it is untagged, value.
pub(crate) type SeriesItem<'a, L> = (Option<&'a Arc<str>>, &'a str, bool, SeriesNumber<L>);

/// One version's (or the whole service's) numbers in one second.
#[derive(Debug, Clone)]
pub(crate) struct VersionNumbers<L> {
    /// Instances that reported.
    pub(crate) instances: u32,
    /// Requests (the requests counter, summed over tag sets).
    pub(crate) requests: f64,
    /// Failed requests.
    pub(crate) errors: f64,
    /// The untagged latency series.
    pub(crate) latency: Option<L>,
    /// The `deployer` label of one of its instances.
    pub(crate) deployer: Option<Arc<str>>,
    /// Each instance's own requests and errors, where the pipeline counted them (the canary looks for shocks of
    /// single instances in them).
    pub(crate) per_instance: Vec<InstanceCounts>,
}

/// One instance's requests and errors in one second.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InstanceCounts {
    /// The instance.
    pub(crate) id: Arc<str>,
    /// Requests it served.
    pub(crate) requests: f64,
    /// Requests that failed.
    pub(crate) errors: f64,
}

impl<L> Default for VersionNumbers<L> {
    fn default() -> Self {
        Self {
            instances: 0,
            requests: 0.0,
            errors: 0.0,
            latency: None,
            deployer: None,
            per_instance: Vec::new(),
        }
    }
}

/// What the canary keeps of one version's second: the latency histogram is its own copy.
pub(crate) type VersionSecond = VersionNumbers<(Histogram<u64>, u32)>;

/// Each version's numbers (and, under `None`, the whole service's) from a second's instances and series.
pub(crate) fn per_version<'a, L>(
    instances: &[Arc<Instance>],
    series: impl IntoIterator<Item = SeriesItem<'a, L>>,
    metrics: &MainMetrics,
) -> BTreeMap<Option<Arc<str>>, VersionNumbers<L>> {
    let mut rows: BTreeMap<Option<Arc<str>>, VersionNumbers<L>> = BTreeMap::new();
    rows.insert(None, VersionNumbers::default());
    for instance in instances {
        rows.entry(None).or_default().instances += 1;
        let row = rows.entry(Some(instance.version.clone())).or_default();
        row.instances += 1;
        if row.deployer.is_none() {
            row.deployer = instance.deployer.clone();
        }
    }
    for (version, metric, untagged, value) in series {
        let row = rows.entry(version.cloned()).or_default();
        match value {
            SeriesNumber::Counter(sum) if metric == metrics.requests => row.requests += sum,
            SeriesNumber::Counter(sum) if metric == metrics.errors => row.errors += sum,
            SeriesNumber::Latency(latency) if untagged && metric == metrics.latency => {
                row.latency = Some(latency);
            }
            _ => {}
        }
    }
    rows
}

/// Per-version numbers whose latency still points into the second's merged cells.
pub(crate) type BorrowedRows<'a> =
    BTreeMap<Option<Arc<str>>, VersionNumbers<(&'a HdrAccumulator, u32)>>;

/// The canary's view: versions only, each latency histogram built from the second's merged counts.
pub(crate) fn version_seconds(rows: BorrowedRows<'_>) -> BTreeMap<Arc<str>, VersionSecond> {
    rows.into_iter()
        .filter_map(|(version, row)| {
            Some((
                version?,
                VersionSecond {
                    instances: row.instances,
                    requests: row.requests,
                    errors: row.errors,
                    latency: row.latency.map(|(acc, scale)| (acc.to_histogram(), scale)),
                    deployer: row.deployer,
                    per_instance: row.per_instance,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, version: &str, deployer: Option<&str>) -> Arc<Instance> {
        Arc::new(Instance {
            service: "svc".into(),
            id: id.into(),
            version: version.into(),
            zone: None,
            deployer: deployer.map(Into::into),
        })
    }

    #[test]
    fn splits_requests_errors_and_untagged_latency_by_version() {
        let metrics = MainMetrics::default();
        let v1: Arc<str> = "v1".into();
        let v2: Arc<str> = "v2".into();
        let instances = [
            instance("a", "v1", None),
            instance("b", "v1", None),
            instance("c", "v2", Some("alice")),
        ];
        let series: Vec<SeriesItem<'_, u32>> = vec![
            (None, "request.count", false, SeriesNumber::Counter(30.0)),
            (
                Some(&v1),
                "request.count",
                false,
                SeriesNumber::Counter(10.0),
            ),
            (
                Some(&v1),
                "request.count",
                true,
                SeriesNumber::Counter(10.0),
            ),
            (
                Some(&v2),
                "request.count",
                true,
                SeriesNumber::Counter(10.0),
            ),
            (
                Some(&v2),
                "request.errors",
                true,
                SeriesNumber::Counter(4.0),
            ),
            (Some(&v2), "request.latency", true, SeriesNumber::Latency(7)),
            (
                Some(&v1),
                "request.latency",
                false,
                SeriesNumber::Latency(9),
            ),
            (Some(&v1), "queue.depth", true, SeriesNumber::Counter(99.0)),
        ];
        let rows = per_version(&instances, series, &metrics);
        let all = &rows[&None];
        assert_eq!((all.instances, all.requests), (3, 30.0));
        let r1 = &rows[&Some(v1.clone())];
        assert_eq!((r1.instances, r1.requests, r1.errors), (2, 20.0, 0.0));
        assert_eq!(
            r1.latency, None,
            "a tagged latency series is not the main one"
        );
        let r2 = &rows[&Some(v2.clone())];
        assert_eq!(
            (r2.instances, r2.requests, r2.errors, r2.latency),
            (1, 10.0, 4.0, Some(7))
        );
        assert_eq!(r2.deployer.as_deref(), Some("alice"));
    }
}
