//! The kernel NBD attacher, as far as a host without the nbd module can check it: the
//! netlink constants against the installed uapi headers, a real generic netlink round
//! trip to this kernel, the userspace handshake against the agent's NBD server (and the
//! sockets it would hand to the kernel), and the fallback to FUSE + loop.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use common::mem_overlay::{MemOverlay, Overlay};
use node_agent::attach::genl::{self, GenlError, GenlSocket};
use node_agent::attach::kernel::{self, KernelNbdAttacher, KernelNbdConfig};
use node_agent::attach::nbd_genl::{self, NbdNetlink};
use node_agent::attach::select::{self, AttachMode, Choice};
use node_agent::attach::{Attacher, Error, LocalProxies, ProxyCommand, ProxyHost};
use node_agent::frontend::nbd::proto::{CMD_READ, CMD_WRITE, RequestHeader, SIMPLE_REPLY_MAGIC};
use node_agent::frontend::nbd::{BlockBackend, MemBackend};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this kernel has the nbd driver: the tests below expect the opposite answers
/// then, so they hold on either kind of host.
fn kernel_has_nbd() -> bool {
    Path::new("/sys/module/nbd").exists()
}

/// Values of `#define NAME VALUE` and enum members in a C header (enums count from 0
/// or from an explicit `= N`).
fn header_values(path: &str) -> std::collections::HashMap<String, i64> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!("{path}: {e} (install linux-libc-dev, which libc6-dev depends on)")
    });
    let parse = |v: &str| -> Option<i64> {
        let v = v
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .trim();
        if let Some((a, b)) = v.split_once("<<") {
            return Some(parse_int(a)? << parse_int(b)?);
        }
        parse_int(v)
    };
    let mut out = std::collections::HashMap::new();
    let mut in_enum = false;
    let mut next = 0i64;
    for line in text.lines() {
        let line = line.split("/*").next().unwrap_or("").trim();
        if let Some(rest) = line.strip_prefix("#define") {
            let rest = rest.trim();
            if let Some((name, value)) = rest.split_once(char::is_whitespace)
                && let Some(v) = parse(value)
            {
                out.insert(name.to_owned(), v);
            }
        } else if line.starts_with("enum") {
            in_enum = true;
            next = 0;
        } else if in_enum && line.starts_with('}') {
            in_enum = false;
        } else if in_enum && !line.is_empty() && line != "{" {
            let item = line.trim_end_matches(',');
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), parse(v).unwrap_or(next)),
                None => (item.trim(), next),
            };
            out.insert(name.to_owned(), value);
            next = value + 1;
        }
    }
    out
}

fn parse_int(s: &str) -> Option<i64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[test]
fn netlink_constants_match_the_installed_uapi_headers() {
    let nbd = header_values("/usr/include/linux/nbd-netlink.h");
    let want: &[(&str, i64)] = &[
        ("NBD_ATTR_INDEX", nbd_genl::NBD_ATTR_INDEX.into()),
        ("NBD_ATTR_SIZE_BYTES", nbd_genl::NBD_ATTR_SIZE_BYTES.into()),
        (
            "NBD_ATTR_BLOCK_SIZE_BYTES",
            nbd_genl::NBD_ATTR_BLOCK_SIZE_BYTES.into(),
        ),
        ("NBD_ATTR_TIMEOUT", nbd_genl::NBD_ATTR_TIMEOUT.into()),
        (
            "NBD_ATTR_SERVER_FLAGS",
            nbd_genl::NBD_ATTR_SERVER_FLAGS.into(),
        ),
        (
            "NBD_ATTR_CLIENT_FLAGS",
            nbd_genl::NBD_ATTR_CLIENT_FLAGS.into(),
        ),
        ("NBD_ATTR_SOCKETS", nbd_genl::NBD_ATTR_SOCKETS.into()),
        (
            "NBD_ATTR_DEAD_CONN_TIMEOUT",
            nbd_genl::NBD_ATTR_DEAD_CONN_TIMEOUT.into(),
        ),
        (
            "NBD_ATTR_DEVICE_LIST",
            nbd_genl::NBD_ATTR_DEVICE_LIST.into(),
        ),
        (
            "NBD_ATTR_BACKEND_IDENTIFIER",
            nbd_genl::NBD_ATTR_BACKEND_IDENTIFIER.into(),
        ),
        ("NBD_DEVICE_ITEM", nbd_genl::NBD_DEVICE_ITEM.into()),
        ("NBD_DEVICE_INDEX", nbd_genl::NBD_DEVICE_INDEX.into()),
        (
            "NBD_DEVICE_CONNECTED",
            nbd_genl::NBD_DEVICE_CONNECTED.into(),
        ),
        ("NBD_SOCK_ITEM", nbd_genl::NBD_SOCK_ITEM.into()),
        ("NBD_SOCK_FD", nbd_genl::NBD_SOCK_FD.into()),
        ("NBD_CMD_CONNECT", nbd_genl::NBD_CMD_CONNECT.into()),
        ("NBD_CMD_DISCONNECT", nbd_genl::NBD_CMD_DISCONNECT.into()),
        ("NBD_CMD_RECONFIGURE", nbd_genl::NBD_CMD_RECONFIGURE.into()),
        ("NBD_CMD_STATUS", nbd_genl::NBD_CMD_STATUS.into()),
        ("NBD_GENL_VERSION", nbd_genl::NBD_GENL_VERSION.into()),
    ];
    for (name, ours) in want {
        assert_eq!(nbd.get(*name), Some(ours), "{name}");
    }
    let nbd_h = header_values("/usr/include/linux/nbd.h");
    assert_eq!(
        nbd_h.get("NBD_CFLAG_DESTROY_ON_DISCONNECT").copied(),
        Some(nbd_genl::NBD_CFLAG_DESTROY_ON_DISCONNECT as i64)
    );

    let nl = header_values("/usr/include/linux/netlink.h");
    let want: &[(&str, i64)] = &[
        ("NETLINK_GENERIC", genl::NETLINK_GENERIC.into()),
        ("NETLINK_CAP_ACK", genl::NETLINK_CAP_ACK.into()),
        ("NETLINK_EXT_ACK", genl::NETLINK_EXT_ACK.into()),
        ("NLM_F_REQUEST", genl::NLM_F_REQUEST.into()),
        ("NLM_F_MULTI", genl::NLM_F_MULTI.into()),
        ("NLM_F_ACK", genl::NLM_F_ACK.into()),
        ("NLM_F_CAPPED", genl::NLM_F_CAPPED.into()),
        ("NLM_F_ACK_TLVS", genl::NLM_F_ACK_TLVS.into()),
        ("NLMSG_ERROR", genl::NLMSG_ERROR.into()),
        ("NLMSG_DONE", genl::NLMSG_DONE.into()),
        ("NLA_F_NESTED", genl::NLA_F_NESTED.into()),
        ("NLA_F_NET_BYTEORDER", genl::NLA_F_NET_BYTEORDER.into()),
        ("NLMSGERR_ATTR_MSG", genl::NLMSGERR_ATTR_MSG.into()),
        (
            "NLMSGERR_ATTR_MISS_TYPE",
            genl::NLMSGERR_ATTR_MISS_TYPE.into(),
        ),
    ];
    for (name, ours) in want {
        assert_eq!(nl.get(*name), Some(ours), "{name}");
    }
    let g = header_values("/usr/include/linux/genetlink.h");
    assert_eq!(
        g.get("CTRL_CMD_GETFAMILY"),
        Some(&genl::CTRL_CMD_GETFAMILY.into())
    );
    assert_eq!(
        g.get("CTRL_ATTR_FAMILY_ID"),
        Some(&genl::CTRL_ATTR_FAMILY_ID.into())
    );
    assert_eq!(
        g.get("CTRL_ATTR_FAMILY_NAME"),
        Some(&genl::CTRL_ATTR_FAMILY_NAME.into())
    );
    // GENL_ID_CTRL is NLMSG_MIN_TYPE.
    assert_eq!(nl.get("NLMSG_MIN_TYPE"), Some(&genl::GENL_ID_CTRL.into()));
}

#[test]
fn the_kernel_answers_a_family_lookup_and_reports_nbd_missing_clearly() {
    let mut sock = GenlSocket::open(TIMEOUT).expect("generic netlink socket");
    // The controller resolves itself: proves the request layout and the reply parsing
    // against this kernel.
    assert_eq!(
        sock.resolve_family("nlctrl").expect("nlctrl"),
        genl::GENL_ID_CTRL
    );
    let nbd = sock.resolve_family("nbd");
    if kernel_has_nbd() {
        assert!(nbd.is_ok(), "{nbd:?}");
        return;
    }
    let err = nbd.expect_err("no nbd module on this kernel");
    assert!(
        matches!(&err, GenlError::FamilyNotFound(name) if name == "nbd"),
        "{err:?}"
    );
    assert!(err.to_string().contains("module"), "{err}");
    // The socket stays usable after an error reply.
    assert!(sock.resolve_family("nlctrl").is_ok());

    let err = NbdNetlink::open(TIMEOUT).expect_err("no nbd family");
    assert!(matches!(err, GenlError::FamilyNotFound(_)), "{err:?}");
}

#[test]
fn attach_without_the_driver_fails_with_the_reason_and_leaves_no_record() {
    if kernel_has_nbd() {
        return; // exercised only where the driver is absent
    }
    let (server, _b) = TestServer::with_mem_export("vol-k", 8 << 20, 512);
    let dir = tempfile::tempdir().expect("tempdir");
    let a = KernelNbdAttacher::new(KernelNbdConfig::new(dir.path())).expect("attacher");
    let err = a.attach("vol-k", &server.socket).expect_err("no driver");
    assert!(
        matches!(&err, Error::Netlink(GenlError::FamilyNotFound(_))),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"nbd\""), "{err}");
    assert!(a.list().expect("list").is_empty());
    let err = a.resize_to("vol-k", 16 << 20).expect_err("not attached");
    assert!(matches!(err, Error::NotAttached { .. }), "{err:?}");
}

/// Sends one request the way the kernel driver would and returns the reply's errno.
fn raw_request(
    s: &mut std::os::unix::net::UnixStream,
    command: u16,
    offset: u64,
    data: &[u8],
    read_len: u32,
    handle: u64,
) -> (u32, Vec<u8>) {
    let length = if command == CMD_WRITE {
        data.len() as u32
    } else {
        read_len
    };
    let header = RequestHeader {
        flags: 0,
        command,
        handle,
        offset,
        length,
    };
    s.write_all(&header.encode()).expect("send header");
    s.write_all(data).expect("send data");
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).expect("reply");
    assert_eq!(
        u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]),
        SIMPLE_REPLY_MAGIC
    );
    assert_eq!(&reply[8..16], &handle.to_be_bytes());
    let errno = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
    let mut payload = vec![0u8; if errno == 0 { read_len as usize } else { 0 }];
    s.read_exact(&mut payload).expect("read payload");
    (errno, payload)
}

#[test]
fn handshake_leaves_every_socket_ready_for_the_kernel_to_send_requests() {
    let (server, backend) = TestServer::with_mem_export("vol-h", 16 << 20, 512);
    let mut neg = kernel::negotiate(&server.socket, "vol-h", 3, TIMEOUT).expect("negotiate");
    assert_eq!(neg.info.size_bytes, 16 << 20);
    assert_eq!(neg.info.block_size, 512);
    let flags = neg.info.transmission_flags;
    assert_ne!(
        flags & node_agent::frontend::nbd::proto::TFLAG_CAN_MULTI_CONN,
        0
    );
    assert_ne!(
        flags & node_agent::frontend::nbd::proto::TFLAG_SEND_FLUSH,
        0
    );
    assert_eq!(neg.streams.len(), 3, "multi-conn export: all connections");
    let fds = neg.fds();
    assert_eq!(fds.len(), 3);
    kernel::check_geometry("vol-h", &neg.info, 4096).expect("geometry");

    // Each socket is at the start of the transmission phase, with no timeouts left.
    for (i, s) in neg.streams.iter_mut().enumerate() {
        assert_eq!(s.read_timeout().expect("timeout"), None);
        let data = vec![i as u8 + 1; 4096];
        let offset = (i as u64) * 8192;
        let (errno, _) = raw_request(s, CMD_WRITE, offset, &data, 0, 10 + i as u64);
        assert_eq!(errno, 0);
        let (errno, back) = raw_request(s, CMD_READ, offset, &[], 4096, 20 + i as u64);
        assert_eq!(errno, 0);
        assert_eq!(back, data);
        let mut direct = vec![0u8; 4096];
        backend.read(offset, &mut direct).expect("backend read");
        assert_eq!(direct, data, "connection {i} wrote through to the export");
    }
}

/// A MemBackend whose flush is per connection: the server then withholds multi-conn.
struct SingleConn(MemBackend);

impl MemOverlay for SingleConn {
    fn mem(&self) -> &MemBackend {
        &self.0
    }
    fn flush_is_volume_wide(&self) -> bool {
        false
    }
}

#[test]
fn exports_without_multi_conn_get_one_connection_and_unknown_exports_fail() {
    let server = TestServer::start(Default::default());
    let b = Overlay(SingleConn(MemBackend::new(4 << 20, 4096).expect("backend")));
    server.add("vol-one", Arc::new(b));
    let neg = kernel::negotiate(&server.socket, "vol-one", 4, TIMEOUT).expect("negotiate");
    assert_eq!(neg.streams.len(), 1);
    assert_eq!(neg.info.block_size, 4096);
    let err = kernel::check_geometry("vol-one", &neg.info, 512).expect_err("block size");
    assert!(err.to_string().contains("4096"), "{err}");

    let err = kernel::negotiate(&server.socket, "no-such-volume", 2, TIMEOUT)
        .expect_err("unknown export");
    assert!(matches!(err, Error::Handshake { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("no-such-volume"), "{text}");

    let err = kernel::negotiate(&server.dir.path().join("absent.sock"), "v", 1, TIMEOUT)
        .expect_err("no socket");
    assert!(err.to_string().contains("absent.sock"), "{err}");
}

#[test]
fn the_agent_falls_back_to_fuse_loop_where_the_driver_is_missing() {
    if kernel_has_nbd() {
        return; // on such hosts auto picks the kernel; covered by select's unit tests
    }
    let data = tempfile::tempdir().expect("tempdir");
    // Opening an attacher starts no proxy; only an attach would.
    let proxy = || -> std::sync::Arc<dyn ProxyHost> {
        std::sync::Arc::new(LocalProxies::new(ProxyCommand {
            program: "/bin/false".into(),
            args: Vec::new(),
        }))
    };
    let opened = select::open_attacher(AttachMode::Auto, data.path(), proxy()).expect("auto");
    assert_eq!(opened.choice, Choice::FuseLoop);
    assert!(opened.kernel.is_none());
    assert!(data.path().join("attach").is_dir(), "fuse-loop state dir");

    let opened = select::open_attacher(AttachMode::FuseLoop, data.path(), proxy()).expect("forced");
    assert_eq!(opened.choice, Choice::FuseLoop);

    let err = select::open_attacher(AttachMode::Kernel, data.path(), proxy())
        .err()
        .expect("kernel forced without the driver");
    let text = err.to_string();
    assert!(text.contains("--attacher=kernel"), "{text}");
    assert!(text.contains("nbd"), "{text}");
}

// ---- The attacher's logic against an in-memory driver -------------------------------

/// An in-memory stand-in for the kernel driver, following `NbdControl`'s contract: it
/// keeps its own reference to every socket it is given (so the attacher may close its
/// copies), creates `dev/nbdN` and `sys/nbdN/{dev,backend}` under a temp dir, and
/// answers STATUS. `calls` records every operation for the assertions.
#[derive(Default)]
struct FakeDriver {
    devices: std::collections::BTreeMap<u32, FakeDevice>,
    calls: Vec<String>,
}

struct FakeDevice {
    request: nbd_genl::ConnectRequest,
    size_bytes: u64,
    sockets: Vec<std::os::unix::net::UnixStream>,
}

#[derive(Clone)]
struct Fake {
    driver: Arc<std::sync::Mutex<FakeDriver>>,
    root: std::path::PathBuf,
}

fn take_fds(fds: &[u32]) -> Vec<std::os::unix::net::UnixStream> {
    fds.iter()
        .map(|&fd| {
            // SAFETY: the fd is open for the duration of the call (the caller's copy).
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd as i32) };
            std::os::unix::net::UnixStream::from(borrowed.try_clone_to_owned().expect("dup"))
        })
        .collect()
}

fn einval(command: &str) -> GenlError {
    GenlError::Kernel {
        command: command.into(),
        errno: libc::EINVAL,
        message: None,
        missing_attr: None,
    }
}

impl Fake {
    fn new() -> (tempfile::TempDir, Self) {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Fake {
            driver: Default::default(),
            root: dir.path().to_path_buf(),
        };
        (dir, fake)
    }

    fn config(&self) -> KernelNbdConfig {
        KernelNbdConfig {
            dev_dir: self.root.join("dev"),
            sys_block_dir: self.root.join("sys"),
            device_timeout_ms: 1_000,
            ..KernelNbdConfig::new(self.root.join("state"))
        }
    }

    fn attacher(&self) -> KernelNbdAttacher {
        let fake = self.clone();
        KernelNbdAttacher::with_control(
            self.config(),
            Box::new(move || Ok(Box::new(fake.clone()) as Box<dyn nbd_genl::NbdControl>)),
        )
        .expect("attacher")
    }

    fn driver(&self) -> std::sync::MutexGuard<'_, FakeDriver> {
        self.driver.lock().expect("fake driver")
    }

    fn calls(&self) -> Vec<String> {
        self.driver().calls.clone()
    }
}

impl nbd_genl::NbdControl for Fake {
    fn connect(&mut self, req: &nbd_genl::ConnectRequest) -> Result<u32, GenlError> {
        let mut d = self.driver();
        d.calls.push(format!("connect {}", req.socket_fds.len()));
        let index = match req.index {
            Some(i) if d.devices.contains_key(&i) => {
                return Err(GenlError::Kernel {
                    command: "NBD_CMD_CONNECT".into(),
                    errno: libc::EBUSY,
                    message: None,
                    missing_attr: None,
                });
            }
            Some(i) => i,
            None => (0..).find(|i| !d.devices.contains_key(i)).expect("free"),
        };
        let sys = self.root.join("sys").join(format!("nbd{index}"));
        std::fs::create_dir_all(&sys).expect("sys dir");
        std::fs::create_dir_all(self.root.join("dev")).expect("dev dir");
        std::fs::write(sys.join("dev"), format!("43:{}\n", index * 16)).expect("dev");
        if let Some(b) = &req.backend_identifier {
            std::fs::write(sys.join("backend"), format!("{b}\n")).expect("backend");
        }
        std::fs::write(self.root.join("dev").join(format!("nbd{index}")), b"").expect("node");
        d.devices.insert(
            index,
            FakeDevice {
                request: req.clone(),
                size_bytes: req.size_bytes,
                sockets: take_fds(&req.socket_fds),
            },
        );
        Ok(index)
    }

    fn reconfigure(&mut self, req: &nbd_genl::ReconfigureRequest) -> Result<(), GenlError> {
        let mut d = self.driver();
        d.calls.push(format!(
            "reconfigure {} size={:?} sockets={}",
            req.index,
            req.size_bytes,
            req.socket_fds.len()
        ));
        let Some(dev) = d.devices.get_mut(&req.index) else {
            return Err(einval("NBD_CMD_RECONFIGURE"));
        };
        if let Some(s) = req.size_bytes {
            dev.size_bytes = s;
        }
        if !req.socket_fds.is_empty() {
            dev.sockets = take_fds(&req.socket_fds);
        }
        Ok(())
    }

    fn disconnect(&mut self, index: u32) -> Result<(), GenlError> {
        let mut d = self.driver();
        d.calls.push(format!("disconnect {index}"));
        d.devices.remove(&index);
        let _ = std::fs::remove_file(self.root.join(format!("sys/nbd{index}/backend")));
        Ok(())
    }

    fn status(&mut self, index: Option<u32>) -> Result<Vec<nbd_genl::DeviceStatus>, GenlError> {
        let d = self.driver();
        Ok(d.devices
            .keys()
            .filter(|&&i| index.is_none_or(|want| want == i))
            .map(|&i| nbd_genl::DeviceStatus {
                index: i,
                connected: true,
            })
            .collect())
    }
}

/// Writes through socket `n` of device `index` as the kernel would and checks that the
/// bytes reached the export.
fn io_through_device(fake: &Fake, index: u32, n: usize, backend: &MemBackend, seed: u8) {
    let mut d = fake.driver();
    let s = &mut d.devices.get_mut(&index).expect("device").sockets[n];
    let data = vec![seed; 4096];
    let offset = u64::from(seed) * 4096;
    assert_eq!(raw_request(s, CMD_WRITE, offset, &data, 0, 1).0, 0);
    let mut direct = vec![0u8; 4096];
    backend.read(offset, &mut direct).expect("backend read");
    assert_eq!(direct, data);
}

#[test]
fn attach_hands_negotiated_sockets_to_the_driver_and_io_flows_through_them() {
    let (server, backend) = TestServer::with_mem_export("vol-a", 16 << 20, 512);
    let (_dir, fake) = Fake::new();
    let a = fake.attacher();
    let dev = a.attach("vol-a", &server.socket).expect("attach");
    assert_eq!(dev, fake.root.join("dev/nbd0"));
    {
        let d = fake.driver();
        let req = &d.devices[&0].request;
        assert_eq!(req.index, None, "the kernel picks the index");
        assert_eq!(req.size_bytes, 16 << 20);
        assert_eq!(req.block_size_bytes, 4096);
        assert_eq!(req.timeout_s, 60);
        assert_eq!(req.dead_conn_timeout_s, 120);
        assert_eq!(
            req.client_flags, 0,
            "the device must outlive a dead connection"
        );
        let flags = req.server_flags as u16;
        assert_ne!(
            flags & node_agent::frontend::nbd::proto::TFLAG_SEND_FLUSH,
            0
        );
        assert_ne!(
            flags & node_agent::frontend::nbd::proto::TFLAG_CAN_MULTI_CONN,
            0
        );
        assert_eq!(req.socket_fds.len(), 2);
        assert_eq!(req.backend_identifier.as_deref(), Some("blockvol/vol-a"));
    }
    // The attacher closed its copies; the driver's sockets still carry IO.
    io_through_device(&fake, 0, 0, &backend, 1);
    io_through_device(&fake, 0, 1, &backend, 2);
    let listed = a.list().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].device.as_deref(), Some(dev.as_path()));

    // Attach again: the same device, revived with fresh sockets, no second CONNECT.
    assert_eq!(a.attach("vol-a", &server.socket).expect("again"), dev);
    assert_eq!(
        fake.calls(),
        ["connect 2", "reconfigure 0 size=None sockets=2"]
    );
    io_through_device(&fake, 0, 1, &backend, 3);

    let err = a
        .attach("vol-a", &server.dir.path().join("other.sock"))
        .expect_err("other socket");
    assert!(matches!(err, Error::AttachedElsewhere { .. }), "{err:?}");
}

#[test]
fn a_restarted_agent_reconnects_its_devices_and_follows_a_grown_export() {
    let (server, backend) = TestServer::with_mem_export("vol-r", 16 << 20, 512);
    let (_dir, fake) = Fake::new();
    fake.attacher()
        .attach("vol-r", &server.socket)
        .expect("attach");
    backend.resize(32 << 20).expect("grow export");

    // A new attacher on the same state directory, as after an agent restart.
    let a = fake.attacher();
    assert_eq!(a.reconnect_all(), 1);
    assert_eq!(
        fake.calls().last().map(String::as_str),
        Some("reconfigure 0 size=Some(33554432) sockets=2")
    );
    assert_eq!(fake.driver().devices[&0].size_bytes, 32 << 20);
    io_through_device(&fake, 0, 0, &backend, 7);

    a.resize_to("vol-r", 48 << 20).expect("resize");
    assert_eq!(
        fake.calls().last().map(String::as_str),
        Some("reconfigure 0 size=Some(50331648) sockets=0")
    );
    let err = a.resize_to("vol-x", 1 << 20).expect_err("unknown volume");
    assert!(matches!(err, Error::NotAttached { .. }), "{err:?}");
}

#[test]
fn detach_disconnects_only_our_own_device_and_forgets_it() {
    let (server, _b) = TestServer::with_mem_export("vol-d", 8 << 20, 512);
    server.add_mem("vol-e", 8 << 20, 512);
    let (_dir, fake) = Fake::new();
    let a = fake.attacher();
    a.attach("vol-d", &server.socket).expect("attach d");
    a.attach("vol-e", &server.socket).expect("attach e");
    a.detach("vol-d").expect("detach");
    assert!(fake.calls().contains(&"disconnect 0".to_owned()));
    assert!(!fake.driver().devices.contains_key(&0));
    a.detach("vol-d").expect("detach twice");
    assert_eq!(
        fake.calls()
            .iter()
            .filter(|c| c.starts_with("disconnect"))
            .count(),
        1
    );

    // Index 1 now carries someone else's backend: detach forgets it, leaves it alone.
    std::fs::write(fake.root.join("sys/nbd1/backend"), "other-tool\n").expect("retag");
    a.detach("vol-e").expect("detach e");
    assert!(fake.driver().devices.contains_key(&1));
    assert_eq!(
        fake.calls()
            .iter()
            .filter(|c| c.starts_with("disconnect"))
            .count(),
        1
    );
    assert!(a.list().expect("list").is_empty());
}

#[test]
fn a_device_left_by_a_crash_is_adopted_and_a_vanished_one_reconnected() {
    let (server, _b) = TestServer::with_mem_export("vol-c", 8 << 20, 512);
    let (_dir, fake) = Fake::new();
    let a = fake.attacher();
    let dev = a.attach("vol-c", &server.socket).expect("attach");
    // A crash between CONNECT and the state write: only the device's tag remains.
    std::fs::remove_dir_all(fake.root.join("state/vol-c")).expect("lose state");
    assert_eq!(a.attach("vol-c", &server.socket).expect("adopt"), dev);
    assert_eq!(
        fake.calls()
            .iter()
            .filter(|c| c.starts_with("connect"))
            .count(),
        1,
        "adopted, not connected twice: {:?}",
        fake.calls()
    );
    assert_eq!(
        a.list().expect("list")[0].device.as_deref(),
        Some(dev.as_path())
    );

    // The device was torn down behind the agent's back: attach connects anew.
    fake.driver().devices.clear();
    a.attach("vol-c", &server.socket).expect("reattach");
    assert_eq!(
        fake.calls()
            .iter()
            .filter(|c| c.starts_with("connect"))
            .count(),
        2
    );
}
