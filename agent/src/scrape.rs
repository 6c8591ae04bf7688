//! Prometheus scrape: a local `/metrics` page (text exposition, which OpenMetrics text also parses as) read every
//! second and turned into what a second of DogStatsD would have said:
//!
//! - counters become the delta since the previous scrape (a value lower than the last one is a reset: the delta is
//!   the new value); the first scrape of a series only sets its baseline;
//! - gauges and untyped samples pass through as gauges;
//! - classic histograms become HDR histograms from their bucket deltas: the `n` observations that fell between two
//!   bounds are recorded at the middle of that bucket (the `+Inf` bucket at the highest finite bound), so a
//!   quantile is exact to within its bucket, which is what Prometheus' `histogram_quantile` promises too;
//!   histograms whose name ends in `_seconds` are recorded in milliseconds (a timer), so sub-millisecond buckets
//!   keep their resolution;
//! - summaries become one gauge per quantile (tag `quantile`); the `_sum` and `_count` of histograms and summaries
//!   (and untyped `_total`s) are counters, as deltas; OpenMetrics `_created` samples are skipped.
//!
//! Scrapes run half a second off the second boundary, so each lands in one second's window.

use std::collections::HashMap;
use std::time::Duration;

mod exposition;

use prometheus_parse::{Scrape, Value};
use tokio::sync::mpsc;
use tracing::warn;

use crate::statsd::MetricType;

/// One sample for the open window, as the fold loop records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scraped {
    /// Metric name.
    pub name: String,
    /// Tags sorted by key, keys unique.
    pub tags: Vec<(String, String)>,
    /// How to fold it.
    pub kind: MetricType,
    /// Values, each with how many times it was observed.
    pub values: Vec<(f64, u64)>,
}

/// Pages in a row a series may be missing from before it is forgotten.
const FORGET_AFTER: u64 = 3;

/// A series' identity across scrapes.
type Key = (String, Vec<(String, String)>);

/// What a scraper remembers between scrapes: counters' last values and histograms' last cumulative buckets, each
/// with the scrape that last showed it. A series missing from [`FORGET_AFTER`] pages in a row is forgotten (a page
/// lists every live series, so what it no longer shows is gone, and comes back with a new baseline), so the state
/// is bounded by a few pages, which `scrape_max_bytes` bounds. A page with no samples at all (a target starting,
/// an error page served as text) changes nothing.
#[derive(Debug, Default)]
pub struct ScrapeState {
    counters: HashMap<Key, (f64, u64)>,
    histograms: HashMap<Key, (Vec<(f64, f64)>, u64)>,
    natives: HashMap<Key, (exposition::Native, u64)>,
    /// Scrapes folded so far.
    scrape: u64,
}

/// One sample of a page, whichever format it came in.
struct PageSample {
    metric: String,
    labels: Vec<(String, String)>,
    value: Value,
}

fn tags_of(labels: &[(String, String)], skip: &str) -> Vec<(String, String)> {
    let mut tags: Vec<(String, String)> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != skip)
        .cloned()
        .collect();
    tags.sort();
    tags.dedup_by(|a, b| a.0 == b.0);
    tags
}

impl ScrapeState {
    /// Turns one scrape's text into samples for the open second.
    pub fn fold(&mut self, text: &str) -> Result<Vec<Scraped>, std::io::Error> {
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
        let samples = scrape
            .samples
            .into_iter()
            .map(|sample| PageSample {
                labels: sample
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                metric: sample.metric,
                value: sample.value,
            })
            .collect();
        Ok(self.fold_samples(samples, Vec::new()))
    }

    /// Turns one scrape of the protobuf exposition (length-delimited `MetricFamily` messages) into samples for the
    /// open second: everything the text format carries, and native histograms.
    pub fn fold_protobuf(&mut self, bytes: &[u8]) -> Result<Vec<Scraped>, prost::DecodeError> {
        let (samples, natives) = exposition::samples(bytes)?;
        Ok(self.fold_samples(samples, natives))
    }

    /// A page's body, by its content type.
    pub fn fold_page(&mut self, content_type: &str, body: &[u8]) -> Result<Vec<Scraped>, String> {
        if content_type.starts_with(exposition::CONTENT_TYPE) {
            self.fold_protobuf(body).map_err(|e| e.to_string())
        } else {
            let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
            self.fold(text).map_err(|e| e.to_string())
        }
    }

    fn fold_samples(
        &mut self,
        samples: Vec<PageSample>,
        natives: Vec<exposition::Native>,
    ) -> Vec<Scraped> {
        if samples.is_empty() && natives.is_empty() {
            return Vec::new();
        }
        self.scrape += 1;
        let mut out = Vec::new();
        for native in natives {
            let tags = tags_of(&native.labels, "");
            let timer = native.name.ends_with("_seconds");
            let key = (native.name.clone(), tags.clone());
            let previous = self
                .natives
                .insert(key, (native.clone(), self.scrape))
                .map(|(previous, _)| previous);
            let Some(previous) = previous else {
                continue; // the first scrape sets the baseline
            };
            let values = native
                .since(&previous)
                .observations(if timer { 1000.0 } else { 1.0 });
            out.extend(histogram(native.name, tags, timer, values));
        }
        for sample in samples {
            // Counters, and the `_sum` and `_count` of histograms and summaries (and untyped `_total`s), are
            // cumulative: they become deltas.
            let cumulative = match sample.value {
                Value::Counter(v) => Some(v),
                Value::Untyped(v)
                    if ["_sum", "_count", "_total"]
                        .iter()
                        .any(|suffix| sample.metric.ends_with(suffix)) =>
                {
                    Some(v)
                }
                _ => None,
            };
            if let Some(v) = cumulative {
                let tags = tags_of(&sample.labels, "");
                if let Some(delta) = self.counter_delta(&sample.metric, &tags, v) {
                    out.push(Scraped {
                        name: sample.metric,
                        tags,
                        kind: MetricType::Counter,
                        values: vec![(delta, 1)],
                    });
                }
                continue;
            }
            match sample.value {
                Value::Counter(_) => {}
                // OpenMetrics' creation timestamps are no measurement.
                Value::Untyped(_) if sample.metric.ends_with("_created") => {}
                Value::Gauge(v) | Value::Untyped(v) => {
                    if v.is_finite() {
                        out.push(Scraped {
                            name: sample.metric,
                            tags: tags_of(&sample.labels, ""),
                            kind: MetricType::Gauge,
                            values: vec![(v, 1)],
                        });
                    }
                }
                Value::Summary(quantiles) => {
                    let tags = tags_of(&sample.labels, "quantile");
                    for q in quantiles {
                        if !q.count.is_finite() {
                            continue;
                        }
                        let mut tags = tags.clone();
                        tags.push(("quantile".to_owned(), q.quantile.to_string()));
                        tags.sort();
                        out.push(Scraped {
                            name: sample.metric.clone(),
                            tags,
                            kind: MetricType::Gauge,
                            values: vec![(q.count, 1)],
                        });
                    }
                }
                Value::Histogram(buckets) => {
                    let tags = tags_of(&sample.labels, "le");
                    let mut cumulative: Vec<(f64, f64)> =
                        buckets.iter().map(|b| (b.less_than, b.count)).collect();
                    cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let key = (sample.metric.clone(), tags.clone());
                    let previous = self
                        .histograms
                        .insert(key, (cumulative.clone(), self.scrape))
                        .map(|(previous, _)| previous);
                    let Some(previous) = previous else {
                        continue; // the first scrape sets the baseline
                    };
                    let timer = sample.metric.ends_with("_seconds");
                    let values = bucket_deltas(&previous, &cumulative, timer);
                    out.extend(histogram(sample.metric, tags, timer, values));
                }
            }
        }
        let now = self.scrape;
        let live = |seen: &u64| now - *seen < FORGET_AFTER;
        self.counters.retain(|_, (_, seen)| live(seen));
        self.histograms.retain(|_, (_, seen)| live(seen));
        self.natives.retain(|_, (_, seen)| live(seen));
        out
    }

    /// Series remembered between scrapes (counters, classic and native histograms).
    pub fn remembered(&self) -> usize {
        self.counters.len() + self.histograms.len() + self.natives.len()
    }

    fn counter_delta(&mut self, name: &str, tags: &[(String, String)], value: f64) -> Option<f64> {
        if !value.is_finite() {
            return None;
        }
        let (previous, _) = self
            .counters
            .insert((name.to_owned(), tags.to_vec()), (value, self.scrape))?;
        // Lower than before: the process restarted and counts from zero again.
        Some(if value < previous {
            value
        } else {
            value - previous
        })
    }
}

/// A histogram's new observations as a sample (a timer in ms when the metric is in seconds), if it has any.
fn histogram(
    name: String,
    tags: Vec<(String, String)>,
    timer: bool,
    values: Vec<(f64, u64)>,
) -> Option<Scraped> {
    (!values.is_empty()).then_some(Scraped {
        name,
        tags,
        kind: if timer {
            MetricType::Timer
        } else {
            MetricType::Histogram
        },
        values,
    })
}

/// The observations between two scrapes of a cumulative histogram, as (value, count): each bucket's new count at
/// its middle. A total lower than before is a reset: the new buckets are the delta.
fn bucket_deltas(
    previous: &[(f64, f64)],
    now: &[(f64, f64)],
    milliseconds: bool,
) -> Vec<(f64, u64)> {
    let total = |b: &[(f64, f64)]| b.last().map_or(0.0, |(_, c)| *c);
    let reset = total(now) < total(previous);
    let before = |le: f64| -> f64 {
        if reset {
            return 0.0;
        }
        previous
            .iter()
            .find(|(bound, _)| *bound == le)
            .map_or(0.0, |(_, c)| *c)
    };
    let scale = if milliseconds { 1000.0 } else { 1.0 };
    let mut out = Vec::new();
    let (mut lower, mut below_now, mut below_then) = (0.0_f64, 0.0_f64, 0.0_f64);
    for &(le, count) in now {
        let then = before(le);
        let new = (count - below_now) - (then - below_then);
        if new >= 0.5 {
            let at = if le.is_finite() {
                (lower + le) / 2.0
            } else {
                lower
            };
            out.push((at * scale, new.round() as u64));
        }
        below_now = count;
        below_then = then;
        if le.is_finite() {
            lower = le;
        }
    }
    out
}

/// One page: its content type and body, at most `max_bytes` of it (a larger page is an error, not a truncation).
async fn fetch(
    client: &reqwest::Client,
    url: &str,
    max_bytes: usize,
) -> Result<(String, Vec<u8>), String> {
    let mut response = client
        .get(url)
        .header("accept", exposition::ACCEPT)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| e.to_string())?;
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain")
        .to_owned();
    if response
        .content_length()
        .is_some_and(|n| n > max_bytes as u64)
    {
        return Err(format!("page larger than scrape_max_bytes ({max_bytes})"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max_bytes {
            return Err(format!("page larger than scrape_max_bytes ({max_bytes})"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((content_type, body))
}

/// Scrapes `url` every second, half a second off the boundary, and hands the samples to `out`. A failed scrape is
/// logged (once per run of failures) and tried again the next second.
pub async fn scrape_loop(
    url: String,
    timeout: Duration,
    max_bytes: usize,
    clock: strobe_proto::clock::AgentClock,
    out: mpsc::Sender<Vec<Scraped>>,
    health: std::sync::Arc<crate::health::AgentHealth>,
) {
    let client = match reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("strobe-agent/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            warn!(message = "Scrape client not built; not scraping.", %url, %error);
            return;
        }
    };
    let mut state = ScrapeState::default();
    let mut failing = false;
    loop {
        // Half a second off the boundary of the windows' clock (the aggregator's, once the agent follows it).
        let wait = clock.until_next_second() + Duration::from_millis(500);
        tokio::time::sleep(wait).await;
        let page = fetch(&client, &url, max_bytes).await;
        match page.and_then(|(content_type, body)| state.fold_page(&content_type, &body)) {
            Ok(samples) => {
                failing = false;
                health.count_scrape(&url, true);
                health.count_lines("scrape", samples.len() as u64);
                if out.send(samples).await.is_err() {
                    return; // the agent is stopping
                }
            }
            Err(error) => {
                health.count_scrape(&url, false);
                if !failing {
                    warn!(message = "Scrape failed; trying again every second.", %url, %error);
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# TYPE http_requests_total counter
http_requests_total{route=\"/a\",code=\"200\"} VALUE
# TYPE queue_depth gauge
queue_depth 7
# TYPE req_duration_seconds histogram
req_duration_seconds_bucket{le=\"0.1\"} B1
req_duration_seconds_bucket{le=\"0.5\"} B2
req_duration_seconds_bucket{le=\"+Inf\"} B3
req_duration_seconds_sum 1
req_duration_seconds_count B3
";

    fn page(counter: u32, buckets: [u32; 3]) -> String {
        PAGE.replace("VALUE", &counter.to_string())
            .replace("B1", &buckets[0].to_string())
            .replace("B2", &buckets[1].to_string())
            .replace("B3", &buckets[2].to_string())
    }

    fn find<'a>(samples: &'a [Scraped], name: &str) -> Option<&'a Scraped> {
        samples.iter().find(|s| s.name == name)
    }

    #[test]
    fn counters_become_deltas_with_resets_and_histograms_come_from_bucket_deltas() {
        let mut state = ScrapeState::default();
        let first = state.fold(&page(100, [1, 2, 3])).unwrap();
        assert!(
            find(&first, "http_requests_total").is_none(),
            "a baseline only"
        );
        assert!(find(&first, "req_duration_seconds").is_none());
        assert_eq!(find(&first, "queue_depth").unwrap().values, vec![(7.0, 1)]);

        let second = state.fold(&page(130, [5, 7, 9])).unwrap();
        let requests = find(&second, "http_requests_total").unwrap();
        assert_eq!(requests.values, vec![(30.0, 1)]);
        assert_eq!(
            requests.tags,
            vec![("code".into(), "200".into()), ("route".into(), "/a".into())]
        );
        let latency = find(&second, "req_duration_seconds").unwrap();
        assert_eq!(latency.kind, MetricType::Timer);
        // 4 new below 0.1 s (at 50 ms), 1 new in (0.1, 0.5] (at 300 ms), 1 new above 0.5 s (at 500 ms).
        assert_eq!(latency.values, vec![(50.0, 4), (300.0, 1), (500.0, 1)]);

        // The process restarted: counters and buckets start again from zero.
        let third = state.fold(&page(4, [1, 1, 2])).unwrap();
        assert_eq!(
            find(&third, "http_requests_total").unwrap().values,
            vec![(4.0, 1)]
        );
        assert_eq!(
            find(&third, "req_duration_seconds").unwrap().values,
            vec![(50.0, 1), (500.0, 1)]
        );
    }

    /// An OpenMetrics page as client libraries write it: counters named without `_total` in `# TYPE` and with it on
    /// the sample, `_created` timestamps, exemplars, a `# UNIT` line, an info metric and `# EOF`.
    const OPENMETRICS: &str = "# TYPE http_requests counter
# HELP http_requests Requests served.
http_requests_total{route=\"/a\"} VALUE # {trace_id=\"4bf92f3577b34da6\"} 1.0 1700000000.123
http_requests_created{route=\"/a\"} 1.7e9
# TYPE rpc_latency_seconds histogram
# UNIT rpc_latency_seconds seconds
rpc_latency_seconds_bucket{le=\"0.01\"} B1
rpc_latency_seconds_bucket{le=\"0.1\"} B2 # {trace_id=\"ab\"} 0.05
rpc_latency_seconds_bucket{le=\"+Inf\"} B2
rpc_latency_seconds_count B2
rpc_latency_seconds_sum 0.5
rpc_latency_seconds_created 1.7e9
# TYPE build info
build_info{version=\"1.2.3\"} 1
# EOF
";

    #[test]
    fn openmetrics_pages_read_as_the_text_format_does() {
        let page = |value: u32, b1: u32, b2: u32| {
            OPENMETRICS
                .replace("VALUE", &value.to_string())
                .replace("B1", &b1.to_string())
                .replace("B2", &b2.to_string())
        };
        let mut state = ScrapeState::default();
        let first = state
            .fold_page(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                page(10, 1, 2).as_bytes(),
            )
            .unwrap();
        assert!(find(&first, "http_requests_total").is_none(), "a baseline");
        assert!(
            find(&first, "http_requests_created").is_none()
                && find(&first, "rpc_latency_seconds_created").is_none(),
            "creation timestamps are no measurement: {first:?}"
        );
        assert_eq!(find(&first, "build_info").unwrap().values, vec![(1.0, 1)]);
        let second = state
            .fold_page("application/openmetrics-text", page(25, 4, 6).as_bytes())
            .unwrap();
        // The exemplar after the value is not read as part of it.
        let requests = find(&second, "http_requests_total").unwrap();
        assert_eq!(requests.kind, MetricType::Counter);
        assert_eq!(requests.values, vec![(15.0, 1)]);
        assert_eq!(requests.tags, vec![("route".into(), "/a".into())]);
        // 3 new under 10 ms (at 5 ms), 1 new in (10, 100] ms (at 55 ms).
        let latency = find(&second, "rpc_latency_seconds").unwrap();
        assert_eq!(latency.kind, MetricType::Timer);
        assert_eq!(latency.values, vec![(5.0, 3), (55.0, 1)]);
        assert_eq!(
            find(&second, "rpc_latency_seconds_count").unwrap().values,
            vec![(4.0, 1)]
        );
        assert!(find(&second, "http_requests_created").is_none());
    }

    #[test]
    fn summaries_are_gauges_per_quantile_and_garbage_does_not_panic() {
        let mut state = ScrapeState::default();
        let text = "# TYPE rpc summary\nrpc{quantile=\"0.5\"} 0.2\nrpc{quantile=\"0.99\"} 0.9\nrpc_sum 10\nrpc_count 40\n";
        let samples = state.fold(text).unwrap();
        let quantiles: Vec<_> = samples
            .iter()
            .filter(|s| s.name == "rpc")
            .map(|s| (s.tags.clone(), s.values.clone()))
            .collect();
        assert_eq!(quantiles.len(), 2, "{samples:?}");
        assert!(find(&samples, "rpc_count").is_none(), "a baseline first");
        let later = state
            .fold("# TYPE rpc summary\nrpc{quantile=\"0.5\"} 0.2\nrpc_sum 12\nrpc_count 45\n")
            .unwrap();
        assert_eq!(find(&later, "rpc_count").unwrap().values, vec![(5.0, 1)]);
        assert_eq!(find(&later, "rpc_count").unwrap().kind, MetricType::Counter);
        assert_eq!(find(&later, "rpc_sum").unwrap().values, vec![(2.0, 1)]);
        assert!(quantiles.iter().all(|(tags, _)| tags[0].0 == "quantile"));
        // A series missing from three pages in a row is forgotten, and one that comes back starts from a new
        // baseline; a page with nothing on it changes nothing.
        assert_eq!(state.remembered(), 2, "rpc_sum and rpc_count");
        for _ in 0..5 {
            state.fold("# an empty page\n").unwrap();
        }
        assert_eq!(state.remembered(), 2);
        state.fold("# TYPE other counter\nother 1\n").unwrap();
        state.fold("# TYPE other counter\nother 2\n").unwrap();
        assert_eq!(state.remembered(), 3, "missing from two pages: kept");
        state.fold("# TYPE other counter\nother 3\n").unwrap();
        assert_eq!(state.remembered(), 1);
        let back = state
            .fold("# TYPE rpc summary\nrpc_sum 20\nrpc_count 50\n")
            .unwrap();
        assert!(find(&back, "rpc_count").is_none(), "a new baseline");
        for junk in [
            "\u{0}\u{1}",
            "x{",
            "# TYPE y histogram\ny_bucket{le=\"abc\"} 1\n",
        ] {
            let _ = state.fold(junk);
        }
    }
}
