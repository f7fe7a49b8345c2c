//! Placement: which live nodes get a volume's new replicas. Pure function of the node
//! views; guarantees distinct nodes, never a cordoned node (Kubernetes cordon, storage
//! cordon or drain) nor one outside the operator's storage node selector, the volume's
//! node selector, enough free space, and a spread across the topology key (zone by
//! default) and then hostname. Cordons only stop new replicas: existing ones stay.

use std::collections::{BTreeMap, BTreeSet};

/// Node label for the zone, the default first spreading domain.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Node label for the host name, the second spreading domain.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// What placement knows about one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCandidate {
    pub name: String,
    /// Node labels (BlockNode labels merged with its topology).
    pub labels: BTreeMap<String, String>,
    /// Bytes the node can still promise to new replicas.
    pub free_bytes: u64,
    /// The node's agent Lease is current.
    pub live: bool,
    /// No new replica may go here: the Kubernetes Node is cordoned
    /// (`spec.unschedulable`), or the `BlockNode` is storage-cordoned or draining.
    pub cordoned: bool,
    /// The node is being drained (`BlockNode.spec.evacuate`): its replicas move away.
    pub evacuating: bool,
    /// The node matches the operator's storage node selector (true when none is set).
    pub storage_node: bool,
    /// Volumes whose primary replica is assigned to this node.
    pub primaries: u32,
}

impl NodeCandidate {
    /// A live, uncordoned storage node with `free_bytes` free and no labels.
    pub fn new(name: impl Into<String>, free_bytes: u64) -> Self {
        NodeCandidate {
            name: name.into(),
            labels: BTreeMap::new(),
            free_bytes,
            live: true,
            primaries: 0,
            cordoned: false,
            evacuating: false,
            storage_node: true,
        }
    }
}

/// The operator-wide choice of storage nodes: a Kubernetes equality/existence label
/// selector (`key=value`, `key==value`, `key!=value`, `key`, `!key`, comma-separated;
/// every term must hold). Empty: every node with an agent is a storage node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StorageNodeSelector {
    terms: Vec<SelectorTerm>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SelectorTerm {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// A storage node selector that does not parse; names the bad term.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "storage node selector term {term:?} is invalid: {why} (write key=value, key!=value, key or !key, comma-separated)"
)]
pub struct SelectorError {
    pub term: String,
    pub why: &'static str,
}

use api::labels::{valid_label_key, valid_label_value};

impl std::str::FromStr for StorageNodeSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for raw in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let bad = |why| SelectorError {
                term: raw.to_string(),
                why,
            };
            let term = if let Some((k, v)) = raw.split_once("!=") {
                SelectorTerm::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
                SelectorTerm::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = raw.strip_prefix('!') {
                SelectorTerm::NotExists(k.trim().into())
            } else {
                SelectorTerm::Exists(raw.into())
            };
            let (key, value) = match &term {
                SelectorTerm::Equals(k, v) | SelectorTerm::NotEquals(k, v) => (k, Some(v)),
                SelectorTerm::Exists(k) | SelectorTerm::NotExists(k) => (k, None),
            };
            if !valid_label_key(key) {
                return Err(bad("not a valid label key"));
            }
            if value.is_some_and(|v| !valid_label_value(v)) {
                return Err(bad("not a valid label value"));
            }
            terms.push(term);
        }
        Ok(StorageNodeSelector { terms })
    }
}

impl StorageNodeSelector {
    /// Whether a node with these labels is a storage node.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            SelectorTerm::Equals(k, v) => labels.get(k) == Some(v),
            SelectorTerm::NotEquals(k, v) => labels.get(k) != Some(v),
            SelectorTerm::Exists(k) => labels.contains_key(k),
            SelectorTerm::NotExists(k) => !labels.contains_key(k),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }
}

/// One placement question.
#[derive(Clone, Debug, Default)]
pub struct PlacementRequest<'a> {
    /// How many new replicas to place.
    pub count: usize,
    pub size_bytes: u64,
    pub node_selector: Option<&'a BTreeMap<String, String>>,
    /// Spreading key; `None` means zone.
    pub topology_key: Option<&'a str>,
    /// Nodes that already hold a replica of the volume (never chosen again, but they
    /// count toward the spread).
    pub existing_nodes: &'a [String],
    /// Nodes that must not be chosen (for example: at their rebuild limit).
    pub excluded_nodes: &'a [String],
}

/// Why nodes were not eligible, for the condition message a user reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ineligible {
    pub not_live: usize,
    pub already_hold_replica: usize,
    pub not_storage_node: usize,
    pub cordoned: usize,
    pub selector_mismatch: usize,
    pub not_enough_space: usize,
    pub excluded: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "need {needed} node(s) for new replicas but only {available} eligible (of {total}: {} without a live agent, {} already hold a replica, {} outside the operator's storage node selector, {} cordoned, {} do not match spec.nodeSelector, {} lack {size_bytes} free bytes, {} at their rebuild limit)",
    ineligible.not_live,
    ineligible.already_hold_replica,
    ineligible.not_storage_node,
    ineligible.cordoned,
    ineligible.selector_mismatch,
    ineligible.not_enough_space,
    ineligible.excluded
)]
pub struct InsufficientNodes {
    pub needed: usize,
    pub available: usize,
    pub total: usize,
    pub size_bytes: u64,
    pub ineligible: Ineligible,
}

fn matches_selector(
    labels: &BTreeMap<String, String>,
    sel: Option<&BTreeMap<String, String>>,
) -> bool {
    sel.is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn domain<'a>(c: &'a NodeCandidate, key: &str) -> &'a str {
    match c.labels.get(key) {
        Some(v) => v,
        // A node without a hostname label is its own host.
        None if key == HOSTNAME_LABEL => &c.name,
        None => "",
    }
}

/// Which of the nodes `chosen` for a new volume's replicas gets its primary: the one
/// holding the fewest primaries, so that primaries spread over the nodes and the loss of
/// one node fails over a share of the volumes, not most of them. Ties go by a hash of
/// the volume and node names: volumes placed at the same time from the same counts
/// spread instead of all picking the same node.
pub fn primary_among(volume: &str, chosen: &[String], nodes: &[NodeCandidate]) -> Option<String> {
    let primaries = |name: &str| {
        nodes
            .iter()
            .find(|n| n.name == name)
            .map_or(0, |n| n.primaries)
    };
    chosen
        .iter()
        .min_by_key(|name| {
            (
                primaries(name),
                stable_hash(&[volume.as_bytes(), name.as_bytes()]),
            )
        })
        .cloned()
}

/// FNV-1a over `parts` (with a separator), finished with MurmurHash3's 64-bit mix so
/// that inputs differing in their last byte spread: a hash that is the same in every
/// process and version, for tie-breaking only.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Chooses `count` distinct nodes for new replicas, or says how many are missing.
///
/// Order of preference for each pick: fewest replicas of this volume already in the
/// node's topology domain, then on its host, then most free space, then name (so the
/// result is deterministic for the same inputs).
pub fn place(
    nodes: &[NodeCandidate],
    req: &PlacementRequest<'_>,
) -> Result<Vec<String>, InsufficientNodes> {
    let mut ineligible = Ineligible::default();
    let mut eligible: Vec<&NodeCandidate> = Vec::new();
    let mut seen = BTreeSet::new();
    for n in nodes {
        if !seen.insert(n.name.as_str()) {
            continue;
        }
        if req.existing_nodes.contains(&n.name) {
            ineligible.already_hold_replica += 1;
        } else if !n.live {
            ineligible.not_live += 1;
        } else if !n.storage_node {
            ineligible.not_storage_node += 1;
        } else if n.cordoned {
            ineligible.cordoned += 1;
        } else if !matches_selector(&n.labels, req.node_selector) {
            ineligible.selector_mismatch += 1;
        } else if n.free_bytes < req.size_bytes {
            ineligible.not_enough_space += 1;
        } else if req.excluded_nodes.contains(&n.name) {
            ineligible.excluded += 1;
        } else {
            eligible.push(n);
        }
    }
    if eligible.len() < req.count {
        return Err(InsufficientNodes {
            needed: req.count,
            available: eligible.len(),
            total: seen.len(),
            size_bytes: req.size_bytes,
            ineligible,
        });
    }
    let keys = [req.topology_key.unwrap_or(ZONE_LABEL), HOSTNAME_LABEL];
    let mut used: [BTreeMap<String, usize>; 2] = Default::default();
    for existing in req.existing_nodes {
        if let Some(n) = nodes.iter().find(|n| &n.name == existing) {
            for (i, k) in keys.iter().enumerate() {
                *used[i].entry(domain(n, k).to_string()).or_default() += 1;
            }
        }
    }
    let mut chosen = Vec::with_capacity(req.count);
    for _ in 0..req.count {
        let best = eligible
            .iter()
            .enumerate()
            .min_by_key(|(_, n)| {
                (
                    used[0].get(domain(n, keys[0])).copied().unwrap_or(0),
                    used[1].get(domain(n, keys[1])).copied().unwrap_or(0),
                    std::cmp::Reverse(n.free_bytes),
                    n.name.clone(),
                )
            })
            .map(|(i, _)| i);
        let Some(i) = best else { break };
        let n = eligible.swap_remove(i);
        for (i, k) in keys.iter().enumerate() {
            *used[i].entry(domain(n, k).to_string()).or_default() += 1;
        }
        chosen.push(n.name.clone());
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn node(name: &str, zone: &str, free: u64) -> NodeCandidate {
        let mut labels = BTreeMap::new();
        if !zone.is_empty() {
            labels.insert(ZONE_LABEL.to_string(), zone.to_string());
        }
        NodeCandidate {
            labels,
            ..NodeCandidate::new(name, free)
        }
    }

    #[test]
    fn a_new_volume_takes_its_primary_where_fewest_primaries_are_and_ties_spread() {
        let chosen: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut nodes = vec![node("a", "", GI), node("b", "", GI), node("c", "", GI)];
        nodes[0].primaries = 5;
        nodes[1].primaries = 2;
        nodes[2].primaries = 3;
        assert_eq!(primary_among("v", &chosen, &nodes).as_deref(), Some("b"));
        assert_eq!(
            primary_among("v", &chosen[..1], &nodes).as_deref(),
            Some("a")
        );
        // Placed from the same counts (a burst of creations), volumes still spread.
        for n in &mut nodes {
            n.primaries = 0;
        }
        let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
        for i in 0..300 {
            let p = primary_among(&format!("pvc-{i}"), &chosen, &nodes).unwrap();
            *per_node.entry(p).or_default() += 1;
        }
        assert_eq!(per_node.len(), 3, "{per_node:?}");
        assert!(
            per_node.values().all(|&c| (70..=130).contains(&c)),
            "{per_node:?}"
        );
    }

    fn cordoned(mut n: NodeCandidate) -> NodeCandidate {
        n.cordoned = true;
        n
    }

    fn not_storage(mut n: NodeCandidate) -> NodeCandidate {
        n.storage_node = false;
        n
    }

    fn dead(mut n: NodeCandidate) -> NodeCandidate {
        n.live = false;
        n
    }

    fn labelled(mut n: NodeCandidate, k: &str, v: &str) -> NodeCandidate {
        n.labels.insert(k.into(), v.into());
        n
    }

    fn zones_of(nodes: &[NodeCandidate], chosen: &[String]) -> BTreeSet<String> {
        chosen
            .iter()
            .map(|c| domain(nodes.iter().find(|n| &n.name == c).unwrap(), ZONE_LABEL).to_string())
            .collect()
    }

    #[test]
    fn placement_table() {
        struct Case {
            name: &'static str,
            nodes: Vec<NodeCandidate>,
            count: usize,
            existing: Vec<String>,
            selector: Option<BTreeMap<String, String>>,
            want: Result<Vec<&'static str>, (usize, usize)>,
        }
        let sel = |k: &str, v: &str| Some(BTreeMap::from([(k.to_string(), v.to_string())]));
        let cases = vec![
            Case {
                name: "three nodes in three zones: one replica each",
                nodes: vec![
                    node("a", "z1", GI),
                    node("b", "z2", GI),
                    node("c", "z3", GI),
                ],
                count: 3,
                existing: vec![],
                selector: None,
                want: Ok(vec!["a", "b", "c"]),
            },
            Case {
                name: "spread across zones before packing a zone",
                nodes: vec![
                    node("a1", "z1", 9 * GI),
                    node("a2", "z1", 9 * GI),
                    node("b1", "z2", GI),
                ],
                count: 2,
                existing: vec![],
                selector: None,
                want: Ok(vec!["a1", "b1"]),
            },
            Case {
                name: "existing replicas count toward the spread",
                nodes: vec![
                    node("a1", "z1", GI),
                    node("a2", "z1", GI),
                    node("b1", "z2", GI),
                ],
                count: 1,
                existing: vec!["b1".into()],
                selector: None,
                want: Ok(vec!["a1"]),
            },
            Case {
                name: "dead nodes are never chosen",
                nodes: vec![dead(node("a", "z1", GI)), node("b", "z2", GI)],
                count: 2,
                existing: vec![],
                selector: None,
                want: Err((2, 1)),
            },
            Case {
                name: "nodes without enough space are skipped",
                nodes: vec![node("a", "z1", GI - 1), node("b", "z2", GI)],
                count: 1,
                existing: vec![],
                selector: None,
                want: Ok(vec!["b"]),
            },
            Case {
                name: "node selector honoured",
                nodes: vec![
                    labelled(node("a", "z1", 5 * GI), "disk", "hdd"),
                    labelled(node("b", "z2", GI), "disk", "ssd"),
                ],
                count: 1,
                existing: vec![],
                selector: sel("disk", "ssd"),
                want: Ok(vec!["b"]),
            },
            Case {
                name: "a node holding a replica is never chosen twice",
                nodes: vec![node("a", "z1", GI), node("b", "z2", GI)],
                count: 2,
                existing: vec!["a".into()],
                selector: None,
                want: Err((2, 1)),
            },
            Case {
                name: "duplicate node entries do not count twice",
                nodes: vec![node("a", "z1", GI), node("a", "z1", GI)],
                count: 2,
                existing: vec![],
                selector: None,
                want: Err((2, 1)),
            },
            Case {
                name: "same zone: spread by hostname then most free space",
                nodes: vec![
                    labelled(node("a", "", GI), HOSTNAME_LABEL, "h1"),
                    labelled(node("b", "", 3 * GI), HOSTNAME_LABEL, "h1"),
                    labelled(node("c", "", 2 * GI), HOSTNAME_LABEL, "h2"),
                ],
                count: 2,
                existing: vec![],
                selector: None,
                want: Ok(vec!["b", "c"]),
            },
            Case {
                name: "a cordoned node gets no new replica",
                nodes: vec![
                    cordoned(node("a", "z1", 9 * GI)),
                    node("b", "z2", GI),
                    node("c", "z3", GI),
                ],
                count: 2,
                existing: vec![],
                selector: None,
                want: Ok(vec!["b", "c"]),
            },
            Case {
                name: "cordoned nodes do not count toward the nodes available",
                nodes: vec![cordoned(node("a", "z1", GI)), node("b", "z2", GI)],
                count: 2,
                existing: vec![],
                selector: None,
                want: Err((2, 1)),
            },
            Case {
                name: "a cordoned node's existing replica still counts toward the spread",
                nodes: vec![
                    cordoned(node("a1", "z1", GI)),
                    node("a2", "z1", 9 * GI),
                    node("b1", "z2", GI),
                ],
                count: 1,
                existing: vec!["a1".into()],
                selector: None,
                want: Ok(vec!["b1"]),
            },
            Case {
                name: "nodes outside the storage node selector are never chosen",
                nodes: vec![
                    not_storage(node("cp", "z1", 9 * GI)),
                    node("w1", "z2", GI),
                    node("w2", "z3", GI),
                ],
                count: 3,
                existing: vec![],
                selector: None,
                want: Err((3, 2)),
            },
            Case {
                name: "zero replicas needs nothing",
                nodes: vec![],
                count: 0,
                existing: vec![],
                selector: None,
                want: Ok(vec![]),
            },
        ];
        for c in cases {
            let req = PlacementRequest {
                count: c.count,
                size_bytes: GI,
                node_selector: c.selector.as_ref(),
                topology_key: None,
                existing_nodes: &c.existing,
                excluded_nodes: &[],
            };
            let got = place(&c.nodes, &req).map_err(|e| (e.needed, e.available));
            let want = c
                .want
                .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(got, want, "case: {}", c.name);
        }
    }

    #[test]
    fn custom_topology_key_spreads_by_that_label() {
        let nodes = vec![
            labelled(node("a", "z1", GI), "rack", "r1"),
            labelled(node("b", "z2", GI), "rack", "r1"),
            labelled(node("c", "z1", GI), "rack", "r2"),
        ];
        let req = PlacementRequest {
            count: 2,
            size_bytes: GI,
            topology_key: Some("rack"),
            ..Default::default()
        };
        let got = place(&nodes, &req).unwrap();
        assert_eq!(got, vec!["a", "c"]);
        assert_eq!(
            zones_of(&nodes, &got).len(),
            1,
            "rack spread wins over zones"
        );
    }

    #[test]
    fn insufficient_nodes_message_says_why_each_node_was_skipped() {
        let nodes = vec![
            dead(node("a", "z1", GI)),
            node("b", "z2", 1),
            labelled(node("c", "z3", GI), "disk", "hdd"),
            node("d", "z4", GI),
            node("e", "z5", GI),
        ];
        let sel = BTreeMap::from([("disk".to_string(), "hdd".to_string())]);
        let existing = vec!["d".to_string()];
        let excluded = vec!["e".to_string()];
        let mut req = PlacementRequest {
            count: 2,
            size_bytes: GI,
            existing_nodes: &existing,
            excluded_nodes: &excluded,
            ..Default::default()
        };
        req.node_selector = None;
        let err = place(&nodes, &req).unwrap_err();
        assert_eq!((err.needed, err.available, err.total), (2, 1, 5));
        assert_eq!(
            err.ineligible,
            Ineligible {
                not_live: 1,
                already_hold_replica: 1,
                not_storage_node: 0,
                cordoned: 0,
                selector_mismatch: 0,
                not_enough_space: 1,
                excluded: 1
            }
        );
        req.node_selector = Some(&sel);
        let err = place(&nodes, &req).unwrap_err();
        assert_eq!(err.available, 1);
        assert_eq!(err.ineligible.selector_mismatch, 2, "b and e lack disk=hdd");
        assert_eq!(
            (err.ineligible.not_enough_space, err.ineligible.excluded),
            (0, 0)
        );
        let msg = err.to_string();
        assert!(
            msg.contains("need 2 node(s)") && msg.contains("only 1 eligible"),
            "{msg}"
        );
    }

    #[test]
    fn insufficient_nodes_message_counts_cordoned_and_non_storage_nodes() {
        let nodes = vec![
            cordoned(node("a", "z1", GI)),
            not_storage(node("b", "z2", GI)),
            node("c", "z3", GI),
        ];
        let req = PlacementRequest {
            count: 2,
            size_bytes: GI,
            ..Default::default()
        };
        let err = place(&nodes, &req).unwrap_err();
        assert_eq!(
            (err.ineligible.cordoned, err.ineligible.not_storage_node),
            (1, 1)
        );
        let msg = err.to_string();
        assert!(
            msg.contains("1 cordoned")
                && msg.contains("1 outside the operator's storage node selector"),
            "{msg}"
        );
    }

    #[test]
    fn storage_node_selector_parses_and_matches_like_kubernetes() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let worker = labels(&[("blockvol.io/storage", "true"), ("disk", "ssd")]);
        let control = labels(&[("node-role.kubernetes.io/control-plane", "")]);
        let table: &[(&str, bool, bool)] = &[
            // selector, matches worker, matches control plane
            ("", true, true),
            ("blockvol.io/storage=true", true, false),
            ("blockvol.io/storage==true", true, false),
            ("disk!=hdd", true, true),
            ("disk!=ssd", false, true),
            ("!node-role.kubernetes.io/control-plane", true, false),
            ("node-role.kubernetes.io/control-plane", false, true),
            ("blockvol.io/storage=true, disk=ssd", true, false),
            ("blockvol.io/storage=true,disk=hdd", false, false),
        ];
        for (sel, w, c) in table {
            let parsed: StorageNodeSelector = sel.parse().unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(parsed.matches(&worker), *w, "{sel:?} on the worker");
            assert_eq!(parsed.matches(&control), *c, "{sel:?} on the control plane");
        }
        for bad in ["=x", "a b=c", "disk=ss d", "-disk", "x/=y", "k=v-"] {
            let err = bad.parse::<StorageNodeSelector>().expect_err(bad);
            assert!(err.to_string().contains("is invalid"), "{err}");
        }
    }

    #[test]
    fn result_nodes_are_distinct_and_eligible_for_many_shapes() {
        // Exhaustive over small shapes: never a duplicate, never a dead or full node.
        for n in 0..7usize {
            for count in 0..6usize {
                let nodes: Vec<_> = (0..n)
                    .map(|i| {
                        let mut c = node(
                            &format!("n{i}"),
                            &format!("z{}", i % 3),
                            GI * (i as u64 % 3),
                        );
                        c.live = i % 4 != 3;
                        c
                    })
                    .collect();
                let req = PlacementRequest {
                    count,
                    size_bytes: GI,
                    ..Default::default()
                };
                let eligible = nodes
                    .iter()
                    .filter(|c| c.live && c.free_bytes >= GI)
                    .count();
                match place(&nodes, &req) {
                    Ok(got) => {
                        assert_eq!(got.len(), count);
                        let set: BTreeSet<_> = got.iter().collect();
                        assert_eq!(set.len(), count, "duplicates in {got:?}");
                        for g in &got {
                            let c = nodes.iter().find(|c| &c.name == g).unwrap();
                            assert!(c.live && c.free_bytes >= GI);
                        }
                        let zones = zones_of(&nodes, &got).len();
                        let eligible_zones: BTreeSet<_> = nodes
                            .iter()
                            .filter(|c| c.live && c.free_bytes >= GI)
                            .map(|c| domain(c, ZONE_LABEL))
                            .collect();
                        assert_eq!(zones, count.min(eligible_zones.len()), "spread {got:?}");
                    }
                    Err(e) => {
                        assert!(eligible < count);
                        assert_eq!((e.needed, e.available), (count, eligible));
                    }
                }
            }
        }
    }
}
