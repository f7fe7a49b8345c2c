//! Host mount and filesystem operations for the node plugin. Mount state is read from
//! `/proc/self/mountinfo`, so every step can tell "already done" from "not done" and
//! be repeated safely; the changes themselves run the host's `mount`, `umount`,
//! `mkfs.*`, `blkid`, `e2fsck`, `resize2fs` and `xfs_growfs`, each bounded by a timeout.

use std::ffi::OsStr;
use std::path::{Component, Path};
use std::time::Duration;

use tokio::process::Command;

use crate::error::{Error, Result};

/// One line of `/proc/self/mountinfo`, the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Path of the mount point.
    pub target: String,
    /// Filesystem type (`ext4`, `xfs`, `devtmpfs`, ...).
    pub fs_type: String,
    /// Mount source: the device for a block filesystem.
    pub source: String,
    /// Root of the mount within its filesystem (a device bind mount shows the node).
    pub root: String,
}

/// Decodes the octal escapes mountinfo uses for space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if let (b'\\', Some(oct)) = (bytes[i], bytes.get(i + 1..i + 4))
            && oct.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = oct
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(MountEntry {
                root: unescape(pre.get(3)?),
                target: unescape(pre.get(4)?),
                fs_type: (*post.first()?).to_string(),
                source: unescape(post.get(1)?),
            })
        })
        .collect()
}

/// The current mount table.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    let want = path.to_string_lossy();
    let want = want.trim_end_matches('/');
    Ok(mounts()?
        .into_iter()
        .rev()
        .find(|m| m.target.trim_end_matches('/') == want))
}

/// Fails with InvalidArgument unless `path` is absolute, has no `..` and no NUL.
pub fn check_path(field: &str, path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "{field} {path:?} must be an absolute path"
        )));
    }
    if p.components().any(|c| c == Component::ParentDir) || path.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{field} {path:?} must not contain \"..\" components or NUL bytes"
        )));
    }
    Ok(())
}

/// Bounds of host commands.
#[derive(Debug, Clone)]
pub struct CommandSettings {
    /// Upper bound for one host command (mkfs on a large device is the slow one).
    pub command_timeout_ms: u64,
}

impl Default for CommandSettings {
    fn default() -> Self {
        CommandSettings {
            command_timeout_ms: 120_000,
        }
    }
}

/// Runs `program args`, bounded by the timeout, killing it if the timeout passes.
/// Returns (exit code, stdout); a non-zero exit is returned, not an error, because
/// some tools (blkid) use exit codes as answers.
pub async fn run(
    settings: &CommandSettings,
    program: &str,
    args: &[&OsStr],
) -> Result<(i32, String, String)> {
    let render = || {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let timeout = Duration::from_millis(settings.command_timeout_ms);
    let out = tokio::time::timeout(timeout, child)
        .await
        .map_err(|_| Error::Command {
            program: program.into(),
            args: render(),
            detail: format!("did not finish within {} ms", timeout.as_millis()),
        })?
        .map_err(|e| Error::Command {
            program: program.into(),
            args: render(),
            detail: format!("could not start: {e}"),
        })?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs a command that must succeed.
pub async fn run_ok(settings: &CommandSettings, program: &str, args: &[&OsStr]) -> Result<String> {
    let (code, stdout, stderr) = run(settings, program, args).await?;
    if code != 0 {
        return Err(Error::Command {
            program: program.into(),
            args: args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
            detail: format!("exit code {code}: {}", stderr.trim()),
        });
    }
    Ok(stdout)
}

/// What is on a device, as `blkid -p` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceContent {
    /// No filesystem or partition table signature.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// Something else blkid recognises (a partition table, RAID member, ...).
    Other(String),
}

/// How many leading bytes must read back as zeros before a device without signatures
/// is treated as blank and formatted.
pub const BLANK_CHECK_BYTES: usize = 1 << 20;

/// Probes the device. A device blkid finds nothing on is treated as blank only if its
/// first [`BLANK_CHECK_BYTES`] also read as zeros: formatting destroys data, so
/// anything unrecognised but written to is refused rather than guessed at.
pub async fn probe(settings: &CommandSettings, device: &Path) -> Result<DeviceContent> {
    let (code, stdout, stderr) = run(
        settings,
        "blkid",
        &[
            OsStr::new("-p"),
            OsStr::new("-o"),
            OsStr::new("export"),
            device.as_os_str(),
        ],
    )
    .await?;
    match code {
        0 => {
            let field = |k: &str| {
                stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(k).map(str::to_string))
            };
            if let Some(fs) = field("TYPE=") {
                return Ok(DeviceContent::Filesystem(fs));
            }
            Ok(DeviceContent::Other(
                field("PTTYPE=").unwrap_or_else(|| stdout.trim().replace('\n', " ")),
            ))
        }
        2 => {
            let device = device.to_path_buf();
            let zeros = tokio::task::spawn_blocking(move || leading_zeros(&device))
                .await
                .map_err(|e| Error::Internal(format!("blank check task failed: {e}")))??;
            if zeros {
                Ok(DeviceContent::Blank)
            } else {
                Ok(DeviceContent::Other(
                    "data without a recognised signature".into(),
                ))
            }
        }
        _ => Err(Error::Command {
            program: "blkid".into(),
            args: format!("-p {}", device.display()),
            detail: format!("exit code {code}: {}", stderr.trim()),
        }),
    }
}

fn leading_zeros(device: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(device)
        .map_err(|e| Error::io(format!("opening {}", device.display()), e))?;
    let mut buf = vec![0u8; BLANK_CHECK_BYTES];
    let mut filled = 0;
    while filled < buf.len() {
        let n = f
            .read(&mut buf[filled..])
            .map_err(|e| Error::io(format!("reading {}", device.display()), e))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(buf[..filled].iter().all(|b| *b == 0))
}

/// Makes a filesystem of `fs_type` on `device`.
pub async fn mkfs(settings: &CommandSettings, fs_type: &str, device: &Path) -> Result<()> {
    let program = format!("mkfs.{fs_type}");
    let args: Vec<&OsStr> = match fs_type {
        // -F: the device is not a partition; lazy init keeps mkfs fast on big volumes.
        "ext4" => vec![OsStr::new("-F"), OsStr::new("-q"), device.as_os_str()],
        "xfs" => vec![OsStr::new("-q"), device.as_os_str()],
        other => {
            return Err(Error::InvalidArgument(format!(
                "cannot make filesystem {other:?}: allowed values are \"ext4\", \"xfs\""
            )));
        }
    };
    run_ok(settings, &program, &args).await.map(|_| ())
}

/// `mount [-t fs] [-o options] source target`.
pub async fn mount(
    settings: &CommandSettings,
    source: &Path,
    target: &Path,
    fs_type: Option<&str>,
    options: &[String],
) -> Result<()> {
    let opts = options.join(",");
    let mut args: Vec<&OsStr> = Vec::new();
    if let Some(fs) = fs_type {
        args.extend([OsStr::new("-t"), OsStr::new(fs)]);
    }
    if !opts.is_empty() {
        args.extend([OsStr::new("-o"), OsStr::new(opts.as_str())]);
    }
    args.extend([source.as_os_str(), target.as_os_str()]);
    run_ok(settings, "mount", &args).await.map(|_| ())
}

/// Bind-mounts `source` onto `target`, read-only if asked (a bind mount ignores `ro`
/// on the first call, so read-only takes a second remount).
pub async fn bind_mount(
    settings: &CommandSettings,
    source: &Path,
    target: &Path,
    readonly: bool,
) -> Result<()> {
    mount(settings, source, target, None, &["bind".to_string()]).await?;
    if readonly {
        let remount = mount(
            settings,
            source,
            target,
            None,
            &["remount".to_string(), "bind".to_string(), "ro".to_string()],
        )
        .await;
        if let Err(e) = remount {
            // Never leave a writable mount behind a read-only request.
            let _ = unmount(settings, target).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts every mount stacked at `target`; nothing mounted there is fine.
pub async fn unmount(settings: &CommandSettings, target: &Path) -> Result<()> {
    // Bounded by the number of mounts at the path when we started.
    let stacked = mounts()?
        .iter()
        .filter(|m| Path::new(&m.target) == target)
        .count();
    for _ in 0..stacked {
        if mount_at(target)?.is_none() {
            break;
        }
        run_ok(settings, "umount", &[target.as_os_str()]).await?;
    }
    Ok(())
}

/// Size in bytes of the ext2/3/4 filesystem whose superblock is `sb` (the 1024 bytes at
/// byte offset 1024 of the device), or `None` if `sb` is not such a superblock.
pub fn ext_fs_bytes(sb: &[u8]) -> Option<u64> {
    let u32_at = |off: usize| -> Option<u32> {
        sb.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let magic = sb
        .get(0x38..0x3a)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))?;
    if magic != 0xEF53 {
        return None;
    }
    let log_block = u32_at(0x18)?;
    if log_block > 6 {
        return None; // block sizes are 1 KiB to 64 KiB
    }
    let mut blocks = u64::from(u32_at(0x04)?);
    // INCOMPAT_64BIT: the block count has a high half.
    if u32_at(0x60)? & 0x80 != 0 {
        blocks |= u64::from(u32_at(0x150)?) << 32;
    }
    blocks.checked_mul(1024u64 << log_block)
}

/// The size of `device` and of the ext2/3/4 filesystem on it (`None` if it holds none).
fn ext_fs_and_device_bytes(device: &Path) -> Result<(Option<u64>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let io = |e: std::io::Error| Error::Internal(format!("reading {}: {e}", device.display()));
    let mut f = std::fs::File::open(device).map_err(io)?;
    let device_bytes = f.seek(SeekFrom::End(0)).map_err(io)?;
    let mut sb = vec![0u8; 1024];
    f.seek(SeekFrom::Start(1024)).map_err(io)?;
    if f.read_exact(&mut sb).is_err() {
        return Ok((None, device_bytes));
    }
    Ok((ext_fs_bytes(&sb), device_bytes))
}

/// Grows the ext4 filesystem on the unmounted `device` to fill it (e2fsck -f, then
/// resize2fs), if the device is larger than the filesystem: a volume expanded while
/// detached gets its space when it is staged, before it is mounted. Growing offline
/// needs no CAP_SYS_RESOURCE, which growing a mounted ext4 does (EXT4_IOC_RESIZE_FS),
/// so this works on hosts whose root lacks it; NodeExpandVolume's resize2fs of the
/// mounted filesystem then finds nothing to do. Returns whether it grew.
pub async fn grow_unmounted_ext4(settings: &CommandSettings, device: &Path) -> Result<bool> {
    let (fs_bytes, device_bytes) = ext_fs_and_device_bytes(device)?;
    let Some(fs_bytes) = fs_bytes else {
        return Ok(false);
    };
    // Less than a 64 KiB block of room: nothing resize2fs could add.
    if device_bytes < fs_bytes.saturating_add(64 << 10) {
        return Ok(false);
    }
    // e2fsck exits 1 (or 2) when it fixed something; 4 and above when it could not.
    let (code, _, stderr) = run(
        settings,
        "e2fsck",
        &[OsStr::new("-f"), OsStr::new("-p"), device.as_os_str()],
    )
    .await?;
    if !(0..=2).contains(&code) {
        return Err(Error::Command {
            program: "e2fsck".into(),
            args: format!("-f -p {}", device.display()),
            detail: format!("exit code {code}: {}", stderr.trim()),
        });
    }
    run_ok(settings, "resize2fs", &[device.as_os_str()]).await?;
    Ok(true)
}

/// Grows the filesystem mounted at `mount_point` on `device` to fill the device.
pub async fn grow_filesystem(
    settings: &CommandSettings,
    fs_type: &str,
    device: &Path,
    mount_point: &Path,
) -> Result<()> {
    match fs_type {
        "ext4" | "ext3" | "ext2" => run_ok(settings, "resize2fs", &[device.as_os_str()]).await,
        "xfs" => run_ok(settings, "xfs_growfs", &[mount_point.as_os_str()]).await,
        other => Err(Error::FailedPrecondition(format!(
            "cannot grow filesystem {other:?}: only ext4 and xfs are supported"
        ))),
    }
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A superblock with the given block count (low, high), log block size and
    /// incompat flags.
    fn superblock(lo: u32, hi: u32, log_block: u32, incompat: u32) -> Vec<u8> {
        let mut sb = vec![0u8; 1024];
        sb[0x04..0x08].copy_from_slice(&lo.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&log_block.to_le_bytes());
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&hi.to_le_bytes());
        sb
    }

    #[test]
    fn ext_fs_bytes_reads_the_block_count_and_size() {
        assert_eq!(ext_fs_bytes(&superblock(262_144, 0, 2, 0)), Some(1 << 30));
        // The high half only counts with INCOMPAT_64BIT.
        assert_eq!(ext_fs_bytes(&superblock(1, 1, 2, 0)), Some(4096));
        assert_eq!(
            ext_fs_bytes(&superblock(1, 1, 2, 0x80)),
            Some(((1u64 << 32) + 1) * 4096)
        );
    }

    #[test]
    fn ext_fs_bytes_refuses_what_is_not_an_ext_superblock() {
        let mut bad_magic = superblock(8, 0, 2, 0);
        bad_magic[0x38] = 0;
        assert_eq!(ext_fs_bytes(&bad_magic), None);
        assert_eq!(ext_fs_bytes(&superblock(8, 0, 7, 0)), None);
        // Short input (a device smaller than a superblock) is refused, not a panic.
        assert_eq!(ext_fs_bytes(&superblock(8, 0, 2, 0x80)[..0x100]), None);
        assert_eq!(ext_fs_bytes(&[]), None);
        // A block count that overflows the byte size.
        assert_eq!(ext_fs_bytes(&superblock(u32::MAX, u32::MAX, 6, 0x80)), None);
    }

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 7:3 / /var/lib/kubelet/staging\\040dir rw,relatime shared:5 - ext4 /dev/loop3 rw
31 22 0:5 /loop3 /var/lib/kubelet/pods/x/dev rw - devtmpfs udev rw,size=1k
garbage line
";

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes_decoded() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].target, "/var/lib/kubelet/staging dir");
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].fs_type, "ext4");
        assert_eq!(m[2].root, "/loop3");
        assert_eq!(m[2].fs_type, "devtmpfs");
    }

    #[test]
    fn paths_must_be_absolute_without_parent_components() {
        assert!(check_path("target_path", "/var/lib/x").is_ok());
        for bad in ["", "relative/x", "/var/../etc", "/a/b/..", "..", "/a\0b"] {
            let e = check_path("target_path", bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
            if !bad.is_empty() {
                assert!(e.to_string().contains("target_path"), "{e}");
            }
        }
    }
}
