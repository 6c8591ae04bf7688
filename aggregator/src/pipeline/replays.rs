//! Agents replaying into a service: what each said at its hello and how far it got, shared by the streams (which
//! write as they read) and the service's shard (which reads while sealing).
//!
//! A shard hears of a stream's snapshots only as it merges them, and after an outage that can be many seconds after
//! the agent reconnected: every agent replays at once and the queue to the shard is long. So the streams write here
//! directly, at their hello and as they read, and a second is held while a replay that has not been merged past it
//! is still moving.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::model::PerService;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One service's replaying instances.
#[derive(Debug)]
pub(crate) struct ReplayBook {
    replaying: Mutex<FastMap<Arc<str>, Replay>>,
    /// How many entries `replaying` has: read without the lock on every merge, so a service nobody replays into
    /// pays one atomic load.
    count: AtomicUsize,
    /// When replays that stopped moving were last forgotten (wall clock, ms).
    pruned_ms: AtomicI64,
}

impl Default for ReplayBook {
    fn default() -> Self {
        Self {
            replaying: Mutex::default(),
            count: AtomicUsize::new(0),
            pruned_ms: AtomicI64::new(i64::MIN),
        }
    }
}

/// Where one replaying instance is.
#[derive(Debug, Clone, Copy)]
struct Replay {
    /// The newest second it replays (from its hello).
    through: i64,
    /// The newest second its stream has read.
    read: Option<i64>,
    /// The newest second of it merged.
    merged: Option<i64>,
    /// When it last moved on, read or merged (wall clock, ms).
    moved_ms: i64,
}

impl ReplayBook {
    /// An instance's stream said at its hello that it replays up to `through`. A hello of an instance already
    /// replaying (it reconnected) changes only how far it replays: a hello is not moving on, or an agent
    /// reconnecting in a loop would hold its service's seconds for as long as it loops.
    pub(crate) fn start(&self, instance: &Arc<str>, through: i64, now_ms: i64) {
        let mut replaying = self.lock();
        replaying
            .entry(instance.clone())
            .and_modify(|r| r.through = through)
            .or_insert(Replay {
                through,
                read: None,
                merged: None,
                moved_ms: now_ms,
            });
        self.count.store(replaying.len(), Ordering::Relaxed);
    }

    /// The instance's stream read its second `t`.
    pub(crate) fn read(&self, instance: &Arc<str>, t: i64, now_ms: i64) {
        if let Some(replay) = self.lock().get_mut(instance)
            && replay.read.is_none_or(|read| t > read)
        {
            replay.read = Some(t);
            replay.moved_ms = now_ms;
        }
    }

    /// The instance's second `t` was merged (or found a duplicate, or too late): once it reached the newest it
    /// replays, it is done.
    pub(crate) fn merged(&self, instance: &Arc<str>, t: i64, now_ms: i64) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut replaying = self.lock();
        let Some(replay) = replaying.get_mut(instance) else {
            return;
        };
        if t >= replay.through {
            replaying.remove(instance);
            self.count.store(replaying.len(), Ordering::Relaxed);
        } else if replay.merged.is_none_or(|merged| t > merged) {
            replay.merged = Some(t);
            replay.moved_ms = now_ms;
        }
    }

    /// Whether second `t` waits for a replay: one whose merged seconds have not reached `t`, that replays `t` or
    /// newer, and that moved on less than `stall_ms` ago. Forgets the replays that stopped moving, once a second
    /// (this runs for every snapshot merged while a service waits; forgetting on each took 2.6% of a catching-up
    /// aggregator's CPU at 10,000 agents).
    pub(crate) fn holds(&self, t: i64, now_ms: i64, stall_ms: i64) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let moving = |r: &Replay| now_ms < r.moved_ms.saturating_add(stall_ms);
        let mut replaying = self.lock();
        if now_ms
            >= self
                .pruned_ms
                .load(Ordering::Relaxed)
                .saturating_add(PRUNE_EVERY_MS)
        {
            replaying.retain(|_, r| moving(r));
            self.count.store(replaying.len(), Ordering::Relaxed);
            self.pruned_ms.store(now_ms, Ordering::Relaxed);
        }
        replaying
            .values()
            .any(|r| r.merged.is_none_or(|merged| merged < t) && t <= r.through && moving(r))
    }

    /// How many instances are replaying.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<Arc<str>, Replay>> {
        self.replaying
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// How often replays that stopped moving are forgotten (ms).
const PRUNE_EVERY_MS: i64 = 1_000;

/// Every service's book, by name: streams and shards look a service's up once (a stream at its hello, a shard when
/// it starts the service); a book nobody holds is gone.
#[derive(Debug, Default)]
pub(crate) struct Replays {
    books: PerService<ReplayBook>,
}

impl Replays {
    /// `service`'s book, started if nobody holds one.
    pub(crate) fn of(&self, service: &Arc<str>) -> Arc<ReplayBook> {
        self.books.of(service, ReplayBook::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_holds_what_it_has_not_merged_while_it_moves() {
        let book = ReplayBook::default();
        let a: Arc<str> = "a".into();
        assert!(!book.holds(10, 0, 1_000), "nobody replays");
        book.start(&a, 20, 0);
        assert!(book.holds(10, 500, 1_000), "heard of, nothing merged yet");
        assert!(!book.holds(21, 500, 1_000), "newer than it replays");
        // Reading newer seconds is moving on, though nothing is merged yet (a long queue to the shard); reading
        // the same second again is not.
        book.read(&a, 5, 900);
        book.read(&a, 5, 1_850);
        assert!(!book.holds(10, 1_900, 1_000), "stopped at 900");
        book.start(&a, 20, 0);
        book.read(&a, 5, 900);
        book.read(&a, 6, 1_800);
        assert!(book.holds(10, 1_800, 1_000));
        book.merged(&a, 10, 1_850);
        assert!(!book.holds(10, 1_850, 1_000), "merged past it");
        assert!(book.holds(11, 1_850, 1_000));
        // Stopped: neither read nor merged anything newer for the stall.
        assert!(!book.holds(11, 2_850, 1_000));
        assert!(!book.holds(11, 2_950, 1_000));
        assert_eq!(
            book.len(),
            0,
            "forgotten (at most a second after it stopped)"
        );
        // A reconnect (a hello again) is not moving on, and keeps what was merged.
        book.start(&a, 20, 3_000);
        book.merged(&a, 12, 3_000);
        book.start(&a, 25, 3_900);
        assert!(!book.holds(12, 3_900, 1_000), "merged past it before");
        assert!(book.holds(13, 3_900, 1_000));
        assert!(!book.holds(13, 4_000, 1_000), "the hello moved nothing");
        book.start(&a, 20, 5_000);
        book.merged(&a, 20, 5_100);
        assert_eq!(book.len(), 0, "done once the newest it replays is merged");
    }

    #[test]
    fn a_service_has_one_book_while_anyone_holds_it() {
        let replays = Replays::default();
        let service: Arc<str> = "svc".into();
        let book = replays.of(&service);
        book.start(&"a".into(), 20, 0);
        assert_eq!(replays.of(&service).len(), 1, "the same book");
        drop(book);
        assert_eq!(replays.of(&service).len(), 0, "nobody held it: a new one");
    }
}
