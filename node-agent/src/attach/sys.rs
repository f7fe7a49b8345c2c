//! Host facts the attachers rely on, read from /proc and /sys rather than remembered,
//! so decisions after a restart reflect what the kernel actually has.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use super::{Error, Result};

/// Runs a program to completion; a non-zero exit becomes `Error::Command` with stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: program.into(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Undoes the octal escapes (`\040` for space, ...) /proc uses in paths.
fn unescape_proc(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(digits) = s.get(i + 1..i + 4)
            && digits.bytes().all(|c| (b'0'..=b'7').contains(&c))
            && let Ok(v) = u8::from_str_radix(digits, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (major:minor, mount point) of every mount in this mount namespace.
fn mounts() -> Vec<(String, PathBuf)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let dev = f.nth(2)?;
            let _root = f.next()?;
            let mount_point = f.next()?;
            Some((dev.to_owned(), PathBuf::from(unescape_proc(mount_point))))
        })
        .collect()
}

pub fn is_mount_point(path: &Path) -> bool {
    mounts().iter().any(|(_, mp)| mp == path)
}

/// Where the block device with `major:minor` is mounted, if anywhere.
pub fn mounted_at(dev_numbers: &str) -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|(d, _)| d == dev_numbers)
        .map(|(_, mp)| mp)
}

/// Loop devices whose backing file is `file`, as `/dev/loopN` paths.
pub fn loop_devices_backed_by(file: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let want = file.to_string_lossy().into_owned();
    let deleted = format!("{want} (deleted)");
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim_end_matches('\n');
            (backing == want || backing == deleted).then(|| PathBuf::from("/dev").join(name))
        })
        .collect();
    found.sort();
    found
}

/// `major:minor` of a block device from sysfs (`/dev/loop3` → `/sys/block/loop3/dev`).
pub fn dev_numbers(device: &Path) -> Option<String> {
    let name = device.file_name()?;
    let s = std::fs::read_to_string(Path::new("/sys/block").join(name).join("dev")).ok()?;
    Some(s.trim().to_owned())
}

/// Whether some other block device (device-mapper, md) is stacked on `device`.
pub fn has_holders(device: &Path) -> bool {
    device
        .file_name()
        .and_then(|n| std::fs::read_dir(Path::new("/sys/block").join(n).join("holders")).ok())
        .is_some_and(|mut d| d.next().is_some())
}

/// Whether `pid` is a live (not zombie) process whose command line contains every one
/// of `needles`: guards against signalling a recycled PID.
pub fn process_matches(pid: u32, needles: &[&str]) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // Field 3 follows the parenthesised command name, which may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if state == Some('Z') || state.is_none() {
        return false;
    }
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    needles.iter().all(|n| cmdline.contains(n))
}

/// The lowest PID of a live process whose command line contains every needle.
pub fn find_process(needles: &[&str]) -> Option<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&pid| pid != std::process::id() && process_matches(pid, needles))
        .collect();
    pids.sort_unstable();
    pids.first().copied()
}

/// The size of a block device in bytes as the kernel reports it (BLKGETSIZE64).
pub fn block_device_size(device: &Path) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    /// `_IOR(0x12, 114, size_t)` on 64-bit Linux.
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let f = std::fs::File::open(device)?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`
    // and lives across the call; the fd is open for the duration.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// Sends `sig` to process `pid`; a stale PID (ESRCH: the process is gone) and PID 0
/// (which would mean the whole process group) are ignored.
pub fn signal(pid: u32, sig: Signal) {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    let _ = rustix::process::kill_process(pid, sig);
}

/// Polls `done` every few milliseconds until it returns true or `timeout_ms` passes.
pub fn wait_until(timeout_ms: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_escapes_are_decoded() {
        assert_eq!(unescape_proc(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_proc(r"/plain"), "/plain");
        assert_eq!(unescape_proc(r"/trailing\04"), r"/trailing\04");
        assert_eq!(unescape_proc(r"\"), r"\");
    }

    #[test]
    fn root_is_a_mount_point_and_a_plain_dir_is_not() {
        assert!(is_mount_point(Path::new("/")));
        let d = tempfile::tempdir().expect("tempdir");
        assert!(!is_mount_point(d.path()));
    }

    #[test]
    fn own_process_matches_its_command_line_and_pid_zero_does_not() {
        let me = std::process::id();
        assert!(process_matches(me, &[]));
        assert!(!process_matches(me, &["no-such-needle-in-cmdline"]));
        assert!(!process_matches(0, &[]));
    }
}
