//! The Rust `metrics` facade, in process: [`install`] makes Strobe the global recorder of a Rust service and runs
//! the agent inside it, so `metrics::counter!`, `gauge!` and `histogram!` reach the aggregator every second with
//! no sidecar and no UDP. Recording costs an atomic add (counters, gauges) or a short uncontended lock and a push
//! (histograms); once a second the agent's window takes what each series gathered.
//!
//! Mapping: a counter is a counter (its increments in the second; `absolute` counts the rise since the last
//! value); a gauge is a gauge (its value at the end of the second); a histogram is a histogram of the values
//! recorded in the second (negative values as DogStatsD's: a `sign:negative` sibling). Labels become tags.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

use crate::statsd::MetricType;
use crate::window::Window;

/// Most values one histogram keeps in one second by default (`facade_max_values_per_second`); more are counted
/// (`series_over_limit`) and dropped.
pub const MAX_VALUES_PER_SECOND: usize = 100_000;

#[derive(Default)]
struct CounterCell {
    /// Everything counted so far (increments, and absolute values when they rise).
    total: AtomicU64,
    /// What the window has taken of `total`.
    taken: AtomicU64,
}

impl CounterFn for CounterCell {
    fn increment(&self, value: u64) {
        self.total.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.total.fetch_max(value, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct GaugeCell {
    bits: AtomicU64,
    set: AtomicBool,
}

impl GaugeCell {
    fn update(&self, f: impl Fn(f64) -> f64) {
        let mut current = self.bits.load(Ordering::Relaxed);
        loop {
            let next = f(f64::from_bits(current)).to_bits();
            match self.bits.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.set.store(true, Ordering::Relaxed);
    }
}

impl GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.update(|_| value);
    }
}

struct HistogramCell {
    values: Mutex<Vec<f64>>,
    dropped: AtomicU64,
    /// Most values kept in one second.
    max_values: usize,
}

impl HistogramFn for HistogramCell {
    fn record(&self, value: f64) {
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        if values.len() < self.max_values {
            values.push(value);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

enum Cell {
    Counter(Arc<CounterCell>),
    Gauge(Arc<GaugeCell>),
    Histogram(Arc<HistogramCell>),
}

/// Every series the service registered, by key.
pub struct Registry {
    cells: Mutex<HashMap<Key, Cell>>,
    /// Most values one histogram keeps in one second.
    max_values_per_second: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(MAX_VALUES_PER_SECOND)
    }
}

fn name_and_tags(key: &Key) -> (String, Vec<(String, String)>) {
    let mut tags: Vec<(String, String)> = key
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    tags.sort();
    tags.dedup_by(|a, b| a.0 == b.0);
    (key.name().to_owned(), tags)
}

impl Registry {
    /// An empty registry whose histograms keep at most `max_values_per_second` values a second each.
    pub fn new(max_values_per_second: usize) -> Self {
        Self {
            cells: Mutex::new(HashMap::new()),
            max_values_per_second,
        }
    }

    /// The handle of `key`'s cell, created by `new` when the key is new; `None` when the key is registered as
    /// another kind (that handle then records nothing, as DogStatsD refuses a kind conflict).
    fn register<H>(
        &self,
        key: &Key,
        new: impl FnOnce() -> Cell,
        handle: impl FnOnce(&Cell) -> Option<H>,
    ) -> Option<H> {
        let mut cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        handle(cells.entry(key.clone()).or_insert_with(new))
    }

    /// Folds what every series gathered since the last call into `window` (the second about to close).
    pub fn drain_into(&self, window: &mut Window) {
        let cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        for (key, cell) in cells.iter() {
            let (name, tags) = name_and_tags(key);
            let tags: Vec<(&str, &str)> =
                tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            match cell {
                Cell::Counter(c) => {
                    let total = c.total.load(Ordering::Relaxed);
                    let taken = c.taken.swap(total, Ordering::Relaxed);
                    let delta = total.saturating_sub(taken);
                    if delta > 0 {
                        window.record_values(
                            &name,
                            &tags,
                            MetricType::Counter,
                            std::iter::once(delta as f64),
                            1.0,
                        );
                    }
                }
                Cell::Gauge(g) => {
                    if g.set.load(Ordering::Relaxed) {
                        let value = f64::from_bits(g.bits.load(Ordering::Relaxed));
                        window.record_values(
                            &name,
                            &tags,
                            MetricType::Gauge,
                            std::iter::once(value),
                            1.0,
                        );
                    }
                }
                Cell::Histogram(h) => {
                    let values =
                        std::mem::take(&mut *h.values.lock().unwrap_or_else(|e| e.into_inner()));
                    let dropped = h.dropped.swap(0, Ordering::Relaxed);
                    window.count_over_limit(dropped);
                    if !values.is_empty() {
                        window.record_values(
                            &name,
                            &tags,
                            MetricType::Histogram,
                            values.into_iter(),
                            1.0,
                        );
                    }
                }
            }
        }
    }
}

/// The `metrics` recorder that feeds a [`Registry`].
pub struct StrobeRecorder {
    registry: Arc<Registry>,
}

impl StrobeRecorder {
    /// A recorder feeding `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

impl Recorder for StrobeRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .register(
                key,
                || Cell::Counter(Arc::default()),
                |cell| match cell {
                    Cell::Counter(c) => Some(Counter::from_arc(c.clone())),
                    _ => None,
                },
            )
            .unwrap_or_else(Counter::noop)
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .register(
                key,
                || Cell::Gauge(Arc::default()),
                |cell| match cell {
                    Cell::Gauge(g) => Some(Gauge::from_arc(g.clone())),
                    _ => None,
                },
            )
            .unwrap_or_else(Gauge::noop)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .register(
                key,
                || {
                    Cell::Histogram(Arc::new(HistogramCell {
                        values: Mutex::new(Vec::new()),
                        dropped: AtomicU64::new(0),
                        max_values: self.registry.max_values_per_second,
                    }))
                },
                |cell| match cell {
                    Cell::Histogram(h) => Some(Histogram::from_arc(h.clone())),
                    _ => None,
                },
            )
            .unwrap_or_else(Histogram::noop)
    }
}
