//! Engine vs plain file, same access pattern, same run: 4 KiB random writes with a
//! flush every 32, 4 KiB random reads, and 1 MiB sequential writes with a flush every
//! 16 MiB. The baseline is pwrite/pread/fdatasync on a file of the same size. Engine
//! and file runs are interleaved (A B A B ...) because a shared machine is noisy;
//! medians and the min–max of the per-pair ratio are printed.
//!
//! Settings: BLOCKVOL_BENCH_DIR (default: the system temp dir), BLOCKVOL_BENCH_REPS
//! (default 3), BLOCKVOL_BENCH_SCALE (multiplies the op counts, default 1).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use engine::{CreateOptions, DurabilityMode, Epoch, Lba, Volume, VolumeConfig};

const BS: usize = 4096;
const SIZE: u64 = 256 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn plain_file(path: &Path) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(SIZE).unwrap();
    f
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `engine` and `file` `reps` times interleaved and prints the summary.
fn compare(
    name: &str,
    ops: u64,
    bytes: u64,
    reps: u64,
    mut engine: impl FnMut() -> Duration,
    mut file: impl FnMut() -> Duration,
) {
    let (mut e, mut f, mut r) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let de = engine().as_secs_f64();
        let df = file().as_secs_f64();
        e.push(ops as f64 / de);
        f.push(ops as f64 / df);
        r.push(df / de);
    }
    let (emin, emax) = (
        r.iter().cloned().fold(f64::MAX, f64::min),
        r.iter().cloned().fold(0.0, f64::max),
    );
    let mib = bytes as f64 / ops as f64 / (1 << 20) as f64;
    let (me, mf) = (median(&mut e), median(&mut f));
    println!(
        "{name:<28} engine {me:>9.0} op/s {:>7.1} MiB/s | file {mf:>9.0} op/s {:>7.1} MiB/s | engine/plain = {:.2} (median; min {emin:.2}, max {emax:.2})",
        me * mib,
        mf * mib,
        median(&mut r),
    );
}

fn main() {
    let dir = std::env::var("BLOCKVOL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let reps = env_u64("BLOCKVOL_BENCH_REPS", 3).max(1);
    let scale = env_u64("BLOCKVOL_BENCH_SCALE", 1).max(1);
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    let blocks = SIZE / BS as u64;
    let opts = CreateOptions {
        size_bytes: SIZE,
        block_size: BS as u32,
        wal_size_bytes: 64 << 20,
        durability: DurabilityMode::Async,
        epoch: Epoch(1),
    };
    let vol = Volume::create_file(
        &tmp.path().join("engine.img"),
        opts,
        VolumeConfig::default(),
    )
    .unwrap();
    let file = plain_file(&tmp.path().join("plain.img"));
    println!(
        "engine_bench: dir {}, volume {} MiB, {reps} interleaved reps",
        dir.display(),
        SIZE >> 20
    );

    let n = 10_000 * scale;
    let buf = vec![0xA5u8; BS];
    let mut rng = Rng(0x1234_5678);
    let lbas: Vec<u64> = (0..n).map(|_| rng.next() % blocks).collect();
    compare(
        "4KiB randwrite, flush/32",
        n,
        n * BS as u64,
        reps,
        || {
            let t = Instant::now();
            for (i, lba) in lbas.iter().enumerate() {
                vol.write(Lba(*lba), &buf).unwrap();
                if i % 32 == 31 {
                    vol.flush().unwrap();
                }
            }
            vol.flush().unwrap();
            t.elapsed()
        },
        || {
            let t = Instant::now();
            for (i, lba) in lbas.iter().enumerate() {
                file.write_all_at(&buf, lba * BS as u64).unwrap();
                if i % 32 == 31 {
                    file.sync_data().unwrap();
                }
            }
            file.sync_data().unwrap();
            t.elapsed()
        },
    );

    // Reads with the flusher idle (everything checkpointed first).
    vol.checkpoint().unwrap();
    let reads: Vec<u64> = (0..n * 2).map(|_| rng.next() % blocks).collect();
    let mut rbuf = vec![0u8; BS];
    let mut rbuf2 = vec![0u8; BS];
    compare(
        "4KiB randread",
        n * 2,
        n * 2 * BS as u64,
        reps,
        || {
            let t = Instant::now();
            for lba in &reads {
                vol.read(Lba(*lba), &mut rbuf).unwrap();
            }
            t.elapsed()
        },
        || {
            let t = Instant::now();
            for lba in &reads {
                file.read_exact_at(&mut rbuf2, lba * BS as u64).unwrap();
            }
            t.elapsed()
        },
    );

    let mb = vec![0x5Au8; 1 << 20];
    let count = (SIZE >> 21) * scale;
    let mut e_off = 0u64;
    let mut f_off = 0u64;
    compare(
        "1MiB seqwrite, flush/16MiB",
        count,
        count << 20,
        reps,
        || {
            let t = Instant::now();
            for i in 0..count {
                vol.write(Lba((e_off % (SIZE >> 20)) * 256), &mb).unwrap();
                e_off += 1;
                if i % 16 == 15 {
                    vol.flush().unwrap();
                }
            }
            vol.flush().unwrap();
            t.elapsed()
        },
        || {
            let t = Instant::now();
            for i in 0..count {
                file.write_all_at(&mb, (f_off % (SIZE >> 20)) << 20)
                    .unwrap();
                f_off += 1;
                if i % 16 == 15 {
                    file.sync_data().unwrap();
                }
            }
            file.sync_data().unwrap();
            t.elapsed()
        },
    );
    let stats = vol.stats();
    println!(
        "engine stats: group-commit syncs {}, flusher cycles {}",
        stats.group_commit_syncs, stats.flusher_cycles
    );
    vol.close().unwrap();
}
