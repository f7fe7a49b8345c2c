//! The blockvol operator: the only writer of placement, epochs and the committed
//! in-sync set of each `BlockVolume`. Decisions are pure functions (one module each,
//! table-tested); [`controller`] observes the API, runs [`plan`] and performs it.

pub mod expansion;
pub mod in_sync;
pub mod model;
pub mod placement;
pub mod plan;
pub mod promotion;
pub mod recovery;
pub mod replacement;
pub mod status;
