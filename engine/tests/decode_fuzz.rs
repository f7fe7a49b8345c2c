//! Decoders of untrusted bytes (WAL entries from peers or disk, records, superblocks)
//! never panic on random or mutated input, and never accept a mutated encoding.

use engine::storage::superblock::Superblock;
use engine::storage::wal::{RecordHeader, encode_record};
use engine::{DurabilityMode, EntryKind, Epoch, Lba, Lsn, WalEntry, WalPos};
use proptest::prelude::*;

fn entry() -> impl Strategy<Value = WalEntry> {
    (
        any::<u64>(),
        any::<u64>(),
        0u8..3,
        any::<u64>(),
        1u32..8,
        any::<u8>(),
    )
        .prop_map(|(lsn, epoch, k, lba, blocks, fill)| {
            let kind = [EntryKind::Write, EntryKind::Trim, EntryKind::Zero][k as usize];
            let data = if kind == EntryKind::Write {
                vec![fill; blocks as usize * 512]
            } else {
                vec![]
            };
            WalEntry {
                lsn: Lsn(lsn),
                epoch: Epoch(epoch),
                kind,
                lba: Lba(lba),
                blocks,
                data,
            }
        })
}

fn superblock() -> impl Strategy<Value = Superblock> {
    (any::<u64>(), any::<[u8; 16]>(), 1u64..1000, 0u64..100).prop_map(|(seq, uuid, blocks, ck)| {
        Superblock {
            flags: 0,
            seq,
            uuid,
            volume_size: blocks * 4096,
            block_size: 4096,
            durability: DurabilityMode::Async,
            wal_offset: engine::storage::superblock::WAL_OFFSET,
            wal_size: 1 << 20,
            extent_offset: engine::storage::superblock::WAL_OFFSET + (1 << 20),
            checkpoint_lsn: Lsn(ck),
            copied_lsn: Lsn(ck),
            extent_limit_lsn: Lsn(0),
            wal_tail_pos: WalPos(ck * 100),
            wal_tail_lsn: Lsn(ck + 1),
            wal_gen: 3,
            wal_tail_gen: 2,
            checkpoint_epoch: Epoch(1),
            epoch: Epoch(2),
            prepared_size: 0,
            expand_epoch: 0,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn wal_entry_decode_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok((e, n)) = WalEntry::decode(&bytes) {
            prop_assert!(n <= bytes.len());
            prop_assert_eq!(e.encode(), bytes[..n].to_vec());
        }
        let _ = RecordHeader::parse(&bytes).map(|h| h.verify(&bytes));
        let _ = Superblock::decode(&bytes);
    }

    #[test]
    fn wal_entry_roundtrips_and_rejects_every_mutation(
        e in entry(),
        idx in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = e.encode();
        let (d, n) = WalEntry::decode(&bytes).unwrap();
        prop_assert_eq!(&d, &e);
        prop_assert_eq!(n, bytes.len());
        let mut m = bytes.clone();
        m[idx.index(bytes.len())] ^= xor;
        prop_assert!(WalEntry::decode(&m).is_err());
        let short = &bytes[..cut.index(bytes.len())];
        prop_assert!(WalEntry::decode(short).is_err());
    }

    #[test]
    fn record_rejects_every_mutation(e in entry(), wal_gen in any::<u64>(), idx in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let rec = encode_record(&e, wal_gen, None);
        let h = RecordHeader::parse(&rec).unwrap();
        prop_assert!(h.verify(&rec).is_ok());
        let mut m = rec.clone();
        m[idx.index(rec.len())] ^= xor;
        let ok = RecordHeader::parse(&m).and_then(|h| h.verify(&m)).is_ok();
        prop_assert!(!ok, "mutated record accepted");
    }

    #[test]
    fn superblock_with_valid_crc_but_arbitrary_fields_never_panics(
        f in proptest::collection::vec(any::<u64>(), 12),
        bs in any::<u32>(),
        flags in any::<u32>(),
        uuid in any::<[u8; 16]>(),
    ) {
        let sb = Superblock {
            flags,
            seq: f[0],
            uuid,
            volume_size: f[1],
            block_size: bs,
            durability: DurabilityMode::SyncAll,
            wal_offset: f[2] % 3 * 4096,
            wal_size: f[3],
            extent_offset: f[4],
            checkpoint_lsn: Lsn(f[5]),
            copied_lsn: Lsn(f[5].wrapping_add(f[6] % 3)),
            extent_limit_lsn: Lsn(f[7] ^ f[8]),
            wal_tail_pos: WalPos(f[6]),
            wal_tail_lsn: Lsn(f[7]),
            wal_gen: f[8],
            wal_tail_gen: f[9],
            checkpoint_epoch: Epoch(f[0] ^ f[1]),
            epoch: Epoch(f[10]),
            prepared_size: f[11],
            expand_epoch: 0,
        };
        if let Ok(d) = Superblock::decode(&sb.encode()) {
            prop_assert_eq!(d, sb);
        }
    }

    #[test]
    fn superblock_decode_rejects_mutations_and_never_panics(
        sb in superblock(),
        idx in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        cut in any::<prop::sample::Index>(),
    ) {
        let b = sb.encode();
        prop_assert_eq!(Superblock::decode(&b).unwrap(), sb);
        let mut m = b.clone();
        m[idx.index(b.len())] ^= xor;
        prop_assert!(Superblock::decode(&m).is_err());
        prop_assert!(Superblock::decode(&b[..cut.index(b.len())]).is_err());
    }
}
