//! The byte device a volume lives on. `FileDisk` is a (sparse) file accessed with
//! pread/pwrite/fdatasync; `SimDisk` is an in-memory disk that remembers which writes
//! were synced, so tests can cut the power (dropping or tearing unsynced writes) and
//! inject I/O errors deterministically.
//!
//! Contract shared by every implementation: `write_at` is visible to later `read_at`
//! calls immediately; it survives a power loss only after a later `sync` returned Ok.
//! Reads and writes past `len()` fail (the volume sizes the disk with `set_len` first).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Sector size used for torn-write simulation: a power cut keeps or loses whole sectors.
pub const SECTOR_SIZE: u64 = 512;

/// Largest single I/O the engine issues when copying or zeroing ranges.
pub const COPY_CHUNK_BYTES: usize = 1 << 20;

/// A byte-addressed device with an explicit durability barrier.
pub trait Disk: Send + Sync {
    /// Fills `buf` from `offset`; fails if the range is not entirely inside the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`; fails if the range ends past the disk.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes the concatenation of `bufs` at `offset`, like one `write_at` of it (same
    /// bounds and durability rules). Files use one `pwritev`, so callers can write a
    /// header and a borrowed payload without copying them together.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_at(&bufs.concat(), offset)
    }
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros, like `write_at` of zeros (same
    /// durability rules). Files deallocate the range instead of writing it.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeroes_by_writing(self, offset, len)
    }
    /// Makes `len` bytes at `offset` of a freshly sized disk (reading as zeros already)
    /// cheap to overwrite and sync later. Files write the zeros, so the filesystem
    /// allocates the blocks now: overwriting allocated blocks changes no metadata, so a
    /// later fdatasync need not commit the filesystem journal. Others do nothing.
    /// Durable after the next `sync`.
    fn preallocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Copies `len` bytes from `src` to `dst` (ranges must not overlap), like
    /// `read_at` + `write_at` (same durability rules). Files copy inside the kernel.
    fn copy_within(&self, src: u64, dst: u64, len: u64) -> io::Result<()> {
        copy_by_reading(self, src, dst, len)
    }
    /// The first range `[start, stop)` within `[offset, end)` that may hold data, or
    /// `None` when all of it reads as zeros because nothing is allocated there. A range
    /// not reported reads as zeros; a reported one may still read as zeros. Files ask
    /// the filesystem (`SEEK_DATA`/`SEEK_HOLE`); others report the whole range.
    fn next_data(&self, offset: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
        Ok((offset < end).then_some((offset, end)))
    }
    /// Grows or shrinks the disk; new bytes read as zeros. Durable on return.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the disk has zero length.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// A name for error messages (a file path for files).
    fn describe(&self) -> String;
}

/// Writes `len` zero bytes at `offset`, in bounded chunks (the portable way to zero a
/// range; `Disk::write_zeroes` may deallocate instead).
pub fn write_zeroes_by_writing<D: Disk + ?Sized>(
    disk: &D,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let zeros = vec![0u8; COPY_CHUNK_BYTES.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        disk.write_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The portable copy behind [`Disk::copy_within`]: through a user buffer, in chunks.
pub fn copy_by_reading<D: Disk + ?Sized>(disk: &D, src: u64, dst: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK_BYTES.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        disk.read_at(&mut buf[..n], src + done)?;
        disk.write_at(&buf[..n], dst + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A volume file on a host filesystem.
pub struct FileDisk {
    file: File,
    path: PathBuf,
    /// Cached length, so bounds checks cost no syscall.
    len: AtomicU64,
}

impl FileDisk {
    /// Creates (or truncates) the file at `path`. Fails if another open `FileDisk`
    /// (in any process) holds the file.
    pub fn create(path: &Path) -> io::Result<FileDisk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        lock_exclusive(&file, path)?;
        file.set_len(0)?;
        Ok(FileDisk {
            file,
            path: path.to_path_buf(),
            len: AtomicU64::new(0),
        })
    }

    /// Opens an existing file at `path` for reading and writing. Fails if another
    /// open `FileDisk` (in any process) holds the file.
    pub fn open(path: &Path) -> io::Result<FileDisk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        lock_exclusive(&file, path)?;
        let len = file.metadata()?.len();
        Ok(FileDisk {
            file,
            path: path.to_path_buf(),
            len: AtomicU64::new(len),
        })
    }

    /// The path this disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, offset: u64, n: usize) -> io::Result<()> {
        let len = self.len.load(Ordering::Acquire);
        match offset.checked_add(n as u64) {
            Some(end) if end <= len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "range {offset}+{n} past end of {} ({len} bytes)",
                    self.path.display()
                ),
            )),
        }
    }
}

impl Disk for FileDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        self.check(offset, total)?;
        let fd = self.file.as_raw_fd();
        let mut done = 0usize;
        while done < total {
            // The pieces not yet written, the first one cut by what was.
            let mut skip = done;
            let mut iov = Vec::with_capacity(bufs.len());
            for b in bufs {
                if skip >= b.len() {
                    skip -= b.len();
                    continue;
                }
                let rest = &b[skip..];
                skip = 0;
                iov.push(libc::iovec {
                    iov_base: rest.as_ptr() as *mut libc::c_void,
                    iov_len: rest.len(),
                });
            }
            // SAFETY: every iovec points into a live borrowed slice; pwritev only reads
            // from them.
            let n = unsafe {
                libc::pwritev(
                    fd,
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("pwritev wrote nothing at {}", offset + done as u64),
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// `copy_file_range` within the file: the flusher's WAL-to-extent copy then costs
    /// one page-cache copy in the kernel instead of a read into and a write out of a
    /// user buffer. Falls back to reading and writing where the kernel refuses.
    fn copy_within(&self, src: u64, dst: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        self.check(src, len as usize)?;
        self.check(dst, len as usize)?;
        if src.max(dst) < src.min(dst) + len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("copy {src}->{dst} of {len} bytes overlaps itself"),
            ));
        }
        let fd = self.file.as_raw_fd();
        let mut done = 0u64;
        while done < len {
            let mut off_in = (src + done) as libc::loff_t;
            let mut off_out = (dst + done) as libc::loff_t;
            let want = (len - done).min(1 << 30) as usize;
            // SAFETY: valid fd and offset pointers for the duration of the call.
            let n = unsafe { libc::copy_file_range(fd, &mut off_in, fd, &mut off_out, want, 0) };
            if n > 0 {
                done += n as u64;
                continue;
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("copy_file_range stopped at {} of {len} bytes", done),
                ));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                    return copy_by_reading(self, src + done, dst + done, len - done);
                }
                _ => return Err(err),
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::other("range overflow"))?;
        self.check(offset, 0)?;
        self.check(end, 0)?;
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return write_zeroes_by_writing(self, offset, len);
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned
        // by `self.file` and open for the duration of the call.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Filesystems without hole punching: write the zeros.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                write_zeroes_by_writing(self, offset, len)
            }
            _ => Err(err),
        }
    }

    fn next_data(&self, offset: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
        use std::os::fd::AsRawFd;
        if offset >= end {
            return Ok(None);
        }
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(Some((offset, end)));
        };
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek only reads its integer arguments; the descriptor is owned by
        // `self.file` and open for the duration of the call. The file offset it moves
        // is unused: every read and write here is positional.
        let start = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if start < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                // No data at or after `offset`.
                Some(libc::ENXIO) => Ok(None),
                // Filesystems that cannot tell: everything may hold data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((offset, end))),
                _ => Err(err),
            };
        }
        let start = start as u64;
        if start >= end {
            return Ok(None);
        }
        // SAFETY: as above.
        let stop = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
        if stop < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some((start, (stop as u64).min(end))))
    }

    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // Not fallocate: its unwritten extents are converted (a metadata change, so a
        // journal commit on fdatasync) on first write.
        write_zeroes_by_writing(self, offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.len.store(len, Ordering::Release);
        // The size is metadata: sync_all so a grown file stays grown after a crash.
        self.file.sync_all()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len.load(Ordering::Acquire))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Takes an exclusive advisory lock (flock) so two volumes never run on one file; the
/// kernel drops it when the descriptor closes, also when the process is killed.
fn lock_exclusive(file: &File, path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock only takes the integer descriptor, owned by `file` and open.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} is in use by another open volume", path.display()),
        ));
    }
    Err(err)
}

/// How a simulated power loss treats writes that were not yet synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced write is lost.
    DropUnsynced,
    /// Unsynced writes reach the disk in issue order up to a random point; the write at
    /// that point is torn at a sector boundary (its first sectors land, the rest not).
    TearLast,
    /// Each unsynced write independently lands, is lost, or is torn at a sector
    /// boundary (disks reorder writes between barriers).
    Random,
}

/// Makes injected I/O errors: each counter is the number of successful operations of
/// that kind before every later one fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultPlan {
    pub fail_writes_after: Option<u64>,
    pub fail_syncs_after: Option<u64>,
    pub fail_reads_after: Option<u64>,
}

#[derive(Default)]
struct SimState {
    /// What a reader sees now.
    current: Vec<u8>,
    /// What survives a power loss.
    durable: Vec<u8>,
    /// Writes since the last sync, in issue order.
    pending: Vec<(u64, Vec<u8>)>,
    faults: FaultPlan,
    writes: u64,
    syncs: u64,
    reads: u64,
    dead: bool,
}

/// An in-memory disk that tracks synced vs unsynced writes. Clones share the same
/// storage, so a test can keep a handle while the volume owns another.
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<SimState>>,
    name: Arc<str>,
}

fn injected(kind: &str) -> io::Error {
    io::Error::other(format!("injected {kind} error"))
}

fn bounds(len: usize, offset: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::Error::other("offset overflow"))?;
    let end = start.checked_add(n).filter(|&e| e <= len).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("range {offset}+{n} past end of disk ({len} bytes)"),
        )
    })?;
    Ok(start..end)
}

/// splitmix64: a small deterministic generator so crash outcomes follow the seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

impl SimDisk {
    /// An empty disk named `name` (used in error messages).
    pub fn new(name: &str) -> SimDisk {
        SimDisk {
            state: Arc::new(Mutex::new(SimState::default())),
            name: Arc::from(name),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding this lock can only come from a test assertion; the
        // state is still consistent, so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the fault plan and resets the operation counters.
    pub fn set_faults(&self, faults: FaultPlan) {
        let mut s = self.lock();
        s.faults = faults;
        s.writes = 0;
        s.syncs = 0;
        s.reads = 0;
    }

    /// Number of unsynced writes.
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    /// Simulates a power loss: returns a new disk holding what survived, per `mode`,
    /// deterministically from `seed`. This handle becomes dead (every operation fails),
    /// so a volume still using it cannot touch the survivor.
    pub fn crash(&self, mode: CrashMode, seed: u64) -> SimDisk {
        let mut s = self.lock();
        s.dead = true;
        let mut image = s.durable.clone();
        let mut rng = SplitMix(seed ^ 0xD1B5_4A32_D192_ED03);
        let pending = std::mem::take(&mut s.pending);
        let apply = |image: &mut Vec<u8>, off: u64, data: &[u8]| {
            let start = off as usize;
            let end = (start + data.len()).min(image.len());
            if start < end {
                image[start..end].copy_from_slice(&data[..end - start]);
            }
        };
        let torn_len = |rng: &mut SplitMix, off: u64, len: usize| -> usize {
            // Keep whole sectors from the start of the write: cut at a sector boundary
            // strictly inside the write, if there is one.
            let first_boundary = (off / SECTOR_SIZE + 1) * SECTOR_SIZE;
            let end = off + len as u64;
            if first_boundary >= end {
                return 0;
            }
            let boundaries = (end - 1 - first_boundary) / SECTOR_SIZE + 1;
            let cut = first_boundary + rng.below(boundaries) * SECTOR_SIZE;
            (cut - off) as usize
        };
        match mode {
            CrashMode::DropUnsynced => {}
            CrashMode::TearLast => {
                let keep = rng.below(pending.len() as u64 + 1) as usize;
                for (off, data) in pending.iter().take(keep) {
                    apply(&mut image, *off, data);
                }
                if let Some((off, data)) = pending.get(keep) {
                    let n = torn_len(&mut rng, *off, data.len());
                    apply(&mut image, *off, &data[..n]);
                }
            }
            CrashMode::Random => {
                for (off, data) in &pending {
                    match rng.below(3) {
                        0 => {}
                        1 => apply(&mut image, *off, data),
                        _ => {
                            let n = torn_len(&mut rng, *off, data.len());
                            apply(&mut image, *off, &data[..n]);
                        }
                    }
                }
            }
        }
        SimDisk {
            state: Arc::new(Mutex::new(SimState {
                current: image.clone(),
                durable: image,
                ..SimState::default()
            })),
            name: self.name.clone(),
        }
    }

    /// Overwrites bytes directly in both the current and the durable image (for
    /// corruption tests); bypasses fault injection.
    pub fn corrupt(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        let start = offset as usize;
        let end = (start + data.len()).min(s.current.len());
        if start < end {
            let n = end - start;
            s.current[start..end].copy_from_slice(&data[..n]);
            s.durable[start..end].copy_from_slice(&data[..n]);
        }
    }

    /// Reads bytes from the current image (bypasses fault injection).
    pub fn peek(&self, offset: u64, len: usize) -> Vec<u8> {
        let s = self.lock();
        let start = (offset as usize).min(s.current.len());
        let end = (start + len).min(s.current.len());
        s.current[start..end].to_vec()
    }
}

impl Disk for SimDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        if s.dead {
            return Err(io::Error::other("disk lost power"));
        }
        if s.faults.fail_reads_after.is_some_and(|n| s.reads >= n) {
            return Err(injected("read"));
        }
        s.reads += 1;
        let r = bounds(s.current.len(), offset, buf.len())?;
        buf.copy_from_slice(&s.current[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        if s.dead {
            return Err(io::Error::other("disk lost power"));
        }
        if s.faults.fail_writes_after.is_some_and(|n| s.writes >= n) {
            return Err(injected("write"));
        }
        s.writes += 1;
        let r = bounds(s.current.len(), offset, buf.len())?;
        s.current[r].copy_from_slice(buf);
        s.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.lock();
        if s.dead {
            return Err(io::Error::other("disk lost power"));
        }
        if s.faults.fail_syncs_after.is_some_and(|n| s.syncs >= n) {
            return Err(injected("sync"));
        }
        s.syncs += 1;
        let SimState {
            current,
            durable,
            pending,
            ..
        } = &mut *s;
        for (off, data) in pending.drain(..) {
            let start = off as usize;
            durable[start..start + data.len()].copy_from_slice(&current[start..start + data.len()]);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        if s.dead {
            return Err(io::Error::other("disk lost power"));
        }
        let len = usize::try_from(len).map_err(|_| io::Error::other("length overflow"))?;
        s.current.resize(len, 0);
        s.durable.resize(len, 0);
        // Pending writes past the new end no longer exist.
        s.pending
            .retain(|(off, data)| (*off as usize) + data.len() <= len);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let s = self.lock();
        if s.dead {
            return Err(io::Error::other("disk lost power"));
        }
        Ok(s.current.len() as u64)
    }

    fn describe(&self) -> String {
        format!("simdisk:{}", self.name)
    }
}
