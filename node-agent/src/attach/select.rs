//! Which attacher the agent runs: the kernel NBD driver where the kernel has it (faster,
//! resizable online), FUSE + loop elsewhere. Devices attached before a restart stay
//! with the attacher that made them, so changing hosts or settings never orphans one.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::kernel::{KernelNbdAttacher, KernelNbdConfig};
use super::nbd_genl::NbdNetlink;
use super::{Attacher, Error, FuseLoopAttacher, FuseLoopConfig, ProxyHost, Result};

/// The `--attacher` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// The kernel driver when it is available, else FUSE + loop.
    Auto,
    /// The kernel driver; the agent does not start without it.
    Kernel,
    /// FUSE + loop, even where the kernel driver exists.
    FuseLoop,
}

/// The attacher chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Kernel,
    FuseLoop,
}

/// Decides the attacher. `probe` checks that the kernel driver answers (only called
/// when its answer matters); `*_attached` say whether each attacher's state directory
/// records devices from before. Returns the choice and the reason, for the log.
pub fn choose(
    mode: AttachMode,
    kernel_attached: bool,
    fuse_attached: bool,
    probe: impl FnOnce() -> std::result::Result<(), String>,
) -> Result<(Choice, String)> {
    match mode {
        AttachMode::FuseLoop => {
            let mut why = "--attacher=fuse-loop".to_owned();
            if kernel_attached {
                why.push_str(
                    "; devices attached through the kernel driver before are not managed \
                     until the agent runs with --attacher=kernel or auto again",
                );
            }
            Ok((Choice::FuseLoop, why))
        }
        AttachMode::Kernel => match probe() {
            Ok(()) => Ok((Choice::Kernel, "--attacher=kernel".into())),
            Err(reason) => Err(Error::Unsupported(format!(
                "--attacher=kernel, but the kernel nbd driver is unusable: {reason}; load the \
                 nbd module or use --attacher=auto"
            ))),
        },
        AttachMode::Auto if kernel_attached => match probe() {
            Ok(()) => Ok((
                Choice::Kernel,
                "devices attached through the kernel driver before".into(),
            )),
            Err(reason) => Ok((
                Choice::FuseLoop,
                format!("kernel nbd devices recorded but the driver is unusable: {reason}"),
            )),
        },
        AttachMode::Auto if fuse_attached => Ok((
            Choice::FuseLoop,
            "devices attached through FUSE + loop before".into(),
        )),
        AttachMode::Auto => match probe() {
            Ok(()) => Ok((Choice::Kernel, "the kernel nbd driver is available".into())),
            Err(reason) => Ok((Choice::FuseLoop, reason)),
        },
    }
}

/// Whether `state_dir` records an attached volume (`<volume>/state.json`).
pub fn has_attachments(state_dir: &Path) -> bool {
    std::fs::read_dir(state_dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.path().join("state.json").is_file())
    })
}

/// Loads the nbd module when it is missing (`modprobe nbd`, best effort) and checks
/// that its generic netlink family answers.
pub fn probe_kernel_nbd(netlink_timeout: Duration) -> std::result::Result<(), String> {
    let mut modprobe = String::new();
    if !Path::new("/sys/module/nbd").exists()
        && let Err(e) = super::sys::run("modprobe", &["nbd"])
    {
        modprobe = format!(" (modprobe nbd: {e})");
    }
    NbdNetlink::open(netlink_timeout)
        .map(drop)
        .map_err(|e| format!("{e}{modprobe}"))
}

/// The agent's attacher and, when it is the kernel one, a handle for reconnecting its
/// devices after a restart.
pub struct Opened {
    pub attacher: Arc<dyn Attacher>,
    pub kernel: Option<Arc<KernelNbdAttacher>>,
    pub choice: Choice,
}

/// Chooses and builds the attacher for an agent with `data_dir` (state in
/// `attach/` for FUSE + loop, `attach-kernel/` for the kernel driver).
pub fn open_attacher(
    mode: AttachMode,
    data_dir: &Path,
    proxies: Arc<dyn ProxyHost>,
) -> Result<Opened> {
    let kernel_config = KernelNbdConfig::new(data_dir.join("attach-kernel"));
    let fuse_config = FuseLoopConfig::new(data_dir.join("attach"), proxies);
    let timeout = Duration::from_millis(kernel_config.netlink_timeout_ms);
    let (choice, reason) = choose(
        mode,
        has_attachments(&kernel_config.state_dir),
        has_attachments(&fuse_config.state_dir),
        || probe_kernel_nbd(timeout),
    )?;
    Ok(match choice {
        Choice::Kernel => {
            info!(%reason, "attach: using the kernel nbd driver");
            let k = Arc::new(KernelNbdAttacher::new(kernel_config)?);
            Opened {
                attacher: k.clone(),
                kernel: Some(k),
                choice,
            }
        }
        Choice::FuseLoop => {
            if mode == AttachMode::Auto {
                info!(%reason, "attach: using FUSE + loop devices");
            } else {
                warn!(%reason, "attach: using FUSE + loop devices");
            }
            Opened {
                attacher: Arc::new(FuseLoopAttacher::new(fuse_config)?),
                kernel: None,
                choice,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> std::result::Result<(), String> {
        Ok(())
    }
    fn missing() -> std::result::Result<(), String> {
        Err("family \"nbd\" is not registered".into())
    }

    #[test]
    fn auto_prefers_the_kernel_and_falls_back_with_the_reason() {
        assert_eq!(
            choose(AttachMode::Auto, false, false, ok)
                .expect("choice")
                .0,
            Choice::Kernel
        );
        let (c, why) = choose(AttachMode::Auto, false, false, missing).expect("choice");
        assert_eq!(c, Choice::FuseLoop);
        assert!(why.contains("not registered"), "{why}");
    }

    #[test]
    fn existing_devices_keep_their_attacher() {
        let probe_unused = || -> std::result::Result<(), String> {
            panic!("the probe must not decide when fuse-loop devices exist")
        };
        let (c, _) = choose(AttachMode::Auto, false, true, probe_unused).expect("choice");
        assert_eq!(c, Choice::FuseLoop);
        let (c, _) = choose(AttachMode::Auto, true, true, ok).expect("choice");
        assert_eq!(c, Choice::Kernel);
        let (c, why) = choose(AttachMode::Auto, true, false, missing).expect("choice");
        assert_eq!(c, Choice::FuseLoop);
        assert!(why.contains("unusable"), "{why}");
    }

    #[test]
    fn forced_modes_are_obeyed_and_a_forced_missing_kernel_is_an_error() {
        let (c, why) = choose(AttachMode::FuseLoop, true, false, ok).expect("choice");
        assert_eq!(c, Choice::FuseLoop);
        assert!(why.contains("not managed"), "{why}");
        assert_eq!(
            choose(AttachMode::Kernel, false, true, ok)
                .expect("choice")
                .0,
            Choice::Kernel
        );
        let err = choose(AttachMode::Kernel, false, false, missing).expect_err("no driver");
        assert!(err.to_string().contains("--attacher=auto"), "{err}");
    }

    #[test]
    fn attachments_are_recognised_by_their_state_files() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(!has_attachments(&d.path().join("absent")));
        assert!(!has_attachments(d.path()));
        std::fs::create_dir_all(d.path().join("vol")).expect("mkdir");
        assert!(!has_attachments(d.path()));
        std::fs::write(d.path().join("vol/state.json"), b"{}").expect("write");
        assert!(has_attachments(d.path()));
    }
}
