//! What Strobe's benchmark binaries share: reading an aggregator's `/metrics` page.

use std::net::SocketAddr;

/// The aggregator's `/metrics` page, read over plain HTTP/1.0 (the server closes the connection after it).
pub async fn scrape_metrics(http: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(http).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: strobe\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .ok_or_else(|| std::io::Error::other("no body in the /metrics response"))
}
