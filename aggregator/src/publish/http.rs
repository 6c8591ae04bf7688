//! HTTP on one port: the dashboard at `/`, the JSON API under `/api/v1/`, the live websocket at `/api/v1/stream`,
//! the aggregator's own health at `/metrics` and `/healthz`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::Path;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::alerting::alerts::{AckError, Alerts};
use crate::alerting::rules::config::redacted_source;
use crate::alerting::rules::{RuleSet, RulesStore, StoreError};
use crate::auth::{Denied, Role, Tokens, is_loopback_host, origin_allowed};
use crate::health::Health;
use crate::publish::{Delivered, Frame, FrameKind, Hub, Seconds};

/// What the HTTP handlers share.
pub(crate) struct AppState {
    /// Frames, history, service status.
    pub(crate) hub: Arc<Hub>,
    /// The aggregator's counters.
    pub(crate) health: Arc<Health>,
    /// The rules in force.
    pub(crate) rules: Arc<RulesStore>,
    /// The alert manager.
    pub(crate) alerts: Alerts,
    /// The websocket's input bounds.
    pub(crate) limits: WebsocketLimits,
    /// Websocket clients connected now, by address.
    pub(crate) websocket_clients:
        std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// Who may read and who may change things.
    pub(crate) tokens: Arc<Tokens>,
    /// Browser origins besides our own allowed to open the websocket and send changes.
    pub(crate) allowed_origins: Vec<String>,
    /// Without tokens, answer requests for any host name (`--insecure-no-auth`), not only loopback names.
    pub(crate) any_host: bool,
    /// The cluster this node is part of, if any.
    pub(crate) cluster: Option<Arc<dyn ClusterView>>,
    /// For reading other nodes' service lists.
    pub(crate) peers: reqwest::Client,
}

/// What the HTTP API needs to know of the cluster (the cluster room implements it).
pub(crate) trait ClusterView: Send + Sync {
    /// `/api/v1/cluster`: this node, whether etcd answers, the live members.
    fn status_json(&self) -> serde_json::Value;
    /// This node's id.
    fn node_id(&self) -> String;
    /// The other live members: (id, HTTP base URL).
    fn peers(&self) -> Vec<(String, String)>;
    /// The token this node presents to the others.
    fn peer_token(&self) -> Option<String>;
}

/// Who made a request: the name of the token it presented (none when the aggregator asks for no tokens).
#[derive(Debug, Clone)]
pub(crate) struct Principal(pub(crate) Option<String>);

/// The websocket subprotocol the dashboard speaks; a token travels beside it as `strobe.token.<hex>`, the one
/// place a browser can put a secret on a websocket handshake without putting it in the URL.
const WS_PROTOCOL: &str = "strobe";
const WS_TOKEN_PREFIX: &str = "strobe.token.";

/// The bearer token of a request: `Authorization: Bearer T`, or on a websocket handshake a
/// `Sec-WebSocket-Protocol` value `strobe.token.<hex of T>`.
fn presented_token(headers: &axum::http::HeaderMap) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
        && let Some(token) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
    {
        return Some(token.trim().to_owned());
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix(WS_TOKEN_PREFIX))
        .find_map(|hex_token| {
            hex::decode(hex_token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        })
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let mut response = (status, Json(json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"strobe\""),
        );
    }
    response
}

/// The gate in front of the API, the websocket and `/metrics` (the dashboard's files and `/healthz` hold no data
/// and stay open): the right token for the method (GET: read; anything else: admin), and for anything a browser
/// could be tricked into sending cross-site (changes, the websocket) an `Origin` that is ours or allowed and, for
/// changes, a JSON or TOML body (which a plain HTML form cannot send). Without tokens, only requests addressed to a
/// loopback name are answered (a page on a name that resolves to 127.0.0.1 gets nothing).
async fn guard(
    State(state): State<Arc<AppState>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    if path == "/healthz" || strobe_dashboard::ASSETS.iter().any(|a| a.path == path) {
        return next.run(request).await;
    }
    let headers = request.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if !state.tokens.http_required() && !state.any_host {
        if !host.is_some_and(is_loopback_host) {
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "without tokens this aggregator answers only requests to a loopback address",
            );
        }
        // A reverse proxy on loopback would make the whole world look local: without tokens, proxied requests
        // are refused (a proxy rewrites Host, but it says where the request came from).
        if ["forwarded", "x-forwarded-for", "x-real-ip"]
            .iter()
            .any(|h| headers.contains_key(*h))
        {
            return refuse(
                StatusCode::FORBIDDEN,
                "without tokens this aggregator refuses proxied requests: set --read-token and --admin-token",
            );
        }
    }
    let method = request.method().clone();
    let need = if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        Role::Read
    } else {
        Role::Admin
    };
    let principal = match state
        .tokens
        .authorize(presented_token(headers).as_deref(), need)
    {
        Ok(name) => name,
        Err(Denied::Unauthenticated) => {
            return refuse(StatusCode::UNAUTHORIZED, "a valid token is required");
        }
        Err(Denied::Forbidden) => {
            return refuse(StatusCode::FORBIDDEN, "this token may only read");
        }
    };
    let is_upgrade = headers.contains_key(header::UPGRADE);
    if (need == Role::Admin || is_upgrade)
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        let origin = origin.to_str().unwrap_or("");
        if !origin_allowed(origin, host, &state.allowed_origins) {
            tracing::warn!(message = "Cross-origin request refused.", %origin, %path);
            return refuse(
                StatusCode::FORBIDDEN,
                "cross-origin request refused (see --allowed-origin)",
            );
        }
    }
    if need == Role::Admin {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !matches!(
            essence.as_str(),
            "application/json" | "application/toml" | "text/toml"
        ) {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "changes need Content-Type application/json (acknowledgements) or application/toml (rules)",
            );
        }
    }
    request.extensions_mut().insert(Principal(principal));
    next.run(request).await
}

/// What a websocket client may send and how many may connect (from the aggregator's limits).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WebsocketLimits {
    /// Largest message a client may send.
    pub(crate) max_websocket_message_bytes: usize,
    /// Most services one subscription may name.
    pub(crate) max_subscribed_services: usize,
    /// Most clients at once...
    pub(crate) max_websocket_clients: usize,
    /// ...and from one IP address.
    pub(crate) max_websocket_clients_per_address: usize,
}

/// A websocket client's place in the per-address count, given back when it goes.
struct ClientSlot {
    state: Arc<AppState>,
    address: std::net::IpAddr,
}

impl ClientSlot {
    /// Takes a place for a client from `address`, if there is room in all and for the address.
    fn take(state: &Arc<AppState>, address: std::net::IpAddr) -> Option<Self> {
        let mut clients = state
            .websocket_clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let total: usize = clients.values().sum();
        let mine = clients.get(&address).copied().unwrap_or(0);
        if total >= state.limits.max_websocket_clients
            || mine >= state.limits.max_websocket_clients_per_address
        {
            // Nothing is recorded for a refused client: refusals cannot grow the map.
            return None;
        }
        *clients.entry(address).or_default() += 1;
        Some(Self {
            state: state.clone(),
            address,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut clients = self
            .state
            .websocket_clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = clients.get_mut(&self.address) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                clients.remove(&self.address);
            }
        }
    }
}

/// The router for the aggregator's HTTP port.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    for asset in strobe_dashboard::ASSETS {
        router = router.route(
            asset.path,
            get(move || async move { ([(header::CONTENT_TYPE, asset.content_type)], asset.body) }),
        );
    }
    router
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/services", get(services))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/series", get(series))
        .route("/api/v1/stream", get(stream))
        .route("/api/v1/rules", get(get_rules).put(put_rules))
        .route("/api/v1/alerts", get(list_alerts))
        .route("/api/v1/deploys", get(list_deploys))
        .route("/api/v1/alerts/{id}/ack", post(ack_alert))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        // Never framed: a page that framed the dashboard could trick a click on Acknowledge.
        .layer(axum::middleware::map_response(
            |mut response: Response| async move {
                let headers = response.headers_mut();
                headers.insert(
                    header::X_FRAME_OPTIONS,
                    header::HeaderValue::from_static("DENY"),
                );
                headers.insert(
                    header::CONTENT_SECURITY_POLICY,
                    header::HeaderValue::from_static("frame-ancestors 'none'"),
                );
                response
            },
        ))
        .with_state(state)
}

/// Liveness: "ok", or 503 naming the shards that stopped going round their loop (stuck, or their threads starved).
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    liveness(&state.health.shard_beats.stalled())
}

fn liveness(stalled: &[(usize, Duration)]) -> Response {
    if stalled.is_empty() {
        return "ok\n".into_response();
    }
    let shards: Vec<String> = stalled
        .iter()
        .map(|(i, silent)| format!("shard {i} silent for {:.1} s", silent.as_secs_f64()))
        .collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("stalled: {}\n", shards.join(", ")),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state
            .health
            .render(state.hub.subscriber_count(), state.hub.history_bytes()),
    )
}

#[derive(Deserialize)]
struct LocalQuery {
    /// Only what this node holds itself (what other nodes ask).
    #[serde(default)]
    local: bool,
}

async fn services(State(state): State<Arc<AppState>>, Query(q): Query<LocalQuery>) -> Response {
    let Some(cluster) = state.cluster.as_ref().filter(|_| !q.local) else {
        return Json(json!({ "services": state.hub.services() })).into_response();
    };
    // Every service of the cluster: this node's, then each other member's own, each marked with its owner.
    let me = cluster.node_id();
    let mut all: Vec<serde_json::Value> = state
        .hub
        .services()
        .into_iter()
        .filter_map(|s| serde_json::to_value(s).ok())
        .map(|mut s| {
            s["owner"] = json!(me);
            s
        })
        .collect();
    let mut unreachable = Vec::new();
    for (id, answer) in ask_peers(&state, cluster.as_ref(), "/api/v1/services?local=true").await {
        match answer.and_then(|a| a["services"].as_array().cloned()) {
            Some(services) => all.extend(services.into_iter().map(|mut s| {
                s["owner"] = json!(id);
                s
            })),
            None => unreachable.push(id),
        }
    }
    // A service that moved is listed by its old node until that node's history passes: keep the newest.
    all.sort_by(|a, b| {
        a["service"]
            .as_str()
            .cmp(&b["service"].as_str())
            .then(b["last_second"].as_i64().cmp(&a["last_second"].as_i64()))
    });
    all.dedup_by(|a, b| a["service"] == b["service"]);
    Json(json!({ "services": all, "unreachable": unreachable })).into_response()
}

/// Most bytes read from another node's answer.
const MAX_PEER_ANSWER_BYTES: usize = 16 << 20;

/// `GET <path>` on every other member (with this node's peer token), at once; each member's id and JSON answer
/// (none when it did not answer in time, or not with JSON).
async fn ask_peers(
    state: &AppState,
    cluster: &dyn ClusterView,
    path: &str,
) -> Vec<(String, Option<serde_json::Value>)> {
    let token = cluster.peer_token();
    let asks = cluster.peers().into_iter().map(|(id, base)| {
        let mut request = state
            .peers
            .get(format!("{base}{path}"))
            .timeout(Duration::from_secs(1));
        if let Some(token) = &token {
            request = request.bearer_auth(token);
        }
        async move {
            let mut body = Vec::new();
            let answer = match request.send().await {
                Ok(mut r) if r.status().is_success() => loop {
                    match r.chunk().await {
                        Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_PEER_ANSWER_BYTES => {
                            body.extend_from_slice(&chunk);
                        }
                        Ok(None) => break serde_json::from_slice::<serde_json::Value>(&body).ok(),
                        _ => break None,
                    }
                },
                _ => None,
            };
            (id, answer)
        }
    });
    futures_util::future::join_all(asks).await
}

async fn cluster(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    match &state.cluster {
        Some(cluster) => Json(cluster.status_json()),
        None => Json(json!({ "enabled": false })),
    }
}

#[derive(Deserialize)]
struct SeriesQuery {
    service: String,
}

async fn series(State(state): State<Arc<AppState>>, Query(q): Query<SeriesQuery>) -> Response {
    match state.hub.service(&q.service) {
        Some(status) => {
            // The stored frame is the one the stream sent; reading its series back is cheaper than keeping a
            // second copy of every service's newest second.
            let frame: serde_json::Value = match serde_json::from_str(status.latest.as_str()) {
                Ok(frame) => frame,
                Err(error) => {
                    tracing::error!(message = "Stored frame is not JSON.", service = %status.service, %error);
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "stored frame unreadable\n",
                    )
                        .into_response();
                }
            };
            Json(json!({
                "service": status.service,
                "t": status.last_second,
                "series": frame["series"],
            }))
            .into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no service named {:?} has reported", q.service) })),
        )
            .into_response(),
    }
}

fn rules_json(rules: &RuleSet) -> serde_json::Value {
    let mut owners: Vec<_> = rules.owners.values().collect();
    owners.sort_by(|a, b| a.name.cmp(&b.name));
    // Secrets never leave: owners serialise their webhooks as scheme and host, the source is redacted.
    json!({ "rules": rules.rules, "owners": owners, "source": redacted_source(&rules.source) })
}

async fn get_rules(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    Json(rules_json(&state.rules.current()))
}

/// Replaces the rules with the TOML body; a bad body is refused whole with its line and reason.
async fn put_rules(State(state): State<Arc<AppState>>, body: String) -> Response {
    // The file is written on a blocking thread: on the one HTTP thread it would pause every websocket meanwhile.
    let rules = state.rules.clone();
    let replaced = tokio::task::spawn_blocking(move || rules.replace(&body)).await;
    let Ok(replaced) = replaced else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": "the rules update did not complete" })),
        )
            .into_response();
    };
    match replaced {
        Ok(rules) => Json(rules_json(&rules)).into_response(),
        Err(StoreError::Invalid(error)) => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": error.to_string(), "line": error.line })),
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": error.to_string() })),
        )
            .into_response(),
    }
}

async fn list_deploys(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    Json(json!({ "deploys": state.hub.deploys() }))
}

async fn list_alerts(State(state): State<Arc<AppState>>, Query(q): Query<LocalQuery>) -> Response {
    let mine = state.alerts.list().await;
    let Some(cluster) = state.cluster.as_ref().filter(|_| !q.local) else {
        return Json(json!({ "alerts": mine })).into_response();
    };
    // Every alert of the cluster: each node holds its own services' alerts.
    let mut all: Vec<serde_json::Value> = mine
        .into_iter()
        .filter_map(|a| serde_json::to_value(a).ok())
        .collect();
    for (_, answer) in ask_peers(&state, cluster.as_ref(), "/api/v1/alerts?local=true").await {
        if let Some(alerts) = answer.and_then(|a| a["alerts"].as_array().cloned()) {
            all.extend(alerts);
        }
    }
    // An alert that moved with its service may still be listed by its old node: keep the first seen (this node's,
    // then the members' in order).
    let mut seen = std::collections::HashSet::new();
    all.retain(|a| seen.insert(a["id"].as_str().unwrap_or_default().to_owned()));
    all.sort_by(|a, b| {
        b["since"]
            .as_i64()
            .cmp(&a["since"].as_i64())
            .then(a["id"].as_str().cmp(&b["id"].as_str()))
    });
    Json(json!({ "alerts": all })).into_response()
}

/// Marks an acknowledgement passed on by another node, so it is not passed on again.
const FORWARDED: &str = "x-strobe-forwarded";

/// In a cluster, an alert is held by its service's owner: an acknowledgement this node cannot place is passed on
/// to the other members with the same token (nodes share their tokens), and the one holding it answers.
async fn forward_ack(
    state: &AppState,
    id: &str,
    headers: &axum::http::HeaderMap,
    body: &str,
) -> Option<Response> {
    let cluster = state.cluster.as_ref()?;
    // Alert ids are hex digests: anything else goes nowhere (and never into another node's URL).
    if headers.contains_key(FORWARDED)
        || id.is_empty()
        || !id.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return None;
    }
    for (_, base) in cluster.peers() {
        let mut request = state
            .peers
            .post(format!("{base}/api/v1/alerts/{id}/ack"))
            .header(FORWARDED, "1")
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .timeout(Duration::from_secs(2));
        if let Some(auth) = headers.get(axum::http::header::AUTHORIZATION) {
            request = request.header(axum::http::header::AUTHORIZATION, auth.clone());
        }
        // The holder answers 200, or 409 when it is not firing; any other answer means "not here" (or that node
        // is unwell): ask the next one.
        if let Ok(response) = request.send().await
            && matches!(response.status().as_u16(), 200 | 409)
        {
            let status =
                StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = response.bytes().await.unwrap_or_default();
            return Some(
                (
                    status,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response(),
            );
        }
    }
    None
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AckBody {
    /// Who acknowledges.
    by: Option<String>,
}

/// Acknowledges a firing alert. The body `{"by":"alice"}` is optional.
async fn ack_alert(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    axum::Extension(principal): axum::Extension<Principal>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    let ack: AckBody = if body.trim().is_empty() {
        AckBody::default()
    } else {
        match serde_json::from_str(&body) {
            Ok(ack) => ack,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({ "error": format!("bad body: {e}") })),
                )
                    .into_response();
            }
        }
    };
    // With tokens, the token's name is who acknowledged (a name in the body is kept beside it).
    let by = match (principal.0, ack.by) {
        (Some(token), Some(by)) if by != token => format!("{by} (token {token})"),
        (Some(token), _) => token,
        (None, by) => by.unwrap_or_else(|| "anonymous".to_owned()),
    };
    match state.alerts.ack(&id, &by).await {
        Ok(record) => Json(json!({ "alert": record })).into_response(),
        Err(error @ AckError::NotFound(_)) => {
            match forward_ack(&state, &id, &headers, &body).await {
                Some(answer) => answer,
                None => (
                    StatusCode::NOT_FOUND,
                    Json(json!({ "error": error.to_string() })),
                )
                    .into_response(),
            }
        }
        Err(error @ AckError::NotFiring(_)) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": error.to_string() })),
        )
            .into_response(),
    }
}

/// A client's choice of what to receive.
///
/// - `services`: full "second" frames of these services; absent or empty means every service, unless `overview`
///   is set, in which case it means none.
/// - `overview`: one "overview" frame per service and second (every service).
///
/// Alert frames come for every service a client sees anything of.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Subscription {
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    overview: bool,
    /// Every frame this node produced itself and none it relays (what other nodes of a cluster read).
    #[serde(default)]
    local: bool,
}

impl Subscription {
    /// Its services sorted and without repeats (for [`Subscription::names`]).
    fn normalized(mut self) -> Self {
        self.services.sort_unstable();
        self.services.dedup();
        self
    }

    /// Whether it names `service` (the list is sorted: every frame of every subscriber asks this).
    fn names(&self, service: &str) -> bool {
        self.services
            .binary_search_by(|s| s.as_str().cmp(service))
            .is_ok()
    }

    /// Whether it may take a frame of this kind and service (all of them, unless it takes only local frames).
    fn may_want(&self, kind: FrameKind, service: &str) -> bool {
        if self.local {
            return true;
        }
        match kind {
            FrameKind::Overview => self.overview,
            FrameKind::Second if self.overview => self.names(service),
            FrameKind::Second => self.services.is_empty() || self.names(service),
            FrameKind::Alert | FrameKind::Deploy => {
                self.overview || self.services.is_empty() || self.names(service)
            }
        }
    }

    /// Whether it takes every frame of this kind and service.
    fn wants_all(&self, kind: FrameKind, service: &str) -> bool {
        !self.local && self.may_want(kind, service)
    }

    /// Which full second frames its socket hears (those it takes, or more).
    fn seconds(&self) -> Seconds<'_> {
        if self.local || (!self.overview && self.services.is_empty()) {
            Seconds::All
        } else if self.services.is_empty() {
            Seconds::None
        } else {
            Seconds::Of(&self.services)
        }
    }

    fn wants(&self, frame: &Frame) -> bool {
        if self.local {
            return !frame.relayed;
        }
        self.may_want(frame.kind, &frame.service)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientMessage {
    subscribe: Subscription,
}

#[derive(Deserialize)]
struct StreamQuery {
    /// Comma-separated services, an alternative to the subscribe message.
    services: Option<String>,
    /// `?overview=true`, an alternative to the subscribe message.
    overview: Option<bool>,
    /// `?local=true`: this node's own frames, all of them (another node's relay).
    local: Option<bool>,
}

/// How long a new connection may take to send its first subscribe before it gets everything.
const FIRST_SUBSCRIBE_WAIT: Duration = Duration::from_millis(300);

async fn stream(
    State(state): State<Arc<AppState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Query(q): Query<StreamQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Taken before the upgrade (a refusal is a plain 503) and held for the connection's life.
    let Some(slot) = ClientSlot::take(&state, peer.ip()) else {
        tracing::warn!(message = "Websocket client refused: too many clients.", address = %peer.ip());
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too many websocket clients (max_websocket_clients, max_websocket_clients_per_address)",
        )
            .into_response();
    };
    let from_query =
        (q.services.is_some() || q.overview.is_some() || q.local.is_some()).then(|| Subscription {
            services: q
                .services
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            overview: q.overview.unwrap_or(false),
            local: q.local.unwrap_or(false),
        });
    let from_query = match from_query
        .map(|s| check_subscription(s, state.limits.max_subscribed_services))
        .transpose()
    {
        Ok(subscription) => subscription,
        Err(error) => return (axum::http::StatusCode::BAD_REQUEST, error).into_response(),
    };
    let max_message = state.limits.max_websocket_message_bytes;
    upgrade
        .protocols([WS_PROTOCOL])
        .max_message_size(max_message)
        .max_frame_size(max_message)
        // What a client sends is a subscription of a few hundred bytes. tungstenite zero-fills its whole read
        // buffer on every read attempt, and the socket task attempts one each time it wakes for a frame: with the
        // default 128 KiB, 1,000 overview subscribers spent 40% of the aggregator's CPU in memset (perf).
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            state.health.websocket_clients.inc();
            serve_socket(socket, &state, from_query).await;
            state.health.websocket_clients.dec();
        })
}

/// A websocket's read buffer (it grows for a larger message, up to `max_websocket_message_bytes`).
const WS_READ_BUFFER_BYTES: usize = 4 * 1024;

async fn serve_socket(socket: WebSocket, state: &AppState, from_query: Option<Subscription>) {
    let (mut out, mut inbound) = socket.split();
    let mut subscription = match from_query {
        Some(s) => s,
        None => match tokio::time::timeout(FIRST_SUBSCRIBE_WAIT, inbound.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                match parse_client_message(&text, state.limits.max_subscribed_services) {
                    Ok(s) => s,
                    Err(error) => {
                        // The client is told why its subscription was not understood; if it already left, nothing is lost.
                        out.send(error_frame(&error)).await.ok();
                        Subscription::default()
                    }
                }
            }
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return,
            _ => Subscription::default(),
        },
    };
    let (mut live, backfill) = state.hub.subscribe(
        subscription.seconds(),
        |kind, service| subscription.may_want(kind, service),
        |f| subscription.wants(f),
    );
    let mut delivered = Delivered::default();
    delivered.record(&backfill);
    let mut unflushed = false;
    if send_frames(&mut out, backfill).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            // Frames first: the client's side is read only when no frame is waiting, so a burst of frames costs no
            // read attempt per frame (what a client sends waits for the burst to be written, a few ms).
            biased;
            received = live.recv() => match received {
                Ok(frame) => {
                    if subscription.wants(&frame) && !delivered.already_sent(&frame) {
                        // Noted, so that reading the history again after a move to another broadcast (below) sends
                        // only what was missed.
                        delivered.note_live(&frame);
                        if let Some(text) = frame.into_text() {
                            if out.feed(Message::Text(text)).await.is_err() {
                                return;
                            }
                            unflushed = true;
                        }
                    }
                    // Flush once the burst is drained: one write per burst rather than per frame.
                    if unflushed && live.is_empty() {
                        if out.flush().await.is_err() {
                            return;
                        }
                        unflushed = false;
                    }
                }
                Err(RecvError::Lagged(dropped)) => {
                    state.health.websocket_frames_dropped.inc_by(dropped);
                    let notice = json!({ "type": "lagged", "dropped": dropped }).to_string();
                    if out.send(Message::Text(notice.into())).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            },
            message = inbound.next() => match message {
                Some(Ok(Message::Text(text))) => match parse_client_message(&text, state.limits.max_subscribed_services) {
                    Ok(next) => {
                        // Backfill only what the old subscription did not already cover.
                        let old = subscription.clone();
                        subscription = next;
                        // Full seconds heard exactly while they are wanted (a dashboard tab that closes a service's
                        // view goes back to overviews only), on the services' own broadcasts when it names a few.
                        let moved = state.hub.want_seconds(&mut live, subscription.seconds());
                        // Only the stores that may hold something new are copied: opening one service's view
                        // among thousands copies that service's frames, not every service's. After a move from
                        // the services' own broadcasts to every service's, their full seconds newer than those sent
                        // are read again from the history.
                        let again = |kind| moved && kind == FrameKind::Second;
                        let added = state.hub.backfill(
                            |kind, service| {
                                subscription.may_want(kind, service)
                                    && (!old.wants_all(kind, service) || again(kind))
                            },
                            |f| {
                                subscription.wants(f)
                                    && (!old.wants(f) || (again(f.kind) && !delivered.has_second(f)))
                            },
                        );
                        delivered.record(&added);
                        if send_frames(&mut out, added).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        if out.send(error_frame(&error)).await.is_err() {
                            return;
                        }
                    }
                },
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}

fn parse_client_message(text: &str, max_services: usize) -> Result<Subscription, String> {
    let subscription = serde_json::from_str::<ClientMessage>(text)
        .map(|m| m.subscribe)
        .map_err(|e| format!("bad client message: {e}"))?;
    check_subscription(subscription, max_services)
}

/// A subscription within `max_subscribed_services`, normalised.
fn check_subscription(
    subscription: Subscription,
    max_services: usize,
) -> Result<Subscription, String> {
    if subscription.services.len() > max_services {
        return Err(format!(
            "a subscription names at most {max_services} services (max_subscribed_services)"
        ));
    }
    Ok(subscription.normalized())
}

fn error_frame(error: &str) -> Message {
    Message::Text(
        json!({ "type": "error", "error": error })
            .to_string()
            .into(),
    )
}

async fn send_frames(
    out: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    frames: Vec<Frame>,
) -> Result<(), axum::Error> {
    // Stored full seconds are unpacked one at a time, as they are sent: a large backfill never sits in memory
    // unpacked.
    for text in frames.into_iter().filter_map(Frame::into_text) {
        out.feed(Message::Text(text)).await?;
    }
    out.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/healthz` answers 200 "ok" with every shard ticking, and 503 naming each stalled shard otherwise.
    #[tokio::test]
    async fn liveness_names_the_stalled_shards() {
        let ok = liveness(&[]);
        assert_eq!(ok.status(), StatusCode::OK);
        let body = axum::body::to_bytes(ok.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"ok\n");
        let stalled = liveness(&[
            (2, Duration::from_millis(12_340)),
            (5, Duration::from_secs(60)),
        ]);
        assert_eq!(stalled.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(stalled.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "stalled: shard 2 silent for 12.3 s, shard 5 silent for 60.0 s\n"
        );
    }

    /// A subscription that says it takes no full seconds takes none of any service, whatever its shape (else its
    /// socket, which then does not listen to them, would lose frames).
    /// A frame of second 1.
    fn frame(kind: FrameKind, service: &str, relayed: bool) -> Frame {
        Frame {
            kind,
            service: service.into(),
            t: 1,
            correction: false,
            json: "{}".into(),
            relayed,
        }
    }

    #[test]
    fn wanting_no_full_seconds_means_wanting_none() {
        let frames: Vec<Frame> = [("a", false), ("b", false), ("a", true)]
            .into_iter()
            .map(|(service, relayed)| frame(FrameKind::Second, service, relayed))
            .collect();
        let mut shapes = 0;
        for services in [vec![], vec!["a".to_owned()], vec!["c".to_owned()]] {
            for overview in [false, true] {
                for local in [false, true] {
                    let s = Subscription {
                        services: services.clone(),
                        overview,
                        local,
                    };
                    let wanted = frames.iter().any(|f| s.wants(f));
                    match s.seconds() {
                        Seconds::None => {
                            shapes += 1;
                            assert!(!wanted, "{s:?}");
                        }
                        // Heard on the named services' own broadcasts: every full second it takes is theirs.
                        Seconds::Of(names) => assert!(
                            frames
                                .iter()
                                .filter(|f| s.wants(f))
                                .all(|f| names.iter().any(|n| n.as_str() == &*f.service)),
                            "{s:?}"
                        ),
                        Seconds::All => {}
                    }
                }
            }
        }
        assert_eq!(shapes, 1, "only overview without services and not local");
    }

    /// The backfill reads only the stores a subscription may want something from: so every frame it wants is in
    /// a store it may want ([`Subscription::may_want`]), and a store it wants whole ([`Subscription::wants_all`])
    /// holds nothing it does not want. Over every shape of subscription and every kind, service and origin.
    #[test]
    fn the_stores_read_for_a_backfill_hold_every_frame_wanted() {
        let kinds = [
            FrameKind::Second,
            FrameKind::Overview,
            FrameKind::Alert,
            FrameKind::Deploy,
        ];
        let frames: Vec<Frame> = kinds
            .iter()
            .flat_map(|kind| {
                ["a", "b", "c"].into_iter().flat_map(move |service| {
                    [false, true].map(|relayed| frame(*kind, service, relayed))
                })
            })
            .collect();
        let named = [vec![], vec!["a"], vec!["c", "a", "c"], vec!["d"]];
        let mut wanted_somewhere = 0;
        for services in named {
            for overview in [false, true] {
                for local in [false, true] {
                    let s = Subscription {
                        services: services.iter().map(|s| (*s).to_owned()).collect(),
                        overview,
                        local,
                    }
                    .normalized();
                    for f in &frames {
                        let store = (f.kind, &*f.service);
                        if s.wants(f) {
                            wanted_somewhere += 1;
                            assert!(s.may_want(store.0, store.1), "{s:?} {f:?}");
                        }
                        if s.wants_all(store.0, store.1) {
                            assert!(s.wants(f), "{s:?} {f:?}");
                        }
                    }
                }
            }
        }
        assert!(wanted_somewhere > 100, "{wanted_somewhere}");
        // Named services are found whatever order and repeats they came in.
        let s = Subscription {
            services: vec!["c".into(), "a".into(), "c".into()],
            overview: true,
            local: false,
        }
        .normalized();
        assert_eq!(s.services, ["a", "c"]);
        assert!(s.names("a") && s.names("c") && !s.names("b"));
    }
}
