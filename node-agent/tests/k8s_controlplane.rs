//! The node agent's Kubernetes side against a real kube-apiserver, with the in-memory
//! replica runtime standing in for the engine: registration, Lease renewal, the replica
//! loop (status, finalizer, refusal of unsafe names) and deletion. Every wait is a
//! bounded poll of a condition.

use std::sync::Arc;

use api::{BlockNode, BlockReplica, BlockReplicaSpec, Durability, ReplicaRole, ReplicaState};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use node_agent::k8s::{
    AgentContext, LeaseRenewer, LeaseSettings, NodeHealth, NodeRegistration, ReplicaSettings,
    run_replicas,
};
use node_agent::replicas::InMemoryRuntime;
use serde_json::json;
use testkit::{ControlPlane, Task, Wait};

const NS: &str = "blockvol-system";
const WAIT_TIMEOUT_MS: u64 = 60_000;
const POLL_MS: u64 = 100;

const WAIT: Wait = Wait::millis(WAIT_TIMEOUT_MS, POLL_MS);

async fn start() -> (ControlPlane, Client) {
    testkit::apiserver::start(NS).await
}

fn replica(
    name: &str,
    volume: &str,
    node: &str,
    role: ReplicaRole,
    epoch: u64,
) -> serde_json::Value {
    let spec = BlockReplicaSpec {
        pvc: None,
        volume: volume.into(),
        replica_id: name.into(),
        node: node.into(),
        role,
        epoch,
        size_bytes: 1 << 24,
        block_size: 4096,
        durability: Durability::SyncAll,
        peers: vec![],
        in_sync_set: vec![name.into()],
        in_sync_set_generation: 1,
    };
    // A label value cannot hold a path; the spec field can, and that is what is attacked.
    let label = if volume.contains('/') {
        "unsafe"
    } else {
        volume
    };
    json!({
        "apiVersion": "blockvol.io/v1alpha1",
        "kind": "BlockReplica",
        "metadata": {"name": name, "labels": {api::LABEL_NODE: node, api::LABEL_VOLUME: label}},
        "spec": spec,
    })
}

async fn put(client: &Client, body: serde_json::Value) {
    let name = body["metadata"]["name"].as_str().unwrap().to_string();
    Api::<BlockReplica>::all(client.clone())
        .patch(
            &name,
            &PatchParams::apply(api::FIELD_MANAGER_OPERATOR).force(),
            &Patch::Apply(&body),
        )
        .await
        .expect("apply replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_registers_renews_runs_and_deletes_replicas() {
    let (_cp, client) = start().await;
    let data = tempfile::tempdir().unwrap();

    // Registration: the BlockNode carries the address and real disk numbers.
    let reg = NodeRegistration {
        node_name: "n1".into(),
        data_address: "10.9.0.1:7400".into(),
        data_dir: data.path().to_path_buf(),
        topology: [("topology.kubernetes.io/zone".to_string(), "z1".to_string())].into(),
        agent_version: "test".into(),
    };
    let health = NodeHealth {
        promised_bytes: 1 << 20,
        replicas: 3,
        lease_renewing: true,
    };
    let st = reg.apply(&client, health).await.expect("register");
    assert!(st.capacity_bytes > 0 && st.allocatable_bytes <= st.capacity_bytes - (1 << 20));
    assert_eq!(st.replicas, 3);
    assert_eq!(
        st.capacity.as_deref(),
        Some(api::format_bytes_binary(st.capacity_bytes).as_str())
    );
    assert_eq!(
        st.free.as_deref(),
        Some(api::format_bytes_binary(st.allocatable_bytes).as_str())
    );
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AgentReady")
    );
    let node = Api::<BlockNode>::all(client.clone())
        .get("n1")
        .await
        .unwrap();
    assert_eq!(node.spec.data_address, "10.9.0.1:7400");
    assert_eq!(node.status.unwrap().agent_version.as_deref(), Some("test"));
    let wildcard = NodeRegistration {
        data_address: "0.0.0.0:7400".into(),
        ..reg.clone()
    };
    assert!(
        wildcard
            .apply(&client, NodeHealth::default())
            .await
            .is_err(),
        "a wildcard address is refused before any write"
    );

    // Lease: renewed repeatedly.
    let mut ls = LeaseSettings::new(NS, "n1");
    ls.renew_interval_ms = 200;
    let renewer = Arc::new(LeaseRenewer::new(client.clone(), ls));
    let r2 = renewer.clone();
    let _lease = Task(tokio::spawn(async move { r2.run().await }));
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let first = WAIT
        .expect("lease created", || async {
            leases
                .get_opt("n1")
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.renew_time)
        })
        .await;
    WAIT.expect("lease renewed", || async {
        let t = leases
            .get_opt("n1")
            .await
            .ok()
            .flatten()?
            .spec?
            .renew_time?;
        (t.0 > first.0).then_some(())
    })
    .await;
    // The first renewal of a process follows an unknown gap: the IO fence stays shut
    // until the assignments were re-read (the agent does that; here the test confirms).
    let lapse = renewer
        .unconfirmed_lapse()
        .expect("the first renewal latches the fence");
    assert!(!renewer.is_fresh());
    renewer.confirm(lapse);
    assert!(renewer.is_fresh());

    // Replica loop.
    let runtime = Arc::new(InMemoryRuntime::new());
    let ctx = Arc::new(AgentContext::new(
        client.clone(),
        ReplicaSettings {
            node_name: "n1".into(),
            data_dir: data.path().to_path_buf(),
            status_interval_ms: 500,
            error_retry_ms: 200,
        },
        runtime.clone(),
    ));
    let _loop = Task(tokio::spawn(run_replicas(
        ctx.clone(),
        std::future::pending(),
    )));
    let replicas: Api<BlockReplica> = Api::all(client.clone());
    put(
        &client,
        replica("vol1-r1", "vol1", "n1", ReplicaRole::Primary, 1),
    )
    .await;
    put(
        &client,
        replica("vol1-other", "vol1", "n2", ReplicaRole::Replica, 1),
    )
    .await;
    let r = WAIT
        .expect("status reported", || async {
            let r = replicas.get("vol1-r1").await.ok()?;
            r.status
                .as_ref()
                .filter(|s| s.state == ReplicaState::Serving && s.epoch == 1)
                .map(|_| r.clone())
        })
        .await;
    assert!(r.finalizers().iter().any(|f| f == api::FINALIZER_REPLICA));
    let st = r.status.unwrap();
    assert_eq!(
        (st.role, st.size_bytes, st.observed_generation),
        (
            Some(ReplicaRole::Primary),
            Some(1 << 24),
            r.metadata.generation
        )
    );
    let a = runtime.assignment("vol1-r1").unwrap();
    assert_eq!(a.dir, data.path().join("vol1").join("vol1-r1"));
    assert_eq!(ctx.promised_bytes(), 1 << 24);
    let other = replicas.get("vol1-other").await.unwrap();
    assert!(
        other.status.is_none() && other.finalizers().is_empty(),
        "another node's replica is not touched"
    );

    // A new epoch and role reach the runtime.
    put(
        &client,
        replica("vol1-r1", "vol1", "n1", ReplicaRole::Replica, 2),
    )
    .await;
    WAIT.expect("epoch 2 applied and reported", || async {
        let s = replicas.get("vol1-r1").await.ok()?.status?;
        (s.epoch == 2 && s.role == Some(ReplicaRole::Replica) && s.state == ReplicaState::InSync)
            .then_some(())
    })
    .await;

    // Unsafe names are refused with a Failed status; the runtime never sees them.
    put(
        &client,
        replica("evil", "../../etc", "n1", ReplicaRole::Replica, 1),
    )
    .await;
    let st = WAIT
        .expect("unsafe replica refused", || async {
            replicas
                .get("evil")
                .await
                .ok()?
                .status
                .filter(|s| s.state == ReplicaState::Failed)
        })
        .await;
    let msg = st.last_error.unwrap_or_default();
    assert!(
        msg.contains("spec.volume") && msg.contains("../../etc"),
        "{msg}"
    );
    assert!(
        !runtime.calls().iter().any(|c| c.ends_with(" evil")),
        "{:?}",
        runtime.calls()
    );

    // Deletion: the runtime deletes the data, then the finalizer goes and the object with it.
    replicas
        .delete("vol1-r1", &DeleteParams::default())
        .await
        .unwrap();
    replicas
        .delete("evil", &DeleteParams::default())
        .await
        .unwrap();
    WAIT.expect("replicas gone", || async {
        let a = replicas.get_opt("vol1-r1").await.ok()?;
        let b = replicas.get_opt("evil").await.ok()?;
        (a.is_none() && b.is_none()).then_some(())
    })
    .await;
    assert!(runtime.calls().contains(&"delete vol1-r1".to_string()));
    assert!(runtime.replica_ids().is_empty());
    assert_eq!(ctx.promised_bytes(), 0);
}
