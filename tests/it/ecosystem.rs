//! The inputs services already use and the agent's own health: Datadog's official Python client, the
//! OpenTelemetry SDK's OTLP exporters (gRPC and HTTP), and the agent's `/metrics`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// The Python with `datadog` and the OpenTelemetry SDK that the test command installs (`scripts/test`), or
/// `STROBE_TEST_PYTHON`.
fn python() -> PathBuf {
    let path = std::env::var_os("STROBE_TEST_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run scripts/test, which installs the Python clients these tests drive",
        path.display()
    );
    path
}

/// Runs one of `tests/it/py/*.py`; its `name=value` words.
async fn run_python(script: &str, args: &[String]) -> BTreeMap<String, f64> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/py")
        .join(script);
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(python())
            .arg(&script)
            .args(args)
            .output(),
    )
    .await
    .expect("the Python client finishes")
    .expect("python runs");
    assert!(
        output.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

/// The overall (all versions, all zones) series of `metric` in a frame whose tags include `tags`.
fn overall<'a>(frame: &'a Value, metric: &str, tags: &[(&str, &str)]) -> Vec<&'a Value> {
    frame["series"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|s| {
                    s["metric"] == metric
                        && s["version"].is_null()
                        && s["zone"].is_null()
                        && tags.iter().all(|(k, v)| s["tags"][*k] == *v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A metric, the tags its series must have, and the field to read.
type Wanted<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

/// Sums over seconds, per (metric, field), what `wanted` names, until `done` says the totals are complete.
async fn totals_until(
    ws: &mut Ws,
    wanted: &[Wanted<'_>],
    mut done: impl FnMut(&BTreeMap<(i64, String), f64>) -> bool,
) -> BTreeMap<String, f64> {
    let mut per_second: BTreeMap<(i64, String), f64> = BTreeMap::new();
    next_frame(ws, Duration::from_secs(40), |f| {
        let t = f["t"].as_i64()?;
        if f["type"] != "second" && f["kind"] != "second" && f["series"].is_null() {
            return None;
        }
        for (metric, tags, field) in wanted {
            let value: f64 = overall(f, metric, tags)
                .iter()
                .filter_map(|s| s[*field].as_f64())
                .sum();
            // A correction replaces its second.
            per_second.insert((t, format!("{metric}.{field}")), value);
        }
        done(&per_second).then_some(())
    })
    .await;
    let mut totals = BTreeMap::new();
    for ((_, key), v) in &per_second {
        *totals.entry(key.clone()).or_insert(0.0) += v;
    }
    totals
}

fn sum_of(per_second: &BTreeMap<(i64, String), f64>, key: &str) -> f64 {
    per_second
        .iter()
        .filter(|((_, k), _)| k == key)
        .map(|(_, v)| v)
        .sum()
}

/// Datadog's own Python client: increment, decrement, gauge, timing, histogram and distribution, with tags and
/// whatever extra fields this client version appends, all counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_datadog_python_client_is_counted_exactly() {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let agent = agent(&aggregator, "py-dd", "v1", "z1", "py-dd-1").await;
    let mut ws = subscribe(http, &["py-dd"]).await;
    let statsd = agent.addr("statsd");
    let rounds = 200;
    let sent = run_python(
        "datadog_client.py",
        &[
            statsd.ip().to_string(),
            statsd.port().to_string(),
            rounds.to_string(),
        ],
    )
    .await;
    let mut last_gauge = None;
    let mut maxima: BTreeMap<&str, f64> = BTreeMap::new();
    let totals = totals_until(
        &mut ws,
        &[
            ("py.inflight", &[], "max"),
            ("py.jobs", &[("queue", "mail")], "sum"),
            ("py.timing", &[], "count"),
            ("py.hist", &[], "count"),
            ("py.dist", &[("route", "/a")], "count"),
            ("py.timing", &[], "max"),
            ("py.hist", &[], "max"),
            ("py.dist", &[("route", "/a")], "max"),
        ],
        |s| {
            for metric in ["py.timing", "py.hist", "py.dist"] {
                let key = format!("{metric}.max");
                let seen = s.iter().filter(|((_, k), _)| *k == key).map(|(_, v)| *v);
                let top = seen.fold(0.0, f64::max);
                maxima.insert(metric, top);
            }
            last_gauge = s
                .iter()
                .filter(|((_, k), v)| k == "py.inflight.max" && **v > 0.0)
                .map(|(_, v)| *v)
                .next_back();
            sum_of(s, "py.timing.count") >= f64::from(rounds)
                && sum_of(s, "py.dist.count") >= f64::from(rounds)
                && sum_of(s, "py.hist.count") >= f64::from(rounds)
                && sum_of(s, "py.jobs.sum") >= sent["jobs"]
        },
    )
    .await;
    assert_eq!(totals["py.jobs.sum"], sent["jobs"], "{totals:?}");
    for metric in ["py.timing", "py.hist", "py.dist"] {
        assert_eq!(
            totals[&format!("{metric}.count")],
            sent["samples"],
            "{metric}: {totals:?}"
        );
    }
    // The last second with the gauge holds its last value (7, after larger ones in the same second).
    assert_eq!(last_gauge, Some(sent["last_gauge"]), "{totals:?}");
    // Values, not only counts: each histogram's largest value over the run, within the 1% its precision allows.
    for (metric, sent_max) in [
        ("py.timing", sent["timing_max"]),
        ("py.hist", sent["hist_max"]),
        ("py.dist", sent["dist_max"]),
    ] {
        let seen = maxima[metric];
        assert!(
            (seen - sent_max).abs() <= sent_max * 0.01,
            "{metric}: max {seen}, sent {sent_max}"
        );
    }
}

/// The OpenTelemetry SDK's OTLP exporters, gRPC with cumulative temporality (the SDK's default) and HTTP/protobuf
/// with delta temporality, from two instances of one service, each with its own agent: counters counted exactly,
/// the up-down counter as a gauge, a histogram in seconds as a timer in ms, an exponential histogram within its
/// precision, each second's histograms merged across both instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opentelemetry_sdk_exports_over_otlp_grpc_and_http() {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let target = format!("http://{}", aggregator.addr("grpc"));
    let receivers = [
        "--otlp-addr",
        "127.0.0.1:0",
        "--otlp-http-addr",
        "127.0.0.1:0",
    ];
    let agents = [
        agent_as(&target, "py-otel", "py-otel-1", &receivers).await,
        agent_as(&target, "py-otel", "py-otel-2", &receivers).await,
    ];
    let mut ws = subscribe(http, &["py-otel"]).await;
    let rounds = 100;
    let sdk = |agent: &Process| {
        let args = [
            format!("http://{}", agent.addr("otlp")),
            format!("http://{}", agent.addr("otlp_http")),
            rounds.to_string(),
        ];
        async move { run_python("otel_sdk.py", &args).await }
    };
    let (recorded, other) = tokio::join!(sdk(&agents[0]), sdk(&agents[1]));
    assert_eq!(recorded, other, "both instances record the same");
    let instances = agents.len() as f64;
    let agent = &agents[0];
    let mut maxima: BTreeMap<String, f64> = BTreeMap::new();
    let mut gauges: BTreeMap<String, f64> = BTreeMap::new();
    let mut per_second: BTreeMap<(i64, String), f64> = BTreeMap::new();
    next_frame(&mut ws, Duration::from_secs(40), |f| {
        let t = f["t"].as_i64()?;
        for transport in ["grpc", "http"] {
            let tags = [("transport", transport)];
            for (metric, field) in [
                ("otel.requests", "sum"),
                ("otel.duration", "count"),
                ("otel.size", "count"),
            ] {
                let v: f64 = overall(f, metric, &tags)
                    .iter()
                    .filter_map(|s| s[field].as_f64())
                    .sum();
                per_second.insert((t, format!("{transport}.{metric}")), v);
            }
            for metric in ["otel.duration", "otel.size"] {
                for s in overall(f, metric, &tags) {
                    let max = maxima.entry(format!("{transport}.{metric}")).or_insert(0.0);
                    *max = max.max(s["max"].as_f64().unwrap_or(0.0));
                }
            }
            if let Some(s) = overall(f, "otel.inflight", &tags).first() {
                gauges.insert(transport.to_owned(), s["max"].as_f64().unwrap());
            }
        }
        let complete = ["grpc", "http"].iter().all(|tr| {
            ["otel.requests", "otel.duration", "otel.size"]
                .iter()
                .all(|m| {
                    sum_of(&per_second, &format!("{tr}.{m}")) >= instances * recorded["records"]
                })
        });
        (complete && gauges.values().all(|g| *g == recorded["inflight"]) && gauges.len() == 2)
            .then_some(())
    })
    .await;
    for transport in ["grpc", "http"] {
        for metric in ["otel.requests", "otel.duration", "otel.size"] {
            let key = format!("{transport}.{metric}");
            // Both instances' histograms merged: each second's count is theirs summed, and so is the run's.
            assert_eq!(
                sum_of(&per_second, &key),
                instances * recorded["records"],
                "{key}: {per_second:?}"
            );
        }
        // 0.2 s fell in the SDK's default bucket (0, 5] s, all of them: placed at their mean (from the sum), 200 ms.
        let duration = maxima[&format!("{transport}.otel.duration")];
        assert!(
            (duration - 200.0).abs() <= 2.0,
            "{transport}: {duration} ms"
        );
        // Exponential buckets: within a few percent of the largest value recorded.
        let size = maxima[&format!("{transport}.otel.size")];
        let relative = (size - recorded["size_max"]).abs() / recorded["size_max"];
        assert!(
            relative < 0.03,
            "{transport}: {size} vs {}",
            recorded["size_max"]
        );
    }
    // The agent's own page counts both transports' requests and the points taken.
    let (_, page) = crate::support::http(agent.addr("metrics"), "GET", "/metrics", "").await;
    for line in [
        "strobe_agent_otlp_requests_total{transport=\"grpc\",outcome=\"ok\"}",
        "strobe_agent_otlp_requests_total{transport=\"http\",outcome=\"ok\"}",
        "strobe_agent_otlp_points_total{kind=\"taken\"}",
    ] {
        let n: f64 = page
            .lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{line} in\n{page}"));
        assert!(n >= 1.0, "{line}: {n}");
    }
}

/// The agent's own `/metrics`: lines by input, malformed lines by reason, what its stream had acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_own_metrics_page_counts_its_inputs_and_its_stream() {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let agent = agent(&aggregator, "self", "v1", "z1", "self-1").await;
    let mut ws = subscribe(http, &["self"]).await;
    let lines: Vec<String> = ["ok:1|c", "ok:2|c", "bad:x|c", "nocolon", "ok:1|zz"]
        .iter()
        .map(|l| l.to_string())
        .collect();
    send_statsd(agent.addr("statsd"), &lines).await;
    next_frame(&mut ws, Duration::from_secs(15), |f| {
        series(f, "ok", None, None).map(|_| ())
    })
    .await;
    let metrics = agent.addr("metrics");
    let mut page = String::new();
    for _ in 0..50 {
        let (status, body) = crate::support::http(metrics, "GET", "/metrics", "").await;
        assert_eq!(status, 200);
        page = body;
        if page.contains("strobe_agent_snapshots_acknowledged_total")
            && !page.contains("strobe_agent_snapshots_acknowledged_total 0\n")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let value = |line_start: &str| -> f64 {
        page.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{line_start} in\n{page}"))
    };
    assert_eq!(
        value("strobe_agent_lines_received_total{input=\"statsd\"}"),
        5.0
    );
    assert_eq!(
        value("strobe_agent_lines_malformed_total{reason=\"bad_value\"}"),
        1.0
    );
    assert_eq!(
        value("strobe_agent_lines_malformed_total{reason=\"missing_value\"}"),
        1.0
    );
    assert_eq!(
        value("strobe_agent_lines_malformed_total{reason=\"unsupported_type\"}"),
        1.0
    );
    assert!(
        value("strobe_agent_snapshots_acknowledged_total") >= 1.0,
        "{page}"
    );
    assert_eq!(value("strobe_agent_connected"), 1.0);
    assert_eq!(value("strobe_agent_snapshots_dropped_total"), 0.0);
    assert_eq!(value("strobe_agent_statsd_kernel_drops_total"), 0.0);
    assert!(value("strobe_agent_seconds_closed_total") >= 1.0, "{page}");

    // The aggregator sums what each snapshot says of its agent, per service: the three malformed lines and the
    // five received arrive with the seconds they fell in.
    let mut page = String::new();
    let reported = |page: &str, counter: &str| -> Option<f64> {
        let line = format!("strobe_agent_reported_total{{service=\"self\",counter=\"{counter}\"}}");
        page.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.trim().parse().ok())
    };
    for _ in 0..50 {
        let (status, body) = crate::support::http(http, "GET", "/metrics", "").await;
        assert_eq!(status, 200);
        page = body;
        if reported(&page, "lines_received") == Some(5.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reported(&page, "lines_received"), Some(5.0), "{page}");
    assert_eq!(reported(&page, "lines_malformed"), Some(3.0), "{page}");
}
