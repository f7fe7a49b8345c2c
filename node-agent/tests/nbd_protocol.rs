//! The NBD server against a hand-written client on a raw socket: every option and
//! command path, and hostile input (bad magic, unknown options, out-of-range and
//! oversize requests, abrupt disconnects). After each abuse the server must still
//! serve a well-behaved client.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::mem_overlay::{MemOverlay, Overlay};
use common::{TestServer, pattern, read_backend, wait_until};
use node_agent::frontend::nbd::proto::*;
use node_agent::frontend::nbd::{BackendError, BlockBackend, MemBackend, ServerConfig};

struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(server: &TestServer) -> Self {
        let s = TcpStream::connect(server.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Self { s }
    }

    /// Reads the greeting and sends client flags.
    fn greet(server: &TestServer, client_flags: u32) -> Self {
        let mut c = Self::connect(server);
        assert_eq!(c.u64(), NBD_MAGIC);
        assert_eq!(c.u64(), IHAVEOPT);
        assert_eq!(c.u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.send(&client_flags.to_be_bytes());
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("recv");
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().expect("2"))
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().expect("4"))
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().expect("8"))
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (reply type, payload).
    fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        assert_eq!(self.u32(), option);
        let kind = self.u32();
        let len = self.u32() as usize;
        (kind, self.bytes(len))
    }

    fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    /// Handshake with NBD_OPT_GO; returns (size, transmission flags).
    fn go(server: &TestServer, name: &str) -> (Self, u64, u16) {
        let mut c = Self::greet(server, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        c.option(OPT_GO, &Self::info_data(name, &[INFO_BLOCK_SIZE]));
        let (mut size, mut flags) = (None, None);
        loop {
            let (kind, data) = c.option_reply(OPT_GO);
            match kind {
                REP_INFO if data[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().expect("8")));
                    flags = Some(u16::from_be_bytes(data[10..12].try_into().expect("2")));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!(
                    "GO failed with reply type {other:#x}: {:?}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        (c, size.expect("INFO_EXPORT"), flags.expect("flags"))
    }

    fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let h = RequestHeader {
            flags,
            command,
            handle,
            offset,
            length,
        };
        self.send(&h.encode());
    }

    /// Reads a simple reply header: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        let err = self.u32();
        (err, self.u64())
    }

    fn write(&mut self, handle: u64, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.request(CMD_WRITE, flags, handle, offset, data.len() as u32);
        self.send(data);
        let (err, h) = self.reply();
        assert_eq!(h, handle);
        err
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, handle, offset, len);
        let (err, h) = self.reply();
        assert_eq!(h, handle);
        if err != 0 {
            return Err(err);
        }
        Ok(self.bytes(len as usize))
    }

    fn simple(&mut self, command: u16, flags: u16, handle: u64, offset: u64, len: u32) -> u32 {
        self.request(command, flags, handle, offset, len);
        let (err, h) = self.reply();
        assert_eq!(h, handle);
        err
    }

    /// True once the server has closed the connection (EOF or reset).
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
        }
    }
}

/// A well-behaved client still gets service (the abuse only hurt its own connection).
fn assert_still_serving(server: &TestServer, export: &str) {
    let (mut c, _, _) = Raw::go(server, export);
    assert_eq!(c.simple(CMD_FLUSH, 0, 77, 0, 0), 0);
    c.request(CMD_DISC, 0, 78, 0, 0);
    assert!(c.closed_by_server());
}

#[test]
fn go_reports_export_size_flags_and_block_sizes() {
    let (s, _b) = TestServer::with_mem_export("v", 1 << 20, 4096);
    let mut c = Raw::greet(&s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.option(
        OPT_INFO,
        &Raw::info_data("v", &[INFO_BLOCK_SIZE, INFO_NAME]),
    );
    let mut seen = Vec::new();
    loop {
        let (kind, d) = c.option_reply(OPT_INFO);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
        let info = u16::from_be_bytes([d[0], d[1]]);
        match info {
            INFO_EXPORT => {
                assert_eq!(u64::from_be_bytes(d[2..10].try_into().expect("8")), 1 << 20);
                let flags = u16::from_be_bytes([d[10], d[11]]);
                let want = TFLAG_HAS_FLAGS
                    | TFLAG_SEND_FLUSH
                    | TFLAG_SEND_FUA
                    | TFLAG_SEND_TRIM
                    | TFLAG_SEND_WRITE_ZEROES
                    | TFLAG_CAN_MULTI_CONN;
                assert_eq!(flags, want);
                assert_eq!(flags & TFLAG_READ_ONLY, 0);
            }
            INFO_BLOCK_SIZE => {
                let w = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().expect("4"));
                assert_eq!((w(2), w(6), w(10)), (4096, 4096, 32 << 20));
            }
            INFO_NAME => assert_eq!(&d[2..], b"v"),
            other => panic!("unexpected info {other}"),
        }
        seen.push(info);
    }
    seen.sort();
    assert_eq!(seen, [INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE]);
    // INFO leaves the client in option haggling: GO still works on this connection.
    c.option(OPT_GO, &Raw::info_data("v", &[]));
    while c.option_reply(OPT_GO).0 != REP_ACK {}
    assert_eq!(c.simple(CMD_FLUSH, 0, 1, 0, 0), 0);
}

#[test]
fn option_errors_follow_the_spec_and_negotiation_continues() {
    let (s, _b) = TestServer::with_mem_export("v", 1 << 20, 512);
    let mut c = Raw::greet(&s, FLAG_C_FIXED_NEWSTYLE);

    c.option(0x4242, b"whatever");
    assert_eq!(c.option_reply(0x4242).0, REP_ERR_UNSUP);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply(OPT_STRUCTURED_REPLY).0, REP_ERR_UNSUP);
    c.option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.option_reply(OPT_STRUCTURED_REPLY).0, REP_ERR_INVALID);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_reply(OPT_STARTTLS).0, REP_ERR_POLICY);
    c.option(OPT_GO, &Raw::info_data("no-such-volume", &[]));
    let (kind, msg) = c.option_reply(OPT_GO);
    assert_eq!(kind, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("no-such-volume"));
    // Name length pointing past the data.
    c.option(OPT_GO, &[0, 0, 1, 0, b'v', 0, 0]);
    assert_eq!(c.option_reply(OPT_GO).0, REP_ERR_INVALID);
    c.option(OPT_INFO, &[0, 0]);
    assert_eq!(c.option_reply(OPT_INFO).0, REP_ERR_INVALID);
    c.option(OPT_LIST, b"junk");
    assert_eq!(c.option_reply(OPT_LIST).0, REP_ERR_INVALID);

    c.option(OPT_LIST, &[]);
    let (kind, d) = c.option_reply(OPT_LIST);
    assert_eq!(kind, REP_SERVER);
    assert_eq!(d, [0, 0, 0, 1, b'v']);
    assert_eq!(c.option_reply(OPT_LIST).0, REP_ACK);

    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply(OPT_ABORT).0, REP_ACK);
    assert!(c.closed_by_server());
}

#[test]
fn export_name_sends_zero_padding_unless_no_zeroes_was_negotiated() {
    let (s, _b) = TestServer::with_mem_export("v", 1 << 20, 512);
    for (client_flags, pad) in [
        (FLAG_C_FIXED_NEWSTYLE, 124usize),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
    ] {
        let mut c = Raw::greet(&s, client_flags);
        c.option(OPT_EXPORT_NAME, b"v");
        assert_eq!(c.u64(), 1 << 20);
        assert_ne!(c.u16() & TFLAG_HAS_FLAGS, 0);
        if pad > 0 {
            assert!(c.bytes(pad).iter().all(|&b| b == 0));
        }
        // The next bytes on the wire are the reply to our first request.
        assert_eq!(c.simple(CMD_FLUSH, 0, 9, 0, 0), 0);
    }
}

#[test]
fn handshake_violations_close_only_that_connection() {
    let (s, _b) = TestServer::with_mem_export("v", 1 << 20, 512);

    // Unknown client flag bits.
    let mut c = Raw::greet(&s, 1 << 7);
    assert!(c.closed_by_server());
    // Option without IHAVEOPT magic.
    let mut c = Raw::greet(&s, FLAG_C_FIXED_NEWSTYLE);
    c.send(&[0xde; 16]);
    assert!(c.closed_by_server());
    // EXPORT_NAME cannot return an error, so an unknown name ends the session.
    let mut c = Raw::greet(&s, FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"missing");
    assert!(c.closed_by_server());
    // An option claiming a huge payload.
    let mut c = Raw::greet(&s, FLAG_C_FIXED_NEWSTYLE);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&b);
    assert!(c.closed_by_server());
    // Client vanishing mid-handshake.
    let mut c = Raw::greet(&s, FLAG_C_FIXED_NEWSTYLE);
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);

    assert_still_serving(&s, "v");
}

#[test]
fn endless_option_haggling_is_cut_off() {
    let config = ServerConfig {
        max_options_per_handshake: 8,
        ..ServerConfig::default()
    };
    let s = TestServer::start(config);
    s.add_mem("v", 1 << 20, 512);
    let mut c = Raw::greet(&s, FLAG_C_FIXED_NEWSTYLE);
    for _ in 0..8 {
        c.option(0x99, &[]);
        assert_eq!(c.option_reply(0x99).0, REP_ERR_UNSUP);
    }
    c.option(0x99, &[]);
    assert!(c.closed_by_server());
    assert_still_serving(&s, "v");
}

#[test]
fn silent_client_is_dropped_after_the_handshake_timeout() {
    let config = ServerConfig {
        handshake_timeout_ms: 300,
        ..ServerConfig::default()
    };
    let s = TestServer::start(config);
    s.add_mem("v", 1 << 20, 512);
    let mut c = Raw::greet(&s, FLAG_C_FIXED_NEWSTYLE);
    let started = std::time::Instant::now();
    assert!(c.closed_by_server());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn write_read_flush_trim_and_zeroes_reach_the_backend() {
    let (s, b) = TestServer::with_mem_export("v", 1 << 20, 512);
    let (mut c, size, _) = Raw::go(&s, "v");
    assert_eq!(size, 1 << 20);
    let data = pattern(1, 8192);
    assert_eq!(c.write(1, 0, 4096, &data), 0);
    assert_eq!(c.write(2, CMD_FLAG_FUA, 65536, &data), 0);
    assert_eq!(c.read(3, 4096, 8192).expect("read"), data);
    assert_eq!(read_backend(b.as_ref(), 65536, 8192), data);
    assert_eq!(c.simple(CMD_FLUSH, 0, 4, 0, 0), 0);
    assert_eq!(
        c.simple(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 4096, 4096),
        0
    );
    assert_eq!(c.read(6, 4096, 4096).expect("read"), vec![0u8; 4096]);
    assert_eq!(c.read(7, 8192, 4096).expect("read"), data[4096..]);
    assert_eq!(c.simple(CMD_TRIM, CMD_FLAG_FUA, 8, 65536, 8192), 0);
    // Zero-length requests are no-ops.
    assert_eq!(c.write(9, 0, 0, &[]), 0);
    assert_eq!(
        c.read(10, 1 << 20, 0).expect("empty read"),
        Vec::<u8>::new()
    );
    c.request(CMD_DISC, 0, 11, 0, 0);
    assert!(c.closed_by_server());
}

#[test]
fn invalid_requests_get_spec_errors_and_the_connection_survives() {
    let (s, b) = TestServer::with_mem_export("v", 1 << 20, 4096);
    let (mut c, _, _) = Raw::go(&s, "v");
    let block = vec![0x5au8; 4096];
    // Writes past the end: ENOSPC, payload consumed, nothing written.
    assert_eq!(c.write(1, 0, 1 << 20, &block), ENOSPC);
    assert_eq!(
        c.simple(CMD_WRITE_ZEROES, 0, 2, (1 << 20) - 4096, 8192),
        ENOSPC
    );
    // Reads and trims past the end, including offset overflow: EINVAL.
    assert_eq!(c.read(3, 1 << 20, 4096), Err(EINVAL));
    assert_eq!(c.read(4, u64::MAX - 100, 4096), Err(EINVAL));
    assert_eq!(c.simple(CMD_TRIM, 0, 5, u64::MAX, 4096), EINVAL);
    // Misaligned to the 4096-byte minimum block size.
    assert_eq!(c.read(6, 512, 4096), Err(EINVAL));
    assert_eq!(c.write(7, 0, 0, &[1u8; 512]), EINVAL);
    // Unknown command, unadvertised command (CACHE), unknown flag.
    assert_eq!(c.simple(99, 0, 8, 0, 4096), EINVAL);
    assert_eq!(c.simple(5, 0, 9, 0, 4096), EINVAL);
    assert_eq!(c.simple(CMD_READ, 1 << 9, 10, 0, 0), EINVAL);
    // Write with an unknown flag: payload still consumed, EINVAL.
    assert_eq!(c.write(11, 1 << 12, 0, &block), EINVAL);
    // READ larger than the advertised maximum.
    assert_eq!(c.read(12, 0, (32 << 20) + 4096), Err(EINVAL));
    assert!(
        read_backend(b.as_ref(), 0, 4096).iter().all(|&x| x == 0),
        "rejected writes changed data"
    );
    // Still in sync: a valid round trip on the same connection.
    assert_eq!(c.write(13, 0, 0, &block), 0);
    assert_eq!(c.read(14, 0, 4096).expect("read"), block);
}

#[test]
fn oversize_write_and_bad_request_magic_close_the_connection() {
    let (s, b) = TestServer::with_mem_export("v", 64 << 20, 512);
    let (mut c, _, _) = Raw::go(&s, "v");
    c.request(CMD_WRITE, 0, 1, 0, (32 << 20) + 512);
    assert!(c.closed_by_server());

    let (mut c, _, _) = Raw::go(&s, "v");
    let mut h = RequestHeader {
        flags: 0,
        command: CMD_READ,
        handle: 2,
        offset: 0,
        length: 512,
    }
    .encode();
    h[0] ^= 0xff;
    c.send(&h);
    assert!(c.closed_by_server());

    // Abrupt disconnect in the middle of a WRITE payload: the write never happens.
    let (mut c, _, _) = Raw::go(&s, "v");
    c.request(CMD_WRITE, 0, 3, 0, 8192);
    c.send(&[0xffu8; 4096]);
    drop(c);
    assert_still_serving(&s, "v");
    assert!(
        read_backend(b.as_ref(), 0, 8192).iter().all(|&x| x == 0),
        "partial write applied"
    );
}

#[test]
fn pipelined_requests_all_get_replies_with_matching_handles() {
    let (s, b) = TestServer::with_mem_export("v", 8 << 20, 512);
    let (mut c, _, _) = Raw::go(&s, "v");
    let n = 200u64;
    // Send everything before reading anything: replies may come in any order.
    for i in 0..n {
        let off = i * 32768;
        c.request(CMD_WRITE, 0, 1000 + i, off, 32768);
        c.send(&pattern(i, 32768));
    }
    c.request(CMD_FLUSH, 0, 5000, 0, 0);
    let mut handles: Vec<u64> = (0..=n)
        .map(|_| {
            let (err, h) = c.reply();
            assert_eq!(err, 0, "handle {h}");
            h
        })
        .collect();
    handles.sort();
    let mut want: Vec<u64> = (0..n).map(|i| 1000 + i).collect();
    want.push(5000);
    assert_eq!(handles, want);
    for i in [0, 17, n - 1] {
        assert_eq!(
            read_backend(b.as_ref(), i * 32768, 32768),
            pattern(i, 32768)
        );
    }
    // Pipelined reads: match each reply's data to its handle.
    for i in 0..n {
        c.request(CMD_READ, 0, 2000 + i, i * 32768, 32768);
    }
    for _ in 0..n {
        let (err, h) = c.reply();
        assert_eq!(err, 0);
        let i = h - 2000;
        assert_eq!(
            c.bytes(32768),
            pattern(i, 32768),
            "read data for handle {h}"
        );
    }
}

#[test]
fn disconnect_request_completes_outstanding_writes_first() {
    let (s, b) = TestServer::with_mem_export("v", 4 << 20, 512);
    let (mut c, _, _) = Raw::go(&s, "v");
    for i in 0..32u64 {
        c.request(CMD_WRITE, 0, i, i * 65536, 65536);
        c.send(&pattern(100 + i, 65536));
    }
    c.request(CMD_DISC, 0, 99, 0, 0);
    for _ in 0..32 {
        assert_eq!(c.reply().0, 0);
    }
    assert!(c.closed_by_server());
    for i in 0..32u64 {
        assert_eq!(
            read_backend(b.as_ref(), i * 65536, 65536),
            pattern(100 + i, 65536)
        );
    }
}

#[test]
fn removing_an_export_closes_its_connections_and_refuses_new_ones() {
    let s = TestServer::start(ServerConfig::default());
    s.add_mem("gone", 1 << 20, 512);
    s.add_mem("kept", 1 << 20, 512);
    let (mut c, _, _) = Raw::go(&s, "gone");
    let (mut other, _, _) = Raw::go(&s, "kept");
    assert_eq!(c.simple(CMD_FLUSH, 0, 1, 0, 0), 0);
    assert!(wait_until(Duration::from_secs(5), || s
        .registry
        .get("gone")
        .is_some_and(|e| e.connection_count() == 1)));
    s.block_on(s.registry.remove("gone", 5_000))
        .expect("remove waits for connections");
    assert!(c.closed_by_server());
    assert_eq!(other.simple(CMD_FLUSH, 0, 2, 0, 0), 0);

    let mut c = Raw::greet(&s, FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_GO, &Raw::info_data("gone", &[]));
    assert_eq!(c.option_reply(OPT_GO).0, REP_ERR_UNKNOWN);
}

#[test]
fn resized_export_is_seen_by_new_connections() {
    let (s, b) = TestServer::with_mem_export("v", 1 << 20, 512);
    let (mut old, _, _) = Raw::go(&s, "v");
    s.registry.resize("v", 2 << 20).expect("resize");
    assert_eq!(b.size_bytes(), 2 << 20);
    let (mut c, size, _) = Raw::go(&s, "v");
    assert_eq!(size, 2 << 20);
    assert_eq!(c.write(1, 0, (2 << 20) - 512, &[7u8; 512]), 0);
    // The old connection may use the grown area too: bounds follow the backend.
    assert_eq!(
        old.read(2, (2 << 20) - 512, 512).expect("read"),
        vec![7u8; 512]
    );
}

#[test]
fn unix_socket_serves_the_same_protocol() {
    let (s, _b) = TestServer::with_mem_export("v", 1 << 20, 512);
    let mut u = std::os::unix::net::UnixStream::connect(&s.socket).expect("connect unix");
    let mut hello = [0u8; 18];
    u.read_exact(&mut hello).expect("greeting");
    assert_eq!(hello[..8], NBD_MAGIC.to_be_bytes());
    assert_eq!(hello[8..16], IHAVEOPT.to_be_bytes());
}

#[test]
fn server_shutdown_closes_connections_and_stops_listening() {
    let (s, _b) = TestServer::with_mem_export("v", 1 << 20, 512);
    let (mut c, _, _) = Raw::go(&s, "v");
    let mut negotiating = Raw::greet(&s, FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(c.simple(CMD_FLUSH, 0, 1, 0, 0), 0);
    s.server.as_ref().expect("server").shutdown();
    assert!(c.closed_by_server());
    assert!(negotiating.closed_by_server());
    assert!(wait_until(Duration::from_secs(5), || TcpStream::connect(
        s.addr
    )
    .is_err()));
    assert!(!s.socket.exists(), "unix socket file left behind");
}

#[test]
fn writes_acknowledged_on_several_connections_are_visible_on_all() {
    let (s, b) = TestServer::with_mem_export("v", 16 << 20, 4096);
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (mut c, _, flags) = Raw::go(&s, "v");
            assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let off = (w * 64 + i) * 65536;
                    assert_eq!(c.write(i, 0, off, &pattern(w * 1000 + i, 65536)), 0);
                }
                c
            })
        })
        .collect();
    let mut conns: Vec<Raw> = workers
        .into_iter()
        .map(|h| h.join().expect("writer thread"))
        .collect();
    // One flush covers the acknowledged writes of every connection.
    assert_eq!(conns[0].simple(CMD_FLUSH, 0, 500, 0, 0), 0);
    for (w, c) in conns.iter_mut().enumerate() {
        let other = (w as u64 + 1) % 4;
        let off = (other * 64 + 5) * 65536;
        assert_eq!(
            c.read(600, off, 65536).expect("read"),
            pattern(other * 1000 + 5, 65536)
        );
    }
    assert_eq!(
        read_backend(b.as_ref(), 255 * 65536, 65536),
        pattern(3063, 65536)
    );
}

/// Holds every read inside the backend until released, counting how many are inside.
struct GatedBackend {
    inner: MemBackend,
    state: std::sync::Mutex<(usize, usize, bool)>, // (inside now, most inside, open)
    cv: std::sync::Condvar,
}

impl MemOverlay for GatedBackend {
    fn mem(&self) -> &MemBackend {
        &self.inner
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let mut st = self.state.lock().expect("lock");
        st.0 += 1;
        st.1 = st.1.max(st.0);
        self.cv.notify_all();
        while !st.2 {
            st = self.cv.wait(st).expect("wait");
        }
        st.0 -= 1;
        drop(st);
        self.inner.read(offset, buf)
    }
}

#[test]
fn requests_in_flight_per_connection_are_bounded() {
    let config = ServerConfig {
        max_in_flight_requests: 3,
        ..ServerConfig::default()
    };
    let s = TestServer::start(config);
    let gate = std::sync::Arc::new(Overlay(GatedBackend {
        inner: MemBackend::new(1 << 20, 512).expect("mem"),
        state: std::sync::Mutex::new((0, 0, false)),
        cv: std::sync::Condvar::new(),
    }));
    s.add("v", gate.clone());
    let (mut c, _, _) = Raw::go(&s, "v");
    for i in 0..12u64 {
        c.request(CMD_READ, 0, i, i * 4096, 4096);
    }
    // Three reads run concurrently (so requests are not serialized)...
    assert!(wait_until(Duration::from_secs(5), || gate
        .state
        .lock()
        .expect("lock")
        .0
        == 3));
    // ...and while they are held, the other nine stay queued behind the bound.
    assert!(!wait_until(Duration::from_millis(300), || gate
        .state
        .lock()
        .expect("lock")
        .0
        > 3));
    gate.state.lock().expect("lock").2 = true;
    gate.cv.notify_all();
    let mut handles: Vec<u64> = (0..12)
        .map(|_| {
            let (err, h) = c.reply();
            assert_eq!(err, 0);
            c.bytes(4096);
            h
        })
        .collect();
    handles.sort();
    assert_eq!(handles, (0..12).collect::<Vec<u64>>());
    assert_eq!(
        gate.state.lock().expect("lock").1,
        3,
        "more than 3 reads were in flight"
    );
}

/// Fails reads at block 0 with an I/O error, panics on reads at block 1, and reports
/// writes at block 2 as out of space; everything else goes to memory.
struct FaultyBackend(MemBackend);

impl MemOverlay for FaultyBackend {
    fn mem(&self) -> &MemBackend {
        &self.0
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        match offset {
            0 => Err(BackendError::Io("injected read error".into())),
            4096 => panic!("injected backend panic"),
            _ => self.0.read(offset, buf),
        }
    }
    fn write(&self, o: u64, d: &[u8]) -> Result<(), BackendError> {
        if o == 8192 {
            return Err(BackendError::NoSpace("injected".into()));
        }
        self.0.write(o, d)
    }
    fn write_fua(&self, o: u64, d: &[u8]) -> Result<(), BackendError> {
        self.write(o, d)
    }
    fn flush_is_volume_wide(&self) -> bool {
        false
    }
}

#[test]
fn backend_errors_and_panics_become_error_replies() {
    let s = TestServer::start(ServerConfig::default());
    let b = Overlay(FaultyBackend(MemBackend::new(1 << 20, 4096).expect("mem")));
    s.add("v", std::sync::Arc::new(b));
    let (mut c, _, flags) = Raw::go(&s, "v");
    // Flush is not volume-wide here, so multi-conn must not be advertised.
    assert_eq!(flags & TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(c.read(1, 0, 4096), Err(EIO));
    assert_eq!(c.read(2, 4096, 4096), Err(EIO));
    assert_eq!(c.write(3, 0, 8192, &[1u8; 4096]), ENOSPC);
    assert_eq!(c.write(4, 0, 12288, &[1u8; 4096]), 0);
    assert_eq!(c.read(5, 12288, 4096).expect("read"), vec![1u8; 4096]);
}

/// A memory image whose `try_write` declines every other call (as an engine volume does
/// when its WAL is full), counting where each write ran.
struct Declining {
    mem: MemBackend,
    tries: std::sync::atomic::AtomicU64,
    pooled_writes: std::sync::atomic::AtomicU64,
}

impl MemOverlay for Declining {
    fn mem(&self) -> &MemBackend {
        &self.mem
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.pooled_writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.mem.write(offset, data)
    }
    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<(), BackendError>> {
        let n = self.tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        n.is_multiple_of(2).then(|| self.mem.write(offset, data))
    }
    fn runs_inline(&self) -> bool {
        true
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.write(offset, data)
    }
}

#[test]
fn writes_declined_on_the_connection_task_still_land_through_the_pool() {
    let s = TestServer::start(ServerConfig::default());
    let b = std::sync::Arc::new(Overlay(Declining {
        mem: MemBackend::new(1 << 20, 4096).expect("mem"),
        tries: Default::default(),
        pooled_writes: Default::default(),
    }));
    s.add("v", b.clone());
    let (mut c, _, _) = Raw::go(&s, "v");
    for i in 0..8u64 {
        let data = pattern(i + 1, 4096);
        assert_eq!(c.write(i, 0, i * 4096, &data), 0, "write {i}");
    }
    // FUA and large writes never try the inline path.
    assert_eq!(c.write(8, CMD_FLAG_FUA, 8 * 4096, &pattern(9, 4096)), 0);
    assert_eq!(c.write(9, 0, 64 << 10, &pattern(10, 256 << 10)), 0);
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(b.tries.load(SeqCst), 8);
    assert_eq!(b.pooled_writes.load(SeqCst), 4 + 2);
    for i in 0..9u64 {
        let got = c.read(100 + i, i * 4096, 4096).expect("read");
        assert_eq!(got, pattern(i + 1, 4096), "block {i}");
    }
    assert_eq!(
        c.read(200, 64 << 10, 256 << 10).expect("large read"),
        pattern(10, 256 << 10)
    );
}

/// A backend that, like a forwarding one, drives the runtime from `read`: legal on the
/// blocking pool, a panic on a runtime worker.
struct BlocksOnRuntime {
    mem: MemBackend,
    rt: tokio::runtime::Handle,
}

impl MemOverlay for BlocksOnRuntime {
    fn mem(&self) -> &MemBackend {
        &self.mem
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.rt.block_on(async { self.mem.read(offset, buf) })
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.rt.block_on(async { self.mem.write(offset, data) })
    }
    fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.write(offset, data)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.rt.block_on(async { Ok(()) })
    }
}

#[test]
fn backends_that_block_on_the_runtime_are_never_called_on_the_connection_task() {
    let s = TestServer::start(ServerConfig::default());
    let rt = s.rt.as_ref().expect("runtime").handle().clone();
    let b = Overlay(BlocksOnRuntime {
        mem: MemBackend::new(1 << 20, 4096).expect("mem"),
        rt,
    });
    s.add("v", std::sync::Arc::new(b));
    let (mut c, _, _) = Raw::go(&s, "v");
    assert_eq!(c.write(1, 0, 4096, &pattern(3, 4096)), 0);
    assert_eq!(c.read(2, 4096, 4096).expect("read"), pattern(3, 4096));
    // A FLUSH alone on its connection runs on the connection's task, in block_in_place.
    assert_eq!(c.simple(CMD_FLUSH, 0, 3, 0, 0), 0);
}
