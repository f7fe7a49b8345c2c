//! Fuzzes the NBD server's handshake, option and request parsing over real TCP
//! connections: random streams (optionally after a valid handshake prefix) mixing
//! garbage, option headers and request headers with random fields. After every stream
//! the server must have closed or answered that connection, and must still serve a
//! well-behaved client. Cases: `BLOCKVOL_FUZZ_CASES` (default 96); seed printed by
//! proptest on failure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use e2e::checker::{NbdClient, Target};
use node_agent::frontend::nbd::{
    BlockBackend, ExportRegistry, MemBackend, NbdServer, ServerConfig,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FUZZ_EXPORT: &str = "fz";
const HEALTH_EXPORT: &str = "health";
/// Time the server has to finish with a fuzzed connection once the client half-closed.
const CLOSE_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Clone)]
enum Chunk {
    Garbage(Vec<u8>),
    Option {
        option: u32,
        data: Vec<u8>,
    },
    Request {
        flags: u16,
        cmd: u16,
        offset: u64,
        length: u32,
        payload: Vec<u8>,
    },
}

fn chunk() -> impl Strategy<Value = Chunk> {
    let offset = prop_oneof![
        (0u64..64).prop_map(|b| b * 512),
        any::<u64>(),
        Just(u64::MAX - 100),
        Just((1u64 << 20) - 512),
    ];
    let length = prop_oneof![(0u32..8).prop_map(|b| b * 512), any::<u32>(), 1u32..600,];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..48).prop_map(Chunk::Garbage),
        (0u32..12, proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(option, data)| Chunk::Option { option, data }),
        (
            any::<u16>(),
            0u16..10,
            offset,
            length,
            proptest::collection::vec(any::<u8>(), 0..1100)
        )
            .prop_map(|(flags, cmd, offset, length, payload)| Chunk::Request {
                flags: flags & 0x3f,
                cmd,
                offset,
                length,
                payload,
            }),
    ]
}

fn encode(prefix: u8, chunks: &[Chunk]) -> Vec<u8> {
    let mut out = Vec::new();
    if prefix >= 1 {
        out.extend_from_slice(&3u32.to_be_bytes()); // fixed newstyle + no zeroes
    }
    if prefix >= 2 {
        let name = FUZZ_EXPORT.as_bytes();
        out.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        out.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        out.extend_from_slice(&(name.len() as u32 + 6).to_be_bytes());
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&0u16.to_be_bytes());
    }
    for c in chunks {
        match c {
            Chunk::Garbage(g) => out.extend_from_slice(g),
            Chunk::Option { option, data } => {
                out.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
                out.extend_from_slice(&option.to_be_bytes());
                out.extend_from_slice(&(data.len() as u32).to_be_bytes());
                out.extend_from_slice(data);
            }
            Chunk::Request {
                flags,
                cmd,
                offset,
                length,
                payload,
            } => {
                out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&cmd.to_be_bytes());
                out.extend_from_slice(&7u64.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
                out.extend_from_slice(payload);
            }
        }
    }
    out
}

/// Sends the stream, half-closes, and drains replies until the server closes.
async fn drive(addr: SocketAddr, bytes: &[u8]) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = s.split();
    let reader = async {
        let mut sink = [0u8; 8192];
        loop {
            match r.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let writer = async {
        // The server may close mid-stream; that is a valid answer to garbage.
        let _ = w.write_all(bytes).await;
        let _ = w.shutdown().await;
    };
    tokio::time::timeout(Duration::from_millis(CLOSE_TIMEOUT_MS), async {
        tokio::join!(reader, writer);
    })
    .await
    .map_err(|_| format!("server kept the connection open {CLOSE_TIMEOUT_MS} ms after EOF"))
}

async fn healthy(addr: SocketAddr, round: u64) -> Result<(), String> {
    let target = Target::Tcp {
        addr,
        export: HEALTH_EXPORT.into(),
    };
    let mut c = NbdClient::connect(&target)
        .await
        .map_err(|e| format!("connect after fuzzing: {e}"))?;
    let block = vec![(round % 251) as u8; 512];
    c.write(4096, &block).await.map_err(|e| e.to_string())?;
    c.flush().await.map_err(|e| e.to_string())?;
    let mut back = vec![0u8; 512];
    c.read(4096, &mut back).await.map_err(|e| e.to_string())?;
    c.disconnect().await;
    if back != block {
        return Err("health export returned other data".into());
    }
    Ok(())
}

fn fuzz_cases() -> u32 {
    std::env::var("BLOCKVOL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

#[test]
fn random_streams_never_break_the_nbd_server() {
    let rt = testkit::runtime(2);
    let registry = ExportRegistry::new();
    for name in [FUZZ_EXPORT, HEALTH_EXPORT] {
        let b: Arc<dyn BlockBackend> = Arc::new(MemBackend::new(1 << 20, 512).expect("mem"));
        registry.add(name, b).expect("export");
    }
    let config = ServerConfig {
        handshake_timeout_ms: 2_000,
        ..ServerConfig::default()
    };
    let server = NbdServer::new(registry, config).expect("server");
    let addr = rt
        .block_on(server.listen_tcp("127.0.0.1:0".parse().expect("addr")))
        .expect("listen");
    let mut runner = TestRunner::new(Config {
        cases: fuzz_cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let rounds = std::sync::atomic::AtomicU64::new(0);
    let strategy = (0u8..3, proptest::collection::vec(chunk(), 0..8));
    let result = runner.run(&strategy, |(prefix, chunks)| {
        let round = rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let bytes = encode(prefix, &chunks);
        rt.block_on(drive(addr, &bytes))
            .map_err(TestCaseError::fail)?;
        rt.block_on(healthy(addr, round))
            .map_err(TestCaseError::fail)?;
        Ok(())
    });
    server.shutdown();
    drop(server);
    rt.shutdown_timeout(Duration::from_secs(5));
    println!(
        "nbd fuzz: {} streams",
        rounds.load(std::sync::atomic::Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
