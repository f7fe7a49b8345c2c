//! The Helm chart starts blockvol-operator with flags the binary really has: every container
//! that runs it is rendered with helm and its args are parsed by the built binary (with
//! `--help` last, so parsing succeeds only when every earlier flag is known and valid).

use std::path::Path;
use std::process::Command;

/// The `args:` list of every container whose command is `[binary]`.
fn container_args(rendered: &str, binary: &str) -> Vec<Vec<String>> {
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
fn expand(arg: &str) -> String {
    arg.replace("$(POD_NAMESPACE)", "blockvol-system")
        .replace("$(POD_NAME)", "pod-0")
        .replace("$(NODE_NAME)", "node-a")
        .replace("$(NODE_IP)", "10.0.0.1")
}

#[test]
fn chart_args_are_flags_the_binary_accepts() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let helm = e2e::tool("helm").expect("helm is built by hack/tools/build.sh");
    let home = tempfile::tempdir().expect("tempdir");
    let out = Command::new(helm)
        .args([
            "template",
            "blockvol",
            "charts/blockvol",
            "--namespace",
            "blockvol-system",
        ])
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .current_dir(&repo)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout);
    let all = container_args(&rendered, "blockvol-operator");
    assert_eq!(
        all.len(),
        1,
        "containers running blockvol-operator: {all:?}"
    );
    for args in all {
        let args: Vec<String> = args.iter().map(|a| expand(a)).collect();
        assert!(!args.is_empty());
        let run = Command::new(env!("CARGO_BIN_EXE_blockvol-operator"))
            .args(&args)
            .arg("--help")
            .output()
            .expect("running blockvol-operator");
        assert!(
            run.status.success(),
            "blockvol-operator rejects the chart's args {args:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
}
