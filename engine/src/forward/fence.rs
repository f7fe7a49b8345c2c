//! The fence of forwarded requests, one per data port.
//!
//! A forwarder that gives up on a connection (request timeout, broken path) re-routes and
//! retries on a new one, possibly to the same primary. Requests it sent on the old
//! connection must then never land after anything it sends on the new one. [`ForwardFences`]
//! keeps, per (sending node, volume), the newest connection that sent a request for it:
//! - a request of a closed connection, or of a connection older than the newest one of its
//!   node for that volume, is never admitted (answered `Io` "cancelled", not executed);
//! - a request of a newer connection is handed to the handler only after every admitted
//!   request of older connections of the same node for the same volume has finished.
//!
//! "Newer" orders connections by the attachment generation their requests carry first
//! ([`AttachmentGeneration`]; a request without one counts as of the newest generation
//! seen, so forwarders that send none are ordered by connection id alone, as before
//! generations existed) and by connection id second. So a
//! forwarder of an older attachment of the volume to the same node, dialling again after
//! the current attachment's forwarder connected, never supersedes it: its requests are
//! refused ("fenced: stale attachment"), and the current attachment's requests still
//! wait for whatever the older one had admitted.
//!
//! A request already admitted (running inside the volume, e.g. waiting for WAL space)
//! cannot be taken back; the second rule orders it before everything sent later, so a
//! stale WRITE never overwrites a newer one. Connection ids grow on every accepted
//! connection, and a forwarder dials its new connection only after giving up the old one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::lock;
use crate::replication::types::VolumeId;
use crate::replication::wire::AttachmentGeneration;

/// How new a connection's requests are: attachment generation, then connection id.
type Rank = (u64, u64);

/// The rank of `conn`'s request against `newest` (a request without a generation takes
/// the newest one's).
fn rank(conn: &ForwardConn, attachment: Option<AttachmentGeneration>, newest: Rank) -> Rank {
    (attachment.map_or(newest.0, |g| g.0), conn.id)
}

/// Per (sending node, volume) state of the forwarded-request fence (see the module docs).
#[derive(Default)]
struct FenceEntry {
    /// The newest connection that sent a request for this key.
    newest: Rank,
    /// Admitted, unfinished requests per connection.
    running: HashMap<Rank, usize>,
}

/// The forwarded-request fences of one data port (see the module docs).
#[derive(Default)]
pub struct ForwardFences {
    entries: Mutex<HashMap<(String, VolumeId), FenceEntry>>,
    changed: tokio::sync::Notify,
}

/// One data-port connection as the fence sees it.
pub struct ForwardConn {
    id: u64,
    closed: AtomicBool,
}

impl ForwardConn {
    pub fn new(id: u64) -> Arc<Self> {
        Arc::new(Self {
            id,
            closed: AtomicBool::new(false),
        })
    }

    /// Marks the connection closed: none of its requests is admitted from now on.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// A guard that closes the connection when dropped (also when its reader task is
    /// aborted).
    pub fn closes_on_drop(self: &Arc<Self>) -> ClosesOnDrop {
        ClosesOnDrop(self.clone())
    }
}

/// See [`ForwardConn::closes_on_drop`].
pub struct ClosesOnDrop(Arc<ForwardConn>);

impl Drop for ClosesOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl ForwardFences {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records that `conn` of `node` sent a request for `volume` for the attachment
    /// `attachment` (it becomes the newest connection of that node for the volume if it
    /// is newer), then waits until every admitted request of older connections of that
    /// node for that volume has finished.
    pub async fn arrive(
        &self,
        conn: &ForwardConn,
        node: &str,
        volume: &VolumeId,
        attachment: Option<AttachmentGeneration>,
    ) {
        let key = (node.to_string(), volume.clone());
        loop {
            // Registered before the check, so a finish between check and wait wakes us.
            let changed = self.changed.notified();
            {
                let mut m = lock(&self.entries);
                let e = m.entry(key.clone()).or_default();
                let mine = rank(conn, attachment, e.newest);
                e.newest = e.newest.max(mine);
                if !e.running.iter().any(|(c, n)| *c < mine && *n > 0) {
                    return;
                }
            }
            changed.await;
        }
    }

    /// Admits one request of `conn` to touch the volume, or says why it is cancelled.
    fn admit(
        self: &Arc<Self>,
        conn: &ForwardConn,
        node: &str,
        volume: &VolumeId,
        attachment: Option<AttachmentGeneration>,
    ) -> Result<Admitted, String> {
        let key = (node.to_string(), volume.clone());
        let mut m = lock(&self.entries);
        let e = m.entry(key.clone()).or_default();
        let mine = rank(conn, attachment, e.newest);
        if conn.closed.load(Ordering::Acquire) {
            return Err(format!(
                "cancelled: forward connection {} of node {node} is closed",
                conn.id
            ));
        }
        if e.newest.0 > mine.0 {
            return Err(format!(
                "fenced: stale attachment (node {node} forwards volume {volume} for \
                 attachment generation {}, this connection for {})",
                e.newest.0, mine.0
            ));
        }
        if e.newest > mine {
            return Err(format!(
                "cancelled: node {node} forwards volume {volume} on a newer connection"
            ));
        }
        e.newest = e.newest.max(mine);
        *e.running.entry(mine).or_default() += 1;
        Ok(Admitted {
            fences: Some((self.clone(), key, mine)),
        })
    }

    fn finish(&self, key: &(String, VolumeId), conn: Rank) {
        {
            let mut m = lock(&self.entries);
            if let Some(e) = m.get_mut(key)
                && let Some(n) = e.running.get_mut(&conn)
            {
                *n -= 1;
                if *n == 0 {
                    e.running.remove(&conn);
                }
            }
        }
        self.changed.notify_waiters();
    }
}

/// An admitted forwarded request; dropping it marks the request finished.
#[must_use = "the request counts as running while this lives"]
pub struct Admitted {
    fences: Option<(Arc<ForwardFences>, (String, VolumeId), Rank)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((f, key, conn)) = self.fences.take() {
            f.finish(&key, conn);
        }
    }
}

/// Who sent a forwarded request, and the fence it passes before touching the volume.
pub struct ForwardSource {
    node: String,
    fence: Option<(Arc<ForwardFences>, Arc<ForwardConn>, VolumeId)>,
    attachment: Option<AttachmentGeneration>,
}

impl ForwardSource {
    /// A request of `conn`, an authenticated data-port connection of `node`.
    pub fn connection(
        node: &str,
        fences: Arc<ForwardFences>,
        conn: Arc<ForwardConn>,
        volume: VolumeId,
    ) -> Self {
        Self {
            node: node.to_string(),
            fence: Some((fences, conn, volume)),
            attachment: None,
        }
    }

    /// A request run in process by this node's own forwarding export: no connection, so
    /// nothing can outlive it; always admitted.
    pub fn in_process(node: &str) -> Self {
        Self {
            node: node.to_string(),
            fence: None,
            attachment: None,
        }
    }

    /// The attachment generation the forwarder says it serves (see
    /// [`AttachmentGeneration`]).
    pub fn with_attachment(mut self, attachment: Option<AttachmentGeneration>) -> Self {
        self.attachment = attachment;
        self
    }

    /// The attachment generation the request was sent under, if the forwarder knows one.
    pub fn attachment(&self) -> Option<AttachmentGeneration> {
        self.attachment
    }

    /// The node that sent the request (authenticated by the data-port handshake).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the request would still be admitted (a cheap early check).
    pub fn is_current(&self) -> bool {
        match &self.fence {
            None => true,
            Some((f, conn, volume)) => {
                !conn.closed.load(Ordering::Acquire)
                    && lock(&f.entries)
                        .get(&(self.node.clone(), volume.clone()))
                        .is_none_or(|e| e.newest <= rank(conn, self.attachment, e.newest))
            }
        }
    }

    /// Admits the request to modify the volume: call right before touching it and keep
    /// the guard until done. `Err` (the request's connection was closed or superseded)
    /// means the request must not be executed.
    pub fn admit(&self) -> Result<Admitted, String> {
        match &self.fence {
            None => Ok(Admitted { fences: None }),
            Some((f, conn, volume)) => f.admit(conn, &self.node, volume, self.attachment),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> VolumeId {
        VolumeId::new("v".to_string()).unwrap()
    }

    #[test]
    fn a_closed_connection_admits_nothing() {
        let f = ForwardFences::new();
        let c = ForwardConn::new(1);
        let src = ForwardSource::connection("a", f.clone(), c.clone(), vol());
        drop(src.admit().expect("open connection admits"));
        c.close();
        assert!(!src.is_current());
        let e = src
            .admit()
            .err()
            .expect("closed connection admitted a request");
        assert!(e.contains("cancelled"), "{e}");
    }

    #[tokio::test]
    async fn a_newer_connection_of_the_node_supersedes_and_waits_for_admitted_requests() {
        let f = ForwardFences::new();
        let (old, new) = (ForwardConn::new(1), ForwardConn::new(2));
        f.arrive(&old, "a", &vol(), None).await;
        let old_src = ForwardSource::connection("a", f.clone(), old.clone(), vol());
        let running = old_src.admit().expect("admitted");
        // Another node's connections and other volumes are independent.
        let other = ForwardConn::new(3);
        f.arrive(&other, "b", &vol(), None).await;
        f.arrive(&other, "a", &VolumeId::new("w".to_string()).unwrap(), None)
            .await;
        assert!(old_src.is_current());

        let waiter = {
            let f = f.clone();
            let new = new.clone();
            tokio::spawn(async move { f.arrive(&new, "a", &vol(), None).await })
        };
        // The newer connection is recorded at once: nothing of the old one is admitted
        // any more, while the one already running holds the newer one back.
        while old_src.is_current() {
            tokio::task::yield_now().await;
        }
        assert!(old_src.admit().is_err());
        assert!(!waiter.is_finished());
        drop(running);
        waiter.await.unwrap();
        let new_src = ForwardSource::connection("a", f.clone(), new, vol());
        drop(new_src.admit().expect("the newer connection is admitted"));
    }

    /// A connection sending for an older attachment generation, though dialled later,
    /// never supersedes one of a newer attachment: its requests are refused as a stale
    /// attachment, the newer one's keep being admitted. The newer attachment still waits
    /// for what the older one had admitted.
    #[tokio::test]
    async fn an_older_attachment_never_supersedes_a_newer_one() {
        let f = ForwardFences::new();
        let g = |n| Some(AttachmentGeneration(n));
        let (first, current, redial) = (
            ForwardConn::new(1),
            ForwardConn::new(2),
            ForwardConn::new(3),
        );
        f.arrive(&first, "b", &vol(), g(1)).await;
        let first_src =
            ForwardSource::connection("b", f.clone(), first.clone(), vol()).with_attachment(g(1));
        let running = first_src.admit().expect("admitted");
        let waiter = {
            let f = f.clone();
            let current = current.clone();
            tokio::spawn(async move { f.arrive(&current, "b", &vol(), g(2)).await })
        };
        while first_src.is_current() {
            tokio::task::yield_now().await;
        }
        assert!(
            !waiter.is_finished(),
            "generation 2 ran before generation 1's admitted request finished"
        );
        drop(running);
        waiter.await.unwrap();
        let current_src =
            ForwardSource::connection("b", f.clone(), current, vol()).with_attachment(g(2));

        f.arrive(&redial, "b", &vol(), g(1)).await;
        let redial_src =
            ForwardSource::connection("b", f.clone(), redial, vol()).with_attachment(g(1));
        assert!(!redial_src.is_current());
        let e = redial_src
            .admit()
            .err()
            .expect("a stale attachment was admitted");
        assert!(e.starts_with("fenced: stale attachment"), "{e}");
        assert!(current_src.is_current());
        drop(
            current_src
                .admit()
                .expect("the current attachment is admitted"),
        );

        // A connection that sends no generation (a tool, an older build, an export
        // restored at agent start) is ordered by its id alone, as before generations.
        let plain = ForwardConn::new(4);
        f.arrive(&plain, "b", &vol(), None).await;
        let plain_src = ForwardSource::connection("b", f.clone(), plain, vol());
        drop(
            plain_src
                .admit()
                .expect("a later connection without a generation"),
        );
        assert!(!current_src.is_current());
    }
}
