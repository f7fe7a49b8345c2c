//! Host mount and filesystem operations for the node plugin. Mount state is read from
//! `/proc/self/mountinfo`, so every step can tell "already done" from "not done" and
//! be repeated safely; the changes themselves run the host's `mount`, `umount`,
//! `mkfs.*`, `blkid`, `resize2fs` and `xfs_growfs`, each bounded by a timeout.

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
