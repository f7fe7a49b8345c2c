//! Expansion: when `spec.size` grows, every replica's `sizeBytes` follows; the volume's
//! reported size is the smallest any replica has reached, so it never claims space a
//! replica does not have. Sizes only grow.

use crate::model::ReplicaView;

/// Replicas whose assigned size is below the volume size.
pub fn replicas_to_expand(size_bytes: u64, replicas: &[ReplicaView]) -> Vec<String> {
    replicas
        .iter()
        .filter(|r| !r.deleting && r.spec.size_bytes < size_bytes)
        .map(|r| r.id.clone())
        .collect()
}

/// The size every live replica reports having reached, if all of them report one.
pub fn reached_size(replicas: &[ReplicaView]) -> Option<u64> {
    let mut sizes = replicas
        .iter()
        .filter(|r| !r.deleting)
        .map(|r| r.status.as_ref().and_then(|s| s.size_bytes));
    let first = sizes.next()??;
    sizes.try_fold(first, |acc, s| s.map(|s| acc.min(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::replica;

    #[test]
    fn expansion_table() {
        let g = 1u64 << 30;
        let cases: Vec<(&str, u64, Vec<ReplicaView>, Vec<&str>)> = vec![
            (
                "size grew: every replica",
                2 * g,
                vec![replica("a", "n1").size(g), replica("b", "n2").size(g)],
                vec!["a", "b"],
            ),
            (
                "already expanded replicas are left alone",
                2 * g,
                vec![replica("a", "n1").size(2 * g), replica("b", "n2").size(g)],
                vec!["b"],
            ),
            (
                "never shrinks",
                g,
                vec![replica("a", "n1").size(2 * g)],
                vec![],
            ),
            (
                "deleting replicas are skipped",
                2 * g,
                vec![replica("a", "n1").size(g).deleting()],
                vec![],
            ),
        ];
        for (name, size, replicas, want) in cases {
            assert_eq!(replicas_to_expand(size, &replicas), want, "case: {name}");
        }
    }

    #[test]
    fn reached_size_is_the_smallest_report_and_unknown_until_all_report() {
        let a = replica("a", "n1").reports_size(300);
        let b = replica("b", "n2").reports_size(200);
        assert_eq!(reached_size(&[a.clone(), b.clone()]), Some(200));
        assert_eq!(reached_size(&[a.clone(), replica("c", "n3")]), None);
        assert_eq!(
            reached_size(&[a.clone(), replica("c", "n3").deleting()]),
            Some(300)
        );
        assert_eq!(reached_size(&[]), None);
    }
}
