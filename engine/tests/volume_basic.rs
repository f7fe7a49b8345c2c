//! Basic volume behaviour: IO semantics, reopen, WAL wrap, checkpoints.

mod common;

use common::*;
use engine::{CrashMode, Epoch, Error, Lba, Lsn, SimDisk, Volume, VolumeConfig};

#[test]
fn written_blocks_read_back_and_unwritten_read_as_zeros() {
    let (_d, vol) = sim_volume("rw", 64, 256 * 1024);
    let lsn = vol.write(Lba(3), &block(7)).unwrap();
    assert_eq!(lsn, Lsn(1));
    assert_eq!(read_block(&vol, 3), block(7));
    assert_eq!(read_block(&vol, 4), vec![0u8; BS]);
    let mut two = [block(1), block(2)].concat();
    vol.write(Lba(10), &two).unwrap();
    let mut out = vec![0u8; 3 * BS];
    vol.read(Lba(9), &mut out).unwrap();
    assert_eq!(&out[..BS], &vec![0u8; BS][..]);
    assert_eq!(&out[BS..], &two[..]);
    two.clear();
}

#[test]
fn trim_and_write_zeroes_read_as_zeros_also_after_checkpoint() {
    let (_d, vol) = sim_volume("trim", 64, 256 * 1024);
    for l in 0..8 {
        vol.write(Lba(l), &block(l + 100)).unwrap();
    }
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    vol.trim(Lba(1), 2).unwrap();
    vol.write_zeroes(Lba(5), 1).unwrap();
    let check = |when: &str| {
        for l in 0..8 {
            let expect = if (1..3).contains(&l) || l == 5 {
                vec![0u8; BS]
            } else {
                block(l + 100)
            };
            assert_eq!(read_block(&vol, l), expect, "lba {l} {when}");
        }
    };
    check("before checkpoint");
    vol.flush().unwrap();
    assert_eq!(vol.checkpoint().unwrap(), vol.head_lsn());
    check("after checkpoint");
}

#[test]
fn misaligned_or_out_of_range_requests_are_rejected() {
    let (_d, vol) = sim_volume("range", 16, 256 * 1024);
    assert!(matches!(
        vol.write(Lba(0), &[0u8; 100]),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        vol.write(Lba(16), &block(1)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.write(Lba(u64::MAX), &block(1)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.trim(Lba(10), 7),
        Err(Error::OutOfRange { .. })
    ));
    let mut b = vec![0u8; BS];
    assert!(matches!(
        vol.read(Lba(16), &mut b),
        Err(Error::OutOfRange { .. })
    ));
    assert_eq!(vol.head_lsn(), Lsn(0), "rejected requests consume no LSN");
}

#[test]
fn wal_wraps_many_times_and_data_stays_correct() {
    // 64 KiB WAL holds ~15 records of 4 KiB: 600 writes wrap it dozens of times.
    let (_d, vol) = sim_volume("wrap", 32, 64 * 1024);
    let mut model = vec![0u64; 32];
    for i in 1..=600u64 {
        let lba = (i * 7) % 32;
        vol.write(Lba(lba), &block(i)).unwrap();
        model[lba as usize] = i;
        if i % 5 == 0 {
            vol.flush().unwrap();
        }
    }
    for (lba, tag) in model.iter().enumerate() {
        let expect = if *tag == 0 {
            vec![0u8; BS]
        } else {
            block(*tag)
        };
        assert_eq!(read_block(&vol, lba as u64), expect, "lba {lba}");
    }
    assert_eq!(vol.head_lsn(), Lsn(600));
}

#[test]
fn close_and_reopen_keeps_data_and_lsns() {
    let (disk, vol) = sim_volume("reopen", 32, 128 * 1024);
    for i in 0..20u64 {
        vol.write(Lba(i % 32), &block(i + 1)).unwrap();
    }
    vol.close().unwrap();
    let vol = Volume::open(Box::new(disk.clone()), manual_cfg()).unwrap();
    assert_eq!(vol.head_lsn(), Lsn(20));
    assert_eq!(vol.durable_lsn(), Lsn(20));
    assert_eq!(vol.checkpoint_lsn(), Lsn(20));
    for i in 0..20u64 {
        assert_eq!(read_block(&vol, i % 32), block(i + 1));
    }
    assert_eq!(vol.write(Lba(0), &block(99)).unwrap(), Lsn(21));
}

#[test]
fn flushed_writes_survive_power_loss_and_unflushed_may_vanish() {
    let (disk, vol) = sim_volume("crash", 32, 128 * 1024);
    vol.write(Lba(1), &block(1)).unwrap();
    vol.write(Lba(2), &block(2)).unwrap();
    assert_eq!(vol.flush().unwrap(), Lsn(2));
    vol.write(Lba(1), &block(3)).unwrap();
    let after = disk.crash(CrashMode::DropUnsynced, 1);
    drop(vol);
    let vol = Volume::open(Box::new(after), manual_cfg()).unwrap();
    assert_eq!(vol.head_lsn(), Lsn(2));
    assert_eq!(read_block(&vol, 1), block(1));
    assert_eq!(read_block(&vol, 2), block(2));
}

/// A volume reopened after power loss may have lost entries it issued at its persisted
/// epoch (and shipped to replicas); it may serve as primary again only at a newer epoch.
#[test]
fn a_reopened_volume_serves_as_primary_only_above_its_persisted_epoch() {
    let (disk, vol) = sim_volume("term", 32, 128 * 1024);
    assert!(
        vol.may_begin_primary_term(Epoch(0)),
        "created here: no entry was ever issued"
    );
    vol.set_epoch(Epoch(3)).unwrap();
    assert!(vol.may_begin_primary_term(Epoch(3)));
    vol.write(Lba(1), &block(1)).unwrap();
    vol.flush().unwrap();
    vol.write(Lba(2), &block(2)).unwrap();
    let after = disk.crash(CrashMode::DropUnsynced, 1);
    drop(vol);
    let vol = Volume::open(Box::new(after), manual_cfg()).unwrap();
    assert_eq!(
        vol.head_lsn(),
        Lsn(1),
        "LSN 2 is gone and would be issued again"
    );
    assert!(!vol.may_begin_primary_term(Epoch(3)));
    assert!(vol.may_begin_primary_term(Epoch(4)));
    vol.set_epoch(Epoch(4)).unwrap();
    assert!(
        !vol.may_begin_primary_term(Epoch(3)),
        "the rule looks at the epoch found on open"
    );
}

#[test]
fn large_writes_are_split_into_entries_and_read_back() {
    let (_d, vol) = sim_volume("large", 512, 1024 * 1024);
    let data: Vec<u8> = (0..300).flat_map(block).collect();
    let lsn = vol.write(Lba(100), &data).unwrap();
    assert!(
        lsn.0 > 1,
        "a 1.2 MiB write becomes several entries (got {lsn})"
    );
    let mut out = vec![0u8; data.len()];
    vol.read(Lba(100), &mut out).unwrap();
    assert_eq!(out, data);
}

#[test]
fn create_rejects_invalid_geometry_and_config_naming_the_problem() {
    use engine::{CreateOptions, SimDisk, VolumeConfig};
    let bad = [
        (
            CreateOptions {
                block_size: 1000,
                ..small_opts(16, 256 * 1024)
            },
            "block_size",
        ),
        (
            CreateOptions {
                size_bytes: 4097,
                ..small_opts(16, 256 * 1024)
            },
            "volume_size",
        ),
        (
            CreateOptions {
                wal_size_bytes: 4096,
                ..small_opts(16, 256 * 1024)
            },
            "wal_size",
        ),
        (
            CreateOptions {
                block_size: 65536,
                size_bytes: 1 << 20,
                wal_size_bytes: 512 * 1024,
                ..small_opts(16, 0)
            },
            "16 blocks",
        ),
    ];
    for (opts, needle) in bad {
        let err = Volume::create(Box::new(SimDisk::new("bad")), opts, manual_cfg())
            .err()
            .expect("must fail");
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        assert!(
            err.to_string().contains(needle),
            "{err} should mention {needle}"
        );
    }
    let cfg = VolumeConfig {
        wal_soft_watermark_pct: 95,
        wal_hard_watermark_pct: 90,
        ..manual_cfg()
    };
    let err = Volume::create(
        Box::new(SimDisk::new("cfg")),
        small_opts(16, 256 * 1024),
        cfg,
    )
    .err()
    .expect("must fail");
    assert!(err.to_string().contains("wal_soft_watermark_pct"), "{err}");
}

#[test]
fn wal_bytes_after_an_lsn_count_the_later_records_until_they_leave_the_wal() {
    let (_d, vol) = sim_volume_without_history("lagbytes", 64, 256 * 1024);
    assert_eq!(vol.wal_bytes_after(Lsn(0)), Some(0), "empty WAL");
    for l in 0..4 {
        vol.write(Lba(l), &block(l)).unwrap();
    }
    let all = vol
        .wal_bytes_after(Lsn(0))
        .expect("every record is in the WAL");
    let after_two = vol.wal_bytes_after(Lsn(2)).expect("records 3 and 4");
    assert_eq!(
        vol.wal_bytes_after(Lsn(4)),
        Some(0),
        "nothing after the head"
    );
    assert_eq!(vol.wal_bytes_after(Lsn(9)), Some(0), "beyond the head");
    assert!(after_two > 0 && after_two < all, "{after_two} of {all}");
    assert_eq!(
        all,
        vol.stats().wal_used_bytes,
        "the whole WAL is after LSN 0"
    );
    assert!(
        all >= 4 * BS as u64,
        "four one-block records take at least their data"
    );
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    assert_eq!(
        vol.wal_bytes_after(Lsn(0)),
        None,
        "records written back and released are no longer counted"
    );
}

#[test]
fn a_created_volume_file_has_its_wal_allocated_and_its_data_area_sparse() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("v.img");
    let wal = 4u64 << 20;
    let vol = Volume::create_file(&path, small_opts(4096, wal), manual_cfg()).unwrap();
    // Allocated WAL blocks make WAL syncs pure data syncs (no journal commit); the
    // 16 MiB data area stays thin.
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(
        allocated >= wal,
        "only {allocated} of the {wal} WAL bytes allocated"
    );
    assert!(
        allocated < wal + (4 << 20),
        "{allocated} bytes allocated: data area not sparse"
    );
    vol.write(Lba(1), &block(9)).unwrap();
    vol.flush().unwrap();
    assert_eq!(read_block(&vol, 1), block(9));
}

fn history_volume(name: &str, wal: u64, ms: u64, bytes: u64) -> (SimDisk, Volume, VolumeConfig) {
    let cfg = VolumeConfig {
        wal_history_ms: ms,
        wal_history_bytes_max: bytes,
        ..manual_cfg()
    };
    let disk = SimDisk::new(name);
    let vol = Volume::create(Box::new(disk.clone()), small_opts(64, wal), cfg.clone()).unwrap();
    (disk, vol, cfg)
}

/// The WAL history stays behind the checkpoint across a power loss: recovery finds it
/// (readable by `scan_from`, epochs known) but replays only what is past the checkpoint,
/// so every block reads its newest value, also after more writes and another crash.
#[test]
fn wal_history_survives_a_power_loss_and_is_not_replayed_over_newer_data() {
    let (disk, vol, cfg) = history_volume("history", 256 * 1024, 300_000, 1 << 20);
    vol.write(Lba(0), &block(1)).unwrap(); // 1
    vol.write(Lba(1), &block(2)).unwrap(); // 2
    vol.write(Lba(0), &block(3)).unwrap(); // 3
    vol.flush().unwrap();
    assert_eq!(vol.checkpoint().unwrap(), Lsn(3));
    assert_eq!(
        vol.retained_start(),
        Lsn(1),
        "history kept behind the checkpoint"
    );
    drop(vol);
    let disk = disk.crash(CrashMode::DropUnsynced, 1);
    let vol = Volume::open(Box::new(disk.clone()), cfg.clone()).unwrap();
    assert_eq!(
        (vol.head_lsn(), vol.checkpoint_lsn(), vol.retained_start()),
        (Lsn(3), Lsn(3), Lsn(1))
    );
    assert_eq!(vol.scan_from(Lsn(1), 10).unwrap().len(), 3);
    assert_eq!(vol.entry_epoch(Lsn(1)), vol.entry_epoch(Lsn(3)));
    assert!(read_block(&vol, 0) == block(3), "LBA 0 reads history");
    assert!(read_block(&vol, 1) == block(2), "LBA 1");
    vol.write(Lba(1), &block(4)).unwrap(); // 4
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    drop(vol);
    let vol = Volume::open(Box::new(disk.crash(CrashMode::DropUnsynced, 2)), cfg).unwrap();
    assert_eq!((vol.head_lsn(), vol.retained_start()), (Lsn(4), Lsn(1)));
    assert!(read_block(&vol, 0) == block(3), "LBA 0 reads history");
    assert!(read_block(&vol, 1) == block(4), "LBA 1 reads history");
}

/// History is bounded by its time and byte budgets.
#[test]
fn wal_history_is_bounded_by_time_and_bytes() {
    let (_d, vol, _) = history_volume("bytes", 256 * 1024, 300_000, 3 * 4400);
    for i in 0..10u64 {
        vol.write(Lba(i), &block(i)).unwrap();
    }
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    let kept = vol.head_lsn().0 + 1 - vol.retained_start().0;
    assert!((1..=3).contains(&kept), "{kept} entries kept");
    assert!(vol.stats().wal_used_bytes <= 3 * 4400);

    let (_d, vol, _) = history_volume("time", 256 * 1024, 30, 1 << 20);
    for i in 0..10u64 {
        vol.write(Lba(i), &block(i)).unwrap();
    }
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    assert_eq!(vol.retained_start(), Lsn(1), "young history is kept");
    // Ageing past the budget is the behaviour under test.
    std::thread::sleep(std::time::Duration::from_millis(40));
    vol.checkpoint().unwrap();
    vol.checkpoint().unwrap();
    assert_eq!(vol.retained_start(), Lsn(11), "old history is freed");
}

/// A volume with no floor (a replica) writing far more than its WAL: history never makes
/// a writer wait; it stays at most half the soft watermark.
#[test]
fn wal_history_never_holds_writers_back() {
    let wal = 128 * 1024;
    let cfg = VolumeConfig {
        wal_full_timeout_ms: 300,
        ..manual_cfg()
    };
    let vol = Volume::create(Box::new(SimDisk::new("pressure")), small_opts(64, wal), cfg).unwrap();
    let big: Vec<u8> = (0..3).flat_map(block).collect();
    for i in 0..400u64 {
        let start = std::time::Instant::now();
        if i % 5 == 0 {
            vol.write(Lba(i % 60), &big).unwrap();
        } else {
            vol.write(Lba(i % 64), &block(i)).unwrap();
        }
        assert!(
            start.elapsed() < std::time::Duration::from_millis(300),
            "write {i} waited for space"
        );
    }
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    assert!(vol.retained_start() < vol.head_lsn(), "history kept");
    assert!(vol.stats().wal_used_bytes <= wal * 70 / 100 / 2);
}
