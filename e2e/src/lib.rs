//! Test harness and cluster scenarios for blockvol: a local Kubernetes control plane
//! built from pinned binaries, and scenario tests that run against any cluster.
