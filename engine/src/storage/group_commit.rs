//! Group commit: many concurrent `flush` callers share one fdatasync. The first caller
//! that finds no sync in flight becomes the leader, syncs everything appended so far,
//! and wakes the rest; callers whose target is covered return without syncing.
//!
//! A failed sync poisons the volume: after an fsync error the kernel may have dropped
//! the dirty pages, so a later "successful" sync would prove nothing (fail-stop).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};

#[derive(Default)]
struct State {
    syncing: bool,
    failed: Option<String>,
}

pub(crate) struct GroupCommit {
    state: Mutex<State>,
    cv: Condvar,
    durable: AtomicU64,
    syncs: AtomicU64,
    /// Mirrors `State::failed.is_some()` so the IO fast path needs no lock.
    failed_flag: AtomicBool,
    max_delay: Duration,
}

impl GroupCommit {
    pub(crate) fn new(durable: u64, max_delay: Duration) -> GroupCommit {
        GroupCommit {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            durable: AtomicU64::new(durable),
            syncs: AtomicU64::new(0),
            failed_flag: AtomicBool::new(false),
            max_delay,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// The poison reason, if the volume failed.
    pub(crate) fn failed(&self) -> Option<String> {
        if !self.failed_flag.load(Ordering::Acquire) {
            return None;
        }
        self.lock().failed.clone()
    }

    /// Marks the volume failed; every later operation reports `reason`.
    pub(crate) fn poison(&self, reason: String) {
        let mut st = self.lock();
        if st.failed.is_none() {
            tracing::error!(%reason, "volume failed; refusing further IO");
            st.failed = Some(reason);
            self.failed_flag.store(true, Ordering::Release);
        }
        self.cv.notify_all();
    }

    pub(crate) fn check(&self) -> Result<()> {
        match self.failed() {
            Some(reason) => Err(Error::Failed { reason }),
            None => Ok(()),
        }
    }

    /// Returns once everything up to `target` is durable. `head` reads the current
    /// head LSN (all appends up to it have completed their writes); `sync` is the
    /// device barrier.
    pub(crate) fn sync_to(
        &self,
        target: u64,
        head: impl Fn() -> u64,
        sync: impl Fn() -> std::io::Result<()>,
    ) -> Result<u64> {
        let mut st = self.lock();
        loop {
            if let Some(reason) = &st.failed {
                return Err(Error::Failed {
                    reason: reason.clone(),
                });
            }
            let durable = self.durable();
            if durable >= target {
                return Ok(durable);
            }
            if st.syncing {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.syncing = true;
            drop(st);
            if !self.max_delay.is_zero() {
                // Deliberate batching window (group_commit_max_delay_us): lets more
                // writers join this sync.
                std::thread::sleep(self.max_delay);
            }
            let h = head();
            let r = sync();
            self.syncs.fetch_add(1, Ordering::Relaxed);
            st = self.lock();
            st.syncing = false;
            match r {
                Ok(()) => {
                    self.durable.fetch_max(h, Ordering::AcqRel);
                }
                Err(e) => {
                    let reason = format!("fdatasync failed: {e}");
                    tracing::error!(%reason, "volume failed; refusing further IO");
                    st.failed = Some(reason);
                    self.failed_flag.store(true, Ordering::Release);
                }
            }
            self.cv.notify_all();
        }
    }

    /// Sets the durable LSN to `lsn` (truncation and rebuild move it backwards),
    /// after any sync in flight has finished so it cannot overwrite the new value.
    pub(crate) fn reset_durable(&self, lsn: u64) {
        let mut st = self.lock();
        while st.syncing {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        self.durable.store(lsn, Ordering::Release);
    }
}
