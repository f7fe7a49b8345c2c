//! `ForwardingBackend` against in-process primaries: real data ports (`ReceiverServer`,
//! authenticated, framed) whose forward handler serves a RAM image at a chosen epoch,
//! and a resolver the test points at whichever primary is current. Covers re-routing
//! with retry, the replay of acknowledged-but-unflushed writes on a new primary before
//! its FLUSH, the replay buffer bound, and servers that send garbage.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::Epoch;
use engine::forward::{ForwardHandler, ForwardOutcome, ForwardSource};
use engine::net::{NetConfig, ReceiverServer};
use engine::replication::wire::{
    FrameDecoder, Message, NONCE_BYTES, ServerAuth, WireConfig, encode_frame,
};
use engine::replication::{ForwardMsg, ForwardOp, ForwardPayload, ForwardStatus, VolumeId};
use futures::future::BoxFuture;
use node_agent::frontend::forwarding::{
    ForwardSettings, ForwardingBackend, LocalExecutor, LocalPath, PrimaryResolver, PrimaryTarget,
    ResolveError, execute_on,
};
use node_agent::frontend::nbd::{BlockBackend, MemBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &[u8] = b"forward-test-secret";
const SIZE: u64 = 4 << 20;
const VOLUME: &str = "vol-fwd";

/// A primary: a RAM image served at `epoch` while `serving`, logging what it executed.
struct FakePrimary {
    mem: Arc<MemBackend>,
    epoch: AtomicU64,
    serving: AtomicBool,
    ops: Mutex<Vec<String>>,
    /// When armed, the next WRITE blocks in the backend until the test releases it.
    gate: Mutex<Option<Gate>>,
}

/// A slow backend for one WRITE: says when the write is inside, waits for `release`,
/// then says whether it modified the image.
struct Gate {
    /// Blocks before the request is admitted to the image (queued, slow path before
    /// the volume) rather than inside the write.
    before_admit: bool,
    entered: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
    done: std::sync::mpsc::Sender<bool>,
}

/// The test's end of a [`Gate`].
struct GateCtl {
    entered: std::sync::mpsc::Receiver<()>,
    release: std::sync::mpsc::Sender<()>,
    done: std::sync::mpsc::Receiver<bool>,
}

impl FakePrimary {
    fn arm(&self, before_admit: bool) -> GateCtl {
        let (etx, erx) = std::sync::mpsc::channel();
        let (rtx, rrx) = std::sync::mpsc::channel();
        let (dtx, drx) = std::sync::mpsc::channel();
        *self.gate.lock().unwrap() = Some(Gate {
            before_admit,
            entered: etx,
            release: rrx,
            done: dtx,
        });
        GateCtl {
            entered: erx,
            release: rtx,
            done: drx,
        }
    }

    /// Takes the gate if `op` is a WRITE and one is armed.
    fn gate_for(&self, op: &ForwardOp) -> Option<Gate> {
        match op {
            ForwardOp::Write { .. } => self.gate.lock().unwrap().take(),
            _ => None,
        }
    }
}

impl ForwardHandler for FakePrimary {
    fn handle(
        &self,
        from: &ForwardSource,
        volume: &VolumeId,
        epoch: Epoch,
        op: ForwardOp,
    ) -> ForwardOutcome {
        assert_eq!(volume.as_str(), VOLUME);
        let mine = Epoch(self.epoch.load(Ordering::Acquire));
        if !self.serving.load(Ordering::Acquire) || epoch > mine {
            return ForwardOutcome {
                epoch: mine,
                ..ForwardOutcome::failed(ForwardStatus::NotPrimary, "deposed".into())
            };
        }
        if epoch < mine {
            return ForwardOutcome {
                epoch: mine,
                ..ForwardOutcome::failed(ForwardStatus::StaleEpoch, "old epoch".into())
            };
        }
        let name = match &op {
            ForwardOp::Write { offset, data } => format!("WRITE {offset}+{}", data.len()),
            ForwardOp::Flush => "FLUSH".to_string(),
            ForwardOp::Trim { offset, length } => format!("TRIM {offset}+{length}"),
            ForwardOp::WriteZeroes { offset, length } => format!("ZERO {offset}+{length}"),
            ForwardOp::WriteFua { offset, .. } => format!("FUA {offset}"),
            ForwardOp::Read { .. } => "READ".to_string(),
            ForwardOp::Geometry => "GEOMETRY".to_string(),
        };
        let gate = self.gate_for(&op);
        let wait = |g: &Gate| {
            let _ = g.entered.send(());
            let _ = g.release.recv();
        };
        if let Some(g) = gate.as_ref().filter(|g| g.before_admit) {
            wait(g);
        }
        // Like the agent's primaries: admitted right before the image is touched.
        let _running = match from.admit() {
            Ok(r) => r,
            Err(reason) => {
                if let Some(g) = &gate {
                    let _ = g.done.send(false);
                }
                return ForwardOutcome::failed(ForwardStatus::Io, reason);
            }
        };
        if let Some(g) = gate.as_ref().filter(|g| !g.before_admit) {
            wait(g);
        }
        self.ops.lock().unwrap().push(name);
        let out = match execute_on(&*self.mem, op) {
            Ok(p) => ForwardOutcome::ok(mine, p),
            Err(e) => ForwardOutcome::failed(ForwardStatus::Io, e.to_string()),
        };
        if let Some(g) = gate {
            let _ = g.done.send(out.status == ForwardStatus::Ok);
        }
        out
    }
}

impl LocalExecutor for FakePrimary {
    fn serves(&self, volume: &str) -> bool {
        volume == VOLUME && self.serving.load(Ordering::Acquire)
    }
}

struct Primary {
    fake: Arc<FakePrimary>,
    server: Option<ReceiverServer>,
    addr: SocketAddr,
}

impl Primary {
    async fn start(name: &str, epoch: u64, mem: Arc<MemBackend>) -> Primary {
        let server =
            ReceiverServer::bind("127.0.0.1:0".parse().unwrap(), NetConfig::new(name, SECRET))
                .await
                .expect("data port");
        let fake = Arc::new(FakePrimary {
            mem,
            epoch: AtomicU64::new(epoch),
            serving: AtomicBool::new(true),
            ops: Mutex::new(Vec::new()),
            gate: Mutex::new(None),
        });
        server.set_forward_handler(fake.clone());
        Primary {
            fake,
            addr: server.local_addr(),
            server: Some(server),
        }
    }

    fn target(&self, node: &str) -> PrimaryTarget {
        PrimaryTarget {
            node: node.into(),
            addr: self.addr,
            epoch: Epoch(self.fake.epoch.load(Ordering::Acquire)),
        }
    }

    /// Stops the data port (connections closed), like a crashed agent.
    async fn crash(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    fn ops(&self) -> Vec<String> {
        self.fake.ops.lock().unwrap().clone()
    }
}

/// Takes over as primary `name` at `epoch` with an image that holds only one block of
/// `byte` at `offset` (what reached it before the previous primary went), and points
/// `resolver` at it.
async fn take_over(
    resolver: &TestResolver,
    name: &str,
    epoch: u64,
    offset: u64,
    byte: u8,
) -> (Primary, Arc<MemBackend>) {
    let image = mem();
    image.write(offset, &[byte; 4096]).unwrap();
    let p = Primary::start(name, epoch, image.clone()).await;
    resolver.set(p.target(name));
    (p, image)
}

fn mem() -> Arc<MemBackend> {
    Arc::new(MemBackend::new(SIZE, 4096).expect("mem"))
}

/// Points at whatever the test says is the primary now.
#[derive(Default)]
struct TestResolver {
    target: Mutex<Option<PrimaryTarget>>,
}

impl TestResolver {
    /// A resolver naming `t` until the test says otherwise.
    fn pointing_at(t: PrimaryTarget) -> Arc<TestResolver> {
        let r = Arc::new(TestResolver::default());
        r.set(t);
        r
    }

    fn set(&self, t: PrimaryTarget) {
        *self.target.lock().unwrap() = Some(t);
    }
}

impl PrimaryResolver for TestResolver {
    fn resolve<'a>(
        &'a self,
        _volume: &'a str,
    ) -> BoxFuture<'a, Result<PrimaryTarget, ResolveError>> {
        let t = self.target.lock().unwrap().clone();
        Box::pin(async move { t.ok_or_else(|| ResolveError::NoPrimary(VOLUME.into())) })
    }
}

fn settings() -> ForwardSettings {
    ForwardSettings {
        reconnect_backoff_initial_ms: 10,
        reconnect_backoff_max_ms: 100,
        failover_wait_ms: 10_000,
        request_timeout_ms: 5_000,
        ..ForwardSettings::default()
    }
}

async fn open(resolver: Arc<TestResolver>, s: ForwardSettings) -> Arc<ForwardingBackend> {
    Arc::new(
        ForwardingBackend::open(VOLUME, NetConfig::new("forwarder", SECRET), s, resolver)
            .await
            .expect("open forwarding backend"),
    )
}

/// Opens a forwarding backend as `net` that waits at most `failover_wait_ms` for a
/// primary, for a test that expects the open to fail.
async fn try_open(
    net: NetConfig,
    failover_wait_ms: u64,
    resolver: Arc<TestResolver>,
) -> Result<ForwardingBackend, node_agent::frontend::nbd::BackendError> {
    let s = ForwardSettings {
        failover_wait_ms,
        ..settings()
    };
    ForwardingBackend::open(VOLUME, net, s, resolver).await
}

/// Primary "a" at epoch 1 over `image`, and a forwarding backend routed to it.
async fn forwarding_to_a(
    image: Arc<MemBackend>,
) -> (Primary, Arc<TestResolver>, Arc<ForwardingBackend>) {
    let a = Primary::start("a", 1, image).await;
    let resolver = TestResolver::pointing_at(a.target("a"));
    let b = open(resolver.clone(), settings()).await;
    (a, resolver, b)
}

/// Runs a blocking backend call off the runtime's workers (as the NBD server does).
async fn blocking<T: Send + 'static>(
    b: &Arc<ForwardingBackend>,
    f: impl FnOnce(&ForwardingBackend) -> T + Send + 'static,
) -> T {
    let b = b.clone();
    tokio::task::spawn_blocking(move || f(&b))
        .await
        .expect("blocking call")
}

/// Writes `data` at `offset` through `b`, failing the test with `what` if it fails.
async fn write(b: &Arc<ForwardingBackend>, offset: u64, data: &[u8], what: &str) {
    let data = data.to_vec();
    let r = blocking(b, move |b| b.write(offset, &data)).await;
    r.unwrap_or_else(|e| panic!("{what}: {e}"));
}

fn read(b: &ForwardingBackend, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    b.read(offset, &mut buf).expect("read");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarding_reroutes_to_the_new_primary_and_retries() {
    let shared = mem();
    let (mut a, resolver, b) = forwarding_to_a(shared.clone()).await;
    assert_eq!(b.size_bytes(), SIZE);
    assert_eq!(b.block_size(), 4096);

    write(&b, 8192, &[0xaa; 8192], "write").await;
    blocking(&b, |b| b.flush()).await.expect("flush");
    assert_eq!(b.unflushed_bytes(), 0);

    // The primary dies; a replica holding the same data takes over at epoch 2.
    a.crash().await;
    let c = Primary::start("c", 2, shared.clone()).await;
    resolver.set(c.target("c"));
    let got = blocking(&b, |b| read(b, 8192, 8192)).await;
    assert!(got.iter().all(|&x| x == 0xaa), "read after re-route");
    assert_eq!(b.current_primary().await.expect("route").node, "c");
    assert_eq!(b.switches(), 2, "initial route plus one re-route");

    // The same primary is re-asserted at a newer epoch: the request at the old epoch is
    // refused as stale (not executed), the forwarder re-resolves and retries at the new one.
    let writes_before = c.ops().iter().filter(|o| o.starts_with("WRITE")).count();
    c.fake.epoch.store(3, Ordering::Release);
    resolver.set(c.target("c"));
    write(&b, 0, &[1; 4096], "write after the epoch change").await;
    assert_eq!(b.current_primary().await.expect("route").epoch, Epoch(3));
    assert_eq!(b.switches(), 3, "one more re-route for the stale epoch");
    let writes_after = c.ops().iter().filter(|o| o.starts_with("WRITE")).count();
    assert_eq!(
        writes_after,
        writes_before + 1,
        "executed once, at the new epoch"
    );
    let d = c;

    // An expansion at the primary is learned on request (Expand of the attachment).
    d.fake.mem.resize(2 * SIZE).expect("grow the primary");
    assert_eq!(b.size_bytes(), SIZE, "size is cached until refreshed");
    assert_eq!(b.refresh_size().await.expect("refresh"), 2 * SIZE);
    assert_eq!(b.size_bytes(), 2 * SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_unflushed_writes_are_replayed_on_a_new_primary_before_its_flush() {
    let (mut a, resolver, b) = forwarding_to_a(mem()).await;

    // W0 is flushed (durable everywhere); W1, a trim and W2 are acknowledged only.
    write(&b, 0, &[0x10; 4096], "w0").await;
    blocking(&b, |b| b.flush()).await.expect("flush w0");
    write(&b, 4096, &[0x11; 8192], "w1").await;
    blocking(&b, |b| b.trim(20480, 4096)).await.expect("trim");
    write(&b, 8192, &[0x12; 4096], "w2 overlaps w1").await;
    assert!(b.unflushed_bytes() >= 12288);

    // The primary dies and the new one lost everything after W0.
    a.crash().await;
    let (n, lost) = take_over(&resolver, "n", 2, 0, 0x10).await;

    blocking(&b, |b| b.flush())
        .await
        .expect("flush on the new primary");
    let ops = n.ops();
    let flush_at = ops
        .iter()
        .position(|o| o == "FLUSH")
        .expect("flush reached n");
    assert_eq!(
        &ops[..flush_at],
        &["WRITE 4096+8192", "TRIM 20480+4096", "WRITE 8192+4096"],
        "unflushed operations replayed in order before the flush: {ops:?}"
    );
    let mut img = vec![0u8; 16384];
    lost.read(0, &mut img).unwrap();
    assert!(img[..4096].iter().all(|&x| x == 0x10));
    assert!(img[4096..8192].iter().all(|&x| x == 0x11));
    assert!(
        img[8192..12288].iter().all(|&x| x == 0x12),
        "later write wins"
    );
    assert_eq!(
        b.unflushed_bytes(),
        0,
        "a successful flush drops the buffer"
    );

    // After that flush nothing is replayed again on the next re-route.
    let mut n = n;
    n.crash().await;
    let m = Primary::start("m", 3, lost).await;
    resolver.set(m.target("m"));
    blocking(&b, |b| b.flush()).await.expect("flush on m");
    assert_eq!(m.ops(), vec!["FLUSH".to_string()]);
}

/// A FUA write is durable when acknowledged, so the new primary holds it; an older
/// unflushed write of the same block is not. Replaying that older write alone on the
/// new primary would put the older data back under a FUA write the client was told is
/// durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replayed_write_never_overwrites_a_later_fua_write_of_the_same_block() {
    let (mut a, resolver, b) = forwarding_to_a(mem()).await;

    write(&b, 4096, &[0x21; 4096], "write").await;
    blocking(&b, |b| b.write_fua(4096, &[0x22; 4096]))
        .await
        .expect("FUA write of the same block");

    // The primary dies; the new one holds the FUA write, not the plain one before it.
    a.crash().await;
    let (n, survivor) = take_over(&resolver, "n", 2, 4096, 0x22).await;

    blocking(&b, |b| b.flush())
        .await
        .expect("flush on the new primary");
    let mut block = vec![0u8; 4096];
    survivor.read(4096, &mut block).unwrap();
    assert!(
        block.iter().all(|&x| x == 0x22),
        "the acknowledged FUA write was replaced by an older write; new primary ran {:?}",
        n.ops()
    );
}

/// A TCP listener that counts the connections made to it and closes them: stands in
/// for this node's own data port, which the fast path must not use.
async fn counting_listener() -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicU64::new(0));
    let counted = n.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::AcqRel);
            drop(s);
        }
    });
    (addr, n, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_local_primary_runs_requests_in_process_and_moving_it_away_replays_unflushed_writes() {
    let here = Arc::new(FakePrimary {
        mem: mem(),
        epoch: AtomicU64::new(1),
        serving: AtomicBool::new(true),
        ops: Mutex::new(Vec::new()),
        gate: Mutex::new(None),
    });
    let (own_port, connections, listener) = counting_listener().await;
    let resolver = TestResolver::pointing_at(PrimaryTarget {
        node: "node-here".into(),
        addr: own_port,
        epoch: Epoch(1),
    });
    let b = Arc::new(
        ForwardingBackend::open_with_local(
            VOLUME,
            NetConfig::new("node-here", SECRET),
            settings(),
            resolver.clone(),
            Some(LocalPath {
                node: "node-here".into(),
                primaries: here.clone(),
            }),
        )
        .await
        .expect("open with a local primary"),
    );
    assert!(b.is_local().await, "the route is in process");
    write(&b, 0, &[0x21; 4096], "w0").await;
    blocking(&b, |b| b.flush()).await.expect("flush w0");
    write(&b, 4096, &[0x22; 4096], "w1, acknowledged only").await;
    let got = blocking(&b, |b| read(b, 0, 8192)).await;
    assert!(got[..4096].iter().all(|&x| x == 0x21) && got[4096..].iter().all(|&x| x == 0x22));
    assert_eq!(
        here.ops.lock().unwrap().clone(),
        [
            "GEOMETRY",
            "WRITE 0+4096",
            "FLUSH",
            "WRITE 4096+4096",
            "READ"
        ],
        "every request ran on the local primary"
    );
    assert_eq!(
        connections.load(Ordering::Acquire),
        0,
        "no connection to this node's own data port"
    );

    // A planned move: the local primary is demoted and another node serves at epoch 2
    // with only what was flushed. The acknowledged W1 is replayed there before FLUSH.
    here.serving.store(false, Ordering::Release);
    let (remote, moved) = take_over(&resolver, "node-there", 2, 0, 0x21).await;
    blocking(&b, |b| b.flush())
        .await
        .expect("flush on the new primary");
    assert!(!b.is_local().await, "the route moved to the data port");
    assert_eq!(
        remote.ops(),
        ["WRITE 4096+4096", "FLUSH"],
        "the unflushed write was replayed before the flush"
    );
    let mut img = vec![0u8; 8192];
    moved.read(0, &mut img).unwrap();
    assert!(
        img[4096..].iter().all(|&x| x == 0x22),
        "w1 reached the new primary"
    );
    assert_eq!(b.unflushed_bytes(), 0);
    assert_eq!(connections.load(Ordering::Acquire), 0);
    listener.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_replay_buffer_forces_a_flush_before_more_writes() {
    let a = Primary::start("a", 1, mem()).await;
    let resolver = TestResolver::pointing_at(a.target("a"));
    let max = 64 << 10;
    let b = open(
        resolver,
        ForwardSettings {
            replay_bytes_max: max,
            ..settings()
        },
    )
    .await;
    for i in 0..32u64 {
        blocking(&b, move |b| b.write(i * 8192, &[i as u8; 8192]))
            .await
            .expect("write");
        assert!(b.unflushed_bytes() <= max, "buffer over its bound");
    }
    let ops = a.ops();
    let flushes = ops.iter().filter(|o| *o == "FLUSH").count();
    // 32 × 8 KiB = 256 KiB through a 64 KiB buffer: at least three forced flushes.
    assert!(flushes >= 3, "forced flushes: {flushes} in {ops:?}");
    let first = ops.iter().position(|o| o == "FLUSH").unwrap();
    assert!(first <= 8, "first forced flush came after {first} ops");
}

/// A data port that authenticates properly and then answers every request with `reply`.
async fn bad_server(reply: Vec<u8>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut auth = ServerAuth::new(SECRET, "bad", [7u8; NONCE_BYTES]);
                let mut dec = FrameDecoder::new(WireConfig::default());
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    dec.feed(&buf[..n]);
                    while let Ok(Some(m)) = dec.next_message() {
                        if auth.is_authenticated() {
                            let _ = s.write_all(&reply).await;
                            if reply.len() < 16 {
                                let _ = s.shutdown().await;
                                return;
                            }
                        } else if let Ok(Some(r)) = auth.on_message(&m) {
                            let _ = s.write_all(&encode_frame(&r)).await;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_or_short_frames_from_the_server_fail_the_request_without_panicking() {
    let wrong_payload = encode_frame(&Message::Forward(ForwardMsg::Reply {
        id: 1,
        status: ForwardStatus::Ok,
        epoch: Epoch(1),
        detail: String::new(),
        payload: ForwardPayload::Data(vec![0; 3]),
    }));
    let mut corrupt = wrong_payload.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad magic", b"GARBAGE!GARBAGE!GARBAGE!".to_vec()),
        ("short frame then close", wrong_payload[..7].to_vec()),
        ("checksum mismatch", corrupt),
        ("payload that does not fit GEOMETRY", wrong_payload),
    ];
    for (what, reply) in cases {
        let (addr, task) = bad_server(reply).await;
        let resolver = TestResolver::pointing_at(PrimaryTarget {
            node: "bad".into(),
            addr,
            epoch: Epoch(1),
        });
        let started = std::time::Instant::now();
        let r = try_open(NetConfig::new("forwarder", SECRET), 1_000, resolver).await;
        let e = match r {
            Ok(_) => panic!("{what}: a garbage-answering server was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("no primary reachable") || e.contains("kept failing"),
            "{what}: {e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: bounded"
        );
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarder_with_the_wrong_secret_is_refused() {
    let a = Primary::start("a", 1, mem()).await;
    let resolver = TestResolver::pointing_at(a.target("a"));
    let r = try_open(NetConfig::new("intruder", b"not-the-secret"), 500, resolver).await;
    let e = r.err().expect("refused").to_string();
    assert!(e.contains("authentication") || e.contains("secret"), "{e}");
    assert!(
        a.ops().is_empty(),
        "nothing executed for an unauthenticated peer"
    );
}

/// Waits for a blocking channel receive off the runtime's workers.
async fn recv<T: Send + 'static>(
    rx: std::sync::mpsc::Receiver<T>,
) -> (T, std::sync::mpsc::Receiver<T>) {
    tokio::task::spawn_blocking(move || {
        let v = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the gated write never reached this point");
        (v, rx)
    })
    .await
    .unwrap()
}

/// A WRITE stuck in a slow primary past the request timeout: the forwarder gives up on
/// the connection, re-routes (to the same primary, on a new connection) and retries,
/// then the client writes the same block anew. Once the stuck write is released, the
/// block must hold the newer write: a request of a connection the forwarder gave up on
/// never lands after a request sent later.
///
/// `before_admit`: the write is stuck before it was admitted to the image (it must then
/// never run), or inside the write itself (newer requests of the node then wait for it).
async fn stale_write_case(before_admit: bool) {
    let a = Primary::start("a", 1, mem()).await;
    let resolver = TestResolver::pointing_at(a.target("a"));
    let b = open(
        resolver.clone(),
        ForwardSettings {
            request_timeout_ms: 300,
            ..settings()
        },
    )
    .await;
    let base = b.switches();
    let gate = a.fake.arm(before_admit);
    let writer = {
        let b = b.clone();
        tokio::spawn(async move {
            blocking(&b, |b| b.write(0, &[0xa1; 4096])).await?;
            blocking(&b, |b| b.write(0, &[0xb2; 4096])).await
        })
    };
    let (_, entered) = recv(gate.entered).await;
    drop(entered);
    // Release the stuck write once the client's writes are done, or once the forwarder
    // has given up on a second connection (the retry is held behind the stuck write).
    let mut writer = writer;
    let finished_first = tokio::select! {
        r = &mut writer => Some(r),
        _ = async {
            while b.switches() < base + 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } => None,
    };
    gate.release.send(()).unwrap();
    let (stale_applied, _) = recv(gate.done).await;
    if before_admit {
        assert!(
            !stale_applied,
            "a request of a connection the forwarder gave up on ran after the close"
        );
    }
    let r = match finished_first {
        Some(r) => r,
        None => writer.await,
    };
    r.expect("writer task").expect("client writes");
    let block = blocking(&b, |b| read(b, 0, 4096)).await;
    assert!(
        block.iter().all(|&x| x == 0xb2),
        "block holds {:#x} instead of the newer write; stale write applied: {stale_applied}; primary ran {:?}",
        block[0],
        a.ops()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_stuck_inside_the_primary_past_the_request_timeout_never_lands_after_a_newer_write()
{
    stale_write_case(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_stuck_before_admission_past_the_request_timeout_is_cancelled() {
    stale_write_case(true).await;
}
