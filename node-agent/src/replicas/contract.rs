//! The seam between the Kubernetes side and the replica engine: [`ReplicaRuntime`] is
//! what the rest of the agent implements; [`InMemoryRuntime`] is a faithful stand-in
//! for tests (it keeps the epoch rule and idempotency of the contract).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use api::{BlockReplicaStatus, Durability, ReplicaRole, ReplicaState};

/// A peer of a primary, with the data address resolved from its `BlockNode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub replica_id: String,
    pub node: String,
    /// `None` while the peer's node has not registered a data address.
    pub address: Option<String>,
}

/// One replica's assignment, as the operator wrote it, with local paths resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub volume: String,
    pub replica_id: String,
    /// The replica's directory, checked to be inside the data directory.
    pub dir: PathBuf,
    pub role: ReplicaRole,
    pub epoch: u64,
    pub size_bytes: u64,
    pub block_size: u32,
    pub durability: Durability,
    pub peers: Vec<Peer>,
    pub in_sync_set: Vec<String>,
    pub in_sync_set_generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    #[error("replica {replica}: epoch {offered} is lower than the persisted epoch {persisted}")]
    StaleEpoch {
        replica: String,
        offered: u64,
        persisted: u64,
    },
    #[error("replica {replica}: size may only grow ({current} → {offered} bytes)")]
    Shrink {
        replica: String,
        current: u64,
        offered: u64,
    },
    #[error("replica {0} is not open")]
    NotOpen(String),
    #[error("replica {replica}: {message}")]
    Failed { replica: String, message: String },
}

/// What the agent does with a replica.
///
/// Contract for implementations:
/// - `open` is idempotent: it opens the volume in `dir`, creating it with `size_bytes`
///   and `block_size` when absent, and grows it when `size_bytes` is larger; it never
///   shrinks and never destroys data.
/// - `apply` persists `epoch` before acting on role, peers or in-sync set, and refuses an
///   epoch lower than the persisted one (`StaleEpoch`); re-applying the same assignment
///   is a no-op.
/// - `status` reports what the replica really is (state, LSNs, persisted epoch, size).
/// - `close` stops serving and keeps the data; closing a closed replica is a no-op.
/// - `delete` closes and removes the data in `dir`; deleting an absent replica succeeds.
pub trait ReplicaRuntime: Send + Sync + 'static {
    fn open(&self, a: &Assignment) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn apply(&self, a: &Assignment) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn status(&self, replica_id: &str) -> impl Future<Output = Option<BlockReplicaStatus>> + Send;
    fn close(&self, replica_id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn delete(
        &self,
        replica_id: &str,
        dir: &Path,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
}

#[derive(Clone, Debug, Default)]
struct MemReplica {
    assignment: Option<Assignment>,
    open: bool,
    epoch: u64,
    size_bytes: u64,
}

/// An in-memory [`ReplicaRuntime`]: replicas are map entries; a primary reports
/// `Serving`, others `InSync`. Every call is logged for tests to inspect.
#[derive(Default)]
pub struct InMemoryRuntime {
    replicas: Mutex<BTreeMap<String, MemReplica>>,
    calls: Mutex<Vec<String>>,
    fail_open: Mutex<BTreeMap<String, String>>,
}

impl InMemoryRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls so far, as `"<op> <replica>"`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Replicas that exist (opened and not deleted).
    pub fn replica_ids(&self) -> Vec<String> {
        self.replicas
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The last applied assignment of a replica.
    pub fn assignment(&self, replica_id: &str) -> Option<Assignment> {
        self.replicas
            .lock()
            .ok()?
            .get(replica_id)?
            .assignment
            .clone()
    }

    /// Makes `open` of this replica fail with `message` (a broken disk).
    pub fn fail_open(&self, replica_id: &str, message: &str) {
        if let Ok(mut f) = self.fail_open.lock() {
            f.insert(replica_id.to_string(), message.to_string());
        }
    }

    fn log(&self, op: &str, id: &str) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(format!("{op} {id}"));
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, MemReplica>) -> T) -> T {
        let mut guard = match self.replicas.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut guard)
    }
}

impl ReplicaRuntime for InMemoryRuntime {
    async fn open(&self, a: &Assignment) -> Result<(), RuntimeError> {
        self.log("open", &a.replica_id);
        if let Some(m) = self
            .fail_open
            .lock()
            .ok()
            .and_then(|f| f.get(&a.replica_id).cloned())
        {
            return Err(RuntimeError::Failed {
                replica: a.replica_id.clone(),
                message: m,
            });
        }
        self.with(|m| {
            let r = m.entry(a.replica_id.clone()).or_default();
            if a.size_bytes < r.size_bytes {
                return Err(RuntimeError::Shrink {
                    replica: a.replica_id.clone(),
                    current: r.size_bytes,
                    offered: a.size_bytes,
                });
            }
            r.size_bytes = a.size_bytes;
            r.open = true;
            Ok(())
        })
    }

    async fn apply(&self, a: &Assignment) -> Result<(), RuntimeError> {
        self.log("apply", &a.replica_id);
        self.with(|m| {
            let r = m
                .get_mut(&a.replica_id)
                .filter(|r| r.open)
                .ok_or_else(|| RuntimeError::NotOpen(a.replica_id.clone()))?;
            if a.epoch < r.epoch {
                return Err(RuntimeError::StaleEpoch {
                    replica: a.replica_id.clone(),
                    offered: a.epoch,
                    persisted: r.epoch,
                });
            }
            r.epoch = a.epoch;
            r.assignment = Some(a.clone());
            Ok(())
        })
    }

    async fn status(&self, replica_id: &str) -> Option<BlockReplicaStatus> {
        self.with(|m| {
            let r = m.get(replica_id)?;
            let a = r.assignment.as_ref()?;
            Some(BlockReplicaStatus {
                state: match (r.open, a.role) {
                    (false, _) => ReplicaState::Disconnected,
                    (true, ReplicaRole::Primary) => ReplicaState::Serving,
                    (true, ReplicaRole::Replica) => ReplicaState::InSync,
                },
                role: Some(a.role),
                epoch: r.epoch,
                size_bytes: Some(r.size_bytes),
                in_sync_set_generation: a.in_sync_set_generation,
                ..Default::default()
            })
        })
    }

    async fn close(&self, replica_id: &str) -> Result<(), RuntimeError> {
        self.log("close", replica_id);
        self.with(|m| {
            if let Some(r) = m.get_mut(replica_id) {
                r.open = false;
            }
        });
        Ok(())
    }

    async fn delete(&self, replica_id: &str, _dir: &Path) -> Result<(), RuntimeError> {
        self.log("delete", replica_id);
        self.with(|m| m.remove(replica_id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(epoch: u64, size: u64) -> Assignment {
        Assignment {
            volume: "v".into(),
            replica_id: "r".into(),
            dir: "/d/v/r".into(),
            role: ReplicaRole::Primary,
            epoch,
            size_bytes: size,
            block_size: 4096,
            durability: Durability::SyncAll,
            peers: vec![],
            in_sync_set: vec!["r".into()],
            in_sync_set_generation: 1,
        }
    }

    #[tokio::test]
    async fn in_memory_runtime_keeps_the_contract() {
        let rt = InMemoryRuntime::new();
        assert_eq!(
            rt.apply(&a(1, 8)).await,
            Err(RuntimeError::NotOpen("r".into()))
        );
        rt.open(&a(1, 8)).await.unwrap();
        rt.open(&a(1, 8)).await.unwrap();
        rt.apply(&a(2, 8)).await.unwrap();
        rt.apply(&a(2, 8)).await.unwrap();
        assert!(matches!(
            rt.apply(&a(1, 8)).await,
            Err(RuntimeError::StaleEpoch { persisted: 2, .. })
        ));
        assert!(matches!(
            rt.open(&a(2, 4)).await,
            Err(RuntimeError::Shrink { .. })
        ));
        rt.open(&a(2, 16)).await.unwrap();
        let st = rt.status("r").await.unwrap();
        assert_eq!(
            (st.state, st.epoch, st.size_bytes),
            (ReplicaState::Serving, 2, Some(16))
        );
        rt.close("r").await.unwrap();
        assert_eq!(
            rt.status("r").await.unwrap().state,
            ReplicaState::Disconnected
        );
        rt.delete("r", Path::new("/d/v/r")).await.unwrap();
        rt.delete("r", Path::new("/d/v/r")).await.unwrap();
        assert!(rt.status("r").await.is_none());
        assert!(rt.replica_ids().is_empty());
    }
}
