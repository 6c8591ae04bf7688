//! Remote write to a real Prometheus (Debian's `prometheus`, installed by the test command): the values read back
//! from it are the aggregator's own sealed seconds.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::receiver::rand_suffix;
use crate::support::*;

/// A Prometheus with the remote write receiver on, on a free loopback port, its data in a fresh directory.
struct Prometheus {
    _child: tokio::process::Child,
    addr: std::net::SocketAddr,
}

impl Prometheus {
    async fn start() -> Self {
        let binary = which("prometheus").expect(
            "prometheus is not installed: run scripts/test, which installs Debian's prometheus package",
        );
        let dir = scratch_dir().join(format!("prometheus-{}", rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, "global:\n  scrape_interval: 1h\n").unwrap();
        let addr: std::net::SocketAddr = free_local_addr().parse().unwrap();
        let child = tokio::process::Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--web.enable-remote-write-receiver")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus starts");
        until_serving(addr, "/-/ready", "", "prometheus ready").await;
        Self {
            _child: child,
            addr,
        }
    }

    /// The raw samples of `selector` over the last 10 minutes, by unix second.
    async fn samples(&self, selector: &str) -> BTreeMap<i64, f64> {
        let path = format!(
            "/api/v1/query?query={}",
            percent_encode(&format!("{selector}[10m]"))
        );
        let (status, body) = http(self.addr, "GET", &path, "").await;
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        let mut out = BTreeMap::new();
        for series in body["data"]["result"].as_array().unwrap() {
            for pair in series["values"].as_array().unwrap() {
                let t = pair[0].as_f64().unwrap();
                let v: f64 = pair[1].as_str().unwrap().parse().unwrap();
                assert!(
                    out.insert(t as i64, v).is_none(),
                    "one series only for {selector}: {body}"
                );
            }
        }
        out
    }
}

fn percent_encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Per second: a counter, a timer and a gauge from two instances of two versions; the aggregator's sealed seconds
/// (read from its websocket) are written to Prometheus once final, and read back equal: counter rates per split,
/// histogram quantiles, gauge spreads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_written_to_a_real_prometheus_are_read_back_equal() {
    let prometheus = Prometheus::start().await;
    let url = format!("http://{}/api/v1/write", prometheus.addr);
    let aggregator = aggregator(&["--remote-write", &url, "--late-window", "2s"]).await;
    let http_addr = aggregator.addr("http");
    let mut ws = subscribe(http_addr, &["rw"]).await;
    let a = agent(&aggregator, "rw", "v1", "z1", "rw-1").await;
    let b = agent(&aggregator, "rw", "v2", "z1", "rw-2").await;
    // Six seconds of traffic: counts and latencies differ per second and per instance.
    let until = unix_now() + 6.0;
    let mut round = 0u32;
    // What was sent in all: requests, latency values and their sum (ms).
    let (mut sent_requests, mut sent_values, mut sent_latency) = (0u32, 0u32, 0u32);
    while unix_now() < until {
        round += 1;
        for (agent, k) in [(&a, 1), (&b, 3)] {
            let latency = 5 + (round * k) % 40;
            let lines = vec![
                format!("rw.requests:{k}|c|#route:/pay"),
                format!("rw.latency:{latency}|ms"),
                format!("rw.depth:{}|g", k * 10 + round % 3),
            ];
            send_statsd(agent.addr("statsd"), &lines).await;
            sent_requests += k;
            sent_values += 1;
            sent_latency += latency;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // What the aggregator sealed, per second: the overall and v1 request rates, the overall p99, the depth max.
    let mut sealed: BTreeMap<i64, (f64, f64, f64, f64)> = BTreeMap::new();
    // The zone split's request rate, the overall latency count and p50, the depth's min and mean, per second.
    let mut more: BTreeMap<i64, [f64; 5]> = BTreeMap::new();
    let last_sent = until.floor() as i64;
    next_frame(&mut ws, Duration::from_secs(20), |f| {
        let t = f["t"].as_i64()?;
        if let (Some(all), Some(v1), Some(latency), Some(depth), Some(z1)) = (
            series(f, "rw.requests", None, None),
            series(f, "rw.requests", Some("v1"), None),
            series(f, "rw.latency", None, None),
            series(f, "rw.depth", None, None),
            series(f, "rw.requests", None, Some("z1")),
        ) {
            sealed.insert(
                t,
                (
                    all["sum"].as_f64().unwrap(),
                    v1["sum"].as_f64().unwrap(),
                    latency["p99"].as_f64().unwrap(),
                    depth["max"].as_f64().unwrap(),
                ),
            );
            more.insert(
                t,
                [
                    z1["sum"].as_f64().unwrap(),
                    latency["count"].as_f64().unwrap(),
                    latency["p50"].as_f64().unwrap(),
                    depth["min"].as_f64().unwrap(),
                    depth["mean"].as_f64().unwrap(),
                ],
            );
        }
        (t >= last_sent).then_some(())
    })
    .await;
    assert!(sealed.len() >= 5, "{sealed:?}");
    // Exported once final (late window 2 s + grace + 2 s): poll until every sealed second is there.
    let overall = "{service=\"rw\",version=\"\",zone=\"\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let (rates, v1_rates, p99s, depths) = loop {
        let rates = prometheus
            .samples(&format!("rw_requests_rate{overall}"))
            .await;
        if sealed.keys().all(|t| rates.contains_key(t)) {
            break (
                rates,
                prometheus
                    .samples("rw_requests_rate{service=\"rw\",version=\"v1\"}")
                    .await,
                prometheus
                    .samples("rw_latency{service=\"rw\",version=\"\",zone=\"\",quantile=\"0.99\"}")
                    .await,
                prometheus
                    .samples("rw_depth_max{service=\"rw\",version=\"\",zone=\"\"}")
                    .await,
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "every sealed second in Prometheus: {sealed:?} vs {rates:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for (t, (all, v1, p99, depth)) in &sealed {
        assert_eq!(rates[t], *all, "second {t}");
        assert_eq!(v1_rates[t], *v1, "second {t}");
        assert_eq!(p99s[t], *p99, "second {t}");
        assert_eq!(depths[t], *depth, "second {t}");
    }
    // The zone split, a histogram's count rate and median, a gauge's min and mean, read back the same way.
    let read_back = [
        prometheus
            .samples("rw_requests_rate{service=\"rw\",version=\"\",zone=\"z1\"}")
            .await,
        prometheus
            .samples(&format!("rw_latency_count_rate{overall}"))
            .await,
        prometheus
            .samples("rw_latency{service=\"rw\",version=\"\",zone=\"\",quantile=\"0.5\"}")
            .await,
        prometheus.samples(&format!("rw_depth_min{overall}")).await,
        prometheus.samples(&format!("rw_depth_mean{overall}")).await,
    ];
    for (t, values) in &more {
        for (field, value) in values.iter().enumerate() {
            assert_eq!(read_back[field][t], *value, "second {t}, field {field}");
        }
    }
    // Against the traffic itself: every request and every latency value sent is in Prometheus once, and the
    // latencies' sum rate (count x mean, so within the histograms' 1%) adds up to what was sent.
    let total = |samples: &BTreeMap<i64, f64>| samples.values().sum::<f64>();
    assert_eq!(total(&rates), f64::from(sent_requests), "{rates:?}");
    assert_eq!(total(&read_back[1]), f64::from(sent_values));
    let sums = prometheus
        .samples(&format!("rw_latency_sum_rate{overall}"))
        .await;
    let relative = (total(&sums) - f64::from(sent_latency)).abs() / f64::from(sent_latency);
    assert!(
        relative < 0.01,
        "latency sum {} vs {sent_latency} sent",
        total(&sums)
    );
    // The tag became a label.
    let by_route = prometheus
        .samples("rw_requests_rate{service=\"rw\",version=\"\",zone=\"\",route=\"/pay\"}")
        .await;
    assert_eq!(by_route.len(), rates.len());
    // And the aggregator says what it sent.
    let (_, metrics) = http(http_addr, "GET", "/metrics", "").await;
    let sent = metrics
        .lines()
        .find_map(|l| l.strip_prefix("strobe_remote_write_samples_sent_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(sent > 0.0, "{metrics}");
}
