//! Lost-write checker: writes self-describing blocks to an NBD export, records which
//! writes were acknowledged and then covered by an acknowledged flush, and after a fault
//! reads the volume back to report every such write that is missing, stale, torn or
//! misplaced. Each block carries the volume tag, its LBA, a sequence number and a CRC32C,
//! so a verifier needs nothing but the ledger to judge what it reads.
//!
//! Concurrency is one connection per worker; a worker owns the LBAs congruent to its
//! index, so the per-LBA order of writes is the worker's order and "the newest durable
//! write" is well defined. A write counts as durable once a flush sent on the same
//! connection after its acknowledgement is acknowledged (valid with or without
//! multi-conn). LBA choices are derived from the seed, so a run is reproducible per worker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use testkit::SeededRng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Errors of the checker (connection, protocol and ledger problems; lost writes are not
/// errors but findings in a `VerifyReport`).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("nbd i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("nbd protocol: {0}")]
    Protocol(String),
    #[error("nbd server refused {what}: error {code}")]
    Refused { what: &'static str, code: u32 },
    #[error("checker config: {0}")]
    Config(String),
    #[error("ledger file {path}: {reason}")]
    Ledger { path: PathBuf, reason: String },
}

pub type Result<T, E = CheckError> = std::result::Result<T, E>;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Largest option reply payload the client accepts.
const OPTION_REPLY_BYTES_MAX: u32 = 64 << 10;

/// Where the export is served.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp { addr: SocketAddr, export: String },
    Unix { path: PathBuf, export: String },
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies, one request in
/// flight at a time.
pub struct NbdClient {
    stream: Pin<Box<dyn Stream>>,
    size_bytes: u64,
    transmission_flags: u16,
    next_handle: u64,
}

impl NbdClient {
    pub async fn connect(target: &Target) -> Result<Self> {
        match target {
            Target::Tcp { addr, export } => {
                let s = tokio::net::TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Self::handshake(Box::pin(s), export).await
            }
            Target::Unix { path, export } => {
                let s = tokio::net::UnixStream::connect(path).await?;
                Self::handshake(Box::pin(s), export).await
            }
        }
    }

    async fn handshake(mut s: Pin<Box<dyn Stream>>, export: &str) -> Result<Self> {
        let magic = s.read_u64().await?;
        let opt = s.read_u64().await?;
        if magic != NBD_MAGIC || opt != IHAVEOPT {
            return Err(CheckError::Protocol(format!(
                "not a newstyle NBD server (magic {magic:#x}, {opt:#x})"
            )));
        }
        let flags = s.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(CheckError::Protocol("server is not fixed newstyle".into()));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        s.write_u32(client_flags).await?;
        let name = export.as_bytes();
        let name_len = u32::try_from(name.len())
            .map_err(|_| CheckError::Config("export name too long".into()))?;
        let mut opt = Vec::with_capacity(16 + 6 + name.len());
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(name_len + 6).to_be_bytes());
        opt.extend_from_slice(&name_len.to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).await?;
        s.flush().await?;
        let mut export_info = None;
        loop {
            let magic = s.read_u64().await?;
            let option = s.read_u32().await?;
            let reply = s.read_u32().await?;
            let len = s.read_u32().await?;
            if magic != OPT_REPLY_MAGIC || option != OPT_GO {
                return Err(CheckError::Protocol(format!(
                    "bad option reply (magic {magic:#x}, option {option})"
                )));
            }
            if len > OPTION_REPLY_BYTES_MAX {
                return Err(CheckError::Protocol(format!("option reply of {len} bytes")));
            }
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload).await?;
            match reply {
                REP_ACK => break,
                REP_INFO if payload.len() >= 12 && payload[..2] == INFO_EXPORT.to_be_bytes() => {
                    let mut size = [0u8; 8];
                    size.copy_from_slice(&payload[2..10]);
                    let tflags = u16::from_be_bytes([payload[10], payload[11]]);
                    export_info = Some((u64::from_be_bytes(size), tflags));
                }
                r if r & REP_ERR_BIT != 0 => {
                    return Err(CheckError::Refused {
                        what: "NBD_OPT_GO",
                        code: r,
                    });
                }
                _ => {}
            }
        }
        let (size_bytes, transmission_flags) = export_info
            .ok_or_else(|| CheckError::Protocol("NBD_OPT_GO acked without export info".into()))?;
        Ok(Self {
            stream: s,
            size_bytes,
            transmission_flags,
            next_handle: 1,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn can_flush(&self) -> bool {
        self.transmission_flags & TFLAG_SEND_FLUSH != 0
    }

    async fn request(&mut self, cmd: u16, offset: u64, len: u32, data: &[u8]) -> Result<()> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.stream.write_all(&req).await?;
        self.stream.flush().await?;
        if cmd == CMD_DISC {
            return Ok(());
        }
        let magic = self.stream.read_u32().await?;
        let error = self.stream.read_u32().await?;
        let got = self.stream.read_u64().await?;
        if magic != SIMPLE_REPLY_MAGIC || got != handle {
            return Err(CheckError::Protocol(format!(
                "bad reply (magic {magic:#x}, handle {got}, expected {handle})"
            )));
        }
        if error != 0 {
            let what = match cmd {
                CMD_READ => "READ",
                CMD_WRITE => "WRITE",
                _ => "FLUSH",
            };
            return Err(CheckError::Refused { what, code: error });
        }
        Ok(())
    }

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let len =
            u32::try_from(data.len()).map_err(|_| CheckError::Config("write too big".into()))?;
        self.request(CMD_WRITE, offset, len, data).await
    }

    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len =
            u32::try_from(buf.len()).map_err(|_| CheckError::Config("read too big".into()))?;
        self.request(CMD_READ, offset, len, &[]).await?;
        self.stream.read_exact(buf).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, &[]).await
    }

    pub async fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]).await;
    }
}

/// What a checker run writes and where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckerConfig {
    /// Written into every block; a block with another tag is reported as misplaced.
    pub volume_id: String,
    pub seed: u64,
    /// Connections writing at once.
    pub workers: usize,
    pub block_size_bytes: u32,
    /// First LBA (in blocks of `block_size_bytes`) the checker may write.
    pub lba_start: u64,
    /// Number of LBAs the checker may write.
    pub lba_count: u64,
    /// Each worker flushes after this many acknowledged writes.
    pub flush_every_writes: u32,
}

impl CheckerConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(CheckError::Config(m.into()));
        if self.workers == 0 {
            return bad("workers must be at least 1");
        }
        if self.block_size_bytes < BLOCK_HEADER_BYTES as u32
            || !self.block_size_bytes.is_power_of_two()
        {
            return bad("block_size_bytes must be a power of two of at least 64");
        }
        if self.lba_count < self.workers as u64 {
            return bad("lba_count must be at least the number of workers");
        }
        if self.flush_every_writes == 0 {
            return bad("flush_every_writes must be at least 1");
        }
        Ok(())
    }
}

/// Per-LBA record: the newest sequence written durably and the newest ever sent.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LbaRecord {
    /// Newest sequence acknowledged and then covered by an acknowledged flush (0: none).
    pub durable_seq: u64,
    /// Newest sequence sent (acknowledged or not).
    pub sent_seq: u64,
}

/// Everything needed to verify later; serializable so the CLI can keep it in a file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ledger {
    pub config: CheckerConfig,
    pub next_seq: u64,
    pub rounds: u64,
    pub blocks: BTreeMap<u64, LbaRecord>,
}

impl Ledger {
    pub fn new(config: CheckerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            next_seq: 1,
            rounds: 0,
            blocks: BTreeMap::new(),
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| CheckError::Ledger {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let l: Ledger = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        l.config.validate()?;
        Ok(l)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |reason: String| CheckError::Ledger {
            path: path.to_path_buf(),
            reason,
        };
        let text = serde_json::to_string(self).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }

    /// Writes whose durability the ledger vouches for (LBAs with a durable sequence).
    pub fn durable_blocks(&self) -> u64 {
        self.blocks.values().filter(|r| r.durable_seq > 0).count() as u64
    }
}

const BLOCK_MAGIC: u64 = 0x4256_4348_4543_4b31; // "BVCHECK1"
const BLOCK_HEADER_BYTES: usize = 64;
const TAG_BYTES: usize = 24;

/// Decoded header of a checker block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStamp {
    pub tag: [u8; TAG_BYTES],
    pub lba: u64,
    pub seq: u64,
}

fn volume_tag(volume_id: &str) -> [u8; TAG_BYTES] {
    let mut t = [0u8; TAG_BYTES];
    let b = volume_id.as_bytes();
    let n = b.len().min(TAG_BYTES);
    t[..n].copy_from_slice(&b[..n]);
    t
}

/// Builds the block for (`volume_id`, `lba`, `seq`): header, seeded filler, CRC32C of the
/// whole block computed with the CRC field zeroed.
pub fn make_block(volume_id: &str, block_size: usize, lba: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; block_size];
    b[0..8].copy_from_slice(&BLOCK_MAGIC.to_be_bytes());
    b[8..8 + TAG_BYTES].copy_from_slice(&volume_tag(volume_id));
    b[32..40].copy_from_slice(&lba.to_be_bytes());
    b[40..48].copy_from_slice(&seq.to_be_bytes());
    SeededRng::new(lba.rotate_left(32) ^ seq).fill_bytes(&mut b[BLOCK_HEADER_BYTES..]);
    let crc = crc32c::crc32c(&b);
    b[48..52].copy_from_slice(&crc.to_be_bytes());
    b
}

/// What a block read back turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockState {
    /// No checker magic (never written, zeroed, or lost).
    Blank,
    /// Magic present but CRC32C does not match the contents.
    Torn,
    Stamped(BlockStamp),
}

pub fn decode_block(b: &[u8]) -> BlockState {
    if b.len() < BLOCK_HEADER_BYTES || b[0..8] != BLOCK_MAGIC.to_be_bytes() {
        return BlockState::Blank;
    }
    let mut c = b.to_vec();
    let mut stored = [0u8; 4];
    stored.copy_from_slice(&c[48..52]);
    c[48..52].fill(0);
    if crc32c::crc32c(&c) != u32::from_be_bytes(stored) {
        return BlockState::Torn;
    }
    let mut tag = [0u8; TAG_BYTES];
    tag.copy_from_slice(&b[8..8 + TAG_BYTES]);
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[32..40]);
    let lba = u64::from_be_bytes(w);
    w.copy_from_slice(&b[40..48]);
    let seq = u64::from_be_bytes(w);
    BlockState::Stamped(BlockStamp { tag, lba, seq })
}

/// Outcome of one write phase. A broken connection ends the phase without an error: the
/// caller injected the fault and only the acknowledged work counts.
#[derive(Debug, Clone, Default)]
pub struct WriteSummary {
    pub writes_sent: u64,
    pub writes_acked: u64,
    pub flushes_acked: u64,
    /// Writes that became durable (acknowledged, then covered by an acknowledged flush).
    pub writes_made_durable: u64,
    /// Why a worker stopped early, if one did.
    pub stopped_by: Vec<String>,
}

/// The checker: a ledger behind a lock so progress can be observed while workers run.
pub struct Checker {
    ledger: Mutex<Ledger>,
    progress: tokio::sync::watch::Sender<u64>,
}

fn lock(m: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Checker {
    pub fn new(ledger: Ledger) -> Arc<Self> {
        let (progress, _) = tokio::sync::watch::channel(0);
        Arc::new(Self {
            ledger: Mutex::new(ledger),
            progress,
        })
    }

    pub fn ledger(&self) -> Ledger {
        lock(&self.ledger).clone()
    }

    /// Count of flushes acknowledged so far, for a caller waiting to inject a fault.
    pub fn flush_progress(&self) -> tokio::sync::watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// Runs `writes` writes spread over the configured workers (each flushing every
    /// `flush_every_writes`, and once at its end).
    pub async fn run_writes(self: &Arc<Self>, target: &Target, writes: u64) -> WriteSummary {
        let (cfg, round) = {
            let mut l = lock(&self.ledger);
            l.rounds += 1;
            (l.config.clone(), l.rounds)
        };
        let mut tasks = Vec::new();
        for w in 0..cfg.workers {
            let share =
                writes / cfg.workers as u64 + u64::from((w as u64) < writes % cfg.workers as u64);
            let me = self.clone();
            let target = target.clone();
            let cfg = cfg.clone();
            tasks.push(tokio::spawn(async move {
                me.worker(&target, &cfg, w, round, share).await
            }));
        }
        let mut sum = WriteSummary::default();
        for t in tasks {
            match t.await {
                Ok(s) => {
                    sum.writes_sent += s.writes_sent;
                    sum.writes_acked += s.writes_acked;
                    sum.flushes_acked += s.flushes_acked;
                    sum.writes_made_durable += s.writes_made_durable;
                    sum.stopped_by.extend(s.stopped_by);
                }
                Err(e) => sum.stopped_by.push(format!("worker task failed: {e}")),
            }
        }
        sum
    }

    async fn worker(
        &self,
        target: &Target,
        cfg: &CheckerConfig,
        w: usize,
        round: u64,
        writes: u64,
    ) -> WriteSummary {
        let mut sum = WriteSummary::default();
        if let Err(e) = self
            .worker_inner(target, cfg, w, round, writes, &mut sum)
            .await
        {
            sum.stopped_by.push(format!("worker {w}: {e}"));
        }
        sum
    }

    async fn worker_inner(
        &self,
        target: &Target,
        cfg: &CheckerConfig,
        w: usize,
        round: u64,
        writes: u64,
        sum: &mut WriteSummary,
    ) -> Result<()> {
        let mut c = NbdClient::connect(target).await?;
        let bs = u64::from(cfg.block_size_bytes);
        let end = (cfg.lba_start + cfg.lba_count) * bs;
        if c.size_bytes() < end {
            return Err(CheckError::Config(format!(
                "export has {} bytes, the checker range ends at {end}",
                c.size_bytes()
            )));
        }
        let workers = cfg.workers as u64;
        // LBAs owned by this worker: lba_start + w + k*workers.
        let owned = (cfg.lba_count - w as u64).div_ceil(workers);
        let mut rng = SeededRng::new(
            cfg.seed ^ (w as u64).wrapping_mul(0x1000_0000_01b3) ^ round.rotate_left(40),
        );
        let mut unflushed: Vec<(u64, u64)> = Vec::new();
        for i in 0..writes {
            let lba = cfg.lba_start + w as u64 + (rng.next_u64() % owned) * workers;
            let seq = {
                let mut l = lock(&self.ledger);
                let s = l.next_seq;
                l.next_seq += 1;
                l.blocks.entry(lba).or_default().sent_seq = s;
                s
            };
            let block = make_block(&cfg.volume_id, bs as usize, lba, seq);
            sum.writes_sent += 1;
            c.write(lba * bs, &block).await?;
            sum.writes_acked += 1;
            unflushed.push((lba, seq));
            if (i + 1) % u64::from(cfg.flush_every_writes) == 0 || i + 1 == writes {
                c.flush().await?;
                sum.flushes_acked += 1;
                sum.writes_made_durable += unflushed.len() as u64;
                {
                    let mut l = lock(&self.ledger);
                    for (lba, seq) in unflushed.drain(..) {
                        let r = l.blocks.entry(lba).or_default();
                        r.durable_seq = r.durable_seq.max(seq);
                    }
                }
                self.progress.send_modify(|n| *n += 1);
            }
        }
        c.disconnect().await;
        Ok(())
    }

    /// Reads back every LBA the ledger has written and judges it.
    pub async fn verify(&self, target: &Target) -> Result<VerifyReport> {
        let ledger = self.ledger();
        verify_ledger(target, &ledger).await
    }
}

/// A finding about one LBA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A durable write whose block reads back without a checker stamp.
    Missing { lba: u64, durable_seq: u64 },
    /// The block holds an older write than the newest durable one.
    Stale {
        lba: u64,
        durable_seq: u64,
        found_seq: u64,
    },
    /// The block's checksum does not match its contents.
    Torn { lba: u64 },
    /// The block carries another volume's tag or another LBA.
    Misplaced { lba: u64, found_lba: u64 },
    /// The block carries a sequence the checker never sent.
    Phantom {
        lba: u64,
        found_seq: u64,
        sent_seq: u64,
    },
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// LBAs read back.
    pub blocks_read: u64,
    /// Durable writes found intact (newest durable sequence or a newer sent one).
    pub writes_verified: u64,
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "blocks read {}, durable writes verified {}, findings {}",
            self.blocks_read,
            self.writes_verified,
            self.findings.len()
        )?;
        for x in self.findings.iter().take(20) {
            write!(f, "\n  {x:?}")?;
        }
        Ok(())
    }
}

/// Judges one block read at `lba` against its ledger record.
pub fn judge(volume_id: &str, lba: u64, rec: LbaRecord, data: &[u8]) -> Result<bool, Finding> {
    match decode_block(data) {
        BlockState::Blank if rec.durable_seq > 0 => Err(Finding::Missing {
            lba,
            durable_seq: rec.durable_seq,
        }),
        BlockState::Blank => Ok(false),
        BlockState::Torn => Err(Finding::Torn { lba }),
        BlockState::Stamped(s) => {
            if s.lba != lba || s.tag != volume_tag(volume_id) {
                Err(Finding::Misplaced {
                    lba,
                    found_lba: s.lba,
                })
            } else if s.seq > rec.sent_seq {
                Err(Finding::Phantom {
                    lba,
                    found_seq: s.seq,
                    sent_seq: rec.sent_seq,
                })
            } else if s.seq < rec.durable_seq {
                Err(Finding::Stale {
                    lba,
                    durable_seq: rec.durable_seq,
                    found_seq: s.seq,
                })
            } else {
                Ok(rec.durable_seq > 0)
            }
        }
    }
}

pub async fn verify_ledger(target: &Target, ledger: &Ledger) -> Result<VerifyReport> {
    let mut c = NbdClient::connect(target).await?;
    let bs = ledger.config.block_size_bytes as usize;
    let mut buf = vec![0u8; bs];
    let mut report = VerifyReport::default();
    for (&lba, &rec) in &ledger.blocks {
        c.read(lba * bs as u64, &mut buf).await?;
        report.blocks_read += 1;
        match judge(&ledger.config.volume_id, lba, rec, &buf) {
            Ok(true) => report.writes_verified += 1,
            Ok(false) => {}
            Err(f) => report.findings.push(f),
        }
    }
    c.disconnect().await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_round_trips_and_a_flipped_byte_is_torn() {
        let b = make_block("vol-a", 4096, 7, 42);
        assert_eq!(
            decode_block(&b),
            BlockState::Stamped(BlockStamp {
                tag: volume_tag("vol-a"),
                lba: 7,
                seq: 42
            })
        );
        for i in [0usize, 9, 33, 45, 50, 100, 4095] {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert_ne!(decode_block(&c), decode_block(&b), "byte {i}");
            if i >= 8 {
                assert_eq!(decode_block(&c), BlockState::Torn, "byte {i}");
            }
        }
        assert_eq!(decode_block(&[0u8; 4096]), BlockState::Blank);
    }

    #[test]
    fn judge_flags_missing_stale_phantom_and_misplaced() {
        let rec = LbaRecord {
            durable_seq: 5,
            sent_seq: 6,
        };
        // Volume v's LBA 3 judged holding the block `volume` wrote at `lba` with `seq`.
        let found = |volume: &str, lba, seq| judge("v", 3, rec, &make_block(volume, 512, lba, seq));
        assert_eq!(found("v", 3, 5), Ok(true));
        assert_eq!(found("v", 3, 6), Ok(true));
        assert!(matches!(
            found("v", 3, 4),
            Err(Finding::Stale { found_seq: 4, .. })
        ));
        assert!(matches!(found("v", 3, 7), Err(Finding::Phantom { .. })));
        assert!(matches!(
            found("v", 4, 5),
            Err(Finding::Misplaced { found_lba: 4, .. })
        ));
        assert!(matches!(found("w", 3, 5), Err(Finding::Misplaced { .. })));
        assert!(matches!(
            judge("v", 3, rec, &[0u8; 512]),
            Err(Finding::Missing { durable_seq: 5, .. })
        ));
        let unflushed = LbaRecord {
            durable_seq: 0,
            sent_seq: 2,
        };
        assert_eq!(judge("v", 3, unflushed, &[0u8; 512]), Ok(false));
    }
}
