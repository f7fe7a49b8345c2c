//! Deterministic simulation of one replicated volume: a primary and 0-4 replicas driven by
//! the sans-IO cores over a simulated network (delay, reorder across connections, FIFO
//! within one, drops, partitions, whole-node isolation, address changes), simulated disks
//! (power loss, fsync failure, fsyncs that finish after a delay while other messages are
//! handled - a crash before one finishes loses the tail it would have covered - and power
//! loss inside a flusher cycle, which leaves the modelled extent ahead of the checkpoint
//! for a later truncation to expose), client
//! writes, flushes and reads, and a simulated control plane (API server and operator)
//! that renews the agents' Leases, commits in-sync set changes and promotes. A crashed
//! node comes back as its agent would bring it back: as a replica, or - when its
//! assignment still says primary at the current epoch because no failover happened - as
//! primary, which the log's primary-term rule turns into a refusal the control plane
//! answers with a promotion at the next epoch. Nodes keep a bounded WAL history behind
//! their checkpoint (none on a quarter of the runs), so a promoted node catches members
//! up from it, truncating diverged suffixes.
//!
//! Control plane and read fencing (docs/design.md invariant 3): the control plane can be
//! unavailable for stretches longer than the Lease (no renewals, reports, commits,
//! promotions or rebuild orders; status reports and assignments wait for it), and a
//! single agent can lose the API (alone, or together with its peers: isolation). A node
//! serves client IO as the agent's backend decides: a primary core that is not fenced,
//! past its promotion wait, whose Lease is fresh (renewed within `LEASE_MS`, and not
//! latched by a lapse: after one, the next renewal first re-reads the assignments and
//! stops a primary the control plane no longer names) or whose member proof
//! (`PrimaryCore::member_proof_ms`) is younger than `PROOF_WINDOW_MS`. The operator
//! promotes only after the primary's Lease expired, counted from the end of an outage;
//! a promoted node serves only once the window has passed since the last heartbeat it
//! received (or its agent started). RF1 volumes (one run in sixteen) keep serving on
//! their own disk through an outage: the primary alone is the committed set, its proof
//! holds by itself, and nobody else can be promoted.
//!
//! Forwarded IO: a client on one node (the attached node) writes and reads a few blocks
//! of its own through a forwarder to the primary it resolves from the control plane.
//! A request can be delayed in the network, before admission or inside the volume past
//! the forwarder's request timeout; the forwarder then gives the connection up and
//! retries everything in flight on a new one. The data port runs each request through
//! the real `ForwardFences` (per (node, volume) newest connection, checked right before
//! the request touches the volume).
//!
//! The checker asserts the durability, ordering and fencing invariants, that no
//! (epoch, LSN) is ever issued for two different entries, and the read rule of
//! [`ClientModel`] for every read (and for every block read back at the end). Two
//! primaries at one epoch (a deposed operator's reconcile, refused by the operator's
//! fence unless `Knobs::no_operator_fence`) are modelled by `Knobs::rogue_operator`,
//! off in the default run and on in the tests at the end.
//!
//! Every run is reproducible from its seed:
//! `SIM_SEED=123 cargo test -p engine --test replication_sim -- --nocapture`
//! `SIM_SEEDS=20000` runs more seeds than the default.
//! `SIM_KNOBS=no_io_fence,...` runs the main test with protections off (see
//! `knobs_from_env`); `SIM_CHECK_READS=1` cross-checks every single-block read
//! (`MemLog::visible_block`) against the whole visible state.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use std::future::Future;
use std::sync::Arc;

use engine::forward::{Admitted, ForwardConn, ForwardFences, ForwardSource};
use engine::replication::{
    Action, ConnId, Durability, Endpoint, EntryKind, Epoch, FlushId, Generation, Input, Lba, Lsn,
    MemLog, Peer, PrimaryConfig, PrimaryCore, ReceiverAction, ReceiverConfig, ReceiverCore,
    ReceiverEvent, ReceiverInput, ReplicaId, ReplicaLog, Report, VolumeId, VolumeMsg, WalEntry,
};

mod common;

use common::rng::Rng;

// ----- knobs ------------------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
struct Knobs {
    skip_member_gate: bool,
    accept_stale_epoch: bool,
    /// A restarted primary serves at its old epoch even when its log refuses a primary
    /// term there (the behaviour before the rule existed).
    unguarded_primary_restart: bool,
    skip_extent_repair: bool,
    /// Primaries' checkpoints are not capped by their retention floor.
    no_extent_limit: bool,
    /// A primary serves client IO while its core is not fenced, whether or not its
    /// Lease is fresh or its member proof holds (no read fencing).
    no_io_fence: bool,
    /// A promoted primary serves at once instead of waiting out the proof window after
    /// the last heartbeat it received.
    no_promotion_wait: bool,
    /// The data port executes forwarded requests without the per-(node, volume)
    /// connection fence.
    no_forward_fence: bool,
    /// Replicas do not bind an epoch to the first primary that names itself.
    no_session_binding: bool,
    /// Replicas answer a barrier when they ask for its fsync, not when it is done.
    ack_before_synced: bool,
    /// A second, deposed operator's in-flight reconcile tries to promote another member
    /// at the winner's epoch (two primaries at one epoch). Off in the default run: see
    /// `two_primaries_at_one_epoch_lose_no_acknowledged_write`.
    rogue_operator: bool,
    /// The deposed operator's promotion lands. The operator fences it: a promotion is
    /// first claimed in the volume status, conditional on the view the plan came from,
    /// so of two plans from one view only one writes anything (tested against a real
    /// API server in `operator/tests/controlplane.rs`).
    no_operator_fence: bool,
}

// ----- model ------------------------------------------------------------------------------

enum Role {
    Primary(Box<PrimaryCore>),
    Replica(ReceiverCore),
    Down,
}

struct Node {
    id: ReplicaId,
    log: MemLog,
    role: Role,
    incarnation: u64,
    addr_gen: u32,
    /// The flusher's first cycle after a restart does not come before this time (a
    /// reopened volume runs it after its flush interval): until then an extent a crashed
    /// cycle left ahead stays exposed to truncation.
    flusher_from_ms: u64,
    /// When the agent last renewed its Lease (the time the renewal was sent, which is
    /// also the `renewTime` the control plane sees).
    lease_renewed_ms: u64,
    /// The renewals lapsed: the Lease proves nothing until the agent re-read its
    /// assignments (the next renewal does that here).
    lease_latched: bool,
    /// The agent cannot reach the control plane before this time (its renewals, status
    /// reports and assignment watch are cut; its data port is not).
    api_cut_until_ms: u64,
    /// When this node last received a heartbeat as a replica (or its agent started).
    last_heartbeat_rx_ms: u64,
    /// A promoted primary serves client IO from this time on.
    serve_after_ms: u64,
    /// The agent refused to serve as primary at the epoch its volume was reopened at
    /// and waits for a new one: its re-promotion waits for no other primary's proof.
    needs_new_epoch: bool,
    /// The data port's forwarded-request fences (in memory: a restart starts afresh).
    fences: Arc<ForwardFences>,
    /// Connection ids grow with every accepted data-port connection.
    accepted_conns: u64,
    /// Counts the receiver cores this node had: a sync finishes only for the core that
    /// asked for it.
    receiver_gen: u64,
    /// Its receiver asked for an fsync that is not done yet.
    replica_syncing: bool,
}

struct Conn {
    primary: usize,
    primary_inc: u64,
    core_conn: ConnId,
    replica: usize,
    replica_inc: u64,
    up: bool,
    established: bool,
    to_replica: VecDeque<(u64, VolumeMsg)>,
    to_primary: VecDeque<(u64, VolumeMsg)>,
}

enum CpMsg {
    Promote {
        epoch: Epoch,
        generation: Generation,
        committed: Vec<ReplicaId>,
        peers: Vec<Peer>,
        /// Written by a deposed operator whose reconcile was still in flight.
        rogue: bool,
    },
    BecomeReplica {
        epoch: Epoch,
    },
    Commit {
        epoch: Epoch,
        generation: Generation,
        members: Vec<ReplicaId>,
    },
    Rebuild {
        epoch: Epoch,
        replica: ReplicaId,
    },
    Peers {
        epoch: Epoch,
        peers: Vec<Peer>,
    },
}

enum Ev {
    ConnectResult {
        key: usize,
        ok: bool,
    },
    ConnLostAtPrimary {
        key: usize,
    },
    ConnLostAtReplica {
        key: usize,
    },
    FsyncDone {
        node: usize,
        inc: u64,
    },
    /// A replica's fsync, asked for by its receiver core `receiver_gen`, is done.
    ReplicaSynced {
        node: usize,
        receiver_gen: u64,
    },
    CpReport {
        node: usize,
        epoch: Epoch,
        report: Report,
        /// It waited for the API: the agent writes its status as it is by then.
        held: bool,
    },
    ToNode {
        node: usize,
        msg: CpMsg,
    },
    Restart {
        node: usize,
    },
    /// The agent of `node` refused to serve as primary at `epoch` and says so.
    NeedsNewEpoch {
        node: usize,
        epoch: Epoch,
    },
}

struct Cp {
    /// The control plane (API server and operator) is unavailable until this time.
    down_until_ms: u64,
    /// End of the last outage: Lease expiry counts from here (the operator's API gap).
    gap_end_ms: u64,
    /// A second, deposed operator's reconcile still in flight: it promotes this node at
    /// the same epoch as the winning operator's promotion.
    rogue_pending: bool,
    epoch: Epoch,
    primary: usize,
    generation: Generation,
    committed: BTreeSet<usize>,
    needs_rebuild: BTreeSet<usize>,
    not_serving_since: Option<u64>,
}

struct Checker {
    durability: Durability,
    /// Every entry a primary ever appended, by (epoch, LSN).
    issued: BTreeMap<(Epoch, u64), (Epoch, u64)>,
    acked: BTreeMap<u64, (Epoch, u64)>,
    acked_max: Lsn,
    violations: Vec<String>,
    acks: u64,
    client: ClientModel,
}

// ----- clients: what was written, and the read rule ------------------------------------

/// Per-LBA history of the clients' writes.
#[derive(Default)]
struct LbaHist {
    /// Content by sequence number (index); sequence 0 is the initial zeros, `None` a
    /// trim or zeros.
    vals: Vec<Option<u64>>,
    /// Highest sequence covered by an acknowledged FLUSH.
    durable: usize,
    /// Highest sequence acknowledged by each (epoch, primary node).
    acked: BTreeMap<(Epoch, usize), usize>,
    /// A write of this LBA is in flight (clients never have two at once).
    writing: bool,
}

/// What a read must not go below, taken when the read starts.
#[derive(Clone)]
struct Floor {
    lba: usize,
    durable: usize,
    acked: Vec<((Epoch, usize), usize)>,
}

/// The clients' writes and the read rule.
///
/// Every write or trim of an LBA gets the next per-LBA sequence number when it is issued
/// (a client never has two writes of one LBA in flight, so issue order is the order in
/// which they must take effect). A read of LBA x that starts at time t and is served by
/// node q as primary at epoch E must return the content of a write of x (or the initial
/// zeros, sequence 0) whose sequence is at least the floor: the highest sequence of
/// - a write of x covered by a FLUSH acknowledged before t (syncAll volumes only; a
///   FLUSH covers the writes the same primary acknowledged at the same epoch before the
///   FLUSH was requested), and
/// - a write of x acknowledged before t by a primary at an epoch above E, or by q
///   itself at E: a deposed primary never serves a read after a newer primary has
///   acknowledged a newer write, and a primary reads its own acknowledged writes.
///
/// A write acknowledged at an older epoch and never flushed may be lost by a failover
/// (the plain block-device contract), and a write concurrent with the read may be
/// returned or not (its sequence is above the floor either way).
#[derive(Default)]
struct ClientModel {
    lbas: Vec<LbaHist>,
    /// Written content (unique per write) -> (LBA, sequence).
    by_value: std::collections::HashMap<u64, (usize, usize)>,
    /// Per FLUSH id: the (LBA, sequence) it covers once acknowledged.
    flush_snaps: std::collections::HashMap<u64, Vec<(usize, usize)>>,
    reads: u64,
}

impl ClientModel {
    fn new(lbas: usize) -> Self {
        ClientModel {
            lbas: (0..lbas)
                .map(|_| LbaHist {
                    vals: vec![None],
                    ..LbaHist::default()
                })
                .collect(),
            ..ClientModel::default()
        }
    }

    fn issue(&mut self, lba: usize, val: Option<u64>) -> usize {
        let h = &mut self.lbas[lba];
        h.vals.push(val);
        let seq = h.vals.len() - 1;
        if let Some(v) = val {
            self.by_value.insert(v, (lba, seq));
        }
        seq
    }

    fn acked(&mut self, lba: usize, seq: usize, epoch: Epoch, node: usize) {
        let a = self.lbas[lba].acked.entry((epoch, node)).or_default();
        *a = (*a).max(seq);
    }

    fn flush_requested(&mut self, id: u64, epoch: Epoch, node: usize) {
        let snap = self
            .lbas
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.acked.get(&(epoch, node)).map(|&s| (i, s)))
            .collect();
        self.flush_snaps.insert(id, snap);
    }

    fn flush_acked(&mut self, id: u64) {
        for (lba, seq) in self.flush_snaps.remove(&id).unwrap_or_default() {
            let d = &mut self.lbas[lba].durable;
            *d = (*d).max(seq);
        }
    }

    fn floor(&self, lba: usize) -> Floor {
        let h = &self.lbas[lba];
        Floor {
            lba,
            durable: h.durable,
            acked: h.acked.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }

    /// Checks a read served by `node` at `epoch` that returned `got`.
    fn check_read(
        &mut self,
        f: &Floor,
        epoch: Epoch,
        node: usize,
        got: Option<u64>,
        use_durable: bool,
    ) -> Result<(), String> {
        self.reads += 1;
        let h = &self.lbas[f.lba];
        let mut floor = if use_durable { f.durable } else { 0 };
        let mut why = "flushed";
        for &((e, n), s) in &f.acked {
            if (e > epoch || (e == epoch && n == node)) && s > floor {
                floor = s;
                why = if e > epoch {
                    "acknowledged at a newer epoch"
                } else {
                    "acknowledged by this primary"
                };
            }
        }
        let seq = match got {
            Some(v) => match self.by_value.get(&v) {
                Some(&(l, s)) if l == f.lba => s,
                _ => {
                    return Err(format!(
                        "node{node} at epoch {epoch} read LBA {} = {v}, which no client wrote there",
                        f.lba
                    ));
                }
            },
            None => (0..h.vals.len())
                .rev()
                .find(|&s| h.vals[s].is_none())
                .unwrap_or(0),
        };
        if seq < floor {
            return Err(format!(
                "stale read: node{node} at epoch {epoch} read LBA {} at write #{seq}, but write #{floor} was {why} before the read started",
                f.lba
            ));
        }
        Ok(())
    }
}

// ----- forwarded IO -------------------------------------------------------------------

#[derive(Clone)]
enum FwdOp {
    Write { lba: usize, seq: usize, val: u64 },
    Read { floor: Floor },
}

#[derive(Clone)]
struct FwdReq {
    id: u64,
    op: FwdOp,
    attempts: u32,
}

enum FwdReply {
    /// Executed by `node` as primary at `epoch`; a read's content.
    Ok {
        node: usize,
        epoch: Epoch,
        data: Option<u64>,
    },
    /// Not executed (no serving primary at the offered epoch, or cancelled by the fence).
    Refused,
}

/// One forwarder-to-data-port connection.
struct FConn {
    /// The primary's node, its incarnation, and the fence's view of this connection.
    to: usize,
    to_inc: u64,
    server: Arc<ForwardConn>,
    /// The forwarder still uses it.
    up: bool,
    /// The data port has not seen it break.
    server_up: bool,
    epoch: Epoch,
    to_server: VecDeque<(u64, FwdReq)>,
    to_client: VecDeque<(u64, u64, FwdReply)>,
}

/// A forwarded request inside the primary's agent.
struct FwdTask {
    conn: usize,
    req: FwdReq,
    /// 0: waiting for older connections' admitted requests; 1: on its way to admission
    /// until `until`; 2: admitted, inside the volume until `until`.
    stage: u8,
    until: u64,
    admitted: Option<Admitted>,
}

/// The forwarding export on the node the volume is attached to: it sends its client's
/// IO to the primary, gives a connection up when a request got no reply within
/// `FWD_TIMEOUT_MS`, and retries everything in flight on a new connection.
struct Forwarder {
    node: usize,
    conn: Option<usize>,
    /// Sent on `conn`, with the send time.
    inflight: BTreeMap<u64, (u64, FwdReq)>,
    queue: VecDeque<FwdReq>,
    next_id: u64,
    retry_at: u64,
}

/// Polls the data port's `arrive` once: whether a request of `conn` may go on.
fn arrive_ready(f: &ForwardFences, conn: &ForwardConn, node: &str, volume: &VolumeId) -> bool {
    let fut = f.arrive(conn, node, volume, None);
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    fut.as_mut().poll(&mut cx).is_ready()
}

/// Where what the member's volume reads differs from its log's content at its head (a
/// dropped write read back from an extent a crashed flusher cycle left ahead).
fn visible_mismatch(log: &MemLog) -> Option<String> {
    if log.rebuilding() {
        return None;
    }
    let want = log.state_at(log.head_lsn());
    let got = log.visible_state();
    if want == got {
        return None;
    }
    let lba = want
        .keys()
        .chain(got.keys())
        .find(|l| want.get(l) != got.get(l))
        .copied();
    Some(format!(
        "LBA {lba:?} reads a write its log no longer has (head {})",
        log.head_lsn()
    ))
}

fn ident(e: &WalEntry) -> (Epoch, u64) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    };
    for b in e.lba.0.to_le_bytes() {
        mix(b);
    }
    mix(e.kind as u8);
    for b in e.blocks.to_le_bytes() {
        mix(b);
    }
    for b in &e.data {
        mix(*b);
    }
    (e.epoch, h)
}

impl Checker {
    fn violation(&mut self, now: u64, s: String) {
        if self.violations.len() < 20 {
            self.violations.push(format!("t={now}ms: {s}"));
        }
    }

    /// A primary appended `e`: no other entry may ever carry the same (epoch, LSN), or
    /// log matching (which compares epochs) could take two histories for one.
    fn on_issued(&mut self, now: u64, node: usize, e: &WalEntry) {
        let id = ident(e);
        match self.issued.get(&(e.epoch, e.lsn.0)).copied() {
            Some(prev) if prev != id => self.violation(
                now,
                format!(
                    "node{node} issued LSN {} at epoch {} twice with different content ({prev:?}, then {id:?})",
                    e.lsn, e.epoch
                ),
            ),
            Some(_) => {}
            None => {
                self.issued.insert((e.epoch, e.lsn.0), id);
            }
        }
    }

    /// The member's durable log must contain every acknowledged entry up to `upto`.
    fn check_member(&mut self, now: u64, what: &str, idx: usize, log: &MemLog, upto: Lsn) {
        if upto == Lsn(0) {
            return;
        }
        if log.rebuilding() {
            self.violation(
                now,
                format!("{what} node{idx} is being rebuilt while holding acked LSN {upto}"),
            );
            return;
        }
        if log.durable_lsn() < upto {
            self.violation(
                now,
                format!(
                    "{what} node{idx} durable {} < acknowledged {upto}",
                    log.durable_lsn()
                ),
            );
            return;
        }
        let origin = log.origin();
        if origin > Lsn(0)
            && origin <= upto
            && let Some((e, _)) = self.acked.get(&origin.0).copied()
            && log.epoch_at(origin) != Some(e)
        {
            self.violation(
                now,
                format!(
                    "{what} node{idx} base at {origin} has a different epoch than the acked entry"
                ),
            );
        }
        let mut l = origin.next();
        while l <= upto {
            if let Some(want) = self.acked.get(&l.0).copied() {
                match log.entry_at(l) {
                    Some(e) if ident(e) == want => {}
                    Some(e) => {
                        let got = ident(e);
                        self.violation(
                            now,
                            format!("{what} node{idx} entry {l} is {got:?}, acknowledged {want:?}"),
                        );
                        return;
                    }
                    None => {
                        self.violation(
                            now,
                            format!("{what} node{idx} lacks acknowledged entry {l}"),
                        );
                        return;
                    }
                }
            }
            l = l.next();
        }
    }

    fn on_ack(
        &mut self,
        now: u64,
        pidx: usize,
        lsn: Lsn,
        nodes: &[Node],
        committed: &BTreeSet<usize>,
    ) {
        self.acks += 1;
        let plog = &nodes[pidx].log;
        if plog.durable_lsn() < lsn {
            self.violation(
                now,
                format!(
                    "primary node{pidx} acked {lsn} but its durable is {}",
                    plog.durable_lsn()
                ),
            );
        }
        // Record newly acknowledged entries; re-verify the previous boundary for continuity
        // (the full history is re-checked on promotion and at the end).
        let from = self.acked_max.max(plog.origin().next());
        let mut l = from;
        while l <= lsn {
            if let Some(e) = plog.entry_at(l) {
                let id = ident(e);
                match self.acked.get(&l.0) {
                    // Async acks after the local fsync only; a failover may lose them.
                    Some(_) if self.durability == Durability::Async => {
                        self.acked.insert(l.0, id);
                    }
                    Some(prev) if *prev != id => {
                        let prev = *prev;
                        self.violation(now, format!(
                            "acknowledged entry {l} changed from {prev:?} to {id:?} (a lost acknowledged write)"
                        ));
                    }
                    Some(_) => {}
                    None => {
                        self.acked.insert(l.0, id);
                    }
                }
            }
            l = l.next();
        }
        let prev_max = self.acked_max;
        self.acked_max = self.acked_max.max(lsn);
        if self.durability == Durability::SyncAll {
            for &m in committed {
                self.check_range(now, "committed member", m, &nodes[m].log, prev_max, lsn);
            }
        }
    }

    /// Like `check_member` but only for entries in [from, upto].
    fn check_range(
        &mut self,
        now: u64,
        what: &str,
        idx: usize,
        log: &MemLog,
        from: Lsn,
        upto: Lsn,
    ) {
        if upto == Lsn(0) {
            return;
        }
        if log.rebuilding() || log.durable_lsn() < upto {
            self.violation(
                now,
                format!(
                    "{what} node{idx} durable {} < acknowledged {upto} (rebuilding: {})",
                    log.durable_lsn(),
                    log.rebuilding()
                ),
            );
            return;
        }
        let mut l = from.max(log.origin().next());
        while l <= upto {
            if let Some(want) = self.acked.get(&l.0).copied() {
                let got = log.entry_at(l).map(ident);
                if got != Some(want) {
                    self.violation(
                        now,
                        format!("{what} node{idx} entry {l} is {got:?}, acknowledged {want:?}"),
                    );
                    return;
                }
            }
            l = l.next();
        }
    }
}

struct Sim {
    seed: u64,
    rng: Rng,
    now: u64,
    nodes: Vec<Node>,
    conns: Vec<Conn>,
    conn_index: std::collections::HashMap<(usize, u64, ConnId), usize>,
    active: Vec<usize>,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    ev_store: BTreeMap<usize, Ev>,
    ev_seq: u64,
    cp: Cp,
    checker: Checker,
    partitions: Vec<(usize, usize, u64)>,
    pcfg: PrimaryConfig,
    rcfg: ReceiverConfig,
    knobs: Knobs,
    volume: VolumeId,
    next_flush: u64,
    write_counter: u64,
    /// Clients re-resolve the primary after a failover: no IO reaches the new primary
    /// before this time, so an old primary can rejoin before the new head moves on.
    client_paused_until_ms: u64,
    flushes_acked: u64,
    faults: bool,
    trace: bool,
    stats: BTreeMap<String, u64>,
    fwd: Forwarder,
    fconns: Vec<FConn>,
    ftasks: Vec<FwdTask>,
    /// The forwarder's view of the primary (its agent's watch of the assignments).
    fwd_view: (usize, Epoch),
}

/// Agent Lease duration; the operator promotes only after the primary's Lease expired.
const LEASE_MS: u64 = 120;
/// Agents renew their Lease this often.
const RENEW_MS: u64 = 30;
/// `--member-proof-window-ms`: a primary without a fresh Lease serves while every
/// committed in-sync member answered a heartbeat sent within this window.
const PROOF_WINDOW_MS: u64 = 100;
/// The forwarder gives up on a connection whose request got no reply in this time.
const FWD_TIMEOUT_MS: u64 = 40;
/// LBAs the local client writes (below) and the forwarding client writes (from here).
const LOCAL_LBAS: u64 = 24;
const FWD_LBAS: u64 = 4;

impl Sim {
    fn new(seed: u64, knobs: Knobs) -> Self {
        let mut rng = Rng::new(seed);
        // RF1 on one run in sixteen: such a volume serves on its own disk through a
        // control-plane outage (its primary alone is the committed set, so its member
        // proof holds by itself and nobody else can be promoted).
        let n = if rng.below(16) == 0 {
            1
        } else {
            rng.range(3, 5) as usize
        };
        let durability = if rng.below(8) == 0 {
            Durability::Async
        } else {
            Durability::SyncAll
        };
        let pcfg = PrimaryConfig {
            durability,
            barrier_timeout_ms: 60,
            reconnect_backoff_ms: 20,
            catchup_batch_entries: rng.range(2, 16),
            catchup_entries_max: 400,
            catchup_duration_ms_max: 400,
            catchup_progress_deadline_ms: 100,
            catchup_retries_max: 3,
            rebuild_batch_blocks: rng.range(1, 8) as usize,
            rebuild_batch_entries: rng.range(1, 8),
            rebuild_progress_deadline_ms: 200,
            wal_retention_timeout_ms: rng.range(150, 600),
            wal_retention_bytes_max: rng.range(2_000, 20_000),
            flush_timeout_ms: 1_000,
            member_unreachable_after_ms: 80,
            heartbeat_interval_ms: 30,
            pressure_barrier_bytes: 600,
            background_barrier_interval_ms: 40,
            test_knob_skip_member_gate: knobs.skip_member_gate,
        };
        let rcfg = ReceiverConfig {
            barrier_timeout_ms: 50,
            pending_barriers_max: 64,
            test_knob_accept_stale_epoch: knobs.accept_stale_epoch,
            test_knob_no_session_binding: knobs.no_session_binding,
            test_knob_ack_before_synced: knobs.ack_before_synced,
        };
        let volume = VolumeId::new("vol-sim").unwrap();
        // WAL history per node (none on a quarter of the runs), drawn from its own stream
        // so the rest of a seed's scenario does not depend on it.
        let mut hrng = Rng::new(seed ^ 0x005E_ED0F_4157_0A1E);
        let fwd_node = hrng.below(n as u64) as usize;
        let history = if hrng.below(4) == 0 {
            0
        } else {
            hrng.range(1, 64)
        };
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| {
                let mut log = MemLog::new();
                log.set_epoch(Epoch(1)).unwrap();
                log.test_knob_skip_extent_repair = knobs.skip_extent_repair;
                log.history_entries = history;
                log.test_knob_no_extent_limit = knobs.no_extent_limit;
                Node {
                    id: ReplicaId::new(format!("r{i}")).unwrap(),
                    log,
                    role: Role::Down,
                    incarnation: 0,
                    addr_gen: 0,
                    flusher_from_ms: 0,
                    lease_renewed_ms: 0,
                    lease_latched: false,
                    api_cut_until_ms: 0,
                    last_heartbeat_rx_ms: 0,
                    serve_after_ms: 0,
                    needs_new_epoch: false,
                    fences: ForwardFences::new(),
                    accepted_conns: 0,
                    receiver_gen: 0,
                    replica_syncing: false,
                }
            })
            .collect();
        let committed: BTreeSet<usize> = (0..n).collect();
        let members: Vec<ReplicaId> = nodes.iter().map(|x| x.id.clone()).collect();
        let core = PrimaryCore::new(
            volume.clone(),
            nodes[0].id.clone(),
            Epoch(1),
            pcfg.clone(),
            Generation(1),
            members,
            &nodes[0].log,
        );
        nodes[0].role = Role::Primary(Box::new(core));
        for node in nodes.iter_mut().skip(1) {
            node.role = Role::Replica(ReceiverCore::new(volume.clone(), rcfg));
            node.receiver_gen += 1;
        }
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            nodes,
            conns: Vec::new(),
            conn_index: std::collections::HashMap::new(),
            active: Vec::new(),
            events: BinaryHeap::new(),
            ev_store: BTreeMap::new(),
            ev_seq: 0,
            cp: Cp {
                down_until_ms: 0,
                gap_end_ms: 0,
                rogue_pending: false,
                epoch: Epoch(1),
                primary: 0,
                generation: Generation(1),
                committed,
                needs_rebuild: BTreeSet::new(),
                not_serving_since: None,
            },
            checker: Checker {
                durability,
                issued: BTreeMap::new(),
                acked: BTreeMap::new(),
                acked_max: Lsn(0),
                violations: Vec::new(),
                acks: 0,
                client: ClientModel::new((LOCAL_LBAS + FWD_LBAS) as usize),
            },
            partitions: Vec::new(),
            pcfg,
            rcfg,
            knobs,
            volume,
            next_flush: 0,
            write_counter: 0,
            client_paused_until_ms: 0,
            flushes_acked: 0,
            faults: true,
            trace: std::env::var("SIM_TRACE").is_ok(),
            stats: BTreeMap::new(),
            fwd: Forwarder {
                node: fwd_node,
                conn: None,
                inflight: BTreeMap::new(),
                queue: VecDeque::new(),
                next_id: 0,
                retry_at: 0,
            },
            fconns: Vec::new(),
            ftasks: Vec::new(),
            fwd_view: (0, Epoch(1)),
        };
        let peers = sim.peers_for(0);
        sim.primary_input(0, Input::PeersAssigned(peers));
        sim
    }

    fn endpoint(&self, idx: usize) -> Endpoint {
        let g = self.nodes[idx].addr_gen;
        Endpoint::parse(&format!("10.{}.{}.{}:7000", g / 200, g % 200, idx + 1)).unwrap()
    }

    fn peers_for(&self, p: usize) -> Vec<Peer> {
        (0..self.nodes.len())
            .filter(|&i| i != p)
            .map(|i| Peer {
                id: self.nodes[i].id.clone(),
                endpoint: self.endpoint(i),
            })
            .collect()
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.ev_seq += 1;
        let key = self.ev_seq as usize;
        self.ev_store.insert(key, ev);
        self.events.push(Reverse((at, self.ev_seq, key)));
    }

    fn delay(&mut self) -> u64 {
        if self.faults && self.rng.ppm(20_000) {
            self.rng.range(10, 40)
        } else {
            self.rng.range(0, 3)
        }
    }

    fn partitioned(&self, a: usize, b: usize) -> bool {
        self.partitions
            .iter()
            .any(|&(x, y, until)| until > self.now && ((x == a && y == b) || (x == b && y == a)))
    }

    // ----- inputs into cores ----------------------------------------------------------

    fn primary_input(&mut self, p: usize, input: Input) {
        let now = self.now;
        let node = &mut self.nodes[p];
        let Role::Primary(core) = &mut node.role else {
            return;
        };
        let actions = core.step(now, input, &mut node.log);
        let events = core.take_events();
        for e in &events {
            let name = match &e.kind {
                engine::replication::EventKind::StateChanged { to, .. } => format!("state->{to}"),
                other => other.name().to_string(),
            };
            *self.stats.entry(name).or_default() += 1;
        }
        if self.trace {
            for e in &events {
                eprintln!("t={now} node{p} {:?}", e);
            }
        }
        let inc = node.incarnation;
        for a in actions {
            self.primary_action(p, inc, a);
        }
    }

    fn primary_action(&mut self, p: usize, inc: u64, a: Action) {
        if self.trace {
            eprintln!("t={} node{p} action {:?}", self.now, short_action(&a));
        }
        match a {
            Action::Connect { conn, endpoint, .. } => {
                let target = (0..self.nodes.len()).find(|&i| self.endpoint(i) == endpoint);
                let key = self.conns.len();
                let (replica, replica_inc, ok) = match target {
                    Some(t) => (
                        t,
                        self.nodes[t].incarnation,
                        matches!(self.nodes[t].role, Role::Replica(_)) && !self.partitioned(p, t),
                    ),
                    None => (usize::MAX, 0, false),
                };
                self.conn_index.insert((p, inc, conn), key);
                if ok {
                    self.active.push(key);
                }
                self.conns.push(Conn {
                    primary: p,
                    primary_inc: inc,
                    core_conn: conn,
                    replica,
                    replica_inc,
                    up: ok,
                    established: false,
                    to_replica: VecDeque::new(),
                    to_primary: VecDeque::new(),
                });
                let d = self.delay() + 1;
                self.schedule(self.now + d, Ev::ConnectResult { key, ok });
            }
            Action::Send { conn, msg } => {
                if let Some(key) = self.find_conn(p, inc, conn) {
                    let d = self.delay();
                    let c = &mut self.conns[key];
                    if c.up && c.established {
                        let at = c.to_replica.back().map_or(0, |(t, _)| *t).max(self.now + d);
                        c.to_replica.push_back((at, msg));
                    }
                }
            }
            Action::Close { conn, .. } => {
                if let Some(key) = self.find_conn(p, inc, conn)
                    && self.conns[key].up
                {
                    self.conns[key].up = false;
                    self.conns[key].to_replica.clear();
                    self.conns[key].to_primary.clear();
                    let d = self.delay() + 1;
                    self.schedule(self.now + d, Ev::ConnLostAtReplica { key });
                }
            }
            Action::LocalFsync { .. } => {
                let d = self.rng.range(1, 3);
                self.schedule(self.now + d, Ev::FsyncDone { node: p, inc });
            }
            Action::FlushAcked { id, lsn } => {
                // The backend checks its fence again before it acknowledges.
                if self.serving(p).is_some() {
                    self.checker.client.flush_acked(id.0);
                }
                self.flushes_acked += 1;
                let committed = self.cp.committed.clone();
                let now = self.now;
                self.checker.on_ack(now, p, lsn, &self.nodes, &committed);
            }
            Action::FlushFailed { .. } => {}
            Action::Report(report) => {
                let epoch = match &self.nodes[p].role {
                    Role::Primary(c) => c.epoch(),
                    _ => return,
                };
                let d = self.rng.range(2, 10);
                self.schedule(
                    self.now + d,
                    Ev::CpReport {
                        node: p,
                        epoch,
                        report,
                        held: false,
                    },
                );
            }
        }
    }

    fn find_conn(&self, p: usize, inc: u64, conn: ConnId) -> Option<usize> {
        self.conn_index.get(&(p, inc, conn)).copied()
    }

    fn replica_input(&mut self, r: usize, input: ReceiverInput) {
        let now = self.now;
        let node = &mut self.nodes[r];
        let Role::Replica(core) = &mut node.role else {
            return;
        };
        let copied = node.log.copied_lsn();
        let actions = core.step(now, input, &mut node.log);
        for ev in core.take_events() {
            if let ReceiverEvent::Truncated { after } = ev
                && after < copied
            {
                *self
                    .stats
                    .entry("rx_truncated_below_copied".to_string())
                    .or_default() += 1;
            }
            let name = match &ev {
                ReceiverEvent::Applied { .. } => "rx_applied",
                ReceiverEvent::EpochAdopted { .. } => "rx_epoch_adopted",
                ReceiverEvent::StaleRefused { .. } => "rx_stale_refused",
                ReceiverEvent::GapRefused { .. } => "rx_gap_refused",
                ReceiverEvent::Truncated { .. } => "rx_truncated",
                ReceiverEvent::RebuildStarted { .. } => "rx_rebuild_started",
                ReceiverEvent::RebuildFinished { .. } => "rx_rebuild_finished",
                ReceiverEvent::StorageFailed { .. } => "rx_storage_failed",
            };
            *self.stats.entry(name.to_string()).or_default() += 1;
            if matches!(ev, ReceiverEvent::Truncated { .. })
                && let Some(v) = visible_mismatch(&node.log)
            {
                self.checker
                    .violation(now, format!("node{r} after a truncation: {v}"));
            }
            if let ReceiverEvent::Applied {
                lsn,
                msg_epoch,
                local_epoch,
            } = ev
            {
                if msg_epoch < local_epoch {
                    self.checker.violation(
                        now,
                        format!("node{r} applied LSN {lsn} from a stale epoch {msg_epoch} (local epoch {local_epoch})"),
                    );
                }
                if node.log.entry_at(lsn).map(|e| e.lsn) != Some(lsn) || node.log.head_lsn() != lsn
                {
                    self.checker
                        .violation(now, format!("node{r} applied LSN {lsn} out of order"));
                }
            }
        }

        let failed = core.failed().is_some();
        for a in actions {
            match a {
                ReceiverAction::Send { conn, msg } => {
                    if self.trace {
                        eprintln!(
                            "t={now} node{r} replies e{} {}",
                            msg.epoch.0,
                            short_body(&msg.body)
                        );
                    }
                    let key = conn.0 as usize;
                    let d = self.delay();
                    let c = &mut self.conns[key];
                    if c.up && c.replica == r {
                        let at = c.to_primary.back().map_or(0, |(t, _)| *t).max(self.now + d);
                        c.to_primary.push_back((at, msg));
                    }
                }
                ReceiverAction::Close { conn, .. } => {
                    let key = conn.0 as usize;
                    self.break_conn(key);
                }
                ReceiverAction::Sync { .. } => {
                    // The fsync runs when it is done (it covers whatever was written by
                    // then); a crash before that loses the tail it would have covered.
                    let d = if self.faults && self.rng.ppm(50_000) {
                        self.rng.range(10, 40)
                    } else {
                        self.rng.range(1, 6)
                    };
                    let receiver_gen = self.nodes[r].receiver_gen;
                    self.nodes[r].replica_syncing = true;
                    *self.stats.entry("rx_sync".to_string()).or_default() += 1;
                    self.schedule(
                        self.now + d,
                        Ev::ReplicaSynced {
                            node: r,
                            receiver_gen,
                        },
                    );
                }
            }
        }
        if failed {
            // Storage failed (fsync): the agent restarts the volume from its durable state.
            self.crash(r);
        }
    }

    fn break_conn(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if !c.up {
            return;
        }
        c.up = false;
        c.to_replica.clear();
        c.to_primary.clear();
        let d1 = self.delay() + 1;
        let d2 = self.delay() + 1;
        self.schedule(self.now + d1, Ev::ConnLostAtPrimary { key });
        self.schedule(self.now + d2, Ev::ConnLostAtReplica { key });
    }

    fn crash(&mut self, idx: usize) {
        if matches!(self.nodes[idx].role, Role::Down) {
            return;
        }
        if self.trace {
            eprintln!("t={} node{idx} CRASH", self.now);
        }
        self.nodes[idx].role = Role::Down;
        self.nodes[idx].incarnation += 1;
        if std::mem::take(&mut self.nodes[idx].replica_syncing) {
            // The tail that fsync would have covered is lost below.
            *self
                .stats
                .entry("crash_with_replica_fsync_in_flight".to_string())
                .or_default() += 1;
        }
        if self.rng.below(2) == 0 {
            *self
                .stats
                .entry("crash_inside_flush_cycle".to_string())
                .or_default() += 1;
            let log = &self.nodes[idx].log;
            if log.head_lsn() > log.checkpoint_lsn() {
                *self
                    .stats
                    .entry("crash_inside_flush_cycle_ahead".to_string())
                    .or_default() += 1;
            }
            self.nodes[idx].log.power_loss_inside_flush_cycle();
        } else {
            self.nodes[idx].log.power_loss();
        }
        for key in self.active.clone() {
            if self.conns[key].primary == idx || self.conns[key].replica == idx {
                self.break_conn(key);
            }
        }
        // The agent's forwarded requests die with it.
        let fconns = &self.fconns;
        self.ftasks.retain(|t| fconns[t.conn].to != idx);
        for c in &mut self.fconns {
            if c.to == idx {
                c.server_up = false;
            }
        }
        let back = self.now + self.rng.range(20, 400);
        self.schedule(back, Ev::Restart { node: idx });
    }

    // ----- events -----------------------------------------------------------------------

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::ConnectResult { key, ok } => {
                let (p, inc, cc, r, rinc) = {
                    let c = &self.conns[key];
                    (
                        c.primary,
                        c.primary_inc,
                        c.core_conn,
                        c.replica,
                        c.replica_inc,
                    )
                };
                let alive = ok
                    && self.conns[key].up
                    && r < self.nodes.len()
                    && self.nodes[r].incarnation == rinc
                    && matches!(self.nodes[r].role, Role::Replica(_))
                    && !self.partitioned(p, r);
                if self.nodes[p].incarnation != inc {
                    self.conns[key].up = false;
                    return;
                }
                if alive {
                    self.conns[key].established = true;
                    self.primary_input(p, Input::Connected(cc));
                } else {
                    self.conns[key].up = false;
                    self.primary_input(p, Input::ConnectFailed(cc));
                }
            }
            Ev::ConnLostAtPrimary { key } => {
                let (p, inc, cc) = {
                    let c = &self.conns[key];
                    (c.primary, c.primary_inc, c.core_conn)
                };
                if self.nodes[p].incarnation == inc {
                    self.primary_input(p, Input::ConnectionLost(cc));
                }
            }
            Ev::ConnLostAtReplica { key } => {
                let (r, rinc) = (self.conns[key].replica, self.conns[key].replica_inc);
                if r < self.nodes.len() && self.nodes[r].incarnation == rinc {
                    self.replica_input(r, ReceiverInput::ConnectionLost(ConnId(key as u64)));
                }
            }
            Ev::FsyncDone { node, inc } => {
                if self.nodes[node].incarnation != inc {
                    return;
                }
                match self.nodes[node].log.sync() {
                    Ok(d) => self.primary_input(node, Input::LocalFsyncDone { durable: d }),
                    Err(_) => {
                        self.primary_input(node, Input::LocalFsyncFailed);
                        self.crash(node);
                    }
                }
            }
            Ev::ReplicaSynced { node, receiver_gen } => {
                let n = &mut self.nodes[node];
                if n.receiver_gen != receiver_gen {
                    return;
                }
                n.replica_syncing = false;
                if !matches!(n.role, Role::Replica(_)) {
                    return;
                }
                let result = n.log.sync().map_err(|e| e.to_string());
                self.replica_input(node, ReceiverInput::Synced { result });
            }
            Ev::CpReport {
                node,
                epoch,
                report,
                held,
            } => {
                // A status write: it waits until the agent reaches the API again.
                if let Some(at) = self.api_blocked_until(node) {
                    self.schedule(
                        at,
                        Ev::CpReport {
                            node,
                            epoch,
                            report,
                            held: true,
                        },
                    );
                } else if !held || self.report_still_holds(node, &report) {
                    self.cp_report(node, epoch, report)
                }
            }
            Ev::ToNode { node, msg } => {
                // The agent's watch delivers an assignment once it reaches the API.
                if let Some(at) = self.api_blocked_until(node) {
                    self.schedule(at, Ev::ToNode { node, msg });
                } else {
                    self.node_msg(node, msg)
                }
            }
            Ev::Restart { node } => {
                if matches!(self.nodes[node].role, Role::Down) {
                    self.nodes[node].incarnation += 1;
                    self.nodes[node].flusher_from_ms = self.now + self.rng.range(0, 300);
                    // A new agent process: heartbeats answered before it started count
                    // from its start, its Lease proves nothing until it has read its
                    // assignments, and its data port's fences start empty.
                    self.nodes[node].last_heartbeat_rx_ms = self.now;
                    self.nodes[node].lease_latched = true;
                    self.nodes[node].needs_new_epoch = false;
                    self.nodes[node].fences = ForwardFences::new();
                    self.nodes[node].role =
                        Role::Replica(ReceiverCore::new(self.volume.clone(), self.rcfg));
                    self.nodes[node].receiver_gen += 1;
                    if self.trace {
                        eprintln!(
                            "t={} node{node} RESTART durable={}",
                            self.now,
                            self.nodes[node].log.durable_lsn()
                        );
                    }
                    // No failover happened (or its promotion reached a dead node): the
                    // assignment says primary at the current epoch, and the agent applies
                    // it again.
                    if self.cp.primary == node && !self.nodes[node].log.rebuilding() {
                        self.restart_as_primary(node);
                    }
                }
            }
            Ev::NeedsNewEpoch { node, epoch } => {
                // A status report: it reaches the operator once the API does.
                if let Some(at) = self.api_blocked_until(node) {
                    self.schedule(at, Ev::NeedsNewEpoch { node, epoch });
                    return;
                }
                // The primary serves nothing: promote at the next epoch right away (the
                // restarted node itself is a candidate).
                if self.cp.primary == node && self.cp.epoch == epoch {
                    self.failover(false);
                }
            }
        }
    }

    /// The agent starts a restarted node as primary at the current epoch, the way
    /// `Promote` does, unless its log refuses a primary term there: then it reports that
    /// it needs a new epoch and waits as a replica.
    fn restart_as_primary(&mut self, idx: usize) {
        let epoch = self.cp.epoch;
        // Taking up a newer epoch than its volume's waits out the proof window since
        // the agent started, as a promotion does.
        self.nodes[idx].serve_after_ms = if epoch > self.nodes[idx].log.epoch() {
            self.promotion_wait(idx)
        } else {
            self.now
        };
        if epoch > self.nodes[idx].log.epoch() {
            self.nodes[idx].log.set_epoch(epoch).unwrap();
        }
        let allowed = self.knobs.unguarded_primary_restart
            || self.nodes[idx].log.may_begin_primary_term(epoch);
        if !allowed {
            self.nodes[idx].needs_new_epoch = true;
            *self
                .stats
                .entry("primary_restart_refused".into())
                .or_default() += 1;
            let d = self.rng.range(2, 10);
            self.schedule(self.now + d, Ev::NeedsNewEpoch { node: idx, epoch });
            return;
        }
        *self
            .stats
            .entry("primary_restart_served".into())
            .or_default() += 1;
        let committed: Vec<ReplicaId> = self
            .cp
            .committed
            .iter()
            .map(|&i| self.nodes[i].id.clone())
            .collect();
        let peers = self.peers_for(idx);
        let node = &mut self.nodes[idx];
        let core = PrimaryCore::new(
            self.volume.clone(),
            node.id.clone(),
            epoch,
            self.pcfg.clone(),
            self.cp.generation,
            committed,
            &node.log,
        );
        node.role = Role::Primary(Box::new(core));
        self.primary_input(idx, Input::PeersAssigned(peers));
    }

    // ----- control plane --------------------------------------------------------------

    fn send_to_node(&mut self, node: usize, msg: CpMsg, max_delay: u64) {
        let d = self.rng.range(1, max_delay);
        self.schedule(self.now + d, Ev::ToNode { node, msg });
    }

    fn idx_of(&self, id: &ReplicaId) -> Option<usize> {
        self.nodes.iter().position(|n| &n.id == id)
    }

    fn commit(&mut self) {
        self.cp.generation = Generation(self.cp.generation.0 + 1);
        let members: Vec<ReplicaId> = self
            .cp
            .committed
            .iter()
            .map(|&i| self.nodes[i].id.clone())
            .collect();
        if self.trace {
            eprintln!(
                "t={} CP commit gen {} {:?}",
                self.now, self.cp.generation.0, self.cp.committed
            );
        }
        let msg = CpMsg::Commit {
            epoch: self.cp.epoch,
            generation: self.cp.generation,
            members,
        };
        let p = self.cp.primary;
        self.send_to_node(p, msg, 8);
    }

    fn cp_report(&mut self, node: usize, epoch: Epoch, report: Report) {
        if node != self.cp.primary || epoch != self.cp.epoch {
            return;
        }
        if self.trace {
            eprintln!("t={} CP report from node{node}: {report:?}", self.now);
        }
        match report {
            Report::MemberUnreachable {
                replica,
                generation,
            } => {
                let Some(i) = self.idx_of(&replica) else {
                    return;
                };
                if generation == self.cp.generation
                    && i != self.cp.primary
                    && self.cp.committed.remove(&i)
                {
                    self.commit();
                }
            }
            Report::MemberInSync {
                replica,
                generation,
                ..
            } => {
                let Some(i) = self.idx_of(&replica) else {
                    return;
                };
                if generation == self.cp.generation && self.cp.committed.insert(i) {
                    self.commit();
                }
            }
            Report::NeedsRebuild { replica, .. } => {
                if let Some(i) = self.idx_of(&replica) {
                    self.cp.needs_rebuild.insert(i);
                }
            }
            Report::Fenced { .. } => {
                let e = self.cp.epoch;
                self.send_to_node(node, CpMsg::BecomeReplica { epoch: e }, 5);
            }
            Report::StateChanged { .. } | Report::LocalDiskFailed => {}
        }
    }

    /// Whether the control plane is out of reach of `node`'s agent: then until when.
    fn api_blocked_until(&self, node: usize) -> Option<u64> {
        let until = self.cp.down_until_ms.max(self.nodes[node].api_cut_until_ms);
        (self.now < until).then_some(until + 1)
    }

    /// When a node promoted now may serve: once the proof window has passed since the
    /// last heartbeat it received (or its agent started), so the previous primary's
    /// member proof, dated from when that heartbeat left, has run out first.
    fn promotion_wait(&self, idx: usize) -> u64 {
        if self.knobs.no_promotion_wait {
            self.now
        } else {
            self.now
                .max(self.nodes[idx].last_heartbeat_rx_ms + PROOF_WINDOW_MS)
        }
    }

    /// The agent of `i` renews its Lease. After a lapse it first re-reads its
    /// assignments and stops a primary the control plane no longer names at its epoch.
    fn renew_lease(&mut self, i: usize) {
        if self.now >= self.nodes[i].lease_renewed_ms + LEASE_MS {
            self.nodes[i].lease_latched = true;
        }
        if self.nodes[i].lease_latched {
            let e = self.cp.epoch;
            self.node_msg(i, CpMsg::BecomeReplica { epoch: e });
            self.nodes[i].lease_latched = false;
        }
        self.nodes[i].lease_renewed_ms = self.now;
    }

    /// A report that waited for the API still describes the primary's state: the
    /// status the agent writes once it gets through is its state by then, not a queue
    /// of past ones.
    fn report_still_holds(&self, node: usize, report: &Report) -> bool {
        let Role::Primary(c) = &self.nodes[node].role else {
            return false;
        };
        match report {
            Report::MemberInSync { replica, .. } => {
                c.state_of(replica) == Some(engine::replication::ReplicaState::InSync)
            }
            Report::MemberUnreachable { replica, .. } => {
                c.state_of(replica) != Some(engine::replication::ReplicaState::InSync)
            }
            _ => true,
        }
    }

    fn cp_tick(&mut self) {
        if self.now < self.cp.down_until_ms {
            // Outage: no renewals, commits, promotions or rebuild orders.
            *self.stats.entry("cp_outage_ms".into()).or_default() += 10;
            return;
        }
        if self.now.is_multiple_of(RENEW_MS) {
            for i in 0..self.nodes.len() {
                if !matches!(self.nodes[i].role, Role::Down)
                    && self.now >= self.nodes[i].api_cut_until_ms
                {
                    self.renew_lease(i);
                }
            }
        }
        if self.now >= self.nodes[self.fwd.node].api_cut_until_ms {
            self.fwd_view = (self.cp.primary, self.cp.epoch);
        }
        // Rebuild requests for members the set no longer holds.
        let todo: Vec<usize> = self
            .cp
            .needs_rebuild
            .iter()
            .copied()
            .filter(|i| !self.cp.committed.contains(i))
            .collect();
        for i in todo {
            self.cp.needs_rebuild.remove(&i);
            let msg = CpMsg::Rebuild {
                epoch: self.cp.epoch,
                replica: self.nodes[i].id.clone(),
            };
            let p = self.cp.primary;
            self.send_to_node(p, msg, 10);
        }
        let p = self.cp.primary;
        let serving = matches!(&self.nodes[p].role, Role::Primary(c) if c.epoch() == self.cp.epoch && c.fenced().is_none());
        if serving {
            self.cp.not_serving_since = None;
        } else if self.cp.not_serving_since.is_none() {
            self.cp.not_serving_since = Some(self.now);
        }
        let expired = self
            .cp
            .not_serving_since
            .is_some_and(|t| self.now.saturating_sub(t) > LEASE_MS);
        // The primary's Lease expired (its agent died or lost the API); expiry counts
        // from the end of the last outage, not from before it.
        let renewed = self.nodes[p].lease_renewed_ms.max(self.cp.gap_end_ms);
        let lease_expired = self.now > renewed + LEASE_MS;
        if expired || lease_expired {
            if lease_expired && !expired {
                *self.stats.entry("cp_lease_expired".into()).or_default() += 1;
            }
            self.failover(lease_expired && !expired);
        }
    }

    fn failover(&mut self, exclude_old: bool) {
        let old = self.cp.primary;
        let candidates: Vec<usize> = self
            .cp
            .committed
            .iter()
            .copied()
            .filter(|&i| !(exclude_old && i == old))
            .filter(|&i| {
                matches!(self.nodes[i].role, Role::Replica(_))
                    || (i == old && !exclude_old && !matches!(self.nodes[i].role, Role::Down))
            })
            .filter(|&i| !matches!(self.nodes[i].role, Role::Down))
            .collect();
        let Some(&best) = candidates
            .iter()
            .max_by_key(|&&i| (self.nodes[i].log.durable_lsn(), Reverse(i)))
        else {
            return;
        };
        let epoch = Epoch(self.cp.epoch.0 + 1);
        *self.stats.entry("cp_failover".into()).or_default() += 1;
        self.cp.epoch = epoch;
        self.cp.primary = best;
        if best != old {
            self.cp.committed.remove(&old);
        }
        self.cp.committed.insert(best);
        self.cp.generation = Generation(self.cp.generation.0 + 1);
        self.cp.not_serving_since = None;
        self.cp.needs_rebuild.clear();
        self.client_paused_until_ms = self.now + self.rng.range(0, 500);
        if self.trace {
            eprintln!(
                "t={} CP failover node{old} -> node{best} epoch {} committed {:?}",
                self.now, epoch.0, self.cp.committed
            );
        }
        // The promoted history must contain every acknowledged entry.
        let acked_max = self.checker.acked_max;
        if self.checker.durability == Durability::SyncAll {
            let now = self.now;
            self.checker
                .check_member(now, "promoted", best, &self.nodes[best].log, acked_max);
        }
        let committed: Vec<ReplicaId> = self
            .cp
            .committed
            .iter()
            .map(|&i| self.nodes[i].id.clone())
            .collect();
        let peers = self.peers_for(best);
        let generation = self.cp.generation;
        // A deposed operator's reconcile in flight promotes another member at the same
        // epoch (its writes land after the winner's, so that member learns late that
        // it is a replica).
        let rogue = if self.cp.rogue_pending && self.knobs.rogue_operator {
            self.cp.rogue_pending = false;
            if self.knobs.no_operator_fence {
                candidates.iter().copied().find(|&i| i != best && i != old)
            } else {
                // Its claim of the epoch is refused: the winner's claim changed the
                // volume after the view its plan came from.
                *self
                    .stats
                    .entry("rogue_promotion_refused".into())
                    .or_default() += 1;
                None
            }
        } else {
            None
        };
        self.send_to_node(
            best,
            CpMsg::Promote {
                epoch,
                generation,
                committed: committed.clone(),
                peers,
                rogue: false,
            },
            3,
        );
        if let Some(r) = rogue {
            let peers = self.peers_for(r);
            self.send_to_node(
                r,
                CpMsg::Promote {
                    epoch,
                    generation,
                    committed,
                    peers,
                    rogue: true,
                },
                5,
            );
            let d = self.rng.range(50, 300);
            self.schedule(
                self.now + d,
                Ev::ToNode {
                    node: r,
                    msg: CpMsg::BecomeReplica { epoch },
                },
            );
        }
        for i in 0..self.nodes.len() {
            if i != best && Some(i) != rogue {
                // The old primary may learn late (it was cut off from the control plane).
                let max = if i == old { 150 } else { 30 };
                self.send_to_node(i, CpMsg::BecomeReplica { epoch }, max);
            }
        }
    }

    fn node_msg(&mut self, idx: usize, msg: CpMsg) {
        if matches!(self.nodes[idx].role, Role::Down) {
            return;
        }
        match msg {
            CpMsg::Promote {
                epoch,
                generation,
                committed,
                peers,
                rogue,
            } => {
                if epoch != self.cp.epoch || (self.cp.primary != idx && !rogue) {
                    return;
                }
                if !matches!(self.nodes[idx].role, Role::Replica(_)) && rogue {
                    return;
                }
                self.nodes[idx].serve_after_ms = if self.nodes[idx].needs_new_epoch {
                    self.now
                } else {
                    self.promotion_wait(idx)
                };
                self.nodes[idx].needs_new_epoch = false;
                if rogue {
                    *self.stats.entry("rogue_promoted".into()).or_default() += 1;
                }
                let node = &mut self.nodes[idx];
                if node.log.rebuilding() {
                    return;
                }
                node.log.set_epoch(epoch).unwrap();
                if !node.log.may_begin_primary_term(epoch) {
                    // The node was reopened at this epoch after it learnt it (from a peer)
                    // and before the promotion reached it: the agent refuses and reports.
                    node.needs_new_epoch = true;
                    *self
                        .stats
                        .entry("promotion_refused_reopened".into())
                        .or_default() += 1;
                    let d = self.rng.range(2, 10);
                    self.schedule(self.now + d, Ev::NeedsNewEpoch { node: idx, epoch });
                    return;
                }
                node.incarnation += 1;
                let core = PrimaryCore::new(
                    self.volume.clone(),
                    node.id.clone(),
                    epoch,
                    self.pcfg.clone(),
                    generation,
                    committed,
                    &node.log,
                );
                node.role = Role::Primary(Box::new(core));
                for key in self.active.clone() {
                    if self.conns[key].replica == idx || self.conns[key].primary == idx {
                        self.break_conn(key);
                    }
                }
                self.primary_input(idx, Input::PeersAssigned(peers));
            }
            CpMsg::BecomeReplica { epoch } => {
                let node = &mut self.nodes[idx];
                if epoch > node.log.epoch() {
                    node.log.set_epoch(epoch).unwrap();
                }
                if matches!(node.role, Role::Primary(_))
                    && !(self.cp.primary == idx && self.cp.epoch == epoch)
                {
                    node.incarnation += 1;
                    node.role = Role::Replica(ReceiverCore::new(self.volume.clone(), self.rcfg));
                    node.receiver_gen += 1;
                    for key in self.active.clone() {
                        if self.conns[key].primary == idx {
                            self.break_conn(key);
                        }
                    }
                }
            }
            CpMsg::Commit {
                epoch,
                generation,
                members,
            } => self.core_msg(
                idx,
                epoch,
                Input::InSyncSetCommitted {
                    generation,
                    members,
                },
            ),
            CpMsg::Rebuild { epoch, replica } => {
                self.core_msg(idx, epoch, Input::RebuildRequested(replica))
            }
            CpMsg::Peers { epoch, peers } => self.core_msg(idx, epoch, Input::PeersAssigned(peers)),
        }
    }

    fn core_msg(&mut self, idx: usize, epoch: Epoch, input: Input) {
        if matches!(&self.nodes[idx].role, Role::Primary(c) if c.epoch() == epoch) {
            self.primary_input(idx, input);
        }
    }

    // ----- faults and client ------------------------------------------------------------

    fn faults_tick(&mut self) {
        let n = self.nodes.len();
        if self.rng.ppm(1_500) {
            let i = self.rng.below(n as u64) as usize;
            self.crash(i);
        }
        if self.rng.ppm(3_000) {
            let up: Vec<usize> = self
                .active
                .iter()
                .copied()
                .filter(|&k| self.conns[k].up)
                .collect();
            if !up.is_empty() {
                let k = up[self.rng.below(up.len() as u64) as usize];
                self.break_conn(k);
            }
        }
        if self.rng.ppm(1_500) {
            let a = self.rng.below(n as u64) as usize;
            let b = self.rng.below(n as u64) as usize;
            if a != b {
                let until = self.now + self.rng.range(20, 500);
                self.partitions.push((a, b, until));
                for key in self.active.clone() {
                    let c = &self.conns[key];
                    if (c.primary == a && c.replica == b) || (c.primary == b && c.replica == a) {
                        self.break_conn(key);
                    }
                }
            }
        }
        if self.rng.ppm(800) {
            let i = self.rng.below(n as u64) as usize;
            if !self.nodes[i].log.rebuilding() {
                self.nodes[i].log.fail_next_sync = true;
            }
        }
        if self.rng.ppm(500) {
            // Address change: the replica keeps its identity.
            let i = self.rng.below(n as u64) as usize;
            if i != self.cp.primary {
                self.nodes[i].addr_gen += 1;
                for key in self.active.clone() {
                    if self.conns[key].replica == i {
                        self.break_conn(key);
                    }
                }
                let p = self.cp.primary;
                let peers = self.peers_for(p);
                let e = self.cp.epoch;
                self.send_to_node(p, CpMsg::Peers { epoch: e, peers }, 20);
            }
        }
        if self.rng.ppm(400) && self.now >= self.cp.down_until_ms {
            // Control-plane outage: API server or operator unavailable for a stretch
            // longer than the Lease, while the faults above go on.
            self.cp.down_until_ms = self.now + self.rng.range(100, 700);
            self.cp.gap_end_ms = self.cp.down_until_ms;
            *self.stats.entry("cp_outage".into()).or_default() += 1;
        }
        if self.rng.ppm(400) {
            // One agent loses the API (its renewals, reports and watch), not its peers.
            let i = self.rng.below(n as u64) as usize;
            let until = self.now + self.rng.range(30, 500);
            self.nodes[i].api_cut_until_ms = self.nodes[i].api_cut_until_ms.max(until);
            *self.stats.entry("api_cut".into()).or_default() += 1;
        }
        if self.rng.ppm(500) {
            // A node loses its network: its peers, its forwarders and the API.
            let i = self.rng.below(n as u64) as usize;
            let until = self.now + self.rng.range(100, 600);
            for j in (0..n).filter(|&j| j != i) {
                self.partitions.push((i, j, until));
            }
            for key in self.active.clone() {
                let c = &self.conns[key];
                if c.primary == i || c.replica == i {
                    self.break_conn(key);
                }
            }
            self.nodes[i].api_cut_until_ms = self.nodes[i].api_cut_until_ms.max(until);
            *self.stats.entry("node_isolated".into()).or_default() += 1;
        }
        if self.rng.ppm(800) {
            self.cp.rogue_pending = true;
        }
        let now = self.now;
        self.partitions.retain(|&(_, _, until)| until > now);
    }

    /// Whether node `p` serves client IO, and at which epoch: as the agent's backend
    /// decides (`ReplicatedBackend::check_writable`): a primary core that is not fenced,
    /// past its promotion wait, with a fresh Lease or a fresh member proof.
    fn serving(&self, p: usize) -> Option<Epoch> {
        let n = &self.nodes[p];
        let Role::Primary(c) = &n.role else {
            return None;
        };
        if c.fenced().is_some() {
            return None;
        }
        if self.knobs.no_io_fence {
            return Some(c.epoch());
        }
        if self.now < n.serve_after_ms {
            return None;
        }
        let lease = !n.lease_latched && self.now < n.lease_renewed_ms + LEASE_MS;
        let proof = c
            .member_proof_ms()
            .is_some_and(|t| self.now.saturating_sub(t) < PROOF_WINDOW_MS);
        (lease || proof).then(|| c.epoch())
    }

    /// What node `p`'s volume returns for `lba`.
    fn read_lba(&self, p: usize, lba: usize) -> Option<u64> {
        let b = self.nodes[p].log.visible_block(Lba(lba as u64));
        if std::env::var("SIM_CHECK_READS").is_ok() {
            assert_eq!(
                b.as_ref(),
                self.nodes[p].log.visible_state().get(&Lba(lba as u64))
            );
        }
        b.map(|d| u64::from_le_bytes(d[..8].try_into().unwrap()))
    }

    /// A read of `lba` served by `p` at `epoch`, checked against `floor`.
    fn check_read(&mut self, floor: &Floor, p: usize, epoch: Epoch, got: Option<u64>) {
        let durable = self.checker.durability == Durability::SyncAll;
        if let Err(v) = self
            .checker
            .client
            .check_read(floor, epoch, p, got, durable)
        {
            let now = self.now;
            self.checker.violation(now, v);
        }
    }

    fn client_tick(&mut self, writes: bool) {
        let paused = self.now < self.client_paused_until_ms;
        for p in 0..self.nodes.len() {
            let Some(epoch) = self.serving(p) else {
                continue;
            };
            if !paused && writes && self.rng.ppm(300_000) {
                self.write_counter += 1;
                let lba = self.rng.below(LOCAL_LBAS);
                let (kind, blocks, data, val) = if self.rng.below(20) == 0 {
                    let b = self.rng.range(1, 4).min(LOCAL_LBAS - lba);
                    (EntryKind::Trim, b as u32, Vec::new(), None)
                } else {
                    (
                        EntryKind::Write,
                        1,
                        self.write_counter.to_le_bytes().to_vec(),
                        Some(self.write_counter),
                    )
                };
                let e = self.nodes[p]
                    .log
                    .append_local(kind, Lba(lba), blocks, data)
                    .unwrap();
                let now = self.now;
                self.checker.on_issued(now, p, &e);
                for l in lba..lba + u64::from(blocks) {
                    let seq = self.checker.client.issue(l as usize, val);
                    self.checker.client.acked(l as usize, seq, epoch, p);
                }
                self.primary_input(p, Input::Appended(e));
            }
            if epoch < self.cp.epoch {
                *self.stats.entry("deposed_serving_ms".into()).or_default() += 1;
            }
            let n = &self.nodes[p];
            if n.lease_latched || self.now >= n.lease_renewed_ms + LEASE_MS {
                // Serving on the member proof alone (no fresh Lease).
                *self
                    .stats
                    .entry("served_on_member_proof_ms".into())
                    .or_default() += 1;
                if self.nodes.len() == 1 && self.now < self.cp.down_until_ms {
                    *self
                        .stats
                        .entry("rf1_served_in_outage_ms".into())
                        .or_default() += 1;
                }
            }
            if self.rng.ppm(40_000) {
                // Half of the reads go to the forwarded blocks: their writes go on
                // while local writes pause after a failover.
                let lba = if self.rng.below(2) == 0 {
                    LOCAL_LBAS + self.rng.below(FWD_LBAS)
                } else {
                    self.rng.below(LOCAL_LBAS)
                } as usize;
                let floor = self.checker.client.floor(lba);
                let got = self.read_lba(p, lba);
                self.check_read(&floor, p, epoch, got);
            }
            if !paused && self.rng.ppm(60_000) {
                self.next_flush += 1;
                let id = FlushId(self.next_flush);
                self.checker.client.flush_requested(id.0, epoch, p);
                self.primary_input(p, Input::FlushRequested(id));
            }
        }
    }

    // ----- forwarded IO --------------------------------------------------------------

    fn fwd_delay(&mut self) -> u64 {
        if self.faults && self.rng.ppm(50_000) {
            self.rng.range(20, 150)
        } else {
            self.rng.range(0, 2)
        }
    }

    fn fwd_stall(&mut self) -> u64 {
        if self.faults && self.rng.ppm(40_000) {
            self.rng.range(20, 150)
        } else {
            0
        }
    }

    /// The forwarder gives its connection up: everything in flight is retried on the
    /// next one (the data port sees the close after the data already sent).
    fn fwd_give_up(&mut self, retry_in: u64) {
        if let Some(k) = self.fwd.conn.take() {
            self.fconns[k].up = false;
        }
        let inflight = std::mem::take(&mut self.fwd.inflight);
        for (_, (_, mut r)) in inflight.into_iter().rev() {
            r.attempts += 1;
            if r.attempts > 30 {
                // The client gets an error; what the request did is unknown.
                if let FwdOp::Write { lba, .. } = r.op {
                    self.checker.client.lbas[lba].writing = false;
                }
                continue;
            }
            self.fwd.queue.push_front(r);
        }
        self.fwd.retry_at = self.now + retry_in;
    }

    /// Executes a forwarded request on `p`, as primary at `epoch`.
    fn fwd_execute(&mut self, p: usize, epoch: Epoch, op: &FwdOp) -> FwdReply {
        if self.serving(p) != Some(epoch) {
            return FwdReply::Refused;
        }
        self.fwd_execute_admitted(p, epoch, op)
    }

    /// Executes a request that is already inside `p`'s volume.
    fn fwd_execute_admitted(&mut self, p: usize, epoch: Epoch, op: &FwdOp) -> FwdReply {
        match op {
            FwdOp::Write { lba, val, .. } => {
                let e = self.nodes[p]
                    .log
                    .append_local(
                        EntryKind::Write,
                        Lba(*lba as u64),
                        1,
                        val.to_le_bytes().to_vec(),
                    )
                    .unwrap();
                let now = self.now;
                self.checker.on_issued(now, p, &e);
                self.primary_input(p, Input::Appended(e));
                FwdReply::Ok {
                    node: p,
                    epoch,
                    data: None,
                }
            }
            FwdOp::Read { floor } => FwdReply::Ok {
                node: p,
                epoch,
                data: self.read_lba(p, floor.lba),
            },
        }
    }

    fn fwd_complete(&mut self, req: FwdReq, reply: FwdReply) {
        match reply {
            FwdReply::Ok { node, epoch, data } => match req.op {
                FwdOp::Write { lba, seq, .. } => {
                    self.checker.client.acked(lba, seq, epoch, node);
                    self.checker.client.lbas[lba].writing = false;
                    *self.stats.entry("fwd_write_acked".into()).or_default() += 1;
                }
                FwdOp::Read { floor } => self.check_read(&floor, node, epoch, data),
            },
            FwdReply::Refused => {
                // Re-resolve the primary and retry.
                self.fwd.queue.push_front(req);
                self.fwd_give_up(5);
            }
        }
    }

    fn fwd_tick(&mut self, writes: bool) {
        // The client on the attached node issues IO.
        if self.fwd.queue.len() + self.fwd.inflight.len() < 8 && self.rng.ppm(60_000) {
            self.fwd.next_id += 1;
            let id = self.fwd.next_id;
            let op = if writes && self.rng.below(10) < 7 {
                let lba = (LOCAL_LBAS + self.rng.below(FWD_LBAS)) as usize;
                if self.checker.client.lbas[lba].writing {
                    None
                } else {
                    self.write_counter += 1;
                    let val = self.write_counter;
                    let seq = self.checker.client.issue(lba, Some(val));
                    self.checker.client.lbas[lba].writing = true;
                    Some(FwdOp::Write { lba, seq, val })
                }
            } else {
                let lba = self.rng.below(LOCAL_LBAS + FWD_LBAS) as usize;
                Some(FwdOp::Read {
                    floor: self.checker.client.floor(lba),
                })
            };
            if let Some(op) = op {
                self.fwd.queue.push_back(FwdReq {
                    id,
                    op,
                    attempts: 0,
                });
            }
        }
        // Timeouts.
        let now = self.now;
        if self
            .fwd
            .inflight
            .values()
            .any(|(sent, _)| now.saturating_sub(*sent) > FWD_TIMEOUT_MS)
        {
            *self.stats.entry("fwd_timeout".into()).or_default() += 1;
            self.fwd_give_up(1);
        }
        // Send.
        if !self.fwd.queue.is_empty() && self.fwd.conn.is_none() && self.now >= self.fwd.retry_at {
            let (t, epoch) = self.fwd_view;
            let f = self.fwd.node;
            if t == f {
                // In process: no connection, nothing can outlive it.
                while let Some(r) = self.fwd.queue.pop_front() {
                    let reply = self.fwd_execute(t, epoch, &r.op);
                    self.fwd_complete(r, reply);
                    if self.fwd.conn.is_none() && self.now < self.fwd.retry_at {
                        break;
                    }
                }
            } else if matches!(self.nodes[t].role, Role::Down) || self.partitioned(f, t) {
                self.fwd.retry_at = self.now + 5;
            } else {
                self.nodes[t].accepted_conns += 1;
                let id = self.nodes[t].accepted_conns;
                self.fconns.push(FConn {
                    to: t,
                    to_inc: self.nodes[t].incarnation,
                    server: ForwardConn::new(id),
                    up: true,
                    server_up: true,
                    epoch,
                    to_server: VecDeque::new(),
                    to_client: VecDeque::new(),
                });
                self.fwd.conn = Some(self.fconns.len() - 1);
            }
        }
        if let Some(k) = self.fwd.conn {
            while let Some(r) = self.fwd.queue.pop_front() {
                let d = self.fwd_delay();
                let c = &mut self.fconns[k];
                let at = c.to_server.back().map_or(0, |(t, _)| *t).max(now + d);
                c.to_server.push_back((at, r.clone()));
                self.fwd.inflight.insert(r.id, (now, r));
            }
        }
        self.fwd_serve();
        // Replies.
        for k in 0..self.fconns.len() {
            while self.fconns[k]
                .to_client
                .front()
                .is_some_and(|(t, _, _)| *t <= now)
            {
                let (_, id, reply) = self.fconns[k].to_client.pop_front().unwrap();
                if self.fwd.conn != Some(k) {
                    continue;
                }
                if let Some((_, r)) = self.fwd.inflight.remove(&id) {
                    self.fwd_complete(r, reply);
                }
            }
        }
        let fconns = &self.fconns;
        if fconns.len() > 64 && self.ftasks.is_empty() {
            // Connections nobody uses any more, nothing queued: forget them.
            let live = fconns
                .iter()
                .any(|c| c.server_up || !c.to_client.is_empty());
            if !live && self.fwd.conn.is_none() {
                self.fconns.clear();
            }
        }
    }

    /// The data ports: read forwarded requests and run them through the fence.
    fn fwd_serve(&mut self) {
        let now = self.now;
        let f = self.fwd.node;
        for k in 0..self.fconns.len() {
            let (t, inc) = (self.fconns[k].to, self.fconns[k].to_inc);
            if !self.fconns[k].server_up {
                continue;
            }
            if self.nodes[t].incarnation != inc {
                self.fconns[k].server_up = false;
                continue;
            }
            if self.partitioned(f, t) {
                continue;
            }
            while self.fconns[k]
                .to_server
                .front()
                .is_some_and(|(at, _)| *at <= now)
            {
                let (_, req) = self.fconns[k].to_server.pop_front().unwrap();
                self.ftasks.push(FwdTask {
                    conn: k,
                    req,
                    stage: 0,
                    until: 0,
                    admitted: None,
                });
            }
            if !self.fconns[k].up && self.fconns[k].to_server.is_empty() {
                // The close arrives after the data sent before it.
                self.fconns[k].server.close();
                self.fconns[k].server_up = false;
            }
        }
        let node_name = self.nodes[f].id.as_str().to_string();
        let mut i = 0;
        while i < self.ftasks.len() {
            let k = self.ftasks[i].conn;
            let t = self.fconns[k].to;
            let source = ForwardSource::connection(
                &node_name,
                self.nodes[t].fences.clone(),
                self.fconns[k].server.clone(),
                self.volume.clone(),
            );
            let fence = !self.knobs.no_forward_fence;
            let mut reply = None;
            match self.ftasks[i].stage {
                0 => {
                    if fence
                        && !arrive_ready(
                            &self.nodes[t].fences,
                            &self.fconns[k].server,
                            &node_name,
                            &self.volume,
                        )
                    {
                        i += 1;
                        continue;
                    }
                    if fence && !source.is_current() {
                        reply = Some(FwdReply::Refused);
                    } else {
                        let d = self.fwd_stall();
                        self.ftasks[i].stage = 1;
                        self.ftasks[i].until = now + d;
                    }
                }
                1 if now >= self.ftasks[i].until => {
                    let admitted = if fence {
                        source.admit().map(Some)
                    } else {
                        Ok(None)
                    };
                    match admitted {
                        Err(_) => {
                            *self.stats.entry("fwd_fence_cancelled".into()).or_default() += 1;
                            reply = Some(FwdReply::Refused)
                        }
                        Ok(g) => {
                            let epoch = self.fconns[k].epoch;
                            if self.serving(t) != Some(epoch) {
                                reply = Some(FwdReply::Refused);
                            } else {
                                let d = self.fwd_stall();
                                self.ftasks[i].stage = 2;
                                self.ftasks[i].until = now + d;
                                self.ftasks[i].admitted = g;
                            }
                        }
                    }
                }
                2 if now >= self.ftasks[i].until => {
                    let epoch = self.fconns[k].epoch;
                    let op = self.ftasks[i].req.op.clone();
                    // Inside the volume: it lands unless the primary has gone meanwhile.
                    reply = Some(match &self.nodes[t].role {
                        Role::Primary(c) if c.epoch() == epoch => {
                            let r = self.fwd_execute_admitted(t, epoch, &op);
                            *self.stats.entry("fwd_executed".into()).or_default() += 1;
                            r
                        }
                        _ => FwdReply::Refused,
                    });
                }
                _ => {}
            }
            if let Some(reply) = reply {
                let task = self.ftasks.remove(i);
                drop(task.admitted);
                let d = self.rng.range(0, 2);
                let c = &mut self.fconns[task.conn];
                if c.server_up {
                    let at = c.to_client.back().map_or(0, |(t, _, _)| *t).max(now + d);
                    c.to_client.push_back((at, task.req.id, reply));
                }
            } else {
                i += 1;
            }
        }
    }

    fn deliver(&mut self) {
        let conns = &self.conns;
        self.active.retain(|&k| conns[k].up);
        let mut due: Vec<usize> = self
            .active
            .iter()
            .copied()
            .filter(|&k| {
                let c = &self.conns[k];
                c.up && (c.to_replica.front().is_some_and(|(t, _)| *t <= self.now)
                    || c.to_primary.front().is_some_and(|(t, _)| *t <= self.now))
            })
            .collect();
        // Reorder across connections.
        for i in (1..due.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            due.swap(i, j);
        }
        for key in due {
            loop {
                let now = self.now;
                let c = &mut self.conns[key];
                if !c.up {
                    break;
                }
                let to_r = c.to_replica.front().is_some_and(|(t, _)| *t <= now);
                let to_p = c.to_primary.front().is_some_and(|(t, _)| *t <= now);
                if to_r {
                    let (_, m) = c.to_replica.pop_front().unwrap();
                    let (r, rinc) = (c.replica, c.replica_inc);
                    if self.nodes[r].incarnation == rinc {
                        if matches!(m.body, engine::replication::Body::Heartbeat { .. })
                            && matches!(self.nodes[r].role, Role::Replica(_))
                        {
                            self.nodes[r].last_heartbeat_rx_ms = now;
                        }
                        self.replica_input(
                            r,
                            ReceiverInput::Received {
                                conn: ConnId(key as u64),
                                msg: m,
                            },
                        );
                    } else {
                        self.break_conn(key);
                    }
                } else if to_p {
                    let (_, m) = c.to_primary.pop_front().unwrap();
                    let (p, inc, cc) = (c.primary, c.primary_inc, c.core_conn);
                    if self.nodes[p].incarnation == inc {
                        self.primary_input(p, Input::Received { conn: cc, msg: m });
                    } else {
                        self.break_conn(key);
                    }
                } else {
                    break;
                }
            }
        }
    }

    fn tick_cores(&mut self) {
        for i in 0..self.nodes.len() {
            match self.nodes[i].role {
                Role::Primary(_) => self.primary_input(i, Input::Tick),
                Role::Replica(_) => self.replica_input(i, ReceiverInput::Tick),
                Role::Down => {}
            }
        }
    }

    fn step_ms(&mut self, writes: bool) {
        if self.faults {
            self.faults_tick();
        }
        self.client_tick(writes);
        self.fwd_tick(writes);
        while let Some(Reverse((t, _, key))) = self.events.peek().copied() {
            if t > self.now {
                break;
            }
            self.events.pop();
            if let Some(ev) = self.ev_store.remove(&key) {
                self.handle(ev);
            }
        }
        self.deliver();
        if self.now.is_multiple_of(5) {
            self.tick_cores();
        }
        if self.now.is_multiple_of(10) {
            self.cp_tick();
        }
        if self.now.is_multiple_of(20) {
            let now = self.now;
            for n in &mut self.nodes {
                if !matches!(n.role, Role::Down) && now >= n.flusher_from_ms {
                    n.log.flush_checkpoint();
                }
            }
        }
        if self.now.is_multiple_of(50) && self.checker.durability == Durability::SyncAll {
            // Cheap periodic check; the full history check runs on promotion and at the end.
            let upto = self.checker.acked_max;
            for &m in &self.cp.committed {
                let log = &self.nodes[m].log;
                if upto > Lsn(0) && (log.rebuilding() || log.durable_lsn() < upto) {
                    let msg = format!(
                        "committed member node{m} durable {} < acknowledged {upto} (rebuilding: {})",
                        log.durable_lsn(),
                        log.rebuilding()
                    );
                    self.checker.violation(self.now, msg);
                }
            }
        }
        self.now += 1;
    }

    fn run(&mut self, fault_ms: u64, heal_ms: u64) {
        while self.now < fault_ms {
            self.step_ms(true);
        }
        // Heal: no new faults; everyone comes back; the system must converge.
        self.faults = false;
        self.partitions.clear();
        if self.cp.down_until_ms > self.now {
            self.cp.down_until_ms = self.now;
            self.cp.gap_end_ms = self.now;
        }
        for n in &mut self.nodes {
            n.api_cut_until_ms = n.api_cut_until_ms.min(self.now);
        }
        for i in 0..self.nodes.len() {
            if matches!(self.nodes[i].role, Role::Down) {
                self.schedule(self.now + 1, Ev::Restart { node: i });
            }
        }
        let end = fault_ms + heal_ms;
        let flush_at = fault_ms + heal_ms / 2;
        let mut final_flush = None;
        let before = self.flushes_acked;
        while self.now < end {
            self.step_ms(self.now < fault_ms + heal_ms / 4);
            // The first moment after `flush_at` at which the healed cluster has a serving
            // primary (a restart or a promotion may be under way right then).
            if self.now >= flush_at && final_flush.is_none() && self.now + 400 < end {
                let p = self.cp.primary;
                if self.serving(p) == Some(self.cp.epoch) {
                    self.next_flush += 1;
                    final_flush = Some(self.next_flush);
                    self.primary_input(p, Input::FlushRequested(FlushId(self.next_flush)));
                }
            }
        }
        let now = self.now;
        if self.checker.durability == Durability::SyncAll {
            let committed = self.cp.committed.clone();
            let upto = self.checker.acked_max;
            for m in committed {
                self.checker.check_member(
                    now,
                    "committed member (final)",
                    m,
                    &self.nodes[m].log,
                    upto,
                );
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(v) = visible_mismatch(&n.log) {
                self.checker.violation(now, format!("node{i} (final): {v}"));
            }
        }
        // Every block read back through the healed primary.
        let p = self.cp.primary;
        if let Some(e) = self.serving(p) {
            for lba in 0..(LOCAL_LBAS + FWD_LBAS) as usize {
                let floor = self.checker.client.floor(lba);
                let got = self.read_lba(p, lba);
                self.check_read(&floor, p, e, got);
            }
        }
        // Liveness after healing: a flush issued on the healed cluster is acknowledged.
        if final_flush.is_none() {
            self.checker
                .violation(now, "no serving primary after healing".into());
        } else if self.flushes_acked == before {
            self.checker.violation(
                now,
                "the final flush was not acknowledged after healing".into(),
            );
        }
    }
}

fn short_action(a: &Action) -> String {
    match a {
        Action::Send { conn, msg } => format!(
            "send {:?} e{} {:?}",
            conn,
            msg.epoch.0,
            short_body(&msg.body)
        ),
        other => format!("{other:?}"),
    }
}

fn short_body(b: &engine::replication::Body) -> String {
    use engine::replication::Body;
    match b {
        Body::Entry(e) => format!("Entry({} e{})", e.lsn, e.epoch.0),
        Body::BaseBlock { lba, .. } => format!("BaseBlock({})", lba.0),
        other => format!("{other:?}"),
    }
}

struct Outcome {
    violations: Vec<String>,
    acks: u64,
    reads: u64,
    stats: BTreeMap<String, u64>,
}

fn run_seed(seed: u64, knobs: Knobs) -> Outcome {
    let mut sim = Sim::new(seed, knobs);
    sim.run(1_200, 1_600);
    let _ = sim.seed;
    Outcome {
        violations: std::mem::take(&mut sim.checker.violations),
        acks: sim.checker.acks,
        reads: sim.checker.client.reads,
        stats: std::mem::take(&mut sim.stats),
    }
}

/// `SIM_KNOBS=no_io_fence,no_forward_fence,...` replays a seed with protections off.
fn knobs_from_env() -> Knobs {
    let mut k = Knobs::default();
    for name in std::env::var("SIM_KNOBS").unwrap_or_default().split(',') {
        match name.trim() {
            "" => {}
            "no_io_fence" => k.no_io_fence = true,
            "no_promotion_wait" => k.no_promotion_wait = true,
            "no_forward_fence" => k.no_forward_fence = true,
            "no_session_binding" => k.no_session_binding = true,
            "ack_before_synced" => k.ack_before_synced = true,
            "rogue_operator" => k.rogue_operator = true,
            "no_operator_fence" => k.no_operator_fence = true,
            other => panic!("unknown SIM_KNOBS entry {other}"),
        }
    }
    k
}

fn seeds_from_env(default_count: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED must be a u64")];
    }
    let count = common::env_u64("SIM_SEEDS", default_count);
    let base = common::env_u64("SIM_SEED_BASE", 1);
    (base..base + count).collect()
}

#[test]
fn simulation_holds_durability_ordering_and_fencing_invariants() {
    let seeds = seeds_from_env(2000);
    let mut failures = Vec::new();
    let mut acks = 0;
    let mut reads = 0;
    let mut stats: BTreeMap<String, u64> = BTreeMap::new();
    for &seed in &seeds {
        let out = run_seed(seed, knobs_from_env());
        acks += out.acks;
        reads += out.reads;
        for (k, v) in out.stats {
            *stats.entry(k).or_default() += v;
        }
        if !out.violations.is_empty() {
            eprintln!(
                "seed {seed} FAILED; replay with: SIM_SEED={seed} cargo test -p engine --test replication_sim -- --nocapture\n  {}",
                out.violations.join("\n  ")
            );
            failures.push(seed);
        }
    }
    eprintln!(
        "{} seeds, {} acknowledged flushes and {} reads checked, {} failing",
        seeds.len(),
        acks,
        reads,
        failures.len()
    );
    eprintln!("coverage: {stats:?}");
    assert!(
        acks > 0,
        "the simulation acknowledged no flush at all; it tests nothing"
    );
    if seeds.len() >= 100 {
        // The run must exercise the paths it claims to test.
        for k in [
            "cp_failover",
            "rx_truncated",
            "rx_rebuild_finished",
            "rx_stale_refused",
            "session_completed",
            "escalated_needs_rebuild",
            "crash_inside_flush_cycle",
            "rx_truncated_below_copied",
            "session_invalidated",
            "state->InSync",
            "primary_restart_refused",
            "cp_outage",
            "cp_lease_expired",
            "node_isolated",
            "fwd_timeout",
            "fwd_fence_cancelled",
            "fwd_write_acked",
            "served_on_member_proof_ms",
            "rf1_served_in_outage_ms",
            "crash_with_replica_fsync_in_flight",
        ] {
            assert!(
                stats.get(k).copied().unwrap_or(0) > 0,
                "simulation never exercised {k}"
            );
        }
    }
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}

/// How many of the seeds `1..=count` (`SIM_KNOB_SEEDS` overrides `count`) show a
/// violation that `caught` recognises, printed for the record.
fn seeds_caught(what: &str, knobs: Knobs, count: u64, caught: fn(&str) -> bool) -> u64 {
    let count = common::env_u64("SIM_KNOB_SEEDS", count);
    let n = (1..=count)
        .filter(|&s| run_seed(s, knobs).violations.iter().any(|v| caught(v)))
        .count() as u64;
    eprintln!("{what}: {n} of {count} seeds caught");
    n
}

/// With a protection off (`knobs`), the checker reports what `caught` recognises for at
/// least one of the seeds `1..=count`.
fn assert_caught(what: &str, knobs: Knobs, count: u64, caught: fn(&str) -> bool) {
    let n = seeds_caught(what, knobs, count, caught);
    assert!(n > 0, "{what} went unnoticed in {count} seeds");
}

#[test]
fn checker_catches_a_gate_that_acks_without_barriers() {
    let knobs = Knobs {
        skip_member_gate: true,
        ..Knobs::default()
    };
    assert_caught("a gate that ignores members", knobs, 60, |v| {
        v.contains("durable") || v.contains("acknowledged entry")
    });
}

#[test]
fn checker_catches_a_receiver_that_accepts_stale_epochs() {
    let knobs = Knobs {
        accept_stale_epoch: true,
        ..Knobs::default()
    };
    assert_caught("stale-epoch writes", knobs, 200, |v| {
        v.contains("stale epoch") || v.contains("acknowledged")
    });
}

#[test]
fn checker_catches_a_restarted_primary_that_reissues_lsns_at_its_old_epoch() {
    let knobs = Knobs {
        unguarded_primary_restart: true,
        ..Knobs::default()
    };
    assert_caught("a primary restarted at its old epoch", knobs, 400, |v| {
        v.contains("twice with different content")
    });
}

#[test]
fn checker_catches_a_truncation_that_resurrects_dropped_writes() {
    // Without the extent limit, as with primaries of older builds (and replicas), a
    // crashed flusher cycle leaves the extent ahead on the nodes that are truncated later.
    let knobs = Knobs {
        skip_extent_repair: true,
        no_extent_limit: true,
        ..Knobs::default()
    };
    assert_caught(
        "truncations exposing a crashed flusher cycle's copies",
        knobs,
        200,
        |v| v.contains("reads a write its log no longer has"),
    );
}

#[test]
fn checker_catches_a_primary_that_serves_reads_without_lease_or_member_proof() {
    // Without the IO fence a primary cut off from the control plane keeps serving after
    // its Lease ran out, while its successor acknowledges newer writes.
    let knobs = Knobs {
        no_io_fence: true,
        ..Knobs::default()
    };
    assert_caught("no IO fence", knobs, 150, |v| v.contains("stale read"));
}

#[test]
fn checker_catches_forwarded_writes_that_land_after_their_retry() {
    // Without the data port's fence a forwarded WRITE delayed past the forwarder's retry
    // (in the network, before admission, or inside the volume) lands after the retry
    // and after the client's next write of the same block.
    let knobs = Knobs {
        no_forward_fence: true,
        ..Knobs::default()
    };
    assert_caught("no forward fence", knobs, 150, |v| v.contains("stale read"));
}

#[test]
fn checker_catches_a_receiver_that_acks_before_its_fsync_is_done() {
    // A replica that answers a barrier when it asks for the fsync, not when the fsync
    // is done, acknowledges entries a crash still loses; a failover to it then loses
    // writes the primary acknowledged on its word.
    let knobs = Knobs {
        ack_before_synced: true,
        ..Knobs::default()
    };
    assert_caught("ack before synced", knobs, 100, |v| {
        v.contains("durable") || v.contains("acknowledged")
    });
}

fn two_primaries_lose_data(v: &str) -> bool {
    v.contains("twice with different content") || v.contains("acknowledged")
}

#[test]
fn checker_catches_two_primaries_at_one_epoch_without_the_session_binding() {
    // A deposed operator's reconcile promotes a second member at the winner's epoch;
    // without the binding both get their entries into the replicas.
    let knobs = Knobs {
        rogue_operator: true,
        no_operator_fence: true,
        no_session_binding: true,
        ..Knobs::default()
    };
    assert_caught("no session binding", knobs, 200, two_primaries_lose_data);
}

#[test]
fn checker_catches_two_primaries_at_one_epoch_without_the_operator_fence() {
    // With the deposed operator's promotion landing, the session binding alone refuses
    // the second primary only at a replica the first one reached first: until then the
    // second primary serves on its own fresh Lease and appends at the same (epoch, LSN)s.
    let knobs = Knobs {
        rogue_operator: true,
        no_operator_fence: true,
        ..Knobs::default()
    };
    assert_caught("no operator fence", knobs, 300, two_primaries_lose_data);
}

/// A deposed operator's in-flight reconcile tries to promote a second member at the
/// winner's epoch; its claim is refused (the operator fence), so no seed may lose an
/// acknowledged write, issue one (epoch, LSN) twice or serve a stale read, and some
/// seeds must have had a promotion refused. Without the fence 27 of seeds 1..=2000 fail
/// (`checker_catches_two_primaries_at_one_epoch_without_the_operator_fence`).
#[test]
fn two_primaries_at_one_epoch_lose_no_acknowledged_write() {
    let knobs = Knobs {
        rogue_operator: true,
        ..Knobs::default()
    };
    let mut failing = Vec::new();
    let mut refused = 0;
    for seed in seeds_from_env(300) {
        let out = run_seed(seed, knobs);
        refused += out
            .stats
            .get("rogue_promotion_refused")
            .copied()
            .unwrap_or(0);
        if !out.violations.is_empty() {
            eprintln!("seed {seed}:\n  {}", out.violations.join("\n  "));
            failing.push(seed);
        }
    }
    assert!(failing.is_empty(), "failing seeds: {failing:?}");
    assert!(refused > 0, "no seed tried a second promotion at one epoch");
}
