//! The engine runtime over real volume files and real data ports on 127.0.0.1, without
//! Kubernetes: a primary's export writes reach its replica before FLUSH returns, the
//! Lease fence and demotion stop IO, the epoch is persisted and never lowered, forwarded
//! IO is accepted only from the node the volume is attached to, and deletion removes the
//! replica's files.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use api::{ReplicaRole, ReplicaState};
use common::replicas::{Fixed, Node};
use engine::net::NetConfig;
use engine::replication::{AttachmentGeneration, Epoch, ForwardOp};
use node_agent::frontend::forwarding::{
    Attachment, Attachments, ForwardSettings, ForwardingBackend, PrimaryTarget,
};
use node_agent::frontend::nbd::BlockBackend;
use node_agent::replicas::{Assignment, Peer, ReplicaRuntime, RuntimeError};
use node_agent::replicas::{EngineSettings, VOLUME_FILE_NAME};

const SECRET: &[u8] = b"runtime-test-secret";
const SIZE: u64 = 8 << 20;
/// Above the 1 s heartbeat interval plus a round trip, short enough for tests.
const PROOF_WINDOW_MS: u64 = 1_500;

async fn node(name: &str) -> Node {
    let settings = EngineSettings {
        member_proof_window_ms: PROOF_WINDOW_MS,
        ..EngineSettings::default()
    };
    Node::start(name, SECRET, settings).await
}

fn assignment(
    dir: &Path,
    id: &str,
    role: ReplicaRole,
    epoch: u64,
    peer: Option<(&str, &str)>,
) -> Assignment {
    common::replicas::assignment(dir, id, role, epoch, SIZE, peer)
}

/// Replica r2 on `b` and primary r1 on `a` (shipping to r2), both applied at epoch 1.
async fn primary_with_replica(dir: &Path, a: &Node, b: &Node) -> (Assignment, Assignment) {
    let rb = assignment(&dir.join("b"), "r2", ReplicaRole::Replica, 1, None);
    b.assign(&rb).await;
    let ra = assignment(
        &dir.join("a"),
        "r1",
        ReplicaRole::Primary,
        1,
        Some(("r2", &b.address)),
    );
    a.assign(&ra).await;
    (ra, rb)
}

/// `primary` demoted to a replica at epoch 2, shipping to nobody.
fn demoted(primary: &Assignment) -> Assignment {
    Assignment {
        role: ReplicaRole::Replica,
        epoch: 2,
        peers: vec![],
        ..primary.clone()
    }
}

/// Promotes replica r2 on `b` to primary at epoch 2, shipping to r1 on `a`, and waits
/// until its export serves.
async fn promote_r2(dir: &Path, a: &Node, b: &Node) -> Arc<dyn BlockBackend> {
    let promoted = assignment(
        &dir.join("b"),
        "r2",
        ReplicaRole::Primary,
        2,
        Some(("r1", &a.address)),
    );
    b.runtime.apply(&promoted).await.unwrap();
    let nb = b.export();
    until_serving(&nb).await;
    nb
}

/// Node a with primary r1 of "vol" (no replicas) at epoch 1: the node, its assignment
/// and its export's backend.
async fn lone_primary(dir: &Path) -> (Node, Assignment, Arc<dyn BlockBackend>) {
    let a = node("a").await;
    let ra = assignment(dir, "r1", ReplicaRole::Primary, 1, None);
    a.assign(&ra).await;
    let backend = a.export();
    (a, ra, backend)
}

/// Node a serving primary r1 (no replicas) at epoch 1, executing forwarded IO on its
/// data port: (node, its export's backend, its local primaries).
async fn forwarding_primary(
    dir: &Path,
) -> (
    Node,
    Arc<dyn BlockBackend>,
    node_agent::replicas::LocalPrimaries,
) {
    let (a, _, backend) = lone_primary(dir).await;
    until_serving(&backend).await;
    let primaries = a.runtime.local_primaries();
    a.receiver.set_forward_handler(Arc::new(primaries.clone()));
    (a, backend, primaries)
}

/// Fences `primaries` by attachment as the agent does: the returned cell is the API
/// server's word on the attachment of "vol" (the test changes it), and the watch's view
/// starts out listing `attached`.
fn fence_by_api(
    primaries: &node_agent::replicas::LocalPrimaries,
    attached: Attachment,
) -> Arc<Mutex<Option<Attachment>>> {
    let api_says = Arc::new(Mutex::new(Some(attached.clone())));
    let view = {
        let api_says = api_says.clone();
        Arc::new(Attachments::new(Box::new(move |_v: &str| {
            Ok(api_says.lock().unwrap().clone())
        })))
    };
    view.begin_list();
    view.listed("vol", Some(attached));
    view.end_list();
    primaries.fence_by_attachment(view);
    api_says
}

/// Node b's forwarding export of "vol" to the primary on node a at `addr` (epoch 1), for
/// the attachment of `generation` when given.
async fn b_export(
    addr: SocketAddr,
    generation: Option<u64>,
) -> Result<ForwardingBackend, node_agent::frontend::nbd::BackendError> {
    ForwardingBackend::open_attached(
        "vol",
        NetConfig::new("b", SECRET),
        ForwardSettings {
            failover_wait_ms: 60_000,
            reconnect_backoff_initial_ms: 10,
            reconnect_backoff_max_ms: 50,
            ..ForwardSettings::default()
        },
        Arc::new(Fixed(PrimaryTarget {
            node: "a".into(),
            addr,
            epoch: Epoch(1),
        })),
        None,
        generation.map(AttachmentGeneration),
    )
    .await
}

/// A forwarded write of `byte` over the first block.
fn write_block0(byte: u8) -> ForwardOp {
    ForwardOp::Write {
        offset: 0,
        data: vec![byte; 4096],
    }
}

/// The first block of `backend`, read on a blocking thread.
async fn block0(backend: &Arc<dyn BlockBackend>) -> Vec<u8> {
    let be = backend.clone();
    blocking(move || {
        let mut buf = vec![0u8; 4096];
        be.read(0, &mut buf).map(|_| buf)
    })
    .await
    .expect("read on the primary")
}

/// Writes `len` bytes of `byte` at offset 0 through `backend` and flushes them; `when`
/// names the step in a failure.
async fn write_flushed(backend: &Arc<dyn BlockBackend>, byte: u8, len: usize, when: &str) {
    let be = backend.clone();
    let done = blocking(move || be.write(0, &vec![byte; len]).and_then(|()| be.flush())).await;
    done.unwrap_or_else(|e| panic!("write and flush {when}: {e}"));
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Waits until `backend` serves: a new primary serves once its members answered a
/// heartbeat (or its Lease is fresh) and, after a promotion, once the previous
/// primary's member proof ran out.
async fn until_serving(backend: &Arc<dyn BlockBackend>) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let be = backend.clone();
        let r = blocking(move || {
            let mut buf = vec![0u8; 4096];
            be.read(0, &mut buf)
        })
        .await;
        match r {
            Ok(()) => return,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "the primary never served: {e}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_flush_reaches_the_replica_and_demotion_fences_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (node("a").await, node("b").await);
    let (ra, _) = primary_with_replica(dir.path(), &a, &b).await;
    a.runtime.apply(&ra).await.unwrap();
    assert_eq!(a.runtime.local_role("vol"), Some(ReplicaRole::Primary));

    let export = a
        .runtime
        .exports()
        .get("vol")
        .expect("export of the primary");
    let backend: Arc<dyn BlockBackend> = export.backend().clone();
    write_flushed(&backend, 7, 8192, "replicated").await;
    let head = a.runtime.status("r1").await.unwrap().head_lsn;
    assert!(head >= 1);
    let sb = b.runtime.status("r2").await.unwrap();
    assert!(
        sb.flushed_lsn >= head,
        "flush returned before the replica had the data durable: replica {} < head {head}",
        sb.flushed_lsn
    );
    let sa = a.runtime.status("r1").await.unwrap();
    assert_eq!(sa.state, ReplicaState::Serving);
    assert!(
        sa.peers
            .iter()
            .any(|p| p.replica_id == "r2" && p.flushed_lsn >= head),
        "{:?}",
        sa.peers
    );

    // Without a fresh Lease the primary keeps serving while its member answers
    // heartbeats (an API-server outage alone does not stop IO).
    a.live.store(false, Ordering::Release);
    until_serving(&backend).await;
    write_flushed(&backend, 1, 4096, "on the member proof alone").await;
    assert_eq!(
        a.runtime.status("r1").await.unwrap().state,
        ReplicaState::Serving
    );
    a.live.store(true, Ordering::Release);

    // Demotion at a newer epoch: the export goes and the old handle refuses writes.
    let demoted = demoted(&ra);
    a.runtime.apply(&demoted).await.unwrap();
    assert!(a.runtime.exports().get("vol").is_none());
    let be = backend.clone();
    assert!(blocking(move || be.write(0, &[1u8; 4096])).await.is_err());
    let st = a.runtime.status("r1").await.unwrap();
    assert_eq!((st.epoch, st.state), (2, ReplicaState::InSync));
    assert!(matches!(
        a.runtime.apply(&ra).await,
        Err(RuntimeError::StaleEpoch { persisted: 2, .. })
    ));

    // The epoch survives a close and reopen.
    a.runtime.close("r1").await.unwrap();
    drop(backend);
    drop(export);
    let reopened = node("a2").await;
    let again = Assignment {
        epoch: 1,
        ..demoted.clone()
    };
    reopened.runtime.open(&again).await.unwrap();
    assert!(matches!(
        reopened.runtime.apply(&again).await,
        Err(RuntimeError::StaleEpoch { persisted: 2, .. })
    ));

    // Deletion removes the files.
    let file = demoted.dir.join(VOLUME_FILE_NAME);
    assert!(file.exists());
    reopened.runtime.delete("r1", &demoted.dir).await.unwrap();
    assert!(!file.exists() && !demoted.dir.exists());
    reopened.runtime.delete("r1", &demoted.dir).await.unwrap();
    assert!(reopened.runtime.status("r1").await.is_none());
}

/// A planned primary move as the operator drives it: the primary is demoted (Replica at
/// epoch 2) with writes it never flushed; its drain leaves the replica holding every
/// entry it has, so the replica can be promoted at epoch 2 at once, serves the same
/// bytes, and the old primary rejoins under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_demotion_drains_unflushed_writes_to_the_replica_before_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (node("a").await, node("b").await);
    let (ra, _) = primary_with_replica(dir.path(), &a, &b).await;
    let backend = a.export();
    let be = backend.clone();
    blocking(move || {
        be.write(0, &[3u8; 4096]).expect("write");
        be.flush().expect("first flush");
        // Never flushed by the client.
        for i in 1..32u64 {
            be.write(i * 4096, &[0x40 + i as u8; 4096]).expect("write");
        }
    })
    .await;
    let head = a.runtime.status("r1").await.unwrap().head_lsn;
    assert!(head >= 32, "head {head}");

    let demoted = demoted(&ra);
    a.runtime.apply(&demoted).await.unwrap();
    let sa = a.runtime.status("r1").await.unwrap();
    let sb = b.runtime.status("r2").await.unwrap();
    assert_eq!((sa.role, sa.epoch), (Some(ReplicaRole::Replica), 2));
    assert!(
        sb.flushed_lsn >= sa.flushed_lsn && sb.flushed_lsn >= head,
        "after the drain the replica must hold every entry: replica flushed {} < old primary flushed {} / head {head}",
        sb.flushed_lsn,
        sa.flushed_lsn
    );

    // Promote the replica at the same new epoch, shipping to the demoted primary.
    let nb = promote_r2(dir.path(), &a, &b).await;
    let got = blocking(move || {
        let mut buf = vec![0u8; 32 * 4096];
        nb.read(0, &mut buf).expect("read");
        nb.write(64 * 4096, &[9u8; 4096])
            .expect("write at the new epoch");
        nb.flush().expect("flush with the old primary as a member");
        buf
    })
    .await;
    assert!(got[..4096].iter().all(|&x| x == 3));
    for i in 1..32usize {
        assert!(
            got[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&x| x == 0x40 + i as u8),
            "block {i} differs on the new primary"
        );
    }
    let sa = a.runtime.status("r1").await.unwrap();
    let sb = b.runtime.status("r2").await.unwrap();
    assert!(
        sa.flushed_lsn >= sb.head_lsn,
        "the old primary rejoined: flushed {} of head {}",
        sa.flushed_lsn,
        sb.head_lsn
    );
}

#[tokio::test]
async fn shrinking_a_replica_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let n = node("a").await;
    let a = assignment(dir.path(), "r1", ReplicaRole::Replica, 1, None);
    n.runtime.open(&a).await.unwrap();
    let smaller = Assignment {
        size_bytes: SIZE / 2,
        ..a.clone()
    };
    assert!(matches!(
        n.runtime.open(&smaller).await,
        Err(RuntimeError::Shrink { .. })
    ));
    let bigger = Assignment {
        size_bytes: SIZE * 2,
        ..a.clone()
    };
    n.assign(&bigger).await;
    assert_eq!(
        n.runtime.status("r1").await.unwrap().size_bytes,
        Some(SIZE * 2)
    );
}

/// A flush waiting for an unreachable member when the Lease runs out is acknowledged
/// only on proof that nobody else can be primary: here the operator committed the set
/// without the dead member, so only this primary can ever be promoted (the member proof
/// of a primary alone in its set holds by itself). Without that commit the flush waits
/// (and fails at its timeout): the dead member might have been promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_outliving_the_lease_is_acknowledged_only_on_a_proof() {
    let dir = tempfile::tempdir().unwrap();
    let a = node("a").await;
    // A member nobody answers for: the flush waits for the control plane.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let ra = assignment(
        dir.path(),
        "r1",
        ReplicaRole::Primary,
        1,
        Some(("r2", &dead_addr)),
    );
    a.assign(&ra).await;
    let backend = a.export();
    let flush = tokio::task::spawn_blocking(move || {
        backend.write(0, &[9u8; 4096]).expect("write");
        backend.flush()
    });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !a
        .runtime
        .status("r1")
        .await
        .is_some_and(|s| s.unreachable.iter().any(|m| m == "r2"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "r2 never reported unreachable"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The Lease runs out: no proof at all (r2 never answered), so nothing is served.
    a.live.store(false, Ordering::Release);
    assert!(
        !flush.is_finished(),
        "the flush must still be waiting for r2"
    );
    let probe = a.export();
    let e = blocking(move || probe.write(8192, &[1u8; 4096]))
        .await
        .expect_err("a write was accepted without a Lease or a member proof");
    assert!(e.to_string().contains("fenced"), "{e}");
    // The smaller set is committed: the wait ends.
    let alone = Assignment {
        peers: vec![],
        in_sync_set: vec!["r1".into()],
        in_sync_set_generation: 2,
        ..ra.clone()
    };
    a.runtime.apply(&alone).await.unwrap();
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), flush)
        .await
        .expect("the flush ends once the set is committed")
        .expect("flush task");
    result.expect("with r2 out of the committed set, this primary alone can serve");
}

/// Without a Lease and without answers from its members, a primary stops within the
/// member-proof window; a member promoted meanwhile waits out that window after the
/// last heartbeat it answered before it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_lease_or_member_answers_the_primary_stops_and_the_promoted_one_waits() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (node("a").await, node("b").await);
    let (_, rb) = primary_with_replica(dir.path(), &a, &b).await;
    let old = a.export();
    write_flushed(&old, 6, 4096, "with the replica").await;
    // Give r2 a heartbeat to answer, so its promotion below must wait.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    a.live.store(false, Ordering::Release);
    loop {
        let be = old.clone();
        if blocking(move || be.write(0, &[6u8; 4096])).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the member proof never held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The operator promotes r2 at epoch 2 (the old primary's Lease expired).
    let promoted = Assignment {
        role: ReplicaRole::Primary,
        epoch: 2,
        peers: vec![],
        in_sync_set: vec!["r2".into()],
        in_sync_set_generation: 2,
        ..rb.clone()
    };
    let t0 = std::time::Instant::now();
    b.runtime.apply(&promoted).await.unwrap();
    let new = b.export();
    let be = new.clone();
    let early = blocking(move || be.write(4096, &[7u8; 4096])).await;
    let early_err = early.expect_err("the promoted primary served before the old proof ran out");
    assert!(
        early_err.to_string().contains("member proof"),
        "{early_err}"
    );

    // The old primary loses its proof (r2 answers nothing at epoch 1 any more) and
    // stops; the new one starts serving; the old one stopped first.
    let mut old_stopped = None;
    let mut new_serving = None;
    while old_stopped.is_none() || new_serving.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline + std::time::Duration::from_secs(10),
            "old stopped {old_stopped:?}, new serving {new_serving:?}"
        );
        if old_stopped.is_none() {
            let be = old.clone();
            if blocking(move || be.write(0, &[8u8; 4096])).await.is_err() {
                old_stopped = Some(t0.elapsed());
            }
        }
        if new_serving.is_none() {
            let be = new.clone();
            if blocking(move || be.write(4096, &[7u8; 4096])).await.is_ok() {
                new_serving = Some(t0.elapsed());
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (old_stopped, new_serving) = (old_stopped.unwrap(), new_serving.unwrap());
    assert!(
        old_stopped <= new_serving,
        "the new primary served at {new_serving:?}, the old one stopped only at {old_stopped:?}"
    );
}

/// After a Lease lapse the agent re-reads its assignments from the API server: a primary
/// they no longer name at its epoch serves nothing, reads included (a deposed primary
/// must not return pre-failover data), and the forwarding path answers NotPrimary so a
/// forwarder re-routes instead of failing the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_the_api_no_longer_names_serves_no_reads() {
    use engine::forward::{ForwardHandler, ForwardSource};
    use engine::replication::{Epoch, ForwardOp, ForwardStatus, VolumeId};
    use std::collections::BTreeMap;

    let dir = tempfile::tempdir().unwrap();
    let (a, _, backend) = lone_primary(dir.path()).await;
    write_flushed(&backend, 5, 4096, "on the lone primary").await;
    let read = |be: Arc<dyn BlockBackend>| {
        blocking(move || {
            let mut buf = vec![0u8; 4096];
            be.read(0, &mut buf).map(|_| buf[0])
        })
    };
    assert_eq!(read(backend.clone()).await.expect("read"), 5);

    // Still assigned at its epoch: nothing changes.
    let same = BTreeMap::from([("r1".to_string(), (ReplicaRole::Primary, 1))]);
    assert_eq!(a.runtime.fence_unassigned_primaries(&same).await, 0);
    assert_eq!(read(backend.clone()).await.expect("read"), 5);

    // Demoted in the API while this node could not hear it.
    let demoted = BTreeMap::from([("r1".to_string(), (ReplicaRole::Replica, 2))]);
    assert_eq!(a.runtime.fence_unassigned_primaries(&demoted).await, 1);
    let e = read(backend.clone())
        .await
        .expect_err("a deposed primary served a read");
    assert!(e.to_string().contains("no longer assigned"), "{e}");
    let out = a.runtime.local_primaries().handle(
        &ForwardSource::in_process("a"),
        &VolumeId::new("vol".to_string()).unwrap(),
        Epoch(1),
        ForwardOp::Read {
            offset: 0,
            length: 4096,
        },
    );
    assert_eq!(out.status, ForwardStatus::NotPrimary, "{}", out.detail);
}

/// A primary the API assigns a newer epoch is fenced until it applied that epoch, then
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_assigned_a_newer_epoch_serves_once_it_applied_it() {
    use std::collections::BTreeMap;

    let dir = tempfile::tempdir().unwrap();
    let (a, ra, backend) = lone_primary(dir.path()).await;
    let newer = BTreeMap::from([("r1".to_string(), (ReplicaRole::Primary, 3))]);
    assert_eq!(a.runtime.fence_unassigned_primaries(&newer).await, 1);
    let be = backend.clone();
    assert!(blocking(move || be.write(0, &[1u8; 4096])).await.is_err());
    a.runtime
        .apply(&Assignment { epoch: 3, ..ra })
        .await
        .unwrap();
    write_flushed(&backend, 1, 4096, "at the applied epoch").await;
}

/// A primary whose replica answers with a newer epoch (another primary was promoted)
/// stops serving at once, reads included, before any assignment reaches its agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_fenced_by_a_peer_serves_no_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (node("a").await, node("b").await);
    let (_, rb) = primary_with_replica(dir.path(), &a, &b).await;
    let backend = a.export();
    write_flushed(&backend, 3, 4096, "replicated").await;

    // The replica learns epoch 2 (it was promoted, or follows a new primary).
    b.runtime
        .apply(&Assignment { epoch: 2, ..rb })
        .await
        .unwrap();
    // The old primary's next barrier meets the newer epoch.
    let be = backend.clone();
    let flush = tokio::task::spawn_blocking(move || {
        let _ = be.write(4096, &[4u8; 4096]);
        be.flush()
    });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !a
        .runtime
        .status("r1")
        .await
        .and_then(|s| s.last_error)
        .is_some_and(|e| e.contains("fenced"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the primary never reported being fenced by its peer"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let be = backend.clone();
    let read = blocking(move || {
        let mut buf = vec![0u8; 4096];
        be.read(0, &mut buf)
    })
    .await;
    assert!(read.is_err(), "a primary fenced by its peer served a read");
    assert!(
        flush.await.expect("flush task").is_err(),
        "a fenced primary acknowledged a flush"
    );
}

/// An agent restart reopens the volume at the epoch it served at: it may have lost
/// entries it issued (and shipped) there, so it does not serve at that epoch again. It
/// reports `api::PRIMARY_NEEDS_NEW_EPOCH_ERROR` as a Failed primary and serves once the
/// operator assigns the next epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_reopened_at_its_epoch_serves_only_at_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (first, at1, backend) = lone_primary(dir.path()).await;
    blocking(move || {
        backend.write(0, &[5u8; 4096]).expect("write");
        backend.flush().expect("flush");
    })
    .await;
    first.runtime.close_all().await;
    drop(first);

    // The stopped driver's task lets go of the volume file once the runtime drops it.
    let again = node("a").await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = again.runtime.open(&at1).await {
        assert!(tokio::time::Instant::now() < deadline, "reopen: {e}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    again.runtime.apply(&at1).await.unwrap();
    let st = again.runtime.status("r1").await.unwrap();
    assert_eq!(
        (st.state, st.role, st.epoch),
        (ReplicaState::Failed, Some(ReplicaRole::Primary), 1)
    );
    assert_eq!(
        st.last_error.as_deref(),
        Some(api::PRIMARY_NEEDS_NEW_EPOCH_ERROR)
    );
    assert!(
        again.runtime.exports().get("vol").is_none(),
        "nothing served"
    );
    // Applying the same assignment again changes nothing.
    again.runtime.apply(&at1).await.unwrap();
    assert!(again.runtime.exports().get("vol").is_none());

    let at2 = assignment(dir.path(), "r1", ReplicaRole::Primary, 2, None);
    again.runtime.apply(&at2).await.unwrap();
    let st = again.runtime.status("r1").await.unwrap();
    assert_eq!(
        (st.state, st.epoch, st.last_error),
        (ReplicaState::Serving, 2, None)
    );
    let backend = again.export();
    let got = blocking(move || {
        let mut buf = vec![0u8; 4096];
        backend.read(0, &mut buf).expect("read");
        buf
    })
    .await;
    assert_eq!(got, vec![5u8; 4096]);
}

/// Forwarded IO runs on a primary only when it comes from the node the volume is attached
/// to. Attached to b: b's writes land, c's (over the data port, authenticated as c) and
/// the primary's own node's (in process) are refused as "fenced: not the attached node"
/// and change nothing. Then b is force-detached and c attached: c is served as soon as
/// the API server says so (even before the watch caught up), and b's forwarder gets EIO
/// without re-routing or retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_io_is_accepted_only_from_the_attached_node() {
    use engine::forward::ForwardHandler;
    use engine::forward::{ForwardClient, ForwardSource};
    use engine::replication::{ForwardPayload, ForwardStatus, VolumeId};
    use node_agent::frontend::nbd::BackendError;

    let dir = tempfile::tempdir().unwrap();
    let (a, backend, primaries) = forwarding_primary(dir.path()).await;
    let api_says = fence_by_api(&primaries, Attachment::on("b"));

    let addr = a.address.parse().unwrap();
    let vol = VolumeId::new("vol".to_string()).unwrap();
    let write = write_block0;
    let from_b = ForwardClient::connect(addr, &NetConfig::new("b", SECRET), 10_000)
        .await
        .expect("b connects");
    let from_c = ForwardClient::connect(addr, &NetConfig::new("c", SECRET), 10_000)
        .await
        .expect("c connects");
    let ok = from_b.call(&vol, Epoch(1), write(0xb1)).await.unwrap();
    assert_eq!(ok.status, ForwardStatus::Ok, "{}", ok.detail);
    let refused = from_c.call(&vol, Epoch(1), write(0xc1)).await.unwrap();
    assert_eq!(refused.status, ForwardStatus::Io, "{}", refused.detail);
    assert!(
        refused.detail.starts_with("fenced: not the attached node"),
        "{}",
        refused.detail
    );
    let p = primaries.clone();
    let v = vol.clone();
    let local =
        blocking(move || p.handle(&ForwardSource::in_process("a"), &v, Epoch(1), write(0xa1)))
            .await;
    assert_eq!(local.status, ForwardStatus::Io, "{}", local.detail);
    let read = from_b
        .call(
            &vol,
            Epoch(1),
            ForwardOp::Read {
                offset: 0,
                length: 4096,
            },
        )
        .await
        .unwrap();
    assert_eq!(read.status, ForwardStatus::Ok, "{}", read.detail);
    match read.payload {
        ForwardPayload::Data(d) => assert!(d.iter().all(|&x| x == 0xb1), "{:#x}", d[0]),
        other => panic!("read answered {other:?}"),
    }

    // b's forwarding export, as on b's node.
    let b_export = Arc::new(b_export(addr, None).await.expect("b's export opens"));
    // Force-detached from b, attached to c: the API server says so, the watch lags.
    *api_says.lock().unwrap() = Some(Attachment::on("c"));
    let ok = from_c.call(&vol, Epoch(1), write(0xc2)).await.unwrap();
    assert_eq!(ok.status, ForwardStatus::Ok, "{}", ok.detail);
    let switches = b_export.switches();
    let be = b_export.clone();
    let e = blocking(move || be.write(0, &[0xb2; 4096]))
        .await
        .expect_err("a node no longer attached wrote");
    assert!(
        matches!(&e, BackendError::Io(m) if m.contains("fenced: not the attached node")),
        "{e}"
    );
    assert_eq!(
        b_export.switches(),
        switches,
        "a fenced request was re-routed"
    );
    let buf = block0(&backend).await;
    assert!(buf.iter().all(|&x| x == 0xc2), "block holds {:#x}", buf[0]);
}

/// A re-attach to the same node (ControllerUnpublish, then ControllerPublish to it again,
/// or a force-detach and re-attach) bumps the attachment generation. The node's
/// forwarding export of the older attachment, which may still hold requests it keeps
/// retrying, must not write any more: its requests are refused as "fenced: stale
/// attachment", it surfaces EIO without re-routing or retrying, and the block keeps what
/// the current attachment wrote. The current export, and requests without a generation
/// (tools), are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_of_an_older_attachment_to_the_same_node_is_fenced() {
    use engine::forward::{ForwardClient, ForwardHandler, ForwardSource};
    use engine::replication::{ForwardStatus, VolumeId};
    use node_agent::frontend::nbd::BackendError;

    let dir = tempfile::tempdir().unwrap();
    let (a, backend, primaries) = forwarding_primary(dir.path()).await;
    let api_says = fence_by_api(&primaries, Attachment::on("b").at(1));

    let addr = a.address.parse().unwrap();
    let export = |generation: u64| b_export(addr, Some(generation));
    let old = Arc::new(export(1).await.expect("b's export of attachment 1 opens"));
    let o = old.clone();
    blocking(move || o.write(0, &[0xb1; 4096]))
        .await
        .expect("the current attachment writes");

    // Unpublished and published to b again: generation 2 in the API server; the watch
    // has not caught up. b's new export writes; the old one is still open.
    *api_says.lock().unwrap() = Some(Attachment::on("b").at(2));
    let new = Arc::new(export(2).await.expect("b's export of attachment 2 opens"));
    let n = new.clone();
    blocking(move || n.write(0, &[0xb2; 4096]))
        .await
        .expect("the new attachment writes");

    // The old export gave up its connection (a request timeout, a broken path) and dials
    // anew, as it does before every retry: a connection newer than the new export's,
    // sending for generation 1.
    let vol = VolumeId::new("vol".to_string()).unwrap();
    let write = write_block0;
    let redial = ForwardClient::connect(addr, &NetConfig::new("b", SECRET), 10_000)
        .await
        .expect("b connects")
        .with_attachment(Some(AttachmentGeneration(1)));
    let r = redial.call(&vol, Epoch(1), write(0x01)).await.unwrap();
    assert_eq!(
        r.status,
        ForwardStatus::Io,
        "a connection of the older attachment wrote ({})",
        r.detail
    );
    assert!(
        r.detail.starts_with("fenced: stale attachment"),
        "{}",
        r.detail
    );
    // It neither supersedes nor disturbs the current attachment's export.
    let n = new.clone();
    blocking(move || n.write(0, &[0xb3; 4096]))
        .await
        .expect("the new attachment writes after the stale connection");

    let switches = old.switches();
    let o = old.clone();
    let e = blocking(move || o.write(0, &[0x01; 4096]))
        .await
        .expect_err("an export of an older attachment wrote");
    assert!(
        matches!(&e, BackendError::Io(m) if m.contains("fenced: stale attachment")),
        "{e}"
    );
    assert_eq!(old.switches(), switches, "a fenced request was re-routed");
    let o = old.clone();
    let e = blocking(move || o.flush())
        .await
        .expect_err("an export of an older attachment flushed");
    assert!(matches!(&e, BackendError::Io(_)), "{e}");

    // The handler itself, as the in-process path of b's node would call it.
    let p = primaries.clone();
    let v = vol.clone();
    let stale = blocking(move || {
        p.handle(
            &ForwardSource::in_process("b").with_attachment(Some(AttachmentGeneration(1))),
            &v,
            Epoch(1),
            write(0x02),
        )
    })
    .await;
    assert_eq!(stale.status, ForwardStatus::Io, "{}", stale.detail);
    assert!(
        stale.detail.starts_with("fenced: stale attachment"),
        "{}",
        stale.detail
    );

    let buf = block0(&backend).await;
    assert!(buf.iter().all(|&x| x == 0xb3), "block holds {:#x}", buf[0]);

    // The current export keeps working.
    let n = new.clone();
    blocking(move || n.flush())
        .await
        .expect("the new attachment flushes");
}

/// A primary whose WAL was held for a lagging peer (its retention floor) is demoted and
/// receives as a replica: the floor of its primary term must go with the term. Kept, it
/// pins the WAL at the lagging peer's LSN, the replica's WAL fills once the new primary
/// has shipped a WAL's worth, and the replica fails with "WAL full".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_primary_frees_its_wal_as_a_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (node("a").await, node("b").await);
    let rb = assignment(&dir.path().join("b"), "r2", ReplicaRole::Replica, 1, None);
    b.assign(&rb).await;
    // r1 ships to r2 (in sync) and to r3, a peer out of the in-sync set that never
    // answers: the primary keeps WAL for it from its first entry on.
    let mut ra = assignment(
        &dir.path().join("a"),
        "r1",
        ReplicaRole::Primary,
        1,
        Some(("r2", &b.address)),
    );
    ra.peers.push(Peer {
        replica_id: "r3".into(),
        node: "c".into(),
        address: Some("127.0.0.1:1".into()),
    });
    a.assign(&ra).await;
    let backend = a.export();
    until_serving(&backend).await;
    blocking(move || {
        for i in 0..64u64 {
            backend.write(i * 4096, &[1u8; 4096]).expect("write");
        }
        backend.flush().expect("flush with r2");
    })
    .await;

    // r1 is demoted, r2 promoted at epoch 2 shipping to r1.
    let demoted = demoted(&ra);
    a.runtime.apply(&demoted).await.unwrap();
    let nb = promote_r2(dir.path(), &a, &b).await;
    // Three WALs' worth (the WAL is 4 MiB), each MiB flushed with r1 in the set.
    let written = blocking(move || {
        for round in 0..12u64 {
            for i in 0..256u64 {
                nb.write((i % 1024) * 4096, &[round as u8; 4096])
                    .map_err(|e| format!("write {round}/{i}: {e}"))?;
            }
            nb.flush().map_err(|e| format!("flush {round}: {e}"))?;
        }
        Ok::<(), String>(())
    })
    .await;
    written.expect("the new primary's writes and flushes with r1 in sync");
    let sa = a.runtime.status("r1").await.unwrap();
    let sb = b.runtime.status("r2").await.unwrap();
    assert!(
        sa.flushed_lsn >= sb.flushed_lsn,
        "r1 fell behind: flushed {} of the primary's {}",
        sa.flushed_lsn,
        sb.flushed_lsn
    );
}
