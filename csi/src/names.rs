//! The BlockVolume name a CreateVolume request maps to. The same request name always
//! gives the same object name (that is what makes CreateVolume idempotent), and the
//! result is always a valid DNS-1123 label, usable as an object name and label value.

use sha2::{Digest, Sha256};

/// Longest DNS-1123 label; label values share the bound.
pub const NAME_LENGTH_MAX: usize = 63;

/// Prefix of names derived by hashing.
const HASHED_PREFIX: &str = "bv-";
/// Hex digits of the SHA-256 kept in a hashed name (160 bits).
const HASH_HEX_DIGITS: usize = 40;

/// Whether `s` is a DNS-1123 label: 1-63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn is_dns1123_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= NAME_LENGTH_MAX
                && alnum(first)
                && alnum(last)
                && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

/// The BlockVolume name for a CSI volume name. Names that already are DNS-1123 labels
/// (the provisioner's `pvc-<uuid>`) pass through unchanged so `kubectl get bv` matches
/// the PV; anything else becomes `bv-` and 40 hex digits of its SHA-256. The request
/// name is also stored on the object, so a collision with a passed-through name is
/// detected rather than silently shared.
pub fn volume_name_for(request_name: &str) -> String {
    if is_dns1123_label(request_name) {
        return request_name.to_string();
    }
    let digest = Sha256::digest(request_name.as_bytes());
    let mut name = String::with_capacity(HASHED_PREFIX.len() + HASH_HEX_DIGITS);
    name.push_str(HASHED_PREFIX);
    for byte in digest.iter() {
        if name.len() >= HASHED_PREFIX.len() + HASH_HEX_DIGITS {
            break;
        }
        name.push_str(&format!("{byte:02x}"));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisioner_names_pass_through_unchanged() {
        let n = "pvc-0b7d5c4e-8a51-4b0e-9d2f-3f6a2c1e9b77";
        assert_eq!(volume_name_for(n), n);
    }

    #[test]
    fn names_that_are_not_labels_are_hashed_deterministically_into_labels() {
        for n in [
            "My Volume",
            "UPPER",
            "sanity-node-full-CA8A0D9F-1234",
            "-leading-dash",
            "trailing-dash-",
            "dots.are.not.labels",
            &"x".repeat(64),
            "ünïcode",
        ] {
            let a = volume_name_for(n);
            assert_eq!(a, volume_name_for(n), "deterministic for {n:?}");
            assert!(is_dns1123_label(&a), "{a:?} from {n:?} is a label");
            assert!(a.starts_with("bv-"), "{a}");
            assert_eq!(a.len(), 43);
        }
    }

    #[test]
    fn different_names_hash_to_different_volumes() {
        assert_ne!(volume_name_for("Vol-A"), volume_name_for("Vol-B"));
        assert_ne!(
            volume_name_for("x".repeat(64).as_str()),
            volume_name_for(&"x".repeat(65))
        );
    }

    #[test]
    fn label_check_follows_dns1123() {
        assert!(is_dns1123_label("a"));
        assert!(is_dns1123_label("a-1"));
        assert!(is_dns1123_label(&"a".repeat(63)));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(!is_dns1123_label(""));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label("a_b"));
        assert!(!is_dns1123_label("a-"));
    }
}
