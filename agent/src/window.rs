//! One-second windows: folds parsed samples into per-series accumulators and closes them into snapshots.
//!
//! Pure logic, no I/O: the caller says which wall-clock second it is.

use std::collections::HashMap;

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use strobe_proto as pb;

use crate::statsd::{Line, MetricType};

/// Recorded integers per unit: histogram values keep three decimal places (microseconds for ms timers).
pub const HISTOGRAM_SCALE: u32 = 1000;
/// Significant decimal digits kept by every histogram (1% relative error, ~14 KiB per histogram of latencies).
pub const HISTOGRAM_SIGFIG: u8 = 2;

/// Bounds on one window.
#[derive(Debug, Clone, Copy)]
pub struct WindowLimits {
    /// Most distinct series in one second; samples for further series are counted and dropped.
    pub max_series: usize,
    /// Largest histogram value in the metric's unit; larger values are clamped to it and counted.
    pub max_histogram_value: f64,
    /// Most tags on one series, whatever input it came from (DogStatsD lines are held to it by the parser already;
    /// scraped, OTLP and in-process series here, and a negative value's `sign:negative` sibling counts its tag).
    pub max_tags: usize,
    /// Longest metric name, tag key or tag value, in bytes, whatever input it came from.
    pub max_part_bytes: usize,
}

impl Default for WindowLimits {
    fn default() -> Self {
        Self {
            max_series: 10_000,
            // An hour in milliseconds: far above any latency worth a per-second view.
            max_histogram_value: 3_600_000.0,
            max_tags: crate::statsd::ParseLimits::default().max_tags,
            max_part_bytes: crate::statsd::ParseLimits::default().max_part_bytes,
        }
    }
}

/// The agent's own counters for one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Lines seen, good or bad.
    pub lines_received: u64,
    /// Lines refused by the parser or with a type that conflicts with the series' first type.
    pub lines_malformed: u64,
    /// Samples dropped because the window already held `max_series` series.
    pub series_over_limit: u64,
    /// Histogram values clamped to `max_histogram_value`, and sampled values whose weight would take one bucket
    /// past 4,294,967,295 in a second (the most an aggregator's bucket holds).
    pub values_clamped: u64,
    /// Of `lines_malformed`: lines whose type conflicts with the series' first type this second.
    pub type_conflicts: u64,
    /// Of `lines_malformed`: NaN or infinite histogram values (from inputs that do not parse text).
    pub non_finite: u64,
    /// Of `lines_malformed`: samples of a new series with more than `max_tags` tags.
    pub too_many_tags: u64,
    /// Of `lines_malformed`: samples of a new series whose name or a tag is longer than `max_part_bytes`.
    pub too_long_part: u64,
}

enum Accumulator {
    Counter(f64),
    Gauge(f64),
    Histogram {
        hist: Histogram<u64>,
        unit: &'static str,
    },
}

struct SeriesEntry {
    name: Box<str>,
    tags: Vec<(Box<str>, Box<str>)>,
    kind: MetricType,
    value: Accumulator,
}

/// The series of one wall-clock second `[second, second + 1)` being folded.
pub struct Window {
    second: i64,
    limits: WindowLimits,
    series: HashMap<Box<str>, SeriesEntry>,
    stats: WindowStats,
    key_buf: String,
}

impl Window {
    /// An empty window for `second`.
    pub fn new(second: i64, limits: WindowLimits) -> Self {
        Self {
            second,
            limits,
            series: HashMap::new(),
            stats: WindowStats::default(),
            key_buf: String::new(),
        }
    }

    /// The second this window covers.
    pub fn second(&self) -> i64 {
        self.second
    }

    /// Number of distinct series so far.
    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Counts a line that never reached `record` (refused by the parser).
    pub fn count_malformed(&mut self) {
        self.stats.lines_received += 1;
        self.stats.lines_malformed += 1;
    }

    /// Counts series values dropped before they reached the window (an in-process histogram past its per-second
    /// bound).
    pub fn count_over_limit(&mut self, n: u64) {
        self.stats.series_over_limit += n;
    }

    /// Folds one parsed line into the window.
    pub fn record(&mut self, line: &Line<'_>) {
        self.record_values(
            line.name,
            &line.tags,
            line.kind,
            line.values(),
            line.sample_rate,
        );
    }

    /// Folds values of one series into the window: the path every input (DogStatsD, in-process, simulated)
    /// takes. `tags` must be sorted by key with unique keys; `sample_rate` must be in (0, 1].
    pub fn record_values(
        &mut self,
        name: &str,
        tags: &[(&str, &str)],
        kind: MetricType,
        values: impl Iterator<Item = f64>,
        sample_rate: f64,
    ) {
        self.stats.lines_received += 1;
        self.key_buf.clear();
        self.key_buf.push_str(name);
        for (k, v) in tags {
            self.key_buf.push('\u{1f}');
            self.key_buf.push_str(k);
            self.key_buf.push('=');
            self.key_buf.push_str(v);
        }
        if !self.series.contains_key(self.key_buf.as_str()) {
            // Checked once per series and second: every input is held to the aggregator's tag-count and length
            // limits, so no series is shipped only to be dropped there for those (the aggregator also refuses
            // empty names or keys and control characters, which only it checks).
            let max_part = self.limits.max_part_bytes;
            if tags.len() > self.limits.max_tags {
                self.stats.lines_malformed += 1;
                self.stats.too_many_tags += 1;
                return;
            }
            if name.len() > max_part
                || tags
                    .iter()
                    .any(|(k, v)| k.len() > max_part || v.len() > max_part)
            {
                self.stats.lines_malformed += 1;
                self.stats.too_long_part += 1;
                return;
            }
            if self.series.len() >= self.limits.max_series {
                self.stats.series_over_limit += 1;
                return;
            }
            let entry = SeriesEntry {
                name: name.into(),
                tags: tags
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
                kind,
                value: match kind {
                    MetricType::Counter => Accumulator::Counter(0.0),
                    MetricType::Gauge => Accumulator::Gauge(0.0),
                    kind => Accumulator::Histogram {
                        hist: new_histogram(),
                        unit: if kind == MetricType::Timer { "ms" } else { "" },
                    },
                },
            };
            self.series.insert(self.key_buf.as_str().into(), entry);
        }
        let Some(entry) = self.series.get_mut(self.key_buf.as_str()) else {
            return;
        };
        if entry.kind != kind && !(entry.kind.is_histogram() && kind.is_histogram()) {
            self.stats.lines_malformed += 1;
            self.stats.type_conflicts += 1;
            return;
        }
        // Inputs that count (a scrape's bucket, an OTLP count) pass n as a rate of 1/n; 1/(1/n) is not always n
        // again in floating point (93 comes back as 92.99999999999999), and the whole part taken below would lose
        // one.
        let weight = 1.0 / sample_rate;
        let weight = if (weight - weight.round()).abs() < 1e-9 {
            weight.round()
        } else {
            weight
        };
        match &mut entry.value {
            Accumulator::Counter(sum) => *sum += values.sum::<f64>() * weight,
            Accumulator::Gauge(last) => {
                if let Some(v) = values.last() {
                    *last = v;
                }
            }
            Accumulator::Histogram { hist, .. } => {
                // Each value counts the whole part of 1/rate, as Datadog's agent weighs a sampled histogram,
                // timer or distribution value, so counts match it (a rate of 0.4 counts a value twice). `weight` is
                // at least 1 (a rate is at most 1).
                let count = weight.floor().max(1.0) as u64;
                let mut negatives: Vec<f64> = Vec::new();
                for v in values {
                    if !v.is_finite() {
                        self.stats.lines_malformed += 1;
                        self.stats.non_finite += 1;
                        continue;
                    }
                    if v < 0.0 {
                        negatives.push(-v);
                        continue;
                    }
                    let clamped = if v > self.limits.max_histogram_value {
                        self.stats.values_clamped += 1;
                        self.limits.max_histogram_value
                    } else {
                        v
                    };
                    let recorded = (clamped * f64::from(HISTOGRAM_SCALE)).round() as u64;
                    // A bucket holds at most what the aggregator's does (`u32::MAX` values a second; a tiny sample
                    // rate weighs one value by billions): the rest is left out and counted as clamped.
                    let room = u64::from(u32::MAX).saturating_sub(hist.count_at(recorded));
                    let kept = count.min(room);
                    if kept < count {
                        self.stats.values_clamped += 1;
                    }
                    // The histogram auto-resizes and the value is bounded above, so this should not fail; if it
                    // does, the value is counted as malformed rather than lost silently.
                    if kept > 0 && hist.record_n(recorded, kept).is_err() {
                        self.stats.lines_malformed += 1;
                    }
                }
                if !negatives.is_empty() {
                    // HDR histograms hold magnitudes: negative values go, as their magnitude, to the same series
                    // tagged `sign:negative` (a signed pair, as a temperature delta needs), one line still.
                    let mut signed: Vec<(&str, &str)> =
                        tags.iter().copied().filter(|(k, _)| *k != "sign").collect();
                    signed.push(("sign", "negative"));
                    signed.sort_by(|a, b| a.0.cmp(b.0));
                    self.record_values(name, &signed, kind, negatives.into_iter(), sample_rate);
                    self.stats.lines_received -= 1;
                }
            }
        }
    }

    /// Closes the window into the snapshot sent on the wire.
    pub fn close(self) -> (pb::Snapshot, WindowStats) {
        let mut stats = self.stats;
        let mut series: Vec<pb::Series> = Vec::with_capacity(self.series.len());
        let mut encoder = V2Serializer::new();
        for entry in self.series.into_values() {
            let value = match entry.value {
                Accumulator::Counter(sum) => pb::series::Value::Counter(sum),
                Accumulator::Gauge(v) => pb::series::Value::Gauge(v),
                Accumulator::Histogram { hist, unit, .. } => {
                    let mut hdr_v2 = Vec::new();
                    if encoder.serialize(&hist, &mut hdr_v2).is_err() {
                        // Not expected for an in-memory histogram; the series is counted as dropped.
                        stats.series_over_limit += 1;
                        continue;
                    }
                    pb::series::Value::Histogram(pb::Histogram {
                        hdr_v2: hdr_v2.into(),
                        scale: HISTOGRAM_SCALE,
                        unit: unit.to_owned(),
                    })
                }
            };
            series.push(pb::Series {
                name: entry.name.into(),
                tags: entry
                    .tags
                    .into_iter()
                    .map(|(key, value)| pb::Tag {
                        key: key.into(),
                        value: value.into(),
                    })
                    .collect(),
                id: 0,
                value: Some(value),
            });
        }
        let snapshot = pb::Snapshot {
            second: self.second,
            series,
            stats: Some(pb::AgentStats {
                lines_received: stats.lines_received,
                lines_malformed: stats.lines_malformed,
                series_over_limit: stats.series_over_limit,
                snapshots_dropped: 0,
                values_clamped: stats.values_clamped,
            }),
        };
        (snapshot, stats)
    }
}

/// A histogram with Strobe's precision that grows to whatever range it is given.
pub fn new_histogram() -> Histogram<u64> {
    // 2 significant digits is within the crate's valid range, so construction cannot fail.
    Histogram::new(HISTOGRAM_SIGFIG).unwrap_or_else(|_| unreachable!("valid sigfig"))
}

/// Keeps the open window aligned to wall-clock seconds: rolls it over when the second changes.
pub struct Folder {
    open: Window,
    limits: WindowLimits,
    /// The newest second closed.
    last_closed: Option<i64>,
}

impl Folder {
    /// A folder whose first window is `second`.
    pub fn new(second: i64, limits: WindowLimits) -> Self {
        Self {
            open: Window::new(second, limits),
            limits,
            last_closed: None,
        }
    }

    /// The window receiving samples now.
    pub fn open(&mut self) -> &mut Window {
        &mut self.open
    }

    /// If `now_second` is not the open window's, closes it and opens `now_second`. Seconds in between that saw no
    /// call (the process was paused) are not invented. A clock stepped back (the agent learnt the aggregator's)
    /// closes the open window too, rather than piling the seconds until the clock catches up into one.
    /// Moves the open window by `seconds` (the clock it was opened on turned out to be off by that much), so what it
    /// holds lands in the second it happened in and merges with what the corrected clock adds to that second; but
    /// never onto a second already sent: the window then stays just after it and gathers until the clock passes
    /// it, late but not lost. When the seconds closed so far were refused for now (`closed_were_refused`: the
    /// shipper moves those by as much), the record of them moves too, and only seconds the aggregator took
    /// (`accepted_up_to`) bound the move.
    pub fn restamp(
        &mut self,
        seconds: i64,
        accepted_up_to: Option<i64>,
        closed_were_refused: bool,
    ) {
        let mut second = self.open.second.saturating_add(seconds);
        if closed_were_refused {
            self.last_closed = self.last_closed.map(|c| c.saturating_add(seconds));
        } else if let Some(closed) = self.last_closed {
            second = second.max(closed.saturating_add(1));
        }
        if let Some(accepted) = accepted_up_to {
            second = second.max(accepted.saturating_add(1));
        }
        self.open.second = second;
    }

    /// Closes the open window when the clock has moved to another second and opens the one for `now_second`, but
    /// never a window for a second already closed or taken (a clock stepped back that far keeps the open window
    /// until it catches up: a second is sent once).
    pub fn roll(
        &mut self,
        now_second: i64,
        accepted_up_to: Option<i64>,
    ) -> Option<(pb::Snapshot, WindowStats)> {
        let floor = self.last_closed.max(accepted_up_to);
        if now_second == self.open.second || floor.is_some_and(|f| now_second <= f) {
            return None;
        }
        let closed = std::mem::replace(&mut self.open, Window::new(now_second, self.limits));
        self.last_closed = Some(closed.second);
        Some(closed.close())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statsd::{ParseLimits, parse_line};
    use hdrhistogram::serialization::Deserializer;

    fn feed(window: &mut Window, lines: &[&str]) {
        for l in lines {
            match parse_line(l, &ParseLimits::default()) {
                Ok(line) => window.record(&line),
                Err(_) => window.count_malformed(),
            }
        }
    }

    fn decode(h: &pb::Histogram) -> Histogram<u64> {
        Deserializer::new().deserialize(&mut &h.hdr_v2[..]).unwrap()
    }

    fn find<'a>(snap: &'a pb::Snapshot, name: &str) -> &'a pb::Series {
        snap.series.iter().find(|s| s.name == name).unwrap()
    }

    #[test]
    fn folds_counters_gauges_and_histograms() {
        let mut w = Window::new(100, WindowLimits::default());
        feed(
            &mut w,
            &[
                "req:1|c",
                "req:2|c",
                "req:1|c|@0.5",
                "depth:3|g",
                "depth:7|g",
                "lat:10|ms",
                "lat:20|ms",
                "lat:30|ms|@0.5",
                "lat:5|h",
                "bad line",
            ],
        );
        let (snap, stats) = w.close();
        assert_eq!(snap.second, 100);
        assert_eq!(
            find(&snap, "req").value,
            Some(pb::series::Value::Counter(5.0))
        );
        assert_eq!(
            find(&snap, "depth").value,
            Some(pb::series::Value::Gauge(7.0))
        );
        let Some(pb::series::Value::Histogram(h)) = &find(&snap, "lat").value else {
            panic!("lat is not a histogram")
        };
        assert_eq!(h.scale, HISTOGRAM_SCALE);
        assert_eq!(h.unit, "ms");
        assert_eq!(&h.hdr_v2[..4], &pb::HDR_V2_COOKIE.to_be_bytes());
        let hist = decode(h);
        // 10, 20, 30 (x2 for the sample rate), 5 from the `h` line: the kinds mix as histograms.
        assert_eq!(hist.len(), 5);
        assert!(hist.equivalent(hist.max(), 30_000));
        assert_eq!(stats.lines_received, 10);
        assert_eq!(stats.lines_malformed, 1);
    }

    /// A sampled histogram value counts the whole part of `1 / rate`, as Datadog's agent counts it: ten values sent
    /// `@0.3` count 30 in the second, and a packed line counts each of its values.
    #[test]
    fn sampled_histogram_values_count_the_whole_part_of_their_weight() {
        let mut w = Window::new(100, WindowLimits::default());
        let lines: Vec<String> = (0..10)
            .map(|i| format!("lat:{}|ms|@0.3", 10 + i))
            .chain(["size:1:2:3|h|@0.4".to_owned()])
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        feed(&mut w, &lines);
        let (snap, _) = w.close();
        let count = |name: &str| {
            let Some(pb::series::Value::Histogram(h)) = &find(&snap, name).value else {
                panic!("{name} is not a histogram")
            };
            decode(h).len()
        };
        assert_eq!(count("lat"), 30);
        assert_eq!(count("size"), 6, "three values at @0.4, twice each");
        // A count handed over as the rate 1/n is n, whatever floating point makes of 1/(1/n).
        let mut w = Window::new(100, WindowLimits::default());
        for n in [93u64, 99, 105, 117, 1_000_003] {
            w.record_values(
                "counted",
                &[],
                MetricType::Histogram,
                std::iter::once(5.0),
                1.0 / n as f64,
            );
        }
        let (snap, _) = w.close();
        let Some(pb::series::Value::Histogram(h)) = &find(&snap, "counted").value else {
            panic!("counted is not a histogram")
        };
        assert_eq!(decode(h).len(), 93 + 99 + 105 + 117 + 1_000_003);
    }

    #[test]
    fn tags_make_distinct_series_and_type_conflicts_are_counted() {
        let mut w = Window::new(1, WindowLimits::default());
        feed(
            &mut w,
            &["x:1|c|#a:1", "x:1|c|#a:2", "x:1|c|#a:1", "x:5|g|#a:1"],
        );
        assert_eq!(w.series_count(), 2);
        let (snap, stats) = w.close();
        let a1 = snap.series.iter().find(|s| s.tags[0].value == "1").unwrap();
        assert_eq!(a1.value, Some(pb::series::Value::Counter(2.0)));
        assert_eq!(stats.lines_malformed, 1);
    }

    /// Series from inputs that do not parse DogStatsD (a scrape, OTLP, the facade) are held to the same tag and
    /// length limits, and a negative value on a line that already has `max_tags` tags is refused and counted: its
    /// `sign:negative` sibling would need one more, which the aggregator would drop.
    #[test]
    fn every_input_is_held_to_the_tag_and_length_limits() {
        let limits = WindowLimits {
            max_tags: 2,
            max_part_bytes: 8,
            ..WindowLimits::default()
        };
        let mut w = Window::new(1, limits);
        let record = |w: &mut Window, name: &str, tags: &[(&str, &str)], value: f64| {
            w.record_values(
                name,
                tags,
                MetricType::Histogram,
                std::iter::once(value),
                1.0,
            );
        };
        record(&mut w, "ok", &[("a", "1"), ("b", "2")], 5.0);
        record(&mut w, "many", &[("a", "1"), ("b", "2"), ("c", "3")], 5.0);
        record(&mut w, "long", &[("a", "123456789")], 5.0);
        record(&mut w, "toolongname", &[], 5.0);
        record(&mut w, "ok", &[("a", "1"), ("b", "2")], -5.0);
        record(&mut w, "neg", &[("a", "1")], -5.0);
        let (snap, stats) = w.close();
        let names: Vec<(&str, usize)> = snap
            .series
            .iter()
            .map(|s| (s.name.as_str(), s.tags.len()))
            .collect();
        // `neg` keeps its (empty) unsigned series beside the signed one, as any all-negative line does.
        assert_eq!(snap.series.len(), 3, "{names:?}");
        assert!(
            names.contains(&("ok", 2))
                && names.contains(&("neg", 1))
                && names.contains(&("neg", 2)),
            "{names:?}"
        );
        assert_eq!(
            stats.too_many_tags, 2,
            "three tags, and the signed sibling of `ok`"
        );
        assert_eq!(stats.too_long_part, 2);
        assert_eq!(stats.lines_malformed, 4);
    }

    #[test]
    fn cardinality_limit_drops_new_series_but_keeps_known_ones() {
        let limits = WindowLimits {
            max_series: 2,
            ..WindowLimits::default()
        };
        let mut w = Window::new(1, limits);
        feed(&mut w, &["a:1|c", "b:1|c", "c:1|c", "d:1|c", "a:1|c"]);
        let (snap, stats) = w.close();
        assert_eq!(snap.series.len(), 2);
        assert_eq!(stats.series_over_limit, 2);
        assert_eq!(
            find(&snap, "a").value,
            Some(pb::series::Value::Counter(2.0))
        );
    }

    #[test]
    fn decrements_sum_and_negative_histogram_values_go_to_a_signed_sibling() {
        let mut w = Window::new(1, WindowLimits::default());
        feed(
            &mut w,
            &[
                "jobs.queued:5|c",
                "jobs.queued:-1|c",
                "jobs.queued:-1|c",
                "temp.delta:-5:3:-2|h|#room:a",
            ],
        );
        let (snap, stats) = w.close();
        assert_eq!(
            find(&snap, "jobs.queued").value,
            Some(pb::series::Value::Counter(3.0))
        );
        let histogram_of = |sign: Option<&str>| {
            let series = snap
                .series
                .iter()
                .find(|s| {
                    s.name == "temp.delta"
                        && s.tags
                            .iter()
                            .find(|t| t.key == "sign")
                            .map(|t| t.value.as_str())
                            == sign
                })
                .expect("the series");
            assert!(
                series
                    .tags
                    .iter()
                    .any(|t| t.key == "room" && t.value == "a")
            );
            let Some(pb::series::Value::Histogram(h)) = &series.value else {
                panic!("not a histogram")
            };
            decode(h)
        };
        let (positive, negative) = (histogram_of(None), histogram_of(Some("negative")));
        assert_eq!((positive.len(), negative.len()), (1, 2));
        assert!(negative.equivalent(negative.max(), 5_000), "magnitudes");
        assert_eq!(stats.lines_received, 4, "one line, however it splits");
        assert_eq!(stats.lines_malformed, 0);
    }

    #[test]
    fn absurd_histogram_values_are_clamped_and_counted() {
        let mut w = Window::new(1, WindowLimits::default());
        feed(&mut w, &["lat:1e300|ms", "lat:1|ms"]);
        let (snap, stats) = w.close();
        assert_eq!(stats.values_clamped, 1);
        let Some(pb::series::Value::Histogram(h)) = &find(&snap, "lat").value else {
            panic!()
        };
        let hist = decode(h);
        assert_eq!(hist.len(), 2);
        assert!(hist.max() <= (3_600_000.0 * 1000.0 * 1.01) as u64);
    }

    /// A value sampled at 1e-10 weighs ten billion: its bucket is held at the most an aggregator's bucket takes,
    /// and the clamp is counted, rather than the aggregator refusing the whole series.
    #[test]
    fn a_bucket_is_held_below_what_the_aggregator_takes() {
        let mut w = Window::new(1, WindowLimits::default());
        feed(&mut w, &["lat:5|ms|@0.0000000001", "lat:5|ms", "lat:9|ms"]);
        let (snap, stats) = w.close();
        assert_eq!(
            stats.values_clamped, 2,
            "the heavy value, and the one after it in the full bucket"
        );
        let Some(pb::series::Value::Histogram(h)) = &find(&snap, "lat").value else {
            panic!()
        };
        let hist = decode(h);
        assert_eq!(hist.count_at(5_000), u64::from(u32::MAX));
        assert_eq!(hist.count_at(9_000), 1);
    }

    #[test]
    fn folder_rolls_on_second_boundaries() {
        // (call at second, expected closed second)
        let table: [(i64, Option<i64>); 5] = [
            (10, None),
            (10, None),
            (11, Some(10)),
            (14, Some(11)),
            // A clock stepped back (to the aggregator's): the open second closes rather than collecting the next ones.
            (13, Some(14)),
        ];
        let mut folder = Folder::new(10, WindowLimits::default());
        for (now, expected) in table {
            let closed = folder.roll(now, None).map(|(s, _)| s.second);
            assert_eq!(closed, expected, "roll at {now}");
        }
        assert_eq!(folder.open().second(), 13);
        // Stepped back onto seconds already closed: nothing new is opened for them.
        assert_eq!(folder.roll(11, None).map(|(s, _)| s.second), None);
        assert_eq!(folder.open().second(), 13);
        assert_eq!(folder.roll(15, None).map(|(s, _)| s.second), Some(13));
    }

    #[test]
    fn a_corrected_clock_never_stamps_a_second_the_aggregator_took() {
        let mut folder = Folder::new(110, WindowLimits::default());
        folder.roll(111, None);
        folder.roll(112, None);
        // The clock was 2 s ahead; 110 was taken, 111 sent and not yet acknowledged: the window stays after both...
        folder.restamp(-2, Some(110), false);
        assert_eq!(folder.open().second(), 112);
        // ...and gathers until the corrected clock passes it.
        assert!(folder.roll(110, Some(111)).is_none());
        assert!(folder.roll(111, Some(111)).is_none());
        assert_eq!(
            folder.roll(113, Some(111)).map(|(s, _)| s.second),
            Some(112)
        );

        // 10 s ahead and nothing taken (all refused for now, the shipper moves them by as much): the window moves
        // back and rolls on the corrected clock at once.
        let mut folder = Folder::new(110, WindowLimits::default());
        folder.roll(111, None);
        folder.roll(112, None);
        folder.restamp(-10, None, true);
        assert_eq!(folder.open().second(), 102);
        assert_eq!(folder.roll(103, None).map(|(s, _)| s.second), Some(102));
    }
}
