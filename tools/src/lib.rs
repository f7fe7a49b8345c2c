//! blockvol's developer tools, built on the test harness (`e2e`): the benchmark suite
//! behind `blockvol-bench` (fio workloads and report in [`bench`], the rows that run a
//! cluster in [`bench_scenarios`], the scale rows in [`scale_rows`] judged in [`scale`]);
//! `blockvol-local` and `blockvol-check` are thin
//! binaries over the harness's `local` and `checker` modules.

pub mod bench;
pub mod bench_scenarios;
pub mod error;
pub mod scale;
pub mod scale_rows;

pub use error::{Error, Result};
