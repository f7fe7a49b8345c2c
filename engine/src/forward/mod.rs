//! Forwarded block IO over the data port: a node whose agent does not hold a volume's
//! primary sends READ/WRITE/FLUSH/... to the primary's agent on the same authenticated,
//! framed, CRC-checked connections replication uses (message family `Message::Forward`).
//!
//! Serving side: the data port hands each request to a [`ForwardHandler`] (the node
//! agent's local primaries), at most [`FORWARD_IN_FLIGHT_MAX`] at a time per connection,
//! together with a [`ForwardSource`]: the authenticated node that sent it and the fence
//! the request must pass ([`ForwardSource::admit`]) right before it touches the volume.
//!
//! - [`protocol`]: what both ends agree on (the outcome of a request, the serving contract).
//! - [`fence`]: the order and cancellation of forwarded requests across connections.
//! - [`client`]: the forwarding side's pipelined connection.

pub mod client;
pub mod fence;
pub mod protocol;

pub use client::{ForwardClient, ForwardError};
pub use fence::{Admitted, ClosesOnDrop, ForwardConn, ForwardFences, ForwardSource};
pub use protocol::{FORWARD_IN_FLIGHT_MAX, ForwardHandler, ForwardOutcome, op_name};

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, also when a panicking holder poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
