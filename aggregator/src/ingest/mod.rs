//! The gRPC ingest service: one bidirectional stream per agent. Validates the hello and each snapshot, hands the
//! snapshot to the shard that owns the service, and acknowledges it. Never waits on a subscriber.

pub(crate) mod validate;

use std::pin::Pin;
use std::sync::Arc;

use strobe_proto as pb;
use strobe_proto::clock;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::Tokens;
use crate::health::Health;
use crate::limits::Limits;
use crate::model::Instance;
use crate::model::table::SeriesTables;
use crate::pipeline::budget::{QueueBudget, StreamBudget};
use crate::pipeline::replays::{CatchUp, Replays, StreamReplay};
use crate::pipeline::service::STATE_LOST;
use crate::pipeline::shard::{ShardCommand, Shards};
use validate::{Refusal, StreamDictionary, validate_hello, validate_snapshot};

/// The tonic service behind `strobe.v1.Ingest`.
pub(crate) struct IngestService {
    /// Where snapshots go.
    pub(crate) shards: Shards,
    /// Input bounds.
    pub(crate) limits: Limits,
    /// Accepted agent tokens (empty: no check).
    pub(crate) agent_tokens: Arc<Tokens>,
    /// Counters.
    pub(crate) health: Arc<Health>,
    /// Owns every stream's task, so shutdown can wait for them.
    pub(crate) streams: TaskTracker,
    /// Bytes queued for the shards, per stream and in all.
    pub(crate) budget: QueueBudget,
    /// Each service's series table, shared by its streams.
    pub(crate) tables: Arc<SeriesTables>,
    /// Every service's agents replaying after a reconnect (the shards wait for them before sealing).
    pub(crate) replays: Arc<Replays>,
    /// When a replaying stream counts as caught up (see [`CatchUp`]).
    pub(crate) catch_up: CatchUp,
    /// The cluster, if any: who owns which service.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The alert manager (a service taken over brings its alerts).
    pub(crate) alerts: crate::alerting::alerts::Alerts,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::AggregatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    type StreamStream = Outbound;

    async fn stream(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream ended before the hello"))?;
        let Some(pb::agent_message::Body::Hello(hello)) = first.body else {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ));
        };
        let instance = match validate_hello(&hello, &self.limits, &self.agent_tokens) {
            Ok(instance) => Arc::new(instance),
            Err(refusal) => {
                self.health.count_dropped(refusal.reason(), 1);
                warn!(message = "Hello refused.", error = %refusal);
                return Err(match refusal {
                    Refusal::BadToken => Status::unauthenticated(refusal.to_string()),
                    Refusal::TokenNotForService(_) => {
                        Status::permission_denied(refusal.to_string())
                    }
                    _ => Status::invalid_argument(refusal.to_string()),
                });
            }
        };
        if let Some(cluster) = &self.cluster {
            use crate::cluster::Route;
            match cluster.route(&instance.service) {
                Route::Local => {
                    // Its alerts first (handed over by the node that had it), then its data.
                    if let Err(why) = cluster.adopt(&instance.service, &self.alerts).await {
                        self.health.cluster_refused.inc();
                        warn!(message = "Service not taken: its alert state could not be read.", service = %instance.service, %why);
                        return Err(Status::unavailable(why));
                    }
                    // Membership may have moved while its alerts were read.
                    if !cluster.keeps(&instance.service) {
                        self.alerts.disown(instance.service.clone());
                        cluster.forget(&instance.service);
                        return Err(Status::unavailable(
                            "the service moved to another node; reconnect",
                        ));
                    }
                    cluster.note_local(&instance.service);
                }
                Route::Remote(owner) => {
                    self.health.cluster_redirects.inc();
                    debug!(message = "Agent redirected to the service's owner.", service = %instance.service, owner = %owner.id);
                    let redirect = pb::AggregatorMessage {
                        body: Some(pb::aggregator_message::Body::Redirect(pb::Redirect {
                            service: instance.service.to_string(),
                            address: owner.grpc,
                        })),
                    };
                    let once: Outbound = Box::pin(tokio_stream::once(Ok(redirect)));
                    return Ok(Response::new(once));
                }
                Route::Unavailable(why) => {
                    self.health.cluster_refused.inc();
                    return Err(Status::unavailable(why));
                }
            }
        }
        info!(message = "Agent connected.", service = %instance.service, instance = %instance.id, version = %instance.version);
        let (tx, rx) = mpsc::channel(64);
        let mut stream = AgentStream {
            shard: self.shards.for_service(&instance.service),
            budget: self.budget.stream(),
            dictionary: StreamDictionary::new(self.tables.of(&instance.service)),
            replay: None,
        };
        if hello.replay_through > 0 {
            let book = self.replays.of(&instance.service);
            stream.replay = Some(
                StreamReplay::start(
                    book,
                    &instance.id,
                    hello.replay_through,
                    self.catch_up,
                    clock::unix_millis(),
                )
                .counted(
                    self.health.agent_streams_catching_up.clone(),
                    self.health.agent_streams_behind.clone(),
                ),
            );
        }
        let limits = self.limits.clone();
        let health = self.health.clone();
        let cluster = self.cluster.clone();
        let alerts = self.alerts.clone();
        self.streams.spawn(async move {
            health.agent_streams.inc();
            let result = serve_stream(
                inbound,
                &instance,
                &mut stream,
                &limits,
                &health,
                &tx,
                cluster.as_deref().map(|c| (c, &alerts)),
            )
            .await;
            health.agent_streams.dec();
            if let Err(status) = result {
                debug!(message = "Agent stream ended with an error.", instance = %instance.id, error = %status.message());
                // The agent may have gone already; then there is nobody to tell.
                tx.send(Err(status)).await.ok();
            } else {
                info!(message = "Agent disconnected.", service = %instance.service, instance = %instance.id);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What one agent stream holds on this side: where its snapshots go, its share of the queue, its dictionary.
struct AgentStream {
    shard: mpsc::Sender<ShardCommand>,
    budget: StreamBudget,
    dictionary: StreamDictionary,
    /// Where this stream, replaying (or catching up after it), notes how far it got.
    replay: Option<StreamReplay>,
}

async fn serve_stream(
    mut inbound: Streaming<pb::AgentMessage>,
    instance: &Arc<Instance>,
    stream: &mut AgentStream,
    limits: &Limits,
    health: &Health,
    tx: &mpsc::Sender<Result<pb::AggregatorMessage, Status>>,
    cluster: Option<(&crate::cluster::Cluster, &crate::alerting::alerts::Alerts)>,
) -> Result<(), Status> {
    // A stream whose service moved lets its agent go to the new owner only once this node's last alert state for
    // the service is handed over (or its wait is over), so that the new owner reads it.
    let moved_away = async |service: &Arc<str>| {
        if let Some((cluster, alerts)) = cluster
            && !cluster.keeps(service)
        {
            alerts.handed_over(service.clone()).await;
        }
    };
    let cluster = cluster.map(|(c, _)| c);
    let reply = |body| pb::AggregatorMessage { body: Some(body) };
    // In a cluster: the stream ends when its service moves to another node (the agent reconnects, is redirected,
    // and replays what was not acknowledged here).
    let mut moves = cluster.map(|c| c.changes());
    // The shard says here which of this stream's seconds are counted (sealed, or merged into a sealed second);
    // only those are acknowledged, so an aggregator that dies before a seal loses nothing the agent let go of.
    let (acker, mut counted) = mpsc::unbounded_channel::<i64>();
    let mut waiting: u64 = 0;
    // When each second waiting for its ack was read here: the agent's clock is checked against it.
    let mut received = clock::FirstSeen::new(RECEIVED_KEPT);
    // An ack, and whether this stream read that second (and still remembers when).
    let ack = |t: i64, received: &mut clock::FirstSeen| {
        let read_at = received.take(t);
        let answer = reply(pb::aggregator_message::Body::Ack(pb::Ack {
            second: t,
            aggregator_unix_ms: clock::unix_millis(),
            received_unix_ms: read_at.unwrap_or(0),
        }));
        (answer, read_at.is_some())
    };
    loop {
        let message = tokio::select! {
            // The sender is held right here, so this channel never closes while the loop runs.
            Some(t) = counted.recv() => {
                if t == STATE_LOST {
                    moved_away(&instance.service).await;
                    return Err(Status::unavailable(
                        "this service's state was lost here; reconnect and send again what is unacknowledged",
                    ));
                }
                // Every open stream of the instance hears of its sealed seconds (after a reconnect the old one may
                // have delivered last); only this stream's own count down what it waits for.
                let (answer, ours) = ack(t, &mut received);
                if ours {
                    waiting = waiting.saturating_sub(1);
                }
                send(tx, answer).await?;
                continue;
            }
            changed = async {
                match moves.as_mut() {
                    Some(moves) => moves.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if changed.is_err() {
                    moves = None; // the cluster stopped (shutdown)
                    continue;
                }
                if let Some(cluster) = cluster
                    && !cluster.keeps(&instance.service)
                {
                    // Read no more; acknowledge what the shard still seals here until it gives the service away
                    // (it says so with STATE_LOST), so that nothing counted here is sent again to the new owner.
                    let until = tokio::time::Instant::now() + LAST_ACKS_WAIT;
                    while let Ok(Some(t)) = tokio::time::timeout_at(until, counted.recv()).await {
                        if t == STATE_LOST {
                            break;
                        }
                        send(tx, ack(t, &mut received).0).await?;
                    }
                    moved_away(&instance.service).await;
                    return Err(Status::unavailable(
                        "this service moved to another node; reconnect and send again what is unacknowledged",
                    ));
                }
                continue;
            }
            message = inbound.message() => message?,
        };
        let Some(message) = message else { break };
        let snapshot = match message.body {
            Some(pb::agent_message::Body::Snapshot(s)) => s,
            Some(pb::agent_message::Body::Hello(_)) => {
                return Err(Status::invalid_argument("a stream has exactly one hello"));
            }
            None => continue,
        };
        let second = snapshot.second;
        received.note(second, clock::unix_millis());
        // While replaying (or catching up after it): how far this stream has read.
        let replaying = stream
            .replay
            .as_mut()
            .is_some_and(|r| r.read(second, clock::unix_millis()));
        // Reserved before validating, for what the decoded form holds (the histograms' bytes, within the encoded
        // size, and an entry per series): past this stream's share of the queue, this waits, and the agent's
        // stream with it.
        let reservation = stream
            .budget
            .reserve(validate::decoded_bytes(&snapshot))
            .await
            .ok_or_else(|| Status::unavailable("aggregator is shutting down"))?;
        match validate_snapshot(
            snapshot,
            instance,
            &mut stream.dictionary,
            limits,
            clock::unix_second(),
        ) {
            Err(refusal) => {
                // Nothing of it is queued: give its bytes back before waiting on the agent to read the answer.
                drop(reservation);
                // Never to be merged: sealing waits for it no longer (an agent whose clock is ahead replays
                // seconds that are all refused).
                if replaying && let Some(replay) = &stream.replay {
                    replay
                        .book
                        .merged(&instance.id, second, clock::unix_millis());
                }
                health.count_dropped(refusal.reason(), 1);
                let rejection = pb::Rejection {
                    second,
                    code: tonic::Code::InvalidArgument as i32,
                    limit: refusal.reason().as_str().to_owned(),
                    message: refusal.to_string(),
                    series_dropped: 0,
                    whole_snapshot: true,
                    retry: refusal.is_for_now(),
                    aggregator_unix_ms: clock::unix_millis(),
                };
                // Refused is never acknowledged: the agent drops it (or keeps it, with `retry`) on this answer.
                send(
                    tx,
                    reply(pb::aggregator_message::Body::Rejection(rejection)),
                )
                .await?;
                continue;
            }
            Ok(validated) => {
                // Queued first, so the reservation travels with it and is not held while the agent reads answers.
                stream
                    .shard
                    .send(ShardCommand::Snapshot(
                        validated.second,
                        reservation,
                        acker.clone(),
                    ))
                    .await
                    .map_err(|_| Status::unavailable("aggregator is shutting down"))?;
                waiting += 1;
                for (problem, n) in &validated.dropped {
                    health.count_dropped(problem.reason(), u64::from(*n));
                    let rejection = pb::Rejection {
                        second,
                        code: tonic::Code::InvalidArgument as i32,
                        limit: problem.reason().as_str().to_owned(),
                        message: problem.to_string(),
                        series_dropped: *n,
                        whole_snapshot: false,
                        retry: false,
                        aggregator_unix_ms: clock::unix_millis(),
                    };
                    send(
                        tx,
                        reply(pb::aggregator_message::Body::Rejection(rejection)),
                    )
                    .await?;
                }
            }
        }
    }
    // The agent has sent its last (it is shutting down): answer what gets counted, for as long as a second can
    // take to seal.
    while waiting > 0 {
        match tokio::time::timeout(LAST_ACKS_WAIT, counted.recv()).await {
            Ok(Some(t)) if t != STATE_LOST => {
                let (answer, ours) = ack(t, &mut received);
                if ours {
                    waiting -= 1;
                }
                send(tx, answer).await?;
            }
            _ => break,
        }
    }
    Ok(())
}

/// After an agent's last snapshot, how long its stream stays to acknowledge what is still being sealed.
const LAST_ACKS_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// How many of a stream's seconds waiting for their ack keep when they were read (the clock check needs the newest).
const RECEIVED_KEPT: usize = 64;

async fn send(
    tx: &mpsc::Sender<Result<pb::AggregatorMessage, Status>>,
    message: pb::AggregatorMessage,
) -> Result<(), Status> {
    tx.send(Ok(message))
        .await
        .map_err(|_| Status::cancelled("agent went away"))
}
