//! Fan-in: any node serves every service. For each other member, one relay task reads that member's own frames
//! (`/api/v1/stream?local=true`: what it sealed, summarised, alerted and judged itself, never what it relays) and
//! publishes them into this node's hub, marked as relayed. A subscriber of any node thus sees every service; its
//! backfill holds remote services' history as far as this node has relayed it. Relays follow membership: one starts
//! when a member joins, stops when it leaves, and reconnects every half second while its member is unreachable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::{Cluster, Member};
use crate::publish::Hub;

/// Runs the relays until the task is dropped. `token` is presented to the other nodes (a read token of this
/// cluster), if they ask for one.
pub(crate) async fn run(cluster: Arc<Cluster>, hub: Arc<Hub>, token: Option<String>) {
    let mut changes = cluster.changes();
    // Aborted when dropped: when this task is stopped (at shutdown), its relays stop with it.
    let mut relays: HashMap<String, (Member, AbortOnDropHandle<()>)> = HashMap::new();
    loop {
        let members = cluster.members();
        relays.retain(|id, (member, task)| {
            let keep = members.iter().any(|m| m == member) && *id != cluster.me().id;
            if !keep {
                task.abort();
            }
            keep
        });
        for member in members {
            if member.id == cluster.me().id || relays.contains_key(&member.id) {
                continue;
            }
            let task = AbortOnDropHandle::new(tokio::spawn(relay(
                member.clone(),
                hub.clone(),
                token.clone(),
            )));
            relays.insert(member.id.clone(), (member, task));
        }
        if changes.changed().await.is_err() {
            break;
        }
    }
}

/// Reads one member's own frames into the hub, reconnecting while it is unreachable.
async fn relay(member: Member, hub: Arc<Hub>, token: Option<String>) {
    let url = format!(
        "{}/api/v1/stream?local=true",
        member
            .http
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1)
    );
    let mut connected_once = false;
    let mut failing = false;
    loop {
        match read(&url, &hub, token.as_deref(), &mut connected_once).await {
            Ok(()) => {
                failing = false;
                debug!(message = "Relay closed by its member (or fell behind); reconnecting.", node = %member.id);
            }
            Err(error) if !failing => {
                failing = true;
                warn!(message = "Relaying a member's stream failed; retrying every half second.", node = %member.id, %error);
            }
            Err(error) => debug!(message = "Relay still failing.", node = %member.id, %error),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A relay socket's read buffer.
const RELAY_READ_BUFFER_BYTES: usize = 16 * 1024;

async fn read(
    url: &str,
    hub: &Hub,
    token: Option<&str>,
    connected_once: &mut bool,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    if let Some(token) = token
        && let Ok(value) = format!("Bearer {token}").parse()
    {
        request.headers_mut().insert("authorization", value);
    }
    // tungstenite zero-fills its whole read buffer on every read attempt (the cost found on the aggregator's own
    // sockets, see `WS_READ_BUFFER_BYTES`): a relay reads frames of a few KiB as they come, so 16 KiB rather than
    // the default 128 KiB.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(RELAY_READ_BUFFER_BYTES);
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
    if !*connected_once {
        info!(message = "Relaying a member's stream.", %url);
        *connected_once = true;
    }
    while let Some(message) = socket.next().await {
        match message? {
            Message::Text(text) => {
                // Fell behind: reconnect, and the backfill fills the gap (frames already here are replaced).
                if text.len() < 100 && text.as_str().contains("\"type\":\"lagged\"") {
                    return Ok(());
                }
                if let Err(error) = hub.publish_relayed(text.as_str()) {
                    warn!(message = "A relayed frame was not understood; skipped.", %error);
                }
            }
            Message::Ping(payload) => socket.send(Message::Pong(payload)).await?,
            Message::Close(_) => return Ok(()),
            _ => {}
        }
    }
    Ok(())
}
