//! Node service over real unix-socket gRPC, against a node agent that attaches loop
//! devices: stage formats and mounts for real, publish bind-mounts, data written
//! through the pod's path survives unstage and re-stage. Needs root and loop devices.

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{
    LoopAgent, Served, is_mounted, serve_agent, serve_csi, unmount_all_under, wait_for_socket,
};
use csi::agent::{AgentSettings, unix_channel};
use csi::csi_proto::node_client::NodeClient;
use csi::csi_proto::volume_capability::access_mode::Mode;
use csi::csi_proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi::csi_proto::*;
use csi::identity::IdentityService;
use csi::mount::CommandSettings;
use csi::node::{NodeService, NodeSettings};
use csi::server::Services;
use tonic::Code;
use tonic::transport::Channel;

const VOLUME_BYTES: u64 = 64 << 20;

/// A node plugin and its fake agent, each on its own unix socket under a temp dir.
/// Field order is drop order: servers stop, mounts go, loop devices go, dir goes.
struct Harness {
    client: NodeClient<Channel>,
    _csi: Served,
    _agent_server: Served,
    agent: Arc<LoopAgent>,
    dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        unmount_all_under(self.dir.path());
        self.agent.detach_all();
    }
}

impl Harness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = Arc::new(LoopAgent::new(dir.path(), VOLUME_BYTES));
        let agent_socket = dir.path().join("agent.sock");
        let agent_server = serve_agent(Arc::clone(&agent), &agent_socket);
        let node = NodeService::new(NodeSettings {
            node_id: "node-a".into(),
            agent: AgentSettings {
                socket_path: agent_socket.clone(),
                agent_call_timeout_ms: 30_000,
            },
            commands: CommandSettings::default(),
            kubelet_dir: None,
        })
        .expect("node service");
        let csi_socket = dir.path().join("csi.sock");
        let csi = serve_csi(
            Services {
                identity: IdentityService::new(false),
                controller: None,
                node: Some(node),
            },
            &csi_socket,
        );
        wait_for_socket(&agent_socket).await;
        wait_for_socket(&csi_socket).await;
        let channel = unix_channel(&csi_socket, Duration::from_secs(60)).expect("channel");
        Harness {
            client: NodeClient::new(channel),
            _csi: csi,
            _agent_server: agent_server,
            agent,
            dir,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn client(&self) -> NodeClient<Channel> {
        self.client.clone()
    }
}

fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn stage_req(volume: &str, staging: &Path, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn publish_req(
    volume: &str,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

fn unpublish_req(volume: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.to_string_lossy().into(),
    }
}

fn unstage_req(volume: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.to_string_lossy().into(),
    }
}

fn blkid_type(device: &str) -> Option<String> {
    let out = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", device])
        .output()
        .ok()?;
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!t.is_empty()).then_some(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_volume_is_formatted_once_and_keeps_data_across_restage() {
    let h = Harness::start().await;
    let mut c = h.client();
    let (staging, target) = (h.path("staging/vol-fs"), h.path("pods/p1/volume"));
    std::fs::create_dir_all(&staging).unwrap();
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);

    c.node_stage_volume(stage_req("vol-fs", &staging, cap.clone()))
        .await
        .expect("stage");
    let device = h
        .agent
        .attached("vol-fs")
        .expect("agent attached it")
        .device;
    assert_eq!(blkid_type(&device).as_deref(), Some("ext4"));
    let m = csi::mount::mount_at(&staging)
        .unwrap()
        .expect("staging mounted");
    assert_eq!(m.fs_type, "ext4");
    assert_eq!(m.source, device);
    // A second stage is a no-op success.
    c.node_stage_volume(stage_req("vol-fs", &staging, cap.clone()))
        .await
        .expect("stage again");

    c.node_publish_volume(publish_req("vol-fs", &staging, &target, cap.clone(), false))
        .await
        .expect("publish");
    c.node_publish_volume(publish_req("vol-fs", &staging, &target, cap.clone(), false))
        .await
        .expect("publish again");
    std::fs::write(target.join("hello.txt"), b"kept across restage").expect("write via pod path");
    assert_eq!(
        std::fs::read(staging.join("hello.txt")).unwrap(),
        b"kept across restage",
        "pod path and staging path are the same filesystem"
    );

    let stats = c
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "vol-fs".into(),
            volume_path: target.to_string_lossy().into(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .expect("bytes usage");
    assert!(
        bytes.total > 0 && bytes.total <= VOLUME_BYTES as i64,
        "{bytes:?}"
    );
    assert!(bytes.used > 0 && bytes.available > 0, "{bytes:?}");
    assert!(
        stats
            .usage
            .iter()
            .any(|u| u.unit == volume_usage::Unit::Inodes as i32 && u.total > 0)
    );
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));

    c.node_unpublish_volume(unpublish_req("vol-fs", &target))
        .await
        .expect("unpublish");
    assert!(!is_mounted(&target));
    assert!(!target.exists(), "target dir removed");
    c.node_unpublish_volume(unpublish_req("vol-fs", &target))
        .await
        .expect("unpublish of a missing target is fine");
    c.node_unstage_volume(unstage_req("vol-fs", &staging))
        .await
        .expect("unstage");
    assert!(!is_mounted(&staging));
    assert_eq!(h.agent.attached_count(), 0, "unstage detached the device");
    c.node_unstage_volume(unstage_req("vol-fs", &staging))
        .await
        .expect("unstage again");

    // Re-stage: the existing filesystem is found and mounted, not re-made.
    c.node_stage_volume(stage_req("vol-fs", &staging, cap.clone()))
        .await
        .expect("re-stage");
    c.node_publish_volume(publish_req("vol-fs", &staging, &target, cap.clone(), false))
        .await
        .expect("re-publish");
    assert_eq!(
        std::fs::read(target.join("hello.txt")).expect("file survived"),
        b"kept across restage"
    );
    c.node_unpublish_volume(unpublish_req("vol-fs", &target))
        .await
        .unwrap();
    c.node_unstage_volume(unstage_req("vol-fs", &staging))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_publish_refuses_writes() {
    let h = Harness::start().await;
    let mut c = h.client();
    let (staging, target) = (h.path("staging/vol-ro"), h.path("pods/p2/volume"));
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    c.node_stage_volume(stage_req("vol-ro", &staging, cap.clone()))
        .await
        .unwrap();
    c.node_publish_volume(publish_req("vol-ro", &staging, &target, cap, true))
        .await
        .unwrap();
    let err = std::fs::write(target.join("x"), b"x").expect_err("read-only mount");
    assert_eq!(err.raw_os_error(), Some(30), "EROFS, got {err}");
    c.node_unpublish_volume(unpublish_req("vol-ro", &target))
        .await
        .unwrap();
    c.node_unstage_volume(unstage_req("vol-ro", &staging))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volume_target_is_the_device() {
    let h = Harness::start().await;
    let mut c = h.client();
    let (staging, target) = (h.path("staging/vol-blk"), h.path("pods/p3/dev/vol"));
    std::fs::create_dir_all(&staging).unwrap();
    c.node_stage_volume(stage_req("vol-blk", &staging, block_cap()))
        .await
        .expect("stage");
    c.node_stage_volume(stage_req("vol-blk", &staging, block_cap()))
        .await
        .expect("stage again");
    c.node_publish_volume(publish_req(
        "vol-blk",
        &staging,
        &target,
        block_cap(),
        false,
    ))
    .await
    .expect("publish");
    let meta = std::fs::metadata(&target).unwrap();
    assert!(
        meta.file_type().is_block_device(),
        "target is a block device node"
    );

    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    {
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        dev.seek(SeekFrom::Start(1 << 20)).unwrap();
        dev.write_all(&pattern).unwrap();
        dev.sync_all().unwrap();
    }
    let stats = c
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "vol-blk".into(),
            volume_path: target.to_string_lossy().into(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(
        stats.usage.first().map(|u| u.total),
        Some(VOLUME_BYTES as i64)
    );

    c.node_unpublish_volume(unpublish_req("vol-blk", &target))
        .await
        .unwrap();
    assert!(!target.exists());
    c.node_unstage_volume(unstage_req("vol-blk", &staging))
        .await
        .unwrap();
    assert_eq!(h.agent.attached_count(), 0);
    assert!(!staging.join(csi::node::BLOCK_STAGE_FILE).exists());

    // The bytes went to the volume's backing store.
    let mut backing = std::fs::File::open(h.agent.backing_file("vol-blk")).unwrap();
    backing.seek(SeekFrom::Start(1 << 20)).unwrap();
    let mut read = vec![0u8; pattern.len()];
    backing.read_exact(&mut read).unwrap();
    assert_eq!(read, pattern);
}

/// xfs, because growing a mounted ext4 needs CAP_SYS_RESOURCE, which the test
/// machines' root lacks; xfs_growfs needs only CAP_SYS_ADMIN. mkfs.xfs wants 300 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_grows_the_mounted_filesystem() {
    const XFS_BYTES: u64 = 320 << 20;
    let h = Harness::start().await;
    h.agent.set_size("vol-grow", XFS_BYTES);
    let mut c = h.client();
    let (staging, target) = (h.path("staging/vol-grow"), h.path("pods/p4/volume"));
    let cap = mount_cap("xfs", Mode::SingleNodeWriter);
    c.node_stage_volume(stage_req("vol-grow", &staging, cap.clone()))
        .await
        .expect("stage");
    c.node_publish_volume(publish_req(
        "vol-grow",
        &staging,
        &target,
        cap.clone(),
        false,
    ))
    .await
    .expect("publish");
    std::fs::write(target.join("before-grow"), b"still here").unwrap();
    let before = rustix::fs::statvfs(&target).unwrap();
    let new_size = 2 * XFS_BYTES;
    let reply = c
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "vol-grow".into(),
            volume_path: target.to_string_lossy().into(),
            capacity_range: Some(CapacityRange {
                required_bytes: new_size as i64,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap),
            ..Default::default()
        })
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(reply.capacity_bytes, new_size as i64);
    let after = rustix::fs::statvfs(&target).unwrap();
    let (b, a) = (
        before.f_blocks * before.f_frsize,
        after.f_blocks * after.f_frsize,
    );
    assert!(a > b + XFS_BYTES / 2, "filesystem grew: {b} -> {a} bytes");
    assert_eq!(
        std::fs::read(target.join("before-grow")).unwrap(),
        b"still here"
    );
    c.node_unpublish_volume(unpublish_req("vol-grow", &target))
        .await
        .unwrap();
    c.node_unstage_volume(unstage_req("vol-grow", &staging))
        .await
        .unwrap();
}

/// An ext4 volume expanded while detached (the controller grew it, no node had it):
/// the next stage grows the filesystem before mounting it, offline, which needs no
/// CAP_SYS_RESOURCE (growing a mounted ext4 does, and the test machines' root lacks
/// it, so NodeExpandVolume alone cannot grow it there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_grows_an_ext4_expanded_while_detached() {
    let h = Harness::start().await;
    let mut c = h.client();
    let staging = h.path("staging/vol-ext4grow");
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    c.node_stage_volume(stage_req("vol-ext4grow", &staging, cap.clone()))
        .await
        .expect("stage");
    std::fs::write(staging.join("before-grow"), b"still here").unwrap();
    let before = rustix::fs::statvfs(&staging).unwrap();
    c.node_unstage_volume(unstage_req("vol-ext4grow", &staging))
        .await
        .unwrap();
    assert_eq!(h.agent.attached_count(), 0);

    std::fs::OpenOptions::new()
        .write(true)
        .open(h.agent.backing_file("vol-ext4grow"))
        .unwrap()
        .set_len(2 * VOLUME_BYTES)
        .unwrap();
    c.node_stage_volume(stage_req("vol-ext4grow", &staging, cap))
        .await
        .expect("stage after the expansion");
    let after = rustix::fs::statvfs(&staging).unwrap();
    let (b, a) = (
        before.f_blocks * before.f_frsize,
        after.f_blocks * after.f_frsize,
    );
    assert!(
        a > b + VOLUME_BYTES / 2,
        "the filesystem fills the expanded device: {b} -> {a} bytes"
    );
    assert_eq!(
        std::fs::read(staging.join("before-grow")).unwrap(),
        b"still here"
    );
    c.node_unstage_volume(unstage_req("vol-ext4grow", &staging))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_refuses_to_format_a_device_holding_unknown_data() {
    let h = Harness::start().await;
    let mut c = h.client();
    let file = h.agent.backing_file("vol-data");
    {
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(VOLUME_BYTES).unwrap();
        let mut f = f;
        f.seek(SeekFrom::Start(8192)).unwrap();
        f.write_all(b"somebody's raw data").unwrap();
    }
    let staging = h.path("staging/vol-data");
    let err = c
        .node_stage_volume(stage_req(
            "vol-data",
            &staging,
            mount_cap("ext4", Mode::SingleNodeWriter),
        ))
        .await
        .expect_err("must not format over data");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("refusing"), "{}", err.message());
    assert!(!is_mounted(&staging));
    let mut buf = vec![0u8; 19];
    let mut f = std::fs::File::open(&file).unwrap();
    f.seek(SeekFrom::Start(8192)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"somebody's raw data");
    c.node_unstage_volume(unstage_req("vol-data", &staging))
        .await
        .unwrap();
    assert_eq!(h.agent.attached_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_the_field_named() {
    let h = Harness::start().await;
    let mut c = h.client();
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let staging = h.path("staging/v");
    let cases: Vec<(NodeStageVolumeRequest, &str)> = vec![
        (stage_req("", &staging, cap.clone()), "volume_id"),
        (
            stage_req("v", Path::new("relative/staging"), cap.clone()),
            "staging_target_path",
        ),
        (
            stage_req("v", Path::new("/tmp/../etc"), cap.clone()),
            "staging_target_path",
        ),
        (
            NodeStageVolumeRequest {
                volume_capability: None,
                ..stage_req("v", &staging, cap.clone())
            },
            "volume_capability",
        ),
        (
            stage_req("v", &staging, mount_cap("ext4", Mode::MultiNodeMultiWriter)),
            "MULTI_NODE_MULTI_WRITER",
        ),
        (
            stage_req("v", &staging, mount_cap("btrfs", Mode::SingleNodeWriter)),
            "fs_type",
        ),
    ];
    for (req, field) in cases {
        let err = c.node_stage_volume(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert_eq!(
        h.agent.attached_count(),
        0,
        "nothing attached for bad requests"
    );

    let target = h.path("pods/x/volume");
    let err = c
        .node_publish_volume(publish_req("v", &staging, &target, cap.clone(), false))
        .await
        .expect_err("publish before stage");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .node_publish_volume(publish_req("v", &staging, Path::new("x/../y"), cap, false))
        .await
        .expect_err("relative target");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "v".into(),
            volume_path: h.path("nowhere").to_string_lossy().into(),
            ..Default::default()
        })
        .await
        .expect_err("missing path");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stage_of_the_same_volume_is_aborted() {
    let h = Harness::start().await;
    let gate = Arc::new(tokio::sync::Notify::new());
    *h.agent.attach_gate.lock().unwrap() = Some(Arc::clone(&gate));
    let staging = h.path("staging/vol-busy");
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let mut first_client = h.client();
    let first_req = stage_req("vol-busy", &staging, cap.clone());
    let first = tokio::spawn(async move { first_client.node_stage_volume(first_req).await });
    // The first call is inside the agent's Attach, holding the volume's guard.
    tokio::time::timeout(Duration::from_secs(10), h.agent.attach_entered.notified())
        .await
        .expect("first stage reached the agent");
    let err = h
        .client()
        .node_stage_volume(stage_req("vol-busy", &staging, cap.clone()))
        .await
        .expect_err("second call while the first runs");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    // Another volume is not blocked by it.
    let other = h
        .client()
        .node_unstage_volume(unstage_req("vol-other", &h.path("staging/vol-other")))
        .await;
    assert!(other.is_ok(), "{other:?}");
    *h.agent.attach_gate.lock().unwrap() = None;
    gate.notify_one();
    first.await.unwrap().expect("first stage completes");
    h.client()
        .node_unstage_volume(unstage_req("vol-busy", &staging))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_info_reports_the_node_topology_and_capabilities() {
    let h = Harness::start().await;
    let mut c = h.client();
    let info = c
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    assert_eq!(
        info.accessible_topology.map(|t| t.segments),
        Some(HashMap::from([(
            api::TOPOLOGY_NODE_KEY.to_string(),
            "node-a".to_string()
        )]))
    );
    let caps = c
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use node_service_capability::rpc::Type;
    let have: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        Type::StageUnstageVolume,
        Type::GetVolumeStats,
        Type::ExpandVolume,
        Type::VolumeCondition,
    ] {
        assert!(have.contains(&(want as i32)), "{want:?} advertised");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_writer_volume_is_published_at_one_target_only() {
    let h = Harness::start().await;
    let mut c = h.client();
    let staging = h.path("staging/vol-once");
    let (first, second) = (h.path("pods/a/volume"), h.path("pods/b/volume"));
    let cap = mount_cap("ext4", Mode::SingleNodeSingleWriter);
    c.node_stage_volume(stage_req("vol-once", &staging, cap.clone()))
        .await
        .unwrap();
    c.node_publish_volume(publish_req(
        "vol-once",
        &staging,
        &first,
        cap.clone(),
        false,
    ))
    .await
    .expect("first target");
    c.node_publish_volume(publish_req(
        "vol-once",
        &staging,
        &first,
        cap.clone(),
        false,
    ))
    .await
    .expect("same target again");
    let err = c
        .node_publish_volume(publish_req(
            "vol-once",
            &staging,
            &second,
            cap.clone(),
            false,
        ))
        .await
        .expect_err("second target");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(!is_mounted(&second));
    c.node_unpublish_volume(unpublish_req("vol-once", &first))
        .await
        .unwrap();
    c.node_publish_volume(publish_req("vol-once", &staging, &second, cap, false))
        .await
        .expect("free once the first is unpublished");
    c.node_unpublish_volume(unpublish_req("vol-once", &second))
        .await
        .unwrap();
    c.node_unstage_volume(unstage_req("vol-once", &staging))
        .await
        .unwrap();
}
