//! Newtypes for the engine's units. An LSN, an epoch, a block address and a WAL byte
//! position are all `u64` underneath; keeping them distinct makes mixing them (an LSN
//! stored in a byte-position field, say) a compile error.

use std::fmt;

macro_rules! newtype_u64 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw integer.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

newtype_u64!(
    /// Log sequence number: 1 for the first WAL entry, +1 per entry, dense. `Lsn(0)`
    /// means "nothing".
    Lsn
);
newtype_u64!(
    /// Fencing epoch. Persisted in the superblock, never lowered.
    Epoch
);
newtype_u64!(
    /// Logical block address, in units of the volume's block size.
    Lba
);
newtype_u64!(
    /// Logical byte position in the circular WAL. It only grows; the physical offset
    /// inside the WAL region is `pos % wal_size`.
    WalPos
);

impl Lsn {
    /// The next LSN.
    pub const fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}

/// What the volume promises about replica durability. The engine stores it; the
/// replication layer acts on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DurabilityMode {
    /// A flush is acknowledged only when every committed in-sync replica has it on disk.
    #[default]
    SyncAll,
    /// A flush is acknowledged when the primary has it on disk.
    Async,
}

impl DurabilityMode {
    /// On-disk code.
    pub const fn to_u8(self) -> u8 {
        match self {
            DurabilityMode::SyncAll => 0,
            DurabilityMode::Async => 1,
        }
    }

    /// Parses the on-disk code.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(DurabilityMode::SyncAll),
            1 => Some(DurabilityMode::Async),
            _ => None,
        }
    }
}
