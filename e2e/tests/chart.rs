//! The Helm chart on a real kube-apiserver: its rendering (and the committed
//! deploy/blockvol.yaml) passes strict server-side validation, `helm install` creates
//! every object, and each component's service account may do exactly what its binary
//! does: the verbs it uses are allowed, a sample of others is denied. `helm upgrade`
//! brings the CRDs up to the chart's (a field added to the schema is served after the
//! upgrade) and `helm uninstall` keeps the CRDs and with them every BlockVolume.

use std::path::{Path, PathBuf};

use e2e::{ControlPlane, ControlPlaneOptions};
use std::time::Duration;

use api::{BlockVolume, BlockVolumeSpec};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

const NS: &str = "blockvol-system";
const RELEASE: &str = "blockvol";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the pinned helm against `cp` with its state in `home`; returns stdout.
async fn helm(cp: &ControlPlane, home: &Path, args: &[&str]) -> String {
    helm_in(cp, home, &repo(), args).await
}

/// Runs the pinned helm in `cwd`; returns stdout.
async fn helm_in(cp: &ControlPlane, home: &Path, cwd: &Path, args: &[&str]) -> String {
    let helm = e2e::tool("helm").expect("helm is built by hack/tools/build.sh");
    let out = tokio::process::Command::new(&helm)
        .args(args)
        .arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("running helm");
    testkit::stdout_of(&out, &format!("helm {args:?}"))
}

async fn create_namespace(cp: &ControlPlane) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(cp.client())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
}

async fn strict_server_dry_run(cp: &ControlPlane, file: &Path) {
    let out = cp
        .kubectl([
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "--field-manager=chart-test",
            "-f",
            file.to_str().expect("utf-8 path"),
        ])
        .await
        .unwrap_or_else(|e| panic!("{} fails strict validation: {e}", file.display()));
    assert!(out.contains("serverside-applied"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_chart_and_deploy_manifest_pass_strict_server_side_validation() {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    cp.apply_crds(&e2e::crds_dir()).await.expect("CRDs apply");
    create_namespace(&cp).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let template = [
        "template",
        RELEASE,
        "charts/blockvol",
        "--namespace",
        NS,
        "--kube-version",
        e2e::chart::KUBE_VERSION,
    ];
    let rendered = helm(&cp, dir.path(), &template).await;
    for kind in [
        "kind: Deployment",
        "kind: DaemonSet",
        "kind: CSIDriver",
        "kind: StorageClass",
        "kind: ClusterRole",
        "kind: Secret",
    ] {
        assert!(rendered.contains(kind), "rendering lacks {kind}");
    }
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, rendered).expect("write rendering");
    strict_server_dry_run(&cp, &file).await;
    strict_server_dry_run(&cp, &repo().join("deploy/blockvol.yaml")).await;

    // The registry override, pull secrets and the optional sidecar render valid objects.
    let mut overridden = template.to_vec();
    overridden.extend([
        "--set",
        "image.registry=registry.example.com/mirror",
        "--set-json",
        r#"imagePullSecrets=["regcred",{"name":"othercred"}]"#,
        "--set",
        "sidecars.nodeDriverRegistrar.enabled=true",
        "--set",
        "metrics.serviceMonitor.enabled=false",
    ]);
    let rendered = helm(&cp, dir.path(), &overridden).await;
    assert!(rendered.contains("image: registry.example.com/mirror/sig-storage/csi-provisioner:"));
    let file = dir.path().join("overridden.yaml");
    std::fs::write(&file, rendered).expect("write rendering");
    strict_server_dry_run(&cp, &file).await;
}

/// One `kubectl auth can-i` question, as `sa` in the release namespace.
struct Can {
    sa: &'static str,
    verb: &'static str,
    resource: &'static str,
    subresource: Option<&'static str>,
    namespace: Option<&'static str>,
}

fn can(sa: &'static str, verb: &'static str, resource: &'static str) -> Can {
    Can {
        sa,
        verb,
        resource,
        subresource: None,
        namespace: None,
    }
}

impl Can {
    fn status(mut self) -> Can {
        self.subresource = Some("status");
        self
    }

    fn in_ns(mut self, ns: &'static str) -> Can {
        self.namespace = Some(ns);
        self
    }

    /// Whether the apiserver allows it: `yes` or `no` on stdout (exit 0 or 1).
    async fn ask(&self, cp: &ControlPlane) -> bool {
        let kubectl = e2e::tool("kubectl").expect("kubectl");
        let mut cmd = tokio::process::Command::new(&kubectl);
        cmd.arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
            .args(["auth", "can-i", self.verb, self.resource])
            .arg(format!(
                "--as=system:serviceaccount:{NS}:{RELEASE}-{}",
                self.sa
            ));
        if let Some(s) = self.subresource {
            cmd.arg(format!("--subresource={s}"));
        }
        if let Some(ns) = self.namespace {
            cmd.arg(format!("--namespace={ns}"));
        }
        let out = cmd
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("running kubectl");
        match String::from_utf8_lossy(&out.stdout).trim() {
            "yes" => true,
            "no" => false,
            other => panic!(
                "kubectl auth can-i {} {}: unexpected answer {other:?}: {}",
                self.verb,
                self.resource,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} {} {}{}{}",
            self.sa,
            self.verb,
            self.resource,
            self.subresource
                .map(|s| format!("/{s}"))
                .unwrap_or_default(),
            self.namespace
                .map(|n| format!(" in {n}"))
                .unwrap_or_default()
        )
    }
}

const BV: &str = "blockvolumes.blockvol.io";
const BR: &str = "blockreplicas.blockvol.io";
const BN: &str = "blocknodes.blockvol.io";
const LEASES: &str = "leases.coordination.k8s.io";
const EVENTS: &str = "events.events.k8s.io";

fn allowed() -> Vec<Can> {
    let mut v = Vec::new();
    // Operator: reconciles volumes, applies and deletes replicas, reads nodes (cordon,
    // labels) and the agents' Leases, reports drains in BlockNode status, holds the
    // leader Lease, records events.
    for verb in ["get", "list", "watch", "patch"] {
        v.push(can("operator", verb, BV));
    }
    v.push(can("operator", "patch", BV).status());
    for verb in ["get", "list", "watch", "create", "patch", "delete"] {
        v.push(can("operator", verb, BR));
    }
    for verb in ["get", "list", "watch"] {
        v.push(can("operator", verb, BN));
        v.push(can("operator", verb, "nodes"));
    }
    // Drain progress in BlockNode status.
    v.push(can("operator", "patch", BN).status());
    for verb in ["get", "list", "watch", "create", "update", "patch"] {
        v.push(can("operator", verb, LEASES).in_ns(NS));
    }
    for verb in ["create", "patch"] {
        v.push(can("operator", verb, EVENTS).in_ns(NS));
    }
    // CSI controller: blockvol-csi and its sidecars.
    for verb in ["get", "list", "create", "patch", "delete"] {
        v.push(can("csi-controller", verb, BV));
    }
    for verb in ["get", "list"] {
        v.push(can("csi-controller", verb, BN));
    }
    v.push(can("csi-controller", "create", "persistentvolumes"));
    v.push(
        can(
            "csi-controller",
            "patch",
            "volumeattachments.storage.k8s.io",
        )
        .status(),
    );
    v.push(can("csi-controller", "patch", "persistentvolumeclaims").status());
    v.push(can("csi-controller", "update", LEASES).in_ns(NS));
    // Node agent: its BlockNode, its replicas' status, its Lease (renewed by
    // server-side apply, a PATCH).
    v.push(can("node", "create", BN));
    // Peers' data addresses come from a watch of every BlockNode.
    for verb in ["list", "watch"] {
        v.push(can("node", verb, BN));
    }
    v.push(can("node", "patch", BR).status());
    v.push(can("node", "update", LEASES).in_ns(NS));
    v.push(can("node", "patch", LEASES).in_ns(NS));
    v
}

fn denied() -> Vec<Can> {
    vec![
        can("operator", "get", "secrets").in_ns(NS),
        can("operator", "delete", BV),
        can("operator", "create", BN),
        can("operator", "create", LEASES).in_ns("default"),
        can("operator", "delete", "nodes"),
        can("operator", "patch", "nodes"),
        can("operator", "patch", BN),
        can("csi-controller", "patch", BV).status(),
        can("csi-controller", "watch", BV),
        can("csi-controller", "delete", BN),
        can("csi-controller", "create", BR),
        can("csi-controller", "get", "secrets").in_ns(NS),
        can("node", "delete", BV),
        can("node", "create", BR),
        can("node", "patch", BV).status(),
        can("node", "list", "secrets").in_ns(NS),
        can("node", "update", LEASES).in_ns("default"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_creates_the_objects_and_rbac_allows_only_the_verbs_used() {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let installed = helm(
        &cp,
        dir.path(),
        &[
            "install",
            RELEASE,
            "charts/blockvol",
            "--namespace",
            NS,
            "--create-namespace",
        ],
    )
    .await;
    // NOTES.txt: what to check, how to make a claim, how to look at volumes.
    for line in [
        "kubectl -n blockvol-system rollout status daemonset/blockvol-node",
        "storageClassName: blockvol",
        "kubectl blockvol get volumes",
        "helm uninstall` keeps",
    ] {
        assert!(installed.contains(line), "NOTES lack {line:?}: {installed}");
    }
    let status = helm(&cp, dir.path(), &["status", RELEASE, "--namespace", NS]).await;
    assert!(status.contains("STATUS: deployed"), "{status}");

    for obj in [
        "customresourcedefinition/blockvolumes.blockvol.io",
        "customresourcedefinition/blockreplicas.blockvol.io",
        "customresourcedefinition/blocknodes.blockvol.io",
        "csidriver/csi.blockvol.io",
        "storageclass/blockvol",
        "clusterrole/blockvol-operator",
        "clusterrole/blockvol-csi-controller",
        "clusterrole/blockvol-node",
    ] {
        cp.kubectl(["get", obj, "-o", "name"])
            .await
            .unwrap_or_else(|e| panic!("{obj} not created: {e}"));
    }
    for obj in [
        "deployment/blockvol-operator",
        "deployment/blockvol-csi-controller",
        "daemonset/blockvol-node",
        "secret/blockvol-peer-secret",
        "serviceaccount/blockvol-operator",
        "serviceaccount/blockvol-csi-controller",
        "serviceaccount/blockvol-node",
        "role/blockvol-operator",
        "rolebinding/blockvol-operator",
        "poddisruptionbudget/blockvol-operator",
        "service/blockvol-operator-metrics",
        "service/blockvol-node-metrics",
    ] {
        cp.kubectl(["get", obj, "-n", NS, "-o", "name"])
            .await
            .unwrap_or_else(|e| panic!("{obj} not created in {NS}: {e}"));
    }

    let mut wrong = Vec::new();
    for c in allowed() {
        if !c.ask(&cp).await {
            wrong.push(format!("denied but used: {}", c.describe()));
        }
    }
    for c in denied() {
        if c.ask(&cp).await {
            wrong.push(format!("allowed but unused: {}", c.describe()));
        }
    }
    assert!(wrong.is_empty(), "RBAC mismatches:\n{}", wrong.join("\n"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read chart dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy chart file");
        }
    }
}

/// The chart as an older release had it: the same, except that the BlockVolume CRD's
/// status lacks `attachedTo`.
fn older_chart(root: &Path) -> PathBuf {
    let chart = root.join("blockvol");
    copy_dir(&repo().join("charts/blockvol"), &chart);
    let dir = api::crd::OUTPUTS
        .iter()
        .find_map(|o| o.dir.strip_prefix("charts/blockvol/"))
        .expect("the chart holds a copy of the CRDs");
    let file = chart.join(dir).join("blockvolumes.yaml");
    let text = std::fs::read_to_string(&file).expect("chart CRD");
    let mut crd: serde_json::Value = serde_norway::from_str(&text).expect("CRD YAML");
    let status = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        ["properties"];
    assert!(
        status
            .as_object_mut()
            .expect("status properties")
            .remove("attachedTo")
            .is_some(),
        "the current CRD declares status.attachedTo"
    );
    std::fs::write(&file, serde_norway::to_string(&crd).expect("YAML")).expect("write CRD");
    chart
}

/// Sets `status.attachedTo` through the status subresource and returns what the API
/// server stored: `None` while the served schema prunes the field.
async fn store_attached_to(volumes: &Api<BlockVolume>, name: &str) -> Option<String> {
    let patched = volumes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"attachedTo": "node-a"}})),
        )
        .await
        .expect("patch status");
    patched.status.and_then(|s| s.attached_to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_serves_the_new_crd_schema_and_uninstall_keeps_crds_and_volumes() {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let old = older_chart(dir.path());
    // No pods run here (no kubelet): only the API objects are installed.
    helm_in(
        &cp,
        dir.path(),
        dir.path(),
        &[
            "install",
            RELEASE,
            old.to_str().expect("utf-8 path"),
            "--namespace",
            NS,
            "--create-namespace",
        ],
    )
    .await;
    let volumes = Api::<BlockVolume>::all(cp.client());
    let bv = BlockVolume::new(
        "kept-volume",
        BlockVolumeSpec {
            pvc: None,
            size: IntOrString::String("1Gi".into()),
            replicas: 3,
            durability: Default::default(),
            block_size: 4096,
            node_selector: None,
            topology_key: None,
            data_locality: None,
        },
    );
    let created = volumes
        .create(&PostParams::default(), &bv)
        .await
        .expect("create a BlockVolume");
    let uid = created.metadata.uid.clone().expect("uid");
    assert_eq!(
        store_attached_to(&volumes, "kept-volume").await,
        None,
        "the older CRD prunes status.attachedTo"
    );

    helm(
        &cp,
        dir.path(),
        &["upgrade", RELEASE, "charts/blockvol", "--namespace", NS],
    )
    .await;
    let crds = Api::<CustomResourceDefinition>::all(cp.client());
    let crd = crds.get("blockvolumes.blockvol.io").await.expect("CRD");
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema");
    assert!(
        !schema["openAPIV3Schema"]["properties"]["status"]["properties"]["attachedTo"].is_null(),
        "helm upgrade left the older CRD in place"
    );
    // The API server swaps its handler for the CRD's objects after the update; wait
    // (bounded) until the new schema is the one served.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if store_attached_to(&volumes, "kept-volume").await.as_deref() == Some("node-a") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "30 s after helm upgrade the served schema still prunes status.attachedTo"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept = volumes.get("kept-volume").await.expect("volume kept");
    assert_eq!(kept.metadata.uid.as_deref(), Some(uid.as_str()));

    let out = helm(&cp, dir.path(), &["uninstall", RELEASE, "--namespace", NS]).await;
    assert!(
        out.contains("These resources were kept due to the resource policy"),
        "{out}"
    );
    for crd in [
        "blockvolumes.blockvol.io",
        "blockreplicas.blockvol.io",
        "blocknodes.blockvol.io",
    ] {
        assert!(
            out.contains(crd),
            "uninstall does not say it keeps {crd}: {out}"
        );
        crds.get(crd)
            .await
            .unwrap_or_else(|e| panic!("helm uninstall deleted {crd}: {e}"));
    }
    let kept = volumes
        .get("kept-volume")
        .await
        .expect("helm uninstall deleted a BlockVolume");
    assert_eq!(kept.metadata.uid.as_deref(), Some(uid.as_str()));
}
