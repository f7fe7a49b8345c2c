//! Finds the pinned Kubernetes binaries that `hack/tools/build.sh` builds. The directory
//! comes from `BLOCKVOL_TOOLS_BIN` (exported by `hack/tools/env.sh`) or, when that is
//! unset, from asking the build script where the current pins live.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Environment variable naming the directory holding etcd, kube-apiserver, kubectl, ...
pub const TOOLS_BIN_ENV: &str = "BLOCKVOL_TOOLS_BIN";

/// The directory with the pinned tools.
pub fn tools_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(TOOLS_BIN_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/tools/build.sh");
    let not_located = || Error::ToolsNotLocated {
        script: script.clone(),
    };
    let out = Command::new("bash")
        .arg(&script)
        .arg("--print-bin")
        .output()
        .map_err(|_| not_located())?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || dir.is_empty() {
        return Err(not_located());
    }
    Ok(PathBuf::from(dir))
}

/// The path of one pinned binary, or an error telling how to build it.
pub fn tool(name: &str) -> Result<PathBuf> {
    tool_in(&tools_bin_dir()?, name)
}

/// The path of binary `name` in `dir`, or an error telling how to build it.
pub fn tool_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::ToolMissing {
            binary: name.to_owned(),
            dir: dir.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_error_says_how_to_build_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = tool_in(dir.path(), "kube-apiserver").expect_err("nothing was built there");
        let msg = err.to_string();
        assert!(msg.contains("kube-apiserver"), "{msg}");
        assert!(msg.contains("hack/tools/build.sh"), "{msg}");
        assert!(msg.contains(TOOLS_BIN_ENV), "{msg}");
    }

    #[test]
    fn a_present_tool_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("etcd"), b"").expect("write");
        assert_eq!(
            tool_in(dir.path(), "etcd").ok(),
            Some(dir.path().join("etcd"))
        );
    }
}
