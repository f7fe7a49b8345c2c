//! The progress of a command that waits (`drain --wait`, `move-primary --wait`): one
//! line each time the state changes, stamped with the seconds since the wait began.

use std::io::Write;
use std::time::{Duration, Instant};

pub struct Progress {
    started: Instant,
    last: String,
}

impl Progress {
    /// Starts the clock.
    pub fn start() -> Progress {
        Progress {
            started: Instant::now(),
            last: String::new(),
        }
    }

    /// Writes `line` to `out` unless it is the line shown last.
    pub fn show(&mut self, out: &mut dyn Write, line: String) {
        if line != self.last {
            writeln!(out, "  [{:>5.1}s] {line}", self.elapsed().as_secs_f64()).ok();
            out.flush().ok();
            self.last = line;
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The line shown last (empty before the first), for an error that gives up waiting.
    pub fn last(self) -> String {
        self.last
    }
}
