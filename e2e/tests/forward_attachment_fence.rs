//! Forwarded IO is accepted only from the node a volume is attached to, with real agents
//! and an operator. An RF 1 volume lives on one node; the two other nodes (A and B) each
//! get a forwarding export of it through the agent's Attach. The attachment is recorded
//! the way ControllerPublish records it: the BlockVolume's attached-node annotation.
//! Attached to A: A's writes land and B's are refused. Then A is force-detached and B
//! attached (the annotation moves, A's export stays): B's writes land and read back, and
//! A's writes are refused, so nothing A sends after the move reaches the volume.
//!
//! The exports are driven with `qemu-io` on the agents' forwarding sockets, without the
//! attach proxy in between (it would retry an EIO until its own deadline).

use std::process::Command;
use std::time::Duration;

use api::BlockVolume;
use e2e::cluster::{TestCluster, TestClusterOptions, wait_for};
use e2e::devices::LoopDevice;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

const VOLUME: &str = "fence-vol";
const TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `qemu-io` commands on `uri`; returns whether every command succeeded, and the
/// output.
fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = c.arg(uri).output().expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = text.contains("failed") || text.contains("error");
    (out.status.success() && !failed, text)
}

async fn attach_to(c: &TestCluster, node: &str) {
    Api::<BlockVolume>::all(c.client.clone())
        .patch(
            VOLUME,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {api::ANNOTATION_ATTACHED_NODE: node}}}),
            ),
        )
        .await
        .expect("record the attachment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_writes_are_accepted_only_from_the_attached_node() {
    let mut c = TestCluster::start(TestClusterOptions::nodes(3))
        .await
        .expect("cluster");
    let v = c
        .create_ready_volume(VOLUME, "64Mi", 1, TIMEOUT)
        .await
        .expect("volume ready");
    let primary = v.status.and_then(|s| s.primary_node).expect("primary node");
    let others: Vec<String> = ["node-1", "node-2", "node-3"]
        .into_iter()
        .filter(|n| *n != primary)
        .map(String::from)
        .collect();
    let (a, b) = (others[0].clone(), others[1].clone());
    let (agent_a, agent_b) = (
        c.agent(&a).expect("agent").attach_client(),
        c.agent(&b).expect("agent").attach_client(),
    );
    let _dev_a = LoopDevice {
        path: agent_a
            .attach(VOLUME, false)
            .await
            .expect("attach on A")
            .device_path,
    };
    let _dev_b = LoopDevice {
        path: agent_b
            .attach(VOLUME, false)
            .await
            .expect("attach on B")
            .device_path,
    };
    let uri_a = c.agent(&a).unwrap().forward_uri(VOLUME);
    let uri_b = c.agent(&b).unwrap().forward_uri(VOLUME);

    attach_to(&c, &a).await;
    let (ok, out) = qemu_io(&uri_a, &["write -P 0xa1 0 4k", "flush"]);
    assert!(ok, "the attached node A could not write: {out}");
    let (ok, out) = qemu_io(&uri_b, &["write -P 0xb1 4k 4k"]);
    assert!(!ok, "B wrote while the volume is attached to A: {out}");

    // Force-detach A, attach B. A keeps its export and keeps sending.
    attach_to(&c, &b).await;
    wait_for("B's writes accepted", TIMEOUT, || async {
        qemu_io(&uri_b, &["write -P 0xb2 0 4k", "flush"])
            .0
            .then_some(())
    })
    .await
    .expect("B writes once attached");
    for i in 0..20u64 {
        let (ok, out) = qemu_io(&uri_a, &[&format!("write -P 0xa2 {} 4k", (i % 4) * 4096)]);
        assert!(!ok, "A wrote after the volume moved to B: {out}");
    }
    let (ok, out) = qemu_io(&uri_b, &["read -P 0xb2 0 4k", "read -P 0 4k 12k"]);
    assert!(ok, "B does not read back its own write only: {out}");

    agent_a.detach(VOLUME).await.expect("detach on A");
    agent_b.detach(VOLUME).await.expect("detach on B");
}
