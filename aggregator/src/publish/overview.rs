//! The overview: one summary per service and version per second (request rate, error ratio, p50/p99 of the main
//! latency metric, instances), what a wall of service tiles needs. Pure.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::alerting::canary::inputs::{SeriesNumber, per_version};
use crate::model::{MainMetrics, SealedSecond, Stats};

/// One service (`version: null`) or one of its versions in one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct VersionSummary {
    /// `null` for the whole service.
    pub(crate) version: Option<Arc<str>>,
    /// Instances that reported the second.
    pub(crate) instances: u32,
    /// Requests in the second (summed over tag sets).
    pub(crate) rate: f64,
    /// Failed requests in the second (summed over tag sets).
    pub(crate) errors: f64,
    /// `errors / rate`, or `null` without requests.
    pub(crate) error_ratio: Option<f64>,
    /// Median latency of the untagged latency series.
    pub(crate) p50: Option<f64>,
    /// 99th percentile latency of the untagged latency series.
    pub(crate) p99: Option<f64>,
    /// First second this version reported (versions only).
    pub(crate) first_seen: Option<i64>,
}

/// The overview frame of one service's second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Overview {
    /// Always `overview`.
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    /// The second.
    pub(crate) t: i64,
    /// The service.
    pub(crate) service: Arc<str>,
    /// Whether it replaces an already sent overview of this second.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) correction: bool,
    /// When the aggregator published it, ms since the unix epoch (a client's seal -> screen latency is its arrival
    /// minus this, on a clock shared with the aggregator).
    pub(crate) published_ms: i64,
    /// The whole service first, then each version in name order.
    pub(crate) versions: Vec<VersionSummary>,
}

/// Summarises a sealed second published at `published_ms`; `first_seen` gives each version's first second. The numbers come from the same
/// extraction the canary reads ([`per_version`]), so a tile and a verdict never disagree on what was counted.
pub(crate) fn summarize(
    sealed: &SealedSecond,
    metrics: &MainMetrics,
    first_seen: &BTreeMap<Arc<str>, i64>,
    published_ms: i64,
) -> Overview {
    let series = sealed.series.iter().filter(|s| s.zone.is_none()).map(|s| {
        let value = match &s.stats {
            Stats::Counter { sum } => SeriesNumber::Counter(*sum),
            Stats::Histogram {
                count, p50, p99, ..
            } if *count > 0 => SeriesNumber::Latency((*p50, *p99)),
            _ => SeriesNumber::Other,
        };
        (s.version.as_ref(), &*s.metric, s.tags.is_empty(), value)
    });
    let versions = per_version(&sealed.instances, series, metrics)
        .into_iter()
        .map(|(version, row)| VersionSummary {
            instances: row.instances,
            rate: row.requests,
            errors: row.errors,
            error_ratio: (row.requests > 0.0).then(|| row.errors / row.requests),
            p50: row.latency.map(|(p50, _)| p50),
            p99: row.latency.map(|(_, p99)| p99),
            first_seen: version.as_ref().and_then(|v| first_seen.get(v).copied()),
            version,
        })
        .collect();
    Overview {
        kind: "overview",
        t: sealed.t,
        service: sealed.service.clone(),
        correction: sealed.correction,
        published_ms,
        versions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Instance, SeriesSummary};

    #[test]
    fn sums_counters_over_tags_and_reads_untagged_latency_per_version() {
        let series = |metric: &str, version: Option<&str>, tags: &[(&str, &str)], stats: Stats| {
            SeriesSummary {
                service: "svc".into(),
                metric: metric.into(),
                tags: Arc::new(
                    tags.iter()
                        .map(|(k, v)| (Arc::from(*k), Arc::from(*v)))
                        .collect(),
                ),
                version: version.map(Into::into),
                zone: None,
                instances: 1,
                stats,
            }
        };
        let hist = |p50, p99| Stats::Histogram {
            count: 10,
            mean: p50,
            p50,
            p90: p99,
            p99,
            p999: p99,
            max: p99,
        };
        let instance = |id: &str, v: &str| {
            Arc::new(Instance {
                service: "svc".into(),
                id: id.into(),
                version: v.into(),
                zone: None,
                deployer: None,
            })
        };
        let sealed = SealedSecond {
            service: "svc".into(),
            t: 50,
            correction: false,
            series: vec![
                series(
                    "request.count",
                    None,
                    &[("route", "/a")],
                    Stats::Counter { sum: 60.0 },
                ),
                series(
                    "request.count",
                    None,
                    &[("route", "/b")],
                    Stats::Counter { sum: 40.0 },
                ),
                series("request.errors", None, &[], Stats::Counter { sum: 5.0 }),
                series("request.latency", None, &[], hist(10.0, 90.0)),
                series("request.latency", None, &[("route", "/a")], hist(1.0, 1.0)),
                series(
                    "request.count",
                    Some("v2"),
                    &[],
                    Stats::Counter { sum: 20.0 },
                ),
                series(
                    "request.errors",
                    Some("v2"),
                    &[],
                    Stats::Counter { sum: 4.0 },
                ),
                series("request.latency", Some("v2"), &[], hist(30.0, 300.0)),
            ],
            instances: vec![
                instance("a", "v1"),
                instance("b", "v1"),
                instance("c", "v2"),
            ],
        };
        let first_seen = BTreeMap::from([(Arc::from("v2"), 45)]);
        let o = summarize(&sealed, &MainMetrics::default(), &first_seen, 1_234);
        assert_eq!(o.versions.len(), 3);
        let all = &o.versions[0];
        assert_eq!(
            (all.version.clone(), all.instances, all.rate, all.errors),
            (None, 3, 100.0, 5.0)
        );
        assert_eq!(
            (all.error_ratio, all.p50, all.p99),
            (Some(0.05), Some(10.0), Some(90.0))
        );
        let v1 = &o.versions[1];
        assert_eq!(
            (v1.version.as_deref(), v1.instances, v1.error_ratio, v1.p99),
            (Some("v1"), 2, None, None)
        );
        let v2 = &o.versions[2];
        assert_eq!(
            (v2.error_ratio, v2.p99, v2.first_seen),
            (Some(0.2), Some(300.0), Some(45))
        );
    }
}
