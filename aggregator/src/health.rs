//! The aggregator's own health: typed counters, gauges and histograms registered with `prometheus-client` and
//! exposed at `/metrics`. Every dropped or refused piece of data increments a counter here, labelled with a
//! [`DropReason`], as well as being logged. A leaf: imports only `model`'s plain data.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::model::AgentCounts;

/// Upper bounds (seconds) of the delay histograms' buckets; `+Inf` follows. Fine from 250 ms to 1 s, where seconds
/// seal when agents' snapshots arrive spread over a few hundred ms (a 300 ms spread seals at 300 to 400 ms).
const DELAY_BOUNDS: [f64; 19] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.75, 1.0, 1.5,
    2.5, 5.0,
];

/// Why a message was refused or a series dropped: the limit or rule it broke. The label value is the name of the
/// configuration value (or the rule) so an operator can find what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum DropReason {
    /// A hello without a complete identity.
    Identity,
    /// A name, tag or identity field over `max_name_bytes` or with control characters.
    MaxNameBytes,
    /// An agent token that is not configured.
    AgentTokens,
    /// A second further in the future than `max_future_skew`.
    MaxFutureSkew,
    /// A second older than `max_snapshot_age`.
    MaxSnapshotAge,
    /// Series past `max_series_per_snapshot`.
    MaxSeriesPerSnapshot,
    /// Tags past `max_tags_per_series`.
    MaxTagsPerSeries,
    /// A series without a value.
    MissingValue,
    /// A NaN or infinite counter or gauge (a negative counter delta is a decrement, and fine).
    FiniteValues,
    /// A histogram that is not uncompressed HdrHistogram V2.
    HdrV2Encoding,
    /// A histogram declaring more range, precision or scale than the limits.
    MaxHistogramValue,
    /// A histogram counting more values in one bucket than an accumulator's bucket holds (4,294,967,295).
    MaxBucketCount,
    /// A series whose kind or scale conflicts with the service's, or past `max_series_per_service`.
    SeriesConflictOrServiceLimit,
    /// A series sent by a dictionary id its stream never named (or could not name: `max_series_per_stream`).
    SeriesDictionary,
    /// A new series of a service that already has `max_series_per_service` (its cardinality limit).
    MaxSeriesPerService,
    /// A series whose merge would have taken its service's merged state past `max_decoded_bytes_per_service`.
    MaxDecodedBytesPerService,
    /// A series whose merge would have taken all services' merged state past `max_decoded_bytes`.
    MaxDecodedBytes,
}

impl DropReason {
    /// The label value, also sent to agents in a `Rejection`'s `limit`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DropReason::Identity => "identity",
            DropReason::MaxNameBytes => "max_name_bytes",
            DropReason::AgentTokens => "agent_tokens",
            DropReason::MaxFutureSkew => "max_future_skew",
            DropReason::MaxSnapshotAge => "max_snapshot_age",
            DropReason::MaxSeriesPerSnapshot => "max_series_per_snapshot",
            DropReason::MaxTagsPerSeries => "max_tags_per_series",
            DropReason::MissingValue => "value",
            DropReason::FiniteValues => "finite_values",
            DropReason::HdrV2Encoding => "hdr_v2_encoding",
            DropReason::MaxHistogramValue => "max_histogram_value",
            DropReason::MaxBucketCount => "max_bucket_count",
            DropReason::SeriesConflictOrServiceLimit => "series_conflict_or_max_series_per_service",
            DropReason::SeriesDictionary => "series_dictionary",
            DropReason::MaxSeriesPerService => "max_series_per_service",
            DropReason::MaxDecodedBytesPerService => "max_decoded_bytes_per_service",
            DropReason::MaxDecodedBytes => "max_decoded_bytes",
        }
    }
}

impl EncodeLabelValue for DropReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// What sealed a second (`strobe_seconds_sealed_by_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SealedBy {
    /// Every instance expected had reported it.
    Complete,
    /// Past its grace, its shard was silent for `grace_quiet` and the quorum had reported.
    Quiet,
    /// Past its grace, only a trickle still reached its shard (`grace_trickle`), and `1 - grace_trickle` of the
    /// instances expected had reported.
    Trickle,
    /// Its longest wait ran out (`grace_max`, or `grace_max_behind`).
    Longest,
}

impl EncodeLabelValue for SealedBy {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let value = match self {
            SealedBy::Complete => "complete",
            SealedBy::Quiet => "quiet",
            SealedBy::Trickle => "trickle",
            SealedBy::Longest => "longest_wait",
        };
        std::fmt::Write::write_str(encoder, value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SealLabels {
    by: SealedBy,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    limit: DropReason,
}

/// Which of an agent's own counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label values are the wire's field names
enum AgentCounter {
    lines_received,
    lines_malformed,
    series_over_limit,
    snapshots_dropped,
    values_clamped,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AgentLabels {
    service: String,
    counter: AgentCounter,
}

/// Counters and gauges about the aggregator itself.
pub(crate) struct Health {
    registry: Registry,
    /// Agent streams open now.
    pub(crate) agent_streams: Gauge,
    /// Agent streams replaying now, or behind after their replay and not caught up yet (their service's seconds wait
    /// for them, unless they stopped moving for `replay_stall` or their `replay_wait` ran out).
    pub(crate) agent_streams_catching_up: Gauge,
    /// Agent streams that were still behind the clock after a replay of at least 5 s.
    pub(crate) agent_streams_behind: Counter,
    /// Snapshots accepted into a second.
    pub(crate) snapshots_accepted: Counter,
    /// Replayed snapshots ignored because the (instance, second) was already merged.
    pub(crate) snapshots_duplicate: Counter,
    /// Snapshots older than the late window.
    pub(crate) snapshots_too_late: Counter,
    /// Seconds merged, sealed and published.
    pub(crate) seconds_sealed: Counter,
    /// Corrections published for already sealed seconds (late snapshots of one second within a tick count once).
    pub(crate) corrections: Counter,
    /// From a second's end to its sealing, in seconds.
    pub(crate) seal_delay: Histogram,
    /// From a second's end to a snapshot of it reaching its shard, in seconds.
    pub(crate) arrival_delay: Histogram,
    /// Websocket clients connected now.
    pub(crate) websocket_clients: Gauge,
    /// Live stream receivers now (set when rendering).
    websocket_subscribers: Gauge,
    /// When each shard last went round its loop, for `/healthz`.
    pub(crate) shard_beats: ShardBeats,
    /// How long the most silent shard has gone without going round its loop, in milliseconds, at the moment of
    /// rendering.
    shard_silent: Gauge,
    /// Frames not delivered to websocket clients that fell behind.
    pub(crate) websocket_frames_dropped: Counter,
    /// Webhook notifications delivered.
    pub(crate) webhook_delivered: Counter,
    /// Webhook notifications refused by the target (4xx).
    pub(crate) webhook_refused: Counter,
    /// Webhook notifications still failing at the deadline.
    pub(crate) webhook_gave_up: Counter,
    /// Webhook retries.
    pub(crate) webhook_retries: Counter,
    /// Webhook notifications dropped because their target's queue was full.
    pub(crate) webhook_dropped: Counter,
    /// Alert events the manager could not take (it stopped).
    pub(crate) alert_events_lost: Counter,
    /// Alert state saves that failed (the state file is behind until the next one succeeds).
    pub(crate) alert_state_save_failures: Counter,
    /// Service transitions that panicked (the service's state was dropped; the shard went on).
    pub(crate) service_panics: Counter,
    /// Shards restarted after a panic outside any service.
    pub(crate) shard_restarts: Counter,
    /// Hellos answered with a redirect to the service's owner.
    pub(crate) cluster_redirects: Counter,
    /// Hellos refused because membership is unknown (etcd unreachable) and the service is not here.
    pub(crate) cluster_refused: Counter,
    /// Services given to another node after a membership change.
    pub(crate) cluster_services_moved: Counter,
    /// Alert state writes not made because another node wrote the service's state since this one read it.
    pub(crate) cluster_alert_state_fenced: Counter,
    /// Live members in this node's view.
    pub(crate) cluster_members: Gauge,
    /// 1 while etcd answers.
    pub(crate) cluster_etcd_up: Gauge,
    /// Remote write samples taken by the storage.
    pub(crate) remote_write_sent: Counter,
    /// Remote write samples the storage refused (4xx other than 429).
    pub(crate) remote_write_failed: Counter,
    /// Remote write samples dropped because pending held max_pending_samples.
    pub(crate) remote_write_dropped: Counter,
    /// Remote write requests retried.
    pub(crate) remote_write_retries: Counter,
    /// Remote write samples waiting (for their second to be final, or for the storage).
    pub(crate) remote_write_pending: Gauge,
    /// Bytes of merged per-second state held now, all services (bounded by `max_decoded_bytes`).
    pub(crate) decoded_bytes: Gauge,
    /// Bytes of frames kept for backfill (set at each exposition).
    history_bytes: Gauge,
    /// Refused messages and dropped series, by the limit they hit.
    dropped: Family<DropLabels, Counter>,
    /// Service-seconds sealed, by what sealed them.
    sealed_by: Family<SealLabels, Counter>,
    /// The agents' own counters (inputs received, malformed, over limits), summed per service.
    agents: Family<AgentLabels, Counter>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Every metric at zero, registered under `strobe_`.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("strobe");
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let snapshots_accepted = counter("snapshots_accepted", "Snapshots merged into a second");
        let snapshots_duplicate = counter(
            "snapshots_duplicate",
            "Replayed snapshots ignored as already merged",
        );
        let snapshots_too_late =
            counter("snapshots_too_late", "Snapshots older than the late window");
        let seconds_sealed = counter("seconds_sealed", "Service-seconds sealed and published");
        let corrections = counter("corrections", "Corrections published for sealed seconds");
        let websocket_frames_dropped = counter(
            "websocket_frames_dropped",
            "Frames not delivered to lagging websocket clients",
        );
        let webhook_delivered = counter("webhook_delivered", "Webhook notifications delivered");
        let webhook_refused = counter(
            "webhook_refused",
            "Webhook notifications refused by the target (4xx)",
        );
        let webhook_gave_up = counter(
            "webhook_gave_up",
            "Webhook notifications still failing at the deadline",
        );
        let webhook_retries = counter("webhook_retries", "Webhook delivery retries");
        let webhook_dropped = counter(
            "webhook_dropped",
            "Webhook notifications dropped (the oldest) because their target's queue held max_queued_per_target",
        );
        let alert_events_lost = counter(
            "alert_events_lost",
            "Alert lifecycle events the alert manager could not take because it had stopped",
        );
        let alert_state_save_failures = counter(
            "alert_state_save_failures",
            "Writes of the alert state file that failed; until one succeeds, a restart restores older state",
        );
        let shard_restarts = counter(
            "shard_restarts",
            "Shards restarted after a panic outside any service's transition; their services' open seconds were lost",
        );
        let service_panics = counter(
            "service_panics",
            "Service transitions that panicked; the service's open seconds were dropped, its shard went on",
        );
        let remote_write_sent = counter(
            "remote_write_samples_sent",
            "Samples the remote write storage took",
        );
        let remote_write_failed = counter(
            "remote_write_samples_refused",
            "Samples the remote write storage refused (4xx other than 429); not sent again",
        );
        let remote_write_dropped = counter(
            "remote_write_samples_dropped",
            "Samples dropped (the oldest seconds) because max_pending_samples were waiting",
        );
        let remote_write_retries = counter(
            "remote_write_retries",
            "Remote write requests retried after a network error, 5xx or 429",
        );
        let cluster_redirects = counter(
            "cluster_redirects",
            "Agent hellos answered with a redirect to the service's owner",
        );
        let cluster_refused = counter(
            "cluster_refused",
            "Agent hellos refused while cluster membership (etcd) was unreachable, for services not already here",
        );
        let cluster_services_moved = counter(
            "cluster_services_moved",
            "Services given to another node after a membership change",
        );
        let agent_streams_behind = counter(
            "agent_streams_behind",
            "Agent streams still behind the clock after a replay of at least 5 s (waited for until they catch up, at most replay_wait)",
        );
        let cluster_alert_state_fenced = counter(
            "cluster_alert_state_fenced",
            "Alert state writes not made: another node wrote the service's state since this one read or wrote it",
        );
        let mut gauge = |name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let agent_streams = gauge("agent_streams", "Agent streams open now");
        let agent_streams_catching_up = gauge(
            "agent_streams_catching_up",
            "Agent streams replaying now, or behind the clock after their replay and not caught up yet (their service's seconds wait for them, while they move and for at most replay_wait)",
        );
        let websocket_clients = gauge("websocket_clients", "Websocket clients connected now");
        let websocket_subscribers = gauge("websocket_subscribers", "Live stream receivers now");
        let shard_silent = gauge(
            "shard_silent_milliseconds",
            "How long the most silent shard has gone without going round its loop, now (a healthy one ticks every 10 ms)",
        );
        let cluster_members = gauge(
            "cluster_members",
            "Live cluster members in this node's view",
        );
        let cluster_etcd_up = gauge(
            "cluster_etcd_up",
            "1 while etcd answers; 0 while it does not (this node then takes no new services)",
        );
        let remote_write_pending = gauge(
            "remote_write_pending_samples",
            "Samples waiting for their second to be final or for the storage",
        );
        let decoded_bytes = gauge(
            "decoded_bytes",
            "Bytes of merged per-second state (open and recent seconds) held now, all services together",
        );
        let history_bytes = gauge(
            "history_bytes",
            "Bytes of frames kept for backfill now, all services together (full seconds compressed): within max_history_bytes, past each service's newest frame of each kind",
        );
        let seal_delay = Histogram::new(DELAY_BOUNDS);
        registry.register(
            "seal_delay_seconds",
            "From the end of a service-second to its sealing",
            seal_delay.clone(),
        );
        let arrival_delay = Histogram::new(DELAY_BOUNDS);
        registry.register(
            "snapshot_arrival_delay_seconds",
            "From the end of a second to a snapshot of it reaching its shard",
            arrival_delay.clone(),
        );
        let sealed_by = Family::<SealLabels, Counter>::default();
        registry.register(
            "seconds_sealed_by",
            "Service-seconds sealed, by what sealed them: every instance expected reported (complete), past the \
             grace a silent shard with the quorum in (quiet) or only a trickle of late snapshots with \
             1 - grace_trickle in (trickle), or the longest wait ran out (longest_wait)",
            sealed_by.clone(),
        );
        let dropped = Family::<DropLabels, Counter>::default();
        registry.register(
            "dropped",
            "Messages refused or series dropped, by the limit hit",
            dropped.clone(),
        );
        let agents = Family::<AgentLabels, Counter>::default();
        registry.register(
            "agent_reported",
            "What agents count about their own inputs (lines received, malformed, series over their limits, \
             snapshots dropped from a full buffer, values clamped), summed per service over merged snapshots",
            agents.clone(),
        );
        Self {
            registry,
            agents,
            cluster_redirects,
            cluster_refused,
            cluster_services_moved,
            cluster_alert_state_fenced,
            cluster_members,
            cluster_etcd_up,
            remote_write_sent,
            remote_write_failed,
            remote_write_dropped,
            remote_write_retries,
            remote_write_pending,
            decoded_bytes,
            history_bytes,
            agent_streams,
            agent_streams_catching_up,
            agent_streams_behind,
            snapshots_accepted,
            snapshots_duplicate,
            snapshots_too_late,
            seconds_sealed,
            corrections,
            seal_delay,
            arrival_delay,
            websocket_clients,
            websocket_subscribers,
            shard_beats: ShardBeats::default(),
            shard_silent,
            websocket_frames_dropped,
            webhook_delivered,
            webhook_refused,
            webhook_gave_up,
            webhook_dropped,
            webhook_retries,
            alert_events_lost,
            alert_state_save_failures,
            service_panics,
            shard_restarts,
            dropped,
            sealed_by,
        }
    }

    /// Counts a sealed second by what sealed it.
    pub(crate) fn count_sealed_by(&self, by: SealedBy) {
        self.sealed_by.get_or_create(&SealLabels { by }).inc();
    }

    /// Counts `n` items dropped for `reason`.
    pub(crate) fn count_dropped(&self, reason: DropReason, n: u64) {
        self.dropped
            .get_or_create(&DropLabels { limit: reason })
            .inc_by(n);
    }

    /// Adds one merged snapshot's agent counters to its service's sums.
    pub(crate) fn count_agent(&self, service: &str, counts: &AgentCounts) {
        for (counter, n) in [
            (AgentCounter::lines_received, counts.lines_received),
            (AgentCounter::lines_malformed, counts.lines_malformed),
            (AgentCounter::series_over_limit, counts.series_over_limit),
            (AgentCounter::snapshots_dropped, counts.snapshots_dropped),
            (AgentCounter::values_clamped, counts.values_clamped),
        ] {
            if n > 0 {
                let labels = AgentLabels {
                    service: service.to_owned(),
                    counter,
                };
                self.agents.get_or_create(&labels).inc_by(n);
            }
        }
    }

    /// The exposition (OpenMetrics text, which Prometheus scrapes), with `subscribers` live receivers and
    /// `history_bytes` of frames kept for backfill now.
    pub(crate) fn render(&self, subscribers: usize, history_bytes: usize) -> String {
        self.websocket_subscribers
            .set(i64::try_from(subscribers).unwrap_or(i64::MAX));
        self.history_bytes
            .set(i64::try_from(history_bytes).unwrap_or(i64::MAX));
        let silent = self.shard_beats.silent_at(Instant::now());
        self.shard_silent.set(
            silent
                .iter()
                .map(|(_, d)| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .max()
                .unwrap_or(0),
        );
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(message = "Metrics exposition failed.", %error);
        }
        out
    }
}

/// Milliseconds as the seconds the delay histograms take.
pub(crate) fn millis_as_seconds(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

/// When each shard last went round its loop (it ticks every 10 ms), for `/healthz`: a shard stuck in one call (a
/// merge that never ends, a lock never released) or never scheduled (its runtime wedged) stops ticking, and the
/// liveness probe then fails, so Kubernetes restarts the aggregator. HTTP runs on threads of its own, so without this
/// `/healthz` would answer while ingest stood still.
#[derive(Debug)]
pub(crate) struct ShardBeats {
    origin: Instant,
    /// Set once, when the shards start.
    watched: OnceLock<Watched>,
}

#[derive(Debug)]
struct Watched {
    /// Milliseconds after `origin` of each shard's last tick.
    beats: Box<[AtomicU64]>,
    /// A shard silent longer than this is stalled.
    stall: Duration,
}

impl Default for ShardBeats {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            watched: OnceLock::new(),
        }
    }
}

impl ShardBeats {
    /// Watches `count` shards, each counted as having ticked now; one silent for longer than `stall` is stalled.
    /// Only the first call counts.
    pub(crate) fn watch(&self, count: usize, stall: Duration) {
        let now = self.since_origin(Instant::now());
        let _ = self.watched.set(Watched {
            beats: (0..count).map(|_| AtomicU64::new(now)).collect(),
            stall,
        });
    }

    /// Shard `index` went round its loop.
    pub(crate) fn beat(&self, index: usize) {
        self.beat_at(index, Instant::now());
    }

    fn beat_at(&self, index: usize, at: Instant) {
        if let Some(beat) = self.watched.get().and_then(|w| w.beats.get(index)) {
            beat.store(self.since_origin(at), Ordering::Relaxed);
        }
    }

    fn since_origin(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// Each shard and how long it has been silent at `now`.
    fn silent_at(&self, now: Instant) -> Vec<(usize, Duration)> {
        let now = self.since_origin(now);
        self.watched.get().map_or_else(Vec::new, |watched| {
            watched
                .beats
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let silent = now.saturating_sub(b.load(Ordering::Relaxed));
                    (i, Duration::from_millis(silent))
                })
                .collect()
        })
    }

    /// The shards silent for longer than the stall bound now, with how long.
    pub(crate) fn stalled(&self) -> Vec<(usize, Duration)> {
        self.stalled_at(Instant::now())
    }

    fn stalled_at(&self, now: Instant) -> Vec<(usize, Duration)> {
        let Some(stall) = self.watched.get().map(|w| w.stall) else {
            return Vec::new();
        };
        self.silent_at(now)
            .into_iter()
            .filter(|(_, silent)| *silent > stall)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard that stops ticking is stalled once silent past the bound, and not before; ticking again clears it.
    #[test]
    fn a_shard_silent_past_the_bound_is_stalled_until_it_ticks_again() {
        let beats = ShardBeats::default();
        assert!(beats.stalled().is_empty(), "nothing watched yet");
        beats.watch(3, Duration::from_secs(10));
        beats.watch(1, Duration::from_millis(1));
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert!(
            beats.stalled_at(at(9_000)).is_empty(),
            "the first watch counts"
        );
        for shard in 0..3 {
            beats.beat_at(shard, at(5_000));
        }
        beats.beat_at(7, at(5_000));
        beats.beat_at(1, at(14_000));
        beats.beat_at(2, at(15_000));
        // Shard 0 last ticked at 5 s: at 15.5 s it has been silent 10.5 s.
        let stalled = beats.stalled_at(at(15_500));
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert_eq!(stalled[0].0, 0);
        assert!(stalled[0].1 >= Duration::from_millis(10_400), "{stalled:?}");
        beats.beat_at(0, at(15_600));
        assert!(beats.stalled_at(at(15_700)).is_empty());
        let longest = beats
            .silent_at(at(16_000))
            .into_iter()
            .map(|(_, d)| d)
            .max();
        assert!(longest >= Some(Duration::from_millis(1_900)), "{longest:?}");
    }

    #[test]
    fn seal_delays_render_as_a_cumulative_prometheus_histogram() {
        let health = Health::default();
        for ms in [3, 5, 40, 260, 340, 9000] {
            health.seal_delay.observe(millis_as_seconds(ms));
        }
        health.count_dropped(DropReason::FiniteValues, 3);
        let counts = AgentCounts {
            lines_malformed: 2,
            ..AgentCounts::default()
        };
        health.count_agent("checkout", &counts);
        health.count_agent("checkout", &counts);
        health.count_sealed_by(SealedBy::Trickle);
        health.count_sealed_by(SealedBy::Longest);
        health.count_sealed_by(SealedBy::Trickle);
        let text = health.render(0, 0);
        for line in [
            "# TYPE strobe_seal_delay_seconds histogram",
            "strobe_seal_delay_seconds_bucket{le=\"0.005\"} 2",
            "strobe_seal_delay_seconds_bucket{le=\"0.05\"} 3",
            "strobe_seal_delay_seconds_bucket{le=\"0.25\"} 3",
            "strobe_seal_delay_seconds_bucket{le=\"0.3\"} 4",
            "strobe_seal_delay_seconds_bucket{le=\"0.35\"} 5",
            "strobe_snapshot_arrival_delay_seconds_count 0",
            "strobe_seal_delay_seconds_bucket{le=\"0.5\"} 5",
            "strobe_seal_delay_seconds_bucket{le=\"5.0\"} 5",
            "strobe_seal_delay_seconds_bucket{le=\"+Inf\"} 6",
            "strobe_seal_delay_seconds_sum 9.648",
            "strobe_seal_delay_seconds_count 6",
            "strobe_dropped_total{limit=\"finite_values\"} 3",
            "strobe_websocket_subscribers 0",
            "strobe_agent_reported_total{service=\"checkout\",counter=\"lines_malformed\"} 4",
            "strobe_seconds_sealed_by_total{by=\"trickle\"} 2",
            "strobe_seconds_sealed_by_total{by=\"longest_wait\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
