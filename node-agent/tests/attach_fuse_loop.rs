//! End to end through a real block device: NBD server → nbdfuse → loop device → ext4.
//! Needs root, FUSE, loop devices, nbdfuse, losetup, mkfs.ext4 (all present in CI).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestServer, path_str, read_backend, run, run_ok, wait_until};
use node_agent::attach::{Attacher, Error, FuseLoopAttacher, FuseLoopConfig};

/// Best-effort cleanup of everything the test may have left behind, in teardown
/// order, even when an assertion failed half-way.
struct Cleanup {
    mounts: Vec<PathBuf>,
    state_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = std::process::Command::new("umount").arg(m).output();
        }
        // Detach whatever is still attached under our state dir (a fresh attacher
        // finds leftovers through /sys and /proc).
        if let Ok(a) = FuseLoopAttacher::new(FuseLoopConfig::new(&self.state_dir))
            && let Ok(entries) = std::fs::read_dir(&self.state_dir)
        {
            for e in entries.flatten() {
                let _ = a.detach(&e.file_name().to_string_lossy());
            }
        }
    }
}

fn nbdfuse_running_for(mount_dir: &Path) -> bool {
    let needle = mount_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries.flatten().any(|e| {
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                let zombie = stat
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
                cmd.starts_with("nbdfuse") && cmd.contains(&needle) && !zombie
            })
        })
        .unwrap_or(false)
}

fn loop_backing_files() -> Vec<String> {
    std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ext4_on_attached_volume_survives_detach_restart_and_reattach() {
    let size = 64u64 << 20;
    let (s, backend) = TestServer::with_mem_export("vol-fs", size, 4096);
    let state_dir = s.dir.path().join("attach-state");
    let mnt = s.dir.path().join("fs");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let _cleanup = Cleanup {
        mounts: vec![mnt.clone()],
        state_dir: state_dir.clone(),
    };
    let mount_dir = state_dir.join("vol-fs/mnt");

    let a = FuseLoopAttacher::new(FuseLoopConfig::new(&state_dir)).expect("attacher");
    let dev = a.attach("vol-fs", &s.socket).expect("attach");
    assert!(
        dev.to_string_lossy().starts_with("/dev/loop"),
        "{}",
        dev.display()
    );
    // Attaching again returns the same device.
    assert_eq!(a.attach("vol-fs", &s.socket).expect("re-attach"), dev);
    let listed = a.list().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].device.as_deref(), Some(dev.as_path()));
    let sector = std::fs::read_to_string(format!(
        "/sys/block/{}/queue/logical_block_size",
        dev.file_name().expect("name").to_string_lossy()
    ))
    .expect("sysfs");
    assert_eq!(sector.trim(), "4096");

    run_ok("mkfs.ext4", &["-q", "-F", path_str(&dev)]);
    run_ok("mount", &[path_str(&dev), path_str(&mnt)]);
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(mnt.join("a.bin"), &payload).expect("write file");
    std::fs::create_dir(mnt.join("dir")).expect("mkdir in fs");
    std::fs::write(mnt.join("dir/b.txt"), b"hello blockvol").expect("write file");
    run_ok("sync", &[]);

    // Detaching a mounted device is refused and leaves it working.
    match a.detach("vol-fs") {
        Err(Error::Busy { device, .. }) => assert_eq!(device, dev),
        other => panic!("detach of a mounted device must be Busy, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(mnt.join("dir/b.txt")).expect("still readable"),
        b"hello blockvol"
    );
    run_ok("umount", &[path_str(&mnt)]);

    // The filesystem really lives in the NBD backend: ext4 superblock magic.
    assert_eq!(read_backend(backend.as_ref(), 1024 + 56, 2), [0x53, 0xef]);

    a.detach("vol-fs").expect("detach");
    a.detach("vol-fs").expect("detach is idempotent");
    assert!(
        !loop_backing_files()
            .iter()
            .any(|f| f.contains(path_str(&mount_dir)))
    );
    assert!(wait_until(Duration::from_secs(5), || !nbdfuse_running_for(
        &mount_dir
    )));
    assert!(!state_dir.join("vol-fs").exists());
    drop(a);

    // A fresh attacher (as after an agent restart) attaches again; data is intact.
    let a = FuseLoopAttacher::new(FuseLoopConfig::new(&state_dir)).expect("attacher");
    let dev = a.attach("vol-fs", &s.socket).expect("attach again");
    run_ok("mount", &[path_str(&dev), path_str(&mnt)]);
    assert!(std::fs::read(mnt.join("a.bin")).expect("read back") == payload);
    assert_eq!(
        std::fs::read(mnt.join("dir/b.txt")).expect("read back"),
        b"hello blockvol"
    );
    run_ok("umount", &[path_str(&mnt)]);
    let fsck = run("e2fsck", &["-n", "-f", path_str(&dev)]);
    assert!(
        fsck.status.success(),
        "fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    drop(a);

    // Another fresh attacher detaches what the previous one attached (nbdfuse is not
    // its child): the state file is enough.
    let a = FuseLoopAttacher::new(FuseLoopConfig::new(&state_dir)).expect("attacher");
    assert_eq!(a.list().expect("list").len(), 1);
    a.detach("vol-fs").expect("detach after restart");
    assert!(wait_until(Duration::from_secs(5), || !nbdfuse_running_for(
        &mount_dir
    )));
    assert!(
        !loop_backing_files()
            .iter()
            .any(|f| f.contains(path_str(&mount_dir)))
    );
    assert_eq!(a.list().expect("list"), Vec::new());
}

#[test]
fn attach_fails_cleanly_when_the_export_does_not_exist() {
    let (s, _b) = TestServer::with_mem_export("present", 8 << 20, 4096);
    let state_dir = s.dir.path().join("attach-state");
    let _cleanup = Cleanup {
        mounts: Vec::new(),
        state_dir: state_dir.clone(),
    };
    let mut config = FuseLoopConfig::new(&state_dir);
    config.ready_timeout_ms = 5_000;
    let a = FuseLoopAttacher::new(config).expect("attacher");
    let err = a
        .attach("absent", &s.socket)
        .expect_err("attach of a missing export must fail");
    assert!(
        matches!(err, Error::Command { .. } | Error::Timeout { .. }),
        "{err:?}"
    );
    let mount_dir = state_dir.join("absent/mnt");
    assert!(wait_until(Duration::from_secs(5), || !nbdfuse_running_for(
        &mount_dir
    )));
    assert!(
        !state_dir.join("absent").exists(),
        "failed attach left state behind"
    );
    assert_eq!(a.list().expect("list"), Vec::new());
}

/// Kills and reaps a child process on drop.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn attach_recovers_from_a_crash_between_mount_and_losetup() {
    let (s, _b) = TestServer::with_mem_export("vol-crash", 16 << 20, 4096);
    let state_dir = s.dir.path().join("attach-state");
    let _cleanup = Cleanup {
        mounts: Vec::new(),
        state_dir: state_dir.clone(),
    };
    let vol_dir = state_dir.join("vol-crash");
    let mount_dir = vol_dir.join("mnt");
    std::fs::create_dir_all(&mount_dir).expect("mkdir");
    // What an agent leaves when it dies right after nbdfuse mounted: a FUSE mount, a
    // running nbdfuse, and a state file without a loop device.
    let old = ChildGuard(
        std::process::Command::new("nbdfuse")
            .arg(&mount_dir)
            .arg(s.unix_uri("vol-crash"))
            .spawn()
            .expect("spawn nbdfuse"),
    );
    assert!(wait_until(Duration::from_secs(10), || mount_dir
        .join("nbd")
        .exists()));
    let state = serde_json::json!({
        "volume": "vol-crash",
        "socket": s.socket,
        "nbdfuse_pid": old.0.id(),
        "loop_device": null,
    });
    std::fs::write(vol_dir.join("state.json"), state.to_string()).expect("state");

    let a = FuseLoopAttacher::new(FuseLoopConfig::new(&state_dir)).expect("attacher");
    let dev = a
        .attach("vol-crash", &s.socket)
        .expect("attach over leftovers");
    let old_pid = old.0.id();
    let old_alive = std::fs::read_to_string(format!("/proc/{old_pid}/stat"))
        .map(|st| {
            !st.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    assert!(!old_alive, "the leftover nbdfuse was not stopped");
    // The new attachment works end to end.
    run_ok(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", dev.display()),
            "bs=4096",
            "count=16",
            "oflag=direct",
        ],
    );
    a.detach("vol-crash").expect("detach");
    assert!(wait_until(Duration::from_secs(5), || !nbdfuse_running_for(
        &mount_dir
    )));
    assert!(!vol_dir.exists());
}
