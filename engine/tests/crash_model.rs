//! Property test: random write/trim/zero/flush/checkpoint/fault/crash sequences on a
//! SimDisk, checked against a model. After every power loss the reopened volume must
//! equal the model as of some LSN R with (last acknowledged flush) <= R <= (last
//! issued LSN): a prefix of the log, so every flushed entry is there and no block is
//! torn or mixed from a later write. The model keeps the whole log across crashes, so a
//! later truncation may go below the recovered head (as a rejoining old primary's does),
//! including after a crash inside a flusher cycle left the extent ahead of the
//! checkpoint: the truncated writes must never be read again.

mod common;

use common::*;
use engine::{CrashMode, FaultPlan, Lba, Lsn, SimDisk, Volume, VolumeConfig};
use proptest::prelude::*;

const BLOCKS: u64 = 32;
const WAL: u64 = 128 * 1024;

#[derive(Clone, Debug)]
enum Op {
    Write {
        lba: u64,
        blocks: u64,
        tag: u64,
    },
    Trim {
        lba: u64,
        blocks: u64,
    },
    Zero {
        lba: u64,
        blocks: u64,
    },
    Flush,
    WriteFua {
        lba: u64,
        tag: u64,
    },
    Checkpoint,
    Faults {
        writes: Option<u64>,
        syncs: Option<u64>,
    },
    Crash {
        mode: u8,
        seed: u64,
    },
    /// Retention floor `back` entries behind the head (None: remove it).
    Floor {
        back: Option<u64>,
    },
    /// truncate_after(head - back).
    Truncate {
        back: u64,
    },
    /// scan_from(retained_start) must return the model's log entries.
    Scan,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..BLOCKS).prop_flat_map(|lba| (Just(lba), 1..=(BLOCKS - lba).min(4)));
    prop_oneof![
        8 => (range.clone(), any::<u64>()).prop_map(|((lba, blocks), tag)| Op::Write { lba, blocks, tag: tag | 1 }),
        1 => range.clone().prop_map(|(lba, blocks)| Op::Trim { lba, blocks }),
        1 => range.prop_map(|(lba, blocks)| Op::Zero { lba, blocks }),
        2 => Just(Op::Flush),
        1 => (0..BLOCKS, any::<u64>()).prop_map(|(lba, tag)| Op::WriteFua { lba, tag: tag | 1 }),
        1 => Just(Op::Checkpoint),
        1 => (proptest::option::of(0u64..40), proptest::option::of(0u64..6))
            .prop_map(|(writes, syncs)| Op::Faults { writes, syncs }),
        2 => (0u8..3, any::<u64>()).prop_map(|(mode, seed)| Op::Crash { mode, seed }),
        1 => proptest::option::of(0u64..20).prop_map(|back| Op::Floor { back }),
        1 => (0u64..6).prop_map(|back| Op::Truncate { back }),
        1 => Just(Op::Scan),
    ]
}

fn cfg() -> VolumeConfig {
    VolumeConfig {
        // A pinned WAL (retention floor) makes writers fail with WalFull; keep it quick.
        wal_full_timeout_ms: 300,
        ..manual_cfg()
    }
}

/// Per-block content tags (0 = zeros); block i of a write tagged t has tag t + i.
type Blocks = Vec<u64>;

struct Model {
    base: Blocks,
    base_lsn: u64,
    /// Effects of LSN base_lsn+1.. in order: (lba, blocks, tag or 0 for zeros).
    log: Vec<(u64, u64, u64)>,
    acked: u64,
}

impl Model {
    fn at(&self, lsn: u64) -> Blocks {
        let mut b = self.base.clone();
        for &(lba, n, tag) in &self.log[..(lsn - self.base_lsn) as usize] {
            for i in 0..n {
                b[(lba + i) as usize] = if tag == 0 { 0 } else { tag.wrapping_add(i) };
            }
        }
        b
    }
    fn head(&self) -> u64 {
        self.base_lsn + self.log.len() as u64
    }
}

fn expect_block(tag: u64) -> Vec<u8> {
    if tag == 0 { vec![0u8; BS] } else { block(tag) }
}

fn check_volume(vol: &Volume, want: &Blocks, when: &str) -> Result<(), TestCaseError> {
    for lba in 0..BLOCKS {
        let got = read_block(vol, lba);
        prop_assert!(
            got == expect_block(want[lba as usize]),
            "{when}: block {lba} differs from the model (want tag {})",
            want[lba as usize]
        );
    }
    Ok(())
}

/// Like `check_volume`, for a live volume that may have failed (fail-stop) because of an
/// injected error; a failed volume refuses reads, which is checked instead.
fn check_live(vol: &Volume, want: &Blocks, when: &str) -> Result<(), TestCaseError> {
    for lba in 0..BLOCKS {
        let mut got = vec![0u8; BS];
        match vol.read(Lba(lba), &mut got) {
            // Failed meanwhile (the background flusher hit an injected error).
            Err(engine::Error::Failed { .. }) => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("{when}: read {lba}: {e}"))),
            Ok(()) => prop_assert!(
                got == expect_block(want[lba as usize]),
                "{when}: block {lba} differs from the model (want tag {})",
                want[lba as usize]
            ),
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut disk = SimDisk::new("model");
    let mut vol =
        Some(Volume::create(Box::new(disk.clone()), small_opts(BLOCKS, WAL), cfg()).unwrap());
    let mut m = Model {
        base: vec![0; BLOCKS as usize],
        base_lsn: 0,
        log: vec![],
        acked: 0,
    };
    let crash = |disk: &mut SimDisk,
                 vol: &mut Option<Volume>,
                 m: &mut Model,
                 mode: u8,
                 seed: u64|
     -> Result<(), TestCaseError> {
        let mode = [
            CrashMode::DropUnsynced,
            CrashMode::TearLast,
            CrashMode::Random,
        ][mode as usize % 3];
        let after = disk.crash(mode, seed);
        drop(vol.take());
        *disk = after;
        let v = Volume::open(Box::new(disk.clone()), cfg())
            .map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?;
        let r = v.head_lsn().0;
        prop_assert!(
            r >= m.acked,
            "recovered head {} lost acknowledged flush {}",
            r,
            m.acked
        );
        prop_assert!(
            r <= m.head(),
            "recovered head {} beyond last issued {}",
            r,
            m.head()
        );
        prop_assert_eq!(v.durable_lsn().0, r);
        let want = m.at(r);
        check_volume(
            &v,
            &want,
            &format!("after crash ({mode:?}, seed {seed}) at LSN {r}"),
        )?;
        // Keep the log up to R: a truncation may later cut below R.
        m.log.truncate((r - m.base_lsn) as usize);
        m.acked = r;
        *vol = Some(v);
        Ok(())
    };
    for op in ops {
        let v = vol.as_ref().unwrap();
        let expected = Lsn(m.head() + 1);
        match op {
            Op::Write { lba, blocks, tag } => {
                let data: Vec<u8> = (0..blocks)
                    .flat_map(|i| block(tag.wrapping_add(i)))
                    .collect();
                if let Ok(lsn) = v.write(Lba(lba), &data) {
                    prop_assert_eq!(lsn, expected);
                    m.log.push((lba, blocks, tag));
                } else {
                    prop_assert_eq!(
                        v.head_lsn(),
                        Lsn(m.head()),
                        "a failed write consumed an LSN"
                    );
                }
            }
            Op::WriteFua { lba, tag } => match v.write_fua(Lba(lba), &block(tag)) {
                Ok(lsn) => {
                    prop_assert_eq!(lsn, expected);
                    m.log.push((lba, 1, tag));
                    m.acked = lsn.0;
                }
                Err(_) => {
                    // The write may have been appended before the sync failed.
                    if v.head_lsn() == expected {
                        m.log.push((lba, 1, tag));
                    }
                }
            },
            Op::Trim { lba, blocks } | Op::Zero { lba, blocks } => {
                let r = if matches!(op, Op::Trim { .. }) {
                    v.trim(Lba(lba), blocks)
                } else {
                    v.write_zeroes(Lba(lba), blocks)
                };
                if let Ok(lsn) = r {
                    prop_assert_eq!(lsn, expected);
                    m.log.push((lba, blocks, 0));
                }
            }
            Op::Flush => {
                if let Ok(d) = v.flush() {
                    prop_assert_eq!(d.0, m.head(), "flush must cover every append before it");
                    m.acked = d.0;
                }
            }
            Op::Checkpoint => {
                if v.checkpoint().is_ok() {
                    prop_assert!(v.checkpoint_lsn().0 <= v.durable_lsn().0);
                    check_live(v, &m.at(m.head()), "after checkpoint")?;
                }
            }
            Op::Faults { writes, syncs } => {
                disk.set_faults(FaultPlan {
                    fail_writes_after: writes,
                    fail_syncs_after: syncs,
                    fail_reads_after: None,
                });
            }
            Op::Crash { mode, seed } => crash(&mut disk, &mut vol, &mut m, mode, seed)?,
            Op::Floor { back } => {
                v.set_retention_floor(back.map(|b| Lsn(m.head().saturating_sub(b).max(1))));
            }
            Op::Truncate { back } => {
                let target = m.head().saturating_sub(back).max(m.base_lsn);
                let checkpoint = v.checkpoint_lsn().0;
                match v.truncate_after(Lsn(target)) {
                    Ok(()) => {
                        prop_assert!(target >= checkpoint || target >= m.head());
                        prop_assert_eq!(v.head_lsn(), Lsn(target.min(m.head())));
                        if target < m.head() {
                            m.log.truncate((target - m.base_lsn) as usize);
                            m.acked = m.acked.min(target);
                        }
                        check_live(v, &m.at(m.head()), "after truncate")?;
                    }
                    Err(engine::Error::TruncationUnsafe { .. }) => {
                        // The background flusher may have moved the checkpoint meanwhile.
                        prop_assert!(target < v.checkpoint_lsn().0)
                    }
                    Err(engine::Error::TruncationNeedsRebuild { copied, .. }) => {
                        // A crashed flusher cycle copied entries past the target and the
                        // WAL cannot restore what they overwrote: nothing may change.
                        prop_assert!(target < copied.0);
                        prop_assert_eq!(v.head_lsn(), Lsn(m.head()));
                        check_live(v, &m.at(m.head()), "after a refused truncation")?;
                    }
                    Err(_) => {
                        // An I/O error mid-truncation may or may not have cut the log on
                        // disk; either outcome is a prefix the model accepts.
                        prop_assert_eq!(
                            v.head_lsn(),
                            Lsn(m.head()),
                            "failed truncation changed the head"
                        );
                        m.acked = m.acked.min(target);
                    }
                }
            }
            Op::Scan => {
                let start = v.retained_start().0.max(m.base_lsn + 1);
                if let Ok(entries) = v.scan_from(Lsn(start), 1000) {
                    prop_assert_eq!(entries.len() as u64, m.head() + 1 - start);
                    for e in entries {
                        let (lba, n, tag) = m.log[(e.lsn.0 - m.base_lsn - 1) as usize];
                        prop_assert_eq!((e.lba.0, u64::from(e.blocks)), (lba, n));
                        let data: Vec<u8> = if tag == 0 {
                            vec![]
                        } else {
                            (0..n).flat_map(|i| block(tag.wrapping_add(i))).collect()
                        };
                        prop_assert!(e.data == data, "scan_from LSN {} data differs", e.lsn);
                    }
                }
            }
        }
    }
    crash(&mut disk, &mut vol, &mut m, 1, 7)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::WithSource("regressions"))),
        .. ProptestConfig::default()
    })]

    #[test]
    fn volume_after_any_crash_equals_a_log_prefix_containing_every_flush(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}

/// Offset of the extent on a volume's disk, from its newest valid superblock.
fn extent_offset(disk: &SimDisk) -> u64 {
    let (a, b) = (disk.peek(0, 4096), disk.peek(4096, 4096));
    engine::storage::superblock::choose("test", &a, &b)
        .unwrap()
        .extent_offset
}

/// A crash inside a flusher cycle (the extent already holds (checkpoint, h] copied and
/// synced, the superblock still says the old checkpoint), then a truncation below h, as a
/// killed primary that rejoins behind the new primary gets. LSN 1 writes LBA `first`
/// (5, or 9 itself), LSN 2 LBA 7, LSN 3 LBA 9; the checkpoint is at 1. Every write count
/// at which the next cycle can fail is tried; after the crash and `truncate_after(2)` LBA
/// 9 must read what LSN 1 left there (zeros, or LSN 1's data), never LSN 3's, also after
/// one more crash. With the WAL retaining the whole history (the WAL history keeps LSN 1
/// behind the checkpoint) the truncation must succeed; without it, refusing (the replica
/// is rebuilt) is the only other answer.
#[test]
fn truncation_after_a_crash_inside_a_flusher_cycle_never_resurrects_dropped_writes() {
    for (history, first) in [(true, 5u64), (true, 9), (false, 5), (false, 9)] {
        let case = format!("history {history}, LSN 1 writes LBA {first}");
        let vcfg = VolumeConfig {
            wal_history_ms: if history { cfg().wal_history_ms } else { 0 },
            ..cfg()
        };
        let mut copied_ahead = 0;
        for fail_after in 0..16u64 {
            let disk = SimDisk::new("cycle-crash");
            let vol =
                Volume::create(Box::new(disk.clone()), small_opts(16, WAL), vcfg.clone()).unwrap();
            vol.write(Lba(first), &block(100 + first)).unwrap();
            vol.flush().unwrap();
            vol.checkpoint().unwrap();
            assert_eq!(vol.checkpoint_lsn(), Lsn(1));
            let start = if history { Lsn(1) } else { Lsn(2) };
            assert_eq!(vol.retained_start(), start, "{case}: retained start");
            vol.write(Lba(7), &block(7)).unwrap();
            vol.write(Lba(9), &block(9)).unwrap();
            vol.flush().unwrap();
            disk.set_faults(FaultPlan {
                fail_writes_after: Some(fail_after),
                ..FaultPlan::default()
            });
            let _ = vol.checkpoint();
            let after = disk.crash(CrashMode::DropUnsynced, fail_after);
            drop(vol);
            let v = Volume::open(Box::new(after.clone()), vcfg.clone()).unwrap();
            assert_eq!(v.head_lsn(), Lsn(3), "{case}: flushed entries lost");
            if v.checkpoint_lsn() != Lsn(1) {
                continue; // the cycle completed
            }
            let ext = extent_offset(&after);
            if after.peek(ext + 9 * BS as u64, BS) == block(9) {
                copied_ahead += 1;
            }
            let want9 = if first == 9 {
                block(109)
            } else {
                vec![0u8; BS]
            };
            match v.truncate_after(Lsn(2)) {
                Ok(()) => {
                    let check = |v: &Volume, when: &str| {
                        assert_eq!(v.head_lsn(), Lsn(2), "{case}, {when}");
                        assert!(
                            read_block(v, 9) == want9,
                            "{case}, {when}: LBA 9 reads a truncated write (cycle failed after {fail_after} writes)"
                        );
                        assert!(read_block(v, 7) == block(7), "{case}, {when}: LBA 7");
                        assert!(
                            read_block(v, first) == block(100 + first),
                            "{case}, {when}: LBA {first}"
                        );
                    };
                    check(&v, "after truncation");
                    let again = after.crash(CrashMode::DropUnsynced, 1);
                    drop(v);
                    let v = Volume::open(Box::new(again), vcfg.clone()).unwrap();
                    check(&v, "after truncation and another crash");
                    v.checkpoint().unwrap();
                    check(&v, "after the next checkpoint");
                }
                Err(engine::Error::TruncationNeedsRebuild { .. }) => {
                    assert!(
                        !history,
                        "{case}: the WAL holds the whole history, yet the truncation was refused"
                    );
                    assert_eq!(
                        v.head_lsn(),
                        Lsn(3),
                        "{case}: a refused truncation changed the head"
                    );
                    assert!(
                        read_block(&v, 9) == block(9),
                        "{case}: a refused truncation changed LBA 9"
                    );
                }
                Err(e) => panic!("{case}: truncate_after(2): {e}"),
            }
        }
        assert!(
            copied_ahead > 0,
            "{case}: no fault point left the extent ahead of the checkpoint"
        );
    }
}
