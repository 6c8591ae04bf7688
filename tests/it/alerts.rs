//! Alerts end to end: a real aggregator process with a rules file, real agents, a real webhook receiver.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use crate::receiver::{Receiver, readme_snippet_accepts, signature_valid};
use crate::support::*;

const SECRET: &str = "topsecret";

fn rules(receiver: std::net::SocketAddr) -> String {
    let rule = |name: &str, service: &str| {
        format!(
            "[[rules]]\nname = \"{name}\"\nservice = \"{service}\"\nmetric = \"errors\"\nstat = \"rate\"\nabove = 5.0\n\
             for = \"1s\"\nkeep_firing_for = \"1s\"\nowner = \"team\"\n\n"
        )
    };
    format!(
        "{}{}[[owners]]\nname = \"team\"\nescalation = [\n  \
         {{ after = \"0s\", webhook = \"http://{receiver}/dev\", format = \"json\", secret = \"{SECRET}\" }},\n  \
         {{ after = \"3s\", webhook = \"http://{receiver}/lead\", format = \"slack\", secret = \"{SECRET}\" }},\n]\n",
        rule("pay-errors", "pay"),
        rule("cart-errors", "cart"),
    )
}

/// Sends `errors:1|c` every 100 ms (10 per second, above the threshold of 5) until told to stop.
fn feed_errors(statsd: std::net::SocketAddr) -> watch::Sender<bool> {
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            send_statsd(
                statsd,
                &["errors:1|c".to_owned(), "requests:3|c".to_owned()],
            )
            .await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
        }
    });
    stop
}

async fn alert_of(http: std::net::SocketAddr, rule: &str) -> Option<Value> {
    let doc = get_json(http, "/api/v1/alerts").await;
    doc["alerts"]
        .as_array()?
        .iter()
        .find(|a| a["rule"] == rule)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaches_page_the_owner_escalate_unless_acknowledged_and_resolve_to_everyone_told() {
    // The developer's endpoint fails with 500 three times before it recovers.
    let receiver = Receiver::start(3).await;
    let dir = scratch_dir().join("alerts");
    std::fs::create_dir_all(&dir).unwrap();
    let rules_path = dir.join("rules.toml");
    std::fs::write(&rules_path, rules(receiver.addr)).unwrap();
    let aggregator = aggregator(&["--rules", rules_path.to_str().unwrap()]).await;
    let http = aggregator.addr("http");
    let pay = agent(&aggregator, "pay", "v1", "z1", "pay-1").await;
    let cart = agent(&aggregator, "cart", "v1", "z1", "cart-1").await;
    let mut ws = subscribe(http, &["pay"]).await;

    let stop_pay = feed_errors(pay.addr("statsd"));
    let stop_cart = feed_errors(cart.addr("statsd"));

    // The websocket carries the firing alert with its detection latency.
    let firing = next_frame(&mut ws, Duration::from_secs(20), |f| {
        (f["type"] == "alert" && f["alert"]["state"] == "firing").then(|| f["alert"].clone())
    })
    .await;
    assert_eq!(firing["rule"], "pay-errors");
    assert!(
        firing["detected_after_ms"].as_i64().unwrap() > 0,
        "{firing}"
    );
    assert_eq!(firing["threshold"], 5.0);
    let pay_id = firing["id"].as_str().unwrap().to_owned();

    // Acknowledge cart's alert as soon as it fires.
    eventually(Duration::from_secs(10), "cart's alert to fire", || async {
        alert_of(http, "cart-errors")
            .await
            .is_some_and(|a| a["state"] == "firing")
    })
    .await;
    let cart_id = alert_of(http, "cart-errors").await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, acked) = http_json(
        http,
        "POST",
        &format!("/api/v1/alerts/{cart_id}/ack"),
        "{\"by\":\"tester\"}",
    )
    .await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["alert"]["state"], "acknowledged");
    assert_eq!(acked["alert"]["acknowledged_by"], "tester");
    let (status, _) = http_json(http, "POST", "/api/v1/alerts/no-such-alert/ack", "").await;
    assert_eq!(status, 404);

    // Pay is not acknowledged: after 3 s the lead is paged too.
    eventually(
        Duration::from_secs(15),
        "escalation to the lead",
        || async { receiver.count("lead", &pay_id, "firing") == 1 },
    )
    .await;
    // Keep cart breaching past its escalation delay, so a missing stop would show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_pay.send(true);
    let _ = stop_cart.send(true);

    eventually(Duration::from_secs(15), "resolution notices", || async {
        receiver.count("dev", &pay_id, "resolved") == 1
            && receiver.count("lead", &pay_id, "resolved") == 1
            && receiver.count("dev", &cart_id, "resolved") == 1
    })
    .await;
    // Give any stray or duplicate delivery a moment to show up.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    assert_eq!(receiver.failures_left(), 0, "the 500s were all served");
    assert_eq!(
        receiver.count("dev", &pay_id, "firing"),
        1,
        "exactly once despite three 500s"
    );
    assert_eq!(receiver.count("lead", &pay_id, "firing"), 1);
    assert_eq!(receiver.count("dev", &pay_id, "resolved"), 1);
    assert_eq!(receiver.count("lead", &pay_id, "resolved"), 1);
    assert_eq!(receiver.count("dev", &cart_id, "firing"), 1);
    assert_eq!(receiver.count("dev", &cart_id, "acknowledged"), 1);
    assert_eq!(receiver.count("dev", &cart_id, "resolved"), 1);
    assert!(
        receiver
            .received()
            .iter()
            .all(|r| r.path != "lead" || r.alert_id != cart_id),
        "acknowledged: no escalation"
    );

    // No secret leaves: not the signing secret, not a webhook URL (the path of many is a secret), in no API
    // answer, no frame, no target's payload.
    let urls = [
        format!("{}/dev", receiver.addr),
        format!("{}/lead", receiver.addr),
    ];
    let leaks = |what: &str, text: &str| {
        assert!(!text.contains(SECRET), "{what} holds the secret: {text}");
        for url in &urls {
            assert!(!text.contains(url.as_str()), "{what} holds {url}: {text}");
        }
    };
    for path in ["/api/v1/rules", "/api/v1/alerts"] {
        let (_, body) = crate::support::http(http, "GET", path, "").await;
        leaks(path, &body);
    }
    leaks("the firing frame", &firing.to_string());
    for r in receiver.received() {
        leaks("a payload", &String::from_utf8_lossy(&r.raw));
    }
    let rules_doc = get_json(http, "/api/v1/rules").await;
    assert!(
        rules_doc["source"]
            .as_str()
            .unwrap()
            .contains("secret = \"(redacted)\""),
        "{rules_doc}"
    );
    // The README's verification snippet, on a real delivery: accepted when fresh, refused as a replay an hour
    // later, refused with the body changed.
    let sample = &receiver.received()[0];
    let (ts, header) = (sample.timestamp.unwrap(), sample.signature.clone().unwrap());
    assert!(readme_snippet_accepts(
        SECRET,
        ts,
        &sample.raw,
        &header,
        ts + 5
    ));
    assert!(!readme_snippet_accepts(
        SECRET,
        ts,
        &sample.raw,
        &header,
        ts + 3600
    ));
    let mut tampered = sample.raw.to_vec();
    tampered[0] ^= 1;
    assert!(!readme_snippet_accepts(
        SECRET,
        ts,
        &tampered,
        &header,
        ts + 5
    ));
    for r in receiver.received() {
        let signature = r.signature.as_deref().expect("signed");
        assert!(
            signature_valid(SECRET, r.timestamp.expect("timestamped"), &r.raw, signature),
            "bad signature on {} {}",
            r.path,
            r.transition
        );
        match r.path.as_str() {
            "dev" => {
                assert_eq!(r.body["version"], "4");
                assert_eq!(r.body["alerts"][0]["fingerprint"], r.alert_id.as_str());
                let status = if r.transition == "resolved" {
                    "resolved"
                } else {
                    "firing"
                };
                assert_eq!(r.body["status"], status);
            }
            _ => assert!(
                r.body["text"].as_str().unwrap().contains("pay-errors"),
                "{}",
                r.body
            ),
        }
    }
    let cart_alert = alert_of(http, "cart-errors").await.unwrap();
    assert_eq!(cart_alert["state"], "resolved");
    assert_eq!(cart_alert["acknowledged_by"], "tester");
    let (_, metrics) = crate::support::http(http, "GET", "/metrics", "").await;
    assert!(
        metrics.contains("strobe_webhook_retries_total 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_reload_on_edit_reject_bad_edits_and_are_served_by_the_api() {
    let dir = scratch_dir().join("reload");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rules.toml");
    let rule = |threshold: f64| {
        format!("[[rules]]\nname = \"r\"\nmetric = \"m\"\nstat = \"p99\"\nabove = {threshold:.1}\n")
    };
    std::fs::write(&path, rule(1.0)).unwrap();
    let aggregator = aggregator(&["--rules", path.to_str().unwrap()]).await;
    let http = aggregator.addr("http");
    assert_eq!(
        get_json(http, "/api/v1/rules").await["rules"][0]["threshold"],
        1.0
    );

    std::fs::write(&path, rule(2.0)).unwrap();
    eventually(Duration::from_secs(10), "the edit to load", || async {
        get_json(http, "/api/v1/rules").await["rules"][0]["threshold"] == 2.0
    })
    .await;
    // A bad edit: the old rules stay.
    std::fs::write(
        &path,
        "[[rules]]\nname = \"r\"\nmetric = \"m\"\nstat = \"p42\"\nabove = 3.0\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        get_json(http, "/api/v1/rules").await["rules"][0]["threshold"],
        2.0
    );

    // PUT: a bad body is refused with its line, a good one applies and is written to the file.
    let (status, error) = http_json(
        http,
        "PUT",
        "/api/v1/rules",
        "[[rules]]\nname = \"x\"\nmetric = \"m\"\nstat = \"ratio\"\nabove = 1.0\n",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error["line"], 1);
    assert!(error["error"].as_str().unwrap().contains("over"), "{error}");
    let (status, _) = http_json(http, "PUT", "/api/v1/rules", &rule(7.0)).await;
    assert_eq!(status, 200);
    assert_eq!(
        get_json(http, "/api/v1/rules").await["rules"][0]["threshold"],
        7.0
    );
    assert!(std::fs::read_to_string(&path).unwrap().contains("7.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_firing_across_a_restart_keeps_its_id_and_acknowledgement_and_is_not_paged_again()
{
    let receiver = Receiver::start(0).await;
    let dir = scratch_dir().join("restart");
    std::fs::create_dir_all(&dir).unwrap();
    let rules_path = dir.join("rules.toml");
    std::fs::write(&rules_path, rules(receiver.addr)).unwrap();
    // No --state-dir: the default keeps state beside the rules file.
    let state_dir = dir.join("rules.toml.state");
    std::fs::remove_dir_all(&state_dir).ok();
    let grpc = free_local_addr();
    let args = [
        "aggregator",
        "--grpc-addr",
        &grpc,
        "--http-addr",
        "127.0.0.1:0",
        "--rules",
        rules_path.to_str().unwrap(),
    ];
    let aggregator = spawn(&args).await;
    let http = aggregator.addr("http");
    let pay = agent(&aggregator, "pay", "v1", "z1", "pay-1").await;
    let cart = agent(&aggregator, "cart", "v1", "z1", "cart-1").await;
    let stop_pay = feed_errors(pay.addr("statsd"));
    let stop_cart = feed_errors(cart.addr("statsd"));

    eventually(Duration::from_secs(20), "both alerts to fire", || async {
        let firing = |a: Option<Value>| a.is_some_and(|a| a["state"] == "firing");
        firing(alert_of(http, "pay-errors").await) && firing(alert_of(http, "cart-errors").await)
    })
    .await;
    let id_of = |a: Option<Value>| a.unwrap()["id"].as_str().unwrap().to_owned();
    let pay_id = id_of(alert_of(http, "pay-errors").await);
    let cart_id = id_of(alert_of(http, "cart-errors").await);
    let (status, acked) = http_json(
        http,
        "POST",
        &format!("/api/v1/alerts/{cart_id}/ack"),
        "{\"by\":\"tester\"}",
    )
    .await;
    assert_eq!(status, 200, "{acked}");
    // Pay escalates to the lead 3 s after it fired; then the aggregator dies (SIGKILL, no goodbye).
    eventually(
        Duration::from_secs(15),
        "escalation to the lead",
        || async {
            receiver.count("lead", &pay_id, "firing") == 1
                && receiver.count("dev", &cart_id, "acknowledged") == 1
        },
    )
    .await;
    // A delivery is written down a few milliseconds after the receiver answered; a kill inside that instant sends
    // it again (same Idempotency-Key: at least once). Give the bookkeeping that instant, then kill.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(aggregator);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let aggregator = spawn(&args).await;
    let http = aggregator.addr("http");

    // Still breaching after the restart: the same alerts, the same acknowledgement.
    eventually(
        Duration::from_secs(20),
        "alerts restored and confirmed",
        || async {
            let pay = alert_of(http, "pay-errors").await;
            let cart = alert_of(http, "cart-errors").await;
            pay.is_some_and(|a| a["id"] == pay_id.as_str() && a["state"] == "firing")
                && cart.is_some_and(|a| {
                    a["id"] == cart_id.as_str()
                        && a["state"] == "acknowledged"
                        && a["acknowledged_by"] == "tester"
                })
        },
    )
    .await;
    // Keep breaching well past `for` and the lead's 3 s, so a second page would show.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let doc = get_json(http, "/api/v1/alerts").await;
    let listed = doc["alerts"].as_array().unwrap();
    assert_eq!(
        listed.len(),
        2,
        "no second alert for the same breach: {doc}"
    );
    let _ = stop_pay.send(true);
    let _ = stop_cart.send(true);
    eventually(Duration::from_secs(15), "resolution notices", || async {
        receiver.count("dev", &pay_id, "resolved") == 1
            && receiver.count("lead", &pay_id, "resolved") == 1
            && receiver.count("dev", &cart_id, "resolved") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let told: Vec<(String, String, String)> = receiver
        .received()
        .into_iter()
        .map(|r| (r.path, r.alert_id, r.transition))
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("dev", &pay_id, "firing"),
        ("lead", &pay_id, "firing"),
        ("dev", &pay_id, "resolved"),
        ("lead", &pay_id, "resolved"),
        ("dev", &cart_id, "firing"),
        ("dev", &cart_id, "acknowledged"),
        ("dev", &cart_id, "resolved"),
    ]
    .iter()
    .map(|(p, id, t)| (p.to_string(), id.to_string(), t.to_string()))
    .collect();
    let mut sorted = told.clone();
    sorted.sort();
    let mut expected_sorted = expected;
    expected_sorted.sort();
    assert_eq!(
        sorted, expected_sorted,
        "each transition exactly once to each target told, across the restart"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receiver_down_for_a_minute_gets_every_notification_once_in_order_when_it_returns()
 {
    // The receiver's address is reserved but nothing listens there for the first minute.
    let receiver_addr = free_local_addr();
    let dir = scratch_dir().join("down");
    std::fs::create_dir_all(&dir).unwrap();
    let rules_path = dir.join("rules.toml");
    std::fs::write(&rules_path, rules(receiver_addr.parse().unwrap())).unwrap();
    let aggregator = aggregator(&[
        "--rules",
        rules_path.to_str().unwrap(),
        "--state-dir",
        dir.join("state").to_str().unwrap(),
    ])
    .await;
    let http = aggregator.addr("http");
    let pay = agent(&aggregator, "pay", "v1", "z1", "pay-1").await;
    let down_since = std::time::Instant::now();

    // While it is down: pay fires, escalates, is acknowledged and resolves; then fires, is acknowledged at once
    // (before the lead's turn) and resolves again.
    let mut ids = Vec::new();
    for round in 0..2 {
        let stop = feed_errors(pay.addr("statsd"));
        eventually(Duration::from_secs(20), "pay to fire", || async {
            alert_of(http, "pay-errors")
                .await
                .is_some_and(|a| a["state"] == "firing")
        })
        .await;
        let id = alert_of(http, "pay-errors").await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        if round == 0 {
            // Past the lead's 3 s.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let (status, _) = http_json(
            http,
            "POST",
            &format!("/api/v1/alerts/{id}/ack"),
            "{\"by\":\"tester\"}",
        )
        .await;
        assert_eq!(status, 200);
        let _ = stop.send(true);
        eventually(Duration::from_secs(15), "pay to resolve", || async {
            alert_of(http, "pay-errors")
                .await
                .is_some_and(|a| a["state"] == "resolved" && a["id"] == id.as_str())
        })
        .await;
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "a new breach is a new alert");
    let remaining = Duration::from_secs(60).saturating_sub(down_since.elapsed());
    tokio::time::sleep(remaining).await;
    let receiver = Receiver::start_on(&receiver_addr, 0).await;
    let back = std::time::Instant::now();
    eventually(Duration::from_secs(15), "every notification", || async {
        receiver.received().len() >= 9
    })
    .await;
    let took = back.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let told: Vec<(String, String, String)> = receiver
        .received()
        .into_iter()
        .map(|r| (r.path, r.alert_id, r.transition))
        .collect();
    let of = |path: &str| -> Vec<(String, String)> {
        told.iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, id, t)| (id.clone(), t.clone()))
            .collect()
    };
    let pair = |id: &String, t: &str| (id.clone(), t.to_owned());
    assert_eq!(
        of("dev"),
        vec![
            pair(&ids[0], "firing"),
            pair(&ids[0], "acknowledged"),
            pair(&ids[0], "resolved"),
            pair(&ids[1], "firing"),
            pair(&ids[1], "acknowledged"),
            pair(&ids[1], "resolved"),
        ],
        "each once, oldest first"
    );
    assert_eq!(
        of("lead"),
        vec![
            pair(&ids[0], "firing"),
            pair(&ids[0], "acknowledged"),
            pair(&ids[0], "resolved"),
        ]
    );
    eprintln!("receiver back: all 9 notifications within {took:?}");
    std::fs::remove_dir_all(&dir).ok();
}
