//! Real process crashes: a child process (this test binary, re-executed) writes and
//! flushes a volume file in a loop and reports each acknowledged flush over a pipe; the
//! parent kills it with SIGKILL at a random moment, reopens the file and checks that
//! every acknowledged write survived and no block is torn. Rounds default to 20
//! (BLOCKVOL_CRASH_ROUNDS to change); the seed is printed (BLOCKVOL_TEST_SEED replays).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::rng::Rng;
use common::*;
use engine::{Lba, Volume, VolumeConfig};

const CHILD_ENV: &str = "BLOCKVOL_CRASH_CHILD_FILE";
const START_ENV: &str = "BLOCKVOL_CRASH_CHILD_START";
const CHILD_TEST: &str = "crash_child_entry_point_only_acts_when_spawned_by_the_parent";
const BLOCKS: u64 = 64;

fn cfg() -> VolumeConfig {
    VolumeConfig {
        flush_interval_ms: 5,
        ..VolumeConfig::default()
    }
}

/// Block content for write number `i`: the number itself, then a pattern from it.
fn tagged(i: u64) -> Vec<u8> {
    let mut b = block(i);
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

/// Runs only inside the child: writes block `i % BLOCKS` with `tagged(i)` for
/// i = start.., flushing every 8 writes and printing `ACK i` after each flush.
#[test]
fn crash_child_entry_point_only_acts_when_spawned_by_the_parent() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let start: u64 = std::env::var(START_ENV).unwrap().parse().unwrap();
    let vol = Volume::open_file(std::path::Path::new(&path), cfg()).unwrap();
    let mut out = std::io::stdout().lock();
    for i in start.. {
        vol.write(Lba(i % BLOCKS), &tagged(i)).unwrap();
        if i % 8 == 7 {
            vol.flush().unwrap();
            use std::io::Write;
            writeln!(out, "ACK {i}").unwrap();
            out.flush().unwrap();
        }
    }
}

/// Kills and reaps the child when dropped, also when an assertion fails.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn acknowledged_flushes_survive_kill_9_at_random_moments() {
    let rounds = env_u64("BLOCKVOL_CRASH_ROUNDS", 20);
    let mut rng = Rng(seed(
        "acknowledged_flushes_survive_kill_9_at_random_moments",
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    Volume::create_file(&path, small_opts(BLOCKS, 256 * 1024), cfg())
        .unwrap()
        .close()
        .unwrap();
    let exe = std::env::current_exe().unwrap();
    // Verified content per block (write number, 0 = never written).
    let mut state = vec![0u64; BLOCKS as usize];
    let mut next = 1u64;
    for round in 0..rounds {
        let child = Command::new(&exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .env(START_ENV, next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut guard = ChildGuard(child);
        let stdout = guard.0.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let want_acks = 1 + rng.below(30);
        let mut acked = None;
        let mut acks = 0;
        while acks < want_acks {
            let Some(line) = lines.next() else {
                panic!("round {round}: child exited early after {acks} acks");
            };
            if let Some(n) = line.unwrap().strip_prefix("ACK ") {
                acked = Some(n.parse::<u64>().unwrap());
                acks += 1;
            }
        }
        // Let it run a little past the last ack we waited for (random crash point).
        let spin = std::time::Instant::now();
        let spin_for = std::time::Duration::from_micros(rng.below(3000));
        while spin.elapsed() < spin_for {
            std::hint::spin_loop();
        }
        guard.0.kill().unwrap();
        guard.0.wait().unwrap();
        // Acks already in the pipe were sent before the kill.
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("ACK ") {
                acked = Some(n.parse::<u64>().unwrap());
            }
        }
        let acked = acked.unwrap();
        let vol = Volume::open_file(&path, cfg()).unwrap();
        let mut max_seen = 0;
        for lba in 0..BLOCKS {
            let got = read_block(&vol, lba);
            let t = u64::from_le_bytes(got[..8].try_into().unwrap());
            // The newest acknowledged write to this block, or what was verified before.
            let mut floor = state[lba as usize];
            let mut i = acked;
            while i >= next {
                if i % BLOCKS == lba {
                    floor = floor.max(i);
                    break;
                }
                i -= 1;
            }
            if t == 0 {
                assert_eq!(got, vec![0u8; BS], "round {round}: block {lba} torn");
                assert_eq!(
                    floor, 0,
                    "round {round}: block {lba} lost acknowledged write {floor}"
                );
            } else {
                assert_eq!(got, tagged(t), "round {round}: block {lba} torn (tag {t})");
                assert_eq!(
                    t % BLOCKS,
                    lba,
                    "round {round}: block {lba} holds write {t}"
                );
                assert!(
                    t >= floor,
                    "round {round}: block {lba} lost acknowledged write {floor} (has {t})"
                );
            }
            state[lba as usize] = t;
            max_seen = max_seen.max(t);
        }
        next = max_seen.max(acked) + 1;
        vol.close().unwrap();
    }
    eprintln!("{rounds} kill -9 rounds passed; {} writes issued", next - 1);
}
