//! Generic netlink, just enough to drive the kernel NBD driver: building requests
//! (netlink header, genetlink header, 4-byte aligned attributes, nests), resolving a
//! family id through the controller, and reading replies up to the ack. Parsing never
//! trusts a length it has not checked, so a truncated or hostile datagram is an error,
//! never a panic. Layouts follow include/uapi/linux/{netlink,genetlink}.h.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

pub const NETLINK_GENERIC: libc::c_int = 16;
pub const SOL_NETLINK: libc::c_int = 270;
pub const NETLINK_CAP_ACK: libc::c_int = 10;
pub const NETLINK_EXT_ACK: libc::c_int = 11;

pub const NLM_F_REQUEST: u16 = 0x01;
pub const NLM_F_MULTI: u16 = 0x02;
pub const NLM_F_ACK: u16 = 0x04;
pub const NLM_F_CAPPED: u16 = 0x100;
pub const NLM_F_ACK_TLVS: u16 = 0x200;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;

pub const NLA_F_NESTED: u16 = 1 << 15;
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

pub const NLMSGERR_ATTR_MSG: u16 = 1;
pub const NLMSGERR_ATTR_MISS_TYPE: u16 = 5;

pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// The controller's own genetlink version.
pub const CTRL_VERSION: u8 = 2;

/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
pub const NLMSG_HDRLEN: usize = 16;
/// `struct genlmsghdr`: cmd u8, version u8, reserved u16.
pub const GENL_HDRLEN: usize = 4;
/// `struct nlattr`: len u16, type u16.
pub const NLA_HDRLEN: usize = 4;

/// Rounds up to the 4-byte netlink alignment (`NLMSG_ALIGN`, `NLA_ALIGN`).
pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Why a generic netlink exchange failed; every variant names the command.
#[derive(Debug, thiserror::Error)]
pub enum GenlError {
    #[error(
        "generic netlink family {0:?} is not registered in this kernel (is its module loaded?)"
    )]
    FamilyNotFound(String),
    #[error("{command}: the kernel refused it: {}{}", io::Error::from_raw_os_error(*.errno), detail(.message, .missing_attr))]
    Kernel {
        command: String,
        /// Positive errno.
        errno: i32,
        /// The extended-ack message, when the kernel sent one.
        message: Option<String>,
        /// The extended-ack "missing attribute" type, when the kernel sent one.
        missing_attr: Option<u32>,
    },
    #[error("{command}: malformed netlink reply: {reason}")]
    Malformed { command: String, reason: String },
    #[error("{command}: request cannot be encoded: {reason}")]
    Encode { command: String, reason: String },
    #[error("{command}: netlink socket: {source}")]
    Io {
        command: String,
        #[source]
        source: io::Error,
    },
}

fn detail(message: &Option<String>, missing: &Option<u32>) -> String {
    let mut s = String::new();
    if let Some(m) = message {
        s.push_str(&format!(" ({m})"));
    }
    if let Some(t) = missing {
        s.push_str(&format!(" (missing attribute {t})"));
    }
    s
}

impl GenlError {
    /// The kernel's errno, when the kernel answered with an error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            GenlError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Builds one request: netlink header, genetlink header, attributes. Lengths are
/// filled in by [`Message::finish`]; an attribute too long for its u16 length makes
/// `finish` fail instead of writing a wrong length.
#[derive(Debug, Clone)]
pub struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
    overflow: Option<String>,
}

impl Message {
    pub fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set in finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Message {
            buf,
            nests: Vec::new(),
            overflow: None,
        }
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    pub fn put_bytes(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let Ok(len) = u16::try_from(NLA_HDRLEN + payload.len()) else {
            self.overflow = Some(format!(
                "attribute {kind} has {} bytes (at most {})",
                payload.len(),
                u16::MAX as usize - NLA_HDRLEN
            ));
            return self;
        };
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }
    pub fn put_u8(&mut self, kind: u16, v: u8) -> &mut Self {
        self.put_bytes(kind, &[v])
    }
    pub fn put_u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put_bytes(kind, &v.to_ne_bytes())
    }
    pub fn put_u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.put_bytes(kind, &v.to_ne_bytes())
    }
    /// A NUL-terminated string (`NLA_NUL_STRING`, `NLA_STRING` both accept it).
    pub fn put_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = Vec::with_capacity(s.len() + 1);
        b.extend_from_slice(s.as_bytes());
        b.push(0);
        self.put_bytes(kind, &b)
    }

    /// Opens a nested attribute (`NLA_F_NESTED` set); close it with [`Message::end_nested`].
    pub fn begin_nested(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nested(&mut self) -> &mut Self {
        let Some(start) = self.nests.pop() else {
            self.overflow = Some("end_nested without begin_nested".into());
            return self;
        };
        match u16::try_from(self.buf.len() - start) {
            Ok(len) => self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes()),
            Err(_) => self.overflow = Some("nested attribute longer than 65535 bytes".into()),
        }
        self
    }

    /// The finished datagram.
    pub fn finish(mut self, command: &str) -> Result<Vec<u8>, GenlError> {
        if !self.nests.is_empty() {
            self.overflow = Some("nested attribute left open".into());
        }
        if let Some(reason) = self.overflow {
            return Err(GenlError::Encode {
                command: command.into(),
                reason,
            });
        }
        let len = u32::try_from(self.buf.len()).map_err(|_| GenlError::Encode {
            command: command.into(),
            reason: "message longer than 4 GiB".into(),
        })?;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        Ok(self.buf)
    }
}

/// One attribute of a reply; `kind` has the flag bits masked off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    pub kind: u16,
    pub payload: &'a [u8],
}

impl<'a> Attr<'a> {
    fn fixed<const N: usize>(&self) -> Result<[u8; N], String> {
        self.payload
            .get(..N)
            .and_then(|b| <[u8; N]>::try_from(b).ok())
            .ok_or_else(|| {
                format!(
                    "attribute {} has {} bytes, expected {N}",
                    self.kind,
                    self.payload.len()
                )
            })
    }
    pub fn u8(&self) -> Result<u8, String> {
        self.fixed::<1>().map(|b| b[0])
    }
    pub fn u16(&self) -> Result<u16, String> {
        self.fixed::<2>().map(u16::from_ne_bytes)
    }
    pub fn u32(&self) -> Result<u32, String> {
        self.fixed::<4>().map(u32::from_ne_bytes)
    }
    pub fn u64(&self) -> Result<u64, String> {
        self.fixed::<8>().map(u64::from_ne_bytes)
    }
    /// A string attribute without its terminating NUL (lossy UTF-8).
    pub fn string(&self) -> String {
        let end = self
            .payload
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.payload.len());
        String::from_utf8_lossy(&self.payload[..end]).into_owned()
    }
    /// The attributes nested in this one.
    pub fn nested(&self) -> Attrs<'a> {
        Attrs::new(self.payload)
    }
}

/// Iterates the attributes in a buffer; a bad length ends iteration with an error.
#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Attrs<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Attrs {
            rest: buf,
            failed: false,
        }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let fail = |this: &mut Self, msg: String| {
            this.failed = true;
            Some(Err(msg))
        };
        if self.rest.len() < NLA_HDRLEN {
            let n = self.rest.len();
            return fail(self, format!("{n} trailing bytes after the last attribute"));
        }
        let len = u16::from_ne_bytes([self.rest[0], self.rest[1]]) as usize;
        let kind = u16::from_ne_bytes([self.rest[2], self.rest[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > self.rest.len() {
            let have = self.rest.len();
            return fail(
                self,
                format!("attribute {kind} claims {len} bytes, {have} remain"),
            );
        }
        let payload = &self.rest[NLA_HDRLEN..len];
        self.rest = &self.rest[align4(len).min(self.rest.len())..];
        Some(Ok(Attr { kind, payload }))
    }
}

/// What one reply datagram held for the request with the expected sequence number.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplyBatch {
    /// Attribute areas (after the genetlink header) of the data messages, in order.
    pub data: Vec<Vec<u8>>,
    /// An ack, an error or NLMSG_DONE ended the exchange.
    pub finished: bool,
}

/// Parses one datagram of replies. Messages for other sequence numbers (stale replies)
/// are skipped; an NLMSG_ERROR with a non-zero code becomes `GenlError::Kernel`.
pub fn parse_replies(
    buf: &[u8],
    seq: u32,
    data_type: u16,
    command: &str,
) -> Result<ReplyBatch, GenlError> {
    let malformed = |reason: String| GenlError::Malformed {
        command: command.into(),
        reason,
    };
    let mut out = ReplyBatch::default();
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.len() < NLMSG_HDRLEN {
            return Err(malformed(format!(
                "{} bytes cannot hold a netlink header",
                rest.len()
            )));
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let flags = u16::from_ne_bytes([rest[6], rest[7]]);
        let msg_seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(malformed(format!(
                "message claims {len} bytes, {} remain",
                rest.len()
            )));
        }
        let body = &rest[NLMSG_HDRLEN..len];
        rest = &rest[align4(len).min(rest.len())..];
        if msg_seq != seq {
            continue;
        }
        match kind {
            NLMSG_ERROR => {
                let code = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| malformed("error message without a code".into()))?;
                out.finished = true;
                if code == 0 {
                    continue;
                }
                let (message, missing_attr) = parse_ext_ack(body, flags);
                return Err(GenlError::Kernel {
                    command: command.into(),
                    errno: code.checked_neg().unwrap_or(i32::MAX),
                    message,
                    missing_attr,
                });
            }
            NLMSG_DONE => out.finished = true,
            k if k == data_type => {
                if body.len() < GENL_HDRLEN {
                    return Err(malformed(format!(
                        "data message of {} bytes lacks the genetlink header",
                        body.len()
                    )));
                }
                // A plain reply; the ack (every request asks for one) ends the exchange.
                out.data.push(body[GENL_HDRLEN..].to_vec());
            }
            other => {
                return Err(malformed(format!(
                    "unexpected message type {other} (expected {data_type})"
                )));
            }
        }
    }
    Ok(out)
}

/// The extended ack TLVs after an error's echoed request header (best effort: a
/// malformed TLV area only loses the detail, not the error).
fn parse_ext_ack(body: &[u8], flags: u16) -> (Option<String>, Option<u32>) {
    if flags & NLM_F_ACK_TLVS == 0 {
        return (None, None);
    }
    let Some(echo) = body.get(4..4 + NLMSG_HDRLEN) else {
        return (None, None);
    };
    let echoed_len = u32::from_ne_bytes([echo[0], echo[1], echo[2], echo[3]]) as usize;
    let skip = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        align4(echoed_len)
    };
    let Some(tlvs) = body.get(4 + skip..) else {
        return (None, None);
    };
    let mut message = None;
    let mut missing = None;
    for attr in Attrs::new(tlvs).map_while(Result::ok) {
        match attr.kind {
            NLMSGERR_ATTR_MSG => message = Some(attr.string()),
            NLMSGERR_ATTR_MISS_TYPE => missing = attr.u32().ok(),
            _ => {}
        }
    }
    (message, missing)
}

/// A blocking `NETLINK_GENERIC` socket. Every receive is bounded by the timeout given
/// to [`GenlSocket::open`], so a request never hangs the caller.
#[derive(Debug)]
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
    timeout: Duration,
}

fn last_os_error(command: &str) -> GenlError {
    GenlError::Io {
        command: command.into(),
        source: io::Error::last_os_error(),
    }
}

impl GenlSocket {
    pub fn open(timeout: Duration) -> Result<Self, GenlError> {
        const WHAT: &str = "opening a generic netlink socket";
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(last_os_error(WHAT));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a zeroed sockaddr_nl is valid (pid 0: the kernel assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(last_os_error(WHAT));
        }
        let one: libc::c_int = 1;
        for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            // Best effort: older kernels lack extended acks; replies stay parseable.
            // SAFETY: setsockopt with a valid int option value.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    opt,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let tv = libc::timeval {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: setsockopt with a valid timeval.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(last_os_error(WHAT));
        }
        Ok(GenlSocket {
            fd,
            seq: 1,
            timeout,
        })
    }

    /// The sequence number for the next request.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Sends `request` (built with sequence number `seq`, `NLM_F_ACK` set) and collects
    /// the data messages of type `data_type` until the kernel's ack or error.
    pub fn transact(
        &mut self,
        command: &str,
        request: &[u8],
        seq: u32,
        data_type: u16,
    ) -> Result<Vec<Vec<u8>>, GenlError> {
        // SAFETY: a zeroed sockaddr_nl with pid 0 addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: request and kernel are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(last_os_error(command));
        }
        // Each receive is bounded by SO_RCVTIMEO; the deadline also bounds a stream of
        // unrelated datagrams.
        let deadline = std::time::Instant::now() + self.timeout;
        let mut data = Vec::new();
        loop {
            if std::time::Instant::now() >= deadline {
                return Err(GenlError::Io {
                    command: command.into(),
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no complete reply from the kernel in time",
                    ),
                });
            }
            let datagram = self.recv(command)?;
            let Some(datagram) = datagram else {
                continue; // not from the kernel
            };
            let batch = parse_replies(&datagram, seq, data_type, command)?;
            data.extend(batch.data);
            if batch.finished {
                return Ok(data);
            }
        }
    }

    /// One datagram, sized with MSG_PEEK|MSG_TRUNC first; `None` when it did not come
    /// from the kernel (another process may send to our port).
    fn recv(&mut self, command: &str) -> Result<Option<Vec<u8>>, GenlError> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: a zero-length peek with a null buffer is allowed with MSG_TRUNC.
        let size = unsafe {
            libc::recv(
                fd,
                std::ptr::null_mut(),
                0,
                libc::MSG_PEEK | libc::MSG_TRUNC,
            )
        };
        if size < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.kind(), io::ErrorKind::Interrupted) {
                return Ok(None);
            }
            return Err(GenlError::Io {
                command: command.into(),
                source: if matches!(e.kind(), io::ErrorKind::WouldBlock) {
                    io::Error::new(io::ErrorKind::TimedOut, "no reply from the kernel in time")
                } else {
                    e
                },
            });
        }
        let mut buf = vec![0u8; (size as usize).max(NLMSG_HDRLEN)];
        // SAFETY: zeroed sockaddr_nl is valid storage for recvfrom.
        let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: buf, from and from_len are valid for writes of the given sizes.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            return Err(last_os_error(command));
        }
        if from.nl_pid != 0 {
            return Ok(None);
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }

    /// The id of the generic netlink family `name` (CTRL_CMD_GETFAMILY).
    pub fn resolve_family(&mut self, name: &str) -> Result<u16, GenlError> {
        let command = format!("CTRL_CMD_GETFAMILY {name:?}");
        let seq = self.next_seq();
        let request = encode_get_family(name, seq).finish(&command)?;
        let replies = match self.transact(&command, &request, seq, GENL_ID_CTRL) {
            Err(GenlError::Kernel { errno, .. }) if errno == libc::ENOENT => {
                return Err(GenlError::FamilyNotFound(name.into()));
            }
            r => r?,
        };
        parse_family_id(&replies, &command)
    }
}

/// The CTRL_CMD_GETFAMILY request for `name`.
pub fn encode_get_family(name: &str, seq: u32) -> Message {
    let mut m = Message::new(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        CTRL_VERSION,
    );
    m.put_str(CTRL_ATTR_FAMILY_NAME, name);
    m
}

/// CTRL_ATTR_FAMILY_ID from a CTRL_CMD_GETFAMILY reply.
pub fn parse_family_id(replies: &[Vec<u8>], command: &str) -> Result<u16, GenlError> {
    let malformed = |reason: String| GenlError::Malformed {
        command: command.into(),
        reason,
    };
    for reply in replies {
        for attr in Attrs::new(reply) {
            let attr = attr.map_err(malformed)?;
            if attr.kind == CTRL_ATTR_FAMILY_ID {
                return attr.u16().map_err(malformed);
            }
        }
    }
    Err(malformed("no CTRL_ATTR_FAMILY_ID in the reply".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }
    fn ne32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    /// A reply message as the kernel lays it out.
    pub(crate) fn kernel_msg(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&ne32((NLMSG_HDRLEN + body.len()) as u32));
        v.extend_from_slice(&ne16(kind));
        v.extend_from_slice(&ne16(flags));
        v.extend_from_slice(&ne32(seq));
        v.extend_from_slice(&ne32(4242));
        v.extend_from_slice(body);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn get_family_request_is_laid_out_like_the_uapi_structs() {
        let bytes = encode_get_family("nbd", 7).finish("t").expect("encode");
        let mut want = Vec::new();
        want.extend_from_slice(&ne32(28)); // 16 header + 4 genl + 8 attr ("nbd\0")
        want.extend_from_slice(&ne16(0x10)); // GENL_ID_CTRL
        want.extend_from_slice(&ne16(0x05)); // NLM_F_REQUEST | NLM_F_ACK
        want.extend_from_slice(&ne32(7));
        want.extend_from_slice(&ne32(0));
        want.extend_from_slice(&[3, 2, 0, 0]); // CTRL_CMD_GETFAMILY, version 2
        want.extend_from_slice(&ne16(8)); // nla_len = 4 + "nbd\0"
        want.extend_from_slice(&ne16(2)); // CTRL_ATTR_FAMILY_NAME
        want.extend_from_slice(b"nbd\0");
        assert_eq!(bytes, want);
    }

    #[test]
    fn attributes_are_padded_to_four_bytes_but_lengths_exclude_padding() {
        let mut m = Message::new(0x20, NLM_F_REQUEST, 1, 1, 1);
        m.put_u8(9, 0xab).put_str(10, "abcde");
        let bytes = m.finish("t").expect("encode");
        let attrs = &bytes[NLMSG_HDRLEN + GENL_HDRLEN..];
        assert_eq!(attrs.len(), 8 + 12);
        let mut first = [ne16(5), ne16(9)].concat(); // nla_len 5 excludes the padding
        first.extend_from_slice(&[0xab, 0, 0, 0]);
        assert_eq!(&attrs[..8], &first[..]);
        assert_eq!(u16::from_ne_bytes([attrs[8], attrs[9]]), 10); // 4 + "abcde\0"
        assert_eq!(&attrs[12..20], b"abcde\0\0\0");
        let parsed: Vec<_> = Attrs::new(attrs).collect::<Result<_, _>>().expect("parse");
        assert_eq!(parsed[0].u8(), Ok(0xab));
        assert_eq!(parsed[1].string(), "abcde");
    }

    #[test]
    fn oversized_attributes_and_open_nests_fail_to_encode() {
        let mut m = Message::new(0x20, NLM_F_REQUEST, 1, 1, 1);
        m.put_bytes(1, &vec![0u8; 70_000]);
        assert!(matches!(m.finish("big"), Err(GenlError::Encode { .. })));
        let mut m = Message::new(0x20, NLM_F_REQUEST, 1, 1, 1);
        m.begin_nested(1);
        assert!(matches!(m.finish("open"), Err(GenlError::Encode { .. })));
    }

    #[test]
    fn family_reply_yields_the_id_and_ack_ends_the_exchange() {
        let mut body = vec![1, 2, 0, 0];
        body.extend_from_slice(&ne16(6));
        body.extend_from_slice(&ne16(CTRL_ATTR_FAMILY_ID));
        body.extend_from_slice(&ne16(0x1f));
        body.extend_from_slice(&[0, 0]);
        let mut dgram = kernel_msg(GENL_ID_CTRL, 0, 9, &body);
        let mut ack = ne32(0).to_vec();
        ack.extend_from_slice(&[0; NLMSG_HDRLEN]);
        dgram.extend(kernel_msg(NLMSG_ERROR, NLM_F_CAPPED, 9, &ack));
        let batch = parse_replies(&dgram, 9, GENL_ID_CTRL, "t").expect("parse");
        assert!(batch.finished);
        assert_eq!(parse_family_id(&batch.data, "t").expect("id"), 0x1f);
    }

    #[test]
    fn kernel_errors_carry_errno_command_and_extended_ack_message() {
        let mut body = (-libc::ENOENT).to_ne_bytes().to_vec();
        // Capped echo of the request header, then NLMSGERR_ATTR_MSG.
        body.extend_from_slice(&[0; NLMSG_HDRLEN]);
        body.extend_from_slice(&ne16(4 + 14));
        body.extend_from_slice(&ne16(NLMSGERR_ATTR_MSG));
        body.extend_from_slice(b"Unknown family");
        body.resize(align4(body.len()), 0);
        let dgram = kernel_msg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 3, &body);
        let err = parse_replies(&dgram, 3, GENL_ID_CTRL, "CTRL_CMD_GETFAMILY \"nbd\"")
            .expect_err("error reply");
        assert_eq!(err.errno(), Some(libc::ENOENT));
        let text = err.to_string();
        assert!(text.contains("CTRL_CMD_GETFAMILY"), "{text}");
        assert!(text.contains("Unknown family"), "{text}");
    }

    #[test]
    fn replies_for_other_sequence_numbers_are_skipped() {
        let mut ack = ne32(0).to_vec();
        ack.extend_from_slice(&[0; NLMSG_HDRLEN]);
        let dgram = kernel_msg(NLMSG_ERROR, 0, 5, &(-5i32).to_ne_bytes());
        let mut both = dgram.clone();
        both.extend(kernel_msg(NLMSG_ERROR, 0, 6, &ack));
        let batch = parse_replies(&both, 6, 0x20, "t").expect("stale error skipped");
        assert!(batch.finished);
        assert!(batch.data.is_empty());
    }

    #[test]
    fn truncated_and_lying_lengths_are_errors() {
        let good = kernel_msg(0x20, 0, 1, &[1, 1, 0, 0, 8, 0, 1, 0, 7, 0, 0, 0]);
        for cut in 1..good.len() {
            // Any prefix either parses (header-aligned cut) or fails cleanly.
            let _ = parse_replies(&good[..cut], 1, 0x20, "t");
        }
        assert!(parse_replies(&good[..10], 1, 0x20, "t").is_err());
        let mut lying = good.clone();
        lying[0..4].copy_from_slice(&ne32(400));
        assert!(parse_replies(&lying, 1, 0x20, "t").is_err());
        let short_genl = kernel_msg(0x20, 0, 1, &[1, 1]);
        assert!(parse_replies(&short_genl, 1, 0x20, "t").is_err());
        let no_code = kernel_msg(NLMSG_ERROR, 0, 1, &[]);
        assert!(parse_replies(&no_code, 1, 0x20, "t").is_err());
        let bad_attr = [ne16(40).as_slice(), &ne16(1)].concat();
        assert!(Attrs::new(&bad_attr).any(|a| a.is_err()));
        let tiny_attr = [ne16(2).as_slice(), &ne16(1)].concat();
        assert!(Attrs::new(&tiny_attr).any(|a| a.is_err()));
        assert!(Attrs::new(&[1, 2]).any(|a| a.is_err()));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256), seq in 0u32..4) {
            let _ = parse_replies(&bytes, seq, 0x20, "fuzz");
            for a in Attrs::new(&bytes).flatten() {
                let _ = (a.u8(), a.u16(), a.u32(), a.u64(), a.string());
                let _ = a.nested().count();
            }
        }

        #[test]
        fn corrupting_one_byte_of_a_valid_reply_never_panics(pos in 0usize..48, byte in proptest::num::u8::ANY) {
            let mut body = vec![1, 1, 0, 0];
            body.extend_from_slice(&ne16(8));
            body.extend_from_slice(&ne16(1));
            body.extend_from_slice(&ne32(3));
            let mut dgram = kernel_msg(0x20, 0, 1, &body);
            let mut ack = ne32(0).to_vec();
            ack.extend_from_slice(&[0; NLMSG_HDRLEN]);
            dgram.extend(kernel_msg(NLMSG_ERROR, 0, 1, &ack));
            let pos = pos % dgram.len();
            dgram[pos] = byte;
            let _ = parse_replies(&dgram, 1, 0x20, "fuzz");
        }
    }
}
