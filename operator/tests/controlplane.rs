//! The operator against a real kube-apiserver: the test plays three node agents (it
//! registers BlockNodes, renews their Leases and writes BlockReplica status) and checks
//! placement, the in-sync set commits, promotion, expansion, deletion and leader
//! election through the API only. Every wait is a bounded poll of a condition.

use std::collections::BTreeMap;
use std::sync::Arc;

use api::{
    BlockReplica, BlockReplicaStatus, BlockVolume, PeerStatus, ReplicaRole, ReplicaState,
    VolumePhase,
};
use e2e::in_process::{InProcessOperator, test_settings};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use operator::{Context, ControllerSettings, Metrics};
use serde_json::json;
use testkit::agent::FakeAgent;
use testkit::{ControlPlane, Task, Wait};

const NS: &str = "blockvol-system";
/// Longest any single expectation may take.
const WAIT_TIMEOUT_MS: u64 = 60_000;
const POLL_MS: u64 = 100;
/// Node agent Lease duration the simulated agents use.
const NODE_LEASE_S: i32 = 2;
/// How often the simulated agents renew their Leases.
const LEASE_RENEW_MS: u64 = 300;
const MI: u64 = 1 << 20;

const WAIT: Wait = Wait::millis(WAIT_TIMEOUT_MS, POLL_MS);

async fn start() -> (ControlPlane, Client) {
    testkit::init_tracing("operator=info");
    testkit::apiserver::start(NS).await
}

/// A simulated node agent: a registered BlockNode and a Lease renewed until dropped.
async fn agent(client: &Client, name: &str, zone: &str) -> Task {
    FakeAgent::new(name, NS)
        .data_address(format!("10.1.0.{}:7400", name.trim_start_matches('n')))
        .zone(zone)
        .lease(NODE_LEASE_S, LEASE_RENEW_MS)
        .start(client)
        .await
}

fn settings() -> ControllerSettings {
    test_settings(NS)
}

/// An operator running in this process, stopped (Lease kept, like a crash) when dropped.
fn operator(client: &Client, identity: &str) -> (Task, Arc<Metrics>) {
    InProcessOperator::new(identity, NS).start(client)
}

fn operator_with(
    client: &Client,
    identity: &str,
    settings: ControllerSettings,
) -> (Task, Arc<Metrics>) {
    InProcessOperator::new(identity, NS)
        .settings(settings)
        .start(client)
}

async fn replicas_of(client: &Client, volume: &str) -> Vec<BlockReplica> {
    Api::<BlockReplica>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{}={volume}", api::LABEL_VOLUME)))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

async fn volume(client: &Client, name: &str) -> Option<BlockVolume> {
    Api::<BlockVolume>::all(client.clone())
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

/// Writes a replica's status the way its node agent would.
async fn report(client: &Client, replica: &str, status: &BlockReplicaStatus) {
    Api::<BlockReplica>::all(client.clone())
        .patch_status(
            replica,
            &PatchParams::apply(api::FIELD_MANAGER_AGENT).force(),
            &Patch::Apply(json!({"apiVersion": "blockvol.io/v1alpha1", "kind": "BlockReplica", "status": status})),
        )
        .await
        .expect("replica status");
}

/// Waits until BlockVolume `name` reports `phase` (`what` names the wait).
async fn in_phase(client: &Client, name: &str, phase: VolumePhase, what: &str) -> BlockVolume {
    WAIT.expect(what, || async {
        volume(client, name)
            .await
            .filter(|v| v.status.as_ref().is_some_and(|s| s.phase == phase))
    })
    .await
}

/// Waits until `n` replicas of `volume` exist.
async fn placed(client: &Client, volume: &str, n: usize) -> Vec<BlockReplica> {
    WAIT.expect(&format!("{n} replicas placed"), || async {
        let rs = replicas_of(client, volume).await;
        (rs.len() == n).then_some(rs)
    })
    .await
}

/// Agents on nodes n1, n2 and n3, one per zone z1..z3, by node.
async fn three_agents(client: &Client) -> BTreeMap<String, Task> {
    let mut agents = BTreeMap::new();
    for (n, z) in [("n1", "z1"), ("n2", "z2"), ("n3", "z3")] {
        agents.insert(n.to_string(), agent(client, n, z).await);
    }
    agents
}

/// Sets (or, with null, removes) the attachment annotation of BlockVolume `name`.
async fn set_attached_node(vols: &Api<BlockVolume>, name: &str, node: serde_json::Value) {
    let patch = json!({"metadata": {"annotations": {api::ANNOTATION_ATTACHED_NODE: node}}});
    vols.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// How a primary reports replica `r` when it is in sync up to `flushed`.
fn in_sync_peer(r: &BlockReplica, flushed: u64) -> PeerStatus {
    PeerStatus {
        lag: None,
        replica_id: r.name_any(),
        state: ReplicaState::InSync,
        flushed_lsn: flushed,
        last_error: None,
    }
}

fn healthy(r: &BlockReplica, flushed: u64) -> BlockReplicaStatus {
    BlockReplicaStatus {
        flushed_lsn: flushed,
        ..testkit::agent::healthy(r)
    }
}

async fn events_with_reason(client: &Client, reason: &str) -> usize {
    Api::<k8s_openapi::api::events::v1::Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .count()
        })
        .unwrap_or(0)
}

/// Waits until an Event with `reason` exists. The operator publishes a reconcile's
/// Events after that reconcile's status write, so a test that has just seen the status
/// must wait for them rather than list once.
async fn event_published(client: &Client, reason: &str) {
    WAIT.expect(&format!("an Event with reason {reason}"), || async {
        (events_with_reason(client, reason).await >= 1).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_placement_in_sync_promotion_expansion_deletion() {
    let (_cp, client) = start().await;
    let mut agents = three_agents(&client).await;
    let (op, _) = operator(&client, "op-a");
    testkit::apiserver::create_volume(&client, "vol1", "64Mi").await;
    let vols: Api<BlockVolume> = Api::all(client.clone());

    // Placement: three replicas on three distinct nodes, one primary, epoch 1.
    let placed = placed(&client, "vol1", 3).await;
    let nodes: std::collections::BTreeSet<_> = placed.iter().map(|r| r.spec.node.clone()).collect();
    assert_eq!(nodes.len(), 3, "distinct nodes");
    assert_eq!(
        placed
            .iter()
            .filter(|r| r.spec.role == ReplicaRole::Primary)
            .count(),
        1
    );
    assert!(
        placed
            .iter()
            .all(|r| r.spec.epoch == 1 && r.spec.size_bytes == 64 * MI)
    );
    assert!(
        placed
            .iter()
            .all(|r| r.owner_references().iter().any(|o| o.kind == "BlockVolume"))
    );

    // The agents report in sync: the volume becomes Ready with all three in the set.
    for r in &placed {
        report(&client, &r.name_any(), &healthy(r, 10)).await;
    }
    let v = in_phase(&client, "vol1", VolumePhase::Ready, "volume Ready").await;
    let st = v.status.clone().unwrap();
    assert_eq!(
        (st.in_sync_count, st.in_sync_set_generation, st.epoch),
        (3, 1, 1)
    );
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "PrimaryServing")
    );
    assert_eq!(ready.observed_generation, v.metadata.generation);
    assert!(v.finalizers().iter().any(|f| f == api::FINALIZER_VOLUME));
    event_published(&client, "Placed").await;

    // Operator restart with the volume status lost: the new leader recovers epoch,
    // primary and in-sync set from the replicas and creates no replica.
    drop(op);
    vols.patch_status(
        "vol1",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": null})),
    )
    .await
    .expect("wipe status");
    assert!(volume(&client, "vol1").await.unwrap().status.is_none());
    let (_op, metrics) = operator(&client, "op-b");
    let v = in_phase(
        &client,
        "vol1",
        VolumePhase::Ready,
        "status recovered by the new operator",
    )
    .await;
    let st = v.status.unwrap();
    assert_eq!(
        (st.epoch, st.in_sync_set_generation, st.in_sync_count),
        (1, 1, 3)
    );
    let mut before: Vec<String> = placed.iter().map(|r| r.name_any()).collect();
    let mut after: Vec<String> = replicas_of(&client, "vol1")
        .await
        .iter()
        .map(|r| r.name_any())
        .collect();
    before.sort();
    after.sort();
    assert_eq!(
        before, after,
        "no replica created or lost across the restart"
    );
    let p0 = placed
        .iter()
        .find(|r| r.spec.role == ReplicaRole::Primary)
        .unwrap();
    assert_eq!(st.primary.as_deref(), Some(p0.name_any().as_str()));

    // The primary cannot reach one member: the operator commits the set without it.
    let primary = placed
        .iter()
        .find(|r| r.spec.role == ReplicaRole::Primary)
        .unwrap()
        .clone();
    let others: Vec<BlockReplica> = placed
        .iter()
        .filter(|r| r.spec.role != ReplicaRole::Primary)
        .cloned()
        .collect();
    let dropped = others[0].name_any();
    let mut pst = healthy(&primary, 10);
    pst.unreachable = vec![dropped.clone()];
    report(&client, &primary.name_any(), &pst).await;
    let v = WAIT
        .expect("set without the unreachable member", || async {
            volume(&client, "vol1").await.filter(|v| {
                v.status
                    .as_ref()
                    .is_some_and(|s| s.in_sync_set_generation == 2)
            })
        })
        .await;
    let st = v.status.unwrap();
    assert_eq!(st.in_sync_set.len(), 2);
    assert!(!st.in_sync_set.contains(&dropped));
    assert_eq!(st.phase, VolumePhase::Degraded);
    let p = Api::<BlockReplica>::all(client.clone())
        .get(&primary.name_any())
        .await
        .unwrap();
    assert_eq!(
        p.spec.in_sync_set_generation, 2,
        "the primary's assignment carries the commit"
    );
    assert!(!p.spec.in_sync_set.contains(&dropped));

    // It catches up and the primary reports it InSync: it joins again (generation 3).
    pst.unreachable.clear();
    pst.peers = others.iter().map(|o| in_sync_peer(o, 10)).collect();
    report(&client, &primary.name_any(), &pst).await;
    WAIT.expect("member added back", || async {
        volume(&client, "vol1").await.filter(|v| {
            v.status
                .as_ref()
                .is_some_and(|s| s.in_sync_set_generation == 3 && s.in_sync_count == 3)
        })
    })
    .await;

    // The members differ in flushed LSN; the primary's agent dies.
    let (low, high) = (&others[0], &others[1]);
    report(&client, &low.name_any(), &healthy(low, 15)).await;
    report(&client, &high.name_any(), &healthy(high, 20)).await;
    WAIT.expect("flushed LSNs visible in the volume status", || async {
        volume(&client, "vol1").await.filter(|v| {
            v.status.as_ref().is_some_and(|s| {
                s.replicas
                    .iter()
                    .any(|r| r.replica_id == high.name_any() && r.flushed_lsn == 20)
            })
        })
    })
    .await;
    assert_eq!(
        volume(&client, "vol1").await.unwrap().status.unwrap().epoch,
        1,
        "no promotion while the lease is current"
    );
    drop(agents.remove(&primary.spec.node));
    let v = WAIT
        .expect("promotion after the primary's lease expired", || async {
            volume(&client, "vol1")
                .await
                .filter(|v| v.status.as_ref().is_some_and(|s| s.epoch == 2))
        })
        .await;
    let st = v.status.unwrap();
    assert_eq!(
        st.primary.as_deref(),
        Some(high.name_any().as_str()),
        "highest flushed LSN wins"
    );
    assert!(
        !st.in_sync_set.contains(&primary.name_any()),
        "deposed primary leaves the set"
    );
    // A promotion stores its claim in the volume status first and writes the replica
    // specs after it (operator::controller::perform), so the specs follow shortly.
    let rs = WAIT
        .expect("every replica assigned the new epoch", || async {
            let rs = replicas_of(&client, "vol1").await;
            (!rs.is_empty() && rs.iter().all(|r| r.spec.epoch == 2)).then_some(rs)
        })
        .await;
    for r in &rs {
        assert_eq!(r.spec.epoch, 2, "{} carries the new epoch", r.name_any());
        let want = if r.name_any() == high.name_any() {
            ReplicaRole::Primary
        } else {
            ReplicaRole::Replica
        };
        assert_eq!(r.spec.role, want);
    }
    event_published(&client, "Promoted").await;

    // Expansion: every replica's size follows the spec.
    vols.patch(
        "vol1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"size": "128Mi"}})),
    )
    .await
    .expect("expand");
    WAIT.expect("every replica expanded", || async {
        let rs = replicas_of(&client, "vol1").await;
        (rs.len() == 3 && rs.iter().all(|r| r.spec.size_bytes == 128 * MI)).then_some(())
    })
    .await;

    // An attached volume waits for detach before it is deleted, and says so.
    set_attached_node(&vols, "vol1", json!("n2")).await;
    vols.delete("vol1", &DeleteParams::default())
        .await
        .expect("delete");
    WAIT.expect("deletion waits for detach", || async {
        volume(&client, "vol1").await.filter(|v| {
            v.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Attached" && c.reason == "DeletionWaitsForDetach")
            })
        })
    })
    .await;
    assert_eq!(
        replicas_of(&client, "vol1").await.len(),
        3,
        "nothing deleted while attached"
    );
    set_attached_node(&vols, "vol1", json!(null)).await;
    WAIT.expect("volume and replicas gone", || async {
        let gone = volume(&client, "vol1").await.is_none()
            && replicas_of(&client, "vol1").await.is_empty();
        gone.then_some(())
    })
    .await;
    let text = metrics.render();
    assert!(
        text.contains("blockvol_operator_reconciles_total{result=\"ok\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_nodes_reports_insufficient_nodes_then_places_when_one_joins() {
    let (_cp, client) = start().await;
    let _a1 = agent(&client, "n1", "z1").await;
    let _a2 = agent(&client, "n2", "z2").await;
    let (_op, _m) = operator(&client, "op-a");
    testkit::apiserver::create_volume(&client, "vol2", "16Mi").await;
    let v = in_phase(
        &client,
        "vol2",
        VolumePhase::Pending,
        "Pending with InsufficientNodes",
    )
    .await;
    let ready = v
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "InsufficientNodes");
    assert!(
        ready.message.contains("need 3") && ready.message.contains("only 2"),
        "{}",
        ready.message
    );
    assert!(replicas_of(&client, "vol2").await.is_empty());
    let _a3 = agent(&client, "n3", "z3").await;
    WAIT.expect("placed once a third node joins", || async {
        (replicas_of(&client, "vol2").await.len() == 3).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_one_leader_and_failover_of_leadership() {
    let (_cp, client) = start().await;
    let (op_a, m_a) = operator(&client, "op-a");
    let (op_b, m_b) = operator(&client, "op-b");
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let holder = WAIT
        .expect("a leader", || async {
            leases
                .get_opt("blockvol-operator")
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec.and_then(|s| s.holder_identity))
        })
        .await;
    let leading = |m: &Metrics| {
        m.render()
            .lines()
            .any(|l| l == "blockvol_operator_leader 1")
    };
    WAIT.expect("the holder reports leading", || async {
        let (a, b) = (leading(&m_a), leading(&m_b));
        (a != b).then_some(())
    })
    .await;
    assert_eq!(leading(&m_a), holder == "op-a");
    // Stop the leader without releasing (a crash): the other takes over after expiry.
    let (survivor, survivor_metrics, _keep) = if holder == "op-a" {
        drop(op_a);
        ("op-b", m_b, op_b)
    } else {
        drop(op_b);
        ("op-a", m_a, op_a)
    };
    WAIT.expect("the other operator takes over", || async {
        let h = leases
            .get_opt("blockvol-operator")
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity?;
        (h == survivor && leading(&survivor_metrics)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_needing_rebuild_is_replaced_on_another_node_and_rejoins() {
    let (_cp, client) = start().await;
    let mut _agents = Vec::new();
    for (n, z) in [("n1", "z1"), ("n2", "z2"), ("n3", "z3")] {
        _agents.push(agent(&client, n, z).await);
    }
    let mut s = settings();
    s.replacement.replica_failure_grace_ms = 1_000;
    let (_op, _m) = operator_with(&client, "op-a", s);
    testkit::apiserver::create_volume(&client, "vol3", "16Mi").await;
    let placed = placed(&client, "vol3", 3).await;
    // A fourth node joins only now, so it is the only place for a replacement.
    _agents.push(agent(&client, "n4", "z4").await);
    for r in &placed {
        report(&client, &r.name_any(), &healthy(r, 5)).await;
    }
    let primary = placed
        .iter()
        .find(|r| r.spec.role == ReplicaRole::Primary)
        .unwrap()
        .clone();
    let bad = placed
        .iter()
        .find(|r| r.spec.role != ReplicaRole::Primary)
        .unwrap()
        .clone();
    let mut pst = healthy(&primary, 5);
    pst.unreachable = vec![bad.name_any()];
    report(&client, &primary.name_any(), &pst).await;
    let mut bst = healthy(&bad, 5);
    bst.state = ReplicaState::NeedsRebuild;
    report(&client, &bad.name_any(), &bst).await;

    let new = WAIT
        .expect("replacement on the fourth node", || async {
            let rs = replicas_of(&client, "vol3").await;
            let gone = !rs.iter().any(|r| r.name_any() == bad.name_any());
            let new = rs.into_iter().find(|r| r.spec.node == "n4")?;
            gone.then_some(new)
        })
        .await;
    assert_eq!(new.spec.epoch, 1);
    let p = Api::<BlockReplica>::all(client.clone())
        .get(&primary.name_any())
        .await
        .unwrap();
    assert!(
        p.spec.peers.iter().any(|x| x.replica_id == new.name_any()),
        "primary ships to the new replica"
    );
    assert!(
        !p.spec.in_sync_set.contains(&new.name_any()),
        "a new replica joins only once reported in sync"
    );
    event_published(&client, "ReplicaFailed").await;
    event_published(&client, "RebuildStarted").await;

    // The primary reports the rebuilt replica in sync: it joins the committed set.
    report(&client, &new.name_any(), &healthy(&new, 5)).await;
    pst.unreachable.clear();
    pst.peers = replicas_of(&client, "vol3")
        .await
        .iter()
        .filter(|r| r.name_any() != primary.name_any())
        .map(|r| in_sync_peer(r, 5))
        .collect();
    report(&client, &primary.name_any(), &pst).await;
    WAIT.expect(
        "rebuilt replica in the set and the volume Ready",
        || async {
            volume(&client, "vol3").await.filter(|v| {
                v.status.as_ref().is_some_and(|s| {
                    s.phase == VolumePhase::Ready
                        && s.in_sync_count == 3
                        && s.in_sync_set.contains(&new.name_any())
                })
            })
        },
    )
    .await;
    event_published(&client, "RebuildCompleted").await;
}

/// Plans a promotion of volume `name` with `ctx` as soon as its view shows the
/// primary's Lease expired (a fresh reconciler waits one Lease duration for that).
async fn promotion_planned(
    ctx: &Context,
    name: &str,
    epoch: u64,
) -> operator::controller::Prepared {
    WAIT.expect(
        &format!("a plan promoting {name} to epoch {epoch}"),
        || async {
            let p = operator::controller::prepare(ctx, name).await.ok()??;
            (p.plan().status.epoch == epoch && p.plan().status.primary.is_some()).then_some(p)
        },
    )
    .await
}

/// Two reconciles of one volume race to promote different replicas at the same epoch:
/// overlapping leaders, or a deposed leader whose reconcile computed its plan before it
/// lost the Lease and writes after. Each plans from its own view (A sees replica `a`
/// furthest ahead, B later sees `b`). The first to write stores its promotion; the
/// other's plan, made from a view the first one changed, must be refused before any of
/// its writes lands, so no two replicas are ever assigned Primary at one epoch; and,
/// recomputed, it keeps the stored primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reconciles_racing_to_promote_never_assign_two_primaries_at_one_epoch() {
    let (_cp, client) = start().await;
    let mut agents = three_agents(&client).await;
    let (op, _) = operator(&client, "op-a");
    testkit::apiserver::create_volume(&client, "race", "64Mi").await;
    let placed = placed(&client, "race", 3).await;
    for r in &placed {
        report(&client, &r.name_any(), &healthy(r, 10)).await;
    }
    WAIT.expect("volume Ready with 3 in sync", || async {
        volume(&client, "race").await.filter(|v| {
            v.status
                .as_ref()
                .is_some_and(|s| s.phase == VolumePhase::Ready && s.in_sync_count == 3)
        })
    })
    .await;
    // From here on the test plays the two reconcilers itself.
    drop(op);
    let primary = placed
        .iter()
        .find(|r| r.spec.role == ReplicaRole::Primary)
        .unwrap()
        .clone();
    let mut others: Vec<BlockReplica> = placed
        .iter()
        .filter(|r| r.name_any() != primary.name_any())
        .cloned()
        .collect();
    others.sort_by_key(|r| r.name_any());
    let (a, b) = (others[0].name_any(), others[1].name_any());
    drop(agents.remove(&primary.spec.node));

    // A sees `a` furthest ahead.
    report(&client, &a, &healthy(&others[0], 30)).await;
    report(&client, &b, &healthy(&others[1], 20)).await;
    let ctx = |id: &str| {
        Context::new(
            client.clone(),
            settings(),
            Arc::new(Metrics::default()),
            Some(id.into()),
        )
    };
    let (ctx_a, ctx_b) = (ctx("op-a"), ctx("op-b"));
    let plan_a = promotion_planned(&ctx_a, "race", 2).await;
    assert_eq!(plan_a.plan().status.primary.as_deref(), Some(a.as_str()));
    // Then `b` reports further ahead, and B plans from its own view.
    report(&client, &b, &healthy(&others[1], 40)).await;
    let plan_b = promotion_planned(&ctx_b, "race", 2).await;
    assert_eq!(plan_b.plan().status.primary.as_deref(), Some(b.as_str()));

    let replicas: Api<BlockReplica> = Api::all(client.clone());
    operator::controller::perform(&ctx_a, &plan_a)
        .await
        .expect("the first promotion is stored");
    let stored_a = replicas.get(&a).await.unwrap();
    assert_eq!(
        (stored_a.spec.role, stored_a.spec.epoch),
        (ReplicaRole::Primary, 2)
    );
    let b_before = replicas.get(&b).await.unwrap();

    let second = operator::controller::perform(&ctx_b, &plan_b).await;
    let b_after = replicas.get(&b).await.unwrap();
    let primaries_at_2: Vec<String> = [&stored_a, &b_after]
        .iter()
        .filter(|r| r.spec.role == ReplicaRole::Primary && r.spec.epoch == 2)
        .map(|r| r.name_any())
        .collect();
    assert!(
        !(b_after.spec.role == ReplicaRole::Primary && b_after.spec.epoch == 2),
        "two replicas were assigned Primary at epoch 2: {a} by the first reconcile, then \
         {b} by the second (result {second:?})"
    );
    assert_eq!(
        b_after.metadata.resource_version, b_before.metadata.resource_version,
        "the stale plan wrote replica {b} (primaries at epoch 2: {primaries_at_2:?})"
    );
    assert!(
        matches!(second, Err(operator::Error::Conflict(_))),
        "the stale plan was not refused as a conflict: {second:?}"
    );
    let a_now = replicas.get(&a).await.unwrap();
    assert_eq!(
        (a_now.spec.role, a_now.spec.epoch),
        (ReplicaRole::Primary, 2)
    );

    // Recomputed from a fresh view, B keeps the stored primary.
    let again = operator::controller::prepare(&ctx_b, "race")
        .await
        .expect("prepare")
        .expect("volume exists");
    assert_eq!(
        (
            again.plan().status.epoch,
            again.plan().status.primary.as_deref()
        ),
        (2, Some(a.as_str()))
    );
    assert!(
        again
            .plan()
            .apply
            .iter()
            .all(|s| s.role != ReplicaRole::Primary || s.replica_id == a),
        "{:?}",
        again.plan().apply
    );
    operator::controller::perform(&ctx_b, &again)
        .await
        .expect("the recomputed plan is stored");
}
