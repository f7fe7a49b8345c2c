//! The attach proxy against a real NBD server that goes away and comes back on the
//! same socket: a request sent while the server is down waits, completes once the
//! server is back, and every byte acknowledged before and after is there. Without a
//! server for longer than the reconnect timeout, requests fail with EIO.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use node_agent::attach::proxy::{Proxy, ProxySettings};
use node_agent::nbd::client::Connection;
use node_agent::nbd::proto::{CMD_FLUSH, CMD_READ, CMD_WRITE, EIO};
use node_agent::nbd::{BlockBackend, ExportRegistry, MemBackend, NbdServer, ServerConfig};

const EXPORT: &str = "vol";
const SIZE: u64 = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn settings(dir: &std::path::Path, reconnect_timeout_ms: u64) -> ProxySettings {
    ProxySettings {
        listen: dir.join("proxy.sock"),
        upstream: dir.join("agent.sock"),
        export: EXPORT.into(),
        reconnect_timeout_ms,
        reconnect_interval_ms: 20,
        io_timeout_ms: 5_000,
    }
}

async fn serve(registry: &ExportRegistry, socket: &Path) -> NbdServer {
    let s = NbdServer::new(registry.clone(), ServerConfig::default()).expect("server");
    s.listen_unix(socket).await.expect("listen");
    s
}

fn write(c: &mut Connection, offset: u64, byte: u8) -> u32 {
    c.request(CMD_WRITE, 0, offset, 4096, &[byte; 4096], None)
        .expect("write answered")
}

fn read(c: &mut Connection, offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let e = c
        .request(CMD_READ, 0, offset, 4096, &[], Some(&mut buf))
        .expect("read answered");
    assert_eq!(e, 0, "read errno");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pause_while_the_agent_is_gone_and_resume_when_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), 30_000);
    let mem = Arc::new(MemBackend::new(SIZE, 512).expect("mem"));
    let registry = ExportRegistry::new();
    registry
        .add(EXPORT, mem.clone() as Arc<dyn BlockBackend>)
        .expect("export");
    let first = serve(&registry, &s.upstream).await;
    let proxy = Proxy::start(s.clone()).await.expect("proxy starts");

    let listen = s.listen.clone();
    let mut client = tokio::task::spawn_blocking(move || {
        let mut c = Connection::connect(&listen, EXPORT, IO_TIMEOUT).expect("connect to proxy");
        assert_eq!(c.info().size_bytes, SIZE);
        assert_eq!(write(&mut c, 0, 0xa1), 0);
        assert_eq!(c.request(CMD_FLUSH, 0, 0, 0, &[], None).expect("flush"), 0);
        c
    })
    .await
    .expect("client");

    first.shutdown();
    drop(first);
    assert!(!s.upstream.exists(), "the server removed its socket");

    // Sent while nothing listens upstream: it can only complete after the restart.
    let pending = tokio::task::spawn_blocking(move || {
        let e = write(&mut client, 4096, 0xb2);
        (client, e)
    });
    // Give the proxy a dial attempt against the missing socket before the restart,
    // observed through its effect: the request is still unanswered.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(200) {
        assert!(!pending.is_finished(), "answered without a server");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = serve(&registry, &s.upstream).await;
    let (mut client, errno) = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .expect("the paused write completes after the restart")
        .expect("writer");
    assert_eq!(errno, 0, "write through the proxy after the restart");

    let (a, b) =
        tokio::task::spawn_blocking(move || (read(&mut client, 0), read(&mut client, 4096)))
            .await
            .expect("reader");
    assert!(
        a.iter().all(|&x| x == 0xa1),
        "write before the restart kept"
    );
    assert!(
        b.iter().all(|&x| x == 0xb2),
        "write during the restart applied"
    );
    let mut direct = vec![0u8; 8192];
    mem.read(0, &mut direct).expect("backend read");
    assert!(direct[..4096].iter().all(|&x| x == 0xa1));
    assert!(direct[4096..].iter().all(|&x| x == 0xb2));
    proxy.shutdown();
    second.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_with_eio_once_the_agent_stays_away_past_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), 300);
    let registry = ExportRegistry::new();
    registry
        .add(
            EXPORT,
            Arc::new(MemBackend::new(SIZE, 512).expect("mem")) as Arc<dyn BlockBackend>,
        )
        .expect("export");
    let server = serve(&registry, &s.upstream).await;
    let proxy = Proxy::start(s.clone()).await.expect("proxy starts");
    server.shutdown();
    drop(server);
    let listen = s.listen.clone();
    let (errno, waited) = tokio::task::spawn_blocking(move || {
        let mut c = Connection::connect(&listen, EXPORT, IO_TIMEOUT).expect("connect to proxy");
        let t = Instant::now();
        (write(&mut c, 0, 1), t.elapsed())
    })
    .await
    .expect("client");
    assert_eq!(errno, EIO);
    assert!(
        waited >= Duration::from_millis(300),
        "failed after {waited:?}, before the reconnect timeout"
    );
    proxy.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_start_names_the_socket_when_the_agent_is_unreachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), 100);
    let e = match Proxy::start(s.clone()).await {
        Ok(_) => panic!("started without an agent"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("agent.sock") && e.contains("not reachable"),
        "{e}"
    );
    // A server without the export refuses it by name.
    let server = serve(&ExportRegistry::new(), &s.upstream).await;
    let upstream = s.upstream.clone();
    let refused = tokio::task::spawn_blocking(move || {
        match Connection::connect(&upstream, EXPORT, IO_TIMEOUT) {
            Ok(_) => panic!("negotiated a missing export"),
            Err(e) => e.to_string(),
        }
    })
    .await
    .expect("client");
    assert!(
        refused.contains("\"vol\"") && refused.contains("refused"),
        "{refused}"
    );
    server.shutdown();
    let mut bad = s;
    bad.export = String::new();
    let e = match Proxy::start(bad).await {
        Ok(_) => panic!("started with an empty export name"),
        Err(e) => e.to_string(),
    };
    assert!(e.starts_with("--export"), "{e}");
}
