//! WAL retention pins: WAL holds (a lagging replica's progress, a catch-up range), snapshot
//! holds (a rebuild base at the checkpoint plus its tail) and full-base holds. The minimum
//! held LSN is the floor the flusher must not recycle past.

use std::collections::BTreeMap;

use super::types::{Lsn, ReplicaId};
use super::{Error, Result};

/// Identifies one hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HoldId(pub u64);

/// What a hold keeps alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldKind {
    /// WAL entries at or above `floor`.
    Wal,
    /// A checkpoint snapshot; its tail (entries after the checkpoint) is held too.
    Snapshot,
    /// A full-extent base image; holds no WAL.
    FullBase,
}

#[derive(Debug, Clone)]
struct Hold {
    kind: HoldKind,
    owner: ReplicaId,
    floor: Option<Lsn>,
}

/// Tracks holds and computes the retention floor.
#[derive(Debug, Default)]
pub struct Pinner {
    next: u64,
    holds: BTreeMap<HoldId, Hold>,
}

impl Pinner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Holds WAL from `from` on; refused if `from` was already recycled.
    pub fn hold_wal(
        &mut self,
        owner: &ReplicaId,
        from: Lsn,
        retained_start: Lsn,
    ) -> Result<HoldId> {
        if from.next() < retained_start {
            return Err(Error::HoldRefused(format!(
                "WAL from {from} already recycled (retained start {retained_start})"
            )));
        }
        Ok(self.insert(HoldKind::Wal, owner, Some(from)))
    }

    /// Holds a checkpoint snapshot at `checkpoint` and the WAL tail after it.
    pub fn hold_snapshot(
        &mut self,
        owner: &ReplicaId,
        checkpoint: Lsn,
        retained_start: Lsn,
    ) -> Result<HoldId> {
        if checkpoint.next() < retained_start {
            return Err(Error::HoldRefused(format!(
                "tail after checkpoint {checkpoint} already recycled (retained start {retained_start})"
            )));
        }
        Ok(self.insert(HoldKind::Snapshot, owner, Some(checkpoint)))
    }

    /// Holds a full-base image (no WAL floor).
    pub fn hold_full_base(&mut self, owner: &ReplicaId) -> HoldId {
        self.insert(HoldKind::FullBase, owner, None)
    }

    fn insert(&mut self, kind: HoldKind, owner: &ReplicaId, floor: Option<Lsn>) -> HoldId {
        self.next += 1;
        let id = HoldId(self.next);
        self.holds.insert(
            id,
            Hold {
                kind,
                owner: owner.clone(),
                floor,
            },
        );
        id
    }

    /// Moves a WAL hold forward (never backward).
    pub fn advance(&mut self, id: HoldId, to: Lsn) {
        if let Some(h) = self.holds.get_mut(&id)
            && let Some(f) = h.floor.as_mut()
            && to > *f
        {
            *f = to;
        }
    }

    /// Releases a hold; returns whether it existed.
    pub fn release(&mut self, id: HoldId) -> bool {
        self.holds.remove(&id).is_some()
    }

    /// The floor for the flusher: the lowest LSN any hold needs.
    pub fn min_floor(&self) -> Option<Lsn> {
        self.holds.values().filter_map(|h| h.floor).min()
    }

    pub fn held_by(&self, owner: &ReplicaId) -> usize {
        self.holds.values().filter(|h| &h.owner == owner).count()
    }

    pub fn len(&self) -> usize {
        self.holds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.holds.is_empty()
    }

    pub fn kind(&self, id: HoldId) -> Option<HoldKind> {
        self.holds.get(&id).map(|h| h.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ReplicaId {
        ReplicaId::new(s).unwrap()
    }

    #[test]
    fn floor_is_minimum_of_wal_and_snapshot_holds_and_ignores_full_base() {
        let mut p = Pinner::new();
        let a = p.hold_wal(&r("a"), Lsn(10), Lsn(1)).unwrap();
        p.hold_snapshot(&r("b"), Lsn(7), Lsn(1)).unwrap();
        p.hold_full_base(&r("c"));
        assert_eq!(p.min_floor(), Some(Lsn(7)));
        p.advance(a, Lsn(20));
        assert_eq!(p.min_floor(), Some(Lsn(7)));
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn wal_hold_below_retained_start_is_refused() {
        let mut p = Pinner::new();
        assert!(p.hold_wal(&r("a"), Lsn(3), Lsn(10)).is_err());
        // R = S-1 is still recoverable (entries from R+1 exist).
        assert!(p.hold_wal(&r("a"), Lsn(9), Lsn(10)).is_ok());
    }

    #[test]
    fn releasing_all_holds_clears_the_floor() {
        let mut p = Pinner::new();
        let a = p.hold_wal(&r("a"), Lsn(5), Lsn(1)).unwrap();
        assert!(p.release(a));
        assert!(!p.release(a));
        assert_eq!(p.min_floor(), None);
    }
}
