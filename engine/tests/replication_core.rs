//! Behaviour tests for the replication cores: one primary core and its receivers over an
//! in-memory, instantly delivering network. Each test names the protocol rule it pins down.

use std::collections::VecDeque;

use engine::replication::{
    Action, Body, ConnId, Durability, Endpoint, EntryKind, Epoch, EventKind, FlushId, Generation,
    Input, Lba, Lsn, MemLog, Peer, PrimaryConfig, PrimaryCore, ReceiverAction, ReceiverConfig,
    ReceiverEvent, ReceiverInput, RecoveryEvent, ReplicaId, ReplicaLog, ReplicaState, Report,
    step_blocking,
};

mod common;

use common::cluster::{Cluster, endpoint, rid, vol};
use common::receiver::{Rx, barrier_answers, bodies, errors, syncs};
use engine::replication::wire::{BarrierStatus, ErrorCode, ResumeStatus};

type Net = Cluster<MemLog>;

impl Net {
    /// The primary's node lost power and its agent starts the primary again, as the node
    /// agent and the control plane do together: at the persisted epoch if the log allows
    /// a primary term there, otherwise the control plane promotes it (the only live
    /// member here) at the next epoch. Connections die with the old process.
    fn restart_primary_after_power_loss(&mut self, committed: &[&str]) -> Epoch {
        self.plog.power_loss();
        self.drop_primary_conns();
        let persisted = self.plog.epoch();
        let epoch = if self.plog.may_begin_primary_term(persisted) {
            persisted
        } else {
            Epoch(persisted.0 + 1)
        };
        self.plog.set_epoch(epoch).unwrap();
        self.primary = PrimaryCore::new(
            vol(),
            rid("p"),
            epoch,
            cfg(),
            Generation(10),
            committed.iter().map(|s| rid(s)).collect(),
            &self.plog,
        );
        let peers = self.peers();
        self.input(Input::PeersAssigned(peers));
        epoch
    }
}

fn cfg() -> PrimaryConfig {
    PrimaryConfig {
        barrier_timeout_ms: 100,
        reconnect_backoff_ms: 10,
        member_unreachable_after_ms: 50,
        catchup_batch_entries: 4,
        ..PrimaryConfig::default()
    }
}

#[test]
fn fresh_replicas_reach_in_sync_through_handshake_and_barrier() {
    let mut n = Net::new(2, cfg(), &["p", "r0", "r1"]);
    n.tick(1);
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    assert_eq!(n.state("r1"), ReplicaState::InSync);
    let l = n.write(1, 7);
    let f = n.flush();
    assert!(n.is_acked(f));
    for r in &n.replicas {
        assert!(r.log.durable_lsn() >= l);
    }
}

#[test]
fn only_a_barrier_success_grants_in_sync() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    // Handshake completes but barrier replies are lost.
    n.replicas[0].blackhole = false;
    n.tick(1);
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    n.drop_conns_of(0);
    assert_eq!(n.state("r0"), ReplicaState::Degraded);
    // Reconnect where the replica answers nothing: the connection alone grants nothing.
    n.replicas[0].blackhole = true;
    n.tick(20);
    assert_eq!(n.state("r0"), ReplicaState::Connecting);
    n.tick(200);
    assert_ne!(n.state("r0"), ReplicaState::InSync);
}

#[test]
fn sync_all_flush_waits_for_every_committed_member() {
    let mut n = Net::new(2, cfg(), &["p", "r0", "r1"]);
    n.tick(1);
    n.replicas[1].blackhole = true;
    n.write(3, 1);
    let f = n.flush();
    assert!(!n.is_acked(f), "acked without r1's barrier");
    assert!(n.replicas[0].log.durable_lsn() >= Lsn(1));
}

/// Entries the log holds but the core was never handed (the shell lost them, and the log
/// then recycled them) never reach a member. A flush covers the log's head, so it is not
/// acknowledged on the members' word for less; once the loss is reported every member is
/// escalated for a rebuild and entries after the lost ones are shipped again.
#[test]
fn entries_lost_before_shipping_escalate_every_member_and_never_ack_a_flush() {
    let mut n = Net::new(2, cfg(), &["p", "r0", "r1"]);
    n.tick(1);
    n.write(1, 1);
    for i in 0..4 {
        n.plog
            .append_local(EntryKind::Write, Lba(10 + i), 1, vec![9; 8])
            .unwrap();
    }
    let f = n.flush();
    n.settle();
    assert!(
        !n.is_acked(f),
        "flush acked although no member received LSNs 2..=5"
    );
    n.input(Input::AppendsLost {
        resume_after: Lsn(5),
    });
    for r in ["r0", "r1"] {
        assert_eq!(n.state(r), ReplicaState::NeedsRebuild, "{r}");
        assert!(
            n.reports
                .iter()
                .any(|x| matches!(x, Report::NeedsRebuild { replica, .. } if *replica == rid(r))),
            "{r} not reported"
        );
    }
    assert_eq!(n.primary.head(), Lsn(5));
    n.settle();
    assert!(
        !n.is_acked(f),
        "flush acked by members that lack its entries"
    );
    assert_eq!(n.write(20, 2), Lsn(6));
    assert_eq!(
        n.primary.head(),
        Lsn(6),
        "entries after the loss are not taken"
    );
}

#[test]
fn async_flush_acks_after_local_fsync_only() {
    let c = PrimaryConfig {
        durability: Durability::Async,
        ..cfg()
    };
    let mut n = Net::new(1, c, &["p", "r0"]);
    n.tick(1);
    n.replicas[0].blackhole = true;
    n.write(3, 1);
    let f = n.flush();
    assert!(n.is_acked(f));
    assert_eq!(n.plog.durable_lsn(), Lsn(1));
}

#[test]
fn unreachable_member_blocks_acks_until_a_smaller_set_is_committed() {
    let mut n = Net::new(2, cfg(), &["p", "r0", "r1"]);
    n.tick(1);
    n.replicas[1].reachable = false;
    n.drop_conns_of(1);
    n.write(3, 1);
    let f = n.flush();
    assert!(!n.is_acked(f));
    n.tick(60);
    assert!(
        n.reports.iter().any(
            |r| matches!(r, Report::MemberUnreachable { replica, .. } if replica.as_str() == "r1")
        ),
        "unreachable member not reported: {:?}",
        n.reports
    );
    assert!(!n.is_acked(f), "the primary dropped a member on its own");
    n.input(Input::InSyncSetCommitted {
        generation: Generation(2),
        members: vec![rid("p"), rid("r0")],
    });
    assert!(n.is_acked(f));
}

#[test]
fn joining_member_counts_from_its_first_barrier_and_is_reported_in_sync() {
    let mut n = Net::new(2, cfg(), &["p", "r0"]);
    n.tick(1);
    assert_eq!(n.state("r1"), ReplicaState::InSync);
    assert!(n.primary.is_counted(&rid("r1")));
    assert!(n.reports.iter().any(|r| matches!(r,
        Report::MemberInSync { replica, generation, .. } if replica.as_str() == "r1" && *generation == Generation(1))));
    // Not committed yet, but counted: its silence blocks acks.
    n.replicas[1].blackhole = true;
    n.write(1, 1);
    let f = n.flush();
    assert!(!n.is_acked(f));
    // The primary does not drop it by itself: it reports it and waits for a commit.
    n.tick(200);
    assert!(!n.is_acked(f));
    assert!(n.reports.iter().any(|r| matches!(r,
        Report::MemberUnreachable { replica, generation } if replica.as_str() == "r1" && *generation == Generation(1))));
    n.input(Input::InSyncSetCommitted {
        generation: Generation(2),
        members: vec![rid("p"), rid("r0")],
    });
    assert!(n.is_acked(f));
}

/// docs/design.md invariant 2 for a joiner that drops before its commit: the primary keeps
/// counting it (the control plane may be committing it from its in-sync report) and
/// reports it unreachable at the current generation; the control plane answers with the
/// same members at the next generation, and the flush resumes within
/// `member_unreachable_after_ms` plus one reconcile - not after the retention budget.
#[test]
fn joiner_cut_before_its_commit_stops_blocking_flushes_after_one_unreachable_report() {
    let c = cfg();
    let mut n = Net::new(2, c.clone(), &["p", "r0"]);
    n.tick(1);
    assert!(
        n.primary.is_counted(&rid("r1")),
        "counted from its first barrier"
    );
    n.replicas[1].reachable = false;
    n.drop_conns_of(1);
    n.write(1, 1);
    let asked = n.now;
    let f = n.flush();
    // The control plane reconciles every `reconcile_ms`: an unreachable peer outside the
    // committed set, reported at the committed generation, gets the same members at the
    // next generation.
    let reconcile_ms = 5;
    let mut generation = Generation(1);
    while !n.is_acked(f) && n.now < asked + c.wal_retention_timeout_ms {
        n.tick(reconcile_ms);
        let outsider = n.reports.drain(..).any(|r| {
            matches!(r, Report::MemberUnreachable { replica, generation: g }
                if replica.as_str() == "r1" && g == generation)
        });
        if outsider {
            generation = Generation(generation.0 + 1);
            n.input(Input::InSyncSetCommitted {
                generation,
                members: vec![rid("p"), rid("r0")],
            });
        }
    }
    assert!(n.is_acked(f), "the flush never resumed");
    assert!(
        n.now <= asked + c.member_unreachable_after_ms + 2 * reconcile_ms,
        "the flush resumed {} ms after it was asked",
        n.now - asked
    );
    assert_eq!(generation, Generation(2), "one commit was enough");
    assert!(!n.primary.is_counted(&rid("r1")));
    // Back, it catches up, is counted again and reported in sync for a commit.
    n.replicas[1].reachable = true;
    n.settle();
    assert_eq!(n.state("r1"), ReplicaState::InSync);
    assert!(n.primary.is_counted(&rid("r1")));
    assert!(n.reports.iter().any(|r| matches!(r,
        Report::MemberInSync { replica, generation: g, .. } if replica.as_str() == "r1" && *g == Generation(2))));
}

#[test]
fn barrier_waits_until_received_covers_its_lsn() {
    let mut rx = Rx::default();
    rx.resume(2);
    assert!(barrier_answers(&rx.barrier(9, 1)).is_empty());
    rx.now = 1;
    let out = rx.entry(1);
    let flushed = barrier_answers(&out)
        .into_iter()
        .find_map(|(id, _, flushed)| (id == 9).then_some(flushed));
    assert_eq!(flushed, Some(Lsn(1)));
    assert_eq!(rx.log.durable_lsn(), Lsn(1), "reply sent before fsync");
}

#[test]
fn barrier_times_out_when_entries_never_arrive() {
    let mut rx = Rx::with(ReceiverConfig {
        barrier_timeout_ms: 10,
        ..ReceiverConfig::default()
    });
    rx.resume(5);
    rx.barrier(3, 5);
    let out = rx.tick(11);
    assert!(
        barrier_answers(&out)
            .iter()
            .any(|&(id, status, _)| id == 3 && status == BarrierStatus::Timeout)
    );
}

#[test]
fn barrier_reply_never_reports_progress_when_fsync_fails() {
    let mut rx = Rx::default();
    rx.resume(0);
    rx.entry(1);
    rx.log.fail_next_sync = true;
    let out = rx.barrier(1, 1);
    assert!(
        barrier_answers(&out)
            .iter()
            .any(|&(_, status, flushed)| status == BarrierStatus::FsyncFailed && flushed == Lsn(0))
    );
    assert_eq!(rx.log.durable_lsn(), Lsn(0));
    assert!(
        rx.core.failed().is_some(),
        "a replica whose fsync failed must stop accepting"
    );
}

#[test]
fn receiver_refuses_gaps_and_skips_duplicates() {
    let mut rx = Rx::default();
    rx.resume(0);
    rx.entry(1);
    assert!(errors(&rx.entry(3)).contains(&ErrorCode::Gap));
    assert_eq!(rx.log.head_lsn(), Lsn(1));
    rx.entry(1);
    assert_eq!(rx.log.head_lsn(), Lsn(1));
    assert!(rx.core.take_events().iter().any(|e| matches!(
        e,
        ReceiverEvent::GapRefused {
            expected: Lsn(2),
            got: Lsn(3)
        }
    )));
}

#[test]
fn receiver_persists_a_newer_epoch_and_refuses_older_ones() {
    let mut rx = Rx::default();
    rx.send_on(
        1,
        3,
        Body::ResumeRequest {
            session: 1,
            head: Lsn(0),
            retained_start: Lsn(1),
            primary: None,
        },
    );
    assert_eq!(rx.log.epoch(), Epoch(3));
    let out = rx.send_on(2, 2, Body::BarrierRequest { id: 1, lsn: Lsn(0) });
    assert!(out.iter().any(|a| matches!(a, ReceiverAction::Send { msg, .. }
        if msg.epoch == Epoch(3) && matches!(msg.body, Body::BarrierResponse { status: BarrierStatus::StaleEpoch, .. }))));
    let e = engine::replication::WalEntry {
        lsn: Lsn(1),
        epoch: Epoch(2),
        lba: Lba(0),
        kind: EntryKind::Trim,
        blocks: 1,
        data: Vec::new(),
    };
    rx.send_on(2, 2, Body::Entry(e));
    assert_eq!(rx.log.head_lsn(), Lsn(0), "stale primary's entry applied");
}

#[test]
fn stale_primary_is_fenced_by_a_replica_with_a_newer_epoch() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.tick(1);
    n.replicas[0].log.set_epoch(Epoch(5)).unwrap();
    n.write(1, 1);
    let f = n.flush();
    assert!(!n.is_acked(f));
    assert!(n.failed.contains(&f));
    assert_eq!(n.primary.fenced(), Some(Epoch(5)));
    assert!(
        n.reports
            .iter()
            .any(|r| matches!(r, Report::Fenced { observed: Epoch(5) }))
    );
}

#[test]
fn reconnect_catches_up_from_handshake_flushed_to_a_frozen_target() {
    let mut n = Net::new(2, cfg(), &["p", "r0", "r1"]);
    n.tick(1);
    n.replicas[1].reachable = false;
    n.drop_conns_of(1);
    for i in 0..20 {
        n.write(i, i as u8);
    }
    n.input(Input::InSyncSetCommitted {
        generation: Generation(2),
        members: vec![rid("p"), rid("r0")],
    });
    n.replicas[1].reachable = true;
    n.tick(20);
    let classified: Vec<&RecoveryEvent> = n
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::PlanCreated(_)))
        .collect();
    assert!(!classified.is_empty());
    assert!(
        format!("{:?}", classified[0].kind).contains("CatchUp { from: Lsn(0), target: Lsn(20) }")
    );
    n.settle();
    assert_eq!(n.state("r1"), ReplicaState::InSync);
    assert_eq!(n.replicas[1].log.head_lsn(), Lsn(20));
    assert!(n.event_names().contains(&"exec_resources_released"));
    assert_eq!(
        n.primary.pinner().len(),
        2,
        "only the per-replica progress holds remain"
    );
}

#[test]
fn catch_up_never_ships_past_its_frozen_target_before_going_live() {
    let mut n = Net::new(1, cfg(), &["p"]);
    n.replicas[0].reachable = false;
    for i in 0..10 {
        n.write(i, 1);
    }
    n.replicas[0].reachable = true;
    n.replicas[0].mute_barriers = true;
    n.tick(20);
    // First batch only (catchup_batch_entries = 4), all within (0, 10].
    let entries: Vec<Lsn> = n
        .sent
        .iter()
        .filter_map(|(_, m)| match &m.body {
            Body::Entry(e) => Some(e.lsn),
            _ => None,
        })
        .collect();
    assert_eq!(entries, vec![Lsn(1), Lsn(2), Lsn(3), Lsn(4)]);
    // New writes during catch-up are not shipped live.
    n.write(50, 1);
    assert!(
        !n.sent
            .iter()
            .any(|(_, m)| matches!(&m.body, Body::Entry(e) if e.lsn == Lsn(11)))
    );
}

#[test]
fn catch_up_failing_retry_limit_times_escalates_to_needs_rebuild() {
    let c = PrimaryConfig {
        catchup_retries_max: 3,
        ..cfg()
    };
    let mut n = Net::new(1, c, &["p"]);
    n.replicas[0].reachable = false;
    for i in 0..10 {
        n.write(i, 1);
    }
    n.replicas[0].reachable = true;
    n.replicas[0].mute_barriers = true;
    for _ in 0..3 {
        n.tick(20);
        assert_eq!(n.state("r0"), ReplicaState::CatchingUp);
        n.drop_conns_of(0);
    }
    assert_eq!(n.state("r0"), ReplicaState::NeedsRebuild);
    assert!(
        n.reports
            .iter()
            .any(|r| matches!(r, Report::NeedsRebuild { .. }))
    );
    assert_eq!(
        n.primary.pinner().len(),
        0,
        "escalation released every hold"
    );
}

#[test]
fn retention_floor_holds_wal_for_a_lagging_replica() {
    let mut n = Net::new(1, cfg(), &["p"]);
    n.tick(1);
    n.write(0, 1);
    let f = n.flush();
    assert!(n.is_acked(f));
    n.replicas[0].reachable = false;
    n.drop_conns_of(0);
    for i in 0..10 {
        n.write(i, 2);
    }
    n.flush();
    n.tick(5);
    assert_eq!(n.primary.retention_floor(), Some(Lsn(1)));
    n.plog.flush_checkpoint();
    assert!(
        n.plog.retained_start() <= Lsn(2),
        "WAL needed by the replica was recycled"
    );
}

#[test]
fn retention_time_budget_escalates_and_releases_the_hold() {
    let c = PrimaryConfig {
        wal_retention_timeout_ms: 100,
        ..cfg()
    };
    let mut n = Net::new(1, c, &["p"]);
    n.tick(1);
    n.write(0, 1);
    n.flush();
    n.replicas[0].reachable = false;
    n.drop_conns_of(0);
    n.tick(50);
    assert!(n.primary.retention_floor().is_some());
    n.tick(100);
    assert_eq!(n.state("r0"), ReplicaState::NeedsRebuild);
    assert_eq!(n.primary.retention_floor(), None);
}

#[test]
fn retention_byte_budget_escalates_a_lagging_replica() {
    let c = PrimaryConfig {
        wal_retention_bytes_max: 200,
        ..cfg()
    };
    let mut n = Net::new(1, c, &["p"]);
    n.tick(1);
    n.replicas[0].reachable = false;
    n.drop_conns_of(0);
    for i in 0..20 {
        n.write(i, 1);
    }
    n.tick(5);
    assert_eq!(n.state("r0"), ReplicaState::NeedsRebuild);
    assert_eq!(n.primary.retention_floor(), None);
}

#[test]
fn epoch_change_mid_catch_up_invalidates_the_session_and_releases_pins() {
    let mut n = Net::new(1, cfg(), &["p"]);
    n.replicas[0].reachable = false;
    for i in 0..10 {
        n.write(i, 1);
    }
    n.replicas[0].reachable = true;
    n.replicas[0].mute_barriers = true;
    n.tick(20);
    assert_eq!(n.state("r0"), ReplicaState::CatchingUp);
    let holds_before = n.primary.pinner().len();
    assert!(holds_before >= 1);
    n.plog.set_epoch(Epoch(2)).unwrap();
    n.input(Input::EpochChanged(Epoch(2)));
    let names = n.event_names();
    let inv = names
        .iter()
        .rposition(|e| *e == "session_invalidated")
        .expect("session_invalidated logged");
    let rel = names
        .iter()
        .rposition(|e| *e == "exec_resources_released")
        .expect("resources released");
    assert!(inv < rel);
    assert!(n.events.iter().any(
        |e| matches!(&e.kind, EventKind::SessionInvalidated { reason } if reason == "epoch_changed")
    ));
    assert!(
        n.primary.pinner().len() < holds_before,
        "catch-up pin still held"
    );
    assert_eq!(n.state("r0"), ReplicaState::Disconnected);
}

#[test]
fn endpoint_change_keeps_replica_identity_and_invalidates_its_session() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.tick(1);
    n.write(0, 1);
    let f = n.flush();
    assert!(n.is_acked(f));
    n.replicas[0].addr_gen = 1;
    let peers = n.peers();
    n.input(Input::PeersAssigned(peers));
    assert!(n.events.iter().any(|e| matches!(&e.kind, EventKind::SessionInvalidated { reason } if reason == "endpoint_changed")));
    // Same sender: progress and counting survive the address change.
    assert_eq!(n.primary.flushed_of(&rid("r0")), Some(Lsn(1)));
    assert!(n.primary.is_counted(&rid("r0")));
    n.tick(20);
    assert_eq!(n.state("r0"), ReplicaState::InSync);
}

#[test]
fn replica_ahead_with_unflushed_suffix_is_truncated_to_primary_head() {
    let mut n = Net::new(1, cfg(), &["p"]);
    n.tick(1);
    n.write(0, 1);
    n.flush();
    // The replica holds entries the primary never had (an old primary's tail), unsynced.
    n.replicas[0].reachable = false;
    n.drop_conns_of(0);
    let extra = engine::replication::WalEntry {
        lsn: Lsn(2),
        epoch: Epoch(1),
        lba: Lba(9),
        kind: EntryKind::Write,
        blocks: 1,
        data: vec![9; 8],
    };
    n.replicas[0].log.append_replicated(&extra).unwrap();
    n.replicas[0].reachable = true;
    n.tick(20);
    assert!(
        n.replicas[0]
            .events
            .iter()
            .any(|e| matches!(e, ReceiverEvent::Truncated { after: Lsn(1) }))
    );
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    assert_eq!(n.replicas[0].log.head_lsn(), Lsn(1));
}

/// No (epoch, LSN) may name two different entries on any two logs.
fn same_epoch_and_lsn_means_same_entry(a: &MemLog, b: &MemLog) -> Result<(), String> {
    let top = a.head_lsn().max(b.head_lsn());
    let mut l = Lsn(1);
    while l <= top {
        if let (Some(x), Some(y)) = (a.entry_at(l), b.entry_at(l))
            && x.epoch == y.epoch
            && x != y
        {
            return Err(format!(
                "LSN {l} at epoch {} holds different entries: {x:?} vs {y:?}",
                x.epoch
            ));
        }
        l = l.next();
    }
    Ok(())
}

/// A replica fsyncs what it received every flusher cycle, so it can hold more durably
/// than the primary; the primary then loses its unsynced tail in a power loss. Restarted
/// at the same epoch it would issue those LSNs again with other data, and a replica
/// whose flushed LSN carries that same epoch would keep its old entries (log matching
/// compares epochs only). A reopened log refuses a primary term at its persisted epoch,
/// so the restarted primary serves at a new epoch and the handshake sees the divergence
/// and truncates the replica where the histories part.
#[test]
fn a_primary_restarted_after_power_loss_never_reissues_lsns_at_its_old_epoch() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.tick(1);
    for lba in 0..5 {
        n.write(lba, 1);
    }
    let f = n.flush();
    assert!(n.is_acked(f));
    // Shipped on append, before the primary's own fsync; the replica's flusher syncs them.
    for lba in 5..10 {
        n.write(lba, 1);
    }
    assert_eq!(n.replicas[0].log.head_lsn(), Lsn(10));
    n.replicas[0].log.sync().unwrap();
    assert_eq!(
        (n.plog.durable_lsn(), n.replicas[0].log.durable_lsn()),
        (Lsn(5), Lsn(10))
    );
    // Power loss takes the primary's node; the replica is out of reach when its agent
    // returns (and was dropped from the committed set meanwhile).
    n.replicas[0].reachable = false;
    let epoch = n.restart_primary_after_power_loss(&["p"]);
    assert_eq!(n.plog.head_lsn(), Lsn(5), "the unsynced tail is gone");
    // The client writes other data; its flush is acknowledged by the primary alone.
    for lba in 5..12 {
        n.write(lba, 2);
    }
    let f = n.flush();
    assert!(n.is_acked(f));
    // The replica comes back and handshakes. Its entry at LSN 10 is older (epoch 1) than
    // the primary's (epoch 2): the handshake finds the last LSN both hold at epoch 1 (5),
    // the replica drops its other entries 6..10 and catches up; no rebuild.
    n.replicas[0].reachable = true;
    n.settle();
    same_epoch_and_lsn_means_same_entry(&n.plog, &n.replicas[0].log).unwrap();
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    let head = n.plog.head_lsn();
    assert_eq!(n.replicas[0].log.head_lsn(), head);
    assert_eq!(n.replicas[0].log.state_at(head), n.plog.state_at(head));
    assert_eq!(epoch, Epoch(2), "served again only at a new epoch");
}

/// Gives replica `r` a durable history of its own: LSN 1 at epoch 7, which no primary
/// here wrote, so its log no longer matches the primary's.
fn diverge(n: &mut Net, r: usize) {
    let other = engine::replication::WalEntry {
        lsn: Lsn(1),
        epoch: Epoch(7),
        lba: Lba(9),
        kind: EntryKind::Write,
        blocks: 1,
        data: vec![9; 8],
    };
    n.replicas[r].log.append_replicated(&other).unwrap();
    n.replicas[r].log.sync().unwrap();
}

#[test]
fn diverged_replica_history_needs_rebuild() {
    let mut n = Net::new(1, cfg(), &["p"]);
    n.replicas[0].reachable = false;
    n.write(0, 1);
    n.write(1, 1);
    diverge(&mut n, 0);
    n.replicas[0].reachable = true;
    n.tick(20);
    assert_eq!(n.state("r0"), ReplicaState::NeedsRebuild);
}

/// A primary whose only other member, r0, stayed away past its retention budget while
/// the primary checkpointed and recycled the WAL it needed: r0 now needs a rebuild.
fn replica_behind_recycled_wal() -> Net {
    let c = PrimaryConfig {
        wal_retention_timeout_ms: 10,
        ..cfg()
    };
    let mut n = Net::new(1, c, &["p"]);
    n.replicas[0].reachable = false;
    for i in 0..12 {
        n.write(i % 5, i as u8);
    }
    n.plog.sync().unwrap();
    // The replica stays away past its retention budget, so its WAL hold is released.
    n.tick(20);
    n.plog.flush_checkpoint();
    for i in 0..4 {
        n.write(i, 100 + i as u8);
    }
    // Make the WAL prefix unavailable so the handshake asks for a rebuild.
    n.plog.set_retention_floor(None);
    n.replicas[0].reachable = true;
    n.tick(20);
    assert_eq!(n.state("r0"), ReplicaState::NeedsRebuild);
    n
}

#[test]
fn rebuild_from_snapshot_and_tail_converges_and_only_a_barrier_grants_in_sync() {
    let mut n = replica_behind_recycled_wal();
    n.input(Input::RebuildRequested(rid("r0")));
    assert!(
        n.events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::PlanCreated(p) if p.contains("Snapshot")))
    );
    n.settle();
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    let head = n.plog.head_lsn();
    assert_eq!(n.replicas[0].log.state_at(head), n.plog.state_at(head));
    assert_eq!(
        n.primary.pinner().len(),
        1,
        "rebuild pins released, progress hold kept"
    );
}

#[test]
fn rebuild_uses_full_base_when_the_checkpoint_is_not_usable() {
    let mut n = Net::new(1, cfg(), &["p"]);
    n.replicas[0].reachable = false;
    for i in 0..6 {
        n.write(i, i as u8);
    }
    n.replicas[0].reachable = true;
    n.tick(1);
    // Force the escalation path via a diverged history.
    n.replicas[0].reachable = false;
    n.drop_conns_of(0);
    n.replicas[0].log = MemLog::new();
    diverge(&mut n, 0);
    n.replicas[0].reachable = true;
    n.tick(20);
    assert_eq!(n.state("r0"), ReplicaState::NeedsRebuild);
    n.input(Input::RebuildRequested(rid("r0")));
    assert!(
        n.events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::PlanCreated(p) if p.contains("FullBase")))
    );
    n.settle();
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    let head = n.plog.head_lsn();
    assert_eq!(n.replicas[0].log.state_at(head), n.plog.state_at(head));
}

#[test]
fn rebuild_pin_failure_is_logged_and_leaves_no_session() {
    let mut n = Net::new(1, cfg(), &["p"]);
    n.replicas[0].reachable = false;
    n.write(0, 1);
    n.replicas[0].reachable = true;
    diverge(&mut n, 0);
    n.tick(20);
    n.plog.fail_pin_base = true;
    n.input(Input::RebuildRequested(rid("r0")));
    assert!(n.event_names().contains(&"pin_failed"));
    assert_eq!(n.state("r0"), ReplicaState::NeedsRebuild);
    assert_eq!(n.primary.pinner().len(), 0);
}

#[test]
fn rebuild_of_a_committed_member_is_refused() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.replicas[0].reachable = false;
    n.write(0, 1);
    diverge(&mut n, 0);
    n.replicas[0].reachable = true;
    n.tick(20);
    assert_eq!(n.state("r0"), ReplicaState::NeedsRebuild);
    n.input(Input::RebuildRequested(rid("r0")));
    assert_eq!(
        n.state("r0"),
        ReplicaState::NeedsRebuild,
        "a committed member was wiped"
    );
    assert!(n.reports.iter().any(
        |r| matches!(r, Report::MemberUnreachable { replica, .. } if replica.as_str() == "r0")
    ));
}

#[test]
fn refused_rebuild_of_a_committed_member_starts_once_it_leaves_the_set() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.replicas[0].reachable = false;
    n.write(0, 1);
    diverge(&mut n, 0);
    n.replicas[0].reachable = true;
    n.tick(20);
    assert_eq!(n.state("r0"), ReplicaState::NeedsRebuild);
    n.input(Input::RebuildRequested(rid("r0")));
    assert_eq!(n.state("r0"), ReplicaState::NeedsRebuild);
    // The control plane drops it from the set; nobody asks again, yet it is rebuilt.
    n.input(Input::InSyncSetCommitted {
        generation: Generation(2),
        members: vec![rid("p")],
    });
    assert!(
        n.events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::PlanCreated(_))),
        "the deferred rebuild never started: {:?}",
        n.event_names()
    );
    n.settle();
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    let head = n.plog.head_lsn();
    assert_eq!(n.replicas[0].log.state_at(head), n.plog.state_at(head));
}

#[test]
fn committed_member_reported_unreachable_is_reported_in_sync_when_it_returns() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.tick(1);
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    n.replicas[0].reachable = false;
    n.drop_conns_of(0);
    n.write(3, 1);
    let f = n.flush();
    n.tick(60);
    assert!(n.reports.iter().any(|r| matches!(r,
        Report::MemberUnreachable { replica, generation } if replica.as_str() == "r0" && *generation == Generation(1))));
    let before = n.reports.len();
    // It comes back before the control plane acted: the primary must say so, or the
    // control plane keeps it listed unreachable.
    n.replicas[0].reachable = true;
    n.settle();
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    assert!(n.is_acked(f));
    assert!(
        n.reports[before..].iter().any(|r| matches!(r,
            Report::MemberInSync { replica, generation, .. } if replica.as_str() == "r0" && *generation == Generation(1))),
        "no in-sync report after the unreachable one: {:?}",
        &n.reports[before..]
    );
}

#[test]
fn rebuild_installs_the_base_before_the_tail_so_newer_wal_wins() {
    let mut rx = Rx::default();
    rx.send(Body::RebuildStart {
        session: 4,
        base_lsn: Lsn(10),
        base_epoch: Epoch(1),
        target: Lsn(11),
        primary: None,
        base_bytes: Some(16),
    });
    // Entries before the base is complete are refused, never mixed under the base.
    let early = engine::replication::WalEntry {
        lsn: Lsn(11),
        epoch: Epoch(1),
        lba: Lba(3),
        kind: EntryKind::Write,
        blocks: 1,
        data: vec![0xAA; 8],
    };
    assert!(!errors(&rx.send(Body::Entry(early.clone()))).is_empty());
    let mut done = 0;
    for (lba, byte) in [(3, 0x11), (4, 0x22)] {
        rx.send(Body::BaseBlock {
            session: 4,
            lba: Lba(lba),
            data: vec![byte; 8],
        });
        // The progress the replica reports counts the announced base bytes installed.
        done += 8;
        let p = rx
            .core
            .rebuild_progress()
            .expect("progress during the base copy");
        assert_eq!((p.bytes_done, p.bytes_total), (done, 16));
    }
    rx.send(Body::BaseDone {
        session: 4,
        blocks: 2,
    });
    assert!(!rx.log.rebuilding());
    assert_eq!(rx.core.rebuild_progress(), None);
    assert_eq!(rx.log.durable_lsn(), Lsn(10));
    rx.send(Body::Entry(early));
    let s = rx.log.state_at(Lsn(11));
    assert_eq!(s.get(&Lba(3)), Some(&vec![0xAA; 8]));
    assert_eq!(s.get(&Lba(4)), Some(&vec![0x22; 8]));
}

#[test]
fn base_done_with_a_missing_block_fails_the_rebuild() {
    let mut rx = Rx::default();
    rx.send(Body::RebuildStart {
        session: 4,
        base_lsn: Lsn(10),
        base_epoch: Epoch(1),
        target: Lsn(10),
        primary: None,
        base_bytes: None,
    });
    rx.send(Body::BaseBlock {
        session: 4,
        lba: Lba(3),
        data: vec![0x11; 8],
    });
    let out = rx.send(Body::BaseDone {
        session: 4,
        blocks: 2,
    });
    assert!(errors(&out).contains(&ErrorCode::RebuildFailed));
    assert!(
        rx.log.rebuilding(),
        "an incomplete base was declared finished"
    );
}

#[test]
fn interrupted_rebuild_answers_handshake_with_needs_rebuild() {
    let mut rx = Rx::default();
    rx.send(Body::RebuildStart {
        session: 4,
        base_lsn: Lsn(10),
        base_epoch: Epoch(1),
        target: Lsn(11),
        primary: None,
        base_bytes: None,
    });
    let out = rx.send_on(
        2,
        1,
        Body::ResumeRequest {
            session: 5,
            head: Lsn(11),
            retained_start: Lsn(1),
            primary: None,
        },
    );
    assert!(bodies(&out).iter().any(|b| matches!(
        b,
        Body::ResumeResponse {
            status: ResumeStatus::NeedsRebuild,
            ..
        }
    )));
}

#[test]
fn entries_are_shipped_in_lsn_order_and_out_of_order_appends_are_ignored() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.tick(1);
    for i in 0..5 {
        n.write(i, 1);
    }
    let e = engine::replication::WalEntry {
        lsn: Lsn(3),
        epoch: Epoch(1),
        lba: Lba(0),
        kind: EntryKind::Trim,
        blocks: 1,
        data: Vec::new(),
    };
    n.input(Input::Appended(e));
    let lsns: Vec<u64> = n
        .sent
        .iter()
        .filter_map(|(_, m)| match &m.body {
            Body::Entry(e) => Some(e.lsn.0),
            _ => None,
        })
        .collect();
    assert_eq!(lsns, vec![1, 2, 3, 4, 5]);
}

#[test]
fn heartbeat_answers_give_the_primary_its_member_proof() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    assert_eq!(n.primary.member_proof_ms(), None);
    n.tick(1);
    n.tick(1_000);
    let proof = n.primary.member_proof_ms().expect("proof");
    assert!(
        proof >= 1_000,
        "proof {proof} is older than the last heartbeat"
    );
}

/// The proof dates from when the answered heartbeat left, never from when its answer
/// came: a member may have persisted a newer epoch right after answering.
#[test]
fn the_member_proof_dates_from_the_heartbeat_not_its_answer() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.tick(1);
    n.tick(1_000);
    let sent_at = n.now;
    let first = n.primary.member_proof_ms().expect("proof");
    assert_eq!(
        first, sent_at,
        "the proof rests on the heartbeat sent at {sent_at}"
    );
    // The member stops answering (a hung peer); time passes, heartbeats go unanswered.
    n.replicas[0].blackhole = true;
    n.tick(1_000);
    n.tick(1_000);
    assert_eq!(
        n.primary.member_proof_ms(),
        Some(first),
        "unanswered heartbeats must not renew the proof"
    );
}

/// A member that has persisted a newer epoch answers no heartbeat at this one: the old
/// primary's proof is gone at the member's first answer.
#[test]
fn a_member_at_a_newer_epoch_ends_the_member_proof() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.tick(1);
    n.tick(1_000);
    assert!(n.primary.member_proof_ms().is_some());
    n.replicas[0].log.set_epoch(Epoch(2)).unwrap();
    n.tick(1_000);
    n.tick(1_000);
    assert_eq!(n.primary.member_proof_ms(), None);
}

/// Without another committed member nobody else can be promoted: the proof holds alone.
#[test]
fn a_primary_without_other_members_holds_its_own_proof() {
    let mut n = Net::new(1, cfg(), &["p"]);
    n.tick(5_000);
    assert_eq!(n.primary.member_proof_ms(), Some(n.now));
}

#[test]
fn local_fsync_failure_fails_flushes_and_reports_the_disk() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.tick(1);
    n.write(0, 1);
    n.plog.fail_next_sync = true;
    let f = n.flush();
    assert!(n.failed.contains(&f));
    assert!(n.reports.contains(&Report::LocalDiskFailed));
}

#[test]
fn endpoints_must_be_canonical_ip_and_port() {
    assert!(Endpoint::parse("10.0.0.5:7000").is_ok());
    assert!(Endpoint::parse(":7000").is_err());
    assert!(Endpoint::parse("0.0.0.0:7000").is_err());
    assert!(Endpoint::parse("[::]:7000").is_err());
    assert!(Endpoint::parse("10.0.0.5:0").is_err());
    assert!(Endpoint::parse("node-a:7000").is_err());
}

#[test]
fn replica_identity_is_validated_and_never_an_address_format_requirement() {
    assert!(ReplicaId::new("pvc-1/node-a").is_ok());
    assert!(ReplicaId::new("").is_err());
    assert!(ReplicaId::new("a b").is_err());
    assert!(ReplicaId::new("x".repeat(254)).is_err());
}

#[test]
fn reassigning_the_same_endpoints_keeps_the_live_session() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.tick(1);
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    let peers = n.peers();
    n.input(Input::PeersAssigned(peers));
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    assert!(
        !n.event_names().contains(&"session_invalidated"),
        "an unchanged assignment was treated as an endpoint change"
    );
}

#[test]
fn member_that_has_not_connected_yet_keeps_the_wal_it_will_need() {
    let mut n = Net::new(1, cfg(), &["p"]);
    n.replicas[0].reachable = false;
    for i in 0..10 {
        n.write(i, 1);
    }
    let f = n.flush();
    n.tick(5);
    assert!(n.is_acked(f));
    n.plog.flush_checkpoint();
    assert!(
        n.plog.retained_start() <= Lsn(1),
        "WAL recycled before the member's first handshake: retained start {}",
        n.plog.retained_start()
    );
    n.replicas[0].reachable = true;
    n.tick(50);
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    assert!(
        !n.event_names().contains(&"escalated_needs_rebuild"),
        "a member that was only slow to connect must catch up, not be rebuilt"
    );
}

fn barriers_sent(n: &Net) -> usize {
    n.sent
        .iter()
        .filter(|(_, m)| matches!(m.body, Body::BarrierRequest { .. }))
        .count()
}

#[test]
fn pressure_barriers_advance_the_retention_floor_without_a_flush() {
    let cfg = PrimaryConfig {
        pressure_barrier_bytes: 200,
        background_barrier_interval_ms: u64::MAX,
        ..cfg()
    };
    let mut n = Net::new(2, cfg, &["p", "r0", "r1"]);
    n.tick(1);
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    let before = barriers_sent(&n);
    let mut last = Lsn(0);
    for i in 0..50u64 {
        last = n.write(i, i as u8);
    }
    assert!(barriers_sent(&n) > before, "no barrier without a flush");
    // Every replica fsynced most of the run and the floor followed, with nothing acked.
    let floor = n.primary.retention_floor().expect("replicas hold WAL");
    assert!(
        floor.0 + 10 >= last.0,
        "floor {floor} stuck far below head {last}"
    );
    for r in &n.replicas {
        assert!(r.log.durable_lsn() >= floor);
    }
    assert!(n.acked.is_empty(), "a background barrier acked a flush");
    assert!(n.failed.is_empty());
}

#[test]
fn background_barrier_timer_reports_small_bursts() {
    let cfg = PrimaryConfig {
        pressure_barrier_bytes: u64::MAX,
        background_barrier_interval_ms: 50,
        ..cfg()
    };
    let mut n = Net::new(1, cfg, &["p", "r0"]);
    // The handshake's barrier just went out; the next one is due 50 ms after it.
    n.tick(1);
    let l = n.write(1, 1);
    n.tick(20);
    assert!(
        n.replicas[0].log.durable_lsn() < l,
        "barrier before the interval"
    );
    n.tick(40);
    assert!(n.replicas[0].log.durable_lsn() >= l);
    assert_eq!(n.primary.retention_floor(), Some(l));
    assert!(n.acked.is_empty());
}

#[test]
fn stuck_member_without_flushes_is_escalated_by_its_retention_budget() {
    let cfg = PrimaryConfig {
        pressure_barrier_bytes: 200,
        wal_retention_bytes_max: 2_000,
        ..cfg()
    };
    let mut n = Net::new(2, cfg, &["p", "r0", "r1"]);
    n.tick(1);
    n.replicas[1].blackhole = true;
    for i in 0..20u64 {
        n.write(i, 1);
    }
    // r1's pressure barrier times out; the unflushed bytes it holds exceed its budget.
    n.tick(150);
    for i in 0..100u64 {
        n.write(i, 2);
    }
    n.tick(5);
    assert_eq!(n.state("r1"), ReplicaState::NeedsRebuild);
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    let floor = n.primary.retention_floor().expect("r0 holds WAL");
    assert!(
        floor > Lsn(20),
        "the stuck member still pins the floor at {floor}"
    );
}

#[test]
fn gate_is_local_only_exactly_without_peers_or_committed_members() {
    let n = Net::new(0, cfg(), &["p"]);
    assert!(n.primary.gate_is_local_only());
    let n = Net::new(1, cfg(), &["p"]);
    assert!(!n.primary.gate_is_local_only(), "an assigned peer may join");
    let n = Net::new(0, cfg(), &["p", "r0"]);
    assert!(!n.primary.gate_is_local_only(), "a committed member counts");
}

#[test]
fn member_is_not_granted_in_sync_below_a_locally_acked_flush() {
    // The shell acknowledged a flush of LSN 2 by the local fsync alone, before the core
    // had even seen the appends (they are still queued). A replica joining now must not
    // be granted InSync at the core's older head.
    let mut n = Net::new(1, cfg(), &["p"]);
    let queued: Vec<_> = (0..2u8)
        .map(|i| {
            n.plog
                .append_local(EntryKind::Write, Lba(u64::from(i)), 1, vec![i; 8])
                .unwrap()
        })
        .collect();
    n.input(Input::AckedLocally { lsn: Lsn(2) });
    assert_eq!(n.primary.acked_high(), Lsn(2));
    n.settle();
    assert_ne!(n.state("r0"), ReplicaState::InSync);
    assert!(!n.primary.is_counted(&rid("r0")));
    assert!(
        !n.reports
            .iter()
            .any(|r| matches!(r, Report::MemberInSync { .. }))
    );
    // Once the appends reach the core they are shipped, and the next barrier grants.
    for e in queued {
        n.input(Input::Appended(e));
    }
    n.tick(PrimaryConfig::default().background_barrier_interval_ms);
    n.settle();
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    assert!(n.replicas[0].log.durable_lsn() >= Lsn(2));
}

/// Two primaries at one epoch (an operator leadership overlap wrote two replicas as
/// primary at E) talking to one replica. The first primary that opened a session at E
/// owns E on that replica: the second, another ReplicaID, is refused at its handshake
/// (never truncates, ships to or gets a barrier ack from the replica) and fences
/// itself; the first keeps replicating and acknowledging flushes.
#[test]
fn a_second_primary_at_the_same_epoch_is_refused_and_the_first_keeps_working() {
    let mut n = Net::new(1, cfg(), &["p", "r0"]);
    n.tick(1);
    for i in 0..3 {
        n.write(i, 0x10 + i as u8);
    }
    let f = n.flush();
    assert!(n.is_acked(f));
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    let before: Vec<WalEntryBytes> = (1..=3)
        .map(|l| entry_bytes(&n.replicas[0].log, l))
        .collect();

    // The second primary, q, at the same epoch with its own (different) history.
    let mut qlog = MemLog::new();
    qlog.set_epoch(Epoch(1)).unwrap();
    let mut q = PrimaryCore::new(
        vol(),
        rid("q"),
        Epoch(1),
        cfg(),
        Generation(1),
        vec![rid("q"), rid("r0")],
        &qlog,
    );
    // q's connection ids live in their own range on the replica's side.
    let on_replica = |c: ConnId| ConnId(1_000_000 + c.0);
    let mut q_inputs: VecDeque<Input> = VecDeque::new();
    let mut q_reports = Vec::new();
    let mut q_acked = Vec::new();
    let mut q_failed = Vec::new();
    let e = qlog
        .append_local(EntryKind::Write, Lba(0), 1, vec![0xEE; 8])
        .unwrap();
    q_inputs.push_back(Input::PeersAssigned(vec![Peer {
        id: rid("r0"),
        endpoint: endpoint(0, 0),
    }]));
    q_inputs.push_back(Input::Appended(e));
    q_inputs.push_back(Input::FlushRequested(FlushId(77)));
    for _ in 0..20 {
        q_inputs.push_back(Input::Tick);
    }
    let mut steps = 0;
    while let Some(i) = q_inputs.pop_front() {
        steps += 1;
        assert!(steps < 100_000, "q's network did not quiesce");
        n.now += 1;
        for a in q.step(n.now, i, &mut qlog) {
            match a {
                Action::Connect { conn, .. } => q_inputs.push_back(Input::Connected(conn)),
                Action::Send { conn, msg } => {
                    let rep = &mut n.replicas[0];
                    let acts = step_blocking(
                        &mut rep.core,
                        n.now,
                        ReceiverInput::Received {
                            conn: on_replica(conn),
                            msg,
                        },
                        &mut rep.log,
                    );
                    rep.events.extend(rep.core.take_events());
                    for ra in acts {
                        if let ReceiverAction::Send { msg, .. } = ra {
                            q_inputs.push_front(Input::Received { conn, msg });
                        }
                    }
                }
                Action::Close { conn, .. } => {
                    let rep = &mut n.replicas[0];
                    step_blocking(
                        &mut rep.core,
                        n.now,
                        ReceiverInput::ConnectionLost(on_replica(conn)),
                        &mut rep.log,
                    );
                }
                Action::LocalFsync { .. } => {
                    let d = qlog.sync().unwrap();
                    q_inputs.push_back(Input::LocalFsyncDone { durable: d });
                }
                Action::FlushAcked { id, .. } => q_acked.push(id),
                Action::FlushFailed { id, .. } => q_failed.push(id),
                Action::Report(r) => q_reports.push(r),
            }
        }
    }
    assert!(
        q_acked.is_empty(),
        "the second primary got a flush acknowledged"
    );
    assert!(q_failed.contains(&FlushId(77)));
    assert!(
        q_reports.iter().any(|r| matches!(r, Report::Fenced { .. })),
        "the refused primary fences itself: {q_reports:?}"
    );
    assert!(
        !n.replicas[0]
            .events
            .iter()
            .any(|e| matches!(e, ReceiverEvent::Truncated { .. })),
        "the second primary truncated the replica"
    );
    let after: Vec<WalEntryBytes> = (1..=3)
        .map(|l| entry_bytes(&n.replicas[0].log, l))
        .collect();
    assert_eq!(
        before, after,
        "the replica's history is the first primary's"
    );

    // The first primary keeps working on its session.
    let l = n.write(5, 0x55);
    let f = n.flush();
    assert!(
        n.is_acked(f),
        "the owner's flush must still be acknowledged"
    );
    assert_eq!(entry_bytes(&n.replicas[0].log, l.0), Some(vec![0x55; 8]));
    n.settle();
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    assert!(n.primary.fenced().is_none());
}

type WalEntryBytes = Option<Vec<u8>>;

fn entry_bytes(log: &MemLog, lsn: u64) -> WalEntryBytes {
    log.entry_at(Lsn(lsn)).map(|e| e.data.clone())
}

/// The receiver's side of one primary per epoch, message by message: a handshake from a
/// primary of an older build (no identity) is accepted while nobody owns the epoch; the
/// first named primary owns it; from then on only that primary's handshakes (on any
/// connection) open a session, and entries and barriers on any other connection are
/// refused.
#[test]
fn receiver_binds_an_epoch_to_the_first_named_primary() {
    let mut rx = Rx::default();
    rx.log.set_epoch(Epoch(1)).unwrap();
    rx.now = 1;
    let send = |rx: &mut Rx, conn: u64, body: Body| bodies(&rx.send_on(conn, 1, body));
    let resume = |primary: Option<&str>| Body::ResumeRequest {
        session: 1,
        head: Lsn(0),
        retained_start: Lsn(1),
        primary: primary.map(rid),
    };
    let owned = |b: &[Body]| {
        matches!(
            b,
            [Body::Error {
                code: ErrorCode::SessionOwned,
                ..
            }]
        )
    };
    let ok = |b: &[Body]| matches!(b, [Body::ResumeResponse { .. }]);
    assert!(
        ok(&send(&mut rx, 1, resume(None))),
        "unowned: an old primary is served"
    );
    assert!(ok(&send(&mut rx, 2, resume(Some("p")))));
    assert!(owned(&send(&mut rx, 3, resume(Some("q")))));
    assert!(owned(&send(&mut rx, 4, resume(None))));
    assert!(ok(&send(&mut rx, 5, resume(Some("p")))), "p reconnects");
    let entry = |lsn: u64| Body::Entry(common::receiver::entry(lsn));
    // The unnamed session of conn 1 ended when p took the epoch; q never had one.
    for conn in [1, 3, 4] {
        let r = send(&mut rx, conn, entry(1));
        assert!(
            matches!(
                r.as_slice(),
                [Body::Error {
                    code: ErrorCode::NoSession,
                    ..
                }]
            ),
            "conn {conn}: {r:?}"
        );
        let r = send(&mut rx, conn, Body::BarrierRequest { id: 1, lsn: Lsn(0) });
        assert!(
            !matches!(
                r.as_slice(),
                [Body::BarrierResponse {
                    status: BarrierStatus::Ok,
                    ..
                }]
            ),
            "conn {conn}: {r:?}"
        );
    }
    assert_eq!(rx.log.head_lsn(), Lsn(0));
    // p's connections carry the session.
    assert!(send(&mut rx, 5, entry(1)).is_empty());
    assert!(send(&mut rx, 2, entry(2)).is_empty());
    assert_eq!(rx.log.head_lsn(), Lsn(2));
    assert!(matches!(
        send(&mut rx, 2, Body::Heartbeat { seq: 2 }).as_slice(),
        [Body::HeartbeatAck { seq: 2 }]
    ));
}

/// Recovery bytes the core reports for replica `i`'s messages in `sent[from..]`: WAL
/// entries (encoded size) and base blocks.
fn shipped_bytes(n: &Net, i: usize, from: usize) -> u64 {
    n.sent[from..]
        .iter()
        .filter(|(to, _)| *to == i)
        .map(|(_, m)| match &m.body {
            Body::Entry(e) => engine::replication::entry_bytes(e),
            Body::BaseBlock { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum()
}

#[test]
fn recovery_bytes_count_catch_up_entries_and_never_live_shipping() {
    let mut n = Net::new(2, cfg(), &["p", "r0", "r1"]);
    n.tick(1);
    n.replicas[1].reachable = false;
    n.drop_conns_of(1);
    let live_from = n.sent.len();
    for i in 0..20 {
        n.write(i, i as u8);
    }
    assert!(
        shipped_bytes(&n, 0, live_from) > 0,
        "r0 got the writes live"
    );
    n.input(Input::InSyncSetCommitted {
        generation: Generation(2),
        members: vec![rid("p"), rid("r0")],
    });
    let catch_up_from = n.sent.len();
    n.replicas[1].reachable = true;
    n.tick(20);
    n.settle();
    assert_eq!(n.state("r1"), ReplicaState::InSync);
    let caught_up = shipped_bytes(&n, 1, catch_up_from);
    assert!(caught_up > 0);
    let bytes = n.primary.recovery_bytes();
    let r1 = bytes.get(&rid("r1")).copied().unwrap_or_default();
    assert_eq!(r1.catch_up, caught_up, "every entry the catch-up sent");
    assert_eq!(r1.rebuild, 0);
    assert!(
        bytes.get(&rid("r0")).is_none(),
        "live shipping to a member that kept up is no recovery: {bytes:?}"
    );
    // Once live again, new writes add nothing.
    n.write(3, 9);
    n.settle();
    assert_eq!(n.primary.recovery_bytes()[&rid("r1")].catch_up, caught_up);
}

#[test]
fn recovery_bytes_count_rebuild_blocks_and_entries_as_rebuild() {
    let mut n = replica_behind_recycled_wal();
    let before = n.primary.recovery_bytes().get(&rid("r0")).copied();
    let rebuild_from = n.sent.len();
    n.input(Input::RebuildRequested(rid("r0")));
    n.settle();
    assert_eq!(n.state("r0"), ReplicaState::InSync);
    let shipped = shipped_bytes(&n, 0, rebuild_from);
    assert!(shipped > 0);
    let r0 = n.primary.recovery_bytes()[&rid("r0")];
    assert_eq!(
        r0.rebuild, shipped,
        "base blocks and entries of the rebuild"
    );
    assert_eq!(
        r0.catch_up,
        before.map_or(0, |b| b.catch_up),
        "a rebuild adds nothing to catch-up bytes"
    );
}

/// A primary pipelines a truncation, the catch-up entries and a barrier. When the replica
/// refuses the truncation (its entry at the divergence point has another epoch: its own
/// suffix diverged further down), it must accept nothing more of that session: the
/// entries after its head would land on top of its diverged suffix, the barrier would
/// report them durable, and the primary's log matching (which compares the epoch at the
/// replica's flushed LSN) would then take the mixed log for its own.
#[test]
fn a_replica_that_refused_a_truncation_accepts_no_entries_of_that_session() {
    let mut rx = Rx::default();
    let log = &mut rx.log;
    log.set_epoch(Epoch(1)).unwrap();
    for _ in 1..=5 {
        log.append_local(EntryKind::Write, Lba(0), 1, vec![1; 8])
            .unwrap();
    }
    // Its own suffix at epoch 2 (a primary at epoch 2 that replicated none of it).
    log.set_epoch(Epoch(2)).unwrap();
    for _ in 6..=8 {
        log.append_local(EntryKind::Write, Lba(1), 1, vec![2; 8])
            .unwrap();
    }
    log.sync().unwrap();
    let send = |rx: &mut Rx, body: Body| bodies(&rx.send_on(1, 3, body));
    let r = send(
        &mut rx,
        Body::ResumeRequest {
            session: 1,
            head: Lsn(10),
            retained_start: Lsn(1),
            primary: Some(rid("p")),
        },
    );
    assert!(
        matches!(r.as_slice(), [Body::ResumeResponse { .. }]),
        "{r:?}"
    );
    // The primary's history: epoch 1 up to 7, then its own entries at epoch 3.
    let r = send(
        &mut rx,
        Body::Truncate {
            session: 1,
            after: Lsn(7),
            expect_epoch: Epoch(1),
        },
    );
    assert!(
        matches!(
            r.as_slice(),
            [Body::Error {
                code: ErrorCode::TruncateRefused,
                ..
            }]
        ),
        "{r:?}"
    );
    for lsn in 8..=10 {
        send(
            &mut rx,
            Body::Entry(engine::replication::WalEntry {
                lsn: Lsn(lsn),
                epoch: if lsn <= 7 { Epoch(1) } else { Epoch(3) },
                kind: EntryKind::Write,
                lba: Lba(2),
                blocks: 1,
                data: vec![3; 8],
            }),
        );
    }
    let r = send(
        &mut rx,
        Body::BarrierRequest {
            id: 1,
            lsn: Lsn(10),
        },
    );
    assert_eq!(
        rx.log.head_lsn(),
        Lsn(8),
        "entries were appended on top of the diverged suffix"
    );
    assert!(
        !r.iter().any(|b| matches!(
            b,
            Body::BarrierResponse {
                status: BarrierStatus::Ok,
                ..
            }
        )),
        "a barrier was answered after the refused truncation: {r:?}"
    );
}

#[test]
fn a_barrier_is_answered_only_when_its_fsync_is_done() {
    let mut rx = Rx::holding_syncs();
    assert!(syncs(&rx.entry(1)).is_empty(), "no barrier waits yet");
    let out = rx.barrier(7, 1);
    assert_eq!(syncs(&out), vec![Lsn(1)]);
    assert!(
        barrier_answers(&out).is_empty(),
        "answered before the fsync"
    );
    assert_eq!(rx.log.durable_lsn(), Lsn(0));
    // Nothing more is asked for while the sync is in flight, and nothing answered.
    assert!(rx.tick(1).is_empty());
    let out = rx.synced();
    assert_eq!(barrier_answers(&out), vec![(7, BarrierStatus::Ok, Lsn(1))]);
    assert!(syncs(&out).is_empty());
}

#[test]
fn barriers_that_become_ready_during_an_fsync_share_the_next_one() {
    let mut rx = Rx::holding_syncs();
    rx.entry(1);
    assert_eq!(syncs(&rx.barrier(1, 1)), vec![Lsn(1)]);
    // While it runs, three more barriers become ready: none asks for a sync of its own.
    let mut meanwhile = Vec::new();
    for lsn in 2..=4 {
        meanwhile.extend(rx.entry(lsn));
        meanwhile.extend(rx.barrier(lsn, lsn));
    }
    assert!(syncs(&meanwhile).is_empty(), "{meanwhile:?}");
    assert!(barrier_answers(&meanwhile).is_empty(), "{meanwhile:?}");
    // The first sync answers only its own barrier (it may have covered more, but it was
    // not asked to) and asks for one sync for the three others.
    let out = rx.synced();
    assert_eq!(barrier_answers(&out), vec![(1, BarrierStatus::Ok, Lsn(4))]);
    assert_eq!(syncs(&out), vec![Lsn(4)]);
    let out = rx.synced();
    assert_eq!(
        barrier_answers(&out),
        (2..=4)
            .map(|id| (id, BarrierStatus::Ok, Lsn(4)))
            .collect::<Vec<_>>()
    );
    assert!(syncs(&out).is_empty());
}

#[test]
fn a_failed_fsync_fails_its_barriers_and_the_replica() {
    let mut rx = Rx::holding_syncs();
    rx.entry(1);
    rx.barrier(1, 1);
    rx.log.fail_next_sync = true;
    let out = rx.synced();
    assert_eq!(
        barrier_answers(&out),
        vec![(1, BarrierStatus::FsyncFailed, Lsn(0))]
    );
    assert!(rx.core.failed().is_some());
    assert_eq!(rx.log.durable_lsn(), Lsn(0));
}

#[test]
fn a_failed_fsync_nobody_waits_for_still_fails_the_replica() {
    let mut rx = Rx::holding_syncs();
    rx.entry(1);
    let out = rx.step(ReceiverInput::Synced {
        result: Err("fsync: EIO".into()),
    });
    assert!(barrier_answers(&out).is_empty());
    assert!(rx.core.failed().is_some());
}

#[test]
fn a_truncation_during_an_fsync_leaves_the_entries_it_removed_unacknowledged() {
    let mut rx = Rx::holding_syncs();
    for lsn in 1..=3 {
        rx.entry(lsn);
    }
    assert_eq!(syncs(&rx.barrier(9, 3)), vec![Lsn(3)]);
    let out = rx.send(Body::Truncate {
        session: 1,
        after: Lsn(1),
        expect_epoch: Epoch(1),
    });
    assert!(out.is_empty(), "{out:?}");
    // The sync covered LSN 3 when it was asked for; that entry is gone now.
    let out = rx.synced();
    assert!(barrier_answers(&out).is_empty(), "{out:?}");
    // The barrier is answered once its LSN arrived again and was synced.
    rx.entry(2);
    assert_eq!(syncs(&rx.entry(3)), vec![Lsn(3)]);
    assert_eq!(
        barrier_answers(&rx.synced()),
        vec![(9, BarrierStatus::Ok, Lsn(3))]
    );
}
