//! Criterion benchmarks of the hot kernels: DogStatsD parsing and folding, histogram decoding, and the merge of
//! one second across instances. Inputs are built outside the measured loops.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand::rngs::SmallRng;
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
    simulate_second(&mut window, &Behavior::HEALTHY, &mut rng);
    window.close().0
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
            grace_max_ms: 1000,
            late_window_secs: 10,
            max_cells: 150_000,
        };
        b.iter_batched(
            || validated.clone(),
            |seconds| kernels::merge_and_seal("svc", settings, seconds),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, statsd, aggregator);
criterion_main!(benches);
