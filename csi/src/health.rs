//! The HTTP health endpoint of `blockvol-csi` (`--health-addr`), for the kubelet's
//! liveness and readiness probes, so the chart needs no livenessprobe sidecar.
//!
//! Contract: `GET /healthz` answers 200 only when the process's own CSI endpoint answers
//! an Identity `Probe` as ready within the probe timeout (what the upstream livenessprobe
//! sidecar checks: the gRPC server is up and not wedged), 503 with the reason otherwise;
//! any other path answers 404. The shared telemetry endpoint ([`telemetry::http`]) bounds
//! each request head in size and read time, and each probe is bounded by its timeout, so
//! a slow client or a stuck CSI server cannot pile up work here.

use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::csi_proto::ProbeRequest;
use crate::csi_proto::identity_client::IdentityClient;
use crate::error::{Error, Result};
use crate::server::Endpoint;

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

/// What `blockvol-csi` answers on its health endpoint: `/healthz` probes the CSI
/// endpoint; it serves no metrics and no readiness.
pub struct CsiHealth {
    endpoint: Endpoint,
    probe_timeout: Duration,
}

impl CsiHealth {
    pub fn new(endpoint: Endpoint, probe_timeout: Duration) -> Self {
        CsiHealth {
            endpoint,
            probe_timeout,
        }
    }
}

impl telemetry::http::Probes for CsiHealth {
    async fn healthz(&self) -> std::result::Result<(), String> {
        let r = probe(&self.endpoint, self.probe_timeout).await;
        if let Err(why) = &r {
            tracing::warn!(reason = %why, "health check failed");
        }
        r
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
    use testkit::http::get;

    async fn health_server(endpoint: Endpoint) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let health = CsiHealth::new(endpoint, Duration::from_millis(500));
        (
            addr,
            tokio::spawn(telemetry::http::serve(l, std::sync::Arc::new(health))),
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
