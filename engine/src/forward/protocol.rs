//! What both ends of forwarded block IO agree on: the outcome of one request, the bound on
//! requests in flight per connection, and the contract of the serving side's handler.

use super::fence::ForwardSource;
use crate::replication::types::{Epoch, VolumeId};
use crate::replication::wire::{ForwardMsg, ForwardOp, ForwardPayload, ForwardStatus};

/// Forwarded requests executed concurrently per data-port connection.
pub const FORWARD_IN_FLIGHT_MAX: usize = 64;

/// What the serving side answers for one request (the id is added by the data port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardOutcome {
    pub status: ForwardStatus,
    /// The serving agent's epoch of the volume (0 when it holds none).
    pub epoch: Epoch,
    pub detail: String,
    pub payload: ForwardPayload,
}

impl ForwardOutcome {
    pub fn ok(epoch: Epoch, payload: ForwardPayload) -> Self {
        Self {
            status: ForwardStatus::Ok,
            epoch,
            detail: String::new(),
            payload,
        }
    }

    pub fn failed(status: ForwardStatus, detail: String) -> Self {
        Self {
            status,
            epoch: Epoch(0),
            detail,
            payload: ForwardPayload::None,
        }
    }

    pub fn into_reply(self, id: u64) -> ForwardMsg {
        ForwardMsg::Reply {
            id,
            status: self.status,
            epoch: self.epoch,
            detail: self.detail,
            payload: self.payload,
        }
    }
}

/// Executes forwarded block IO on a local primary.
///
/// Contract: `handle` runs on a blocking thread and may block. It executes `op` only
/// after `from.admit()` succeeded (and holds the guard while it runs), and only if
/// this node serves the primary of `volume` at exactly `epoch` (through the same backend
/// its local NBD export uses, so the durability gate and the fences apply), and answers
/// `NotPrimary` (no serving primary here, or a newer epoch was offered) or `StaleEpoch`
/// (the offered epoch is older) otherwise, so the forwarder re-resolves. It may refuse a
/// sender (`from.node()`, `from.attachment()`) it does not accept with `Io`, which the
/// forwarder does not retry.
pub trait ForwardHandler: Send + Sync + 'static {
    fn handle(
        &self,
        from: &ForwardSource,
        volume: &VolumeId,
        epoch: Epoch,
        op: ForwardOp,
    ) -> ForwardOutcome;
}

/// Short name of an operation for logs and errors.
pub fn op_name(op: &ForwardOp) -> &'static str {
    match op {
        ForwardOp::Geometry => "GEOMETRY",
        ForwardOp::Read { .. } => "READ",
        ForwardOp::Write { .. } => "WRITE",
        ForwardOp::WriteFua { .. } => "WRITE_FUA",
        ForwardOp::Flush => "FLUSH",
        ForwardOp::Trim { .. } => "TRIM",
        ForwardOp::WriteZeroes { .. } => "WRITE_ZEROES",
    }
}
