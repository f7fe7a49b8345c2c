//! A FLUSH through a device attached by the attach proxy, sent after the device node's
//! agent restarted while the volume failed over, covers every write acknowledged
//! before it, or fails.
//!
//! The RF 2 volume is attached (FUSE file + loop device through the attach proxy) on
//! its primary's node, or on a third node. Blocks are written with O_DIRECT and no
//! fsync while the other member's agent is paused (SIGSTOP), so the primary
//! acknowledges writes it has not shipped yet. The primary's agent (and the client
//! node's) is SIGKILLed, the paused agent resumed; the client node's agent stays down
//! until the operator promoted the other member (the primary's Lease ran out), then it
//! restarts. The old primary's unshipped suffix is gone (a restarted old primary
//! rejoins as a replica and truncates it), and the new forwarding export on the client
//! node has no replay log. Then one fsync on the device. If it succeeds, every block
//! must read back as last written: the attach proxy's own replay log is what carries
//! the writes the dead agent acknowledged to the new primary.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use e2e::cluster::{TestCluster, TestClusterOptions};
use e2e::devices::LoopDevice;
use e2e::devices::{AttachmentGuard, attach_dir, leftovers};
use testkit::Paused;

const VOLUME: &str = "proxy-restart-vol";
const TIMEOUT: Duration = Duration::from_secs(90);
const BLOCK: usize = 4096;
/// Blocks of the first 16 MiB of the 64 MiB volume the test writes.
const BLOCKS: u64 = 4096;
/// How long the other member's agent stays paused while blocks are written: long
/// enough to leave writes unshipped, short enough that the primary does not report it
/// unreachable (it must stay promotable).
const PAUSE: Duration = Duration::from_millis(1500);

/// The content of block `n` written in round `round`: every 8 bytes name both.
fn block(n: u64, round: u64) -> Vec<u8> {
    let word = ((round << 32) | n).to_le_bytes();
    word.iter().copied().cycle().take(BLOCK).collect()
}

fn open_direct(path: &str) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path} with O_DIRECT: {e}"))
}

/// A page-aligned buffer for O_DIRECT (a `Vec<u8>` is not aligned enough).
struct Aligned {
    ptr: *mut u8,
}

impl Aligned {
    fn new() -> Aligned {
        let layout = std::alloc::Layout::from_size_align(BLOCK, BLOCK).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocating an aligned buffer");
        Aligned { ptr }
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to BLOCK bytes owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, BLOCK) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(BLOCK, BLOCK).expect("layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// `line` without its terminal colour sequences (`ESC [ ... m`).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(ch);
        }
    }
    out
}

/// Waits until the volume is Ready with both members in sync; returns the primary's
/// node and epoch.
async fn ready(c: &TestCluster) -> (String, u64) {
    c.wait_serving(VOLUME, 2, 0, TIMEOUT)
        .await
        .expect("volume ready")
}

/// Waits until a member not on `dead_node` was promoted above `old_epoch` and serves.
async fn promoted_away_from(c: &TestCluster, dead_node: &str, old_epoch: u64) -> (String, u64) {
    c.wait_promoted_away_from(VOLUME, dead_node, old_epoch, TIMEOUT)
        .await
        .expect("promotion")
}

/// Where the device is attached.
#[derive(Clone, Copy, Debug)]
enum Client {
    /// On the primary's node: that node's agent dies (and its volume fails over).
    OnThePrimarysNode,
    /// On a third node without a replica: that node's agent and the primary's agent die
    /// together, and only the client node's agent comes back.
    Elsewhere,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flush_after_the_primary_nodes_agent_restarted_across_a_failover_loses_no_acknowledged_write()
 {
    flush_after_a_restart_across_a_failover(Client::OnThePrimarysNode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flush_after_the_client_nodes_agent_restarted_while_the_primary_failed_over_loses_no_acknowledged_write()
 {
    flush_after_a_restart_across_a_failover(Client::Elsewhere).await;
}

async fn flush_after_a_restart_across_a_failover(layout: Client) {
    let mut cluster =
        TestCluster::start_with_volume(TestClusterOptions::nodes(2), VOLUME, "64Mi", 2)
            .await
            .expect("cluster with the RF 2 volume");
    let (primary, epoch1) = ready(&cluster).await;
    let other = if primary == "node-1" {
        "node-2"
    } else {
        "node-1"
    };
    let client_node = match layout {
        Client::OnThePrimarysNode => primary.clone(),
        Client::Elsewhere => {
            cluster
                .add_node("node-3", TIMEOUT)
                .await
                .expect("node-3 registered");
            "node-3".to_string()
        }
    };
    let data_dir = cluster.agent(&client_node).expect("agent").data_dir.clone();
    let _guard = AttachmentGuard {
        data_dir: data_dir.clone(),
        volume: VOLUME.into(),
        mount_point: cluster.root.path().join("unused-mount-point"),
    };
    let client = cluster.agent(&client_node).expect("agent").attach_client();
    let dev = LoopDevice {
        path: client
            .attach(VOLUME, false)
            .await
            .unwrap_or_else(|e| panic!("Attach on {client_node}: {e}"))
            .device_path,
    };

    // Round 0 on every block, made durable: the baseline an unreplayed write falls
    // back to.
    let path = dev.path.clone();
    let f = tokio::task::spawn_blocking(move || {
        let f = open_direct(&path);
        let mut buf = Aligned::new();
        for n in 0..BLOCKS {
            buf.bytes().copy_from_slice(&block(n, 0));
            f.write_all_at(buf.bytes(), n * BLOCK as u64)
                .expect("round 0 write");
        }
        f.sync_all().expect("round 0 fsync");
        f
    })
    .await
    .expect("round 0");

    // Round 1 without fsync, while the other member cannot receive it.
    let other_pid = cluster.agent(other).expect("agent").pid().expect("pid");
    let paused = Paused::stop(other_pid);
    let (f, written) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut buf = Aligned::new();
        let mut written = 0;
        while written < BLOCKS && started.elapsed() < PAUSE {
            buf.bytes().copy_from_slice(&block(written, 1));
            f.write_all_at(buf.bytes(), written * BLOCK as u64)
                .expect("round 1 write");
            written += 1;
        }
        (f, written)
    })
    .await
    .expect("round 1");
    cluster.agent(&client_node).expect("agent").kill();
    cluster.agent(&primary).expect("agent").kill();
    drop(paused);
    println!("{layout:?}: {written} blocks acknowledged without a FLUSH before the agents died");

    // The client node's agent stays down until the other member serves.
    let (new_primary, epoch2) = promoted_away_from(&cluster, &primary, epoch1).await;
    assert_eq!(new_primary, other);
    cluster
        .agent(&client_node)
        .expect("agent")
        .restart()
        .expect("restart the client node's agent");

    let (f, flushed) = tokio::task::spawn_blocking(move || {
        let r = f.sync_all();
        (f, r)
    })
    .await
    .expect("fsync");
    println!("fsync after the restart (epoch {epoch1} -> {epoch2}): {flushed:?}");
    let proxy_log = std::fs::read_to_string(attach_dir(&data_dir, VOLUME).join("proxy.log"))
        .unwrap_or_default();
    for line in proxy_log.lines().filter(|l| l.contains("replayed")) {
        println!("{}", without_colours(line));
    }
    if flushed.is_ok() {
        let lost: Vec<u64> = tokio::task::spawn_blocking(move || {
            let mut buf = Aligned::new();
            (0..BLOCKS)
                .filter(|&n| {
                    f.read_exact_at(buf.bytes(), n * BLOCK as u64)
                        .expect("read back");
                    let round = u64::from(n < written);
                    buf.bytes() != block(n, round).as_slice()
                })
                .collect()
        })
        .await
        .expect("read back");
        assert!(
            lost.is_empty(),
            "the fsync succeeded, but {} of {written} acknowledged blocks read back older \
             data (first: {:?})",
            lost.len(),
            &lost[..lost.len().min(8)]
        );
    }

    let client = cluster.agent(&client_node).expect("agent").attach_client();
    client.detach(VOLUME).await.expect("detach");
    let left = leftovers(&data_dir, VOLUME);
    assert!(left.is_empty(), "detach left {left:?}");
}
