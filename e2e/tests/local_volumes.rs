//! Volumes used the way a pod uses them, on a local cluster of real processes: the
//! control plane with kube-controller-manager, the operator, three node agents, the
//! blockvol-csi controller with csi-provisioner/attacher/resizer, a CSI node plugin per
//! node, and the kubelet played by `e2e::kubelet`. Data is written through real mounts
//! (FUSE + loop devices made by the agents) and read back after the volume moved, grew,
//! lost a replica's node and failed over.
//!
//! Needs root (mount, loop devices, FUSE) and the pinned tools (`hack/tools/build.sh`).
//! The scenarios run one at a time: each starts a whole cluster.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use api::{BlockReplica, BlockVolume, VolumePhase};
use e2e::cluster::{TestCluster, TestClusterOptions, wait_for};
use e2e::kubelet::Presentation;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const NS: &str = "default";
const MIB: u64 = 1 << 20;
/// Longest any one expectation may take on a loaded machine.
const WAIT: Duration = Duration::from_secs(120);
/// Longest one write-and-sync or read may take, failover included.
const IO_TIMEOUT: Duration = Duration::from_secs(90);

/// Each scenario starts a whole cluster; running two at once only makes both slow.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn cluster() -> TestCluster {
    let mut options = TestClusterOptions::nodes(3);
    options.controller_manager = true;
    let mut cluster = TestCluster::start(options).await.expect("cluster starts");
    cluster.start_csi().await.expect("CSI driver starts");
    cluster
}

async fn storage_class(client: &Client, name: &str, replicas: u8, fs_type: &str) {
    let scs: Api<StorageClass> = Api::all(client.clone());
    let sc = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": api::CSI_DRIVER_NAME,
        "parameters": {"replicas": replicas.to_string(), "durability": "syncAll",
                       "csi.storage.k8s.io/fstype": fs_type},
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
        "allowVolumeExpansion": true,
    }))
    .expect("StorageClass");
    scs.create(&PostParams::default(), &sc)
        .await
        .expect("create StorageClass");
}

/// Creates a claim and returns the PV it is bound to.
async fn bound_claim(client: &Client, name: &str, class: &str, size: &str, block: bool) -> String {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let pvc = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "volumeMode": if block { "Block" } else { "Filesystem" },
            "resources": {"requests": {"storage": size}},
        },
    }))
    .expect("PVC");
    pvcs.create(&PostParams::default(), &pvc)
        .await
        .expect("create PVC");
    wait_for(&format!("PVC {name} bound"), WAIT, || async {
        let p = pvcs.get(name).await.ok()?;
        let bound = p.status.as_ref()?.phase.as_deref() == Some("Bound");
        bound.then(|| p.spec?.volume_name).flatten()
    })
    .await
    .expect("PVC binds")
}

async fn volume(client: &Client, name: &str) -> BlockVolume {
    Api::<BlockVolume>::all(client.clone())
        .get(name)
        .await
        .expect("BlockVolume")
}

/// Waits until the volume is Ready with `n` members in sync, and returns it.
async fn in_sync(client: &Client, name: &str, n: u32) -> BlockVolume {
    let vols: Api<BlockVolume> = Api::all(client.clone());
    wait_for(&format!("{name} Ready with {n} in sync"), WAIT, || async {
        vols.get(name).await.ok().filter(|v| {
            v.status
                .as_ref()
                .is_some_and(|s| s.phase == VolumePhase::Ready && s.in_sync_count >= n)
        })
    })
    .await
    .expect("volume in sync")
}

fn primary_node(bv: &BlockVolume) -> String {
    bv.status
        .as_ref()
        .and_then(|s| s.primary_node.clone())
        .expect("volume has a primary")
}

/// Runs blocking IO on its own thread so a stalled device fails the test after
/// `IO_TIMEOUT` instead of hanging it.
async fn io<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match tokio::time::timeout(IO_TIMEOUT, rx).await {
        Ok(Ok(v)) => v,
        Ok(Err(_)) => panic!("{what}: the IO thread panicked"),
        Err(_) => panic!("{what}: no progress in {} s", IO_TIMEOUT.as_secs()),
    }
}

/// Deterministic content for file `name` (seeded), so a reader can recompute it.
fn content(seed: u64, len: usize) -> Vec<u8> {
    testkit::SeededRng::new(seed).bytes(len)
}

/// Writes a file and a `.crc` next to it, both fsynced, and fsyncs the directory.
fn write_checked(dir: &Path, name: &str, data: &[u8]) {
    let crc = crc32c::crc32c(data);
    for (file, bytes) in [
        (dir.join(name), data.to_vec()),
        (
            dir.join(format!("{name}.crc")),
            crc.to_string().into_bytes(),
        ),
    ] {
        let mut f = std::fs::File::create(&file).expect("create file");
        f.write_all(&bytes).expect("write file");
        f.sync_all().expect("fsync file");
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .expect("fsync directory");
}

/// Reads a file back and checks it against its `.crc` and the expected content.
fn read_checked(dir: &Path, name: &str, want: &[u8]) {
    let data = std::fs::read(dir.join(name)).expect("read file");
    let crc: u32 = std::fs::read_to_string(dir.join(format!("{name}.crc")))
        .expect("read checksum")
        .trim()
        .parse()
        .expect("checksum parses");
    assert_eq!(crc32c::crc32c(&data), crc, "{name}: checksum mismatch");
    assert!(
        data == want,
        "{name}: content differs from what was written"
    );
}

/// The filesystem type mounted at `path` (the topmost mount), from /proc/mounts.
fn mounted_fs(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    let want = path.display().to_string();
    mounts.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(1) == Some(&want.as_str()))
            .then(|| f.get(2).map(|s| s.to_string()))
            .flatten()
    })
}

/// Size of the filesystem mounted at `path`, in bytes.
fn fs_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.display().to_string()).expect("path");
    // SAFETY: statvfs(3) writes into the zeroed struct we own; the path is a valid
    // NUL-terminated string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    assert_eq!(rc, 0, "statvfs {}", path.display());
    s.f_blocks * s.f_frsize
}

async fn write_files(dir: PathBuf, names: &[(&'static str, u64)]) {
    let names = names.to_vec();
    io("writing files", move || {
        for (name, seed) in names {
            write_checked(&dir, name, &content(seed, MIB as usize + seed as usize));
        }
    })
    .await
}

async fn read_files(dir: PathBuf, names: &[(&'static str, u64)]) {
    let names = names.to_vec();
    io("reading files", move || {
        for (name, seed) in names {
            read_checked(&dir, name, &content(seed, MIB as usize + seed as usize));
        }
    })
    .await
}

/// A node other than those in `not`.
fn other_node(nodes: &[String], not: &[&str]) -> String {
    nodes
        .iter()
        .find(|n| !not.contains(&n.as_str()))
        .cloned()
        .expect("a third node")
}

/// Deletes the claim and checks that the PV, the BlockVolume, its BlockReplicas and
/// the replicas' data directories on every node go.
async fn delete_and_check_freed(cluster: &TestCluster, pvc: &str, pv: &str, handle: &str) {
    let client = &cluster.client;
    let replicas: Vec<BlockReplica> = cluster.replicas(handle).await;
    assert!(
        !replicas.is_empty(),
        "the volume has replicas before deletion"
    );
    let dirs: Vec<PathBuf> = replicas
        .iter()
        .filter_map(|r| {
            let agent = cluster.agents.iter().find(|a| a.node == r.spec.node)?;
            Some(agent.data_dir.join(handle).join(&r.spec.replica_id))
        })
        .collect();
    assert!(
        dirs.iter().any(|d| d.exists()),
        "replica data directories exist before deletion: {dirs:?}"
    );
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
        .delete(pvc, &DeleteParams::default())
        .await
        .expect("delete PVC");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let vols: Api<BlockVolume> = Api::all(client.clone());
    let brs: Api<BlockReplica> = Api::all(client.clone());
    let of_volume = ListParams::default().labels(&format!("{}={handle}", api::LABEL_VOLUME));
    wait_for(
        "PV, BlockVolume, BlockReplicas and data gone",
        WAIT,
        || async {
            let pv_gone = matches!(pvs.get_opt(pv).await, Ok(None));
            let bv_gone = matches!(vols.get_opt(handle).await, Ok(None));
            let brs_gone = brs.list(&of_volume).await.is_ok_and(|l| l.items.is_empty());
            let data_gone = dirs.iter().all(|d| !d.exists());
            (pv_gone && bv_gone && brs_gone && data_gone).then_some(())
        },
    )
    .await
    .expect("everything of the volume is deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_volume_moves_grows_and_survives_replica_and_primary_loss() {
    let _serial = SERIAL.lock().await;
    let mut cluster = cluster().await;
    let client = cluster.client.clone();
    let nodes = cluster.options.nodes.clone();
    // xfs: growing a mounted ext4 needs CAP_SYS_RESOURCE, which root lacks on some
    // hosts (this one); xfs_growfs does not. mkfs.xfs wants at least 300 MB.
    storage_class(&client, "blockvol-r3", 3, "xfs").await;
    let pv = bound_claim(&client, "data", "blockvol-r3", "320Mi", false).await;
    let bv = in_sync(&client, &pv, 3).await;
    let first = primary_node(&bv);

    // Published on the primary's node: an xfs mount at the pod's path.
    let kubelet = cluster.kubelet(&first).expect("kubelet");
    let m = kubelet.mount(NS, "data", None).await.expect("mount");
    assert_eq!(m.presentation, Presentation::Filesystem("xfs".into()));
    assert_eq!(mounted_fs(&m.target_path).as_deref(), Some("xfs"));
    let files = [("a.bin", 1), ("b.bin", 7), ("c.bin", 4099)];
    write_files(m.target_path.clone(), &files).await;
    kubelet.unmount(NS, "data").await.expect("unmount");
    assert_eq!(mounted_fs(&m.target_path), None, "unpublished");
    assert_eq!(mounted_fs(&m.staging_path), None, "unstaged");

    // Moved to a node that does not hold the primary: IO is forwarded to it.
    let second = other_node(&nodes, &[&first]);
    let kubelet = cluster.kubelet(&second).expect("kubelet");
    let m = kubelet
        .mount(NS, "data", None)
        .await
        .expect("mount on a second node");
    assert_eq!(mounted_fs(&m.target_path).as_deref(), Some("xfs"));
    read_files(m.target_path.clone(), &files).await;
    assert_eq!(
        volume(&client, &pv)
            .await
            .status
            .and_then(|s| s.attached_to)
            .as_deref(),
        Some(second.as_str())
    );

    // Grown while mounted: csi-resizer grows the volume, NodeExpandVolume grows the
    // attached device and the mounted xfs; nothing is unmounted.
    let before = fs_bytes(&m.target_path);
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
        .patch(
            "data",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "448Mi"}}}})),
        )
        .await
        .expect("resize PVC");
    // Like the kubelet, retry NodeExpandVolume until the operator grew the replicas.
    let grown = wait_for("online node expansion", WAIT, || async {
        kubelet
            .expand(NS, "data")
            .await
            .inspect_err(|e| println!("node expansion not done yet: {e}"))
            .ok()
    })
    .await
    .expect("online node expansion");
    assert_eq!(
        mounted_fs(&m.target_path).as_deref(),
        Some("xfs"),
        "still mounted"
    );
    assert!(grown >= 448 * MIB, "device grew to {grown} bytes");
    let after = fs_bytes(&m.target_path);
    println!("filesystem grew from {before} to {after} bytes");
    assert!(after > before + 96 * MIB, "xfs grew: {before} -> {after}");
    read_files(m.target_path.clone(), &files).await;

    // The third node holds neither the primary nor the device: losing its agent
    // does not stop IO.
    let third = other_node(&nodes, &[&first, &second]);
    cluster.agent(&third).expect("agent").kill();
    let more = [("d.bin", 11)];
    write_files(m.target_path.clone(), &more).await;
    read_files(m.target_path.clone(), &files).await;
    cluster
        .agent(&third)
        .expect("agent")
        .restart()
        .expect("restart");
    in_sync(&client, &pv, 3).await;

    // The primary's agent dies while the device is on another node: a replica is
    // promoted and IO resumes with every acknowledged write intact.
    let old = volume(&client, &pv).await;
    let old_epoch = old.status.as_ref().map(|s| s.epoch).unwrap_or(0);
    let primary = primary_node(&old);
    assert_ne!(primary, second, "the device's node is not the primary");
    cluster.agent(&primary).expect("agent").kill();
    let promoted = wait_for("a new primary", WAIT, || async {
        let v = volume(&client, &pv).await;
        let s = v.status.as_ref()?;
        (s.epoch > old_epoch && s.primary_node.as_deref().is_some_and(|p| p != primary))
            .then(|| s.primary_node.clone())
            .flatten()
    })
    .await
    .expect("failover");
    println!("primary moved from {primary} to {promoted}");
    let after_failover = [("e.bin", 13)];
    write_files(m.target_path.clone(), &after_failover).await;
    read_files(m.target_path.clone(), &files).await;
    read_files(m.target_path.clone(), &more).await;
    cluster
        .agent(&primary)
        .expect("agent")
        .restart()
        .expect("restart");

    kubelet.unmount(NS, "data").await.expect("unmount");
    // Back on the old primary's node, everything written anywhere is there.
    let kubelet = cluster.kubelet(&primary).expect("kubelet");
    let m = kubelet.mount(NS, "data", None).await.expect("mount again");
    for set in [&files[..], &more[..], &after_failover[..]] {
        read_files(m.target_path.clone(), set).await;
    }
    kubelet.unmount(NS, "data").await.expect("unmount");

    let handle = m.volume_handle.clone();
    delete_and_check_freed(&cluster, "data", &pv, &handle).await;
}

/// Raw bytes written at scattered, non-overlapping offsets of a volumeMode Block claim
/// (the first and last 64 KiB, and two unaligned to a MiB).
fn block_pattern() -> Vec<(u64, Vec<u8>)> {
    [0u64, MIB + 4096, 3 * MIB + 512 * 8, 32 * MIB - 64 * 1024]
        .iter()
        .enumerate()
        .map(|(i, off)| (*off, content(i as u64 + 101, 64 * 1024)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_keeps_raw_bytes_across_nodes_and_is_freed_on_delete() {
    let _serial = SERIAL.lock().await;
    let cluster = cluster().await;
    let client = cluster.client.clone();
    let nodes = cluster.options.nodes.clone();
    storage_class(&client, "blockvol-r2", 2, "ext4").await;
    let pv = bound_claim(&client, "raw", "blockvol-r2", "32Mi", true).await;
    let bv = in_sync(&client, &pv, 2).await;
    let first = primary_node(&bv);

    let kubelet = cluster.kubelet(&first).expect("kubelet");
    let m = kubelet.mount(NS, "raw", None).await.expect("publish block");
    assert_eq!(m.presentation, Presentation::Block);
    let dev = m.target_path.clone();
    let meta = std::fs::metadata(&dev).expect("target exists");
    assert!(
        meta.file_type().is_block_device(),
        "{} is a block device",
        dev.display()
    );
    let pattern = block_pattern();
    let (d, p) = (dev.clone(), pattern.clone());
    io("raw writes", move || {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&d)
            .expect("open device");
        for (off, bytes) in &p {
            f.seek(SeekFrom::Start(*off)).expect("seek");
            f.write_all(bytes).expect("write");
        }
        f.sync_all().expect("fsync device");
    })
    .await;
    kubelet.unmount(NS, "raw").await.expect("unpublish");
    assert!(!dev.exists(), "the target is removed on unpublish");

    // Another node: with two replicas the third node holds none, so all IO is
    // forwarded to the primary.
    let holders: Vec<String> = cluster
        .replicas(&pv)
        .await
        .iter()
        .map(|r| r.spec.node.clone())
        .collect();
    let nonholder = nodes.iter().find(|n| !holders.contains(n)).cloned();
    let second = nonholder.unwrap_or_else(|| other_node(&nodes, &[&first]));
    let kubelet = cluster.kubelet(&second).expect("kubelet");
    let m = kubelet
        .mount(NS, "raw", None)
        .await
        .expect("publish on another node");
    let d = m.target_path.clone();
    io("raw reads", move || {
        let mut f = std::fs::File::open(&d).expect("open device");
        for (off, want) in &pattern {
            let mut got = vec![0u8; want.len()];
            f.seek(SeekFrom::Start(*off)).expect("seek");
            f.read_exact(&mut got).expect("read");
            let first_diff = got.iter().zip(want).position(|(g, w)| g != w);
            assert_eq!(first_diff, None, "bytes written at offset {off} differ");
        }
        let size = f.seek(SeekFrom::End(0)).expect("size");
        assert_eq!(size, 32 * MIB, "device size");
    })
    .await;
    kubelet.unmount(NS, "raw").await.expect("unpublish");

    let handle = m.volume_handle.clone();
    delete_and_check_freed(&cluster, "raw", &pv, &handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_plugin_refuses_bad_paths_and_unknown_volumes_and_creates_nothing() {
    use csi::csi_proto::{
        NodePublishVolumeRequest, NodeStageVolumeRequest, VolumeCapability,
        volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode},
    };
    let _serial = SERIAL.lock().await;
    let cluster = cluster().await;
    let node = cluster.options.nodes[0].clone();
    let kubelet = cluster.kubelet(&node).expect("kubelet");
    let mut plugin = kubelet.node_client().expect("client");
    let cap = VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
    };
    let outside = cluster.root.path().join("outside-kubelet");
    let inside = kubelet.staging_path("pv-unknown", false);
    let target = kubelet.target_path("pv-unknown", false);
    let cases: Vec<(&str, NodeStageVolumeRequest, tonic::Code)> = vec![
        (
            "staging path outside the kubelet directory",
            NodeStageVolumeRequest {
                volume_id: "pvc-anything".into(),
                staging_target_path: outside.join("globalmount").display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            "staging path with ..",
            NodeStageVolumeRequest {
                volume_id: "pvc-anything".into(),
                staging_target_path: format!("{}/../../escape", inside.display()),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
        ),
        (
            "unknown volume",
            NodeStageVolumeRequest {
                volume_id: "pvc-does-not-exist".into(),
                staging_target_path: inside.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
            tonic::Code::NotFound,
        ),
        (
            "no capability",
            NodeStageVolumeRequest {
                volume_id: "pvc-does-not-exist".into(),
                staging_target_path: inside.display().to_string(),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
        ),
    ];
    for (what, req, code) in cases {
        let status = plugin.node_stage_volume(req).await.expect_err(what);
        println!("{what}: {:?} {}", status.code(), status.message());
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(!status.message().is_empty(), "{what}: the error says why");
    }
    let status = plugin
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: "pvc-does-not-exist".into(),
            staging_target_path: inside.display().to_string(),
            target_path: "/etc/blockvol-must-not-exist".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect_err("publish outside the kubelet directory");
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "{}",
        status.message()
    );
    let status = plugin
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: "pvc-does-not-exist".into(),
            staging_target_path: inside.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await
        .expect_err("publish of a volume never staged");
    assert_eq!(
        status.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        status.message()
    );

    // Nothing was made: no paths, no mounts, no attachment on the agent.
    for p in [
        &outside,
        &inside,
        &target,
        &PathBuf::from("/etc/blockvol-must-not-exist"),
    ] {
        assert!(!p.exists(), "{} was not created", p.display());
    }
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    let root = cluster.root.path().display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&root)),
        "no mount under the cluster directory"
    );
}
