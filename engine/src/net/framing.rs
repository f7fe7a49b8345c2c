//! Frames on an authenticated TCP stream: reading whole messages (a malformed or cut frame
//! is an error, never a partial message), writing them, and the bounded writer task that
//! owns a connection's write half.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::replication::wire::{FrameDecoder, Message, WireConfig, WireError, encode_frame};

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("peer closed the connection")]
    Closed,
    #[error("timed out during {0}")]
    Timeout(&'static str),
}

pub(super) async fn write_msg(w: &mut OwnedWriteHalf, m: &Message) -> Result<(), NetError> {
    w.write_all(&encode_frame(m)).await?;
    Ok(())
}

pub(crate) struct FrameReader {
    r: OwnedReadHalf,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl FrameReader {
    pub(super) fn new(r: OwnedReadHalf, cfg: WireConfig) -> Self {
        Self {
            r,
            dec: FrameDecoder::new(cfg),
            buf: vec![0u8; 64 * 1024],
        }
    }
    pub(crate) async fn next(&mut self) -> Result<Message, NetError> {
        loop {
            if let Some(m) = self.dec.next_message()? {
                return Ok(m);
            }
            let n = self.r.read(&mut self.buf).await?;
            if n == 0 {
                return Err(if self.dec.buffered_bytes() > 0 {
                    NetError::Wire(WireError::Truncated {
                        field: "frame cut by end of stream",
                    })
                } else {
                    NetError::Closed
                });
            }
            self.dec.feed(&self.buf[..n]);
        }
    }
}

pub(crate) fn spawn_writer<T: Into<Message> + Send + 'static>(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::Receiver<T>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_msg(&mut w, &m.into()).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    })
}
