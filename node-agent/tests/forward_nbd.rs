//! Forwarding with real NBD clients: two engine runtimes with real data ports on
//! 127.0.0.1 (a primary with one replica), and a forwarding export on a third NBD
//! server whose backend sends everything to the primary's data port. qemu-io writes a
//! pattern through the forwarding export and reads it back; the primary's own export
//! has the same bytes and the replica has them durable after the forwarded FLUSH. A
//! replica answers forwarded IO with "not primary"; unauthenticated peers are refused;
//! a malformed request closes only its connection.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use api::ReplicaRole;
use common::replicas::{Fixed, Node};
use common::{TestServer, run_ok};
use engine::Epoch;
use engine::forward::{ForwardClient, ForwardOutcome};
use engine::net::NetConfig;
use engine::replication::wire::{
    ClientAuth, FRAME_HEADER_BYTES, FrameDecoder, Message, NONCE_BYTES, WireConfig, encode_frame,
};
use engine::replication::{ForwardMsg, ForwardOp, ForwardStatus, VolumeId};
use node_agent::frontend::forwarding::{ForwardSettings, ForwardingBackend, PrimaryTarget};
use node_agent::frontend::nbd::{BlockBackend, ServerConfig};
use node_agent::replicas::{Assignment, EngineSettings, ReplicaRuntime};

const SECRET: &[u8] = b"forward-nbd-secret";
const SIZE: u64 = 16 << 20;

/// A node whose data port executes forwarded IO for its primaries.
async fn node(name: &str) -> Node {
    let n = Node::start(name, SECRET, EngineSettings::default()).await;
    n.receiver
        .set_forward_handler(Arc::new(n.runtime.local_primaries()));
    n
}

fn assignment(dir: &Path, id: &str, role: ReplicaRole, peer: Option<(&str, &str)>) -> Assignment {
    common::replicas::assignment(dir, id, role, 1, SIZE, peer)
}

/// Node a serving primary r1 of "vol" alone, on `rt`'s runtime.
fn lone_primary(rt: &TestServer, dir: &Path) -> Node {
    rt.block_on(async {
        let a = node("a").await;
        a.assign(&assignment(dir, "r1", ReplicaRole::Primary, None))
            .await;
        a
    })
}

/// A forwarded FLUSH of "vol" at `epoch` from node c to the data port at `addr`.
fn forwarded_flush(rt: &TestServer, addr: SocketAddr, epoch: Epoch) -> ForwardOutcome {
    rt.block_on(async {
        let c = ForwardClient::connect(addr, &NetConfig::new("c", SECRET), 5_000)
            .await
            .expect("connect to the data port");
        let vol = VolumeId::new("vol".to_string()).unwrap();
        c.call(&vol, epoch, ForwardOp::Flush).await.expect("reply")
    })
}

/// Waits for the data port of `a` to record a rejection containing `reason`.
fn assert_rejection_logged(a: &Node, reason: &str) {
    let logged = common::wait_until(std::time::Duration::from_secs(10), || {
        a.receiver.rejections().iter().any(|r| r.contains(reason))
    });
    assert!(logged, "{:?}", a.receiver.rejections());
}

#[test]
fn qemu_io_through_a_forwarding_export_reaches_the_primary_and_its_replica() {
    let dir = tempfile::tempdir().unwrap();
    let fwd = TestServer::start(ServerConfig::default());
    let (a, b) = fwd.block_on(async {
        let (a, b) = (node("a").await, node("b").await);
        b.assign(&assignment(dir.path(), "r2", ReplicaRole::Replica, None))
            .await;
        a.assign(&assignment(
            dir.path(),
            "r1",
            ReplicaRole::Primary,
            Some(("r2", &b.address)),
        ))
        .await;
        (a, b)
    });
    let target = PrimaryTarget {
        node: "a".into(),
        addr: a.receiver.local_addr(),
        epoch: Epoch(1),
    };
    let backend = fwd
        .block_on(ForwardingBackend::open(
            "vol",
            NetConfig::new("c", SECRET),
            ForwardSettings::default(),
            Arc::new(Fixed(target)),
        ))
        .expect("forwarding backend");
    assert_eq!(backend.size_bytes(), SIZE);
    fwd.add("vol", Arc::new(backend));
    let uri = fwd.unix_uri("vol");

    let info = run_ok("nbdinfo", &[&uri]);
    assert!(info.contains(&SIZE.to_string()), "{info}");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 3M",
            "-c",
            "write -z 2M 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x5a 1M 1M",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "read -P 0x5a 3211264 983040",
            &uri,
        ],
    );
    assert!(!out.contains("fail") && !out.contains("mismatch"), "{out}");
    println!("qemu-io through the forwarding export:\n{out}");

    // The primary's own export holds the bytes, and the replica has them durable.
    let primary = a.runtime.exports().get("vol").expect("primary export");
    let mut buf = vec![0u8; 1 << 20];
    primary
        .backend()
        .read(1 << 20, &mut buf)
        .expect("read primary");
    assert!(buf.iter().all(|&x| x == 0x5a), "primary has the pattern");
    let (sa, sb) = fwd.block_on(async {
        (
            a.runtime.status("r1").await.unwrap(),
            b.runtime.status("r2").await.unwrap(),
        )
    });
    assert!(sa.head_lsn > 0);
    assert!(
        sb.flushed_lsn >= sa.head_lsn,
        "forwarded FLUSH returned before the replica was durable: {} < {}",
        sb.flushed_lsn,
        sa.head_lsn
    );

    // The replica's agent refuses forwarded IO: it is not primary.
    let reply = forwarded_flush(&fwd, b.receiver.local_addr(), Epoch(1));
    assert_eq!(reply.status, ForwardStatus::NotPrimary, "{reply:?}");
    // A request at an older epoch than the primary's is refused as stale... and a newer
    // one as not primary (this primary would be the stale one).
    let older = forwarded_flush(&fwd, a.receiver.local_addr(), Epoch(0));
    let newer = forwarded_flush(&fwd, a.receiver.local_addr(), Epoch(2));
    assert_eq!(older.status, ForwardStatus::StaleEpoch, "{older:?}");
    assert_eq!(older.epoch, Epoch(1));
    assert_eq!(newer.status, ForwardStatus::NotPrimary, "{newer:?}");
}

#[test]
fn unauthenticated_forwarders_are_refused_before_any_io() {
    let rt = TestServer::start(ServerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let a = lone_primary(&rt, dir.path());
    let addr = a.receiver.local_addr();

    // Wrong secret: the handshake fails.
    let e = rt
        .block_on(ForwardClient::connect(
            addr,
            &NetConfig::new("x", b"wrong"),
            5_000,
        ))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("authentication") || e.contains("secret"), "{e}");

    // No handshake at all: a forwarded WRITE as the first frame closes the connection
    // and is never executed.
    let frame = encode_frame(&Message::Forward(ForwardMsg::Request {
        id: 1,
        volume: VolumeId::new("vol".to_string()).unwrap(),
        epoch: Epoch(1),
        op: ForwardOp::Write {
            offset: 0,
            data: vec![0xee; 4096],
        },
        attachment: None,
    }));
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(&frame).expect("send");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no reply to an unauthenticated request");
    let primary = a.runtime.exports().get("vol").expect("export");
    let mut buf = vec![0u8; 4096];
    primary.backend().read(0, &mut buf).expect("read");
    assert!(
        buf.iter().all(|&x| x == 0),
        "the unauthenticated write was not applied"
    );
    // The connection is closed before the reason is recorded: poll for it.
    assert_rejection_logged(&a, "authentication");
}

/// Reads frames from a blocking stream until one decodes.
fn next_message(s: &mut std::net::TcpStream, dec: &mut FrameDecoder) -> Message {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(m) = dec.next_message().expect("valid frame from the data port") {
            return m;
        }
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "data port closed during the handshake");
        dec.feed(&buf[..n]);
    }
}

#[test]
fn a_malformed_forward_request_closes_only_that_connection() {
    let rt = TestServer::start(ServerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let a = lone_primary(&rt, dir.path());
    let addr = a.receiver.local_addr();

    // Authenticate properly, then send a forward request with an unknown operation.
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut dec = FrameDecoder::new(WireConfig::default());
    let (mut auth, hello) = ClientAuth::start(SECRET, "m", [3u8; NONCE_BYTES]);
    s.write_all(&encode_frame(&hello)).unwrap();
    while !auth.is_authenticated() {
        let m = next_message(&mut s, &mut dec);
        if let Some(reply) = auth.on_message(&m).expect("server proof") {
            s.write_all(&encode_frame(&reply)).unwrap();
        }
    }
    let good = encode_frame(&Message::Forward(ForwardMsg::Request {
        id: 1,
        volume: VolumeId::new("vol".to_string()).unwrap(),
        epoch: Epoch(1),
        op: ForwardOp::Flush,
        attachment: None,
    }));
    // Body = header .. trailer; the operation code is the payload's last byte.
    let mut payload = good[FRAME_HEADER_BYTES..good.len() - 4].to_vec();
    let last = payload.len() - 1;
    payload[last] = 0x7f;
    let mut bad = good[..FRAME_HEADER_BYTES].to_vec();
    bad.extend_from_slice(&payload);
    bad.extend_from_slice(&crc32c::crc32c(&bad).to_le_bytes());
    s.write_all(&bad).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no reply to a malformed request");
    assert_rejection_logged(&a, "forward.op");

    // The data port keeps serving well-formed forwarded IO.
    let reply = forwarded_flush(&rt, addr, Epoch(1));
    assert_eq!(reply.status, ForwardStatus::Ok, "{reply:?}");
}
