//! The engine API the replication layer builds on: dense ordered LSNs under concurrent
//! writers, the append observer, group commit, retention floors and scan_from,
//! append_replicated, truncate_after, epochs, base snapshots and rebuild, expansion,
//! WAL-full back-pressure and fail-stop on sync errors.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use engine::{
    Disk, EntryKind, Epoch, Error, FaultPlan, Lba, Lsn, SimDisk, Volume, VolumeConfig, WalEntry,
};

fn big_sim(name: &str) -> (SimDisk, Volume) {
    sim_volume(name, 256, 8 << 20)
}

#[test]
fn concurrent_writers_get_dense_lsns_and_observer_sees_them_in_order() {
    let (_d, vol) = big_sim("dense");
    let vol = Arc::new(vol);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    vol.set_append_observer(Some(Arc::new(move |e: &WalEntry| {
        s2.lock().unwrap().push(e.lsn.0)
    })));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..150u64 {
                    let lsn = match i % 10 {
                        7 => vol.trim(Lba((t * 31 + i) % 256), 1).unwrap(),
                        _ => vol
                            .write(Lba((t * 31 + i) % 256), &block(t << 32 | i))
                            .unwrap(),
                    };
                    mine.push(lsn.0);
                    if i % 16 == 0 {
                        vol.flush().unwrap();
                    }
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for th in threads {
        let mine = th.join().unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "a thread's LSNs go backwards"
        );
        all.extend(mine);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=1200).collect::<Vec<_>>(),
        "LSNs are not dense/unique"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        (1..=1200).collect::<Vec<_>>(),
        "observer order"
    );
    assert_eq!(vol.flush().unwrap(), Lsn(1200));
}

/// A disk whose first sync blocks until the test opens the gate.
struct GatedDisk {
    inner: SimDisk,
    gate: Mutex<Option<mpsc::Receiver<()>>>,
    entered: Mutex<Option<mpsc::Sender<()>>>,
    syncs: AtomicU64,
}

impl Disk for GatedDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        let gate = self.gate.lock().unwrap().take();
        if let Some(gate) = gate {
            if let Some(tx) = self.entered.lock().unwrap().take() {
                let _ = tx.send(());
            }
            let _ = gate.recv();
        }
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn one_fdatasync_serves_a_group_of_concurrent_flushers() {
    let (open_tx, open_rx) = mpsc::channel();
    let (entered_tx, entered_rx) = mpsc::channel();
    let disk = Arc::new(GatedDisk {
        inner: SimDisk::new("gated"),
        gate: Mutex::new(None),
        entered: Mutex::new(Some(entered_tx)),
        syncs: AtomicU64::new(0),
    });
    struct Shared(Arc<GatedDisk>);
    impl Disk for Shared {
        fn read_at(&self, b: &mut [u8], o: u64) -> std::io::Result<()> {
            self.0.read_at(b, o)
        }
        fn write_at(&self, b: &[u8], o: u64) -> std::io::Result<()> {
            self.0.write_at(b, o)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.0.sync()
        }
        fn set_len(&self, l: u64) -> std::io::Result<()> {
            self.0.set_len(l)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.0.len()
        }
        fn describe(&self) -> String {
            self.0.describe()
        }
    }
    let vol = Arc::new(
        Volume::create(
            Box::new(Shared(disk.clone())),
            small_opts(64, 1 << 20),
            manual_cfg(),
        )
        .unwrap(),
    );
    for i in 0..8u64 {
        vol.write(Lba(i), &block(i)).unwrap();
    }
    *disk.gate.lock().unwrap() = Some(open_rx);
    let before = disk.syncs.load(Ordering::SeqCst);
    let flushers: Vec<_> = (0..8)
        .map(|_| {
            let vol = vol.clone();
            std::thread::spawn(move || vol.flush().unwrap())
        })
        .collect();
    entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a leader reached sync");
    open_tx.send(()).unwrap();
    for f in flushers {
        assert_eq!(f.join().unwrap(), Lsn(8));
    }
    assert_eq!(
        disk.syncs.load(Ordering::SeqCst) - before,
        1,
        "one sync for the whole group"
    );
    assert_eq!(vol.durable_lsn(), Lsn(8));
}

#[test]
fn retention_floor_keeps_entries_for_scan_from_across_checkpoints() {
    let (_d, vol) = sim_volume_without_history("floor", 64, 1 << 20);
    vol.set_retention_floor(Some(Lsn(3)));
    let mut shipped = Vec::new();
    let obs_log = Arc::new(Mutex::new(Vec::new()));
    let o2 = obs_log.clone();
    vol.set_append_observer(Some(Arc::new(move |e: &WalEntry| {
        o2.lock().unwrap().push(e.encode())
    })));
    for i in 1..=10u64 {
        vol.write(Lba(i), &block(i)).unwrap();
        shipped.push(i);
    }
    vol.write_zeroes(Lba(2), 3).unwrap();
    vol.flush().unwrap();
    // The floor caps the checkpoint too: the extent never holds what a member may lack.
    assert_eq!(vol.checkpoint().unwrap(), Lsn(3));
    assert_eq!(vol.retained_start(), Lsn(3));
    let entries = vol.scan_from(Lsn(3), 100).unwrap();
    assert_eq!(entries.len(), 9);
    assert_eq!(entries[0].lsn, Lsn(3));
    assert_eq!(entries[8].kind, EntryKind::Zero);
    assert_eq!(entries[8].blocks, 3);
    // scan_from yields the very bytes the observer saw at append time.
    let obs = obs_log.lock().unwrap();
    for e in &entries {
        assert_eq!(&e.encode(), &obs[(e.lsn.0 - 1) as usize]);
    }
    assert_eq!(
        vol.scan_from(Lsn(5), 2)
            .unwrap()
            .iter()
            .map(|e| e.lsn.0)
            .collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert!(vol.scan_from(Lsn(12), 10).unwrap().is_empty());
    assert!(matches!(
        vol.scan_from(Lsn(2), 10),
        Err(Error::WalRecycled {
            retained_start: Lsn(3),
            ..
        })
    ));
    vol.set_retention_floor(None);
    vol.checkpoint().unwrap();
    assert_eq!(vol.retained_start(), Lsn(12));
    assert!(matches!(
        vol.scan_from(Lsn(3), 10),
        Err(Error::WalRecycled { .. })
    ));
}

#[test]
fn replica_append_keeps_primary_lsns_skips_duplicates_and_rejects_gaps() {
    let (_pd, primary) = sim_volume("primary", 64, 1 << 20);
    let (_rd, replica) = sim_volume("replica", 64, 1 << 20);
    primary.set_epoch(Epoch(5)).unwrap();
    for i in 0..20u64 {
        primary.write(Lba(i % 7), &block(i + 1)).unwrap();
    }
    primary.trim(Lba(3), 2).unwrap();
    let entries = primary.scan_from(Lsn(1), 1000).unwrap();
    assert_eq!(entries.len(), 21);
    // Ship over "the wire": encode/decode.
    for e in &entries {
        let (d, _) = WalEntry::decode(&e.encode()).unwrap();
        replica.append_replicated(&d).unwrap();
    }
    replica.append_replicated(&entries[4]).unwrap(); // duplicate: skipped
    let mut gap = entries[0].clone();
    gap.lsn = Lsn(23);
    assert!(matches!(
        replica.append_replicated(&gap),
        Err(Error::LsnGap {
            expected: Lsn(22),
            got: Lsn(23)
        })
    ));
    assert_eq!(replica.head_lsn(), Lsn(21));
    assert_eq!(replica.flush().unwrap(), Lsn(21));
    let again = replica.scan_from(Lsn(1), 1000).unwrap();
    assert_eq!(
        again, entries,
        "replica WAL holds the primary's entries, epochs included"
    );
    assert!(again.iter().all(|e| e.epoch == Epoch(5)));
    for lba in 0..8 {
        assert_eq!(
            read_block(&replica, lba),
            read_block(&primary, lba),
            "lba {lba}"
        );
    }
    let mut bad = entries[0].clone();
    bad.lsn = Lsn(22);
    bad.data.truncate(100);
    assert!(matches!(
        replica.append_replicated(&bad),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn truncate_after_drops_the_divergent_suffix_and_restores_older_versions() {
    let (disk, vol) = sim_volume("trunc", 64, 1 << 20);
    vol.write(Lba(1), &block(1)).unwrap(); // 1
    vol.write(Lba(2), &block(2)).unwrap(); // 2
    vol.flush().unwrap();
    vol.checkpoint().unwrap(); // checkpoint 2
    vol.write(Lba(1), &block(3)).unwrap(); // 3
    vol.write(Lba(4), &block(4)).unwrap(); // 4
    vol.write(Lba(1), &block(5)).unwrap(); // 5 (divergent)
    vol.trim(Lba(4), 1).unwrap(); // 6 (divergent)
    vol.write(Lba(9), &block(7)).unwrap(); // 7 (divergent)
    assert_eq!(vol.flush().unwrap(), Lsn(7));
    assert!(matches!(
        vol.truncate_after(Lsn(1)),
        Err(Error::TruncationUnsafe { .. })
    ));
    vol.truncate_after(Lsn(4)).unwrap();
    assert_eq!(vol.head_lsn(), Lsn(4));
    assert_eq!(vol.durable_lsn(), Lsn(4));
    assert_eq!(read_block(&vol, 1), block(3));
    assert_eq!(read_block(&vol, 4), block(4));
    assert_eq!(read_block(&vol, 9), vec![0u8; BS]);
    // The suffix stays gone across a crash, also before anything new is appended.
    drop(vol);
    let disk = disk.crash(engine::CrashMode::DropUnsynced, 3);
    let vol = Volume::open(Box::new(disk.clone()), manual_cfg()).unwrap();
    assert_eq!(vol.head_lsn(), Lsn(4));
    assert_eq!(read_block(&vol, 1), block(3));
    assert_eq!(read_block(&vol, 9), vec![0u8; BS]);
    assert_eq!(vol.write(Lba(9), &block(50)).unwrap(), Lsn(5));
    vol.flush().unwrap();
    drop(vol);
    let vol = Volume::open(
        Box::new(disk.crash(engine::CrashMode::DropUnsynced, 4)),
        manual_cfg(),
    )
    .unwrap();
    assert_eq!(vol.head_lsn(), Lsn(5));
    assert_eq!(read_block(&vol, 9), block(50));
    assert_eq!(read_block(&vol, 4), block(4));
}

#[test]
fn epoch_is_persisted_and_never_lowered() {
    let (disk, vol) = sim_volume("epoch", 16, 256 * 1024);
    assert_eq!(vol.epoch(), Epoch(1));
    vol.set_epoch(Epoch(7)).unwrap();
    let lsn = vol.write(Lba(0), &block(1)).unwrap();
    assert!(matches!(
        vol.set_epoch(Epoch(6)),
        Err(Error::EpochRegression {
            current: Epoch(7),
            requested: Epoch(6)
        })
    ));
    vol.set_epoch(Epoch(7)).unwrap();
    assert_eq!(vol.scan_from(lsn, 1).unwrap()[0].epoch, Epoch(7));
    drop(vol);
    // Persisted before set_epoch returned: survives a power cut with nothing flushed.
    let vol = Volume::open(
        Box::new(disk.crash(engine::CrashMode::DropUnsynced, 1)),
        manual_cfg(),
    )
    .unwrap();
    assert_eq!(vol.epoch(), Epoch(7));
}

#[test]
fn base_snapshot_pins_the_extent_at_the_checkpoint_while_writes_continue() {
    let (_d, vol) = sim_volume("base", 32, 1 << 20);
    for i in 0..8u64 {
        vol.write(Lba(i), &block(i + 1)).unwrap();
    }
    vol.flush().unwrap();
    let c = vol.checkpoint().unwrap();
    let base = vol.base_snapshot().unwrap();
    assert_eq!(base.checkpoint(), c);
    for i in 0..8u64 {
        vol.write(Lba(i), &block(i + 100)).unwrap();
    }
    vol.flush().unwrap();
    assert_eq!(
        vol.checkpoint().unwrap(),
        c,
        "checkpoint must not move while pinned"
    );
    for i in 0..8u64 {
        let mut b = vec![0u8; BS];
        base.read(Lba(i), &mut b).unwrap();
        assert_eq!(b, block(i + 1), "base image lba {i}");
        assert_eq!(read_block(&vol, i), block(i + 100), "live read lba {i}");
    }
    drop(base);
    assert_eq!(vol.checkpoint().unwrap(), vol.head_lsn());
}

#[test]
fn rebuild_from_base_image_plus_wal_tail_matches_the_primary() {
    let (_pd, primary) = sim_volume("rb-primary", 64, 1 << 20);
    let (rd, replica) = sim_volume("rb-replica", 64, 1 << 20);
    // The replica has some divergent history of its own.
    for i in 0..5u64 {
        replica.write(Lba(i), &block(900 + i)).unwrap();
    }
    replica.flush().unwrap();
    for i in 0..30u64 {
        primary.write(Lba((i * 5) % 64), &block(i + 1)).unwrap();
    }
    primary.trim(Lba(10), 4).unwrap();
    primary.flush().unwrap();
    primary.checkpoint().unwrap();
    let base = primary.base_snapshot().unwrap();
    let c = base.checkpoint();
    primary.set_retention_floor(Some(Lsn(c.0 + 1)));
    // Writes keep coming during the copy.
    for i in 0..10u64 {
        primary.write(Lba(i * 3), &block(i + 500)).unwrap();
    }
    replica.begin_rebuild().unwrap();
    assert!(matches!(
        replica.write(Lba(0), &block(1)),
        Err(Error::Rebuilding { .. })
    ));
    for lba in 0..64u64 {
        let mut b = vec![0u8; BS];
        base.read(Lba(lba), &mut b).unwrap();
        replica.install_base_block(Lba(lba), &b).unwrap();
    }
    drop(base);
    replica.finish_rebuild(c).unwrap();
    assert_eq!(replica.head_lsn(), c);
    assert_eq!(replica.durable_lsn(), c);
    assert_eq!(replica.checkpoint_lsn(), c);
    for e in primary.scan_from(Lsn(c.0 + 1), 1000).unwrap() {
        replica.append_replicated(&e).unwrap();
    }
    replica.flush().unwrap();
    assert_eq!(replica.head_lsn(), primary.head_lsn());
    for lba in 0..64 {
        assert_eq!(
            read_block(&replica, lba),
            read_block(&primary, lba),
            "lba {lba}"
        );
    }
    drop(replica);
    let replica = Volume::open(
        Box::new(rd.crash(engine::CrashMode::DropUnsynced, 9)),
        manual_cfg(),
    )
    .unwrap();
    assert!(!replica.is_rebuilding());
    for lba in 0..64 {
        assert_eq!(
            read_block(&replica, lba),
            read_block(&primary, lba),
            "lba {lba} after reopen"
        );
    }
}

#[test]
fn crash_during_rebuild_reopens_marked_with_empty_history() {
    let (disk, vol) = sim_volume("rb-crash", 16, 256 * 1024);
    for i in 0..5u64 {
        vol.write(Lba(i), &block(i + 1)).unwrap();
    }
    vol.flush().unwrap();
    vol.begin_rebuild().unwrap();
    vol.install_base_block(Lba(0), &block(77)).unwrap();
    drop(vol);
    let vol = Volume::open(
        Box::new(disk.crash(engine::CrashMode::Random, 5)),
        manual_cfg(),
    )
    .unwrap();
    assert!(vol.is_rebuilding());
    assert_eq!(vol.head_lsn(), Lsn(0));
    assert_eq!(vol.durable_lsn(), Lsn(0));
    assert!(matches!(
        vol.write(Lba(0), &block(1)),
        Err(Error::Rebuilding { .. })
    ));
    vol.begin_rebuild().unwrap();
    vol.install_base_block(Lba(0), &block(78)).unwrap();
    vol.finish_rebuild(Lsn(40)).unwrap();
    assert_eq!(vol.write(Lba(1), &block(2)).unwrap(), Lsn(41));
    assert_eq!(read_block(&vol, 0), block(78));
}

#[test]
fn expand_grows_the_volume_durably_and_rejects_shrinking() {
    let (disk, vol) = sim_volume("expand", 16, 256 * 1024);
    assert!(matches!(
        vol.write(Lba(20), &block(1)),
        Err(Error::OutOfRange { .. })
    ));
    vol.expand(32 * BS as u64).unwrap();
    assert_eq!(vol.size_bytes(), 32 * BS as u64);
    vol.write(Lba(20), &block(1)).unwrap();
    vol.flush().unwrap();
    assert!(matches!(
        vol.expand(8 * BS as u64),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        vol.expand(40 * BS as u64 + 1),
        Err(Error::InvalidArgument { .. })
    ));
    drop(vol);
    let vol = Volume::open(
        Box::new(disk.crash(engine::CrashMode::DropUnsynced, 2)),
        manual_cfg(),
    )
    .unwrap();
    assert_eq!(vol.size_bytes(), 32 * BS as u64);
    assert_eq!(read_block(&vol, 20), block(1));
}

#[test]
fn pinned_wal_makes_writers_wait_then_fail_with_wal_full_without_overwriting() {
    let disk = SimDisk::new("full");
    let cfg = VolumeConfig {
        wal_full_timeout_ms: 200,
        ..manual_cfg()
    };
    let vol = Volume::create(Box::new(disk), small_opts(64, 128 * 1024), cfg).unwrap();
    vol.set_retention_floor(Some(Lsn(1)));
    let mut n = 0u64;
    let start = Instant::now();
    let err = loop {
        match vol.write(Lba(n % 64), &block(n + 1)) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 1000, "the WAL never filled");
    };
    assert!(
        matches!(
            err,
            Error::WalFull {
                timeout_ms: 200,
                ..
            }
        ),
        "{err}"
    );
    assert!(start.elapsed() >= Duration::from_millis(200));
    // Nothing was overwritten: every retained entry still reads back intact.
    let all = vol.scan_from(Lsn(1), 1000).unwrap();
    assert_eq!(all.len() as u64, n);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.data, block(i as u64 + 1));
    }
    vol.set_retention_floor(None);
    vol.write(Lba(0), &block(9999)).unwrap();
    assert_eq!(read_block(&vol, 0), block(9999));
}

#[test]
fn sustained_writes_through_a_small_wal_never_fail_with_the_flusher_running() {
    let disk = SimDisk::new("pressure");
    let cfg = VolumeConfig {
        flush_interval_ms: 5,
        wal_full_timeout_ms: 5000,
        ..VolumeConfig::default()
    };
    let vol = Arc::new(Volume::create(Box::new(disk), small_opts(64, 64 * 1024), cfg).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                for i in 0..150u64 {
                    vol.write(Lba((t * 16 + i) % 64), &block(t * 1000 + i))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(vol.head_lsn(), Lsn(600));
    assert!(vol.stats().flusher_cycles > 0);
}

#[test]
fn failed_sync_poisons_the_volume() {
    let (disk, vol) = sim_volume("poison", 16, 256 * 1024);
    vol.write(Lba(0), &block(1)).unwrap();
    disk.set_faults(FaultPlan {
        fail_syncs_after: Some(0),
        ..FaultPlan::default()
    });
    assert!(vol.flush().is_err());
    disk.set_faults(FaultPlan::default());
    assert!(
        matches!(vol.flush(), Err(Error::Failed { .. })),
        "a retried sync must not pass"
    );
    assert!(matches!(
        vol.write(Lba(1), &block(2)),
        Err(Error::Failed { .. })
    ));
    assert_eq!(vol.durable_lsn(), Lsn(0));
}

/// A WAL append whose disk write fails (EIO, not fsync) is fail-stop like a failed sync:
/// the write is refused and never shipped, the volume reports the failure at once (the
/// agent turns that into a "primary disk failed" report, so a failover follows), and no
/// later write, read or flush is served or acknowledged, even after the disk recovers.
#[test]
fn failed_wal_write_poisons_the_volume() {
    let (disk, vol) = sim_volume("write-poison", 16, 256 * 1024);
    let shipped = Arc::new(Mutex::new(Vec::new()));
    let s2 = shipped.clone();
    vol.set_append_observer(Some(Arc::new(move |e: &WalEntry| {
        s2.lock().unwrap().push(e.lsn.0)
    })));
    vol.write(Lba(0), &block(1)).unwrap();
    disk.set_faults(FaultPlan {
        fail_writes_after: Some(0),
        ..FaultPlan::default()
    });
    assert!(vol.write(Lba(1), &block(2)).is_err());
    assert!(
        vol.failure().is_some(),
        "a failed WAL write must fail the volume before any flush meets it"
    );
    disk.set_faults(FaultPlan::default());
    assert!(
        matches!(vol.flush(), Err(Error::Failed { .. })),
        "no flush may be acknowledged after a failed write"
    );
    assert!(matches!(
        vol.write(Lba(2), &block(3)),
        Err(Error::Failed { .. })
    ));
    assert!(matches!(vol.trim(Lba(2), 1), Err(Error::Failed { .. })));
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        vol.read(Lba(0), &mut buf),
        Err(Error::Failed { .. })
    ));
    assert_eq!(
        *shipped.lock().unwrap(),
        vec![1],
        "a failed write is never shipped"
    );
    assert_eq!(vol.durable_lsn(), Lsn(0));
}

#[test]
fn group_commit_batching_window_still_makes_every_flush_durable() {
    let cfg = VolumeConfig {
        group_commit_max_delay_us: 500,
        ..manual_cfg()
    };
    let disk = SimDisk::new("window");
    let vol =
        Arc::new(Volume::create(Box::new(disk.clone()), small_opts(64, 1 << 20), cfg).unwrap());
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                for i in 0..20u64 {
                    let lsn = vol
                        .write(Lba(t * 10 + i % 10), &block(t * 100 + i))
                        .unwrap();
                    let durable = vol.flush().unwrap();
                    assert!(
                        durable >= lsn,
                        "flush returned {durable} before {lsn} was durable"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = vol.stats();
    assert!(
        stats.group_commit_syncs <= 120,
        "{} syncs for 120 flushes",
        stats.group_commit_syncs
    );
    // Everything acknowledged is on "disk" even if the power goes now.
    drop(vol);
    let vol = Volume::open(
        Box::new(disk.crash(engine::CrashMode::DropUnsynced, 1)),
        manual_cfg(),
    )
    .unwrap();
    assert_eq!(vol.head_lsn(), Lsn(120));
}

#[test]
fn removed_append_observer_is_no_longer_called() {
    let (_d, vol) = sim_volume("observer", 16, 256 * 1024);
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    vol.set_append_observer(Some(Arc::new(move |_e: &WalEntry| {
        n2.fetch_add(1, Ordering::SeqCst);
    })));
    vol.write(Lba(0), &block(1)).unwrap();
    vol.set_append_observer(None);
    vol.write(Lba(0), &block(2)).unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[test]
fn entry_epochs_are_known_for_retained_entries_and_the_recycled_checkpoint() {
    // Without WAL history, so the checkpoint recycles everything.
    let (disk, vol) = sim_volume_without_history("epochs", 16, 256 * 1024);
    assert_eq!(
        vol.entry_epoch(Lsn(0)),
        None,
        "a new volume has no history point"
    );
    vol.write(Lba(0), &block(1)).unwrap(); // 1 @ epoch 1
    vol.set_epoch(Epoch(4)).unwrap();
    vol.write(Lba(1), &block(2)).unwrap(); // 2 @ epoch 4
    assert_eq!(vol.entry_epoch(Lsn(1)), Some(Epoch(1)));
    assert_eq!(vol.entry_epoch(Lsn(2)), Some(Epoch(4)));
    assert_eq!(vol.entry_epoch(Lsn(3)), None);
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    assert!(matches!(
        vol.scan_from(Lsn(2), 1),
        Err(Error::WalRecycled { .. })
    ));
    assert_eq!(
        vol.entry_epoch(Lsn(1)),
        None,
        "recycled and not the checkpoint"
    );
    assert_eq!(
        vol.entry_epoch(Lsn(2)),
        Some(Epoch(4)),
        "checkpoint epoch from the superblock"
    );
    drop(vol);
    let vol = Volume::open(
        Box::new(disk.crash(engine::CrashMode::DropUnsynced, 1)),
        no_history_cfg(),
    )
    .unwrap();
    assert_eq!(
        vol.entry_epoch(Lsn(2)),
        Some(Epoch(4)),
        "persisted across a power loss"
    );
}

#[test]
fn rebuild_base_point_epoch_survives_restart() {
    let (disk, vol) = sim_volume("base-epoch", 16, 256 * 1024);
    vol.begin_rebuild().unwrap();
    vol.install_base_block(Lba(0), &block(5)).unwrap();
    vol.finish_rebuild_with_epoch(Lsn(90), Epoch(6)).unwrap();
    assert_eq!(vol.entry_epoch(Lsn(90)), Some(Epoch(6)));
    drop(vol);
    let vol = Volume::open(
        Box::new(disk.crash(engine::CrashMode::DropUnsynced, 2)),
        manual_cfg(),
    )
    .unwrap();
    assert_eq!(vol.head_lsn(), Lsn(90));
    assert_eq!(vol.entry_epoch(Lsn(90)), Some(Epoch(6)));
    assert_eq!(read_block(&vol, 0), block(5));
    assert!(
        matches!(
            vol.finish_rebuild(Lsn(1)),
            Err(Error::InvalidArgument { .. })
        ),
        "no rebuild in progress"
    );
}

#[test]
fn writer_waits_past_wal_full_timeout_while_space_keeps_being_freed() {
    let disk = SimDisk::new("trickle");
    let cfg = VolumeConfig {
        wal_full_timeout_ms: 300,
        ..manual_cfg()
    };
    let wal = 128 * 1024;
    let vol = Arc::new(Volume::create(Box::new(disk), small_opts(64, wal), cfg).unwrap());
    vol.set_retention_floor(Some(Lsn(1)));
    let mut n = 0u64;
    // Fill to within one single-block record of the hard watermark (90 %).
    while vol.stats().wal_used_bytes + 4400 <= wal * 90 / 100 {
        n += 1;
        vol.write(Lba(8 + n % 56), &block(n)).unwrap();
    }
    // The floor frees one single-block entry every 200 ms; a 4-block write needs at least
    // three of them, so it waits longer than wal_full_timeout_ms, with progress all along.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let releaser = {
        let (vol, done) = (vol.clone(), done.clone());
        std::thread::spawn(move || {
            let mut floor = 1;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(200));
                floor += 1;
                vol.set_retention_floor(Some(Lsn(floor)));
            }
            floor
        })
    };
    let big: Vec<u8> = (0..4).flat_map(|i| block(10_000 + i)).collect();
    let start = Instant::now();
    let res = vol.write(Lba(0), &big);
    let waited = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::Release);
    let freed = releaser.join().unwrap() - 1;
    res.unwrap_or_else(|e| panic!("write failed after {waited:?} ({freed} entries freed): {e}"));
    println!("4-block write waited {waited:?} while {freed} entries were freed one by one");
    assert!(
        waited > Duration::from_millis(300),
        "did not wait: {waited:?}"
    );
    for i in 0..4 {
        assert_eq!(read_block(&vol, i), block(10_000 + i));
    }
}
