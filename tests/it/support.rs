//! Starts real `strobe` processes on port 0 and talks to them over real sockets.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// A running `strobe` process, killed on drop.
pub(crate) struct Process {
    _child: Child,
    /// `key=value` pairs from its first stdout line.
    pub(crate) addrs: Vec<(String, String)>,
}

impl Process {
    /// Resident memory of the process now, bytes (from `/proc`).
    pub(crate) fn rss_bytes(&self) -> u64 {
        let pid = self._child.id().expect("still running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit; its exit status, if it did.
    pub(crate) async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let pid = self._child.id().expect("still running").to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().await;
        assert!(sent.is_ok_and(|s| s.success()), "SIGTERM sent");
        tokio::time::timeout(within, self._child.wait())
            .await
            .ok()
            .map(|status| status.expect("wait"))
    }

    pub(crate) fn addr(&self, key: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no {key} in {:?}", self.addrs))
            .1
            .parse()
            .unwrap()
    }
}

/// Runs `strobe <args>` and waits for its address line.
pub(crate) async fn spawn(args: &[&str]) -> Process {
    spawn_with_env(args, &[]).await
}

/// Runs `strobe <args>` with `env` set and waits for its address line.
pub(crate) async fn spawn_with_env(args: &[&str], env: &[(String, String)]) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strobe"))
        .args(args)
        .env(
            "STROBE_LOG",
            std::env::var("STROBE_IT_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("strobe starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("address line in time")
        .unwrap()
        .expect("an address line");
    let addrs = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Process {
        _child: child,
        addrs,
    }
}

pub(crate) async fn aggregator(extra: &[&str]) -> Process {
    let mut args = vec![
        "aggregator",
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    spawn(&args).await
}

pub(crate) async fn agent(
    aggregator: &Process,
    service: &str,
    version: &str,
    zone: &str,
    instance: &str,
) -> Process {
    let target = format!("http://{}", aggregator.addr("grpc"));
    spawn(&[
        "agent",
        "--service",
        service,
        "--version",
        version,
        "--zone",
        zone,
        "--instance",
        instance,
        "--aggregator",
        &target,
        "--statsd-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ])
    .await
}

/// An agent of `service` (version `v1`, instance `<service>-1`) streaming to `target` (`http://host:port`), with
/// `extra` flags.
pub(crate) async fn agent_to(target: &str, service: &str, extra: &[&str]) -> Process {
    agent_as(target, service, &format!("{service}-1"), extra).await
}

/// [`agent_to`], as instance `instance`.
pub(crate) async fn agent_as(
    target: &str,
    service: &str,
    instance: &str,
    extra: &[&str],
) -> Process {
    let mut args = vec![
        "agent",
        "--service",
        service,
        "--version",
        "v1",
        "--instance",
        instance,
        "--aggregator",
        target,
        "--statsd-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    spawn(&args).await
}

/// Sends DogStatsD lines to `to`, packed into packets of at most ~1400 bytes.
pub(crate) async fn send_statsd(to: SocketAddr, lines: &[String]) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut packet = String::new();
    for line in lines {
        if packet.len() + line.len() + 1 > 1400 {
            socket.send_to(packet.as_bytes(), to).await.unwrap();
            packet.clear();
        }
        packet.push_str(line);
        packet.push('\n');
    }
    if !packet.is_empty() {
        socket.send_to(packet.as_bytes(), to).await.unwrap();
    }
}

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens the stream subscribed to `services`.
pub(crate) async fn subscribe(http: SocketAddr, services: &[&str]) -> Ws {
    let (mut ws, _) = connect_async(format!("ws://{http}/api/v1/stream"))
        .await
        .unwrap();
    let msg = serde_json::json!({ "subscribe": { "services": services } }).to_string();
    ws.send(Message::Text(msg.into())).await.unwrap();
    ws
}

/// Reads frames until `pick` returns something, or panics after `within`.
pub(crate) async fn next_frame<T>(
    ws: &mut Ws,
    within: Duration,
    mut pick: impl FnMut(&Value) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the awaited frame in time")
            .expect("stream open")
            .unwrap();
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if let Some(found) = pick(&frame) {
                return found;
            }
        }
    }
}

/// One HTTP/1.1 request over a fresh connection; returns the status and the body. Changes are sent as the API
/// asks: rules (PUT) as TOML, everything else as JSON.
pub(crate) async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let content_type = match method {
        "PUT" => "application/toml",
        _ => "application/json",
    };
    let (status, _, body) =
        http_with(addr, method, path, body, &[("Content-Type", content_type)]).await;
    (status, body)
}

/// One HTTP/1.1 request with extra headers; returns the status, the response headers (lowercased names) and the
/// body.
pub(crate) async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let host = if headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        String::new()
    } else {
        format!("Host: {addr}\r\n")
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\n{host}{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let response_headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, response_headers, body.to_owned())
}

/// Sends a request and parses the JSON answer (`null` when it is not JSON).
pub(crate) async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Value) {
    let (status, body) = http(addr, method, path, body).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// GETs a JSON document.
pub(crate) async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, doc) = http_json(addr, "GET", path, "").await;
    assert_eq!(status, 200, "GET {path}: {doc}");
    doc
}

/// Polls until `check` holds, or panics after `within`.
pub(crate) async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Waits up to 30 s until a server started by a test answers `GET path` with 200 and a body holding `needle`.
pub(crate) async fn until_serving(addr: SocketAddr, path: &str, needle: &str, what: &str) {
    eventually(Duration::from_secs(30), what, || async {
        // Connect first: the HTTP helper expects a listening server.
        tokio::net::TcpStream::connect(addr).await.is_ok()
            && matches!(
                tokio::time::timeout(Duration::from_secs(2), http(addr, "GET", path, "")).await,
                Ok((200, body)) if body.contains(needle)
            )
    })
    .await;
}

/// Finds the series of `metric` with the given version and zone split in a "second" frame.
pub(crate) fn series<'a>(
    frame: &'a Value,
    metric: &str,
    version: Option<&str>,
    zone: Option<&str>,
) -> Option<&'a Value> {
    frame["series"].as_array()?.iter().find(|s| {
        s["metric"] == metric && s["version"].as_str() == version && s["zone"].as_str() == zone
    })
}

/// Unix time now, in seconds with fraction.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// This test run's own temporary folder, made on first use. Named by process id *and* start time: process ids come
/// round again, and a folder an earlier run left behind would hand this one its files, among them the alert state
/// an aggregator keeps beside its rules file (a firing or acknowledged alert restored from a run long gone took in
/// a test's new breach, and nothing paged).
pub(crate) fn scratch_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("strobe-it-{}-{started}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// Writes `text` to a file named `name` in this test run's temporary folder; its path.
pub(crate) fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A loopback address with a port free now, for a process that must come back on the same one.
pub(crate) fn free_local_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// The path of `name` on `PATH`, if installed.
pub(crate) fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|p| p.is_file())
}
