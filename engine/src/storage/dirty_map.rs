//! The dirty map: for every block whose newest version is still only in the WAL, where
//! that version lives. Runs of blocks are stored as non-overlapping intervals so a trim
//! of a whole volume is one entry, not one per block. Inserts happen in LSN order under
//! the append lock, so a newer insert always replaces what it overlaps.

use std::collections::BTreeMap;

/// Where a dirty run's newest data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Block `start` of the run is at this logical WAL byte position; later blocks follow
    /// contiguously.
    Wal { data_pos: u64 },
    /// The run reads as zeros (TRIM or ZERO).
    Zero,
}

/// A run of dirty blocks `[start, end)` written by entry `lsn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub end: u64,
    pub lsn: u64,
    pub src: Source,
}

impl Run {
    /// The part of this run inside `[start, end)`, with the WAL position adjusted.
    fn clip(&self, start: u64, end: u64, block_size: u64) -> Run {
        let s = self.start.max(start);
        let e = self.end.min(end);
        let src = match self.src {
            Source::Wal { data_pos } => Source::Wal {
                data_pos: data_pos + (s - self.start) * block_size,
            },
            Source::Zero => Source::Zero,
        };
        Run {
            start: s,
            end: e,
            lsn: self.lsn,
            src,
        }
    }
}

/// Non-overlapping dirty runs keyed by first block.
#[derive(Clone, Debug)]
pub struct DirtyMap {
    runs: BTreeMap<u64, Run>,
    block_size: u64,
}

impl DirtyMap {
    /// An empty map for blocks of `block_size` bytes.
    pub fn new(block_size: u32) -> DirtyMap {
        DirtyMap {
            runs: BTreeMap::new(),
            block_size: u64::from(block_size),
        }
    }

    /// Number of runs.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether nothing is dirty.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Records that `[start, end)` now reads from `src` (entry `lsn`), replacing any
    /// overlapped part of older runs.
    pub fn insert(&mut self, start: u64, end: u64, lsn: u64, src: Source) {
        if start >= end {
            return;
        }
        let overlapping: Vec<u64> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(_, r)| r.end > start)
            .map(|(k, _)| *k)
            .collect();
        for k in overlapping {
            if let Some(old) = self.runs.remove(&k) {
                if old.start < start {
                    let left = old.clip(old.start, start, self.block_size);
                    self.runs.insert(left.start, left);
                }
                if old.end > end {
                    let right = old.clip(end, old.end, self.block_size);
                    self.runs.insert(right.start, right);
                }
            }
        }
        self.runs.insert(
            start,
            Run {
                start,
                end,
                lsn,
                src,
            },
        );
    }

    /// The dirty runs intersecting `[start, end)`, clipped to it, in block order.
    pub fn lookup(&self, start: u64, end: u64) -> Vec<Run> {
        let mut out: Vec<Run> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(_, r)| r.end > start)
            .map(|(_, r)| r.clip(start, end, self.block_size))
            .collect();
        out.reverse();
        out
    }

    /// Every run, in block order.
    pub fn runs(&self) -> Vec<Run> {
        self.runs.values().copied().collect()
    }

    /// Drops every run written by an entry with LSN <= `lsn` (it reached the extent).
    pub fn remove_up_to(&mut self, lsn: u64) {
        self.runs.retain(|_, r| r.lsn > lsn);
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.runs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_apply(model: &mut [Option<(u64, u64)>], start: u64, end: u64, lsn: u64) {
        for (b, slot) in model
            .iter_mut()
            .enumerate()
            .take(end as usize)
            .skip(start as usize)
        {
            *slot = Some((lsn, b as u64 - start));
        }
    }

    #[test]
    fn overlapping_inserts_split_older_runs_and_keep_wal_offsets() {
        let mut m = DirtyMap::new(512);
        let mut model = vec![None; 64];
        let ops = [
            (0u64, 10u64),
            (5, 7),
            (3, 20),
            (19, 30),
            (0, 1),
            (8, 9),
            (25, 64),
        ];
        for (i, (s, e)) in ops.iter().enumerate() {
            let lsn = i as u64 + 1;
            m.insert(
                *s,
                *e,
                lsn,
                Source::Wal {
                    data_pos: lsn * 100_000,
                },
            );
            model_apply(&mut model, *s, *e, lsn);
        }
        for b in 0..64u64 {
            let got = m.lookup(b, b + 1);
            match model[b as usize] {
                None => assert!(got.is_empty()),
                Some((lsn, off)) => {
                    assert_eq!(got.len(), 1);
                    assert_eq!(got[0].lsn, lsn);
                    assert_eq!(
                        got[0].src,
                        Source::Wal {
                            data_pos: lsn * 100_000 + off * 512
                        }
                    );
                }
            }
        }
        m.remove_up_to(4);
        assert!(m.runs().iter().all(|r| r.lsn > 4));
    }

    proptest::proptest! {
        #[test]
        fn dirty_map_matches_a_per_block_model(
            ops in proptest::collection::vec((0u64..64, 1u64..16, proptest::bool::ANY, 0u64..4), 1..60),
            probe in (0u64..64, 1u64..64),
        ) {
            let mut m = DirtyMap::new(512);
            let mut model: Vec<Option<(u64, Option<u64>)>> = vec![None; 128];
            for (i, (start, len, zero, remove)) in ops.into_iter().enumerate() {
                let lsn = i as u64 + 1;
                let end = start + len;
                let src = if zero { Source::Zero } else { Source::Wal { data_pos: lsn << 20 } };
                m.insert(start, end, lsn, src);
                for b in start..end {
                    model[b as usize] = Some((lsn, (!zero).then_some((lsn << 20) + (b - start) * 512)));
                }
                if remove == 0 {
                    let upto = lsn / 2;
                    m.remove_up_to(upto);
                    for slot in model.iter_mut() {
                        if slot.is_some_and(|(l, _)| l <= upto) {
                            *slot = None;
                        }
                    }
                }
            }
            let (s, n) = probe;
            let runs = m.lookup(s, s + n);
            let mut seen = vec![None; 128];
            let mut prev_end = s;
            for r in &runs {
                proptest::prop_assert!(r.start >= prev_end && r.start < r.end && r.end <= s + n);
                prev_end = r.end;
                for b in r.start..r.end {
                    let pos = match r.src {
                        Source::Zero => None,
                        Source::Wal { data_pos } => Some(data_pos + (b - r.start) * 512),
                    };
                    seen[b as usize] = Some((r.lsn, pos));
                }
            }
            for b in s..s + n {
                proptest::prop_assert_eq!(seen[b as usize], model[b as usize], "block {}", b);
            }
        }
    }
}
