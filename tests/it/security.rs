//! Tokens and roles, the same-origin rule and safe defaults, against a real aggregator process and real agents.

use std::time::Duration;

use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::support::*;

const READ: &str = "read-secret";
const ADMIN: &str = "admin-secret";

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The status of a websocket handshake with these headers (101 when it opened).
async fn ws_status(http: std::net::SocketAddr, headers: &[(&str, &str)]) -> u16 {
    let mut request = format!("ws://{http}/api/v1/stream")
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    match connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(error) => panic!("websocket handshake failed oddly: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_wants_the_right_role_and_agents_their_service_token() {
    let rules = write_temp(
        "security-rules.toml",
        "[[rules]]\nname = \"r\"\nmetric = \"errors\"\nstat = \"sum\"\nabove = 5.0\n",
    );
    let aggregator = aggregator(&[
        "--rules",
        rules.to_str().unwrap(),
        "--read-token",
        &format!("viewer:{READ}"),
        "--admin-token",
        &format!("ops:{ADMIN}"),
        "--agent-token",
        "bound:agent-alpha=alpha,alpha-two",
        "--agent-token",
        "fleet:agent-any",
    ])
    .await;
    let http = aggregator.addr("http");

    // The page's own files and the liveness probe hold no data and stay open.
    for path in ["/", "/healthz"] {
        let (status, _, _) = http_with(http, "GET", path, "", &[]).await;
        assert_eq!(status, 200, "{path}");
    }
    // Every read endpoint: 401 without a token or with a wrong one, 200 with a read or an admin token.
    for path in [
        "/metrics",
        "/api/v1/services",
        "/api/v1/rules",
        "/api/v1/alerts",
        "/api/v1/deploys",
    ] {
        let (status, headers, _) = http_with(http, "GET", path, "", &[]).await;
        assert_eq!(status, 401, "{path} without a token");
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "www-authenticate" && v.starts_with("Bearer")),
            "{path}: {headers:?}"
        );
        let wrong = bearer("nope");
        let (status, _, _) = http_with(http, "GET", path, "", &[("Authorization", &wrong)]).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        for token in [READ, ADMIN] {
            let auth = bearer(token);
            let (status, _, body) =
                http_with(http, "GET", path, "", &[("Authorization", &auth)]).await;
            assert_eq!(status, 200, "{path} with {token}: {body}");
        }
    }
    // Changes: a read token is refused (403), an admin token gets through to the handler.
    let json = ("Content-Type", "application/json");
    let toml = ("Content-Type", "application/toml");
    let new_rules = "[[rules]]\nname = \"r2\"\nmetric = \"errors\"\nstat = \"sum\"\nabove = 9.0\n";
    let (read, admin) = (bearer(READ), bearer(ADMIN));
    let (status, _, _) = http_with(
        http,
        "PUT",
        "/api/v1/rules",
        new_rules,
        &[("Authorization", &read), toml],
    )
    .await;
    assert_eq!(status, 403, "a read token may not change rules");
    let (status, _, _) = http_with(
        http,
        "POST",
        "/api/v1/alerts/x/ack",
        "{}",
        &[("Authorization", &read), json],
    )
    .await;
    assert_eq!(status, 403, "a read token may not acknowledge");
    let (status, _, body) = http_with(
        http,
        "PUT",
        "/api/v1/rules",
        new_rules,
        &[("Authorization", &admin), toml],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = http_with(
        http,
        "POST",
        "/api/v1/alerts/x/ack",
        "{}",
        &[("Authorization", &admin), json],
    )
    .await;
    assert_eq!(
        status, 404,
        "an admin token reaches the handler (no such alert)"
    );

    // A webhook aimed at the cloud metadata service is refused with its line, even from an admin.
    let (status, _, body) = http_with(
        http,
        "PUT",
        "/api/v1/rules",
        "[[owners]]\nname = \"o\"\nescalation = [{ after = \"0s\", webhook = \"http://169.254.169.254/latest/\" }]\n",
        &[("Authorization", &admin), toml],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("\"line\":1") && body.contains("refused"),
        "{body}"
    );

    // Cross-site: another origin is refused even with the right token; a form body never gets in.
    let own = format!("http://{http}");
    for (origin, content_type, expected) in [
        ("http://evil.example", "application/json", 403),
        (own.as_str(), "application/x-www-form-urlencoded", 415),
        (own.as_str(), "text/plain", 415),
        (own.as_str(), "application/json", 404),
    ] {
        let (status, _, _) = http_with(
            http,
            "POST",
            "/api/v1/alerts/x/ack",
            "{}",
            &[
                ("Authorization", &admin),
                ("Origin", origin),
                ("Content-Type", content_type),
            ],
        )
        .await;
        assert_eq!(status, expected, "{origin} {content_type}");
    }

    // The websocket: a token in the Authorization header or as a subprotocol value; never without; never from
    // another origin.
    let subprotocol = format!("strobe, strobe.token.{}", hex::encode(READ));
    assert_eq!(ws_status(http, &[]).await, 401);
    assert_eq!(
        ws_status(
            http,
            &[("Sec-WebSocket-Protocol", "strobe, strobe.token.6e6f7065")]
        )
        .await,
        401
    );
    assert_eq!(ws_status(http, &[("Authorization", &read)]).await, 101);
    assert_eq!(
        ws_status(http, &[("Sec-WebSocket-Protocol", &subprotocol)]).await,
        101
    );
    assert_eq!(
        ws_status(
            http,
            &[
                ("Sec-WebSocket-Protocol", &subprotocol),
                ("Origin", "http://evil.example")
            ]
        )
        .await,
        403
    );

    // Agents: a token bound to alpha streams for alpha only; an unbound one for anything; a wrong one for nothing.
    let target = format!("http://{}", aggregator.addr("grpc"));
    let agent = |service: &'static str, token: &'static str| {
        let target = target.clone();
        async move { agent_to(&target, service, &["--token", token]).await }
    };
    let _alpha = agent("alpha", "agent-alpha").await;
    let _alpha_two = agent("alpha-two", "agent-alpha").await;
    let _beta = agent("beta", "agent-alpha").await;
    let _gamma = agent("gamma", "wrong").await;
    let _delta = agent("delta", "agent-any").await;
    let services = || async {
        let (_, _, body) = http_with(
            http,
            "GET",
            "/api/v1/services",
            "",
            &[("Authorization", &read)],
        )
        .await;
        body
    };
    eventually(Duration::from_secs(20), "alpha and delta in", || async {
        let body = services().await;
        body.contains("\"alpha\"") && body.contains("\"alpha-two\"") && body.contains("\"delta\"")
    })
    .await;
    let (status, _, _) = http_with(http, "GET", "/api/v1/series?service=alpha", "", &[]).await;
    assert_eq!(status, 401);
    let (status, _, body) = http_with(
        http,
        "GET",
        "/api/v1/series?service=alpha",
        "",
        &[("Authorization", &read)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let body = services().await;
    assert!(
        !body.contains("\"beta\"") && !body.contains("\"gamma\""),
        "{body}"
    );
    // An acknowledgement records the admin token's name (and the name the body gives, beside it).
    let statsd = _alpha.addr("statsd");
    let alert_id = || async {
        let (_, _, body) = http_with(
            http,
            "GET",
            "/api/v1/alerts",
            "",
            &[("Authorization", &read)],
        )
        .await;
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        doc["alerts"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["state"] == "firing"))
            .and_then(|a| a["id"].as_str().map(str::to_owned))
    };
    let mut firing = None;
    for _ in 0..100 {
        send_statsd(statsd, &["errors:20|c".to_owned()]).await;
        firing = alert_id().await;
        if firing.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id = firing.expect("the errors rule fires");
    let (status, _, body) = http_with(
        http,
        "POST",
        &format!("/api/v1/alerts/{id}/ack"),
        "{\"by\":\"alice\"}",
        &[("Authorization", &admin), json],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let acked: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(acked["alert"]["acknowledged_by"], "alice (token ops)");

    let (_, _, metrics) = http_with(http, "GET", "/metrics", "", &[("Authorization", &read)]).await;
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("strobe_dropped_total{limit=\"agent_tokens\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused >= 2, "both refusals counted: {metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_api_stays_on_loopback_and_answers_only_loopback_names() {
    // Refused at start: reachable from other machines with no token.
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_strobe"))
            .args([
                "aggregator",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "0.0.0.0:0",
            ])
            .env("STROBE_LOG", "warn")
            .output(),
    )
    .await
    .expect("exits at once")
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");

    // On loopback it runs, but a request addressed to another name (DNS rebinding) gets nothing.
    let aggregator = aggregator(&[]).await;
    let http = aggregator.addr("http");
    let (status, headers, _) = http_with(http, "GET", "/api/v1/alerts", "", &[]).await;
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "x-frame-options" && v == "DENY"),
        "{headers:?}"
    );
    // Through a reverse proxy on loopback the world would look local: without tokens, proxied requests are refused.
    let (status, _, _) = http_with(
        http,
        "GET",
        "/api/v1/alerts",
        "",
        &[("X-Forwarded-For", "203.0.113.9")],
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = http_with(
        http,
        "GET",
        "/api/v1/alerts",
        "",
        &[("Host", "evil.example:7080")],
    )
    .await;
    assert_eq!(status, 421);
}
