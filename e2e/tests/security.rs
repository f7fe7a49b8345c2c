//! Security properties across crates: the replication data port refuses replayed
//! handshakes and wrong secrets without ever logging the secret, the NBD listener binds
//! loopback by default, and replica names from the API cannot leave the data directory.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use engine::net::{NetConfig, ReceiverServer};
use engine::replication::wire::{ClientAuth, FrameDecoder, Message, NONCE_BYTES, encode_frame};
use node_agent::frontend::nbd::{DEFAULT_TCP_ADDR, ExportRegistry, NbdServer, ServerConfig};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &[u8] = b"s3cr3t-cluster-key-do-not-log";
const WRONG_SECRET: &[u8] = b"wr0ng-cluster-key-do-not-log";
const WAIT_MS: u64 = 10_000;

/// Everything any test in this binary logs, at every level.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b2 = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(b2.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("install subscriber");
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The ways a secret could show up in text: raw, and as a Debug list of its bytes.
fn secret_renderings(secret: &[u8]) -> Vec<Vec<u8>> {
    let list: Vec<String> = secret.iter().map(|b| b.to_string()).collect();
    vec![secret.to_vec(), list.join(", ").into_bytes()]
}

fn assert_no_secret(text: &[u8], what: &str) {
    for secret in [SECRET, WRONG_SECRET] {
        for r in secret_renderings(secret) {
            assert!(
                !contains(text, &r),
                "{what} contains a cluster secret ({})",
                String::from_utf8_lossy(&r)
            );
        }
    }
}

async fn data_port() -> ReceiverServer {
    ReceiverServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        NetConfig::new("n0", SECRET),
    )
    .await
    .expect("bind data port")
}

/// Reads one message, or None if the server closed the connection.
async fn next_message(s: &mut TcpStream, dec: &mut FrameDecoder) -> Option<Message> {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        if let Ok(Some(m)) = dec.next_message() {
            return Some(m);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => dec.feed(&buf[..n]),
            Err(_) => panic!("no reply from the data port within {WAIT_MS} ms"),
        }
    }
}

async fn wait_rejection(server: &ReceiverServer, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let r = server.rejections();
        if r.iter().any(|x| x.contains(needle)) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no rejection naming {needle:?}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_handshake_is_rejected_because_the_server_nonce_differs() {
    let _logs = captured_logs();
    let server = data_port().await;
    let addr = server.local_addr();

    // A genuine handshake, recording every byte the client sends.
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let (mut auth, hello) = ClientAuth::start(SECRET, "peer", [9; NONCE_BYTES]);
    let hello = encode_frame(&hello);
    s.write_all(&hello).await.expect("send hello");
    sent.push(hello);
    let mut dec = FrameDecoder::new(Default::default());
    while !auth.is_authenticated() {
        let m = next_message(&mut s, &mut dec)
            .await
            .expect("server closed a genuine handshake");
        if let Some(reply) = auth.on_message(&m).expect("genuine handshake") {
            let bytes = encode_frame(&reply);
            s.write_all(&bytes).await.expect("send proof");
            sent.push(bytes);
        }
    }
    assert_eq!(sent.len(), 2, "hello and proof");
    let first_challenge_rejections = server.rejections().len();

    // The same bytes on a new connection: the server's challenge carries a fresh nonce,
    // so the recorded proof no longer matches.
    let mut r = TcpStream::connect(addr).await.expect("connect");
    r.write_all(&sent[0]).await.expect("replay hello");
    let mut dec = FrameDecoder::new(Default::default());
    let challenge = next_message(&mut r, &mut dec)
        .await
        .expect("challenge for the replayed hello");
    assert!(matches!(challenge, Message::Auth(_)), "{challenge:?}");
    r.write_all(&sent[1]).await.expect("replay proof");
    assert!(
        next_message(&mut r, &mut dec).await.is_none(),
        "the replayed proof was accepted"
    );
    let rejections = wait_rejection(&server, "authentication").await;
    assert!(rejections.len() > first_challenge_rejections);

    // Blind replay of the whole recorded stream at once fails the same way.
    let mut b = TcpStream::connect(addr).await.expect("connect");
    b.write_all(&sent.concat()).await.expect("blind replay");
    let mut dec = FrameDecoder::new(Default::default());
    let mut accepted = false;
    while let Some(m) = next_message(&mut b, &mut dec).await {
        if matches!(m, Message::Auth(engine::replication::wire::Auth::Accepted)) {
            accepted = true;
        }
    }
    assert!(!accepted, "blind replay was accepted");
    drop(s);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_never_logs_the_secret() {
    let logs = captured_logs();
    let server = data_port().await;
    let addr = server.local_addr();

    // Wrong secret: the client's proof does not verify.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let (mut auth, hello) = ClientAuth::start(WRONG_SECRET, "intruder", [3; NONCE_BYTES]);
    s.write_all(&encode_frame(&hello)).await.expect("hello");
    let mut dec = FrameDecoder::new(Default::default());
    while let Some(m) = next_message(&mut s, &mut dec).await {
        match auth.on_message(&m) {
            Ok(Some(reply)) => s.write_all(&encode_frame(&reply)).await.expect("reply"),
            Ok(None) => {}
            // The client notices the server's proof is not made with its secret; send
            // a proof anyway so the server side fails too.
            Err(_) => {
                let proof =
                    Message::Auth(engine::replication::wire::Auth::Proof { proof: [0x42; 32] });
                let _ = s.write_all(&encode_frame(&proof)).await;
            }
        }
    }
    // Unauthenticated garbage.
    let mut g = TcpStream::connect(addr).await.expect("connect");
    let _ = g.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(WAIT_MS), g.read_to_end(&mut sink)).await;

    let rejections = wait_rejection(&server, "authentication").await;
    assert!(rejections.len() >= 2, "{rejections:?}");
    // Wait for the rejections to reach the log, then look for the secret everywhere.
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let text = logs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if contains(&text, b"authentication") {
            assert_no_secret(&text, "the log");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed authentication was not logged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_no_secret(rejections.join("\n").as_bytes(), "the rejection list");
    server.shutdown().await;
}

#[test]
fn net_config_debug_output_hides_the_secret() {
    let cfg = NetConfig::new("n0", SECRET);
    assert_no_secret(format!("{cfg:?}").as_bytes(), "NetConfig's Debug output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_tcp_listener_binds_loopback_by_default() {
    let default: SocketAddr = DEFAULT_TCP_ADDR.parse().expect("default address parses");
    assert!(default.ip().is_loopback(), "{default}");
    let server = NbdServer::new(ExportRegistry::new(), ServerConfig::default()).expect("server");
    let bound = server
        .listen_tcp(SocketAddr::new(default.ip(), 0))
        .await
        .expect("listen");
    assert!(bound.ip().is_loopback(), "bound {bound}");
    server.shutdown();
}

fn name_chars() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9./\\\\-]{0,12}|\\.\\.|/etc|[a-z]{1,3}/\\.\\./[a-z]")
        .expect("regex")
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz_cases(),
        ..ProptestConfig::default()
    })]

    /// Whatever names a BlockReplica spec carries, its directory is two plain
    /// components below the data dir, or the spec is refused with the field named.
    #[test]
    fn replica_names_never_escape_the_data_dir(volume in name_chars(), replica in name_chars()) {
        let data = Path::new("/var/lib/blockvol");
        match node_agent::k8s::replica_dir(data, &volume, &replica) {
            Ok(dir) => {
                let rest = dir.strip_prefix(data).expect("under the data dir");
                let parts: Vec<Component> = rest.components().collect();
                prop_assert_eq!(parts.len(), 2, "{}", dir.display());
                prop_assert!(parts.iter().all(|c| matches!(c, Component::Normal(_))));
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.contains("spec.volume") || msg.contains("spec.replicaId"), "{}", msg);
            }
        }
    }
}

/// Cases per property (`BLOCKVOL_FUZZ_CASES` runs more).
fn fuzz_cases() -> u32 {
    std::env::var("BLOCKVOL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// One move of an attacker who knows a recorded genuine session but not the secret.
#[derive(Debug, Clone)]
enum Move {
    /// Hello to session `to` with a nonce: 0 random, 1 the other session's server
    /// nonce, 2 the recorded session's client nonce.
    Hello {
        to: usize,
        nonce_from: u8,
        random: [u8; 32],
        node: u8,
    },
    /// Proof to session `to`: 0 random, 1 the recorded genuine proof, 2 the last server
    /// proof seen from either session (reflection).
    Proof {
        to: usize,
        proof_from: u8,
        random: [u8; 32],
    },
}

fn attack_move() -> impl Strategy<Value = Move> {
    prop_oneof![
        (0usize..2, 0u8..3, any::<[u8; 32]>(), 0u8..2).prop_map(
            |(to, nonce_from, random, node)| {
                Move::Hello {
                    to,
                    nonce_from,
                    random,
                    node,
                }
            }
        ),
        (0usize..2, 0u8..3, any::<[u8; 32]>()).prop_map(|(to, proof_from, random)| Move::Proof {
            to,
            proof_from,
            random
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz_cases(),
        ..ProptestConfig::default()
    })]

    /// Replay, reflection and cross-session splicing of authentication messages never
    /// authenticate a peer that lacks the cluster secret.
    #[test]
    fn handshake_messages_spliced_across_sessions_never_authenticate(
        moves in proptest::collection::vec(attack_move(), 1..12),
        server_nonces in any::<([u8; 32], [u8; 32])>(),
    ) {
        use engine::replication::wire::{Auth, PROTOCOL_VERSION, ServerAuth};
        // A recorded genuine session under another server nonce.
        let recorded_client_nonce = [1u8; NONCE_BYTES];
        let (mut client, hello) = ClientAuth::start(SECRET, "peer", recorded_client_nonce);
        let mut old = ServerAuth::new(SECRET, "n0", [2u8; NONCE_BYTES]);
        let challenge = old.on_message(&hello).expect("hello").expect("challenge");
        let Some(Message::Auth(Auth::Proof { proof: recorded_proof })) =
            client.on_message(&challenge).expect("challenge ok")
        else {
            panic!("client sent no proof");
        };
        // The recorded proof is genuine: it opens the session it was made for.
        let accepted = old
            .on_message(&Message::Auth(Auth::Proof { proof: recorded_proof }))
            .expect("genuine proof");
        prop_assert!(old.is_authenticated() && accepted.is_some());
        prop_assume!(server_nonces.0 != [2u8; 32] && server_nonces.1 != [2u8; 32]);

        let nonces = [server_nonces.0, server_nonces.1];
        let mut sessions = [
            Some(ServerAuth::new(SECRET, "n0", nonces[0])),
            Some(ServerAuth::new(SECRET, "n0", nonces[1])),
        ];
        let mut last_server_proof = [0u8; 32];
        for m in moves {
            let (to, msg) = match m {
                Move::Hello { to, nonce_from, random, node } => {
                    let nonce = match nonce_from {
                        0 => random,
                        1 => nonces[1 - to],
                        _ => recorded_client_nonce,
                    };
                    let node = if node == 0 { "peer" } else { "n0" }.to_string();
                    (to, Message::Auth(Auth::Hello { version: PROTOCOL_VERSION, node, nonce }))
                }
                Move::Proof { to, proof_from, random } => {
                    let proof = match proof_from {
                        0 => random,
                        1 => recorded_proof,
                        _ => last_server_proof,
                    };
                    (to, Message::Auth(Auth::Proof { proof }))
                }
            };
            let Some(s) = sessions[to].as_mut() else { continue };
            match s.on_message(&msg) {
                Ok(Some(Message::Auth(Auth::Challenge { proof, .. }))) => last_server_proof = proof,
                Ok(_) => {}
                // The server closes the connection on any error.
                Err(_) => sessions[to] = None,
            }
            for s in sessions.iter().flatten() {
                prop_assert!(!s.is_authenticated(), "authenticated without the secret");
            }
        }
    }
}
