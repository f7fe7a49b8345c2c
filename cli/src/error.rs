//! Errors of `kubectl blockvol`. Every message names the object involved and what to do
//! next, because it is printed to a person at a terminal and nothing else.

use std::path::PathBuf;

/// What went wrong in a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("BlockVolume {name} not found; `kubectl get bv` lists volumes")]
    VolumeNotFound { name: String },
    #[error(
        "no BlockVolume {name}, and no PersistentVolumeClaim {name} in namespace {namespace}; \
         `kubectl get bv` lists volumes, `kubectl get pvc -A` lists claims"
    )]
    NothingNamed { name: String, namespace: String },
    #[error(
        "PersistentVolumeClaim {namespace}/{name} not found; `kubectl get pvc -n {namespace}` lists claims"
    )]
    ClaimNotFound { namespace: String, name: String },
    #[error(
        "PersistentVolumeClaim {namespace}/{name} is not bound to a volume yet; \
         `kubectl describe pvc -n {namespace} {name}` shows why"
    )]
    ClaimNotBound { namespace: String, name: String },
    #[error(
        "PersistentVolume {pv} (bound to {claim}) is not a blockvol volume (driver {driver}); \
         only volumes of csi.blockvol.io can be described"
    )]
    NotBlockvol {
        pv: String,
        claim: String,
        driver: String,
    },
    #[error(
        "BlockVolume {volume} has no replica on node {node} (replicas are on: {nodes}); \
         a primary can only move to a node holding an in-sync replica"
    )]
    NoReplicaOnNode {
        volume: String,
        node: String,
        nodes: String,
    },
    #[error("the primary move of BlockVolume {volume} to {node} was {outcome}")]
    MoveFailed {
        volume: String,
        node: String,
        outcome: String,
    },
    #[error(
        "timed out after {waited_s}s waiting for the primary of BlockVolume {volume} to move to \
         {node} ({last}); the request stays set: `kubectl blockvol describe volume {volume}` \
         shows progress, `kubectl annotate bv {volume} blockvol.io/move-primary-to-` withdraws it"
    )]
    MoveTimedOut {
        volume: String,
        node: String,
        waited_s: u64,
        last: String,
    },
    #[error("BlockNode {name} not found; `kubectl get bn` lists the nodes with a blockvol agent")]
    NodeNotFound { name: String },
    #[error(
        "timed out after {waited_s}s waiting for node {node} to drain ({last}); the drain goes on: \
         `kubectl get bn {node}` shows progress, `kubectl describe bv` of a volume left shows why it waits, \
         `kubectl blockvol uncordon {node}` calls it off"
    )]
    DrainTimedOut {
        node: String,
        waited_s: u64,
        last: String,
    },
    #[error("{flag}: {message}")]
    InvalidArgument { flag: &'static str, message: String },
    #[error("BlockVolume {name} has an unusable spec.size: {message}")]
    BadSize { name: String, message: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    Archive { what: String, message: String },
    #[error(
        "cannot reach the Kubernetes API ({0}); check KUBECONFIG or --kubeconfig and `kubectl cluster-info`"
    )]
    Connect(String),
    #[error(
        "{what}: the blockvol CRDs are not installed in this cluster; apply them with \
         `kubectl apply --server-side -f deploy/crds/` (or install the Helm chart)"
    )]
    CrdsMissing { what: String },
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("encoding {what}: {message}")]
    Encode { what: &'static str, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A Kubernetes API error while doing `what` (a phrase such as "reading BlockVolume x").
    pub fn kube(what: impl Into<String>, source: kube::Error) -> Error {
        let what = what.into();
        let what = match &source {
            kube::Error::Api(s) if s.code == 403 => format!(
                "{what} was forbidden; your user needs RBAC access to it \
                 (`kubectl auth can-i --list` shows what you may do)"
            ),
            _ => what,
        };
        Error::Kube { what, source }
    }

    /// An error listing a blockvol kind: a 404 on a list means the kind is not served,
    /// i.e. the CRDs are not installed.
    pub fn kube_list(what: impl Into<String>, source: kube::Error) -> Error {
        if is_not_found(&source) {
            return Error::CrdsMissing { what: what.into() };
        }
        Error::kube(what, source)
    }
}

/// Whether a Kubernetes API error is a 404 for the object asked for.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
