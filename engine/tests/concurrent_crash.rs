//! Power loss while several writers, flushers and the background flusher run at once.
//! The append observer records the log in LSN order; after the crash the reopened
//! volume must equal that log's prefix up to the recovered head, and the head must
//! cover every flush that returned. Rounds default to 12 (BLOCKVOL_CONCURRENT_ROUNDS).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::rng::Rng;
use common::*;
use engine::{CrashMode, EntryKind, Lba, SimDisk, Volume, VolumeConfig, WalEntry};

const BLOCKS: u64 = 48;

fn cfg() -> VolumeConfig {
    VolumeConfig {
        flush_interval_ms: 1,
        wal_full_timeout_ms: 5_000,
        wal_soft_watermark_pct: 30,
        ..VolumeConfig::default()
    }
}

#[test]
fn power_loss_under_concurrent_writers_and_flusher_keeps_a_log_prefix_with_every_flush() {
    let rounds = env_u64("BLOCKVOL_CONCURRENT_ROUNDS", 12);
    let mut rng = Rng(seed("power_loss_under_concurrent_writers"));
    for round in 0..rounds {
        let disk = SimDisk::new("concurrent");
        let vol = Arc::new(
            Volume::create(Box::new(disk.clone()), small_opts(BLOCKS, 96 * 1024), cfg()).unwrap(),
        );
        let log: Arc<Mutex<Vec<WalEntry>>> = Arc::new(Mutex::new(Vec::new()));
        let l2 = log.clone();
        vol.set_append_observer(Some(Arc::new(move |e: &WalEntry| {
            l2.lock().unwrap().push(e.clone())
        })));
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let (vol, acked, stop) = (vol.clone(), acked.clone(), stop.clone());
                let mut r = Rng(rng.next());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let lba = r.below(BLOCKS);
                        let res = match r.below(10) {
                            0 => vol.trim(Lba(lba), 1).map(|_| ()),
                            1 => vol.flush().map(|d| {
                                acked.fetch_max(d.0, Ordering::SeqCst);
                            }),
                            2 => vol.write_fua(Lba(lba), &block(t << 40 | i)).map(|l| {
                                acked.fetch_max(l.0, Ordering::SeqCst);
                            }),
                            _ => vol.write(Lba(lba), &block(t << 40 | i)).map(|_| ()),
                        };
                        if res.is_err() {
                            break; // the disk lost power
                        }
                    }
                })
            })
            .collect();
        // Crash once enough has been acknowledged (bounded wait).
        let want = 20 + rng.below(200);
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.load(Ordering::SeqCst) < want && Instant::now() < deadline {
            std::thread::yield_now();
        }
        let mode = [
            CrashMode::DropUnsynced,
            CrashMode::TearLast,
            CrashMode::Random,
        ][rng.below(3) as usize];
        let after = disk.crash(mode, rng.next());
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        // Every flush that returned Ok synced before the power went (a sync on the
        // dead disk fails), so all of them must survive.
        let acked_final = acked.load(Ordering::SeqCst);
        drop(vol);
        let log = log.lock().unwrap().clone();
        let reopened = Volume::open(Box::new(after), cfg()).unwrap();
        let r = reopened.head_lsn().0;
        assert!(
            r >= acked_final,
            "round {round}: head {r} lost acknowledged flush {acked_final}"
        );
        assert!(
            r <= log.len() as u64,
            "round {round}: head {r} beyond the log"
        );
        let mut model = vec![vec![0u8; BS]; BLOCKS as usize];
        for (i, e) in log.iter().take(r as usize).enumerate() {
            assert_eq!(e.lsn.0, i as u64 + 1, "observer saw LSNs out of order");
            for b in 0..u64::from(e.blocks) {
                model[(e.lba.0 + b) as usize] = match e.kind {
                    EntryKind::Write => e.data[(b as usize) * BS..(b as usize + 1) * BS].to_vec(),
                    _ => vec![0u8; BS],
                };
            }
        }
        for lba in 0..BLOCKS {
            assert!(
                read_block(&reopened, lba) == model[lba as usize],
                "round {round} ({mode:?}): block {lba} is not the log prefix at {r}"
            );
        }
    }
}
