//! Criterion benchmarks of the hot kernels: DogStatsD parsing and folding, validation, merging histograms from their
//! V2 bytes (against `hdrhistogram`'s deserialize + `add`), sealing, rule evaluation and frame fan-out on a second of
//! 100k series. Inputs are built outside the measured loops.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use strobe_agent::statsd::{ParseLimits, parse_packet};
use strobe_agent::{Window, WindowLimits};
use strobe_aggregator::kernels::{self, Sender, WindowSettings};
use strobe_proto as pb;
use strobe_sim::sim::{Behavior, simulate_second};

fn packet() -> Vec<u8> {
    let mut p = String::new();
    for i in 0..20 {
        p.push_str(&format!(
            "request.latency:{}.5|ms|#route:/pay,status:200\n",
            10 + i
        ));
        p.push_str("request.count:1|c|#route:/pay\n");
    }
    p.into_bytes()
}

fn statsd(c: &mut Criterion) {
    let packet = packet();
    let lines = packet.iter().filter(|b| **b == b'\n').count() as u64;
    let limits = ParseLimits::default();
    let mut group = c.benchmark_group("statsd");
    group.throughput(Throughput::Elements(lines));
    group.bench_function("parse_packet_40_lines", |b| {
        b.iter(|| {
            let mut n = 0;
            parse_packet(black_box(&packet), &limits, |l| n += l.is_ok() as usize);
            n
        })
    });
    group.bench_function("parse_and_fold_40_lines", |b| {
        let mut window = Window::new(0, WindowLimits::default());
        b.iter(|| {
            parse_packet(black_box(&packet), &limits, |l| {
                if let Ok(line) = l {
                    window.record(&line);
                }
            })
        })
    });
    group.finish();
}

/// One simulated instance-second: counters and a latency histogram of ~200 samples.
fn instance_snapshot(seed: u64, second: i64) -> pb::Snapshot {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut window = Window::new(second, WindowLimits::default());
    simulate_second(
        &mut window,
        &Behavior::HEALTHY,
        strobe_sim::traffic::SecondShock::NONE,
        &mut rng,
    );
    window.close().0
}

/// A snapshot of second 100 that names `n` counters as an agent's first snapshot on a stream does: ids from 1,
/// names and tags (a route and a status class) in full.
fn naming_snapshot(n: usize) -> pb::Snapshot {
    let tag = |key: &str, value: String| pb::Tag {
        key: key.into(),
        value,
    };
    let series = (0..n)
        .map(|i| pb::Series {
            id: u32::try_from(i + 1).expect("a hundred ids"),
            name: ["http.requests", "http.errors", "jobs.done", "cache.hits"][i % 4].into(),
            tags: vec![
                tag("route", format!("/api/v1/route-{:02}", i / 8)),
                tag("status", ["2xx", "5xx"][(i / 4) % 2].into()),
            ],
            value: Some(pb::series::Value::Counter(i as f64)),
        })
        .collect();
    pb::Snapshot {
        second: 100,
        series,
        stats: None,
    }
}

fn aggregator(c: &mut Criterion) {
    let instances: Vec<Sender> = (0..100)
        .map(|i| {
            Sender::new(
                "svc",
                &format!("i{i}"),
                if i % 10 == 0 { "v2" } else { "v1" },
                Some(if i % 2 == 0 { "z1" } else { "z2" }),
            )
        })
        .collect();
    let snapshots: Vec<pb::Snapshot> = (0..100).map(|i| instance_snapshot(i, 100)).collect();
    let mut group = c.benchmark_group("aggregator");
    group.throughput(Throughput::Elements(1));
    group.bench_function("validate_snapshot_with_histogram", |b| {
        b.iter_batched(
            || snapshots[0].clone(),
            |s| kernels::validate(s, &instances[0], 100),
            BatchSize::SmallInput,
        )
    });
    // A stream's first snapshot names every series it sends (an agent that reconnects, or a whole fleet after
    // the aggregator restarts): 100 series of two tags each, all of them already in the service's table.
    let naming = naming_snapshot(100);
    kernels::validate(naming.clone(), &instances[1], 100).expect("a valid snapshot");
    group.bench_function("first_snapshot_of_a_stream_naming_100_known_series", |b| {
        b.iter_batched(
            || naming.clone(),
            |s| kernels::validate(s, &instances[1], 100),
            BatchSize::SmallInput,
        )
    });
    let validated: Vec<_> = snapshots
        .iter()
        .zip(&instances)
        .map(|(s, i)| kernels::validate(s.clone(), i, 100).expect("a valid snapshot"))
        .collect();
    group.throughput(Throughput::Elements(validated.len() as u64));
    group.bench_function("merge_and_seal_100_instances", |b| {
        let settings = WindowSettings {
            grace_ms: 250,
            grace_quiet_ms: 50,
            grace_quorum: 0.9,
            grace_trickle: 0.05,
            grace_max_ms: 1000,
            grace_max_behind_ms: 3000,
            late_window_secs: 10,
            replay_gather_ms: 6_000,
            replay_stall_ms: 10_000,
            replay_wait_ms: 120_000,
            max_cells: 150_000,
            max_bytes: usize::MAX,
        };
        b.iter_batched(
            || validated.clone(),
            |seconds| kernels::merge_and_seal("svc", settings, seconds),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// V2 encodings of `n` values each (lognormal-ish latencies in microseconds), as agents send them.
fn encodings(count: usize, n: usize) -> Vec<bytes::Bytes> {
    let mut rng = SmallRng::seed_from_u64(n as u64);
    (0..count)
        .map(|_| {
            let mut h = Histogram::<u64>::new(2).expect("two digits");
            for _ in 0..n {
                let ms: f64 = rng.random_range(1.0_f64..6.0).exp();
                h.record((ms * 1000.0) as u64).expect("auto-resizing");
            }
            let mut out = Vec::new();
            V2Serializer::new()
                .serialize(&h, &mut out)
                .expect("in memory");
            out.into()
        })
        .collect()
}

/// Merging histograms: Strobe's straight-from-bytes merge against `hdrhistogram`'s deserialize + `add`.
fn histogram_merge(c: &mut Criterion) {
    let mut group = c.benchmark_group("histogram_merge");
    for values in [100, 1_000, 10_000] {
        let inputs = encodings(100, values);
        group.throughput(Throughput::Elements(inputs.len() as u64));
        group.bench_function(format!("strobe_check_at_ingest_{values}_values"), |b| {
            b.iter(|| kernels::CheckedHistograms::check(black_box(&inputs)).len())
        });
        let checked = kernels::CheckedHistograms::check(&inputs);
        group.bench_function(
            format!("strobe_merge_v2_bytes_into_counts_{values}_values"),
            |b| b.iter(|| kernels::merge_checked(black_box(&checked))),
        );
        // The same merge into 16,384 accumulators in turn (tens of MB of counts): each one's counts were last
        // touched about 164 iterations before, out of the core's caches (colder than a shard's cells at 10,000 agents,
        // whose merges cost between this and the warm merge).
        let mut cold = kernels::ColdAccumulators::new(16_384);
        group.bench_function(
            format!("strobe_merge_v2_bytes_into_cold_counts_{values}_values"),
            |b| b.iter(|| cold.merge(black_box(&checked))),
        );
        group.bench_function(
            format!("hdrhistogram_deserialize_and_add_{values}_values"),
            |b| {
                b.iter(|| {
                    let mut deserializer = Deserializer::new();
                    let mut sum = Histogram::<u64>::new(2).expect("two digits");
                    for bytes in black_box(&inputs) {
                        let h: Histogram<u64> = deserializer
                            .deserialize(&mut bytes.as_ref())
                            .expect("valid V2");
                        sum.add(&h).expect("auto-resizing");
                    }
                    sum.len()
                })
            },
        );
    }
    group.finish();
}

/// A latency histogram series from one V2 encoding (recorded in µs, read in ms).
fn histogram_series(name: &str, tags: Vec<pb::Tag>, encoding: &bytes::Bytes) -> pb::Series {
    pb::Series {
        name: name.into(),
        tags,
        id: 0,
        value: Some(pb::series::Value::Histogram(pb::Histogram {
            hdr_v2: encoding.clone(),
            scale: 1000,
            unit: "ms".into(),
        })),
    }
}

/// `sender`'s second 100 holding `series`, validated as ingest validates it.
fn second_100(sender: &Sender, series: Vec<pb::Series>) -> kernels::Validated {
    let snapshot = pb::Snapshot {
        second: 100,
        series,
        stats: None,
    };
    kernels::validate(snapshot, sender, 100).expect("a valid snapshot")
}

/// 1,000 instances x 100 series (20 histograms), one service: the sealing, rule and fan-out kernels on 100k
/// series a second.
fn second_of_100k_series(c: &mut Criterion) {
    let settings = WindowSettings {
        grace_ms: 250,
        grace_quiet_ms: 50,
        grace_quorum: 0.9,
        grace_trickle: 0.05,
        grace_max_ms: 1000,
        grace_max_behind_ms: 3000,
        late_window_secs: 10,
        replay_gather_ms: 6_000,
        replay_stall_ms: 10_000,
        replay_wait_ms: 120_000,
        max_cells: 1_000_000,
        max_bytes: usize::MAX,
    };
    let histograms = encodings(20, 100);
    // With `canary`, one instance in ten runs a second version.
    let fleet = |canary: bool| -> Vec<_> {
        (0..1000)
            .map(|i| {
                let sender = Sender::new(
                    "svc",
                    &format!("i{i}"),
                    if canary && i % 10 == 0 { "v2" } else { "v1" },
                    Some(if i % 2 == 0 { "z1" } else { "z2" }),
                );
                let mut series: Vec<pb::Series> = (0..80)
                    .map(|k| pb::Series {
                        name: format!("business.counter.{}", k % 8),
                        tags: vec![pb::Tag {
                            key: "route".into(),
                            value: format!("/r{}", k / 8),
                        }],
                        id: 0,
                        value: Some(pb::series::Value::Counter(f64::from(i % 7 + k))),
                    })
                    .collect();
                series.extend(histograms.iter().enumerate().map(|(k, h)| {
                    let route = pb::Tag {
                        key: "route".into(),
                        value: format!("/r{k}"),
                    };
                    histogram_series("request.latency", vec![route], h)
                }));
                second_100(&sender, series)
            })
            .collect()
    };
    let validated = fleet(true);
    let mut group = c.benchmark_group("second_of_100k_series");
    group.sample_size(10);
    group.throughput(Throughput::Elements(100_000));
    group.bench_function("merge_and_seal", |b| {
        b.iter_batched(
            || validated.clone(),
            |seconds| kernels::merge_and_seal("svc", settings, seconds),
            BatchSize::LargeInput,
        )
    });
    // Most seconds of most services: one version (its split is the overall one, not merged again).
    let one_version = fleet(false);
    group.bench_function("merge_and_seal_one_version", |b| {
        b.iter_batched(
            || one_version.clone(),
            |seconds| kernels::merge_and_seal("svc", settings, seconds),
            BatchSize::LargeInput,
        )
    });
    let sealed = kernels::SealedBench::seal("svc", settings, validated.clone()).expect("sealed");
    let rules = kernels::Rules::parse(
        r#"
[[rules]]
name = "p99"
metric = "request.latency"
stat = "p99"
above = 250.0
split_by = ["version", "zone"]

[[rules]]
name = "counters"
metric = "business.counter.3"
stat = "sum"
above = 1e12
"#,
    )
    .expect("valid rules");
    group.bench_function(
        format!("rules_over_{}_merged_series", sealed.series()),
        |b| {
            let mut evaluator = kernels::RuleEvaluator::default();
            b.iter(|| kernels::evaluate(&rules, black_box(&sealed), &mut evaluator))
        },
    );
    group.finish();
    rules_over_100k_merged_series(c);
    large_service(c, settings);
    let mut fanout = c.benchmark_group("frame_fanout");
    fanout.sample_size(10);
    fanout.bench_function("serialise_once_and_deliver_to_1000_subscribers", |b| {
        let mut hub = kernels::FanOut::new(1000);
        b.iter(|| hub.publish(black_box(&sealed)))
    });
    fanout.finish();
}

/// One second of a service with many distinct series: 100 instances in 10 groups (two versions, two zones), each
/// group with routes of its own, each instance 2,000 series (1,800 counters, 200 histograms): 20,000 distinct
/// series, each merged over 10 instances, 4 splits each (a group runs one version), so 80,000 merged series from
/// 200,000. Sealing it, and serialising its frame and overview.
fn large_service(c: &mut Criterion, settings: WindowSettings) {
    let histograms = encodings(200, 100);
    // With `canary`, half the instances run a second version.
    let fleet = |canary: bool| -> Vec<_> {
        (0..100)
            .map(|i| {
                let sender = Sender::new(
                    "large",
                    &format!("i{i}"),
                    if canary && i % 2 == 1 { "v2" } else { "v1" },
                    Some(if (i / 2) % 2 == 0 { "z1" } else { "z2" }),
                );
                let group = i % 10;
                let tags = |k: usize| {
                    vec![pb::Tag {
                        key: "route".into(),
                        value: format!("/g{group}/r{k}"),
                    }]
                };
                let mut series: Vec<pb::Series> = (0..1800)
                    .map(|k| pb::Series {
                        name: format!("http.server.requests.{}", k % 9),
                        tags: tags(k / 9),
                        id: 0,
                        value: Some(pb::series::Value::Counter((i % 7 + k) as f64)),
                    })
                    .collect();
                series.extend(
                    histograms
                        .iter()
                        .enumerate()
                        .map(|(k, h)| histogram_series("http.server.duration", tags(k), h)),
                );
                second_100(&sender, series)
            })
            .collect()
    };
    let validated = fleet(true);
    let sealed = kernels::SealedBench::seal("large", settings, validated.clone()).expect("sealed");
    let mut group = c.benchmark_group("large_service");
    group.sample_size(10);
    group.throughput(Throughput::Elements(sealed.series() as u64));
    group.bench_function(
        format!("merge_and_seal_{}_merged_series", sealed.series()),
        |b| {
            b.iter_batched(
                || validated.clone(),
                |seconds| kernels::merge_and_seal("large", settings, seconds),
                BatchSize::LargeInput,
            )
        },
    );
    // Summarising a sealed second again, as a correction does (the seal's own summary: the leaves merged into
    // the splits again, but no snapshot merged).
    for (name, canary) in [("two_versions", true), ("one_version", false)] {
        let kept =
            kernels::CorrectionBench::seal("large", settings, fleet(canary)).expect("sealed");
        group.bench_function(format!("summarise_again_{name}"), |b| {
            b.iter(|| kept.correct())
        });
    }
    group.bench_function("serialise_and_deliver_to_10_subscribers", |b| {
        let mut hub = kernels::FanOut::new(10);
        b.iter(|| hub.publish(black_box(&sealed)))
    });
    group.finish();
}

/// Rules over one second of a large service: 6,667 routes x status classes, three metrics each, five splits (all,
/// two versions, two zones): 100,005 merged series. Four rules of the kinds a large service has (p99 and error
/// ratio per version, a p99 of one route, the whole service's request rate), with one tag set in 100 breaching, so
/// that a few hundred groups keep an alert going from second to second.
fn rules_over_100k_merged_series(c: &mut Criterion) {
    let rules = kernels::Rules::parse(
        r#"
[[rules]]
name = "p99 by version"
metric = "http.server.duration"
stat = "p99"
above = 500.0
split_by = ["version"]

[[rules]]
name = "errors by version"
metric = "http.server.errors"
stat = "ratio"
over = "http.server.requests"
above = 0.05
split_by = ["version"]

[[rules]]
name = "one route"
metric = "http.server.duration"
stat = "p99"
above = 250.0
tags = { route = "/r7" }

[[rules]]
name = "traffic"
metric = "http.server.requests"
stat = "rate"
below = 1.0
"#,
    )
    .expect("valid rules");
    let mut second = kernels::SealedBench::synthetic(0, 6_667, 100);
    let mut group = c.benchmark_group("rules");
    group.sample_size(20);
    group.throughput(Throughput::Elements(second.series() as u64));
    group.bench_function(
        format!("four_rules_over_{}_merged_series", second.series()),
        |b| {
            // The same content second after second, so the breaching groups stay firing and the rest stay quiet,
            // as in steady state; the first evaluation (every breaching group becomes an alert) is not timed.
            let mut evaluator = kernels::RuleEvaluator::default();
            kernels::evaluate(&rules, &second, &mut evaluator);
            let mut t = 0;
            b.iter(|| {
                t += 1;
                second.set_second(t);
                kernels::evaluate(&rules, black_box(&second), &mut evaluator)
            })
        },
    );
    group.finish();
}

criterion_group!(
    benches,
    statsd,
    aggregator,
    histogram_merge,
    second_of_100k_series
);
criterion_main!(benches);
