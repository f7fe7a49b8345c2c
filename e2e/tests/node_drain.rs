//! Node maintenance against a real kube-apiserver, four `blockvol-agent` processes and a
//! `blockvol-operator` (started by `e2e::cluster`): a node holding a replica — or the
//! primary — is drained (`BlockNode.spec.evacuate`, what `kubectl blockvol drain` sets)
//! while the lost-write checker writes through the primary's NBD socket. The drain must
//! end with no replica on the node, the volume's committed in-sync set must never drop
//! below `replicas - 1` members while it runs (polled throughout), and every
//! acknowledged-and-flushed write must read back: zero lost. When the primary moves, the
//! writer's round on the old primary ends (its writes stop being acknowledged) and the
//! next round writes through the new primary.
//!
//! The agent and operator binaries must be built first (`cargo build -p node-agent -p
//! operator --bins`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api::{BlockNode, BlockVolume, ReplicaRole, ReplicaState, VolumePhase};
use e2e::checker::{Checker, CheckerConfig, Ledger, Target};
use e2e::cluster::{AgentOptions, TestCluster, TestClusterOptions};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

const VOLUME: &str = "drain1";
/// Bound on the whole drain on a busy 2-core host.
const DRAIN_TIMEOUT_MS: u64 = 60_000;
/// Bound on the volume becoming healthy before the drain.
const READY_TIMEOUT_MS: u64 = 30_000;
/// How often the test samples the volume status while the drain runs.
const POLL_MS: u64 = 100;
/// Blocks of 4 KiB the checker writes over (4 MiB of the 32 MiB volume).
const CHECK_LBAS: u64 = 1024;
/// Bound on the writer's last round once the drain is over.
const WRITER_STOP_TIMEOUT_MS: u64 = 30_000;
/// Writes per load round; rounds repeat until the drain is over.
const ROUND_WRITES: u64 = 200;

/// The scenarios share the host's two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_replica_node_under_load_moves_every_replica_off_losing_nothing() {
    let _serial = SERIAL.lock().await;
    drain_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_the_primarys_node_moves_the_primary_first_losing_nothing() {
    let _serial = SERIAL.lock().await;
    drain_under_load(true).await;
}

fn nbd_target(tc: &TestCluster, node: &str) -> Target {
    Target::Unix {
        path: tc
            .agents
            .iter()
            .find(|a| a.node == node)
            .expect("agent")
            .nbd_socket
            .clone(),
        export: VOLUME.into(),
    }
}

async fn drain_under_load(drain_primary: bool) {
    testkit::init_tracing("e2e=info,testkit=info");
    let started = Instant::now();
    let mut opts = TestClusterOptions::nodes(4);
    opts.agent = AgentOptions {
        lease_duration_s: 3,
        ..AgentOptions::default()
    };
    let tc = TestCluster::start(opts).await.expect("cluster starts");
    tc.wait_registered(Duration::from_millis(READY_TIMEOUT_MS))
        .await
        .expect("agents register");
    let client = tc.client.clone();
    tc.create_volume(VOLUME, "32Mi", api::DEFAULT_REPLICAS)
        .await
        .expect("create volume");
    let desired = 3u32;

    // Healthy: three committed members, the primary serving and seeing both peers in sync.
    let st = e2e::cluster::wait_for(
        "three in-sync members",
        Duration::from_millis(READY_TIMEOUT_MS),
        || async {
            let st = tc.volume(VOLUME).await?.status?;
            let rs = tc.replicas(VOLUME).await;
            let p = rs.iter().find(|r| Some(r.name_any()) == st.primary)?;
            let ps = p.status.as_ref()?;
            (st.phase == VolumePhase::Ready
                && st.in_sync_count == desired
                && p.spec.role == ReplicaRole::Primary
                && ps.state == ReplicaState::Serving
                && ps.peers.len() == 2
                && ps.peers.iter().all(|p| p.state == ReplicaState::InSync))
            .then_some(st)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let primary_node = st.primary_node.clone().expect("primary node");
    let victim = if drain_primary {
        primary_node.clone()
    } else {
        tc.replicas(VOLUME)
            .await
            .into_iter()
            .map(|r| r.spec.node)
            .find(|n| *n != primary_node)
            .expect("a replica off the primary's node")
    };

    // The writer: rounds of checked writes through the primary until the drain is over.
    let checker = Checker::new(
        Ledger::new(CheckerConfig {
            volume_id: VOLUME.into(),
            seed: 20_261_207,
            workers: 4,
            block_size_bytes: 4096,
            lba_start: 0,
            lba_count: CHECK_LBAS,
            flush_every_writes: 8,
        })
        .expect("checker config"),
    );
    let targets: std::collections::BTreeMap<String, Target> = tc
        .agents
        .iter()
        .map(|a| (a.node.clone(), nbd_target(&tc, &a.node)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (ck, stop, client) = (checker.clone(), stop.clone(), client.clone());
        let volumes: Api<BlockVolume> = Api::all(client);
        tokio::spawn(async move {
            let mut durable = 0;
            let mut rounds = 0;
            let mut cut = 0;
            while !stop.load(Ordering::SeqCst) {
                // Each round writes through the primary of the moment.
                let primary = volumes
                    .get(VOLUME)
                    .await
                    .ok()
                    .and_then(|v| v.status)
                    .filter(|s| s.phase == VolumePhase::Ready)
                    .and_then(|s| s.primary_node);
                let Some(target) = primary.and_then(|p| targets.get(&p).cloned()) else {
                    tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
                    continue;
                };
                let sum = ck.run_writes(&target, ROUND_WRITES).await;
                if !sum.stopped_by.is_empty() {
                    cut += 1;
                }
                durable += sum.writes_made_durable;
                rounds += 1;
            }
            (rounds, durable, cut)
        })
    };
    let mut progress = checker.flush_progress();
    tokio::time::timeout(
        Duration::from_millis(READY_TIMEOUT_MS),
        progress.wait_for(|v| *v >= 4),
    )
    .await
    .expect("the writer acknowledges flushes")
    .expect("progress channel");

    // Drain: what `kubectl blockvol drain` writes.
    let nodes: Api<BlockNode> = Api::all(client.clone());
    nodes
        .patch(
            &victim,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"cordoned": true, "evacuate": true}})),
        )
        .await
        .expect("drain the node");
    let drain_began = Instant::now();
    let mut min_in_sync = u32::MAX;
    let mut samples = 0u64;
    let mut max_replicas = 0usize;
    loop {
        assert!(
            drain_began.elapsed() < Duration::from_millis(DRAIN_TIMEOUT_MS),
            "drain of {victim} did not finish in {DRAIN_TIMEOUT_MS} ms (in-sync minimum {min_in_sync})"
        );
        let st = tc
            .volume(VOLUME)
            .await
            .and_then(|v| v.status)
            .expect("volume status");
        min_in_sync = min_in_sync.min(st.in_sync_count);
        samples += 1;
        assert!(
            st.in_sync_count + 1 >= desired,
            "the committed in-sync set dropped to {} members ({:?}) during the drain",
            st.in_sync_count,
            st.in_sync_set
        );
        let rs = tc.replicas(VOLUME).await;
        max_replicas = max_replicas.max(rs.len());
        let bn = nodes.get(&victim).await.expect("BlockNode");
        let evac = bn.status.and_then(|s| s.evacuation);
        let done = evac
            .as_ref()
            .is_some_and(|e| e.complete && e.replicas_left == 0)
            && rs.iter().all(|r| r.spec.node != victim)
            && st.in_sync_count == desired
            && st.phase == VolumePhase::Ready;
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    let drain_took = drain_began.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (rounds, durable, cut) =
        tokio::time::timeout(Duration::from_millis(WRITER_STOP_TIMEOUT_MS), writer)
            .await
            .expect("the writer's last round ends (a demoted primary closes its export)")
            .expect("writer task");
    if !drain_primary {
        assert_eq!(cut, 0, "moving a replica cut writes through the primary");
    }
    let st = tc
        .volume(VOLUME)
        .await
        .and_then(|v| v.status)
        .expect("volume status");
    let primary_now = st.primary_node.clone().expect("primary node");
    assert_ne!(primary_now, victim, "the primary left the drained node");
    if !drain_primary {
        assert_eq!(
            primary_now, primary_node,
            "draining a replica moved the primary"
        );
    }
    let target = nbd_target(&tc, &primary_now);

    let rs = tc.replicas(VOLUME).await;
    assert!(
        rs.iter().all(|r| r.spec.node != victim),
        "replicas left on {victim}"
    );
    assert_eq!(rs.len(), desired as usize, "back to spec.replicas");
    assert_eq!(
        max_replicas,
        desired as usize + 1,
        "one extra replica at a time"
    );
    // Progress was reported as Events on the node and on the volume.
    let mut want_volume = vec!["DrainReplicaPlaced", "DrainReplicaRemoved"];
    if drain_primary {
        want_volume.push("PrimaryMoveStarted");
    }
    for (object, want) in [
        (victim.as_str(), vec!["DrainStarted", "DrainCompleted"]),
        (VOLUME, want_volume),
    ] {
        e2e::cluster::wait_for(
            &format!("Events {want:?} about {object}"),
            Duration::from_millis(READY_TIMEOUT_MS),
            || async {
                let got = tc.event_reasons(object).await;
                want.iter()
                    .all(|w| got.iter().any(|g| g == w))
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let report = checker.verify(&target).await.expect("verify reads back");
    assert!(report.is_clean(), "acknowledged writes lost: {report}");
    assert!(report.writes_verified > 0);
    println!(
        "drained {victim} ({}) in {} ms under load: {rounds} write rounds ({cut} cut by the primary move), {durable} writes durable, {report}; committed in-sync members never below {min_in_sync} over {samples} samples; total {} ms",
        if drain_primary {
            "the primary's node"
        } else {
            "a replica's node"
        },
        drain_took.as_millis(),
        started.elapsed().as_millis()
    );
}
