//! The load generator: thousands of simulated instances, each streaming one snapshot a second over real gRPC
//! (multiplexed over a few HTTP/2 connections), with deploys of new versions staged on command.
//!
//! Generating realistic histograms for every instance every second would cost more than what is measured, so each
//! behaviour has a pool of prebuilt seconds (folded by the agent's own `Window`) that instances draw from. A pool's
//! series are registered with each instance's shipper ([`RegisteredSeries`]) and handed over by number, so the
//! generator does not copy a hundred names per instance per second; the wire carries what an agent sends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use strobe_agent::statsd::MetricType;
use strobe_agent::{
    RegisteredSeries, ShipperConfig, ShipperTally, Window, WindowLimits, run_shipper_on,
};
use strobe_proto as pb;
use strobe_proto::clock;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use rand_distr::{Binomial, Distribution};

use crate::sim::{Behavior, identity, metrics, simulate_second};
use crate::traffic::{InstanceShocks, SecondShock, ServiceShocks, Shape};

/// Prebuilt seconds per behaviour.
const POOL_SECONDS: usize = 256;

/// When, after a second's sending starts, the next second's snapshots are made. Real agents each make theirs on
/// their own machine; made here when due, as they were sent, the making took a third of the generator's CPU in the
/// 300 ms after each second (its schedule thread, `perf`), taken from the aggregator in the burst it is measured
/// in. Made at 800 ms, it meets little of the aggregator's drain (at 7,000 agents on the slowest machine measured,
/// the drain was then mostly over by 700 ms; where it runs past 800 ms the two meet again), and only the late
/// snapshots of the second before are still being sent. (Made earlier, right after the second's sending,
/// they competed with the aggregator's drain: README, *When in the second the two cores do what*.) A second made
/// ahead and then thrown away (a deploy changed the fleet, or the generator overran) is made again: its instances'
/// shocks then take one step more, which leaves their distribution as it was.
const MAKE_AHEAD_AT: Duration = Duration::from_millis(800);
/// Making ahead stops this long before the next second begins; the slots not made by then are made when due, as
/// before, so a slow core does not hold up the next second's sending by more than one slot's making.
const MAKE_AHEAD_MARGIN: Duration = Duration::from_millis(50);

/// A second's schedule (the instances sent in each slot) and the snapshots of its first slots, made ahead.
struct Ahead {
    second: i64,
    slots: Vec<Vec<usize>>,
    made: Vec<Vec<(usize, pb::Snapshot)>>,
}

/// Prebuilt seconds for one behaviour. Under a shape with latency shocks each second is built with its own latency
/// multiplier (drawn from the shape's spread, in ascending order), so an instance-second picks the second whose
/// multiplier matches its shock.
pub struct Pool {
    behavior: Behavior,
    extra_counters: usize,
    extra_histograms: usize,
    /// Series by number (see `registered`).
    seconds: Vec<Vec<pb::Series>>,
    /// Each second's latency multiplier, ascending.
    multipliers: Vec<f64>,
    /// Every series the pool's seconds hold, by number.
    registered: RegisteredSeries,
    /// Each registered series' number, by its spelling (name and tags).
    numbers: std::collections::HashMap<String, u32>,
    /// Numbers of the request and error counters.
    requests: u32,
    errors: u32,
    /// Whether each registered series (by number - 1) is one of the extra counters, varied per second.
    varying: Vec<bool>,
}

/// A series' name and tags as one string, as the shipper's dictionary spells them.
fn spelling(series: &pb::Series) -> String {
    let mut key = String::new();
    strobe_agent::spell_into(&mut key, series);
    key
}

impl Pool {
    /// `size` seconds of `behavior`, each with the request/error/latency series plus `extra_counters` counters and
    /// `extra_histograms` histograms.
    pub fn build(
        behavior: Behavior,
        shape: Shape,
        extra_counters: usize,
        extra_histograms: usize,
        size: usize,
        seed: u64,
    ) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let spread = (shape.latency_sigma.powi(2) + shape.instance_sigma.powi(2)).sqrt();
        let mut multipliers: Vec<f64> = (0..size.max(1))
            .map(|_| (spread * rng.sample::<f64, _>(rand_distr::StandardNormal)).exp())
            .collect();
        multipliers.sort_by(f64::total_cmp);
        let seconds: Vec<Vec<pb::Series>> = multipliers
            .iter()
            .map(|m| {
                let shock = SecondShock {
                    latency: *m,
                    errors: 1.0,
                };
                one_second(
                    &behavior,
                    1.0,
                    shock,
                    extra_counters,
                    extra_histograms,
                    &mut rng,
                )
            })
            .collect();
        let mut numbers = std::collections::HashMap::new();
        let mut names = Vec::new();
        for series in seconds.iter().flatten() {
            numbers.entry(spelling(series)).or_insert_with(|| {
                names.push(series.clone());
                names.len() as u32
            });
        }
        let number = |name: &str| numbers.get(name).copied().unwrap_or(0);
        let (requests, errors) = (number(metrics::REQUESTS), number(metrics::ERRORS));
        let varying = names
            .iter()
            .map(|s| !s.tags.is_empty() && matches!(s.value, Some(pb::series::Value::Counter(_))))
            .collect();
        let mut pool = Self {
            behavior,
            extra_counters,
            extra_histograms,
            seconds: Vec::new(),
            multipliers,
            registered: RegisteredSeries::new(names),
            numbers,
            requests,
            errors,
            varying,
        };
        pool.seconds = seconds.into_iter().map(|s| pool.by_number(s)).collect();
        pool
    }

    /// `series` with every registered one handed over by number.
    fn by_number(&self, series: Vec<pb::Series>) -> Vec<pb::Series> {
        series
            .into_iter()
            .map(|s| match self.numbers.get(&spelling(&s)) {
                Some(id) => pb::Series {
                    name: String::new(),
                    tags: Vec::new(),
                    id: *id,
                    value: s.value,
                },
                None => s,
            })
            .collect()
    }

    /// The index of a prebuilt second whose latency multiplier is about `latency`: any second of the pool when
    /// there are no shocks, else one of the five nearest, drawn afresh for every instance-second. (Picking by
    /// instance and second in turn made instance `n` send the second instance `n + 1` had sent the second before:
    /// a version's seconds over a minute held a few dozen distinct draws, and two identical versions' p99s drifted
    /// 10% apart, past what the canary allows for sampling.)
    fn index_for(&self, latency: f64, rng: &mut SmallRng) -> usize {
        let len = self.seconds.len();
        if latency == 1.0 && self.multipliers.iter().all(|m| *m == 1.0) {
            return rng.random_range(0..len);
        }
        let at = self.multipliers.partition_point(|m| *m < latency);
        (at + rng.random_range(0..5)).saturating_sub(2).min(len - 1)
    }

    /// A prebuilt second, with the error count drawn afresh: reusing a fixed sample of error counts would give
    /// two "identical" versions really different error ratios. (Latency histograms are reused; the pool is large
    /// enough that its quantiles sit within a few percent of the behaviour's.)
    fn pick(&self, shock: SecondShock, rng: &mut SmallRng) -> Vec<pb::Series> {
        let mut series = self.seconds[self.index_for(shock.latency, rng)].clone();
        let requests = series
            .iter()
            .find(|s| s.id == self.requests)
            .and_then(|s| match s.value {
                Some(pb::series::Value::Counter(v)) => Some(v),
                _ => None,
            })
            .unwrap_or(0.0);
        if let Some(errors) = series.iter_mut().find(|s| s.id == self.errors) {
            let ratio = (self.behavior.error_ratio * shock.errors).clamp(0.0, 1.0);
            let drawn = Binomial::new(requests as u64, ratio).map_or(0, |b| b.sample(rng));
            errors.value = Some(pb::series::Value::Counter(drawn as f64));
        }
        // Every other counter differs per instance and second too.
        let varying = |s: &pb::Series| {
            (s.id as usize)
                .checked_sub(1)
                .and_then(|i| self.varying.get(i))
                .is_some_and(|v| *v)
        };
        for s in series.iter_mut().filter(|s| varying(s)) {
            if let Some(pb::series::Value::Counter(v)) = &mut s.value {
                *v = (*v * rng.random_range(0.5..1.5)).round();
            }
        }
        series
    }

    /// A fresh second with only `share` of the traffic (an instance that started partway through the second).
    fn partial(&self, share: f64, shock: SecondShock, rng: &mut SmallRng) -> Vec<pb::Series> {
        self.by_number(one_second(
            &self.behavior,
            share,
            shock,
            self.extra_counters,
            self.extra_histograms,
            rng,
        ))
    }
}

fn one_second(
    behavior: &Behavior,
    share: f64,
    shock: SecondShock,
    extra_counters: usize,
    extra_histograms: usize,
    rng: &mut SmallRng,
) -> Vec<pb::Series> {
    let mut window = Window::new(0, WindowLimits::default());
    let scaled = Behavior {
        rps: behavior.rps * share,
        ..*behavior
    };
    simulate_second(&mut window, &scaled, shock, rng);
    // The rest looks like a service's own instrumentation: a few metrics per route and status class.
    for i in 0..extra_counters {
        let (metric, tags) = extra_series(i, COUNTER_METRICS);
        let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (*k, v.as_str())).collect();
        window.record_values(
            metric,
            &tags,
            MetricType::Counter,
            std::iter::once(rng.random_range(0.0..100.0_f64).round()),
            1.0,
        );
    }
    for i in 0..extra_histograms {
        let (metric, tags) = extra_series(i, HISTOGRAM_METRICS);
        let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let median = 5.0 + 40.0 * (i % 7) as f64;
        let values: Vec<f64> = (0..100)
            .map(|_| median * rng.random_range(-1.0_f64..1.0).exp())
            .collect();
        window.record_values(
            metric,
            &tags,
            MetricType::Histogram,
            values.into_iter(),
            1.0,
        );
    }
    window.close().0.series
}

/// Counter metrics beside the request/error ones, crossed with routes and status classes.
const COUNTER_METRICS: &[&str] = &[
    "http.server.requests",
    "cache.hits",
    "cache.misses",
    "db.queries",
    "queue.published",
];
/// Histogram metrics beside the latency one, crossed with routes.
const HISTOGRAM_METRICS: &[&str] = &["http.server.duration", "db.query.duration"];
/// Routes of the simulated services.
const ROUTES: [&str; 10] = [
    "/pay",
    "/cart",
    "/search",
    "/login",
    "/items",
    "/items/{id}",
    "/orders",
    "/orders/{id}",
    "/health",
    "/recommend",
];
/// Status classes.
const STATUS: [&str; 2] = ["2xx", "5xx"];

/// The `i`-th extra series of a kind: a metric, a route and a status class.
fn extra_series(
    i: usize,
    metrics: &'static [&'static str],
) -> (&'static str, [(&'static str, String); 2]) {
    let metric = metrics[(i / (ROUTES.len() * STATUS.len())) % metrics.len()];
    let route = ROUTES[i % ROUTES.len()];
    let status = STATUS[(i / ROUTES.len()) % STATUS.len()];
    let generation = i / (ROUTES.len() * STATUS.len() * metrics.len());
    let route = if generation == 0 {
        route.to_owned()
    } else {
        format!("{route}/{generation}")
    };
    (metric, [("route", route), ("status", status.to_owned())])
}

/// The shape of the load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The aggregator's gRPC address.
    pub aggregator: String,
    /// Simulated instances.
    pub agents: usize,
    /// Services they are spread over (`svc-000`, `svc-001`, ...).
    pub services: usize,
    /// Whether service sizes follow Zipf's law (the k-th largest has 1/k of the largest's instances: at 10,000
    /// over 100 services, about 1,900, a median near 40 and a tail of 20), instead of equal sizes.
    pub zipf: bool,
    /// Series per instance and second, the request/error/latency three included.
    pub series: usize,
    /// How many of those are histograms (the latency one included).
    pub histograms: usize,
    /// HTTP/2 connections the streams are multiplexed over.
    pub connections: usize,
    /// Healthy traffic per instance.
    pub behavior: Behavior,
    /// How the requests of an instance-second move together.
    pub traffic: Shape,
    /// When snapshots are sent after their second ends.
    pub arrival: Arrival,
}

/// When each instance sends its second after the second ends: spread uniformly over `spread` (agents' clocks and
/// windows do not close at the same microsecond, and the network adds its own), and with probability `late_share`
/// 0.3 to 0.8 s late instead (a GC pause). The default sends every snapshot at once, the hardest burst.
#[derive(Debug, Clone, Copy, Default)]
pub struct Arrival {
    /// Width of the uniform spread.
    pub spread: Duration,
    /// Share of instance-seconds sent 0.3 to 0.8 s late.
    pub late_share: f64,
}

impl Arrival {
    /// Slots of the schedule a second's sending is cut into.
    const SLOTS: usize = 100;
    /// Width of a slot: the 900 ms a second's sending may take, cut into [`Self::SLOTS`].
    const SLOT: Duration = Duration::from_millis(9);

    /// The slot an instance-second is sent in.
    fn slot(&self, rng: &mut SmallRng) -> usize {
        let delay = if self.late_share > 0.0 && rng.random_bool(self.late_share.clamp(0.0, 1.0)) {
            rng.random_range(0.3..0.8)
        } else if self.spread.is_zero() {
            0.0
        } else {
            rng.random_range(0.0..self.spread.as_secs_f64().min(0.8))
        };
        ((delay / Self::SLOT.as_secs_f64()) as usize).min(Self::SLOTS - 1)
    }

    /// How it is named in output.
    pub fn describe(&self) -> String {
        format!(
            "spread {} ms, {:.1}% sent 0.3-0.8 s late",
            self.spread.as_millis(),
            self.late_share * 100.0
        )
    }
}

/// A staged deploy: new instances of a new version of one service, from a given instant.
#[derive(Debug, Clone)]
pub struct Deploy {
    /// Index of the service.
    pub service: usize,
    /// Version name of the new instances.
    pub version: String,
    /// How many new instances.
    pub instances: usize,
    /// Their behaviour.
    pub behavior: Behavior,
    /// Unix time (seconds, fractional) of their first request.
    pub at: f64,
    /// Old instances stopped...
    pub retire: usize,
    /// ...this many seconds after the new ones start (0: at the same instant).
    pub retire_after: f64,
    /// `deployer` label of the new instances.
    pub deployer: Option<String>,
}

struct Instance {
    service: usize,
    tx: mpsc::Sender<pb::Snapshot>,
    /// Which pool it draws from.
    pool: Arc<Pool>,
    /// Unix time of its first request (new instances of a deploy).
    starts_at: f64,
    /// Unix second from which it no longer reports.
    stops_from: i64,
    /// What its requests share each second.
    shocks: InstanceShocks,
}

/// Counters of a running fleet.
#[derive(Debug, Default)]
pub struct LoadStats {
    /// Snapshots handed to shippers.
    pub sent: AtomicU64,
    /// Snapshots the generator could not hand over (a shipper's queue was full).
    pub dropped: AtomicU64,
    /// What the aggregator answered: acknowledged, refused whole, series dropped.
    pub shippers: Arc<ShipperTally>,
}

/// Which service each of `agents` instances belongs to: round robin, or Zipf-sized (service `k` gets a share
/// proportional to `1 / (k + 1)`, every service at least one instance while there are enough).
pub fn assign_services(agents: usize, services: usize, zipf: bool) -> Vec<usize> {
    let services = services.max(1);
    if !zipf {
        return (0..agents).map(|n| n % services).collect();
    }
    let weights: Vec<f64> = (0..services).map(|k| 1.0 / (k + 1) as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut sizes: Vec<usize> = weights
        .iter()
        .map(|w| {
            ((w / total * agents as f64).floor() as usize).max(usize::from(agents >= services))
        })
        .collect();
    // Rounding leaves a few over or under: the largest services absorb them.
    let mut assigned: usize = sizes.iter().sum();
    let mut k = 0;
    while assigned < agents {
        sizes[k % services] += 1;
        assigned += 1;
        k += 1;
    }
    while assigned > agents {
        if let Some(big) = sizes.iter_mut().max() {
            *big -= 1;
        }
        assigned -= 1;
    }
    sizes
        .iter()
        .enumerate()
        .flat_map(|(service, n)| std::iter::repeat_n(service, *n))
        .collect()
}

/// Service name for index `i`.
pub fn service_name(i: usize) -> String {
    format!("svc-{i:03}")
}

/// A running simulated fleet.
pub struct Fleet {
    deploys: mpsc::UnboundedSender<Deploy>,
    /// Counters.
    pub stats: Arc<LoadStats>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Fleet {
    /// Connects and starts generating; instances report from the next second on.
    pub async fn start(spec: LoadSpec) -> Result<Self, LoadError> {
        let shipper = ShipperConfig {
            aggregator: spec.aggregator.clone(),
            ..ShipperConfig::default()
        };
        let mut channels = Vec::new();
        for _ in 0..spec.connections.max(1) {
            let channel = strobe_agent::shipper::connect(&shipper, &spec.aggregator)
                .await
                .ok_or_else(|| LoadError::Connect(spec.aggregator.clone()))?;
            channels.push(channel);
        }
        let extra_counters = spec.series.saturating_sub(spec.histograms.max(1) + 2);
        let extra_histograms = spec.histograms.saturating_sub(1);
        let healthy = Arc::new(Pool::build(
            spec.behavior,
            spec.traffic,
            extra_counters,
            extra_histograms,
            POOL_SECONDS,
            1,
        ));
        let stats = Arc::new(LoadStats::default());
        let tally = stats.shippers.clone();
        let (stop, stop_rx) = watch::channel(false);
        let (deploys, deploy_rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let mut instances = Vec::with_capacity(spec.agents);
        let services = spec.services.max(1);
        let service_shocks: Vec<ServiceShocks> = (0..services)
            .map(|s| ServiceShocks::new(s as u64))
            .collect();
        let mut shock_rng = SmallRng::seed_from_u64(3);
        let connections = channels.len();
        // Shippers run on this runtime; the generator on a thread of its own (below).
        let runtime = tokio::runtime::Handle::current();
        let spawn_shipper = move |tasks: &mut JoinSet<()>,
                                  n: usize,
                                  id: pb::Identity,
                                  registered: &RegisteredSeries| {
            let (tx, rx) = mpsc::channel(8);
            let channel = channels[n % channels.len()].clone();
            // Each simulated agent has its own clock, as each real one does: one shared by all would mix their
            // answers and let one shipper's reconnect or backlog move every other's clock.
            let config = ShipperConfig {
                registered: registered.clone(),
                clock: shipper.clock.fresh(),
                ..shipper.clone()
            };
            let tally = tally.clone();
            tasks.spawn_on(
                async move {
                    run_shipper_on(id, config, rx, channel, tally).await;
                },
                &runtime,
            );
            tx
        };
        let assignment = assign_services(spec.agents, services, spec.zipf);
        for (n, &service) in assignment.iter().enumerate() {
            let id = identity(
                &service_name(service),
                "v1",
                ["z1", "z2"][n % 2],
                &format!("i{n:05}"),
            );
            instances.push(Instance {
                service,
                tx: spawn_shipper(&mut tasks, n, id, &healthy.registered),
                pool: healthy.clone(),
                starts_at: 0.0,
                stops_from: i64::MAX,
                shocks: InstanceShocks::new(
                    spec.traffic,
                    service_shocks[service].clone(),
                    &mut shock_rng,
                ),
            });
        }
        info!(
            message = "Fleet connected.",
            agents = spec.agents,
            services,
            connections
        );
        let generator = Generator {
            instances,
            stats: stats.clone(),
            spawn: Box::new(move |tasks, n, id, registered| {
                spawn_shipper(tasks, n, id, registered)
            }),
            extra: (extra_counters, extra_histograms),
            traffic: (spec.traffic, service_shocks),
            arrival: spec.arrival,
        };
        let mut shippers = JoinSet::new();
        std::mem::swap(&mut shippers, &mut tasks);
        // The generator keeps the schedule on a thread of its own: as a task among ten thousand shippers it woke
        // late for its slots and overran whole seconds (a second's snapshots then went in one burst, late), which
        // the aggregator's figures would have charged to the aggregator.
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let own = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(LoadError::Thread)?;
        std::thread::Builder::new()
            .name("loadgen-generator".into())
            .spawn(move || {
                own.block_on(generator.run(deploy_rx, stop_rx, shippers));
                let _ = done.send(());
            })
            .map_err(LoadError::Thread)?;
        tasks.spawn(async move {
            let _ = finished.await;
        });
        Ok(Self {
            deploys,
            stats,
            stop,
            tasks,
        })
    }

    /// Stages a deploy; its new instances connect now and report from `deploy.at`.
    pub fn deploy(&self, deploy: Deploy) {
        let _ = self.deploys.send(deploy);
    }

    /// Stops generating; shippers flush and close.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

type SpawnShipper = Box<
    dyn Fn(&mut JoinSet<()>, usize, pb::Identity, &RegisteredSeries) -> mpsc::Sender<pb::Snapshot>
        + Send,
>;

struct Generator {
    instances: Vec<Instance>,
    stats: Arc<LoadStats>,
    spawn: SpawnShipper,
    extra: (usize, usize),
    /// The traffic shape, and each service's shared shocks.
    traffic: (Shape, Vec<ServiceShocks>),
    /// When snapshots are sent.
    arrival: Arrival,
}

impl Generator {
    async fn run(
        mut self,
        mut deploys: mpsc::UnboundedReceiver<Deploy>,
        mut stop: watch::Receiver<bool>,
        mut shippers: JoinSet<()>,
    ) {
        let mut rng = SmallRng::seed_from_u64(7);
        // The newest second emitted: a generator that overran a boundary (a starved core) catches up rather than
        // skipping seconds, which the benchmark would count as lost.
        let mut emitted: Option<i64> = None;
        // The next second's schedule and the snapshots of its first slots, made ahead (see `MAKE_AHEAD_AT`).
        let mut ready: Option<Ahead> = None;
        loop {
            let boundary =
                tokio::time::sleep(clock::until_next_second() + Duration::from_millis(1));
            tokio::select! {
                _ = boundary => {}
                Some(deploy) = deploys.recv() => {
                    self.add_deploy(deploy, &mut shippers);
                    // Instances came or go: what was made ahead does not know of them.
                    ready = None;
                    continue;
                }
                _ = stop.wait_for(|s| *s) => break,
            }
            let t = clock::unix_second() - 1;
            if emitted.is_some_and(|e| t <= e) {
                continue; // woken early, or the clock stepped back: this second went out already
            }
            // Seconds missed by an overrun go at once, without the spread (at most ten; older ones are not sent).
            let from = emitted.map_or(t, |e| (e + 1).max(t - 10));
            emitted = Some(t);
            if from < t {
                warn!(
                    message = "The generator overran a second; the missed ones go at once, without the spread.",
                    missed = t - from
                );
            }
            let sent_from = tokio::time::Instant::now();
            for missed in from..t {
                for slot in self.schedule(missed, &mut rng) {
                    for (n, snapshot) in self.make(&slot, missed, &mut rng) {
                        self.send(n, snapshot);
                    }
                }
            }
            let ahead = match ready.take() {
                Some(ahead) if ahead.second == t => ahead,
                _ => Ahead {
                    second: t,
                    slots: self.schedule(t, &mut rng),
                    made: Vec::new(),
                },
            };
            let mut made = ahead.made.into_iter();
            for (k, slot) in ahead.slots.into_iter().enumerate() {
                // Slots not made ahead are made when due, so that making them is spread as sending is.
                let snapshots = made.next();
                if slot.is_empty() {
                    continue;
                }
                tokio::time::sleep_until(sent_from + Arrival::SLOT * k as u32).await;
                let snapshots = snapshots.unwrap_or_else(|| self.make(&slot, t, &mut rng));
                for (n, snapshot) in snapshots {
                    self.send(n, snapshot);
                }
            }
            // The last slot is due before `MAKE_AHEAD_AT` (a delay is under 0.8 s), so every snapshot of `t` was
            // made before any of `t + 1`: each instance's shocks are drawn second after second.
            tokio::time::sleep_until(sent_from + MAKE_AHEAD_AT).await;
            // Already past the next second's start (the generator overran): that second goes out as a missed one,
            // made as it is sent, and making it ahead now would only delay it.
            if clock::unix_second() - 1 == t {
                let until = tokio::time::Instant::now()
                    + clock::until_next_second().saturating_sub(MAKE_AHEAD_MARGIN);
                ready = Some(self.make_ahead(t + 1, until, &mut rng));
            }
        }
        // Dropping the senders lets every shipper drain and finish.
        self.instances.clear();
        while shippers.join_next().await.is_some() {}
    }

    /// Hands instance `n`'s snapshot to its shipper, counting it as sent or dropped (the shipper's queue full).
    fn send(&self, n: usize, snapshot: pb::Snapshot) {
        let Some(instance) = self.instances.get(n) else {
            return;
        };
        match instance.tx.try_send(snapshot) {
            Ok(()) => self.stats.sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn add_deploy(&mut self, deploy: Deploy, shippers: &mut JoinSet<()>) {
        let pool = Arc::new(Pool::build(
            deploy.behavior,
            self.traffic.0,
            self.extra.0,
            self.extra.1,
            POOL_SECONDS,
            deploy.at.to_bits(),
        ));
        let stop_second = (deploy.at + deploy.retire_after).floor() as i64;
        // Retired instances still report the second the new ones start in, then stop.
        for old in self
            .instances
            .iter_mut()
            .filter(|i| i.service == deploy.service && i.stops_from == i64::MAX)
            .take(deploy.retire)
        {
            old.stops_from = stop_second + 1;
        }
        for k in 0..deploy.instances {
            let n = self.instances.len();
            let mut id = identity(
                &service_name(deploy.service),
                &deploy.version,
                ["z1", "z2"][k % 2],
                &format!("{}-{k}", deploy.version),
            );
            if let Some(d) = &deploy.deployer {
                id.labels.insert("deployer".into(), d.clone());
            }
            let tx = (self.spawn)(shippers, n, id, &pool.registered);
            let (shape, services) = &self.traffic;
            let shared = services
                .get(deploy.service)
                .cloned()
                .unwrap_or_else(|| ServiceShocks::new(deploy.service as u64));
            let mut rng = SmallRng::seed_from_u64(n as u64);
            self.instances.push(Instance {
                service: deploy.service,
                tx,
                pool: pool.clone(),
                starts_at: deploy.at,
                stops_from: i64::MAX,
                shocks: InstanceShocks::new(*shape, shared, &mut rng),
            });
        }
    }

    /// Which instances report second `t`, by the slot of the schedule each is sent in.
    fn schedule(&self, t: i64, rng: &mut SmallRng) -> Vec<Vec<usize>> {
        // Real agents race each other at every boundary; a fixed order would always put a deploy's new
        // instances last, after their service's second was sealed.
        let mut order: Vec<usize> = (0..self.instances.len()).collect();
        order.shuffle(rng);
        let mut slots: Vec<Vec<usize>> = vec![Vec::new(); Arrival::SLOTS];
        for n in order {
            let instance = &self.instances[n];
            if t < instance.starts_at.floor() as i64 || t >= instance.stops_from {
                continue;
            }
            slots[self.arrival.slot(rng)].push(n);
        }
        slots
    }

    /// The snapshots of second `t` of the instances in `slot`.
    fn make(&mut self, slot: &[usize], t: i64, rng: &mut SmallRng) -> Vec<(usize, pb::Snapshot)> {
        slot.iter()
            .filter_map(|n| Some((*n, self.snapshot(*n, t, rng)?)))
            .collect()
    }

    /// Second `t`'s schedule, and the snapshots of as many of its slots, first ones first, as are made by `until`.
    fn make_ahead(&mut self, t: i64, until: tokio::time::Instant, rng: &mut SmallRng) -> Ahead {
        let slots = self.schedule(t, rng);
        let mut made = Vec::with_capacity(slots.len());
        for slot in &slots {
            if tokio::time::Instant::now() >= until {
                break;
            }
            made.push(self.make(slot, t, rng));
        }
        Ahead {
            second: t,
            slots,
            made,
        }
    }

    /// Instance `n`'s snapshot of second `t`.
    fn snapshot(&mut self, n: usize, t: i64, rng: &mut SmallRng) -> Option<pb::Snapshot> {
        let instance = self.instances.get_mut(n)?;
        let start_second = instance.starts_at.floor() as i64;
        let shock = instance.shocks.second(t, rng);
        let series = if t == start_second && instance.starts_at > 0.0 {
            instance
                .pool
                .partial(1.0 - instance.starts_at.fract(), shock, rng)
        } else {
            instance.pool.pick(shock, rng)
        };
        Some(pb::Snapshot {
            second: t,
            series,
            stats: Some(pb::AgentStats::default()),
        })
    }
}

/// Why the fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The aggregator could not be reached.
    #[error("cannot connect to the aggregator at {0}")]
    Connect(String),
    /// The generator's thread or its runtime could not be started.
    #[error("cannot start the generator's thread: {0}")]
    Thread(std::io::Error),
}

/// What `strobe loadgen` does besides steady load: optionally one deploy.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// The load.
    pub spec: LoadSpec,
    /// A deploy staged this long after start, if any.
    pub deploy_after: Option<Duration>,
    /// The deploy (its `at` is filled in when it happens).
    pub deploy: Deploy,
    /// Stop after this long (`None`: until shutdown).
    pub duration: Option<Duration>,
}

/// Runs a plan until its duration passes or `shutdown` completes; prints, every second, what was sent, acknowledged
/// and refused in that second.
pub async fn run_loadgen(
    plan: LoadPlan,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), LoadError> {
    let fleet = Fleet::start(plan.spec.clone()).await?;
    println!(
        "strobe loadgen agents={} services={} sizes={} series={} histograms={} traffic={} arrival=\"{}\" connections={}",
        plan.spec.agents,
        plan.spec.services,
        if plan.spec.zipf { "zipf" } else { "equal" },
        plan.spec.series,
        plan.spec.histograms,
        plan.spec.traffic,
        plan.spec.arrival.describe(),
        plan.spec.connections
    );
    let started = tokio::time::Instant::now();
    let end = plan.duration.map(|d| started + d);
    let mut deploy = plan
        .deploy_after
        .map(|after| (started + after, plan.deploy.clone()));
    let mut progress = tokio::time::interval(Duration::from_secs(1));
    let mut last = [0u64; 5];
    tokio::pin!(shutdown);
    loop {
        let deploy_at = deploy.as_ref().map(|(at, _)| *at);
        tokio::select! {
            _ = &mut shutdown => break,
            _ = sleep_until_opt(end) => break,
            _ = sleep_until_opt(deploy_at) => {
                if let Some((_, mut d)) = deploy.take() {
                    d.at = clock::unix_millis() as f64 / 1000.0 + 0.2;
                    println!("strobe loadgen deploy service={} version={} instances={}", service_name(d.service), d.version, d.instances);
                    fleet.deploy(d);
                }
            }
            _ = progress.tick() => {
                let stats = &fleet.stats;
                let now = [
                    stats.sent.load(Ordering::Relaxed),
                    stats.shippers.acknowledged.load(Ordering::Relaxed),
                    stats.shippers.refused_snapshots.load(Ordering::Relaxed),
                    stats.shippers.refused_series.load(Ordering::Relaxed),
                    stats.dropped.load(Ordering::Relaxed),
                ];
                let d: Vec<u64> = now.iter().zip(&last).map(|(n, l)| n - l).collect();
                println!(
                    "strobe loadgen second={} sent={} acked={} refused_snapshots={} refused_series={} generator_dropped={} (totals: sent={} acked={})",
                    clock::unix_second(), d[0], d[1], d[2], d[3], d[4], now[0], now[1]
                );
                last = now;
            }
        }
    }
    fleet.stop().await;
    Ok(())
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_sizes_have_a_few_large_services_and_a_long_tail() {
        let assignment = assign_services(10_000, 100, true);
        assert_eq!(assignment.len(), 10_000);
        let mut sizes = vec![0usize; 100];
        for s in &assignment {
            sizes[*s] += 1;
        }
        sizes.sort_unstable();
        assert!(sizes[99] > 1_500 && sizes[99] < 2_200, "{sizes:?}");
        assert!(sizes[50] > 25 && sizes[50] < 60, "{sizes:?}");
        assert!(sizes[0] >= 1, "{sizes:?}");
        let even = assign_services(10, 3, false);
        assert_eq!(even, vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
    }

    /// A version's instances over a minute send most of the pool's seconds, not a few dozen resent by turns: its
    /// latency quantiles are those of thousands of draws, as an identical version's are.
    #[test]
    fn a_versions_minute_draws_from_the_whole_pool() {
        let mut rng = SmallRng::seed_from_u64(7);
        let pool = Pool::build(Behavior::HEALTHY, Shape::INDEPENDENT, 0, 0, POOL_SECONDS, 1);
        let mut drawn = std::collections::BTreeSet::new();
        // Twelve instances for a minute: 720 draws of 256, about 239 distinct expected (71 when picked by turns).
        for _ in 0..60 * 12 {
            drawn.insert(pool.index_for(1.0, &mut rng));
        }
        assert!(drawn.len() > 220, "{}", drawn.len());
    }
}
