//! Fault scenarios against a real kube-apiserver with three `blockvol-agent` processes and
//! `blockvol-operator` processes (started by `e2e::cluster`): the lost-write checker
//! writes self-describing blocks through the primary's NBD socket, a seeded fault hits
//! mid-load, and after recovery every acknowledged-and-flushed write must read back from
//! the (new) primary: zero missing, stale or torn blocks. Every wait is a bounded poll.
//!
//! The agent and operator binaries must be built first (`cargo test --workspace` does;
//! alone: `cargo build -p node-agent -p operator --bins`). Trials per scenario come from
//! `BLOCKVOL_CHAOS_TRIALS`, the seed from `BLOCKVOL_CHAOS_SEED`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use api::{
    BlockReplica, BlockVolume, BlockVolumeSpec, BlockVolumeStatus, ReplicaState, VolumePhase,
};
use e2e::checker::{Checker, CheckerConfig, Ledger, NbdClient, Target, WriteSummary};
use e2e::cluster::{
    AgentOptions, AgentProcess, TestCluster, TestClusterOptions, all_members_in_sync,
    primary_serving,
};
use e2e::faultfs::{FaultFs, FaultSwitch};
use e2e::faults::{LinkShape, LoopFs, PortPartition, ShapedProxy, TcpRelay, env_u64, rules_tagged};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use testkit::{Paused, SeededRng, Task, Wait};

const VOLUME: &str = "chaos1";
const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// Bound on any one expectation (failover, rejoin, rebuild) on a busy 2-core host.
const WAIT_TIMEOUT_MS: u64 = 120_000;
/// Node Lease duration of the agents: the IO fence and the failover delay.
const AGENT_LEASE_S: u32 = 3;
/// Blocks of 4 KiB the checker writes over (8 MiB of the 32 MiB volume).
const CHECK_LBAS: u64 = 2048;
/// Upper bound on writes of one load phase; a fault normally ends it much earlier.
const LOAD_WRITES_MAX: u64 = 200_000;
/// WAL retention time budget the agents get in the replica-kill scenario.
const RETENTION_BUDGET_MS: u64 = 15_000;
/// How much later than the real ack the test may observe it (one scheduling delay).
const ACK_OBSERVATION_SLACK: Duration = Duration::from_millis(100);
/// Replica-failure grace of the operator in the disk-full scenario.
const REPLACEMENT_GRACE_MS: u64 = 5_000;
const TRIALS_ENV: &str = "BLOCKVOL_CHAOS_TRIALS";
const SEED_ENV: &str = "BLOCKVOL_CHAOS_SEED";
/// Comment tag of this suite's iptables rules.
const IPTABLES_TAG: &str = "blockvol-chaos";
/// A block outside the checker's range, written by the read-fencing probe of 3c.
const PROBE_LBA: u64 = CHECK_LBAS + 1;
/// How long 3c reads the probe block through the old primary's node after the heal.
const STALE_READ_WINDOW: Duration = Duration::from_secs(30);

/// The scenarios share the host's two cores and the loopback iptables table: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bytes allocated on disk for every file below `dir` (sparse files count what they hold).
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// A bounded poll; a timeout fails the test with what it waited for.
const WAIT: Wait = Wait {
    timeout: Duration::from_millis(WAIT_TIMEOUT_MS),
    poll: e2e::cluster::POLL_INTERVAL,
};

/// The cluster under test: `e2e::cluster` processes, plus one API relay per agent so a
/// single agent's API traffic can be partitioned (all agents reach the API server from
/// 127.0.0.1, so only a port of its own tells one agent's packets apart).
struct Cluster {
    tc: TestCluster,
    relays: BTreeMap<String, TcpRelay>,
    /// Small filesystems under agents' data dirs; unmounted after the agents stop.
    small_disks: Vec<LoopFs>,
    /// How agents added from now on are set up.
    setup: NodeSetup,
    /// Fault-injecting filesystems holding agents' data dirs, by node.
    fault_disks: BTreeMap<String, FaultFs>,
    /// Shaping proxies in front of agents' data ports (their advertised address), by node.
    proxies: BTreeMap<String, ShapedProxy>,
}

/// Per-node setup of a [`Cluster`].
#[derive(Clone, Copy, Debug, Default)]
struct NodeSetup {
    /// The agent's data dir lives on a [`FaultFs`] (backed by `data.backing`).
    fault_disk: bool,
    /// Peers reach the agent's data port through a [`ShapedProxy`].
    proxied: bool,
}

impl Cluster {
    /// Control plane, three agents (with `agent_args` on their command line), no
    /// operator yet.
    async fn start(agent_args: &[String]) -> Cluster {
        Self::start_with(agent_args, NodeSetup::default()).await
    }

    /// Like [`start`](Self::start), every agent set up as `setup` says.
    async fn start_with(agent_args: &[String], setup: NodeSetup) -> Cluster {
        testkit::init_tracing("e2e=info,testkit=info");
        let mut opts = TestClusterOptions::nodes(0);
        opts.operators = 0;
        opts.agent = AgentOptions {
            lease_duration_s: AGENT_LEASE_S,
            extra_args: agent_args.to_vec(),
            log_filter: "info".into(),
            ..AgentOptions::default()
        };
        let tc = TestCluster::start(opts).await.expect("cluster starts");
        let mut c = Cluster {
            tc,
            relays: BTreeMap::new(),
            small_disks: Vec::new(),
            setup,
            fault_disks: BTreeMap::new(),
            proxies: BTreeMap::new(),
        };
        for node in NODES {
            c.add_node(node).await;
        }
        c.tc.wait_registered(Duration::from_millis(WAIT_TIMEOUT_MS))
            .await
            .expect("agents register");
        c
    }

    /// Starts an agent for a new node, with its own relay to the API server.
    async fn add_node(&mut self, node: &str) {
        let cp = &self.tc.control_plane;
        let api_addr: std::net::SocketAddr = cp
            .server_url()
            .trim_start_matches("https://")
            .parse()
            .expect("API server address");
        let admin = std::fs::read_to_string(cp.kubeconfig()).expect("kubeconfig");
        let relay = TcpRelay::start(api_addr).await.expect("relay");
        let kubeconfig = self.tc.root.path().join(format!("kubeconfig-{node}"));
        let url = format!("https://{}", relay.addr());
        std::fs::write(&kubeconfig, admin.replace(cp.server_url(), &url)).expect("kubeconfig");
        let mut opts = self.tc.options.agent.clone();
        if self.setup.fault_disk {
            let dir = self.tc.root.path().join(node);
            let backing = dir.join("data.backing");
            std::fs::create_dir_all(&backing).expect("creating the backing dir");
            let fs = FaultFs::mount(&backing, &dir.join("data")).expect("fault filesystem");
            self.fault_disks.insert(node.to_string(), fs);
        }
        let proxy = if self.setup.proxied {
            let p = ShapedProxy::start(None).await.expect("proxy");
            opts.extra_args
                .push(format!("--advertise-data-address={}", p.addr()));
            Some(p)
        } else {
            None
        };
        let agent = AgentProcess::spawn(
            &self.tc.agent_binary,
            node,
            self.tc.root.path(),
            &kubeconfig,
            &self.tc.peer_secret_file,
            &opts,
        )
        .expect("agent starts");
        if let Some(p) = proxy {
            p.set_target(agent.data_address);
            self.proxies.insert(node.to_string(), p);
        }
        self.tc.agents.push(agent);
        self.relays.insert(node.to_string(), relay);
    }

    /// The fault switch of `node`'s data dir.
    fn disk_faults(&self, node: &str) -> Arc<FaultSwitch> {
        self.fault_disks
            .get(node)
            .unwrap_or_else(|| panic!("{node} has no fault filesystem"))
            .switch()
            .clone()
    }

    fn proxy(&self, node: &str) -> &ShapedProxy {
        self.proxies
            .get(node)
            .unwrap_or_else(|| panic!("{node} has no proxy"))
    }

    fn agent(&self, node: &str) -> &AgentProcess {
        self.tc
            .agents
            .iter()
            .find(|a| a.node == node)
            .unwrap_or_else(|| panic!("no agent {node}"))
    }

    /// Starts the killed agent again with the same data dir, data port and relay.
    fn start_agent(&mut self, node: &str) {
        self.tc
            .agent(node)
            .expect("agent")
            .restart()
            .expect("agent restarts");
    }

    /// SIGKILL, like a crash of the node.
    fn kill_agent(&mut self, node: &str) {
        self.tc.agent(node).expect("agent").kill();
        tracing::info!(node, "agent killed");
    }

    fn start_operator(&mut self, identity: &str) {
        self.tc.add_operator(identity).expect("operator starts");
    }

    fn kill_operator(&mut self, identity: &str) {
        self.tc
            .operators
            .iter_mut()
            .find(|o| o.identity == identity)
            .unwrap_or_else(|| panic!("no operator {identity}"))
            .kill();
        tracing::info!(identity, "operator killed");
    }

    fn client(&self) -> Client {
        self.tc.client.clone()
    }

    fn data_port(&self, node: &str) -> u16 {
        self.agent(node).data_address.port()
    }

    fn relay_port(&self, node: &str) -> u16 {
        self.relays[node].addr().port()
    }

    /// Moves `node`'s data dir onto a fresh ext4 filesystem with `headroom_mib` free
    /// beyond what the data dir holds (the agent must be stopped), so it can be filled
    /// later. Sized from the data, because every trial leaves more written blocks in the
    /// volume files.
    fn move_data_to_small_disk(&mut self, node: &str, headroom_mib: u64) -> usize {
        let data = self.agent(node).data_dir.clone();
        let old = data.with_extension("old");
        std::fs::rename(&data, &old).expect("moving the data dir aside");
        // ext4's own metadata and journal take about a tenth of a small filesystem.
        let size_mib = ((allocated_bytes(&old) >> 20) * 11 / 10 + headroom_mib).max(32);
        let image = self.tc.root.path().join(format!("{node}-disk.img"));
        let fs = LoopFs::mount(&image, size_mib, &data).expect("small filesystem");
        self.small_disks.push(fs);
        let out = std::process::Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(format!("{}/.", old.display()))
            .arg(&data)
            .output()
            .expect("cp");
        testkit::stdout_of(&out, "cp");
        std::fs::remove_dir_all(&old).expect("removing the old data dir");
        self.small_disks.len() - 1
    }

    /// `renewTime` of `node`'s Lease: the agent's last successful renewal.
    async fn lease_renew_time(&self, node: &str) -> SystemTime {
        let leases: Api<Lease> = Api::namespaced(self.client(), e2e::cluster::NAMESPACE);
        let l = leases.get(node).await.expect("node Lease");
        let t = l.spec.and_then(|s| s.renew_time).expect("renewTime");
        SystemTime::from(t.0)
    }

    fn agent_log(&self, node: &str) -> PathBuf {
        self.agent(node).dir.join("agent.log")
    }

    async fn create_volume(&self) {
        self.tc
            .create_volume(VOLUME, "32Mi", api::DEFAULT_REPLICAS)
            .await
            .expect("create volume");
    }

    async fn volume(&self) -> Option<BlockVolumeStatus> {
        self.tc.volume(VOLUME).await.and_then(|v| v.status)
    }

    async fn replicas(&self) -> Vec<BlockReplica> {
        self.tc.replicas(VOLUME).await
    }

    /// Ready with all three members committed in sync at one epoch (at least
    /// `min_epoch`), the primary Serving and seeing both peers InSync.
    async fn healthy(&self, min_epoch: u64) -> BlockVolumeStatus {
        WAIT.expect(
            &format!("three in-sync members at epoch >= {min_epoch}"),
            || async {
                let st = self.volume().await?;
                let rs = self.replicas().await;
                (st.epoch >= min_epoch && all_members_in_sync(&st, &rs, 3)).then_some(st)
            },
        )
        .await
    }

    /// Ends a scenario: once three members are in sync again (the load has ended with a
    /// flush), every replica holds the same blocks. Stops the agents (SIGKILL; the page
    /// cache keeps what they wrote) and reads each replica's file, so divergence that
    /// the checker cannot see through one primary (a member holding entries another
    /// lacks, an extent resurrected under a truncation) fails the scenario.
    async fn assert_replicas_identical(&mut self) {
        self.healthy(0).await;
        let ids: Vec<(String, String)> = self
            .replicas()
            .await
            .into_iter()
            .filter(|r| r.metadata.deletion_timestamp.is_none())
            .map(|r| (r.spec.node.clone(), r.name_any()))
            .collect();
        for a in &mut self.tc.agents {
            a.kill();
        }
        let blocks: Vec<Vec<u8>> = ids
            .iter()
            .map(|(node, id)| replica_blocks(self, node, VOLUME, id))
            .collect();
        for (i, b) in blocks.iter().enumerate().skip(1) {
            if let Some(at) = b.iter().zip(&blocks[0]).position(|(x, y)| x != y) {
                panic!(
                    "replica {} differs from {} at byte {at} (block {})",
                    ids[i].1,
                    ids[0].1,
                    at / 4096
                );
            }
        }
        println!(
            "{} replicas identical over {} blocks",
            blocks.len(),
            CHECK_LBAS
        );
    }

    /// A primary other than `old` Serving at an epoch above `epoch`.
    async fn promoted(&self, old_primary: &str, epoch: u64) -> BlockVolumeStatus {
        WAIT.expect(
            &format!("a new primary (not {old_primary}) serving above epoch {epoch}"),
            || async {
                let st = self.volume().await?;
                let p = st.primary.clone()?;
                if st.epoch <= epoch || p == old_primary {
                    return None;
                }
                let rs = self.replicas().await;
                primary_serving(&st, &rs).then_some(st)
            },
        )
        .await
    }

    /// ReplicaID of the volume's replica on `node`.
    async fn replica_on(&self, node: &str) -> String {
        self.replicas()
            .await
            .into_iter()
            .find(|r| r.spec.node == node)
            .map(|r| r.name_any())
            .unwrap_or_else(|| panic!("no replica on {node}"))
    }

    /// Waits until the primary reports `replica` in one of `states`.
    async fn peer_state_in(&self, replica: &str, states: &[ReplicaState]) {
        WAIT.expect(
            &format!("the primary reporting {replica} as one of {states:?}"),
            || async {
                let st = self.volume().await?;
                let rs = self.replicas().await;
                let p = rs.iter().find(|r| Some(r.name_any()) == st.primary)?;
                p.status
                    .as_ref()?
                    .peers
                    .iter()
                    .any(|p| p.replica_id == replica && states.contains(&p.state))
                    .then_some(())
            },
        )
        .await
    }

    /// Bytes in `node`'s agent log so far, to read only what follows later.
    fn log_len(&self, node: &str) -> usize {
        std::fs::metadata(self.agent_log(node)).map_or(0, |m| m.len() as usize)
    }

    /// Whether `node`'s agent logged, after `from` bytes, the primary moving `replica`
    /// to `state` (the runtime logs each replication report).
    fn logged_peer_state(&self, node: &str, from: usize, replica: &str, state: &str) -> bool {
        let log = std::fs::read(self.agent_log(node)).unwrap_or_default();
        let tail = String::from_utf8_lossy(log.get(from..).unwrap_or_default());
        let needle = format!("replica: ReplicaId(\"{replica}\"), state: {state}");
        tail.contains(&needle)
    }

    fn target(&self, node: &str) -> Target {
        Target::Unix {
            path: self.agent(node).nbd_socket.clone(),
            export: VOLUME.into(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nothing may use a small filesystem when it is unmounted.
        for a in &mut self.tc.agents {
            a.kill();
        }
        self.small_disks.clear();
        self.fault_disks.clear();
        // Keep the logs of a failed run: swap an empty directory in for the cluster's.
        if std::thread::panicking()
            && let Ok(empty) = tempfile::tempdir()
        {
            let kept = std::mem::replace(&mut self.tc.root, empty).keep();
            eprintln!("agent and operator logs kept in {}", kept.display());
        }
    }
}

fn checker(seed: u64, flush_every_writes: u32) -> Arc<Checker> {
    Checker::new(
        Ledger::new(CheckerConfig {
            volume_id: VOLUME.into(),
            seed,
            workers: 4,
            block_size_bytes: 4096,
            lba_start: 0,
            lba_count: CHECK_LBAS,
            flush_every_writes,
        })
        .expect("checker config"),
    )
}

/// Counts over one scenario, printed at its end.
#[derive(Default, Debug)]
struct Tally {
    trials: u64,
    faults: u64,
    writes_durable: u64,
    writes_verified: u64,
}

impl Tally {
    fn print(&self, scenario: &str, seed: u64) {
        println!(
            "chaos {scenario}: seed {seed}, trials run {}, faults injected {}, durable writes {}, writes verified {}, lost 0",
            self.trials, self.faults, self.writes_durable, self.writes_verified
        );
    }
}

/// Starts a load phase through `target` in the background.
fn start_load(
    checker: &Arc<Checker>,
    target: Target,
    writes: u64,
) -> tokio::task::JoinHandle<WriteSummary> {
    let c = checker.clone();
    tokio::spawn(async move { c.run_writes(&target, writes).await })
}

/// Waits until `n` more flushes were acknowledged than `base`.
async fn flushes_reach(checker: &Checker, n: u64) {
    let mut rx = checker.flush_progress();
    let what = format!("{n} acknowledged flushes");
    tokio::time::timeout(
        Duration::from_millis(WAIT_TIMEOUT_MS),
        rx.wait_for(|v| *v >= n),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    .expect("progress channel");
}

/// Reads the whole ledger back through `target`; every durable write must be there.
async fn verify_clean(checker: &Checker, target: &Target, tally: &mut Tally, what: &str) {
    // The status can report Serving a moment before the export is registered.
    WAIT.expect(&format!("{target:?} accepting NBD clients"), || async {
        let c = e2e::checker::NbdClient::connect(target).await.ok()?;
        c.disconnect().await;
        Some(())
    })
    .await;
    let report = checker.verify(target).await.expect("verify reads back");
    assert!(
        report.is_clean(),
        "{what}: acknowledged writes lost: {report}"
    );
    tally.writes_verified += report.writes_verified;
    println!("{what}: {report}");
}

fn trials(default: u64) -> u64 {
    env_u64(TRIALS_ENV, default).expect(TRIALS_ENV)
}

fn seed() -> u64 {
    env_u64(SEED_ENV, 20_261_126).expect(SEED_ENV)
}

/// Each test has its own runtime; tokio's Mutex works across them and is not poisoned
/// by a failed test.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Scenario 1: SIGKILL the primary's agent at a seeded moment under load; the operator
/// promotes; everything acknowledged reads back through the new primary; the killed agent
/// restarts and rejoins (three in sync) before the next trial.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_agent_sigkill_under_load_loses_no_acknowledged_write() {
    let _serial = serial().await;
    let seed = seed();
    let mut rng = SeededRng::new(seed);
    let mut c = Cluster::start(&[]).await;
    c.start_operator("op-1");
    c.create_volume().await;
    let ck = checker(seed, 8);
    let mut tally = Tally::default();
    let mut st = c.healthy(1).await;
    for trial in 0..trials(2) {
        let old_node = st.primary_node.clone().expect("primary node");
        let old_primary = st.primary.clone().expect("primary");
        let kill_after = rng.range(1, 20);
        let extra_ms = rng.range(0, 50);
        let base = *ck.flush_progress().borrow();
        let load = start_load(&ck, c.target(&old_node), LOAD_WRITES_MAX);
        flushes_reach(&ck, base + kill_after).await;
        tokio::time::sleep(Duration::from_millis(extra_ms)).await;
        c.kill_agent(&old_node);
        tally.faults += 1;
        let sum = load.await.expect("load task");
        assert!(
            !sum.stopped_by.is_empty(),
            "the load must have been cut by the kill"
        );
        tally.writes_durable += sum.writes_made_durable;
        println!(
            "trial {trial}: killed primary {old_primary} on {old_node} after {} acked flushes (+{extra_ms} ms), {} writes durable",
            sum.flushes_acked, sum.writes_made_durable
        );
        let new = c.promoted(&old_primary, st.epoch).await;
        assert_eq!(new.epoch, st.epoch + 1, "one failover, one epoch bump");
        let new_node = new.primary_node.clone().expect("new primary node");
        verify_clean(
            &ck,
            &c.target(&new_node),
            &mut tally,
            &format!("trial {trial}"),
        )
        .await;
        c.start_agent(&old_node);
        st = c.healthy(new.epoch).await;
        assert_eq!(st.epoch, new.epoch, "the rejoin bumped no epoch");
        tally.trials += 1;
    }
    // A final read of everything after the last rejoin.
    let node = st.primary_node.clone().expect("primary node");
    verify_clean(&ck, &c.target(&node), &mut tally, "after the last rejoin").await;
    c.assert_replicas_identical().await;
    tally.print("primary-sigkill", seed);
}

/// Records when the checker's flush count moved (wall clock, to compare with a Lease's
/// renewTime), so a test can bound the moment of the last acknowledged flush.
/// Observation lags the ack by a scheduling delay, never leads it.
struct AckClock {
    acks: Arc<std::sync::Mutex<Vec<SystemTime>>>,
    _task: Task,
}

impl AckClock {
    fn start(checker: &Checker) -> AckClock {
        let acks: Arc<std::sync::Mutex<Vec<SystemTime>>> = Arc::default();
        let mut rx = checker.flush_progress();
        let a = acks.clone();
        let task = Task::spawn(async move {
            while rx.changed().await.is_ok() {
                a.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(SystemTime::now());
            }
        });
        AckClock { acks, _task: task }
    }

    fn last_ack(&self) -> Option<SystemTime> {
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .copied()
    }

    /// The longest time without an ack from `from` on (until the last ack).
    fn longest_gap_since(&self, from: SystemTime) -> Duration {
        let acks = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        let mut prev = from;
        let mut gap = Duration::ZERO;
        for t in acks.iter().filter(|t| **t > from) {
            gap = gap.max(t.duration_since(prev).unwrap_or_default());
            prev = *t;
        }
        gap
    }
}

/// Records every epoch the volume status shows, polled faster than a failover, so a
/// test can tell one bump from two.
struct EpochLog {
    seen: Arc<std::sync::Mutex<Vec<u64>>>,
    _task: Task,
}

impl EpochLog {
    fn start(client: &Client) -> EpochLog {
        let seen: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
        let s = seen.clone();
        let api = Api::<BlockVolume>::all(client.clone());
        let task = Task::spawn(async move {
            loop {
                if let Ok(Some(v)) = api.get_opt(VOLUME).await
                    && let Some(e) = v.status.map(|s| s.epoch)
                {
                    let mut seen = s.lock().unwrap_or_else(|e| e.into_inner());
                    if seen.last() != Some(&e) {
                        seen.push(e);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        EpochLog { seen, _task: task }
    }

    fn seen(&self) -> Vec<u64> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The node of another member than the primary, picked by the seed.
fn pick_replica_node(st: &BlockVolumeStatus, rng: &mut SeededRng) -> String {
    let primary = st.primary_node.clone().expect("primary node");
    let others: Vec<&str> = NODES.iter().copied().filter(|n| *n != primary).collect();
    rng.pick(&others).expect("two replica nodes").to_string()
}

/// Asserts that a load phase ran to its end: no write or flush failed.
fn assert_uninterrupted(sum: &WriteSummary, what: &str) {
    assert!(
        sum.stopped_by.is_empty(),
        "{what}: the load was interrupted: {:?}",
        sum.stopped_by
    );
}

/// Scenario 6: SIGKILL all three agents together mid-write, restart them all: the volume
/// comes back Ready with a primary and every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_sigkill_and_restart_loses_no_acknowledged_write() {
    let _serial = serial().await;
    let seed = seed() ^ 6;
    let mut rng = SeededRng::new(seed);
    let mut c = Cluster::start(&[]).await;
    c.start_operator("op-1");
    c.create_volume().await;
    let ck = checker(seed, 8);
    let mut tally = Tally::default();
    let mut st = c.healthy(1).await;
    for trial in 0..trials(1) {
        let node = st.primary_node.clone().expect("primary node");
        let kill_after = rng.range(1, 20);
        let base = *ck.flush_progress().borrow();
        let load = start_load(&ck, c.target(&node), LOAD_WRITES_MAX);
        flushes_reach(&ck, base + kill_after).await;
        for n in NODES {
            c.kill_agent(n);
        }
        tally.faults += 1;
        let sum = load.await.expect("load task");
        tally.writes_durable += sum.writes_made_durable;
        println!(
            "trial {trial}: killed all agents after {} acked flushes, {} writes durable",
            sum.flushes_acked, sum.writes_made_durable
        );
        // The statuses still say healthy until the operator sees the Leases expire; a
        // health check before that would read the dead agents' last reports.
        WAIT.expect("the operator noticing every agent gone", || async {
            c.volume()
                .await
                .filter(|v| v.phase != VolumePhase::Ready || v.in_sync_count < 3)
        })
        .await;
        for n in NODES {
            c.start_agent(n);
        }
        st = c.healthy(st.epoch).await;
        let node = st.primary_node.clone().expect("primary node");
        verify_clean(&ck, &c.target(&node), &mut tally, &format!("trial {trial}")).await;
        tally.trials += 1;
    }
    c.assert_replicas_identical().await;
    tally.print("whole-cluster-sigkill", seed);
}

/// Scenario 4a: SIGKILL the operator right after the primary's agent, start a new
/// operator: the failover completes with one epoch bump and no acknowledged write lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_killed_during_failover_completes_it_after_restart() {
    let _serial = serial().await;
    let seed = seed() ^ 4;
    let mut rng = SeededRng::new(seed);
    let mut c = Cluster::start(&[]).await;
    c.start_operator("op-0");
    c.create_volume().await;
    let ck = checker(seed, 8);
    let mut tally = Tally::default();
    let mut st = c.healthy(1).await;
    for trial in 0..trials(1) {
        let old_node = st.primary_node.clone().expect("primary node");
        let old_primary = st.primary.clone().expect("primary");
        let base = *ck.flush_progress().borrow();
        let load = start_load(&ck, c.target(&old_node), LOAD_WRITES_MAX);
        flushes_reach(&ck, base + rng.range(1, 20)).await;
        c.kill_agent(&old_node);
        let old_op = format!("op-{trial}");
        c.kill_operator(&old_op);
        tally.faults += 2;
        let sum = load.await.expect("load task");
        tally.writes_durable += sum.writes_made_durable;
        c.start_operator(&format!("op-{}", trial + 1));
        let new = c.promoted(&old_primary, st.epoch).await;
        assert_eq!(new.epoch, st.epoch + 1, "one failover, one epoch bump");
        let new_node = new.primary_node.clone().expect("new primary node");
        println!(
            "trial {trial}: killed primary on {old_node} and operator {old_op}; promoted on {new_node} at epoch {}",
            new.epoch
        );
        verify_clean(
            &ck,
            &c.target(&new_node),
            &mut tally,
            &format!("trial {trial}"),
        )
        .await;
        c.start_agent(&old_node);
        st = c.healthy(new.epoch).await;
        assert_eq!(st.epoch, new.epoch, "the rejoin bumped no epoch");
        tally.trials += 1;
    }
    c.assert_replicas_identical().await;
    tally.print("operator-sigkill-during-failover", seed);
}

/// Scenario 4b: two operators run at once (Lease leader election) while the primary's
/// agent is killed: exactly one writes epochs, so each failover bumps the epoch by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_operators_bump_the_epoch_once_per_failover() {
    let _serial = serial().await;
    let seed = seed() ^ 44;
    let mut rng = SeededRng::new(seed);
    let mut c = Cluster::start(&[]).await;
    c.start_operator("op-a");
    c.start_operator("op-b");
    c.create_volume().await;
    let ck = checker(seed, 8);
    let mut tally = Tally::default();
    let mut st = c.healthy(1).await;
    let epochs = EpochLog::start(&c.client());
    let first_epoch = st.epoch;
    for trial in 0..trials(1) {
        let old_node = st.primary_node.clone().expect("primary node");
        let old_primary = st.primary.clone().expect("primary");
        let base = *ck.flush_progress().borrow();
        let load = start_load(&ck, c.target(&old_node), LOAD_WRITES_MAX);
        flushes_reach(&ck, base + rng.range(1, 20)).await;
        c.kill_agent(&old_node);
        tally.faults += 1;
        let sum = load.await.expect("load task");
        tally.writes_durable += sum.writes_made_durable;
        let new = c.promoted(&old_primary, st.epoch).await;
        assert_eq!(new.epoch, st.epoch + 1, "one failover, one epoch bump");
        let new_node = new.primary_node.clone().expect("new primary node");
        verify_clean(
            &ck,
            &c.target(&new_node),
            &mut tally,
            &format!("trial {trial}"),
        )
        .await;
        c.start_agent(&old_node);
        st = c.healthy(new.epoch).await;
        assert_eq!(st.epoch, new.epoch, "the rejoin bumped no epoch");
        tally.trials += 1;
    }
    let seen = epochs.seen();
    let want: Vec<u64> = (first_epoch..=first_epoch + tally.trials).collect();
    assert_eq!(seen, want, "epochs the volume showed, in order");
    println!("epochs seen: {seen:?}");
    c.assert_replicas_identical().await;
    tally.print("two-operators", seed);
}

/// Scenario 2: SIGKILL a replica's agent under load. Writes go on (flushes wait until
/// the operator commits the smaller in-sync set). Restarted within the WAL retention
/// budget it catches up; restarted after the primary gave up its WAL (NeedsRebuild) it
/// is rebuilt. Three in sync again after each, and nothing acknowledged lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_agent_sigkill_catches_up_or_is_rebuilt_without_loss() {
    let _serial = serial().await;
    let seed = seed() ^ 2;
    let mut rng = SeededRng::new(seed);
    let mut c =
        Cluster::start(&[format!("--wal-retention-timeout-ms={RETENTION_BUDGET_MS}")]).await;
    c.start_operator("op-1");
    c.create_volume().await;
    let ck = checker(seed, 8);
    let mut tally = Tally::default();
    let mut st = c.healthy(1).await;
    for trial in 0..trials(1) {
        for beyond_budget in [false, true] {
            let primary_node = st.primary_node.clone().expect("primary node");
            let victim = pick_replica_node(&st, &mut rng);
            let victim_id = c.replica_on(&victim).await;
            let base = *ck.flush_progress().borrow();
            let load = start_load(&ck, c.target(&primary_node), 400);
            flushes_reach(&ck, base + rng.range(1, 20)).await;
            let log_from = c.log_len(&primary_node);
            c.kill_agent(&victim);
            let down_since = Instant::now();
            tally.faults += 1;
            let sum = load.await.expect("load task");
            assert_uninterrupted(&sum, "writes while a replica is down");
            tally.writes_durable += sum.writes_made_durable;
            if beyond_budget {
                // The primary gives up the victim's WAL once the budget has passed.
                // (Rebuilding follows NeedsRebuild at once; either shows the escalation.)
                c.peer_state_in(
                    &victim_id,
                    &[ReplicaState::NeedsRebuild, ReplicaState::Rebuilding],
                )
                .await;
                assert!(
                    down_since.elapsed() >= Duration::from_millis(RETENTION_BUDGET_MS),
                    "the WAL hold was dropped before the budget ran out"
                );
            } else {
                assert!(
                    down_since.elapsed() < Duration::from_millis(RETENTION_BUDGET_MS - 3_000),
                    "the restart must come well within the budget"
                );
            }
            let restarted_after = down_since.elapsed();
            c.start_agent(&victim);
            st = c.healthy(st.epoch).await;
            assert_eq!(
                st.primary_node.as_deref(),
                Some(primary_node.as_str()),
                "a replica's crash moved the primary"
            );
            let rebuilt = c.logged_peer_state(&primary_node, log_from, &victim_id, "Rebuilding");
            let caught_up = c.logged_peer_state(&primary_node, log_from, &victim_id, "CatchingUp");
            assert_eq!(
                rebuilt, beyond_budget,
                "rebuilt exactly when restarted beyond the retention budget (caught up: {caught_up})"
            );
            println!(
                "trial {trial}: replica {victim_id} on {victim} killed, restarted {} the {RETENTION_BUDGET_MS} ms budget after {} ms, {}; {} writes durable meanwhile",
                if beyond_budget { "beyond" } else { "within" },
                restarted_after.as_millis(),
                if rebuilt { "rebuilt" } else { "caught up" },
                sum.writes_made_durable
            );
            let node = st.primary_node.clone().expect("primary node");
            verify_clean(&ck, &c.target(&node), &mut tally, &format!("trial {trial}")).await;
            tally.trials += 1;
        }
    }
    c.assert_replicas_identical().await;
    tally.print("replica-sigkill", seed);
}

/// Scenario 3a/3b: partition the primary from one replica, then from both, under load:
/// flushes stall until the operator commits the smaller in-sync set and then go on; after
/// healing, the members rejoin; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_partitioned_from_replicas_acks_only_what_the_committed_set_holds() {
    let _serial = serial().await;
    let seed = seed() ^ 3;
    let mut rng = SeededRng::new(seed);
    let mut c = Cluster::start(&[]).await;
    c.start_operator("op-1");
    c.create_volume().await;
    let ck = checker(seed, 8);
    let mut tally = Tally::default();
    let mut st = c.healthy(1).await;
    for trial in 0..trials(1) {
        for cut_all in [false, true] {
            let primary_node = st.primary_node.clone().expect("primary node");
            let cut: Vec<String> = if cut_all {
                NODES
                    .iter()
                    .filter(|n| **n != primary_node)
                    .map(|n| n.to_string())
                    .collect()
            } else {
                vec![pick_replica_node(&st, &mut rng)]
            };
            let mut cut_ids = Vec::new();
            for n in &cut {
                cut_ids.push(c.replica_on(n).await);
            }
            let ports: Vec<u16> = cut.iter().map(|n| c.data_port(n)).collect();
            let clock = AckClock::start(&ck);
            let base = *ck.flush_progress().borrow();
            let load = start_load(&ck, c.target(&primary_node), 1_200);
            flushes_reach(&ck, base + rng.range(1, 20)).await;
            let mut partition = PortPartition::new(IPTABLES_TAG, &ports).expect("partition");
            let cut_at = SystemTime::now();
            tally.faults += 1;
            let sum = load.await.expect("load task");
            assert_uninterrupted(&sum, "writes while partitioned");
            tally.writes_durable += sum.writes_made_durable;
            // The flushes that completed past the cut were acked for a committed set
            // without the cut members.
            let now = c.volume().await.expect("volume status");
            assert!(
                cut_ids.iter().all(|id| !now.in_sync_set.contains(id)),
                "flushes went on while partitioned, so the committed set must exclude {cut_ids:?}: {:?}",
                now.in_sync_set
            );
            assert!(now.in_sync_set_generation > st.in_sync_set_generation);
            verify_clean(
                &ck,
                &c.target(&primary_node),
                &mut tally,
                &format!("trial {trial} partitioned"),
            )
            .await;
            partition.heal().expect("heal");
            st = c.healthy(st.epoch).await;
            println!(
                "trial {trial}: primary on {primary_node} cut from {cut:?}; longest flush stall after the cut {} ms; {} writes durable in the phase; in-sync set shrank, rejoined at generation {}",
                clock.longest_gap_since(cut_at).as_millis(),
                sum.writes_made_durable,
                st.in_sync_set_generation
            );
            tally.trials += 1;
        }
    }
    assert!(rules_tagged(IPTABLES_TAG).expect("iptables -S").is_empty());
    c.assert_replicas_identical().await;
    tally.print("partition-primary-replicas", seed);
}

/// Writes `data` at block `lba` through `target` and flushes it.
async fn write_flushed(target: &Target, lba: u64, data: &[u8]) {
    let mut c = NbdClient::connect(target).await.expect("connect");
    c.write(lba * 4096, data).await.expect("write");
    c.flush().await.expect("flush");
    c.disconnect().await;
}

/// Reads block `lba` through `target` for `window`, over a connection opened before
/// (`held`, if the export still took one) and over fresh ones: a read may fail (the old
/// primary's export is fenced or gone), but one that succeeds must return `want`, never
/// `old`. Returns (reads served, reads refused).
async fn reads_are_never_stale(
    target: &Target,
    mut held: Option<NbdClient>,
    lba: u64,
    want: &[u8],
    old: &[u8],
    window: Duration,
) -> (u64, u64) {
    let end = Instant::now() + window;
    let (mut served, mut refused) = (0u64, 0u64);
    let mut buf = vec![0u8; want.len()];
    while Instant::now() < end {
        let client = match held.take() {
            Some(c) => Some(c),
            None => NbdClient::connect(target).await.ok(),
        };
        let Some(mut c) = client else {
            refused += 1;
            // Paces the reconnects of a probe that runs for a fixed window.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        match c.read(lba * 4096, &mut buf).await {
            Ok(()) => {
                assert!(
                    buf != old,
                    "a read through the deposed primary's node returned the value the new \
                     primary overwrote and flushed ({served} reads served, {refused} refused before)"
                );
                assert!(
                    buf == want,
                    "a read through the deposed primary's node returned neither the old nor \
                     the flushed value (first byte {:#x})",
                    buf[0]
                );
                served += 1;
                held = Some(c);
            }
            Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (served, refused)
}

/// Scenario 3c: partition the primary's agent from the API server under load. Its Lease
/// stops renewing; it keeps serving on its member proof (its members still answer its
/// heartbeats) until the operator, once the Lease expired, promotes another member,
/// which stops answering at the old epoch: the old primary acknowledges nothing after
/// the promotion, and the new primary has every acknowledged write. A block written
/// and flushed through the new primary is then read through the old primary's node for
/// 30 s after healing (its Lease renewals resume before it has re-read its assignment):
/// a read that succeeds never returns the old value. The old primary rejoins as a
/// replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_cut_from_api_server_acks_nothing_after_its_successor_is_promoted() {
    let _serial = serial().await;
    let seed = seed() ^ 33;
    let mut rng = SeededRng::new(seed);
    let mut c = Cluster::start(&[]).await;
    c.start_operator("op-1");
    c.create_volume().await;
    let ck = checker(seed, 4);
    let mut tally = Tally::default();
    let mut st = c.healthy(1).await;
    for trial in 0..trials(1) {
        let old_node = st.primary_node.clone().expect("primary node");
        let old_primary = st.primary.clone().expect("primary");
        let old_value = vec![0xa0 ^ (trial as u8); 4096];
        let new_value = vec![0x5f ^ (trial as u8); 4096];
        write_flushed(&c.target(&old_node), PROBE_LBA, &old_value).await;
        let clock = AckClock::start(&ck);
        let base = *ck.flush_progress().borrow();
        let load = start_load(&ck, c.target(&old_node), LOAD_WRITES_MAX);
        flushes_reach(&ck, base + rng.range(1, 20)).await;
        let relay_port = c.relay_port(&old_node);
        let mut partition = PortPartition::new(IPTABLES_TAG, &[relay_port]).expect("partition");
        let cut_at = SystemTime::now();
        tally.faults += 1;
        let new = c.promoted(&old_primary, st.epoch).await;
        // Observed after the promotion was written; the new primary persisted the epoch
        // (and stopped answering the old one) only after that write.
        let promotion_seen = SystemTime::now();
        assert_eq!(new.epoch, st.epoch + 1, "one failover, one epoch bump");
        let promoted_after = cut_at.elapsed().unwrap_or_default();
        let sum = load.await.expect("load task");
        tally.writes_durable += sum.writes_made_durable;
        let renewed = c.lease_renew_time(&old_node).await;
        let last = clock.last_ack().expect("some flush was acked");
        let lease = Duration::from_secs(u64::from(AGENT_LEASE_S));
        let late = last.duration_since(promotion_seen).unwrap_or_default();
        assert!(
            late <= ACK_OBSERVATION_SLACK,
            "the cut-off primary acked a flush {late:?} after the promotion was seen"
        );
        let new_node = new.primary_node.clone().expect("new primary node");
        println!(
            "trial {trial}: primary on {old_node} cut from the API server {} ms after its last renewal; last ack {} ms after that renewal (Lease {} ms, served on its member proof after that); promoted on {new_node} {} ms after the cut",
            cut_at
                .duration_since(renewed)
                .unwrap_or_default()
                .as_millis(),
            last.duration_since(renewed).unwrap_or_default().as_millis(),
            lease.as_millis(),
            promoted_after.as_millis()
        );
        verify_clean(
            &ck,
            &c.target(&new_node),
            &mut tally,
            &format!("trial {trial}"),
        )
        .await;
        write_flushed(&c.target(&new_node), PROBE_LBA, &new_value).await;
        // A connection to the old node's export made before the heal, if it takes one.
        let held = NbdClient::connect(&c.target(&old_node)).await.ok();
        partition.heal().expect("heal");
        let (served, refused) = reads_are_never_stale(
            &c.target(&old_node),
            held,
            PROBE_LBA,
            &new_value,
            &old_value,
            STALE_READ_WINDOW,
        )
        .await;
        println!(
            "trial {trial}: {} s of reads through {old_node} after the heal: {served} served (all the new value), {refused} refused",
            STALE_READ_WINDOW.as_secs()
        );
        st = c.healthy(new.epoch).await;
        assert_eq!(st.epoch, new.epoch, "the rejoin bumped no epoch");
        tally.trials += 1;
    }
    assert!(rules_tagged(IPTABLES_TAG).expect("iptables -S").is_empty());
    c.assert_replicas_identical().await;
    tally.print("partition-primary-apiserver", seed);
}

/// How long the API-server outage scenario keeps the API server stopped, in seconds
/// (default 20: more than six Lease durations).
const OUTAGE_ENV: &str = "BLOCKVOL_OUTAGE_S";

/// Flushes acknowledged while `phase` runs short load phases through `target` until
/// `until`; every phase must finish without an error.
async fn load_until(ck: &Arc<Checker>, target: &Target, until: Instant, phase: &str) -> u64 {
    let before = *ck.flush_progress().borrow();
    while Instant::now() < until {
        let sum = ck.run_writes(target, 256).await;
        assert_uninterrupted(&sum, phase);
    }
    *ck.flush_progress().borrow() - before
}

/// Scenario 9: the API server stops (SIGSTOP) for a long outage while the checker writes
/// and flushes through the primary. The primary keeps serving on its member proof
/// (every in-sync member answers its heartbeats): flushes go on throughout, no epoch
/// changes because of the outage (the operator restarts its Lease expiry clocks after
/// the gap), and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_server_outage_keeps_io_going_without_a_failover() {
    let _serial = serial().await;
    let seed = seed() ^ 99;
    let outage = Duration::from_secs(env_u64(OUTAGE_ENV, 20).expect(OUTAGE_ENV));
    let mut c = Cluster::start(&[]).await;
    c.start_operator("op-1");
    c.create_volume().await;
    let ck = checker(seed, 8);
    let mut tally = Tally::default();
    let st = c.healthy(1).await;
    let epochs = EpochLog::start(&c.client());
    let node = st.primary_node.clone().expect("primary node");
    let target = c.target(&node);
    let window = Duration::from_secs(5);

    let before = load_until(&ck, &target, Instant::now() + window, "before the outage").await;
    let apiserver =
        c.tc.control_plane
            .daemon_pid("kube-apiserver")
            .expect("a local kube-apiserver");
    let paused = Paused::stop(apiserver);
    tally.faults += 1;
    let start = Instant::now();
    let lease = Duration::from_secs(u64::from(AGENT_LEASE_S));
    // The first Lease duration may still be covered by the last renewal; what counts is
    // the time after it.
    load_until(&ck, &target, start + lease * 2, "outage, Lease still fresh").await;
    let during = load_until(&ck, &target, start + outage, "outage, no Lease").await;
    let during_s = (outage - lease * 2).as_secs_f64();
    drop(paused);
    let after = load_until(&ck, &target, Instant::now() + window, "after the outage").await;
    // Long enough for any promotion the outage could have caused.
    load_until(&ck, &target, Instant::now() + lease * 3, "settling").await;
    println!(
        "flushes per second: before {:.1}, during the outage after the Lease ran out {:.1} (over {:.0} s), after {:.1}",
        before as f64 / window.as_secs_f64(),
        during as f64 / during_s,
        during_s,
        after as f64 / window.as_secs_f64()
    );
    assert!(
        during > 0,
        "no flush was acknowledged during the outage once the Lease ran out"
    );
    let seen = epochs.seen();
    assert_eq!(
        seen,
        vec![st.epoch],
        "the outage changed the epoch: {seen:?}"
    );
    tally.trials += 1;
    tally.writes_durable = ck.ledger().durable_blocks();
    verify_clean(&ck, &target, &mut tally, "after the outage").await;
    c.assert_replicas_identical().await;
    tally.print("api-server-outage", seed);
}

/// Scenario 9b: the primary's agent dies (SIGKILL) while the API server is stopped. IO
/// pauses: nobody can be promoted without the control plane. Once the API server is
/// back, the operator promotes another member (one epoch bump, only after the outage),
/// the new primary holds every acknowledged write, and the old one rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_killed_during_an_api_server_outage_fails_over_once_it_is_back() {
    let _serial = serial().await;
    let seed = seed() ^ 98;
    let mut c = Cluster::start(&[]).await;
    c.start_operator("op-1");
    c.create_volume().await;
    let ck = checker(seed, 8);
    let mut tally = Tally::default();
    let st = c.healthy(1).await;
    let epochs = EpochLog::start(&c.client());
    let old_node = st.primary_node.clone().expect("primary node");
    let old_primary = st.primary.clone().expect("primary");
    let lease = Duration::from_secs(u64::from(AGENT_LEASE_S));
    let apiserver =
        c.tc.control_plane
            .daemon_pid("kube-apiserver")
            .expect("a local kube-apiserver");
    let target = c.target(&old_node);
    let paused = Paused::stop(apiserver);
    tally.faults += 1;
    // Serving on the member proof after the Lease ran out...
    load_until(
        &ck,
        &target,
        Instant::now() + lease * 2,
        "outage before the kill",
    )
    .await;
    // ...until the primary dies; then nothing can take over.
    let load = start_load(&ck, target.clone(), LOAD_WRITES_MAX);
    // (The watch's read guard must not live across the await: it would block the
    // checker's progress updates.)
    let base = *ck.flush_progress().borrow();
    flushes_reach(&ck, base + 4).await;
    c.kill_agent(&old_node);
    let sum = load.await.expect("load task");
    assert!(
        !sum.stopped_by.is_empty(),
        "the load went on although its primary was killed"
    );
    let resumed_at = Instant::now() + lease * 2;
    tokio::time::sleep_until(resumed_at.into()).await;
    drop(paused);
    let new = c.promoted(&old_primary, st.epoch).await;
    let promoted_after_resume = resumed_at.elapsed();
    assert_eq!(new.epoch, st.epoch + 1, "one failover, one epoch bump");
    let new_node = new.primary_node.clone().expect("new primary node");
    verify_clean(&ck, &c.target(&new_node), &mut tally, "after the failover").await;
    c.start_agent(&old_node);
    let back = c.healthy(new.epoch).await;
    assert_eq!(back.epoch, new.epoch, "the rejoin bumped no epoch");
    let seen = epochs.seen();
    assert_eq!(seen, vec![st.epoch, new.epoch], "epochs the volume showed");
    println!(
        "primary on {old_node} killed during the outage; promoted on {new_node} {} ms after the API server came back",
        promoted_after_resume.as_millis()
    );
    tally.trials += 1;
    tally.writes_durable = ck.ledger().durable_blocks();
    c.assert_replicas_identical().await;
    tally.print("api-server-outage-primary-killed", seed);
}

/// A disk fault of scenarios 5 and 7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StorageFault {
    /// The data dir's small ext4 filesystem is filled (ENOSPC on the next append).
    DiskFull,
    /// fsync and fdatasync on the data dir fail with EIO.
    FsyncEio,
    /// Writes to the data dir fail with EIO.
    WriteEio,
}

/// Scenarios 5 and 7: a replica's disk fails under write load (`faults` in turn, one
/// victim each). The replica reports the failure in its BlockReplica status, flushes
/// wait until the operator commits the set without it and then go on, and the operator
/// replaces it on a new node (after a 5 s grace), which is rebuilt into the set. Each
/// victim's agent is stopped after its replacement, so a later fault hits another node.
/// Nothing acknowledged is lost.
async fn replica_storage_fault_is_reported_dropped_and_replaced(
    scenario: &str,
    seed: u64,
    faults: &[StorageFault],
) {
    let mut rng = SeededRng::new(seed);
    let fuse = faults.iter().any(|f| *f != StorageFault::DiskFull);
    let setup = NodeSetup {
        fault_disk: fuse,
        ..NodeSetup::default()
    };
    let mut c = Cluster::start_with(&[], setup).await;
    c.tc.options.operator.replica_failure_grace_ms = REPLACEMENT_GRACE_MS;
    c.start_operator("op-1");
    c.create_volume().await;
    let ck = checker(seed, 8);
    let mut tally = Tally::default();
    let mut st = c.healthy(1).await;
    let primary_node = st.primary_node.clone().expect("primary node");
    let mut spares = 4..;
    for trial in 0..trials(1) {
        for &fault in faults {
            // Replaced replicas live on new nodes: pick among the current members.
            let mut members: Vec<String> = c
                .replicas()
                .await
                .into_iter()
                .map(|r| r.spec.node)
                .filter(|n| Some(n) != st.primary_node.as_ref())
                .collect();
            members.sort();
            let victim = rng.pick(&members).expect("two replica nodes").clone();
            let victim_id = c.replica_on(&victim).await;
            // Some data first; a filled disk needs the victim's files on a small filesystem.
            let sum = ck.run_writes(&c.target(&primary_node), 200).await;
            assert_uninterrupted(&sum, "writes before the fault");
            tally.writes_durable += sum.writes_made_durable;
            let small_disk = (fault == StorageFault::DiskFull).then(|| {
                c.kill_agent(&victim);
                let d = c.move_data_to_small_disk(&victim, 24);
                c.start_agent(&victim);
                d
            });
            if small_disk.is_some() {
                st = c.healthy(st.epoch).await;
            }
            let injected = match (fault, small_disk) {
                (StorageFault::DiskFull, Some(d)) => {
                    let filled = c.small_disks[d].fill().expect("fill");
                    format!("filesystem filled ({filled} bytes of filler)")
                }
                (StorageFault::FsyncEio, _) => {
                    c.disk_faults(&victim).set_fail_fsync(true);
                    "fsync fails with EIO".to_string()
                }
                (StorageFault::WriteEio, _) => {
                    c.disk_faults(&victim).set_fail_writes(true);
                    "writes fail with EIO".to_string()
                }
                (StorageFault::DiskFull, None) => unreachable!("a full disk is a small one"),
            };
            tally.faults += 1;
            let clock = AckClock::start(&ck);
            let fault_at = SystemTime::now();
            let sum = ck.run_writes(&c.target(&primary_node), 1_200).await;
            assert_uninterrupted(&sum, &format!("writes while a replica's disk: {injected}"));
            tally.writes_durable += sum.writes_made_durable;
            if fault != StorageFault::DiskFull {
                let sw = c.disk_faults(&victim);
                assert!(
                    sw.fsync_failures() + sw.write_failures() > 0,
                    "the replica on {victim} met no injected error"
                );
            }

            let failed = WAIT
                .expect(
                    "the faulty replica reporting its storage failure",
                    || async {
                        let rs = c.replicas().await;
                        let r = rs.iter().find(|r| r.name_any() == victim_id)?;
                        let s = r.status.as_ref()?;
                        (s.state == ReplicaState::Failed)
                            .then(|| s.last_error.clone().unwrap_or_default())
                    },
                )
                .await;
            assert!(
                failed.contains("storage failed"),
                "the status names the failure: {failed}"
            );
            let now = c.volume().await.expect("volume status");
            assert!(
                !now.in_sync_set.contains(&victim_id),
                "flushes went on, so the committed set must exclude the failed {victim_id}: {:?}",
                now.in_sync_set
            );
            assert!(now.in_sync_set_generation > st.in_sync_set_generation);
            assert_eq!(now.primary_node.as_deref(), Some(primary_node.as_str()));
            verify_clean(
                &ck,
                &c.target(&primary_node),
                &mut tally,
                &format!("trial {trial} {fault:?}"),
            )
            .await;

            // A new node joins; the failed replica is replaced there and rebuilt.
            let spare = format!("n{}", spares.next().unwrap_or(4));
            c.add_node(&spare).await;
            let back = c.healthy(st.epoch).await;
            let rs = c.replicas().await;
            assert!(
                rs.iter().all(|r| r.name_any() != victim_id),
                "the failed replica {victim_id} is gone"
            );
            assert!(
                rs.iter().any(|r| r.spec.node == spare),
                "a replica on {spare}: {:?}",
                rs.iter().map(|r| &r.spec.node).collect::<Vec<_>>()
            );
            assert_eq!(back.primary_node.as_deref(), Some(primary_node.as_str()));
            let after = ck.run_writes(&c.target(&primary_node), 200).await;
            assert_uninterrupted(&after, "writes after the replacement");
            tally.writes_durable += after.writes_made_durable;
            verify_clean(
                &ck,
                &c.target(&primary_node),
                &mut tally,
                &format!("trial {trial} {fault:?}: after the replacement"),
            )
            .await;
            println!(
                "trial {trial}: replica {victim_id} on {victim}: {injected}, status {failed:?}; longest flush stall {} ms; {} writes durable meanwhile; replaced on {spare}",
                clock.longest_gap_since(fault_at).as_millis(),
                sum.writes_made_durable
            );
            // The victim's node hosts nothing of the volume now; stop it so the next
            // replacement cannot land on its broken disk.
            c.kill_agent(&victim);
            st = back;
            tally.trials += 1;
        }
    }
    c.assert_replicas_identical().await;
    tally.print(scenario, seed);
}

/// Scenario 5: a replica's data dir sits on a small filesystem that is then filled. Its
/// next append fails (ENOSPC).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_disk_full_is_reported_dropped_and_replaced_without_loss() {
    let _serial = serial().await;
    replica_storage_fault_is_reported_dropped_and_replaced(
        "replica-disk-full",
        seed() ^ 5,
        &[StorageFault::DiskFull],
    )
    .await;
}

/// Scenario 7a: a replica's data dir is on a fault-injecting filesystem; first its
/// fsyncs fail with EIO, then (another victim) its writes. A replica whose fsync failed
/// must never count as in sync again: the kernel may have dropped the pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_fsync_or_write_eio_is_reported_dropped_and_replaced_without_loss() {
    let _serial = serial().await;
    replica_storage_fault_is_reported_dropped_and_replaced(
        "replica-disk-eio",
        seed() ^ 7,
        &[StorageFault::FsyncEio, StorageFault::WriteEio],
    )
    .await;
}

/// Scenario 7b: the PRIMARY's fsync fails with EIO under load. No flush may be
/// acknowledged after the failure (the engine fail-stops the volume instead of retrying
/// the fsync), the primary reports its disk failed, the operator promotes another
/// member at epoch + 1 although the old primary's agent still renews its Lease, and
/// every acknowledged write reads back through the new primary. Then the disk heals,
/// the old primary's agent restarts and rejoins as a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_fsync_eio_acks_nothing_more_and_fails_over_without_loss() {
    primary_disk_eio_acks_nothing_more_and_fails_over(PrimaryDiskFault::Fsync).await;
}

/// Like the fsync case, with the primary's disk refusing writes instead: the first failed
/// WAL append fails the volume, its agent reports the failed disk and the operator
/// promotes away; nothing is acknowledged after the first injected error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_write_eio_acks_nothing_more_and_fails_over_without_loss() {
    primary_disk_eio_acks_nothing_more_and_fails_over(PrimaryDiskFault::Writes).await;
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum PrimaryDiskFault {
    Fsync,
    Writes,
}

async fn primary_disk_eio_acks_nothing_more_and_fails_over(fault: PrimaryDiskFault) {
    let _serial = serial().await;
    let seed = seed()
        ^ if fault == PrimaryDiskFault::Fsync {
            71
        } else {
            73
        };
    let mut rng = SeededRng::new(seed);
    let setup = NodeSetup {
        fault_disk: true,
        ..NodeSetup::default()
    };
    let mut c = Cluster::start_with(&[], setup).await;
    c.start_operator("op-1");
    c.create_volume().await;
    let ck = checker(seed, 4);
    let mut tally = Tally::default();
    let mut st = c.healthy(1).await;
    for trial in 0..trials(1) {
        let old_node = st.primary_node.clone().expect("primary node");
        let old_primary = st.primary.clone().expect("primary");
        let faults = c.disk_faults(&old_node);
        let clock = AckClock::start(&ck);
        let base = *ck.flush_progress().borrow();
        let load = start_load(&ck, c.target(&old_node), LOAD_WRITES_MAX);
        flushes_reach(&ck, base + rng.range(1, 20)).await;
        // This node may have been the victim of an earlier trial.
        faults.forget_first_failure();
        match fault {
            PrimaryDiskFault::Fsync => faults.set_fail_fsync(true),
            PrimaryDiskFault::Writes => faults.set_fail_writes(true),
        }
        tally.faults += 1;
        let sum = load.await.expect("load task");
        tally.writes_durable += sum.writes_made_durable;
        assert!(
            !sum.stopped_by.is_empty(),
            "the load must have been stopped by the {fault:?} error"
        );
        let failed_at = faults
            .first_failure_at()
            .expect("the primary met an injected error");
        let last = clock.last_ack().expect("some flush was acked");
        let late = last.duration_since(failed_at).unwrap_or_default();
        assert!(
            late <= ACK_OBSERVATION_SLACK,
            "a flush was acknowledged {late:?} after the primary's {fault:?} failed"
        );
        let new = c.promoted(&old_primary, st.epoch).await;
        assert_eq!(new.epoch, st.epoch + 1, "one failover, one epoch bump");
        let new_node = new.primary_node.clone().expect("new primary node");
        let old_status = WAIT
            .expect("the old primary reporting its failed disk", || async {
                let rs = c.replicas().await;
                let s = rs
                    .iter()
                    .find(|r| r.name_any() == old_primary)?
                    .status
                    .clone()?;
                (s.state == ReplicaState::Failed).then(|| s.last_error.unwrap_or_default())
            })
            .await;
        println!(
            "trial {trial}: primary {old_primary} on {old_node}: {fault:?} EIO after {} acked flushes ({} injected errors); load stopped by {:?}; last ack {} ms before the first error; promoted on {new_node}; old primary reports {old_status:?}",
            sum.flushes_acked,
            faults.fsync_failures() + faults.write_failures(),
            sum.stopped_by.first(),
            failed_at
                .duration_since(last)
                .unwrap_or_default()
                .as_millis(),
        );
        verify_clean(
            &ck,
            &c.target(&new_node),
            &mut tally,
            &format!("trial {trial}"),
        )
        .await;
        faults.set_fail_fsync(false);
        faults.set_fail_writes(false);
        c.kill_agent(&old_node);
        c.start_agent(&old_node);
        st = c.healthy(new.epoch).await;
        assert_eq!(st.epoch, new.epoch, "the rejoin bumped no epoch");
        tally.trials += 1;
    }
    let node = st.primary_node.clone().expect("primary node");
    verify_clean(&ck, &c.target(&node), &mut tally, "after the last rejoin").await;
    c.assert_replicas_identical().await;
    tally.print(
        match fault {
            PrimaryDiskFault::Fsync => "primary-fsync-eio",
            PrimaryDiskFault::Writes => "primary-write-eio",
        },
        seed,
    );
}

/// One-way delay of the slow link in scenario 8.
const SLOW_LINK_DELAY_MS: u64 = 40;
/// Bandwidth cap toward the replica behind the slow link, bytes per second.
const SLOW_LINK_BYTES_PER_S: u64 = 128 << 10;
/// Bandwidth cap of the link a rebuild goes through, bytes per second.
const REBUILD_LINK_BYTES_PER_S: u64 = 4 << 20;
/// Writes of each load phase over the slow link.
const SLOW_PHASE_WRITES: u64 = 400;
/// WAL retention budget in scenario 8: how long a cut-off replica keeps its WAL hold.
const SLOW_RETENTION_BUDGET_MS: u64 = 5_000;
/// The async volume of scenario 8.
const ASYNC_VOLUME: &str = "chaos-async";

fn slow_link() -> (LinkShape, LinkShape) {
    let delay = Duration::from_millis(SLOW_LINK_DELAY_MS);
    (
        LinkShape {
            delay,
            bytes_per_s: Some(SLOW_LINK_BYTES_PER_S),
        },
        LinkShape {
            delay,
            bytes_per_s: None,
        },
    )
}

/// Blocks 0..CHECK_LBAS of the volume file of `replica` on `node`, read with the engine
/// (the agent must be stopped; opening recovers the file like an agent restart).
fn replica_blocks(c: &Cluster, node: &str, volume: &str, replica: &str) -> Vec<u8> {
    let path = c
        .agent(node)
        .data_dir
        .join(volume)
        .join(replica)
        .join(node_agent::replicas::VOLUME_FILE_NAME);
    let v = engine::Volume::open_file(&path, engine::VolumeConfig::default())
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut buf = vec![0u8; (CHECK_LBAS * 4096) as usize];
    v.read(engine::Lba(0), &mut buf)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    buf
}

/// Scenario 8: the data port of a replica sits behind a userspace proxy with 40 ms
/// one-way delay and a 128 KiB/s cap toward it. A syncAll volume's flushes wait for that
/// replica (the load cannot finish faster than its data crosses the cap, and the
/// replica stays in the committed set); an async volume's flushes do not (its load
/// finishes before the data could have crossed, and the primary's status shows the
/// replica behind). Then the link is cut beyond the WAL retention budget, so the
/// replica must be rebuilt, and the rebuild runs through a 4 MiB/s link. Nothing
/// acknowledged is lost, and afterwards every replica holds the same blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_behind_a_slow_link_holds_only_sync_flushes_and_rebuilds_through_it() {
    let _serial = serial().await;
    let seed = seed() ^ 8;
    let mut rng = SeededRng::new(seed);
    let setup = NodeSetup {
        proxied: true,
        ..NodeSetup::default()
    };
    let mut c = Cluster::start_with(
        &[format!(
            "--wal-retention-timeout-ms={SLOW_RETENTION_BUDGET_MS}"
        )],
        setup,
    )
    .await;
    c.start_operator("op-1");
    c.create_volume().await;
    let mut spec = BlockVolumeSpec::with_size("32Mi");
    spec.durability = api::Durability::Async;
    Api::<BlockVolume>::all(c.client())
        .create(
            &PostParams::default(),
            &BlockVolume::new(ASYNC_VOLUME, spec),
        )
        .await
        .expect("create the async volume");
    let ck = checker(seed, 8);
    let mut tally = Tally::default();
    let mut st = c.healthy(1).await;
    let primary_node = st.primary_node.clone().expect("primary node");
    let async_st = WAIT
        .expect("the async volume Ready with three in sync", || async {
            let st = c.tc.volume(ASYNC_VOLUME).await?.status?;
            (st.phase == VolumePhase::Ready && st.in_sync_count == 3).then_some(st)
        })
        .await;
    let (fwd, bwd) = slow_link();

    for trial in 0..trials(1) {
        // syncAll: every acknowledged flush waited for the slow replica.
        let slow = pick_replica_node(&st, &mut rng);
        let slow_id = c.replica_on(&slow).await;
        c.proxy(&slow).shape(fwd, bwd);
        tally.faults += 1;
        let started = Instant::now();
        let sum = ck
            .run_writes(&c.target(&primary_node), SLOW_PHASE_WRITES)
            .await;
        let took = started.elapsed();
        assert_uninterrupted(&sum, "syncAll writes over the slow link");
        tally.writes_durable += sum.writes_made_durable;
        let now = c.volume().await.expect("volume status");
        assert!(
            now.in_sync_set.contains(&slow_id)
                && now.in_sync_set_generation == st.in_sync_set_generation,
            "the slow replica {slow_id} stayed in the committed set: {:?}",
            now.in_sync_set
        );
        let crossed = Duration::from_secs_f64(
            (sum.writes_made_durable * 4096) as f64 / SLOW_LINK_BYTES_PER_S as f64,
        );
        assert!(
            took >= crossed,
            "syncAll acknowledged {} writes in {took:?}, faster than their data can reach the slow replica ({crossed:?})",
            sum.writes_made_durable
        );
        c.proxy(&slow)
            .shape(LinkShape::default(), LinkShape::default());
        verify_clean(
            &ck,
            &c.target(&primary_node),
            &mut tally,
            &format!("trial {trial} syncAll over the slow link"),
        )
        .await;

        // async: flushes go on at local speed; the lag shows in the primary's status.
        let async_primary = async_st.primary_node.clone().expect("async primary node");
        let async_slow = NODES
            .iter()
            .copied()
            .find(|n| *n != async_primary)
            .expect("a replica node");
        c.proxy(async_slow).shape(fwd, bwd);
        tally.faults += 1;
        let ack = Checker::new(
            Ledger::new(CheckerConfig {
                volume_id: ASYNC_VOLUME.into(),
                seed: seed ^ 0xa5,
                workers: 4,
                block_size_bytes: 4096,
                lba_start: 0,
                lba_count: CHECK_LBAS,
                flush_every_writes: 8,
            })
            .expect("checker config"),
        );
        let async_target = Target::Unix {
            path: c.agent(&async_primary).nbd_socket.clone(),
            export: ASYNC_VOLUME.into(),
        };
        let started = Instant::now();
        let asum = ack.run_writes(&async_target, SLOW_PHASE_WRITES).await;
        let async_took = started.elapsed();
        assert_uninterrupted(&asum, "async writes over the slow link");
        tally.writes_durable += asum.writes_made_durable;
        let async_crossed = Duration::from_secs_f64(
            (asum.writes_made_durable * 4096) as f64 / SLOW_LINK_BYTES_PER_S as f64,
        );
        assert!(
            async_took < async_crossed,
            "async flushes waited for the slow replica: {} writes took {async_took:?}, their data needs {async_crossed:?} to cross",
            asum.writes_made_durable
        );
        let (head, behind) = WAIT
            .expect(
                "the async primary reporting its slow replica behind",
                || async {
                    let rs = c.tc.replicas(ASYNC_VOLUME).await;
                    let p = rs
                        .iter()
                        .find(|r| r.spec.node == async_primary)?
                        .status
                        .clone()?;
                    let slow_id = rs.iter().find(|r| r.spec.node == async_slow)?.name_any();
                    let peer = p.peers.iter().find(|x| x.replica_id == slow_id)?;
                    (peer.flushed_lsn < p.head_lsn).then_some((p.head_lsn, peer.flushed_lsn))
                },
            )
            .await;
        c.proxy(async_slow)
            .shape(LinkShape::default(), LinkShape::default());
        WAIT.expect("the async replica caught up", || async {
            let rs = c.tc.replicas(ASYNC_VOLUME).await;
            let p = rs
                .iter()
                .find(|r| r.spec.node == async_primary)?
                .status
                .clone()?;
            (p.peers.len() == 2
                && p.peers
                    .iter()
                    .all(|x| x.flushed_lsn >= head && x.state == ReplicaState::InSync))
            .then_some(())
        })
        .await;
        let report = ack.verify(&async_target).await.expect("verify reads back");
        assert!(
            report.is_clean(),
            "async volume: acknowledged writes lost: {report}"
        );
        tally.writes_verified += report.writes_verified;
        println!(
            "trial {trial}: {SLOW_LINK_DELAY_MS} ms each way, {} KiB/s toward the replica: syncAll {} writes in {} ms (their data needs >= {} ms to cross), async {} writes in {} ms; async primary head {head}, slow replica flushed {behind}",
            SLOW_LINK_BYTES_PER_S >> 10,
            sum.writes_made_durable,
            took.as_millis(),
            crossed.as_millis(),
            asum.writes_made_durable,
            async_took.as_millis(),
        );

        // Cut beyond the retention budget, then rebuild through a capped link.
        let victim = pick_replica_node(&st, &mut rng);
        let victim_id = c.replica_on(&victim).await;
        let log_from = c.log_len(&primary_node);
        c.proxy(&victim).cut();
        let cut_at = Instant::now();
        tally.faults += 1;
        let sum = ck
            .run_writes(&c.target(&primary_node), SLOW_PHASE_WRITES)
            .await;
        assert_uninterrupted(&sum, "writes while a replica is cut off");
        tally.writes_durable += sum.writes_made_durable;
        c.peer_state_in(
            &victim_id,
            &[ReplicaState::NeedsRebuild, ReplicaState::Rebuilding],
        )
        .await;
        // The budget runs from the replica's last contact, which may precede the cut by
        // up to one heartbeat interval (an idle link carries only heartbeats).
        let heartbeat = Duration::from_millis(
            engine::replication::PrimaryConfig::default().heartbeat_interval_ms,
        );
        let held = cut_at.elapsed();
        assert!(
            held + heartbeat >= Duration::from_millis(SLOW_RETENTION_BUDGET_MS),
            "the WAL hold was dropped {} ms after the cut, before the {SLOW_RETENTION_BUDGET_MS} ms budget (less one {} ms heartbeat) ran out",
            held.as_millis(),
            heartbeat.as_millis()
        );
        let capped = LinkShape {
            delay: Duration::from_millis(SLOW_LINK_DELAY_MS),
            bytes_per_s: Some(REBUILD_LINK_BYTES_PER_S),
        };
        c.proxy(&victim).shape(capped, capped);
        c.proxy(&victim).restore();
        let restored = Instant::now();
        st = c.healthy(st.epoch).await;
        let rebuilt_in = restored.elapsed();
        assert!(
            c.logged_peer_state(&primary_node, log_from, &victim_id, "Rebuilding"),
            "the cut-off replica {victim_id} was rebuilt"
        );
        c.proxy(&victim)
            .shape(LinkShape::default(), LinkShape::default());
        verify_clean(
            &ck,
            &c.target(&primary_node),
            &mut tally,
            &format!("trial {trial} after the rebuild"),
        )
        .await;
        println!(
            "trial {trial}: replica {victim_id} on {victim} cut off, escalated after the {SLOW_RETENTION_BUDGET_MS} ms budget, rebuilt through {} MiB/s + {SLOW_LINK_DELAY_MS} ms in {} ms",
            REBUILD_LINK_BYTES_PER_S >> 20,
            rebuilt_in.as_millis()
        );
        tally.trials += 1;
    }

    c.assert_replicas_identical().await;
    tally.print("slow-link", seed);
}
