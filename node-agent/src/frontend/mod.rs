//! How block devices reach the node's volumes: the NBD server and its exports
//! ([`nbd`]), the forwarding export every attached device goes through, which sends each
//! request to wherever the volume's primary serves ([`forwarding`]), and the wrapper that
//! counts an export's traffic ([`metered`]).

pub mod forwarding;
pub mod metered;
pub mod nbd;
