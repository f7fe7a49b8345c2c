//! Value types the replication protocol speaks in: LSNs, epochs, LBAs, stable replica and
//! volume identities, and the WAL entry as it is shipped. Distinct newtypes keep an LSN from
//! being used as a byte position or an epoch as a generation.

use std::fmt;

// Addresses are values: `core::net` holds the address types (the ones the standard
// library's net module re-exports) without any socket, so this module does no network IO.
use core::net::SocketAddr;

use super::{Error, Result};

pub use crate::storage::wal::{EntryKind, WalEntry};
pub use crate::types::{Epoch, Lba, Lsn};

/// Generation of the committed in-sync set (bumped by the control plane on every change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Generation(pub u64);

/// Longest identity string accepted (a Kubernetes object name).
pub const IDENT_LEN_MAX: usize = 253;

fn validate_ident(what: &'static str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > IDENT_LEN_MAX {
        return Err(Error::InvalidIdentity {
            what,
            reason: format!("length {} not in 1..={IDENT_LEN_MAX}", s.len()),
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'/'))
    {
        return Err(Error::InvalidIdentity {
            what,
            reason: "allowed characters are [A-Za-z0-9-._/]".into(),
        });
    }
    Ok(())
}

/// Stable identity of a replica (never an address: an address change keeps the identity).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId(String);

impl ReplicaId {
    pub fn new(s: impl Into<String>) -> Result<Self> {
        let s = s.into();
        validate_ident("replica id", &s)?;
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Volume identity; connections multiplex volumes by it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(String);

impl VolumeId {
    pub fn new(s: impl Into<String>) -> Result<Self> {
        let s = s.into();
        validate_ident("volume id", &s)?;
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Canonical `ip:port` endpoint of a replica's data port. Wildcard or empty hosts are refused
/// because a peer cannot dial them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint(SocketAddr);

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Result<Self> {
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return Err(Error::InvalidEndpoint(addr.to_string()));
        }
        Ok(Self(addr))
    }
    pub fn parse(s: &str) -> Result<Self> {
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| Error::InvalidEndpoint(s.to_string()))?;
        Self::new(addr)
    }
    pub fn addr(&self) -> SocketAddr {
        self.0
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Bytes an entry costs in the log; used by the retention byte budget.
pub fn entry_bytes(e: &WalEntry) -> u64 {
    e.encoded_len() as u64
}
