//! Kubernetes label syntax, checked the way the API server checks it, so a node selector
//! or topology key that could never match a node is refused where it is written (a
//! StorageClass parameter, a `BlockVolume` spec, an operator flag) instead of leaving a
//! volume unplaceable.

/// Whether `k` is a valid label key: an optional DNS-subdomain prefix and `/`, then a
/// name of at most 63 alphanumerics, `-`, `_` or `.`, starting and ending alphanumeric.
pub fn valid_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// Whether `v` is a valid label value: empty, or at most 63 alphanumerics, `-`, `_` or
/// `.`, starting and ending alphanumeric.
pub fn valid_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_and_values_follow_kubernetes_syntax() {
        for ok in [
            "zone",
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
            "node-role.kubernetes.io/control-plane",
            "a_b.c-d",
        ] {
            assert!(valid_label_key(ok), "{ok}");
        }
        for bad in [
            "",
            "/zone",
            "Example.com/zone",
            "example.com/",
            "-zone",
            "zone-",
            "a b",
            "a/b/c",
            "x..y/z",
            &"k".repeat(64),
        ] {
            assert!(!valid_label_key(bad), "{bad:?}");
        }
        for ok in ["", "ssd", "us-east-1a", "A.b_c"] {
            assert!(valid_label_value(ok), "{ok}");
        }
        for bad in ["-x", "x-", "a b", "a/b", &"v".repeat(64)] {
            assert!(!valid_label_value(bad), "{bad:?}");
        }
    }
}
