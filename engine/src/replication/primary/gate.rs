//! The durability gate: pending flushes are acknowledged in order, each only when the local
//! fsync covers it and (under `SyncAll`) every gate member reported it durable; barriers
//! ask members for that proof; the member proof says how long no other primary can serve.

use std::collections::BTreeSet;

use super::{Action, Durability, FlushId, PrimaryCore, Report};
use crate::replication::types::{Lsn, ReplicaId};
use crate::replication::wire::Body;

/// A flush waiting for the gate: acknowledged at `lsn`, or failed after
/// `flush_timeout_ms` from `at_ms`.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingFlush {
    id: FlushId,
    lsn: Lsn,
    at_ms: u64,
}

impl PrimaryCore {
    /// Whether a flush needs nothing but the local fsync: no peer is assigned, no member
    /// is committed, and the primary is neither fenced nor failed. While this holds the
    /// shell may acknowledge flushes without stepping the core, reporting them with
    /// [`Input::AckedLocally`] before any input that could add a member.
    pub fn gate_is_local_only(&self) -> bool {
        self.senders.is_empty()
            && self.committed.is_empty()
            && self.fenced.is_none()
            && !self.disk_failed
    }

    /// The member proof of docs/design.md invariant 3: the send time of the oldest among the
    /// newest heartbeats each committed in-sync member answered at this epoch. Only a
    /// committed member can be promoted, and a member stops answering at this epoch once
    /// it has persisted a newer one, so no other primary serves before this moment plus
    /// the proof window (a promoted member waits out that window after its last answer).
    /// `None` while some committed member has not answered, or this primary is fenced or
    /// failed. With no other committed member the proof holds by itself (nobody else
    /// can be promoted), so it is `now`.
    pub fn member_proof_ms(&self) -> Option<u64> {
        if self.fenced.is_some() || self.disk_failed {
            return None;
        }
        let mut min = self.now;
        for m in &self.committed {
            let s = self.senders.get(m)?;
            if s.proof_ms == 0 {
                return None;
            }
            min = min.min(s.proof_ms);
        }
        Some(min)
    }

    fn gate_members(&self) -> Vec<ReplicaId> {
        let mut m: BTreeSet<ReplicaId> = self.committed.clone();
        for s in self.senders.values() {
            if s.counting {
                m.insert(s.id.clone());
            }
        }
        m.into_iter().collect()
    }

    fn member_flushed(&self, id: &ReplicaId) -> Lsn {
        self.senders.get(id).map_or(Lsn(0), |s| s.flushed)
    }

    /// A flush asked for everything up to `lsn`: it waits for the local fsync and the
    /// members' barriers. Flushes are acknowledged in the order they were requested.
    pub(super) fn on_flush_requested(&mut self, id: FlushId, lsn: Lsn) {
        debug_assert!(
            self.pending.back().is_none_or(|f| f.lsn <= lsn),
            "flushes are requested at non-decreasing LSNs, so they are acknowledged in order"
        );
        self.pending.push_back(PendingFlush {
            id,
            lsn,
            at_ms: self.now,
        });
        self.request_local_fsync();
        self.request_barriers();
    }

    pub(super) fn on_local_fsync_done(&mut self, durable: Lsn) {
        self.fsync_inflight = false;
        self.local_durable = self.local_durable.max(durable);
        self.request_local_fsync();
    }

    /// Fail-stop: a failed local fsync fails every pending flush and the primary.
    pub(super) fn on_local_fsync_failed(&mut self) {
        self.fsync_inflight = false;
        self.disk_failed = true;
        self.fail_all_flushes("local fsync failed");
        self.out.push(Action::Report(Report::LocalDiskFailed));
    }

    pub(super) fn evaluate_gate(&mut self) {
        let members = self.gate_members();
        while let Some(f) = self.pending.front().copied() {
            let local_ok = self.local_durable >= f.lsn;
            let members_ok = self.cfg.durability == Durability::Async
                || self.cfg.test_knob_skip_member_gate
                || members.iter().all(|m| self.member_flushed(m) >= f.lsn);
            if !(local_ok && members_ok) {
                break;
            }
            self.pending.pop_front();
            self.acked_high = self.acked_high.max(f.lsn);
            self.out.push(Action::FlushAcked {
                id: f.id,
                lsn: f.lsn,
            });
        }
    }

    pub(super) fn fail_all_flushes(&mut self, reason: &str) {
        while let Some(f) = self.pending.pop_front() {
            self.out.push(Action::FlushFailed {
                id: f.id,
                reason: reason.to_string(),
            });
        }
    }

    fn request_local_fsync(&mut self) {
        let want = self.pending.back().map_or(Lsn(0), |f| f.lsn);
        if !self.fsync_inflight && self.local_durable < want {
            self.fsync_inflight = true;
            self.out.push(Action::LocalFsync { upto: self.head });
        }
    }

    pub(super) fn request_barriers(&mut self) {
        let Some(want) = self.pending.back().map(|f| f.lsn) else {
            return;
        };
        // A barrier above this core's head cannot be answered with more than the head:
        // while a flush waits for entries still on their way, `on_appended` asks again.
        let ids: Vec<ReplicaId> = self.senders.keys().cloned().collect();
        for id in ids {
            let need = self.senders.get(&id).is_some_and(|s| {
                s.ready_for_barrier() && s.flushed < want && s.flushed < self.head
            });
            if need {
                self.send_barrier(&id, self.head);
            }
        }
    }

    /// Barriers nobody asked for: a live replica that holds `pressure_barrier_bytes`
    /// unreported bytes, or that is behind the head for `background_barrier_interval_ms`,
    /// is asked to fsync and report its flushed LSN, so the retention floor advances
    /// without a client FLUSH. These barriers ack nothing: the gate still acks only
    /// pending flushes, and a replica not yet InSync is granted InSync by them only under
    /// the usual rule (a success covering every ack so far).
    pub(super) fn request_background_barriers(&mut self) {
        let now = self.now;
        let due: Vec<ReplicaId> = self
            .senders
            .values()
            .filter(|s| s.ready_for_barrier())
            .filter(|s| s.flushed < self.head)
            .filter(|s| {
                self.lag_bytes(s.flushed) >= self.cfg.pressure_barrier_bytes
                    || now.saturating_sub(s.last_barrier_ms)
                        >= self.cfg.background_barrier_interval_ms
            })
            .map(|s| s.id.clone())
            .collect();
        for id in due {
            self.send_barrier(&id, self.head);
        }
    }

    pub(super) fn send_barrier(&mut self, id: &ReplicaId, lsn: Lsn) {
        self.next_barrier += 1;
        let bid = self.next_barrier;
        let now = self.now;
        let Some(conn) = self
            .senders
            .get_mut(id)
            .and_then(|s| s.start_barrier(bid, lsn, now))
        else {
            return;
        };
        self.send(conn, Body::BarrierRequest { id: bid, lsn });
    }

    pub(super) fn check_flush_timeouts(&mut self) {
        while let Some(f) = self.pending.front().copied() {
            if self.now.saturating_sub(f.at_ms) <= self.cfg.flush_timeout_ms {
                break;
            }
            self.pending.pop_front();
            self.out.push(Action::FlushFailed {
                id: f.id,
                reason: "flush timed out waiting for the committed in-sync set".into(),
            });
        }
    }

    pub(super) fn check_unreachable(&mut self) {
        if self.cfg.durability == Durability::Async {
            return;
        }
        let Some(f) = self.pending.front().copied() else {
            return;
        };
        if self.now.saturating_sub(f.at_ms) < self.cfg.member_unreachable_after_ms {
            return;
        }
        let gen_now = self.generation;
        for m in self.gate_members() {
            if self.member_flushed(&m) >= f.lsn {
                continue;
            }
            let report = match self.senders.get_mut(&m) {
                Some(s) => {
                    let r = s.unreachable_reported != Some(gen_now);
                    s.unreachable_reported = Some(gen_now);
                    r
                }
                None => true,
            };
            if report {
                tracing::warn!(volume = %self.volume, replica = %m, generation = gen_now.0, "in-sync member unreachable; flush acks wait for the control plane");
                self.out.push(Action::Report(Report::MemberUnreachable {
                    replica: m,
                    generation: gen_now,
                }));
            }
        }
    }
}
