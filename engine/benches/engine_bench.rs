//! Engine vs plain file, same access pattern, same run: 4 KiB random writes with a
//! flush every 32, 4 KiB random reads, and 1 MiB sequential writes. The baseline is
//! pwrite/pread/fdatasync on a file of the same size. Prints throughput and the
//! engine/baseline ratio. Files go to BLOCKVOL_BENCH_DIR (default: the system temp dir);
//! sizes scale with BLOCKVOL_BENCH_SCALE (default 1).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use engine::{CreateOptions, DurabilityMode, Epoch, Lba, Volume, VolumeConfig};

const BS: usize = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn report(name: &str, ops: u64, bytes: u64, engine: Duration, base: Duration) {
    let rate = |d: Duration| ops as f64 / d.as_secs_f64();
    let mbs = |d: Duration| bytes as f64 / d.as_secs_f64() / (1 << 20) as f64;
    println!(
        "{name:<34} engine {:>9.0} op/s {:>8.1} MiB/s | file {:>9.0} op/s {:>8.1} MiB/s | engine/file {:.2}",
        rate(engine),
        mbs(engine),
        rate(base),
        mbs(base),
        base.as_secs_f64() / engine.as_secs_f64()
    );
}

fn plain_file(path: &Path, size: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    f
}

fn main() {
    let dir = std::env::var("BLOCKVOL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let scale: u64 = std::env::var("BLOCKVOL_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    let size: u64 = 256 << 20;
    let blocks = size / BS as u64;
    let opts = CreateOptions {
        size_bytes: size,
        block_size: BS as u32,
        wal_size_bytes: 64 << 20,
        durability: DurabilityMode::Async,
        epoch: Epoch(1),
    };
    let cfg = VolumeConfig::default();
    let vol = Volume::create_file(&tmp.path().join("engine.img"), opts, cfg).unwrap();
    let file = plain_file(&tmp.path().join("plain.img"), size);
    println!(
        "engine_bench: dir {}, volume {} MiB",
        dir.display(),
        size >> 20
    );

    // 4 KiB random writes, flush every 32.
    let n = 20_000 * scale;
    let buf = vec![0xA5u8; BS];
    let mut rng = Rng(0x1234_5678);
    let lbas: Vec<u64> = (0..n).map(|_| rng.next() % blocks).collect();
    let t = Instant::now();
    for (i, lba) in lbas.iter().enumerate() {
        vol.write(Lba(*lba), &buf).unwrap();
        if i % 32 == 31 {
            vol.flush().unwrap();
        }
    }
    vol.flush().unwrap();
    let e = t.elapsed();
    let t = Instant::now();
    for (i, lba) in lbas.iter().enumerate() {
        file.write_all_at(&buf, lba * BS as u64).unwrap();
        if i % 32 == 31 {
            file.sync_data().unwrap();
        }
    }
    file.sync_data().unwrap();
    let b = t.elapsed();
    report("4KiB randwrite, flush/32", n, n * BS as u64, e, b);

    // 4 KiB random reads (half of them still dirty in the WAL, half from the extent).
    let mut rbuf = vec![0u8; BS];
    let reads: Vec<u64> = (0..n).map(|_| rng.next() % blocks).collect();
    let t = Instant::now();
    for lba in &reads {
        vol.read(Lba(*lba), &mut rbuf).unwrap();
    }
    let e = t.elapsed();
    let t = Instant::now();
    for lba in &reads {
        file.read_exact_at(&mut rbuf, lba * BS as u64).unwrap();
    }
    let b = t.elapsed();
    report("4KiB randread", n, n * BS as u64, e, b);

    // 1 MiB sequential writes over the whole volume, flush every 16 MiB.
    let mb = vec![0x5Au8; 1 << 20];
    let count = (size >> 20) * scale;
    let t = Instant::now();
    for i in 0..count {
        vol.write(Lba((i % (size >> 20)) * 256), &mb).unwrap();
        if i % 16 == 15 {
            vol.flush().unwrap();
        }
    }
    vol.flush().unwrap();
    let e = t.elapsed();
    let t = Instant::now();
    for i in 0..count {
        file.write_all_at(&mb, (i % (size >> 20)) << 20).unwrap();
        if i % 16 == 15 {
            file.sync_data().unwrap();
        }
    }
    file.sync_data().unwrap();
    let b = t.elapsed();
    report("1MiB seqwrite, flush/16MiB", count, count << 20, e, b);
    let stats = vol.stats();
    println!(
        "engine stats: group-commit syncs {}, flusher cycles {}",
        stats.group_commit_syncs, stats.flusher_cycles
    );
    vol.close().unwrap();
}
