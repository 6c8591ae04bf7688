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

use std::collections::HashMap;
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
    /// Counter value, or histogram bucket counts (with the count of the point last).
    values: Vec<f64>,
    /// The export (this receiver's count) that last saw it, for eviction.
    seen: u64,
}

/// What a receiver remembers between exports: the previous value of every cumulative series.
#[derive(Debug)]
pub struct OtlpState {
    previous: HashMap<Key, Previous>,
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
                    let values = if cumulative {
                        let now: Vec<f64> = point.bucket_counts.iter().map(|&c| c as f64).collect();
                        match self.delta(name, &tags, point.start_time_unix_nano, &now) {
                            Some(delta) => buckets
                                .iter()
                                .zip(delta)
                                .map(|(&(at, _), n)| (at, n.max(0.0).round() as u64))
                                .collect(),
                            None => {
                                counts.baseline += 1;
                                continue;
                            }
                        }
                    } else {
                        buckets
                    };
                    push_histogram(out, name, tags, kind, values);
                    counts.taken += 1;
                }
            }
            Some(Data::ExponentialHistogram(histogram)) => {
                let cumulative =
                    histogram.aggregation_temporality == AggregationTemporality::Cumulative as i32;
                let (kind, scale) = histogram_kind(&metric.unit);
                for point in &histogram.data_points {
                    let Some(buckets) = exponential_buckets(point, scale) else {
                        counts.rejected += 1;
                        continue;
                    };
                    let tags = tags(&point.attributes);
                    let values = if cumulative {
                        // Buckets move (the offset) between exports: difference by value, within one scale.
                        let mut key_tags = tags.clone();
                        key_tags.push(("\u{1f}scale".to_owned(), point.scale.to_string()));
                        match self.delta_by_value(
                            name,
                            &key_tags,
                            point.start_time_unix_nano,
                            &buckets,
                        ) {
                            Some(delta) => delta,
                            None => {
                                counts.baseline += 1;
                                continue;
                            }
                        }
                    } else {
                        buckets
                    };
                    push_histogram(out, name, tags, kind, values);
                    counts.taken += 1;
                }
            }
            Some(Data::Summary(summary)) => {
                for point in &summary.data_points {
                    let tags = tags(&point.attributes);
                    for q in &point.quantile_values {
                        if !(q.value.is_finite() && q.quantile.is_finite()) {
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
        let key = (name.to_owned(), tags.to_vec());
        let exports = self.exports;
        let fresh = Previous {
            start_unix_nano,
            values: now.to_vec(),
            seen: exports,
        };
        let started_since_us = start_unix_nano > 0 && start_unix_nano >= self.agent_start_unix_nano;
        match self.previous.insert(key, fresh) {
            // First sight: whole if the series began after this agent did, else a baseline.
            None => started_since_us.then(|| now.to_vec()),
            Some(before) => {
                let restarted = before.start_unix_nano != start_unix_nano
                    || before.values.len() != now.len()
                    || now.iter().zip(&before.values).any(|(n, b)| n < b);
                Some(if restarted {
                    now.to_vec()
                } else {
                    now.iter().zip(&before.values).map(|(n, b)| n - b).collect()
                })
            }
        }
    }

    /// Like [`Self::delta`] for buckets given as (value, count), matched by value: a bucket absent before had none.
    fn delta_by_value(
        &mut self,
        name: &str,
        tags: &[(String, String)],
        start_unix_nano: u64,
        now: &[(f64, u64)],
    ) -> Option<Vec<(f64, u64)>> {
        let flat: Vec<f64> = now.iter().flat_map(|&(at, n)| [at, n as f64]).collect();
        let key = (name.to_owned(), tags.to_vec());
        let started_since_us = start_unix_nano > 0 && start_unix_nano >= self.agent_start_unix_nano;
        let before = self.previous.insert(
            key,
            Previous {
                start_unix_nano,
                values: flat,
                seen: self.exports,
            },
        );
        let Some(before) = before else {
            return started_since_us.then(|| now.to_vec());
        };
        let then: HashMap<u64, f64> = before
            .values
            .chunks_exact(2)
            .map(|pair| (pair[0].to_bits(), pair[1]))
            .collect();
        let mut out = Vec::with_capacity(now.len());
        for &(at, n) in now {
            let was = then.get(&at.to_bits()).copied().unwrap_or(0.0);
            if (n as f64) < was {
                return Some(now.to_vec()); // fewer than before: a restart
            }
            out.push((at, n - was as u64));
        }
        if before.start_unix_nano != start_unix_nano || then.len() > now.len() {
            return Some(now.to_vec());
        }
        Some(out)
    }

    /// Forgets the least recently seen series beyond `max_series`.
    fn evict(&mut self) {
        if self.previous.len() <= self.max_series {
            return;
        }
        let mut seen: Vec<u64> = self.previous.values().map(|p| p.seen).collect();
        let cut = seen.len() - self.max_series;
        seen.select_nth_unstable(cut);
        let oldest_kept = seen[cut];
        self.previous.retain(|_, p| p.seen >= oldest_kept);
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

/// An exponential point as (value at the bucket's geometric middle, count), negative buckets as negative values,
/// or `None` when its scale is outside OTLP's range.
fn exponential_buckets(
    point: &opentelemetry_proto::tonic::metrics::v1::ExponentialHistogramDataPoint,
    scale: f64,
) -> Option<Vec<(f64, u64)>> {
    if !(-10..=20).contains(&point.scale) {
        return None;
    }
    let base = 2f64.powf(2f64.powi(-point.scale));
    let mut out = Vec::new();
    if point.zero_count > 0 {
        out.push((0.0, point.zero_count));
    }
    for (buckets, sign) in [(&point.positive, 1.0), (&point.negative, -1.0)] {
        let Some(buckets) = buckets else { continue };
        for (i, &n) in buckets.bucket_counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let index = f64::from(buckets.offset) + i as f64;
            // Bucket `index` holds (base^index, base^(index+1)]; its geometric middle is base^(index + 0.5).
            let at = base.powf(index + 0.5);
            if !at.is_finite() {
                return None;
            }
            out.push((sign * at * scale, n));
        }
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
        MetricsServiceServer::new(self).max_decoding_message_size(max_request_bytes)
    }

    /// The HTTP/protobuf route (`POST /v1/metrics`).
    pub fn http(self, max_request_bytes: usize) -> Router {
        Router::new()
            .route("/v1/metrics", post(http_export))
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

async fn http_export(
    State(receiver): State<OtlpReceiver>,
    headers: HeaderMap,
    body: Bytes,
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
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        receiver.health.count_otlp_request("http", "unsupported");
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed OTLP/HTTP bodies are not supported; export without compression\n",
        )
            .into_response();
    }
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
}
