//! Block devices an agent attached (the attach proxy's FUSE file + a loop device)
//! as scenario tests see them: make a filesystem, mount, find what an attachment left
//! behind, and a guard that tears everything down when a test fails half-way. The
//! guard works from `/proc` and `/sys` only, never through the agent, so a broken agent
//! cannot leave devices behind on the test machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Runs `program args`, failing with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::io(format!("starting {program}"), e))?;
    Error::stdout_of(format!("{program} {}", args.join(" ")), &out)
}

/// Where the FUSE + loop attacher of an agent with data directory `data_dir` keeps
/// `volume`'s state (mount point, logs, proxy control socket).
pub fn attach_dir(data_dir: &Path, volume: &str) -> PathBuf {
    data_dir.join("attach").join(volume)
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Loop devices whose backing file lies at or below `dir` (from /sys, so a dead FUSE
/// file is never touched).
pub fn loops_backed_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim().trim_end_matches(" (deleted)");
            Path::new(backing)
                .starts_with(dir)
                .then(|| PathBuf::from("/dev").join(name))
        })
        .collect();
    out.sort();
    out
}

/// Live processes (not zombies, not this one) whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut out: Vec<(u32, String)> = entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            if pid == me {
                return None;
            }
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            if state == 'Z' {
                return None;
            }
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle)
                .then_some((pid, cmd.trim().to_string()))
        })
        .collect();
    out.sort();
    out
}

/// Everything of `volume`'s attachment still present on this host, described; empty
/// means a clean detach.
pub fn leftovers(data_dir: &Path, volume: &str) -> Vec<String> {
    let dir = attach_dir(data_dir, volume);
    let mut out = Vec::new();
    for (pid, cmd) in processes_mentioning(&dir.to_string_lossy()) {
        out.push(format!("process {pid}: {cmd}"));
    }
    for dev in loops_backed_under(&dir) {
        out.push(format!("loop device {}", dev.display()));
    }
    for m in mounts_under(&dir) {
        out.push(format!("mount {}", m.display()));
    }
    if dir.exists() {
        out.push(format!("directory {}", dir.display()));
    }
    out
}

/// Tears down whatever is left of an attachment when dropped: unmounts `mount_point`
/// (if mounted), detaches loop devices backed under the attach directory, unmounts the
/// FUSE mount and kills the processes serving it. Best effort; errors are printed.
pub struct AttachmentGuard {
    pub data_dir: PathBuf,
    pub volume: String,
    pub mount_point: PathBuf,
}

impl AttachmentGuard {
    fn cleanup(&self) {
        let dir = attach_dir(&self.data_dir, &self.volume);
        let mp = self.mount_point.to_string_lossy().into_owned();
        if !mounts_under(&self.mount_point).is_empty()
            && let Err(e) = run("umount", &[&mp]).or_else(|_| run("umount", &["-l", &mp]))
        {
            eprintln!("cleanup: {e}");
        }
        for dev in loops_backed_under(&dir) {
            if let Err(e) = run("losetup", &["-d", &dev.to_string_lossy()]) {
                eprintln!("cleanup: {e}");
            }
        }
        for m in mounts_under(&dir).iter().rev() {
            let m = m.to_string_lossy();
            if run("fusermount3", &["-u", &m]).is_err() {
                let _ = run("umount", &["-l", &m]);
            }
        }
        for (pid, _) in processes_mentioning(&dir.to_string_lossy()) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

impl Drop for AttachmentGuard {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A loop device an Attach call made; released on drop when the test is failing (a
/// passing test detaches it through the agent), so no loop device outlives a test.
pub struct LoopDevice {
    pub path: String,
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.path)
                .status();
        }
    }
}
