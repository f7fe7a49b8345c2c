//! Fault trials for synchronous replication with the lost-write checker as oracle. Each
//! trial runs a primary and two replicas as separate processes on 127.0.0.1 (the
//! replication TCP shell, authenticated), drives the primary through NBD with the
//! checker (an NBD flush is the replication barrier: it returns once both replicas have
//! the data), SIGKILLs the primary at a seeded random moment under write load, stops the
//! replicas, opens the replica with the highest durable LSN as the new primary and
//! verifies that every flush the old primary acknowledged is present.
//!
//! Trials: `BLOCKVOL_REPL_TRIALS` (default 20); seed: `BLOCKVOL_REPL_SEED`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::checker::{Checker, CheckerConfig, Ledger, NbdClient, Target, verify_ledger};
use engine::net::{NetConfig, PrimaryHandle, ReceiverServer, Transport, spawn_primary};
use engine::replication::{
    Endpoint, Generation, Peer, PrimaryConfig, ReceiverConfig, ReplicaId, ReplicaState, VolumeId,
};
use engine::{CreateOptions, Epoch, Volume, VolumeConfig};
use node_agent::frontend::nbd::{
    BackendError, BlockBackend, ExportRegistry, NbdServer, ServerConfig,
};

const BS: u32 = 4096;
const EXPORT: &str = "vol";
const SECRET: &[u8] = b"fault-trial-cluster-secret";
const CHILD_MODE_ENV: &str = "BLOCKVOL_REPL_CHILD";
const CHILD_VOLUME_ENV: &str = "BLOCKVOL_REPL_CHILD_VOLUME";
const CHILD_READY_ENV: &str = "BLOCKVOL_REPL_CHILD_READY";
const CHILD_PEERS_ENV: &str = "BLOCKVOL_REPL_CHILD_PEERS";
const TRIALS_ENV: &str = "BLOCKVOL_REPL_TRIALS";
const SEED_ENV: &str = "BLOCKVOL_REPL_SEED";
/// Time a child has to come up (replicas bound, primary in sync and serving NBD).
const CHILD_START_TIMEOUT_MS: u64 = 30_000;
/// A child exits on its own after this long, in case its parent died.
const CHILD_LIFETIME_MS: u64 = 120_000;
/// Time the checker's flushes have to reach the kill point.
const LOAD_TIMEOUT_MS: u64 = 30_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vid() -> VolumeId {
    VolumeId::new("vol-faults").expect("volume id")
}

fn rid(s: &str) -> ReplicaId {
    ReplicaId::new(s).expect("replica id")
}

fn vcfg() -> VolumeConfig {
    VolumeConfig {
        flush_interval_ms: 10,
        ..VolumeConfig::default()
    }
}

fn open_or_create(path: &Path) -> Arc<Volume> {
    let v = if path.exists() {
        Volume::open_file(path, vcfg()).expect("open volume")
    } else {
        let opts = CreateOptions {
            size_bytes: 8 << 20,
            block_size: BS,
            wal_size_bytes: 4 << 20,
            epoch: Epoch(1),
            ..CreateOptions::default()
        };
        Volume::create_file(path, opts, vcfg()).expect("create volume")
    };
    Arc::new(v)
}

/// NBD backend of the primary: writes go to the local volume (and are shipped by the
/// replication driver); a flush is the replication barrier.
struct ReplicatedBackend {
    vol: Arc<Volume>,
    handle: PrimaryHandle,
    rt: tokio::runtime::Handle,
}

impl BlockBackend for ReplicatedBackend {
    fn size_bytes(&self) -> u64 {
        BlockBackend::size_bytes(&*self.vol)
    }
    fn block_size(&self) -> u32 {
        BlockBackend::block_size(&*self.vol)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        BlockBackend::read(&*self.vol, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        BlockBackend::write(&*self.vol, offset, data)
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        BlockBackend::write(&*self.vol, offset, data)?;
        self.flush()
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.rt
            .block_on(self.handle.flush())
            .map(drop)
            .map_err(BackendError::Io)
    }
    fn trim(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        BlockBackend::trim(&*self.vol, offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<(), BackendError> {
        BlockBackend::write_zeroes(&*self.vol, offset, length)
    }
    fn flush_is_volume_wide(&self) -> bool {
        true
    }
}

/// Entry point of the child processes (does nothing in a normal test run).
#[test]
fn child_process_runs_a_replication_member() {
    let Ok(mode) = std::env::var(CHILD_MODE_ENV) else {
        return;
    };
    let volume = PathBuf::from(std::env::var(CHILD_VOLUME_ENV).expect("volume env"));
    let ready = PathBuf::from(std::env::var(CHILD_READY_ENV).expect("ready env"));
    testkit::runtime(2).block_on(async move {
        let vol = open_or_create(&volume);
        let _keep: Box<dyn std::any::Any> = match mode.as_str() {
            "replica" => {
                let s = ReceiverServer::bind(
                    "127.0.0.1:0".parse().expect("addr"),
                    NetConfig::new("replica", SECRET),
                )
                .await
                .expect("bind data port");
                s.host(vid(), vol, ReceiverConfig::default());
                write_ready(&ready, &s.local_addr().to_string());
                Box::new(s)
            }
            _ => {
                let peers: Vec<Peer> = std::env::var(CHILD_PEERS_ENV)
                    .expect("peers env")
                    .split(',')
                    .map(|p| {
                        let (id, addr) = p.split_once('=').expect("id=addr");
                        let addr: SocketAddr = addr.parse().expect("peer addr");
                        Peer {
                            id: rid(id),
                            endpoint: Endpoint::new(addr).expect("endpoint"),
                        }
                    })
                    .collect();
                let h = spawn_primary(
                    vol.clone(),
                    vid(),
                    rid("p"),
                    PrimaryConfig {
                        barrier_timeout_ms: 5_000,
                        reconnect_backoff_ms: 50,
                        ..PrimaryConfig::default()
                    },
                    Generation(1),
                    vec![rid("p"), rid("r0"), rid("r1")],
                    peers,
                    Transport::new(NetConfig::new("primary", SECRET)),
                );
                let deadline = Instant::now() + Duration::from_millis(CHILD_START_TIMEOUT_MS);
                loop {
                    let snap = h.snapshot().await.expect("driver alive");
                    let all = ["r0", "r1"].iter().all(|r| {
                        snap.replicas
                            .get(&rid(r))
                            .is_some_and(|(st, _)| *st == ReplicaState::InSync)
                    });
                    if all {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "replicas never in sync: {snap:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let backend: Arc<dyn BlockBackend> = Arc::new(ReplicatedBackend {
                    vol,
                    handle: h,
                    rt: tokio::runtime::Handle::current(),
                });
                let registry = ExportRegistry::new();
                registry.add(EXPORT, backend).expect("export");
                let server = NbdServer::new(registry, ServerConfig::default()).expect("nbd");
                let sock = ready.with_extension("sock");
                server.listen_unix(&sock).await.expect("listen");
                write_ready(&ready, &sock.display().to_string());
                Box::new(server)
            }
        };
        tokio::time::sleep(Duration::from_millis(CHILD_LIFETIME_MS)).await;
    });
}

fn write_ready(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write ready file");
    std::fs::rename(&tmp, path).expect("publish ready file");
}

/// A member process, SIGKILLed on drop (also when the test fails).
struct Member(Child);

impl Member {
    fn start(mode: &str, volume: &Path, ready: &Path, peers: &str) -> Self {
        let child = testkit::this_binarys_test("child_process_runs_a_replication_member")
            .env(CHILD_MODE_ENV, mode)
            .env(CHILD_VOLUME_ENV, volume)
            .env(CHILD_READY_ENV, ready)
            .env(CHILD_PEERS_ENV, peers)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn member");
        Self(child)
    }

    async fn ready(&mut self, ready: &Path) -> String {
        let deadline = Instant::now() + Duration::from_millis(CHILD_START_TIMEOUT_MS);
        loop {
            if let Ok(s) = std::fs::read_to_string(ready) {
                return s;
            }
            if let Ok(Some(status)) = self.0.try_wait() {
                panic!("member exited during start-up: {status}");
            }
            assert!(Instant::now() < deadline, "member did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct TrialResult {
    flushes_acked: u64,
    writes_made_durable: u64,
    writes_verified: u64,
    new_primary: &'static str,
}

async fn trial(dir: &Path, seed: u64, kill_after_flushes: u64) -> TrialResult {
    let vol = |n: &str| dir.join(format!("{n}.img"));
    let ready = |n: &str| dir.join(format!("{n}.ready"));
    let mut r0 = Member::start("replica", &vol("r0"), &ready("r0"), "");
    let mut r1 = Member::start("replica", &vol("r1"), &ready("r1"), "");
    let a0 = r0.ready(&ready("r0")).await;
    let a1 = r1.ready(&ready("r1")).await;
    let peers = format!("r0={a0},r1={a1}");
    let mut p = Member::start("primary", &vol("p"), &ready("p"), &peers);
    let sock = PathBuf::from(p.ready(&ready("p")).await);
    let target = Target::Unix {
        path: sock,
        export: EXPORT.into(),
    };
    let config = CheckerConfig {
        volume_id: "vol-faults".into(),
        seed,
        workers: 3,
        block_size_bytes: BS,
        lba_start: 0,
        lba_count: 384,
        flush_every_writes: 4,
    };
    let checker = Checker::new(Ledger::new(config).expect("ledger"));
    let mut progress = checker.flush_progress();
    let (c2, t2) = (checker.clone(), target.clone());
    let writer = tokio::spawn(async move { c2.run_writes(&t2, 50_000).await });
    tokio::time::timeout(
        Duration::from_millis(LOAD_TIMEOUT_MS),
        progress.wait_for(|n| *n >= kill_after_flushes),
    )
    .await
    .expect("flushes acknowledged in time")
    .expect("progress channel");
    drop(p); // SIGKILL the primary under load
    let sum = writer.await.expect("writer task");
    assert!(
        !sum.stopped_by.is_empty(),
        "the load finished before the primary was killed"
    );
    drop(r0);
    drop(r1);

    // Promote the replica with the highest durable LSN.
    let v0 = Volume::open_file(&vol("r0"), vcfg()).expect("open r0");
    let v1 = Volume::open_file(&vol("r1"), vcfg()).expect("open r1");
    let (chosen, name) = if v0.durable_lsn() >= v1.durable_lsn() {
        drop(v1);
        (v0, "r0")
    } else {
        drop(v0);
        (v1, "r1")
    };
    let registry = ExportRegistry::new();
    registry.add(EXPORT, Arc::new(chosen)).expect("export");
    let server = NbdServer::new(registry, ServerConfig::default()).expect("nbd");
    let sock = dir.join("promoted.sock");
    server.listen_unix(&sock).await.expect("listen");
    let promoted = Target::Unix {
        path: sock,
        export: EXPORT.into(),
    };
    NbdClient::connect(&promoted)
        .await
        .expect("promoted replica serves")
        .disconnect()
        .await;
    let report = verify_ledger(&promoted, &checker.ledger())
        .await
        .expect("verify");
    assert!(
        report.is_clean(),
        "acknowledged flushes lost after promoting {name}: {report}"
    );
    assert_eq!(report.writes_verified, checker.ledger().durable_blocks());
    server.shutdown();
    TrialResult {
        flushes_acked: sum.flushes_acked,
        writes_made_durable: sum.writes_made_durable,
        writes_verified: report.writes_verified,
        new_primary: name,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_under_load_loses_no_acknowledged_flush() {
    let seed = env_u64(SEED_ENV, 0x0f17_0001);
    let trials = env_u64(TRIALS_ENV, 20);
    println!("replication faults: seed {seed}, trials {trials} (set {SEED_ENV} / {TRIALS_ENV})");
    let mut rng = seed;
    let (mut faults, mut durable, mut verified) = (0u64, 0u64, 0u64);
    for t in 0..trials {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let kill_after = 1 + (rng >> 33) % 20;
        let dir = tempfile::tempdir().expect("tempdir");
        let r = trial(dir.path(), rng, kill_after).await;
        faults += 1;
        durable += r.writes_made_durable;
        verified += r.writes_verified;
        println!(
            "trial {t}: primary killed after {} acked flushes; promoted {}; {} durable writes, \
             {} LBAs verified, 0 lost",
            r.flushes_acked, r.new_primary, r.writes_made_durable, r.writes_verified
        );
    }
    println!(
        "replication faults: trials {trials}, faults injected {faults}, durable writes {durable}, \
         LBAs verified {verified}, lost 0"
    );
}
