//! The pure kernels of the hot path behind a deliberately small surface, so `benches/` can measure them without
//! the crate's internal types becoming public API. Nothing in the product calls this module.

use std::sync::Arc;

use strobe_proto as pb;

use crate::alerting::canary::inputs::InstanceCounts;
use crate::alerting::canary::{Canary, CanarySettings, VerdictState, VersionSecond};
use crate::alerting::rules::config::parse_rules;
use crate::alerting::rules::{Evaluator, RuleSet};
use crate::ingest::validate::{StreamDictionary, validate_snapshot};
use crate::limits::Limits;
use crate::model::hdr::{CheckedV2, HdrAccumulator};
use crate::model::table::{SeriesTable, SeriesTables};
use crate::model::{Instance, InstanceSecond, MainMetrics, SealedSecond};
use crate::pipeline::windows::{Arrivals, ServiceWindows};
use crate::publish::Hub;

pub use crate::pipeline::windows::WindowSettings;

/// Who sent a snapshot, as ingest knows it after the hello.
#[derive(Debug, Clone)]
pub struct Sender(Arc<Instance>, Arc<SeriesTable>);

impl Sender {
    /// An instance of `service` running `version` in `zone`; the senders of one service share its series table.
    pub fn new(service: &str, id: &str, version: &str, zone: Option<&str>) -> Self {
        static TABLES: std::sync::OnceLock<SeriesTables> = std::sync::OnceLock::new();
        let service: Arc<str> = service.into();
        let table = TABLES
            .get_or_init(|| SeriesTables::new(Limits::default().max_series_per_service))
            .of(&service);
        let instance = Instance {
            service,
            id: id.into(),
            version: version.into(),
            zone: zone.map(Into::into),
            deployer: None,
        };
        Self(Arc::new(instance), table)
    }
}

/// A snapshot that passed validation, ready to merge.
#[derive(Debug, Clone)]
pub struct Validated(InstanceSecond);

/// Validates one snapshot as ingest does, against the default limits, at `now_second`.
pub fn validate(snapshot: pb::Snapshot, sender: &Sender, now_second: i64) -> Option<Validated> {
    validate_snapshot(
        snapshot,
        &sender.0,
        &mut StreamDictionary::new(sender.1.clone()),
        &Limits::default(),
        now_second,
    )
    .ok()
    .map(|v| Validated(v.second))
}

/// Merges every snapshot into one service's windows and seals everything; returns the series of the sealed
/// seconds (overall and split).
pub fn merge_and_seal(service: &str, settings: WindowSettings, snapshots: Vec<Validated>) -> usize {
    seal_all(service, settings, snapshots)
        .iter()
        .map(|s| s.series.len())
        .sum()
}

/// Merges every snapshot into one service's windows and seals every second they cover; returns the windows (which
/// keep the sealed seconds for corrections) and what was sealed.
fn merged_and_sealed(
    service: &str,
    settings: WindowSettings,
    snapshots: Vec<Validated>,
) -> (ServiceWindows, Vec<SealedSecond>) {
    let mut windows = ServiceWindows::new(service.into(), settings);
    for snapshot in snapshots {
        windows.apply(snapshot.0, 0);
    }
    let sealed = windows
        .seal_ready(i64::MAX / 2, &Arrivals::default())
        .into_iter()
        .map(|s| s.second)
        .collect();
    (windows, sealed)
}

/// Merges every snapshot into one service's windows and seals every second they cover.
fn seal_all(
    service: &str,
    settings: WindowSettings,
    snapshots: Vec<Validated>,
) -> Vec<SealedSecond> {
    merged_and_sealed(service, settings, snapshots).1
}

/// HdrHistogram V2 encodings checked as ingest checks them (header, then every varint, no allocation).
#[derive(Debug, Clone)]
pub struct CheckedHistograms(Vec<CheckedV2>);

impl CheckedHistograms {
    /// Checks every encoding; those that fail are left out.
    pub fn check(encodings: &[bytes::Bytes]) -> Self {
        let limits = Limits::default();
        Self(
            encodings
                .iter()
                .filter_map(|bytes| {
                    CheckedV2::check(
                        bytes.clone(),
                        u32::from(limits.max_histogram_sigfig),
                        limits.max_histogram_value,
                    )
                    .ok()
                })
                .collect(),
        )
    }

    /// Encodings that passed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none passed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Merges checked encodings straight from their bytes into one fixed-layout accumulator, as a shard does;
/// returns the values counted.
pub fn merge_checked(histograms: &CheckedHistograms) -> u64 {
    let mut acc = HdrAccumulator::default();
    for v2 in &histograms.0 {
        acc.add_v2(v2);
    }
    acc.total()
}

/// Accumulators enough that merging into each in turn finds its counts out of the caches, as a shard finds a
/// cell's when thousands of cells take snapshots in between.
#[derive(Debug)]
pub struct ColdAccumulators {
    accumulators: Vec<HdrAccumulator>,
    next: usize,
}

impl ColdAccumulators {
    /// `count` empty accumulators.
    pub fn new(count: usize) -> Self {
        Self {
            accumulators: vec![HdrAccumulator::default(); count.max(1)],
            next: 0,
        }
    }

    /// Merges each checked encoding into the next accumulator in turn; returns the sum of their totals after each
    /// merge, only for the benchmark to consume.
    pub fn merge(&mut self, histograms: &CheckedHistograms) -> u64 {
        let mut held = 0;
        for v2 in &histograms.0 {
            let at = self.next;
            self.next = (at + 1) % self.accumulators.len();
            let acc = &mut self.accumulators[at];
            acc.add_v2(v2);
            held += acc.total();
        }
        held
    }
}

/// One service's windows holding a sealed second, as a correction finds it.
#[derive(Debug)]
pub struct CorrectionBench {
    windows: ServiceWindows,
    t: i64,
}

impl CorrectionBench {
    /// Merges and seals `snapshots` of one service, keeping its windows and the first second sealed.
    pub fn seal(
        service: &str,
        settings: WindowSettings,
        snapshots: Vec<Validated>,
    ) -> Option<Self> {
        let (windows, sealed) = merged_and_sealed(service, settings, snapshots);
        let t = sealed.first()?.t;
        Some(Self { windows, t })
    }

    /// Summarises the sealed second again, as a correction does; returns its merged series (every split).
    pub fn correct(&self) -> usize {
        self.windows
            .corrected(self.t)
            .map_or(0, |sealed| sealed.second.series.len())
    }
}

/// A sealed second, ready for rule evaluation.
#[derive(Debug)]
pub struct SealedBench(SealedSecond);

impl SealedBench {
    /// Merges and seals `snapshots` of one service, as [`merge_and_seal`] does, keeping the result.
    pub fn seal(
        service: &str,
        settings: WindowSettings,
        snapshots: Vec<Validated>,
    ) -> Option<Self> {
        seal_all(service, settings, snapshots)
            .into_iter()
            .next()
            .map(Self)
    }

    /// Merged series in the second (every split).
    pub fn series(&self) -> usize {
        self.0.series.len()
    }

    /// Stamps the second as second `t` (to feed one second as a run of seconds).
    pub fn set_second(&mut self, t: i64) {
        self.0.t = t;
    }

    /// Second `t` of one large service, as sealing summarises it: `tag_sets` routes x status classes, each with a
    /// request counter, an error counter and a latency histogram (in ms), merged over all instances, over each of
    /// two versions and over each of two zones: 15 x `tag_sets` merged series. One tag set in `breaching_every` has
    /// a high p99 (900 ms, else 120) and a high error ratio (10%, else 0.5%), for rules to fire on.
    pub fn synthetic(t: i64, tag_sets: usize, breaching_every: usize) -> Self {
        use crate::model::{SeriesSummary, Stats};
        let service: Arc<str> = "large".into();
        // (version, zone) of each split.
        let splits = [
            (None, None),
            (Some("v1"), None),
            (Some("v2"), None),
            (None, Some("z1")),
            (None, Some("z2")),
        ]
        .map(|(v, z): (Option<&str>, Option<&str>)| {
            (v.map(Arc::<str>::from), z.map(Arc::<str>::from))
        });
        let metrics: [Arc<str>; 3] = [
            "http.server.requests".into(),
            "http.server.errors".into(),
            "http.server.duration".into(),
        ];
        let (route, status): (Arc<str>, Arc<str>) = ("route".into(), "status".into());
        let mut series = Vec::with_capacity(tag_sets * 15);
        for i in 0..tag_sets {
            let tags: Arc<std::collections::BTreeMap<Arc<str>, Arc<str>>> = Arc::new(
                [
                    (route.clone(), Arc::from(format!("/r{}", i / 5))),
                    (status.clone(), Arc::from(format!("{}xx", 1 + i % 5))),
                ]
                .into(),
            );
            let bad = breaching_every > 0 && i % breaching_every == 0;
            for (version, zone) in &splits {
                let requests = 1000.0;
                let stats = [
                    Stats::Counter { sum: requests },
                    Stats::Counter {
                        sum: requests * if bad { 0.1 } else { 0.005 },
                    },
                    Stats::Histogram {
                        count: 1000,
                        mean: 40.0,
                        p50: 30.0,
                        p90: 80.0,
                        p99: if bad { 900.0 } else { 120.0 },
                        p999: 1000.0,
                        max: 1200.0,
                    },
                ];
                for (metric, stats) in metrics.iter().zip(stats) {
                    series.push(SeriesSummary {
                        service: service.clone(),
                        metric: metric.clone(),
                        tags: tags.clone(),
                        version: version.clone(),
                        zone: zone.clone(),
                        instances: 100,
                        stats,
                    });
                }
            }
        }
        Self(SealedSecond {
            service,
            t,
            correction: false,
            series,
            instances: Vec::new(),
        })
    }
}

/// A rules file, parsed and validated.
#[derive(Debug)]
pub struct Rules(RuleSet);

impl Rules {
    /// Parses a rules file (TOML).
    pub fn parse(source: &str) -> Option<Self> {
        parse_rules(source).ok().map(Self)
    }
}

/// Evaluates every rule on a sealed second, as a shard does; returns the alert events it produced.
pub fn evaluate(rules: &Rules, sealed: &SealedBench, evaluator: &mut RuleEvaluator) -> usize {
    evaluator.0.on_sealed(&rules.0, &sealed.0, 0).len()
}

/// One service's rule state across seconds.
#[derive(Debug, Default)]
pub struct RuleEvaluator(Evaluator);

/// The publishing side with `subscribers` live receivers, for the frame fan-out kernel.
pub struct FanOut {
    hub: Hub,
    receivers: Vec<crate::publish::LiveReceiver>,
}

impl FanOut {
    /// A hub and `subscribers` receivers of every frame.
    pub fn new(subscribers: usize) -> Self {
        let hub = Hub::new(Default::default(), 4096, MainMetrics::default());
        let receivers = (0..subscribers)
            .map(|_| {
                hub.subscribe(crate::publish::Seconds::All, |_, _| false, |_| false)
                    .0
            })
            .collect();
        Self { hub, receivers }
    }

    /// Serialises `sealed` once (its frame and its overview), stores and broadcasts it, then lets every receiver
    /// take what it was sent; returns the frames received.
    pub fn publish(&mut self, sealed: &SealedBench) -> usize {
        self.hub.publish_second(sealed.0.clone());
        let mut received = 0;
        for receiver in &mut self.receivers {
            while receiver.try_recv().is_ok() {
                received += 1;
            }
        }
        received
    }
}

/// One version's numbers in one second, as the canary receives them from a sealed second.
#[derive(Debug, Clone)]
pub struct VersionInput {
    /// Instances that reported.
    pub instances: u32,
    /// Requests.
    pub requests: f64,
    /// Failed requests.
    pub errors: f64,
    /// The merged latency histogram, in recorded units, with how many recorded units make a millisecond.
    pub latency: Option<(hdrhistogram::Histogram<u64>, u32)>,
    /// Each instance's requests and errors (empty: not counted per instance).
    pub per_instance: Vec<(f64, f64)>,
}

/// A verdict change as the benchmarks read it: candidate, state (as the API names it), and the check that made it
/// bad.
pub type VerdictChange = (String, &'static str, Option<&'static str>);

/// One service's canary, fed second by second as a shard feeds it.
#[derive(Debug)]
pub struct CanaryRun {
    canary: Canary,
    settings: CanarySettings,
    service: Arc<str>,
}

impl CanaryRun {
    /// A canary with `settings`.
    pub fn new(settings: CanarySettings) -> Self {
        Self {
            canary: Canary::default(),
            settings,
            service: "svc".into(),
        }
    }

    /// Feeds second `t` (each version's numbers); returns the verdicts that changed.
    pub fn observe(&mut self, t: i64, versions: Vec<(String, VersionInput)>) -> Vec<VerdictChange> {
        let seconds = versions
            .into_iter()
            .map(|(version, v)| {
                let second = VersionSecond {
                    instances: v.instances,
                    requests: v.requests,
                    errors: v.errors,
                    latency: v.latency,
                    deployer: None,
                    per_instance: v
                        .per_instance
                        .into_iter()
                        .enumerate()
                        .map(|(i, (requests, errors))| InstanceCounts {
                            id: Arc::from(format!("{version}-{i}")),
                            requests,
                            errors,
                        })
                        .collect(),
                };
                (Arc::from(version), second)
            })
            .collect();
        self.canary
            .observe(&self.service, t, seconds, &self.settings)
            .into_iter()
            .map(|v| {
                let state = match v.state {
                    VerdictState::Collecting => "collecting",
                    VerdictState::InsufficientTraffic => "insufficient_traffic",
                    VerdictState::Healthy => "healthy",
                    VerdictState::Bad => "bad",
                    VerdictState::Promoted => "promoted",
                    VerdictState::RolledBack => "rolled_back",
                };
                (v.candidate.to_string(), state, v.reason.map(|r| r.metric))
            })
            .collect()
    }
}
