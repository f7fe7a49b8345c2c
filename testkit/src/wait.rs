//! The one bounded wait: poll a condition until it holds or a deadline passes. Every
//! wait in the tests names what it waits for, so a timeout says what never happened.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

/// How often [`wait_for`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A condition that did not hold in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {waited_ms} ms waiting for {what}")]
pub struct Timeout {
    pub what: String,
    pub waited_ms: u64,
}

/// How long a wait may take and how often it re-checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub timeout: Duration,
    pub poll: Duration,
}

impl Wait {
    /// A wait of `timeout_ms` re-checking every `poll_ms`.
    pub const fn millis(timeout_ms: u64, poll_ms: u64) -> Wait {
        Wait {
            timeout: Duration::from_millis(timeout_ms),
            poll: Duration::from_millis(poll_ms),
        }
    }

    /// Polls `f` until it returns `Some`; after `timeout` fails naming `what`. The
    /// condition is checked once more at the deadline, so a zero timeout checks once.
    pub async fn until<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, Timeout>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            if let Some(v) = f().await {
                return Ok(v);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Timeout {
                    what: what.to_string(),
                    waited_ms: self.timeout.as_millis() as u64,
                });
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Waits until the unix socket at `path` accepts a connection (its server is up).
    pub async fn socket(&self, path: &Path) -> Result<(), Timeout> {
        let what = format!("{} to accept connections", path.display());
        self.until(&what, || async {
            tokio::net::UnixStream::connect(path).await.ok().map(|_| ())
        })
        .await
    }

    /// [`Wait::until`] for a test: a timeout fails the test with the message.
    pub async fn expect<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        match self.until(what, f).await {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Some`, or fails after `timeout`
/// naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, f: F) -> Result<T, Timeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    Wait {
        timeout,
        poll: POLL_INTERVAL,
    }
    .until(what, f)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_condition_that_holds_returns_its_value() {
        let mut calls = 0;
        let v = Wait::millis(1_000, 1)
            .until("the third call", || {
                calls += 1;
                let n = calls;
                async move { (n == 3).then_some(n) }
            })
            .await;
        assert_eq!(v, Ok(3));
    }

    #[tokio::test]
    async fn a_timeout_names_what_was_awaited() {
        let err = Wait::millis(50, 10)
            .until("the impossible", || async { None::<()> })
            .await
            .expect_err("never holds");
        assert_eq!(
            err.to_string(),
            "timed out after 50 ms waiting for the impossible"
        );
    }

    #[tokio::test]
    async fn a_socket_is_awaited_until_it_listens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let none = Wait::millis(50, 10).socket(&path).await;
        assert!(none.is_err(), "nothing listens yet");
        let _listener = tokio::net::UnixListener::bind(&path).expect("bind");
        Wait::millis(1_000, 10)
            .socket(&path)
            .await
            .expect("the socket accepts");
    }
}
