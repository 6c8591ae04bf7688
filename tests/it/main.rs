//! End-to-end tests: real `strobe` processes, real UDP, real gRPC, real websockets.

mod alerts;
mod canary;
mod cluster;
mod deploy;
mod ecosystem;
mod export;
mod receiver;
mod security;
mod support;
mod tls;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// Waits until the aggregator lists `n` instances of `service`.
async fn wait_for_instances(http: std::net::SocketAddr, service: &str, n: usize) {
    eventually(Duration::from_secs(20), "agents to report", || async {
        let doc = get_json(http, "/api/v1/services").await;
        doc["services"].as_array().is_some_and(|all| {
            all.iter().any(|s| {
                s["service"] == service && s["instances"].as_array().map(Vec::len) == Some(n)
            })
        })
    })
    .await;
}

/// Sleeps until the wall clock is early in a second, so a burst of packets lands in one second.
async fn wait_for_start_of_second() -> i64 {
    loop {
        let now = unix_now();
        let frac = now.fract();
        if (0.05..0.3).contains(&frac) {
            return now.floor() as i64;
        }
        let wait = if frac < 0.05 {
            0.05 - frac
        } else {
            1.05 - frac
        };
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_merge_into_one_second_with_true_percentiles() {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let a = agent(&aggregator, "checkout", "v1", "z1", "checkout-a").await;
    let b = agent(&aggregator, "checkout", "v2", "z2", "checkout-b").await;
    wait_for_instances(http, "checkout", 2).await;
    let mut ws = subscribe(http, &["checkout"]).await;

    // A: 995 fast requests (5..54 ms); B: 5 slow ones (800..804 ms). The union's p99 is fast; the mean of the two
    // instances' p99s is about 430 ms.
    let fast: Vec<f64> = (0..995).map(|i| 5.0 + f64::from(i % 50)).collect();
    let slow: Vec<f64> = (0..5).map(|i| 800.0 + f64::from(i)).collect();
    let lines = |values: &[f64], requests: u32| {
        let mut lines: Vec<String> = values
            .iter()
            .map(|v| format!("request.latency:{v}|ms"))
            .collect();
        lines.push(format!("request.count:{requests}|c"));
        lines.push("this is not statsd".to_owned());
        lines
    };
    let t = wait_for_start_of_second().await;
    send_statsd(a.addr("statsd"), &lines(&fast, 7)).await;
    send_statsd(b.addr("statsd"), &lines(&slow, 5)).await;
    assert_eq!(
        unix_now().floor() as i64,
        t,
        "the burst crossed a second boundary"
    );

    let frame = next_frame(&mut ws, Duration::from_secs(10), |f| {
        (f["type"] == "second" && f["t"] == t && f["service"] == "checkout").then(|| f.clone())
    })
    .await;

    let mut union: Vec<f64> = fast.iter().chain(&slow).copied().collect();
    union.sort_by(f64::total_cmp);
    let rank =
        |sorted: &[f64], q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).max(1) - 1];
    let union_p99 = rank(&union, 0.99);
    let mean_of_p99s = (rank(&fast, 0.99) + rank(&slow, 0.99)) / 2.0;

    let latency = series(&frame, "request.latency", None, None).expect("merged latency");
    assert_eq!(latency["kind"], "histogram");
    assert_eq!(latency["count"], 1000);
    assert_eq!(latency["instances"], 2);
    let p99 = latency["p99"].as_f64().unwrap();
    assert!(
        (p99 - union_p99).abs() <= union_p99 * 0.01 + 0.01,
        "p99 {p99} vs union {union_p99}"
    );
    assert!(
        (p99 - mean_of_p99s).abs() > 100.0,
        "p99 {p99} must not be the mean of p99s {mean_of_p99s}"
    );
    let max = latency["max"].as_f64().unwrap();
    assert!((max - 804.0).abs() <= 804.0 * 0.01, "max {max}");

    let requests = series(&frame, "request.count", None, None).expect("merged counter");
    assert_eq!(requests["sum"], 12.0);
    assert_eq!(requests["instances"], 2);

    let by_version = |v: &str| {
        series(&frame, "request.latency", Some(v), None)
            .cloned()
            .expect("version split")
    };
    assert_eq!(by_version("v1")["count"], 995);
    assert_eq!(by_version("v1")["instances"], 1);
    assert_eq!(by_version("v2")["count"], 5);
    let slow_p99 = by_version("v2")["p99"].as_f64().unwrap();
    assert!(slow_p99 >= 800.0 * 0.99, "v2 p99 {slow_p99}");
    let zone = series(&frame, "request.count", None, Some("z2")).expect("zone split");
    assert_eq!(zone["sum"], 5.0);

    // The API serves the newest sealed second of the service.
    let newest = get_json(http, "/api/v1/series?service=checkout").await;
    assert_eq!(newest["service"], "checkout");
    assert!(newest["t"].as_i64().unwrap() >= t, "{newest}");
    assert!(newest["series"].as_array().is_some(), "{newest}");
    let (status, _) = http_json(http, "GET", "/api/v1/series?service=nope", "").await;
    assert_eq!(status, 404);

    // The second is in the history a late subscriber gets as backfill.
    let mut late = subscribe(http, &["checkout"]).await;
    let replayed = next_frame(&mut late, Duration::from_secs(5), |f| {
        (f["t"] == t).then(|| f.clone())
    })
    .await;
    assert_eq!(
        series(&replayed, "request.count", None, None).unwrap()["sum"],
        12.0
    );
    drop((a, b));
}

/// Reads `ws` for `within`: the service, second and correction flag of each full second frame.
async fn read_seconds(ws: &mut Ws, within: Duration) -> Vec<(String, i64, bool)> {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + within;
    let mut seconds = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, ws.next()).await {
        let Ok(tokio_tungstenite::tungstenite::Message::Text(text)) = message else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "second" {
            seconds.push((
                frame["service"].as_str().unwrap_or_default().to_owned(),
                frame["t"].as_i64().unwrap(),
                frame["correction"] == true,
            ));
        }
    }
    seconds
}

/// A dashboard's view of one service hears that service's full seconds alone (on a broadcast of its own); asking
/// for every service's then, it hears those too, live, and every second of the first service comes once (a
/// correction aside), with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_view_hears_its_service_alone_then_every_second_once_after_asking_for_all() {
    use futures_util::SinkExt;
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let _feed = agent(&aggregator, "feed", "v1", "z1", "feed-a").await;
    let _other = agent(&aggregator, "other", "v1", "z1", "other-a").await;
    wait_for_instances(http, "feed", 1).await;
    wait_for_instances(http, "other", 1).await;
    let mut ws = subscribe(http, &["feed"]).await;
    let mut seen = read_seconds(&mut ws, Duration::from_secs(4)).await;
    assert!(
        seen.iter().all(|(service, _, _)| service == "feed"),
        "one service's view hears no other service's full seconds: {seen:?}"
    );
    let before = seen.len();
    assert!(before >= 3, "its own, backfill and live: {seen:?}");
    let moved_at = unix_now().floor() as i64;
    let everything = serde_json::json!({ "subscribe": { "services": [] } }).to_string();
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        everything.into(),
    ))
    .await
    .unwrap();
    seen.extend(read_seconds(&mut ws, Duration::from_secs(6)).await);
    let live_others = seen
        .iter()
        .filter(|(service, t, _)| service == "other" && *t >= moved_at)
        .count();
    assert!(
        live_others >= 2,
        "every service's full seconds, live, after asking for all: {seen:?}"
    );
    let feed: Vec<(i64, bool)> = seen
        .iter()
        .filter(|(service, _, _)| service == "feed")
        .map(|(_, t, correction)| (*t, *correction))
        .collect();
    assert!(
        feed.len() >= before + 3,
        "its seconds kept coming after the move: {feed:?}"
    );
    let mut firsts: Vec<i64> = feed.iter().filter(|(_, c)| !c).map(|(t, _)| *t).collect();
    let sent = firsts.len();
    firsts.sort_unstable();
    firsts.dedup();
    assert_eq!(firsts.len(), sent, "no second twice: {feed:?}");
    let mut all: Vec<i64> = feed.iter().map(|(t, _)| *t).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all[all.len() - 1] - all[0] + 1,
        all.len() as i64,
        "no second missing: {feed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_second_is_lost_while_the_aggregator_restarts() {
    let grpc = free_local_addr();
    let first = aggregator_on(&grpc).await;
    let agent = agent(&first, "replay", "v1", "z1", "replay-1").await;
    wait_for_instances(first.addr("http"), "replay", 1).await;

    // Send one increment every 50 ms, away from second boundaries so each is attributed to a known second.
    let mut sent: BTreeMap<i64, u32> = BTreeMap::new();
    send_for(agent.addr("statsd"), 2.0, &mut sent).await;
    drop(first); // killed: its acknowledged seconds go with it
    let down_from = unix_now().floor() as i64 + 1;
    send_for(agent.addr("statsd"), 3.0, &mut sent).await;
    let down_until = unix_now().floor() as i64 - 1;
    let second = aggregator_on(&grpc).await;
    send_for(agent.addr("statsd"), 1.5, &mut sent).await;
    let http = second.addr("http");

    // Every second fully inside the outage reaches the new aggregator, once, with exactly what was sent.
    let mut ws = subscribe(http, &["replay"]).await;
    let mut got: BTreeMap<i64, f64> = BTreeMap::new();
    next_frame(&mut ws, Duration::from_secs(20), |f| {
        if let (Some(t), Some(s)) = (f["t"].as_i64(), series(f, "ticks", None, None)) {
            got.insert(t, s["sum"].as_f64().unwrap());
        }
        (down_from..=down_until)
            .all(|t| got.contains_key(&t))
            .then_some(())
    })
    .await;
    assert!(down_until >= down_from, "the outage covered whole seconds");
    for t in down_from..=down_until {
        assert_eq!(
            got[&t],
            f64::from(sent[&t]),
            "second {t}: {got:?} vs {sent:?}"
        );
    }
    let (_, metrics) = support::http(http, "GET", "/metrics", "").await;
    assert!(
        metrics.contains("strobe_snapshots_accepted_total"),
        "{metrics}"
    );
}

/// The aggregator is killed (SIGKILL) and stays down 30 s, three times `late_window`, while eight agents of two
/// services keep counting; it comes back on the same ports, the agents reconnect at different moments (each on its
/// own backoff) and replay. Every second of the outage is then counted exactly once for every agent: the first
/// replay gets the old seconds sealed, and the others merge into them as corrections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_loses_nothing_when_agents_reconnect_at_different_moments() {
    outage_loses_nothing("outage-30s", Duration::from_secs(30)).await;
}

/// The same with the aggregator down for three minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_minute_outage_loses_nothing() {
    outage_loses_nothing("outage-3m", Duration::from_secs(180)).await;
}

/// Eight agents (four per service), the aggregator killed and down for `outage`, then every second fully inside
/// the outage counted exactly once per service (nothing lost, nothing twice), and nothing refused as too late.
async fn outage_loses_nothing(name: &str, outage: Duration) {
    let grpc = free_local_addr();
    let first = aggregator_on(&grpc).await;
    let services = [format!("{name}-a"), format!("{name}-b")];
    let mut agents = Vec::new();
    for service in &services {
        for n in 0..4 {
            agents.push(agent(&first, service, "v1", "z1", &format!("{service}-{n}")).await);
        }
    }
    for service in &services {
        wait_for_instances(first.addr("http"), service, 4).await;
    }
    // What the first aggregator counted (and published) before it died.
    let before: Vec<std::sync::Arc<std::sync::Mutex<BTreeMap<i64, f64>>>> = {
        let mut maps = Vec::new();
        for service in &services {
            let map = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
            let mut ws = subscribe(first.addr("http"), &[service]).await;
            let into = map.clone();
            tokio::spawn(async move {
                while let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) =
                    futures_util::StreamExt::next(&mut ws).await
                {
                    let f: Value = serde_json::from_str(&text).unwrap();
                    if let (Some(t), Some(s)) = (f["t"].as_i64(), series(&f, "ticks", None, None)) {
                        into.lock().unwrap().insert(t, s["sum"].as_f64().unwrap());
                    }
                }
            });
            maps.push(map);
        }
        maps
    };
    let statsd: Vec<Vec<std::net::SocketAddr>> = agents
        .chunks(4)
        .map(|c| c.iter().map(|a| a.addr("statsd")).collect())
        .collect();
    let (mut sent_a, mut sent_b) = (BTreeMap::new(), BTreeMap::new());
    let both = |secs: f64, a: &mut BTreeMap<i64, u32>, b: &mut BTreeMap<i64, u32>| {
        let (sa, sb) = (statsd[0].clone(), statsd[1].clone());
        let (mut ma, mut mb) = (std::mem::take(a), std::mem::take(b));
        async move {
            tokio::join!(
                send_round_robin(&sa, secs, &mut ma),
                send_round_robin(&sb, secs, &mut mb)
            );
            (ma, mb)
        }
    };
    (sent_a, sent_b) = both(2.0, &mut sent_a, &mut sent_b).await;
    drop(first); // SIGKILL
    let down_from = unix_now().floor() as i64 + 1;
    (sent_a, sent_b) = both(outage.as_secs_f64(), &mut sent_a, &mut sent_b).await;
    let down_until = unix_now().floor() as i64 - 1;
    let second = aggregator_on(&grpc).await;
    let http = second.addr("http");
    let mut ws_a = subscribe(http, &[&services[0]]).await;
    let mut ws_b = subscribe(http, &[&services[1]]).await;
    (sent_a, sent_b) = both(2.0, &mut sent_a, &mut sent_b).await;
    let within = Duration::from_secs(40) + outage / 4;
    counted_exactly(&mut ws_a, within, down_from..=down_until, &sent_a).await;
    counted_exactly(&mut ws_b, within, down_from..=down_until, &sent_b).await;
    // And every second sent, the ones around the kill included: each counted in full by one aggregator or the
    // other (what the first had acknowledged it had counted and published; what it had not, the agents replayed
    // to the second), never more than sent by either.
    for ((service, sent), before) in [(&services[0], &sent_a), (&services[1], &sent_b)]
        .into_iter()
        .zip(&before)
    {
        let before = before.lock().unwrap().clone();
        let mut after: BTreeMap<i64, f64> = BTreeMap::new();
        // A fresh subscription: its backfill holds every second the new aggregator has, as corrected.
        let mut ws = subscribe(http, &[service]).await;
        next_frame(&mut ws, within, |f| {
            if let (Some(t), Some(s)) = (f["t"].as_i64(), series(f, "ticks", None, None)) {
                after.insert(t, s["sum"].as_f64().unwrap());
            }
            let mut missing = Vec::new();
            for (t, n) in sent {
                let n = f64::from(*n);
                let (old, new) = (before.get(t).copied(), after.get(t).copied());
                assert!(
                    old.unwrap_or(0.0) <= n && new.unwrap_or(0.0) <= n,
                    "second {t} counted more than sent: {old:?} / {new:?} of {n}"
                );
                if old != Some(n) && new != Some(n) {
                    missing.push((*t, old, new, n));
                }
            }
            if !missing.is_empty() {
                eprintln!(
                    "not yet counted in full by either (second, first, second, sent): {missing:?}"
                );
            }
            missing.is_empty().then_some(())
        })
        .await;
    }
    let (_, metrics) = support::http(http, "GET", "/metrics", "").await;
    assert!(
        metrics.contains("strobe_snapshots_too_late_total 0"),
        "{metrics}"
    );
}

/// An agent whose clock is 3 s ahead learns the aggregator's time from its acks and closes its windows on it: once
/// it has, what it counts lands in the seconds it was sent in (by the aggregator's clock), exactly. Another instance
/// of its service is on time, so its seconds are sealed (and acknowledged) only when that one's arrive, seconds
/// after it sent them: the acks say when its snapshots were received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_clock_is_ahead_counts_into_the_right_seconds() {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let target = format!("http://{}", aggregator.addr("grpc"));
    let _on_time = agent(&aggregator, "skewed", "v1", "z1", "skewed-on-time").await;
    let agent = agent_to(&target, "skewed", &["--simulate-clock-skew-ms", "3000"]).await;
    // A few acks (one a second) teach it the offset.
    wait_for_instances(http, "skewed", 2).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut ws = subscribe(http, &["skewed"]).await;
    let mut sent: BTreeMap<i64, u32> = BTreeMap::new();
    send_for(agent.addr("statsd"), 3.0, &mut sent).await;
    let (first, last) = (*sent.keys().next().unwrap(), *sent.keys().last().unwrap());
    counted_exactly(&mut ws, Duration::from_secs(20), first..=last, &sent).await;
}

/// Ten seconds ahead is past `max_future_skew` (5 s): its first seconds are refused for now, not acknowledged, kept
/// by the agent, and sent again on the aggregator's clock once the agent has learnt it; every count lands in the
/// second it was sent in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_far_ahead_has_its_refused_seconds_kept_and_counted_in_the_right_seconds() {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let target = format!("http://{}", aggregator.addr("grpc"));
    let mut ws = subscribe(http, &["far-ahead"]).await;
    let agent = agent_to(&target, "far-ahead", &["--simulate-clock-skew-ms", "10000"]).await;
    // From the first second on, before the agent knows its clock is off.
    let mut sent: BTreeMap<i64, u32> = BTreeMap::new();
    send_for(agent.addr("statsd"), 6.0, &mut sent).await;
    let (first, last) = (*sent.keys().next().unwrap(), *sent.keys().last().unwrap());
    counted_exactly(&mut ws, Duration::from_secs(30), first..=last, &sent).await;
    let (_, metrics) = support::http(http, "GET", "/metrics", "").await;
    assert!(
        metrics.contains("strobe_dropped_total{limit=\"max_future_skew\"}"),
        "the refusals are counted: {metrics}"
    );
}

/// One hostile gRPC client: thousands of histograms reaching to the largest value allowed, second after second,
/// then seconds far in the past and future and random bytes as histograms. With a per-service budget of 64 MiB
/// the aggregator's memory grows by at most 512 MiB (it would take the whole `max_decoded_bytes`, 1 GiB, were the
/// budget not kept: each of the hostile stream's 60 seconds alone would fill the budget), and a service
/// streaming at the same time keeps every count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_is_contained_and_costs_others_nothing() {
    use hdrhistogram::serialization::{Serializer, V2Serializer};
    use strobe_proto as pb;

    // With the default budget (256 MiB) the aggregator grew by about 310 MiB alone and once by 575 MiB in a loaded
    // full run: too little room under 512 MiB for what sealing and the allocator add. With 64 MiB, about 95 MiB.
    let config = write_temp(
        "hostile.toml",
        "[aggregator.limits]\nmax_decoded_bytes_per_service = 67108864\n",
    );
    let aggregator = aggregator(&["--config", config.to_str().unwrap()]).await;
    let http = aggregator.addr("http");
    let calm = agent(&aggregator, "calm", "v1", "z1", "calm-1").await;
    wait_for_instances(http, "calm", 1).await;
    let mut ws = subscribe(http, &["calm"]).await;
    let before = aggregator.rss_bytes();

    // Spanning the whole range: accumulators hold counts from the lowest to the highest value recorded, so this is
    // the histogram that costs most memory per byte sent.
    let mut far = hdrhistogram::Histogram::<u64>::new(2).unwrap();
    far.record(1).unwrap();
    far.record(1 << 52).unwrap();
    let mut far_bytes = Vec::new();
    V2Serializer::new().serialize(&far, &mut far_bytes).unwrap();
    let histogram = |bytes: Vec<u8>| {
        Some(pb::series::Value::Histogram(pb::Histogram {
            hdr_v2: bytes.into(),
            scale: 1,
            ..Default::default()
        }))
    };
    let series = |n: usize, bytes: &[u8]| -> Vec<pb::Series> {
        (0..n)
            .map(|i| pb::Series {
                id: 0,
                name: format!("h{i}"),
                tags: vec![],
                value: histogram(bytes.to_vec()),
            })
            .collect()
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(8);
    let mut client =
        pb::ingest_client::IngestClient::connect(format!("http://{}", aggregator.addr("grpc")))
            .await
            .unwrap();
    let hostile = tokio::spawn(async move {
        let mut answers = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        while let Ok(Some(_)) = answers.message().await {}
    });
    let send = |body| {
        let tx = tx.clone();
        async move { tx.send(pb::AgentMessage { body: Some(body) }).await.is_ok() }
    };
    assert!(
        send(pb::agent_message::Body::Hello(pb::Hello {
            identity: Some(pb::Identity {
                service: "evil".into(),
                version: "v1".into(),
                zone: String::new(),
                instance: "evil-1".into(),
                labels: Default::default(),
            }),
            ..Default::default()
        }))
        .await
    );
    let now = unix_now().floor() as i64;
    let mut sent: BTreeMap<i64, u32> = BTreeMap::new();
    let counting = send_for(calm.addr("statsd"), 4.0, &mut sent);
    let attacking = async {
        for s in 0..60 {
            let snapshot = pb::Snapshot {
                second: now - 1 - s,
                series: series(5_000, &far_bytes),
                stats: None,
            };
            send(pb::agent_message::Body::Snapshot(snapshot)).await;
        }
        for second in [-(1i64 << 60), 0, now - 365 * 86_400, now + 365 * 86_400] {
            let snapshot = pb::Snapshot {
                second,
                series: series(10, &far_bytes),
                stats: None,
            };
            send(pb::agent_message::Body::Snapshot(snapshot)).await;
        }
        let junk: Vec<u8> = (0..64u8).map(|b| b.wrapping_mul(37)).collect();
        let snapshot = pb::Snapshot {
            second: now,
            series: series(1_000, &junk),
            stats: None,
        };
        send(pb::agent_message::Body::Snapshot(snapshot)).await;
    };
    tokio::join!(counting, attacking);
    let (first, last) = (*sent.keys().next().unwrap(), *sent.keys().last().unwrap());
    counted_exactly(&mut ws, Duration::from_secs(20), first..=last, &sent).await;
    // Every kind of refusal counted (the hostile stream is read in order, after its histograms).
    eventually(Duration::from_secs(30), "every refusal counted", || async {
        let (_, metrics) = support::http(http, "GET", "/metrics", "").await;
        [
            "max_decoded_bytes_per_service",
            "max_snapshot_age",
            "max_future_skew",
            "hdr_v2_encoding",
        ]
        .iter()
        .all(|limit| metrics.contains(&format!("strobe_dropped_total{{limit=\"{limit}\"}}")))
    })
    .await;
    let grown = aggregator.rss_bytes().saturating_sub(before);
    eprintln!("the aggregator's RSS grew by {} MiB", grown >> 20);
    assert!(grown <= 512 << 20, "RSS grew by {} MiB", grown >> 20);
    drop(tx);
    hostile.abort();
}

/// Reads frames until every second in `seconds` has counted exactly what `sent` says of the `ticks` counter (the
/// newest frame of a second, live or correction, is what counts). On a timeout, the last line printed says which
/// seconds were not counted exactly.
async fn counted_exactly(
    ws: &mut Ws,
    within: Duration,
    seconds: std::ops::RangeInclusive<i64>,
    sent: &BTreeMap<i64, u32>,
) {
    let mut got: BTreeMap<i64, f64> = BTreeMap::new();
    next_frame(ws, within, |f| {
        if let (Some(t), Some(s)) = (f["t"].as_i64(), series(f, "ticks", None, None)) {
            got.insert(t, s["sum"].as_f64().unwrap());
        }
        let missing: Vec<(i64, Option<f64>, Option<u32>)> = seconds
            .clone()
            .filter(|t| got.get(t).copied() != sent.get(t).map(|n| f64::from(*n)))
            .map(|t| (t, got.get(&t).copied(), sent.get(&t).copied()))
            .collect();
        if !missing.is_empty() {
            eprintln!("not yet counted exactly (second, counted, sent): {missing:?}");
        }
        missing.is_empty().then_some(())
    })
    .await;
}

/// Websocket clients are bounded: per address (a third client from the same address is answered 503 while two
/// are connected, and gets in once one leaves), and in what they may send (an oversized message ends the connection;
/// a subscription naming too many services is answered with an error and changes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_are_bounded_per_address_and_in_what_they_send() {
    use futures_util::{SinkExt, StreamExt};
    let config = write_temp(
        "ws-limits.toml",
        "[aggregator.limits]\nmax_websocket_clients_per_address = 2\nmax_websocket_message_bytes = 1024\n\
         max_subscribed_services = 3\n",
    );
    let aggregator = aggregator(&["--config", config.to_str().unwrap()]).await;
    let http = aggregator.addr("http");
    let url = format!("ws://{http}/api/v1/stream");
    let mut first = subscribe(http, &["a"]).await;
    let second = subscribe(http, &["a"]).await;
    let refused = tokio_tungstenite::connect_async(&url).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!(
            "a third client got in: {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
    drop(second);
    // The slot comes back once the server notices the close.
    let mut third = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await {
            third = Some(ws);
            break;
        }
    }
    assert!(third.is_some(), "the freed slot was never given back");
    // Too many services: an error frame.
    let many = serde_json::json!({ "subscribe": { "services": ["a", "b", "c", "d"] } }).to_string();
    first
        .send(tokio_tungstenite::tungstenite::Message::Text(many.into()))
        .await
        .unwrap();
    let error = next_frame(&mut first, Duration::from_secs(5), |f| {
        (f["type"] == "error").then(|| f["error"].as_str().unwrap_or_default().to_owned())
    })
    .await;
    assert!(error.contains("max_subscribed_services"), "{error}");
    // Oversized: the connection ends.
    let big = format!(
        "{{\"subscribe\":{{\"services\":[\"{}\"]}}}}",
        "x".repeat(4096)
    );
    first
        .send(tokio_tungstenite::tungstenite::Message::Text(big.into()))
        .await
        .ok();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match first.next().await {
                None
                | Some(Err(_))
                | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => {
                    return;
                }
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "an oversized message did not end the connection"
    );
}

/// Sends one increment every 50 ms for `secs`, to each agent in turn, away from second boundaries.
async fn send_round_robin(
    statsd: &[std::net::SocketAddr],
    secs: f64,
    sent: &mut BTreeMap<i64, u32>,
) {
    let until = unix_now() + secs;
    let mut n = 0;
    while unix_now() < until {
        let now = unix_now();
        if (0.1..0.9).contains(&now.fract()) {
            send_statsd(statsd[n % statsd.len()], &["ticks:1|c".to_owned()]).await;
            *sent.entry(now.floor() as i64).or_default() += 1;
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends one increment every 50 ms for `secs`, away from second boundaries so each lands in a known second.
async fn send_for(statsd: std::net::SocketAddr, secs: f64, sent: &mut BTreeMap<i64, u32>) {
    let until = unix_now() + secs;
    while unix_now() < until {
        let now = unix_now();
        if (0.1..0.9).contains(&now.fract()) {
            send_statsd(statsd, &["ticks:1|c".to_owned()]).await;
            *sent.entry(now.floor() as i64).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn aggregator_on(grpc: &str) -> Process {
    spawn(&[
        "aggregator",
        "--grpc-addr",
        grpc,
        "--http-addr",
        "127.0.0.1:0",
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_reason_and_the_rest_survives() {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let a = agent(&aggregator, "robust", "v1", "", "robust-1").await;
    wait_for_instances(http, "robust", 1).await;
    let mut ws = subscribe(http, &["robust"]).await;
    let t = wait_for_start_of_second().await;
    let lines: Vec<String> = [
        "good:1|c",
        "nan:NaN|g",
        "inf:inf|ms",
        "neg:--1|ms",
        "rate:1|c|@7",
        ":1|c",
        "x:1|s",
        "\u{1}:1|c",
        "good:2|c",
        "gauge:4|g",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    send_statsd(a.addr("statsd"), &lines).await;
    let frame: Value = next_frame(&mut ws, Duration::from_secs(10), |f| {
        (f["t"] == t).then(|| f.clone())
    })
    .await;
    assert_eq!(series(&frame, "good", None, None).unwrap()["sum"], 3.0);
    assert_eq!(series(&frame, "gauge", None, None).unwrap()["max"], 4.0);
    let metrics: Vec<&str> = frame["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["metric"].as_str())
        .collect();
    assert!(
        metrics.iter().all(|m| ["good", "gauge"].contains(m)),
        "{metrics:?}"
    );
    // A client message that is not a subscription gets an error frame, and the connection stays up.
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "{\"subscribe\":{\"servics\":[]}}".into(),
    ))
    .await
    .unwrap();
    let error = next_frame(&mut ws, Duration::from_secs(5), |f| {
        (f["type"] == "error").then(|| f.clone())
    })
    .await;
    assert!(
        error["error"].as_str().unwrap().contains("servics"),
        "{error}"
    );
    next_frame(&mut ws, Duration::from_secs(5), |f| {
        (f["type"] == "second").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_aggregator_is_down_stops_within_its_drain_timeout_on_sigterm() {
    // An aggregator that took a few seconds and then went away: the agent holds unacknowledged seconds and
    // keeps failing to reconnect.
    let aggregator = aggregator(&[]).await;
    let mut agent = agent(&aggregator, "orphan", "v1", "z1", "orphan-1").await;
    wait_for_instances(aggregator.addr("http"), "orphan", 1).await;
    drop(aggregator);
    send_statsd(agent.addr("statsd"), &["ticks:1|c".to_owned()]).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The default drain timeout is 2 s; a few more for the process to exit. Before, it ran until killed.
    let status = agent.terminate(Duration::from_secs(8)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent exited cleanly after SIGTERM: {status:?}"
    );
}

/// A TCP proxy that can turn every connection open now into a black hole (bytes taken, none passed on, nothing
/// closed: a half-open connection, as a dead NAT entry or a frozen peer leaves it), while new connections pass.
struct Blackhole {
    addr: std::net::SocketAddr,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Blackhole {
    async fn start(to: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let current = generation.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let born = current.load(Ordering::SeqCst);
                let current = current.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let pump = move |mut from: tokio::net::tcp::OwnedReadHalf,
                                mut to: tokio::net::tcp::OwnedWriteHalf,
                                current: std::sync::Arc<std::sync::atomic::AtomicU64>| async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let Ok(n) = from.read(&mut buf).await else { return };
                            if n == 0 {
                                return;
                            }
                            if current.load(Ordering::SeqCst) != born {
                                continue; // swallowed: the peer never hears of it
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let up = pump(cr, sw, current.clone());
                    let down = pump(sr, cw, current);
                    tokio::join!(up, down);
                });
            }
        });
        Self { addr, generation }
    }

    /// Every connection open now goes silent; later ones pass.
    fn swallow_open_connections(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The agent's connection goes half-open (nothing passes, nothing closes): its HTTP/2 keepalive notices within
/// seconds, it reconnects and replays, and every count lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_noticed_and_nothing_is_lost() {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let proxy = Blackhole::start(aggregator.addr("grpc")).await;
    let agent = agent_to(&format!("http://{}", proxy.addr), "half-open", &[]).await;
    wait_for_instances(http, "half-open", 1).await;
    let mut ws = subscribe(http, &["half-open"]).await;
    let mut sent: BTreeMap<i64, u32> = BTreeMap::new();
    send_for(agent.addr("statsd"), 2.0, &mut sent).await;
    proxy.swallow_open_connections();
    let silent_at = std::time::Instant::now();
    send_for(agent.addr("statsd"), 6.0, &mut sent).await;
    let (first, last) = (*sent.keys().next().unwrap(), *sent.keys().last().unwrap());
    // keepalive_interval + keepalive_timeout (5 s + 5 s) to notice, a backoff to reconnect, then the replay.
    counted_exactly(&mut ws, Duration::from_secs(30), first..=last, &sent).await;
    eprintln!(
        "every count in after the connection went silent: {:?}",
        silent_at.elapsed()
    );
}

/// DogStatsD as Datadog's agent reads it, end to end: a decrement lowers a counter, a negative histogram value
/// lands in the series' `sign:negative` sibling, empty values in a packed line are skipped, `host:` is no dimension.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dogstatsd_decrements_negative_values_packed_lines_and_host_tags_are_read_as_datadog_reads_them()
 {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let agent = agent(&aggregator, "dd", "v1", "z1", "dd-1").await;
    let mut ws = subscribe(http, &["dd"]).await;
    // Mid-second, so every line falls in one known second.
    let t = wait_for_start_of_second().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines: Vec<String> = [
        "jobs.queued:5|c",
        "jobs.queued:-2|c",
        "temp.delta:-5|h|#room:a",
        "temp.delta:3|h|#room:a",
        "packed:1::2|h",
        "req:1|c|#host:web-1,route:/a",
        "sampled:1|c|@0.5",
        "sampled.lat:10:20:30|ms|@0.4",
    ]
    .iter()
    .map(|l| l.to_string())
    .collect();
    send_statsd(agent.addr("statsd"), &lines).await;
    let frame = next_frame(&mut ws, Duration::from_secs(15), |f| {
        (f["t"].as_i64() == Some(t) && series(f, "jobs.queued", None, None).is_some())
            .then(|| f.clone())
    })
    .await;
    let all = |metric: &str| -> Vec<Value> {
        frame["series"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["metric"] == metric && s["version"].is_null() && s["zone"].is_null())
            .cloned()
            .collect()
    };
    assert_eq!(
        series(&frame, "jobs.queued", None, None).unwrap()["sum"],
        3.0
    );
    let temp = all("temp.delta");
    assert_eq!(temp.len(), 2, "{temp:?}");
    for s in &temp {
        assert_eq!(s["count"], 1, "{s}");
        assert_eq!(s["tags"]["room"], "a");
    }
    assert!(temp.iter().any(|s| s["tags"]["sign"] == "negative"));
    assert_eq!(all("packed")[0]["count"], 2);
    let req = &all("req")[0];
    assert_eq!(req["sum"], 1.0);
    assert!(req["tags"].get("host").is_none(), "{req}");
    assert_eq!(req["tags"]["route"], "/a");
    // Sample rates: a counter divided by its rate; three timer values at @0.4 count twice each, the whole part of
    // 1/0.4, as Datadog's agent counts them.
    assert_eq!(all("sampled")[0]["sum"], 2.0);
    assert_eq!(all("sampled.lat")[0]["count"], 6);
}

/// A real HTTP server exposing Prometheus text (a counter that resets once, a classic histogram), scraped by the
/// agent every second: each second carries the counter's delta and the histogram's new observations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_page_is_scraped_into_per_second_deltas_with_resets_and_histograms() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let scrapes = std::sync::Arc::new(AtomicU32::new(0));
    let served = scrapes.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let served = served.clone();
            async move {
                // Each scrape: 10 more requests, 2 fast and 1 slower observations. The 6th scrape sees a restarted
                // process: the counter at 3, the buckets from zero.
                let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                let (requests, k) = if n >= 6 { (3 + 10 * (n - 6), n - 5) } else { (10 * n, n) };
                format!(
                    "# TYPE http_requests_total counter\nhttp_requests_total{{route=\"/a\"}} {requests}\n\
                     # TYPE req_duration_seconds histogram\n\
                     req_duration_seconds_bucket{{le=\"0.1\"}} {}\nreq_duration_seconds_bucket{{le=\"0.5\"}} {}\n\
                     req_duration_seconds_bucket{{le=\"+Inf\"}} {}\nreq_duration_seconds_sum 1\n\
                     req_duration_seconds_count {}\n",
                    2 * k,
                    3 * k,
                    3 * k,
                    3 * k
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page = format!("http://{}/metrics", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let target = format!("http://{}", aggregator.addr("grpc"));
    let mut ws = subscribe(http, &["scraped"]).await;
    let _agent = agent_to(&target, "scraped", &["--scrape", &page]).await;
    let mut seconds: BTreeMap<i64, (f64, u64, f64)> = BTreeMap::new();
    next_frame(&mut ws, Duration::from_secs(30), |f| {
        if let (Some(t), Some(requests), Some(latency)) = (
            f["t"].as_i64(),
            series(f, "http_requests_total", None, None),
            series(f, "req_duration_seconds", None, None),
        ) {
            seconds.insert(
                t,
                (
                    requests["sum"].as_f64().unwrap(),
                    latency["count"].as_u64().unwrap(),
                    latency["max"].as_f64().unwrap(),
                ),
            );
        }
        (seconds.len() >= 8).then_some(())
    })
    .await;
    let deltas: Vec<f64> = seconds.values().map(|(d, _, _)| *d).collect();
    assert_eq!(
        deltas.iter().filter(|d| **d == 3.0).count(),
        1,
        "one second sees the reset: {seconds:?}"
    );
    assert!(
        deltas.iter().all(|d| *d == 10.0 || *d == 3.0),
        "{seconds:?}"
    );
    for (t, (_, count, max)) in &seconds {
        assert_eq!(*count, 3, "second {t}: {seconds:?}");
        // The slower observation is in (100 ms, 500 ms]: recorded at the bucket's middle, 300 ms.
        assert!((*max - 300.0).abs() <= 3.0, "second {t}: {seconds:?}");
    }
}

/// An agent 2 s ahead (inside `max_future_skew`) counts from its first second: its first seconds are taken where its
/// clock stamped them, then it corrects its clock, and the window it moves back must not land on a second already
/// taken. Nothing is lost: the total over all seconds is what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_slightly_ahead_loses_nothing_while_it_corrects_its_clock() {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let target = format!("http://{}", aggregator.addr("grpc"));
    let mut ws = subscribe(http, &["slightly-ahead"]).await;
    let agent = agent_to(
        &target,
        "slightly-ahead",
        &["--simulate-clock-skew-ms", "2000"],
    )
    .await;
    let mut sent: BTreeMap<i64, u32> = BTreeMap::new();
    send_for(agent.addr("statsd"), 8.0, &mut sent).await;
    let total: u32 = sent.values().sum();
    let mut counted: BTreeMap<i64, f64> = BTreeMap::new();
    next_frame(&mut ws, Duration::from_secs(20), |f| {
        if let (Some(t), Some(s)) = (f["t"].as_i64(), series(f, "ticks", None, None)) {
            counted.insert(t, s["sum"].as_f64().unwrap());
        }
        let sum: f64 = counted.values().sum();
        assert!(
            sum <= f64::from(total),
            "more than sent: {counted:?} vs {sent:?}"
        );
        (sum == f64::from(total)).then_some(())
    })
    .await;
}

/// The `examples/metrics_facade.rs` program (a Rust service instrumented with the `metrics` crate, its agent in
/// process) reaches the aggregator: every request it counted and every latency it recorded, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_service_using_the_metrics_facade_is_counted_exactly() {
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let mut ws = subscribe(http, &["facade-example"]).await;
    let example = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .map(|debug| debug.join("examples").join("metrics_facade"))
        .expect("the target directory");
    let output = tokio::process::Command::new(&example)
        .args([
            format!("http://{}", aggregator.addr("grpc")),
            "4".to_owned(),
        ])
        .env("STROBE_LOG", "warn")
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{} runs (cargo test builds examples): {e}",
                example.display()
            )
        });
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| -> f64 {
        stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {stdout}"))
    };
    let (requests, latencies) = (field("requests"), field("latencies"));
    assert!(requests > 100.0, "{stdout}");
    let mut per_second: BTreeMap<i64, (f64, f64)> = BTreeMap::new();
    let mut gauges: BTreeMap<i64, f64> = BTreeMap::new();
    next_frame(&mut ws, Duration::from_secs(20), |f| {
        let t = f["t"].as_i64()?;
        let overall = |metric: &str, field: &str| -> f64 {
            f["series"]
                .as_array()
                .map(|all| {
                    all.iter()
                        .filter(|s| {
                            s["metric"] == metric && s["version"].is_null() && s["zone"].is_null()
                        })
                        .filter_map(|s| s[field].as_f64())
                        .sum()
                })
                .unwrap_or(0.0)
        };
        per_second.insert(
            t,
            (
                overall("http.requests", "sum"),
                overall("http.latency_ms", "count"),
            ),
        );
        if let Some(gauge) = series(f, "http.inflight", None, None) {
            gauges.insert(t, gauge["max"].as_f64().unwrap_or(f64::NAN));
        }
        let (r, l) = per_second
            .values()
            .fold((0.0, 0.0), |(r, l), (a, b)| (r + a, l + b));
        assert!(
            r <= requests && l <= latencies,
            "more than recorded: {per_second:?} {stdout}"
        );
        (r == requests && l == latencies).then_some(())
    })
    .await;
    // A gauge is its value at the end of each second: the example sets `requests % 7` before counting a request,
    // so the last second ends on the last request's value.
    assert!(
        gauges
            .values()
            .all(|v| (0.0..=6.0).contains(v) && v.fract() == 0.0),
        "{gauges:?}"
    );
    let last = gauges.last_key_value().map(|(_, v)| *v);
    assert_eq!(last, Some((requests - 1.0) % 7.0), "{gauges:?} {stdout}");
}
