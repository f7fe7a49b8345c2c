//! `dump`: a support bundle of everything blockvol keeps in the API, as YAML files in a
//! tarball: every BlockVolume, BlockReplica and BlockNode, the Events about them, the
//! Leases in the blockvol namespace (agents' liveness and the operator's leadership),
//! the driver's PersistentVolumes, and `summary.txt` with the `get` tables. What cannot
//! be read (RBAC) is listed in `errors.txt` instead of failing the bundle; the blockvol
//! objects themselves must be readable.
//!
//! Layout, under one top directory named after the file:
//! `blockvolumes/NAME.yaml`, `blockreplicas/NAME.yaml`, `blocknodes/NAME.yaml`,
//! `events/KIND.yaml` (one list per kind), `leases/NAME.yaml`,
//! `persistentvolumes/NAME.yaml`, `summary.txt`, `errors.txt` (when something failed).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::tar::TarWriter;
use crate::views::{self, Snapshot};

/// The bundle's default file name, for `now`.
pub fn default_file_name(now: Timestamp) -> String {
    format!("blockvol-dump-{}.tar.gz", now.strftime("%Y%m%dT%H%M%SZ"))
}

/// The directory every file of the bundle sits under: the file name without `.tar.gz`.
pub fn top_dir(out: &Path) -> String {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "blockvol-dump".into());
    [".tar.gz", ".tgz", ".tar"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext).map(str::to_owned))
        .unwrap_or(name)
}

/// Whether the bundle is gzip-compressed, by its file name.
pub fn compressed(out: &Path) -> bool {
    let name = out.to_string_lossy();
    name.ends_with(".gz") || name.ends_with(".tgz")
}

/// Files of the bundle, in the order they are written.
#[derive(Default)]
pub struct Bundle {
    pub files: Vec<(String, Vec<u8>)>,
    pub errors: Vec<String>,
}

impl Bundle {
    fn yaml<T: Serialize>(&mut self, path: String, value: &T) {
        match serde_norway::to_string(value) {
            Ok(text) => self.files.push((path, text.into_bytes())),
            Err(e) => self.errors.push(format!("{path}: encoding failed: {e}")),
        }
    }

    fn objects<T: Serialize + ResourceExt>(&mut self, dir: &str, items: &[T]) {
        for item in items {
            self.yaml(format!("{dir}/{}.yaml", item.name_any()), item);
        }
    }
}

/// Collects the bundle's files from the cluster.
pub async fn collect(cluster: &Cluster, snap: &Snapshot) -> Bundle {
    let mut b = Bundle::default();
    b.objects("blockvolumes", &snap.volumes);
    b.objects("blockreplicas", &snap.replicas);
    b.objects("blocknodes", &snap.nodes);
    for kind in ["BlockVolume", "BlockReplica", "BlockNode"] {
        let lp = kube::api::ListParams::default().fields(&format!("involvedObject.kind={kind}"));
        let api = kube::Api::<k8s_openapi::api::core::v1::Event>::all(cluster.client.clone());
        match api.list(&lp).await {
            Ok(list) => {
                let mut items = list.items;
                items.sort_by_key(crate::cluster::event_time);
                b.yaml(format!("events/{kind}.yaml"), &items);
            }
            Err(e) => b
                .errors
                .push(format!("Events about {kind}s could not be read: {e}")),
        }
    }
    match cluster.agent_leases().await {
        Ok(leases) => b.objects("leases", &leases),
        Err(e) => b.errors.push(e.to_string()),
    }
    match cluster.blockvol_pvs().await {
        Ok(pvs) => b.objects("persistentvolumes", &pvs),
        Err(e) => b.errors.push(e.to_string()),
    }
    let summary = format!(
        "Collected {}\n\nVolumes:\n{}\nReplicas:\n{}\nNodes:\n{}",
        snap.now.unwrap_or_else(Timestamp::now),
        views::volume_table(&views::volume_rows(snap), true).render(),
        views::replica_table(&views::replica_rows(snap, None), true).render(),
        views::node_table(&views::node_rows(snap), true).render(),
    );
    b.files.push(("summary.txt".into(), summary.into_bytes()));
    if !b.errors.is_empty() {
        let text = b.errors.join("\n") + "\n";
        b.files.push(("errors.txt".into(), text.into_bytes()));
    }
    b
}

/// Writes the bundle to `out` (an absolute path), gzip-compressed when its name ends in
/// `.gz` or `.tgz` (through the system's `gzip`). Returns the number of files.
pub fn write(bundle: &Bundle, out: &Path, now: Timestamp) -> Result<usize> {
    let top = top_dir(out);
    let mtime = u64::try_from(now.as_second()).unwrap_or(0);
    let mut tar = TarWriter::new();
    for (path, data) in &bundle.files {
        tar.add_file(&format!("{top}/{path}"), data, mtime)?;
    }
    let bytes = tar.finish();
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    };
    let file = std::fs::File::create(out).map_err(io("creating", out))?;
    if compressed(out) {
        let mut gzip = Command::new("gzip")
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(file)
            .spawn()
            .map_err(io(
                "running gzip (needed for a .gz bundle; name it .tar to skip compression) for",
                out,
            ))?;
        if let Some(mut stdin) = gzip.stdin.take() {
            stdin.write_all(&bytes).map_err(io("compressing", out))?;
        }
        let status = gzip.wait().map_err(io("compressing", out))?;
        if !status.success() {
            return Err(Error::Archive {
                what: format!("compressing {}", out.display()),
                message: format!("gzip exited with {status}"),
            });
        }
    } else {
        let mut file = file;
        file.write_all(&bytes).map_err(io("writing", out))?;
    }
    Ok(bundle.files.len())
}

/// `path` made absolute against the current directory (relative paths are relative to
/// where the command runs, as the user expects).
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|source| Error::Io {
        what: "resolving",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_directory_is_the_file_name_without_its_archive_extension() {
        assert_eq!(top_dir(Path::new("/tmp/x/support.tar.gz")), "support");
        assert_eq!(top_dir(Path::new("support.tgz")), "support");
        assert_eq!(top_dir(Path::new("support.tar")), "support");
        assert_eq!(top_dir(Path::new("support")), "support");
        assert!(compressed(Path::new("a.tar.gz")));
        assert!(!compressed(Path::new("a.tar")));
    }

    #[test]
    fn default_name_carries_a_utc_timestamp() {
        let t = Timestamp::from_second(1_800_000_000).unwrap();
        assert_eq!(
            default_file_name(t),
            "blockvol-dump-20270115T080000Z.tar.gz"
        );
    }

    #[test]
    fn relative_output_paths_resolve_against_the_current_directory() {
        let abs = absolute(Path::new("out/b.tar.gz")).unwrap();
        assert!(abs.is_absolute());
        assert_eq!(abs, std::env::current_dir().unwrap().join("out/b.tar.gz"));
    }

    #[test]
    fn a_gzip_bundle_round_trips_through_system_tar() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("b.tar.gz");
        let bundle = Bundle {
            files: vec![
                (
                    "blockvolumes/v.yaml".into(),
                    b"kind: BlockVolume\n".to_vec(),
                ),
                ("summary.txt".into(), b"ok\n".to_vec()),
            ],
            errors: vec![],
        };
        let n = write(
            &bundle,
            &out,
            Timestamp::from_second(1_800_000_000).unwrap(),
        )
        .unwrap();
        assert_eq!(n, 2);
        let listed = std::process::Command::new("tar")
            .arg("-tzf")
            .arg(&out)
            .output()
            .unwrap();
        assert!(listed.status.success());
        assert_eq!(
            String::from_utf8_lossy(&listed.stdout),
            "b/blockvolumes/v.yaml\nb/summary.txt\n"
        );
    }
}
