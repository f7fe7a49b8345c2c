//! The blockvol CSI driver: Identity, Controller and Node services.
