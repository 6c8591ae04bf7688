//! Export to long-term storage: every sealed second's aggregates, sent with Prometheus remote write (protobuf
//! `WriteRequest`, snappy block compression, remote write 1.0) to Prometheus, Mimir, Thanos Receive,
//! VictoriaMetrics or anything else that speaks it.
//!
//! A second is exported once it is final: when its late window has passed, so that a correction never has to
//! overwrite a sample (storage refuses a second value for the same timestamp). That is `late_window + grace_max +
//! 2 s` after the second ended, and never sooner than `late_window + 3 s` after it was sealed here: an aggregator
//! that seals late (behind, or replaying after an outage) exports late too, rather than before its corrections.
//! Export therefore trails live by `late_window + grace_max + 2 s` or more. Seconds wait in a pending map bounded in
//! samples; when it is full (storage down for long), the oldest seconds are dropped and counted. Requests are
//! retried with backoff on network errors, 5xx and 429; other refusals are dropped and counted.
//!
//! What is written, per step (default 1 s), per split (all versions and zones; each version; each zone):
//!
//! | Strobe series | Prometheus series | over a step of several seconds |
//! | --- | --- | --- |
//! | counter `m` | `m_rate` (per second) | mean of the per-second rates |
//! | gauge `m` | `m_min`, `m_max`, `m_mean`, `m_sum` (over instances) | the last second's |
//! | histogram `m` | `m{quantile="0.5"}`, `0.9`, `0.99`, `0.999`, `1` (the max) | the worst second's |
//! | histogram `m` | `m_count_rate`, `m_sum_rate` (values and their sum, per second) | mean of the seconds' |
//!
//! Labels: `service`; `version` only on the by-version split and `zone` only on the by-zone split (so the merge
//! over everything is `{version="", zone=""}`); the series' tags (a tag named like a label Strobe sets is written
//! `tag_<name>`). Names and label names have characters Prometheus does not allow replaced by `_`. A sample's
//! timestamp is the start of its step.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::health::Health;
use crate::model::{SealedSecond, Stats};

/// Where and how to export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteWriteSettings {
    /// The remote write endpoint, e.g. `http://prometheus:9090/api/v1/write` (none: no export).
    pub url: Option<String>,
    /// One sample per series per step; seconds within a step are combined as the module's table says.
    #[serde(with = "humantime_serde")]
    pub step: Duration,
    /// Most samples in one request.
    pub max_samples_per_request: usize,
    /// Most samples waiting to be sent (final or not); past it the oldest seconds are dropped and counted.
    pub max_pending_samples: usize,
    /// How long one request may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest wait between retries of a failing request.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// File holding a bearer token sent with every request (none: no `Authorization` header).
    pub bearer_token_file: Option<std::path::PathBuf>,
}

impl Default for RemoteWriteSettings {
    fn default() -> Self {
        Self {
            url: None,
            step: Duration::from_secs(1),
            max_samples_per_request: 2_000,
            max_pending_samples: 2_000_000,
            timeout: Duration::from_secs(10),
            backoff_max: Duration::from_secs(30),
            bearer_token_file: None,
        }
    }
}

/// How the seconds of one step combine into its sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Combine {
    /// The mean over the step's seconds (a second without the series counts as 0).
    Rate,
    /// The newest second's value.
    Last,
    /// The largest second's value.
    Max,
}

/// One value of one second, before combining.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    labels: Labels,
    value: f64,
    combine: Combine,
}

/// A series' labels, sorted by name (`__name__` among them).
type Labels = Arc<[(String, String)]>;

/// One step's samples: one value per series.
type StepSamples = Vec<(Labels, f64)>;

/// A metric name Prometheus accepts: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn metric_name(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// A label name Prometheus accepts (`[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`), clear of Strobe's own.
fn label_name(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) || out.starts_with("__") {
        out.insert_str(0, "tag_");
    }
    if matches!(
        out.as_str(),
        "service" | "version" | "zone" | "quantile" | "job" | "instance"
    ) {
        out.insert_str(0, "tag_");
    }
    out
}

/// Every point of one sealed second.
fn points(sealed: &SealedSecond, interner: &mut Interner) -> Vec<Point> {
    let mut out = Vec::new();
    for series in &sealed.series {
        let mut base: Vec<(String, String)> =
            vec![("service".to_owned(), sealed.service.to_string())];
        if let Some(version) = &series.version {
            base.push(("version".to_owned(), version.to_string()));
        }
        if let Some(zone) = &series.zone {
            base.push(("zone".to_owned(), zone.to_string()));
        }
        for (k, v) in series.tags.iter() {
            if !v.is_empty() {
                base.push((label_name(k), v.to_string()));
            }
        }
        let name = metric_name(&series.metric);
        let mut push = |suffix: &str, extra: Option<(&str, &str)>, value: f64, combine: Combine| {
            if !value.is_finite() {
                return;
            }
            let mut labels = Vec::with_capacity(base.len() + 2);
            labels.push(("__name__".to_owned(), format!("{name}{suffix}")));
            labels.extend(base.iter().cloned());
            if let Some((k, v)) = extra {
                labels.push((k.to_owned(), v.to_owned()));
            }
            // Sorted by name, `__name__` included (remote write requires byte order; `_` sorts after upper case).
            labels.sort();
            labels.dedup_by(|a, b| a.0 == b.0);
            out.push(Point {
                labels: interner.intern(labels),
                value,
                combine,
            });
        };
        match &series.stats {
            Stats::Counter { sum } => push("_rate", None, *sum, Combine::Rate),
            Stats::Gauge {
                min,
                max,
                mean,
                sum,
            } => {
                push("_min", None, *min, Combine::Last);
                push("_max", None, *max, Combine::Last);
                push("_mean", None, *mean, Combine::Last);
                push("_sum", None, *sum, Combine::Last);
            }
            Stats::Histogram {
                count,
                mean,
                p50,
                p90,
                p99,
                p999,
                max,
            } => {
                for (quantile, v) in [
                    ("0.5", p50),
                    ("0.9", p90),
                    ("0.99", p99),
                    ("0.999", p999),
                    ("1", max),
                ] {
                    push("", Some(("quantile", quantile)), *v, Combine::Max);
                }
                push("_count_rate", None, *count as f64, Combine::Rate);
                push("_sum_rate", None, *count as f64 * mean, Combine::Rate);
            }
        }
    }
    out
}

/// One step of many seconds folded into one sample per series.
fn combine_step(seconds: &[&[Point]], step_secs: i64) -> StepSamples {
    let mut acc: HashMap<Labels, (f64, Combine)> = HashMap::new();
    for second in seconds {
        for point in second.iter() {
            let entry = acc.entry(point.labels.clone()).or_insert((
                match point.combine {
                    Combine::Max => f64::NEG_INFINITY,
                    _ => 0.0,
                },
                point.combine,
            ));
            entry.0 = match point.combine {
                Combine::Rate => entry.0 + point.value,
                Combine::Last => point.value,
                Combine::Max => entry.0.max(point.value),
            };
        }
    }
    acc.into_iter()
        .map(|(labels, (v, combine))| {
            let v = if combine == Combine::Rate {
                v / step_secs as f64
            } else {
                v
            };
            (labels, v)
        })
        .collect()
}

#[derive(Clone, PartialEq, Message)]
struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, Message)]
struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, Message)]
struct Label {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, Message)]
struct Sample {
    #[prost(double, tag = "1")]
    value: f64,
    #[prost(int64, tag = "2")]
    timestamp: i64,
}

/// One shared copy of each label set, so the seconds waiting to be final cost a pointer per sample, not a copy of
/// its labels.
#[derive(Default)]
struct Interner {
    sets: std::collections::HashSet<Labels>,
}

impl Interner {
    fn intern(&mut self, labels: Vec<(String, String)>) -> Labels {
        if let Some(shared) = self.sets.get(labels.as_slice()) {
            return shared.clone();
        }
        let shared: Labels = labels.into();
        self.sets.insert(shared.clone());
        shared
    }

    /// Forgets label sets no waiting sample holds.
    fn prune(&mut self) {
        self.sets.retain(|labels| Arc::strong_count(labels) > 1);
    }
}

/// Seconds waiting to be final, by (second, service): when each is final by its seal (unix seconds), and its points.
#[derive(Default)]
struct Pending {
    interner: Interner,
    seconds: BTreeMap<(i64, Arc<str>), (i64, Vec<Point>)>,
    samples: usize,
}

/// The exporter: the hub offers it every sealed second; its task sends them once final.
pub(crate) struct RemoteWrite {
    settings: RemoteWriteSettings,
    url: String,
    pending: Mutex<Pending>,
    health: Arc<Health>,
    /// Seconds are final this long after they end...
    final_after_secs: i64,
    /// ...and this long after they were first sealed here (the late window, and a margin).
    final_after_seal_secs: i64,
}

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum RemoteWriteError {
    /// The URL is not http(s).
    #[error("remote write URL {0:?} must start with http:// or https://")]
    BadUrl(String),
    /// The step is not a whole number of seconds of at least one.
    #[error("remote write step must be a whole number of seconds, at least 1s")]
    BadStep,
    /// The bearer token file could not be read.
    #[error("cannot read the remote write bearer token file {path}: {source}")]
    Token {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("remote write client: {0}")]
    Client(#[from] reqwest::Error),
}

impl RemoteWrite {
    /// An exporter for `settings` (whose `url` is set); seconds are final `final_after` after they end and
    /// `late_window` (plus a margin) after they were sealed.
    pub(crate) fn new(
        settings: RemoteWriteSettings,
        final_after: Duration,
        late_window: Duration,
        health: Arc<Health>,
    ) -> Result<Option<Arc<Self>>, RemoteWriteError> {
        let Some(url) = settings.url.clone() else {
            return Ok(None);
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(RemoteWriteError::BadUrl(url));
        }
        if settings.step < Duration::from_secs(1) || settings.step.subsec_nanos() != 0 {
            return Err(RemoteWriteError::BadStep);
        }
        Ok(Some(Arc::new(Self {
            url,
            pending: Mutex::new(Pending::default()),
            health,
            final_after_secs: i64::try_from(final_after.as_secs()).unwrap_or(i64::MAX / 2) + 2,
            // A correction comes at the latest when its late window ends (a second after, at most, for one
            // gathered just before), then a margin.
            final_after_seal_secs: i64::try_from(late_window.as_secs()).unwrap_or(i64::MAX / 2) + 3,
            settings,
        })))
    }

    /// Takes one sealed second (a correction replaces what its second held).
    pub(crate) fn offer(&self, sealed: &SealedSecond) {
        self.offer_at(sealed, strobe_proto::clock::unix_second());
    }

    /// [`Self::offer`] at `now` (unix seconds).
    fn offer_at(&self, sealed: &SealedSecond, now: i64) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let points = points(sealed, &mut pending.interner);
        let added = points.len();
        // Final by its first seal here: a correction replaces the points, not when they are final.
        let final_at = match pending.seconds.get(&(sealed.t, sealed.service.clone())) {
            Some((final_at, _)) => *final_at,
            None => now.saturating_add(self.final_after_seal_secs),
        };
        if let Some((_, replaced)) = pending
            .seconds
            .insert((sealed.t, sealed.service.clone()), (final_at, points))
        {
            pending.samples -= replaced.len();
        }
        pending.samples += added;
        let mut dropped = 0;
        while pending.samples > self.settings.max_pending_samples {
            let Some((_, (_, oldest))) = pending.seconds.pop_first() else {
                break;
            };
            pending.samples -= oldest.len();
            dropped += oldest.len() as u64;
        }
        if dropped > 0 {
            self.health.remote_write_dropped.inc_by(dropped);
        }
        self.health.remote_write_pending.set(pending.samples as i64);
    }

    /// Whole steps whose every second is final at `now` (unix seconds), oldest first, taken out of pending.
    fn take_final(&self, now: i64) -> Vec<(i64, StepSamples)> {
        let step = self.settings.step.as_secs().max(1) as i64;
        // A step is final once its last second is.
        let final_before = now - self.final_after_secs;
        let Ok(mut pending) = self.pending.lock() else {
            return Vec::new();
        };
        // The first step not final: by the clock, or because one of its seconds was sealed too recently. Steps go
        // whole and in order, so everything from it on waits.
        let mut boundary = i64::MAX;
        for ((t, _), (final_at, _)) in &pending.seconds {
            let step_start = t.div_euclid(step) * step;
            if step_start >= boundary {
                break;
            }
            if step_start + step > final_before || *final_at > now {
                boundary = step_start;
            }
        }
        let mut steps: BTreeMap<i64, Vec<Vec<Point>>> = BTreeMap::new();
        while let Some(entry) = pending.seconds.first_entry() {
            let step_start = entry.key().0.div_euclid(step) * step;
            if step_start >= boundary {
                break;
            }
            let (_, points) = entry.remove();
            pending.samples -= points.len();
            steps.entry(step_start).or_default().push(points);
        }
        self.health.remote_write_pending.set(pending.samples as i64);
        drop(pending);
        let steps: Vec<(i64, Vec<Vec<Point>>)> = steps.into_iter().collect();
        let combined = steps
            .iter()
            .map(|(start, seconds)| {
                let refs: Vec<&[Point]> = seconds.iter().map(Vec::as_slice).collect();
                (*start, combine_step(&refs, step))
            })
            .collect();
        drop(steps);
        if let Ok(mut pending) = self.pending.lock() {
            pending.interner.prune();
        }
        combined
    }

    /// Sends final steps until the task is dropped.
    pub(crate) async fn run(self: Arc<Self>) {
        let token = match &self.settings.bearer_token_file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(token) => Some(token.trim().to_owned()),
                Err(source) => {
                    warn!(
                        message = "Remote write disabled: cannot read its bearer token file.",
                        error = %RemoteWriteError::Token { path: path.clone(), source },
                    );
                    return;
                }
            },
            None => None,
        };
        let client = match reqwest::Client::builder()
            .timeout(self.settings.timeout)
            .user_agent(concat!("strobe/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(client) => client,
            Err(error) => {
                warn!(message = "Remote write disabled: no HTTP client.", %error);
                return;
            }
        };
        info!(message = "Exporting with remote write.", url = %self.url, step = ?self.settings.step);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for (start, samples) in self.take_final(strobe_proto::clock::unix_second()) {
                for chunk in samples.chunks(self.settings.max_samples_per_request.max(1)) {
                    self.send(&client, token.as_deref(), start, chunk).await;
                }
            }
        }
    }

    /// Sends one request, retrying with backoff until it is taken or refused for what it holds.
    async fn send(
        &self,
        client: &reqwest::Client,
        token: Option<&str>,
        step_start: i64,
        samples: &[(Labels, f64)],
    ) {
        let request = WriteRequest {
            timeseries: samples
                .iter()
                .map(|(labels, value)| TimeSeries {
                    labels: labels
                        .iter()
                        .map(|(name, value)| Label {
                            name: name.clone(),
                            value: value.clone(),
                        })
                        .collect(),
                    samples: vec![Sample {
                        value: *value,
                        timestamp: step_start * 1000,
                    }],
                })
                .collect(),
        };
        let body = match snap::raw::Encoder::new().compress_vec(&request.encode_to_vec()) {
            Ok(body) => body,
            Err(error) => {
                warn!(message = "Remote write request not compressed; dropped.", %error);
                self.health.remote_write_failed.inc_by(samples.len() as u64);
                return;
            }
        };
        let n = samples.len() as u64;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut post = client
                .post(&self.url)
                .header("Content-Encoding", "snappy")
                .header("Content-Type", "application/x-protobuf")
                .header("X-Prometheus-Remote-Write-Version", "0.1.0")
                .body(body.clone());
            if let Some(token) = token {
                post = post.bearer_auth(token);
            }
            let retry = match post.send().await {
                Ok(response) if response.status().is_success() => {
                    self.health.remote_write_sent.inc_by(n);
                    return;
                }
                Ok(response)
                    if response.status().is_server_error() || response.status().as_u16() == 429 =>
                {
                    format!("HTTP {}", response.status())
                }
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    warn!(
                        message = "Remote write refused a request; its samples are dropped.",
                        %status, reason = %text.trim(), samples = n,
                    );
                    self.health.remote_write_failed.inc_by(n);
                    return;
                }
                Err(error) => error.to_string(),
            };
            self.health.remote_write_retries.inc();
            warn!(message = "Remote write failed; retrying.", error = %retry, in_ms = backoff.as_millis() as u64);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.settings.backoff_max);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::SeriesSummary;

    fn sealed(t: i64, series: Vec<SeriesSummary>) -> SealedSecond {
        SealedSecond {
            service: "checkout".into(),
            t,
            correction: false,
            series,
            instances: Vec::new(),
        }
    }

    fn counter(version: Option<&str>, sum: f64) -> SeriesSummary {
        SeriesSummary {
            service: "checkout".into(),
            metric: "request.count".into(),
            tags: Arc::new(BTreeMap::from([
                ("route".into(), "/a".into()),
                ("service".into(), "x".into()),
            ])),
            version: version.map(Into::into),
            zone: None,
            instances: 1,
            stats: Stats::Counter { sum },
        }
    }

    fn find<'a>(points: &'a [Point], name: &str, label: Option<(&str, &str)>) -> Option<&'a Point> {
        points.iter().find(|p| {
            p.labels.iter().any(|(k, v)| k == "__name__" && v == name)
                && label.is_none_or(|(k, v)| p.labels.iter().any(|(a, b)| a == k && b == v))
        })
    }

    #[test]
    fn names_and_labels_are_what_prometheus_accepts_and_strobes_own_labels_win() {
        assert_eq!(metric_name("request.latency-ms"), "request_latency_ms");
        assert_eq!(metric_name("9lives"), "_9lives");
        // An upper-case tag sorts before `__name__`: byte order, as remote write requires.
        let mut upper = counter(None, 1.0);
        Arc::make_mut(&mut upper.tags).insert("Region".into(), "eu".into());
        let sorted = points(&sealed(1, vec![upper]), &mut Interner::default());
        let names: Vec<&str> = sorted[0].labels.iter().map(|(k, _)| k.as_str()).collect();
        let mut expected = names.clone();
        expected.sort();
        assert_eq!(names, expected);
        assert_eq!(names[0], "Region");
        assert_eq!(label_name("http.route"), "http_route");
        assert_eq!(label_name("version"), "tag_version");
        assert_eq!(label_name("__name__"), "tag___name__");
        let points = points(
            &sealed(10, vec![counter(Some("v2"), 5.0)]),
            &mut Interner::default(),
        );
        let p = find(&points, "request_count_rate", None).unwrap();
        let labels: Vec<(&str, &str)> = p
            .labels
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            labels,
            [
                ("__name__", "request_count_rate"),
                ("route", "/a"),
                ("service", "checkout"),
                ("tag_service", "x"),
                ("version", "v2"),
            ]
        );
    }

    #[test]
    fn histograms_write_quantiles_and_rates_and_gauges_their_spread() {
        let histogram = SeriesSummary {
            stats: Stats::Histogram {
                count: 10,
                mean: 20.0,
                p50: 15.0,
                p90: 30.0,
                p99: 45.0,
                p999: 50.0,
                max: 50.0,
            },
            metric: "request.latency".into(),
            ..counter(None, 0.0)
        };
        let gauge = SeriesSummary {
            stats: Stats::Gauge {
                min: 1.0,
                max: 3.0,
                mean: 2.0,
                sum: 6.0,
            },
            metric: "queue".into(),
            ..counter(None, 0.0)
        };
        let points = points(
            &sealed(10, vec![histogram, gauge]),
            &mut Interner::default(),
        );
        assert_eq!(
            find(&points, "request_latency", Some(("quantile", "0.99")))
                .unwrap()
                .value,
            45.0
        );
        assert_eq!(
            find(&points, "request_latency", Some(("quantile", "1")))
                .unwrap()
                .value,
            50.0
        );
        assert_eq!(
            find(&points, "request_latency_count_rate", None)
                .unwrap()
                .value,
            10.0
        );
        assert_eq!(
            find(&points, "request_latency_sum_rate", None)
                .unwrap()
                .value,
            200.0
        );
        assert_eq!(find(&points, "queue_max", None).unwrap().value, 3.0);
        assert_eq!(find(&points, "queue_sum", None).unwrap().value, 6.0);
    }

    #[test]
    fn a_step_of_several_seconds_averages_rates_keeps_the_worst_quantile_and_the_last_gauge() {
        let labels: Labels = vec![("__name__".to_owned(), "x".to_owned())].into();
        let p = |value, combine| Point {
            labels: labels.clone(),
            value,
            combine,
        };
        for (combine, values, expect) in [
            (Combine::Rate, [4.0, 8.0], 6.0 * 2.0 / 5.0), // two seconds of five had the series
            (Combine::Max, [4.0, 8.0], 8.0),
            (Combine::Last, [8.0, 4.0], 4.0),
        ] {
            let a = [p(values[0], combine)];
            let b = [p(values[1], combine)];
            let combined = combine_step(&[&a, &b], 5);
            assert_eq!(combined.len(), 1);
            assert!(
                (combined[0].1 - expect).abs() < 1e-9,
                "{combine:?}: {combined:?}"
            );
        }
    }

    #[test]
    fn only_final_steps_are_taken_corrections_replace_and_pending_is_bounded() {
        let settings = RemoteWriteSettings {
            url: Some("http://127.0.0.1:1/api/v1/write".into()),
            max_pending_samples: 3,
            ..Default::default()
        };
        let health = Arc::new(Health::default());
        let late_window = Duration::from_secs(10);
        let rw = RemoteWrite::new(settings, late_window, late_window, health.clone())
            .unwrap()
            .unwrap();
        rw.offer_at(&sealed(100, vec![counter(None, 1.0)]), 100);
        rw.offer_at(&sealed(100, vec![counter(None, 2.0)]), 105); // a correction
        rw.offer_at(&sealed(101, vec![counter(None, 7.0)]), 101);
        // Final once 10 s (+2) have passed since the second ended, and 10 s (+3) since its first seal.
        assert!(rw.take_final(112).is_empty());
        let taken = rw.take_final(113);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].0, 100);
        assert_eq!(taken[0].1[0].1, 2.0, "the correction's value");
        // Sealed late (an aggregator behind): final by its seal, not by the clock, so that its corrections still
        // replace it here rather than reach storage as duplicates; and what follows it waits in order.
        let taken = rw.take_final(114);
        assert_eq!(taken.len(), 1, "101 by the clock and its seal");
        rw.offer_at(&sealed(102, vec![counter(None, 1.0)]), 130);
        rw.offer_at(&sealed(103, vec![counter(None, 1.0)]), 104);
        assert!(
            rw.take_final(140).is_empty(),
            "102 sealed at 130: final at 143"
        );
        rw.offer_at(&sealed(102, vec![counter(None, 4.0)]), 139); // its correction
        let taken = rw.take_final(143);
        assert_eq!(taken.iter().map(|s| s.0).collect::<Vec<_>>(), [102, 103]);
        assert_eq!(taken[0].1[0].1, 4.0, "the correction's value");
        // Past the bound (3 samples), the oldest seconds go, counted: 8 offered, 3 kept.
        for t in 104..112 {
            rw.offer_at(&sealed(t, vec![counter(None, 1.0)]), t + 1);
        }
        assert_eq!(health.remote_write_dropped.get(), 5);
    }

    /// A real HTTP endpoint that answers 503 twice and then 200: the request is retried with backoff until taken,
    /// the same bytes each time; a request refused for what it holds (400) is dropped and counted, not retried.
    #[tokio::test]
    async fn requests_are_retried_until_taken_and_refused_ones_dropped() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        use axum::body::Bytes;
        use axum::http::{HeaderMap, StatusCode};

        #[derive(Clone, Default)]
        struct Endpoint {
            calls: Arc<AtomicUsize>,
            bodies: Arc<Mutex<Vec<WriteRequest>>>,
        }
        async fn write(
            axum::extract::State(endpoint): axum::extract::State<Endpoint>,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            let call = endpoint.calls.fetch_add(1, Ordering::SeqCst);
            // Whatever does not decode is a 400 (no panics here: the client would only see a broken connection).
            let request = (headers.get("content-encoding").map(|v| v.as_bytes())
                == Some(b"snappy"))
            .then(|| snap::raw::Decoder::new().decompress_vec(&body).ok())
            .flatten()
            .and_then(|raw| WriteRequest::decode(raw.as_slice()).ok());
            let Some(request) = request else {
                return StatusCode::BAD_REQUEST;
            };
            let refuse = request
                .timeseries
                .first()
                .and_then(|series| series.samples.first())
                .is_none_or(|sample| sample.value < 0.0);
            if let Ok(mut bodies) = endpoint.bodies.lock() {
                bodies.push(request);
            }
            if refuse {
                StatusCode::BAD_REQUEST
            } else if call < 2 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::NO_CONTENT
            }
        }
        let endpoint = Endpoint::default();
        let app = axum::Router::new()
            .route("/api/v1/write", axum::routing::post(write))
            .with_state(endpoint.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let settings = RemoteWriteSettings {
            url: Some(format!("http://{addr}/api/v1/write")),
            ..Default::default()
        };
        let health = Arc::new(Health::default());
        let rw = RemoteWrite::new(
            settings,
            Duration::from_secs(10),
            Duration::from_secs(10),
            health.clone(),
        )
        .unwrap()
        .unwrap();
        let client = reqwest::Client::new();
        let labels: Labels = Arc::from(vec![("__name__".to_owned(), "x".to_owned())]);
        // `send` retries until taken: bounded here, so a broken retry fails instead of hanging.
        let bounded = Duration::from_secs(20);
        tokio::time::timeout(
            bounded,
            rw.send(&client, None, 100, &[(labels.clone(), 5.0)]),
        )
        .await
        .expect("taken after two retries");
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 3);
        assert_eq!(health.remote_write_retries.get(), 2);
        assert_eq!(health.remote_write_sent.get(), 1);
        assert_eq!(health.remote_write_failed.get(), 0);
        {
            let bodies = endpoint.bodies.lock().unwrap();
            assert_eq!(bodies.len(), 3, "every attempt decoded");
            assert!(bodies.iter().all(|b| *b == bodies[0]), "the same request");
            assert_eq!(bodies[0].timeseries[0].samples[0].timestamp, 100_000);
            assert_eq!(bodies[0].timeseries[0].samples[0].value, 5.0);
        }

        tokio::time::timeout(bounded, rw.send(&client, None, 101, &[(labels, -1.0)]))
            .await
            .expect("refused at once");
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 4, "not retried");
        assert_eq!(health.remote_write_failed.get(), 1);
        assert_eq!(health.remote_write_retries.get(), 2);
    }

    #[test]
    fn a_write_request_is_the_protobuf_prometheus_reads() {
        // Field numbers of prometheus/prompb: WriteRequest.timeseries = 1; TimeSeries.labels = 1, samples = 2;
        // Label.name = 1, value = 2; Sample.value = 1 (double), timestamp = 2 (int64).
        let request = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![Label {
                    name: "a".into(),
                    value: "b".into(),
                }],
                samples: vec![Sample {
                    value: 1.0,
                    timestamp: 2,
                }],
            }],
        };
        let bytes = request.encode_to_vec();
        assert_eq!(
            bytes,
            [
                0x0a, 21, // timeseries, 21 bytes
                0x0a, 6, 0x0a, 1, b'a', 0x12, 1, b'b', // labels
                0x12, 11, 0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f, 0x10, 2, // samples
            ]
        );
    }
}
