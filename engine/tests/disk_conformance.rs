//! One contract, every `Disk` implementation: reads see completed writes, new bytes
//! read as zeros, ranges past the end fail, and SimDisk's power loss keeps exactly the
//! synced writes (plus, per mode, whole-sector parts of unsynced ones).

use engine::disk::SECTOR_SIZE;
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
