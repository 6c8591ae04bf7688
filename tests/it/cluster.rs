//! Three aggregator nodes on a real etcd (Debian's `etcd-server`, installed by the test command): agents of 30
//! services all dial the first node and are spread by redirects; a node killed with SIGKILL loses its services to
//! the others and gets them back when it returns; every second of every service is counted exactly once across
//! the moves; an alert firing on the killed node is neither lost nor sent twice, and one nobody acknowledged
//! escalates on schedule from its new owner.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use strobe_agent::statsd::MetricType;
use strobe_agent::{ShipperConfig, Window, WindowLimits, run_shipper};
use strobe_proto as pb;

use crate::receiver::Receiver;
use crate::support::*;

/// A single-member etcd on free loopback ports, its data in a fresh directory; stopped when dropped.
struct Etcd {
    child: Option<tokio::process::Child>,
    url: String,
    args: Vec<String>,
}

impl Etcd {
    async fn start() -> Self {
        let dir = scratch_dir().join(format!(
            "etcd-{}",
            free_local_addr().rsplit(':').next().unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let client = free_local_addr();
        let peer = free_local_addr();
        let args = vec![
            "--name".to_owned(),
            "it".to_owned(),
            "--data-dir".to_owned(),
            dir.join("data").display().to_string(),
            "--listen-client-urls".to_owned(),
            format!("http://{client}"),
            "--advertise-client-urls".to_owned(),
            format!("http://{client}"),
            "--listen-peer-urls".to_owned(),
            format!("http://{peer}"),
            "--initial-advertise-peer-urls".to_owned(),
            format!("http://{peer}"),
            "--initial-cluster".to_owned(),
            format!("it=http://{peer}"),
        ];
        let mut etcd = Self {
            child: None,
            url: format!("http://{client}"),
            args,
        };
        etcd.resume().await;
        etcd
    }

    /// Starts (again) on the same ports and data, and waits until it is healthy.
    async fn resume(&mut self) {
        let binary = which("etcd").expect(
            "etcd is not installed: run scripts/test, which installs Debian's etcd-server package",
        );
        self.child = Some(
            tokio::process::Command::new(binary)
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("etcd starts"),
        );
        let addr: std::net::SocketAddr = self.url.trim_start_matches("http://").parse().unwrap();
        until_serving(addr, "/health", "true", "etcd healthy").await;
    }

    /// SIGKILL.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.ok();
        }
    }
}

fn rules(receiver: std::net::SocketAddr) -> String {
    format!(
        "[[rules]]\nname = \"errors\"\nmetric = \"errors\"\nstat = \"sum\"\nabove = 0.0\nfor = \"0s\"\n\
         keep_firing_for = \"2s\"\nowner = \"team\"\n\n[[owners]]\nname = \"team\"\nescalation = [\n  \
         {{ after = \"0s\", webhook = \"http://{receiver}/dev\", format = \"json\" }},\n  \
         {{ after = \"8s\", webhook = \"http://{receiver}/lead\", format = \"json\" }},\n]\n"
    )
}

async fn node(etcd: &str, id: &str, rules: &std::path::Path, prefix: &str) -> Process {
    let state = rules.with_file_name(format!("state-{id}"));
    aggregator(&[
        "--etcd",
        etcd,
        "--etcd-prefix",
        prefix,
        "--node-id",
        id,
        "--rules",
        &rules.display().to_string(),
        "--state-dir",
        &state.display().to_string(),
    ])
    .await
}

/// One simulated instance per service, in this process, streaming over real gRPC with the agent's own shipper:
/// each second one `ticks` (and one `errors` while `failing` says so). Instance 2 runs version `v2`, so every
/// service has a canary comparison (and its verdicts go out on the stream).
fn instance(
    service: String,
    n: u32,
    seeds: String,
    failing: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<BTreeSet<i64>> {
    tokio::spawn(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let identity = pb::Identity {
            service: service.clone(),
            version: if n == 2 { "v2" } else { "v1" }.into(),
            zone: "z1".into(),
            instance: format!("{service}-{n}"),
            labels: Default::default(),
        };
        let config = ShipperConfig {
            aggregator: seeds,
            ..Default::default()
        };
        let shipper = tokio::spawn(run_shipper(identity, config, rx));
        let mut sent = BTreeSet::new();
        let mut second = unix_now().floor() as i64;
        while !stop.load(Ordering::SeqCst) {
            let next = (second + 1) as f64;
            tokio::time::sleep(Duration::from_secs_f64((next - unix_now()).max(0.0) + 0.02)).await;
            let mut window = Window::new(second, WindowLimits::default());
            window.record_values("ticks", &[], MetricType::Counter, std::iter::once(1.0), 1.0);
            if failing.load(Ordering::SeqCst) {
                window.record_values(
                    "errors",
                    &[],
                    MetricType::Counter,
                    std::iter::once(1.0),
                    1.0,
                );
            }
            tx.send(window.close().0).await.unwrap();
            sent.insert(second);
            second += 1;
        }
        drop(tx);
        let report = shipper.await.unwrap();
        assert_eq!(
            report.dropped, 0,
            "{service}: nothing unacknowledged at the end"
        );
        sent
    })
}

/// What n1's stream showed: each (service, second)'s ticks (a correction replaces), and when each service's newest
/// second arrived.
#[derive(Default)]
struct Tally {
    counted: BTreeMap<(String, i64), f64>,
    seen_at: BTreeMap<String, (i64, Instant)>,
    /// Alert frames: id -> the states shown, in order.
    alerts: BTreeMap<String, Vec<String>>,
    /// Services with a canary verdict frame.
    verdicts: BTreeSet<String>,
}

impl Tally {
    fn record(&mut self, f: &Value) {
        if f["type"] == "alert"
            && let (Some(id), Some(state)) =
                (f["alert"]["id"].as_str(), f["alert"]["state"].as_str())
        {
            self.alerts
                .entry(id.to_owned())
                .or_default()
                .push(state.to_owned());
        }
        if f["type"] == "deploy"
            && let Some(service) = f["deploy"]["service"].as_str()
        {
            self.verdicts.insert(service.to_owned());
        }
        if f["type"] != "second" {
            return;
        }
        let (Some(service), Some(t)) = (f["service"].as_str(), f["t"].as_i64()) else {
            return;
        };
        if let Some(s) = series(f, "ticks", None, None) {
            self.counted
                .insert((service.to_owned(), t), s["sum"].as_f64().unwrap());
            let newest = self
                .seen_at
                .entry(service.to_owned())
                .or_insert((t, Instant::now()));
            if t > newest.0 {
                *newest = (t, Instant::now());
            }
        }
    }
}

/// Reads `ws` into `tally` until `done` (at most `within`); `awaited` says what was awaited if it never comes.
async fn until(
    ws: &mut Ws,
    tally: &mut Tally,
    within: Duration,
    done: impl Fn(&Tally) -> bool,
    awaited: impl Fn(&Tally) -> String,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !done(tally) {
        next_frame(ws, Duration::from_secs(10), |f| {
            tally.record(f);
            Some(())
        })
        .await;
        assert!(tokio::time::Instant::now() < deadline, "{}", awaited(tally));
    }
}

/// Reads `ws` into `tally` until the states it showed for alert `id` satisfy `shown` (at most 10 s).
async fn until_alert_shows(
    ws: &mut Ws,
    tally: &mut Tally,
    id: &str,
    what: &str,
    shown: impl Fn(&[String]) -> bool,
) {
    until(
        ws,
        tally,
        Duration::from_secs(10),
        |t| t.alerts.get(id).is_some_and(|states| shown(states)),
        |t| format!("{what} on the stream: {:?}", t.alerts.get(id)),
    )
    .await;
}

/// Reads `ws` into `tally` until the webhook receiver has what `done` asks for (at most `within`).
async fn until_received(
    ws: &mut Ws,
    tally: &mut Tally,
    receiver: &Receiver,
    within: Duration,
    what: &str,
    done: impl Fn(&Receiver) -> bool,
) {
    until(
        ws,
        tally,
        within,
        |_| done(receiver),
        |_| format!("{what}: {:?}", receiver.received()),
    )
    .await;
}

/// Collects one node's own second frames until its stream ends: (service, second) -> ticks, corrections replacing.
fn collect_local(
    http_addr: std::net::SocketAddr,
) -> Arc<std::sync::Mutex<BTreeMap<(String, i64), f64>>> {
    let seen = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let into = seen.clone();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let Ok((mut ws, _)) =
            tokio_tungstenite::connect_async(format!("ws://{http_addr}/api/v1/stream?local=true"))
                .await
        else {
            return;
        };
        while let Some(Ok(message)) = ws.next().await {
            let tokio_tungstenite::tungstenite::Message::Text(text) = message else {
                continue;
            };
            let Ok(f) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if f["type"] != "second" {
                continue;
            }
            if let (Some(service), Some(t), Some(s)) = (
                f["service"].as_str(),
                f["t"].as_i64(),
                series(&f, "ticks", None, None),
            ) {
                if std::env::var_os("STROBE_IT_LOG").is_some() {
                    eprintln!(
                        "frame {http_addr} {service} {t} sum={} correction={}",
                        s["sum"], f["correction"]
                    );
                }
                into.lock()
                    .unwrap()
                    .insert((service.to_owned(), t), s["sum"].as_f64().unwrap_or(0.0));
            }
        }
    });
    seen
}

/// The owner of every service, as `/api/v1/services` on `http` says.
async fn owners(http_addr: std::net::SocketAddr) -> BTreeMap<String, String> {
    let (_, body) = http(http_addr, "GET", "/api/v1/services", "").await;
    let body: Value = serde_json::from_str(&body).unwrap();
    body["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| {
            Some((
                s["service"].as_str()?.to_owned(),
                s["owner"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_etcd_spread_services_survive_a_kill_and_take_them_back_exactly_once() {
    let etcd = Etcd::start().await;
    let receiver = Receiver::start(0).await;
    let rules_path = write_temp("cluster-rules.toml", &rules(receiver.addr));
    let prefix = format!("/strobe-it-{}/", std::process::id());
    let n1 = node(&etcd.url, "n1", &rules_path, &prefix).await;
    let mut n2 = node(&etcd.url, "n2", &rules_path, &prefix).await;
    let n3 = node(&etcd.url, "n3", &rules_path, &prefix).await;
    let http1 = n1.addr("http");
    // Every agent dials n1 first; n1 redirects those it does not own.
    let seeds = format!("http://{}", n1.addr("grpc"));
    let mut ws = subscribe(http1, &[]).await;

    let services: Vec<String> = (0..30).map(|i| format!("svc-{i:02}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let failing: BTreeMap<String, Arc<AtomicBool>> = services
        .iter()
        .map(|s| (s.clone(), Arc::new(AtomicBool::new(false))))
        .collect();
    // Wait for all three members to know each other before the agents arrive.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http(http1, "GET", "/api/v1/cluster", "").await;
        let status: Value = serde_json::from_str(&body).unwrap();
        if status["members"].as_array().map_or(0, Vec::len) == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "three members: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("phase: members ready");
    // Each node's own frames (`?local=true`), collected apart: a second counted by two nodes shows up here.
    let mut by_node = vec![
        collect_local(http1),
        collect_local(n2.addr("http")),
        collect_local(n3.addr("http")),
    ];
    // Two instances per service; the second never fails.
    let calm = Arc::new(AtomicBool::new(false));
    let instances: Vec<(String, tokio::task::JoinHandle<BTreeSet<i64>>)> = services
        .iter()
        .flat_map(|s| {
            [
                (
                    s.clone(),
                    instance(
                        s.clone(),
                        1,
                        seeds.clone(),
                        failing[s].clone(),
                        stop.clone(),
                    ),
                ),
                (
                    s.clone(),
                    instance(s.clone(), 2, seeds.clone(), calm.clone(), stop.clone()),
                ),
            ]
        })
        .collect();

    // Counted per (service, second) as n1's stream shows them (its own and relayed); a correction replaces.
    let mut tally = Tally::default();
    // Every service streams, through n1, from its owner, and the owners are all three nodes.
    next_frame(&mut ws, Duration::from_secs(30), |f| {
        tally.record(f);
        let live: BTreeSet<&String> = tally.counted.keys().map(|(s, _)| s).collect();
        (live.len() == services.len()).then_some(())
    })
    .await;
    eprintln!("phase: all services live");
    let before = owners(http1).await;
    assert_eq!(before.len(), services.len(), "{before:?}");
    let nodes: BTreeSet<&String> = before.values().collect();
    assert_eq!(nodes.len(), 3, "spread over the three nodes: {before:?}");
    // Canary verdicts of services that n2 and n3 own reach a subscriber of n1 (relayed).
    let elsewhere: BTreeSet<&str> = ["n2", "n3"].into();
    next_frame(&mut ws, Duration::from_secs(20), |f| {
        tally.record(f);
        let relayed: BTreeSet<&str> = tally
            .verdicts
            .iter()
            .filter_map(|s| before.get(s).map(String::as_str))
            .filter(|owner| elsewhere.contains(owner))
            .collect();
        (relayed == elsewhere).then_some(())
    })
    .await;

    // An alert fires on a service n2 owns.
    let on_n2: Vec<String> = before
        .iter()
        .filter(|(_, o)| *o == "n2")
        .map(|(s, _)| s.clone())
        .collect();
    // A second one, on another of n2's services, is never acknowledged: its escalation (8 s) falls due after
    // the kill, on the new owner.
    assert!(on_n2.len() >= 2, "{before:?}");
    let alerting = on_n2[0].clone();
    let escalating = on_n2[1].clone();
    failing[&alerting].store(true, Ordering::SeqCst);
    failing[&escalating].store(true, Ordering::SeqCst);
    let first_page = |service: &str| {
        receiver
            .received()
            .into_iter()
            .find(|r| r.transition == "firing" && r.body["commonLabels"]["service"] == service)
            .map(|r| r.alert_id)
    };
    let (alert_id, escalated_id) = loop {
        if let (Some(a), Some(b)) = (first_page(&alerting), first_page(&escalating)) {
            break (a, b);
        }
        next_frame(&mut ws, Duration::from_secs(20), |f| {
            tally.record(f);
            Some(())
        })
        .await;
    };
    eprintln!("phase: alert fired");
    // n1's subscriber sees it fire too, relayed from its owner, n2.
    until_alert_shows(&mut ws, &mut tally, &alert_id, "firing", |states| {
        states.iter().any(|s| s == "firing")
    })
    .await;
    // Acknowledged through n1, which does not hold it: passed on to its owner, n2. n1 lists it too.
    let (status, body) = http(
        http1,
        "POST",
        &format!("/api/v1/alerts/{alert_id}/ack"),
        "{\"by\":\"oncall\"}",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, listed) = http(http1, "GET", "/api/v1/alerts", "").await;
    assert!(listed.contains(&alert_id), "{listed}");
    // Its delivery written down (settled) before the kill, as in the single-node restart test.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Nobody escalated yet (due 8 s after firing): what follows is the new owner's doing.
    assert_eq!(
        receiver.count("lead", &escalated_id, "firing"),
        0,
        "{:?}",
        receiver.received()
    );
    // SIGKILL n2: its services stream again from their new owners.
    let killed_at = Instant::now();
    let killed_second = unix_now().floor() as i64;
    drop(n2);
    let mut back: BTreeMap<String, Duration> = BTreeMap::new();
    next_frame(&mut ws, Duration::from_secs(30), |f| {
        tally.record(f);
        for service in &on_n2 {
            if let Some((t, at)) = tally.seen_at.get(service)
                && *t > killed_second
                && *at > killed_at
            {
                back.entry(service.clone()).or_insert(*at - killed_at);
            }
        }
        (back.len() == on_n2.len()).then_some(())
    })
    .await;
    let mut gaps: Vec<Duration> = back.values().copied().collect();
    gaps.sort();
    println!(
        "cluster failover: {} services of the killed node streaming again from their new owners after \
         median {:?}, max {:?} (live second newer than the kill, seen on n1)",
        gaps.len(),
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    );
    eprintln!("phase: failover done");
    // The new owner took the alert over with its acknowledgement.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, listed) = http(http1, "GET", "/api/v1/alerts", "").await;
        let listed: Value = serde_json::from_str(&listed).unwrap();
        let state = listed["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == alert_id.as_str())
            .map(|a| a["state"].clone());
        if state == Some(Value::from("acknowledged")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acknowledged after the move: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The unacknowledged one escalates on schedule from its new owner (n2 is dead), once.
    until_received(
        &mut ws,
        &mut tally,
        &receiver,
        Duration::from_secs(20),
        "escalated by the new owner",
        |r| r.count("lead", &escalated_id, "firing") > 0,
    )
    .await;
    eprintln!("phase: escalated by the new owner");
    let during = owners(http1).await;
    for service in &on_n2 {
        assert_ne!(
            during.get(service).map(String::as_str),
            Some("n2"),
            "{during:?}"
        );
    }
    // Run a while on two nodes, then bring n2 back: its services return to it.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        next_frame(&mut ws, Duration::from_secs(10), |f| {
            tally.record(f);
            Some(())
        })
        .await;
    }
    eprintln!("phase: restarting n2");
    n2 = node(&etcd.url, "n2", &rules_path, &prefix).await;
    by_node.push(collect_local(n2.addr("http")));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        next_frame(&mut ws, Duration::from_secs(10), |f| {
            tally.record(f);
            Some(())
        })
        .await;
        let now = owners(http1).await;
        if on_n2
            .iter()
            .all(|s| now.get(s).map(String::as_str) == Some("n2"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n2's services back on n2: {now:?}"
        );
    }
    eprintln!("phase: services back on n2");
    // The alert, still breaching, was never paged again; now it clears and is resolved once.
    failing[&alerting].store(false, Ordering::SeqCst);
    failing[&escalating].store(false, Ordering::SeqCst);
    until_received(
        &mut ws,
        &mut tally,
        &receiver,
        Duration::from_secs(30),
        "resolved",
        |r| {
            r.count("dev", &alert_id, "resolved") > 0
                && r.count("lead", &escalated_id, "resolved") > 0
        },
    )
    .await;
    eprintln!("phase: resolved");
    // And the resolution reaches n1's subscriber, relayed from n2 once more.
    until_alert_shows(&mut ws, &mut tally, &alert_id, "resolved", |states| {
        states.last().map(String::as_str) == Some("resolved")
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    // Per service and second, how many instances sent it (the two stop a second apart at the end).
    let mut sent: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    for (service, task) in instances {
        for t in task.await.unwrap() {
            *sent
                .entry(service.clone())
                .or_default()
                .entry(t)
                .or_default() += 1.0;
        }
    }
    // Each service's last second seals and reaches n1 (instances stop a second apart at most).
    next_frame(&mut ws, Duration::from_secs(20), |f| {
        tally.record(f);
        sent.iter()
            .all(|(s, seconds)| {
                seconds
                    .keys()
                    .last()
                    .is_some_and(|last| tally.counted.contains_key(&(s.clone(), *last)))
            })
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // corrections still on their way
    while let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) =
        tokio::time::timeout(
            Duration::from_millis(300),
            futures_util::StreamExt::next(&mut ws),
        )
        .await
    {
        let f: Value = serde_json::from_str(&text).unwrap();
        tally.record(&f);
    }

    // Every second both instances sent is counted exactly once, across the kill, the failover and the return: as
    // n1 shows every service (fan-in), and summed over what each node published itself.
    let mut wrong = Vec::new();
    let nodes: Vec<BTreeMap<(String, i64), f64>> =
        by_node.iter().map(|n| n.lock().unwrap().clone()).collect();
    for (service, seconds) in &sent {
        for (t, instances) in seconds {
            let key = (service.clone(), *t);
            let fan_in = tally.counted.get(&key).copied();
            let summed: f64 = nodes.iter().filter_map(|n| n.get(&key)).sum();
            if fan_in != Some(*instances) || summed != *instances {
                wrong.push((service.clone(), *t, *instances, fan_in, summed));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "seconds not counted exactly once (service, t, sent, on n1, summed over nodes): {wrong:?}"
    );
    // One page per alerting service to its first step, under any id, across the kill and the return.
    for service in [&alerting, &escalating] {
        let pages = receiver
            .received()
            .iter()
            .filter(|r| {
                r.path == "dev"
                    && r.transition == "firing"
                    && r.body["commonLabels"]["service"] == service.as_str()
            })
            .count();
        assert_eq!(pages, 1, "{service}: {:?}", receiver.received());
    }
    // The unacknowledged alert: escalated once, and its resolution told to both steps once; the acknowledged one
    // never escalated.
    for (path, transition, expected) in [
        ("dev", "firing", 1),
        ("lead", "firing", 1),
        ("dev", "resolved", 1),
        ("lead", "resolved", 1),
        ("dev", "acknowledged", 0),
    ] {
        assert_eq!(
            receiver.count(path, &escalated_id, transition),
            expected,
            "{path} {transition}: {:?}",
            receiver.received()
        );
    }
    assert_eq!(
        receiver.count("lead", &alert_id, "firing"),
        0,
        "{:?}",
        receiver.received()
    );
    assert_eq!(
        receiver.count("dev", &alert_id, "acknowledged"),
        1,
        "{:?}",
        receiver.received()
    );
    assert_eq!(
        receiver.count("dev", &alert_id, "firing"),
        1,
        "{:?}",
        receiver.received()
    );
    assert_eq!(
        receiver.count("dev", &alert_id, "resolved"),
        1,
        "{:?}",
        receiver.received()
    );
}

/// The value of a sample line on a `/metrics` page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// etcd down: the node keeps streaming the service it has, refuses a new one (and says so on `/metrics` and
/// `/api/v1/cluster`), and takes it once etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_a_node_keeps_its_services_and_takes_no_new_ones_until_it_is_back() {
    let mut etcd = Etcd::start().await;
    let prefix = format!("/strobe-it-down-{}/", std::process::id());
    let rules = write_temp("cluster-down-rules.toml", "");
    let n1 = node(&etcd.url, "solo", &rules, &prefix).await;
    let http1 = n1.addr("http");
    let seeds = format!("http://{}", n1.addr("grpc"));
    let mut ws = subscribe(http1, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let calm = Arc::new(AtomicBool::new(false));
    let kept = instance("kept".into(), 1, seeds.clone(), calm.clone(), stop.clone());
    next_frame(&mut ws, Duration::from_secs(20), |f| {
        (f["service"] == "kept").then_some(())
    })
    .await;

    etcd.kill().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, page) = http(http1, "GET", "/metrics", "").await;
        if metric(&page, "strobe_cluster_etcd_up") == Some(0.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "etcd_up 0: {page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, status) = http(http1, "GET", "/api/v1/cluster", "").await;
    assert!(status.contains("\"etcd\":\"unreachable\""), "{status}");
    // A new service is refused while etcd is away; the one here keeps streaming.
    let new = instance("new".into(), 1, seeds.clone(), calm.clone(), stop.clone());
    let mut kept_seconds = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        next_frame(&mut ws, Duration::from_secs(10), |f| {
            assert_ne!(
                f["service"], "new",
                "a new service taken while etcd was away"
            );
            if f["type"] == "second" && f["service"] == "kept" {
                kept_seconds += 1;
            }
            Some(())
        })
        .await;
    }
    assert!(
        kept_seconds >= 2,
        "the service already here kept streaming: {kept_seconds}"
    );
    let (_, page) = http(http1, "GET", "/metrics", "").await;
    assert!(
        metric(&page, "strobe_cluster_refused_total").unwrap_or(0.0) >= 1.0,
        "{page}"
    );

    // etcd back: the new service is taken, and nothing it sent meanwhile is lost.
    etcd.resume().await;
    let mut counted: BTreeMap<i64, f64> = BTreeMap::new();
    let mut note = |f: &Value| {
        if f["type"] == "second"
            && f["service"] == "new"
            && let Some(s) = series(f, "ticks", None, None)
        {
            counted.insert(f["t"].as_i64().unwrap(), s["sum"].as_f64().unwrap());
        }
    };
    next_frame(&mut ws, Duration::from_secs(30), |f| {
        note(f);
        (f["service"] == "new").then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let sent_new = new.await.unwrap();
    kept.await.unwrap();
    let last = *sent_new.last().unwrap();
    next_frame(&mut ws, Duration::from_secs(20), |f| {
        note(f);
        (f["service"] == "new" && f["t"].as_i64() == Some(last)).then_some(())
    })
    .await;
    let wrong: Vec<_> = sent_new
        .iter()
        .filter(|t| counted.get(t) != Some(&1.0))
        .map(|t| (*t, counted.get(t).copied()))
        .collect();
    assert!(
        wrong.is_empty(),
        "seconds of the new service not counted once: {wrong:?}"
    );
}

/// `strobe demo --nodes 3`: a local etcd and three nodes; the demo's services are spread by redirects and every
/// node is a member. Stopped with SIGTERM, the demo stops its etcd and nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_a_three_node_cluster() {
    let http_addr: std::net::SocketAddr = free_local_addr().parse().unwrap();
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_strobe"))
        .args([
            "demo",
            "--nodes",
            "3",
            "--http-addr",
            &http_addr.to_string(),
        ])
        .env("STROBE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the demo starts");
    let stderr = demo.stderr.take().unwrap();
    let complaints = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(
            &mut tokio::io::BufReader::new(stderr),
            &mut text,
        )
        .await;
        text
    });
    let stdout = demo.stdout.take().unwrap();
    let printed = Arc::new(std::sync::Mutex::new(String::new()));
    let into = printed.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            into.lock().unwrap().push_str(&format!("{line}\n"));
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if tokio::net::TcpStream::connect(http_addr).await.is_ok() {
            let (_, cluster) = http(http_addr, "GET", "/api/v1/cluster", "").await;
            let (_, services) = http(http_addr, "GET", "/api/v1/services", "").await;
            let cluster: Value = serde_json::from_str(&cluster).unwrap_or(Value::Null);
            let services: Value = serde_json::from_str(&services).unwrap_or(Value::Null);
            let owned = services["services"]
                .as_array()
                .map_or(0, |s| s.iter().filter(|s| s["owner"].is_string()).count());
            if cluster["members"].as_array().map_or(0, Vec::len) == 3 && owned == 3 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "three members and the demo's three services: {}",
            printed.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let printed = printed.lock().unwrap().clone();
    assert!(printed.contains("node-2 at http://"), "{printed}");
    assert!(printed.contains("node-3 at http://"), "{printed}");
    // SIGTERM: the demo stops, and with it its etcd and nodes.
    let pid = demo.id().unwrap().to_string();
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), demo.wait())
        .await
        .expect("the demo stops on SIGTERM")
        .unwrap();
    let complaints = complaints.await.unwrap_or_default();
    assert!(status.success(), "{status:?}: {complaints}");
}
