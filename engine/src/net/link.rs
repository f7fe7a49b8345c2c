//! Outbound links of one node to its peers' data ports, shared by every primary volume on
//! the node. A link routes each incoming message to the session of its volume; a link
//! that fails ends every session riding on it (each hears `ConnectionLost`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::auth::client_handshake;
use super::config::NetConfig;
use super::framing::{NetError, spawn_writer};
use super::lock;
use crate::replication::ConnId;
use crate::replication::primary::Input;
use crate::replication::types::VolumeId;
use crate::replication::wire::{Body, Message, VolumeMsg};

/// Outbound links of one node, shared by every primary volume on it: one data and one
/// control connection per peer address, multiplexing volumes by volume ID. The data
/// connection carries everything whose order matters (handshake, truncation, entries,
/// rebuild, barriers - a barrier must not overtake the entries and truncations before it);
/// the control connection carries heartbeats, so liveness is not judged behind a data
/// backlog.
pub struct Transport {
    cfg: NetConfig,
    slots: Mutex<HashMap<SocketAddr, LinkSlot>>,
}

/// One peer's link, dialed at most once at a time.
type LinkSlot = Arc<tokio::sync::Mutex<Option<Arc<SharedLink>>>>;

impl Transport {
    pub fn new(cfg: NetConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The transport's settings (also those of the primary drivers using it).
    pub(super) fn cfg(&self) -> &NetConfig {
        &self.cfg
    }

    /// Live links (connection pairs) to peers.
    pub fn links(&self) -> usize {
        let slots: Vec<_> = lock(&self.slots).values().cloned().collect();
        slots
            .iter()
            .filter(|s| {
                s.try_lock()
                    .map(|g| g.as_ref().is_some_and(|l| l.alive()))
                    .unwrap_or(true)
            })
            .count()
    }

    pub(super) async fn link(&self, addr: SocketAddr) -> Result<Arc<SharedLink>, NetError> {
        let slot = lock(&self.slots).entry(addr).or_default().clone();
        let mut g = slot.lock().await;
        if let Some(l) = g.as_ref()
            && l.alive()
        {
            return Ok(l.clone());
        }
        let l = SharedLink::dial(addr, &self.cfg).await?;
        *g = Some(l.clone());
        Ok(l)
    }
}

/// Where a link delivers the inputs of one volume's session (its primary driver's queue).
pub(super) type Inbox = Box<dyn Fn(Input) + Send + Sync>;

struct Sub {
    conn: ConnId,
    inbox: Inbox,
}

pub(super) struct SharedLink {
    data: mpsc::Sender<VolumeMsg>,
    ctrl: mpsc::Sender<VolumeMsg>,
    subs: Mutex<HashMap<VolumeId, Sub>>,
    alive: AtomicBool,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl SharedLink {
    async fn dial(addr: SocketAddr, cfg: &NetConfig) -> Result<Arc<SharedLink>, NetError> {
        let open = |cfg: NetConfig| async move {
            let stream = tokio::time::timeout(
                Duration::from_millis(cfg.dial_timeout_ms),
                TcpStream::connect(addr),
            )
            .await
            .map_err(|_| NetError::Timeout("dial"))??;
            client_handshake(stream, &cfg).await
        };
        let (data_r, data_w) = open(cfg.clone()).await?;
        let (ctrl_r, ctrl_w) = open(cfg.clone()).await?;
        let (dtx, drx) = mpsc::channel(cfg.send_queue_frames_max.max(1));
        let (ctx, crx) = mpsc::channel(cfg.send_queue_frames_max.max(1));
        let link = Arc::new(SharedLink {
            data: dtx,
            ctrl: ctx,
            subs: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            tasks: Mutex::new(Vec::new()),
        });
        let mut tasks = vec![
            spawn_writer(data_w, drx).abort_handle(),
            spawn_writer(ctrl_w, crx).abort_handle(),
        ];
        for mut reader in [data_r, ctrl_r] {
            let l = link.clone();
            tasks.push(
                tokio::spawn(async move {
                    loop {
                        match reader.next().await {
                            Ok(Message::Volume(msg)) => l.route(msg),
                            Ok(Message::Auth(_) | Message::Forward(_)) => break,
                            Err(e) => {
                                if !matches!(e, NetError::Closed) {
                                    tracing::warn!(%addr, error = %e, "replica link closed");
                                }
                                break;
                            }
                        }
                    }
                    l.fail();
                })
                .abort_handle(),
            );
        }
        lock(&link.tasks).extend(tasks);
        Ok(link)
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    fn route(&self, msg: VolumeMsg) {
        if let Some(sub) = lock(&self.subs).get(&msg.volume) {
            let conn = sub.conn;
            (sub.inbox)(Input::Received { conn, msg });
        }
    }

    /// Routes `volume`'s messages to this session; false if the link already died.
    pub(super) fn subscribe(&self, volume: VolumeId, conn: ConnId, inbox: Inbox) -> bool {
        let mut subs = lock(&self.subs);
        // Checked under the lock `fail` drains, so a session is never left on a dead link.
        if !self.alive() {
            return false;
        }
        subs.insert(volume, Sub { conn, inbox });
        true
    }

    pub(super) fn unsubscribe(&self, volume: &VolumeId, conn: ConnId) {
        let mut subs = lock(&self.subs);
        if subs.get(volume).is_some_and(|s| s.conn == conn) {
            subs.remove(volume);
        }
    }

    /// Queues a message; false if the link cannot take it.
    pub(super) fn send(&self, msg: VolumeMsg) -> bool {
        let q = match msg.body {
            Body::Heartbeat { .. } => &self.ctrl,
            _ => &self.data,
        };
        self.alive() && q.try_send(msg).is_ok()
    }

    /// Ends the link and every session riding on it.
    pub(super) fn fail(&self) {
        let subs: Vec<Sub> = {
            let mut g = lock(&self.subs);
            if !self.alive.swap(false, Ordering::AcqRel) {
                return;
            }
            g.drain().map(|(_, s)| s).collect()
        };
        for s in subs {
            (s.inbox)(Input::ConnectionLost(s.conn));
        }
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}
