//! A small blocking NBD client over a unix socket: fixed newstyle handshake with
//! `NBD_OPT_GO`, simple replies, one request in flight per connection. The attach
//! proxy uses it to reach the agent's NBD server; concurrency comes from holding
//! several connections.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::proto::{
    self, CMD_DISC, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_EXPORT, NBD_MAGIC, OPT_GO, OPT_REPLY_MAGIC, REP_ACK, REP_ERR, REP_INFO,
    RequestHeader, SIMPLE_REPLY_MAGIC,
};

/// Largest option reply payload accepted during the handshake, in bytes.
pub const OPTION_REPLY_BYTES_MAX: u32 = 64 * 1024;

/// Why a connection or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed (server gone, reset, timeout): the connection is unusable.
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server spoke something this client does not understand.
    #[error("NBD protocol: {0}")]
    Protocol(String),
    /// The server refused the export (unknown name, policy, ...).
    #[error("export {export:?} refused by the server (reply {reply:#x}): {message}")]
    Refused {
        export: String,
        reply: u32,
        message: String,
    },
}

/// The geometry and flags an export was negotiated with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    /// The server's minimum block size (1 when it sent none).
    pub block_size: u32,
}

/// One negotiated connection in the transmission phase.
pub struct Connection {
    stream: UnixStream,
    info: ExportInfo,
    next_handle: u64,
}

fn read_u16(s: &mut UnixStream) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut UnixStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut UnixStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

impl Connection {
    /// Connects to `socket` and negotiates `export`. `timeout` bounds every socket
    /// read and write, so a hung server fails the request instead of hanging it.
    pub fn connect(socket: &Path, export: &str, timeout: Duration) -> Result<Self, ClientError> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        if read_u64(&mut s)? != NBD_MAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(protocol("not a fixed newstyle NBD server"));
        }
        let flags = read_u16(&mut s)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("server lacks the fixed newstyle handshake"));
        }
        let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        let name = export.as_bytes();
        let name_len =
            u32::try_from(name.len()).map_err(|_| protocol("export name longer than 4 GiB"))?;
        let mut msg = Vec::with_capacity(32 + name.len());
        msg.extend_from_slice(&client_flags.to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(4 + name_len + 2 + 2).to_be_bytes());
        msg.extend_from_slice(&name_len.to_be_bytes());
        msg.extend_from_slice(name);
        msg.extend_from_slice(&1u16.to_be_bytes());
        msg.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        s.write_all(&msg)?;
        let info = Self::read_go_replies(&mut s, export)?;
        Ok(Connection {
            stream: s,
            info,
            next_handle: 1,
        })
    }

    fn read_go_replies(s: &mut UnixStream, export: &str) -> Result<ExportInfo, ClientError> {
        let mut size = None;
        let mut tflags = 0;
        let mut block_size = 1;
        loop {
            if read_u64(s)? != OPT_REPLY_MAGIC {
                return Err(protocol("bad option reply magic"));
            }
            let option = read_u32(s)?;
            let reply = read_u32(s)?;
            let len = read_u32(s)?;
            if option != OPT_GO {
                return Err(protocol(format!("reply to option {option}, sent {OPT_GO}")));
            }
            if len > OPTION_REPLY_BYTES_MAX {
                return Err(protocol(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            match reply {
                REP_ACK => break,
                REP_INFO if data.len() >= 2 => {
                    let kind = u16::from_be_bytes([data[0], data[1]]);
                    if kind == INFO_EXPORT && data.len() >= 12 {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&data[2..10]);
                        size = Some(u64::from_be_bytes(b));
                        tflags = u16::from_be_bytes([data[10], data[11]]);
                    } else if kind == INFO_BLOCK_SIZE && data.len() >= 6 {
                        block_size = u32::from_be_bytes([data[2], data[3], data[4], data[5]]);
                    }
                }
                r if r & REP_ERR != 0 => {
                    return Err(ClientError::Refused {
                        export: export.into(),
                        reply: r,
                        message: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
                _ => {}
            }
        }
        let size_bytes = size.ok_or_else(|| protocol("NBD_OPT_GO ended without export info"))?;
        Ok(ExportInfo {
            size_bytes,
            transmission_flags: tflags,
            block_size: block_size.max(1),
        })
    }

    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Ends this client's use of the connection and returns the socket, positioned at
    /// the start of the transmission phase with nothing sent or buffered, for another
    /// NBD client (the kernel driver) to take over. The socket timeouts are cleared:
    /// the new owner bounds its own waits.
    pub fn into_stream(self) -> std::io::Result<UnixStream> {
        // Skip Drop (it would send NBD_CMD_DISC) and move the stream out.
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again, so the stream is moved out
        // exactly once; the other fields are plain integers without drop glue.
        let stream = unsafe { std::ptr::read(&this.stream) };
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        Ok(stream)
    }

    /// Sends one request and waits for its reply. `Ok(errno)` is the server's answer
    /// (0 is success; `read_into` holds the data then); `Err` means the connection broke
    /// and the request's outcome is unknown.
    pub fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        read_into: Option<&mut [u8]>,
    ) -> Result<u32, ClientError> {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        let header = RequestHeader {
            flags,
            command,
            handle,
            offset,
            length,
        };
        let mut msg = Vec::with_capacity(proto::REQUEST_HEADER_BYTES + payload.len());
        msg.extend_from_slice(&header.encode());
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg)?;
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(protocol(format!("bad reply magic {magic:#x}")));
        }
        let errno = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
        let mut h = [0u8; 8];
        h.copy_from_slice(&reply[8..16]);
        if u64::from_be_bytes(h) != handle {
            return Err(protocol("reply to a request that was not sent"));
        }
        if errno == 0
            && let Some(buf) = read_into
        {
            self.stream.read_exact(buf)?;
        }
        Ok(errno)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // A polite disconnect; the server closes the socket either way.
        let header = RequestHeader {
            flags: 0,
            command: CMD_DISC,
            handle: 0,
            offset: 0,
            length: 0,
        };
        let _ = self.stream.write_all(&header.encode());
    }
}
