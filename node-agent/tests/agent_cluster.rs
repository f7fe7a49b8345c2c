//! Three real `blockvol-agent` processes, the operator (in this process) and a real
//! kube-apiserver: an RF3 volume becomes Ready, data written and flushed through the
//! primary's NBD export reaches all three replicas, and after the primary's agent is
//! killed the operator promotes an in-sync member whose export returns the same bytes.
//! Every wait is a bounded poll of a condition.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use api::{BlockReplica, BlockVolume, ReplicaRole, ReplicaState, VolumePhase};
use e2e::in_process::InProcessOperator;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use testkit::{ControlPlane, Task, Wait};

const NS: &str = "blockvol-system";
const WAIT_TIMEOUT_MS: u64 = 90_000;
const POLL_MS: u64 = 200;
const LEASE_S: u32 = 3;
const VOLUME: &str = "vol1";
const VOLUME_BYTES: u64 = 32 << 20;
/// WAL entries the pattern writes make at least (64 chunks and one block).
const WRITES: u64 = 65;

const WAIT: Wait = Wait::millis(WAIT_TIMEOUT_MS, POLL_MS);

/// One agent process; killed (SIGKILL, like a crash) and reaped when dropped. Its log
/// is printed when the test fails.
struct AgentProcess {
    node: String,
    child: Option<Child>,
    log: PathBuf,
    nbd_socket: PathBuf,
}

impl AgentProcess {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("connection failed"))
                .rev()
                .take(40)
                .collect();
            eprintln!("---- agent {} log (last lines) ----", self.node);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn spawn_agent(node: &str, root: &Path, kubeconfig: &Path, secret: &Path) -> AgentProcess {
    let dir = root.join(node);
    std::fs::create_dir_all(&dir).expect("agent dir");
    let log = dir.join("agent.log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("log file");
    let err = out.try_clone().expect("log file");
    let nbd_dir = dir.join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_blockvol-agent"))
        .arg(format!("--node-name={node}"))
        .arg(format!("--namespace={NS}"))
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--data-address=127.0.0.1:{}", free_port()))
        .arg(format!(
            "--agent-socket={}",
            dir.join("agent.sock").display()
        ))
        .arg(format!("--peer-secret-file={}", secret.display()))
        .arg(format!("--lease-duration-seconds={LEASE_S}"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!("--nbd-socket-dir={}", nbd_dir.display()))
        .arg("--status-interval-ms=300")
        .arg("--registration-interval-ms=1000")
        .env("RUST_LOG", "info,node_agent=debug")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start blockvol-agent");
    AgentProcess {
        node: node.into(),
        child: Some(child),
        log,
        nbd_socket: nbd_dir.join(node_agent::agent::NBD_SOCKET_NAME),
    }
}

async fn start() -> (ControlPlane, Client) {
    testkit::init_tracing("operator=info");
    testkit::apiserver::start(NS).await
}

fn operator(client: &Client) -> Task {
    InProcessOperator::new("op-1", NS).start(client).0
}

async fn replicas(client: &Client) -> Vec<BlockReplica> {
    Api::<BlockReplica>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{}={VOLUME}", api::LABEL_VOLUME)))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

async fn volume(client: &Client) -> Option<BlockVolume> {
    Api::<BlockVolume>::all(client.clone())
        .get_opt(VOLUME)
        .await
        .ok()
        .flatten()
}

fn unix_uri(socket: &Path) -> String {
    format!("nbd+unix:///{VOLUME}?socket={}", socket.display())
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The whole export, copied out with nbdcopy.
fn read_export(socket: &Path, dest: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(dest);
    run("nbdcopy", &[&unix_uri(socket), &dest.display().to_string()]);
    std::fs::read(dest).expect("copied image")
}

/// The bytes the test writes: a pattern per 64 KiB chunk in the first 4 MiB, then one
/// distinct 4 KiB block at 20 MiB.
fn expected_image() -> Vec<u8> {
    let mut img = vec![0u8; VOLUME_BYTES as usize];
    for (i, chunk) in img[..4 << 20].chunks_mut(64 << 10).enumerate() {
        chunk.fill(0x10 + i as u8);
    }
    img[20 << 20..(20 << 20) + 4096].fill(0xee);
    img
}

fn write_pattern(socket: &Path) {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..64u64 {
        args.push("-c".into());
        args.push(format!("write -P {} {} 64k", 0x10 + i, i * (64 << 10)));
    }
    args.push("-c".into());
    args.push(format!("write -P {} {} 4k", 0xee, 20u64 << 20));
    args.push("-c".into());
    args.push("flush".into());
    args.push(unix_uri(socket));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &refs);
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failed request: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rf3_volume_survives_killing_the_primary_agent() {
    let (cp, client) = start().await;
    let root = tempfile::Builder::new()
        .prefix("agent-cluster-")
        .tempdir()
        .expect("tempdir");
    let secret = root.path().join("peer-secret");
    std::fs::write(&secret, "test-cluster-secret\n").expect("secret");
    let mut agents: BTreeMap<String, AgentProcess> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                spawn_agent(n, root.path(), cp.kubeconfig(), &secret),
            )
        })
        .collect();
    let _operator = operator(&client);

    testkit::apiserver::create_volume(&client, VOLUME, "32Mi").await;

    let v = WAIT
        .expect("the RF3 volume Ready", || async {
            volume(&client).await.filter(|v| {
                v.status
                    .as_ref()
                    .is_some_and(|s| s.phase == VolumePhase::Ready && s.in_sync_count == 3)
            })
        })
        .await;
    let st = v.status.expect("status");
    let first_primary = st.primary.clone().expect("primary");
    let first_node = st.primary_node.clone().expect("primary node");
    assert_eq!(st.epoch, 1);

    // Write and flush through the primary's export.
    let socket = agents[&first_node].nbd_socket.clone();
    tokio::task::spawn_blocking(move || write_pattern(&socket))
        .await
        .expect("writer");
    let want = expected_image();

    // Every replica reports the flushed data durable.
    let head = WAIT
        .expect(
            "all three replicas flushed to the primary's head",
            || async {
                let rs = replicas(&client).await;
                let primary = rs.iter().find(|r| r.name_any() == first_primary)?;
                let head = primary.status.as_ref()?.flushed_lsn;
                // The primary's report may predate the writes: wait for all of them.
                let all = rs.len() == 3
                    && head >= WRITES
                    && rs
                        .iter()
                        .all(|r| r.status.as_ref().is_some_and(|s| s.flushed_lsn >= head));
                all.then_some(head)
            },
        )
        .await;
    assert!(head >= WRITES);

    // Crash the primary's agent.
    agents.get_mut(&first_node).expect("primary agent").kill();
    let v = WAIT
        .expect("another member promoted at epoch 2", || async {
            volume(&client).await.filter(|v| {
                v.status.as_ref().is_some_and(|s| {
                    s.epoch >= 2 && s.primary.as_deref().is_some_and(|p| p != first_primary)
                })
            })
        })
        .await;
    let st = v.status.expect("status");
    let new_primary = st.primary.clone().expect("new primary");
    let new_node = st.primary_node.clone().expect("new primary node");
    assert_ne!(new_node, first_node);
    WAIT.expect("the new primary serving at the new epoch", || async {
        let rs = replicas(&client).await;
        rs.iter()
            .find(|r| r.name_any() == new_primary)
            .filter(|r| {
                r.spec.role == ReplicaRole::Primary
                    && r.status
                        .as_ref()
                        .is_some_and(|s| s.state == ReplicaState::Serving && s.epoch == st.epoch)
            })
            .cloned()
    })
    .await;

    let socket = agents[&new_node].nbd_socket.clone();
    let dest = root.path().join("readback.img");
    let got = tokio::task::spawn_blocking(move || read_export(&socket, &dest))
        .await
        .expect("reader");
    assert_eq!(got.len(), want.len(), "export size");
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "the new primary's export differs from what was flushed"
    );

    // The new primary accepts writes, and FLUSH completes without the dead member
    // (the operator committed an in-sync set without it).
    let socket = agents[&new_node].nbd_socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x77 8M 64k",
                "-c",
                "flush",
                "-c",
                "read -P 0x77 8M 64k",
                &unix_uri(&socket),
            ],
        )
    })
    .await
    .expect("writer");
    assert!(
        !out.contains("failed") && !out.contains("mismatch"),
        "writing through the new primary: {out}"
    );

    // The crashed agent comes back (on a new data port): the new primary finds it at
    // its new address and brings its replica back in sync (its WAL was recycled, so by
    // a rebuild), as a replica of the new epoch.
    agents.insert(
        first_node.clone(),
        spawn_agent(&first_node, root.path(), cp.kubeconfig(), &secret),
    );
    WAIT.expect(
        "the old primary rebuilt and in sync with the new primary",
        || async {
            let rs = replicas(&client).await;
            let old = rs.iter().find(|r| r.name_any() == first_primary)?;
            let np = rs.iter().find(|r| r.name_any() == new_primary)?;
            let in_sync = np.status.as_ref()?.peers.iter().any(|p| {
                p.replica_id == first_primary
                    && p.state == ReplicaState::InSync
                    && p.flushed_lsn >= head
            });
            let demoted = old.spec.role == ReplicaRole::Replica
                && old.status.as_ref().is_some_and(|x| x.epoch == st.epoch);
            (in_sync && demoted).then_some(())
        },
    )
    .await;

    // The surviving replica and the rejoined one are both back in the committed set:
    // the volume counts three in-sync members and the new primary sees both peers
    // InSync and none unreachable.
    WAIT.expect("all three members in sync at the new epoch", || async {
        let v = volume(&client).await?;
        let vs = v.status.as_ref()?;
        let rs = replicas(&client).await;
        let np = rs.iter().find(|r| r.name_any() == new_primary)?;
        let ns = np.status.as_ref()?;
        let peers_in_sync = ns.peers.len() == 2
            && ns
                .peers
                .iter()
                .all(|p| p.state == ReplicaState::InSync && p.flushed_lsn >= head);
        let done = vs.in_sync_count == 3
            && vs.epoch == st.epoch
            && peers_in_sync
            && ns.unreachable.is_empty()
            && rs.len() == 3
            && rs
                .iter()
                .all(|r| r.status.as_ref().is_some_and(|s| s.epoch == st.epoch));
        done.then_some(())
    })
    .await;
    drop(agents);
    drop(cp);
}
