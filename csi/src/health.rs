//! The HTTP health endpoint of `blockvol-csi` (`--health-addr`), for the kubelet's
//! liveness and readiness probes, so the chart needs no livenessprobe sidecar.
//!
//! Contract: `GET /healthz` answers 200 only when the process's own CSI endpoint answers
//! an Identity `Probe` as ready within the probe timeout (what the upstream livenessprobe
//! sidecar checks: the gRPC server is up and not wedged), 503 with the reason otherwise;
//! any other path answers 404. A request head is read within
//! [`REQUEST_TIMEOUT_MS`] and [`MAX_REQUEST_BYTES`], and each probe is bounded by its
//! timeout, so a slow client or a stuck CSI server cannot pile up work here.

use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::csi_proto::ProbeRequest;
use crate::csi_proto::identity_client::IdentityClient;
use crate::error::{Error, Result};
use crate::server::Endpoint;

/// Largest HTTP request head read, in bytes.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request, in milliseconds.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;

/// A channel to the CSI endpoint, connecting on first use.
fn channel(endpoint: &Endpoint, timeout: Duration) -> Result<Channel> {
    match endpoint {
        Endpoint::Unix(path) => crate::agent::unix_channel(path, timeout),
        Endpoint::Tcp(addr) => {
            let ep = tonic::transport::Endpoint::try_from(format!("http://{addr}"))
                .map_err(|e| Error::Internal(format!("health endpoint {addr}: {e}")))?
                .timeout(timeout)
                .connect_timeout(timeout);
            let addr: SocketAddr = *addr;
            Ok(ep.connect_with_connector_lazy(tower::service_fn(
                move |_: tonic::transport::Uri| async move {
                    let s = tokio::net::TcpStream::connect(addr).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(s))
                },
            )))
        }
    }
}

/// Asks the CSI endpoint's Identity service whether it is ready; `Err` says why not.
pub async fn probe(endpoint: &Endpoint, timeout: Duration) -> std::result::Result<(), String> {
    let channel = channel(endpoint, timeout).map_err(|e| e.to_string())?;
    let call = async move { IdentityClient::new(channel).probe(ProbeRequest {}).await };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(format!(
            "the CSI endpoint did not answer Probe within {} ms",
            timeout.as_millis()
        )),
        Ok(Err(status)) => Err(format!("Probe failed: {}", status.message())),
        // CSI: an absent `ready` means ready.
        Ok(Ok(resp)) if resp.get_ref().ready == Some(false) => {
            Err("the CSI endpoint reports not ready".into())
        }
        Ok(Ok(_)) => Ok(()),
    }
}

/// Reads one request head; `None` when it does not arrive in time or in bounds.
async fn read_head(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    let read = tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), async {
        while len < buf.len() {
            let n = conn.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    matches!(read, Ok(Ok(()))).then(|| String::from_utf8_lossy(&buf[..len]).into_owned())
}

/// Serves `/healthz` on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    probe_timeout: Duration,
) -> Result<()> {
    loop {
        let (mut conn, peer) = listener
            .accept()
            .await
            .map_err(|e| Error::io("accepting on the health endpoint", e))?;
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let Some(head) = read_head(&mut conn).await else {
                tracing::debug!(%peer, "health request not read in time");
                return;
            };
            let mut words = head.split_whitespace();
            let method = words.next().unwrap_or("");
            let path = words.next().unwrap_or("").split('?').next().unwrap_or("");
            let (code, body) = match (method, path) {
                ("GET", "/healthz") => match probe(&endpoint, probe_timeout).await {
                    Ok(()) => ("200 OK", "ok\n".to_string()),
                    Err(why) => {
                        tracing::warn!(reason = %why, "health check failed");
                        ("503 Service Unavailable", format!("{why}\n"))
                    }
                },
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// Binds the health endpoint.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("listening on {addr} (health)"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityService;
    use crate::server::Services;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn health_server(
        endpoint: Endpoint,
    ) -> (SocketAddr, tokio::task::JoinHandle<Result<()>>) {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        (
            addr,
            tokio::spawn(serve(l, endpoint, Duration::from_millis(500))),
        )
    }

    #[tokio::test]
    async fn healthz_follows_the_csi_server_and_other_paths_404() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = Endpoint::Unix(dir.path().join("csi.sock"));
        let (addr, health) = health_server(endpoint.clone()).await;

        let down = get(addr, "/healthz").await;
        assert!(
            down.starts_with("HTTP/1.1 503"),
            "no CSI server yet: {down}"
        );
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 404"));

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ep = endpoint.clone();
        let csi = tokio::spawn(async move {
            let services = Services {
                identity: IdentityService::new(false),
                controller: None,
                node: None,
            };
            crate::server::serve(&ep, services, async {
                let _ = stopped.await;
            })
            .await
        });
        // The socket appears when the server binds; wait for it (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let up = loop {
            let r = get(addr, "/healthz").await;
            if r.starts_with("HTTP/1.1 200") || tokio::time::Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            up.starts_with("HTTP/1.1 200") && up.ends_with("ok\n"),
            "{up}"
        );

        stop.send(()).unwrap();
        csi.await.unwrap().unwrap();
        let after = get(addr, "/healthz").await;
        assert!(
            after.starts_with("HTTP/1.1 503"),
            "CSI server stopped: {after}"
        );
        health.abort();
    }

    #[tokio::test]
    async fn a_csi_socket_that_accepts_but_never_answers_is_unhealthy_within_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let wedged = tokio::net::UnixListener::bind(&path).unwrap();
        // Accepts connections and holds them without a byte of HTTP/2.
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = wedged.accept().await {
                held.push(c);
            }
        });
        let (addr, health) = health_server(Endpoint::Unix(path)).await;
        let started = tokio::time::Instant::now();
        let r = get(addr, "/healthz").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the probe is bounded by its timeout: {:?}",
            started.elapsed()
        );
        health.abort();
        holder.abort();
    }
}
