//! I/O shell: tokio TCP transport driving the sans-IO replication cores over real
//! volumes. Every connection authenticates (HMAC challenge-response, [`auth`]) before any
//! volume message is read, and carries CRC-checked frames ([`framing`]); a malformed frame
//! closes that connection with a logged reason and nothing from it is applied. Queues are
//! bounded; a full send queue ends the session (the core recovers by catch-up) instead of
//! growing memory.
//!
//! - [`data_port`]: the node's listening side, a `ReceiverServer` hosting replicas (many
//!   volumes multiplexed by volume ID on each connection) and executing forwarded block IO.
//! - [`primary_driver`]: one `PrimaryCore` per primary volume, fed by the volume's append
//!   observer, with the handle the node agent flushes through.
//! - [`link`]: the node's outbound `Transport`, one data and one control connection per
//!   peer, shared by every primary volume on the node.

pub mod auth;
pub mod config;
pub mod data_port;
pub mod framing;
pub mod link;
pub mod primary_driver;

pub use config::NetConfig;
pub use data_port::ReceiverServer;
pub use framing::NetError;
pub use link::Transport;
pub use primary_driver::{PrimaryHandle, PrimarySnapshot, spawn_primary};

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, also when a panicking holder poisoned it (the state stays consistent: every
/// critical section here either completes or changes nothing).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
