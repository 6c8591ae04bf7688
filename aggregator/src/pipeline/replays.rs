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

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

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
    /// When the newest hello of an instance not heard of before came (wall clock, ms; 0 for none).
    hello_ms: AtomicI64,
    /// When each instance that said hello replaying first did, within the last `longest_ms` (see
    /// [`ReplayBook::start`]): neither a reconnect nor a replay merged and started again renews how long it is
    /// waited for while behind, or keeps old seconds gathering.
    heard: Mutex<FastMap<Arc<str>, i64>>,
    /// When `heard` was last pruned (wall clock, ms).
    heard_pruned_ms: AtomicI64,
}

impl Default for ReplayBook {
    fn default() -> Self {
        Self {
            replaying: Mutex::default(),
            count: AtomicUsize::new(0),
            pruned_ms: AtomicI64::new(i64::MIN),
            hello_ms: AtomicI64::new(0),
            heard: Mutex::default(),
            heard_pruned_ms: AtomicI64::new(i64::MIN),
        }
    }
}

/// Where one replaying instance is.
#[derive(Debug, Clone, Copy)]
struct Replay {
    /// The newest second it replays: from its hello, moved on while its stream is still behind after it.
    through: i64,
    /// The newest second its stream has read.
    read: Option<i64>,
    /// The newest second of it merged.
    merged: Option<i64>,
    /// When it last moved on, read or merged (wall clock, ms).
    moved_ms: i64,
    /// Its streams still open (a reconnect opens the next before the last is seen to end): only a replay with an
    /// open stream can be waiting for the seal of what it sent.
    open: u32,
}

impl ReplayBook {
    /// An instance's stream said at its hello that it replays up to `through`. A hello of an instance already
    /// replaying (it reconnected) changes only how far it replays: a hello is not moving on, or an agent
    /// reconnecting in a loop would hold its service's seconds for as long as it loops. Returns until when its
    /// streams are waited for while behind: `longest_ms` after the instance's first hello within `longest_ms`.
    /// Only the hello of an instance not heard of in that time counts as agents still reconnecting (an agent
    /// reconnecting in a loop would keep old seconds gathering).
    pub(crate) fn start(
        &self,
        instance: &Arc<str>,
        through: i64,
        now_ms: i64,
        longest_ms: i64,
    ) -> i64 {
        let first_ms = {
            let mut heard = self.heard.lock().unwrap_or_else(PoisonError::into_inner);
            if prune_due(&self.heard_pruned_ms, now_ms) {
                heard.retain(|_, first| now_ms < first.saturating_add(longest_ms));
            }
            match heard.get(instance) {
                Some(first) if now_ms < first.saturating_add(longest_ms) => *first,
                _ => {
                    heard.insert(instance.clone(), now_ms);
                    self.hello_ms.fetch_max(now_ms, Ordering::Relaxed);
                    now_ms
                }
            }
        };
        let mut replaying = self.lock();
        replaying
            .entry(instance.clone())
            .and_modify(|r| {
                r.through = through;
                r.open = r.open.saturating_add(1);
            })
            .or_insert(Replay {
                through,
                read: None,
                merged: None,
                moved_ms: now_ms,
                open: 1,
            });
        self.count.store(replaying.len(), Ordering::Relaxed);
        first_ms.saturating_add(longest_ms)
    }

    /// When the newest hello of an instance not heard of before came (wall clock, ms; 0 for none): after a
    /// restart, agents of the service are still reconnecting while these keep coming.
    pub(crate) fn last_hello_ms(&self) -> i64 {
        self.hello_ms.load(Ordering::Relaxed)
    }

    /// The instance's stream read its second `t` (its replay's newest, or newer) and reads up to `through` before
    /// it is caught up. Forgotten as stalled in the meantime, it is taken up again, as having merged what came
    /// before `t` (it moves again, and forgotten meant not waited for).
    pub(crate) fn reaches(&self, instance: &Arc<str>, t: i64, through: i64, now_ms: i64) {
        let mut replaying = self.lock();
        replaying
            .entry(instance.clone())
            .and_modify(|r| {
                r.through = r.through.max(through);
                r.read_to(t, now_ms);
            })
            .or_insert(Replay {
                through,
                read: Some(t),
                merged: Some(t.saturating_sub(1)),
                moved_ms: now_ms,
                open: 1,
            });
        self.count.store(replaying.len(), Ordering::Relaxed);
    }

    /// The instance's stream, which had moved its replay on to `through`, ended: it reads nothing more, so it is
    /// waited for only up to `read`, the newest it read (a reconnect says in its hello how far it replays).
    pub(crate) fn ended(&self, instance: &Arc<str>, through: i64, read: i64) {
        if let Some(replay) = self.lock().get_mut(instance)
            && replay.through == through
        {
            replay.through = read;
        }
    }

    /// One of the instance's streams ended at `now_ms`. Once none is open, its replay waits for nobody's seal: it
    /// is waited for `replay_stall` from now (its agent reconnects and replays the rest), and forgotten after that
    /// if it does not move.
    pub(crate) fn closed(&self, instance: &Arc<str>, now_ms: i64) {
        if let Some(replay) = self.lock().get_mut(instance) {
            replay.open = replay.open.saturating_sub(1);
            if replay.open == 0 {
                replay.moved_ms = replay.moved_ms.max(now_ms);
            }
        }
    }

    /// The instance's stream read its second `t`.
    pub(crate) fn read(&self, instance: &Arc<str>, t: i64, now_ms: i64) {
        if let Some(replay) = self.lock().get_mut(instance) {
            replay.read_to(t, now_ms);
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
    /// aggregator's CPU at 10,000 agents). A replay merged up to `t` or past it, whose stream is open, is waiting
    /// for `t`'s seal, not stalled: its agent sends a few seconds at a time and the next only as the aggregator
    /// acknowledges (seals) them, so it counts as moving until then. One whose streams all ended is not waiting
    /// for anything: a dead agent's replay is forgotten `replay_stall` after its stream ended, however long the
    /// seals before it take.
    pub(crate) fn holds(&self, t: i64, now_ms: i64, stall_ms: i64) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let moving = |r: &Replay| now_ms < r.moved_ms.saturating_add(stall_ms);
        let mut replaying = self.lock();
        if prune_due(&self.pruned_ms, now_ms) {
            replaying.retain(|_, r| {
                if r.open > 0 && r.merged.is_some_and(|merged| merged >= t) {
                    r.moved_ms = now_ms;
                }
                moving(r)
            });
            self.count.store(replaying.len(), Ordering::Relaxed);
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

/// How often replays that stopped moving, and instances heard of too long ago, are forgotten (ms).
const PRUNE_EVERY_MS: i64 = 1_000;

/// Whether `PRUNE_EVERY_MS` has passed since `last` (wall clock, ms), which then becomes `now_ms`.
fn prune_due(last: &AtomicI64, now_ms: i64) -> bool {
    let due = now_ms >= last.load(Ordering::Relaxed).saturating_add(PRUNE_EVERY_MS);
    if due {
        last.store(now_ms, Ordering::Relaxed);
    }
    due
}

impl Replay {
    /// Its stream read second `t` at `now_ms`: moving on, if newer than any it read.
    fn read_to(&mut self, t: i64, now_ms: i64) {
        if self.read.is_none_or(|read| t > read) {
            self.read = Some(t);
            self.moved_ms = now_ms;
        }
    }
}

/// When a replaying stream is caught up. Its agent sends the seconds it kept first and its live ones behind them, so
/// after a replay of at least [`MIN_BACKLOG_SECONDS`], until the stream reads a second within `caught_up_ms` of that
/// second's end, the seconds after its replay are late too, and its service's shard waits for them as for the
/// replay (for at most `longest_ms` after its instance's first hello). Without this, after an outage of a large
/// fleet the first streams to catch up had each live second sealed, the rest of it became corrections (or came too
/// late), and those cost more than merging on time did: at 10,000 agents the aggregator never caught up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CatchUp {
    /// Caught up once a second is read within this of its end (ms).
    pub(crate) caught_up_ms: i64,
    /// A stream is waited for so for at most this long after its instance's first hello (ms; a reconnect does not
    /// renew it): a lagging or hostile agent holds its service's seconds no longer.
    pub(crate) longest_ms: i64,
}

/// One stream's replay, on the stream's side: what it notes in its service's book as it reads.
#[derive(Debug)]
pub(crate) struct StreamReplay {
    /// Held for as long as the stream lives: a book nobody holds is gone, and after a restart the shard may start
    /// the service only once every stream has read its replay (a long queue).
    pub(crate) book: Arc<ReplayBook>,
    instance: Arc<str>,
    /// The newest second the stream replays, until it reads it (moved on while it is behind); `None` while it is
    /// caught up.
    through: Option<i64>,
    /// The newest second it read at or past `through`.
    reached: Option<i64>,
    caught_up_ms: i64,
    /// Past this (wall clock, ms) a stream still behind is caught up as far as waiting for it goes.
    until_ms: i64,
    /// The first second it read: how long its replay was.
    first: Option<i64>,
    /// Where it is counted, if anywhere (see [`StreamReplay::counted`]).
    counted: Option<Counted>,
}

/// Where replaying streams are counted: how many are catching up now, how many were still behind after a replay.
#[derive(Debug)]
struct Counted {
    catching_up: Gauge,
    behind: Counter,
    /// Whether this stream was counted as behind already.
    was_behind: bool,
}

/// The shortest replay (seconds) after which a stream may be behind: an agent that kept a second or two (a
/// connection that blipped, an aggregator slow to answer at a start) has no backlog to work through.
const MIN_BACKLOG_SECONDS: i64 = 5;

impl StreamReplay {
    /// `instance`'s stream said at its hello, at `now_ms`, that it replays up to `through` (at most the current
    /// second: nobody replays one that has not begun).
    pub(crate) fn start(
        book: Arc<ReplayBook>,
        instance: &Arc<str>,
        through: i64,
        catch_up: CatchUp,
        now_ms: i64,
    ) -> Self {
        let through = through.min(now_ms.div_euclid(1000));
        let until_ms = book.start(instance, through, now_ms, catch_up.longest_ms);
        Self {
            book,
            instance: instance.clone(),
            through: Some(through),
            reached: None,
            caught_up_ms: catch_up.caught_up_ms,
            until_ms,
            first: None,
            counted: None,
        }
    }

    /// Counts the stream in `catching_up` until it is caught up (or ends), and in `behind` once if its replay
    /// leaves it behind the clock.
    pub(crate) fn counted(mut self, catching_up: Gauge, behind: Counter) -> Self {
        catching_up.inc();
        self.counted = Some(Counted {
            catching_up,
            behind,
            was_behind: false,
        });
        self
    }

    /// The stream read second `t` at `now_ms`; returns whether its service's shard waited for it (it was
    /// replaying, or behind after its replay).
    pub(crate) fn read(&mut self, t: i64, now_ms: i64) -> bool {
        let Some(through) = self.through else {
            return false;
        };
        let first = *self.first.get_or_insert(t);
        if t < through {
            self.book.read(&self.instance, t, now_ms);
            return true;
        }
        // Read more than `caught_up_ms` after it ended: the next second is queued behind this one, just as late.
        // Caught up (or past its deadline): this one is the last waited for. Once caught up, a stream that falls
        // behind again is a straggler like any other: waiting for it then held its whole service (at 10,000 agents
        // the largest service's seconds went unpublished for a minute at the end of a catch-up).
        let ended_ms = t.saturating_add(1).saturating_mul(1000);
        let behind = now_ms > ended_ms.saturating_add(self.caught_up_ms)
            && now_ms < self.until_ms
            && t.saturating_sub(first) >= MIN_BACKLOG_SECONDS - 1;
        let reach = if behind { t.saturating_add(1) } else { t };
        self.book.reaches(&self.instance, t, reach, now_ms);
        self.through = behind.then_some(reach);
        self.reached = Some(t);
        if let Some(counted) = &mut self.counted {
            if behind && !counted.was_behind {
                counted.was_behind = true;
                counted.behind.inc();
            }
            if !behind {
                counted.catching_up.dec();
            }
        }
        true
    }
}

impl Drop for StreamReplay {
    /// A stream that ends while behind is not waited for past what it read (a stream that ends mid-replay still
    /// is, for `replay_stall`: its agent reconnects and replays the rest).
    fn drop(&mut self) {
        if let (Some(through), Some(read)) = (self.through, self.reached) {
            self.book.ended(&self.instance, through, read);
        }
        self.book
            .closed(&self.instance, strobe_proto::clock::unix_millis());
        if let (Some(_), Some(counted)) = (self.through, &self.counted) {
            counted.catching_up.dec();
        }
    }
}

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

    /// An agent sends a few seconds at a time and the next only once those are acknowledged, which is at their
    /// seal: a replay merged up to the second that waits, or past it, is waiting for that seal, not stalled, and
    /// is not forgotten however long the seal takes (the 8 s gathering after a restart, say). One that merged
    /// nothing of it and stopped moving is.
    #[test]
    fn a_replay_waiting_for_the_seal_of_what_it_sent_is_not_forgotten_as_stalled() {
        let book = ReplayBook::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        book.start(&a, 20, 0, 120_000);
        book.start(&b, 20, 0, 120_000);
        book.read(&a, 12, 100);
        book.merged(&a, 12, 100);
        book.read(&b, 9, 100);
        book.merged(&b, 9, 100);
        // Ten seconds later second 10 waits: `a` has merged past it, `b` stopped short of it.
        assert!(!book.holds(10, 10_000, 1_000));
        assert_eq!(book.len(), 1, "b forgotten, a kept");
        // 10 to 12 sealed and acknowledged: `a` is waited for as it sends on.
        assert!(book.holds(13, 10_500, 1_000), "a, waiting since its seal");
        book.read(&a, 13, 10_600);
        book.merged(&a, 13, 10_700);
        assert!(book.holds(14, 10_800, 1_000));
    }

    /// Agents that died mid-replay, merged to different seconds: each is forgotten `replay_stall` after its stream
    /// ended, all at once, not one after another as the seconds before each are sealed.
    #[test]
    fn replays_whose_streams_ended_are_not_waiting_for_any_seal() {
        let book = ReplayBook::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        book.start(&a, 30, 0, 120_000);
        book.start(&b, 30, 0, 120_000);
        book.merged(&a, 12, 100);
        book.merged(&b, 20, 100);
        book.closed(&a, 200);
        book.closed(&b, 200);
        // Second 10 waits (for someone else) until 10 s later: both merged past it, and neither is refreshed.
        assert!(!book.holds(10, 10_000, 1_000));
        assert!(!book.holds(13, 10_100, 1_000), "a forgotten");
        assert!(!book.holds(21, 10_100, 1_000), "b forgotten with it");
        assert_eq!(book.len(), 0);
        // A reconnect opens the next stream before the last is seen to end: the replay waits while either is open.
        book.start(&a, 30, 20_000, 120_000);
        book.start(&a, 30, 20_050, 120_000);
        book.merged(&a, 15, 20_100);
        book.closed(&a, 20_200);
        assert!(!book.holds(15, 31_000, 1_000));
        assert!(
            book.holds(16, 31_000, 1_000),
            "one stream still open, waiting for 15's seal"
        );
    }

    #[test]
    fn a_replay_holds_what_it_has_not_merged_while_it_moves() {
        let book = ReplayBook::default();
        let a: Arc<str> = "a".into();
        assert!(!book.holds(10, 0, 1_000), "nobody replays");
        book.start(&a, 20, 0, 120_000);
        assert!(book.holds(10, 500, 1_000), "heard of, nothing merged yet");
        assert!(!book.holds(21, 500, 1_000), "newer than it replays");
        // Reading newer seconds is moving on, though nothing is merged yet (a long queue to the shard); reading
        // the same second again is not.
        book.read(&a, 5, 900);
        book.read(&a, 5, 1_850);
        assert!(!book.holds(10, 1_900, 1_000), "stopped at 900");
        book.start(&a, 20, 0, 120_000);
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
        book.start(&a, 20, 3_000, 120_000);
        book.merged(&a, 12, 3_000);
        book.start(&a, 25, 3_900, 120_000);
        assert!(!book.holds(12, 3_900, 1_000), "merged past it before");
        assert!(book.holds(13, 3_900, 1_000));
        assert!(!book.holds(13, 4_000, 1_000), "the hello moved nothing");
        book.start(&a, 20, 5_000, 120_000);
        book.merged(&a, 20, 5_100);
        assert_eq!(book.len(), 0, "done once the newest it replays is merged");
    }

    #[test]
    fn a_service_has_one_book_while_anyone_holds_it() {
        let replays = Replays::default();
        let service: Arc<str> = "svc".into();
        let book = replays.of(&service);
        book.start(&"a".into(), 20, 0, 120_000);
        assert_eq!(replays.of(&service).len(), 1, "the same book");
        drop(book);
        assert_eq!(replays.of(&service).len(), 0, "nobody held it: a new one");
    }

    /// An empty book, and streams caught up within 1 s of a second's end, waited for at most `longest_ms`.
    fn catching_up(longest_ms: i64) -> (Arc<ReplayBook>, CatchUp) {
        let catch_up = CatchUp {
            caught_up_ms: 1_000,
            longest_ms,
        };
        (Arc::new(ReplayBook::default()), catch_up)
    }

    #[test]
    fn streams_catching_up_and_left_behind_are_counted() {
        let (book, catch_up) = catching_up(120_000);
        let (catching, behind) = (Gauge::default(), Counter::default());
        let counted = |instance: &str, through: i64| {
            StreamReplay::start(book.clone(), &instance.into(), through, catch_up, 100_000)
                .counted(catching.clone(), behind.clone())
        };
        let mut late = counted("a", 95);
        let mut short = counted("b", 98);
        let ended = counted("c", 95);
        let mut gone = counted("d", 95);
        assert_eq!(catching.get(), 4, "four replaying");
        // d: behind after its replay, and its stream ends so.
        for t in 90..=96 {
            gone.read(t, 100_300);
        }
        assert_eq!(behind.get(), 1);
        drop(gone);
        assert_eq!(catching.get(), 3, "d's stream ended while behind");
        // a: a replay of 90..95 read 4 s and more after its seconds ended, then 96 still late, then 99 on time.
        for t in 90..=95 {
            late.read(t, 100_200);
        }
        assert_eq!(behind.get(), 2, "a is behind after its replay");
        late.read(96, 100_300);
        assert_eq!(behind.get(), 2, "counted once");
        assert_eq!(catching.get(), 3);
        late.read(99, 100_400);
        assert_eq!(catching.get(), 2, "a caught up");
        // b: two seconds of replay leave nothing behind.
        short.read(97, 100_200);
        short.read(98, 100_200);
        assert_eq!(catching.get(), 1, "b done");
        assert_eq!(behind.get(), 2);
        drop(ended);
        assert_eq!(catching.get(), 0, "c's stream ended mid-replay");
        drop((late, short));
        assert_eq!(catching.get(), 0, "nothing counted twice");
    }

    #[test]
    fn a_stream_still_behind_after_its_replay_is_waited_for_until_it_catches_up() {
        let (book, catch_up) = catching_up(120_000);
        let a: Arc<str> = "a".into();
        // At 100 s, a replays up to 95.
        let mut stream = StreamReplay::start(book.clone(), &a, 95, catch_up, 100_000);
        assert!(stream.read(90, 100_100));
        assert!(book.holds(95, 100_100, 10_000));
        assert!(!book.holds(96, 100_100, 10_000), "newer than it replays");
        // 95 read 4.2 s after its end: 96 is queued behind it, as late.
        assert!(stream.read(95, 100_200));
        assert!(book.holds(96, 100_200, 10_000));
        assert!(!book.holds(97, 100_200, 10_000));
        assert!(stream.read(96, 100_300));
        assert!(book.holds(97, 100_300, 10_000));
        book.merged(&a, 96, 100_300);
        assert!(!book.holds(96, 100_300, 10_000), "merged past it");
        // 99 read 400 ms after its end: caught up. Held until it is merged, then done.
        assert!(stream.read(99, 100_400));
        assert!(book.holds(99, 100_400, 10_000));
        assert!(!book.holds(100, 100_400, 10_000), "caught up: 100 is live");
        assert!(!stream.read(100, 101_100), "no longer replaying");
        book.merged(&a, 99, 100_500);
        assert_eq!(book.len(), 0);

        // A stream that stays behind is waited for at most `longest_ms` after its hello.
        let short = CatchUp {
            caught_up_ms: 1_000,
            longest_ms: 1_000,
        };
        let mut lagging = StreamReplay::start(book.clone(), &a, 95, short, 100_000);
        assert!(lagging.read(90, 100_400));
        assert!(lagging.read(95, 100_500));
        assert!(book.holds(96, 100_500, 10_000), "behind, within longest_ms");
        assert!(lagging.read(96, 101_000));
        assert!(!book.holds(97, 101_000, 10_000), "past longest_ms: live");
        assert!(!lagging.read(97, 101_100));
    }

    #[test]
    fn a_reconnect_does_not_renew_how_long_a_stream_behind_is_waited_for() {
        let (book, catch_up) = catching_up(10_000);
        let a: Arc<str> = "a".into();
        let first = StreamReplay::start(book.clone(), &a, 95, catch_up, 100_000);
        drop(first);
        // Reconnected 9 s later, still behind: waited for until 110_000, as the first hello set, not 119_000.
        let mut again = StreamReplay::start(book.clone(), &a, 98, catch_up, 109_000);
        assert!(again.read(90, 109_400));
        assert!(again.read(98, 109_500));
        assert!(book.holds(99, 109_500, 10_000), "behind, before 110_000");
        assert!(again.read(99, 110_000));
        assert!(!book.holds(100, 110_000, 10_000), "not past 110_000");
    }

    #[test]
    fn a_stream_that_ends_while_behind_is_waited_for_up_to_what_it_read() {
        let (book, catch_up) = catching_up(120_000);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut stream = StreamReplay::start(book.clone(), &a, 95, catch_up, 100_000);
        assert!(stream.read(90, 100_100));
        assert!(stream.read(95, 100_200));
        assert!(book.holds(96, 100_200, 10_000), "behind: 96 is waited for");
        drop(stream);
        assert!(
            book.holds(95, 100_300, 10_000),
            "what it read may still be merged"
        );
        assert!(!book.holds(96, 100_300, 10_000), "it reads nothing more");
        // A stream that ends mid-replay is still waited for (its agent reconnects and replays the rest).
        let mut mid = StreamReplay::start(book.clone(), &b, 95, catch_up, 100_000);
        assert!(mid.read(90, 100_100));
        drop(mid);
        book.merged(&a, 95, 100_400);
        assert!(book.holds(95, 100_400, 10_000));
    }

    #[test]
    fn a_stream_forgotten_as_stalled_is_taken_up_again_from_where_it_reads() {
        let (book, catch_up) = catching_up(120_000);
        let a: Arc<str> = "a".into();
        let mut stream = StreamReplay::start(book.clone(), &a, 95, catch_up, 100_000);
        assert!(stream.read(90, 100_100));
        assert!(stream.read(95, 100_200));
        // Stalled for 10 s: forgotten.
        assert!(!book.holds(90, 110_300, 10_000));
        assert_eq!(book.len(), 0);
        // It moves again, at 96: taken up again from there, not what came before.
        assert!(stream.read(96, 110_400));
        assert!(
            !book.holds(95, 110_400, 10_000),
            "forgotten: not waited for"
        );
        assert!(book.holds(96, 110_400, 10_000));
        assert!(book.holds(97, 110_400, 10_000), "still behind");
    }

    #[test]
    fn a_stream_caught_up_is_not_waited_for_again() {
        let (book, catch_up) = catching_up(20_000);
        let a: Arc<str> = "a".into();
        let mut stream = StreamReplay::start(book.clone(), &a, 99, catch_up, 100_000);
        assert!(
            stream.read(99, 100_500),
            "on time: caught up, 99 is the last waited for"
        );
        assert!(!book.holds(100, 100_500, 10_000));
        // Late again: a straggler, not waited for.
        assert!(!stream.read(100, 104_000));
        assert!(!book.holds(101, 104_000, 10_000));
    }

    #[test]
    fn only_instances_not_heard_of_before_count_as_still_reconnecting_and_nobody_renews_a_deadline()
    {
        let book = ReplayBook::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert_eq!(book.start(&a, 90, 100_000, 60_000), 160_000);
        assert_eq!(book.last_hello_ms(), 100_000);
        // a reconnects in a loop, its replay merged in between: neither moves the newest hello nor its deadline.
        book.merged(&a, 90, 101_000);
        assert_eq!(book.len(), 0);
        for at in [105_000, 110_000, 150_000] {
            assert_eq!(book.start(&a, 95, at, 60_000), 160_000);
            book.merged(&a, 95, at);
        }
        assert_eq!(book.last_hello_ms(), 100_000);
        // b is new.
        assert_eq!(book.start(&b, 95, 120_000, 60_000), 180_000);
        assert_eq!(book.last_hello_ms(), 120_000);
        // Past its deadline, a is heard of afresh.
        assert_eq!(book.start(&a, 99, 161_000, 60_000), 221_000);
        assert_eq!(book.last_hello_ms(), 161_000);
    }

    #[test]
    fn a_replay_of_a_second_or_two_leaves_nothing_behind_it_to_wait_for() {
        let (book, catch_up) = catching_up(120_000);
        let a: Arc<str> = "a".into();
        // An agent kept 98 and 99 (a blip) and its stream reads them 3 s late: 99 is the last waited for.
        let mut blip = StreamReplay::start(book.clone(), &a, 99, catch_up, 103_000);
        assert!(blip.read(98, 103_000));
        assert!(blip.read(99, 103_000));
        assert!(book.holds(99, 103_000, 10_000));
        assert!(!book.holds(100, 103_000, 10_000));
        assert!(!blip.read(100, 104_000));
    }
}
