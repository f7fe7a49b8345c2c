//! The attach gRPC service (proto/proto/agent.proto) over its unix socket, with a real
//! engine primary exported over NBD and the FUSE + loop attacher: Attach gives a block
//! device whose writes land in the volume, calls are idempotent, and the documented
//! error codes come back; Expand grows the device only after every in-sync replica has
//! grown. Needs root, FUSE and loop devices (present in CI).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use api::ReplicaRole;
use blockvol_proto::agent::node_agent_client::NodeAgentClient;
use blockvol_proto::agent::node_agent_server::NodeAgentServer;
use blockvol_proto::agent::{
    AttachRequest, DetachRequest, ExpandRequest, StatsRequest, StatsResponse,
};
use common::replicas::Node;
use csi::agent::unix_channel;
use futures::future::BoxFuture;
use node_agent::attach::{Attacher, FuseLoopAttacher};
use node_agent::attach_service::{AttachService, MemberSizes, ShortMembers};
use node_agent::frontend::nbd::{NbdServer, ServerConfig};
use node_agent::replicas::{Assignment, EngineSettings, ReplicaRuntime};
use testkit::Task;
use tokio_stream::wrappers::UnixListenerStream;

const CALL_TIMEOUT_MS: u64 = 30_000;

/// The sizes of the volume's other in-sync member, `r2`: 16 MiB until `grown`.
struct OneReplica {
    grown: Arc<AtomicBool>,
}

impl MemberSizes for OneReplica {
    fn short_of<'a>(
        &'a self,
        _volume: &'a str,
        size_bytes: u64,
    ) -> BoxFuture<'a, Result<ShortMembers, String>> {
        let size = if self.grown.load(Ordering::SeqCst) {
            32 << 20
        } else {
            16 << 20
        };
        let short = if size < size_bytes {
            vec![("r2".to_string(), Some(size))]
        } else {
            vec![]
        };
        Box::pin(async move { Ok(short) })
    }
}

/// Detaches whatever is still attached under the state dir, also when the test failed.
struct Cleanup {
    state_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(a) = FuseLoopAttacher::new(common::attach_config(&self.state_dir))
            && let Ok(list) = a.list()
        {
            for x in list {
                let _ = a.detach(&x.volume);
            }
        }
    }
}

/// Primary r1 of "vol" (16 MiB) alone at epoch 1, of `size_bytes`.
fn assignment(dir: &Path, size_bytes: u64) -> Assignment {
    common::replicas::assignment(dir, "r1", ReplicaRole::Primary, 1, size_bytes, None)
}

fn attach_req(volume: &str) -> AttachRequest {
    AttachRequest {
        volume_id: volume.into(),
        readonly: false,
        ..Default::default()
    }
}

/// What the service reports of "vol".
async fn stats(client: &mut NodeAgentClient<tonic::transport::Channel>) -> StatsResponse {
    client
        .stats(StatsRequest {
            volume_id: "vol".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn expand_req(size_bytes: u64) -> ExpandRequest {
    ExpandRequest {
        volume_id: "vol".into(),
        size_bytes,
    }
}

/// The size of the block device at `device`, as seeking to its end reports it.
async fn device_size(device: &str) -> u64 {
    let device = device.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(&device).expect("open device");
        f.seek(SeekFrom::End(0)).expect("device size")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_gives_a_block_device_whose_writes_reach_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("attach");
    let node = Arc::new(Node::start("a", b"secret", EngineSettings::default()).await);
    let exports = node.runtime.exports().clone();
    node.assign(&assignment(dir.path(), 16 << 20)).await;

    let nbd = NbdServer::new(exports.clone(), ServerConfig::default()).unwrap();
    let nbd_socket = dir.path().join("nbd.sock");
    nbd.listen_unix(&nbd_socket).await.unwrap();

    let _cleanup = Cleanup {
        state_dir: state_dir.clone(),
    };
    let attacher: Arc<dyn Attacher> =
        Arc::new(FuseLoopAttacher::new(common::attach_config(&state_dir)).unwrap());
    let n = node.clone();
    let replica_grown = Arc::new(AtomicBool::new(false));
    let service = AttachService::new(
        exports.clone(),
        nbd_socket,
        attacher,
        Arc::new(move |v: &str| n.runtime.local_role(v).is_some()),
    )
    .with_member_sizes(
        Arc::new(OneReplica {
            grown: replica_grown.clone(),
        }),
        Duration::from_millis(600),
    );
    let agent_socket = dir.path().join("agent.sock");
    let incoming = UnixListenerStream::new(tokio::net::UnixListener::bind(&agent_socket).unwrap());
    let _server = Task(tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(NodeAgentServer::new(service))
            .serve_with_incoming(incoming)
            .await;
    }));
    let mut client = NodeAgentClient::new(
        unix_channel(&agent_socket, Duration::from_millis(CALL_TIMEOUT_MS)).unwrap(),
    );

    let err = client.attach(attach_req("unknown")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let err = client.attach(attach_req("a/b")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    let att = client
        .attach(attach_req("vol"))
        .await
        .expect("attach")
        .into_inner();
    assert!(att.device_path.starts_with("/dev/loop"), "{att:?}");
    assert_eq!(att.size_bytes, 16 << 20);
    let again = client
        .attach(attach_req("vol"))
        .await
        .expect("attach again")
        .into_inner();
    assert_eq!(again.device_path, att.device_path, "attach is idempotent");

    // Write through the kernel device; fsync makes it a FLUSH on the export.
    let device = att.device_path.clone();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&device)
            .expect("open device");
        f.write_all_at(&[0x5au8; 8192], 1 << 20).expect("write");
        f.sync_all().expect("fsync");
    })
    .await
    .unwrap();
    let backend = exports.get("vol").unwrap().backend().clone();
    let got = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 8192];
        backend.read(1 << 20, &mut buf).map(|()| buf)
    })
    .await
    .unwrap()
    .expect("read the volume");
    assert!(
        got.iter().all(|b| *b == 0x5a),
        "device writes reached the volume"
    );

    let st = stats(&mut client).await;
    assert!(st.attached && st.healthy, "{st:?}");
    assert_eq!(st.device_path, att.device_path);

    // Expand before the volume grew names the sizes; after, the attached device grows
    // in place and keeps its data.
    let err = client.expand(expand_req(32 << 20)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    node.runtime
        .open(&assignment(dir.path(), 32 << 20))
        .await
        .expect("grow the volume");
    // The primary has grown, a replica has not: the device must not grow yet (writes
    // past the replica's end would follow), and the error says who is short.
    let err = client.expand(expand_req(32 << 20)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("r2 reports 16777216 bytes"), "{err}");
    assert_eq!(
        device_size(&att.device_path).await,
        16 << 20,
        "the device keeps its size until every replica grew"
    );
    replica_grown.store(true, Ordering::SeqCst);
    let grown = client
        .expand(expand_req(32 << 20))
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(grown.size_bytes, 32 << 20);
    assert_eq!(
        device_size(&att.device_path).await,
        32 << 20,
        "the device shows the new size"
    );
    let device = att.device_path.clone();
    let kept = tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&device)
            .expect("open device");
        f.write_all_at(&[0x6bu8; 4096], 30 << 20)
            .expect("write in the grown range");
        f.sync_all().expect("fsync");
        let mut kept = vec![0u8; 8192];
        f.read_exact_at(&mut kept, 1 << 20).expect("read");
        kept
    })
    .await
    .unwrap();
    assert!(kept.iter().all(|b| *b == 0x5a), "data before growing kept");

    for what in ["detach", "detach is idempotent"] {
        client
            .detach(DetachRequest {
                volume_id: "vol".into(),
            })
            .await
            .expect(what);
    }
    let st = stats(&mut client).await;
    assert!(!st.attached, "{st:?}");
    nbd.shutdown();
}
