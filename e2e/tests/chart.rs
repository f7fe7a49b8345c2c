//! The Helm chart on a real kube-apiserver: its rendering (and the committed
//! deploy/blockvol.yaml) passes strict server-side validation, `helm install` creates
//! every object, and each component's service account may do exactly what its binary
//! does: the verbs it uses are allowed, a sample of others is denied.

use std::path::{Path, PathBuf};

use e2e::{ControlPlane, ControlPlaneOptions};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

const NS: &str = "blockvol-system";
const RELEASE: &str = "blockvol";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the pinned helm against `cp` with its state in `home`; returns stdout.
async fn helm(cp: &ControlPlane, home: &Path, args: &[&str]) -> String {
    let helm = e2e::tool("helm").expect("helm is built by hack/tools/build.sh");
    let out = tokio::process::Command::new(&helm)
        .args(args)
        .arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .current_dir(repo())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let rendered = helm(
        &cp,
        dir.path(),
        &["template", RELEASE, "charts/blockvol", "--namespace", NS],
    )
    .await;
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
    // Operator: reconciles volumes, applies and deletes replicas, reads nodes and the
    // agents' Leases, holds the leader Lease, records events.
    for verb in ["get", "list", "watch", "patch"] {
        v.push(can("operator", verb, BV));
    }
    v.push(can("operator", "patch", BV).status());
    for verb in ["get", "list", "watch", "create", "patch", "delete"] {
        v.push(can("operator", verb, BR));
    }
    for verb in ["get", "list", "watch"] {
        v.push(can("operator", verb, BN));
    }
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
    helm(
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
