//! A mounted filesystem on a forwarded device survives the loss of the primary: an RF 2
//! volume on node-1 and node-2 is attached through the agent's gRPC Attach (FUSE file +
//! loop) on node-3, which has no replica, and later on the node of a non-primary
//! replica. The primary's agent is SIGKILLed, the operator promotes the other member,
//! and IO through the same mounted device resumes; every file written and synced before
//! the kill reads back identical (after a remount, so from the device, not the cache).
//!
//! Every device goes through a forwarding export, also on the primary's own node (in
//! process there), so a planned move of the primary away from the device's node and a
//! restart of the device node's agent pause the mounted filesystem instead of breaking
//! it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use api::BlockVolume;
use csi::agent::Agent;
use e2e::cluster::{TestCluster, TestClusterOptions};
use e2e::devices::LoopDevice;
use e2e::devices::{AttachmentGuard, leftovers};
use kube::api::{Api, Patch, PatchParams};

const VOLUME: &str = "fwd-vol";
const TIMEOUT: Duration = Duration::from_secs(90);

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Unmounts on drop (also when the test fails), so no mount outlives the test.
struct Mounted {
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn mount(device: &str, dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).expect("mount dir");
        run("mount", &[device, &dir.display().to_string()]);
        Mounted {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    fn unmount(&mut self) {
        if self.mounted {
            run("umount", &[&self.dir.display().to_string()]);
            self.mounted = false;
        }
    }

    /// Mounts `device` here afresh (what is read then comes from the device, not the
    /// page cache) and checks every one of `files` reads back.
    fn remount_and_verify(&mut self, device: &str, files: &BTreeMap<String, Vec<u8>>) {
        self.unmount();
        *self = Mounted::mount(device, &self.dir.clone());
        verify(&self.dir, files);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Deterministic file content: a seeded stream.
fn content(seed: u64, len: usize) -> Vec<u8> {
    testkit::SeededRng::new(seed).bytes(len)
}

/// Writes files `first..first+n` into `dir` and syncs; returns name → content.
async fn write_files(dir: &Path, first: u64, n: u64) -> BTreeMap<String, Vec<u8>> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut out = BTreeMap::new();
        for i in first..first + n {
            let name = format!("file-{i:03}");
            let data = content(i, 64 * 1024 + (i as usize % 7) * 4096);
            std::fs::write(dir.join(&name), &data).expect("write file");
            out.insert(name, data);
        }
        run("sync", &[]);
        out
    })
    .await
    .expect("writer")
}

/// An agent's log without ANSI colour sequences.
fn plain_log(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // Strip ANSI colour sequences the log formatter may add.
    let mut plain = String::with_capacity(text.len());
    let mut esc = false;
    for ch in text.chars() {
        match (esc, ch) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
}

/// The `forwarding re-routed` events in an agent's log that moved to `new_primary`,
/// as their `pause_ms` values.
/// Writes and syncs `n` files from `first` while the primary fails over; prints how
/// long that took.
async fn write_across_failover(dir: &Path, first: u64, n: u64) -> BTreeMap<String, Vec<u8>> {
    let started = std::time::Instant::now();
    let files = write_files(dir, first, n).await;
    println!(
        "writes + sync across the failover took {:?}",
        started.elapsed()
    );
    files
}

/// The re-route pauses `log` records towards `new_primary`; fails with `failure` when
/// there is none.
fn expect_rerouted(log: &Path, new_primary: &str, failure: &str) -> Vec<u64> {
    let pauses = reroute_pauses(log, new_primary);
    assert!(!pauses.is_empty(), "{failure}");
    pauses
}

fn reroute_pauses(log: &Path, new_primary: &str) -> Vec<u64> {
    plain_log(log)
        .lines()
        .filter(|l| {
            l.contains("forwarding re-routed") && l.contains(&format!("new_primary={new_primary}"))
        })
        .filter_map(|l| {
            let rest = &l[l.find("pause_ms=")? + "pause_ms=".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn verify(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (name, want) in files {
        let got = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == *want, "{name} differs after the failover");
    }
}

async fn volume(c: &TestCluster) -> Option<BlockVolume> {
    c.volume(VOLUME).await
}

/// Waits until the volume is Ready with both members in sync at an epoch of at least
/// `min_epoch`, and returns the primary's node and epoch.
async fn ready(c: &TestCluster, min_epoch: u64) -> (String, u64) {
    c.wait_serving(VOLUME, 2, min_epoch, TIMEOUT)
        .await
        .expect("volume ready")
}

/// Starts two agents and the operator and creates the RF 2 volume (on node-1 and
/// node-2); returns the cluster, the primary's node and its epoch once Ready.
async fn two_node_volume() -> (TestCluster, String, u64) {
    let cluster = TestCluster::start_with_volume(TestClusterOptions::nodes(2), VOLUME, "64Mi", 2)
        .await
        .expect("cluster with the RF 2 volume");
    let (node, epoch) = ready(&cluster, 1).await;
    (cluster, node, epoch)
}

/// Whether `log` has a line containing every one of `words`.
fn log_has(log: &Path, words: &[&str]) -> bool {
    plain_log(log)
        .lines()
        .any(|l| words.iter().all(|w| l.contains(w)))
}

async fn attach(agent: &Agent) -> LoopDevice {
    LoopDevice {
        path: agent
            .attach(VOLUME, false)
            .await
            .expect("Attach through the agent")
            .device_path,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mounted_forwarded_device_survives_killing_the_primary_agent() {
    // Two agents first, so the RF 2 volume is placed on node-1 and node-2.
    let (mut cluster, first_node, epoch1) = two_node_volume().await;
    cluster
        .add_node("node-3", TIMEOUT)
        .await
        .expect("node-3 registered");
    let nodes: Vec<String> = cluster
        .replicas(VOLUME)
        .await
        .iter()
        .map(|r| r.spec.node.clone())
        .collect();
    assert!(!nodes.contains(&"node-3".to_string()), "{nodes:?}");

    let agent_of = |c: &mut TestCluster, node: &str| c.agent(node).expect("agent").attach_client();
    let root = cluster.root.path().to_path_buf();

    // Phase 1: node-3 (no replica) forwards to the primary.
    let node3 = agent_of(&mut cluster, "node-3");
    let started = std::time::Instant::now();
    let e = node3
        .attach("no-such-volume", false)
        .await
        .expect_err("Attach of an unknown volume fails")
        .to_string();
    assert!(e.contains("has no replicas"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an unknown volume is refused at once, not after the failover wait"
    );
    let dev3 = attach(&node3).await;
    let device = dev3.path.clone();
    run("mkfs.ext4", &["-q", "-F", &device]);
    let mut mnt = Mounted::mount(&device, &root.join("mnt-node-3"));
    let mut files = write_files(&mnt.dir, 0, 16).await;

    cluster.agent(&first_node).expect("primary agent").kill();
    // Write and sync right away: the sync is in flight while there is no primary, and
    // completes through the same mounted device once the new primary serves.
    files.extend(write_across_failover(&mnt.dir, 16, 8).await);
    let (second_node, epoch2) = ready_without(&cluster, &first_node, epoch1).await;
    assert_ne!(second_node, first_node);
    let log3 = cluster
        .agent("node-3")
        .expect("node-3")
        .log_path()
        .to_owned();
    let pauses = expect_rerouted(
        &log3,
        &second_node,
        &format!("node-3 never re-routed its forwarded IO to {second_node}"),
    );
    println!("node-3 re-routed to {second_node}: pause_ms {pauses:?}");
    mnt.remount_and_verify(&device, &files);
    mnt.unmount();
    node3.detach(VOLUME).await.expect("detach on node-3");

    // Phase 2: the old primary's node comes back as a replica; a device attached there
    // forwards to the new primary, and when that one is killed the primary moves to
    // this very node.
    cluster
        .agent(&first_node)
        .expect("old primary agent")
        .restart()
        .expect("restart");
    let (p, _) = ready(&cluster, epoch2).await;
    assert_eq!(p, second_node, "the restarted node rejoined as a replica");
    let back = agent_of(&mut cluster, &first_node);
    let dev1 = attach(&back).await;
    let device = dev1.path.clone();
    let mut mnt = Mounted::mount(&device, &root.join(format!("mnt-{first_node}")));
    verify(&mnt.dir, &files);
    files.extend(write_files(&mnt.dir, 24, 8).await);

    cluster.agent(&second_node).expect("second primary").kill();
    files.extend(write_across_failover(&mnt.dir, 32, 8).await);
    let (third_node, _) = ready_without(&cluster, &second_node, epoch2).await;
    assert_eq!(third_node, first_node, "the only other member was promoted");
    let log1 = cluster
        .agent(&first_node)
        .expect("agent")
        .log_path()
        .to_owned();
    let pauses = expect_rerouted(
        &log1,
        &first_node,
        &format!("{first_node} never re-routed its forwarded IO to its own new primary"),
    );
    println!("{first_node} re-routed to itself: pause_ms {pauses:?}");
    mnt.remount_and_verify(&device, &files);
    assert_eq!(files.len(), 40);
    mnt.unmount();
    back.detach(VOLUME).await.expect("detach");
    let v = volume(&cluster).await.expect("volume");
    println!(
        "forwarded device survived 2 failovers: epochs {epoch1}→{epoch2}→{}, {} files verified",
        v.status.map(|s| s.epoch).unwrap_or(0),
        files.len()
    );
}

/// Waits until a member other than the one on `dead_node` was promoted at a higher
/// epoch and serves. (Only one member is left, so in-sync count is 1.)
async fn ready_without(c: &TestCluster, dead_node: &str, old_epoch: u64) -> (String, u64) {
    c.wait_promoted_away_from(VOLUME, dead_node, old_epoch, TIMEOUT)
        .await
        .expect("promotion")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mounted_device_on_the_primary_node_survives_a_planned_move_away() {
    let (mut cluster, first_node, epoch1) = two_node_volume().await;
    let other = cluster
        .replicas(VOLUME)
        .await
        .iter()
        .map(|r| r.spec.node.clone())
        .find(|n| *n != first_node)
        .expect("the other member's node");
    let root = cluster.root.path().to_path_buf();
    let log = cluster
        .agent(&first_node)
        .expect("agent")
        .log_path()
        .to_owned();
    let data_dir = cluster.agent(&first_node).expect("agent").data_dir.clone();
    // Tears the attachment down from /proc and /sys if the test fails half-way.
    let _guard = AttachmentGuard {
        data_dir: data_dir.clone(),
        volume: VOLUME.into(),
        mount_point: root.join("mnt-move"),
    };

    // Attached on the primary's own node: a forwarding export running in process.
    let client = cluster.agent(&first_node).expect("agent").attach_client();
    let dev = attach(&client).await;
    assert!(
        log_has(&log, &["forwarding export created", "in_process=true"]),
        "the device on the primary's node does not use the in-process route"
    );
    run("mkfs.ext4", &["-q", "-F", &dev.path]);
    let mut mnt = Mounted::mount(&dev.path, &root.join("mnt-move"));
    let mut files = write_files(&mnt.dir, 0, 16).await;

    // A planned move: the operator demotes this node's primary and promotes the other
    // member at epoch + 1; writes and a sync go on while it happens.
    let started = std::time::Instant::now();
    Api::<BlockVolume>::all(cluster.client.clone())
        .patch(
            VOLUME,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({
                "metadata": {"annotations": {(api::ANNOTATION_MOVE_PRIMARY_TO): other.clone()}}
            })),
        )
        .await
        .expect("annotate the move");
    files.extend(write_files(&mnt.dir, 16, 8).await);
    let (moved_to, epoch2) = ready(&cluster, epoch1 + 1).await;
    assert_eq!(moved_to, other, "the primary moved to the requested node");
    println!(
        "primary moved {first_node} -> {moved_to} (epoch {epoch1} -> {epoch2}) in {:?}",
        started.elapsed()
    );
    // IO after the move goes through the same mounted device, now over the data port.
    files.extend(write_files(&mnt.dir, 24, 8).await);
    let pauses = expect_rerouted(
        &log,
        &other,
        &format!("{first_node} never re-routed the device's IO to {other}"),
    );
    assert!(
        log_has(
            &log,
            &[
                "forwarding re-routed",
                &format!("new_primary={other}"),
                "path=\"data-port\""
            ]
        ) || log_has(
            &log,
            &[
                "forwarding re-routed",
                &format!("new_primary={other}"),
                "path=data-port"
            ]
        ),
        "the re-route to {other} did not use the data port"
    );
    println!("{first_node} re-routed to {other}: pause_ms {pauses:?}");
    mnt.unmount();
    let mut mnt = Mounted::mount(&dev.path, &mnt.dir.clone());
    verify(&mnt.dir, &files);
    assert_eq!(files.len(), 32);
    mnt.unmount();
    client.detach(VOLUME).await.expect("detach");
    let left = leftovers(&data_dir, VOLUME);
    assert!(left.is_empty(), "detach left {left:?}");
    println!(
        "device on the old primary's node survived the planned move: {} files verified",
        files.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mounted_forwarded_device_survives_restarting_its_agent() {
    let (mut cluster, _, _) = two_node_volume().await;
    cluster
        .add_node("node-3", TIMEOUT)
        .await
        .expect("node-3 registered");
    let root = cluster.root.path().to_path_buf();
    let log = cluster
        .agent("node-3")
        .expect("agent")
        .log_path()
        .to_owned();
    let data_dir = cluster.agent("node-3").expect("agent").data_dir.clone();
    let _guard = AttachmentGuard {
        data_dir: data_dir.clone(),
        volume: VOLUME.into(),
        mount_point: root.join("mnt-restart"),
    };

    let client = cluster.agent("node-3").expect("agent").attach_client();
    let dev = attach(&client).await;
    run("mkfs.ext4", &["-q", "-F", &dev.path]);
    let mut mnt = Mounted::mount(&dev.path, &root.join("mnt-restart"));
    let mut files = write_files(&mnt.dir, 0, 16).await;

    // SIGKILL the device node's agent; writes and a sync are in flight while it is
    // down (the attach proxy holds them) and complete once it is back.
    cluster.agent("node-3").expect("agent").kill();
    let dir = mnt.dir.clone();
    let writer = tokio::spawn(async move { write_files(&dir, 16, 8).await });
    let started = std::time::Instant::now();
    cluster
        .agent("node-3")
        .expect("agent")
        .restart()
        .expect("restart node-3's agent");
    files.extend(writer.await.expect("writer across the restart"));
    println!(
        "writes + sync across the agent restart took {:?}",
        started.elapsed()
    );
    assert!(
        log_has(&log, &["restored the forwarding export", VOLUME]),
        "the restarted agent did not log restoring the export"
    );
    files.extend(write_files(&mnt.dir, 24, 8).await);
    mnt.unmount();
    let mut mnt = Mounted::mount(&dev.path, &mnt.dir.clone());
    verify(&mnt.dir, &files);
    assert_eq!(files.len(), 32);
    mnt.unmount();

    // Detach after the restart still removes the device and the export.
    let client = cluster.agent("node-3").expect("agent").attach_client();
    client
        .detach(VOLUME)
        .await
        .expect("detach after the restart");
    let stats = client.stats(VOLUME).await.expect("stats");
    assert!(!stats.attached, "still attached after detach: {stats:?}");
    assert!(
        stats.message.contains("not served"),
        "the forwarding export survived detach: {stats:?}"
    );
    let left = leftovers(&data_dir, VOLUME);
    assert!(left.is_empty(), "detach after the restart left {left:?}");
    println!(
        "forwarded device survived an agent restart: {} files verified",
        files.len()
    );
}
