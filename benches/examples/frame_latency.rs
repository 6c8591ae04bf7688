//! Measures how long after a second ends its frame reaches a websocket client.
//!
//! `cargo run --release -p strobe-benches --example frame_latency -- ws://127.0.0.1:7080/api/v1/stream 60`
//! reads live "second" frames (backfill is skipped) and prints the median, p90 and max delay in milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:7080/api/v1/stream".to_owned());
    let wanted: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(60);
    let (mut ws, _) = connect_async(url.as_str()).await?;
    let now_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let started = (now_ms() / 1000.0).floor() as i64;
    let mut delays = Vec::with_capacity(wanted);
    while delays.len() < wanted {
        let Some(message) = ws.next().await else {
            break;
        };
        let Message::Text(text) = message? else {
            continue;
        };
        let frame: serde_json::Value = serde_json::from_str(&text)?;
        let Some(t) = frame["t"].as_i64() else {
            continue;
        };
        if frame["type"] != "second" || t < started || frame["correction"] == true {
            continue;
        }
        delays.push(now_ms() - (t as f64 + 1.0) * 1000.0);
    }
    delays.sort_by(f64::total_cmp);
    let at =
        |q: f64| delays[((q * delays.len() as f64).ceil() as usize).clamp(1, delays.len()) - 1];
    println!(
        "frames={} second-end -> websocket: median={:.1} ms p90={:.1} ms max={:.1} ms",
        delays.len(),
        at(0.5),
        at(0.9),
        at(1.0)
    );
    Ok(())
}
