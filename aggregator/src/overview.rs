//! The overview: one summary per service and version per second (request rate, error ratio, p50/p99 of the main
//! latency metric, instances), what a wall of service tiles needs. Pure.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{SealedSecond, Stats};

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

/// One service (`version: null`) or one of its versions in one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VersionSummary {
    /// `null` for the whole service.
    pub version: Option<Arc<str>>,
    /// Instances that reported the second.
    pub instances: u32,
    /// Requests in the second (summed over tag sets).
    pub rate: f64,
    /// Failed requests in the second (summed over tag sets).
    pub errors: f64,
    /// `errors / rate`, or `null` without requests.
    pub error_ratio: Option<f64>,
    /// Median latency of the untagged latency series.
    pub p50: Option<f64>,
    /// 99th percentile latency of the untagged latency series.
    pub p99: Option<f64>,
    /// First second this version reported (versions only).
    pub first_seen: Option<i64>,
}

/// The overview frame of one service's second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overview {
    /// Always `overview`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The second.
    pub t: i64,
    /// The service.
    pub service: Arc<str>,
    /// Whether it replaces an already sent overview of this second.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub correction: bool,
    /// The whole service first, then each version in name order.
    pub versions: Vec<VersionSummary>,
}

/// Summarises a sealed second; `first_seen` gives each version's first second.
pub fn summarize(
    sealed: &SealedSecond,
    metrics: &MainMetrics,
    first_seen: &BTreeMap<Arc<str>, i64>,
) -> Overview {
    let mut rows: BTreeMap<Option<Arc<str>>, VersionSummary> = BTreeMap::new();
    rows.insert(None, VersionSummary::default());
    for instance in &sealed.instances {
        rows.entry(None).or_default().instances += 1;
        rows.entry(Some(instance.version.clone()))
            .or_default()
            .instances += 1;
    }
    for s in sealed.series.iter().filter(|s| s.zone.is_none()) {
        let row = rows.entry(s.version.clone()).or_default();
        match &s.stats {
            Stats::Counter { sum } if *s.metric == *metrics.requests => row.rate += sum,
            Stats::Counter { sum } if *s.metric == *metrics.errors => row.errors += sum,
            Stats::Histogram {
                count, p50, p99, ..
            } if *s.metric == *metrics.latency && s.tags.is_empty() && *count > 0 => {
                row.p50 = Some(*p50);
                row.p99 = Some(*p99);
            }
            _ => {}
        }
    }
    let versions = rows
        .into_iter()
        .map(|(version, mut row)| {
            row.error_ratio = (row.rate > 0.0).then(|| row.errors / row.rate);
            row.first_seen = version.as_ref().and_then(|v| first_seen.get(v).copied());
            row.version = version;
            row
        })
        .collect();
    Overview {
        kind: "overview",
        t: sealed.t,
        service: sealed.service.clone(),
        correction: sealed.correction,
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
                tags: tags
                    .iter()
                    .map(|(k, v)| (Arc::from(*k), Arc::from(*v)))
                    .collect(),
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
        let o = summarize(&sealed, &MainMetrics::default(), &first_seen);
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
