//! A small seeded generator for tests and fault schedules: the same seed gives the same
//! sequence, so a failing trial is rerun by setting the seed it printed.

/// A small deterministic generator (splitmix64): the same seed gives the same faults,
/// so a failing trial is rerun by setting the seed it printed.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        SeededRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the next values, eight little-endian bytes each (the last one
    /// cut to fit).
    pub fn fill_bytes(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// The next `len` bytes of the sequence ([`SeededRng::fill_bytes`]): deterministic
    /// data a test writes and recomputes to check what it reads back.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.fill_bytes(&mut buf);
        buf
    }

    /// A value in `lo..=hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        let i = self.next_u64() % items.len() as u64;
        items.get(i as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_rng_repeats_and_stays_in_range() {
        let a: Vec<u64> = {
            let mut r = SeededRng::new(7);
            (0..100).map(|_| r.range(3, 9)).collect()
        };
        let b: Vec<u64> = {
            let mut r = SeededRng::new(7);
            (0..100).map(|_| r.range(3, 9)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|v| (3..=9).contains(v)));
        assert!(a.iter().any(|v| *v != a[0]), "not constant");
        assert_eq!(SeededRng::new(1).range(5, 5), 5);
        assert_eq!(SeededRng::new(1).pick::<u8>(&[]), None);
    }

    #[test]
    fn fill_bytes_continues_the_sequence_in_little_endian_words() {
        let mut words = SeededRng::new(3);
        let want: Vec<u8> = (0..2)
            .flat_map(|_| words.next_u64().to_le_bytes())
            .take(13)
            .collect();
        let mut buf = [0u8; 13];
        SeededRng::new(3).fill_bytes(&mut buf);
        assert_eq!(buf.to_vec(), want);
        assert_eq!(SeededRng::new(3).bytes(13), want);
    }
}
