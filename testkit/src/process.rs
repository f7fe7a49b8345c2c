//! A daemon child process (etcd, kube-apiserver, ...) in its own process group, logging
//! to a file. Dropping it kills the whole group and reaps the child, so nothing outlives
//! the test that started it, also when that test panics. And [`Paused`], a process a test
//! has stopped and that goes on when the test is done with it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use std::os::unix::process::CommandExt;

use crate::error::{Error, Result};

/// How many trailing log lines an error or a failing test shows.
pub const LOG_TAIL_LINES: usize = 40;

pub(crate) struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl Daemon {
    pub(crate) fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Daemon> {
        let out =
            File::create(&log).map_err(|e| Error::io(format!("creating {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io(format!("duplicating {}", log.display()), e))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", program.display()), e))?;
        tracing::debug!(name, pid = child.id(), log = %log.display(), "daemon started");
        Ok(Daemon {
            name,
            child,
            log,
            reaped: false,
        })
    }

    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the daemon has already died.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Some(status)
            }
            _ => None,
        }
    }

    /// An error describing this daemon's unexpected exit, with its log tail.
    pub(crate) fn exited_error(&self, status: ExitStatus) -> Error {
        Error::DaemonExited {
            name: self.name,
            status: status.to_string(),
            log: self.log.clone(),
            tail: self.log_tail(LOG_TAIL_LINES),
        }
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills the process group and reaps the child. Idempotent.
    pub(crate) fn stop(&mut self) {
        if self.reaped {
            return;
        }
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals the process group we created for this
        // child (process_group(0) made its pid the group id); it touches no memory.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        match self.child.wait() {
            Ok(status) => tracing::debug!(name = self.name, %status, "daemon stopped"),
            Err(e) => tracing::warn!(name = self.name, error = %e, "reaping daemon failed"),
        }
        self.reaped = true;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process stopped with SIGSTOP (a daemon that hangs, as in an etcd stall or a node
/// that stops answering); it gets SIGCONT when dropped, also when the test panics.
pub struct Paused(u32);

impl Paused {
    /// Stops `pid`, a child process the test started. Panics when the signal fails.
    pub fn stop(pid: u32) -> Paused {
        // SAFETY: kill(2) takes no pointers; it only signals the process `pid`.
        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        assert_eq!(rc, 0, "SIGSTOP {pid}: {}", std::io::Error::last_os_error());
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}
