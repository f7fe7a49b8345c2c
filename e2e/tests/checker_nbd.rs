//! The lost-write checker against the node agent's NBD server: a clean engine volume
//! verifies with zero loss, deliberately broken backends (dropped and stale writes) are
//! caught, and a server process SIGKILLed mid-load and restarted on the same volume file
//! loses no acknowledged-and-flushed write.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e::checker::{Checker, CheckerConfig, Finding, Ledger, NbdClient, Target, verify_ledger};
use engine::{CreateOptions, Volume, VolumeConfig};
use node_agent::frontend::nbd::{
    BackendError, BlockBackend, ExportRegistry, MemBackend, NbdServer, ServerConfig,
};

const BS: u32 = 4096;
const EXPORT: &str = "vol";
/// Time allowed for a restarted server to accept connections.
const SERVER_START_TIMEOUT_MS: u64 = 30_000;
/// A child server exits on its own after this long, in case its parent died.
const CHILD_LIFETIME_MS: u64 = 120_000;
const CHILD_VOLUME_ENV: &str = "BLOCKVOL_CHECK_CHILD_VOLUME";
const CHILD_SOCKET_ENV: &str = "BLOCKVOL_CHECK_CHILD_SOCKET";
/// Kill/restart rounds (default 10).
const ROUNDS_ENV: &str = "BLOCKVOL_CHECK_ROUNDS";
/// Seed of the kill/restart run (default fixed, printed).
const SEED_ENV: &str = "BLOCKVOL_CHECK_SEED";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(volume_id: &str, seed: u64, lba_count: u64) -> CheckerConfig {
    CheckerConfig {
        volume_id: volume_id.into(),
        seed,
        workers: 4,
        block_size_bytes: BS,
        lba_start: 0,
        lba_count,
        flush_every_writes: 8,
    }
}

async fn serve(backend: Arc<dyn BlockBackend>, dir: &Path) -> (NbdServer, Target) {
    let registry = ExportRegistry::new();
    registry.add(EXPORT, backend).expect("add export");
    let server = NbdServer::new(registry, ServerConfig::default()).expect("server");
    let path = dir.join("nbd.sock");
    server.listen_unix(&path).await.expect("listen");
    (
        server,
        Target::Unix {
            path,
            export: EXPORT.into(),
        },
    )
}

fn engine_volume(path: &Path) -> Volume {
    let opts = CreateOptions {
        size_bytes: 16 << 20,
        wal_size_bytes: 4 << 20,
        ..CreateOptions::default()
    };
    if path.exists() {
        Volume::open_file(path, VolumeConfig::default()).expect("open volume")
    } else {
        Volume::create_file(path, opts, VolumeConfig::default()).expect("create volume")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_engine_volume_verifies_every_flushed_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = Arc::new(engine_volume(&dir.path().join("v.img")));
    let (_server, target) = serve(vol, dir.path()).await;
    let checker = Checker::new(Ledger::new(config("clean", 7, 256)).expect("ledger"));
    let sum = checker.run_writes(&target, 800).await;
    assert!(sum.stopped_by.is_empty(), "{:?}", sum.stopped_by);
    assert_eq!(sum.writes_acked, 800);
    assert_eq!(sum.writes_made_durable, 800);
    let report = checker.verify(&target).await.expect("verify");
    println!("clean run: {report}");
    assert!(report.is_clean(), "{report}");
    let durable = checker.ledger().durable_blocks();
    assert!(durable > 100, "only {durable} distinct LBAs written");
    assert_eq!(report.writes_verified, durable);
}

/// Backend faults a checker must detect.
#[derive(Clone, Copy)]
enum Fault {
    /// Every 10th write is acknowledged but not stored.
    DropWrites,
    /// Reads of LBAs divisible by 4 return the first data ever written there.
    StaleReads,
    /// One byte of every 16th write is flipped before it is stored.
    TearWrites,
}

struct Broken {
    live: MemBackend,
    first: MemBackend,
    written: std::sync::Mutex<std::collections::HashSet<u64>>,
    writes: AtomicU64,
    fault: Fault,
}

impl Broken {
    fn new(fault: Fault) -> Self {
        Self {
            live: MemBackend::new(4 << 20, BS).expect("mem"),
            first: MemBackend::new(4 << 20, BS).expect("mem"),
            written: Default::default(),
            writes: AtomicU64::new(0),
            fault,
        }
    }
}

impl BlockBackend for Broken {
    fn size_bytes(&self) -> u64 {
        self.live.size_bytes()
    }
    fn block_size(&self) -> u32 {
        BS
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let lba = offset / u64::from(BS);
        match self.fault {
            Fault::StaleReads if lba.is_multiple_of(4) => self.first.read(offset, buf),
            _ => self.live.read(offset, buf),
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        let lba = offset / u64::from(BS);
        if self.written.lock().expect("lock").insert(lba) {
            self.first.write(offset, data)?;
        }
        match self.fault {
            Fault::DropWrites if n.is_multiple_of(10) => Ok(()),
            Fault::TearWrites if n.is_multiple_of(16) => {
                let mut d = data.to_vec();
                if let Some(b) = d.get_mut(2000) {
                    *b ^= 0x01;
                }
                self.live.write(offset, &d)
            }
            _ => self.live.write(offset, data),
        }
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.write(offset, data)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.live.trim(offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        self.live.write_zeroes(offset, length)
    }
    fn flush_is_volume_wide(&self) -> bool {
        true
    }
}

async fn run_broken(fault: Fault) -> Vec<Finding> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, target) = serve(Arc::new(Broken::new(fault)), dir.path()).await;
    // Few LBAs and many writes, so every LBA is rewritten several times.
    let checker = Checker::new(Ledger::new(config("broken", 11, 64)).expect("ledger"));
    let sum = checker.run_writes(&target, 400).await;
    assert!(sum.stopped_by.is_empty(), "{:?}", sum.stopped_by);
    let report = checker.verify(&target).await.expect("verify");
    println!("broken backend: {report}");
    report.findings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_drops_acknowledged_writes_is_caught() {
    let findings = run_broken(Fault::DropWrites).await;
    assert!(
        findings
            .iter()
            .any(|f| matches!(f, Finding::Stale { .. } | Finding::Missing { .. })),
        "dropped writes went unnoticed: {findings:?}"
    );
    assert!(
        findings
            .iter()
            .all(|f| matches!(f, Finding::Stale { .. } | Finding::Missing { .. }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_returns_stale_data_is_caught() {
    let findings = run_broken(Fault::StaleReads).await;
    assert!(!findings.is_empty(), "stale reads went unnoticed");
    for f in &findings {
        match f {
            Finding::Stale { lba, .. } => assert_eq!(lba % 4, 0, "{f:?}"),
            other => panic!("unexpected finding {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_tears_blocks_is_caught() {
    let findings = run_broken(Fault::TearWrites).await;
    assert!(
        findings.iter().any(|f| matches!(f, Finding::Torn { .. })),
        "torn blocks went unnoticed: {findings:?}"
    );
}

/// Entry point of the child server process (does nothing in a normal test run).
#[test]
fn child_process_serves_an_engine_volume() {
    let (Ok(volume), Ok(socket)) = (
        std::env::var(CHILD_VOLUME_ENV),
        std::env::var(CHILD_SOCKET_ENV),
    ) else {
        return;
    };
    testkit::runtime(2).block_on(async move {
        let vol: Arc<dyn BlockBackend> = Arc::new(engine_volume(Path::new(&volume)));
        let registry = ExportRegistry::new();
        registry.add(EXPORT, vol).expect("add export");
        let server = NbdServer::new(registry, ServerConfig::default()).expect("server");
        server
            .listen_unix(Path::new(&socket))
            .await
            .expect("listen");
        tokio::time::sleep(Duration::from_millis(CHILD_LIFETIME_MS)).await;
        drop(server);
    });
}

/// Kills the child server on drop, also when the test fails.
struct ChildServer(Child);

impl ChildServer {
    fn start(volume: &Path, socket: &Path) -> Self {
        let child = testkit::this_binarys_test("child_process_serves_an_engine_volume")
            .env(CHILD_VOLUME_ENV, volume)
            .env(CHILD_SOCKET_ENV, socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn child server");
        Self(child)
    }

    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_serving(target: &Target) {
    let deadline = Instant::now() + Duration::from_millis(SERVER_START_TIMEOUT_MS);
    loop {
        match NbdClient::connect(target).await {
            Ok(c) => {
                c.disconnect().await;
                return;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "server did not start: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_server_loses_no_acknowledged_flushed_write() {
    let seed = env_u64(SEED_ENV, 0x5eed_0001);
    let rounds = env_u64(ROUNDS_ENV, 10);
    println!("kill/restart: seed {seed}, rounds {rounds} (set {SEED_ENV} / {ROUNDS_ENV})");
    let dir = tempfile::tempdir().expect("tempdir");
    let volume: PathBuf = dir.path().join("v.img");
    let socket = dir.path().join("nbd.sock");
    let target = Target::Unix {
        path: socket.clone(),
        export: EXPORT.into(),
    };
    let checker = Checker::new(Ledger::new(config("killed", seed, 512)).expect("ledger"));
    let mut rng = seed;
    let (mut verified, mut durable_total) = (0u64, 0u64);
    for round in 0..rounds {
        let child = ChildServer::start(&volume, &socket);
        wait_serving(&target).await;
        if round > 0 {
            let report = verify_ledger(&target, &checker.ledger())
                .await
                .expect("verify");
            assert!(report.is_clean(), "round {round}: {report}");
            verified += report.writes_verified;
        }
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let kill_after_flushes = 2 + (rng >> 33) % 12;
        let mut progress = checker.flush_progress();
        let base = *progress.borrow();
        let c2 = checker.clone();
        let t2 = target.clone();
        let writer = tokio::spawn(async move { c2.run_writes(&t2, 20_000).await });
        tokio::time::timeout(
            Duration::from_millis(SERVER_START_TIMEOUT_MS),
            progress.wait_for(|n| *n >= base + kill_after_flushes),
        )
        .await
        .expect("flushes were acknowledged in time")
        .expect("progress channel");
        child.kill();
        let sum = writer.await.expect("writer task");
        assert!(
            !sum.stopped_by.is_empty(),
            "round {round}: the writers finished before the kill"
        );
        durable_total += sum.writes_made_durable;
        println!(
            "round {round}: killed after {} acked flushes, {} writes acked, {} made durable",
            sum.flushes_acked, sum.writes_acked, sum.writes_made_durable
        );
    }
    let _child = ChildServer::start(&volume, &socket);
    wait_serving(&target).await;
    let report = verify_ledger(&target, &checker.ledger())
        .await
        .expect("verify");
    println!("final: {report}");
    assert!(report.is_clean(), "{report}");
    verified += report.writes_verified;
    assert!(durable_total > 0 && report.writes_verified > 0);
    println!(
        "kill/restart: rounds {rounds}, faults injected {rounds}, durable writes {durable_total}, \
         verifications passed {verified}, lost 0"
    );
}

async fn cli(args: &[&str]) -> (Option<i32>, String) {
    // Built by `cargo test --workspace` (alone: `cargo build -p tools --bins`).
    let bin = e2e::cluster::workspace_binary("blockvol-check").expect("blockvol-check is built");
    let out = tokio::process::Command::new(bin)
        .args(args)
        .output()
        .await
        .expect("run blockvol-check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_verifies_a_clean_volume_and_fails_on_a_lost_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = Arc::new(engine_volume(&dir.path().join("v.img")));
    let (_server, target) = serve(vol.clone(), dir.path()).await;
    let Target::Unix { path, .. } = &target else {
        unreachable!("serve() listens on a unix socket")
    };
    let sock = path.display().to_string();
    let ledger = dir.path().join("ledger.json");
    let ledger_s = ledger.display().to_string();
    let conn = ["--unix", &sock, "--export", EXPORT, "--ledger", &ledger_s];
    let mut write = vec!["write"];
    write.extend_from_slice(&conn);
    write.extend_from_slice(&["--writes", "300", "--lba-count", "64", "--seed", "9"]);
    let (code, text) = cli(&write).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("made durable 300"), "{text}");
    let mut verify = vec!["verify"];
    verify.extend_from_slice(&conn);
    let (code, text) = cli(&verify).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("findings 0"), "{text}");

    // Lose one durable block behind the checker's back.
    let l = Ledger::load(&ledger).expect("ledger");
    let (&lba, _) = l
        .blocks
        .iter()
        .find(|(_, r)| r.durable_seq > 0)
        .expect("a durable block");
    BlockBackend::write(&*vol, lba * u64::from(BS), &vec![0u8; BS as usize]).expect("zero");
    let (code, text) = cli(&verify).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&format!("Missing {{ lba: {lba}")), "{text}");
}
