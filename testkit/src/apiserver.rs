//! Where a test of the operator or an agent against a real API server begins: a control
//! plane with blockvol's CRDs and the test's namespace, a client for it, and the
//! BlockVolumes the test asks for.

use api::{BlockVolume, BlockVolumeSpec};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::controlplane::{ControlPlane, ControlPlaneOptions};

/// Starts a control plane with the default options, applies the CRDs and creates
/// `namespace`; panics (failing the test) when it cannot.
pub async fn start(namespace: &str) -> (ControlPlane, Client) {
    let cp = ControlPlane::start_with_crds(ControlPlaneOptions::default(), namespace)
        .await
        .expect("control plane with the CRDs starts");
    let client = cp.client();
    (cp, client)
}

/// Creates BlockVolume `name` of `size` (a quantity such as "64Mi") with the spec's
/// defaults otherwise; panics when the API server refuses it.
pub async fn create_volume(client: &Client, name: &str, size: &str) -> BlockVolume {
    Api::<BlockVolume>::all(client.clone())
        .create(
            &PostParams::default(),
            &BlockVolume::new(name, BlockVolumeSpec::with_size(size)),
        )
        .await
        .expect("create volume")
}
