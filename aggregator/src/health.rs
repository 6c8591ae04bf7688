//! The aggregator's own counters, exposed in Prometheus text format at `/metrics`. Every dropped or refused
//! piece of data increments a counter here as well as being logged.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use dashmap::DashMap;

/// Upper bounds (milliseconds) of the delay histograms' buckets; the last bucket is `+Inf`.
const DELAY_BOUNDS_MS: [u64; 12] = [5, 10, 25, 50, 100, 150, 200, 250, 500, 1000, 2500, 5000];

/// A Prometheus histogram of delays after the end of a second.
#[derive(Debug, Default)]
pub struct DelayHistogram {
    /// Per bucket (not cumulative), the last for larger delays.
    buckets: [AtomicU64; DELAY_BOUNDS_MS.len() + 1],
    sum_ms: AtomicU64,
}

impl DelayHistogram {
    /// Records one delay.
    pub fn observe(&self, delay_ms: u64) {
        let bucket = DELAY_BOUNDS_MS
            .iter()
            .position(|bound| delay_ms <= *bound)
            .unwrap_or(DELAY_BOUNDS_MS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(delay_ms, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = DELAY_BOUNDS_MS
                .get(i)
                .map_or("+Inf".to_owned(), |ms| format!("{}", *ms as f64 / 1000.0));
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Counters and gauges about the aggregator itself.
#[derive(Debug, Default)]
pub struct Health {
    /// Agent streams open now.
    pub agent_streams: AtomicI64,
    /// Snapshots accepted into a second.
    pub snapshots_accepted: AtomicU64,
    /// Replayed snapshots ignored because the (instance, second) was already merged.
    pub snapshots_duplicate: AtomicU64,
    /// Snapshots older than the late window.
    pub snapshots_too_late: AtomicU64,
    /// Seconds merged, sealed and published.
    pub seconds_sealed: AtomicU64,
    /// Corrections published for already sealed seconds (late snapshots of one second within a tick count once).
    pub corrections: AtomicU64,
    /// From a second's end to its sealing.
    pub seal_delay: DelayHistogram,
    /// From a second's end to a snapshot of it reaching its shard.
    pub arrival_delay: DelayHistogram,
    /// Websocket clients connected now.
    pub websocket_clients: AtomicI64,
    /// Frames not delivered to websocket clients that fell behind.
    pub websocket_frames_dropped: AtomicU64,
    /// Webhook notifications delivered.
    pub webhook_delivered: AtomicU64,
    /// Webhook notifications refused by the target (4xx).
    pub webhook_refused: AtomicU64,
    /// Webhook notifications still failing at the deadline.
    pub webhook_gave_up: AtomicU64,
    /// Webhook retries.
    pub webhook_retries: AtomicU64,
    /// Refused messages and dropped series, by the limit they hit.
    pub dropped: DashMap<&'static str, AtomicU64>,
}

impl Health {
    /// Counts `n` items dropped for `limit`.
    pub fn count_dropped(&self, limit: &'static str, n: u64) {
        self.dropped
            .entry(limit)
            .or_default()
            .fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, subscribers: usize) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        metric(
            "strobe_agent_streams",
            "gauge",
            "Agent streams open now.",
            self.agent_streams.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "strobe_snapshots_accepted_total",
            "counter",
            "Snapshots merged into a second.",
            get(&self.snapshots_accepted),
        );
        metric(
            "strobe_snapshots_duplicate_total",
            "counter",
            "Replayed snapshots ignored as already merged.",
            get(&self.snapshots_duplicate),
        );
        metric(
            "strobe_snapshots_too_late_total",
            "counter",
            "Snapshots older than the late window.",
            get(&self.snapshots_too_late),
        );
        metric(
            "strobe_seconds_sealed_total",
            "counter",
            "Service-seconds sealed and published.",
            get(&self.seconds_sealed),
        );
        metric(
            "strobe_corrections_total",
            "counter",
            "Corrections published for sealed seconds.",
            get(&self.corrections),
        );
        metric(
            "strobe_websocket_clients",
            "gauge",
            "Websocket clients connected now.",
            self.websocket_clients.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "strobe_websocket_subscribers",
            "gauge",
            "Live stream receivers now.",
            subscribers.to_string(),
        );
        metric(
            "strobe_websocket_frames_dropped_total",
            "counter",
            "Frames not delivered to lagging websocket clients.",
            get(&self.websocket_frames_dropped),
        );
        metric(
            "strobe_webhook_delivered_total",
            "counter",
            "Webhook notifications delivered.",
            get(&self.webhook_delivered),
        );
        metric(
            "strobe_webhook_refused_total",
            "counter",
            "Webhook notifications refused by the target (4xx).",
            get(&self.webhook_refused),
        );
        metric(
            "strobe_webhook_gave_up_total",
            "counter",
            "Webhook notifications still failing at the deadline.",
            get(&self.webhook_gave_up),
        );
        metric(
            "strobe_webhook_retries_total",
            "counter",
            "Webhook delivery retries.",
            get(&self.webhook_retries),
        );
        self.seal_delay.render(
            &mut out,
            "strobe_seal_delay_seconds",
            "From the end of a service-second to its sealing.",
        );
        self.arrival_delay.render(
            &mut out,
            "strobe_snapshot_arrival_delay_seconds",
            "From the end of a second to a snapshot of it reaching its shard.",
        );
        let _ = writeln!(
            out,
            "# HELP strobe_dropped_total Messages refused or series dropped, by the limit hit.\n# TYPE strobe_dropped_total counter"
        );
        let mut dropped: Vec<(&str, u64)> = self
            .dropped
            .iter()
            .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
            .collect();
        dropped.sort();
        for (limit, n) in dropped {
            let _ = writeln!(out, "strobe_dropped_total{{limit=\"{limit}\"}} {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_delays_render_as_a_cumulative_prometheus_histogram() {
        let health = Health::default();
        for ms in [3, 5, 40, 260, 260, 9000] {
            health.seal_delay.observe(ms);
        }
        let text = health.render(0);
        for line in [
            "# TYPE strobe_seal_delay_seconds histogram",
            "strobe_seal_delay_seconds_bucket{le=\"0.005\"} 2",
            "strobe_seal_delay_seconds_bucket{le=\"0.05\"} 3",
            "strobe_seal_delay_seconds_bucket{le=\"0.25\"} 3",
            "strobe_snapshot_arrival_delay_seconds_count 0",
            "strobe_seal_delay_seconds_bucket{le=\"0.5\"} 5",
            "strobe_seal_delay_seconds_bucket{le=\"5\"} 5",
            "strobe_seal_delay_seconds_bucket{le=\"+Inf\"} 6",
            "strobe_seal_delay_seconds_sum 9.568",
            "strobe_seal_delay_seconds_count 6",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
