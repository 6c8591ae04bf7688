//! TLS end to end with certificates made here (rcgen): an agent streams over gRPC with TLS and a client
//! certificate (mTLS), an agent without one gets nothing in, the API answers over HTTPS, the websocket over WSS,
//! and a renewed certificate is served without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let dir = scratch_dir().join("tls");
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Self { dir, ca }
    }

    /// Writes `NAME.pem` and `NAME.key`, a certificate for `names` signed by the CA; returns its DER.
    fn issue(&self, name: &str, names: &[&str]) -> Vec<u8> {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(self.dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().unwrap().to_owned()
    }
}

/// A TLS client session to `addr` trusting only `ca`, presenting ALPN http/1.1; returns the stream and the
/// certificate the server showed.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &Path,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the aggregator's HTTP port");
    let shown = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (stream, shown)
}

async fn https_get(addr: std::net::SocketAddr, ca: &Path, path: &str) -> (u16, String, Vec<u8>) {
    let (mut stream, shown) = tls_connect(addr, ca).await;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // A peer closing without close_notify is fine here: the whole response has arrived.
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body, shown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_stream_over_mtls_the_api_and_websocket_answer_over_tls_and_certificates_reload() {
    let pki = Pki::new();
    let first = pki.issue("server", &["localhost", "127.0.0.1"]);
    pki.issue("client", &["agent-1"]);
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let aggregator = aggregator(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ])
    .await;
    let (grpc, http) = (aggregator.addr("grpc"), aggregator.addr("http"));
    let target = format!("https://localhost:{}", grpc.port());
    let agent = |service: &'static str, with_client_cert: bool| {
        let (target, ca, client, client_key) = (
            target.clone(),
            ca.clone(),
            pki.path("client.pem"),
            pki.path("client.key"),
        );
        async move {
            let mut args = vec![
                "agent".to_owned(),
                "--service".into(),
                service.into(),
                "--version".into(),
                "v1".into(),
                "--instance".into(),
                format!("{service}-1"),
                "--aggregator".into(),
                target,
                "--statsd-addr".into(),
                "127.0.0.1:0".into(),
                "--metrics-addr".into(),
                "127.0.0.1:0".into(),
                "--ca-cert".into(),
                ca,
            ];
            if with_client_cert {
                args.extend(["--tls-cert".into(), client, "--tls-key".into(), client_key]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn(&args).await
        }
    };
    let trusted = agent("over-tls", true).await;
    let _stranger = agent("no-client-cert", false).await;

    // Counts travel agent -> aggregator over TLS and come back over WSS.
    let (tls, _) = tls_connect(http, Path::new(&ca)).await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/api/v1/stream", tls)
        .await
        .expect("websocket over TLS");
    let subscribe = serde_json::json!({ "subscribe": { "services": ["over-tls"] } }).to_string();
    ws.send(Message::Text(subscribe.into())).await.unwrap();
    let sender = tokio::spawn({
        let statsd = trusted.addr("statsd");
        async move {
            loop {
                send_statsd(statsd, &["ticks:1|c".to_owned()]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let counted = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(message)) = ws.next().await {
            if let Message::Text(text) = message {
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                if series(&frame, "ticks", None, None)
                    .is_some_and(|s| s["sum"].as_f64() > Some(0.0))
                {
                    return true;
                }
            }
        }
        false
    })
    .await;
    sender.abort();
    assert_eq!(counted, Ok(true), "a counted second arrived over WSS");

    // HTTPS; the agent without a client certificate never got in.
    let (status, body, shown) = https_get(http, Path::new(&ca), "/api/v1/services").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"over-tls\""), "{body}");
    assert!(!body.contains("no-client-cert"), "{body}");
    assert_eq!(shown, first, "the first certificate is served");

    // Renew the certificate in place: it is served within the reload check, no restart.
    let renewed = pki.issue("server", &["localhost", "127.0.0.1"]);
    assert_ne!(renewed, first);
    eventually(
        Duration::from_secs(15),
        "the renewed certificate",
        || async { https_get(http, Path::new(&ca), "/healthz").await.2 == renewed },
    )
    .await;
    std::fs::remove_dir_all(&pki.dir).ok();
}
