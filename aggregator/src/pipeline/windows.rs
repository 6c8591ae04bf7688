//! One service's open seconds and when to seal them. Pure: the caller passes the wall-clock time in.
//!
//! A second is sealed as soon as every instance it expects has reported it: those that reported the previous
//! sealed second, and those that reported a second of the late window late (alive, if behind). Otherwise it waits
//! `grace` after it ended, longer while its snapshots are still streaming in (one arrived at the shard less than
//! `grace_quiet` ago: a burst of thousands is still being decoded; not a trickle of late ones, at most
//! `grace_trickle` of the burst's rate, once `1 - grace_trickle` of the instances expected on time have reported)
//! or fewer than `grace_quorum` of the instances
//! expected on time have reported, and never longer than `grace_max`. When the service's first snapshot of a second
//! arrives more than `grace` after the second ended (the service, or the aggregator, is behind by that much), these
//! waits count from that snapshot instead, up to `grace_max_behind`; and when a second's longest wait ran out while
//! its shard was stopped (a paused host), from when the shard went on, up to `grace_max_behind` too. Ingest is
//! idempotent per (instance, second). A snapshot for a sealed second is merged and yields a correction for
//! `late_window` after the second was sealed (wall clock: replays after an outage are old seconds, sealed moments
//! ago); a snapshot for a second sealed longer ago, or never seen and older than `late_window` before the newest
//! seal, is refused.
//!
//! Replays wait for each other. A stream that reconnects says in its hello up to which second it replays what its
//! agent kept, and its stream notes in the service's [`ReplayBook`] how far it has read. A second is not sealed
//! while an instance replaying it has not been merged past it (it sends its seconds in order, so it will), for as
//! long as that instance keeps moving (`replay_stall`), and at most `replay_wait` after the second's first
//! snapshot (whatever order it came in). Seconds that ended well before the aggregator started (it restarted) are
//! not sealed in its first `replay_gather` either, so that agents reconnecting on their backoff are heard of first.
//! Without this, the first agents back had every replayed second sealed, and after an outage of a minute at 3,000
//! agents 78% of the outage's instance-seconds arrived past their late window and were lost. A stream still behind once
//! it has read a replay of at least 5 s (it read the replay's newest second more than `replay_caught_up` after that
//! second ended) is waited for in the same way for the live seconds queued behind it, until it reads one on time, for
//! at most `replay_wait` after its instance's first hello: at 10,000 agents each live second was otherwise sealed with
//! the few streams that caught up first, and the rest turned into corrections that kept the aggregator behind.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::health::SealedBy;
use crate::model::table::{SeriesId, SeriesTable};
use crate::model::{
    Instance, InstanceSecond, RequestCounts, SealedSecond, SeriesKey, SeriesSummary, SeriesValue,
    Split, Stats,
};
use crate::pipeline::merge::Cell;
use crate::pipeline::replays::ReplayBook;

/// Timing and bounds for one service's windows.
#[derive(Debug, Clone, Copy)]
pub struct WindowSettings {
    /// Milliseconds an incomplete second stays open after it ends...
    pub grace_ms: i64,
    /// ...and after that, until no snapshot for it has arrived for this many milliseconds, and at least this share
    /// of the instances it expects have reported (or all but one)...
    pub grace_quiet_ms: i64,
    /// (the share, from 0 to 1)...
    pub grace_quorum: f64,
    /// (A second whose snapshots still arrive, but at most this share, from 0 to 1, of its burst's rate: the most
    /// that reached its shard within one `grace_quiet`, counts as quiet: a trickle of late ones, not its burst; its
    /// quorum is then at least `1 - grace_trickle`. 0: only no arrival at all counts as quiet.)...
    pub grace_trickle: f64,
    /// ...but never longer than this after it ends...
    pub grace_max_ms: i64,
    /// ...or, for a second that waits from later than its grace (its first snapshot came then, or its shard went on
    /// then from a stall: it is behind), never longer than this after that.
    pub grace_max_behind_ms: i64,
    /// Seconds a sealed second still takes late snapshots.
    pub late_window_secs: i64,
    /// After the aggregator started, how long seconds that ended before it wait for replaying agents to be heard of
    /// (milliseconds).
    pub replay_gather_ms: i64,
    /// A second stops waiting for a replaying instance that has not moved to a newer second for this long (ms)...
    pub replay_stall_ms: i64,
    /// ...and waits for replaying instances at most this long after its first snapshot (ms).
    pub replay_wait_ms: i64,
    /// Most cells (series times splits) in one second of one service.
    pub max_cells: usize,
    /// Most bytes of merged state one service may hold, its open and recent seconds together; what would
    /// allocate past it is dropped.
    pub max_bytes: usize,
}

/// Merged state held by all services together (open and recent seconds), shared by every shard: the aggregator's
/// memory for merging is bounded by `max_decoded_bytes` whatever the number of services, not only per service.
/// Each cell's growth is taken from it atomically before allocating, so shards merging at once cannot pass it.
#[derive(Debug, Clone)]
pub(crate) struct DecodedBytes {
    held: prometheus_client::metrics::gauge::Gauge,
    max: usize,
}

impl DecodedBytes {
    /// A bound of `max` bytes, held bytes shown on `held` (a gauge of the aggregator's `/metrics`).
    pub(crate) fn new(max: usize, held: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self { held, max }
    }

    /// No bound (tests of one service's windows).
    pub(crate) fn unbounded() -> Self {
        Self::new(usize::MAX, Default::default())
    }

    /// Takes `bytes` if that stays within the bound.
    fn try_take(&self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let (Ok(bytes), Ok(max)) = (i64::try_from(bytes), i64::try_from(self.max)) else {
            return self.max == usize::MAX;
        };
        self.held
            .inner()
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |held| {
                    let after = held.saturating_add(bytes);
                    (after <= max).then_some(after)
                },
            )
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.held.dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }
}

/// The hash maps of the merge path: foldhash, randomly seeded per process (SipHash's cost showed in profiles;
/// the seed keeps hostile series names from choosing collisions).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The instances a leaf holds: one version in one zone. Every instance is in exactly one leaf.
type Leaf = (Arc<str>, Option<Arc<str>>);

/// One leaf's cells. Most are in `sorted`, by series id: a snapshot's series, visited in id order, are merged into
/// them in one walk through both, galloping past cells the snapshot does not have. No hashing, and the cells are
/// read in the order they lie in memory, which the processor fetches ahead. (Looked up one by one in a hash map,
/// each cell was a cache miss of its own: the load of its bucket was half of `merge_into`'s time, and `merge_into` a
/// tenth of the aggregator's in the burst after each second.) A series new to the leaf whose id is below the last
/// sorted one (an instance sending a series the leaf's first instances did not) goes to `others`, a hash map:
/// inserted into the vector, it would move every cell after it, for every such snapshot.
#[derive(Debug, Default)]
struct LeafCells {
    sorted: Vec<(SeriesId, Cell)>,
    others: FastMap<SeriesId, Cell>,
}

impl LeafCells {
    /// The first place at or after `from` in `sorted` whose id is not below `key`: one step when that is the next
    /// cell (a snapshot holding the leaf's series), logarithmic in the distance otherwise.
    fn seek(&self, from: usize, key: SeriesId) -> usize {
        let rest = self.sorted.get(from..).unwrap_or_default();
        let mut bound = 1;
        while bound <= rest.len() && rest[bound - 1].0 < key {
            bound *= 2;
        }
        // Every id before `rest[bound / 2]` is below `key`; `rest[bound - 1]`, if there is one, is not.
        let (low, high) = (bound / 2, bound.min(rest.len()));
        from + low + rest[low..high].partition_point(|(id, _)| *id < key)
    }

    /// The cell of `key`, moving the walk through `sorted` (`at`) up to it.
    fn find_mut(&mut self, at: &mut usize, key: SeriesId) -> Option<&mut Cell> {
        *at = self.seek(*at, key);
        match self.sorted.get_mut(*at) {
            Some((id, cell)) if *id == key => Some(cell),
            _ => self.others.get_mut(&key),
        }
    }

    /// Adds cells new to the leaf, given in id order: appended to `sorted` while they come after it, the rest kept
    /// in `others`.
    fn add(&mut self, fresh: Vec<(SeriesId, Cell)>) {
        for (id, cell) in fresh {
            if self.sorted.last().is_none_or(|(last, _)| *last < id) {
                self.sorted.push((id, cell));
            } else {
                self.others.insert(id, cell);
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&SeriesId, &Cell)> {
        self.sorted
            .iter()
            .map(|(id, cell)| (id, cell))
            .chain(self.others.iter())
    }
}

/// What a series is, fixed for the second by its first contribution: later ones of another kind (or histogram
/// scale) are refused, whichever leaf they land in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram(u32),
}

impl Kind {
    fn of(value: &SeriesValue) -> Self {
        match value {
            SeriesValue::Counter(_) => Kind::Counter,
            SeriesValue::Gauge(_) => Kind::Gauge,
            SeriesValue::Histogram { scale, .. } => Kind::Histogram(*scale),
        }
    }
}

/// A second still taking snapshots (or sealed and kept for corrections). Each snapshot is merged once, into its
/// instance's leaf; the overall, per-version and per-zone splits are derived from the leaves when the second is
/// summarised.
#[derive(Debug, Default)]
pub(crate) struct OpenSecond {
    /// Who reported, with their requests and errors.
    reporters: FastMap<Arc<str>, (Arc<Instance>, Option<RequestCounts>)>,
    /// Each leaf's cells, sorted by series id (see [`LeafCells`]).
    leaves: FastMap<Leaf, LeafCells>,
    kinds: FastMap<SeriesId, Kind>,
    cells: usize,
    /// Bytes its cells take (as counted against the service's `max_bytes`).
    bytes: usize,
    /// The service's series table, which the ids are numbers in (one per service while any second holds it).
    table: Option<Arc<SeriesTable>>,
    /// When its first snapshot arrived (wall clock, ms), if it was newer than every second seen before; else 0.
    first_ms: i64,
    /// When its first snapshot arrived (wall clock, ms), whatever its order: replays are waited for at most
    /// `replay_wait` from then.
    opened_ms: i64,
}

/// A second's merged cells by split (overall, per version, per zone), derived from its leaves. When every leaf has
/// the same version, that version's split holds exactly the overall cells: it is not built again, and reads as the
/// overall split (most seconds of most services: a version is deployed for minutes, and runs for days). The same for
/// a zone that every leaf is in.
#[derive(Debug, Default)]
pub(crate) struct Splits {
    /// The cells of every split built.
    pub(crate) cells: FastMap<(Split, SeriesKey), Cell>,
    /// The version of every leaf, if they share one: its split is the overall one.
    pub(crate) sole_version: Option<Arc<str>>,
    /// The zone of every leaf, if they share one: its split is the overall one.
    pub(crate) sole_zone: Option<Arc<str>>,
}

impl Splits {
    /// Every version's cells, with the version (a sole version's are the overall cells).
    pub(crate) fn by_version(&self) -> impl Iterator<Item = (&Arc<str>, &SeriesKey, &Cell)> {
        self.cells
            .iter()
            .filter_map(|((split, key), cell)| match (split, &self.sole_version) {
                (Split::Version(version), None) => Some((version, key, cell)),
                (Split::All, Some(version)) => Some((version, key, cell)),
                _ => None,
            })
    }
}

/// The one value every item of `values` has, if they have one (and there is any).
fn sole<'a>(mut values: impl Iterator<Item = Option<&'a Arc<str>>>) -> Option<Arc<str>> {
    let first = values.next()??;
    values.all(|v| v == Some(first)).then(|| first.clone())
}

/// A summarised second and the merged cells it was summarised from (which the canary reads: merged histograms,
/// not summaries).
#[derive(Debug)]
pub(crate) struct Sealed {
    /// What is published.
    pub(crate) second: SealedSecond,
    /// Every split's cells (a sole version's or zone's read as the overall ones: see [`Splits`]).
    pub(crate) splits: Splits,
    /// Each instance's requests and errors, where it reported them (the canary reads single instances' shocks
    /// from them).
    pub(crate) requests: Vec<(Arc<Instance>, RequestCounts)>,
    /// What sealed it (`None` for a correction).
    pub(crate) by: Option<SealedBy>,
}

impl OpenSecond {
    /// Every split of every series, derived from the leaves (a sole version's or zone's is the overall split: see
    /// [`Splits`]).
    pub(crate) fn splits(&self) -> Splits {
        let mut splits = Splits::default();
        let Some(table) = &self.table else {
            return splits;
        };
        let keys = table.keys();
        splits.sole_version = sole(self.leaves.keys().map(|(version, _)| Some(version)));
        splits.sole_zone = sole(self.leaves.keys().map(|(_, zone)| zone.as_ref()));
        let (by_version, by_zone) = (splits.sole_version.is_none(), splits.sole_zone.is_none());
        {
            for ((version, zone), cells) in &self.leaves {
                for (id, cell) in cells.iter() {
                    let key = keys.get(*id);
                    // No allocation per cell: this runs for every cell of every leaf at each seal.
                    let targets = [
                        Some(Split::All),
                        by_version.then(|| Split::Version(version.clone())),
                        by_zone.then(|| zone.clone()).flatten().map(Split::Zone),
                    ];
                    for split in targets.into_iter().flatten() {
                        match splits.cells.entry((split, key.clone())) {
                            std::collections::hash_map::Entry::Occupied(mut e) => {
                                e.get_mut().absorb(cell)
                            }
                            std::collections::hash_map::Entry::Vacant(e) => {
                                e.insert(cell.clone());
                            }
                        }
                    }
                }
            }
        }
        splits
    }
}

/// How each recent second's snapshots reached a shard (all its services together): while a second is still
/// streaming in, sealing it would only turn the rest of it into corrections. And when the shard was last stopped:
/// the wall clock moved on without it, and deadlines that passed meanwhile passed with nothing merged.
#[derive(Debug)]
pub(crate) struct Arrivals {
    flows: BTreeMap<i64, Flow>,
    /// The window arrivals are counted over (`grace_quiet`, ms)...
    window_ms: i64,
    /// ...in whole slots (at least one).
    window_slots: i64,
    /// When the shard last went round its loop (wall clock, ms; 0 before the first time).
    awake_ms: i64,
    /// When it last went on after not going round its loop for more than a window (wall clock, ms; 0 for never).
    resumed_ms: i64,
    /// The shard's last silence longer than [`STOPPED_MS`]: from when to when it went on (wall clock, ms; `(0, 0)`
    /// for none).
    stopped: (i64, i64),
}

impl Default for Arrivals {
    /// Counted over the default `grace_quiet` (50 ms).
    fn default() -> Self {
        Self::new(50)
    }
}

/// How one second's snapshots reached a shard.
#[derive(Debug, Default)]
struct Flow {
    /// When the newest arrived (wall clock, ms).
    last: i64,
    /// Arrivals per [`SLOT_MS`] slot (slot number, count), oldest first, within the last window.
    slots: std::collections::VecDeque<(i64, u32)>,
    /// The most that arrived within one window, over the second so far: its burst's rate.
    peak: u64,
}

/// The resolution arrivals are counted at.
const SLOT_MS: i64 = 10;

/// How a second's snapshots reach its shard now ([`Arrivals::flowing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flowing {
    /// Still its burst.
    Busy,
    /// A trickle after its burst.
    Trickle,
    /// None for `grace_quiet`.
    Silent,
}

/// A shard silent longer than this was stopped (the host paused, its process stopped, its threads starved, or one
/// turn of its own loop took that long: its queue was not read meanwhile either); a healthy one goes round its loop
/// every 10 ms.
const STOPPED_MS: i64 = 500;

impl Arrivals {
    /// Arrivals counted over windows of `window_ms` (the services' `grace_quiet`).
    pub(crate) fn new(window_ms: i64) -> Self {
        let window_ms = window_ms.max(0);
        Self {
            flows: BTreeMap::new(),
            window_ms,
            window_slots: (window_ms.saturating_add(SLOT_MS - 1) / SLOT_MS).max(1),
            awake_ms: 0,
            resumed_ms: 0,
            stopped: (0, 0),
        }
    }

    /// The shard goes round its loop at `now_ms`.
    pub(crate) fn awake(&mut self, now_ms: i64) {
        if now_ms < self.awake_ms {
            // The clock went back: no silence is measured across it, and no stop ends after now.
            self.stopped = (self.stopped.0.min(now_ms), self.stopped.1.min(now_ms));
        } else if self.awake_ms != 0 && now_ms - self.awake_ms > STOPPED_MS {
            self.stopped = (self.awake_ms, now_ms);
        }
        if self.awake_ms != 0 && now_ms - self.awake_ms > self.window_ms {
            // The shard did not go round its loop for a window (starved, or stopped): the window just past says
            // nothing of the flow, and what it dequeues next is a backlog. No trickle is read until a whole window
            // has been watched again.
            self.resumed_ms = now_ms;
        }
        self.awake_ms = now_ms;
    }

    /// When the shard went on, if `deadline` ran out while it was last stopped.
    fn resumed_past(&self, deadline: i64) -> Option<i64> {
        let (from, to) = self.stopped;
        (from < deadline && deadline <= to).then_some(to)
    }

    /// A snapshot for second `t` arrived at `now_ms`.
    pub(crate) fn record(&mut self, t: i64, now_ms: i64) {
        let slot = now_ms.div_euclid(SLOT_MS);
        let oldest = slot.saturating_sub(self.window_slots - 1);
        let flow = self.flows.entry(t).or_default();
        flow.last = flow.last.max(now_ms);
        match flow.slots.back_mut() {
            Some((newest, count)) if *newest == slot => *count = count.saturating_add(1),
            Some((newest, _)) if *newest > slot => {
                // The clock went back: counted afresh from here (a rate measured across the step means nothing).
                flow.slots.clear();
                flow.slots.push_back((slot, 1));
                flow.peak = 0;
            }
            _ => flow.slots.push_back((slot, 1)),
        }
        while flow.slots.front().is_some_and(|(s, _)| *s < oldest) {
            flow.slots.pop_front();
        }
        let within: u64 = flow.slots.iter().map(|(_, n)| u64::from(*n)).sum();
        flow.peak = flow.peak.max(within);
    }

    /// How second `t`'s snapshots reach the shard at `now_ms`: silent when none arrived for the window
    /// (`grace_quiet`); a trickle when those that arrived within the last window are at most `trickle` of its
    /// burst's rate (the most that arrived within one window), if that rate was at least `1 / trickle` a window and
    /// the shard has gone round its loop on time for the whole window; else busy. A burst being decoded keeps its
    /// rate until its end; a few late snapshots (an instance's GC pause, 0.3 to 0.8 s) are a trickle, and would
    /// otherwise keep the second open after its burst, up to `grace_max`, on a shard of busy services.
    pub(crate) fn flowing(&self, t: i64, now_ms: i64, trickle: f64) -> Flowing {
        let Some(flow) = self.flows.get(&t) else {
            return Flowing::Silent;
        };
        if now_ms >= flow.last.saturating_add(self.window_ms) {
            return Flowing::Silent;
        }
        let oldest = now_ms
            .div_euclid(SLOT_MS)
            .saturating_sub(self.window_slots - 1);
        let within: u64 = flow
            .slots
            .iter()
            .filter(|(s, _)| *s >= oldest)
            .map(|(_, n)| u64::from(*n))
            .sum();
        let peak = flow.peak as f64;
        let watched = now_ms >= self.resumed_ms.saturating_add(self.window_ms);
        if trickle > 0.0
            && watched
            && peak * trickle >= 1.0
            && within as f64 <= trickle * peak
            && within < flow.peak
        {
            Flowing::Trickle
        } else {
            Flowing::Busy
        }
    }

    /// Forgets seconds before `t`.
    pub(crate) fn forget_before(&mut self, t: i64) {
        self.flows = self.flows.split_off(&t);
    }

    /// When the newest snapshot for `t` arrived.
    #[cfg(test)]
    fn last(&self, t: i64) -> Option<i64> {
        self.flows.get(&t).map(|flow| flow.last)
    }
}

/// What applying a snapshot did.
#[derive(Debug)]
pub(crate) enum Applied {
    /// Merged into an open second.
    Merged {
        /// Series dropped: kind or scale conflicts, or the service's cell limit.
        dropped: u32,
        /// Series dropped because merging them would have taken the service past `max_bytes`.
        over_budget: u32,
        /// Series dropped because merging them would have taken all services together past `max_decoded_bytes`.
        over_total: u32,
    },
    /// This instance already reported this second; nothing changed.
    Duplicate {
        /// Whether its second is sealed (counted); a duplicate of an open second is counted only at its seal.
        sealed: bool,
    },
    /// Merged into this already sealed second; [`ServiceWindows::corrected`] summarizes its new content (once per
    /// batch of late snapshots, not once per snapshot).
    Correction {
        /// The second.
        t: i64,
        /// Series dropped, as for [`Applied::Merged`].
        dropped: u32,
        /// As for [`Applied::Merged`].
        over_budget: u32,
        /// As for [`Applied::Merged`].
        over_total: u32,
    },
    /// Older than the late window; refused.
    TooLate,
}

/// One service's open and recently sealed seconds.
#[derive(Debug)]
pub(crate) struct ServiceWindows {
    service: Arc<str>,
    settings: WindowSettings,
    open: BTreeMap<i64, OpenSecond>,
    /// Sealed seconds still taking late snapshots, with when (wall clock, ms) each was sealed.
    recent: BTreeMap<i64, (OpenSecond, i64)>,
    /// Seconds sealed and then forgotten (their late window over) that are still within `late_window_secs` of the
    /// newest sealed one: a snapshot for one of them is too late. Without this, a service whose seconds stopped
    /// advancing (a pause, a stalled fleet) would take such a snapshot as a second never seen, and publish it
    /// alone as a correction that replaces the whole second.
    forgotten: BTreeSet<i64>,
    last_sealed: Option<i64>,
    /// When the newest seal happened (wall clock, ms).
    last_seal_ms: i64,
    /// Wall clock of the newest snapshot applied, milliseconds.
    last_arrival_ms: i64,
    /// Bytes the open and recent seconds' cells take.
    bytes: usize,
    /// The same bytes, counted with every other service's.
    all: DecodedBytes,
    expected: HashSet<Arc<str>>,
    /// Those of `expected` that did not report the last sealed second on time but reported one of the late window
    /// late: waited for (completeness), but not counted for the quorum while they are at most half of `expected`,
    /// or an instance that is always late would hold every second to `grace_max`.
    stragglers: HashSet<Arc<str>>,
    /// The newest second each instance reported late (merged into a sealed second), within the late window: an
    /// instance whose seconds arrive late is alive, and is expected in the next second however far behind it is
    /// (up to `late_window`), or a service falling behind would expect only the few that are still on time, and
    /// seal each second at their first snapshot.
    late: FastMap<Arc<str>, i64>,
    /// Instances replaying into this service (see the module's doc).
    replays: Arc<ReplayBook>,
    /// When the aggregator started (wall clock, ms; 0 when not said).
    started_ms: i64,
    /// Seconds up to this one were sealed (and published) before this service's state was last dropped as idle: a
    /// snapshot for one of them is too late, or it would open its second again and publish it partial.
    sealed_before_eviction: Option<i64>,
}

impl Drop for ServiceWindows {
    /// A service dropped (idle, moved, or its shard restarted) gives its bytes back to the common bound.
    fn drop(&mut self) {
        self.all.release(self.bytes);
    }
}

impl ServiceWindows {
    /// No seconds yet.
    pub(crate) fn new(service: Arc<str>, settings: WindowSettings) -> Self {
        Self {
            service,
            settings,
            open: BTreeMap::new(),
            recent: BTreeMap::new(),
            forgotten: BTreeSet::new(),
            last_sealed: None,
            last_seal_ms: 0,
            last_arrival_ms: 0,
            bytes: 0,
            all: DecodedBytes::unbounded(),
            expected: HashSet::new(),
            stragglers: HashSet::new(),
            late: FastMap::default(),
            replays: Arc::default(),
            started_ms: 0,
            sealed_before_eviction: None,
        }
    }

    /// Whether second `t` (first snapshot at `opened_ms`) still waits for replays at `now_ms`.
    fn waits_for_replays(&self, t: i64, opened_ms: i64, now_ms: i64) -> bool {
        let ended = t.saturating_add(1).saturating_mul(1000);
        if now_ms >= opened_ms.saturating_add(self.settings.replay_wait_ms) {
            return false;
        }
        // Ended well before the aggregator started: a replay, whose other agents may still be reconnecting, for
        // `replay_gather` after the start and after each hello of an agent new to the service's book (at 10,000
        // agents replaying a minute each, their hellos came over more than `replay_gather`).
        let gathering = ended.saturating_add(self.settings.grace_max_ms) < self.started_ms
            && now_ms
                < self
                    .started_ms
                    .max(self.replays.last_hello_ms())
                    .saturating_add(self.settings.replay_gather_ms);
        gathering || self.replays.holds(t, now_ms, self.settings.replay_stall_ms)
    }

    /// In an aggregator that started at `started_ms` (seconds that ended well before it are replays, gathered for
    /// `replay_gather`).
    pub(crate) fn started_at(mut self, started_ms: i64) -> Self {
        self.started_ms = started_ms;
        self
    }

    /// Follows the instances replaying into this service in `book` (which its streams write).
    pub(crate) fn following(mut self, book: Arc<ReplayBook>) -> Self {
        self.replays = book;
        self
    }

    /// Counts this service's merged state with every other service's, within their common bound.
    pub(crate) fn sharing(mut self, all: DecodedBytes) -> Self {
        self.all = all;
        self
    }

    /// Bytes a merge may still allocate within the service's own bound.
    fn room(&self) -> usize {
        self.settings.max_bytes.saturating_sub(self.bytes)
    }

    /// The newest sealed second.
    pub(crate) fn last_sealed(&self) -> Option<i64> {
        self.last_sealed
    }

    /// This service's state was dropped (idle) after sealing up to `t`: snapshots of those seconds are too late.
    pub(crate) fn sealed_before_eviction(&mut self, t: i64) {
        self.sealed_before_eviction = Some(t);
    }

    /// Whether the service has nothing open and nothing arrived or sealed in the `idle_ms` before `now_ms` (wall
    /// clock: a service replaying minutes-old seconds after an outage is busy, however old its seconds are).
    pub(crate) fn is_idle(&self, now_ms: i64, idle_ms: i64) -> bool {
        self.open.is_empty()
            && now_ms.saturating_sub(self.last_seal_ms.max(self.last_arrival_ms)) >= idle_ms
    }

    /// Until when (wall clock, ms) sealed second `t` takes late snapshots; `None` when it is not held (never
    /// sealed, or gone).
    pub(crate) fn takes_late_until(&self, t: i64) -> Option<i64> {
        self.recent.get(&t).map(|(_, sealed_at)| {
            sealed_at.saturating_add(self.settings.late_window_secs.saturating_mul(1000))
        })
    }

    /// A sealed second's current content, as a correction; `None` once it left the late window.
    pub(crate) fn corrected(&self, t: i64) -> Option<Sealed> {
        self.recent
            .get(&t)
            .map(|(second, _)| summarize(&self.service, t, second, true))
    }

    /// Merges one instance's second, arrived at `now_ms`.
    pub(crate) fn apply(&mut self, snapshot: InstanceSecond, now_ms: i64) -> Applied {
        let t = snapshot.t;
        self.last_arrival_ms = self.last_arrival_ms.max(now_ms);
        self.replays.merged(&snapshot.instance.id, t, now_ms);
        if self
            .sealed_before_eviction
            .is_some_and(|sealed| t <= sealed)
        {
            return Applied::TooLate;
        }
        if let Some(last) = self.last_sealed
            && t <= last
        {
            // A sealed second takes late snapshots for `late_window` after it was sealed (wall clock), however old
            // it is: after an outage, agents replay minutes of seconds, and the first to reconnect gets them sealed
            // while the others are still on their way.
            let late_ms = self.settings.late_window_secs.saturating_mul(1000);
            let open_for_late = match self.recent.get(&t) {
                Some((_, sealed_at)) => now_ms < sealed_at.saturating_add(late_ms),
                None => t > last - self.settings.late_window_secs && !self.forgotten.contains(&t),
            };
            if !open_for_late {
                return Applied::TooLate;
            }
            let available = self.room();
            // A second never seen (no snapshot before its seal) counts as sealed now: kept as long as any.
            let sealed_at = now_ms.max(self.last_seal_ms);
            let (second, _) = self
                .recent
                .entry(t)
                .or_insert_with(|| (OpenSecond::default(), sealed_at));
            let id = snapshot.instance.id.clone();
            let Some(merged) = merge_into(
                second,
                snapshot,
                self.settings.max_cells,
                available,
                &self.all,
            ) else {
                return Applied::Duplicate { sealed: true };
            };
            self.bytes += merged.used;
            if t > last - self.settings.late_window_secs {
                // It missed a recent seal but is alive: wait for it in the next second, or a straggler would be
                // left out (and only corrected) second after second.
                if self.expected.insert(id.clone()) {
                    self.stragglers.insert(id.clone());
                }
                let newest = self.late.entry(id).or_insert(t);
                *newest = (*newest).max(t);
            }
            return Applied::Correction {
                t,
                dropped: merged.dropped,
                over_budget: merged.over_budget,
                over_total: merged.over_total,
            };
        }
        // Only a second newer than any seen may have its waits count from its first snapshot: seconds of a
        // backlog or a replay come in order, while a client sending old seconds out of order would otherwise keep
        // dozens of them open at once.
        // (Seconds that have ended only: an agent whose clock runs ahead may open the next one early.)
        let ended = now_ms.div_euclid(1000);
        let newest = self
            .open
            .range(..ended)
            .next_back()
            .map(|(t, _)| *t)
            .max(self.last_sealed);
        let first_ms = if newest.is_none_or(|n| t > n) {
            now_ms
        } else {
            0
        };
        let available = self.room();
        let second = self.open.entry(t).or_insert_with(|| OpenSecond {
            first_ms,
            opened_ms: now_ms,
            ..OpenSecond::default()
        });
        let Some(merged) = merge_into(
            second,
            snapshot,
            self.settings.max_cells,
            available,
            &self.all,
        ) else {
            return Applied::Duplicate { sealed: false };
        };
        self.bytes += merged.used;
        Applied::Merged {
            dropped: merged.dropped,
            over_budget: merged.over_budget,
            over_total: merged.over_total,
        }
    }

    /// Seals, oldest first, every open second that is complete or past its grace at `now_ms`.
    pub(crate) fn seal_ready(&mut self, now_ms: i64, arrivals: &Arrivals) -> Vec<Sealed> {
        let mut sealed = Vec::new();
        while let Some((&t, second)) = self.open.first_key_value() {
            if self.waits_for_replays(t, second.opened_ms, now_ms) {
                break;
            }
            // Waiting starts when the second ends, or, when the service's first snapshot of it came more than a
            // grace later, from then: a service (or a whole shard) behind by seconds, on a saturated host or
            // replaying after an outage, would otherwise have each second sealed at its first snapshot and the
            // rest turned into corrections, which cost more than merging them on time did (an aggregator behind
            // stayed behind). Behind, its burst is queued behind the seconds before it, so it may wait longer.
            let ended = t.saturating_add(1).saturating_mul(1000);
            let grace = self.settings.grace_ms;
            let (mut end, mut longest) = if second.first_ms > ended.saturating_add(grace) {
                (second.first_ms, self.settings.grace_max_behind_ms)
            } else {
                (ended, self.settings.grace_max_ms)
            };
            // Its longest wait ran out while the shard was stopped (a paused host): what was queued for it
            // meanwhile was never merged, and sealing it now would seal it with what came before the stop. Once:
            // waiting from then, it runs out after the stop.
            if let Some(resumed) = arrivals.resumed_past(end.saturating_add(longest.max(grace))) {
                (end, longest) = (resumed, self.settings.grace_max_behind_ms);
            }
            let complete = !self.expected.is_empty()
                && self
                    .expected
                    .iter()
                    .all(|id| second.reporters.contains_key(id));
            let flowing = arrivals.flowing(t, now_ms, self.settings.grace_trickle);
            // A lull at the shard while most of the expected instances are missing is a burst held up on its way
            // (a busy core, a slow connection), not the end of the second: sealing then would turn most of it into
            // corrections. Counted only once the grace has passed in a lull, over the instances expected on time:
            // stragglers are waited for, not counted (an instance that is always late would hold every second to
            // `grace_max`), unless most of the service is late: then it is behind as a whole, and all count.
            // Past a burst that still trickles, few of them may be missing, not "all but one": more missing were
            // held up together, on one connection or core, rather than late one by one; and a small service whose
            // own burst is late reads as a trickle beside a large one on the same shard. At least `1 - grace_trickle`
            // of them, and at least one.
            let share = match flowing {
                Flowing::Busy => None,
                Flowing::Silent => Some((self.settings.grace_quorum, true)),
                Flowing::Trickle => Some((
                    self.settings
                        .grace_quorum
                        .max(1.0 - self.settings.grace_trickle),
                    false,
                )),
            };
            let few_late = self.stragglers.len() * 2 <= self.expected.len();
            let quorum = |(share, all_but_one): (f64, bool)| {
                let (mut expected, mut reported) = (0usize, 0usize);
                for id in self
                    .expected
                    .iter()
                    .filter(|id| !few_late || !self.stragglers.contains(*id))
                {
                    expected += 1;
                    reported += usize::from(second.reporters.contains_key(id));
                }
                let needed = (expected as f64 * share.clamp(0.0, 1.0)).ceil() as usize;
                if all_but_one {
                    reported >= needed.min(expected.saturating_sub(1))
                } else {
                    expected > 0 && reported >= needed
                }
            };
            let by = if complete {
                SealedBy::Complete
            } else if now_ms >= end.saturating_add(grace) && share.is_some_and(quorum) {
                if flowing == Flowing::Trickle {
                    SealedBy::Trickle
                } else {
                    SealedBy::Quiet
                }
            } else if now_ms >= end.saturating_add(longest.max(grace)) {
                SealedBy::Longest
            } else {
                break;
            };
            let Some(second) = self.open.remove(&t) else {
                break;
            };
            // Expected next: who reported this second, and who reported a second of the late window late.
            let lagging = t - self.settings.late_window_secs;
            self.late.retain(|_, newest| *newest > lagging);
            self.expected = second.reporters.keys().cloned().collect();
            self.stragglers = self
                .late
                .keys()
                .filter(|id| !second.reporters.contains_key(*id))
                .cloned()
                .collect();
            self.expected.extend(self.stragglers.iter().cloned());
            self.last_sealed = Some(t);
            self.last_seal_ms = now_ms;
            let mut summary = summarize(&self.service, t, &second, false);
            summary.by = Some(by);
            sealed.push(summary);
            self.recent.insert(t, (second, now_ms));
        }
        // One second more than late data is accepted for, so a correction gathered just before the end of its late
        // window is still there to publish (a correction is due at the latest when its late window ends).
        let keep_ms = self
            .settings
            .late_window_secs
            .saturating_add(1)
            .saturating_mul(1000);
        let (bytes, forgotten, all) = (&mut self.bytes, &mut self.forgotten, &self.all);
        self.recent.retain(|t, (second, sealed_at)| {
            let keep = now_ms < sealed_at.saturating_add(keep_ms);
            if !keep {
                *bytes = bytes.saturating_sub(second.bytes);
                all.release(second.bytes);
                forgotten.insert(*t);
            }
            keep
        });
        if let Some(last) = self.last_sealed {
            // Older ones are refused by age alone.
            let oldest_in_window = last - self.settings.late_window_secs;
            self.forgotten.retain(|t| *t > oldest_in_window);
        }
        sealed
    }
}

/// Merges a snapshot into its instance's leaf, allocating at most `available` bytes (the service's own room),
/// each cell's growth taken from `all` before it is allocated; says what was dropped and what was used (`None`:
/// the instance already reported this second). The series are taken in id order: when the cell limit or a byte
/// bound is reached partway, the series the service named first are the ones kept.
fn merge_into(
    second: &mut OpenSecond,
    snapshot: InstanceSecond,
    max_cells: usize,
    available: usize,
    all: &DecodedBytes,
) -> Option<Merge> {
    // Each instance reports a second once: a second report of it is a duplicate, merged nowhere.
    if second.reporters.contains_key(&snapshot.instance.id) {
        return None;
    }
    let (instance, requests) = (snapshot.instance, snapshot.requests);
    second.table.get_or_insert(snapshot.table);
    // The series in id order, as (id, place in the snapshot) packed in one word: sorting words is cheap, and of a
    // series sent twice the first comes first. (An agent's order is its own: the ids follow the order in which the
    // service's first stream named them.)
    let series = snapshot.series;
    let mut order: Vec<u64> = series
        .iter()
        .enumerate()
        .map(|(i, (id, _))| ((id.index() as u64) << 32) | i as u64)
        .collect();
    if !order.is_sorted() {
        order.sort_unstable();
    }
    let leaf = second
        .leaves
        .entry((instance.version.clone(), instance.zone.clone()))
        .or_default();
    let (mut dropped, mut over_budget, mut over_total, mut used) = (0, 0, 0, 0usize);
    // Series new to the leaf, in id order, added once the walk is done.
    let mut fresh = Vec::new();
    // The last series taken from this snapshot: the same series twice in one snapshot (named and by id, say)
    // counts once.
    let mut taken: Option<SeriesId> = None;
    // The walk through the leaf's sorted cells.
    let mut at = 0;
    for (key, value) in order
        .iter()
        .map(|k| &series[(k & u64::from(u32::MAX)) as usize])
    {
        let key = *key;
        if taken == Some(key) {
            dropped += 1;
            continue;
        }
        if let Some(cell) = leaf.find_mut(&mut at, key) {
            // Checked before allocating: a histogram reaching further than the budget allows is refused.
            let growth = cell.growth(value);
            if used + growth > available {
                over_budget += 1;
                continue;
            }
            if !all.try_take(growth) {
                over_total += 1;
                continue;
            }
            if cell.merge(value).is_err() {
                all.release(growth);
                dropped += 1;
            } else {
                taken = Some(key);
                used += growth;
            }
            continue;
        }
        // The first contribution of this series to this leaf: within the cell limit, and agreeing with the other
        // leaves (a refused contribution neither fixes the series' kind nor costs memory).
        let kind = Kind::of(value);
        if second.cells >= max_cells || second.kinds.get(&key).is_some_and(|k| *k != kind) {
            dropped += 1;
            continue;
        }
        let cost = Cell::cost(value);
        if used + cost > available {
            over_budget += 1;
            continue;
        }
        if !all.try_take(cost) {
            over_total += 1;
            continue;
        }
        second.kinds.entry(key).or_insert(kind);
        second.cells += 1;
        used += cost;
        taken = Some(key);
        fresh.push((key, Cell::new(value)));
    }
    leaf.add(fresh);
    second
        .reporters
        .insert(instance.id.clone(), (instance, requests));
    second.bytes += used;
    Some(Merge {
        dropped,
        over_budget,
        over_total,
        used,
    })
}

/// What merging one snapshot did.
struct Merge {
    /// Series dropped: repeated, a kind conflict, or past the cell limit.
    dropped: u32,
    /// Series dropped for want of the service's own room (`max_bytes`).
    over_budget: u32,
    /// Series dropped for want of room in all services' common bound.
    over_total: u32,
    /// Bytes allocated (already taken from the common bound).
    used: usize,
}

/// A series' tags as its summaries list them, one map shared by all its splits.
type SharedTags = Arc<BTreeMap<Arc<str>, Arc<str>>>;

fn summarize(service: &Arc<str>, t: i64, second: &OpenSecond, correction: bool) -> Sealed {
    let splits = second.splits();
    // In series order (name, then tags), each series' splits in split order. The distinct series (every one has
    // an overall split) are sorted by name and tags, and the cells by their series' rank: sorting every cell by
    // name and tags was a third of sealing a service of 20,000 series (the `large_service` kernel bench).
    let mut distinct: Vec<&SeriesKey> = splits
        .cells
        .keys()
        .filter(|(split, _)| *split == Split::All)
        .map(|(_, key)| key)
        .collect();
    distinct.sort_unstable();
    let rank: FastMap<&SeriesKey, usize> = distinct
        .into_iter()
        .enumerate()
        .map(|(rank, key)| (key, rank))
        .collect();
    // Each cell, and the sole version's and zone's beside the overall one they read as (marked `true`).
    let shared: Vec<Split> = [
        splits.sole_version.clone().map(Split::Version),
        splits.sole_zone.clone().map(Split::Zone),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut keys: Vec<(usize, &Split, &SeriesKey, &Cell, bool)> =
        Vec::with_capacity(splits.cells.len() + shared.len() * rank.len());
    for ((split, key), cell) in &splits.cells {
        let rank = rank.get(key).copied().unwrap_or(usize::MAX);
        keys.push((rank, split, key, cell, false));
        if *split == Split::All {
            keys.extend(shared.iter().map(|split| (rank, split, key, cell, true)));
        }
    }
    // (The key itself last: a tie-break that costs nothing while every series has its overall split.)
    keys.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    // A shared split comes after its overall one (right after, but for a sole zone, which follows the series'
    // versions) and takes its statistics: only overall rows set them. The series' splits share its tag map.
    let mut overall: Option<Stats> = None;
    let mut tags: Option<(usize, SharedTags)> = None;
    let series = keys
        .into_iter()
        .map(|(rank, split, series_key, cell, is_shared)| {
            let stats = match (is_shared, &overall) {
                (true, Some(stats)) => stats.clone(),
                _ => cell.stats(),
            };
            // (Kept only where a shared split will take it.)
            if *split == Split::All && !shared.is_empty() {
                overall = Some(stats.clone());
            }
            let tags = match &tags {
                // (The rank is the series': each split's cell has a key of its own. Every key has a rank, as every
                // series has its overall split; one without would not share.)
                Some((of, map)) if *of == rank && rank != usize::MAX => map.clone(),
                _ => {
                    let map = Arc::new(series_key.tags.iter().cloned().collect());
                    tags = Some((rank, Arc::clone(&map)));
                    map
                }
            };
            SeriesSummary {
                service: service.clone(),
                metric: series_key.metric.clone(),
                tags,
                version: match split {
                    Split::Version(v) => Some(v.clone()),
                    _ => None,
                },
                zone: match split {
                    Split::Zone(z) => Some(z.clone()),
                    _ => None,
                },
                instances: cell.instances(),
                stats,
            }
        })
        .collect();
    let mut instances: Vec<Arc<Instance>> = second
        .reporters
        .values()
        .map(|(instance, _)| instance.clone())
        .collect();
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    let mut requests: Vec<(Arc<Instance>, RequestCounts)> = second
        .reporters
        .values()
        .filter_map(|(instance, counts)| Some((instance.clone(), (*counts)?)))
        .collect();
    requests.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    Sealed {
        requests,
        second: SealedSecond {
            service: service.clone(),
            t,
            correction,
            series,
            instances,
        },
        splits,
        by: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl ServiceWindows {
        /// Applies as if arrived right after the newest seal.
        fn apply_now(&mut self, snapshot: InstanceSecond) -> Applied {
            let now = self.last_seal_ms;
            self.apply(snapshot, now)
        }

        fn seal_ready_seconds(&mut self, now_ms: i64, arrivals: &Arrivals) -> Vec<SealedSecond> {
            self.seal_ready(now_ms, arrivals)
                .into_iter()
                .map(|s| s.second)
                .collect()
        }

        fn corrected_second(&self, t: i64) -> Option<SealedSecond> {
            self.corrected(t).map(|s| s.second)
        }
    }
    use crate::model::{SeriesValue, Stats};

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
        max_cells: 1000,
        max_bytes: usize::MAX,
    };

    fn instance(id: &str, version: &str, zone: Option<&str>) -> Arc<Instance> {
        Arc::new(Instance {
            service: "svc".into(),
            id: id.into(),
            version: version.into(),
            zone: zone.map(Into::into),
            deployer: None,
        })
    }

    /// `n` instances of version v1, no zone: `i00`, `i01`...
    fn fleet(n: usize) -> Vec<Arc<Instance>> {
        (0..n)
            .map(|i| instance(&format!("i{i:02}"), "v1", None))
            .collect()
    }

    /// The tests' one series table (one service).
    fn table() -> Arc<SeriesTable> {
        static TABLE: std::sync::OnceLock<Arc<SeriesTable>> = std::sync::OnceLock::new();
        TABLE
            .get_or_init(|| Arc::new(SeriesTable::new(1_000)))
            .clone()
    }

    fn id(name: &str) -> SeriesId {
        table()
            .intern(SeriesKey::new(name.into(), Arc::new([])))
            .expect("room")
    }

    fn counter(inst: &Arc<Instance>, t: i64, value: f64) -> InstanceSecond {
        InstanceSecond {
            instance: inst.clone(),
            agent: Default::default(),
            requests: None,
            t,
            series: vec![(id("requests"), SeriesValue::Counter(value))],
            table: table(),
        }
    }

    fn sum_of(sealed: &SealedSecond, version: Option<&str>, zone: Option<&str>) -> (f64, u32) {
        let s = sealed
            .series
            .iter()
            .find(|s| s.version.as_deref() == version && s.zone.as_deref() == zone)
            .unwrap();
        match s.stats {
            Stats::Counter { sum } => (sum, s.instances),
            _ => panic!("not a counter"),
        }
    }

    #[test]
    fn splits_by_version_and_zone() {
        let a = instance("a", "v1", Some("z1"));
        let b = instance("b", "v2", Some("z1"));
        let c = instance("c", "v2", None);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        w.apply_now(counter(&a, 10, 1.0));
        w.apply_now(counter(&b, 10, 2.0));
        w.apply_now(counter(&c, 10, 4.0));
        let sealed = w.seal_ready_seconds(11_250, &Arrivals::default());
        assert_eq!(sealed.len(), 1);
        let table = [
            (None, None, (7.0, 3)),
            (Some("v1"), None, (1.0, 1)),
            (Some("v2"), None, (6.0, 2)),
            (None, Some("z1"), (3.0, 2)),
        ];
        for (version, zone, expected) in table {
            assert_eq!(
                sum_of(&sealed[0], version, zone),
                expected,
                "{version:?} {zone:?}"
            );
        }
        assert_eq!(sealed[0].series.len(), 4);
        assert_eq!(sealed[0].instances.len(), 3);
    }

    /// With one version among a second's instances, its split is the overall one, not merged again: listed right
    /// after it with the same statistics, and read by the canary as that version's cells. The same for a zone
    /// every instance is in. A second version makes each version's split its own, and an instance without a zone
    /// (or in another) each zone's.
    #[test]
    fn a_sole_version_or_zone_reads_as_the_overall_split() {
        use crate::model::hdr::CheckedV2;
        use hdrhistogram::serialization::{Serializer, V2Serializer};
        let latency = |n: u64| {
            let mut h = hdrhistogram::Histogram::<u64>::new(2).unwrap();
            h.record(10 * n).unwrap();
            h.record(1000 * n).unwrap();
            let mut bytes = Vec::new();
            V2Serializer::new().serialize(&h, &mut bytes).unwrap();
            let v2 = CheckedV2::check(bytes.into(), 3, u64::MAX).unwrap();
            SeriesValue::Histogram { v2, scale: 1 }
        };
        let seal = |fleet: &[(&str, &str, Option<&str>)]| {
            let mut w = ServiceWindows::new("svc".into(), SETTINGS);
            for (n, (name, version, zone)) in (1u64..).zip(fleet) {
                w.apply_now(InstanceSecond {
                    series: vec![
                        (id("requests"), SeriesValue::Counter(n as f64)),
                        (id("latency"), latency(n)),
                    ],
                    ..counter(&instance(name, version, *zone), 10, 0.0)
                });
            }
            let mut sealed = w.seal_ready(11_250, &Arrivals::default());
            assert_eq!(sealed.len(), 1);
            sealed.remove(0)
        };
        // Each series listed: metric, version, zone, statistics and instances.
        type Listed = (String, Option<String>, Option<String>, Stats, u32);
        let listed = |sealed: &Sealed| -> Vec<Listed> {
            let text = |s: &Option<Arc<str>>| s.as_deref().map(str::to_owned);
            sealed
                .second
                .series
                .iter()
                .map(|s| {
                    let (metric, version, zone) =
                        (s.metric.to_string(), text(&s.version), text(&s.zone));
                    (metric, version, zone, s.stats.clone(), s.instances)
                })
                .collect()
        };
        let by_version = |sealed: &Sealed| -> Vec<(String, String)> {
            let mut read: Vec<(String, String)> = sealed
                .splits
                .by_version()
                .map(|(version, key, _)| (version.to_string(), key.metric.to_string()))
                .collect();
            read.sort();
            read
        };
        let (v1, z1, z2) = (
            Some("v1".to_owned()),
            Some("z1".to_owned()),
            Some("z2".to_owned()),
        );

        // One version, one zone: only the overall cells are merged; v1 and z1 list as they are.
        let one = seal(&[("a", "v1", Some("z1")), ("b", "v1", Some("z1"))]);
        assert_eq!(one.splits.sole_version.as_deref(), Some("v1"));
        assert_eq!(one.splits.sole_zone.as_deref(), Some("z1"));
        assert_eq!(one.splits.cells.len(), 2);
        let rows = listed(&one);
        let splits: Vec<_> = rows
            .iter()
            .map(|r| (r.0.as_str(), r.1.clone(), r.2.clone()))
            .collect();
        assert_eq!(
            splits,
            [
                ("latency", None, None),
                ("latency", v1.clone(), None),
                ("latency", None, z1.clone()),
                ("requests", None, None),
                ("requests", v1.clone(), None),
                ("requests", None, z1.clone()),
            ]
        );
        for shared in [&rows[1], &rows[2], &rows[4], &rows[5]] {
            let overall = if shared.0 == "latency" {
                &rows[0]
            } else {
                &rows[3]
            };
            assert_eq!((&shared.3, shared.4), (&overall.3, overall.4), "{shared:?}");
        }
        assert_eq!(rows[3].3, Stats::Counter { sum: 3.0 });
        assert!(
            matches!(rows[0].3, Stats::Histogram { count: 4, .. }),
            "two values from each instance: {:?}",
            rows[0].3
        );
        assert_eq!(
            by_version(&one),
            [
                ("v1".into(), "latency".into()),
                ("v1".into(), "requests".into())
            ]
        );

        // One version over two zones: v1 reads as the overall split; each zone is merged.
        let zones = seal(&[
            ("a", "v1", Some("z1")),
            ("b", "v1", Some("z2")),
            ("c", "v1", Some("z2")),
        ]);
        assert_eq!(zones.splits.sole_version.as_deref(), Some("v1"));
        assert_eq!(zones.splits.sole_zone, None);
        assert_eq!(zones.splits.cells.len(), 6);
        let sums: Vec<_> = listed(&zones)
            .into_iter()
            .filter(|r| r.0 == "requests")
            .map(|r| (r.1, r.2, r.3, r.4))
            .collect();
        let sum = |sum: f64| Stats::Counter { sum };
        assert_eq!(
            sums,
            [
                (None, None, sum(6.0), 3),
                (v1.clone(), None, sum(6.0), 3),
                (None, z1.clone(), sum(1.0), 1),
                (None, z2.clone(), sum(5.0), 2),
            ]
        );

        // Two versions in one zone: each version merged; z1 reads as the overall split, after the versions.
        let versions = seal(&[
            ("a", "v1", Some("z1")),
            ("b", "v2", Some("z1")),
            ("c", "v2", Some("z1")),
        ]);
        assert_eq!(versions.splits.sole_version, None);
        assert_eq!(versions.splits.sole_zone.as_deref(), Some("z1"));
        assert_eq!(versions.splits.cells.len(), 6);
        let rows: Vec<_> = listed(&versions)
            .into_iter()
            .map(|r| (r.0, r.1, r.2, r.3, r.4))
            .collect();
        let latency: Vec<_> = rows.iter().filter(|r| r.0 == "latency").collect();
        assert_eq!(latency.len(), 4);
        assert_eq!((&latency[3].1, &latency[3].2), (&None, &z1));
        assert_eq!((&latency[3].3, latency[3].4), (&latency[0].3, 3));
        assert!(
            matches!(latency[3].3, Stats::Histogram { count: 6, .. }),
            "{:?}",
            latency[3].3
        );
        let requests: Vec<_> = rows
            .into_iter()
            .filter(|r| r.0 == "requests")
            .map(|r| (r.1, r.2, r.3, r.4))
            .collect();
        assert_eq!(
            requests,
            [
                (None, None, sum(6.0), 3),
                (v1.clone(), None, sum(1.0), 1),
                (Some("v2".into()), None, sum(5.0), 2),
                (None, z1.clone(), sum(6.0), 3),
            ]
        );
        assert_eq!(by_version(&versions).len(), 4);

        // Two versions, and an instance without a zone: every split merged on its own.
        let two = seal(&[
            ("a", "v1", Some("z1")),
            ("b", "v2", Some("z1")),
            ("c", "v2", None),
        ]);
        assert_eq!(
            (
                two.splits.sole_version.clone(),
                two.splits.sole_zone.clone()
            ),
            (None, None)
        );
        assert_eq!(two.splits.cells.len(), 8);
        let sums: Vec<_> = listed(&two)
            .into_iter()
            .filter(|r| r.0 == "requests")
            .map(|r| (r.1, r.2, r.3))
            .collect();
        assert_eq!(
            sums,
            [
                (None, None, sum(6.0)),
                (v1, None, sum(1.0)),
                (Some("v2".into()), None, sum(5.0)),
                (None, z1, sum(3.0)),
            ]
        );
        assert_eq!(by_version(&two).len(), 4);
        // A series' splits share one tag map; another series has its own.
        let series = &two.second.series;
        assert_eq!(
            (&*series[0].metric, &*series[3].metric, &*series[4].metric),
            ("latency", "latency", "requests")
        );
        assert!(
            series[..4]
                .iter()
                .all(|s| Arc::ptr_eq(&s.tags, &series[0].tags))
        );
        assert!(!Arc::ptr_eq(&series[0].tags, &series[4].tags));
    }

    /// A sealed second lists its series by name, then tags, each series' splits overall first, then by version,
    /// then by zone (names and tags from the series table, seconds of many series and splits in any order).
    #[test]
    fn a_sealed_second_lists_series_by_name_tags_and_split() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let key = |metric: &str, tags: &[(&str, &str)]| {
            let tags: Vec<(Arc<str>, Arc<str>)> = tags
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect();
            table()
                .intern(SeriesKey::new(metric.into(), tags.into()))
                .expect("room")
        };
        let mut ids = Vec::new();
        for metric in ["b.requests", "a.latency", "a.latency.p", "b"] {
            for route in ["/x", "/a", "/ab"] {
                ids.push(key(metric, &[("route", route)]));
                ids.push(key(metric, &[("route", route), ("status", "5xx")]));
            }
            ids.push(key(metric, &[]));
        }
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        for i in 0..12 {
            let inst = instance(
                &format!("i{i}"),
                ["v2", "v10", "v1"][i % 3],
                [Some("z2"), Some("z1"), None][i % 3 / 2 + i % 2],
            );
            let mut series: Vec<(SeriesId, SeriesValue)> = ids
                .iter()
                .filter(|_| rng.random_bool(0.8))
                .map(|id| (*id, SeriesValue::Counter(1.0)))
                .collect();
            series.shuffle(&mut rng);
            w.apply_now(InstanceSecond {
                series,
                ..counter(&inst, 10, 1.0)
            });
        }
        let sealed = w.seal_ready_seconds(11_250, &Arrivals::default());
        let order = |s: &SeriesSummary| {
            let split = match (&s.version, &s.zone) {
                (None, None) => (0, String::new()),
                (Some(v), _) => (1, v.to_string()),
                (None, Some(z)) => (2, z.to_string()),
            };
            let tags: Vec<(String, String)> = s
                .tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (s.metric.to_string(), tags, split)
        };
        let listed: Vec<_> = sealed[0].series.iter().map(order).collect();
        let mut sorted = listed.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(listed, sorted);
        // 28 series, up to 6 splits each.
        assert!(listed.len() > 100, "{}", listed.len());
    }

    /// Each instance's requests and errors, as its shard read them, reach the sealed second beside the merge.
    #[test]
    fn each_instances_request_counts_reach_the_sealed_second() {
        let (a, b) = (instance("a", "v1", None), instance("b", "v2", None));
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        let counts = RequestCounts {
            requests: 40.0,
            errors: 3.0,
        };
        w.apply_now(InstanceSecond {
            requests: Some(counts),
            ..counter(&a, 10, 1.0)
        });
        w.apply_now(counter(&b, 10, 2.0));
        let sealed = w.seal_ready(11_250, &Arrivals::default());
        assert_eq!(sealed.len(), 1);
        let requests: Vec<(&str, RequestCounts)> = sealed[0]
            .requests
            .iter()
            .map(|(instance, counts)| (&*instance.id, *counts))
            .collect();
        assert_eq!(requests, [("a", counts)], "b reported none");
    }

    #[test]
    fn seals_when_complete_or_after_grace_in_order() {
        let a = instance("a", "v1", None);
        let b = instance("b", "v1", None);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        // Second 10: nobody is expected yet, so it waits for the grace.
        w.apply_now(counter(&a, 10, 1.0));
        w.apply_now(counter(&b, 10, 1.0));
        assert!(
            w.seal_ready_seconds(11_100, &Arrivals::default())
                .is_empty()
        );
        assert_eq!(w.seal_ready_seconds(11_250, &Arrivals::default()).len(), 1);
        // Second 11: both expected; sealed the moment the second arrives.
        w.apply_now(counter(&a, 11, 1.0));
        assert!(
            w.seal_ready_seconds(12_001, &Arrivals::default())
                .is_empty()
        );
        w.apply_now(counter(&b, 11, 1.0));
        let sealed = w.seal_ready_seconds(12_002, &Arrivals::default());
        assert_eq!(sealed.iter().map(|s| s.t).collect::<Vec<_>>(), [11]);
        // Second 12: b is gone; 13 is complete early but waits for 12, then both go in order.
        w.apply_now(counter(&a, 12, 1.0));
        w.apply_now(counter(&a, 13, 1.0));
        assert!(
            w.seal_ready_seconds(13_100, &Arrivals::default())
                .is_empty()
        );
        let sealed = w.seal_ready_seconds(13_250, &Arrivals::default());
        assert_eq!(sealed.iter().map(|s| s.t).collect::<Vec<_>>(), [12, 13]);
        assert_eq!(w.last_sealed(), Some(13));
    }

    /// A burst of `n` arrivals for second `t`, evenly from `from_ms` over `over_ms`.
    fn burst(arrivals: &mut Arrivals, t: i64, n: i64, from_ms: i64, over_ms: i64) {
        for k in 0..n {
            arrivals.record(t, from_ms + k * over_ms / n);
        }
    }

    #[test]
    fn a_trickle_after_a_burst_is_told_from_the_burst_and_from_a_slow_flow() {
        let mut arrivals = Arrivals::new(50);
        // 400 in 200 ms: about 100 a window.
        burst(&mut arrivals, 11, 400, 12_000, 200);
        assert_eq!(
            arrivals.flowing(11, 12_199, 0.05),
            Flowing::Busy,
            "in the burst"
        );
        assert_eq!(
            arrivals.flowing(11, 12_230, 0.05),
            Flowing::Busy,
            "its last 50 ms"
        );
        // Then a late one every 30 ms: one or two a window, at most 5% of 100.
        for at in [12_260, 12_290, 12_320, 12_350] {
            arrivals.record(11, at);
        }
        assert_eq!(arrivals.flowing(11, 12_360, 0.05), Flowing::Trickle);
        assert_eq!(
            arrivals.flowing(11, 12_360, 0.0),
            Flowing::Busy,
            "without the trickle rule, an arrival 10 ms ago is not quiet"
        );
        assert_eq!(arrivals.flowing(11, 12_400, 0.0), Flowing::Silent);
        // The burst's tail, still a tenth of its rate, is not a trickle.
        let mut tail = Arrivals::new(50);
        burst(&mut tail, 11, 400, 12_000, 200);
        burst(&mut tail, 11, 20, 12_200, 100);
        assert_eq!(tail.flowing(11, 12_300, 0.05), Flowing::Busy);
        // A slow flow (8 a window at most) has no trickle: any arrival within the window keeps it open.
        let mut slow = Arrivals::new(50);
        burst(&mut slow, 11, 40, 12_000, 250);
        assert_eq!(slow.flowing(11, 12_260, 0.05), Flowing::Busy);
        assert_eq!(
            slow.flowing(11, 12_290, 0.05),
            Flowing::Busy,
            "its last arrival has left the counted slots but not the window"
        );
        assert_eq!(slow.flowing(11, 12_300, 0.05), Flowing::Silent);
        // Seconds are counted apart: the next second's burst does not make this one's trickle loud.
        burst(&mut arrivals, 12, 400, 12_360, 40);
        assert_eq!(arrivals.flowing(11, 12_399, 0.05), Flowing::Trickle);
        assert_eq!(arrivals.flowing(12, 12_399, 0.05), Flowing::Busy);
        assert_eq!(
            arrivals.flowing(13, 12_360, 0.05),
            Flowing::Silent,
            "never seen"
        );
    }

    /// `size` instances; `reported` of them report second 11 in a 300 ms burst on a shard busy with other services
    /// too (400 arrivals), then late ones of other services arrive one every 40 ms. When second 11 is sealed (ms),
    /// with how many instances, and what sealed it.
    fn sealed_in_a_trickle(
        settings: WindowSettings,
        size: usize,
        reported: usize,
    ) -> (i64, usize, Option<SealedBy>) {
        let fleet = fleet(size);
        let mut w = ServiceWindows::new("svc".into(), settings);
        let mut arrivals = Arrivals::new(settings.grace_quiet_ms);
        for i in &fleet {
            w.apply_now(counter(i, 10, 1.0));
        }
        // (Nobody expected yet: sealed past its grace on a silent shard.)
        let first = w.seal_ready(11_250, &arrivals);
        assert_eq!(
            first.iter().map(|s| s.by).collect::<Vec<_>>(),
            [Some(SealedBy::Quiet)]
        );
        for i in &fleet[..reported] {
            w.apply_now(counter(i, 11, 1.0));
        }
        burst(&mut arrivals, 11, 400, 12_000, 300);
        for at in (12_320..13_100).step_by(40) {
            arrivals.record(11, at);
            let sealed = w.seal_ready(at + 10, &arrivals);
            if let [one] = &sealed[..] {
                assert_eq!(one.second.t, 11);
                return (at + 10, one.second.instances.len(), one.by);
            }
        }
        panic!("never sealed")
    }

    #[test]
    fn what_is_read_across_a_gap_or_a_step_of_the_clock_is_no_trickle() {
        // The shard did not go round its loop for more than a window: no trickle is read until it has watched a
        // whole window again (what it dequeues right after a gap is a backlog).
        let mut gap = Arrivals::new(50);
        for k in 0..400 {
            gap.awake(12_000 + k / 2);
            gap.record(11, 12_000 + k / 2);
        }
        assert_eq!(gap.flowing(11, 12_199, 0.05), Flowing::Busy);
        gap.awake(12_260);
        gap.record(11, 12_261);
        assert_eq!(gap.flowing(11, 12_270, 0.05), Flowing::Busy);
        gap.awake(12_300);
        gap.record(11, 12_300);
        assert_eq!(
            gap.flowing(11, 12_315, 0.05),
            Flowing::Trickle,
            "a window after the gap, against the burst's rate from before it"
        );
        // Without the gap, the same arrival after the same burst is a trickle at once.
        let mut steady = Arrivals::new(50);
        burst(&mut steady, 11, 400, 12_000, 200);
        steady.record(11, 12_261);
        assert_eq!(steady.flowing(11, 12_270, 0.05), Flowing::Trickle);
        // The clock steps back by half a second: counted afresh, not piled into the newest slot.
        let mut back = Arrivals::new(50);
        burst(&mut back, 11, 400, 12_000, 200);
        burst(&mut back, 11, 100, 11_700, 100);
        assert_eq!(back.flowing(11, 11_790, 0.05), Flowing::Busy);
        burst(&mut back, 11, 2, 11_800, 60);
        assert_eq!(
            back.flowing(11, 11_870, 0.05),
            Flowing::Trickle,
            "a trickle against the rate after the step"
        );
        // A window that is not a whole number of slots (35 ms: four slots), or under one slot (5 ms: one).
        for window in [35, 5] {
            let mut odd = Arrivals::new(window);
            burst(&mut odd, 11, 400, 12_000, 200);
            assert_eq!(
                odd.flowing(11, 12_199, 0.05),
                Flowing::Busy,
                "window {window}"
            );
        }
    }

    #[test]
    fn late_snapshots_trickling_in_after_the_burst_do_not_hold_the_second() {
        let (trickle, longest) = (Some(SealedBy::Trickle), Some(SealedBy::Longest));
        // 98 of 100 in the burst: sealed once the trickle is told from the burst, 70 ms after the burst.
        assert_eq!(
            sealed_in_a_trickle(SETTINGS, 100, 98),
            (12_370, 98, trickle)
        );
        // Without the trickle rule the same flow held it to grace_max.
        let strict = WindowSettings {
            grace_trickle: 0.0,
            ..SETTINGS
        };
        assert_eq!(sealed_in_a_trickle(strict, 100, 98), (13_010, 98, longest));
        // 94 of 100: more are missing than a trickle explains (held up together, on a connection or a core), so
        // it waits as before, though 94% is past the quorum a silent shard needs.
        assert_eq!(
            sealed_in_a_trickle(SETTINGS, 100, 95),
            (12_370, 95, trickle)
        );
        assert_eq!(
            sealed_in_a_trickle(SETTINGS, 100, 94),
            (13_010, 94, longest)
        );
        // A small service whose own burst is late reads as a trickle beside the shard's large one: past a trickle
        // "all but one" is not enough (9 of 10 would be, on a silent shard).
        assert_eq!(sealed_in_a_trickle(SETTINGS, 10, 9), (13_010, 9, longest));
    }

    #[test]
    fn a_lull_with_most_instances_missing_does_not_seal_before_grace_max() {
        let fleet = fleet(20);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        let mut arrivals = Arrivals::default();
        for i in &fleet {
            w.apply_now(counter(i, 10, 1.0));
        }
        assert_eq!(w.seal_ready_seconds(11_250, &arrivals).len(), 1);
        // Second 11: half the fleet is in when the shard goes quiet (a burst held up on its way).
        for i in &fleet[..10] {
            w.apply_now(counter(i, 11, 1.0));
        }
        arrivals.record(11, 12_100);
        assert!(
            w.seal_ready_seconds(12_400, &arrivals).is_empty(),
            "quiet, past the grace, but 10 of 20 missing"
        );
        // 18 of 20 (90%) are in: a quiet lull past the grace seals it without the last two.
        for i in &fleet[10..18] {
            w.apply_now(counter(i, 11, 1.0));
        }
        arrivals.record(11, 12_500);
        assert!(
            w.seal_ready_seconds(12_540, &arrivals).is_empty(),
            "not quiet yet"
        );
        let sealed = w.seal_ready_seconds(12_560, &arrivals);
        assert_eq!(sum_of(&sealed[0], None, None), (18.0, 18));
        // The last two report 11 after its seal: waited for in 12, but not counted for the quorum, or instances
        // that are always late would hold every second to grace_max.
        for i in &fleet[18..] {
            assert!(matches!(
                w.apply(counter(i, 11, 1.0), 12_600),
                Applied::Correction { .. }
            ));
        }
        for i in &fleet[..17] {
            w.apply_now(counter(i, 12, 1.0));
        }
        arrivals.record(12, 13_200);
        let sealed = w.seal_ready_seconds(13_300, &arrivals);
        assert_eq!(
            sum_of(&sealed[0], None, None),
            (17.0, 17),
            "17 of the 18 on time"
        );
        // Second 13: still most missing at grace_max: sealed then, whatever is missing.
        for i in &fleet[..8] {
            w.apply_now(counter(i, 13, 1.0));
        }
        arrivals.record(13, 14_050);
        assert!(w.seal_ready_seconds(14_990, &arrivals).is_empty());
        assert_eq!(w.seal_ready_seconds(15_000, &arrivals).len(), 1);
    }

    /// A service whose seconds stopped advancing: second 10 was sealed whole and has left its late window (wall
    /// clock) while it is still the newest. A straggler's snapshot of it is too late, not a second never seen: as
    /// one, it would be published alone as a correction replacing the whole second.
    #[test]
    fn a_forgotten_second_is_too_late_even_while_it_is_the_newest() {
        let fleet = fleet(3);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        let arrivals = Arrivals::default();
        for i in &fleet[..2] {
            w.apply(counter(i, 10, 1.0), 11_000);
        }
        assert_eq!(w.seal_ready_seconds(12_500, &arrivals).len(), 1);
        // Within its late window, a straggler is a correction of the whole second.
        let straggler = instance("late", "v1", None);
        assert!(matches!(
            w.apply(counter(&fleet[2], 10, 1.0), 13_000),
            Applied::Correction { t: 10, .. }
        ));
        assert_eq!(w.corrected_second(10).map(|s| s.instances.len()), Some(3));
        // Nothing newer arrives; the second's late window ends and it is forgotten.
        assert!(w.seal_ready_seconds(24_000, &arrivals).is_empty());
        assert!(w.corrected_second(10).is_none());
        assert!(matches!(
            w.apply(counter(&straggler, 10, 1.0), 24_500),
            Applied::TooLate
        ));
        // A second of the window that was never sealed still counts as never seen.
        assert!(matches!(
            w.apply(counter(&straggler, 9, 1.0), 24_500),
            Applied::Correction { t: 9, .. }
        ));
    }

    /// A service dropped as idle after sealing second 10 starts again: a straggler of 10 (or older) is too late,
    /// not a new second that would be published again with only the straggler in it; newer seconds (agents
    /// replaying what was never sealed) open as usual.
    #[test]
    fn seconds_sealed_before_an_eviction_stay_sealed() {
        let fleet = fleet(2);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        w.sealed_before_eviction(10);
        assert!(matches!(
            w.apply(counter(&fleet[0], 10, 1.0), 200_000),
            Applied::TooLate
        ));
        assert!(matches!(
            w.apply(counter(&fleet[0], 9, 1.0), 200_000),
            Applied::TooLate
        ));
        assert!(matches!(
            w.apply(counter(&fleet[0], 11, 1.0), 200_000),
            Applied::Merged { .. }
        ));
    }

    #[test]
    fn a_second_whose_first_snapshot_came_late_waits_from_then() {
        let fleet = fleet(4);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        let mut arrivals = Arrivals::default();
        for i in &fleet {
            w.apply_now(counter(i, 10, 1.0));
        }
        arrivals.record(10, 11_000);
        assert_eq!(w.seal_ready_seconds(11_250, &arrivals).len(), 1);
        // The service is 3 s behind: the first snapshot of 11 arrives at 15_000, long past 11's grace_max on the
        // wall clock. It waits its grace from then, and the rest of its burst is in it, not corrections.
        w.apply(counter(&fleet[0], 11, 1.0), 15_000);
        arrivals.record(11, 15_000);
        assert!(w.seal_ready_seconds(15_000, &arrivals).is_empty());
        for (n, i) in fleet[1..].iter().enumerate() {
            let at = 15_040 + 40 * n as i64;
            w.apply(counter(i, 11, 1.0), at);
            arrivals.record(11, at);
        }
        let sealed = w.seal_ready_seconds(15_120, &arrivals);
        assert_eq!(sum_of(&sealed[0], None, None), (4.0, 4), "complete");
        // 12: three of four arrive from 16_000 to 16_100 (the fourth is gone): quiet and a quorum, sealed once the
        // grace has passed since its first snapshot, at 16_250 and not before.
        for (n, i) in fleet[..3].iter().enumerate() {
            let at = 15_000 + 1_000 + 50 * n as i64;
            w.apply(counter(i, 12, 1.0), at);
            arrivals.record(12, at);
        }
        assert!(w.seal_ready_seconds(16_249, &arrivals).is_empty());
        let sealed = w.seal_ready_seconds(16_250, &arrivals);
        assert_eq!(sum_of(&sealed[0], None, None), (3.0, 3));
        // And the longest wait counts from that first snapshot too, grace_max_behind (its burst is queued behind
        // the seconds before it): a second whose first snapshot came at 17_500 and whose others never come is
        // sealed at 20_500, not at 18_500 (grace_max).
        w.apply(counter(&fleet[0], 13, 1.0), 17_500);
        arrivals.record(13, 17_500);
        assert!(w.seal_ready_seconds(17_900, &arrivals).is_empty());
        assert!(w.seal_ready_seconds(18_500, &arrivals).is_empty());
        assert!(w.seal_ready_seconds(20_499, &arrivals).is_empty());
        assert_eq!(w.seal_ready_seconds(20_500, &arrivals).len(), 1);
        // A first snapshot within the grace changes nothing: the grace counts from the end.
        w.apply(counter(&fleet[1], 20, 1.0), 21_100);
        arrivals.record(20, 21_100);
        assert!(w.seal_ready_seconds(21_249, &arrivals).is_empty());
        assert_eq!(w.seal_ready_seconds(21_250, &arrivals).len(), 1);
    }

    #[test]
    fn a_second_whose_deadline_passed_while_its_shard_was_stopped_waits_from_when_it_went_on() {
        let fleet = fleet(10);
        // Two services of one shard: `whole` gets the rest of its burst after the stop, `short` never does.
        let mut whole = ServiceWindows::new("svc".into(), SETTINGS);
        let mut short = ServiceWindows::new("svc".into(), SETTINGS);
        let mut arrivals = Arrivals::default();
        for w in [&mut whole, &mut short] {
            for i in &fleet {
                w.apply_now(counter(i, 10, 1.0));
            }
        }
        arrivals.awake(11_000);
        arrivals.record(10, 11_000);
        arrivals.awake(11_250);
        for w in [&mut whole, &mut short] {
            assert_eq!(w.seal_ready_seconds(11_250, &arrivals).len(), 1);
        }
        // Two of ten snapshots of 11 arrive on time, then the shard is stopped from 12_100 to 15_000: 11's
        // grace_max (13_000) passed meanwhile on the wall clock, with nothing heard from the other eight.
        for w in [&mut whole, &mut short] {
            for i in &fleet[..2] {
                w.apply(counter(i, 11, 1.0), 12_050);
            }
        }
        arrivals.record(11, 12_050);
        arrivals.awake(12_050);
        arrivals.awake(12_100);
        assert!(whole.seal_ready_seconds(12_100, &arrivals).is_empty());
        arrivals.awake(15_000);
        for w in [&mut whole, &mut short] {
            assert!(
                w.seal_ready_seconds(15_000, &arrivals).is_empty(),
                "not sealed with two of ten the moment the shard goes on"
            );
        }
        // The rest of its burst comes as the shard drains its queue, and 11 is sealed whole, not as corrections.
        for (n, i) in fleet[2..].iter().enumerate() {
            let at = 15_010 + 10 * n as i64;
            arrivals.awake(at);
            whole.apply(counter(i, 11, 1.0), at);
            arrivals.record(11, at);
        }
        let sealed = whole.seal_ready_seconds(15_090, &arrivals);
        assert_eq!(sum_of(&sealed[0], None, None), (10.0, 10), "complete");
        // Without its quorum, it is sealed grace_max_behind after the shard went on, not before.
        assert!(short.seal_ready_seconds(17_999, &arrivals).is_empty());
        assert_eq!(short.seal_ready_seconds(18_000, &arrivals).len(), 1);
    }

    #[test]
    fn a_stop_is_a_silence_of_more_than_half_a_second_and_only_deadlines_within_it_move() {
        let mut arrivals = Arrivals::default();
        arrivals.awake(1_000);
        arrivals.awake(1_500);
        assert_eq!(arrivals.resumed_past(1_200), None, "500 ms is not a stop");
        arrivals.awake(2_001);
        assert_eq!(arrivals.resumed_past(1_800), Some(2_001), "501 ms is");
        assert_eq!(arrivals.resumed_past(2_001), Some(2_001));
        assert_eq!(arrivals.resumed_past(1_500), None, "ran out before it");
        assert_eq!(arrivals.resumed_past(2_002), None, "runs out after it");
        // The clock goes back: nothing is moved past now.
        arrivals.awake(1_700);
        assert_eq!(arrivals.resumed_past(1_600), Some(1_700));
        assert_eq!(arrivals.resumed_past(1_800), None);
        arrivals.awake(2_100);
        assert_eq!(
            arrivals.resumed_past(1_600),
            Some(1_700),
            "400 ms on: no new stop"
        );
    }

    #[test]
    fn a_service_falling_behind_still_expects_its_lagging_instances() {
        let fleet = fleet(20);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        let arrivals = Arrivals::default();
        for i in &fleet {
            w.apply_now(counter(i, 10, 1.0));
        }
        assert_eq!(w.seal_ready_seconds(11_250, &arrivals).len(), 1);
        // Most of the fleet falls two seconds behind (a congested link): 11 and 12 seal at grace_max with the two
        // on time, and the rest of 11 arrives only while 12 is open.
        for i in &fleet[..2] {
            w.apply_now(counter(i, 11, 1.0));
        }
        assert_eq!(w.seal_ready_seconds(13_000, &arrivals).len(), 1);
        for i in &fleet[..2] {
            w.apply(counter(i, 12, 1.0), 13_050);
        }
        for i in &fleet[2..] {
            assert!(matches!(
                w.apply(counter(i, 11, 1.0), 13_500),
                Applied::Correction { .. }
            ));
        }
        assert_eq!(w.seal_ready_seconds(14_000, &arrivals).len(), 1);
        // 13: the two on time report first. The eighteen behind are alive and expected: 13 is not complete.
        for i in &fleet[..2] {
            w.apply(counter(i, 13, 1.0), 14_050);
        }
        assert!(
            w.seal_ready_seconds(14_060, &arrivals).is_empty(),
            "two of twenty is not complete"
        );
        assert!(
            w.seal_ready_seconds(14_400, &arrivals).is_empty(),
            "most of the service is late: no quorum of the few on time"
        );
        for i in &fleet[2..] {
            w.apply(counter(i, 12, 1.0), 14_500);
            w.apply(counter(i, 13, 1.0), 14_900);
        }
        let sealed = w.seal_ready_seconds(14_900, &arrivals);
        assert_eq!(sum_of(&sealed[0], None, None), (20.0, 20), "caught up");
    }

    #[test]
    fn an_incomplete_second_waits_past_its_grace_while_snapshots_still_arrive() {
        let a = instance("a", "v1", None);
        let b = instance("b", "v1", None);
        let c = instance("c", "v1", None);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        let mut arrivals = Arrivals::default();
        for i in [&a, &b] {
            w.apply_now(counter(i, 10, 1.0));
        }
        w.seal_ready_seconds(11_250, &arrivals);
        // Second 11: a reports; the shard is still receiving second 11 (for other services) at 12_240.
        w.apply_now(counter(&a, 11, 1.0));
        arrivals.record(11, 12_240);
        assert!(
            w.seal_ready_seconds(12_260, &arrivals).is_empty(),
            "still arriving"
        );
        w.apply_now(counter(&c, 11, 1.0));
        arrivals.record(11, 12_280);
        assert!(w.seal_ready_seconds(12_320, &arrivals).is_empty());
        // Quiet for 50 ms: sealed without b.
        let sealed = w.seal_ready_seconds(12_330, &arrivals);
        assert_eq!(sum_of(&sealed[0], None, None), (2.0, 2));
        // Second 12 keeps streaming in forever: sealed at the latest grace_max after it ends.
        w.apply_now(counter(&a, 12, 1.0));
        arrivals.record(12, 13_990);
        assert!(w.seal_ready_seconds(13_995, &arrivals).is_empty());
        assert_eq!(w.seal_ready_seconds(14_000, &arrivals).len(), 1);
        arrivals.forget_before(12);
        assert_eq!(arrivals.last(11), None);
        assert_eq!(arrivals.last(12), Some(13_990));
    }

    #[test]
    fn a_straggler_is_waited_for_in_the_next_second() {
        let a = instance("a", "v1", None);
        let b = instance("b", "v1", None);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        w.apply_now(counter(&a, 10, 1.0));
        w.apply_now(counter(&b, 10, 1.0));
        w.seal_ready_seconds(11_250, &Arrivals::default());
        // b is late for 11: 11 seals at its grace without b, and b's data becomes a correction.
        w.apply_now(counter(&a, 11, 1.0));
        assert_eq!(w.seal_ready_seconds(12_250, &Arrivals::default()).len(), 1);
        assert!(matches!(
            w.apply_now(counter(&b, 11, 1.0)),
            Applied::Correction { t: _, .. }
        ));
        // 12 is not complete with a alone: b is expected again.
        w.apply_now(counter(&a, 12, 1.0));
        assert!(
            w.seal_ready_seconds(13_010, &Arrivals::default())
                .is_empty()
        );
        w.apply_now(counter(&b, 12, 1.0));
        let sealed = w.seal_ready_seconds(13_020, &Arrivals::default());
        assert_eq!(sum_of(&sealed[0], None, None), (2.0, 2));
    }

    #[test]
    fn replays_are_counted_once_and_late_data_corrects() {
        let a = instance("a", "v1", None);
        let b = instance("b", "v1", None);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        assert!(matches!(
            w.apply_now(counter(&a, 10, 1.0)),
            Applied::Merged { dropped: 0, .. }
        ));
        assert!(matches!(
            w.apply_now(counter(&a, 10, 1.0)),
            Applied::Duplicate { .. }
        ));
        let sealed = w.seal_ready_seconds(11_250, &Arrivals::default());
        assert_eq!(sum_of(&sealed[0], None, None), (1.0, 1));
        // b was late: its second-10 data corrects the sealed second.
        assert!(matches!(
            w.apply_now(counter(&b, 10, 5.0)),
            Applied::Correction { t: 10, .. }
        ));
        let corrected = w.corrected_second(10).unwrap();
        assert!(corrected.correction);
        assert_eq!(sum_of(&corrected, None, None), (6.0, 2));
        // Replays of either, before or after sealing, change nothing.
        assert!(matches!(
            w.apply_now(counter(&a, 10, 1.0)),
            Applied::Duplicate { .. }
        ));
        assert!(matches!(
            w.apply_now(counter(&b, 10, 5.0)),
            Applied::Duplicate { .. }
        ));
        // Far past the late window: refused.
        for t in 11..30 {
            w.apply_now(counter(&a, t, 1.0));
        }
        w.seal_ready_seconds(31_000, &Arrivals::default());
        w.seal_ready_seconds(42_000, &Arrivals::default());
        assert!(matches!(
            w.apply_now(counter(&b, 12, 1.0)),
            Applied::TooLate
        ));
    }

    #[test]
    fn replays_after_an_outage_merge_into_the_seconds_the_first_replay_sealed() {
        let (a, b, c) = (
            instance("a", "v1", None),
            instance("b", "v1", None),
            instance("c", "v1", None),
        );
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        // The aggregator is back at 100 s (wall clock); a replays the 40 seconds it buffered, which seal at once.
        for t in 60..100 {
            w.apply_now(counter(&a, t, 1.0));
        }
        assert_eq!(
            w.seal_ready_seconds(100_300, &Arrivals::default()).len(),
            40
        );
        // b reconnects 8 s later and replays the same seconds, 40 to 48 s old: each one merges.
        for t in 60..100 {
            assert!(
                matches!(
                    w.apply(counter(&b, t, 2.0), 108_300),
                    Applied::Correction { .. }
                ),
                "second {t}"
            );
        }
        w.seal_ready_seconds(108_300, &Arrivals::default());
        assert_eq!(
            sum_of(&w.corrected_second(60).unwrap(), None, None),
            (3.0, 2)
        );
        // Past late_window after their seal, a second takes no more (it is kept one second longer only so that a
        // correction gathered just before is still published).
        assert!(matches!(
            w.apply(counter(&c, 62, 1.0), 110_500),
            Applied::TooLate
        ));
        // Past late_window and the extra second, they are gone: c is too late.
        w.seal_ready_seconds(111_400, &Arrivals::default());
        assert!(matches!(
            w.apply_now(counter(&c, 61, 1.0)),
            Applied::TooLate
        ));
    }

    #[test]
    fn a_series_repeated_in_one_snapshot_counts_once() {
        let a = instance("a", "v1", None);
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        let mut twice = counter(&a, 10, 2.0);
        twice.series.push(twice.series[0].clone());
        assert!(matches!(
            w.apply_now(twice),
            Applied::Merged { dropped: 1, .. }
        ));
        assert!(matches!(
            w.apply_now(counter(&instance("b", "v1", None), 10, 3.0)),
            Applied::Merged { dropped: 0, .. }
        ));
        let sealed = w.seal_ready_seconds(20_000, &Arrivals::default());
        assert_eq!(sum_of(&sealed[0], None, None), (5.0, 2));
    }

    /// A leaf's cells are merged in one walk through its sorted cells (those new below its last kept apart):
    /// instances listing their series in other orders, with series new to the leaf before, between and after the
    /// ones it has, and a repeat, all sum as they should.
    #[test]
    fn series_in_any_order_merge_into_their_own_cells() {
        let names: Vec<String> = (0..8).map(|i| format!("order.{i}")).collect();
        let ids: Vec<SeriesId> = names.iter().map(|n| id(n)).collect();
        let snapshot = |inst: &Arc<Instance>, picks: &[(usize, f64)]| InstanceSecond {
            instance: inst.clone(),
            agent: Default::default(),
            requests: None,
            t: 10,
            series: picks
                .iter()
                .map(|(i, v)| (ids[*i], SeriesValue::Counter(*v)))
                .collect(),
            table: table(),
        };
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        let a = instance("a", "v1", None);
        let b = instance("b", "v1", None);
        let c = instance("c", "v1", None);
        // The leaf starts with 2, 4 and 6 (given out of order).
        assert!(matches!(
            w.apply_now(snapshot(&a, &[(6, 1.0), (2, 1.0), (4, 1.0)])),
            Applied::Merged { dropped: 0, .. }
        ));
        // New ones before, between and after; 4 twice (its first counts).
        assert!(matches!(
            w.apply_now(snapshot(
                &b,
                &[(7, 10.0), (4, 10.0), (0, 10.0), (4, 99.0), (3, 10.0)]
            )),
            Applied::Merged { dropped: 1, .. }
        ));
        assert!(matches!(
            w.apply_now(snapshot(
                &c,
                &[
                    (0, 100.0),
                    (1, 100.0),
                    (2, 100.0),
                    (5, 100.0),
                    (6, 100.0),
                    (7, 100.0)
                ]
            )),
            Applied::Merged { dropped: 0, .. }
        ));
        let leaf = &w.open[&10].leaves[&(Arc::from("v1"), None)];
        assert!(leaf.sorted.is_sorted_by_key(|(id, _)| *id));
        assert_eq!(leaf.iter().count(), 8);
        assert_eq!(
            leaf.others.len(),
            4,
            "0, 1, 3 and 5 came below the sorted cells' last"
        );
        let sealed = w.seal_ready_seconds(20_000, &Arrivals::default());
        let expected = [
            (0, 110.0, 2),
            (1, 100.0, 1),
            (2, 101.0, 2),
            (3, 10.0, 1),
            (4, 11.0, 2),
            (5, 100.0, 1),
            (6, 101.0, 2),
            (7, 110.0, 2),
        ];
        for (i, sum, instances) in expected {
            let s = sealed[0]
                .series
                .iter()
                .find(|s| s.metric.as_ref() == names[i] && s.version.is_none() && s.zone.is_none())
                .unwrap_or_else(|| panic!("{} sealed", names[i]));
            assert!(
                matches!(s.stats, Stats::Counter { sum: got } if got == sum)
                    && s.instances == instances,
                "{}: {:?} from {} instances",
                names[i],
                s.stats,
                s.instances
            );
        }
    }

    #[test]
    fn the_walk_gallops_to_the_first_id_not_below_the_key() {
        let cell = || Cell::new(&SeriesValue::Counter(1.0));
        let mut leaf = LeafCells::default();
        leaf.add(
            [1, 3, 5, 7, 9, 11, 13]
                .map(|i| (SeriesId::test(i), cell()))
                .into(),
        );
        for (from, key, at) in [
            (0, 0, 0),
            (0, 1, 0),
            (0, 2, 1),
            (0, 13, 6),
            (0, 14, 7),
            (3, 7, 3),
            (3, 8, 4),
            (3, 12, 6),
            (6, 1, 6),
            (7, 20, 7),
        ] {
            assert_eq!(
                leaf.seek(from, SeriesId::test(key)),
                at,
                "from {from} to {key}"
            );
        }
        // Cells new to the leaf below its last sorted id are kept apart, and still found.
        leaf.add([2, 6, 15].map(|i| (SeriesId::test(i), cell())).into());
        let sorted: Vec<u32> = leaf
            .sorted
            .iter()
            .map(|(id, _)| id.index() as u32)
            .collect();
        assert_eq!(sorted, [1, 3, 5, 7, 9, 11, 13, 15]);
        assert_eq!(leaf.others.len(), 2);
        for key in [2, 6, 15] {
            assert!(
                leaf.find_mut(&mut 0, SeriesId::test(key)).is_some(),
                "{key}"
            );
        }
        assert!(leaf.find_mut(&mut 0, SeriesId::test(4)).is_none());
    }

    /// A series sent twice in one snapshot counts once, as the first of the two that is taken: a first refused (its
    /// kind conflicts with the second's other instances) leaves the second to be judged on its own.
    #[test]
    fn a_repeat_after_a_refused_first_is_judged_on_its_own() {
        let key = id("repeat.kind");
        let mut w = ServiceWindows::new("svc".into(), SETTINGS);
        let snapshot = |inst: &Arc<Instance>, values: Vec<SeriesValue>| InstanceSecond {
            instance: inst.clone(),
            agent: Default::default(),
            requests: None,
            t: 10,
            series: values.into_iter().map(|v| (key, v)).collect(),
            table: table(),
        };
        // Another leaf makes the series a gauge for this second.
        w.apply_now(snapshot(
            &instance("a", "v1", Some("z1")),
            vec![SeriesValue::Gauge(1.0)],
        ));
        // A counter first (refused: the kind), then a gauge (taken), then a gauge again (a repeat).
        assert!(matches!(
            w.apply_now(snapshot(
                &instance("b", "v1", Some("z2")),
                vec![
                    SeriesValue::Counter(5.0),
                    SeriesValue::Gauge(3.0),
                    SeriesValue::Gauge(9.0)
                ]
            )),
            Applied::Merged { dropped: 2, .. }
        ));
        let sealed = w.seal_ready_seconds(20_000, &Arrivals::default());
        let overall = sealed[0]
            .series
            .iter()
            .find(|s| s.metric.as_ref() == "repeat.kind" && s.version.is_none() && s.zone.is_none())
            .expect("sealed");
        assert_eq!(overall.instances, 2);
        assert!(
            matches!(overall.stats, Stats::Gauge { max, .. } if max == 3.0),
            "{:?}",
            overall.stats
        );
    }

    /// Past the cell limit partway through a snapshot, the series the service named first are kept, whatever the
    /// order the snapshot lists them in.
    #[test]
    fn at_the_cell_limit_the_series_named_first_are_kept() {
        let ids = ["limit.a", "limit.b", "limit.c"].map(id);
        let mut w = ServiceWindows::new(
            "svc".into(),
            WindowSettings {
                max_cells: 2,
                ..SETTINGS
            },
        );
        let snapshot = InstanceSecond {
            instance: instance("a", "v1", None),
            agent: Default::default(),
            requests: None,
            t: 10,
            series: [2, 1, 0]
                .map(|i| (ids[i], SeriesValue::Counter(1.0)))
                .into(),
            table: table(),
        };
        assert!(matches!(
            w.apply_now(snapshot),
            Applied::Merged { dropped: 1, .. }
        ));
        let sealed = w.seal_ready_seconds(20_000, &Arrivals::default());
        // Each listed twice: overall, and as the sole version's split.
        let mut metrics: Vec<&str> = sealed[0].series.iter().map(|s| s.metric.as_ref()).collect();
        metrics.dedup();
        assert_eq!(metrics, ["limit.a", "limit.b"]);
    }

    /// A histogram of one value at 2^40 (its counts reach that far) and what its cell costs.
    fn far_histogram() -> (SeriesValue, usize) {
        use crate::model::hdr::CheckedV2;
        use hdrhistogram::serialization::{Serializer, V2Serializer};
        let mut h = hdrhistogram::Histogram::<u64>::new(2).unwrap();
        h.record(1 << 40).unwrap();
        let mut bytes = Vec::new();
        V2Serializer::new().serialize(&h, &mut bytes).unwrap();
        let v2 = CheckedV2::check(bytes.into(), 3, u64::MAX).unwrap();
        let far = SeriesValue::Histogram { v2, scale: 1 };
        let cost = Cell::cost(&far);
        (far, cost)
    }

    /// A histogram reaching to the largest values costs its counts up to there; a service's merged state stops
    /// growing at `max_bytes` (checked before allocating), and gets its room back when the seconds leave.
    #[test]
    fn the_byte_budget_refuses_what_would_allocate_past_it_and_frees_with_the_seconds() {
        let (far, cost) = far_histogram();
        let settings = WindowSettings {
            max_bytes: cost * 2 + 10,
            ..SETTINGS
        };
        let mut w = ServiceWindows::new("svc".into(), settings);
        let snapshot = |inst: &Arc<Instance>, t: i64, names: &[&str]| InstanceSecond {
            instance: inst.clone(),
            agent: Default::default(),
            requests: None,
            t,
            series: names.iter().map(|n| (id(n), far.clone())).collect(),
            table: table(),
        };
        let a = instance("a", "v1", None);
        assert!(matches!(
            w.apply_now(snapshot(&a, 10, &["far-1", "far-2", "far-3"])),
            Applied::Merged {
                dropped: 0,
                over_budget: 1,
                over_total: 0
            }
        ));
        // Another instance adding to the cells that exist allocates nothing more.
        let b = instance("b", "v1", None);
        assert!(matches!(
            w.apply_now(snapshot(&b, 10, &["far-1", "far-2"])),
            Applied::Merged {
                dropped: 0,
                over_budget: 0,
                over_total: 0
            }
        ));
        // Full: a new second gets nothing until the old ones go.
        assert!(matches!(
            w.apply_now(snapshot(&a, 11, &["far-1"])),
            Applied::Merged { over_budget: 1, .. }
        ));
        w.seal_ready_seconds(12_300, &Arrivals::default());
        w.seal_ready_seconds(30_000, &Arrivals::default());
        assert!(matches!(
            w.apply_now(snapshot(&a, 40, &["far-1"])),
            Applied::Merged { over_budget: 0, .. }
        ));
    }

    /// All services together stop growing at `max_decoded_bytes`: a second service finds the room the first took
    /// gone (counted against the common bound, not its own), and gets it once the first's seconds leave or the
    /// first is dropped. The gauge shows what is held.
    #[test]
    fn the_common_byte_bound_is_shared_by_services_and_freed_by_them() {
        let (far, cost) = far_histogram();
        let held = prometheus_client::metrics::gauge::Gauge::default();
        let all = DecodedBytes::new(cost + 10, held.clone());
        let snapshot = |t: i64| InstanceSecond {
            instance: instance("a", "v1", None),
            agent: Default::default(),
            requests: None,
            t,
            series: vec![(id("far"), far.clone())],
            table: table(),
        };
        let mut first = ServiceWindows::new("one".into(), SETTINGS).sharing(all.clone());
        let mut second = ServiceWindows::new("two".into(), SETTINGS).sharing(all.clone());
        assert!(matches!(
            first.apply_now(snapshot(10)),
            Applied::Merged {
                over_budget: 0,
                over_total: 0,
                ..
            }
        ));
        assert_eq!(held.get(), cost as i64);
        assert!(matches!(
            second.apply_now(snapshot(10)),
            Applied::Merged {
                over_budget: 0,
                over_total: 1,
                ..
            }
        ));
        // The first service's second sealed and past its late window: its bytes come back.
        first.seal_ready_seconds(12_300, &Arrivals::default());
        first.seal_ready_seconds(30_000, &Arrivals::default());
        assert_eq!(held.get(), 0);
        assert!(matches!(
            second.apply_now(snapshot(11)),
            Applied::Merged { over_total: 0, .. }
        ));
        assert_eq!(held.get(), cost as i64);
        // A service dropped gives back what it held.
        drop(second);
        assert_eq!(held.get(), 0);
    }

    /// Shards taking room at once never pass the common bound together.
    #[test]
    fn the_common_bound_is_taken_atomically() {
        let held = prometheus_client::metrics::gauge::Gauge::default();
        let all = DecodedBytes::new(1_000, held.clone());
        let taken: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..1_000).filter(|_| all.try_take(3)).count()))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(taken, 333);
        assert_eq!(held.get(), 999);
        assert!(all.try_take(1));
        assert!(!all.try_take(1));
        all.release(1_000);
        assert_eq!(held.get(), 0);
    }

    #[test]
    fn the_cell_limit_drops_new_series_only() {
        let a = instance("a", "v1", None);
        let settings = WindowSettings {
            max_cells: 1,
            ..SETTINGS
        };
        let mut w = ServiceWindows::new("svc".into(), settings);
        let mut second = counter(&a, 10, 1.0);
        second.series.push((id("other"), SeriesValue::Counter(1.0)));
        assert!(matches!(
            w.apply_now(second),
            Applied::Merged { dropped: 1, .. }
        ));
        let sealed = w.seal_ready_seconds(20_000, &Arrivals::default());
        assert_eq!(sealed[0].series.len(), 2);
    }

    /// Instances `who` said at their hello, at `now_ms`, that they replay up to second `through`.
    fn replaying(w: &ServiceWindows, who: &[&Arc<Instance>], through: i64, now_ms: i64) {
        for inst in who {
            w.replays.start(&inst.id, through, now_ms, 120_000);
        }
    }

    /// An aggregator started at 100 s; instances a and b reconnected then, each replaying seconds 40 to 99. All of
    /// a's replay has been merged (at 100 s), and of b's only the seconds `b_merged`. Returns the windows and b.
    fn back_from_an_outage(
        settings: WindowSettings,
        b_merged: std::ops::Range<i64>,
    ) -> (ServiceWindows, Arc<Instance>) {
        let (a, b) = (instance("a", "v1", None), instance("b", "v1", None));
        let mut w = ServiceWindows::new("svc".into(), settings).started_at(100_000);
        replaying(&w, &[&a, &b], 99, 100_000);
        for t in 40..=99 {
            assert!(matches!(
                w.apply(counter(&a, t, 1.0), 100_000),
                Applied::Merged { .. }
            ));
        }
        for t in b_merged {
            w.apply(counter(&b, t, 1.0), 100_000);
        }
        (w, b)
    }

    fn seconds_and_instances(sealed: &[SealedSecond]) -> Vec<(i64, usize)> {
        sealed.iter().map(|s| (s.t, s.instances.len())).collect()
    }

    /// Two agents back from an outage replay seconds 40 to 99. One sends it all at once; the other's replay takes
    /// 25 s, longer than the late window: every second is still sealed once, with both.
    #[test]
    fn a_replay_is_merged_on_time_however_far_apart_its_agents_are() {
        let (mut w, b) = back_from_an_outage(SETTINGS, 40..50);
        let quiet = Arrivals::default();
        assert!(
            w.seal_ready_seconds(105_999, &quiet).is_empty(),
            "agents still reconnecting are heard of first"
        );
        assert_eq!(
            seconds_and_instances(&w.seal_ready_seconds(106_000, &quiet)),
            (40..50).map(|t| (t, 2)).collect::<Vec<_>>(),
            "what both sent is sealed; b is on its way to the rest"
        );
        let mut now = 106_000;
        for t in 50..=99 {
            now += 500;
            assert!(matches!(
                w.apply(counter(&b, t, 1.0), now),
                Applied::Merged { .. }
            ));
            assert_eq!(
                seconds_and_instances(&w.seal_ready_seconds(now, &quiet)),
                vec![(t, 2)]
            );
        }
        assert_eq!(w.replays.len(), 0, "both are done replaying");
    }

    /// A replaying instance that stops moving (or sends the same old second again) holds its seconds for
    /// `replay_stall`, no longer. While the seconds it merged wait for their seal it is not stopped but waiting
    /// (its agent sends the next ones only once those are acknowledged): its `replay_stall` runs from their seal.
    #[test]
    fn a_stalled_replay_is_waited_for_no_longer_than_replay_stall() {
        let (mut w, b) = back_from_an_outage(SETTINGS, 40..50);
        let quiet = Arrivals::default();
        // The same second again is not moving on.
        for now in [104_000, 108_000] {
            assert!(matches!(
                w.apply(counter(&b, 49, 1.0), now),
                Applied::Duplicate { .. }
            ));
        }
        // Gathering after the start held 40 to 49, which b merged: sealed now, and b (its stream open) waited for
        // from here.
        let sealed = w.seal_ready_seconds(109_999, &quiet);
        assert_eq!(sealed.last().map(|s| s.t), Some(49));
        assert!(w.seal_ready_seconds(110_000, &quiet).is_empty());
        let sealed = w.seal_ready_seconds(120_000, &quiet);
        assert_eq!(
            seconds_and_instances(&sealed),
            (50..=99).map(|t| (t, 1)).collect::<Vec<_>>()
        );
    }

    /// However alive a replay is, a second waits for it at most `replay_wait` after its first snapshot.
    #[test]
    fn a_second_waits_for_replays_at_most_replay_wait() {
        let settings = WindowSettings {
            replay_wait_ms: 20_000,
            ..SETTINGS
        };
        let (mut w, b) = back_from_an_outage(settings, 40..40);
        let quiet = Arrivals::default();
        // b moves a second every 4 s: alive, and far too slow.
        let mut sealed = Vec::new();
        let mut now = 100_000;
        for t in 40..45 {
            w.apply(counter(&b, t, 1.0), now);
            sealed.extend(w.seal_ready_seconds(now, &quiet));
            now += 4_000;
        }
        sealed.extend(w.seal_ready_seconds(119_999, &quiet));
        assert_eq!(
            seconds_and_instances(&sealed),
            (40..45).map(|t| (t, 2)).collect::<Vec<_>>()
        );
        let sealed = w.seal_ready_seconds(120_000, &quiet);
        assert_eq!(
            seconds_and_instances(&sealed),
            (45..=99).map(|t| (t, 1)).collect::<Vec<_>>()
        );
    }

    /// A second that opened out of order (older than one already open) waits for replays like any other: its wait
    /// counts from its first snapshot, not from its end minutes ago.
    #[test]
    fn a_second_opened_out_of_order_waits_for_replays_too() {
        let (a, b) = (instance("a", "v1", None), instance("b", "v1", None));
        let mut w = ServiceWindows::new("svc".into(), SETTINGS).started_at(400_000);
        let quiet = Arrivals::default();
        replaying(&w, &[&b], 399, 400_000);
        w.apply(counter(&a, 150, 1.0), 400_000);
        w.apply(counter(&a, 100, 1.0), 400_000);
        w.replays.read(&b.id, 50, 405_000);
        assert!(
            w.seal_ready_seconds(407_000, &quiet).is_empty(),
            "b replays second 100 and is on its way"
        );
    }

    /// An aggregator that just started seals live seconds as usual: only seconds that ended well before it started
    /// are held for agents reconnecting.
    #[test]
    fn only_old_seconds_wait_for_agents_reconnecting() {
        let a = instance("a", "v1", None);
        let quiet = Arrivals::default();
        let mut live = ServiceWindows::new("svc".into(), SETTINGS).started_at(100_200);
        live.apply(counter(&a, 99, 1.0), 100_200);
        assert_eq!(
            seconds_and_instances(&live.seal_ready_seconds(101_000, &quiet)),
            vec![(99, 1)]
        );
        let mut old = ServiceWindows::new("svc".into(), SETTINGS).started_at(100_200);
        old.apply(counter(&a, 90, 1.0), 100_200);
        assert!(old.seal_ready_seconds(106_199, &quiet).is_empty());
        assert_eq!(
            seconds_and_instances(&old.seal_ready_seconds(106_200, &quiet)),
            vec![(90, 1)]
        );
    }

    /// After a restart, old seconds wait for agents still reconnecting as long as the service's replaying agents
    /// keep saying hello (and `replay_gather` after the last), not only `replay_gather` after the start.
    #[test]
    fn old_seconds_wait_while_agents_keep_reconnecting() {
        let who: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| instance(id, "v1", None))
            .collect();
        let quiet = Arrivals::default();
        let mut w = ServiceWindows::new("svc".into(), SETTINGS).started_at(100_000);
        // Each says hello (replaying second 90) and has its replay merged at once: a at the start, b 5 s later,
        // c 10.5 s later, which is more than `replay_gather` (6 s here) after the start, but not after b's hello.
        for (inst, at) in who.iter().zip([100_000, 105_000, 110_500]) {
            assert!(
                w.seal_ready_seconds(at, &quiet).is_empty(),
                "{} is still heard of in time",
                inst.id
            );
            replaying(&w, &[inst], 90, at);
            w.apply(counter(inst, 90, 1.0), at);
        }
        assert!(w.seal_ready_seconds(116_499, &quiet).is_empty());
        assert_eq!(
            seconds_and_instances(&w.seal_ready_seconds(116_500, &quiet)),
            vec![(90, 3)],
            "sealed 6 s after the last hello, with all three"
        );
    }

    /// After its replay, an agent's live seconds come behind it on its stream, late. Until the stream catches up
    /// (reads a second within `caught_up_ms` of its end) they are waited for like the replay: each second is sealed
    /// once, with both agents, not with the agent that caught up first and the other's as a correction.
    #[test]
    fn live_seconds_behind_a_replay_wait_until_its_stream_catches_up() {
        use crate::pipeline::replays::{CatchUp, StreamReplay};
        let (a, b) = (instance("a", "v1", None), instance("b", "v1", None));
        let mut w = ServiceWindows::new("svc".into(), SETTINGS).started_at(100_000);
        let catch_up = CatchUp {
            caught_up_ms: 1_000,
            longest_ms: 120_000,
        };
        let mut streams: Vec<StreamReplay> = [&a, &b]
            .iter()
            .map(|i| StreamReplay::start(w.replays.clone(), &i.id, 99, catch_up, 100_000))
            .collect();
        // a replays 40..=99 at once and is on time from 100 on. b reads one second every 100 ms from 100_000 (99 at
        // 105_900, 104 at 106_400), is within 1 s of the end of 105 (read at 106_500), caught up, and on time after.
        let mut reads: Vec<(i64, usize, i64)> = (40..=99).map(|t| (100_000, 0, t)).collect();
        reads.extend((100..=110).map(|t| ((t + 1) * 1000 + 100, 0, t)));
        reads.extend((40..=105).map(|t| (100_000 + (t - 40) * 100, 1, t)));
        reads.extend((106..=110).map(|t| ((t + 1) * 1000 + 50, 1, t)));
        reads.sort();
        let quiet = Arrivals::default();
        let mut sealed = Vec::new();
        for (now, who, t) in reads {
            let inst = [&a, &b][who];
            streams[who].read(t, now);
            assert!(
                matches!(w.apply(counter(inst, t, 1.0), now), Applied::Merged { .. }),
                "{} {t} at {now}: a correction",
                inst.id
            );
            sealed.extend(seconds_and_instances(&w.seal_ready_seconds(now, &quiet)));
        }
        sealed.extend(seconds_and_instances(
            &w.seal_ready_seconds(120_000, &quiet),
        ));
        assert_eq!(sealed, (40..=110).map(|t| (t, 2)).collect::<Vec<_>>());
        assert!(!streams[1].read(111, 112_100), "caught up");
        assert_eq!(w.replays.len(), 0, "both are done");
    }
}
