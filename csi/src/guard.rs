//! Per-volume in-flight guard. The CO may retry a call while the first attempt still
//! runs; CSI says the second must fail with ABORTED rather than race the first. A
//! guard is held for the whole call and released on drop, also when the call panics
//! or its future is cancelled.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// The set of volume ids with a call in flight. Cheap to clone; clones share the set.
#[derive(Clone, Default, Debug)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Proof that the caller is the only one working on `key`; frees it on drop.
#[derive(Debug)]
pub struct InFlightGuard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `key`, or fails with `Aborted` naming it when a call already holds it.
    pub fn try_acquire(&self, key: &str) -> Result<InFlightGuard> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.insert(key.to_string()) {
            return Err(Error::Aborted(format!(
                "an operation for volume {key:?} is already in progress; retry later"
            )));
        }
        Ok(InFlightGuard {
            keys: Arc::clone(&self.keys),
            key: key.to_string(),
        })
    }

    /// Number of keys currently held.
    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_call_for_the_same_volume_is_aborted_until_the_first_finishes() {
        let inflight = InFlight::new();
        let first = inflight.try_acquire("vol-a").expect("first call runs");
        let err = inflight
            .try_acquire("vol-a")
            .expect_err("second call must wait");
        assert_eq!(err.code(), tonic::Code::Aborted);
        assert!(err.to_string().contains("vol-a"), "{err}");
        drop(first);
        assert!(inflight.is_empty());
        inflight
            .try_acquire("vol-a")
            .expect("free again after the first finished");
    }

    #[test]
    fn different_volumes_do_not_block_each_other() {
        let inflight = InFlight::new();
        let _a = inflight.try_acquire("vol-a").unwrap();
        let _b = inflight.try_acquire("vol-b").unwrap();
        assert_eq!(inflight.len(), 2);
    }

    #[test]
    fn guard_is_released_when_the_holding_task_is_cancelled() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let inflight = InFlight::new();
        let held = inflight.clone();
        rt.block_on(async move {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let _g = held.try_acquire("vol-a").unwrap();
                let _ = tx.send(());
                std::future::pending::<()>().await;
            });
            rx.await.unwrap();
            assert!(inflight.try_acquire("vol-a").is_err());
            task.abort();
            let _ = task.await;
            inflight
                .try_acquire("vol-a")
                .expect("released by cancellation");
        });
    }
}
