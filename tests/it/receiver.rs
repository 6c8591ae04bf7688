//! A real HTTP server on port 0 that receives webhooks, records them, and can fail on purpose.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// One received webhook.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) path: String,
    pub(crate) alert_id: String,
    pub(crate) transition: String,
    pub(crate) signature: Option<String>,
    pub(crate) raw: Bytes,
    pub(crate) body: Value,
}

#[derive(Default)]
struct Inner {
    received: Mutex<Vec<Received>>,
    /// Requests to `/dev` answered 500 before it starts accepting.
    fail_dev: AtomicU32,
}

/// A running receiver.
#[derive(Clone)]
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Receiver {
    pub(crate) async fn start(fail_dev_first: u32) -> Self {
        Self::start_on("127.0.0.1:0", fail_dev_first).await
    }

    /// A receiver on `addr` (a port reserved earlier, so webhooks can be sent to it before it is up).
    pub(crate) async fn start_on(addr: &str, fail_dev_first: u32) -> Self {
        let inner = Arc::new(Inner::default());
        inner.fail_dev.store(fail_dev_first, Ordering::SeqCst);
        let app = Router::new()
            .route("/{path}", post(receive))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, inner }
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }

    /// Accepted deliveries to `path` for `alert_id` with `transition`.
    pub(crate) fn count(&self, path: &str, alert_id: &str, transition: &str) -> usize {
        self.received()
            .iter()
            .filter(|r| r.path == path && r.alert_id == alert_id && r.transition == transition)
            .count()
    }

    pub(crate) fn failures_left(&self) -> u32 {
        self.inner.fail_dev.load(Ordering::SeqCst)
    }
}

async fn receive(
    State(inner): State<Arc<Inner>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> StatusCode {
    if path == "dev"
        && inner
            .fail_dev
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let received = Received {
        path,
        alert_id: header("x-strobe-alert-id").unwrap_or_default(),
        transition: header("x-strobe-transition").unwrap_or_default(),
        signature: header("x-strobe-signature"),
        body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
    };
    inner.received.lock().unwrap().push(received);
    StatusCode::OK
}

/// Checks `sha256=<hex>` against HMAC-SHA256(secret, body), computed here independently of Strobe.
pub(crate) fn signature_valid(secret: &str, body: &[u8], signature: &str) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    signature == format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
