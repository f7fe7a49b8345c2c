//! Engine runtimes over real volume files and real data ports on 127.0.0.1, without
//! Kubernetes: one node's runtime with its data port and a Lease switch the test flips,
//! the assignments the operator would write for volume "vol", and a resolver that always
//! names one primary.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use api::{Durability, ReplicaRole};
use engine::net::{NetConfig, ReceiverServer, Transport};
use futures::future::BoxFuture;
use node_agent::frontend::forwarding::{PrimaryResolver, PrimaryTarget, ResolveError};
use node_agent::frontend::nbd::{BlockBackend, ExportRegistry};
use node_agent::replicas::{Assignment, EngineRuntime, EngineSettings, Peer, ReplicaRuntime};

/// The WAL of every test node: small, so a few MiB of writes wrap it.
pub const WAL_SIZE_BYTES: u64 = 4 << 20;

pub struct Node {
    pub runtime: EngineRuntime,
    pub receiver: Arc<ReceiverServer>,
    /// The data port, as peers name it.
    pub address: String,
    /// Whether the node's Lease is fresh, as the runtime's fence reads it.
    pub live: Arc<AtomicBool>,
}

impl Node {
    /// A runtime for node `name` authenticating with `secret`, its data port bound on
    /// 127.0.0.1, its Lease fresh; `settings` apart from the WAL size are the test's.
    pub async fn start(name: &str, secret: &[u8], settings: EngineSettings) -> Node {
        let net = NetConfig::new(name, secret);
        let receiver = Arc::new(
            ReceiverServer::bind("127.0.0.1:0".parse().unwrap(), net.clone())
                .await
                .expect("data port"),
        );
        let address = receiver.local_addr().to_string();
        let live = Arc::new(AtomicBool::new(true));
        let l = live.clone();
        let runtime = EngineRuntime::new(
            EngineSettings {
                wal_size_bytes: WAL_SIZE_BYTES,
                ..settings
            },
            receiver.clone(),
            Transport::new(net),
            ExportRegistry::new(),
            Arc::new(move || l.load(Ordering::Acquire)),
        );
        Node {
            runtime,
            receiver,
            address,
            live,
        }
    }

    /// Opens and applies `a`, as the agent does for a new assignment.
    pub async fn assign(&self, a: &Assignment) {
        self.runtime.open(a).await.unwrap();
        self.runtime.apply(a).await.unwrap();
    }

    /// The backend of this node's export of "vol" (it must have one).
    pub fn export(&self) -> Arc<dyn BlockBackend> {
        self.runtime
            .exports()
            .get("vol")
            .expect("export of the primary")
            .backend()
            .clone()
    }
}

/// Replica `id` of volume "vol" under `dir`, in role `role` at `epoch`; `peer` is the one
/// other member (its replica id and data port, on node "b"), in sync with it.
pub fn assignment(
    dir: &Path,
    id: &str,
    role: ReplicaRole,
    epoch: u64,
    size_bytes: u64,
    peer: Option<(&str, &str)>,
) -> Assignment {
    Assignment {
        volume: "vol".into(),
        replica_id: id.into(),
        dir: dir.join("vol").join(id),
        role,
        epoch,
        size_bytes,
        block_size: 4096,
        durability: Durability::SyncAll,
        peers: peer
            .map(|(pid, addr)| Peer {
                replica_id: pid.into(),
                node: "b".into(),
                address: Some(addr.into()),
            })
            .into_iter()
            .collect(),
        in_sync_set: match peer {
            Some((pid, _)) => vec![id.into(), pid.into()],
            None => vec![id.into()],
        },
        in_sync_set_generation: 1,
    }
}

/// A resolver that always names one primary.
pub struct Fixed(pub PrimaryTarget);

impl PrimaryResolver for Fixed {
    fn resolve<'a>(
        &'a self,
        _volume: &'a str,
    ) -> BoxFuture<'a, Result<PrimaryTarget, ResolveError>> {
        let t = self.0.clone();
        Box::pin(async move { Ok(t) })
    }
}
