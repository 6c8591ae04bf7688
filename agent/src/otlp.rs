//! OTLP metrics receiver: the OpenTelemetry SDK's exporter (gRPC, or HTTP/protobuf at `/v1/metrics`) sends here,
//! and each export becomes samples folded into the open second like DogStatsD lines.
//!
//! The mapping (the README's table says the same):
//! - `Sum`, delta: a counter of the point's value (negative for an `UpDownCounter`'s decrements).
//! - `Sum`, cumulative and monotonic: a counter of the change since the series' previous export; a lower value or a
//!   new start time is a restart (the delta is the new value). The first export of a series counts whole when the
//!   series started after this agent did (nothing was missed), and only sets the baseline otherwise.
//! - `Sum`, cumulative and not monotonic (an `UpDownCounter`), and `Gauge`: a gauge of the value.
//! - `Histogram` (explicit buckets): each bucket's new observations are recorded at the middle of the bucket; the
//!   first and last buckets are bounded by the point's `min` and `max` when it has them (else 0 and the highest
//!   bound). Cumulative histograms are differenced per bucket as sums are.
//! - `ExponentialHistogram`: each bucket's observations at the bucket's geometric middle (relative error at most
//!   `2^(2^-scale) ^ 0.5 - 1`: 4.4% at scale 3, 1.1% at scale 5, under HDR's 1% from scale 6 up), the zero bucket at 0, negative
//!   buckets as the `sign:negative` sibling like every negative histogram value.
//! - `Summary`: one gauge per quantile (tag `quantile`); its count and sum as cumulative counters `<name>.count`
//!   and `<name>.sum`.
//! - Histograms with unit `s` are recorded in milliseconds (a timer), with unit `ms` as a timer as they are.
//! - Data point attributes become tags (values as text; arrays and maps as their debug text); resource and scope
//!   attributes are not tags (the agent's identity already says service, version and instance).
//!
//! A point is folded into the second it arrives in, not the second its timestamp names.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, HistogramDataPoint, Metric, NumberDataPoint, metric::Data,
    number_data_point,
};
use prost::Message;
use tokio::sync::mpsc;

use crate::health::AgentHealth;
use crate::scrape::Scraped;
use crate::statsd::MetricType;

/// A series' identity across exports: name and sorted tags.
type Key = (String, Vec<(String, String)>);

/// A cumulative series' previous export.
#[derive(Debug, Clone)]
struct Previous {
    start_unix_nano: u64,
    /// Counter value, or histogram bucket counts.
    values: Vec<f64>,
    /// A histogram's sum of values.
    sum: Option<f64>,
    /// The export (this receiver's count) that last saw it, for eviction.
    seen: u64,
}

/// What a receiver remembers between exports: the previous value of every cumulative series.
#[derive(Debug)]
pub struct OtlpState {
    previous: HashMap<Key, Previous>,
    /// Cumulative exponential series: (start, counts, export last seen).
    exp_previous: HashMap<Key, (u64, ExpCounts, u64)>,
    /// When this agent started (unix ns): a series that started later has nothing before its first export.
    agent_start_unix_nano: u64,
    /// Most cumulative series remembered; the least recently seen go first.
    max_series: usize,
    exports: u64,
}

/// What one export held, by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PointCounts {
    /// Points folded.
    pub taken: u64,
    /// Points that set a cumulative baseline (counted from the next export on).
    pub baseline: u64,
    /// Points without a usable value (NaN, infinite, empty, or bucket counts that do not fit the bounds).
    pub rejected: u64,
}

impl OtlpState {
    /// A receiver that started at `agent_start_unix_nano` and remembers at most `max_series` cumulative series.
    pub fn new(agent_start_unix_nano: u64, max_series: usize) -> Self {
        Self {
            previous: HashMap::new(),
            exp_previous: HashMap::new(),
            agent_start_unix_nano,
            max_series: max_series.max(1),
            exports: 0,
        }
    }

    /// Turns one export into samples for the open second.
    pub fn fold(&mut self, request: &ExportMetricsServiceRequest) -> (Vec<Scraped>, PointCounts) {
        self.exports += 1;
        let mut out = Vec::new();
        let mut counts = PointCounts::default();
        for resource in &request.resource_metrics {
            for scope in &resource.scope_metrics {
                for metric in &scope.metrics {
                    self.fold_metric(metric, &mut out, &mut counts);
                }
            }
        }
        self.evict();
        (out, counts)
    }

    fn fold_metric(&mut self, metric: &Metric, out: &mut Vec<Scraped>, counts: &mut PointCounts) {
        let name = metric.name.as_str();
        if name.is_empty() {
            counts.rejected += 1;
            return;
        }
        match &metric.data {
            None => {}
            Some(Data::Gauge(gauge)) => {
                for point in &gauge.data_points {
                    self.gauge(name, point, out, counts);
                }
            }
            Some(Data::Sum(sum)) => {
                let cumulative =
                    sum.aggregation_temporality == AggregationTemporality::Cumulative as i32;
                for point in &sum.data_points {
                    if cumulative && !sum.is_monotonic {
                        self.gauge(name, point, out, counts);
                        continue;
                    }
                    let Some(value) = number(point).filter(|v| v.is_finite()) else {
                        counts.rejected += 1;
                        continue;
                    };
                    let tags = tags(&point.attributes);
                    let delta = if cumulative {
                        match self.delta(name, &tags, point.start_time_unix_nano, &[value]) {
                            Some(delta) => delta[0],
                            None => {
                                counts.baseline += 1;
                                continue;
                            }
                        }
                    } else {
                        value
                    };
                    counts.taken += 1;
                    out.push(Scraped {
                        name: name.to_owned(),
                        tags,
                        kind: MetricType::Counter,
                        values: vec![(delta, 1)],
                    });
                }
            }
            Some(Data::Histogram(histogram)) => {
                let cumulative =
                    histogram.aggregation_temporality == AggregationTemporality::Cumulative as i32;
                let (kind, scale) = histogram_kind(&metric.unit);
                for point in &histogram.data_points {
                    let Some(buckets) = explicit_buckets(point, scale) else {
                        counts.rejected += 1;
                        continue;
                    };
                    let tags = tags(&point.attributes);
                    let (mut values, new_sum) = if cumulative {
                        let now: Vec<f64> = point.bucket_counts.iter().map(|&c| c as f64).collect();
                        match self.delta_with_sum(
                            name,
                            &tags,
                            point.start_time_unix_nano,
                            &now,
                            point.sum,
                        ) {
                            Some((delta, sum)) => (
                                buckets
                                    .iter()
                                    .zip(delta)
                                    .map(|(&(at, _), n)| (at, n.max(0.0).round() as u64))
                                    .collect(),
                                sum,
                            ),
                            None => {
                                counts.baseline += 1;
                                continue;
                            }
                        }
                    } else {
                        (buckets, point.sum)
                    };
                    // All of the new observations in one bucket: their mean (from the sum) places them better
                    // than the bucket's middle (a 0.2 s request in the SDK's default (0, 5] s bucket is 200 ms,
                    // not 2.5 s).
                    let mut filled = values.iter_mut().enumerate().filter(|(_, (_, n))| *n > 0);
                    if let (Some((i, only)), None, Some(sum)) =
                        (filled.next(), filled.next(), new_sum)
                    {
                        // Kept inside the bucket: a sum that does not fit it (rounding of large cumulative sums)
                        // cannot move the observations out of the bucket they were counted in.
                        let bounds = &point.explicit_bounds;
                        let lower = i
                            .checked_sub(1)
                            .and_then(|j| bounds.get(j))
                            .map_or(f64::NEG_INFINITY, |b| b * scale);
                        let upper = bounds.get(i).map_or(f64::INFINITY, |b| b * scale);
                        let mean = sum / only.1 as f64 * scale;
                        if mean.is_finite() && mean > lower && mean <= upper {
                            only.0 = mean;
                        }
                    }
                    push_histogram(out, name, tags, kind, values);
                    counts.taken += 1;
                }
            }
            Some(Data::ExponentialHistogram(histogram)) => {
                let cumulative =
                    histogram.aggregation_temporality == AggregationTemporality::Cumulative as i32;
                let (kind, scale) = histogram_kind(&metric.unit);
                for point in &histogram.data_points {
                    let Some(now) = ExpCounts::of(point) else {
                        counts.rejected += 1;
                        continue;
                    };
                    let tags = tags(&point.attributes);
                    let new = if cumulative {
                        match self.exp_delta(name, &tags, point.start_time_unix_nano, now) {
                            Some(delta) => delta,
                            None => {
                                counts.baseline += 1;
                                continue;
                            }
                        }
                    } else {
                        now
                    };
                    push_histogram(out, name, tags, kind, new.values(scale));
                    counts.taken += 1;
                }
            }
            Some(Data::Summary(summary)) => {
                for point in &summary.data_points {
                    let tags = tags(&point.attributes);
                    for q in &point.quantile_values {
                        if !(q.value.is_finite() && q.quantile.is_finite()) {
                            counts.rejected += 1;
                            continue;
                        }
                        let mut tags = tags.clone();
                        tags.retain(|(k, _)| k != "quantile");
                        tags.push(("quantile".to_owned(), q.quantile.to_string()));
                        tags.sort();
                        out.push(Scraped {
                            name: name.to_owned(),
                            tags,
                            kind: MetricType::Gauge,
                            values: vec![(q.value, 1)],
                        });
                    }
                    let count_name = format!("{name}.count");
                    let sum_name = format!("{name}.sum");
                    for (series, value) in [(count_name, point.count as f64), (sum_name, point.sum)]
                    {
                        if !value.is_finite() {
                            continue;
                        }
                        if let Some(delta) =
                            self.delta(&series, &tags, point.start_time_unix_nano, &[value])
                        {
                            out.push(Scraped {
                                name: series,
                                tags: tags.clone(),
                                kind: MetricType::Counter,
                                values: vec![(delta[0], 1)],
                            });
                        }
                    }
                    counts.taken += 1;
                }
            }
        }
    }

    fn gauge(
        &mut self,
        name: &str,
        point: &NumberDataPoint,
        out: &mut Vec<Scraped>,
        counts: &mut PointCounts,
    ) {
        let Some(value) = number(point).filter(|v| v.is_finite()) else {
            counts.rejected += 1;
            return;
        };
        counts.taken += 1;
        out.push(Scraped {
            name: name.to_owned(),
            tags: tags(&point.attributes),
            kind: MetricType::Gauge,
            values: vec![(value, 1)],
        });
    }

    /// The change of a cumulative series since its previous export, element by element, or `None` when this export
    /// only sets its baseline.
    fn delta(
        &mut self,
        name: &str,
        tags: &[(String, String)],
        start_unix_nano: u64,
        now: &[f64],
    ) -> Option<Vec<f64>> {
        self.delta_with_sum(name, tags, start_unix_nano, now, None)
            .map(|(delta, _)| delta)
    }

    /// [`Self::delta`], and the change of the series' sum when the point has one (a histogram's).
    fn delta_with_sum(
        &mut self,
        name: &str,
        tags: &[(String, String)],
        start_unix_nano: u64,
        now: &[f64],
        sum: Option<f64>,
    ) -> Option<(Vec<f64>, Option<f64>)> {
        let key = (name.to_owned(), tags.to_vec());
        let exports = self.exports;
        let fresh = Previous {
            start_unix_nano,
            values: now.to_vec(),
            sum,
            seen: exports,
        };
        let started_since_us = start_unix_nano > 0 && start_unix_nano >= self.agent_start_unix_nano;
        match self.previous.insert(key, fresh) {
            // First sight: whole if the series began after this agent did, else a baseline.
            None => started_since_us.then(|| (now.to_vec(), sum)),
            Some(before) => {
                let restarted = before.start_unix_nano != start_unix_nano
                    || before.values.len() != now.len()
                    || now.iter().zip(&before.values).any(|(n, b)| n < b);
                Some(if restarted {
                    (now.to_vec(), sum)
                } else {
                    (
                        now.iter().zip(&before.values).map(|(n, b)| n - b).collect(),
                        sum.zip(before.sum).map(|(n, b)| n - b),
                    )
                })
            }
        }
    }

    /// The new observations of a cumulative exponential series since its previous export, bucket by bucket. The
    /// SDK lowers the scale as the range grows: the previous counts are merged down to the new scale first. A count
    /// lower than before, a new start time or a finer scale is a restart (everything is new).
    fn exp_delta(
        &mut self,
        name: &str,
        tags: &[(String, String)],
        start_unix_nano: u64,
        now: ExpCounts,
    ) -> Option<ExpCounts> {
        let key = (name.to_owned(), tags.to_vec());
        let started_since_us = start_unix_nano > 0 && start_unix_nano >= self.agent_start_unix_nano;
        let before = self
            .exp_previous
            .insert(key, (start_unix_nano, now.clone(), self.exports));
        let Some((before_start, before, _)) = before else {
            return started_since_us.then_some(now);
        };
        if before_start != start_unix_nano || now.scale > before.scale {
            return Some(now);
        }
        Some(now.minus(&before.downscale(now.scale)).unwrap_or(now))
    }

    /// Forgets the least recently seen series beyond `max_series` (exactly: ties broken arbitrarily).
    fn evict(&mut self) {
        let total = self.previous.len() + self.exp_previous.len();
        if total <= self.max_series {
            return;
        }
        let mut seen: Vec<(u64, bool, Key)> = self
            .previous
            .iter()
            .map(|(k, p)| (p.seen, false, k.clone()))
            .chain(
                self.exp_previous
                    .iter()
                    .map(|(k, p)| (p.2, true, k.clone())),
            )
            .collect();
        seen.sort_unstable_by_key(|(n, _, _)| *n);
        for (_, exponential, key) in seen.into_iter().take(total - self.max_series) {
            if exponential {
                self.exp_previous.remove(&key);
            } else {
                self.previous.remove(&key);
            }
        }
    }
}

/// An exponential point's counts by bucket index.
#[derive(Debug, Clone, PartialEq)]
struct ExpCounts {
    scale: i32,
    zero: u64,
    positive: BTreeMap<i32, u64>,
    negative: BTreeMap<i32, u64>,
}

/// Most buckets one exponential point may have (the SDK keeps 160 by default).
const MAX_EXP_BUCKETS: usize = 10_000;

impl ExpCounts {
    /// The point's counts, or `None` when its scale is outside OTLP's range or it has absurdly many buckets.
    fn of(
        point: &opentelemetry_proto::tonic::metrics::v1::ExponentialHistogramDataPoint,
    ) -> Option<Self> {
        if !(-10..=20).contains(&point.scale) {
            return None;
        }
        let side = |buckets: &Option<
            opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets,
        >| {
            let mut out = BTreeMap::new();
            if let Some(b) = buckets {
                if b.bucket_counts.len() > MAX_EXP_BUCKETS {
                    return None;
                }
                for (i, &n) in b.bucket_counts.iter().enumerate() {
                    if n > 0 {
                        out.insert(b.offset.checked_add(i32::try_from(i).ok()?)?, n);
                    }
                }
            }
            Some(out)
        };
        Some(Self {
            scale: point.scale,
            zero: point.zero_count,
            positive: side(&point.positive)?,
            negative: side(&point.negative)?,
        })
    }

    /// The same counts at a coarser `scale`: bucket `i` becomes `i >> (self.scale - scale)`.
    fn downscale(&self, scale: i32) -> Self {
        let shift = (self.scale - scale).clamp(0, 31);
        let merge = |side: &BTreeMap<i32, u64>| {
            let mut out = BTreeMap::new();
            for (&i, &n) in side {
                let slot = out.entry(i >> shift).or_insert(0u64);
                *slot = slot.saturating_add(n);
            }
            out
        };
        Self {
            scale: scale.min(self.scale),
            zero: self.zero,
            positive: merge(&self.positive),
            negative: merge(&self.negative),
        }
    }

    /// `self - before` at the same scale, or `None` when a count went down (a restart).
    fn minus(&self, before: &Self) -> Option<Self> {
        let side = |now: &BTreeMap<i32, u64>, then: &BTreeMap<i32, u64>| {
            if then.keys().any(|i| !now.contains_key(i)) {
                return None;
            }
            let mut out = BTreeMap::new();
            for (&i, &n) in now {
                let d = n.checked_sub(then.get(&i).copied().unwrap_or(0))?;
                if d > 0 {
                    out.insert(i, d);
                }
            }
            Some(out)
        };
        Some(Self {
            scale: self.scale,
            zero: self.zero.checked_sub(before.zero)?,
            positive: side(&self.positive, &before.positive)?,
            negative: side(&self.negative, &before.negative)?,
        })
    }

    /// Each bucket's count at its geometric middle (bucket `i` holds `(base^i, base^(i+1)]`), times `unit`;
    /// negative buckets as negative values; the zero bucket at 0.
    fn values(&self, unit: f64) -> Vec<(f64, u64)> {
        let base = 2f64.powf(2f64.powi(-self.scale));
        let mut out = Vec::new();
        if self.zero > 0 {
            out.push((0.0, self.zero));
        }
        for (side, sign) in [(&self.positive, 1.0), (&self.negative, -1.0)] {
            for (&i, &n) in side {
                let at = sign * base.powf(f64::from(i) + 0.5) * unit;
                // Out of f64's range (a coarse scale and an extreme index): not a value to record.
                if at.is_finite() && at != 0.0 {
                    out.push((at, n));
                }
            }
        }
        out
    }
}

fn number(point: &NumberDataPoint) -> Option<f64> {
    match point.value? {
        number_data_point::Value::AsDouble(v) => Some(v),
        number_data_point::Value::AsInt(v) => Some(v as f64),
    }
}

/// Attributes as sorted, unique tags.
fn tags(attributes: &[KeyValue]) -> Vec<(String, String)> {
    let mut tags: Vec<(String, String)> = attributes
        .iter()
        .filter(|kv| !kv.key.is_empty())
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                None => String::new(),
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect();
    tags.sort();
    tags.dedup_by(|a, b| a.0 == b.0);
    tags
}

/// Histograms in seconds are recorded in milliseconds, as timers.
fn histogram_kind(unit: &str) -> (MetricType, f64) {
    match unit {
        "s" => (MetricType::Timer, 1000.0),
        "ms" => (MetricType::Timer, 1.0),
        _ => (MetricType::Histogram, 1.0),
    }
}

/// An explicit-bucket point as (value at the bucket's middle, count), one per bucket, or `None` when its counts do
/// not fit its bounds.
fn explicit_buckets(point: &HistogramDataPoint, scale: f64) -> Option<Vec<(f64, u64)>> {
    let bounds = &point.explicit_bounds;
    if point.bucket_counts.is_empty() {
        return Some(Vec::new());
    }
    if point.bucket_counts.len() != bounds.len() + 1
        || bounds.iter().any(|b| !b.is_finite())
        || bounds.windows(2).any(|w| w[0] >= w[1])
    {
        return None;
    }
    let min = point.min.filter(|m| m.is_finite());
    let max = point.max.filter(|m| m.is_finite());
    let mut out = Vec::with_capacity(point.bucket_counts.len());
    for (i, &n) in point.bucket_counts.iter().enumerate() {
        let upper = bounds.get(i).copied();
        let lower = if i == 0 { None } else { Some(bounds[i - 1]) };
        let at = match (lower, upper) {
            (Some(lo), Some(hi)) => (lo + hi) / 2.0,
            // The first bucket, (-inf, b0]: from the smallest value seen (or 0) to b0.
            (None, Some(hi)) => {
                let lo = min.unwrap_or(0.0_f64.min(hi));
                (lo.min(hi) + hi) / 2.0
            }
            // The overflow bucket, (b_last, +inf): between the bound and the largest value seen, or at the bound.
            (Some(lo), None) => max.map_or(lo, |m| (lo + m.max(lo)) / 2.0),
            (None, None) => max.or(min).unwrap_or(0.0),
        };
        out.push((at * scale, n));
    }
    Some(out)
}

fn push_histogram(
    out: &mut Vec<Scraped>,
    name: &str,
    tags: Vec<(String, String)>,
    kind: MetricType,
    values: Vec<(f64, u64)>,
) {
    let values: Vec<(f64, u64)> = values
        .into_iter()
        .filter(|&(v, n)| n > 0 && v.is_finite())
        .collect();
    if !values.is_empty() {
        out.push(Scraped {
            name: name.to_owned(),
            tags,
            kind,
            values,
        });
    }
}

/// The receiver shared by the gRPC and HTTP transports.
#[derive(Clone)]
pub struct OtlpReceiver {
    state: Arc<Mutex<OtlpState>>,
    out: mpsc::Sender<Vec<Scraped>>,
    health: Arc<AgentHealth>,
}

impl OtlpReceiver {
    /// A receiver handing its samples to the fold loop through `out`.
    pub fn new(
        state: OtlpState,
        out: mpsc::Sender<Vec<Scraped>>,
        health: Arc<AgentHealth>,
    ) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
            out,
            health,
        }
    }

    /// Folds one export; returns the partial-success answer.
    async fn take(
        &self,
        request: &ExportMetricsServiceRequest,
        transport: &'static str,
    ) -> Result<ExportMetricsServiceResponse, &'static str> {
        let (samples, counts) = match self.state.lock() {
            Ok(mut state) => state.fold(request),
            Err(_) => return Err("receiver state poisoned"),
        };
        self.health.count_lines("otlp", counts.taken);
        self.health.count_otlp_points("taken", counts.taken);
        self.health.count_otlp_points("baseline", counts.baseline);
        self.health.count_otlp_points("rejected", counts.rejected);
        if !samples.is_empty() && self.out.send(samples).await.is_err() {
            self.health.count_otlp_request(transport, "stopping");
            return Err("the agent is stopping");
        }
        self.health.count_otlp_request(transport, "ok");
        let partial_success = (counts.rejected > 0).then(|| ExportMetricsPartialSuccess {
            rejected_data_points: counts.rejected as i64,
            error_message:
                "data points without a finite value or with buckets that do not fit their bounds"
                    .to_owned(),
        });
        Ok(ExportMetricsServiceResponse { partial_success })
    }

    /// The gRPC service (`opentelemetry.proto.collector.metrics.v1.MetricsService`).
    pub fn grpc(self, max_request_bytes: usize) -> MetricsServiceServer<Self> {
        MetricsServiceServer::new(self)
            .max_decoding_message_size(max_request_bytes)
            // The OpenTelemetry Collector's exporter compresses by default.
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
    }

    /// The HTTP/protobuf route (`POST /v1/metrics`).
    pub fn http(self, max_request_bytes: usize) -> Router {
        Router::new()
            .route(
                "/v1/metrics",
                post(move |state, headers, body| {
                    http_export(state, headers, body, max_request_bytes)
                }),
            )
            .layer(DefaultBodyLimit::max(max_request_bytes))
            .with_state(self)
    }
}

#[tonic::async_trait]
impl MetricsService for OtlpReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        match self.take(request.get_ref(), "grpc").await {
            Ok(response) => Ok(tonic::Response::new(response)),
            Err(why) => Err(tonic::Status::unavailable(why)),
        }
    }
}

/// Why a gzip body is not taken.
#[derive(Debug, PartialEq)]
enum Inflate {
    /// Not gzip (or cut short).
    Malformed(String),
    /// It inflates past the request bound.
    TooLarge(usize),
}

/// A gzip body (every member of it) inflated, at most `max_bytes` of it: what a compressed body expands to is
/// bounded like a plain one.
fn gunzip(body: &[u8], max_bytes: usize) -> Result<Bytes, Inflate> {
    use std::io::Read;
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(max_bytes));
    flate2::read::MultiGzDecoder::new(body)
        .take((max_bytes as u64).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|error| Inflate::Malformed(format!("not a gzip body: {error}")))?;
    if out.len() > max_bytes {
        return Err(Inflate::TooLarge(max_bytes));
    }
    Ok(out.into())
}

async fn http_export(
    State(receiver): State<OtlpReceiver>,
    headers: HeaderMap,
    body: Bytes,
    max_request_bytes: usize,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/x-protobuf") {
        receiver.health.count_otlp_request("http", "unsupported");
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "OTLP/HTTP takes application/x-protobuf here (JSON is not supported)\n",
        )
            .into_response();
    }
    // The Collector's `otlphttp` exporter and the SDKs compress with gzip (the Collector by default).
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.as_bytes().to_ascii_lowercase());
    let body = match encoding.as_deref() {
        None | Some(b"identity") => body,
        Some(b"gzip") => match gunzip(&body, max_request_bytes) {
            Ok(body) => body,
            Err(Inflate::Malformed(why)) => {
                receiver.health.count_otlp_request("http", "malformed");
                return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response();
            }
            Err(Inflate::TooLarge(max)) => {
                receiver.health.count_otlp_request("http", "too_large");
                return (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body inflates past otlp_max_request_bytes ({max})\n"),
                )
                    .into_response();
            }
        },
        Some(_) => {
            receiver.health.count_otlp_request("http", "unsupported");
            return (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "OTLP/HTTP bodies here are gzip or uncompressed\n",
            )
                .into_response();
        }
    };
    let request = match ExportMetricsServiceRequest::decode(body) {
        Ok(request) => request,
        Err(error) => {
            receiver.health.count_otlp_request("http", "malformed");
            return (
                StatusCode::BAD_REQUEST,
                format!("not an OTLP metrics export: {error}\n"),
            )
                .into_response();
        }
    };
    match receiver.take(&request, "http").await {
        Ok(response) => (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            response.encode_to_vec(),
        )
            .into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_bodies_inflate_within_the_bound_every_member_and_no_further() {
        use std::io::Write;
        let gz = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let mut two = gz(b"hello ");
        two.extend(gz(b"world"));
        assert_eq!(&gunzip(&two, 100).unwrap()[..], b"hello world");
        // A bomb: a megabyte of zeros in about a kilobyte, against a 64 KiB bound.
        let bomb = gz(&vec![0u8; 1 << 20]);
        assert!(bomb.len() < 4096);
        assert_eq!(gunzip(&bomb, 64 << 10), Err(Inflate::TooLarge(64 << 10)));
        assert!(matches!(
            gunzip(b"not gzip", 100),
            Err(Inflate::Malformed(_))
        ));
        assert_eq!(&gunzip(&gz(b"x"), usize::MAX).unwrap()[..], b"x");
    }
    use opentelemetry_proto::tonic::common::v1::AnyValue;
    use opentelemetry_proto::tonic::metrics::v1::{
        ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram, ResourceMetrics,
        ScopeMetrics, Sum, exponential_histogram_data_point::Buckets,
    };

    fn request(metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn attr(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_owned())),
            }),
            ..Default::default()
        }
    }

    fn sum(value: i64, start: u64, temporality: AggregationTemporality, monotonic: bool) -> Metric {
        Metric {
            name: "jobs".into(),
            data: Some(Data::Sum(Sum {
                data_points: vec![NumberDataPoint {
                    attributes: vec![attr("queue", "a")],
                    start_time_unix_nano: start,
                    value: Some(number_data_point::Value::AsInt(value)),
                    ..Default::default()
                }],
                aggregation_temporality: temporality as i32,
                is_monotonic: monotonic,
            })),
            ..Default::default()
        }
    }

    fn counter_values(samples: &[Scraped]) -> Vec<f64> {
        samples
            .iter()
            .filter(|s| s.kind == MetricType::Counter)
            .map(|s| s.values[0].0)
            .collect()
    }

    #[test]
    fn cumulative_sums_become_deltas_and_restarts_count_whole() {
        let mut state = OtlpState::new(1_000, 100);
        let cumulative = AggregationTemporality::Cumulative;
        // Started before the agent: the first export is a baseline.
        let (out, counts) = state.fold(&request(vec![sum(10, 500, cumulative, true)]));
        assert!(out.is_empty());
        assert_eq!(counts.baseline, 1);
        let (out, _) = state.fold(&request(vec![sum(15, 500, cumulative, true)]));
        assert_eq!(counter_values(&out), vec![5.0]);
        assert_eq!(out[0].tags, vec![("queue".to_owned(), "a".to_owned())]);
        // A new start time: the process restarted, the whole value is new.
        let (out, _) = state.fold(&request(vec![sum(3, 2_000, cumulative, true)]));
        assert_eq!(counter_values(&out), vec![3.0]);
        // Lower than before under the same start: a reset too.
        let (out, _) = state.fold(&request(vec![sum(1, 2_000, cumulative, true)]));
        assert_eq!(counter_values(&out), vec![1.0]);
    }

    #[test]
    fn a_series_that_started_after_the_agent_counts_from_its_first_export() {
        let mut state = OtlpState::new(1_000, 100);
        let (out, _) = state.fold(&request(vec![sum(
            7,
            1_500,
            AggregationTemporality::Cumulative,
            true,
        )]));
        assert_eq!(counter_values(&out), vec![7.0]);
    }

    #[test]
    fn delta_sums_are_counters_and_updown_counters_are_gauges() {
        let mut state = OtlpState::new(0, 100);
        let (out, _) = state.fold(&request(vec![sum(
            -4,
            0,
            AggregationTemporality::Delta,
            false,
        )]));
        assert_eq!(counter_values(&out), vec![-4.0]);
        let (out, _) = state.fold(&request(vec![sum(
            9,
            1,
            AggregationTemporality::Cumulative,
            false,
        )]));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, MetricType::Gauge);
        assert_eq!(out[0].values, vec![(9.0, 1)]);
    }

    fn histogram(counts: Vec<u64>, start: u64, unit: &str) -> Metric {
        Metric {
            name: "latency".into(),
            unit: unit.into(),
            data: Some(Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    start_time_unix_nano: start,
                    count: counts.iter().sum(),
                    bucket_counts: counts,
                    explicit_bounds: vec![0.01, 0.1, 1.0],
                    min: Some(0.002),
                    max: Some(3.0),
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        }
    }

    #[test]
    fn explicit_histograms_in_seconds_become_timers_in_ms_at_bucket_middles() {
        let mut state = OtlpState::new(0, 100);
        let (out, _) = state.fold(&request(vec![histogram(vec![1, 2, 0, 1], 5, "s")]));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, MetricType::Timer);
        let values = &out[0].values;
        // (0.002 + 0.01) / 2 s, (0.01 + 0.1) / 2 s, and the overflow bucket between 1 s and the max, 3 s.
        let expect = [(6.0, 1), (55.0, 2), (2_000.0, 1)];
        assert_eq!(values.len(), expect.len());
        for ((v, n), (ev, en)) in values.iter().zip(expect) {
            assert!((v - ev).abs() < 1e-9, "{v} vs {ev}");
            assert_eq!(*n, en);
        }
        // The next cumulative export: only the new observations.
        let (out, _) = state.fold(&request(vec![histogram(vec![1, 5, 0, 1], 5, "s")]));
        assert_eq!(out[0].values.len(), 1);
        assert_eq!(out[0].values[0].1, 3);
    }

    #[test]
    fn buckets_that_do_not_fit_their_bounds_are_rejected_not_guessed() {
        let mut state = OtlpState::new(0, 100);
        let mut metric = histogram(vec![1, 2], 5, "");
        if let Some(Data::Histogram(h)) = &mut metric.data {
            h.aggregation_temporality = AggregationTemporality::Delta as i32;
        }
        let (out, counts) = state.fold(&request(vec![metric]));
        assert!(out.is_empty());
        assert_eq!(counts.rejected, 1);
    }

    #[test]
    fn exponential_buckets_land_within_their_relative_error() {
        let mut state = OtlpState::new(0, 100);
        let metric = Metric {
            name: "size".into(),
            data: Some(Data::ExponentialHistogram(ExponentialHistogram {
                data_points: vec![ExponentialHistogramDataPoint {
                    scale: 3,
                    zero_count: 2,
                    // Bucket 24 at scale 3 holds (2^3, 2^3.125]: the value 8.3 falls in it.
                    positive: Some(Buckets {
                        offset: 24,
                        bucket_counts: vec![4],
                    }),
                    negative: Some(Buckets {
                        offset: 24,
                        bucket_counts: vec![1],
                    }),
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Delta as i32,
            })),
            ..Default::default()
        };
        let (out, _) = state.fold(&request(vec![metric]));
        let values = &out[0].values;
        assert_eq!(values[0], (0.0, 2));
        let relative = (values[1].0 - 8.3_f64).abs() / 8.3;
        assert!(relative < 0.05, "{values:?}");
        assert_eq!(values[1].1, 4);
        assert!(values[2].0 < 0.0 && values[2].1 == 1);
    }

    #[test]
    fn gauges_pass_through_and_nan_is_rejected() {
        let mut state = OtlpState::new(0, 100);
        let gauge = |v: f64| Metric {
            name: "temp".into(),
            data: Some(Data::Gauge(Gauge {
                data_points: vec![NumberDataPoint {
                    value: Some(number_data_point::Value::AsDouble(v)),
                    ..Default::default()
                }],
            })),
            ..Default::default()
        };
        let (out, counts) = state.fold(&request(vec![gauge(21.5), gauge(f64::NAN)]));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].values, vec![(21.5, 1)]);
        assert_eq!(counts.rejected, 1);
    }

    #[test]
    fn remembered_series_are_bounded() {
        let mut state = OtlpState::new(0, 2);
        for start in 1..=5u64 {
            let mut metric = sum(1, start, AggregationTemporality::Cumulative, true);
            metric.name = format!("m{start}");
            state.fold(&request(vec![metric]));
        }
        assert!(state.previous.len() <= 2);
    }

    fn exponential(scale: i32, offset: i32, counts: Vec<u64>) -> Metric {
        Metric {
            name: "size".into(),
            data: Some(Data::ExponentialHistogram(ExponentialHistogram {
                data_points: vec![ExponentialHistogramDataPoint {
                    scale,
                    start_time_unix_nano: 5,
                    positive: Some(Buckets {
                        offset,
                        bucket_counts: counts,
                    }),
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_cumulative_exponential_histogram_whose_scale_drops_is_not_counted_twice() {
        let mut state = OtlpState::new(0, 100);
        // Scale 3: buckets 24 and 25 hold 2 and 1.
        let (first, _) = state.fold(&request(vec![exponential(3, 24, vec![2, 1])]));
        let total = |out: &[Scraped]| {
            out.iter()
                .flat_map(|s| &s.values)
                .map(|(_, n)| n)
                .sum::<u64>()
        };
        assert_eq!(total(&first), 3);
        // A wide value arrives: the SDK drops to scale 2 (buckets 24, 25 -> 12) and adds one in bucket 20.
        let (second, _) = state.fold(&request(vec![exponential(
            2,
            12,
            vec![3, 0, 0, 0, 0, 0, 0, 0, 1],
        )]));
        assert_eq!(total(&second), 1, "only the new value: {second:?}");
    }

    #[test]
    fn the_series_bound_holds_even_when_one_export_brings_more() {
        let mut state = OtlpState::new(0, 10);
        let many: Vec<Metric> = (0..50)
            .map(|i| {
                let mut m = sum(1, 7, AggregationTemporality::Cumulative, true);
                m.name = format!("m{i}");
                m
            })
            .collect();
        state.fold(&request(many));
        assert_eq!(state.previous.len(), 10);
    }

    #[test]
    fn new_observations_all_in_one_bucket_are_placed_at_their_mean() {
        let mut state = OtlpState::new(0, 100);
        let mut metric = histogram(vec![0, 0, 0, 0], 5, "s");
        let point = |m: &mut Metric, counts: Vec<u64>, sum: f64| {
            if let Some(Data::Histogram(h)) = &mut m.data {
                h.data_points[0].bucket_counts = counts;
                h.data_points[0].sum = Some(sum);
            }
        };
        point(&mut metric, vec![0, 0, 0, 0], 0.0);
        state.fold(&request(vec![metric.clone()]));
        // Five requests of 0.2 s each, all in (0.1, 1] s.
        point(&mut metric, vec![0, 0, 5, 0], 1.0);
        let (out, _) = state.fold(&request(vec![metric]));
        assert_eq!(out[0].values.len(), 1);
        assert!(
            (out[0].values[0].0 - 200.0).abs() < 1e-9,
            "{:?}",
            out[0].values
        );
        assert_eq!(out[0].values[0].1, 5);
    }
}
