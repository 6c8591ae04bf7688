//! Ships closed snapshots to the aggregator over the gRPC stream, keeps what is not acknowledged, replays it after
//! a reconnect, and backs off with jitter while the aggregator is away.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use strobe_proto as pb;
use strobe_proto::clock::AgentClock;
use strobe_proto::codec::Encoded;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

/// How the shipper talks to the aggregator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShipperConfig {
    /// The aggregator's gRPC address, `http://host:port`; several nodes of a cluster comma-separated (any of them
    /// redirects to the owner; the next is tried when one cannot be reached).
    pub aggregator: String,
    /// Token sent in the hello, when the aggregator requires one.
    pub token: Option<String>,
    /// Most unacknowledged seconds kept for replay; the oldest is dropped (and counted) past it.
    pub max_buffered_seconds: usize,
    /// Most seconds sent on a stream and not yet answered (acknowledged or refused); the others wait here, oldest
    /// first, and go as answers come. A replay after an outage then puts this many seconds on the wire at once, not
    /// the whole backlog: with thousands of agents reconnecting to a restarted aggregator, what it holds unread
    /// stays a few seconds per agent however long the outage was.
    pub max_seconds_in_flight: usize,
    /// Largest encoded snapshot; series past it are dropped (and counted) before sending.
    pub max_message_bytes: usize,
    /// First reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How long a connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// On shutdown, how long to wait for the last seconds to be acknowledged.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Most series one stream's dictionary names (then sent by id alone); series past it are always sent named.
    pub max_dictionary_series: usize,
    /// How often an HTTP/2 ping checks the connection, even when idle...
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// ...and how long its answer may take before the connection counts as dead (a half-open connection is then
    /// noticed within the sum of the two, and the agent reconnects and replays).
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// For an `https://` aggregator: CA certificates (PEM) to trust instead of the public web roots.
    pub ca_cert: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for aggregators that ask for one (mTLS)...
    pub tls_cert: Option<std::path::PathBuf>,
    /// ...and its key (PEM).
    pub tls_key: Option<std::path::PathBuf>,
    /// The clock the agent's windows follow: its own, corrected by what the aggregator's acks say about theirs.
    #[serde(skip)]
    pub clock: AgentClock,
    /// Series the caller names once, up front, and then hands over by number (see [`RegisteredSeries`]).
    #[serde(skip)]
    pub registered: RegisteredSeries,
}

/// Series a caller that emits the same series every second names once, up front: in its snapshots a series with
/// an empty name and `id` k (1-based) stands for the k-th of these. Each stream's dictionary gives them the same
/// ids on the wire, names each of them the first time a stream carries it (a reconnect or a redirect names them
/// again) and sends the id alone afterwards, so the caller neither builds nor hashes a name per series per second.
/// Any other series in a snapshot is named as usual.
#[derive(Debug, Clone, Default)]
pub struct RegisteredSeries {
    /// Name and tags of each (values unset).
    names: Arc<[pb::Series]>,
    /// Bytes naming each adds to an encoded snapshot.
    naming_bytes: Arc<[usize]>,
}

impl RegisteredSeries {
    /// Registers `names` (their values, if any, are ignored): the k-th (from 1) is then sent as id k.
    pub fn new(names: impl IntoIterator<Item = pb::Series>) -> Self {
        let names: Arc<[pb::Series]> = names
            .into_iter()
            .map(|s| pb::Series {
                name: s.name,
                tags: s.tags,
                id: 0,
                value: None,
            })
            .collect();
        // Name and tag fields, and the room they may add to the series' length prefix.
        let naming_bytes = names.iter().map(|s| s.encoded_len() + 2).collect();
        Self {
            names,
            naming_bytes,
        }
    }

    /// How many are registered.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The registered series `series` stands for, and its id, if it is one (empty name, id in range).
    fn lookup(&self, series: &pb::Series) -> Option<(usize, &pb::Series)> {
        if !series.name.is_empty() || !series.tags.is_empty() || series.id == 0 {
            return None;
        }
        let id = series.id as usize;
        self.names.get(id - 1).map(|known| (id, known))
    }

    /// Bytes the names of the registered series in `snapshot` would add to it, were each named.
    fn naming_bytes(&self, snapshot: &pb::Snapshot) -> usize {
        snapshot
            .series
            .iter()
            .filter_map(|s| self.lookup(s).map(|(id, _)| self.naming_bytes[id - 1]))
            .sum()
    }
}

impl Default for ShipperConfig {
    fn default() -> Self {
        Self {
            aggregator: "http://127.0.0.1:7070".to_owned(),
            token: None,
            max_buffered_seconds: 600,
            max_seconds_in_flight: 8,
            max_message_bytes: 4 * 1024 * 1024,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(2),
            max_dictionary_series: 100_000,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            ca_cert: None,
            tls_cert: None,
            tls_key: None,
            clock: AgentClock::default(),
            registered: RegisteredSeries::default(),
        }
    }
}

/// What the shipper did over its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShipperReport {
    /// Snapshots acknowledged by an aggregator.
    pub acknowledged: u64,
    /// Snapshots dropped because the replay buffer was full.
    pub dropped: u64,
    /// Connections made.
    pub connections: u64,
    /// Snapshots the aggregator refused for what they hold (dropped; not acknowledged).
    pub refused: u64,
}

/// Unacknowledged snapshots, oldest first.
struct ReplayBuffer {
    snapshots: VecDeque<pb::Snapshot>,
    capacity: usize,
    dropped_unreported: u64,
    /// Where acknowledgements and refusals are also counted live, if anyone watches.
    tally: Option<Arc<ShipperTally>>,
    /// The length last added to the tally's `buffered`.
    reported_len: u64,
    /// Once the input has closed (shutdown), when to stop waiting for acknowledgements, connected or not.
    give_up_at: Option<tokio::time::Instant>,
    /// Seconds refused for now (ahead of the aggregator's clock): kept, never dropped by a cumulative ack, and moved
    /// to the aggregator's clock and sent again once this agent corrects its own.
    held: std::collections::BTreeSet<i64>,
    /// When the newest seconds were first sent (local clock, ms): an answer about one bounds the clock offset.
    first_sent: strobe_proto::clock::FirstSeen,
    /// Seconds sent on the current stream and not answered yet: in flight (see `max_seconds_in_flight`).
    sent: std::collections::BTreeSet<i64>,
    /// Seconds refused for now on the current stream: held, and not sent again on it (the next stream does).
    held_here: std::collections::BTreeSet<i64>,
}

/// How many seconds' first send times are remembered (answers come within a few seconds).
const SENT_REMEMBERED: usize = 32;

impl ReplayBuffer {
    /// An empty buffer of at most `capacity` seconds.
    fn new(capacity: usize, tally: Option<Arc<ShipperTally>>) -> Self {
        Self {
            snapshots: VecDeque::new(),
            capacity,
            dropped_unreported: 0,
            tally,
            reported_len: 0,
            give_up_at: None,
            held: Default::default(),
            first_sent: strobe_proto::clock::FirstSeen::new(SENT_REMEMBERED),
            sent: Default::default(),
            held_here: Default::default(),
        }
    }

    /// A new stream: nothing is sent on it yet, so everything kept is to be sent, held seconds too.
    fn new_stream(&mut self) {
        self.sent.clear();
        self.held_here.clear();
    }

    /// The oldest seconds not sent on this stream yet, as many as `limit` seconds in flight leave room for.
    fn due(&self, limit: usize) -> impl Iterator<Item = &pb::Snapshot> {
        let room = limit.max(1).saturating_sub(self.sent.len());
        self.snapshots
            .iter()
            .filter(|s| !self.sent.contains(&s.second) && !self.held_here.contains(&s.second))
            .take(room)
    }

    /// `second` was refused for now (ahead of the aggregator's clock): kept, answered, and not sent again on this
    /// stream.
    fn hold(&mut self, second: i64) {
        self.held.insert(second);
        if self.sent.remove(&second) {
            self.held_here.insert(second);
        }
    }

    /// Notes that `second` went out at `local_ms`, unless it already had; the newest seconds are the ones kept.
    fn note_sent(&mut self, second: i64, local_ms: i64) {
        self.first_sent.note(second, local_ms);
    }

    /// When `second` first went out, if remembered.
    fn first_sent(&self, second: i64) -> Option<i64> {
        self.first_sent.get(second)
    }

    /// When shutdown stops waiting for acknowledgements: set once, `drain` after the input first closed.
    fn give_up_at(&mut self, drain: Duration) -> tokio::time::Instant {
        *self
            .give_up_at
            .get_or_insert_with(|| tokio::time::Instant::now() + drain)
    }

    fn push(&mut self, snapshot: pb::Snapshot, report: &mut ShipperReport) {
        if self.snapshots.len() >= self.capacity.max(1) {
            if let Some(oldest) = self.snapshots.pop_front() {
                self.held.remove(&oldest.second);
                self.sent.remove(&oldest.second);
                self.held_here.remove(&oldest.second);
            }
            self.dropped_unreported += 1;
            report.dropped += 1;
            if let Some(tally) = &self.tally {
                tally
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.snapshots.push_back(snapshot);
        self.sync_tally();
    }

    /// Brings the tally's `buffered` to this buffer's length (shippers sharing a tally add up).
    fn sync_tally(&mut self) {
        let now = self.snapshots.len() as u64;
        let before = std::mem::replace(&mut self.reported_len, now);
        if let Some(tally) = &self.tally {
            use std::sync::atomic::Ordering::Relaxed;
            if now >= before {
                tally.buffered.fetch_add(now - before, Relaxed);
            } else {
                tally.buffered.fetch_sub(before - now, Relaxed);
            }
        }
    }

    /// Drops everything up to and including `second`, but for held seconds; returns how many.
    fn ack(&mut self, second: i64) -> u64 {
        let before = self.snapshots.len();
        // A held second sent again and acknowledged is counted: it goes like any other.
        self.held.remove(&second);
        self.held_here.remove(&second);
        let held = &self.held;
        self.snapshots
            .retain(|s| s.second > second || held.contains(&s.second));
        // A held second sent again stays in flight until its own answer.
        self.sent.retain(|s| *s > second || held.contains(s));
        self.sync_tally();
        (before - self.snapshots.len()) as u64
    }

    /// Drops one refused second (refused for what it holds: sending it again would not help); whether it was there.
    fn refused(&mut self, second: i64) -> bool {
        let before = self.snapshots.len();
        self.snapshots.retain(|s| s.second != second);
        self.held.remove(&second);
        self.sent.remove(&second);
        self.held_here.remove(&second);
        self.sync_tally();
        before != self.snapshots.len()
    }

    /// The clock's applied offset moved by `shift_ms`: held seconds were stamped on the old clock, so they move
    /// to the new one (and are sent again). Returns how many moved.
    fn restamp_held(&mut self, shift_ms: i64) -> usize {
        let shift = (shift_ms as f64 / 1000.0).round() as i64;
        if shift == 0 || self.held.is_empty() {
            return 0;
        }
        let held = std::mem::take(&mut self.held);
        let mut moved = 0;
        for snapshot in &mut self.snapshots {
            if held.contains(&snapshot.second) {
                snapshot.second = snapshot.second.saturating_add(shift);
                moved += 1;
            }
        }
        self.snapshots.make_contiguous().sort_by_key(|s| s.second);
        moved
    }
}

impl Drop for ReplayBuffer {
    fn drop(&mut self) {
        // What is still here is given up on (and counted as dropped by the caller): no longer waiting.
        self.snapshots.clear();
        self.sync_tally();
    }
}

/// Live counters shared by any number of shippers (a load generator reports them every second).
#[derive(Debug, Default)]
pub struct ShipperTally {
    /// Snapshots acknowledged.
    pub acknowledged: std::sync::atomic::AtomicU64,
    /// Snapshots the aggregator refused whole.
    pub refused_snapshots: std::sync::atomic::AtomicU64,
    /// Series the aggregator dropped from snapshots it took.
    pub refused_series: std::sync::atomic::AtomicU64,
    /// Snapshots dropped unsent: the oldest, when the replay buffer was full.
    pub dropped: std::sync::atomic::AtomicU64,
    /// Snapshots waiting for their acknowledgement now.
    pub buffered: std::sync::atomic::AtomicU64,
    /// Streams connected to an aggregator now.
    pub connected: std::sync::atomic::AtomicU64,
}

/// Counts a stream as connected while it lives.
struct ConnectedGuard<'a>(Option<&'a ShipperTally>);

impl<'a> ConnectedGuard<'a> {
    fn new(tally: Option<&'a ShipperTally>) -> Self {
        if let Some(tally) = tally {
            tally
                .connected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Self(tally)
    }
}

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        if let Some(tally) = self.0 {
            tally
                .connected
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Runs until `snapshots` closes and the buffer is drained (or the drain timeout passes).
pub async fn run_shipper(
    identity: pb::Identity,
    config: ShipperConfig,
    snapshots: mpsc::Receiver<pb::Snapshot>,
) -> ShipperReport {
    ship(identity, config, snapshots, None, None).await
}

/// Like [`run_shipper`], counting live into `tally` (the agent's `/metrics` reads it).
pub async fn run_shipper_counted(
    identity: pb::Identity,
    config: ShipperConfig,
    snapshots: mpsc::Receiver<pb::Snapshot>,
    tally: Arc<ShipperTally>,
) -> ShipperReport {
    ship(identity, config, snapshots, None, Some(tally)).await
}

/// Like [`run_shipper`], but multiplexes its stream over an existing HTTP/2 channel (load generators run
/// thousands of shippers over a few connections). A redirect still connects to the new address.
pub async fn run_shipper_on(
    identity: pb::Identity,
    config: ShipperConfig,
    snapshots: mpsc::Receiver<pb::Snapshot>,
    channel: Channel,
    tally: Arc<ShipperTally>,
) -> ShipperReport {
    ship(identity, config, snapshots, Some(channel), Some(tally)).await
}

async fn ship(
    identity: pb::Identity,
    config: ShipperConfig,
    mut snapshots: mpsc::Receiver<pb::Snapshot>,
    shared: Option<Channel>,
    tally: Option<Arc<ShipperTally>>,
) -> ShipperReport {
    let mut report = ShipperReport::default();
    let mut buffer = ReplayBuffer::new(config.max_buffered_seconds, tally);
    // `aggregator` may name several nodes of a cluster, comma-separated: any of them redirects to the owner.
    let seeds: Vec<String> = config
        .aggregator
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let seeds = if seeds.is_empty() {
        vec![config.aggregator.clone()]
    } else {
        seeds
    };
    let mut seed = 0;
    let mut target = seeds[0].clone();
    let mut redirects_in_row: u32 = 0;
    let mut failures: u32 = 0;
    let mut input_open = true;
    loop {
        if !input_open {
            if buffer.snapshots.is_empty() {
                return report;
            }
            if tokio::time::Instant::now() >= buffer.give_up_at(config.drain_timeout) {
                return give_up(buffer, report);
            }
        }
        let channel = shared.as_ref().filter(|_| target == seeds[0]).cloned();
        // On shutdown, even a connection attempt does not outlast the drain timeout.
        let deadline = buffer.give_up_at;
        let outcome = tokio::select! {
            outcome = ship_once(
                &identity,
                &config,
                &target,
                channel,
                &mut snapshots,
                &mut buffer,
                &mut report,
            ) => Some(outcome),
            _ = sleep_until_opt(deadline) => None,
        };
        let Some(outcome) = outcome else {
            return give_up(buffer, report);
        };
        match outcome {
            Session::InputClosed if buffer.snapshots.is_empty() => return report,
            Session::InputClosed => return give_up(buffer, report),
            Session::Redirected(address) => {
                if target.starts_with("https://") && !address.starts_with("https://") {
                    // Never from TLS to plain text on an aggregator's word: the seeds are asked again.
                    warn!(message = "Redirect from TLS to plain text refused.", service = %identity.service, %address);
                    target = seeds[seed].clone();
                    failures = failures.saturating_add(1);
                } else {
                    info!(message = "Redirected.", service = %identity.service, %address);
                    target = address;
                    redirects_in_row += 1;
                    failures = 0;
                    // Nodes whose views of the cluster differ for a moment may send it back and forth: after a few
                    // hops in a row, wait as after a failure (below, still taking seconds in meanwhile).
                    if redirects_in_row <= 3 {
                        continue;
                    }
                    failures = redirects_in_row - 3;
                }
            }
            Session::Resend => {
                failures = 0;
                continue;
            }
            Session::Lost { connected } => {
                // Any session that did not end in a redirect ends a run of redirects.
                redirects_in_row = 0;
                if connected {
                    failures = 0;
                } else if !seeds.contains(&target) {
                    // An owner it was redirected to cannot be reached (it died, say): ask a seed again, which
                    // knows the owner now.
                    target = seeds[seed].clone();
                } else if seeds.len() > 1 {
                    seed = (seed + 1) % seeds.len();
                    target = seeds[seed].clone();
                }
                failures = failures.saturating_add(1);
            }
        }
        let delay = backoff_delay(&config, failures);
        debug!(message = "Reconnecting.", aggregator = %target, delay_ms = delay.as_millis() as u64);
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        // Keep folding seconds into the buffer while away; on shutdown, wait no longer than the drain timeout.
        loop {
            let give_up = buffer.give_up_at;
            tokio::select! {
                _ = &mut sleep => break,
                next = snapshots.recv(), if input_open => match next {
                    Some(mut s) => {
                        fit_to_limit(&mut s, config.max_message_bytes, &config.registered);
                        buffer.push(s, &mut report);
                    }
                    None => {
                        input_open = false;
                        buffer.give_up_at(config.drain_timeout);
                    }
                },
                _ = sleep_until_opt(give_up), if !input_open => break,
            }
        }
    }
}

/// Shutdown with seconds nobody acknowledged: they are lost, and said so.
fn give_up(buffer: ReplayBuffer, mut report: ShipperReport) -> ShipperReport {
    let lost = buffer.snapshots.len() as u64;
    warn!(
        message = "Stopping with unacknowledged seconds; they are lost.",
        unacknowledged = lost,
        oldest = buffer.snapshots.front().map(|s| s.second),
    );
    report.dropped += lost;
    if let Some(tally) = &buffer.tally {
        tally
            .dropped
            .fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
    }
    report
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

enum Session {
    InputClosed,
    Redirected(String),
    /// Held seconds moved to the aggregator's clock: reconnect at once and send the buffer again.
    Resend,
    Lost {
        connected: bool,
    },
}

async fn ship_once(
    identity: &pb::Identity,
    config: &ShipperConfig,
    target: &str,
    shared: Option<Channel>,
    snapshots: &mut mpsc::Receiver<pb::Snapshot>,
    buffer: &mut ReplayBuffer,
    report: &mut ShipperReport,
) -> Session {
    let tally = buffer.tally.clone();
    let tally = tally.as_deref();
    let channel = match shared {
        Some(channel) => channel,
        None => match connect(config, target).await {
            Some(channel) => channel,
            None => return Session::Lost { connected: false },
        },
    };
    let (out_tx, out_rx) = mpsc::channel::<Encoded>(config.max_seconds_in_flight.max(1) + 64);
    let hello = pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::Hello {
            identity: Some(identity.clone()),
            token: config.token.clone().unwrap_or_default(),
            // What follows the hello first: the seconds kept unacknowledged, oldest first.
            replay_through: buffer.snapshots.iter().map(|s| s.second).max().unwrap_or(0),
        })),
    };
    if out_tx.try_send(Encoded::of(&hello)).is_err() {
        return Session::Lost { connected: false };
    }
    let mut dictionary =
        SeriesDictionary::new(config.max_dictionary_series, config.registered.clone());
    // Readings from another connection (perhaps another aggregator) are not mixed with this one's.
    config.clock.forget_readings();
    buffer.new_stream();
    if !send_due(config, buffer, &mut dictionary, &out_tx) {
        return Session::Lost { connected: false };
    }
    let opened = strobe_proto::codec::open_stream(
        channel,
        config.max_message_bytes.saturating_add(1024),
        ReceiverStream::new(out_rx),
    );
    tokio::pin!(opened);
    // Opening waits for the aggregator's answer, which takes seconds when thousands of agents reconnect at once:
    // seconds closing meanwhile are taken (and sent) as they come, or the agent's queue would overflow and drop them.
    let mut input_open = true;
    let opened = loop {
        let give_up = buffer.give_up_at;
        tokio::select! {
            opened = &mut opened => break opened,
            next = snapshots.recv(), if input_open => match next {
                Some(snapshot) => {
                    if !forward(snapshot, config, buffer, &mut dictionary, &out_tx, report) {
                        return Session::Lost { connected: false };
                    }
                }
                None => {
                    // Shutting down: nothing left to send is done; an opening that never ends is waited for no
                    // longer than the drain.
                    if buffer.snapshots.is_empty() {
                        return Session::InputClosed;
                    }
                    input_open = false;
                    buffer.give_up_at(config.drain_timeout);
                }
            },
            _ = sleep_until_opt(give_up), if !input_open => return Session::InputClosed,
        }
    };
    let mut inbound = match opened {
        Ok(response) => response.into_inner(),
        Err(status) => {
            warn!(message = "Aggregator refused the stream.", code = ?status.code(), error = %status.message());
            return Session::Lost { connected: false };
        }
    };
    report.connections += 1;
    let _connected = ConnectedGuard::new(tally);
    info!(message = "Connected to aggregator.", address = %target, replaying = buffer.snapshots.len());
    let drain_deadline = tokio::time::sleep(Duration::from_secs(86_400 * 365));
    tokio::pin!(drain_deadline);
    if !input_open {
        if buffer.snapshots.is_empty() {
            return Session::InputClosed;
        }
        drain_deadline
            .as_mut()
            .reset(buffer.give_up_at(config.drain_timeout));
    }
    loop {
        tokio::select! {
            next = snapshots.recv(), if input_open => match next {
                Some(snapshot) => {
                    if !forward(snapshot, config, buffer, &mut dictionary, &out_tx, report) {
                        return Session::Lost { connected: true };
                    }
                }
                None => {
                    input_open = false;
                    if buffer.snapshots.is_empty() {
                        return Session::InputClosed;
                    }
                    drain_deadline
                        .as_mut()
                        .reset(buffer.give_up_at(config.drain_timeout));
                }
            },
            message = inbound.message() => match message {
                Ok(Some(message)) => match message.body {
                    Some(pb::aggregator_message::Body::Ack(ack)) => {
                        config.clock.note_accepted(ack.second);
                        if follow_clock(config, buffer, &Answer::from(&ack)) {
                            return Session::Resend;
                        }
                        let acked = buffer.ack(ack.second);
                        report.acknowledged += acked;
                        if let Some(tally) = tally {
                            tally.acknowledged.fetch_add(acked, std::sync::atomic::Ordering::Relaxed);
                        }
                        if !input_open && buffer.snapshots.is_empty() {
                            return Session::InputClosed;
                        }
                        if !send_due(config, buffer, &mut dictionary, &out_tx) {
                            return Session::Lost { connected: true };
                        }
                    }
                    Some(pb::aggregator_message::Body::Rejection(r)) => {
                        warn!(
                            message = "Aggregator rejected data.",
                            second = r.second, limit = %r.limit, reason = %r.message,
                            series_dropped = r.series_dropped, whole_snapshot = r.whole_snapshot,
                            kept_to_send_again = r.whole_snapshot && r.retry,
                        );
                        if r.whole_snapshot && r.retry {
                            buffer.hold(r.second);
                            config.clock.note_held();
                        } else if r.whole_snapshot && buffer.refused(r.second) {
                            report.refused += 1;
                        }
                        if let Some(tally) = tally {
                            let (counter, n) = if r.whole_snapshot {
                                (&tally.refused_snapshots, 1)
                            } else {
                                (&tally.refused_series, u64::from(r.series_dropped))
                            };
                            counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        }
                        if follow_clock(config, buffer, &Answer::refusal(&r)) {
                            return Session::Resend;
                        }
                        if !input_open && buffer.snapshots.is_empty() {
                            return Session::InputClosed;
                        }
                        if !send_due(config, buffer, &mut dictionary, &out_tx) {
                            return Session::Lost { connected: true };
                        }
                    }
                    Some(pb::aggregator_message::Body::Redirect(r)) => {
                        return Session::Redirected(r.address);
                    }
                    None => {}
                },
                Ok(None) => return Session::Lost { connected: true },
                Err(status) => {
                    warn!(message = "Stream to aggregator ended.", code = ?status.code(), error = %status.message());
                    return Session::Lost { connected: true };
                }
            },
            // What is still unacknowledged is reported lost by the caller.
            _ = &mut drain_deadline, if !input_open => return Session::InputClosed,
        }
    }
}

/// Keeps a closed second for replay and sends what is due; false when the stream's queue is full (it is not
/// being sent: the connection is as good as lost).
fn forward(
    mut snapshot: pb::Snapshot,
    config: &ShipperConfig,
    buffer: &mut ReplayBuffer,
    dictionary: &mut SeriesDictionary,
    out: &mpsc::Sender<Encoded>,
    report: &mut ShipperReport,
) -> bool {
    fit_to_limit(&mut snapshot, config.max_message_bytes, &config.registered);
    if let Some(stats) = snapshot.stats.as_mut() {
        stats.snapshots_dropped += std::mem::take(&mut buffer.dropped_unreported);
    }
    buffer.push(snapshot, report);
    send_due(config, buffer, dictionary, out)
}

/// Queues on the stream the oldest seconds not sent on it yet, while fewer than `max_seconds_in_flight` wait for an
/// answer; false when the stream's queue is full.
fn send_due(
    config: &ShipperConfig,
    buffer: &mut ReplayBuffer,
    dictionary: &mut SeriesDictionary,
    out: &mpsc::Sender<Encoded>,
) -> bool {
    let now = config.clock.local_millis();
    let mut sent = Vec::new();
    let mut queued = true;
    for snapshot in buffer.due(config.max_seconds_in_flight) {
        if out.try_send(dictionary.encode(snapshot)).is_err() {
            queued = false;
            break;
        }
        sent.push(snapshot.second);
    }
    for second in sent {
        buffer.note_sent(second, now);
        buffer.sent.insert(second);
    }
    queued
}

/// The aggregator's clock readings in one answer about one second.
struct Answer {
    second: i64,
    made_ms: i64,
    received_ms: i64,
}

impl From<&pb::Ack> for Answer {
    fn from(ack: &pb::Ack) -> Self {
        Self {
            second: ack.second,
            made_ms: ack.aggregator_unix_ms,
            received_ms: ack.received_unix_ms,
        }
    }
}

impl Answer {
    /// A refusal is made as its snapshot is read.
    fn refusal(r: &pb::Rejection) -> Self {
        Self {
            second: r.second,
            made_ms: r.aggregator_unix_ms,
            received_ms: r.aggregator_unix_ms,
        }
    }
}

/// Takes the aggregator's clock readings from an answer. When the agent's applied offset changes, held seconds move
/// to the new clock; returns whether any did (they must be sent again).
fn follow_clock(config: &ShipperConfig, buffer: &mut ReplayBuffer, answer: &Answer) -> bool {
    let before = config.clock.offset_ms();
    let sent = buffer.first_sent(answer.second);
    let Some(offset) =
        config
            .clock
            .observe_aggregator(answer.made_ms, Some(answer.received_ms), sent)
    else {
        return false;
    };
    warn!(
        message = "This machine's clock differs from the aggregator's; windows now follow the aggregator's.",
        offset_ms = offset
    );
    let moved = buffer.restamp_held(offset - before);
    if moved > 0 {
        info!(
            message = "Seconds refused as ahead of the aggregator moved to its clock; sending them again.",
            seconds = moved
        );
    }
    moved > 0
}

/// Opens a connection to the aggregator at `target`.
pub async fn connect(config: &ShipperConfig, target: &str) -> Option<Channel> {
    let endpoint = match Endpoint::from_shared(target.to_owned()) {
        Ok(e) => e
            .connect_timeout(config.connect_timeout)
            .http2_keep_alive_interval(config.keepalive_interval)
            .keep_alive_timeout(config.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .initial_connection_window_size(strobe_proto::HTTP2_CONNECTION_WINDOW)
            .initial_stream_window_size(strobe_proto::HTTP2_STREAM_WINDOW),
        Err(error) => {
            warn!(message = "Invalid aggregator address.", address = %target, %error);
            return None;
        }
    };
    let endpoint = if target.starts_with("https://") {
        // Read at every connection, so renewed certificates are picked up on the next reconnect.
        match client_tls(config).and_then(|tls| endpoint.tls_config(tls).map_err(|e| e.to_string()))
        {
            Ok(endpoint) => endpoint,
            Err(error) => {
                warn!(message = "TLS to the aggregator not set up.", address = %target, %error);
                return None;
            }
        }
    } else {
        endpoint
    };
    match endpoint.connect().await {
        Ok(c) => Some(c),
        Err(error) => {
            debug!(message = "Connection failed.", address = %target, %error);
            None
        }
    }
}

/// TLS towards the aggregator: its CA (or the public web roots), and a client certificate when configured.
fn client_tls(config: &ShipperConfig) -> Result<tonic::transport::ClientTlsConfig, String> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut tls = tonic::transport::ClientTlsConfig::new();
    tls = match &config.ca_cert {
        Some(path) => tls.ca_certificate(tonic::transport::Certificate::from_pem(read(path)?)),
        None => tls.with_webpki_roots(),
    };
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        (None, None) => {}
        _ => return Err("a client certificate needs both tls_cert and tls_key".into()),
    }
    Ok(tls)
}

/// Writes a series' name and tags into `key` (cleared first) as one string: the key a series dictionary knows it by.
pub fn spell_into(key: &mut String, series: &pb::Series) {
    key.clear();
    key.push_str(&series.name);
    for tag in &series.tags {
        key.push('\0');
        key.push_str(&tag.key);
        key.push('\0');
        key.push_str(&tag.value);
    }
}

/// One stream's series dictionary (see `strobe.proto`): the series it has named, by id. It lives and dies with
/// its stream, so a reconnect or a redirect names every series again.
#[derive(Debug)]
struct SeriesDictionary {
    /// Keyed by the series' spelling; foldhash, randomly seeded (SipHash showed in the load generator's profile,
    /// which runs this shipper).
    ids: std::collections::HashMap<String, u32, foldhash::fast::RandomState>,
    limit: usize,
    /// Reused to spell a series' name and tags as one lookup key, without allocating.
    spelling: String,
    /// Series registered up front (ids 1 to their count; the others' ids follow)...
    registered: RegisteredSeries,
    /// ...and which of them this stream has named.
    taught: Vec<bool>,
    /// Where snapshots are encoded (each split off when done).
    buf: BytesMut,
    /// Reused: each series' encoded length in the snapshot being encoded.
    lengths: Vec<usize>,
    /// Reused: how each series of it goes.
    namings: Vec<Naming>,
}

/// How one series goes on a stream.
#[derive(Debug, Clone, Copy)]
enum Naming {
    /// By dictionary id alone.
    Id(u32),
    /// Named as the registered series at this index (0-based), with this id (0: none).
    Registered { index: usize, id: u32 },
    /// Named as it names itself, with this id (0: none).
    Own { id: u32 },
}

/// Field numbers (`strobe.proto`).
const AGENT_MESSAGE_SNAPSHOT: u32 = 2;
const SNAPSHOT_SECOND: u32 = 1;
const SNAPSHOT_SERIES: u32 = 2;
const SNAPSHOT_STATS: u32 = 3;
const SERIES_NAME: u32 = 1;
const SERIES_TAGS: u32 = 2;
const SERIES_ID: u32 = 6;

/// A series' encoded length: `name` and `tags` (empty: not named), its value, `id` (0: none).
fn series_len(name: &str, tags: &[pb::Tag], value: Option<&pb::series::Value>, id: u32) -> usize {
    let mut len = prost::encoding::message::encoded_len_repeated(SERIES_TAGS, tags)
        + value.map_or(0, |v| v.encoded_len());
    if !name.is_empty() {
        len += key_len(SERIES_NAME) + encoded_len_varint(name.len() as u64) + name.len();
    }
    if id != 0 {
        len += key_len(SERIES_ID) + encoded_len_varint(u64::from(id));
    }
    len
}

/// Encodes a series' fields as prost does (in field number order, defaults left out).
fn encode_series(
    name: &str,
    tags: &[pb::Tag],
    value: Option<&pb::series::Value>,
    id: u32,
    buf: &mut BytesMut,
) {
    if !name.is_empty() {
        encode_key(SERIES_NAME, WireType::LengthDelimited, buf);
        encode_varint(name.len() as u64, buf);
        buf.extend_from_slice(name.as_bytes());
    }
    for tag in tags {
        prost::encoding::message::encode(SERIES_TAGS, tag, buf);
    }
    if let Some(value) = value {
        value.encode(buf);
    }
    if id != 0 {
        encode_key(SERIES_ID, WireType::Varint, buf);
        encode_varint(u64::from(id), buf);
    }
}

impl SeriesDictionary {
    fn new(limit: usize, registered: RegisteredSeries) -> Self {
        Self {
            ids: std::collections::HashMap::default(),
            limit,
            spelling: String::new(),
            taught: vec![false; registered.len()],
            registered,
            buf: BytesMut::new(),
            lengths: Vec::new(),
            namings: Vec::new(),
        }
    }

    /// How `series` goes on this stream: by id alone if it was named before; otherwise named, and given an id
    /// (while the dictionary has room), which counts as naming it.
    fn naming(&mut self, series: &pb::Series) -> Naming {
        if let Some((id, _)) = self.registered.lookup(series) {
            let by_id = id <= self.limit;
            if by_id && self.taught[id - 1] {
                return Naming::Id(id as u32);
            }
            if by_id {
                self.taught[id - 1] = true;
            }
            return Naming::Registered {
                index: id - 1,
                id: if by_id { id as u32 } else { 0 },
            };
        }
        spell_into(&mut self.spelling, series);
        if let Some(id) = self.ids.get(self.spelling.as_str()) {
            return Naming::Id(*id);
        }
        let next = self.registered.len() + self.ids.len() + 1;
        // An unnamed series (a number nobody registered) gets no id: the aggregator refuses it as it is.
        if next <= self.limit && !series.name.is_empty() {
            let id = u32::try_from(next).unwrap_or(0);
            self.ids.insert(self.spelling.clone(), id);
            return Naming::Own { id };
        }
        Naming::Own { id: 0 }
    }

    /// Name, tags and id of a series that goes as `naming`.
    fn parts<'a>(
        &'a self,
        naming: Naming,
        series: &'a pb::Series,
    ) -> (&'a str, &'a [pb::Tag], u32) {
        match naming {
            Naming::Id(id) => ("", &[], id),
            Naming::Registered { index, id } => {
                let known = &self.registered.names[index];
                (&known.name, &known.tags, id)
            }
            Naming::Own { id } => (&series.name, &series.tags, id),
        }
    }

    /// The snapshot as this stream sends it (series it named before by id alone, new ones named and given an id
    /// while the dictionary has room), encoded as an `AgentMessage` straight from `snapshot`: the bytes prost makes
    /// of that message, without building it (which cloned every series' value) or measuring it twice.
    fn encode(&mut self, snapshot: &pb::Snapshot) -> Encoded {
        let mut namings = std::mem::take(&mut self.namings);
        namings.clear();
        namings.extend(snapshot.series.iter().map(|s| self.naming(s)));
        let mut lengths = std::mem::take(&mut self.lengths);
        lengths.clear();
        let mut body = 0usize;
        if snapshot.second != 0 {
            body += key_len(SNAPSHOT_SECOND) + encoded_len_varint(snapshot.second as u64);
        }
        for (series, naming) in snapshot.series.iter().zip(&namings) {
            let (name, tags, id) = self.parts(*naming, series);
            let len = series_len(name, tags, series.value.as_ref(), id);
            body += key_len(SNAPSHOT_SERIES) + encoded_len_varint(len as u64) + len;
            lengths.push(len);
        }
        if let Some(stats) = &snapshot.stats {
            body += prost::encoding::message::encoded_len(SNAPSHOT_STATS, stats);
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.reserve(key_len(AGENT_MESSAGE_SNAPSHOT) + encoded_len_varint(body as u64) + body);
        encode_key(AGENT_MESSAGE_SNAPSHOT, WireType::LengthDelimited, &mut buf);
        encode_varint(body as u64, &mut buf);
        if snapshot.second != 0 {
            encode_key(SNAPSHOT_SECOND, WireType::Varint, &mut buf);
            encode_varint(snapshot.second as u64, &mut buf);
        }
        for ((series, naming), len) in snapshot.series.iter().zip(&namings).zip(&lengths) {
            let (name, tags, id) = self.parts(*naming, series);
            encode_key(SNAPSHOT_SERIES, WireType::LengthDelimited, &mut buf);
            encode_varint(*len as u64, &mut buf);
            encode_series(name, tags, series.value.as_ref(), id, &mut buf);
        }
        if let Some(stats) = &snapshot.stats {
            prost::encoding::message::encode(SNAPSHOT_STATS, stats, &mut buf);
        }
        let encoded = Encoded(buf.split().freeze());
        (self.buf, self.lengths, self.namings) = (buf, lengths, namings);
        encoded
    }

    /// What the aggregator reads of [`Self::encode`]'s message (tests).
    #[cfg(test)]
    fn compact(&mut self, snapshot: &pb::Snapshot) -> pb::Snapshot {
        let encoded = self.encode(snapshot);
        match pb::AgentMessage::decode(encoded.0) {
            Ok(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Snapshot(snapshot)),
            }) => snapshot,
            other => panic!("not a snapshot: {other:?}"),
        }
    }
}

/// Drops series from the end until the encoded snapshot fits in `max_bytes` (registered series counted as named,
/// as a new stream sends them), counting them as over the limit.
fn fit_to_limit(snapshot: &mut pb::Snapshot, max_bytes: usize, registered: &RegisteredSeries) {
    // Each series may also carry a dictionary id (a key byte and up to five of varint).
    const ID_BYTES: usize = 6;
    let mut len = snapshot.encoded_len()
        + registered.naming_bytes(snapshot)
        + ID_BYTES * snapshot.series.len();
    // Room for the message wrapper (a key and a length) and the counters this function adds to the stats (a
    // varint of at most 10 bytes plus its key).
    let budget = max_bytes.saturating_sub(32);
    if len <= budget {
        return;
    }
    let mut dropped = 0u64;
    while len > budget {
        let Some(series) = snapshot.series.pop() else {
            break;
        };
        // A repeated field element costs its key byte, its length prefix and its body.
        let body = series.encoded_len();
        let naming = registered
            .lookup(&series)
            .map_or(0, |(id, _)| registered.naming_bytes[id - 1]);
        len = len.saturating_sub(
            1 + prost::encoding::encoded_len_varint(body as u64) + body + naming + ID_BYTES,
        );
        dropped += 1;
    }
    if dropped > 0 {
        warn!(
            message = "Snapshot over the message size limit; series dropped.",
            dropped,
            limit = max_bytes
        );
        if let Some(stats) = snapshot.stats.as_mut() {
            stats.series_over_limit += dropped;
        }
    }
}

/// Exponential backoff with full jitter: uniform in `[min, min(max, min * 2^failures)]`.
fn backoff_delay(config: &ShipperConfig, failures: u32) -> Duration {
    let min = config.backoff_min.as_secs_f64();
    let cap = config
        .backoff_max
        .as_secs_f64()
        .min(min * 2f64.powi(failures.min(30) as i32))
        .max(min);
    Duration::from_secs_f64(rand::rng().random_range(min..=cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(second: i64) -> pb::Snapshot {
        pb::Snapshot {
            second,
            series: vec![],
            stats: Some(pb::AgentStats::default()),
        }
    }

    fn named(name: &str, tags: &[(&str, &str)], v: f64) -> pb::Series {
        pb::Series {
            name: name.into(),
            tags: tags
                .iter()
                .map(|(k, v)| pb::Tag {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            id: 0,
            value: Some(pb::series::Value::Counter(v)),
        }
    }

    /// On random snapshots over a stream's life (registered series, named ones, unnamed ones, every kind of value,
    /// with and without stats, negative seconds, a dictionary that fills up), the shipper's encoding is exactly the
    /// bytes prost makes of the message it decodes to, and that message carries the original values in order.
    #[test]
    fn snapshots_encode_as_prost_encodes_what_they_decode_to() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let registered = RegisteredSeries::new(
            (0..20).map(|i| named(&format!("reg{i}"), &[("route", &format!("/r{i}"))], 0.0)),
        );
        for limit in [0, 25, 1000] {
            let mut stream = SeriesDictionary::new(limit, registered.clone());
            for round in 0..200 {
                let series = (0..rng.random_range(0..40))
                    .map(|_| {
                        let value = match rng.random_range(0..4) {
                            0 => None,
                            1 => Some(pb::series::Value::Counter(rng.random_range(-5.0..5.0))),
                            2 => Some(pb::series::Value::Gauge(0.0)),
                            _ => Some(pb::series::Value::Histogram(pb::Histogram {
                                hdr_v2: (0..rng.random_range(0..300))
                                    .map(|_| rng.random())
                                    .collect(),
                                scale: rng.random_range(0..3),
                                unit: if rng.random_bool(0.5) {
                                    "ms".into()
                                } else {
                                    String::new()
                                },
                            })),
                        };
                        let mut series = match rng.random_range(0..3) {
                            // A registered one by number, or a number nobody registered.
                            0 => pb::Series {
                                id: rng.random_range(1..25),
                                ..pb::Series::default()
                            },
                            1 => named(
                                &format!("own{}", rng.random_range(0..30)),
                                &[("code", "2xx")],
                                0.0,
                            ),
                            _ => named("", &[], 0.0),
                        };
                        series.value = value;
                        series
                    })
                    .collect();
                let snapshot = pb::Snapshot {
                    second: if round % 7 == 0 { -round } else { round * 1000 },
                    series,
                    stats: rng.random_bool(0.5).then(|| pb::AgentStats {
                        lines_received: rng.random_range(0..1_000_000),
                        ..pb::AgentStats::default()
                    }),
                };
                let encoded = stream.encode(&snapshot).0;
                let decoded = pb::AgentMessage::decode(encoded.clone()).expect("decodes");
                assert_eq!(
                    encoded,
                    decoded.encode_to_vec(),
                    "round {round}, limit {limit}"
                );
                let Some(pb::agent_message::Body::Snapshot(decoded)) = decoded.body else {
                    panic!("not a snapshot");
                };
                assert_eq!(
                    (decoded.second, decoded.stats),
                    (snapshot.second, snapshot.stats)
                );
                let values =
                    |s: &pb::Snapshot| s.series.iter().map(|s| s.value.clone()).collect::<Vec<_>>();
                assert_eq!(values(&decoded), values(&snapshot));
            }
        }
    }

    #[test]
    fn a_stream_names_each_series_once_and_a_new_stream_names_them_again() {
        let snapshot = pb::Snapshot {
            second: 10,
            series: vec![
                named("req", &[("route", "/a")], 1.0),
                named("req", &[("route", "/b")], 2.0),
                named("req", &[], 3.0),
            ],
            stats: None,
        };
        let mut stream = SeriesDictionary::new(100, RegisteredSeries::default());
        let first = stream.compact(&snapshot);
        let ids: Vec<u32> = first.series.iter().map(|s| s.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(first.series.iter().all(|s| s.name == "req"));
        let second = stream.compact(&snapshot);
        for (s, id) in second.series.iter().zip(&ids) {
            assert_eq!((s.name.as_str(), s.tags.len(), s.id), ("", 0, *id));
        }
        assert_eq!(
            second.series[1].value,
            Some(pb::series::Value::Counter(2.0))
        );
        // A reconnect or a redirect is a new stream: everything is named again.
        let mut reconnected = SeriesDictionary::new(100, RegisteredSeries::default());
        assert_eq!(reconnected.compact(&snapshot), first);
        // Past its limit, a dictionary sends new series named, without an id.
        let mut small = SeriesDictionary::new(1, RegisteredSeries::default());
        let limited = small.compact(&snapshot);
        assert_eq!(
            limited.series.iter().map(|s| s.id).collect::<Vec<_>>(),
            [1, 0, 0]
        );
        assert_eq!(small.compact(&snapshot).series[2].name, "req");
    }

    #[test]
    fn registered_series_are_named_once_per_stream_with_their_own_ids() {
        let registered = RegisteredSeries::new([
            named("req", &[("route", "/a")], 0.0),
            named("lat", &[("route", "/a")], 0.0),
        ]);
        let by_number = |id: u32, v: f64| pb::Series {
            id,
            ..named("", &[], v)
        };
        let snapshot = pb::Snapshot {
            second: 10,
            series: vec![
                by_number(2, 5.0),
                named("other", &[], 1.0),
                by_number(1, 7.0),
                // Out of range: an unnamed series like any other (which the aggregator refuses), never another's.
                by_number(9, 1.0),
            ],
            stats: None,
        };
        let mut stream = SeriesDictionary::new(100, registered.clone());
        let first = stream.compact(&snapshot);
        let spelled: Vec<(&str, u32)> = first
            .series
            .iter()
            .map(|s| (s.name.as_str(), s.id))
            .collect();
        // Registered series keep their numbers; the others' ids follow them.
        assert_eq!(spelled, [("lat", 2), ("other", 3), ("req", 1), ("", 0)]);
        assert_eq!(first.series[0].tags, registered.names[1].tags);
        assert_eq!(first.series[0].value, Some(pb::series::Value::Counter(5.0)));
        let second = stream.compact(&snapshot);
        for (s, id) in second.series.iter().zip([2, 3, 1, 0]) {
            assert_eq!((s.name.as_str(), s.tags.len(), s.id), ("", 0, id));
        }
        assert_eq!(
            second.series[2].value,
            Some(pb::series::Value::Counter(7.0))
        );
        // A new stream names them again; past the dictionary's limit they go named, without an id.
        let mut reconnected = SeriesDictionary::new(100, registered.clone());
        assert_eq!(reconnected.compact(&snapshot), first);
        let mut small = SeriesDictionary::new(1, registered.clone());
        let limited = small.compact(&snapshot);
        assert_eq!(
            limited
                .series
                .iter()
                .map(|s| (s.name.as_str(), s.id))
                .collect::<Vec<_>>(),
            [("lat", 0), ("other", 0), ("req", 1), ("", 0)]
        );
        // The size limit counts registered series as named.
        let mut big = pb::Snapshot {
            second: 1,
            series: (0..100).map(|_| by_number(1, 1.0)).collect(),
            stats: Some(pb::AgentStats::default()),
        };
        let named_len = SeriesDictionary::new(0, registered.clone())
            .compact(&big)
            .encoded_len();
        fit_to_limit(&mut big, named_len / 2, &registered);
        let kept = SeriesDictionary::new(0, registered.clone()).compact(&big);
        assert!(
            kept.encoded_len() <= named_len / 2,
            "{}",
            kept.encoded_len()
        );
        assert!(big.series.len() > 10);
    }

    #[test]
    fn replay_buffer_drops_oldest_and_acks_cumulatively() {
        let mut report = ShipperReport::default();
        let mut buffer = ReplayBuffer::new(3, None);
        for s in 1..=5 {
            buffer.push(snap(s), &mut report);
        }
        assert_eq!(report.dropped, 2);
        let kept: Vec<i64> = buffer.snapshots.iter().map(|s| s.second).collect();
        assert_eq!(kept, [3, 4, 5]);
        assert_eq!(buffer.ack(4), 2);
        assert_eq!(buffer.snapshots.front().map(|s| s.second), Some(5));
    }

    #[test]
    fn held_seconds_survive_acks_move_with_the_clock_and_refused_ones_go() {
        let mut report = ShipperReport::default();
        let mut buffer = ReplayBuffer::new(100, None);
        for s in [110, 111, 112, 113] {
            buffer.push(snap(s), &mut report);
        }
        // 110 and 111 are refused for now (ahead), 112 for good.
        buffer.held.extend([110, 111]);
        assert!(buffer.refused(112));
        assert!(!buffer.refused(112), "only once");
        assert_eq!(
            buffer.ack(200),
            1,
            "a cumulative ack passes over held seconds"
        );
        // The clock turns out 10.2 s ahead: held seconds move back 10 and are kept to be sent again.
        assert_eq!(buffer.restamp_held(-10_200), 2);
        let kept: Vec<i64> = buffer.snapshots.iter().map(|s| s.second).collect();
        assert_eq!(kept, [100, 101]);
        assert!(buffer.held.is_empty());
        assert_eq!(
            buffer.restamp_held(-10_000),
            0,
            "nothing held, nothing moves"
        );
        assert_eq!(buffer.ack(101), 2);
        // A held second sent again and acknowledged goes like any other (held, it would stay for good).
        buffer.push(snap(120), &mut report);
        buffer.push(snap(121), &mut report);
        buffer.held.insert(120);
        assert_eq!(buffer.ack(121), 1, "121 goes, held 120 stays");
        assert_eq!(buffer.ack(120), 1, "120 acknowledged goes");
        assert!(buffer.held.is_empty() && buffer.snapshots.is_empty());
    }

    /// Held seconds sent again on a new stream are in flight until answered, like any other: a clock far ahead
    /// with many held seconds still puts only `max_seconds_in_flight` on the wire at once.
    #[test]
    fn held_seconds_sent_again_count_as_in_flight_until_answered() {
        let mut report = ShipperReport::default();
        let mut buffer = ReplayBuffer::new(100, None);
        for s in 1..=10 {
            buffer.push(snap(s), &mut report);
        }
        buffer.held.extend(1..=10);
        buffer.new_stream();
        let send = |buffer: &mut ReplayBuffer| -> Vec<i64> {
            let due: Vec<i64> = buffer.due(3).map(|s| s.second).collect();
            buffer.sent.extend(&due);
            due
        };
        assert_eq!(send(&mut buffer), [1, 2, 3]);
        assert!(send(&mut buffer).is_empty(), "three in flight, held or not");
        // Refused for now again: answered, and not sent again on this stream.
        buffer.hold(1);
        assert_eq!(send(&mut buffer), [4]);
        // 3 acknowledged; held 2 stays, in flight until its own answer.
        assert_eq!(buffer.ack(3), 1);
        assert_eq!(send(&mut buffer), [5]);
        buffer.new_stream();
        assert_eq!(send(&mut buffer), [1, 2, 4]);
    }

    #[test]
    fn oversized_snapshots_are_trimmed_to_the_limit() {
        let mut s = snap(1);
        for i in 0..1000 {
            s.series.push(pb::Series {
                name: format!("metric.number.{i}"),
                tags: vec![],
                id: 0,
                value: Some(pb::series::Value::Counter(1.0)),
            });
        }
        fit_to_limit(&mut s, 4096, &RegisteredSeries::default());
        assert!(s.encoded_len() <= 4096);
        assert!(!s.series.is_empty());
        assert_eq!(
            s.stats.unwrap().series_over_limit,
            1000 - s.series.len() as u64
        );
    }

    #[test]
    fn backoff_stays_within_bounds_at_every_failure_count() {
        let config = ShipperConfig::default();
        for failures in 0..40 {
            let d = backoff_delay(&config, failures);
            assert!(
                d >= config.backoff_min && d <= config.backoff_max,
                "{failures}: {d:?}"
            );
        }
    }

    /// A real gRPC server that reads every stream at once but answers its opening only when told (as an aggregator
    /// does seconds later when thousands of agents reconnect at once). Returns the server and what tells it to
    /// answer.
    async fn slow_to_answer() -> (WhenTold, Arc<tokio::sync::Notify>) {
        let opening = Arc::new(tokio::sync::Notify::new());
        (answering_when_told(0, Some(opening.clone())).await, opening)
    }

    fn shipping_to(address: std::net::SocketAddr) -> (pb::Identity, ShipperConfig) {
        let config = ShipperConfig {
            aggregator: format!("http://{address}"),
            ..ShipperConfig::default()
        };
        let identity = pb::Identity {
            service: "svc".into(),
            instance: "i-1".into(),
            ..Default::default()
        };
        (identity, config)
    }

    /// While a stream waits for its opening to be answered, the seconds that close are taken from the agent's
    /// queue as they come and sent, not left in it to overflow.
    #[tokio::test]
    async fn seconds_closing_while_a_stream_opens_are_taken_and_sent() {
        let (server, answer) = slow_to_answer().await;
        let (address, mut read) = (server.address, server.read);
        let (identity, mut config) = shipping_to(address);
        // Nothing is answered here: room for all nine seconds on the wire.
        config.max_seconds_in_flight = 9;
        // A queue of one: the next second fits only once the shipper has taken the last.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(run_shipper(identity, config, rx));
        let within = Duration::from_secs(20);
        for second in 1..=8 {
            tx.send(snap(second)).await.unwrap();
            let got = tokio::time::timeout(within, read.recv())
                .await
                .unwrap_or_else(|_| panic!("second {second} not sent while the stream opens"));
            assert_eq!(got, Some(second));
        }
        // Answered at last: the stream goes on.
        answer.notify_one();
        tx.send(snap(9)).await.unwrap();
        let got = tokio::time::timeout(within, read.recv()).await.unwrap();
        assert_eq!(got, Some(9));
    }

    /// Shutting down while the opening is never answered: the shipper waits no longer than its drain timeout, and
    /// reports what it could not have acknowledged as lost.
    #[tokio::test]
    async fn shutdown_while_a_stream_opens_waits_no_longer_than_the_drain() {
        let (server, _never) = slow_to_answer().await;
        let (address, mut read) = (server.address, server.read);
        let (identity, mut config) = shipping_to(address);
        config.drain_timeout = Duration::from_millis(200);
        let (tx, rx) = mpsc::channel(1);
        let shipper = tokio::spawn(run_shipper(identity, config, rx));
        tx.send(snap(1)).await.unwrap();
        assert_eq!(read.recv().await, Some(1));
        drop(tx);
        let report = tokio::time::timeout(Duration::from_secs(20), shipper)
            .await
            .expect("the shipper stops once the drain is over")
            .unwrap();
        assert_eq!((report.acknowledged, report.dropped), (0, 1));
    }

    /// A real gRPC server that refuses its first `refuse` streams, then reports the `replay_through` of each hello
    /// and every second it reads, answers a stream's opening only once `opening` (if any) says so, and answers
    /// only what the test tells it to (on one stream).
    struct WhenTold {
        address: std::net::SocketAddr,
        hellos: mpsc::UnboundedReceiver<i64>,
        read: mpsc::UnboundedReceiver<i64>,
        answer: mpsc::UnboundedSender<pb::aggregator_message::Body>,
    }

    async fn answering_when_told(
        refuse: usize,
        opening: Option<Arc<tokio::sync::Notify>>,
    ) -> WhenTold {
        use std::pin::Pin;
        use tokio_stream::Stream;
        use tonic::{Request, Response, Status, Streaming};

        use tokio_stream::StreamExt as _;

        type Answers = mpsc::UnboundedReceiver<pb::aggregator_message::Body>;
        struct Server {
            refuse: std::sync::atomic::AtomicUsize,
            opening: Option<Arc<tokio::sync::Notify>>,
            hellos: mpsc::UnboundedSender<i64>,
            read: mpsc::UnboundedSender<i64>,
            answers: std::sync::Mutex<Option<Answers>>,
        }
        #[tonic::async_trait]
        impl pb::ingest_server::Ingest for Server {
            type StreamStream =
                Pin<Box<dyn Stream<Item = Result<pb::AggregatorMessage, Status>> + Send>>;
            async fn stream(
                &self,
                request: Request<Streaming<pb::AgentMessage>>,
            ) -> Result<Response<Self::StreamStream>, Status> {
                use std::sync::atomic::Ordering::Relaxed;
                if self
                    .refuse
                    .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(Status::unavailable("not yet"));
                }
                let mut inbound = request.into_inner();
                let (hellos, read) = (self.hellos.clone(), self.read.clone());
                tokio::spawn(async move {
                    while let Ok(Some(message)) = inbound.message().await {
                        match message.body {
                            Some(pb::agent_message::Body::Hello(h)) => {
                                hellos.send(h.replay_through).ok();
                            }
                            Some(pb::agent_message::Body::Snapshot(s)) => {
                                read.send(s.second).ok();
                            }
                            None => {}
                        }
                    }
                });
                if let Some(opening) = &self.opening {
                    opening.notified().await;
                }
                let answers = self.answers.lock().unwrap().take().expect("one stream");
                let answers = tokio_stream::wrappers::UnboundedReceiverStream::new(answers)
                    .map(|body| Ok(pb::AggregatorMessage { body: Some(body) }));
                Ok(Response::new(Box::pin(answers)))
            }
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (hellos_tx, hellos) = mpsc::unbounded_channel();
        let (read_tx, read) = mpsc::unbounded_channel();
        let (answer, answers) = mpsc::unbounded_channel();
        let server = tonic::transport::Server::builder()
            .add_service(pb::ingest_server::IngestServer::new(Server {
                refuse: refuse.into(),
                opening,
                hellos: hellos_tx,
                read: read_tx,
                answers: std::sync::Mutex::new(Some(answers)),
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        WhenTold {
            address,
            hellos,
            read,
            answer,
        }
    }

    fn ack(second: i64) -> pb::aggregator_message::Body {
        pb::aggregator_message::Body::Ack(pb::Ack {
            second,
            aggregator_unix_ms: strobe_proto::clock::unix_millis(),
            received_unix_ms: 0,
        })
    }

    /// Reads what the server reads next within a while; None if it read nothing more.
    async fn next_read(read: &mut mpsc::UnboundedReceiver<i64>, within: Duration) -> Option<i64> {
        tokio::time::timeout(within, read.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next `n` seconds the server reads (fewer if it reads nothing more within a while).
    async fn next_reads(
        read: &mut mpsc::UnboundedReceiver<i64>,
        n: usize,
        within: Duration,
    ) -> Vec<i64> {
        let mut got = Vec::new();
        for _ in 0..n {
            got.extend(next_read(read, within).await);
        }
        got
    }

    /// A shipper to `address` with at most three seconds in flight, seconds 1 to 10 already closed; the sender of
    /// its next seconds.
    async fn ten_seconds_three_in_flight(
        address: std::net::SocketAddr,
    ) -> mpsc::Sender<pb::Snapshot> {
        let (identity, mut config) = shipping_to(address);
        config.max_seconds_in_flight = 3;
        let (tx, rx) = mpsc::channel(16);
        for second in 1..=10 {
            tx.send(snap(second)).await.unwrap();
        }
        tokio::spawn(run_shipper(identity, config, rx));
        tx
    }

    /// A backlog goes out `max_seconds_in_flight` seconds at a time, oldest first, and the next ones as answers
    /// (acknowledgements and refusals) come; a second refused for now no longer counts as in flight.
    #[tokio::test]
    async fn a_backlog_goes_out_a_few_seconds_at_a_time_as_answers_come() {
        let WhenTold {
            address,
            mut read,
            answer,
            ..
        } = answering_when_told(0, None).await;
        let tx = ten_seconds_three_in_flight(address).await;
        let (within, quiet) = (Duration::from_secs(20), Duration::from_millis(300));
        assert_eq!(next_reads(&mut read, 3, within).await, [1, 2, 3]);
        assert_eq!(
            next_read(&mut read, quiet).await,
            None,
            "three in flight, no answer yet"
        );
        // Two answered (acknowledgements cover what is older): two more go.
        answer.send(ack(2)).unwrap();
        assert_eq!(next_read(&mut read, within).await, Some(4));
        assert_eq!(next_read(&mut read, within).await, Some(5));
        assert_eq!(
            next_read(&mut read, quiet).await,
            None,
            "3, 4 and 5 in flight"
        );
        // Refused for good, and refused for now (kept, to send again later): each makes room for one more.
        let rejection = |second, retry| {
            pb::aggregator_message::Body::Rejection(pb::Rejection {
                second,
                whole_snapshot: true,
                retry,
                aggregator_unix_ms: strobe_proto::clock::unix_millis(),
                ..Default::default()
            })
        };
        answer.send(rejection(3, false)).unwrap();
        assert_eq!(next_read(&mut read, within).await, Some(6));
        answer.send(rejection(4, true)).unwrap();
        assert_eq!(next_read(&mut read, within).await, Some(7));
        assert_eq!(
            next_read(&mut read, quiet).await,
            None,
            "5, 6 and 7 in flight"
        );
        // A new second waits behind the backlog; the last acknowledgement lets the rest go, oldest first.
        tx.send(snap(11)).await.unwrap();
        assert_eq!(
            next_read(&mut read, quiet).await,
            None,
            "still three in flight"
        );
        answer.send(ack(7)).unwrap();
        assert_eq!(next_reads(&mut read, 3, within).await, [8, 9, 10]);
        answer.send(ack(10)).unwrap();
        assert_eq!(next_read(&mut read, within).await, Some(11));
    }

    /// After a reconnect the backlog is replayed the same way: the hello says how far it goes, and only the oldest
    /// `max_seconds_in_flight` of it go until answers come.
    #[tokio::test]
    async fn a_replay_after_a_reconnect_goes_out_a_few_seconds_at_a_time() {
        let WhenTold {
            address,
            mut hellos,
            mut read,
            answer,
        } = answering_when_told(1, None).await;
        // Kept open: a closed input would be the shipper's shutdown.
        let _input = ten_seconds_three_in_flight(address).await;
        let (within, quiet) = (Duration::from_secs(20), Duration::from_millis(300));
        // The first stream was refused before anything was read; the second replays what the agent kept.
        assert_eq!(next_read(&mut hellos, within).await, Some(10));
        assert_eq!(next_reads(&mut read, 3, within).await, [1, 2, 3]);
        assert_eq!(next_read(&mut read, quiet).await, None, "three in flight");
        answer.send(ack(3)).unwrap();
        assert_eq!(next_reads(&mut read, 3, within).await, [4, 5, 6]);
    }
}
