//! The operator's volume lifecycle with real processes: `blockvol-agent` per node,
//! `blockvol-operator` processes and a real kube-apiserver ([`e2e::cluster`]). Data goes
//! through the primary's NBD export (the tokio NBD client of [`e2e::checker`]) and is
//! read back byte for byte after every change of primary. Every wait is a bounded poll.
//!
//! The daemons are the workspace binaries; build them first:
//! `cargo build -p node-agent -p operator --bins && cargo test -p e2e --test operator_lifecycle`.

use std::time::{Duration, Instant};

use api::{BlockVolume, BlockVolumeStatus, ReplicaRole, ReplicaState, VolumePhase};
use e2e::checker::{NbdClient, Target};
use e2e::cluster::{AgentProcess, NAMESPACE, TestCluster, TestClusterOptions, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use testkit::Paused;

const TIMEOUT: Duration = Duration::from_secs(120);
const VOLUME_BYTES: usize = 32 << 20;
const CHUNK: usize = 64 << 10;
/// Writes between FLUSHes (2 MiB).
const FLUSH_EVERY: usize = 32;

async fn cluster(nodes: usize, tune: impl FnOnce(&mut TestClusterOptions)) -> TestCluster {
    testkit::init_tracing("e2e=info,testkit=info");
    let mut opts = TestClusterOptions::nodes(nodes);
    tune(&mut opts);
    TestCluster::start(opts).await.expect("cluster starts")
}

async fn create_volume(c: &TestCluster, name: &str, size: &str) {
    c.create_volume(name, size, api::DEFAULT_REPLICAS)
        .await
        .expect("create volume");
}

async fn patch_volume(c: &TestCluster, name: &str, patch: serde_json::Value) {
    Api::<BlockVolume>::all(c.client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch volume");
}

/// Waits until the volume is Ready with `in_sync` members at an epoch `pred` accepts,
/// with no move in progress and every replica reporting that epoch.
async fn settled(
    c: &TestCluster,
    name: &str,
    what: &str,
    in_sync: u32,
    pred: impl Fn(&BlockVolumeStatus) -> bool,
) -> BlockVolumeStatus {
    wait_for(what, TIMEOUT, || async {
        let v = c.volume(name).await?;
        let s = v.status?;
        let ok = s.phase == VolumePhase::Ready
            && s.in_sync_count == in_sync
            && s.primary_move.is_none()
            && pred(&s);
        if !ok {
            return None;
        }
        let rs = c.replicas(name).await;
        let primary = rs.iter().find(|r| Some(r.name_any()) == s.primary)?;
        let ps = primary.status.as_ref()?;
        let peers_ok = ps.peers.len() + 1 == in_sync as usize
            && ps.peers.iter().all(|p| p.state == ReplicaState::InSync)
            && ps.unreachable.is_empty();
        let epochs_ok = rs
            .iter()
            .filter(|r| r.metadata.deletion_timestamp.is_none())
            .all(|r| r.status.as_ref().is_some_and(|x| x.epoch == s.epoch));
        (ps.state == ReplicaState::Serving && peers_ok && epochs_ok).then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn agent<'a>(c: &'a TestCluster, node: &str) -> &'a AgentProcess {
    c.agents
        .iter()
        .find(|a| a.node == node)
        .unwrap_or_else(|| panic!("no agent for {node}"))
}

fn target(a: &AgentProcess, volume: &str) -> Target {
    Target::Unix {
        path: a.nbd_socket.clone(),
        export: volume.to_string(),
    }
}

/// Writes one 64 KiB chunk per `stride` chunks (pattern byte from `seed`), with a FLUSH
/// every [`FLUSH_EVERY`] writes (the WAL is smaller than the volume) and at the end;
/// records every byte in `image`.
async fn write_and_flush(t: &Target, image: &mut [u8], seed: u8, stride: usize) {
    let mut nbd = NbdClient::connect(t).await.expect("connect to the primary");
    for (n, (i, chunk)) in image
        .chunks_mut(CHUNK)
        .enumerate()
        .step_by(stride)
        .enumerate()
    {
        chunk.fill(seed.wrapping_add(i as u8) | 1);
        let offset = (i * CHUNK) as u64;
        if let Err(e) = nbd.write(offset, chunk).await {
            panic!("write at {offset} through {t:?}: {e}");
        }
        if n % FLUSH_EVERY == FLUSH_EVERY - 1
            && let Err(e) = nbd.flush().await
        {
            panic!("flush through {t:?}: {e}");
        }
    }
    if let Err(e) = nbd.flush().await {
        panic!("flush through {t:?}: {e}");
    }
    nbd.disconnect().await;
}

async fn read_all(t: &Target, len: usize) -> Vec<u8> {
    let mut nbd = NbdClient::connect(t).await.expect("connect to the primary");
    assert_eq!(nbd.size_bytes(), len as u64, "export size");
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(256 << 10).enumerate() {
        nbd.read((i * (256 << 10)) as u64, chunk)
            .await
            .expect("read");
    }
    nbd.disconnect().await;
    out
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at}: got {:#04x}, flushed {:#04x}",
            got[at], want[at]
        );
    }
}

/// Planned moves: by the admin's annotation, then by data locality. Each bumps the
/// epoch by one, the new primary serves every flushed byte, the old primary's export is
/// gone and it rejoins (three in sync again), and a write through the new primary
/// flushes with all three members.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_primary_moves_keep_every_flushed_byte() {
    let c = cluster(3, |_| {}).await;
    let vol = "moving";
    create_volume(&c, vol, "32Mi").await;
    let st = settled(&c, vol, "RF3 Ready", 3, |s| s.epoch == 1).await;
    let first_node = st.primary_node.clone().expect("primary node");
    let mut image = vec![0u8; VOLUME_BYTES];
    write_and_flush(&target(agent(&c, &first_node), vol), &mut image, 0x20, 1).await;

    let mut nodes: Vec<String> = c.agents.iter().map(|a| a.node.clone()).collect();
    nodes.retain(|n| *n != first_node);
    let (second_node, third_node) = (nodes[0].clone(), nodes[1].clone());

    // 1. The admin asks for the primary on another node.
    let started = Instant::now();
    patch_volume(
        &c,
        vol,
        json!({"metadata": {"annotations": {(api::ANNOTATION_MOVE_PRIMARY_TO): second_node}}}),
    )
    .await;
    let st = settled(&c, vol, "the primary moved by annotation", 3, |s| {
        s.epoch == 2 && s.primary_node.as_deref() == Some(second_node.as_str())
    })
    .await;
    println!(
        "move by annotation: {} -> {} settled (RF3 in sync at epoch {}) in {} ms",
        first_node,
        second_node,
        st.epoch,
        started.elapsed().as_millis()
    );
    let reasons = c.event_reasons(vol).await;
    for want in ["PrimaryMoveStarted", "PrimaryDemoted", "PrimaryMoved"] {
        assert!(
            reasons.iter().any(|r| r == want),
            "{want} missing: {reasons:?}"
        );
    }
    assert!(
        NbdClient::connect(&target(agent(&c, &first_node), vol))
            .await
            .is_err(),
        "the demoted primary must not serve the export any more"
    );
    let t2 = target(agent(&c, &second_node), vol);
    assert_same(
        &read_all(&t2, VOLUME_BYTES).await,
        &image,
        "after the first move",
    );
    write_and_flush(&t2, &mut image, 0x60, 3).await;

    // 2. Data locality: attached on the third node, BestEffort moves the primary there
    // (the annotation is gone, so it no longer pins the primary).
    patch_volume(
        &c,
        vol,
        json!({
            "metadata": {"annotations": {
                (api::ANNOTATION_MOVE_PRIMARY_TO): null,
                (api::ANNOTATION_ATTACHED_NODE): third_node,
            }},
            "spec": {"dataLocality": "bestEffort"},
        }),
    )
    .await;
    let st = settled(
        &c,
        vol,
        "the primary moved to the attachment node",
        3,
        |s| s.epoch == 3 && s.primary_node.as_deref() == Some(third_node.as_str()),
    )
    .await;
    assert_eq!(st.attached_to.as_deref(), Some(third_node.as_str()));
    let t3 = target(agent(&c, &third_node), vol);
    assert_same(
        &read_all(&t3, VOLUME_BYTES).await,
        &image,
        "after the second move",
    );
    write_and_flush(&t3, &mut image, 0x90, 5).await;
    assert_same(
        &read_all(&t3, VOLUME_BYTES).await,
        &image,
        "after writing at epoch 3",
    );

    // A request naming a node without a replica is refused with a warning; nothing moves.
    patch_volume(
        &c,
        vol,
        json!({"metadata": {"annotations": {(api::ANNOTATION_MOVE_PRIMARY_TO): "no-such-node"}}}),
    )
    .await;
    wait_for("a PrimaryMoveRejected event", TIMEOUT, || async {
        c.event_reasons(vol)
            .await
            .iter()
            .any(|r| r == "PrimaryMoveRejected")
            .then_some(())
    })
    .await
    .expect("rejection event");
    let v = c.volume(vol).await.expect("volume");
    let s = v.status.expect("status");
    assert_eq!(
        (s.epoch, s.primary_node.as_deref()),
        (3, Some(third_node.as_str()))
    );

    // 3. A move recorded by an operator that then died is resumed by its restart: with
    // the operator down, the status holds a `Requested` move (nothing else asks for
    // one any more); the restarted operator finishes it.
    patch_volume(
        &c,
        vol,
        json!({
            "metadata": {"annotations": {
                (api::ANNOTATION_MOVE_PRIMARY_TO): null,
                (api::ANNOTATION_ATTACHED_NODE): null,
            }},
            "spec": {"dataLocality": "disabled"},
        }),
    )
    .await;
    settled(&c, vol, "detached, still on the third node", 3, |s| {
        s.epoch == 3 && s.attached_to.is_none()
    })
    .await;
    let mut c = c;
    c.operators[0].kill();
    let rs = c.replicas(vol).await;
    let to = rs
        .iter()
        .find(|r| r.spec.node == first_node)
        .expect("replica on the first node");
    let from = s.primary.clone().expect("primary");
    Api::<BlockVolume>::all(c.client.clone())
        .patch_status(
            vol,
            // Exactly as the operator writes its status: server-side apply, its manager.
            &PatchParams::apply(api::FIELD_MANAGER_OPERATOR),
            &Patch::Apply(&json!({
                "apiVersion": format!("{}/{}", api::GROUP, api::VERSION),
                "kind": "BlockVolume",
                "status": {"primaryMove": {
                "from": from,
                "to": to.name_any(),
                "toNode": first_node,
                "epoch": 4,
                "phase": "Requested",
                "reason": "Requested",
                "startedAt": k8s_openapi::jiff::Timestamp::from_second(
                    k8s_openapi::jiff::Timestamp::now().as_second(),
                )
                .expect("now")
                .to_string(),
            }}})),
        )
        .await
        .expect("record a move as a dead operator would have");
    c.operators[0].restart().expect("operator restarts");
    let st = settled(
        &c,
        vol,
        "the recorded move finished after the restart",
        3,
        |s| s.epoch == 4 && s.primary_node.as_deref() == Some(first_node.as_str()),
    )
    .await;
    let t1 = target(agent(&c, &first_node), vol);
    assert_same(
        &read_all(&t1, VOLUME_BYTES).await,
        &image,
        "after the resumed move",
    );
    assert_eq!(st.primary.as_deref(), Some(to.name_any().as_str()));
}

/// A replica whose agent stays away longer than the WAL retention budget and the
/// operator's grace is replaced on the fourth node and rebuilt; moving the primary onto
/// the rebuilt replica proves its bytes. Deleting the volume then frees every agent's
/// disk and removes every finalizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_replica_is_replaced_and_rebuilt_then_deletion_frees_every_disk() {
    let mut c = cluster(4, |o| {
        o.agent.extra_args = vec!["--wal-retention-timeout-ms=2000".into()];
        o.operator.node_gone_grace_ms = 5_000;
        o.operator.replica_failure_grace_ms = 5_000;
    })
    .await;
    let vol = "replaced";
    create_volume(&c, vol, "32Mi").await;
    let st = settled(&c, vol, "RF3 Ready", 3, |s| s.epoch == 1).await;
    let primary_node = st.primary_node.clone().expect("primary node");
    let mut image = vec![0u8; VOLUME_BYTES];
    write_and_flush(&target(agent(&c, &primary_node), vol), &mut image, 0x30, 1).await;

    let rs = c.replicas(vol).await;
    let used: Vec<String> = rs.iter().map(|r| r.spec.node.clone()).collect();
    let victim = rs
        .iter()
        .find(|r| r.spec.role == ReplicaRole::Replica)
        .expect("a non-primary replica");
    let (victim_id, victim_node) = (victim.name_any(), victim.spec.node.clone());
    let spare = c
        .agents
        .iter()
        .map(|a| a.node.clone())
        .find(|n| !used.contains(n))
        .expect("a fourth node");
    c.agent(&victim_node).expect("victim agent").kill();
    let lost_at = Instant::now();

    // Writes while the member is away: the primary drops it from the committed set.
    write_and_flush(&target(agent(&c, &primary_node), vol), &mut image, 0x50, 4).await;
    let st = settled(&c, vol, "replaced on the fourth node and rebuilt", 3, |s| {
        s.replicas.iter().any(|r| r.node == spare) && !s.in_sync_set.contains(&victim_id)
    })
    .await;
    println!(
        "replica on {victim_node} replaced by one on {spare}, rebuilt and in sync {} ms after its agent died",
        lost_at.elapsed().as_millis()
    );
    let reasons = c.event_reasons(vol).await;
    for want in ["ReplicaFailed", "RebuildStarted"] {
        assert!(
            reasons.iter().any(|r| r == want),
            "{want} missing: {reasons:?}"
        );
    }

    // The rebuilt replica's bytes: make it the primary and read them.
    patch_volume(
        &c,
        vol,
        json!({"metadata": {"annotations": {(api::ANNOTATION_MOVE_PRIMARY_TO): spare}}}),
    )
    .await;
    settled(
        &c,
        vol,
        "the primary moved onto the rebuilt replica",
        3,
        |s| s.epoch == st.epoch + 1 && s.primary_node.as_deref() == Some(spare.as_str()),
    )
    .await;
    let t = target(agent(&c, &spare), vol);
    assert_same(
        &read_all(&t, VOLUME_BYTES).await,
        &image,
        "the rebuilt replica",
    );

    // The victim's agent returns: its replaced replica's files go.
    c.agent(&victim_node)
        .expect("victim agent")
        .restart()
        .expect("restart");
    wait_for("the replaced replica removed", TIMEOUT, || async {
        let rs = c.replicas(vol).await;
        (!rs.iter().any(|r| r.name_any() == victim_id)).then_some(())
    })
    .await
    .expect("replaced replica gone");

    // Delete: replicas, finalizers and every data directory go.
    let holders: Vec<(String, std::path::PathBuf)> = c
        .replicas(vol)
        .await
        .iter()
        .map(|r| {
            (
                r.spec.node.clone(),
                agent(&c, &r.spec.node).data_dir.clone(),
            )
        })
        .collect();
    assert_eq!(holders.len(), 3);
    for (node, dir) in &holders {
        assert!(
            dir_bytes(dir) > 0,
            "node {node} holds no data for the volume before deletion"
        );
    }
    Api::<BlockVolume>::all(c.client.clone())
        .delete(vol, &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("the volume and its replicas gone", TIMEOUT, || async {
        (c.volume(vol).await.is_none() && c.replicas(vol).await.is_empty()).then_some(())
    })
    .await
    .expect("deleted");
    for a in &c.agents {
        let left = volume_files(&a.data_dir, vol);
        assert!(left.is_empty(), "node {} still holds {left:?}", a.node);
    }
}

/// Total size of the regular files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// Paths under `dir` whose name mentions `volume`.
fn volume_files(dir: &std::path::Path, volume: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().contains(volume))
        {
            out.push(p.clone());
        }
        if p.is_dir() {
            out.extend(volume_files(&p, volume));
        }
    }
    out
}

async fn leader(c: &TestCluster) -> Option<String> {
    let l = Api::<Lease>::namespaced(c.client.clone(), NAMESPACE)
        .get_opt("blockvol-operator")
        .await
        .ok()??;
    l.spec?.holder_identity
}

/// Milliseconds from now until a write and FLUSH succeed through the export of `volume`
/// on any agent of `nodes` (each attempt on a fresh connection).
async fn first_flushed_write(c: &TestCluster, volume: &str, nodes: &[String]) -> u128 {
    let start = Instant::now();
    let block = vec![0x5au8; 4096];
    wait_for(
        "a flushed write through the new primary",
        TIMEOUT,
        || async {
            for n in nodes {
                let Ok(mut nbd) = NbdClient::connect(&target(agent(c, n), volume)).await else {
                    continue;
                };
                let ok = nbd.write(1 << 20, &block).await.is_ok() && nbd.flush().await.is_ok();
                nbd.disconnect().await;
                if ok {
                    return Some(start.elapsed().as_millis());
                }
            }
            None
        },
    )
    .await
    .expect("the volume serves again")
}

/// Two operator processes: exactly one holds the leader Lease and acts; killing it hands
/// the Lease to the other, which then handles primary failures. Then the failover time
/// (SIGKILL of the primary's agent → first flushed write through the new primary) is
/// measured over `BLOCKVOL_FAILOVER_TRIALS` trials (default 2) and printed; it is a
/// measurement, not an assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_handover_then_failover_time_measurement() {
    let mut c = cluster(3, |o| o.operators = 2).await;
    let first = wait_for("a leader", TIMEOUT, || leader(&c))
        .await
        .expect("leader");
    let vol = "failover";
    create_volume(&c, vol, "32Mi").await;
    settled(&c, vol, "RF3 Ready under the first leader", 3, |s| {
        s.epoch == 1
    })
    .await;
    assert_eq!(leader(&c).await.as_deref(), Some(first.as_str()));

    let killed_at = Instant::now();
    c.operators
        .iter_mut()
        .find(|o| o.identity == first)
        .expect("leader process")
        .kill();
    let second = wait_for("the other operator to take the Lease", TIMEOUT, || async {
        leader(&c).await.filter(|l| *l != first)
    })
    .await
    .expect("takeover");
    let lease_s = c.options.operator.lease_duration_s;
    let took = killed_at.elapsed();
    println!(
        "leader {first} killed; {second} leads after {} ms (lease {lease_s} s)",
        took.as_millis()
    );
    assert!(
        took < Duration::from_secs(u64::from(lease_s) * 4),
        "takeover took {took:?}, far beyond the {lease_s} s lease"
    );

    let trials: usize = std::env::var("BLOCKVOL_FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut image = vec![0u8; VOLUME_BYTES];
    let mut times = Vec::new();
    let mut epoch = 1;
    for trial in 1..=trials {
        let v = c.volume(vol).await.expect("volume");
        let s = v.status.expect("status");
        let primary_node = s.primary_node.clone().expect("primary");
        write_and_flush(
            &target(agent(&c, &primary_node), vol),
            &mut image,
            0x11 * trial as u8,
            7,
        )
        .await;
        let others: Vec<String> = c
            .agents
            .iter()
            .map(|a| a.node.clone())
            .filter(|n| *n != primary_node)
            .collect();
        c.agent(&primary_node).expect("primary agent").kill();
        let ms = first_flushed_write(&c, vol, &others).await;
        image[1 << 20..(1 << 20) + 4096].fill(0x5a);
        times.push(ms);
        println!("failover trial {trial}: {ms} ms (primary agent on {primary_node} SIGKILLed)");
        let v = c.volume(vol).await.expect("volume");
        let s = v.status.expect("status");
        assert!(s.epoch > epoch, "promotion bumps the epoch");
        epoch = s.epoch;
        let new_node = s.primary_node.clone().expect("new primary");
        assert_same(
            &read_all(&target(agent(&c, &new_node), vol), VOLUME_BYTES).await,
            &image,
            "the promoted primary",
        );
        c.agent(&primary_node)
            .expect("primary agent")
            .restart()
            .expect("restart");
        settled(&c, vol, "three in sync again", 3, |s| s.epoch == epoch).await;
    }
    times.sort_unstable();
    let p50 = times[(times.len() - 1) / 2];
    let max = times[times.len() - 1];
    println!(
        "failover (SIGKILL primary agent -> first flushed write), {} trials, agent lease {} s: p50 {p50} ms, max {max} ms",
        times.len(),
        c.options.agent.lease_duration_s
    );
    let lead = leader(&c).await;
    assert_eq!(
        lead.as_deref(),
        Some(second.as_str()),
        "the survivor still leads"
    );
}

/// Frees what an attach made if the test stops before its Detach: the loop device and
/// FUSE mounts under the agent's directory (the cluster's drop stops leftover attach
/// proxies).
struct AttachCleanup {
    device: String,
    under: std::path::PathBuf,
}

impl Drop for AttachCleanup {
    fn drop(&mut self) {
        let under = self.under.display().to_string();
        let loops = std::process::Command::new("losetup")
            .arg("-a")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        if loops
            .lines()
            .any(|l| l.starts_with(&format!("{}:", self.device)) && l.contains(&under))
        {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.device])
                .status();
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
            if m.starts_with(&under) {
                let _ = std::process::Command::new("fusermount3")
                    .args(["-u", "-z", m])
                    .status();
            }
        }
    }
}

/// `blockdev --getsize64` of a block device.
fn device_bytes(device: &str) -> u64 {
    let out = std::process::Command::new("blockdev")
        .args(["--getsize64", device])
        .output()
        .expect("blockdev");
    assert!(out.status.success(), "blockdev {device}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a byte count")
}

/// Growing `spec.size` while the volume is attached (the agent's gRPC Attach: FUSE file
/// + loop): every replica grows, the export serves the new size to new connections, the
/// agent's Expand grows the attached device in place and answers with its size, and the
/// data is intact. The attached device is then detached and nothing (loop device, FUSE
/// mount) is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expansion_while_attached_grows_every_replica_and_the_export() {
    let c = cluster(3, |_| {}).await;
    let vol = "growing";
    create_volume(&c, vol, "32Mi").await;
    let st = settled(&c, vol, "RF3 Ready", 3, |s| s.epoch == 1).await;
    let node = st.primary_node.clone().expect("primary node");
    let a = agent(&c, &node);
    let mut image = vec![0u8; VOLUME_BYTES];
    write_and_flush(&target(a, vol), &mut image, 0x70, 2).await;

    let grpc = csi::agent::Agent::new(&csi::agent::AgentSettings {
        socket_path: a.agent_socket.clone(),
        agent_call_timeout_ms: 60_000,
    })
    .expect("agent client");
    let att = grpc.attach(vol, false).await.expect("Attach");
    let device = att.device_path.clone();
    let _cleanup = AttachCleanup {
        device: device.clone(),
        under: a.dir.clone(),
    };
    assert_eq!(att.size_bytes, VOLUME_BYTES as u64);
    assert_eq!(device_bytes(&device), VOLUME_BYTES as u64);

    let grown = VOLUME_BYTES as u64 + (16 << 20);
    patch_volume(&c, vol, json!({"spec": {"size": "48Mi"}})).await;
    wait_for("every replica grown to 48Mi", TIMEOUT, || async {
        let v = c.volume(vol).await?;
        let rs = c.replicas(vol).await;
        let all = rs.len() == 3
            && rs
                .iter()
                .all(|r| r.status.as_ref().and_then(|s| s.size_bytes) == Some(grown));
        (v.status?.size_bytes == Some(grown) && all).then_some(())
    })
    .await
    .expect("grown");
    let reasons = c.event_reasons(vol).await;
    assert!(reasons.iter().any(|r| r == "Expanded"), "{reasons:?}");
    assert_eq!(
        grpc.expand(vol, grown).await.expect("Expand").size_bytes,
        grown
    );
    let got = read_all(&target(a, vol), grown as usize).await;
    assert_same(&got[..VOLUME_BYTES], &image, "the data after growing");
    assert!(
        got[VOLUME_BYTES..].iter().all(|&b| b == 0),
        "the new space reads zero"
    );
    assert_eq!(
        device_bytes(&device),
        grown,
        "the attached device grew without a re-attach"
    );

    grpc.detach(vol).await.expect("Detach");
    let loops = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .expect("losetup");
    let loops = String::from_utf8_lossy(&loops.stdout).to_string();
    assert!(
        !loops
            .lines()
            .any(|l| l.contains(&a.dir.display().to_string())),
        "a loop device is left: {loops}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    assert!(
        !mounts.contains(&a.dir.display().to_string()),
        "a FUSE mount is left: {mounts}"
    );
}

/// Growing `spec.size` while one replica's agent is paused (SIGSTOP) and cannot apply
/// the new size: the primary grows and serves the new size, a write lands beyond the
/// old end (an entry beyond the paused replica's end), and the agent's Expand does not
/// answer while that in-sync replica is short. Once the agent resumes, the replica
/// grows, takes the entries beyond its old end (refused as `BeyondSize` while it was
/// short, never as a storage failure), Expand answers with the new size, and the
/// volume is back to three in sync at the same epoch with the same replicas (no
/// failure, no replacement, no rebuild). The data reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expansion_waits_for_a_paused_replica_which_grows_and_catches_up() {
    let c = cluster(3, |_| {}).await;
    let vol = "growing-paused";
    create_volume(&c, vol, "32Mi").await;
    let st = settled(&c, vol, "RF3 Ready", 3, |s| s.epoch == 1).await;
    let node = st.primary_node.clone().expect("primary node");
    let a = agent(&c, &node);
    let mut image = vec![0u8; VOLUME_BYTES];
    write_and_flush(&target(a, vol), &mut image, 0x30, 4).await;
    let before = c.replicas(vol).await;
    let names: std::collections::BTreeSet<String> = before.iter().map(|r| r.name_any()).collect();
    let lagging = before
        .iter()
        .find(|r| r.spec.node != node)
        .expect("a replica on another node")
        .clone();
    let grpc = csi::agent::Agent::new(&csi::agent::AgentSettings {
        socket_path: a.agent_socket.clone(),
        agent_call_timeout_ms: 60_000,
    })
    .expect("agent client");
    let grown = VOLUME_BYTES as u64 + (16 << 20);

    let paused = Paused::stop(
        agent(&c, &lagging.spec.node)
            .pid()
            .expect("the replica's agent runs"),
    );
    patch_volume(&c, vol, json!({"spec": {"size": "48Mi"}})).await;
    let t = target(a, vol);
    let t = &t;
    let mut nbd = wait_for(
        "the primary serving the new size",
        TIMEOUT,
        move || async move {
            let nbd = NbdClient::connect(t).await.ok()?;
            (nbd.size_bytes() == grown).then_some(nbd)
        },
    )
    .await
    .expect("the primary grew");
    let expand = {
        let grpc = grpc.clone();
        tokio::spawn(async move { grpc.expand(vol, grown).await })
    };
    let tail = vec![0x5bu8; CHUNK];
    nbd.write(VOLUME_BYTES as u64, &tail)
        .await
        .expect("a write beyond the old end");
    // The fault lasts a second more (well inside the 5 s after which the primary would
    // report the paused member unreachable).
    tokio::time::sleep(Duration::from_secs(1)).await;
    if expand.is_finished() {
        panic!(
            "Expand answered while an in-sync replica had not grown: {:?}",
            expand.await
        );
    }
    drop(paused);
    let answer = tokio::time::timeout(TIMEOUT, expand)
        .await
        .expect("Expand answers once the replica grew")
        .expect("expand task")
        .expect("Expand");
    assert_eq!(answer.size_bytes, grown);
    nbd.flush().await.expect("flush through the primary");
    nbd.disconnect().await;

    let st = settled(&c, vol, "RF3 again", 3, |s| s.epoch == 1).await;
    assert_eq!(st.epoch, 1, "no failover");
    let after = c.replicas(vol).await;
    let names_after: std::collections::BTreeSet<String> =
        after.iter().map(|r| r.name_any()).collect();
    assert_eq!(names, names_after, "no replica was replaced");
    let lag = after
        .iter()
        .find(|r| r.name_any() == lagging.name_any())
        .and_then(|r| r.status.clone())
        .expect("the paused replica's status");
    assert_ne!(lag.state, ReplicaState::Failed, "{lag:?}");
    assert_eq!(lag.size_bytes, Some(grown));
    let got = read_all(&target(a, vol), grown as usize).await;
    assert_same(&got[..VOLUME_BYTES], &image, "the data before growing");
    assert_same(
        &got[VOLUME_BYTES..VOLUME_BYTES + CHUNK],
        &tail,
        "the write beyond the old end",
    );
}
