//! The forwarding side: [`ForwardClient`] pipelines requests on one connection and pairs replies
//! by id. A malformed frame, an unknown reply id, or a reply that does not fit its request
//! ends the connection with a logged reason and fails every request in flight on it; it
//! never panics. Deciding what to retry is the caller's job.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::lock;
use super::protocol::{FORWARD_IN_FLIGHT_MAX, ForwardOutcome, op_name};
use crate::net::auth::client_handshake;
use crate::net::config::NetConfig;
use crate::net::framing::{NetError, spawn_writer};
use crate::replication::types::{Epoch, VolumeId};
use crate::replication::wire::{
    AttachmentGeneration, ForwardMsg, ForwardOp, ForwardPayload, ForwardStatus, Message,
};

/// Why a forwarded request got no answer from the connection.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: NetError,
    },
    #[error("forward connection to {addr} closed: {reason}")]
    ConnectionLost { addr: SocketAddr, reason: String },
    #[error("forwarded request to {addr} timed out after {timeout_ms} ms")]
    Timeout { addr: SocketAddr, timeout_ms: u64 },
}

type Pending = HashMap<u64, oneshot::Sender<ForwardOutcome>>;

struct ClientShared {
    addr: SocketAddr,
    pending: Mutex<Pending>,
    alive: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl ClientShared {
    /// Ends the connection: records why and fails every request in flight (their
    /// senders are dropped).
    fn fail(&self, reason: String) {
        if self.alive.swap(false, Ordering::AcqRel) {
            tracing::warn!(addr = %self.addr, %reason, "forward connection closed");
            *lock(&self.reason) = Some(reason);
        }
        lock(&self.pending).clear();
    }

    fn reason(&self) -> String {
        lock(&self.reason)
            .clone()
            .unwrap_or_else(|| "closed".to_string())
    }
}

/// One authenticated, pipelined connection to an agent's data port for forwarded IO.
/// Dropping it closes the connection.
pub struct ForwardClient {
    shared: Arc<ClientShared>,
    /// Sent with every request (see [`ForwardClient::with_attachment`]).
    attachment: Option<AttachmentGeneration>,
    tx: mpsc::Sender<Message>,
    next_id: AtomicU64,
    request_timeout_ms: u64,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for ForwardClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.fail("closed by this side".into());
    }
}

/// Checks that a reply's payload fits the request it answers.
fn payload_fits(op: &ForwardOp, o: &ForwardOutcome) -> Result<(), String> {
    if o.status != ForwardStatus::Ok {
        return Ok(());
    }
    match (op, &o.payload) {
        (ForwardOp::Read { length, .. }, ForwardPayload::Data(d))
            if d.len() == *length as usize =>
        {
            Ok(())
        }
        (ForwardOp::Geometry, ForwardPayload::Geometry { .. }) => Ok(()),
        (
            ForwardOp::Write { .. }
            | ForwardOp::WriteFua { .. }
            | ForwardOp::Flush
            | ForwardOp::Trim { .. }
            | ForwardOp::WriteZeroes { .. },
            ForwardPayload::None,
        ) => Ok(()),
        (op, p) => Err(format!(
            "reply payload {} does not fit request {}",
            payload_name(p),
            op_name(op)
        )),
    }
}

fn payload_name(p: &ForwardPayload) -> String {
    match p {
        ForwardPayload::None => "none".into(),
        ForwardPayload::Data(d) => format!("data({} bytes)", d.len()),
        ForwardPayload::Geometry { .. } => "geometry".into(),
    }
}

impl ForwardClient {
    /// Dials `addr`, authenticates with the cluster secret, and starts the reader.
    pub async fn connect(
        addr: SocketAddr,
        cfg: &NetConfig,
        request_timeout_ms: u64,
    ) -> Result<Self, ForwardError> {
        let connect = |source| ForwardError::Connect { addr, source };
        let stream = tokio::time::timeout(
            Duration::from_millis(cfg.dial_timeout_ms),
            TcpStream::connect(addr),
        )
        .await
        .map_err(|_| connect(NetError::Timeout("dial")))?
        .map_err(|e| connect(NetError::Io(e)))?;
        let (mut reader, w) = client_handshake(stream, cfg).await.map_err(connect)?;
        let shared = Arc::new(ClientShared {
            addr,
            pending: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            reason: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel::<Message>(FORWARD_IN_FLIGHT_MAX * 2);
        let writer = spawn_writer(w, rx);
        let s = shared.clone();
        let read = tokio::spawn(async move {
            let reason = loop {
                match reader.next().await {
                    Ok(Message::Forward(ForwardMsg::Reply {
                        id,
                        status,
                        epoch,
                        detail,
                        payload,
                    })) => {
                        let Some(waiter) = lock(&s.pending).remove(&id) else {
                            break format!("reply to unknown request id {id}");
                        };
                        let _ = waiter.send(ForwardOutcome {
                            status,
                            epoch,
                            detail,
                            payload,
                        });
                    }
                    Ok(other) => {
                        break format!("unexpected message {other:?}")
                            .chars()
                            .take(200)
                            .collect();
                    }
                    Err(NetError::Closed) => break "peer closed the connection".into(),
                    Err(e) => break format!("{e}"),
                }
            };
            s.fail(reason);
        });
        Ok(Self {
            shared,
            attachment: None,
            tx,
            next_id: AtomicU64::new(1),
            request_timeout_ms,
            tasks: vec![writer.abort_handle(), read.abort_handle()],
        })
    }

    /// Sends `attachment` with every request of this connection, so the primary can
    /// refuse a forwarder of an older attachment of the volume.
    pub fn with_attachment(mut self, attachment: Option<AttachmentGeneration>) -> Self {
        self.attachment = attachment;
        self
    }

    /// The data port this client is connected to.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Whether the connection is still usable.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Sends one request and waits for its reply. A timeout ends the whole connection:
    /// a reply that never comes means the peer or the path is gone, and the caller's
    /// retry must not race a late execution of the same request on this connection.
    pub async fn call(
        &self,
        volume: &VolumeId,
        epoch: Epoch,
        op: ForwardOp,
    ) -> Result<ForwardOutcome, ForwardError> {
        let lost = |s: &ClientShared| ForwardError::ConnectionLost {
            addr: s.addr,
            reason: s.reason(),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (wtx, wrx) = oneshot::channel();
        {
            let mut p = lock(&self.shared.pending);
            if !self.is_alive() {
                return Err(lost(&self.shared));
            }
            p.insert(id, wtx);
        }
        let check = op.clone_shape();
        let msg = Message::Forward(ForwardMsg::Request {
            id,
            volume: volume.clone(),
            epoch,
            op,
            attachment: self.attachment,
        });
        if self.tx.send(msg).await.is_err() {
            self.shared.fail("writer stopped".into());
            return Err(lost(&self.shared));
        }
        let outcome =
            match tokio::time::timeout(Duration::from_millis(self.request_timeout_ms), wrx).await {
                Ok(Ok(o)) => o,
                Ok(Err(_)) => return Err(lost(&self.shared)),
                Err(_) => {
                    self.shared.fail(format!(
                        "request {id} got no reply within {} ms",
                        self.request_timeout_ms
                    ));
                    return Err(ForwardError::Timeout {
                        addr: self.shared.addr,
                        timeout_ms: self.request_timeout_ms,
                    });
                }
            };
        if let Err(reason) = payload_fits(&check, &outcome) {
            self.shared.fail(reason);
            return Err(lost(&self.shared));
        }
        Ok(outcome)
    }
}

impl ForwardOp {
    /// The operation without its data (what a reply is checked against).
    fn clone_shape(&self) -> ForwardOp {
        match self {
            ForwardOp::Write { offset, .. } => ForwardOp::Write {
                offset: *offset,
                data: Vec::new(),
            },
            ForwardOp::WriteFua { offset, .. } => ForwardOp::WriteFua {
                offset: *offset,
                data: Vec::new(),
            },
            other => other.clone(),
        }
    }
}
