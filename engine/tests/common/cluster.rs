//! One primary core and its receiver cores over an in-memory network that delivers at
//! once, in order, on any `ReplicaLog` (`MemLog` for the protocol, `VolumeLog` for the
//! engine's volumes). Replicas fsync as soon as they ask (`step_blocking`); the primary's
//! local fsync completes at once too. Faults are switches: an unreachable replica refuses
//! connections, a black-holed one drops what it is sent, a muted one loses its barrier
//! answers, and `drop_conns_of` breaks its connections from the network side.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use engine::replication::{
    Action, Body, ConnId, Endpoint, EntryKind, Epoch, FlushId, Generation, Input, Lba, Lsn, MemLog,
    Peer, PrimaryConfig, PrimaryCore, ReceiverAction, ReceiverConfig, ReceiverCore, ReceiverEvent,
    ReceiverInput, RecoveryEvent, ReplicaId, ReplicaLog, ReplicaState, Report, VolumeId, VolumeMsg,
    step_blocking,
};

pub fn rid(s: &str) -> ReplicaId {
    ReplicaId::new(s).unwrap()
}

/// The volume every core of a test serves.
pub fn vol() -> VolumeId {
    VolumeId::new("vol-a").unwrap()
}

/// Replica `i`'s data-port address; `gen_` moves it (an address change).
pub fn endpoint(i: usize, gen_: u8) -> Endpoint {
    Endpoint::parse(&format!("10.0.{gen_}.{}:7000", i + 10)).unwrap()
}

/// A log at epoch 1 with nothing in it.
pub fn mem_log() -> MemLog {
    let mut log = MemLog::new();
    log.set_epoch(Epoch(1)).unwrap();
    log
}

enum Pending {
    ToPrimary(Input),
    ToReplica(usize, ReceiverInput),
}

/// Replica `r{i}` of a [`Cluster`].
pub struct Replica<L> {
    pub id: ReplicaId,
    pub core: ReceiverCore,
    pub log: L,
    /// Connections to it are refused.
    pub reachable: bool,
    /// Messages to this replica are dropped silently (a hung peer).
    pub blackhole: bool,
    /// Barrier replies from this replica are lost (it stalls mid catch-up).
    pub mute_barriers: bool,
    pub events: Vec<ReceiverEvent>,
    pub addr_gen: u8,
}

pub struct Cluster<L> {
    pub now: u64,
    pub primary: PrimaryCore,
    pub plog: L,
    pub replicas: Vec<Replica<L>>,
    /// Every connection the primary opened, by the replica it reached.
    pub conns: BTreeMap<ConnId, usize>,
    pub open: BTreeSet<ConnId>,
    queue: VecDeque<Pending>,
    pub acked: Vec<(FlushId, Lsn)>,
    pub failed: Vec<FlushId>,
    pub reports: Vec<Report>,
    pub events: Vec<RecoveryEvent>,
    /// Every message the primary sent, by the replica it went to.
    pub sent: Vec<(usize, VolumeMsg)>,
    next_flush: u64,
}

impl Cluster<MemLog> {
    /// Primary `p` and replicas `r0..r{n-1}` on fresh logs at epoch 1; `committed` is the
    /// committed in-sync set.
    pub fn new(n: usize, cfg: PrimaryConfig, committed: &[&str]) -> Self {
        Cluster::on_logs(
            mem_log(),
            (0..n).map(|_| mem_log()).collect(),
            cfg,
            committed,
        )
    }

    /// A client write of one block at the primary, handed to its core.
    pub fn write(&mut self, lba: u64, byte: u8) -> Lsn {
        let e = self
            .plog
            .append_local(EntryKind::Write, Lba(lba), 1, vec![byte; 8])
            .unwrap();
        let l = e.lsn;
        self.input(Input::Appended(e));
        l
    }
}

impl<L: ReplicaLog> Cluster<L> {
    /// Primary `p` on `plog` and replica `r{i}` on `logs[i]`, each replica assigned as a
    /// peer at epoch 1, generation 1.
    pub fn on_logs(plog: L, logs: Vec<L>, cfg: PrimaryConfig, committed: &[&str]) -> Self {
        let primary = PrimaryCore::new(
            vol(),
            rid("p"),
            Epoch(1),
            cfg,
            Generation(1),
            committed.iter().map(|s| rid(s)).collect(),
            &plog,
        );
        let replicas = logs
            .into_iter()
            .enumerate()
            .map(|(i, log)| Replica {
                id: rid(&format!("r{i}")),
                core: ReceiverCore::new(vol(), ReceiverConfig::default()),
                log,
                reachable: true,
                blackhole: false,
                mute_barriers: false,
                events: Vec::new(),
                addr_gen: 0,
            })
            .collect();
        let mut net = Cluster {
            now: 1,
            primary,
            plog,
            replicas,
            conns: BTreeMap::new(),
            open: BTreeSet::new(),
            queue: VecDeque::new(),
            acked: Vec::new(),
            failed: Vec::new(),
            reports: Vec::new(),
            events: Vec::new(),
            sent: Vec::new(),
            next_flush: 0,
        };
        let peers = net.peers();
        net.input(Input::PeersAssigned(peers));
        net
    }

    pub fn peers(&self) -> Vec<Peer> {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| Peer {
                id: r.id.clone(),
                endpoint: endpoint(i, r.addr_gen),
            })
            .collect()
    }

    /// Feeds the primary and delivers everything that follows.
    pub fn input(&mut self, i: Input) {
        self.queue.push_back(Pending::ToPrimary(i));
        self.pump();
    }

    /// Feeds replica `r` and delivers everything that follows.
    pub fn replica_input(&mut self, r: usize, i: ReceiverInput) {
        self.queue.push_back(Pending::ToReplica(r, i));
        self.pump();
    }

    fn pump(&mut self) {
        let mut steps = 0;
        while let Some(p) = self.queue.pop_front() {
            steps += 1;
            assert!(steps < 1_000_000, "network did not quiesce");
            match p {
                Pending::ToPrimary(i) => {
                    let acts = self.primary.step(self.now, i, &mut self.plog);
                    self.events.extend(self.primary.take_events());
                    for a in acts {
                        self.primary_action(a);
                    }
                }
                Pending::ToReplica(r, i) => {
                    let rep = &mut self.replicas[r];
                    let acts = step_blocking(&mut rep.core, self.now, i, &mut rep.log);
                    rep.events.extend(rep.core.take_events());
                    for a in acts {
                        self.replica_action(r, a);
                    }
                }
            }
        }
    }

    fn replica_action(&mut self, r: usize, a: ReceiverAction) {
        match a {
            ReceiverAction::Send { conn, msg } => {
                let rep = &self.replicas[r];
                let muted = rep.mute_barriers && matches!(msg.body, Body::BarrierResponse { .. });
                if self.open.contains(&conn) && !rep.blackhole && !muted {
                    self.queue
                        .push_back(Pending::ToPrimary(Input::Received { conn, msg }));
                }
            }
            ReceiverAction::Close { conn, .. } => {
                if self.open.remove(&conn) {
                    self.queue
                        .push_back(Pending::ToPrimary(Input::ConnectionLost(conn)));
                }
            }
            ReceiverAction::Sync { .. } => unreachable!("performed by step_blocking"),
        }
    }

    fn primary_action(&mut self, a: Action) {
        match a {
            Action::Connect {
                conn, endpoint: ep, ..
            } => {
                let target = (0..self.replicas.len())
                    .find(|&i| endpoint(i, self.replicas[i].addr_gen) == ep);
                match target {
                    Some(t) if self.replicas[t].reachable => {
                        self.conns.insert(conn, t);
                        self.open.insert(conn);
                        self.queue
                            .push_back(Pending::ToPrimary(Input::Connected(conn)));
                    }
                    _ => self
                        .queue
                        .push_back(Pending::ToPrimary(Input::ConnectFailed(conn))),
                }
            }
            Action::Send { conn, msg } => {
                if self.open.contains(&conn)
                    && let Some(&r) = self.conns.get(&conn)
                {
                    self.sent.push((r, msg.clone()));
                    if !self.replicas[r].blackhole {
                        self.queue.push_back(Pending::ToReplica(
                            r,
                            ReceiverInput::Received { conn, msg },
                        ));
                    }
                }
            }
            Action::Close { conn, .. } => {
                if self.open.remove(&conn)
                    && let Some(&r) = self.conns.get(&conn)
                {
                    self.queue
                        .push_back(Pending::ToReplica(r, ReceiverInput::ConnectionLost(conn)));
                }
            }
            Action::LocalFsync { .. } => match self.plog.sync() {
                Ok(d) => self
                    .queue
                    .push_back(Pending::ToPrimary(Input::LocalFsyncDone { durable: d })),
                Err(_) => self
                    .queue
                    .push_back(Pending::ToPrimary(Input::LocalFsyncFailed)),
            },
            Action::FlushAcked { id, lsn } => self.acked.push((id, lsn)),
            Action::FlushFailed { id, .. } => self.failed.push(id),
            Action::Report(r) => self.reports.push(r),
        }
    }

    /// Moves the clock on by `ms` and ticks every core.
    pub fn tick(&mut self, ms: u64) {
        self.now += ms;
        self.input(Input::Tick);
        for r in 0..self.replicas.len() {
            self.queue
                .push_back(Pending::ToReplica(r, ReceiverInput::Tick));
        }
        self.pump();
    }

    /// Twenty ticks of 5 ms: long enough for sessions to settle.
    pub fn settle(&mut self) {
        for _ in 0..20 {
            self.tick(5);
        }
    }

    pub fn flush(&mut self) -> FlushId {
        self.next_flush += 1;
        let id = FlushId(self.next_flush);
        self.input(Input::FlushRequested(id));
        id
    }

    pub fn is_acked(&self, id: FlushId) -> bool {
        self.acked.iter().any(|(f, _)| *f == id)
    }

    pub fn state(&self, r: &str) -> ReplicaState {
        self.primary.state_of(&rid(r)).unwrap()
    }

    pub fn event_names(&self) -> Vec<&'static str> {
        self.events.iter().map(|e| e.kind.name()).collect()
    }

    /// Breaks replica `r`'s open connections from the network side: both ends hear it.
    pub fn drop_conns_of(&mut self, r: usize) {
        let conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(c, t)| **t == r && self.open.contains(c))
            .map(|(c, _)| *c)
            .collect();
        for c in conns {
            self.open.remove(&c);
            self.queue
                .push_back(Pending::ToPrimary(Input::ConnectionLost(c)));
            self.queue
                .push_back(Pending::ToReplica(r, ReceiverInput::ConnectionLost(c)));
        }
        self.pump();
    }

    /// Replica `r` becomes unreachable and loses its connections.
    pub fn cut(&mut self, r: usize) {
        self.replicas[r].reachable = false;
        self.drop_conns_of(r);
    }

    /// The primary's process died: every connection ends, and only the replicas hear it.
    pub fn drop_primary_conns(&mut self) {
        let conns: Vec<ConnId> = self.open.iter().copied().collect();
        for c in conns {
            self.open.remove(&c);
            if let Some(&r) = self.conns.get(&c) {
                self.queue
                    .push_back(Pending::ToReplica(r, ReceiverInput::ConnectionLost(c)));
            }
        }
        self.conns.clear();
        self.pump();
    }
}
