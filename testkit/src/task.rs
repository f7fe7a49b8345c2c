//! A spawned task that is aborted when its guard is dropped, so a failing test leaves
//! nothing running behind it.

use std::future::Future;

use tokio::task::JoinHandle;

/// Aborts its task when dropped.
#[derive(Debug)]
pub struct Task<T = ()>(pub JoinHandle<T>);

impl<T: Send + 'static> Task<T> {
    /// Spawns `fut` on the current runtime.
    pub fn spawn<F>(fut: F) -> Task<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        Task(tokio::spawn(fut))
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
