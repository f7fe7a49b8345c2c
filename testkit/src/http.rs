//! A plain HTTP/1.1 GET for tests of the small metrics and health endpoints: one request
//! on a fresh connection, the whole raw response (status line, headers, body) returned.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `GET path` to `addr` and reads the response until the server closes the
/// connection; panics (failing the test) on any IO error.
pub async fn get(addr: SocketAddr, path: &str) -> String {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    out
}
