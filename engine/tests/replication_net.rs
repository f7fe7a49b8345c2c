//! Component tests of the TCP shell on 127.0.0.1 over real volume files: restart and
//! catch-up, rebuild past the retention budget, address change with identity preserved,
//! epoch bump mid catch-up, and garbage frames from a raw socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::net::{
    NetConfig, PrimaryHandle, PrimarySnapshot, ReceiverServer, Transport, spawn_primary,
};
use engine::replication::wire::{ClientAuth, Message, NONCE_BYTES, encode_frame};
use engine::replication::{
    Body, Durability, Endpoint, EventKind, Generation, Peer, PrimaryConfig, ReceiverConfig,
    ReplicaId, ReplicaState, VolumeId, VolumeMsg,
};
use engine::{CreateOptions, EntryKind, Epoch, Lba, Lsn, Volume, VolumeConfig, WalEntry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BS: usize = 4096;
const SECRET: &[u8] = b"test-cluster-secret";
const WAIT_MS: u64 = 20_000;

fn vid() -> VolumeId {
    VolumeId::new("vol-net").unwrap()
}

fn rid(s: &str) -> ReplicaId {
    ReplicaId::new(s).unwrap()
}

fn vcfg() -> VolumeConfig {
    VolumeConfig {
        flush_interval_ms: 10,
        ..VolumeConfig::default()
    }
}

fn create(path: &Path) -> Arc<Volume> {
    create_with_wal(path, 2 << 20)
}

fn create_with_wal(path: &Path, wal_size_bytes: u64) -> Arc<Volume> {
    let opts = CreateOptions {
        size_bytes: 4 << 20,
        block_size: BS as u32,
        wal_size_bytes,
        epoch: Epoch(1),
        ..CreateOptions::default()
    };
    Arc::new(Volume::create_file(path, opts, vcfg()).unwrap())
}

fn open(path: &Path) -> Arc<Volume> {
    Arc::new(Volume::open_file(path, vcfg()).unwrap())
}

fn pcfg() -> PrimaryConfig {
    PrimaryConfig {
        barrier_timeout_ms: 2_000,
        reconnect_backoff_ms: 50,
        member_unreachable_after_ms: 200,
        ..PrimaryConfig::default()
    }
}

async fn server(addr: SocketAddr, name: &str, vol: Arc<Volume>) -> ReceiverServer {
    let s = ReceiverServer::bind(addr, NetConfig::new(name, SECRET))
        .await
        .unwrap();
    s.host(vid(), vol, ReceiverConfig::default());
    s
}

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn peer(id: &str, addr: SocketAddr) -> Peer {
    Peer {
        id: rid(id),
        endpoint: Endpoint::new(addr).unwrap(),
    }
}

async fn wait_for<F>(what: &str, h: &PrimaryHandle, mut f: F) -> PrimarySnapshot
where
    F: FnMut(&PrimarySnapshot) -> bool,
{
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let s = h.snapshot().await.expect("driver alive");
        if f(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn in_sync(s: &PrimarySnapshot, id: &str) -> bool {
    s.replicas
        .get(&rid(id))
        .is_some_and(|(st, _)| *st == ReplicaState::InSync)
}

fn write(vol: &Volume, lba: u64, byte: u8) {
    vol.write(Lba(lba), &vec![byte; BS]).unwrap();
}

fn same_content(a: &Volume, b: &Volume, blocks: u64) {
    for lba in 0..blocks {
        let mut x = vec![0u8; BS];
        let mut y = vec![0u8; BS];
        a.read(Lba(lba), &mut x).unwrap();
        b.read(Lba(lba), &mut y).unwrap();
        assert!(x == y, "replica differs at LBA {lba}");
    }
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rf3_flush_is_acked_once_both_replicas_have_the_data() {
    let d = Dir::new();
    let pv = create(&d.file("p"));
    let r0v = create(&d.file("r0"));
    let r1v = create(&d.file("r1"));
    let s0 = server(any_addr(), "n0", r0v.clone()).await;
    let s1 = server(any_addr(), "n1", r1v.clone()).await;
    let h = spawn_primary(
        pv.clone(),
        vid(),
        rid("p"),
        pcfg(),
        Generation(1),
        vec![rid("p"), rid("r0"), rid("r1")],
        vec![peer("r0", s0.local_addr()), peer("r1", s1.local_addr())],
        Transport::new(NetConfig::new("np", SECRET)),
    );
    wait_for("both in sync", &h, |s| in_sync(s, "r0") && in_sync(s, "r1")).await;
    for i in 0..200u64 {
        write(&pv, (i * 7) % 256, i as u8);
    }
    let l = h.flush().await.unwrap();
    assert!(l >= Lsn(200));
    assert!(r0v.durable_lsn() >= l && r1v.durable_lsn() >= l);
    same_content(&pv, &r0v, 256);
    same_content(&pv, &r1v, 256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_restarts_and_catches_up_from_retained_wal() {
    let d = Dir::new();
    let pv = create(&d.file("p"));
    let r0v = create(&d.file("r0"));
    let s0 = server(any_addr(), "n0", r0v.clone()).await;
    let addr = s0.local_addr();
    let h = spawn_primary(
        pv.clone(),
        vid(),
        rid("p"),
        pcfg(),
        Generation(1),
        vec![rid("p"), rid("r0")],
        vec![peer("r0", addr)],
        Transport::new(NetConfig::new("np", SECRET)),
    );
    wait_for("r0 in sync", &h, |s| in_sync(s, "r0")).await;
    for i in 0..50u64 {
        write(&pv, i, 1);
    }
    h.flush().await.unwrap();
    // Kill the replica mid-stream: its server and volume go away.
    s0.shutdown().await;
    drop(r0v);
    for i in 0..100u64 {
        write(&pv, i % 64, 2 + i as u8);
    }
    // Restart on the same address; the reopened volume still answers the epoch of its
    // durable entry (checkpoint epoch persisted), so the handshake can verify its history.
    let s0 = ReceiverServer::bind(addr, NetConfig::new("n0", SECRET))
        .await
        .unwrap();
    let r0v = open(&d.file("r0"));
    s0.host(vid(), r0v.clone(), ReceiverConfig::default());
    assert!(
        r0v.durable_lsn() >= Lsn(50),
        "acked data lost on the replica"
    );
    let snap = wait_for("r0 caught up", &h, |s| {
        in_sync(s, "r0") && s.replicas[&rid("r0")].1 >= Lsn(150)
    })
    .await;
    assert!(
        snap.events
            .iter()
            .any(|e| matches!(e.kind, EventKind::CatchUpProgress { .. })),
        "reconnect did not go through catch-up"
    );
    h.flush().await.unwrap();
    same_content(&pv, &r0v, 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_away_past_the_retention_budget_is_rebuilt() {
    let d = Dir::new();
    let pv = create(&d.file("p"));
    let r0v = create(&d.file("r0"));
    let s0 = server(any_addr(), "n0", r0v.clone()).await;
    let addr = s0.local_addr();
    let cfg = PrimaryConfig {
        wal_retention_bytes_max: 128 * 1024,
        ..pcfg()
    };
    let h = spawn_primary(
        pv.clone(),
        vid(),
        rid("p"),
        cfg,
        Generation(1),
        vec![rid("p")],
        vec![peer("r0", addr)],
        Transport::new(NetConfig::new("np", SECRET)),
    );
    wait_for("r0 in sync", &h, |s| in_sync(s, "r0")).await;
    s0.shutdown().await;
    for i in 0..100u64 {
        write(&pv, i % 80, 9 + i as u8);
    }
    wait_for("r0 escalated", &h, |s| {
        s.replicas
            .get(&rid("r0"))
            .is_some_and(|(st, _)| *st == ReplicaState::NeedsRebuild)
    })
    .await;
    // The joined member was counted; the control plane drops it, then asks for a rebuild.
    h.commit_in_sync_set(Generation(2), vec![rid("p")]);
    h.flush().await.unwrap();
    pv.checkpoint().unwrap();
    let _s0 = server(addr, "n0", r0v.clone()).await;
    h.request_rebuild(rid("r0"));
    let snap = wait_for("r0 rebuilt", &h, |s| in_sync(s, "r0")).await;
    assert!(
        snap.events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::PlanCreated(p) if p.contains("Rebuild")))
    );
    h.flush().await.unwrap();
    same_content(&pv, &r0v, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_address_change_keeps_its_identity() {
    let d = Dir::new();
    let pv = create(&d.file("p"));
    let r0v = create(&d.file("r0"));
    let s0 = server(any_addr(), "n0", r0v.clone()).await;
    let h = spawn_primary(
        pv.clone(),
        vid(),
        rid("p"),
        pcfg(),
        Generation(1),
        vec![rid("p"), rid("r0")],
        vec![peer("r0", s0.local_addr())],
        Transport::new(NetConfig::new("np", SECRET)),
    );
    wait_for("r0 in sync", &h, |s| in_sync(s, "r0")).await;
    write(&pv, 1, 1);
    let l = h.flush().await.unwrap();
    // The replica comes up at a new address; its live session at the old one is ended.
    let s0b = server(any_addr(), "n0", r0v.clone()).await;
    h.assign_peers(vec![peer("r0", s0b.local_addr())]);
    let snap = wait_for("r0 in sync at its new address", &h, |s| {
        in_sync(s, "r0")
            && s.events.iter().any(|e| matches!(&e.kind, EventKind::SessionInvalidated { reason } if reason == "endpoint_changed"))
    })
    .await;
    assert!(
        snap.replicas[&rid("r0")].1 >= l,
        "progress of the same replica was lost"
    );
    s0.shutdown().await;
    write(&pv, 2, 2);
    h.flush().await.unwrap();
    same_content(&pv, &r0v, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_bump_mid_catch_up_releases_the_session_pins() {
    let d = Dir::new();
    let pv = create_with_wal(&d.file("p"), 16 << 20);
    let r0v = create_with_wal(&d.file("r0"), 16 << 20);
    let s0 = server(any_addr(), "n0", r0v.clone()).await;
    let addr = s0.local_addr();
    let cfg = PrimaryConfig {
        catchup_batch_entries: 1,
        ..pcfg()
    };
    let h = spawn_primary(
        pv.clone(),
        vid(),
        rid("p"),
        cfg,
        Generation(1),
        vec![rid("p")],
        vec![peer("r0", addr)],
        Transport::new(NetConfig::new("np", SECRET)),
    );
    wait_for("r0 in sync", &h, |s| in_sync(s, "r0")).await;
    s0.shutdown().await;
    // Enough one-entry batches that the catch-up is still running when we look.
    for i in 0..1500u64 {
        write(&pv, i % 200, i as u8);
    }
    let _s0 = server(addr, "n0", r0v.clone()).await;
    wait_for("r0 catching up", &h, |s| {
        s.replicas
            .get(&rid("r0"))
            .is_some_and(|(st, _)| *st == ReplicaState::CatchingUp)
    })
    .await;
    h.change_epoch(Epoch(2)).unwrap();
    let snap = wait_for("session invalidated and released", &h, |s| {
        let inv = s.events.iter().rposition(|e| matches!(&e.kind, EventKind::SessionInvalidated { reason } if reason == "epoch_changed"));
        let rel = s.events.iter().rposition(|e| matches!(e.kind, EventKind::ExecResourcesReleased { .. }));
        matches!((inv, rel), (Some(i), Some(r)) if r > i)
    })
    .await;
    assert!(
        snap.holds <= 1,
        "catch-up pin survived the epoch change: {} holds",
        snap.holds
    );
    wait_for("r0 back in sync at epoch 2", &h, |s| in_sync(s, "r0")).await;
    assert_eq!(
        r0v.epoch(),
        Epoch(2),
        "replica did not persist the new epoch"
    );
    h.flush().await.unwrap();
    same_content(&pv, &r0v, 200);
}

async fn expect_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let r = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await;
        match r {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => assert!(Instant::now() < deadline, "server kept the connection open"),
        }
    }
}

async fn authenticated(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut auth, hello) = ClientAuth::start(SECRET, "raw", [5; NONCE_BYTES]);
    s.write_all(&encode_frame(&hello)).await.unwrap();
    let mut dec = engine::replication::wire::FrameDecoder::new(Default::default());
    let mut buf = [0u8; 4096];
    while !auth.is_authenticated() {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "server closed during authentication");
        dec.feed(&buf[..n]);
        while let Some(m) = dec.next_message().unwrap() {
            if let Some(reply) = auth.on_message(&m).unwrap() {
                s.write_all(&encode_frame(&reply)).await.unwrap();
            }
        }
    }
    s
}

fn entry_frame() -> Vec<u8> {
    encode_frame(&Message::Volume(VolumeMsg {
        volume: vid(),
        epoch: Epoch(1),
        body: Body::Entry(WalEntry {
            lsn: Lsn(1),
            epoch: Epoch(1),
            kind: EntryKind::Write,
            lba: Lba(0),
            blocks: 1,
            data: vec![0xEE; BS],
        }),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_frames_close_the_connection_and_apply_nothing() {
    let d = Dir::new();
    let rv = create(&d.file("r"));
    let s = server(any_addr(), "n0", rv.clone()).await;
    let addr = s.local_addr();

    // Not our protocol at all.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    expect_closed(&mut c).await;

    // A valid entry frame without authentication.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(&entry_frame()).await.unwrap();
    expect_closed(&mut c).await;

    // Wrong secret.
    let mut c = TcpStream::connect(addr).await.unwrap();
    let (_, hello) = ClientAuth::start(b"wrong-secret", "raw", [6; NONCE_BYTES]);
    c.write_all(&encode_frame(&hello)).await.unwrap();
    let proof = Message::Auth(engine::replication::wire::Auth::Proof {
        proof: [0; NONCE_BYTES],
    });
    c.write_all(&encode_frame(&proof)).await.unwrap();
    expect_closed(&mut c).await;

    // Authenticated, then a frame whose checksum is wrong.
    let mut c = authenticated(addr).await;
    let mut f = entry_frame();
    let n = f.len();
    f[n - 10] ^= 0xFF;
    c.write_all(&f).await.unwrap();
    expect_closed(&mut c).await;

    // Authenticated, then a frame cut short by the peer closing.
    let mut c = authenticated(addr).await;
    let f = entry_frame();
    c.write_all(&f[..f.len() / 2]).await.unwrap();
    c.shutdown().await.unwrap();
    expect_closed(&mut c).await;

    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let r = s.rejections();
        let has = |needle: &str| r.iter().any(|x| x.contains(needle));
        if has("bad frame magic")
            && has("before peer authentication")
            && has("authentication failed")
            && has("checksum mismatch")
            && has("cut by end of stream")
        {
            break;
        }
        assert!(Instant::now() < deadline, "missing logged reasons: {r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rv.head_lsn(), Lsn(0), "a rejected frame was applied");
}

/// On the wire: a handshake or heartbeat for a volume the node does not host is answered
/// `UnknownVolume` for that volume (with the sender's epoch), nothing of it is applied to
/// the hosted volume, and the connection stays open; a malformed frame still closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_volume_is_answered_per_volume_and_keeps_the_connection() {
    let d = Dir::new();
    let rv = create(&d.file("r"));
    let s = server(any_addr(), "n0", rv.clone()).await;
    let mut c = authenticated(s.local_addr()).await;
    let other = VolumeId::new("vol-elsewhere").unwrap();
    let msg = |volume: &VolumeId, body: Body| {
        encode_frame(&Message::Volume(VolumeMsg {
            volume: volume.clone(),
            epoch: Epoch(3),
            body,
        }))
    };
    let mut frames = msg(
        &other,
        Body::Entry(WalEntry {
            lsn: Lsn(1),
            epoch: Epoch(3),
            kind: EntryKind::Write,
            lba: Lba(0),
            blocks: 1,
            data: vec![1; BS],
        }),
    );
    frames.extend(msg(
        &other,
        Body::ResumeRequest {
            session: 1,
            head: Lsn(0),
            retained_start: Lsn(1),
            primary: None,
        },
    ));
    frames.extend(msg(&other, Body::Heartbeat { seq: 9 }));
    c.write_all(&frames).await.unwrap();
    let mut dec = engine::replication::wire::FrameDecoder::new(Default::default());
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while got.len() < 2 {
        let n = tokio::time::timeout(Duration::from_millis(WAIT_MS), c.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(
            n > 0,
            "the server closed the connection: {:?}",
            s.rejections()
        );
        dec.feed(&buf[..n]);
        while let Some(m) = dec.next_message().unwrap() {
            got.push(m);
        }
    }
    for m in &got {
        match m {
            Message::Volume(VolumeMsg {
                volume,
                epoch,
                body:
                    Body::Error {
                        code: engine::replication::wire::ErrorCode::UnknownVolume,
                        ..
                    },
            }) => {
                assert_eq!(volume, &other);
                assert_eq!(*epoch, Epoch(3), "the answer must not fence or look stale");
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(s.rejections().is_empty(), "{:?}", s.rejections());
    assert_eq!(
        rv.head_lsn(),
        Lsn(0),
        "an entry for another volume was applied"
    );
    // Still a connection with the usual rules: a bad checksum closes it.
    let mut f = entry_frame();
    let n = f.len();
    f[n - 10] ^= 0xFF;
    c.write_all(&f).await.unwrap();
    expect_closed(&mut c).await;
    assert!(
        s.rejections()
            .iter()
            .any(|r| r.contains("checksum mismatch")),
        "{:?}",
        s.rejections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_are_shipped_densely_in_lsn_order() {
    let d = Dir::new();
    let pv = create(&d.file("p"));
    let r0v = create(&d.file("r0"));
    let s0 = server(any_addr(), "n0", r0v.clone()).await;
    let h = spawn_primary(
        pv.clone(),
        vid(),
        rid("p"),
        pcfg(),
        Generation(1),
        vec![rid("p"), rid("r0")],
        vec![peer("r0", s0.local_addr())],
        Transport::new(NetConfig::new("np", SECRET)),
    );
    wait_for("r0 in sync", &h, |s| in_sync(s, "r0")).await;
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let v = pv.clone();
            std::thread::spawn(move || {
                for i in 0..100u64 {
                    write(&v, t * 100 + i, (t * 100 + i) as u8);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let l = h.flush().await.unwrap();
    assert_eq!(l, Lsn(400));
    assert!(r0v.durable_lsn() >= Lsn(400));
    assert_eq!(r0v.head_lsn(), pv.head_lsn());
    same_content(&pv, &r0v, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_data_port_serves_several_volumes() {
    let d = Dir::new();
    let s = ReceiverServer::bind(any_addr(), NetConfig::new("n0", SECRET))
        .await
        .unwrap();
    // One transport per node: both volumes share one connection pair to the peer.
    let transport = Transport::new(NetConfig::new("np", SECRET));
    let mut handles = Vec::new();
    let mut pairs = Vec::new();
    for v in ["vol-a", "vol-b"] {
        let id = VolumeId::new(v).unwrap();
        let pv = create(&d.file(&format!("p-{v}")));
        let rv = create(&d.file(&format!("r-{v}")));
        s.host(id.clone(), rv.clone(), ReceiverConfig::default());
        let h = spawn_primary(
            pv.clone(),
            id,
            rid("p"),
            pcfg(),
            Generation(1),
            vec![rid("p"), rid("r0")],
            vec![peer("r0", s.local_addr())],
            transport.clone(),
        );
        handles.push(h);
        pairs.push((pv, rv));
    }
    for h in &handles {
        wait_for("replica in sync", h, |s| in_sync(s, "r0")).await;
    }
    for (i, (pv, _)) in pairs.iter().enumerate() {
        for lba in 0..20u64 {
            write(pv, lba, (i as u8 + 1) * 10);
        }
    }
    for h in &handles {
        h.flush().await.unwrap();
    }
    for (pv, rv) in &pairs {
        same_content(pv, rv, 20);
    }
    assert_eq!(
        transport.links(),
        1,
        "volumes did not share the connection pair"
    );
    let mut a = vec![0u8; BS];
    pairs[1].1.read(Lba(3), &mut a).unwrap();
    assert_eq!(a[0], 20, "volumes were mixed up on the shared port");
}

/// A node's data port is shared by every volume between two nodes. A primary whose
/// replica's node does not host the volume yet (its agent is still creating the file: every
/// new placement starts like this) must end only its own session there, retrying later; the
/// other volumes on the same connection stay in sync and keep acknowledging flushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_for_an_unhosted_volume_ends_only_that_volumes_session() {
    let d = Dir::new();
    let s = ReceiverServer::bind(any_addr(), NetConfig::new("n0", SECRET))
        .await
        .unwrap();
    let transport = Transport::new(NetConfig::new("np", SECRET));
    let (a, b) = (
        VolumeId::new("vol-a").unwrap(),
        VolumeId::new("vol-b").unwrap(),
    );
    let (pa, ra) = (create(&d.file("p-a")), create(&d.file("r-a")));
    let (pb, rb) = (create(&d.file("p-b")), create(&d.file("r-b")));
    s.host(a.clone(), ra.clone(), ReceiverConfig::default());
    let ha = spawn_primary(
        pa.clone(),
        a,
        rid("p"),
        pcfg(),
        Generation(1),
        vec![rid("p"), rid("r0")],
        vec![peer("r0", s.local_addr())],
        transport.clone(),
    );
    wait_for("vol-a in sync", &ha, |x| in_sync(x, "r0")).await;
    let a_events_before = ha.snapshot().await.unwrap().events.len();

    // vol-b's replica is assigned on n0, which does not host it yet.
    let hb = spawn_primary(
        pb.clone(),
        b.clone(),
        rid("p"),
        pcfg(),
        Generation(1),
        vec![rid("p")],
        vec![peer("r0", s.local_addr())],
        transport.clone(),
    );
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    let mut round = 0u64;
    loop {
        write(&pa, round % 64, round as u8);
        let flushed = tokio::time::timeout(Duration::from_millis(5_000), ha.flush()).await;
        let sa = ha.snapshot().await.unwrap();
        let left: Vec<_> = sa.events[a_events_before..]
            .iter()
            .filter(|e| {
                matches!(&e.kind, EventKind::StateChanged { from, .. } if from == "InSync")
                    || matches!(e.kind, EventKind::SessionInvalidated { .. })
            })
            .collect();
        assert!(
            left.is_empty(),
            "vol-a lost its session while vol-b retried: {left:?}"
        );
        assert!(
            matches!(flushed, Ok(Ok(_))),
            "vol-a's flush failed or stalled while vol-b retried: {flushed:?}"
        );
        let sb = hb.snapshot().await.unwrap();
        let tries = sb
            .events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::SessionStarted))
            .count();
        if tries >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "vol-b did not retry its session: {sb:?}"
        );
        round += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        s.rejections().is_empty(),
        "the receiver closed a connection: {:?}",
        s.rejections()
    );
    assert_eq!(transport.links(), 1, "the shared link was replaced");

    // Once n0 hosts vol-b, its next attempt connects and replicates.
    s.host(b, rb.clone(), ReceiverConfig::default());
    wait_for("vol-b in sync", &hb, |x| in_sync(x, "r0")).await;
    for lba in 0..8u64 {
        write(&pb, lba, 0xB0 + lba as u8);
    }
    hb.flush().await.unwrap();
    same_content(&pb, &rb, 8);
    ha.flush().await.unwrap();
    same_content(&pa, &ra, 64);
    assert!(in_sync(&ha.snapshot().await.unwrap(), "r0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_member_blocks_flush_until_the_control_plane_commits_without_it() {
    let d = Dir::new();
    let pv = create(&d.file("p"));
    let r0v = create(&d.file("r0"));
    let s0 = server(any_addr(), "n0", r0v.clone()).await;
    let h = Arc::new(spawn_primary(
        pv.clone(),
        vid(),
        rid("p"),
        pcfg(),
        Generation(1),
        vec![rid("p"), rid("r0")],
        vec![peer("r0", s0.local_addr())],
        Transport::new(NetConfig::new("np", SECRET)),
    ));
    wait_for("r0 in sync", &h, |s| in_sync(s, "r0")).await;
    s0.shutdown().await;
    write(&pv, 0, 1);
    let h2 = h.clone();
    let flush = tokio::spawn(async move { h2.flush().await });
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let r = tokio::time::timeout(Duration::from_millis(500), h.next_report()).await;
        if let Ok(Some(engine::replication::Report::MemberUnreachable {
            replica,
            generation,
        })) = r
        {
            assert_eq!(replica, rid("r0"));
            assert_eq!(generation, Generation(1));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unreachable member never reported"
        );
    }
    assert!(
        !flush.is_finished(),
        "flush acked without the committed member"
    );
    h.commit_in_sync_set(Generation(2), vec![rid("p")]);
    let l = tokio::time::timeout(Duration::from_millis(WAIT_MS), flush)
        .await
        .expect("flush still blocked after the commit")
        .unwrap()
        .unwrap();
    assert_eq!(l, Lsn(1));
}

/// Writes `rounds` passes over the first `blocks` blocks in `chunk_blocks`-block writes,
/// never flushing; every block's content names its round and LBA.
fn unflushed_passes(vol: &Volume, blocks: u64, chunk_blocks: u64, rounds: u64) {
    for round in 0..rounds {
        for start in (0..blocks).step_by(chunk_blocks as usize) {
            let mut buf = Vec::with_capacity((chunk_blocks as usize) * BS);
            for lba in start..start + chunk_blocks {
                buf.extend(pass_block(round, lba));
            }
            if let Err(e) = vol.write(Lba(start), &buf) {
                panic!("unflushed write at LBA {start} of pass {round} failed: {e}");
            }
        }
    }
}

fn pass_block(round: u64, lba: u64) -> Vec<u8> {
    let mut b = vec![(round as u8) ^ (lba as u8); BS];
    b[..8].copy_from_slice(&round.to_le_bytes());
    b[8..16].copy_from_slice(&lba.to_le_bytes());
    b
}

fn holds_last_pass(vol: &Volume, who: &str, blocks: u64, round: u64) {
    for lba in 0..blocks {
        let mut got = vec![0u8; BS];
        vol.read(Lba(lba), &mut got).unwrap();
        assert!(
            got == pass_block(round, lba),
            "{who} does not hold pass {round} at LBA {lba}"
        );
    }
}

/// Writes of 4x the WAL size with no FLUSH: the primary must ask replicas for barriers on
/// its own, or the retention floor never moves and the WAL fills up (`WalFull`, EIO).
async fn unflushed_writes_of_4x_the_wal_succeed(replicas: &[&str], durability: Durability) {
    const WAL: u64 = 2 << 20;
    const BLOCKS: u64 = (4 << 20) / BS as u64;
    let d = Dir::new();
    let pv = create_with_wal(&d.file("p"), WAL);
    let mut servers = Vec::new();
    let mut vols = Vec::new();
    let mut peers = Vec::new();
    let mut committed = vec![rid("p")];
    for (i, r) in replicas.iter().enumerate() {
        let v = create_with_wal(&d.file(r), WAL);
        let s = server(any_addr(), &format!("n{i}"), v.clone()).await;
        peers.push(peer(r, s.local_addr()));
        committed.push(rid(r));
        vols.push(v);
        servers.push(s);
    }
    let h = spawn_primary(
        pv.clone(),
        vid(),
        rid("p"),
        PrimaryConfig {
            durability,
            ..pcfg()
        },
        Generation(1),
        committed,
        peers,
        Transport::new(NetConfig::new("np", SECRET)),
    );
    wait_for("all in sync", &h, |s| {
        replicas.iter().all(|r| in_sync(s, r))
    })
    .await;
    // 4 MiB volume, 2 passes in 256 KiB writes: 8 MiB = 4x the WAL, no flush in between.
    let rounds = 2;
    let start = Instant::now();
    let pv2 = pv.clone();
    tokio::task::spawn_blocking(move || unflushed_passes(&pv2, BLOCKS, 64, rounds))
        .await
        .unwrap();
    let written = start.elapsed();
    holds_last_pass(&pv, "primary", BLOCKS, rounds - 1);
    let l = h.flush().await.unwrap();
    let snap = if durability == Durability::Async {
        // Async acks after the local fsync; the background barriers still bring every
        // replica's reported durable LSN up to the flush without another client FLUSH.
        wait_for("replicas durable up to the flush", &h, |s| {
            replicas
                .iter()
                .all(|r| s.replicas.get(&rid(r)).is_some_and(|(_, f)| *f >= l))
        })
        .await
    } else {
        h.snapshot().await.unwrap()
    };
    println!(
        "rf{} {durability:?}: {} MiB unflushed through a {} MiB WAL in {:?}; flush acked at {l}; floor {:?}",
        replicas.len() + 1,
        (rounds * BLOCKS * BS as u64) >> 20,
        WAL >> 20,
        written,
        snap.retention_floor
    );
    for (r, v) in replicas.iter().zip(&vols) {
        assert!(v.durable_lsn() >= l, "{r} acked flush {l} without the data");
        assert!(in_sync(&snap, r), "{r} left the in-sync set: {snap:?}");
        holds_last_pass(v, r, BLOCKS, rounds - 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rf2_unflushed_writes_of_4x_the_wal_succeed_and_replicate() {
    unflushed_writes_of_4x_the_wal_succeed(&["r0"], Durability::SyncAll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rf3_unflushed_writes_of_4x_the_wal_succeed_and_replicate() {
    unflushed_writes_of_4x_the_wal_succeed(&["r0", "r1"], Durability::SyncAll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rf3_async_unflushed_writes_of_4x_the_wal_succeed_and_replicate() {
    unflushed_writes_of_4x_the_wal_succeed(&["r0", "r1"], Durability::Async).await;
}

/// A replica that goes away during unflushed writes may keep at most half the WAL (its
/// retention budget, fitted to the WAL): it is escalated to NeedsRebuild and writers
/// carry on, instead of the WAL staying full and every write failing with `WalFull`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_lost_during_unflushed_writes_escalates_instead_of_filling_the_wal() {
    const WAL: u64 = 2 << 20;
    const BLOCKS: u64 = (4 << 20) / BS as u64;
    let d = Dir::new();
    let pv = create_with_wal(&d.file("p"), WAL);
    let r0v = create_with_wal(&d.file("r0"), WAL);
    let s0 = server(any_addr(), "n0", r0v.clone()).await;
    let h = spawn_primary(
        pv.clone(),
        vid(),
        rid("p"),
        pcfg(),
        Generation(1),
        vec![rid("p"), rid("r0")],
        vec![peer("r0", s0.local_addr())],
        Transport::new(NetConfig::new("np", SECRET)),
    );
    wait_for("r0 in sync", &h, |s| in_sync(s, "r0")).await;
    s0.shutdown().await;
    let pv2 = pv.clone();
    tokio::task::spawn_blocking(move || unflushed_passes(&pv2, BLOCKS, 64, 2))
        .await
        .unwrap();
    holds_last_pass(&pv, "primary", BLOCKS, 1);
    let snap = wait_for("r0 escalated", &h, |s| {
        s.replicas
            .get(&rid("r0"))
            .is_some_and(|(st, _)| *st == ReplicaState::NeedsRebuild)
    })
    .await;
    assert_eq!(
        snap.retention_floor, None,
        "escalated replica still pins WAL"
    );
    // r0 is a committed member: flush acks wait for the control plane to drop it.
    h.commit_in_sync_set(Generation(2), vec![rid("p")]);
    let l = h.flush().await.unwrap();
    assert!(pv.durable_lsn() >= l);
}

/// The append observer's queue overflowed while nothing pinned the WAL (an RF1 primary:
/// no member holds retention), and the flusher recycled entries before the stalled
/// driver re-read them, so they can never be shipped. A replica that joins afterwards and
/// is committed must still hold every entry a later FLUSH acknowledges: FLUSH either
/// fails or covers what the members hold, never an ack at the driver's stale head.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn entries_recycled_before_the_driver_read_them_never_let_a_flush_ack_without_them() {
    let d = Dir::new();
    let wal = 128 << 10;
    let pv = create_with_wal(&d.file("p"), wal);
    let r0v = create(&d.file("r0"));
    let mut ncfg = NetConfig::new("np", SECRET);
    ncfg.append_queue_entries_max = 4;
    let h = spawn_primary(
        pv.clone(),
        vid(),
        rid("p"),
        PrimaryConfig {
            flush_timeout_ms: 3_000,
            ..pcfg()
        },
        Generation(1),
        vec![rid("p")],
        vec![],
        Transport::new(ncfg),
    );
    h.snapshot().await.expect("driver alive");

    // Stall the driver: the runtime's only worker waits until released.
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    let stall = tokio::spawn(async move {
        started_tx.send(()).unwrap();
        let _ = wait.recv();
    });
    started.recv().unwrap();
    // Three times the WAL: the volume's flusher (its own thread) recycles it meanwhile.
    let first = 3 * wal / BS as u64;
    for lba in 0..first {
        write(&pv, lba, (lba % 251) as u8 + 1);
    }
    assert!(
        pv.retained_start() > Lsn(5),
        "the WAL was not recycled: {:?}",
        pv.retained_start()
    );
    release.send(()).unwrap();
    stall.await.unwrap();

    // A replica joins (control plane: rebuild it, then commit it once in sync).
    let s0 = server(any_addr(), "n0", r0v.clone()).await;
    h.assign_peers(vec![peer("r0", s0.local_addr())]);
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let s = h.snapshot().await.unwrap();
        match s.replicas.get(&rid("r0")).map(|(st, _)| *st) {
            Some(ReplicaState::InSync) => break,
            Some(ReplicaState::NeedsRebuild) => h.request_rebuild(rid("r0")),
            _ => {}
        }
        assert!(Instant::now() < deadline, "r0 never got in sync: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.commit_in_sync_set(Generation(2), vec![rid("p"), rid("r0")]);

    // New writes after the replica is a committed member; then FLUSH.
    for lba in first..first + 16 {
        write(&pv, lba, 0xC0);
    }
    let head = pv.head_lsn();
    match h.flush().await {
        Ok(lsn) => {
            assert!(
                lsn >= head,
                "flush acked at {lsn}, below the head {head} it must cover"
            );
            assert!(
                r0v.durable_lsn() >= head,
                "flush acked while r0 holds only up to {}",
                r0v.durable_lsn()
            );
            same_content(&pv, &r0v, first + 16);
        }
        // Refusing is safe; the replica never got what it would have covered.
        Err(e) => eprintln!("flush refused: {e}"),
    }
}

fn settled(s: &PrimarySnapshot, id: &str) -> bool {
    s.replicas
        .get(&rid(id))
        .is_some_and(|(st, _)| matches!(st, ReplicaState::InSync | ReplicaState::NeedsRebuild))
}

/// Waits until nothing but the test holds `vol` (a stopped driver or server lets go of it
/// when its task is dropped), then closes it.
async fn close_when_released(vol: Arc<Volume>) {
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    while Arc::strong_count(&vol) > 1 {
        assert!(Instant::now() < deadline, "volume still held elsewhere");
        tokio::task::yield_now().await;
    }
    Arc::into_inner(vol).unwrap().close().unwrap();
}

/// RF3 failover over real volume files. Member b is three entries ahead of member c when
/// primary a's agent dies; a also holds two entries nobody else received, and every
/// flusher has run. b is promoted; c and the returning a restart from their files (crash
/// recovery with WAL history behind the checkpoint) and must both be caught up from b's
/// WAL - a after dropping its unreplicated suffix - never rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_new_primary_catches_up_every_member_without_a_rebuild() {
    let d = Dir::new();
    let av = create(&d.file("a"));
    let bv = create(&d.file("b"));
    let cv = create(&d.file("c"));
    let sb = server(any_addr(), "nb", bv.clone()).await;
    let sc = server(any_addr(), "nc", cv.clone()).await;
    let (b_addr, c_addr) = (sb.local_addr(), sc.local_addr());
    let h = spawn_primary(
        av.clone(),
        vid(),
        rid("a"),
        pcfg(),
        Generation(1),
        vec![rid("a"), rid("b"), rid("c")],
        vec![peer("b", b_addr), peer("c", c_addr)],
        Transport::new(NetConfig::new("na", SECRET)),
    );
    wait_for("b and c in sync", &h, |s| {
        in_sync(s, "b") && in_sync(s, "c")
    })
    .await;
    for i in 0..40u64 {
        write(&av, i % 32, 1 + i as u8);
    }
    h.flush().await.unwrap();
    // c's agent dies; the control plane commits {a, b}; b gets three more entries.
    sc.shutdown().await;
    close_when_released(cv).await;
    h.commit_in_sync_set(Generation(2), vec![rid("a"), rid("b")]);
    for i in 0..3u64 {
        write(&av, i, 100 + i as u8);
    }
    let acked = h.flush().await.unwrap();
    // a's agent dies with two entries b never got; every flusher ran before.
    sb.shutdown().await;
    write(&av, 5, 200);
    write(&av, 6, 201);
    av.flush().unwrap();
    av.checkpoint().unwrap();
    h.stop();
    close_when_released(av).await;
    bv.checkpoint().unwrap();
    assert!(bv.checkpoint_lsn() >= acked && bv.head_lsn() == acked);

    // b is promoted at epoch 2; a and c come back from their files.
    bv.set_epoch(Epoch(2)).unwrap();
    let cv = open(&d.file("c"));
    let sc = ReceiverServer::bind(c_addr, NetConfig::new("nc", SECRET))
        .await
        .unwrap();
    sc.host(vid(), cv.clone(), ReceiverConfig::default());
    let av = open(&d.file("a"));
    assert_eq!(av.head_lsn(), Lsn(acked.0 + 2), "a lost its own entries");
    let sa = server(any_addr(), "na", av.clone()).await;
    let h = spawn_primary(
        bv.clone(),
        vid(),
        rid("b"),
        pcfg(),
        Generation(3),
        vec![rid("b")],
        vec![peer("c", c_addr), peer("a", sa.local_addr())],
        Transport::new(NetConfig::new("nb", SECRET)),
    );
    let snap = wait_for("a and c classified", &h, |s| {
        settled(s, "a") && settled(s, "c")
    })
    .await;
    let plans: Vec<String> = snap
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::HandshakeClassified(o) => Some(format!("{}: {o}", e.replica)),
            _ => None,
        })
        .collect();
    assert!(
        in_sync(&snap, "a") && in_sync(&snap, "c"),
        "a member was not caught up: {plans:?}"
    );
    assert!(
        !plans.iter().any(|p| p.contains("Rebuild")),
        "a member was rebuilt: {plans:?}"
    );
    for i in 0..8u64 {
        write(&bv, i, 50 + i as u8);
    }
    h.commit_in_sync_set(Generation(4), vec![rid("b"), rid("c"), rid("a")]);
    h.flush().await.unwrap();
    same_content(&bv, &cv, 32);
    same_content(&bv, &av, 32);
}

/// The handshake classifications in a snapshot: (time, session, replica, outcome).
fn classified(s: &PrimarySnapshot) -> Vec<(u64, u64, String, String)> {
    s.events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::HandshakeClassified(o) => {
                Some((e.at_ms, e.session, e.replica.to_string(), o.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Bytes a recovery outcome ships: a catch-up its entries (4 KiB writes), a rebuild the
/// whole volume.
fn recovery_bytes(outcome: &str, volume_bytes: u64) -> u64 {
    let lsn_after = |key: &str| -> Option<u64> {
        let at = outcome.find(key)? + key.len();
        let digits: String = outcome[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    if outcome.contains("NeedsRebuild") {
        return volume_bytes;
    }
    match (lsn_after("from: Lsn("), lsn_after("target: Lsn(")) {
        (Some(f), Some(t)) => (t - f) * BS as u64,
        _ => 0,
    }
}

/// Measurement, not an assertion (`cargo test -p engine --test replication_net
/// measure_ -- --ignored --nocapture`): an RF3 volume of 1 GiB with a 64 MiB WAL (the
/// agent's defaults) under a 4 KiB random writer with a FLUSH every 16 writes, paced at
/// about 500 writes (2 MiB) a second, so 10 s of writes stay within the retention budget. The
/// primary a dies; b is promoted at once and the writer moves to it; a comes back from
/// its file 10 s later. Prints each member's recovery plans and the bytes they ship, and
/// the time from a's restart until all three are in sync; with and without WAL history
/// (without it, a replica's checkpoint frees its WAL, as before the history existed).
#[ignore]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_failover_recovery_with_and_without_wal_history() {
    const VOLUME_BYTES: u64 = 1 << 30;
    for history in [true, false] {
        let d = Dir::new();
        let cfg = VolumeConfig {
            wal_history_ms: if history { 300_000 } else { 0 },
            ..VolumeConfig::default()
        };
        let mk = |name: &str| {
            let opts = CreateOptions {
                size_bytes: VOLUME_BYTES,
                block_size: BS as u32,
                wal_size_bytes: 64 << 20,
                epoch: Epoch(1),
                ..CreateOptions::default()
            };
            Arc::new(Volume::create_file(&d.file(name), opts, cfg.clone()).unwrap())
        };
        let (av, bv, cv) = (mk("a"), mk("b"), mk("c"));
        let sb = server(any_addr(), "nb", bv.clone()).await;
        let sc = server(any_addr(), "nc", cv.clone()).await;
        let a_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let h = spawn_primary(
            av.clone(),
            vid(),
            rid("a"),
            pcfg(),
            Generation(1),
            vec![rid("a"), rid("b"), rid("c")],
            vec![peer("b", sb.local_addr()), peer("c", sc.local_addr())],
            Transport::new(NetConfig::new("na", SECRET)),
        );
        wait_for("b and c in sync", &h, |s| {
            in_sync(s, "b") && in_sync(s, "c")
        })
        .await;
        let blocks = VOLUME_BYTES / BS as u64;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % blocks
        };
        let mut n = 0u64;
        // About 500 writes (2 MiB) a second: 16 writes and a FLUSH per 32 ms tick.
        let mut pace = tokio::time::interval(Duration::from_millis(32));
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            n += 1;
            write(&av, next(), n as u8);
            if n.is_multiple_of(16) {
                h.flush().await.unwrap();
                pace.tick().await;
            }
        }
        let before = n;
        // a's agent is killed (with a few writes not yet flushed); b's agent turns primary.
        for _ in 0..5 {
            n += 1;
            write(&av, next(), n as u8);
        }
        h.stop();
        sb.shutdown().await;
        close_when_released(av).await;
        bv.set_epoch(Epoch(2)).unwrap();
        let h = spawn_primary(
            bv.clone(),
            vid(),
            rid("b"),
            pcfg(),
            Generation(3),
            vec![rid("b")],
            vec![peer("c", sc.local_addr()), peer("a", a_addr)],
            Transport::new(NetConfig::new("nb", SECRET)),
        );
        let promoted = Instant::now();
        let mut c_in_sync = None;
        // The driver keeps a bounded event list: collect the classifications as they come.
        let mut seen = std::collections::BTreeSet::new();
        while promoted.elapsed() < Duration::from_secs(10) {
            n += 1;
            write(&bv, next(), n as u8);
            if n.is_multiple_of(16) {
                h.flush().await.unwrap();
                pace.tick().await;
                let s = h.snapshot().await.unwrap();
                seen.extend(classified(&s));
                if c_in_sync.is_none() && in_sync(&s, "c") {
                    c_in_sync = Some(promoted.elapsed());
                }
            }
        }
        let during = n - before;
        let av = Arc::new(Volume::open_file(&d.file("a"), cfg.clone()).unwrap());
        let sa = ReceiverServer::bind(a_addr, NetConfig::new("na", SECRET))
            .await
            .unwrap();
        sa.host(vid(), av.clone(), ReceiverConfig::default());
        let restarted = Instant::now();
        let mut asked: Vec<&str> = Vec::new();
        let all_in_sync = loop {
            n += 1;
            write(&bv, next(), n as u8);
            if n.is_multiple_of(16) {
                h.flush().await.unwrap();
                pace.tick().await;
                let s = h.snapshot().await.unwrap();
                seen.extend(classified(&s));
                if in_sync(&s, "a") && in_sync(&s, "c") {
                    break Some(restarted.elapsed());
                }
                // The control plane's part: a member that needs a rebuild gets one.
                for m in ["a", "c"] {
                    if s.replicas
                        .get(&rid(m))
                        .is_some_and(|(st, _)| *st == ReplicaState::NeedsRebuild)
                        && !asked.contains(&m)
                    {
                        asked.push(m);
                        h.request_rebuild(rid(m));
                    }
                }
                if restarted.elapsed() > Duration::from_secs(120) {
                    println!("not in sync after 120 s: {:?}", s.replicas);
                    break None;
                }
            }
        };
        seen.extend(classified(&h.snapshot().await.unwrap()));
        println!(
            "history {history}: {before} writes before the failover, {during} while a was down; \
             c in sync {c_in_sync:?} after the promotion; all three in sync {all_in_sync:?} after a's restart"
        );
        for m in ["c", "a"] {
            let mut total = 0;
            for (_, _, r, o) in seen.iter().filter(|e| e.2 == m) {
                let bytes = recovery_bytes(o, VOLUME_BYTES);
                total += bytes;
                println!("  {r}: {o} -> {bytes} bytes");
            }
            println!("  {m}: {total} bytes shipped for recovery");
        }
        h.stop();
        drop(sa);
        drop(sc);
    }
}
