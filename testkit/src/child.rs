//! A child process a test started, killed and reaped when the guard drops, so a failing
//! test leaves no process behind.

/// Kills and reaps the child on drop.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
