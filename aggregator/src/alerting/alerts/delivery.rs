//! Webhook delivery: one queue and one worker per target URL, so a target that hangs or fails never delays any
//! other. Each notification is retried with exponential backoff and jitter until a deadline; a 4xx answer (other
//! than 408 and 429) is final. Every outcome is logged and counted.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::payload::{self, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::alerting::escalation::{Step, redacted_url};
use crate::alerting::event::{AlertRecord, NotifyTransition};
use crate::alerting::rules::config::forbidden_host;
use crate::health::Health;

/// Timeouts and retry schedule of webhook delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// One attempt's limit, connection included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Give up on a notification this long after it was queued (time spent behind others counts).
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Most notifications waiting for one target; past it the oldest is dropped and counted
    /// (`strobe_webhook_dropped_total`).
    pub max_queued_per_target: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(5),
            deadline: Duration::from_secs(600),
            max_queued_per_target: 1000,
        }
    }
}

/// One message for one target.
#[derive(Debug, Clone)]
pub(crate) struct Notification {
    /// The alert as it is now.
    pub(crate) record: AlertRecord,
    /// What it announces.
    pub(crate) transition: NotifyTransition,
    /// The target.
    pub(crate) step: Step,
    /// Told once delivery is finished with it (delivered, refused, given up or dropped).
    pub(crate) on_settled: Option<OnSettled>,
}

/// A callback run once when delivery is finished with a notification, so the notification log can tell queued from
/// done.
#[derive(Clone)]
pub(crate) struct OnSettled(pub(crate) Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for OnSettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnSettled")
    }
}

impl Notification {
    fn settled(&self) {
        if let Some(hook) = &self.on_settled {
            (hook.0)();
        }
    }
}

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// The target took it (2xx).
    Delivered,
    /// The target refused it for good (4xx other than 408/429).
    Refused(String),
    /// Worth another try (5xx, 408, 429, timeout, connection error).
    Retry(String),
}

/// The result of all attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Delivered after this many attempts.
    Delivered(u32),
    /// Refused after this many attempts.
    Refused(u32, String),
    /// Still failing at the deadline after this many attempts.
    GaveUp(u32, String),
}

/// The delay before retry number `retry` (0-based): exponential from `retry_min`, capped at `retry_max`, with
/// "equal jitter" (between half and all of it) so that many senders do not retry in step.
pub(crate) fn retry_delay(retry: u32, settings: &DeliverySettings, jitter: f64) -> Duration {
    let base = (settings.retry_min.as_secs_f64() * 2f64.powi(retry.min(30) as i32))
        .min(settings.retry_max.as_secs_f64());
    Duration::from_secs_f64(base * (0.5 + 0.5 * jitter.clamp(0.0, 1.0)))
}

/// Runs `attempt` until it delivers, is refused, or `deadline` would pass before the next try (or has passed
/// already: then not at all).
pub(crate) async fn with_retries<F, Fut>(
    settings: &DeliverySettings,
    deadline: tokio::time::Instant,
    mut attempt: F,
) -> Outcome
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Attempt>,
{
    if tokio::time::Instant::now() >= deadline {
        return Outcome::GaveUp(0, "the deadline passed while it was queued".into());
    }
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt(tries).await {
            Attempt::Delivered => return Outcome::Delivered(tries),
            Attempt::Refused(reason) => return Outcome::Refused(tries, reason),
            Attempt::Retry(reason) => {
                let delay = retry_delay(tries - 1, settings, rand::rng().random());
                if tokio::time::Instant::now() + delay > deadline {
                    return Outcome::GaveUp(tries, reason);
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Per-target queues and their workers. The workers are owned here: dropping the deliverer stops them.
pub(crate) struct Deliverer {
    sender: Arc<Sender>,
    queues: Mutex<HashMap<String, Arc<TargetQueue>>>,
    workers: Mutex<JoinSet<()>>,
}

/// A notification and the deadline it was queued with.
type Queued = (tokio::time::Instant, Notification);

/// One target's waiting notifications, oldest first, at most `max_queued_per_target`: when full, the oldest is
/// dropped (and counted), so a target that comes back gets the newest state of things, `resolved` included.
#[derive(Default)]
struct TargetQueue {
    items: Mutex<std::collections::VecDeque<Queued>>,
    ready: tokio::sync::Notify,
}

impl TargetQueue {
    /// Queues `item`; returns the one dropped to make room, if any.
    fn push(&self, item: Queued, max: usize) -> Option<Queued> {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = (items.len() >= max.max(1))
            .then(|| items.pop_front())
            .flatten();
        items.push_back(item);
        drop(items);
        self.ready.notify_one();
        dropped
    }

    /// The oldest notification, waiting for one if there is none.
    async fn pop(&self) -> Queued {
        loop {
            if let Some(item) = self
                .items
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()
            {
                return item;
            }
            // A push between the check and here leaves a permit, so this does not miss it.
            self.ready.notified().await;
        }
    }
}

/// Resolves webhook host names as the system does, but never to an address that rules could not name either
/// (link-local, where cloud metadata lives; unspecified): a name pointed at 169.254.169.254 gets nowhere.
struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<std::net::SocketAddr> = found
                .into_iter()
                .filter(|a| {
                    let host = match a.ip() {
                        std::net::IpAddr::V4(ip) => url::Host::<&str>::Ipv4(ip),
                        std::net::IpAddr::V6(ip) => url::Host::<&str>::Ipv6(ip),
                    };
                    forbidden_host(&host).is_none()
                })
                .collect();
            if allowed.is_empty() {
                return Err(format!(
                    "{host} resolves only to addresses webhooks may not reach (link-local, metadata, unspecified)"
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// What every target's worker shares: the HTTP client, the retry schedule, the counters.
struct Sender {
    client: reqwest::Client,
    settings: DeliverySettings,
    health: Arc<Health>,
}

impl Deliverer {
    /// A deliverer with its own HTTP client (timeouts from `settings`). Fails only if the client cannot be built;
    /// a client without timeouts would let one hanging target hold its queue forever, so there is no fallback.
    pub(crate) fn new(
        settings: DeliverySettings,
        health: Arc<Health>,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // A redirect could lead anywhere, past the rules' checks: a webhook gets one URL.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy from the environment would resolve names itself, past the guarded resolver.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver))
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent(concat!("strobe/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            sender: Arc::new(Sender {
                client,
                settings,
                health,
            }),
            queues: Mutex::new(HashMap::new()),
            workers: Mutex::new(JoinSet::new()),
        })
    }

    /// Queues a notification on its target's queue; never waits.
    pub(crate) fn enqueue(&self, notification: Notification) {
        let url = notification.step.webhook.clone();
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let queue = queues.entry(url.clone()).or_insert_with(|| {
            let queue = Arc::new(TargetQueue::default());
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            // Workers only end by failing (a panic); say so rather than lose it.
            while let Some(ended) = workers.try_join_next() {
                if let Err(error) = ended {
                    error!(message = "Webhook worker failed.", %error);
                }
            }
            workers.spawn(
                self.sender
                    .clone()
                    .target_worker(url.clone(), queue.clone()),
            );
            queue
        });
        let deadline = tokio::time::Instant::now() + self.sender.settings.deadline;
        let max = self.sender.settings.max_queued_per_target;
        if let Some((_, n)) = queue.push((deadline, notification), max) {
            self.sender.health.webhook_dropped.inc();
            warn!(message = "Webhook queue full; its oldest notification dropped.", url = %redacted_url(&url), alert = %n.record.id, transition = n.transition.as_str());
            n.settled();
        }
    }
}

impl Sender {
    async fn target_worker(self: Arc<Self>, url: String, queue: Arc<TargetQueue>) {
        loop {
            let (deadline, n) = queue.pop().await;
            let body = payload::body(&n.record, n.transition, &n.step).to_string();
            let outcome = with_retries(&self.settings, deadline, |attempt| {
                if attempt > 1 {
                    self.health.webhook_retries.inc();
                }
                self.attempt(&url, &n, &body)
            })
            .await;
            let (alert, transition) = (&n.record.id, n.transition.as_str());
            // Logs name the target by scheme and host: a webhook URL's path is often its secret.
            let url = redacted_url(&url);
            match outcome {
                Outcome::Delivered(attempts) => {
                    self.health.webhook_delivered.inc();
                    info!(message = "Webhook delivered.", %url, %alert, transition, attempts);
                }
                Outcome::Refused(attempts, error) => {
                    self.health.webhook_refused.inc();
                    warn!(message = "Webhook refused; not retried.", %url, %alert, transition, attempts, %error);
                }
                Outcome::GaveUp(attempts, error) => {
                    self.health.webhook_gave_up.inc();
                    warn!(message = "Webhook delivery failed until the deadline.", %url, %alert, transition, attempts, %error);
                }
            }
            n.settled();
        }
    }

    /// One POST, signed afresh (the signed timestamp is the attempt's, so a late retry is not taken for a replay).
    async fn attempt(&self, url: &str, n: &Notification, body: &str) -> Attempt {
        let timestamp = strobe_proto::clock::unix_second();
        let signature = payload::signature_header(&n.step.secrets, timestamp, body.as_bytes());
        let mut request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-strobe-alert-id", &n.record.id)
            .header("x-strobe-transition", n.transition.as_str())
            .header(
                "idempotency-key",
                format!("{}:{}", n.record.id, n.transition.as_str()),
            )
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request
                .header(SIGNATURE_HEADER, signature)
                .header(TIMESTAMP_HEADER, timestamp.to_string());
        }
        match request.send().await {
            Ok(response) => classify(response.status()),
            // Without the URL: its path may be a secret.
            Err(error) => Attempt::Retry(error.without_url().to_string()),
        }
    }
}

fn classify(status: reqwest::StatusCode) -> Attempt {
    if status.is_success() {
        Attempt::Delivered
    } else if status.is_client_error()
        && status != reqwest::StatusCode::REQUEST_TIMEOUT
        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        Attempt::Refused(format!("HTTP {status}"))
    } else {
        Attempt::Retry(format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_target_queue_drops_its_oldest_and_hands_out_the_rest_in_order() {
        let queue = TargetQueue::default();
        let at = tokio::time::Instant::now();
        let notification = |id: &str, transition| Notification {
            record: crate::alerting::alerts::manager::tests_support::record(id),
            transition,
            step: crate::alerting::escalation::Step {
                after: Duration::ZERO,
                webhook: "http://127.0.0.1:9/x".into(),
                format: crate::alerting::escalation::Format::Json,
                secrets: vec![],
                routing_key: None,
            },
            on_settled: None,
        };
        assert!(
            queue
                .push((at, notification("a", NotifyTransition::Firing)), 2)
                .is_none()
        );
        assert!(
            queue
                .push((at, notification("b", NotifyTransition::Firing)), 2)
                .is_none()
        );
        // Full: the oldest makes room, so a `resolved` behind a dead target is never the one lost.
        let dropped = queue.push((at, notification("a", NotifyTransition::Resolved)), 2);
        assert_eq!(dropped.map(|(_, n)| n.record.id), Some("a".to_owned()));
        let order: Vec<(String, &str)> = [queue.pop().await, queue.pop().await]
            .into_iter()
            .map(|(_, n)| (n.record.id, n.transition.as_str()))
            .collect();
        assert_eq!(
            order,
            [("b".to_owned(), "firing"), ("a".to_owned(), "resolved")]
        );
        // Empty: a pop waits for the next push.
        let later = tokio::time::timeout(Duration::from_millis(50), queue.pop()).await;
        assert!(later.is_err());
    }
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn the_delay_doubles_is_capped_and_jittered() {
        let s = DeliverySettings {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            ..DeliverySettings::default()
        };
        let table = [
            (0, 1.0, 100),
            (1, 1.0, 200),
            (2, 1.0, 400),
            (3, 1.0, 800),
            (4, 1.0, 1000),
            (40, 1.0, 1000),
            (2, 0.0, 200),
            (2, 0.5, 300),
        ];
        for (retry, jitter, ms) in table {
            assert_eq!(
                retry_delay(retry, &s, jitter).as_millis(),
                ms,
                "retry {retry} jitter {jitter}"
            );
        }
    }

    #[test]
    fn status_codes_split_into_final_and_retryable() {
        use reqwest::StatusCode as S;
        assert_eq!(classify(S::OK), Attempt::Delivered);
        assert_eq!(classify(S::ACCEPTED), Attempt::Delivered);
        assert!(matches!(classify(S::BAD_REQUEST), Attempt::Refused(_)));
        assert!(matches!(classify(S::NOT_FOUND), Attempt::Refused(_)));
        assert!(matches!(classify(S::TOO_MANY_REQUESTS), Attempt::Retry(_)));
        assert!(matches!(classify(S::REQUEST_TIMEOUT), Attempt::Retry(_)));
        assert!(matches!(
            classify(S::INTERNAL_SERVER_ERROR),
            Attempt::Retry(_)
        ));
        assert!(matches!(classify(S::BAD_GATEWAY), Attempt::Retry(_)));
    }

    /// A target that never answers holds only its own queue: another target's notification arrives at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_target_does_not_delay_another() {
        use axum::routing::post;
        use std::sync::Mutex;
        let received: Arc<Mutex<Vec<(String, tokio::time::Instant)>>> = Arc::default();
        let log = received.clone();
        let app = axum::Router::new()
            .route(
                "/hang",
                post(|| async { tokio::time::sleep(Duration::from_secs(60)).await }),
            )
            .route(
                "/ok",
                post(move || {
                    let log = log.clone();
                    async move {
                        log.lock()
                            .unwrap()
                            .push(("ok".into(), tokio::time::Instant::now()))
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let deliverer = Deliverer::new(
            DeliverySettings {
                timeout: Duration::from_secs(30),
                ..DeliverySettings::default()
            },
            Arc::new(Health::default()),
        )
        .expect("webhook client");
        let record = crate::alerting::alerts::manager::tests_support::record("a1");
        let step = |path: &str| crate::alerting::escalation::Step {
            after: Duration::ZERO,
            webhook: format!("http://{addr}/{path}"),
            format: crate::alerting::escalation::Format::Json,
            secrets: vec![],
            routing_key: None,
        };
        let start = tokio::time::Instant::now();
        for path in ["hang", "hang", "ok"] {
            deliverer.enqueue(Notification {
                record: record.clone(),
                transition: NotifyTransition::Firing,
                step: step(path),
                on_settled: None,
            });
        }
        for _ in 0..50 {
            if !received.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = received.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "the healthy target got its notification");
        assert!(
            got[0].1 - start < Duration::from_secs(1),
            "{:?}",
            got[0].1 - start
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_follow_the_schedule_until_success_or_deadline() {
        let s = DeliverySettings {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            deadline: Duration::from_secs(5),
            ..DeliverySettings::default()
        };
        // Fails three times, then succeeds: three sleeps, each within [half, all] of 100, 200, 400 ms.
        let start = tokio::time::Instant::now();
        let calls = AtomicU32::new(0);
        let outcome = with_retries(&s, tokio::time::Instant::now() + s.deadline, |_| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Attempt::Retry("500".into())
                } else {
                    Attempt::Delivered
                }
            }
        })
        .await;
        assert_eq!(outcome, Outcome::Delivered(4));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(350) && waited <= Duration::from_millis(700),
            "{waited:?}"
        );

        // Always failing: gives up before the deadline passes.
        let start = tokio::time::Instant::now();
        let deadline = tokio::time::Instant::now() + s.deadline;
        let outcome =
            with_retries(&s, deadline, |_| async { Attempt::Retry("timeout".into()) }).await;
        let Outcome::GaveUp(tries, _) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(tries >= 5, "{tries}");
        assert!(start.elapsed() <= Duration::from_secs(5));

        // Refused: one attempt, no wait.
        let start = tokio::time::Instant::now();
        let deadline = tokio::time::Instant::now() + s.deadline;
        let outcome = with_retries(&s, deadline, |_| async {
            Attempt::Refused("HTTP 400".into())
        })
        .await;
        assert!(matches!(outcome, Outcome::Refused(1, _)));
        // A notification whose deadline passed while it waited behind others is not tried at all.
        let expired = tokio::time::Instant::now() - Duration::from_secs(1);
        let outcome = with_retries(&s, expired, |_| async { Attempt::Delivered }).await;
        assert!(matches!(outcome, Outcome::GaveUp(0, _)));
        let outcome = with_retries(&s, deadline, |_| async {
            Attempt::Refused("HTTP 400".into())
        })
        .await;
        assert_eq!(outcome, Outcome::Refused(1, "HTTP 400".into()));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
