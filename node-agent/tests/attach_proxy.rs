//! The attach proxy's volume file (a FUSE mount served in this process) against a real
//! NBD server: I/O on the file reaches the export; a request sent while the server is
//! gone waits and completes once it is back on the same socket; without a server for
//! longer than the reconnect timeout, requests fail with EIO; requests run concurrently;
//! `resize` on the control socket grows the file. Needs root and FUSE (present in CI).

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::mem_overlay::{MemOverlay, Overlay};
use node_agent::attach::proxy::{Proxy, ProxyBackend, ProxySettings, request_resize};
use node_agent::frontend::nbd::{
    BackendError, BlockBackend, ExportRegistry, MemBackend, NbdServer, ServerConfig,
};

const EXPORT: &str = "vol";
const SIZE: u64 = 1 << 20;

fn settings(dir: &Path, reconnect_timeout_ms: u64) -> ProxySettings {
    let mount = dir.join("mnt");
    std::fs::create_dir_all(&mount).expect("mkdir mnt");
    ProxySettings {
        mount,
        control: dir.join("control.sock"),
        upstream: dir.join("agent.sock"),
        export: EXPORT.into(),
        reconnect_timeout_ms,
        reconnect_interval_ms: 20,
        io_timeout_ms: 5_000,
        upstream_connections: 8,
        replay_bytes_max: 64 << 20,
    }
}

async fn serve(registry: &ExportRegistry, socket: &Path) -> NbdServer {
    let s = NbdServer::new(registry.clone(), ServerConfig::default()).expect("server");
    s.listen_unix(socket).await.expect("listen");
    s
}

fn registry_with(backend: Arc<dyn BlockBackend>) -> ExportRegistry {
    let registry = ExportRegistry::new();
    registry.add(EXPORT, backend).expect("export");
    registry
}

fn open(file: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open the volume file")
}

/// Runs blocking file I/O off the runtime's worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pause_while_the_agent_is_gone_and_resume_when_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), 30_000);
    let mem = Arc::new(MemBackend::new(SIZE, 512).expect("mem"));
    let registry = registry_with(mem.clone());
    let first = serve(&registry, &s.upstream).await;
    let proxy = Proxy::start(s.clone()).await.expect("proxy starts");
    let file: PathBuf = proxy.file();

    let f = blocking(move || {
        assert_eq!(std::fs::metadata(&file).expect("stat").len(), SIZE);
        let f = open(&file);
        f.write_all_at(&[0xa1; 4096], 0).expect("write");
        f.sync_all().expect("fsync");
        f
    })
    .await;

    first.shutdown();
    drop(first);
    assert!(!s.upstream.exists(), "the server removed its socket");

    // Sent while nothing listens upstream: it can only complete after the restart.
    let pending = tokio::task::spawn_blocking(move || {
        let r = f.write_all_at(&[0xb2; 4096], 4096);
        (f, r)
    });
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(200) {
        assert!(!pending.is_finished(), "answered without a server");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = serve(&registry, &s.upstream).await;
    let (f, written) = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .expect("the paused write completes after the restart")
        .expect("writer");
    written.expect("write through the proxy after the restart");

    let (a, b) = blocking(move || {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut a, 0).expect("read");
        f.read_exact_at(&mut b, 4096).expect("read");
        (a, b)
    })
    .await;
    assert!(
        a.iter().all(|&x| x == 0xa1),
        "write before the restart kept"
    );
    assert!(
        b.iter().all(|&x| x == 0xb2),
        "write during the restart applied"
    );
    let mut direct = vec![0u8; 8192];
    mem.read(0, &mut direct).expect("backend read");
    assert!(direct[..4096].iter().all(|&x| x == 0xa1));
    assert!(direct[4096..].iter().all(|&x| x == 0xb2));
    blocking(move || proxy.shutdown()).await.expect("unmount");
    assert!(!s.control.exists(), "control socket removed");
    second.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_with_eio_once_the_agent_stays_away_past_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), 300);
    let registry = registry_with(Arc::new(MemBackend::new(SIZE, 512).expect("mem")));
    let server = serve(&registry, &s.upstream).await;
    let proxy = Proxy::start(s.clone()).await.expect("proxy starts");
    server.shutdown();
    drop(server);
    let file = proxy.file();
    let (result, waited) = blocking(move || {
        let f = open(&file);
        let t = Instant::now();
        (f.write_all_at(&[1; 4096], 0), t.elapsed())
    })
    .await;
    let err = result.expect_err("write without an agent");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        waited >= Duration::from_millis(300),
        "failed after {waited:?}, before the reconnect timeout"
    );
    blocking(move || proxy.shutdown()).await.expect("unmount");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_start_names_the_socket_when_the_agent_is_unreachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), 100);
    let e = match Proxy::start(s.clone()).await {
        Ok(_) => panic!("started without an agent"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("agent.sock") && e.contains("not reachable"),
        "{e}"
    );
    // A server without the export refuses it by name.
    let server = serve(&ExportRegistry::new(), &s.upstream).await;
    let e = match Proxy::start(s.clone()).await {
        Ok(_) => panic!("started on a missing export"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("\"vol\"") && e.contains("refused"), "{e}");
    server.shutdown();
    let mut bad = s;
    bad.export = String::new();
    let e = match Proxy::start(bad).await {
        Ok(_) => panic!("started with an empty export name"),
        Err(e) => e.to_string(),
    };
    assert!(e.starts_with("--export"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_on_the_control_socket_grows_the_volume_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), 5_000);
    let mem = Arc::new(MemBackend::new(SIZE, 512).expect("mem"));
    let registry = registry_with(mem.clone());
    let server = serve(&registry, &s.upstream).await;
    let proxy = Proxy::start(s.clone()).await.expect("proxy starts");
    let file = proxy.file();
    let control = s.control.clone();
    blocking(move || {
        let f = open(&file);
        // The file cannot grow by writing past its end.
        let past = f
            .write_all_at(&[7; 4096], SIZE)
            .expect_err("write past the end");
        assert_eq!(past.raw_os_error(), Some(libc::EFBIG), "{past}");

        mem.resize(4 * SIZE).expect("grow the export");
        // Until asked, the file keeps the size it had.
        assert_eq!(std::fs::metadata(&file).expect("stat").len(), SIZE);
        assert_eq!(request_resize(&control), Ok(4 * SIZE));
        assert_eq!(std::fs::metadata(&file).expect("stat").len(), 4 * SIZE);
        assert_eq!(f.metadata().expect("fstat").len(), 4 * SIZE);
        f.write_all_at(&[7; 4096], 3 * SIZE)
            .expect("write in the new range");
        let mut back = vec![0u8; 4096];
        f.read_exact_at(&mut back, 3 * SIZE).expect("read back");
        assert!(back.iter().all(|&x| x == 7));
        assert_eq!(read(&*mem, 3 * SIZE), vec![7u8; 4096]);

        // Anything but `resize` is refused by name.
        let mut c = std::os::unix::net::UnixStream::connect(&control).expect("connect");
        use std::io::{Read, Write};
        c.write_all(b"shrink\n").expect("send");
        let mut answer = String::new();
        c.read_to_string(&mut answer).expect("answer");
        assert!(
            answer.starts_with("error unknown command \"shrink\""),
            "{answer}"
        );
    })
    .await;
    blocking(move || proxy.shutdown()).await.expect("unmount");
    server.shutdown();
}

fn read(b: &dyn BlockBackend, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    b.read(offset, &mut buf).expect("backend read");
    buf
}

/// A backend whose reads wait until `want` of them are in flight at once (or a
/// deadline passes), recording the most seen together.
struct Gate {
    inner: MemBackend,
    want: usize,
    in_flight: Mutex<usize>,
    changed: Condvar,
    most: AtomicUsize,
}

impl MemOverlay for Gate {
    fn mem(&self) -> &MemBackend {
        &self.inner
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let mut n = self.in_flight.lock().expect("lock");
        *n += 1;
        self.most.fetch_max(*n, Ordering::SeqCst);
        self.changed.notify_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.most.load(Ordering::SeqCst) < self.want && Instant::now() < deadline {
            n = self
                .changed
                .wait_timeout(n, Duration::from_millis(50))
                .expect("wait")
                .0;
        }
        *n -= 1;
        drop(n);
        self.inner.read(offset, buf)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_are_in_flight_upstream_together() {
    const READERS: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), 5_000);
    let gate = Arc::new(Overlay(Gate {
        inner: MemBackend::new(SIZE, 512).expect("mem"),
        want: READERS,
        in_flight: Mutex::new(0),
        changed: Condvar::new(),
        most: AtomicUsize::new(0),
    }));
    let registry = registry_with(gate.clone());
    let server = serve(&registry, &s.upstream).await;
    let proxy = Proxy::start(s.clone()).await.expect("proxy starts");
    let file = proxy.file();
    blocking(move || {
        std::thread::scope(|scope| {
            for i in 0..READERS as u64 {
                let file = &file;
                scope.spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    open(file).read_exact_at(&mut buf, i * 4096).expect("read");
                });
            }
        });
    })
    .await;
    assert_eq!(
        gate.most.load(Ordering::SeqCst),
        READERS,
        "reads from {READERS} threads did not reach the backend together"
    );
    blocking(move || proxy.shutdown()).await.expect("unmount");
    server.shutdown();
}

/// An upstream's disk with a volatile and a durable image: writes land in the volatile
/// image, FLUSH copies it to the durable one, a FUA write lands in both. A failover to
/// another replica is modelled by a fresh `Disk` that starts from this one's durable
/// image: it holds what FLUSH and FUA made durable, and nothing acknowledged after.
/// Once `die` returned, the disk acknowledges nothing more (its agent process is gone,
/// whatever its NBD connections still read).
struct Disk {
    volatile: Mutex<Vec<u8>>,
    durable: Mutex<Vec<u8>>,
    flushes: AtomicUsize,
    dead: AtomicBool,
}

impl Disk {
    fn new(image: Vec<u8>) -> Arc<Disk> {
        Arc::new(Disk {
            volatile: Mutex::new(image.clone()),
            durable: Mutex::new(image),
            flushes: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
        })
    }
    fn die(&self) {
        let _durable = self.durable.lock().expect("lock");
        let _volatile = self.volatile.lock().expect("lock");
        self.dead.store(true, Ordering::SeqCst);
    }
    /// The volatile image, for an operation that may still be acknowledged.
    fn live(&self) -> Result<std::sync::MutexGuard<'_, Vec<u8>>, BackendError> {
        let image = self.volatile.lock().expect("lock");
        if self.dead.load(Ordering::SeqCst) {
            return Err(BackendError::Io("the agent is gone".into()));
        }
        Ok(image)
    }
    fn durable_image(&self) -> Vec<u8> {
        self.durable.lock().expect("lock").clone()
    }
    fn image(&self) -> Vec<u8> {
        self.volatile.lock().expect("lock").clone()
    }
    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, BackendError> {
        let start = offset as usize;
        match start.checked_add(len) {
            Some(end) if end as u64 <= SIZE => Ok(start..end),
            _ => Err(BackendError::Invalid(format!("{len} bytes at {offset}"))),
        }
    }
}

impl BlockBackend for Disk {
    fn size_bytes(&self) -> u64 {
        SIZE
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.live()?[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let r = self.range(offset, data.len())?;
        self.live()?[r].copy_from_slice(data);
        Ok(())
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let r = self.range(offset, data.len())?;
        let mut durable = self.durable.lock().expect("lock");
        self.live()?[r.clone()].copy_from_slice(data);
        durable[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        let mut durable = self.durable.lock().expect("lock");
        *durable = self.live()?.clone();
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.write_zeroes(offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        let r = self.range(offset, length as usize)?;
        self.live()?[r].fill(0);
        Ok(())
    }
    fn flush_is_volume_wide(&self) -> bool {
        true
    }
}

/// One request of a test workload, applied both through the proxy and to the
/// expected image.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u8),
    WriteFua(u64, u8),
    Trim(u64),
    WriteZeroes(u64),
    Flush,
}

const BLOCK: usize = 4096;

impl Op {
    fn run(self, proxy: &ProxyBackend) -> Result<(), BackendError> {
        let block = |b: u8| vec![b; BLOCK];
        match self {
            Op::Write(at, b) => proxy.write(at, &block(b)),
            Op::WriteFua(at, b) => proxy.write_fua(at, &block(b)),
            Op::Trim(at) => proxy.trim(at, BLOCK as u64),
            Op::WriteZeroes(at) => proxy.write_zeroes(at, BLOCK as u64),
            Op::Flush => proxy.flush(),
        }
    }
    fn apply(self, image: &mut [u8]) {
        let at = |o: u64| o as usize..o as usize + BLOCK;
        match self {
            Op::Write(o, b) | Op::WriteFua(o, b) => image[at(o)].fill(b),
            Op::Trim(o) | Op::WriteZeroes(o) => image[at(o)].fill(0),
            Op::Flush => {}
        }
    }
}

/// The blocks of `image` that differ from `expected`, by offset (for failure messages).
fn differing_blocks(image: &[u8], expected: &[u8]) -> Vec<usize> {
    (0..expected.len())
        .step_by(BLOCK)
        .filter(|&o| image[o..o + BLOCK] != expected[o..o + BLOCK])
        .collect()
}

/// Runs `ops` through a proxy against one upstream, stops that upstream (an agent
/// process that died), brings up a second upstream on the same socket that holds only
/// what the first one's FLUSHes and FUA writes made durable (its volume failed over
/// while it was down), then sends a FLUSH through the proxy. Returns the FLUSH's
/// result, the image the second upstream holds once it is answered, the expected
/// image (every acknowledged operation applied in order), and the first upstream's
/// FLUSH count.
async fn flush_across_a_failover(
    adjust: impl FnOnce(&mut ProxySettings),
    ops: Vec<Op>,
) -> (Result<(), BackendError>, Vec<u8>, Vec<u8>, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings(dir.path(), 20_000);
    adjust(&mut s);
    let old = Disk::new(vec![0; SIZE as usize]);
    let first = serve(&registry_with(old.clone()), &s.upstream).await;
    let proxy = {
        let s = s.clone();
        Arc::new(
            blocking(move || ProxyBackend::connect(s))
                .await
                .expect("connect"),
        )
    };
    let expected = {
        let proxy = proxy.clone();
        blocking(move || {
            let mut expected = vec![0u8; SIZE as usize];
            for op in ops {
                op.run(&proxy)
                    .unwrap_or_else(|e| panic!("{op:?} through the proxy: {e}"));
                op.apply(&mut expected);
            }
            expected
        })
        .await
    };
    let old_flushes = old.flushes.load(Ordering::SeqCst);

    old.die();
    first.shutdown();
    drop(first);
    // Sent while no agent listens, so it can only be answered by the new one.
    let flush = {
        let proxy = proxy.clone();
        tokio::task::spawn_blocking(move || proxy.flush())
    };
    let new = Disk::new(old.durable_image());
    let second = serve(&registry_with(new.clone()), &s.upstream).await;
    let flushed = tokio::time::timeout(Duration::from_secs(30), flush)
        .await
        .expect("the FLUSH is answered")
        .expect("flush task");
    let image = new.image();
    second.shutdown();
    (flushed, image, expected, old_flushes)
}

/// The invariant: a FLUSH acknowledged through the proxy covers every operation the
/// proxy acknowledged before it, whichever agent process acknowledged that operation.
fn assert_flush_covers_every_acknowledged_op(
    flushed: &Result<(), BackendError>,
    image: &[u8],
    expected: &[u8],
) {
    if flushed.is_ok() {
        let lost = differing_blocks(image, expected);
        assert!(
            lost.is_empty(),
            "the FLUSH was acknowledged, but the new agent does not hold what the old one \
             acknowledged at offsets {lost:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_after_an_agent_restart_and_a_failover_covers_every_acknowledged_write() {
    let ops = vec![
        // Made durable before the agent dies.
        Op::Write(0, 0x10),
        Op::Flush,
        // Acknowledged by the old agent, covered by no FLUSH: the new primary lacks them.
        Op::Write(0, 0x11),
        Op::Write(4 * 4096, 0x21),
        Op::Write(5 * 4096, 0x31),
        // A TRIM after a WRITE to the same block must stay last when replayed...
        Op::Trim(5 * 4096),
        Op::Write(6 * 4096, 0x41),
        Op::WriteZeroes(6 * 4096),
        // ...and so must a FUA write (durable on the old agent already) over an older,
        // unflushed write of the same block.
        Op::Write(7 * 4096, 0x51),
        Op::WriteFua(7 * 4096, 0x52),
        // A WRITE after a TRIM of the same block.
        Op::Trim(8 * 4096),
        Op::Write(8 * 4096, 0x61),
    ];
    let (flushed, image, expected, _) = flush_across_a_failover(|_| {}, ops).await;
    assert_flush_covers_every_acknowledged_op(&flushed, &image, &expected);
    // Replaying makes a routine agent restart invisible to the filesystem.
    flushed.expect("the FLUSH after the restart succeeds");
    assert!(differing_blocks(&image, &expected).is_empty());
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_replay_bytes_max_are_flushed_first_and_none_is_lost_across_a_failover() {
    // Room for two kept 4 KiB writes: every third write has to flush first.
    const MAX: u64 = 2 * (BLOCK as u64 + 64);
    let ops: Vec<Op> = (0..12u8)
        .map(|i| Op::Write(u64::from(i % 7) * BLOCK as u64, 0x80 + i))
        .collect();
    let (flushed, image, expected, old_flushes) =
        flush_across_a_failover(|s| s.replay_bytes_max = MAX, ops).await;
    assert!(
        old_flushes >= 4,
        "12 writes with room for 2 sent only {old_flushes} FLUSHes upstream"
    );
    assert_flush_covers_every_acknowledged_op(&flushed, &image, &expected);
    flushed.expect("the FLUSH after the restart succeeds");
}
