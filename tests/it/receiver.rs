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
    pub(crate) timestamp: Option<i64>,
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
        timestamp: header("x-strobe-timestamp").and_then(|t| t.parse().ok()),
        body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
    };
    inner.received.lock().unwrap().push(received);
    StatusCode::OK
}

/// Checks the header's `sha256=<hex>` values against HMAC-SHA256(secret, timestamp + "." + body), computed here
/// independently of Strobe.
pub(crate) fn signature_valid(secret: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    header.split(',').any(|s| s.trim() == expected)
}

/// Runs the README's signature check (the Python snippet between the `signature-snippet` markers) on a delivery,
/// as a receiver would, at unix time `now`.
pub(crate) fn readme_snippet_accepts(
    secret: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
    now: i64,
) -> bool {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let snippet = readme
        .split("<!-- signature-snippet -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- /signature-snippet -->").next())
        .expect("the snippet's markers in the README");
    let code = snippet
        .trim()
        .trim_start_matches("```python")
        .trim_end_matches("```");
    let driver = format!(
        "{code}\nimport sys\nsecret, timestamp, header, now = sys.argv[1:5]\nbody = sys.stdin.buffer.read()\n\
         print(strobe_signature_ok(secret.encode(), timestamp, body, header, now=float(now)))\n"
    );
    let path = std::env::temp_dir().join(format!(
        "strobe-verify-{}-{}.py",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::write(&path, driver).unwrap();
    let mut child = std::process::Command::new("python3")
        .arg(&path)
        .args([secret, &timestamp.to_string(), header, &now.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (scripts/test installs it)");
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(body).unwrap();
    let output = child.wait_with_output().unwrap();
    std::fs::remove_file(&path).ok();
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        answer == "True" || answer == "False",
        "the snippet ran: {answer:?} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    answer == "True"
}

/// A number that differs from run to run, for unique temporary names.
pub(crate) fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
