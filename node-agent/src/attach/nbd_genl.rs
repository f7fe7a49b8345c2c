//! The kernel NBD driver's generic netlink family ("nbd", include/uapi/linux/
//! nbd-netlink.h): CONNECT hands connected, negotiated sockets to the kernel and yields
//! a device index; RECONFIGURE replaces dead sockets and changes the size online;
//! DISCONNECT tears a device down; STATUS lists the devices. The request encoders and
//! reply parsers are pure so they are tested byte for byte; [`NbdNetlink`] sends them.

use std::time::Duration;

use super::genl::{Attrs, GenlError, GenlSocket, Message, NLM_F_ACK, NLM_F_REQUEST};

pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
pub const NBD_GENL_VERSION: u8 = 1;

pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_ATTR_DEVICE_LIST: u16 = 9;
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;

pub const NBD_DEVICE_ITEM: u16 = 1;
pub const NBD_DEVICE_INDEX: u16 = 1;
pub const NBD_DEVICE_CONNECTED: u16 = 2;

pub const NBD_SOCK_ITEM: u16 = 1;
pub const NBD_SOCK_FD: u16 = 1;

pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_STATUS: u8 = 5;

/// Client flag: remove the device when it is disconnected. Not used: the device must
/// outlive a dead connection so RECONFIGURE can revive it.
pub const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;

/// Everything NBD_CMD_CONNECT takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The device index to use; `None` lets the kernel pick a free one.
    pub index: Option<u32>,
    pub size_bytes: u64,
    /// Logical block size: a power of two from 512 to the page size.
    pub block_size_bytes: u64,
    /// The export's transmission flags from the handshake.
    pub server_flags: u64,
    /// Per-request timeout, in seconds (0: the kernel's default).
    pub timeout_s: u64,
    /// How long requests wait for a dead connection to be replaced, in seconds.
    pub dead_conn_timeout_s: u64,
    pub client_flags: u64,
    /// Connected sockets in the transmission phase, as fds of this process.
    pub socket_fds: Vec<u32>,
    /// Shown in /sys/block/nbdN/backend (kernels since 5.17 keep it; older ignore it).
    pub backend_identifier: Option<String>,
}

/// What NBD_CMD_RECONFIGURE changes; `None` fields are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconfigureRequest {
    pub index: u32,
    pub size_bytes: Option<u64>,
    pub timeout_s: Option<u64>,
    pub dead_conn_timeout_s: Option<u64>,
    /// Replacements for dead connections (the kernel ignores extras).
    pub socket_fds: Vec<u32>,
}

/// One device from NBD_CMD_STATUS; `connected` means it has a configuration (the kernel
/// does not report whether its sockets are alive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    pub connected: bool,
}

fn header(family: u16, seq: u32, cmd: u8) -> Message {
    Message::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd,
        NBD_GENL_VERSION,
    )
}

fn put_sockets(m: &mut Message, fds: &[u32]) {
    if fds.is_empty() {
        return;
    }
    m.begin_nested(NBD_ATTR_SOCKETS);
    for &fd in fds {
        m.begin_nested(NBD_SOCK_ITEM);
        m.put_u32(NBD_SOCK_FD, fd);
        m.end_nested();
    }
    m.end_nested();
}

pub fn encode_connect(req: &ConnectRequest, family: u16, seq: u32) -> Result<Vec<u8>, GenlError> {
    let mut m = header(family, seq, NBD_CMD_CONNECT);
    if let Some(i) = req.index {
        m.put_u32(NBD_ATTR_INDEX, i);
    }
    m.put_u64(NBD_ATTR_SIZE_BYTES, req.size_bytes)
        .put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, req.block_size_bytes)
        .put_u64(NBD_ATTR_SERVER_FLAGS, req.server_flags)
        .put_u64(NBD_ATTR_TIMEOUT, req.timeout_s)
        .put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, req.dead_conn_timeout_s)
        .put_u64(NBD_ATTR_CLIENT_FLAGS, req.client_flags);
    put_sockets(&mut m, &req.socket_fds);
    if let Some(id) = &req.backend_identifier {
        m.put_str(NBD_ATTR_BACKEND_IDENTIFIER, id);
    }
    m.finish("NBD_CMD_CONNECT")
}

pub fn encode_reconfigure(
    req: &ReconfigureRequest,
    family: u16,
    seq: u32,
) -> Result<Vec<u8>, GenlError> {
    let mut m = header(family, seq, NBD_CMD_RECONFIGURE);
    m.put_u32(NBD_ATTR_INDEX, req.index);
    if let Some(v) = req.size_bytes {
        m.put_u64(NBD_ATTR_SIZE_BYTES, v);
    }
    if let Some(v) = req.timeout_s {
        m.put_u64(NBD_ATTR_TIMEOUT, v);
    }
    if let Some(v) = req.dead_conn_timeout_s {
        m.put_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, v);
    }
    put_sockets(&mut m, &req.socket_fds);
    m.finish("NBD_CMD_RECONFIGURE")
}

pub fn encode_disconnect(index: u32, family: u16, seq: u32) -> Result<Vec<u8>, GenlError> {
    let mut m = header(family, seq, NBD_CMD_DISCONNECT);
    m.put_u32(NBD_ATTR_INDEX, index);
    m.finish("NBD_CMD_DISCONNECT")
}

/// STATUS of one device, or of all devices with `None`.
pub fn encode_status(index: Option<u32>, family: u16, seq: u32) -> Result<Vec<u8>, GenlError> {
    let mut m = header(family, seq, NBD_CMD_STATUS);
    if let Some(i) = index {
        m.put_u32(NBD_ATTR_INDEX, i);
    }
    m.finish("NBD_CMD_STATUS")
}

fn malformed(command: &str, reason: String) -> GenlError {
    GenlError::Malformed {
        command: command.into(),
        reason,
    }
}

/// The device index from the CONNECT reply.
pub fn parse_connect_reply(replies: &[Vec<u8>]) -> Result<u32, GenlError> {
    const CMD: &str = "NBD_CMD_CONNECT";
    for reply in replies {
        for attr in Attrs::new(reply) {
            let attr = attr.map_err(|r| malformed(CMD, r))?;
            if attr.kind == NBD_ATTR_INDEX {
                return attr.u32().map_err(|r| malformed(CMD, r));
            }
        }
    }
    Err(malformed(CMD, "the reply carries no NBD_ATTR_INDEX".into()))
}

/// The device list from the STATUS reply.
pub fn parse_status_reply(replies: &[Vec<u8>]) -> Result<Vec<DeviceStatus>, GenlError> {
    const CMD: &str = "NBD_CMD_STATUS";
    let bad = |r| malformed(CMD, r);
    let mut out = Vec::new();
    for reply in replies {
        for attr in Attrs::new(reply) {
            let attr = attr.map_err(bad)?;
            if attr.kind != NBD_ATTR_DEVICE_LIST {
                continue;
            }
            for item in attr.nested() {
                let item = item.map_err(bad)?;
                if item.kind != NBD_DEVICE_ITEM {
                    continue;
                }
                let (mut index, mut connected) = (None, None);
                for field in item.nested() {
                    let field = field.map_err(bad)?;
                    match field.kind {
                        NBD_DEVICE_INDEX => index = Some(field.u32().map_err(bad)?),
                        NBD_DEVICE_CONNECTED => connected = Some(field.u8().map_err(bad)? != 0),
                        _ => {}
                    }
                }
                match (index, connected) {
                    (Some(index), Some(connected)) => out.push(DeviceStatus { index, connected }),
                    _ => return Err(bad("a device item lacks its index or state".into())),
                }
            }
        }
    }
    Ok(out)
}

/// The four operations the kernel attacher needs from the driver. [`NbdNetlink`] is the
/// real one; tests substitute an in-memory driver.
///
/// Contract (as the kernel implements it): `connect` takes its own reference to every
/// socket fd before returning, so the caller may close its copies; `reconfigure` with
/// sockets replaces dead connections and ignores extras; `disconnect` of an index that
/// is not configured succeeds; `status` of an unknown index lists nothing.
pub trait NbdControl {
    fn connect(&mut self, req: &ConnectRequest) -> Result<u32, GenlError>;
    fn reconfigure(&mut self, req: &ReconfigureRequest) -> Result<(), GenlError>;
    fn disconnect(&mut self, index: u32) -> Result<(), GenlError>;
    fn status(&mut self, index: Option<u32>) -> Result<Vec<DeviceStatus>, GenlError>;
}

/// A socket bound to the resolved "nbd" family. Every operation is one request and its
/// ack; errors name the command.
#[derive(Debug)]
pub struct NbdNetlink {
    socket: GenlSocket,
    family: u16,
}

impl NbdNetlink {
    /// Opens a socket and resolves the family; `GenlError::FamilyNotFound` when the
    /// nbd module is not loaded.
    pub fn open(timeout: Duration) -> Result<Self, GenlError> {
        let mut socket = GenlSocket::open(timeout)?;
        let family = socket.resolve_family(NBD_GENL_FAMILY_NAME)?;
        Ok(NbdNetlink { socket, family })
    }

    fn call(
        &mut self,
        command: &str,
        encode: impl FnOnce(u16, u32) -> Result<Vec<u8>, GenlError>,
    ) -> Result<Vec<Vec<u8>>, GenlError> {
        let seq = self.socket.next_seq();
        let request = encode(self.family, seq)?;
        self.socket.transact(command, &request, seq, self.family)
    }
}

impl NbdControl for NbdNetlink {
    /// Configures a device; returns its index.
    fn connect(&mut self, req: &ConnectRequest) -> Result<u32, GenlError> {
        let replies = self.call("NBD_CMD_CONNECT", |f, s| encode_connect(req, f, s))?;
        match (parse_connect_reply(&replies), req.index) {
            (Ok(i), _) => Ok(i),
            // Kernels that do not reply with the index still used the one asked for.
            (Err(_), Some(i)) if replies.is_empty() => Ok(i),
            (Err(e), _) => Err(e),
        }
    }

    fn reconfigure(&mut self, req: &ReconfigureRequest) -> Result<(), GenlError> {
        self.call("NBD_CMD_RECONFIGURE", |f, s| encode_reconfigure(req, f, s))
            .map(drop)
    }

    fn disconnect(&mut self, index: u32) -> Result<(), GenlError> {
        self.call("NBD_CMD_DISCONNECT", |f, s| encode_disconnect(index, f, s))
            .map(drop)
    }

    fn status(&mut self, index: Option<u32>) -> Result<Vec<DeviceStatus>, GenlError> {
        let replies = self.call("NBD_CMD_STATUS", |f, s| encode_status(index, f, s))?;
        parse_status_reply(&replies)
    }
}

#[cfg(test)]
mod tests {
    use super::super::genl::{GENL_HDRLEN, NLA_F_NESTED, NLMSG_HDRLEN};
    use super::*;

    const FAMILY: u16 = 0x1b;

    /// Expected bytes, written field by field from the uapi structs.
    struct Expect(Vec<u8>);
    impl Expect {
        fn header(cmd: u8, seq: u32) -> Self {
            let mut v = Vec::new();
            v.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by done()
            v.extend_from_slice(&FAMILY.to_ne_bytes());
            v.extend_from_slice(&0x0005u16.to_ne_bytes()); // NLM_F_REQUEST | NLM_F_ACK
            v.extend_from_slice(&seq.to_ne_bytes());
            v.extend_from_slice(&0u32.to_ne_bytes());
            v.extend_from_slice(&[cmd, 1, 0, 0]); // genlmsghdr: cmd, version 1
            Expect(v)
        }
        fn u32(mut self, kind: u16, v: u32) -> Self {
            self.0.extend_from_slice(&8u16.to_ne_bytes());
            self.0.extend_from_slice(&kind.to_ne_bytes());
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }
        fn u64(mut self, kind: u16, v: u64) -> Self {
            self.0.extend_from_slice(&12u16.to_ne_bytes());
            self.0.extend_from_slice(&kind.to_ne_bytes());
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn sockets(self, fds: &[u32]) -> Self {
            // [NBD_ATTR_SOCKETS [NBD_SOCK_ITEM [NBD_SOCK_FD u32]]...]: 4 + n * (4 + 8)
            let len = 4 + fds.len() * 12;
            let mut s = self
                .raw(&(len as u16).to_ne_bytes())
                .raw(&(7u16 | 0x8000).to_ne_bytes());
            for &fd in fds {
                s = s
                    .raw(&12u16.to_ne_bytes())
                    .raw(&(1u16 | 0x8000).to_ne_bytes())
                    .u32(1, fd);
            }
            s
        }
        fn done(mut self) -> Vec<u8> {
            let len = self.0.len() as u32;
            self.0[0..4].copy_from_slice(&len.to_ne_bytes());
            self.0
        }
    }

    fn connect_req() -> ConnectRequest {
        ConnectRequest {
            index: Some(3),
            size_bytes: 1 << 30,
            block_size_bytes: 4096,
            server_flags: 0x16d,
            timeout_s: 60,
            dead_conn_timeout_s: 120,
            client_flags: 0,
            socket_fds: vec![9, 10],
            backend_identifier: Some("blockvol/pvc-1".into()),
        }
    }

    #[test]
    fn connect_message_matches_the_uapi_layout_byte_for_byte() {
        let bytes = encode_connect(&connect_req(), FAMILY, 42).expect("encode");
        let want = Expect::header(1, 42)
            .u32(1, 3) // NBD_ATTR_INDEX
            .u64(2, 1 << 30) // NBD_ATTR_SIZE_BYTES
            .u64(3, 4096) // NBD_ATTR_BLOCK_SIZE_BYTES
            .u64(5, 0x16d) // NBD_ATTR_SERVER_FLAGS
            .u64(4, 60) // NBD_ATTR_TIMEOUT
            .u64(8, 120) // NBD_ATTR_DEAD_CONN_TIMEOUT
            .u64(6, 0) // NBD_ATTR_CLIENT_FLAGS
            .sockets(&[9, 10])
            // NBD_ATTR_BACKEND_IDENTIFIER: 4 + 15 bytes ("blockvol/pvc-1\0"), padded to 20
            .raw(&19u16.to_ne_bytes())
            .raw(&10u16.to_ne_bytes())
            .raw(b"blockvol/pvc-1\0\0")
            .done();
        assert_eq!(bytes, want);
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn connect_without_index_lets_the_kernel_pick() {
        let req = ConnectRequest {
            index: None,
            backend_identifier: None,
            socket_fds: vec![5],
            ..connect_req()
        };
        let bytes = encode_connect(&req, FAMILY, 1).expect("encode");
        let want = Expect::header(1, 1)
            .u64(2, 1 << 30)
            .u64(3, 4096)
            .u64(5, 0x16d)
            .u64(4, 60)
            .u64(8, 120)
            .u64(6, 0)
            .sockets(&[5])
            .done();
        assert_eq!(bytes, want);
    }

    #[test]
    fn reconfigure_disconnect_and_status_messages_match_the_uapi_layout() {
        let req = ReconfigureRequest {
            index: 7,
            size_bytes: Some(2 << 30),
            timeout_s: None,
            dead_conn_timeout_s: Some(30),
            socket_fds: vec![11],
        };
        let bytes = encode_reconfigure(&req, FAMILY, 2).expect("encode");
        let want = Expect::header(3, 2)
            .u32(1, 7)
            .u64(2, 2 << 30)
            .u64(8, 30)
            .sockets(&[11])
            .done();
        assert_eq!(bytes, want);

        let resize_only = ReconfigureRequest {
            index: 7,
            size_bytes: Some(4096),
            ..Default::default()
        };
        let bytes = encode_reconfigure(&resize_only, FAMILY, 3).expect("encode");
        assert_eq!(bytes, Expect::header(3, 3).u32(1, 7).u64(2, 4096).done());

        let bytes = encode_disconnect(7, FAMILY, 4).expect("encode");
        assert_eq!(bytes, Expect::header(2, 4).u32(1, 7).done());

        let bytes = encode_status(None, FAMILY, 5).expect("encode");
        assert_eq!(bytes, Expect::header(5, 5).done());
        assert_eq!(bytes.len(), NLMSG_HDRLEN + GENL_HDRLEN);
        let bytes = encode_status(Some(0), FAMILY, 6).expect("encode");
        assert_eq!(bytes, Expect::header(5, 6).u32(1, 0).done());
    }

    /// Attribute bytes as the kernel writes them (nla_nest_start_noflag: no NESTED bit).
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(payload);
        v.resize((v.len() + 3) & !3, 0);
        v
    }

    fn status_reply(devices: &[(u32, u8)]) -> Vec<u8> {
        let items: Vec<u8> = devices
            .iter()
            .flat_map(|&(i, c)| {
                let inner = [attr(1, &i.to_ne_bytes()), attr(2, &[c])].concat();
                attr(NBD_DEVICE_ITEM, &inner)
            })
            .collect();
        attr(NBD_ATTR_DEVICE_LIST, &items)
    }

    #[test]
    fn status_reply_lists_devices_with_or_without_nested_flags() {
        let reply = status_reply(&[(0, 1), (1, 0), (15, 1)]);
        let got = parse_status_reply(std::slice::from_ref(&reply)).expect("parse");
        assert_eq!(
            got,
            vec![
                DeviceStatus {
                    index: 0,
                    connected: true
                },
                DeviceStatus {
                    index: 1,
                    connected: false
                },
                DeviceStatus {
                    index: 15,
                    connected: true
                },
            ]
        );
        let mut flagged = reply;
        let t = u16::from_ne_bytes([flagged[2], flagged[3]]) | NLA_F_NESTED;
        flagged[2..4].copy_from_slice(&t.to_ne_bytes());
        assert_eq!(parse_status_reply(&[flagged]).expect("parse").len(), 3);
        assert_eq!(parse_status_reply(&[status_reply(&[])]).expect("empty"), []);
    }

    #[test]
    fn connect_reply_yields_the_index_and_malformed_replies_are_errors() {
        let reply = attr(NBD_ATTR_INDEX, &5u32.to_ne_bytes());
        assert_eq!(parse_connect_reply(&[reply]).expect("index"), 5);
        assert!(parse_connect_reply(&[]).is_err());
        assert!(parse_connect_reply(&[attr(NBD_ATTR_INDEX, &[1, 2])]).is_err());
        let item_without_index = attr(
            NBD_ATTR_DEVICE_LIST,
            &attr(NBD_DEVICE_ITEM, &attr(NBD_DEVICE_CONNECTED, &[1])),
        );
        let err = parse_status_reply(&[item_without_index]).expect_err("no index");
        assert!(err.to_string().contains("NBD_CMD_STATUS"), "{err}");
        let mut truncated = status_reply(&[(1, 1)]);
        truncated.truncate(truncated.len() - 3);
        assert!(parse_status_reply(&[truncated]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_reply_payloads_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_status_reply(std::slice::from_ref(&bytes));
            let _ = parse_connect_reply(&[bytes]);
        }

        #[test]
        fn encoded_sockets_parse_back_to_the_same_fds(fds in proptest::collection::vec(0u32..65536, 1..8), size in proptest::num::u64::ANY) {
            let req = ReconfigureRequest { index: 1, size_bytes: Some(size), socket_fds: fds.clone(), ..Default::default() };
            let bytes = encode_reconfigure(&req, FAMILY, 1).expect("encode");
            let attrs = &bytes[NLMSG_HDRLEN + GENL_HDRLEN..];
            let mut got = Vec::new();
            let mut got_size = None;
            for a in Attrs::new(attrs) {
                let a = a.expect("attr");
                match a.kind {
                    NBD_ATTR_SIZE_BYTES => got_size = Some(a.u64().expect("u64")),
                    NBD_ATTR_SOCKETS => for item in a.nested() {
                        let item = item.expect("item");
                        proptest::prop_assert_eq!(item.kind, NBD_SOCK_ITEM);
                        for f in item.nested() {
                            got.push(f.expect("fd").u32().expect("u32"));
                        }
                    },
                    _ => {}
                }
            }
            proptest::prop_assert_eq!(got, fds);
            proptest::prop_assert_eq!(got_size, Some(size));
        }
    }
}
