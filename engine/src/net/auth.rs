//! Peer authentication: both ends of every connection prove they hold the cluster secret
//! (HMAC challenge-response, `wire::ClientAuth`/`wire::ServerAuth`) before any other message
//! is read, within `auth_timeout_ms`.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use super::config::NetConfig;
use super::framing::{FrameReader, NetError, write_msg};
use crate::replication::wire::{ClientAuth, NONCE_BYTES, ServerAuth};

/// Uniqueness is what matters for a nonce.
fn nonce() -> [u8; NONCE_BYTES] {
    crate::random::unique_bytes()
}

pub(crate) async fn client_handshake(
    stream: TcpStream,
    cfg: &NetConfig,
) -> Result<(FrameReader, OwnedWriteHalf), NetError> {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(r, cfg.wire);
    let fut = async {
        let (mut auth, hello) = ClientAuth::start(&cfg.cluster_secret, &cfg.node_name, nonce());
        write_msg(&mut w, &hello).await?;
        while !auth.is_authenticated() {
            let m = reader.next().await?;
            if let Some(reply) = auth.on_message(&m)? {
                write_msg(&mut w, &reply).await?;
            }
        }
        Ok::<(), NetError>(())
    };
    tokio::time::timeout(Duration::from_millis(cfg.auth_timeout_ms), fut)
        .await
        .map_err(|_| NetError::Timeout("authentication"))??;
    Ok((reader, w))
}

pub(super) async fn server_handshake(
    stream: TcpStream,
    cfg: &NetConfig,
) -> Result<(FrameReader, OwnedWriteHalf, String), NetError> {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut reader = FrameReader::new(r, cfg.wire);
    let fut = async {
        let mut auth = ServerAuth::new(&cfg.cluster_secret, &cfg.node_name, nonce());
        while !auth.is_authenticated() {
            let m = reader.next().await?;
            if let Some(reply) = auth.on_message(&m)? {
                write_msg(&mut w, &reply).await?;
            }
        }
        Ok::<String, NetError>(auth.peer().unwrap_or_default().to_string())
    };
    let peer = tokio::time::timeout(Duration::from_millis(cfg.auth_timeout_ms), fut)
        .await
        .map_err(|_| NetError::Timeout("authentication"))??;
    Ok((reader, w, peer))
}
