//! Checks that the Helm chart starts each blockvol binary with flags it really has:
//! every container running the binary is rendered with helm, and its args are parsed
//! by the built binary with `--help` last, so parsing succeeds only when every earlier
//! flag is known and valid.

use std::path::Path;
use std::process::Command;

/// The Kubernetes version `helm template` renders for (the chart's `kubeVersion` floor).
pub const KUBE_VERSION: &str = "1.34.0";

/// Renders `charts/blockvol` with the pinned helm, as `helm template` would for users.
pub fn render_chart(repo: &Path) -> String {
    render_chart_with(repo, &[])
}

/// Renders `charts/blockvol` like [`render_chart`] with extra `helm template` arguments
/// (`--set key=value`, ...).
pub fn render_chart_with(repo: &Path, extra: &[&str]) -> String {
    let helm = crate::tool("helm").expect("helm is built by hack/tools/build.sh");
    let home = tempfile::tempdir().expect("tempdir");
    let out = Command::new(helm)
        .args([
            "template",
            "blockvol",
            "charts/blockvol",
            "--namespace",
            "blockvol-system",
            // helm template assumes an old Kubernetes; the chart requires 1.34.
            "--kube-version",
            KUBE_VERSION,
        ])
        .args(extra)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .current_dir(repo)
        .output()
        .expect("running helm");
    testkit::stdout_of(&out, "helm template")
}

/// The `args:` list of every container whose command is `[binary]`.
pub fn container_args(rendered: &str, binary: &str) -> Vec<Vec<String>> {
    let command = format!("command: [\"{binary}\"]");
    let lines: Vec<&str> = rendered.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != command {
            continue;
        }
        let mut args = Vec::new();
        let mut rest = lines.iter().skip(i + 1);
        assert_eq!(
            rest.next().map(|l| l.trim()),
            Some("args:"),
            "{binary}: args follow the command"
        );
        for l in rest {
            match l.trim().strip_prefix("- ") {
                Some(a) if !l.trim_start().starts_with("- name:") => args.push(a.to_string()),
                _ => break,
            }
        }
        found.push(args);
    }
    found
}

/// What the kubelet substitutes for `$(VAR)` from the container's env.
pub fn expand_kubelet_vars(arg: &str) -> String {
    arg.replace("$(POD_NAMESPACE)", "blockvol-system")
        .replace("$(POD_NAME)", "pod-0")
        .replace("$(NODE_NAME)", "node-a")
        .replace("$(NODE_IP)", "10.0.0.1")
}

/// Asserts that `containers` containers run `binary` and that the binary at `exe`
/// accepts each one's args.
pub fn assert_chart_args_accepted(repo: &Path, binary: &str, exe: &str, containers: usize) {
    let rendered = render_chart(repo);
    let all = container_args(&rendered, binary);
    assert_eq!(
        all.len(),
        containers,
        "containers running {binary}: {all:?}"
    );
    for args in all {
        let args: Vec<String> = args.iter().map(|a| expand_kubelet_vars(a)).collect();
        assert!(!args.is_empty());
        let run = Command::new(exe)
            .args(&args)
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("running {binary}: {e}"));
        assert!(
            run.status.success(),
            "{binary} rejects the chart's args {args:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
}
