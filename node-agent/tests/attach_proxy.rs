//! The attach proxy's volume file (a FUSE mount served in this process) against a real
//! NBD server: I/O on the file reaches the export; a request sent while the server is
//! gone waits and completes once it is back on the same socket; without a server for
//! longer than the reconnect timeout, requests fail with EIO; requests run concurrently;
//! `resize` on the control socket grows the file. Needs root and FUSE (present in CI).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use node_agent::attach::proxy::{Proxy, ProxySettings, request_resize};
use node_agent::nbd::{
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

impl BlockBackend for Gate {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
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
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.inner.write(offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.inner.write_fua(offset, data)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.inner.trim(offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.inner.write_zeroes(offset, length)
    }
    fn flush_is_volume_wide(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_are_in_flight_upstream_together() {
    const READERS: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), 5_000);
    let gate = Arc::new(Gate {
        inner: MemBackend::new(SIZE, 512).expect("mem"),
        want: READERS,
        in_flight: Mutex::new(0),
        changed: Condvar::new(),
        most: AtomicUsize::new(0),
    });
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
