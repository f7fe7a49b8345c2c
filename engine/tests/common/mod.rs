//! Shared helpers for the engine's integration tests.
#![allow(dead_code)]

pub mod cluster;
pub mod receiver;
pub mod rng;

use engine::{CreateOptions, DurabilityMode, Epoch, SimDisk, Volume, VolumeConfig};

pub const BS: usize = 4096;

/// Small geometry so tests wrap the WAL quickly.
pub fn small_opts(blocks: u64, wal_size_bytes: u64) -> CreateOptions {
    CreateOptions {
        size_bytes: blocks * BS as u64,
        block_size: BS as u32,
        wal_size_bytes,
        durability: DurabilityMode::SyncAll,
        epoch: Epoch(1),
    }
}

/// A config whose background flusher effectively never runs on its own, so a test
/// decides when checkpoints happen (writers still kick it under WAL pressure).
pub fn manual_cfg() -> VolumeConfig {
    VolumeConfig {
        flush_interval_ms: 3_600_000,
        wal_full_timeout_ms: 2_000,
        ..VolumeConfig::default()
    }
}

/// `manual_cfg` without WAL history: a checkpoint recycles everything no floor holds.
pub fn no_history_cfg() -> VolumeConfig {
    VolumeConfig {
        wal_history_ms: 0,
        ..manual_cfg()
    }
}

/// A volume of `blocks` blocks and a `wal`-byte WAL on a fresh SimDisk, with `cfg`.
pub fn sim_volume_with(name: &str, blocks: u64, wal: u64, cfg: VolumeConfig) -> (SimDisk, Volume) {
    let disk = SimDisk::new(name);
    let vol = Volume::create(Box::new(disk.clone()), small_opts(blocks, wal), cfg)
        .expect("create volume");
    (disk, vol)
}

/// A volume on a SimDisk that keeps no WAL history.
pub fn sim_volume_without_history(name: &str, blocks: u64, wal: u64) -> (SimDisk, Volume) {
    sim_volume_with(name, blocks, wal, no_history_cfg())
}

/// A volume on a SimDisk whose checkpoints the test decides ([`manual_cfg`]).
pub fn sim_volume(name: &str, blocks: u64, wal: u64) -> (SimDisk, Volume) {
    sim_volume_with(name, blocks, wal, manual_cfg())
}

/// A block filled with a pattern derived from `tag`.
pub fn block(tag: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (i, chunk) in b.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(tag.wrapping_mul(0x9E37_79B9) ^ i as u64).to_le_bytes());
    }
    b
}

pub fn read_block(vol: &Volume, lba: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    vol.read(engine::Lba(lba), &mut b).expect("read");
    b
}

/// The number in environment variable `name`, or `default` when it is unset or not a
/// number.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seed from BLOCKVOL_TEST_SEED or the clock; printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("BLOCKVOL_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {s} (set BLOCKVOL_TEST_SEED={s} to replay)");
    s
}
