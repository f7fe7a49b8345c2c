//! What a test asks of a command it ran to completion: that it exited successfully, and
//! what it printed. A failure names the command and shows its stderr.

use std::process::Output;

/// The command's stdout, lossily decoded. Panics naming `what` with the command's stderr
/// when it did not exit successfully.
pub fn stdout_of(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`stdout_of`], one entry a line.
pub fn stdout_lines(out: &Output, what: &str) -> Vec<String> {
    stdout_of(out, what).lines().map(str::to_owned).collect()
}
