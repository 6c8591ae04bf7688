//! The Prometheus protobuf exposition (`io.prometheus.client.MetricFamily`, length-delimited), the one format that
//! carries native histograms. The agent asks for it first and falls back to text; a page that answers with it is
//! read here into the same samples the text parser gives, plus native histograms.
//!
//! A native histogram of schema `s` has buckets at powers of `base = 2^(2^-s)`: bucket `i` holds the observations
//! in `(base^(i-1), base^i]` (negative buckets mirror it), and a zero bucket holds those within the zero threshold.
//! Each bucket's new observations are recorded at its geometric middle, `base^(i - 1/2)`: relative error at most
//! `base^(1/2) - 1` (4.4% at schema 3, client_golang's default for a bucket factor of 1.1; under HDR's 1% from
//! schema 6).

use std::collections::HashMap;

use prometheus_parse::{HistogramCount, SummaryCount, Value};
use prost::Message;

use super::PageSample;

/// The content type of the delimited protobuf exposition.
pub(super) const CONTENT_TYPE: &str = "application/vnd.google.protobuf";

/// What a scrape asks for: protobuf first (native histograms), then OpenMetrics text, then the classic text format
/// (the order Prometheus itself asks in).
pub(super) const ACCEPT: &str = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.1";

#[derive(Clone, PartialEq, Message)]
pub(super) struct MetricFamily {
    #[prost(string, optional, tag = "1")]
    pub(super) name: Option<String>,
    #[prost(int32, optional, tag = "3")]
    pub(super) r#type: Option<i32>,
    #[prost(message, repeated, tag = "4")]
    pub(super) metric: Vec<Metric>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct Metric {
    #[prost(message, repeated, tag = "1")]
    pub(super) label: Vec<LabelPair>,
    #[prost(message, optional, tag = "2")]
    pub(super) gauge: Option<Single>,
    #[prost(message, optional, tag = "3")]
    pub(super) counter: Option<Single>,
    #[prost(message, optional, tag = "4")]
    pub(super) summary: Option<Summary>,
    #[prost(message, optional, tag = "5")]
    pub(super) untyped: Option<Single>,
    #[prost(message, optional, tag = "7")]
    pub(super) histogram: Option<Histogram>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LabelPair {
    #[prost(string, optional, tag = "1")]
    pub(super) name: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub(super) value: Option<String>,
}

/// `Gauge`, `Counter` and `Untyped` share their first field, the value.
#[derive(Clone, PartialEq, Message)]
pub(super) struct Single {
    #[prost(double, optional, tag = "1")]
    pub(super) value: Option<f64>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct Summary {
    #[prost(uint64, optional, tag = "1")]
    pub(super) sample_count: Option<u64>,
    #[prost(double, optional, tag = "2")]
    pub(super) sample_sum: Option<f64>,
    #[prost(message, repeated, tag = "3")]
    pub(super) quantile: Vec<Quantile>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct Quantile {
    #[prost(double, optional, tag = "1")]
    pub(super) quantile: Option<f64>,
    #[prost(double, optional, tag = "2")]
    pub(super) value: Option<f64>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct Histogram {
    #[prost(uint64, optional, tag = "1")]
    pub(super) sample_count: Option<u64>,
    #[prost(double, optional, tag = "4")]
    pub(super) sample_count_float: Option<f64>,
    #[prost(double, optional, tag = "2")]
    pub(super) sample_sum: Option<f64>,
    #[prost(message, repeated, tag = "3")]
    pub(super) bucket: Vec<Bucket>,
    #[prost(sint32, optional, tag = "5")]
    pub(super) schema: Option<i32>,
    #[prost(double, optional, tag = "6")]
    pub(super) zero_threshold: Option<f64>,
    #[prost(uint64, optional, tag = "7")]
    pub(super) zero_count: Option<u64>,
    #[prost(double, optional, tag = "8")]
    pub(super) zero_count_float: Option<f64>,
    #[prost(message, repeated, tag = "9")]
    pub(super) negative_span: Vec<BucketSpan>,
    #[prost(sint64, repeated, tag = "10")]
    pub(super) negative_delta: Vec<i64>,
    #[prost(double, repeated, tag = "11")]
    pub(super) negative_count: Vec<f64>,
    #[prost(message, repeated, tag = "12")]
    pub(super) positive_span: Vec<BucketSpan>,
    #[prost(sint64, repeated, tag = "13")]
    pub(super) positive_delta: Vec<i64>,
    #[prost(double, repeated, tag = "14")]
    pub(super) positive_count: Vec<f64>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct Bucket {
    #[prost(uint64, optional, tag = "1")]
    pub(super) cumulative_count: Option<u64>,
    #[prost(double, optional, tag = "4")]
    pub(super) cumulative_count_float: Option<f64>,
    #[prost(double, optional, tag = "2")]
    pub(super) upper_bound: Option<f64>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct BucketSpan {
    #[prost(sint32, optional, tag = "1")]
    pub(super) offset: Option<i32>,
    #[prost(uint32, optional, tag = "2")]
    pub(super) length: Option<u32>,
}

const COUNTER: i32 = 0;
const GAUGE: i32 = 1;
const SUMMARY: i32 = 2;
const HISTOGRAM: i32 = 4;
const GAUGE_HISTOGRAM: i32 = 5;

/// Most buckets one native histogram may name (a hostile page could name billions with one span).
const MAX_NATIVE_BUCKETS: u64 = 10_000;

/// One native histogram of a page, its buckets as absolute (cumulative since the process started) counts.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Native {
    pub(super) name: String,
    pub(super) labels: Vec<(String, String)>,
    schema: i32,
    zero: f64,
    /// (bucket index, count), positive and negative.
    positive: Vec<(i32, f64)>,
    negative: Vec<(i32, f64)>,
}

impl Native {
    /// The same counts at the coarser `schema` (buckets are upper-inclusive: bucket `i` goes to `ceil(i / 2^d)`).
    fn downscale(&self, schema: i32) -> Native {
        let d = (self.schema - schema).clamp(0, 30);
        let merge = |side: &[(i32, f64)]| {
            let mut out: std::collections::BTreeMap<i32, f64> = std::collections::BTreeMap::new();
            for &(i, n) in side {
                let to = ((i64::from(i) + (1i64 << d) - 1) >> d) as i32;
                *out.entry(to).or_default() += n;
            }
            out.into_iter().collect()
        };
        Native {
            name: self.name.clone(),
            labels: self.labels.clone(),
            schema: schema.min(self.schema),
            zero: self.zero,
            positive: merge(&self.positive),
            negative: merge(&self.negative),
        }
    }

    /// The observations since `before` (the same series' previous scrape), bucket by bucket: the previous counts
    /// are first merged down to this schema (client_golang lowers it when a histogram has too many buckets); a count
    /// lower than before, or a finer schema, is a restart (all of these are new).
    pub(super) fn since(&self, before: &Native) -> Native {
        if self.schema > before.schema {
            return self.clone();
        }
        let before = before.downscale(self.schema);
        let side = |now: &[(i32, f64)], then: &[(i32, f64)]| -> Option<Vec<(i32, f64)>> {
            let then: HashMap<i32, f64> = then.iter().copied().collect();
            let mut out = Vec::new();
            for &(i, n) in now {
                let d = n - then.get(&i).copied().unwrap_or(0.0);
                if d < 0.0 {
                    return None;
                }
                out.push((i, d));
            }
            Some(out)
        };
        match (
            side(&self.positive, &before.positive),
            side(&self.negative, &before.negative),
        ) {
            (Some(positive), Some(negative)) if self.zero >= before.zero => Native {
                name: self.name.clone(),
                labels: self.labels.clone(),
                schema: self.schema,
                zero: self.zero - before.zero,
                positive,
                negative,
            },
            _ => self.clone(),
        }
    }

    /// Every bucket with observations as (value at its geometric middle, times `scale`; count), the zero bucket at
    /// 0 and negative buckets as negative values.
    pub(super) fn observations(&self, scale: f64) -> Vec<(f64, u64)> {
        let base = 2f64.powf(2f64.powi(-self.schema));
        let middle = |i: i32| base.powf(f64::from(i) - 0.5) * scale;
        let mut out = vec![(0.0, self.zero)];
        out.extend(self.positive.iter().map(|&(i, n)| (middle(i), n)));
        out.extend(self.negative.iter().map(|&(i, n)| (-middle(i), n)));
        out.into_iter()
            .filter(|&(v, n)| v.is_finite() && n >= 0.5)
            .map(|(v, n)| (v, n.round() as u64))
            .collect()
    }
}

/// Absolute counts per bucket index from spans and deltas (integer histograms) or counts (float histograms).
fn expand(spans: &[BucketSpan], deltas: &[i64], counts: &[f64]) -> Option<Vec<(i32, f64)>> {
    let total: u64 = spans.iter().map(|s| u64::from(s.length.unwrap_or(0))).sum();
    if total > MAX_NATIVE_BUCKETS || (deltas.len() as u64 != total && counts.len() as u64 != total)
    {
        return (total == 0).then(Vec::new);
    }
    let mut out = Vec::with_capacity(total as usize);
    let mut index: i32 = 0;
    let mut absolute: i64 = 0;
    let mut k = 0usize;
    for (n, span) in spans.iter().enumerate() {
        let offset = span.offset.unwrap_or(0);
        // The first span's offset is where it starts; later ones are gaps after the previous span.
        index = if n == 0 {
            offset
        } else {
            index.checked_add(offset)?
        };
        for _ in 0..span.length.unwrap_or(0) {
            let count = if deltas.len() as u64 == total {
                absolute = absolute.checked_add(deltas[k])?;
                absolute as f64
            } else {
                counts[k]
            };
            if count > 0.0 {
                out.push((index, count));
            }
            index = index.checked_add(1)?;
            k += 1;
        }
    }
    Some(out)
}

fn labels(metric: &Metric) -> Vec<(String, String)> {
    metric
        .label
        .iter()
        .filter_map(|l| Some((l.name.clone()?, l.value.clone().unwrap_or_default())))
        .collect()
}

/// A page's samples in the text parser's terms, and its native histograms.
pub(super) fn samples(
    mut bytes: &[u8],
) -> Result<(Vec<PageSample>, Vec<Native>), prost::DecodeError> {
    let mut samples = Vec::new();
    let mut natives = Vec::new();
    while !bytes.is_empty() {
        let family = MetricFamily::decode_length_delimited(&mut bytes)?;
        let Some(name) = family.name.filter(|n| !n.is_empty()) else {
            continue;
        };
        let kind = family.r#type.unwrap_or(3);
        for metric in &family.metric {
            let labels = labels(metric);
            let mut push = |metric: String, value| {
                samples.push(PageSample {
                    metric,
                    labels: labels.clone(),
                    value,
                })
            };
            match kind {
                COUNTER => push(name.clone(), Value::Counter(single(&metric.counter))),
                GAUGE => push(name.clone(), Value::Gauge(single(&metric.gauge))),
                SUMMARY => {
                    let Some(summary) = &metric.summary else {
                        continue;
                    };
                    push(
                        name.clone(),
                        Value::Summary(
                            summary
                                .quantile
                                .iter()
                                .map(|q| SummaryCount {
                                    quantile: q.quantile.unwrap_or(f64::NAN),
                                    count: q.value.unwrap_or(f64::NAN),
                                })
                                .collect(),
                        ),
                    );
                    push(
                        format!("{name}_sum"),
                        Value::Untyped(summary.sample_sum.unwrap_or(f64::NAN)),
                    );
                    push(
                        format!("{name}_count"),
                        Value::Untyped(summary.sample_count.unwrap_or(0) as f64),
                    );
                }
                HISTOGRAM | GAUGE_HISTOGRAM => {
                    let Some(h) = &metric.histogram else { continue };
                    let native = !h.positive_span.is_empty() || !h.negative_span.is_empty();
                    if native {
                        // A native histogram; its classic buckets, if also there, would count it twice.
                        let (Some(positive), Some(negative)) = (
                            expand(&h.positive_span, &h.positive_delta, &h.positive_count),
                            expand(&h.negative_span, &h.negative_delta, &h.negative_count),
                        ) else {
                            continue;
                        };
                        let schema = h.schema.unwrap_or(0);
                        if !(-4..=8).contains(&schema) {
                            continue;
                        }
                        natives.push(Native {
                            name: name.clone(),
                            labels: labels.clone(),
                            schema,
                            zero: h
                                .zero_count_float
                                .filter(|f| *f > 0.0)
                                .unwrap_or(h.zero_count.unwrap_or(0) as f64),
                            positive,
                            negative,
                        });
                    } else {
                        let mut buckets: Vec<HistogramCount> = h
                            .bucket
                            .iter()
                            .map(|b| HistogramCount {
                                less_than: b.upper_bound.unwrap_or(f64::INFINITY),
                                count: b
                                    .cumulative_count_float
                                    .filter(|f| *f > 0.0)
                                    .unwrap_or(b.cumulative_count.unwrap_or(0) as f64),
                            })
                            .collect();
                        let count = h
                            .sample_count_float
                            .filter(|f| *f > 0.0)
                            .unwrap_or(h.sample_count.unwrap_or(0) as f64);
                        if !buckets.iter().any(|b| b.less_than.is_infinite()) {
                            buckets.push(HistogramCount {
                                less_than: f64::INFINITY,
                                count,
                            });
                        }
                        push(name.clone(), Value::Histogram(buckets));
                    }
                    push(
                        format!("{name}_sum"),
                        Value::Untyped(h.sample_sum.unwrap_or(f64::NAN)),
                    );
                    let count = h
                        .sample_count_float
                        .filter(|f| *f > 0.0)
                        .unwrap_or(h.sample_count.unwrap_or(0) as f64);
                    push(format!("{name}_count"), Value::Untyped(count));
                }
                _ => push(name.clone(), Value::Untyped(single(&metric.untyped))),
            }
        }
    }
    Ok((samples, natives))
}

fn single(value: &Option<Single>) -> f64 {
    value.as_ref().and_then(|v| v.value).unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page as client_golang writes it: a counter and a native histogram of schema 3 (bucket factor 1.1).
    fn page(requests: f64, positive_deltas: Vec<i64>, zero: u64) -> Vec<u8> {
        let families = [
            MetricFamily {
                name: Some("http_requests_total".into()),
                r#type: Some(COUNTER),
                metric: vec![Metric {
                    label: vec![LabelPair {
                        name: Some("code".into()),
                        value: Some("200".into()),
                    }],
                    counter: Some(Single {
                        value: Some(requests),
                    }),
                    ..Default::default()
                }],
            },
            MetricFamily {
                name: Some("rpc_duration_seconds".into()),
                r#type: Some(HISTOGRAM),
                metric: vec![Metric {
                    histogram: Some(Histogram {
                        sample_count: Some(positive_deltas.iter().sum::<i64>() as u64 + zero),
                        sample_sum: Some(1.0),
                        schema: Some(3),
                        zero_threshold: Some(2.938735877055719e-39),
                        zero_count: Some(zero),
                        // Buckets -27 and -26 (about 95 ms and 104 ms), then a gap of 8 to bucket -17 (~227 ms).
                        positive_span: vec![
                            BucketSpan {
                                offset: Some(-27),
                                length: Some(2),
                            },
                            BucketSpan {
                                offset: Some(8),
                                length: Some(1),
                            },
                        ],
                        positive_delta: positive_deltas,
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
            },
        ];
        let mut bytes = Vec::new();
        for family in families {
            family.encode_length_delimited(&mut bytes).unwrap();
        }
        bytes
    }

    #[test]
    fn native_buckets_are_expanded_from_spans_and_deltas() {
        // Absolute counts 3, 5, 1: deltas 3, +2, -4.
        let (samples, natives) = samples(&page(10.0, vec![3, 2, -4], 1)).unwrap();
        assert_eq!(natives.len(), 1);
        assert_eq!(
            natives[0].positive,
            vec![(-27, 3.0), (-26, 5.0), (-17, 1.0)]
        );
        assert_eq!(natives[0].zero, 1.0);
        let base = 2f64.powf(0.125);
        let buckets = natives[0].observations(1000.0);
        let at = buckets[1].0;
        // Bucket -27 holds (base^-28, base^-27] seconds: its middle, in ms, lies inside it.
        assert!(
            at > base.powi(-28) * 1000.0 && at < base.powi(-27) * 1000.0,
            "{at}"
        );
        assert!(samples.iter().any(|s| s.metric == "http_requests_total"));
        assert!(
            samples
                .iter()
                .any(|s| s.metric == "rpc_duration_seconds_count")
        );
    }

    #[test]
    fn a_scrape_state_turns_native_histograms_into_per_second_observations() {
        let mut state = super::super::ScrapeState::default();
        let first = state.fold_protobuf(&page(10.0, vec![3, 2, -4], 1)).unwrap();
        assert!(
            first.iter().all(|s| s.name != "rpc_duration_seconds"),
            "a baseline first"
        );
        // Absolute 4, 5, 3 (one more at ~95 ms, two more at ~227 ms), zero bucket unchanged.
        let second = state.fold_protobuf(&page(12.0, vec![4, 1, -2], 1)).unwrap();
        let latency = second
            .iter()
            .find(|s| s.name == "rpc_duration_seconds")
            .expect("the native histogram");
        assert_eq!(latency.kind, crate::statsd::MetricType::Timer);
        let counts: Vec<u64> = latency.values.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, vec![1, 2]);
        let requests = second
            .iter()
            .find(|s| s.name == "http_requests_total")
            .unwrap();
        assert_eq!(requests.values, vec![(2.0, 1)]);
    }

    #[test]
    fn a_lower_schema_between_scrapes_is_merged_down_not_counted_again() {
        let native = |schema, positive: Vec<(i32, f64)>| Native {
            name: "h".into(),
            labels: Vec::new(),
            schema,
            zero: 0.0,
            positive,
            negative: Vec::new(),
        };
        // Schema 3: buckets 1 and 2 hold 5 and 3; at schema 2 both fall in bucket 1 (ceil(1/2), ceil(2/2)).
        let before = native(3, vec![(1, 5.0), (2, 3.0)]);
        let now = native(2, vec![(1, 8.0), (4, 2.0)]);
        let new = now.since(&before).observations(1.0);
        assert_eq!(new.iter().map(|(_, n)| n).sum::<u64>(), 2, "{new:?}");
    }

    #[test]
    fn hostile_pages_are_refused_or_bounded_never_a_panic() {
        let huge_span = MetricFamily {
            name: Some("h".into()),
            r#type: Some(HISTOGRAM),
            metric: vec![Metric {
                histogram: Some(Histogram {
                    schema: Some(3),
                    positive_span: vec![BucketSpan {
                        offset: Some(i32::MAX),
                        length: Some(u32::MAX),
                    }],
                    positive_delta: vec![1],
                    ..Default::default()
                }),
                ..Default::default()
            }],
        };
        let mut bytes = Vec::new();
        huge_span.encode_length_delimited(&mut bytes).unwrap();
        let (_, natives) = samples(&bytes).unwrap();
        assert!(natives.is_empty());
        assert!(samples(&[0xff, 0xff, 0xff]).is_err());
    }
}
