//! The blockvol operator: the only writer of placement, epochs and the committed
//! in-sync set of each `BlockVolume`.
