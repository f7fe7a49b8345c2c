//! One contract, every `Disk` implementation: reads see completed writes, new bytes
//! read as zeros, ranges past the end fail, and SimDisk's power loss keeps exactly the
//! synced writes (plus, per mode, whole-sector parts of unsynced ones).

use engine::storage::disk::SECTOR_SIZE;
use engine::{CrashMode, Disk, FaultPlan, FileDisk, SimDisk};

fn conformance(disk: &dyn Disk) {
    assert_eq!(disk.len().unwrap(), 0);
    disk.set_len(16 * 1024).unwrap();
    assert_eq!(disk.len().unwrap(), 16 * 1024);
    let mut b = vec![1u8; 4096];
    disk.read_at(&mut b, 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0), "new bytes read as zeros");
    disk.write_at(&[7u8; 1000], 100).unwrap();
    let mut r = vec![0u8; 1100];
    disk.read_at(&mut r, 0).unwrap();
    assert!(r[..100].iter().all(|&x| x == 0));
    assert!(r[100..].iter().all(|&x| x == 7));
    disk.sync().unwrap();
    assert!(
        disk.read_at(&mut [0u8; 10], 16 * 1024 - 5).is_err(),
        "read past end"
    );
    assert!(
        disk.write_at(&[0u8; 10], 16 * 1024 - 5).is_err(),
        "write past end"
    );
    disk.set_len(32 * 1024).unwrap();
    disk.read_at(&mut r, 0).unwrap();
    assert!(r[100..].iter().all(|&x| x == 7), "growing keeps data");
    assert!(!disk.describe().is_empty());
    // write_zeroes zeroes exactly its range (files punch a hole).
    disk.write_at(&[5u8; 12288], 4096).unwrap();
    disk.write_zeroes(8192, 4096).unwrap();
    let mut z = vec![1u8; 12288];
    disk.read_at(&mut z, 4096).unwrap();
    assert!(z[..4096].iter().all(|&x| x == 5));
    assert!(z[4096..8192].iter().all(|&x| x == 0));
    assert!(z[8192..].iter().all(|&x| x == 5));
    assert!(
        disk.write_zeroes(32 * 1024 - 10, 20).is_err(),
        "zeroes past end"
    );
    // next_data: every byte it does not report reads as zeros, and it reports every
    // byte written (a disk that cannot tell reports everything).
    let len = disk.len().unwrap();
    let mut all = vec![1u8; len as usize];
    disk.read_at(&mut all, 0).unwrap();
    let mut reported = vec![false; len as usize];
    let mut at = 0;
    while let Some((a, b)) = disk.next_data(at, len).unwrap() {
        assert!(
            at <= a && a < b && b <= len,
            "run {a}..{b} outside {at}..{len}"
        );
        reported[a as usize..b as usize].fill(true);
        at = b;
    }
    for (i, (&byte, &data)) in all.iter().zip(&reported).enumerate() {
        assert!(
            data || byte == 0,
            "byte {i} holds {byte} but lies in no data run"
        );
    }
    assert_eq!(disk.next_data(len, len).unwrap(), None);
}

#[test]
fn file_disk_reports_only_written_regions_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let disk = FileDisk::create(&dir.path().join("sparse.img")).unwrap();
    disk.set_len(1 << 20).unwrap();
    assert_eq!(
        disk.next_data(0, 1 << 20).unwrap(),
        None,
        "a new file is a hole"
    );
    disk.write_at(&[9u8; 4096], 256 * 1024).unwrap();
    let (a, b) = disk
        .next_data(0, 1 << 20)
        .unwrap()
        .expect("the written block");
    assert!(a <= 256 * 1024 && b >= 260 * 1024, "run {a}..{b}");
    assert!(
        b - a < 512 * 1024,
        "a run of {} bytes for one written block",
        b - a
    );
    assert_eq!(disk.next_data(b, 1 << 20).unwrap(), None);
}

#[test]
fn file_disk_meets_the_disk_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    let disk = FileDisk::create(&path).unwrap();
    conformance(&disk);
    assert!(disk.describe().contains("d.img"));
}

#[test]
fn trimming_a_whole_file_volume_deallocates_instead_of_writing_zeros() {
    use engine::{CreateOptions, Lba, Volume, VolumeConfig};
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.img");
    let opts = CreateOptions {
        size_bytes: 256 << 20,
        block_size: 4096,
        wal_size_bytes: 1 << 20,
        ..CreateOptions::default()
    };
    let vol = Volume::create_file(&path, opts, VolumeConfig::default()).unwrap();
    let data = vec![0xEEu8; 8 << 20];
    for i in 0..4u64 {
        vol.write(Lba(i * 2048), &data).unwrap();
    }
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(before >= 32 << 20, "data allocated ({before} bytes)");
    vol.trim(Lba(0), (256 << 20) / 4096).unwrap();
    vol.flush().unwrap();
    vol.checkpoint().unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(after < 8 << 20, "trim left {after} bytes allocated");
    let mut b = vec![1u8; 4096];
    vol.read(Lba(100), &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn a_volume_file_cannot_be_opened_twice_at_once() {
    use engine::{Error, Volume, VolumeConfig};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.img");
    let opts = engine::CreateOptions {
        size_bytes: 1 << 20,
        wal_size_bytes: 256 * 1024,
        ..engine::CreateOptions::default()
    };
    let vol = Volume::create_file(&path, opts, VolumeConfig::default()).unwrap();
    let err = Volume::open_file(&path, VolumeConfig::default())
        .err()
        .expect("second open must fail");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(vol);
    Volume::open_file(&path, VolumeConfig::default()).unwrap();
}

#[test]
fn sim_disk_meets_the_disk_contract() {
    conformance(&SimDisk::new("conf"));
}

#[test]
fn sim_disk_power_loss_keeps_synced_writes_and_drops_unsynced_ones() {
    let d = SimDisk::new("pl");
    d.set_len(8192).unwrap();
    d.write_at(&[1u8; 4096], 0).unwrap();
    d.sync().unwrap();
    d.write_at(&[2u8; 4096], 4096).unwrap();
    let after = d.crash(CrashMode::DropUnsynced, 1);
    assert!(
        d.read_at(&mut [0u8; 1], 0).is_err(),
        "the old handle is dead"
    );
    assert_eq!(after.peek(0, 4096), vec![1u8; 4096]);
    assert_eq!(after.peek(4096, 4096), vec![0u8; 4096]);
}

#[test]
fn sim_disk_torn_write_keeps_whole_sectors_from_the_start() {
    for seed in 0..50 {
        let d = SimDisk::new("tear");
        d.set_len(8192).unwrap();
        d.write_at(&[9u8; 4096], 0).unwrap();
        let after = d.crash(CrashMode::TearLast, seed);
        let img = after.peek(0, 4096);
        let kept = img.iter().take_while(|&&x| x == 9).count();
        assert_eq!(
            kept as u64 % SECTOR_SIZE,
            0,
            "seed {seed}: cut inside a sector"
        );
        assert!(
            img[kept..].iter().all(|&x| x == 0),
            "seed {seed}: not a prefix"
        );
    }
}

#[test]
fn sim_disk_injects_errors_after_the_configured_count() {
    let d = SimDisk::new("faults");
    d.set_len(4096).unwrap();
    d.set_faults(FaultPlan {
        fail_writes_after: Some(2),
        fail_syncs_after: Some(1),
        fail_reads_after: Some(3),
    });
    assert!(d.write_at(&[1], 0).is_ok());
    assert!(d.write_at(&[1], 1).is_ok());
    assert!(d.write_at(&[1], 2).is_err());
    assert!(d.sync().is_ok());
    assert!(d.sync().is_err());
    let mut b = [0u8; 1];
    for _ in 0..3 {
        d.read_at(&mut b, 0).unwrap();
    }
    assert!(d.read_at(&mut b, 0).is_err());
}
