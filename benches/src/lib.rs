//! What Strobe's benchmark binaries share: reading an aggregator's `/metrics` page.

use std::net::SocketAddr;

/// The aggregator's `/metrics` page, read over plain HTTP/1.0 (the server closes the connection after it).
pub async fn scrape_metrics(http: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(http).await?;
    // The aggregator's own address as Host: without tokens it answers only requests addressed to loopback.
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    if !response.starts_with("HTTP/1.0 200") && !response.starts_with("HTTP/1.1 200") {
        let status = response.lines().next().unwrap_or("no answer").to_owned();
        return Err(std::io::Error::other(format!("/metrics answered {status}")));
    }
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .ok_or_else(|| std::io::Error::other("no body in the /metrics response"))
}
