//! Where a replica's data lives: `<data dir>/<volume>/<replica id>`. Names come from the
//! API, so each is checked to be a plain DNS-style name before it becomes a path: a
//! spec can never point the agent outside its data directory.

use std::path::{Path, PathBuf};

use super::{Error, Result};

/// Longest accepted name, in bytes (a Kubernetes object name).
pub const MAX_NAME_LEN: usize = 253;

fn check(replica: &str, field: &'static str, value: &str) -> Result<()> {
    let bad = |reason| Error::UnsafeName {
        replica: replica.to_string(),
        field,
        value: value.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(bad("it is empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(bad("it is longer than 253 bytes"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(bad(
            "only lowercase letters, digits, '-' and '.' are allowed",
        ));
    }
    if value.starts_with(['.', '-']) || value.ends_with(['.', '-']) {
        return Err(bad("it must start and end with a letter or digit"));
    }
    if value.contains("..") {
        return Err(bad("it contains '..'"));
    }
    Ok(())
}

/// The directory of a replica, or why its names are refused.
pub fn replica_dir(data_dir: &Path, volume: &str, replica_id: &str) -> Result<PathBuf> {
    check(replica_id, "spec.volume", volume)?;
    check(replica_id, "spec.replicaId", replica_id)?;
    let dir = data_dir.join(volume).join(replica_id);
    // Belt and braces: the checks above already rule out any escape.
    if dir.parent().and_then(Path::parent) != Some(data_dir) {
        return Err(Error::UnsafeName {
            replica: replica_id.to_string(),
            field: "spec.volume",
            value: volume.to_string(),
            reason: "it does not stay inside the data directory",
        });
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names_map_under_the_data_dir() {
        let d = Path::new("/var/lib/blockvol");
        assert_eq!(
            replica_dir(d, "pvc-1", "pvc-1-0a1b2c3d").unwrap(),
            Path::new("/var/lib/blockvol/pvc-1/pvc-1-0a1b2c3d")
        );
        assert!(replica_dir(d, "a.b", "r1").is_ok());
    }

    #[test]
    fn names_that_could_escape_or_confuse_are_refused() {
        let d = Path::new("/data");
        let long = "a".repeat(254);
        for (volume, replica) in [
            ("..", "r"),
            ("../etc", "r"),
            ("v", "../../x"),
            ("v/w", "r"),
            ("/abs", "r"),
            ("", "r"),
            ("v", ""),
            (".hidden", "r"),
            ("v", "r."),
            ("a..b", "r"),
            ("V", "r"),
            ("v", "r\0"),
            ("v w", "r"),
            (long.as_str(), "r"),
        ] {
            let err = replica_dir(d, volume, replica).unwrap_err();
            assert!(
                matches!(err, Error::UnsafeName { .. }),
                "{volume:?}/{replica:?}: {err}"
            );
        }
        let msg = replica_dir(d, "../etc", "r").unwrap_err().to_string();
        assert!(
            msg.contains("spec.volume") && msg.contains("../etc"),
            "{msg}"
        );
    }
}
