//! Shared fixtures for the NBD and attach tests: a server on its own runtime, unique
//! temp paths, and process guards that clean up even when a test fails; `replicas` holds
//! engine runtimes on real data ports.
#![allow(dead_code)]

pub mod mem_overlay;
pub mod replicas;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use node_agent::frontend::nbd::{
    BlockBackend, ExportRegistry, MemBackend, NbdServer, ServerConfig,
};

/// An NBD server with a TCP listener on 127.0.0.1 (random port) and a unix socket in a
/// private temp dir. Dropping it stops the server before its runtime.
pub struct TestServer {
    pub server: Option<NbdServer>,
    pub registry: ExportRegistry,
    pub addr: SocketAddr,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub rt: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    pub fn start(config: ServerConfig) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::Builder::new()
            .prefix("nbd-test-")
            .tempdir()
            .expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let registry = ExportRegistry::new();
        let server = NbdServer::new(registry.clone(), config).expect("server");
        let addr = rt.block_on(async {
            server.listen_unix(&socket).await.expect("listen unix");
            server
                .listen_tcp("127.0.0.1:0".parse().expect("addr"))
                .await
                .expect("listen tcp")
        });
        Self {
            server: Some(server),
            registry,
            addr,
            socket,
            dir,
            rt: Some(rt),
        }
    }

    pub fn with_mem_export(name: &str, size: u64, block_size: u32) -> (Self, Arc<MemBackend>) {
        let s = Self::start(ServerConfig::default());
        let b = s.add_mem(name, size, block_size);
        (s, b)
    }

    pub fn add_mem(&self, name: &str, size: u64, block_size: u32) -> Arc<MemBackend> {
        let b = Arc::new(MemBackend::new(size, block_size).expect("mem backend"));
        self.add(name, b.clone());
        b
    }

    /// Exports `backend` as `name`.
    pub fn add(&self, name: &str, backend: Arc<dyn BlockBackend>) {
        self.registry.add(name, backend).expect("add export");
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().expect("runtime").block_on(f)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        drop(self.server.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// Runs a program, failing the test with its output if it cannot start.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a program and fails the test (showing stdout and stderr) unless it exits 0.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes, so failures reproduce from the seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    testkit::SeededRng::new(seed).bytes(len)
}

/// Polls `done` until it is true or `timeout` passes; returns whether it became true.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn read_backend(b: &dyn BlockBackend, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    b.read(offset, &mut buf).expect("backend read");
    buf
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Attacher settings whose attach proxy is this package's `blockvol-agent attach-proxy`.
pub fn attach_config(state_dir: &Path) -> node_agent::attach::FuseLoopConfig {
    let proxy = node_agent::attach::ProxyCommand {
        program: PathBuf::from(env!("CARGO_BIN_EXE_blockvol-agent")),
        args: vec!["attach-proxy".into()],
    };
    let proxies = std::sync::Arc::new(node_agent::attach::LocalProxies::new(proxy));
    node_agent::attach::FuseLoopConfig::new(state_dir, proxies)
}
