//! Loopback replication benchmark: RF1/RF2/RF3 (syncAll) on 127.0.0.1 with real volume
//! files. Workloads: 4 KiB random writes with a flush every 32 writes, and 1 MiB sequential
//! writes with a flush after each. Runs are interleaved (RF1, RF2, RF3, RF1, ...) and the
//! median is reported with the ratio to RF1.
//!
//! `cargo run --release -p engine --example replication_bench [-- --runs 5 --random-writes 8192]`
//! `BENCH_DIR` selects the directory for the volume files (default: the system temp dir).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::net::{NetConfig, ReceiverServer, Transport, spawn_primary};
use engine::replication::{
    Endpoint, Generation, Peer, PrimaryConfig, ReceiverConfig, ReplicaId, VolumeId,
};
use engine::{CreateOptions, Epoch, Lba, Volume, VolumeConfig};

const BS: usize = 4096;
const SECRET: &[u8] = b"bench-secret";

struct Args {
    runs: usize,
    random_writes: u64,
    seq_mib: u64,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut a = Args {
        runs: 3,
        random_writes: 4096,
        seq_mib: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--runs" => a.runs = v.parse()?,
            "--random-writes" => a.random_writes = v.parse()?,
            "--seq-mib" => a.seq_mib = v.parse()?,
            other => {
                return Err(
                    format!("unknown flag {other} (--runs, --random-writes, --seq-mib)").into(),
                );
            }
        }
    }
    Ok(a)
}

fn create(path: &Path) -> Result<Arc<Volume>, Box<dyn Error>> {
    let opts = CreateOptions {
        size_bytes: 256 << 20,
        block_size: BS as u32,
        wal_size_bytes: 64 << 20,
        epoch: Epoch(1),
        ..CreateOptions::default()
    };
    Ok(Arc::new(Volume::create_file(
        path,
        opts,
        VolumeConfig::default(),
    )?))
}

struct Result3 {
    random_iops: f64,
    seq_mib_s: f64,
}

fn run_once(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    rf: usize,
    a: &Args,
) -> Result<Result3, Box<dyn Error>> {
    let vid = VolumeId::new("bench")?;
    let pv = create(&dir.join(format!("p-rf{rf}")))?;
    let mut servers = Vec::new();
    let mut replicas = Vec::new();
    let mut peers = Vec::new();
    let mut members = vec![ReplicaId::new("p")?];
    for i in 1..rf {
        let rv = create(&dir.join(format!("r{i}-rf{rf}")))?;
        let s = rt.block_on(ReceiverServer::bind(
            "127.0.0.1:0".parse()?,
            NetConfig::new(&format!("n{i}"), SECRET),
        ))?;
        s.host(vid.clone(), rv.clone(), ReceiverConfig::default());
        let id = ReplicaId::new(format!("r{i}"))?;
        peers.push(Peer {
            id: id.clone(),
            endpoint: Endpoint::new(s.local_addr())?,
        });
        members.push(id);
        servers.push(s);
        replicas.push(rv);
    }
    let _guard = rt.enter();
    let h = spawn_primary(
        pv.clone(),
        vid,
        ReplicaId::new("p")?,
        PrimaryConfig::default(),
        Generation(1),
        members,
        peers,
        Transport::new(NetConfig::new("np", SECRET)),
    );
    // The first flush waits for every member's handshake and barrier.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rt.block_on(tokio::time::timeout(Duration::from_secs(5), h.flush())) {
            Ok(Ok(_)) => break,
            _ if Instant::now() < deadline => continue,
            _ => return Err("replicas never came in sync".into()),
        }
    }
    let blocks = pv.size_bytes() / BS as u64;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let buf = vec![0x5Au8; BS];
    let t = Instant::now();
    for i in 0..a.random_writes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pv.write(Lba(x % blocks), &buf)?;
        if (i + 1) % 32 == 0 {
            rt.block_on(h.flush())?;
        }
    }
    rt.block_on(h.flush())?;
    let random_iops = a.random_writes as f64 / t.elapsed().as_secs_f64();
    let mib = vec![0xA5u8; 1 << 20];
    let per = (1u64 << 20) / BS as u64;
    let t = Instant::now();
    for i in 0..a.seq_mib {
        pv.write(Lba((i * per) % blocks), &mib)?;
        rt.block_on(h.flush())?;
    }
    let seq_mib_s = a.seq_mib as f64 / t.elapsed().as_secs_f64();
    h.stop();
    drop(servers);
    Ok(Result3 {
        random_iops,
        seq_mib_s,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn Error>> {
    let a = parse_args()?;
    let base: PathBuf = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rand = vec![Vec::new(); 3];
    let mut seq = vec![Vec::new(); 3];
    for run in 0..a.runs {
        for rf in 1..=3 {
            let r = run_once(&rt, dir.path(), rf, &a)?;
            println!(
                "run {run} RF{rf}: {:.0} IOPS (4 KiB random, flush/32), {:.1} MiB/s (1 MiB seq, flush each)",
                r.random_iops, r.seq_mib_s
            );
            rand[rf - 1].push(r.random_iops);
            seq[rf - 1].push(r.seq_mib_s);
            for f in std::fs::read_dir(dir.path())? {
                std::fs::remove_file(f?.path())?;
            }
        }
    }
    let r1 = median(&mut rand[0].clone());
    let s1 = median(&mut seq[0].clone());
    println!("\nmedian of {} runs (ratio to RF1)", a.runs);
    println!(
        "{:<4} {:>14} {:>7} {:>12} {:>7}",
        "RF", "4K rand IOPS", "ratio", "1M seq MiB/s", "ratio"
    );
    for rf in 1..=3 {
        let r = median(&mut rand[rf - 1]);
        let s = median(&mut seq[rf - 1]);
        println!(
            "{:<4} {:>14.0} {:>7.2} {:>12.1} {:>7.2}",
            format!("RF{rf}"),
            r,
            r / r1,
            s,
            s / s1
        );
    }
    let r: Vec<f64> = rand.iter_mut().map(|v| median(v) / r1).collect();
    let s: Vec<f64> = seq.iter_mut().map(|v| median(v) / s1).collect();
    println!(
        "\n4 KiB random, flush/32:       RF2/RF1 = {:.2}, RF3/RF1 = {:.2}",
        r[1], r[2]
    );
    println!(
        "1 MiB sequential, flush each: RF2/RF1 = {:.2}, RF3/RF1 = {:.2}",
        s[1], s[2]
    );
    Ok(())
}
