//! NBD wire constants and fixed-size message codecs (fixed newstyle handshake, simple
//! replies). Pure functions over byte arrays so the framing is testable without sockets;
//! decoding never panics on any input.

/// `NBDMAGIC`, first word the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server word and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option codes.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;

/// Info types carried in `REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error values allowed in replies (the spec's fixed errno subset).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

/// Size of a transmission request header on the wire.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Size of an option header after the client flags: magic, option, length.
pub const OPTION_HEADER_BYTES: usize = 16;

/// One decoded transmission request header (the WRITE payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// A request header whose magic was not `REQUEST_MAGIC`: the stream is out of sync and
/// can only be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {found:#010x}, expected {REQUEST_MAGIC:#010x}")]
pub struct BadRequestMagic {
    pub found: u32,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl RequestHeader {
    /// Decodes a header; the fixed-size array makes every field access in bounds.
    pub fn decode(b: &[u8; REQUEST_HEADER_BYTES]) -> Result<Self, BadRequestMagic> {
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(BadRequestMagic { found: magic });
        }
        Ok(Self {
            flags: be_u16(b, 4),
            command: be_u16(b, 6),
            handle: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u32(b, 24),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Encodes a simple reply header (16 bytes); a successful READ's data follows it.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// Encodes one option reply: header plus payload.
pub fn option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    // Payloads are built by this server from bounded names and messages.
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// The option header following the client flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn decode(b: &[u8; OPTION_HEADER_BYTES]) -> Self {
        Self {
            magic: be_u64(b, 0),
            option: be_u32(b, 8),
            length: be_u32(b, 12),
        }
    }
}

/// Why an `NBD_OPT_INFO`/`NBD_OPT_GO` payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoRequestError {
    #[error("option data of {0} bytes is shorter than the 6-byte minimum")]
    TooShort(usize),
    #[error("export name length {name_len} does not fit in option data of {data_len} bytes")]
    NameLength { name_len: u32, data_len: usize },
    #[error("{count} info requests need {needed} bytes after the name, option data has {have}")]
    RequestCount {
        count: u16,
        needed: usize,
        have: usize,
    },
    #[error("export name is not valid UTF-8")]
    NameNotUtf8,
}

/// Decoded `NBD_OPT_INFO`/`NBD_OPT_GO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Layout: u32 name length, name, u16 request count, count × u16 info types; the
    /// lengths must account for the option data exactly.
    pub fn decode(data: &[u8]) -> Result<Self, InfoRequestError> {
        if data.len() < 6 {
            return Err(InfoRequestError::TooShort(data.len()));
        }
        let name_len = be_u32(data, 0);
        let name_end = usize::try_from(name_len)
            .ok()
            .and_then(|n| n.checked_add(4))
            .filter(|end| end.checked_add(2).is_some_and(|e| e <= data.len()))
            .ok_or(InfoRequestError::NameLength {
                name_len,
                data_len: data.len(),
            })?;
        let name = std::str::from_utf8(&data[4..name_end])
            .map_err(|_| InfoRequestError::NameNotUtf8)?
            .to_owned();
        let count = be_u16(data, name_end);
        let rest = &data[name_end + 2..];
        let needed = usize::from(count) * 2;
        if rest.len() != needed {
            return Err(InfoRequestError::RequestCount {
                count,
                needed,
                have: rest.len(),
            });
        }
        let requests = rest
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Ok(Self { name, requests })
    }
}

/// `NBD_REP_INFO` payload for `NBD_INFO_EXPORT`.
pub fn info_export(size_bytes: u64, transmission_flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size_bytes.to_be_bytes());
    b.extend_from_slice(&transmission_flags.to_be_bytes());
    b
}

/// `NBD_REP_INFO` payload for `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&minimum.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&maximum.to_be_bytes());
    b
}

/// `NBD_REP_INFO` payload for `NBD_INFO_NAME`.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + name.len());
    b.extend_from_slice(&INFO_NAME.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_REP_SERVER` payload: u32 name length, name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn request_header_with_wrong_magic_is_rejected() {
        let mut b = RequestHeader {
            flags: 0,
            command: CMD_READ,
            handle: 1,
            offset: 0,
            length: 512,
        }
        .encode();
        b[0] = 0xff;
        assert_eq!(
            RequestHeader::decode(&b),
            Err(BadRequestMagic { found: 0xff60_9513 })
        );
    }

    fn info_bytes(name: &[u8], name_len: u32, reqs: &[u16], count: u16) -> Vec<u8> {
        let mut d = name_len.to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&count.to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn info_request_decodes_name_and_requests() {
        let d = info_bytes(b"vol-a", 5, &[INFO_BLOCK_SIZE, INFO_NAME], 2);
        assert_eq!(
            InfoRequest::decode(&d),
            Ok(InfoRequest {
                name: "vol-a".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        assert_eq!(
            InfoRequest::decode(&[0, 0, 0]),
            Err(InfoRequestError::TooShort(3))
        );
        assert!(matches!(
            InfoRequest::decode(&info_bytes(b"vol", u32::MAX, &[], 0)),
            Err(InfoRequestError::NameLength { .. })
        ));
        assert!(matches!(
            InfoRequest::decode(&info_bytes(b"vol", 3, &[1], 2)),
            Err(InfoRequestError::RequestCount { count: 2, .. })
        ));
        assert!(matches!(
            InfoRequest::decode(&info_bytes(b"vol", 3, &[1, 2], 1)),
            Err(InfoRequestError::RequestCount { count: 1, .. })
        ));
        assert_eq!(
            InfoRequest::decode(&info_bytes(&[0xff, 0xfe], 2, &[], 0)),
            Err(InfoRequestError::NameNotUtf8)
        );
    }

    #[test]
    fn info_request_decoding_never_panics_on_arbitrary_bytes() {
        // Deterministic pseudo-random inputs of every short length.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..64usize {
            for _ in 0..200 {
                let d: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Small values make length fields plausible more often.
                        (x % 7) as u8
                    })
                    .collect();
                let _ = InfoRequest::decode(&d);
            }
        }
    }
}
