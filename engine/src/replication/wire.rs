//! Replication wire format: length-prefixed, versioned, CRC32C-checked frames, volume
//! messages multiplexed by volume ID (each carrying the sender's epoch), and the
//! challenge-response peer authentication that must complete before any data is accepted.
//! The decoder bounds every length and never panics; a bad frame is an error naming the
//! problem, and the connection that sent it is closed.
//!
//! Version 1 grows only by additions: a new message type or error code gets a fresh
//! number and changes nothing else. A peer built before an addition fails to decode it
//! and closes that connection (the behaviour it had before the addition), so mixed
//! builds degrade to the older behaviour and never misread a frame. `UnknownVolume`
//! (error code 8), `BeyondSize` (9) and `SessionOwned` (10) are such additions, and so are
//! `RESUME_REQ_FROM` and `REBUILD_START_FROM`: the handshakes followed by the primary's
//! ReplicaID. Frames of the older handshake types still decode (identity None).
//! `REBUILD_START_SPARSE` is such an addition too: a rebuild whose base skips the blocks
//! never written, which only a replica that zeroes its extent first may accept; an
//! older replica refuses the frame, so that rebuild waits until the replica is upgraded
//! instead of leaving stale blocks behind.
//! `FORWARD_REQ_ATTACHED` is `FORWARD_REQ` followed by the forwarder's attachment
//! generation (u64); a request without one is still sent and decoded as `FORWARD_REQ`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::types::{EntryKind, Epoch, Lba, Lsn, ReplicaId, VolumeId, WalEntry};

/// Frame magic, "BVRP".
pub const FRAME_MAGIC: u32 = 0x4256_5250;
/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u8 = 1;
/// magic(4) version(1) type(1) flags(2) payload_len(4)
pub const FRAME_HEADER_BYTES: usize = 12;
/// CRC32C trailer over header and payload.
pub const FRAME_TRAILER_BYTES: usize = 4;
/// Default bound on a frame's payload.
pub const DEFAULT_FRAME_PAYLOAD_BYTES_MAX: usize = 8 << 20;
/// Longest free-text detail accepted in an error message.
pub const ERROR_DETAIL_BYTES_MAX: usize = 1024;
/// Longest node name in a hello.
pub const NODE_NAME_BYTES_MAX: usize = 253;
/// Nonce and MAC length (bytes).
pub const NONCE_BYTES: usize = 32;

/// Why a frame could not be decoded or a peer could not be authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {found:#010x} (expected {FRAME_MAGIC:#010x})")]
    BadMagic { found: u32 },
    #[error("unsupported protocol version {found} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("frame payload of {len} bytes exceeds frame_payload_bytes_max {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error(
        "frame checksum mismatch (crc32c computed {computed:#010x}, frame says {stored:#010x})"
    )]
    ChecksumMismatch { computed: u32, stored: u32 },
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("reserved frame flags {0:#06x} are set")]
    ReservedFlags(u16),
    #[error("message truncated while reading {field}")]
    Truncated { field: &'static str },
    #[error("{0} trailing bytes after message")]
    TrailingBytes(usize),
    #[error("invalid field {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("peer authentication failed: {0}")]
    AuthFailed(&'static str),
    #[error("message {0} received before peer authentication completed")]
    NotAuthenticated(&'static str),
}

/// Wire limits; every length read from the network is checked against them.
#[derive(Debug, Clone, Copy)]
pub struct WireConfig {
    pub frame_payload_bytes_max: usize,
}

impl Default for WireConfig {
    fn default() -> Self {
        Self {
            frame_payload_bytes_max: DEFAULT_FRAME_PAYLOAD_BYTES_MAX,
        }
    }
}

/// Outcome of a barrier on the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierStatus {
    Ok = 0,
    StaleEpoch = 1,
    Timeout = 2,
    FsyncFailed = 3,
    NoSession = 4,
}

/// Outcome of the reconnect handshake on the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeStatus {
    Ok = 0,
    StaleEpoch = 1,
    /// The replica has no usable prefix (an interrupted rebuild).
    NeedsRebuild = 2,
}

/// Error codes carried by `Body::Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    StaleEpoch = 1,
    Gap = 2,
    NoSession = 3,
    StorageFailed = 4,
    TruncateRefused = 5,
    RebuildFailed = 6,
    Malformed = 7,
    /// The receiver hosts no replica of the named volume (not created or opened yet,
    /// deleted, or promoted here). Only that volume's session ends; the connection and
    /// every other volume on it are untouched, and the primary retries later.
    UnknownVolume = 8,
    /// The entry (or base block) lies beyond the replica's current size: the volume is
    /// being expanded and this replica has not grown yet. Nothing was written and the
    /// replica is healthy; the primary retries this member after its backoff.
    BeyondSize = 9,
    /// Another primary (another ReplicaID) owns this epoch's session on the replica: two
    /// primaries at one epoch. The refused primary stops serving.
    SessionOwned = 10,
}

/// Per-volume message bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// One WAL entry, shipped in LSN order.
    Entry(WalEntry),
    /// Wait until everything up to `lsn` is received, fsync, reply with durable progress.
    BarrierRequest {
        id: u64,
        lsn: Lsn,
    },
    /// `flushed` is the replica's durable LSN after its fsync (never lowered).
    BarrierResponse {
        id: u64,
        status: BarrierStatus,
        flushed: Lsn,
    },
    /// Reconnect handshake from the primary: head H and first retained LSN S, and the
    /// primary's ReplicaID (None only from builds before the identity was added): a
    /// replica binds its session at an epoch to the first primary that names itself.
    ResumeRequest {
        session: u64,
        head: Lsn,
        retained_start: Lsn,
        primary: Option<ReplicaId>,
    },
    /// Replica's answer: durable R (and the epoch of its entry at R), received head,
    /// checkpoint, and its persisted epoch.
    ResumeResponse {
        session: u64,
        status: ResumeStatus,
        flushed: Lsn,
        flushed_epoch: Epoch,
        received: Lsn,
        checkpoint: Lsn,
        replica_epoch: Epoch,
    },
    /// Drop entries after `after`, provided the entry at `after` has `expect_epoch`.
    Truncate {
        session: u64,
        after: Lsn,
        expect_epoch: Epoch,
    },
    /// End of a catch-up range (diagnostic: the last LSN sent).
    CatchUpDone {
        session: u64,
        last: Lsn,
    },
    /// Start of a rebuild: the replica discards its content and takes a base at `base_lsn`.
    /// `primary` as in `ResumeRequest`. `base_bytes`, when set, says the base ships only
    /// the blocks the primary's extent holds data for, this many bytes in all: every
    /// block not sent must read as zeros on the replica (sent as `REBUILD_START_SPARSE`,
    /// which a replica built before it refuses, so it is never left with stale blocks).
    RebuildStart {
        session: u64,
        base_lsn: Lsn,
        base_epoch: Epoch,
        target: Lsn,
        primary: Option<ReplicaId>,
        base_bytes: Option<u64>,
    },
    /// One base block (skipped by the replica if a live WAL entry already wrote that LBA).
    BaseBlock {
        session: u64,
        lba: Lba,
        data: Vec<u8>,
    },
    /// All base blocks sent.
    BaseDone {
        session: u64,
        blocks: u64,
    },
    /// Liveness and epoch proof.
    Heartbeat {
        seq: u64,
    },
    HeartbeatAck {
        seq: u64,
    },
    /// A refusal with a reason; `current_epoch` lets a stale primary learn it is fenced.
    Error {
        code: ErrorCode,
        current_epoch: Epoch,
        detail: String,
    },
}

/// A message for one volume; the epoch is the sender's current epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMsg {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub body: Body,
}

/// Connection-level authentication messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Hello {
        version: u8,
        node: String,
        nonce: [u8; NONCE_BYTES],
    },
    Challenge {
        version: u8,
        node: String,
        nonce: [u8; NONCE_BYTES],
        proof: [u8; NONCE_BYTES],
    },
    Proof {
        proof: [u8; NONCE_BYTES],
    },
    Accepted,
}

/// Anything that travels in a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Auth(Auth),
    Volume(VolumeMsg),
    /// Block IO forwarded from a node without the primary to the primary's agent.
    Forward(ForwardMsg),
}

impl From<VolumeMsg> for Message {
    fn from(m: VolumeMsg) -> Self {
        Message::Volume(m)
    }
}

impl From<ForwardMsg> for Message {
    fn from(m: ForwardMsg) -> Self {
        Message::Forward(m)
    }
}

/// Largest data length of one forwarded READ or WRITE; bigger NBD requests are split by
/// the forwarder so a frame stays below the default payload bound.
pub const FORWARD_DATA_BYTES_MAX: usize = 4 << 20;

/// One block operation forwarded to the primary's agent. Offsets and lengths are bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardOp {
    /// Ask for the volume's size and block size.
    Geometry,
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// A write that is durable (on every committed in-sync member) when acknowledged.
    WriteFua {
        offset: u64,
        data: Vec<u8>,
    },
    /// Durability point for every write acknowledged before it was sent.
    Flush,
    Trim {
        offset: u64,
        length: u64,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
    },
}

/// Outcome of a forwarded operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardStatus {
    Ok = 0,
    /// The serving agent holds no serving primary of the volume (demoted, fenced, never
    /// was): re-resolve the primary.
    NotPrimary = 1,
    /// The request's epoch is older than the primary's: re-resolve, then retry.
    StaleEpoch = 2,
    /// The primary could not do it (disk, replication barrier); the client sees EIO.
    Io = 3,
    /// The request is invalid for the volume (range, alignment).
    Invalid = 4,
    NoSpace = 5,
    ReadOnly = 6,
}

/// Result payload of a forwarded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardPayload {
    None,
    Data(Vec<u8>),
    Geometry { size_bytes: u64, block_size: u32 },
}

/// Which attachment of a volume a forwarder serves: the CSI controller bumps it with
/// every ControllerPublish (the BlockVolume annotation
/// `blockvol.io/attachment-generation`), so the primary can tell a forwarder of the
/// current attachment from one left over by an older attachment to the same node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttachmentGeneration(pub u64);

impl std::fmt::Display for AttachmentGeneration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Forwarded-IO messages; `id` pairs a reply with its request on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardMsg {
    Request {
        id: u64,
        volume: VolumeId,
        /// The epoch the forwarder believes is current.
        epoch: Epoch,
        op: ForwardOp,
        /// The attachment the forwarder serves (None: a forwarder that knows none, such
        /// as a tool's export or an older build).
        attachment: Option<AttachmentGeneration>,
    },
    Reply {
        id: u64,
        status: ForwardStatus,
        /// The serving agent's epoch of the volume (0 when it has none).
        epoch: Epoch,
        detail: String,
        payload: ForwardPayload,
    },
}

mod ty {
    pub const HELLO: u8 = 0x01;
    pub const CHALLENGE: u8 = 0x02;
    pub const PROOF: u8 = 0x03;
    pub const ACCEPTED: u8 = 0x04;
    pub const ENTRY: u8 = 0x10;
    pub const BARRIER_REQ: u8 = 0x11;
    pub const BARRIER_RESP: u8 = 0x12;
    pub const RESUME_REQ: u8 = 0x13;
    pub const RESUME_RESP: u8 = 0x14;
    pub const TRUNCATE: u8 = 0x15;
    pub const CATCHUP_DONE: u8 = 0x16;
    pub const REBUILD_START: u8 = 0x17;
    pub const BASE_BLOCK: u8 = 0x18;
    pub const BASE_DONE: u8 = 0x19;
    pub const HEARTBEAT: u8 = 0x1a;
    pub const HEARTBEAT_ACK: u8 = 0x1b;
    /// RESUME_REQ followed by the primary's ReplicaID.
    pub const RESUME_REQ_FROM: u8 = 0x1c;
    /// REBUILD_START followed by the primary's ReplicaID.
    pub const REBUILD_START_FROM: u8 = 0x1d;
    /// REBUILD_START followed by the base's byte count and, after a presence byte, the
    /// primary's ReplicaID: a base of only the allocated blocks.
    pub const REBUILD_START_SPARSE: u8 = 0x1e;
    pub const ERROR: u8 = 0x1f;
    pub const FORWARD_REQ: u8 = 0x30;
    pub const FORWARD_REPLY: u8 = 0x31;
    /// FORWARD_REQ followed by the forwarder's attachment generation.
    pub const FORWARD_REQ_ATTACHED: u8 = 0x32;
}

mod fop {
    pub const GEOMETRY: u8 = 0;
    pub const READ: u8 = 1;
    pub const WRITE: u8 = 2;
    pub const WRITE_FUA: u8 = 3;
    pub const FLUSH: u8 = 4;
    pub const TRIM: u8 = 5;
    pub const WRITE_ZEROES: u8 = 6;
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn arr(&mut self, v: &[u8; NONCE_BYTES]) {
        self.0.extend_from_slice(v);
    }
}

struct R<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(WireError::Truncated { field })?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(WireError::Truncated { field })?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, f)?[0])
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, WireError> {
        let s = self.take(4, f)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(s);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, WireError> {
        let s = self.take(8, f)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self, f: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let len = self.u32(f)? as usize;
        if len > max {
            return Err(WireError::InvalidField {
                field: f,
                reason: format!("length {len} exceeds {max}"),
            });
        }
        self.take(len, f)
    }
    fn replica_id(&mut self, f: &'static str) -> Result<ReplicaId, WireError> {
        let s = self.string(f, super::types::IDENT_LEN_MAX)?;
        ReplicaId::new(s).map_err(|e| WireError::InvalidField {
            field: f,
            reason: e.to_string(),
        })
    }

    fn string(&mut self, f: &'static str, max: usize) -> Result<String, WireError> {
        let b = self.bytes(f, max)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::InvalidField {
            field: f,
            reason: "not UTF-8".into(),
        })
    }
    fn arr(&mut self, f: &'static str) -> Result<[u8; NONCE_BYTES], WireError> {
        let s = self.take(NONCE_BYTES, f)?;
        let mut a = [0u8; NONCE_BYTES];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn lsn(&mut self, f: &'static str) -> Result<Lsn, WireError> {
        Ok(Lsn(self.u64(f)?))
    }
    fn epoch(&mut self, f: &'static str) -> Result<Epoch, WireError> {
        Ok(Epoch(self.u64(f)?))
    }
}

fn type_of(msg: &Message) -> u8 {
    match msg {
        Message::Auth(a) => match a {
            Auth::Hello { .. } => ty::HELLO,
            Auth::Challenge { .. } => ty::CHALLENGE,
            Auth::Proof { .. } => ty::PROOF,
            Auth::Accepted => ty::ACCEPTED,
        },
        Message::Volume(v) => match &v.body {
            Body::Entry(_) => ty::ENTRY,
            Body::BarrierRequest { .. } => ty::BARRIER_REQ,
            Body::BarrierResponse { .. } => ty::BARRIER_RESP,
            Body::ResumeRequest { primary: None, .. } => ty::RESUME_REQ,
            Body::ResumeRequest {
                primary: Some(_), ..
            } => ty::RESUME_REQ_FROM,
            Body::ResumeResponse { .. } => ty::RESUME_RESP,
            Body::Truncate { .. } => ty::TRUNCATE,
            Body::CatchUpDone { .. } => ty::CATCHUP_DONE,
            Body::RebuildStart {
                base_bytes: Some(_),
                ..
            } => ty::REBUILD_START_SPARSE,
            Body::RebuildStart { primary: None, .. } => ty::REBUILD_START,
            Body::RebuildStart {
                primary: Some(_), ..
            } => ty::REBUILD_START_FROM,
            Body::BaseBlock { .. } => ty::BASE_BLOCK,
            Body::BaseDone { .. } => ty::BASE_DONE,
            Body::Heartbeat { .. } => ty::HEARTBEAT,
            Body::HeartbeatAck { .. } => ty::HEARTBEAT_ACK,
            Body::Error { .. } => ty::ERROR,
        },
        Message::Forward(ForwardMsg::Request {
            attachment: None, ..
        }) => ty::FORWARD_REQ,
        Message::Forward(ForwardMsg::Request {
            attachment: Some(_),
            ..
        }) => ty::FORWARD_REQ_ATTACHED,
        Message::Forward(ForwardMsg::Reply { .. }) => ty::FORWARD_REPLY,
    }
}

fn put_detail(w: &mut W, detail: &str) {
    let mut d = detail;
    while d.len() > ERROR_DETAIL_BYTES_MAX {
        // Cut on a char boundary so the peer's UTF-8 check passes.
        let mut cut = ERROR_DETAIL_BYTES_MAX;
        while !d.is_char_boundary(cut) {
            cut -= 1;
        }
        d = &d[..cut];
    }
    w.str(d);
}

fn encode_forward(m: &ForwardMsg, w: &mut W) {
    match m {
        ForwardMsg::Request {
            id,
            volume,
            epoch,
            op,
            attachment,
        } => {
            w.u64(*id);
            w.str(volume.as_str());
            w.u64(epoch.0);
            match op {
                ForwardOp::Geometry => w.u8(fop::GEOMETRY),
                ForwardOp::Read { offset, length } => {
                    w.u8(fop::READ);
                    w.u64(*offset);
                    w.u32(*length);
                }
                ForwardOp::Write { offset, data } => {
                    w.u8(fop::WRITE);
                    w.u64(*offset);
                    w.bytes(data);
                }
                ForwardOp::WriteFua { offset, data } => {
                    w.u8(fop::WRITE_FUA);
                    w.u64(*offset);
                    w.bytes(data);
                }
                ForwardOp::Flush => w.u8(fop::FLUSH),
                ForwardOp::Trim { offset, length } => {
                    w.u8(fop::TRIM);
                    w.u64(*offset);
                    w.u64(*length);
                }
                ForwardOp::WriteZeroes { offset, length } => {
                    w.u8(fop::WRITE_ZEROES);
                    w.u64(*offset);
                    w.u64(*length);
                }
            }
            if let Some(g) = attachment {
                w.u64(g.0);
            }
        }
        ForwardMsg::Reply {
            id,
            status,
            epoch,
            detail,
            payload,
        } => {
            w.u64(*id);
            w.u8(*status as u8);
            w.u64(epoch.0);
            put_detail(w, detail);
            match payload {
                ForwardPayload::None => w.u8(0),
                ForwardPayload::Data(d) => {
                    w.u8(1);
                    w.bytes(d);
                }
                ForwardPayload::Geometry {
                    size_bytes,
                    block_size,
                } => {
                    w.u8(2);
                    w.u64(*size_bytes);
                    w.u32(*block_size);
                }
            }
        }
    }
}

fn forward_data(r: &mut R<'_>, max: usize) -> Result<Vec<u8>, WireError> {
    Ok(r.bytes("forward.data", max.min(FORWARD_DATA_BYTES_MAX))?
        .to_vec())
}

fn decode_forward_request(
    r: &mut R<'_>,
    max: usize,
    attached: bool,
) -> Result<ForwardMsg, WireError> {
    let id = r.u64("forward.id")?;
    let vol = r.string("forward.volume", super::types::IDENT_LEN_MAX)?;
    let volume = VolumeId::new(vol).map_err(|e| WireError::InvalidField {
        field: "forward.volume",
        reason: e.to_string(),
    })?;
    let epoch = r.epoch("forward.epoch")?;
    let op = match r.u8("forward.op")? {
        fop::GEOMETRY => ForwardOp::Geometry,
        fop::READ => {
            let offset = r.u64("forward.offset")?;
            let length = r.u32("forward.length")?;
            if length as usize > FORWARD_DATA_BYTES_MAX {
                return Err(WireError::InvalidField {
                    field: "forward.length",
                    reason: format!("read of {length} bytes exceeds {FORWARD_DATA_BYTES_MAX}"),
                });
            }
            ForwardOp::Read { offset, length }
        }
        fop::WRITE => ForwardOp::Write {
            offset: r.u64("forward.offset")?,
            data: forward_data(r, max)?,
        },
        fop::WRITE_FUA => ForwardOp::WriteFua {
            offset: r.u64("forward.offset")?,
            data: forward_data(r, max)?,
        },
        fop::FLUSH => ForwardOp::Flush,
        fop::TRIM => ForwardOp::Trim {
            offset: r.u64("forward.offset")?,
            length: r.u64("forward.length")?,
        },
        fop::WRITE_ZEROES => ForwardOp::WriteZeroes {
            offset: r.u64("forward.offset")?,
            length: r.u64("forward.length")?,
        },
        other => {
            return Err(WireError::InvalidField {
                field: "forward.op",
                reason: format!("unknown operation {other}"),
            });
        }
    };
    let attachment = if attached {
        Some(AttachmentGeneration(r.u64("forward.attachment")?))
    } else {
        None
    };
    Ok(ForwardMsg::Request {
        id,
        volume,
        epoch,
        op,
        attachment,
    })
}

fn forward_status(v: u8) -> Result<ForwardStatus, WireError> {
    Ok(match v {
        0 => ForwardStatus::Ok,
        1 => ForwardStatus::NotPrimary,
        2 => ForwardStatus::StaleEpoch,
        3 => ForwardStatus::Io,
        4 => ForwardStatus::Invalid,
        5 => ForwardStatus::NoSpace,
        6 => ForwardStatus::ReadOnly,
        _ => {
            return Err(WireError::InvalidField {
                field: "forward.status",
                reason: format!("unknown status {v}"),
            });
        }
    })
}

fn decode_forward_reply(r: &mut R<'_>, max: usize) -> Result<ForwardMsg, WireError> {
    let id = r.u64("forward.id")?;
    let status = forward_status(r.u8("forward.status")?)?;
    let epoch = r.epoch("forward.epoch")?;
    let detail = r.string("forward.detail", ERROR_DETAIL_BYTES_MAX)?;
    let payload = match r.u8("forward.payload")? {
        0 => ForwardPayload::None,
        1 => ForwardPayload::Data(forward_data(r, max)?),
        2 => ForwardPayload::Geometry {
            size_bytes: r.u64("forward.size_bytes")?,
            block_size: r.u32("forward.block_size")?,
        },
        other => {
            return Err(WireError::InvalidField {
                field: "forward.payload",
                reason: format!("unknown payload kind {other}"),
            });
        }
    };
    Ok(ForwardMsg::Reply {
        id,
        status,
        epoch,
        detail,
        payload,
    })
}

/// The entry travels in its own self-checking WAL encoding, length-prefixed.
fn put_entry(w: &mut W, e: &WalEntry) {
    w.bytes(&e.encode());
}

fn get_entry(r: &mut R<'_>, max: usize) -> Result<WalEntry, WireError> {
    let raw = r.bytes("entry", max)?;
    let (entry, used) = WalEntry::decode(raw).map_err(|e| WireError::InvalidField {
        field: "entry",
        reason: e.to_string(),
    })?;
    if used != raw.len() {
        return Err(WireError::InvalidField {
            field: "entry",
            reason: format!("{} bytes after the entry", raw.len() - used),
        });
    }
    if entry.lsn == Lsn(0) {
        return Err(WireError::InvalidField {
            field: "entry.lsn",
            reason: "LSN 0 is reserved".into(),
        });
    }
    if entry.kind == EntryKind::Padding {
        return Err(WireError::InvalidField {
            field: "entry.kind",
            reason: "padding is never replicated".into(),
        });
    }
    Ok(entry)
}

fn encode_payload(msg: &Message, w: &mut W) {
    match msg {
        Message::Auth(a) => match a {
            Auth::Hello {
                version,
                node,
                nonce,
            } => {
                w.u8(*version);
                w.str(node);
                w.arr(nonce);
            }
            Auth::Challenge {
                version,
                node,
                nonce,
                proof,
            } => {
                w.u8(*version);
                w.str(node);
                w.arr(nonce);
                w.arr(proof);
            }
            Auth::Proof { proof } => w.arr(proof),
            Auth::Accepted => {}
        },
        Message::Volume(v) => {
            w.str(v.volume.as_str());
            w.u64(v.epoch.0);
            match &v.body {
                Body::Entry(e) => put_entry(w, e),
                Body::BarrierRequest { id, lsn } => {
                    w.u64(*id);
                    w.u64(lsn.0);
                }
                Body::BarrierResponse {
                    id,
                    status,
                    flushed,
                } => {
                    w.u64(*id);
                    w.u8(*status as u8);
                    w.u64(flushed.0);
                }
                Body::ResumeRequest {
                    session,
                    head,
                    retained_start,
                    primary,
                } => {
                    w.u64(*session);
                    w.u64(head.0);
                    w.u64(retained_start.0);
                    if let Some(p) = primary {
                        w.str(p.as_str());
                    }
                }
                Body::ResumeResponse {
                    session,
                    status,
                    flushed,
                    flushed_epoch,
                    received,
                    checkpoint,
                    replica_epoch,
                } => {
                    w.u64(*session);
                    w.u8(*status as u8);
                    w.u64(flushed.0);
                    w.u64(flushed_epoch.0);
                    w.u64(received.0);
                    w.u64(checkpoint.0);
                    w.u64(replica_epoch.0);
                }
                Body::Truncate {
                    session,
                    after,
                    expect_epoch,
                } => {
                    w.u64(*session);
                    w.u64(after.0);
                    w.u64(expect_epoch.0);
                }
                Body::CatchUpDone { session, last } => {
                    w.u64(*session);
                    w.u64(last.0);
                }
                Body::RebuildStart {
                    session,
                    base_lsn,
                    base_epoch,
                    target,
                    primary,
                    base_bytes,
                } => {
                    w.u64(*session);
                    w.u64(base_lsn.0);
                    w.u64(base_epoch.0);
                    w.u64(target.0);
                    if let Some(bytes) = base_bytes {
                        w.u64(*bytes);
                        w.u8(u8::from(primary.is_some()));
                    }
                    if let Some(p) = primary {
                        w.str(p.as_str());
                    }
                }
                Body::BaseBlock { session, lba, data } => {
                    w.u64(*session);
                    w.u64(lba.0);
                    w.bytes(data);
                }
                Body::BaseDone { session, blocks } => {
                    w.u64(*session);
                    w.u64(*blocks);
                }
                Body::Heartbeat { seq } | Body::HeartbeatAck { seq } => w.u64(*seq),
                Body::Error {
                    code,
                    current_epoch,
                    detail,
                } => {
                    w.u8(*code as u8);
                    w.u64(current_epoch.0);
                    put_detail(w, detail);
                }
            }
        }
        Message::Forward(f) => encode_forward(f, w),
    }
}

/// Encodes one message as a complete frame.
pub fn encode_frame(msg: &Message) -> Vec<u8> {
    let mut w = W(Vec::with_capacity(64));
    w.u32(FRAME_MAGIC);
    w.u8(PROTOCOL_VERSION);
    w.u8(type_of(msg));
    w.0.extend_from_slice(&0u16.to_le_bytes());
    w.u32(0);
    encode_payload(msg, &mut w);
    let payload_len = (w.0.len() - FRAME_HEADER_BYTES) as u32;
    w.0[8..12].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32c::crc32c(&w.0);
    w.u32(crc);
    w.0
}

fn status_barrier(v: u8) -> Result<BarrierStatus, WireError> {
    Ok(match v {
        0 => BarrierStatus::Ok,
        1 => BarrierStatus::StaleEpoch,
        2 => BarrierStatus::Timeout,
        3 => BarrierStatus::FsyncFailed,
        4 => BarrierStatus::NoSession,
        _ => {
            return Err(WireError::InvalidField {
                field: "barrier.status",
                reason: format!("unknown status {v}"),
            });
        }
    })
}

fn status_resume(v: u8) -> Result<ResumeStatus, WireError> {
    Ok(match v {
        0 => ResumeStatus::Ok,
        1 => ResumeStatus::StaleEpoch,
        2 => ResumeStatus::NeedsRebuild,
        _ => {
            return Err(WireError::InvalidField {
                field: "resume.status",
                reason: format!("unknown status {v}"),
            });
        }
    })
}

fn error_code(v: u8) -> Result<ErrorCode, WireError> {
    Ok(match v {
        1 => ErrorCode::StaleEpoch,
        2 => ErrorCode::Gap,
        3 => ErrorCode::NoSession,
        4 => ErrorCode::StorageFailed,
        5 => ErrorCode::TruncateRefused,
        6 => ErrorCode::RebuildFailed,
        7 => ErrorCode::Malformed,
        8 => ErrorCode::UnknownVolume,
        9 => ErrorCode::BeyondSize,
        10 => ErrorCode::SessionOwned,
        _ => {
            return Err(WireError::InvalidField {
                field: "error.code",
                reason: format!("unknown code {v}"),
            });
        }
    })
}

fn decode_payload(t: u8, p: &[u8], max: usize) -> Result<Message, WireError> {
    let mut r = R { buf: p, pos: 0 };
    let msg = match t {
        ty::HELLO => Message::Auth(Auth::Hello {
            version: r.u8("hello.version")?,
            node: r.string("hello.node", NODE_NAME_BYTES_MAX)?,
            nonce: r.arr("hello.nonce")?,
        }),
        ty::CHALLENGE => Message::Auth(Auth::Challenge {
            version: r.u8("challenge.version")?,
            node: r.string("challenge.node", NODE_NAME_BYTES_MAX)?,
            nonce: r.arr("challenge.nonce")?,
            proof: r.arr("challenge.proof")?,
        }),
        ty::PROOF => Message::Auth(Auth::Proof {
            proof: r.arr("proof.mac")?,
        }),
        ty::ACCEPTED => Message::Auth(Auth::Accepted),
        ty::ENTRY..=ty::REBUILD_START_SPARSE | ty::ERROR => {
            let vol = r.string("volume", super::types::IDENT_LEN_MAX)?;
            let volume = VolumeId::new(vol).map_err(|e| WireError::InvalidField {
                field: "volume",
                reason: e.to_string(),
            })?;
            let epoch = r.epoch("epoch")?;
            let body = match t {
                ty::ENTRY => Body::Entry(get_entry(&mut r, max)?),
                ty::BARRIER_REQ => Body::BarrierRequest {
                    id: r.u64("barrier.id")?,
                    lsn: r.lsn("barrier.lsn")?,
                },
                ty::BARRIER_RESP => Body::BarrierResponse {
                    id: r.u64("barrier.id")?,
                    status: status_barrier(r.u8("barrier.status")?)?,
                    flushed: r.lsn("barrier.flushed")?,
                },
                ty::RESUME_REQ | ty::RESUME_REQ_FROM => Body::ResumeRequest {
                    session: r.u64("resume.session")?,
                    head: r.lsn("resume.head")?,
                    retained_start: r.lsn("resume.retained_start")?,
                    primary: if t == ty::RESUME_REQ_FROM {
                        Some(r.replica_id("resume.primary")?)
                    } else {
                        None
                    },
                },
                ty::RESUME_RESP => Body::ResumeResponse {
                    session: r.u64("resume.session")?,
                    status: status_resume(r.u8("resume.status")?)?,
                    flushed: r.lsn("resume.flushed")?,
                    flushed_epoch: r.epoch("resume.flushed_epoch")?,
                    received: r.lsn("resume.received")?,
                    checkpoint: r.lsn("resume.checkpoint")?,
                    replica_epoch: r.epoch("resume.replica_epoch")?,
                },
                ty::TRUNCATE => Body::Truncate {
                    session: r.u64("truncate.session")?,
                    after: r.lsn("truncate.after")?,
                    expect_epoch: r.epoch("truncate.expect_epoch")?,
                },
                ty::CATCHUP_DONE => Body::CatchUpDone {
                    session: r.u64("catchup.session")?,
                    last: r.lsn("catchup.last")?,
                },
                ty::REBUILD_START | ty::REBUILD_START_FROM | ty::REBUILD_START_SPARSE => {
                    let session = r.u64("rebuild.session")?;
                    let base_lsn = r.lsn("rebuild.base_lsn")?;
                    let base_epoch = r.epoch("rebuild.base_epoch")?;
                    let target = r.lsn("rebuild.target")?;
                    let base_bytes = if t == ty::REBUILD_START_SPARSE {
                        Some(r.u64("rebuild.base_bytes")?)
                    } else {
                        None
                    };
                    let named = match t {
                        ty::REBUILD_START_FROM => true,
                        ty::REBUILD_START_SPARSE => match r.u8("rebuild.has_primary")? {
                            0 => false,
                            1 => true,
                            v => {
                                return Err(WireError::InvalidField {
                                    field: "rebuild.has_primary",
                                    reason: format!("{v} is neither 0 nor 1"),
                                });
                            }
                        },
                        _ => false,
                    };
                    Body::RebuildStart {
                        session,
                        base_lsn,
                        base_epoch,
                        target,
                        primary: if named {
                            Some(r.replica_id("rebuild.primary")?)
                        } else {
                            None
                        },
                        base_bytes,
                    }
                }
                ty::BASE_BLOCK => Body::BaseBlock {
                    session: r.u64("base.session")?,
                    lba: Lba(r.u64("base.lba")?),
                    data: r.bytes("base.data", max)?.to_vec(),
                },
                ty::BASE_DONE => Body::BaseDone {
                    session: r.u64("base.session")?,
                    blocks: r.u64("base.blocks")?,
                },
                ty::HEARTBEAT => Body::Heartbeat {
                    seq: r.u64("heartbeat.seq")?,
                },
                ty::HEARTBEAT_ACK => Body::HeartbeatAck {
                    seq: r.u64("heartbeat.seq")?,
                },
                ty::ERROR => Body::Error {
                    code: error_code(r.u8("error.code")?)?,
                    current_epoch: r.epoch("error.current_epoch")?,
                    detail: r.string("error.detail", ERROR_DETAIL_BYTES_MAX)?,
                },
                other => return Err(WireError::UnknownType(other)),
            };
            Message::Volume(VolumeMsg {
                volume,
                epoch,
                body,
            })
        }
        ty::FORWARD_REQ => Message::Forward(decode_forward_request(&mut r, max, false)?),
        ty::FORWARD_REQ_ATTACHED => Message::Forward(decode_forward_request(&mut r, max, true)?),
        ty::FORWARD_REPLY => Message::Forward(decode_forward_reply(&mut r, max)?),
        other => return Err(WireError::UnknownType(other)),
    };
    if r.pos != p.len() {
        return Err(WireError::TrailingBytes(p.len() - r.pos));
    }
    Ok(msg)
}

/// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes are needed; on
/// success returns the message and the number of bytes consumed. Garbage is reported as
/// early as the header allows, so a peer cannot make us buffer an oversized frame.
pub fn decode_frame(buf: &[u8], cfg: &WireConfig) -> Result<Option<(Message, usize)>, WireError> {
    let mut r = R { buf, pos: 0 };
    let Ok(magic) = r.u32("magic") else {
        // Check the bytes we have against the magic prefix to fail fast on garbage.
        let want = FRAME_MAGIC.to_le_bytes();
        if buf.iter().zip(want.iter()).any(|(a, b)| a != b) {
            let mut a = [0u8; 4];
            for (d, s) in a.iter_mut().zip(buf.iter()) {
                *d = *s;
            }
            return Err(WireError::BadMagic {
                found: u32::from_le_bytes(a),
            });
        }
        return Ok(None);
    };
    if magic != FRAME_MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    let Ok(version) = r.u8("version") else {
        return Ok(None);
    };
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion { found: version });
    }
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let t = r.u8("type")?;
    let flags_bytes = r.take(2, "flags")?;
    let flags = u16::from_le_bytes([flags_bytes[0], flags_bytes[1]]);
    if flags != 0 {
        return Err(WireError::ReservedFlags(flags));
    }
    let len = r.u32("payload_len")? as usize;
    if len > cfg.frame_payload_bytes_max {
        return Err(WireError::FrameTooLarge {
            len,
            max: cfg.frame_payload_bytes_max,
        });
    }
    let total = FRAME_HEADER_BYTES + len + FRAME_TRAILER_BYTES;
    if buf.len() < total {
        return Ok(None);
    }
    let body_end = FRAME_HEADER_BYTES + len;
    let (Some(covered), Some(payload)) =
        (buf.get(..body_end), buf.get(FRAME_HEADER_BYTES..body_end))
    else {
        return Ok(None);
    };
    let computed = crc32c::crc32c(covered);
    r.pos = body_end;
    let stored = r.u32("crc")?;
    if computed != stored {
        return Err(WireError::ChecksumMismatch { computed, stored });
    }
    let msg = decode_payload(t, payload, cfg.frame_payload_bytes_max)?;
    Ok(Some((msg, total)))
}

/// Incremental decoder for a byte stream: feed bytes, pull messages. After an error the
/// stream is unusable and the connection must be closed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    cfg: WireConfig,
    buf: Vec<u8>,
    failed: bool,
}

impl FrameDecoder {
    pub fn new(cfg: WireConfig) -> Self {
        Self {
            cfg,
            buf: Vec::new(),
            failed: false,
        }
    }
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
    /// Next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if self.failed {
            return Err(WireError::Truncated {
                field: "stream after an earlier error",
            });
        }
        match decode_frame(&self.buf, &self.cfg) {
            Ok(Some((m, n))) => {
                self.buf.drain(..n);
                Ok(Some(m))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed = true;
                self.buf.clear();
                Err(e)
            }
        }
    }
    /// Bytes buffered but not yet decoded.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }
}

type HmacSha256 = Hmac<Sha256>;

const SERVER_LABEL: &[u8] = b"blockvol-repl-server-v1";
const CLIENT_LABEL: &[u8] = b"blockvol-repl-client-v1";

fn mac(
    secret: &[u8],
    label: &[u8],
    client_nonce: &[u8; NONCE_BYTES],
    server_nonce: &[u8; NONCE_BYTES],
    node: &str,
) -> Result<HmacSha256, WireError> {
    let mut m = HmacSha256::new_from_slice(secret)
        .map_err(|_| WireError::AuthFailed("cluster secret is not a usable HMAC key"))?;
    m.update(label);
    m.update(client_nonce);
    m.update(server_nonce);
    m.update(&(node.len() as u32).to_le_bytes());
    m.update(node.as_bytes());
    Ok(m)
}

fn tag(m: HmacSha256) -> [u8; NONCE_BYTES] {
    let out = m.finalize().into_bytes();
    let mut a = [0u8; NONCE_BYTES];
    a.copy_from_slice(&out);
    a
}

/// Dialing side of the peer authentication. The caller supplies nonces from a CSPRNG.
#[derive(Debug)]
pub struct ClientAuth {
    secret: Vec<u8>,
    node: String,
    nonce: [u8; NONCE_BYTES],
    server_nonce: Option<[u8; NONCE_BYTES]>,
    done: bool,
}

impl ClientAuth {
    /// Returns the state and the Hello to send.
    pub fn start(secret: &[u8], node: &str, nonce: [u8; NONCE_BYTES]) -> (Self, Message) {
        let hello = Message::Auth(Auth::Hello {
            version: PROTOCOL_VERSION,
            node: node.to_string(),
            nonce,
        });
        (
            Self {
                secret: secret.to_vec(),
                node: node.to_string(),
                nonce,
                server_nonce: None,
                done: false,
            },
            hello,
        )
    }

    /// Handles the server's message; returns the next message to send, if any.
    pub fn on_message(&mut self, msg: &Message) -> Result<Option<Message>, WireError> {
        match msg {
            Message::Auth(Auth::Challenge {
                version,
                node,
                nonce,
                proof,
            }) if self.server_nonce.is_none() => {
                if *version != PROTOCOL_VERSION {
                    return Err(WireError::UnsupportedVersion { found: *version });
                }
                mac(&self.secret, SERVER_LABEL, &self.nonce, nonce, node)?
                    .verify_slice(proof)
                    .map_err(|_| {
                        WireError::AuthFailed("server proof does not match the cluster secret")
                    })?;
                self.server_nonce = Some(*nonce);
                let p = tag(mac(
                    &self.secret,
                    CLIENT_LABEL,
                    &self.nonce,
                    nonce,
                    &self.node,
                )?);
                Ok(Some(Message::Auth(Auth::Proof { proof: p })))
            }
            Message::Auth(Auth::Accepted) if self.server_nonce.is_some() => {
                self.done = true;
                Ok(None)
            }
            Message::Auth(_) => Err(WireError::AuthFailed("unexpected authentication message")),
            Message::Volume(_) => Err(WireError::NotAuthenticated("volume message")),
            Message::Forward(_) => Err(WireError::NotAuthenticated("forward message")),
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.done
    }
}

/// Listening side of the peer authentication.
#[derive(Debug)]
pub struct ServerAuth {
    secret: Vec<u8>,
    node: String,
    nonce: [u8; NONCE_BYTES],
    client: Option<([u8; NONCE_BYTES], String)>,
    done: bool,
}

impl ServerAuth {
    pub fn new(secret: &[u8], node: &str, nonce: [u8; NONCE_BYTES]) -> Self {
        Self {
            secret: secret.to_vec(),
            node: node.to_string(),
            nonce,
            client: None,
            done: false,
        }
    }

    /// Handles the client's message; returns the reply. Any volume message before the
    /// proof verified is refused.
    pub fn on_message(&mut self, msg: &Message) -> Result<Option<Message>, WireError> {
        match msg {
            Message::Auth(Auth::Hello {
                version,
                node,
                nonce,
            }) if self.client.is_none() => {
                if *version != PROTOCOL_VERSION {
                    return Err(WireError::UnsupportedVersion { found: *version });
                }
                let proof = tag(mac(
                    &self.secret,
                    SERVER_LABEL,
                    nonce,
                    &self.nonce,
                    &self.node,
                )?);
                self.client = Some((*nonce, node.clone()));
                Ok(Some(Message::Auth(Auth::Challenge {
                    version: PROTOCOL_VERSION,
                    node: self.node.clone(),
                    nonce: self.nonce,
                    proof,
                })))
            }
            Message::Auth(Auth::Proof { proof }) if !self.done => {
                let Some((cn, node)) = &self.client else {
                    return Err(WireError::AuthFailed("proof before hello"));
                };
                mac(&self.secret, CLIENT_LABEL, cn, &self.nonce, node)?
                    .verify_slice(proof)
                    .map_err(|_| {
                        WireError::AuthFailed("client proof does not match the cluster secret")
                    })?;
                self.done = true;
                Ok(Some(Message::Auth(Auth::Accepted)))
            }
            Message::Auth(_) => Err(WireError::AuthFailed("unexpected authentication message")),
            Message::Volume(_) => Err(WireError::NotAuthenticated("volume message")),
            Message::Forward(_) => Err(WireError::NotAuthenticated("forward message")),
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.done
    }

    /// The authenticated peer's node name.
    pub fn peer(&self) -> Option<&str> {
        if self.done {
            self.client.as_ref().map(|(_, n)| n.as_str())
        } else {
            None
        }
    }
}
