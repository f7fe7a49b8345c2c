//! The replication cores over the engine's real `Volume` (through `VolumeLog`), and one
//! conformance suite for the `ReplicaLog` contract run against both implementations.

use std::sync::{Arc, Mutex};

use engine::replication::{
    BaseKind, Epoch, Generation, Input, Lsn, MemLog, PrimaryConfig, ReplicaLog, ReplicaState,
    Report, VolumeLog,
};
use engine::{CreateOptions, EntryKind, FileDisk, Lba, SimDisk, Volume, VolumeConfig, WalEntry};

mod common;

use common::cluster::{Cluster, rid};

const BS: usize = 4096;

/// 256 blocks and a 1 MiB WAL at epoch 1.
fn small_volume() -> CreateOptions {
    CreateOptions {
        size_bytes: 1 << 20,
        block_size: BS as u32,
        wal_size_bytes: 1 << 20,
        epoch: Epoch(1),
        ..CreateOptions::default()
    }
}

fn new_volume(name: &str) -> Arc<Volume> {
    let opts = small_volume();
    let cfg = VolumeConfig {
        flush_interval_ms: 5,
        ..VolumeConfig::default()
    };
    Arc::new(Volume::create(Box::new(SimDisk::new(name)), opts, cfg).unwrap())
}

// ----- conformance ------------------------------------------------------------------------

fn entry(lsn: u64, lba: u64, byte: u8) -> WalEntry {
    WalEntry {
        lsn: Lsn(lsn),
        epoch: Epoch(1),
        kind: EntryKind::Write,
        lba: Lba(lba),
        blocks: 1,
        data: vec![byte; BS],
    }
}

fn conformance(log: &mut dyn ReplicaLog) {
    // Dense appends; duplicates skipped; gaps refused.
    assert_eq!(log.head_lsn(), Lsn(0));
    for l in 1..=5 {
        log.append_replicated(&entry(l, l, l as u8)).unwrap();
    }
    assert_eq!(
        log.append_replicated(&entry(3, 3, 3)).unwrap(),
        engine::replication::AppendOutcome::Duplicate
    );
    assert!(matches!(
        log.append_replicated(&entry(9, 1, 1)),
        Err(engine::replication::Error::Gap {
            expected: Lsn(6),
            got: Lsn(9)
        })
    ));
    assert_eq!(log.head_lsn(), Lsn(5));
    // Durable only after sync.
    let d = log.sync().unwrap();
    assert_eq!(d, Lsn(5));
    assert_eq!(log.durable_lsn(), Lsn(5));
    // Scans return entries in order with their epochs.
    let got = log.scan_from(Lsn(2), 2).unwrap();
    assert_eq!(
        got.iter().map(|e| e.lsn).collect::<Vec<_>>(),
        vec![Lsn(2), Lsn(3)]
    );
    assert_eq!(log.epoch_at(Lsn(4)), Some(Epoch(1)));
    assert_eq!(log.epoch_at(Lsn(0)), Some(Epoch(0)));
    // Truncation of the suffix.
    log.append_replicated(&entry(6, 6, 6)).unwrap();
    log.truncate_after(Lsn(5)).unwrap();
    assert_eq!(log.head_lsn(), Lsn(5));
    // Epoch persists and is readable.
    log.set_epoch(Epoch(4)).unwrap();
    assert_eq!(log.epoch(), Epoch(4));
    // A base pin reflects the checkpoint; a rebuild installs it and the tail follows.
    let pin = log.pin_base(BaseKind::FullBase).unwrap();
    assert!(pin.base_lsn >= Lsn(5));
    let mut blocks = Vec::new();
    let mut cursor = Some(0);
    while let Some(c) = cursor {
        let (b, next) = log.read_base(&pin, c, 64).unwrap();
        blocks.extend(b);
        cursor = next;
    }
    log.release_base(&pin);
    let base = pin.base_lsn;
    log.begin_rebuild().unwrap();
    assert!(log.rebuilding());
    assert_eq!(log.durable_lsn(), Lsn(0));
    assert!(log.append_replicated(&entry(base.0 + 1, 1, 1)).is_err());
    for (lba, data) in &blocks {
        log.install_base_block(*lba, data).unwrap();
    }
    log.finish_rebuild(base, pin.base_epoch).unwrap();
    assert!(!log.rebuilding());
    assert_eq!(log.head_lsn(), base);
    assert_eq!(log.durable_lsn(), base);
    assert_eq!(log.epoch_at(base), Some(pin.base_epoch));
    log.append_replicated(&entry(base.0 + 1, 1, 0x77)).unwrap();
    assert_eq!(log.head_lsn(), base.next());
}

#[test]
fn mem_log_meets_the_replica_log_contract() {
    let mut m = MemLog::new();
    m.set_epoch(Epoch(1)).unwrap();
    conformance(&mut m);
}

#[test]
fn volume_log_meets_the_replica_log_contract() {
    let mut v = VolumeLog::new(new_volume("conf"));
    conformance(&mut v);
}

// ----- cores over volumes -----------------------------------------------------------------

/// The shared cluster on the engine's volumes: client writes go through the primary's
/// `Volume`, and the entries it appends are handed to the primary core.
struct VolumeCluster {
    net: Cluster<VolumeLog>,
    pvol: Arc<Volume>,
    appended: Arc<Mutex<Vec<WalEntry>>>,
}

impl std::ops::Deref for VolumeCluster {
    type Target = Cluster<VolumeLog>;
    fn deref(&self) -> &Self::Target {
        &self.net
    }
}

impl std::ops::DerefMut for VolumeCluster {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.net
    }
}

impl VolumeCluster {
    /// A primary and `n` replicas on fresh volumes; the replicas are the committed set.
    fn new(n: usize, cfg: PrimaryConfig) -> Self {
        let replicas = (0..n).map(|i| new_volume(&format!("r{i}"))).collect();
        Self::on_volumes(new_volume("primary"), replicas, cfg)
    }

    /// A primary on `pvol` and one replica on each of `replicas` (the committed set).
    fn on_volumes(pvol: Arc<Volume>, replicas: Vec<Arc<Volume>>, cfg: PrimaryConfig) -> Self {
        let n = replicas.len();
        let appended = Arc::new(Mutex::new(Vec::new()));
        let sink = appended.clone();
        pvol.set_append_observer(Some(Arc::new(move |e: &WalEntry| {
            sink.lock().unwrap().push(e.clone());
        })));
        let logs = replicas.into_iter().map(VolumeLog::new).collect();
        let members: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        let net = Cluster::on_logs(VolumeLog::new(pvol.clone()), logs, cfg, &members);
        VolumeCluster {
            net,
            pvol,
            appended,
        }
    }

    fn write(&mut self, lba: u64, byte: u8) {
        self.pvol.write(Lba(lba), &vec![byte; BS]).unwrap();
        let entries: Vec<WalEntry> = std::mem::take(&mut *self.appended.lock().unwrap());
        for e in entries {
            self.input(Input::Appended(e));
        }
    }

    /// Checkpoints the primary (recycling the WAL the flusher may drop), commits the
    /// in-sync set down to the primary alone, reconnects r0 and asks for its rebuild,
    /// then lets `ticks` ticks of 20 ms pass.
    fn rebuild_r0_from_a_checkpoint(&mut self, ticks: usize) {
        self.pvol.flush().unwrap();
        self.pvol.checkpoint().unwrap();
        self.input(Input::InSyncSetCommitted {
            generation: Generation(2),
            members: vec![rid("p")],
        });
        self.replicas[0].reachable = true;
        self.input(Input::RebuildRequested(rid("r0")));
        for _ in 0..ticks {
            self.tick(20);
        }
    }

    fn assert_same_content(&self, r: usize, lbas: std::ops::Range<u64>) {
        let rv = self.replicas[r].log.volume();
        for lba in lbas {
            let mut a = vec![0u8; BS];
            let mut b = vec![0u8; BS];
            self.pvol.read(Lba(lba), &mut a).unwrap();
            rv.read(Lba(lba), &mut b).unwrap();
            assert_eq!(a[0], b[0], "replica r{r} differs at LBA {lba}");
        }
    }
}

fn cfg() -> PrimaryConfig {
    PrimaryConfig {
        barrier_timeout_ms: 1_000,
        reconnect_backoff_ms: 10,
        catchup_batch_entries: 8,
        ..PrimaryConfig::default()
    }
}

#[test]
fn volume_replicas_stay_identical_and_flush_acks_after_their_barriers() {
    let mut c = VolumeCluster::new(2, cfg());
    c.tick(1);
    for i in 0..40 {
        c.write(i % 16, i as u8 + 1);
    }
    let f = c.flush();
    assert!(c.is_acked(f));
    for r in 0..2 {
        assert!(c.replicas[r].log.volume().durable_lsn() >= Lsn(40));
        c.assert_same_content(r, 0..16);
    }
}

#[test]
fn volume_replica_catches_up_after_a_disconnect() {
    let mut c = VolumeCluster::new(2, cfg());
    c.tick(1);
    c.write(0, 1);
    c.cut(1);
    for i in 0..30 {
        c.write(i % 10, 50 + i as u8);
    }
    c.input(Input::InSyncSetCommitted {
        generation: Generation(2),
        members: vec![rid("p"), rid("r0")],
    });
    let f = c.flush();
    assert!(c.is_acked(f));
    c.replicas[1].reachable = true;
    c.tick(20);
    c.tick(20);
    assert_eq!(c.state("r1"), ReplicaState::InSync);
    c.assert_same_content(1, 0..10);
}

#[test]
fn volume_replica_is_rebuilt_after_its_wal_was_released() {
    let c0 = PrimaryConfig {
        wal_retention_bytes_max: 64 * 1024,
        ..cfg()
    };
    let mut c = VolumeCluster::new(1, c0);
    c.tick(1);
    c.write(0, 1);
    c.cut(0);
    for i in 0..64 {
        c.write(i % 32, 100 + i as u8);
    }
    c.tick(5);
    assert_eq!(
        c.state("r0"),
        ReplicaState::NeedsRebuild,
        "byte budget did not escalate"
    );
    // Let the flusher recycle what the replica would have needed.
    c.rebuild_r0_from_a_checkpoint(10);
    assert_eq!(c.state("r0"), ReplicaState::InSync);
    c.assert_same_content(0, 0..32);
    assert!(
        c.reports
            .iter()
            .any(|r| matches!(r, Report::MemberInSync { .. }))
    );
}

/// A volume of `blocks` blocks in a file under `dir` (a sparse file: the extent holds
/// data only where something was written).
fn file_volume(dir: &std::path::Path, name: &str, blocks: u64) -> Arc<Volume> {
    let opts = CreateOptions {
        size_bytes: blocks * BS as u64,
        ..small_volume()
    };
    let cfg = VolumeConfig {
        flush_interval_ms: 5,
        ..VolumeConfig::default()
    };
    let disk = FileDisk::create(&dir.join(name)).unwrap();
    Arc::new(Volume::create(Box::new(disk), opts, cfg).unwrap())
}

#[test]
fn rebuild_ships_only_written_blocks_and_zeroes_the_rest_of_a_stale_replica() {
    const BLOCKS: u64 = 1024;
    let dir = tempfile::tempdir().unwrap();
    let pvol = file_volume(dir.path(), "primary", BLOCKS);
    let rvol = file_volume(dir.path(), "r0", BLOCKS);
    let c0 = PrimaryConfig {
        wal_retention_bytes_max: 64 * 1024,
        ..cfg()
    };
    let mut c = VolumeCluster::on_volumes(pvol, vec![rvol.clone()], c0);
    c.tick(1);
    c.write(0, 1);
    c.cut(0);
    // One block in every 16 written on the primary while the replica is away.
    for i in 0..BLOCKS / 16 {
        c.write(i * 16, 100 + (i % 100) as u8);
    }
    // The replica meanwhile holds data of its own everywhere (a stale, diverged copy).
    for lba in 0..BLOCKS {
        rvol.write(Lba(lba), &vec![0xEE; BS]).unwrap();
    }
    rvol.flush().unwrap();
    rvol.checkpoint().unwrap();
    c.tick(5);
    assert_eq!(c.state("r0"), ReplicaState::NeedsRebuild);
    c.rebuild_r0_from_a_checkpoint(20);
    assert_eq!(c.state("r0"), ReplicaState::InSync);
    // Block by block identical, the unwritten ones zeros on both.
    let (mut a, mut b) = (vec![0u8; BS], vec![0u8; BS]);
    for lba in 0..BLOCKS {
        c.pvol.read(Lba(lba), &mut a).unwrap();
        rvol.read(Lba(lba), &mut b).unwrap();
        assert!(a == b, "replica differs from the primary at LBA {lba}");
    }
    // About 1/16 of the volume crossed the wire, not all of it.
    let written = BLOCKS / 16 * BS as u64;
    let sent = c.primary.recovery_bytes()[&rid("r0")].rebuild;
    assert!(
        (written..written + written / 4).contains(&sent),
        "rebuild sent {sent} bytes for {written} written of {}",
        BLOCKS * BS as u64
    );
}

/// A replica volume in the state a crash inside a flusher cycle leaves: LSNs 1-3 (LBAs 5,
/// 7, 9, epoch 1) durable, checkpoint 1, and the extent already holding LSN 3's data for
/// LBA 9. With `history` the WAL keeps everything from LSN 1 (its WAL history); without
/// it, the checkpoint recycles LSN 1.
fn crashed_inside_a_flusher_cycle(history: bool) -> Arc<Volume> {
    let opts = small_volume();
    let cfg = VolumeConfig {
        flush_interval_ms: 3_600_000,
        wal_history_ms: if history {
            VolumeConfig::default().wal_history_ms
        } else {
            0
        },
        ..VolumeConfig::default()
    };
    for fail_after in 0..16 {
        let disk = SimDisk::new("old-primary");
        let v = Volume::create(Box::new(disk.clone()), opts.clone(), cfg.clone()).unwrap();
        v.append_replicated(&entry(1, 5, 5)).unwrap();
        v.flush().unwrap();
        v.checkpoint().unwrap();
        assert_eq!(v.checkpoint_lsn(), Lsn(1));
        let start = if history { Lsn(1) } else { Lsn(2) };
        assert_eq!(v.retained_start(), start);
        v.append_replicated(&entry(2, 7, 7)).unwrap();
        v.append_replicated(&entry(3, 9, 9)).unwrap();
        v.flush().unwrap();
        disk.set_faults(engine::FaultPlan {
            fail_writes_after: Some(fail_after),
            ..engine::FaultPlan::default()
        });
        let _ = v.checkpoint();
        let after = disk.crash(engine::CrashMode::DropUnsynced, 0);
        drop(v);
        let (a, b) = (after.peek(0, 4096), after.peek(4096, 4096));
        let ext = engine::storage::superblock::choose("t", &a, &b)
            .unwrap()
            .extent_offset;
        let v = Volume::open(Box::new(after.clone()), cfg.clone()).unwrap();
        if v.checkpoint_lsn() == Lsn(1)
            && v.head_lsn() == Lsn(3)
            && after.peek(ext + 9 * BS as u64, 1) == [9]
        {
            return Arc::new(v);
        }
    }
    panic!("no fault point left the extent ahead of the checkpoint");
}

/// An old primary killed inside a flusher cycle rejoins behind the new primary (which
/// never had its LSN 3) and is told to truncate after LSN 2. It must end up identical to
/// the primary: by restoring the blocks from its WAL history, or, without that history,
/// by refusing the truncation and being rebuilt. It must never keep LSN 3's data.
#[test]
fn replica_crashed_inside_a_flusher_cycle_is_truncated_or_rebuilt_never_divergent() {
    for history in [true, false] {
        let mut c = VolumeCluster::new(1, cfg());
        c.replicas[0].reachable = false;
        c.replicas[0].log = VolumeLog::new(crashed_inside_a_flusher_cycle(history));
        c.write(5, 5);
        c.write(7, 7);
        c.tick(1);
        c.replicas[0].reachable = true;
        for _ in 0..10 {
            c.tick(20);
        }
        if !history {
            assert_eq!(
                c.state("r0"),
                ReplicaState::NeedsRebuild,
                "the truncation the replica cannot make safely was not escalated"
            );
            // The control plane drops it from the committed set and asks for a rebuild.
            c.input(Input::InSyncSetCommitted {
                generation: Generation(2),
                members: vec![rid("p")],
            });
            c.input(Input::RebuildRequested(rid("r0")));
            for _ in 0..10 {
                c.tick(20);
            }
        }
        assert_eq!(c.state("r0"), ReplicaState::InSync, "history {history}");
        c.assert_same_content(0, 0..16);
        let f = c.flush();
        assert!(c.is_acked(f), "history {history}");
    }
}

/// Expansion grows the primary first and each replica when its agent applies the new
/// size, so a replica can receive entries beyond its end for a while. That is a race,
/// not a broken disk: the replica refuses the entry without failing (no StorageFailed,
/// no rebuild), the primary retries that member after its backoff however often it
/// takes, and once the replica has grown it catches up and counts again.
#[test]
fn a_replica_not_yet_grown_refuses_entries_beyond_its_end_and_catches_up_after_growing() {
    let mut c = VolumeCluster::new(2, cfg());
    c.tick(1);
    c.write(0, 1);
    let grown = 2 << 20;
    c.pvol.expand(grown).unwrap();
    c.replicas[1].log.volume().expand(grown).unwrap();
    // LBA 300 lies beyond r0's 256 blocks.
    c.write(300, 7);
    c.write(1, 8);
    // Far more retries than catchup_retries_max, all of them refused.
    for _ in 0..20 {
        c.tick(20);
    }
    assert_eq!(
        c.replicas[0].core.failed(),
        None,
        "a size race is not a storage failure"
    );
    assert_ne!(c.state("r0"), ReplicaState::NeedsRebuild);
    assert!(
        !c.reports
            .iter()
            .any(|r| matches!(r, Report::NeedsRebuild { .. })),
        "no rebuild for a replica that only has to grow: {:?}",
        c.reports
    );
    assert_eq!(c.state("r1"), ReplicaState::InSync);
    // The agent applies the new size; the member catches up and counts again.
    c.replicas[0].log.volume().expand(grown).unwrap();
    for _ in 0..5 {
        c.tick(20);
    }
    assert_eq!(c.state("r0"), ReplicaState::InSync);
    let f = c.flush();
    assert!(c.is_acked(f));
    assert!(c.replicas[0].log.volume().durable_lsn() >= Lsn(3));
    c.assert_same_content(0, 0..2);
    c.assert_same_content(0, 300..301);
}
