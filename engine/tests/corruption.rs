//! Damaged bytes on disk: a corrupt WAL record ends the log there; a corrupt superblock
//! copy falls back to the other; two corrupt copies fail to open with the file named.

mod common;

use common::*;
use engine::storage::superblock::{SUPERBLOCK_SLOT_SIZE, Superblock, WAL_OFFSET};
use engine::storage::wal::RECORD_OVERHEAD;
use engine::{Error, Lba, Lsn, Volume};

const RECORD_4K: u64 = (RECORD_OVERHEAD + BS) as u64;

fn newest_slot(disk: &engine::SimDisk) -> u64 {
    let a = Superblock::decode(&disk.peek(0, 4096)).unwrap();
    let b = Superblock::decode(&disk.peek(SUPERBLOCK_SLOT_SIZE, 4096)).unwrap();
    if b.seq > a.seq { 1 } else { 0 }
}

#[test]
fn flipped_bit_in_wal_record_drops_it_and_everything_after() {
    let (disk, vol) = sim_volume("walbit", 32, 256 * 1024);
    for i in 1..=10u64 {
        vol.write(Lba(i), &block(i)).unwrap();
    }
    vol.flush().unwrap();
    drop(vol); // no checkpoint: everything is only in the WAL
    // Record of LSN 5 starts at WAL_OFFSET + 4 * RECORD_4K; flip a bit in its data.
    let at = WAL_OFFSET + 4 * RECORD_4K + 200;
    let byte = disk.peek(at, 1)[0];
    disk.corrupt(at, &[byte ^ 0x04]);
    let vol = Volume::open(Box::new(disk.clone()), manual_cfg()).unwrap();
    assert_eq!(vol.head_lsn(), Lsn(4));
    for i in 1..=10u64 {
        let want = if i <= 4 { block(i) } else { vec![0u8; BS] };
        assert_eq!(read_block(&vol, i), want, "lba {i}");
    }
    // New appends reuse LSN 5 onward; the stale records 6..10 never come back.
    assert_eq!(vol.write(Lba(20), &block(500)).unwrap(), Lsn(5));
    vol.flush().unwrap();
    drop(vol);
    let vol = Volume::open(Box::new(disk.clone()), manual_cfg()).unwrap();
    assert_eq!(vol.head_lsn(), Lsn(5));
    assert_eq!(read_block(&vol, 20), block(500));
    for i in 5..=10u64 {
        assert_eq!(
            read_block(&vol, i),
            vec![0u8; BS],
            "stale lba {i} resurrected"
        );
    }
}

#[test]
fn corrupt_newest_superblock_copy_falls_back_to_the_older_one() {
    let (disk, vol) = sim_volume("sbfall", 32, 256 * 1024);
    for i in 0..10u64 {
        vol.write(Lba(i), &block(i + 1)).unwrap();
    }
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    for i in 10..15u64 {
        vol.write(Lba(i), &block(i + 1)).unwrap();
    }
    vol.flush().unwrap();
    drop(vol);
    let slot = newest_slot(&disk);
    disk.corrupt(slot * SUPERBLOCK_SLOT_SIZE + 30, &[0xFF, 0x00, 0xAA]);
    let vol = Volume::open(Box::new(disk.clone()), manual_cfg()).unwrap();
    assert_eq!(vol.head_lsn(), Lsn(15));
    for i in 0..15u64 {
        assert_eq!(read_block(&vol, i), block(i + 1), "lba {i}");
    }
}

#[test]
fn corrupt_older_superblock_copy_is_ignored() {
    let (disk, vol) = sim_volume("sbold", 32, 256 * 1024);
    vol.write(Lba(0), &block(1)).unwrap();
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    drop(vol);
    let older = 1 - newest_slot(&disk);
    disk.corrupt(older * SUPERBLOCK_SLOT_SIZE, b"garbage!");
    let vol = Volume::open(Box::new(disk.clone()), manual_cfg()).unwrap();
    assert_eq!(vol.checkpoint_lsn(), Lsn(1));
    assert_eq!(read_block(&vol, 0), block(1));
}

#[test]
fn both_superblock_copies_corrupt_fails_open_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    let vol = Volume::create_file(&path, small_opts(16, 256 * 1024), manual_cfg()).unwrap();
    vol.write(Lba(0), &block(1)).unwrap();
    vol.close().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x55; 16], 20).unwrap();
        f.write_all_at(&[0x55; 16], SUPERBLOCK_SLOT_SIZE + 20)
            .unwrap();
    }
    let err = match Volume::open_file(&path, manual_cfg()) {
        Ok(_) => panic!("open must fail with both superblock copies corrupt"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::NoValidSuperblock { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("checksum"), "{msg}");
}

#[test]
fn file_that_is_not_a_volume_fails_open_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zeros.img");
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    let err = Volume::open_file(&path, manual_cfg())
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("bad magic"), "{err}");
}
