//! Real block devices from real agent processes (the attach proxy's FUSE file + loop
//! device) on RF3 volumes: an ext4 filesystem survives detach and re-attach; an attached
//! and mounted device survives its primary agent's restart (SIGTERM and SIGKILL) with
//! IO pausing and resuming and nothing lost; a detach by the restarted agent leaves
//! nothing behind; deleting the volume removes every replica's files.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use api::BlockVolume;
use csi::agent::{Agent, AgentSettings};
use e2e::cluster::{AgentProcess, TestCluster, TestClusterOptions, wait_for};
use e2e::devices::{
    AttachmentGuard, attach_dir, leftovers, mounts_under, processes_mentioning, run,
};
use kube::api::{Api, DeleteParams};
use node_agent::frontend::nbd::client::Connection;
use node_agent::frontend::nbd::proto::{CMD_READ, CMD_WRITE};

const TIMEOUT: Duration = Duration::from_secs(90);
const CALL_TIMEOUT_MS: u64 = 60_000;
/// The restart test's filesystem covers the first 48 MiB of its 64 MiB volume; raw
/// writes go to the rest.
const FS_SIZE: &str = "48M";
const RAW_OFFSET: u64 = 56 << 20;
const RAW_BYTES: u32 = 64 << 10;

/// Deterministic file contents: a stream seeded per file.
fn contents(seed: u64, len: usize) -> Vec<u8> {
    testkit::SeededRng::new(seed).bytes(len)
}

fn write_synced(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

fn assert_file(path: &Path, want: &[u8]) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        got == want,
        "{} differs ({} bytes, want {})",
        path.display(),
        got.len(),
        want.len()
    );
}

/// PIDs of the attach proxies serving `volume` from the agent with `data_dir`.
fn proxies(data_dir: &Path, volume: &str) -> Vec<u32> {
    processes_mentioning(&attach_dir(data_dir, volume).to_string_lossy())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("attach-proxy"))
        .map(|(pid, _)| pid)
        .collect()
}

/// Writes `data` at `offset` straight to the agent's export and disconnects without a
/// flush: acknowledged, not yet durable.
fn raw_write(socket: &Path, volume: &str, offset: u64, data: &[u8]) {
    let mut c = Connection::connect(socket, volume, Duration::from_secs(30)).expect("connect");
    let errno = c
        .request(CMD_WRITE, 0, offset, data.len() as u32, data, None)
        .expect("write answered");
    assert_eq!(errno, 0, "raw write");
}

fn raw_read(socket: &Path, volume: &str, offset: u64, len: u32) -> Option<Vec<u8>> {
    let mut c = Connection::connect(socket, volume, Duration::from_secs(30)).ok()?;
    let mut buf = vec![0u8; len as usize];
    let errno = c
        .request(CMD_READ, 0, offset, len, &[], Some(&mut buf))
        .ok()?;
    (errno == 0).then_some(buf)
}

fn agent_client(a: &AgentProcess) -> Agent {
    Agent::new(&AgentSettings {
        socket_path: a.agent_socket.clone(),
        agent_call_timeout_ms: CALL_TIMEOUT_MS,
    })
    .expect("agent client")
}

fn mount(dev: &str, at: &Path) {
    run("mount", &[dev, &at.to_string_lossy()]).expect("mount");
}

fn umount(at: &Path) {
    run("umount", &[&at.to_string_lossy()]).expect("umount");
}

fn primary<'a>(cluster: &'a mut TestCluster, v: &BlockVolume) -> &'a mut AgentProcess {
    let node = v
        .status
        .as_ref()
        .and_then(|s| s.primary_node.clone())
        .expect("primary node");
    cluster.agent(&node).expect("primary agent")
}

/// A volume attached through its primary's agent, with a mount point made for it and a
/// guard that tears the attachment down when the test ends.
struct Attached {
    client: Agent,
    data_dir: PathBuf,
    mnt: PathBuf,
    dev: String,
    _guard: AttachmentGuard,
}

async fn attach_on_primary(cluster: &mut TestCluster, v: &BlockVolume, volume: &str) -> Attached {
    let mnt = cluster.root.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mount point");
    let p = primary(cluster, v);
    let data_dir = p.data_dir.clone();
    let client = agent_client(p);
    let guard = AttachmentGuard {
        data_dir: data_dir.clone(),
        volume: volume.into(),
        mount_point: mnt.clone(),
    };
    let dev = client
        .attach(volume, false)
        .await
        .expect("attach")
        .device_path;
    Attached {
        client,
        data_dir,
        mnt,
        dev,
        _guard: guard,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rf3_filesystem_survives_detach_and_reattach_and_delete_frees_replicas() {
    const VOLUME: &str = "vol-fs";
    let mut cluster = TestCluster::start(TestClusterOptions::nodes(3))
        .await
        .expect("cluster starts");
    let v = cluster
        .create_ready_volume(VOLUME, "64Mi", 3, TIMEOUT)
        .await
        .expect("volume Ready");
    let Attached {
        client,
        data_dir,
        mnt,
        dev,
        _guard,
    } = attach_on_primary(&mut cluster, &v, VOLUME).await;
    run("mkfs.ext4", &["-q", "-F", &dev]).expect("mkfs.ext4");
    mount(&dev, &mnt);
    let files: Vec<(PathBuf, Vec<u8>)> = (0..6u64)
        .map(|i| {
            (
                mnt.join(format!("f{i}")),
                contents(i, 300_000 + 77_777 * i as usize),
            )
        })
        .collect();
    for (path, data) in &files {
        write_synced(path, data);
    }
    run("sync", &[]).expect("sync");
    umount(&mnt);
    client.detach(VOLUME).await.expect("detach");
    assert_eq!(leftovers(&data_dir, VOLUME), Vec::<String>::new());
    assert!(mounts_under(&mnt).is_empty());

    let dev2 = client
        .attach(VOLUME, false)
        .await
        .expect("re-attach")
        .device_path;
    mount(&dev2, &mnt);
    for (path, data) in &files {
        assert_file(path, data);
    }
    umount(&mnt);
    client.detach(VOLUME).await.expect("detach again");
    assert_eq!(leftovers(&data_dir, VOLUME), Vec::<String>::new());
    println!(
        "attached {dev}, re-attached {dev2}, {} files intact",
        files.len()
    );

    // Deleting the volume deletes its replicas, and each agent deletes the files.
    let mut replica_files = Vec::new();
    for r in cluster.replicas(VOLUME).await {
        let a = cluster
            .agents
            .iter()
            .find(|a| a.node == r.spec.node)
            .expect("replica's agent");
        let dir = node_agent::k8s::replica_dir(&a.data_dir, VOLUME, &r.spec.replica_id)
            .expect("replica dir");
        let file = dir.join(node_agent::replicas::VOLUME_FILE_NAME);
        let allocated = std::fs::metadata(&file).expect("volume file").blocks() * 512;
        assert!(allocated > 0, "{} holds data", file.display());
        replica_files.push((dir, allocated));
    }
    assert_eq!(replica_files.len(), 3);
    Api::<BlockVolume>::all(cluster.client.clone())
        .delete(VOLUME, &DeleteParams::default())
        .await
        .expect("delete volume");
    wait_for("every replica directory to be removed", TIMEOUT, || async {
        replica_files
            .iter()
            .all(|(dir, _)| !dir.exists())
            .then_some(())
    })
    .await
    .expect("replica files deleted");
    wait_for("the BlockReplicas to be gone", TIMEOUT, || async {
        cluster.replicas(VOLUME).await.is_empty().then_some(())
    })
    .await
    .expect("replicas gone");
    let freed: u64 = replica_files.iter().map(|(_, b)| b).sum();
    println!("deleting the volume freed {freed} allocated bytes on 3 nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_device_survives_primary_agent_restarts_and_detaches_cleanly() {
    const VOLUME: &str = "vol-restart";
    let mut options = TestClusterOptions::nodes(3);
    // Restarts finish well within the Lease; each costs one epoch, and the primary stays
    // where it is (no member is ahead of it).
    options.agent.lease_duration_s = 20;
    let mut cluster = TestCluster::start(options).await.expect("cluster starts");
    let v = cluster
        .create_ready_volume(VOLUME, "64Mi", 3, TIMEOUT)
        .await
        .expect("volume Ready");
    let st = v.status.clone().expect("status");
    let Attached {
        client: _client,
        data_dir,
        mnt,
        dev,
        _guard,
    } = attach_on_primary(&mut cluster, &v, VOLUME).await;
    run("mkfs.ext4", &["-q", "-F", &dev, FS_SIZE]).expect("mkfs.ext4");
    mount(&dev, &mnt);
    let proxy = proxies(&data_dir, VOLUME);
    assert_eq!(proxy.len(), 1, "one attach proxy serves the device");
    let mut files = vec![(mnt.join("before"), contents(100, 1 << 20))];
    write_synced(&files[0].0, &files[0].1);

    for (i, signal) in ["SIGTERM", "SIGKILL"].into_iter().enumerate() {
        let p = primary(&mut cluster, &v);
        // Acknowledged by this agent process but never flushed: it must outlive the
        // process (page cache + WAL), see the attach proxy's docs.
        let raw = contents(300 + i as u64, RAW_BYTES as usize);
        let raw_at = RAW_OFFSET + i as u64 * u64::from(RAW_BYTES);
        {
            let (socket, raw) = (p.nbd_socket.clone(), raw.clone());
            tokio::task::spawn_blocking(move || raw_write(&socket, VOLUME, raw_at, &raw))
                .await
                .expect("raw writer");
        }
        let p = primary(&mut cluster, &v);
        match signal {
            "SIGTERM" => p.terminate(),
            _ => p.kill(),
        }
        assert!(!p.is_running());
        // Written while no agent runs: the fsync can only finish once one is back.
        let path = mnt.join(format!("during-{i}"));
        let data = contents(200 + i as u64, 2 << 20);
        let writer = {
            let (path, data) = (path.clone(), data.clone());
            std::thread::spawn(move || write_synced(&path, &data))
        };
        let paused_at = std::time::Instant::now();
        assert!(
            !writer.is_finished(),
            "{signal}: fsync finished without an agent"
        );
        p.restart().expect("restart");
        wait_for("the paused write to finish", TIMEOUT, || async {
            writer.is_finished().then_some(())
        })
        .await
        .expect("IO resumed");
        writer.join().expect("writer");
        println!(
            "{signal}: fsync paused and completed {:?} after the kill",
            paused_at.elapsed()
        );
        files.push((path, data));
        let socket = primary(&mut cluster, &v).nbd_socket.clone();
        let got = wait_for("a read from the restarted agent", TIMEOUT, || {
            let socket = socket.clone();
            async move {
                tokio::task::spawn_blocking(move || raw_read(&socket, VOLUME, raw_at, RAW_BYTES))
                    .await
                    .ok()
                    .flatten()
            }
        })
        .await
        .expect("restarted agent serves reads");
        assert!(
            got == raw,
            "{signal}: an acknowledged, unflushed write was lost"
        );
        let now = cluster
            .volume(VOLUME)
            .await
            .expect("volume")
            .status
            .expect("status");
        assert_eq!(now.primary, st.primary, "{signal}: no failover");
        // The restarted agent reopened the volume at the epoch it served at and serves
        // again only at the next one (it may have issued LSNs there that it lost).
        assert_eq!(
            now.epoch,
            st.epoch + i as u64 + 1,
            "{signal}: one epoch per restart"
        );
    }

    assert_eq!(
        proxies(&data_dir, VOLUME),
        proxy,
        "the same proxy served the device across both restarts"
    );
    // Read back through the device, not the page cache.
    umount(&mnt);
    mount(&dev, &mnt);
    for (path, data) in &files {
        assert_file(path, data);
    }
    umount(&mnt);
    let client = agent_client(primary(&mut cluster, &v));
    client
        .detach(VOLUME)
        .await
        .expect("detach by the restarted agent");
    assert_eq!(leftovers(&data_dir, VOLUME), Vec::<String>::new());
}
