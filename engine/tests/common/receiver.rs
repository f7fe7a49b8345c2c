//! One receiver core on a `MemLog`, fed message by message as a primary would, and
//! readers for what it answers. By default each sync it asks for is performed at once
//! (`step_blocking`); `holding_syncs` leaves them to the test (`synced`).

use engine::replication::wire::{BarrierStatus, ErrorCode};
use engine::replication::{
    Body, ConnId, EntryKind, Epoch, Lba, Lsn, MemLog, ReceiverAction, ReceiverConfig, ReceiverCore,
    ReceiverInput, ReplicaLog, VolumeMsg, WalEntry, step_blocking,
};

use super::cluster::vol;

pub struct Rx {
    pub core: ReceiverCore,
    pub log: MemLog,
    pub now: u64,
    /// Syncs the core asks for are performed before its actions are returned.
    pub syncs_at_once: bool,
}

impl Default for Rx {
    fn default() -> Self {
        Rx::with(ReceiverConfig::default())
    }
}

impl Rx {
    /// A receiver on an empty log that has never seen an epoch.
    pub fn with(cfg: ReceiverConfig) -> Self {
        Rx {
            core: ReceiverCore::new(vol(), cfg),
            log: MemLog::new(),
            now: 0,
            syncs_at_once: true,
        }
    }

    /// A receiver at epoch 1 whose session with primary `p` is open on connection 1, and
    /// whose syncs wait for `synced`.
    pub fn holding_syncs() -> Self {
        let mut rx = Rx::default();
        rx.log.set_epoch(Epoch(1)).unwrap();
        rx.send(Body::ResumeRequest {
            session: 1,
            head: Lsn(0),
            retained_start: Lsn(1),
            primary: Some(super::cluster::rid("p")),
        });
        rx.syncs_at_once = false;
        rx
    }

    pub fn step(&mut self, input: ReceiverInput) -> Vec<ReceiverAction> {
        if self.syncs_at_once {
            step_blocking(&mut self.core, self.now, input, &mut self.log)
        } else {
            self.core.step(self.now, input, &mut self.log)
        }
    }

    /// `body` at `epoch` on connection `conn`.
    pub fn send_on(&mut self, conn: u64, epoch: u64, body: Body) -> Vec<ReceiverAction> {
        let msg = VolumeMsg {
            volume: vol(),
            epoch: Epoch(epoch),
            body,
        };
        self.step(ReceiverInput::Received {
            conn: ConnId(conn),
            msg,
        })
    }

    /// `body` at epoch 1 on connection 1.
    pub fn send(&mut self, body: Body) -> Vec<ReceiverAction> {
        self.send_on(1, 1, body)
    }

    /// An unnamed primary's handshake at epoch 1 on connection 1.
    pub fn resume(&mut self, head: u64) -> Vec<ReceiverAction> {
        self.send(Body::ResumeRequest {
            session: 1,
            head: Lsn(head),
            retained_start: Lsn(1),
            primary: None,
        })
    }

    pub fn entry(&mut self, lsn: u64) -> Vec<ReceiverAction> {
        self.send(Body::Entry(entry(lsn)))
    }

    pub fn barrier(&mut self, id: u64, lsn: u64) -> Vec<ReceiverAction> {
        self.send(Body::BarrierRequest { id, lsn: Lsn(lsn) })
    }

    pub fn tick(&mut self, now: u64) -> Vec<ReceiverAction> {
        self.now = now;
        self.step(ReceiverInput::Tick)
    }

    /// Performs the sync in flight now and reports it done.
    pub fn synced(&mut self) -> Vec<ReceiverAction> {
        let result = self.log.sync().map_err(|e| e.to_string());
        self.step(ReceiverInput::Synced { result })
    }
}

/// A one-block write at `lsn`, epoch 1, of LBA `lsn`.
pub fn entry(lsn: u64) -> WalEntry {
    WalEntry {
        lsn: Lsn(lsn),
        epoch: Epoch(1),
        lba: Lba(lsn),
        kind: EntryKind::Write,
        blocks: 1,
        data: vec![lsn as u8; 8],
    }
}

/// The bodies of the messages in `out`.
pub fn bodies(out: &[ReceiverAction]) -> Vec<Body> {
    out.iter()
        .filter_map(|a| match a {
            ReceiverAction::Send { msg, .. } => Some(msg.body.clone()),
            _ => None,
        })
        .collect()
}

/// The syncs asked for in `out`, by the LSN they must cover.
pub fn syncs(out: &[ReceiverAction]) -> Vec<Lsn> {
    out.iter()
        .filter_map(|a| match a {
            ReceiverAction::Sync { through } => Some(*through),
            _ => None,
        })
        .collect()
}

/// The barrier answers in `out`: (id, status, flushed).
pub fn barrier_answers(out: &[ReceiverAction]) -> Vec<(u64, BarrierStatus, Lsn)> {
    bodies(out)
        .into_iter()
        .filter_map(|b| match b {
            Body::BarrierResponse {
                id,
                status,
                flushed,
            } => Some((id, status, flushed)),
            _ => None,
        })
        .collect()
}

/// The error codes in `out`.
pub fn errors(out: &[ReceiverAction]) -> Vec<ErrorCode> {
    bodies(out)
        .into_iter()
        .filter_map(|b| match b {
            Body::Error { code, .. } => Some(code),
            _ => None,
        })
        .collect()
}
