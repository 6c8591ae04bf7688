//! A fuzzer for the code that reads what others send, on the stable toolchain: the DogStatsD parser and the agent's
//! window, the HdrHistogram V2 check and merge, and snapshot validation and merging. Each target gets inputs that
//! are mutations of valid ones (bit flips, truncations, splices, repeated chunks, boundary numbers) or random bytes,
//! for a given time; any panic is a finding, saved to `fuzz-findings/` with the input, and the run exits non-zero.
//! Findings worth keeping become regression tests in the normal suite.
//!
//! `cargo run --release -p strobe-benches --bin fuzz -- --seconds 600` (each target for that long).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use prost::Message;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use strobe_agent::statsd::{ParseLimits, parse_packet};
use strobe_agent::{Window, WindowLimits};
use strobe_aggregator::kernels::{self, Sender, WindowSettings};
use strobe_proto as pb;

#[derive(Debug, Parser)]
struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Targets (default: all): statsd, hdr, snapshot.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Seed of the input generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where findings go.
    #[arg(long, default_value = "fuzz-findings")]
    out: PathBuf,
}

/// Valid DogStatsD lines to mutate.
const STATSD: &[&str] = &[
    "requests:1|c",
    "requests:1|c|@0.5|#route:/pay,status:2xx",
    "latency:12.5|ms|#route:/pay",
    "temp:-3|g",
    "temp:+3|g",
    "batch:1:2:3|h",
    "users:alice|s",
    "e:1|d|#a,b:c,host:x",
    "name:1e308|c",
    "x:NaN|c",
];

fn hdr_v2(values: &[u64], sigfig: u8) -> Vec<u8> {
    let mut h = Histogram::<u64>::new(sigfig).expect("valid precision");
    for v in values {
        // Values within the auto-resizing histogram's reach.
        h.record(*v).ok();
    }
    let mut out = Vec::new();
    V2Serializer::new().serialize(&h, &mut out).ok();
    out
}

/// Mutates `input` a few times.
fn mutate(mut input: Vec<u8>, rng: &mut SmallRng) -> Vec<u8> {
    for _ in 0..rng.random_range(1..6) {
        let len = input.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let at = rng.random_range(0..len);
                input[at] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => input.truncate(rng.random_range(0..len)),
            2 => {
                let at = rng.random_range(0..=len);
                let extra: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                input.splice(at..at, extra);
            }
            3 if len > 1 => {
                let from = rng.random_range(0..len);
                let to = rng.random_range(from..len);
                let chunk = input[from..to].to_vec();
                for _ in 0..rng.random_range(1..20) {
                    input.extend_from_slice(&chunk);
                }
            }
            4 if len >= 8 => {
                // Boundary numbers in place: all ones, all zeros, a sign bit.
                let at = rng.random_range(0..len - 7);
                let word: u64 = [u64::MAX, 0, 1 << 63, i64::MAX as u64][rng.random_range(0..4)];
                input[at..at + 8].copy_from_slice(&word.to_be_bytes());
            }
            5 if len > 0 => {
                let at = rng.random_range(0..len);
                input[at] = [b':', b'|', b'#', b',', b'@', b'\n', 0xff][rng.random_range(0..7)];
            }
            _ => {
                input = (0..rng.random_range(0..512))
                    .map(|_| rng.random())
                    .collect()
            }
        }
    }
    input
}

fn statsd_target(input: &[u8]) {
    let limits = ParseLimits::default();
    let mut window = Window::new(100, WindowLimits::default());
    parse_packet(input, &limits, |line| {
        if let Ok(line) = line {
            window.record(&line);
        }
    });
    let (snapshot, _) = window.close();
    // What the agent sends must be something the aggregator reads.
    let sender = Sender::new("fuzz", "i", "v1", None);
    if let Some(v) = kernels::validate(snapshot, &sender, 100) {
        kernels::merge_and_seal("fuzz", SETTINGS, vec![v]);
    }
}

fn hdr_target(input: &[u8]) {
    let checked = kernels::CheckedHistograms::check(&[Bytes::copy_from_slice(input)]);
    kernels::merge_checked(&checked);
}

fn snapshot_target(input: &[u8]) {
    let Ok(snapshot) = pb::Snapshot::decode(input) else {
        return;
    };
    let sender = Sender::new("fuzz", "i", "v1", Some("z1"));
    let other = Sender::new("fuzz", "j", "v2", None);
    let validated: Vec<_> = [&sender, &other]
        .into_iter()
        .filter_map(|s| kernels::validate(snapshot.clone(), s, snapshot.second))
        .collect();
    kernels::merge_and_seal("fuzz", SETTINGS, validated);
}

const SETTINGS: WindowSettings = WindowSettings {
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
    max_bytes: 1 << 30,
};

fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "statsd" => STATSD.iter().map(|l| l.as_bytes().to_vec()).collect(),
        "hdr" => vec![
            hdr_v2(&[1, 2, 3, 1000, 1_000_000], 2),
            hdr_v2(&[5; 100], 3),
            hdr_v2(&[], 2),
            hdr_v2(&[u64::MAX / 4], 2),
        ],
        _ => {
            let series = |name: &str, value: pb::series::Value| pb::Series {
                id: 1,
                name: name.into(),
                tags: vec![pb::Tag {
                    key: "route".into(),
                    value: "/pay".into(),
                }],
                value: Some(value),
            };
            let snapshot = pb::Snapshot {
                second: 100,
                series: vec![
                    series("c", pb::series::Value::Counter(3.0)),
                    series("g", pb::series::Value::Gauge(-1.5)),
                    series(
                        "h",
                        pb::series::Value::Histogram(pb::Histogram {
                            hdr_v2: hdr_v2(&[10, 20, 30], 2).into(),
                            scale: 1000,
                            ..Default::default()
                        }),
                    ),
                ],
                stats: None,
            };
            vec![snapshot.encode_to_vec()]
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let targets: Vec<String> = if args.targets.is_empty() {
        ["statsd", "hdr", "snapshot"].map(String::from).to_vec()
    } else {
        args.targets.clone()
    };
    // Findings are reported below; the default hook would print every one as it happens.
    std::panic::set_hook(Box::new(|_| {}));
    let mut findings = 0;
    for target in &targets {
        let run: fn(&[u8]) = match target.as_str() {
            "statsd" => statsd_target,
            "hdr" => hdr_target,
            "snapshot" => snapshot_target,
            other => anyhow::bail!("unknown target {other}"),
        };
        let corpus = seeds(target);
        let mut rng = SmallRng::seed_from_u64(args.seed);
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let (mut runs, mut found) = (0u64, 0u64);
        while Instant::now() < deadline {
            let base = corpus[rng.random_range(0..corpus.len())].clone();
            let input = mutate(base, &mut rng);
            runs += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&input))).is_err() {
                found += 1;
                std::fs::create_dir_all(&args.out)?;
                let path = args.out.join(format!("{target}-{found}.bin"));
                std::fs::write(&path, &input)?;
                eprintln!(
                    "{target}: panic on {} bytes, saved to {}",
                    input.len(),
                    path.display()
                );
            }
        }
        println!(
            "{target}: {runs} inputs in {} s, {found} panics",
            args.seconds
        );
        findings += found;
    }
    if findings > 0 {
        anyhow::bail!("{findings} inputs made a target panic");
    }
    Ok(())
}
