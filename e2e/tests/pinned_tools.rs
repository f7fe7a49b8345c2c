//! The binaries hack/tools/build.sh produced are the pinned versions and carry their
//! version stamps (kubectl and the API server compare versions; v0.0.0 trips skew checks).

use std::process::Command;

fn version_output(binary: &str, args: &[&str]) -> String {
    let path = e2e::tool(binary).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{binary} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kubernetes_binaries_report_the_pinned_version() {
    for binary in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
    ] {
        let out = version_output(binary, &["--version"]);
        assert_eq!(out.trim(), "Kubernetes v1.34.4", "{binary}");
    }
    let out = version_output("kubectl", &["version", "--client"]);
    assert!(out.contains("Client Version: v1.34.4"), "{out}");
}

#[test]
fn etcd_helm_and_csi_sanity_report_the_pinned_versions() {
    let out = version_output("etcd", &["--version"]);
    assert!(out.contains("etcd Version: 3.6.16"), "{out}");
    let out = version_output("helm", &["version", "--short"]);
    assert!(out.starts_with("v3.22.0"), "{out}");
    let out = version_output("csi-sanity", &["--version"]);
    assert!(out.contains("v5.6.0"), "{out}");
}

#[test]
fn csi_sidecars_are_built() {
    for binary in ["csi-provisioner", "csi-attacher", "csi-resizer"] {
        version_output(binary, &["--version"]);
    }
}
