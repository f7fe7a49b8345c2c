//! A volume as one regular file on a FUSE mount, served in process: `MOUNT/disk`, whose
//! size is the backend's size. A loop device on that file (direct I/O) is the attached
//! block device.
//!
//! Guarantees:
//! - A request is answered only after the backend answered it (a write is acknowledged
//!   only once the backend acknowledged it; `fsync` is a backend FLUSH).
//! - Requests do not wait for each other: the FUSE loop hands each one to a bounded queue
//!   served by `workers` threads, which answer the kernel when their backend call
//!   returns, so up to `workers` requests are in flight to the backend at once.
//! - The file's size follows the backend: attributes are never cached by the kernel
//!   (TTL 0), and [`FuseExport::size_changed`] also invalidates what it holds, so the
//!   next `stat` (and `losetup -c` after it) sees a grown volume.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, Notifier, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    SessionACL, SessionUnmounter, WriteFlags,
};

use crate::frontend::nbd::{BackendError, BlockBackend};

/// Name of the file that is the volume, in the mount's root directory.
pub const DISK_FILE: &str = "disk";
const DISK_INO: INodeNo = INodeNo(2);
/// Attributes and entries are not cached: the size may change at any time.
const NO_CACHE: Duration = Duration::ZERO;
/// Longest trim or zeroing sent to the backend as one request, in bytes.
const RANGE_REQUEST_BYTES_MAX: u64 = 1 << 30;

/// Settings of a [`FuseExport`].
#[derive(Debug, Clone)]
pub struct FuseExportConfig {
    /// Threads answering requests; each may have one backend request in flight.
    pub workers: usize,
    /// Requests queued for the workers before the FUSE loop waits for room.
    pub queue_depth: usize,
    /// Largest write the kernel sends in one request, in bytes.
    pub max_write_bytes: u32,
    /// Requests the kernel may have outstanding in the background (async direct I/O).
    pub max_background: u16,
    /// Shown as the mount's source in /proc/mounts.
    pub fs_name: String,
}

impl Default for FuseExportConfig {
    fn default() -> Self {
        FuseExportConfig {
            workers: 8,
            queue_depth: 64,
            max_write_bytes: 1 << 20,
            max_background: 64,
            fs_name: "blockvol".into(),
        }
    }
}

/// One request for a worker, with the reply it owes the kernel.
enum Job {
    Read {
        offset: u64,
        len: usize,
        reply: ReplyData,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        reply: ReplyWrite,
    },
    Flush {
        reply: ReplyEmpty,
    },
    Trim {
        offset: u64,
        len: u64,
        reply: ReplyEmpty,
    },
    Zero {
        offset: u64,
        len: u64,
        reply: ReplyEmpty,
    },
}

fn errno(e: &BackendError) -> Errno {
    match e {
        BackendError::Io(_) => Errno::EIO,
        BackendError::NoSpace(_) => Errno::ENOSPC,
        BackendError::Invalid(_) => Errno::EINVAL,
        BackendError::ReadOnly(_) => Errno::EROFS,
    }
}

/// Splits `[offset, offset + len)` into backend-sized requests.
fn in_chunks(
    offset: u64,
    len: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(RANGE_REQUEST_BYTES_MAX);
        f(offset + done, n)?;
        done += n;
    }
    Ok(())
}

fn work(backend: &dyn BlockBackend, jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            // The file system is gone (unmounted): nothing more will come.
            Err(_) => return,
        };
        let log = |what: &str, e: &BackendError| {
            tracing::warn!(what, error = %e, "volume file: request failed");
        };
        match job {
            Job::Read { offset, len, reply } => {
                let mut buf = vec![0u8; len];
                match backend.read(offset, &mut buf) {
                    Ok(()) => reply.data(&buf),
                    Err(e) => {
                        log("read", &e);
                        reply.error(errno(&e));
                    }
                }
            }
            Job::Write {
                offset,
                data,
                reply,
            } => match backend.write(offset, &data) {
                Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
                Err(e) => {
                    log("write", &e);
                    reply.error(errno(&e));
                }
            },
            Job::Flush { reply } => match backend.flush() {
                Ok(()) => reply.ok(),
                Err(e) => {
                    log("flush", &e);
                    reply.error(errno(&e));
                }
            },
            Job::Trim { offset, len, reply } => {
                match in_chunks(offset, len, |o, n| backend.trim(o, n)) {
                    Ok(()) => reply.ok(),
                    Err(e) => {
                        log("trim", &e);
                        reply.error(errno(&e));
                    }
                }
            }
            Job::Zero { offset, len, reply } => {
                match in_chunks(offset, len, |o, n| backend.write_zeroes(o, n)) {
                    Ok(()) => reply.ok(),
                    Err(e) => {
                        log("write_zeroes", &e);
                        reply.error(errno(&e));
                    }
                }
            }
        }
    }
}

/// The FUSE file system: a root directory holding [`DISK_FILE`].
struct ExportFs {
    backend: Arc<dyn BlockBackend>,
    jobs: SyncSender<Job>,
    config: FuseExportConfig,
    uid: u32,
    gid: u32,
    created: SystemTime,
}

impl ExportFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else if ino == DISK_INO {
            (FileType::RegularFile, 0o600, self.backend.size_bytes(), 1)
        } else {
            return None;
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self.backend.block_size().max(4096),
            flags: 0,
        })
    }

    /// Queues a job; fails the request if the workers are gone (shutting down).
    fn submit(&self, job: Job) {
        if let Err(std::sync::mpsc::SendError(job)) = self.jobs.send(job) {
            match job {
                Job::Read { reply, .. } => reply.error(Errno::EIO),
                Job::Write { reply, .. } => reply.error(Errno::EIO),
                Job::Flush { reply } | Job::Trim { reply, .. } | Job::Zero { reply, .. } => {
                    reply.error(Errno::EIO)
                }
            }
        }
    }

    /// Whether `[offset, offset + len)` lies inside the volume.
    fn in_bounds(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.backend.size_bytes())
    }
}

impl Filesystem for ExportFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(self.config.max_write_bytes);
        let _ = config.set_max_background(self.config.max_background);
        // Lets one direct I/O (a loop device request) be answered asynchronously, so the
        // loop device keeps several in flight; older kernels simply lack it.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            tracing::info!(?missing, "volume file: kernel lacks async direct I/O");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(DISK_INO) {
            Some(attr) if parent == INodeNo::ROOT && name == DISK_FILE => {
                reply.entry(&NO_CACHE, &attr, fuser::Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&NO_CACHE, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Only no-op changes succeed: the volume's size is the backend's, and ownership
    /// and times are fixed.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if size.is_some_and(|s| s != attr.size)
            || mode.is_some()
            || uid.is_some_and(|u| u != attr.uid)
            || gid.is_some_and(|g| g != attr.gid)
        {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&NO_CACHE, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        // No page cache in front of the volume (the loop device above has its own), and
        // direct writes to different ranges run in parallel.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Reads stop at the end of the volume, like any file.
        let len = self
            .backend
            .size_bytes()
            .saturating_sub(offset)
            .min(u64::from(size));
        if len == 0 {
            return reply.data(&[]);
        }
        let len = usize::try_from(len).unwrap_or(0);
        self.submit(Job::Read { offset, len, reply });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !self.in_bounds(offset, data.len() as u64) {
            // The file cannot grow by writing past its end; the volume grows by Expand.
            return reply.error(Errno::EFBIG);
        }
        self.submit(Job::Write {
            offset,
            data: data.to_vec(),
            reply,
        });
    }

    /// Called on every close(); durability comes from fsync, so nothing to do.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.submit(Job::Flush { reply });
    }

    /// Punching a hole is a trim, zeroing a range is a write of zeroes (what the loop
    /// device sends for discard and write-zeroes); allocating is a no-op inside the
    /// volume. Everything else is unsupported.
    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if !self.in_bounds(offset, length) {
            return reply.error(Errno::EFBIG);
        }
        match mode {
            PUNCH => self.submit(Job::Trim {
                offset,
                len: length,
                reply,
            }),
            m if m & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE => {
                self.submit(Job::Zero {
                    offset,
                    len: length,
                    reply,
                })
            }
            0 | libc::FALLOC_FL_KEEP_SIZE => reply.ok(),
            _ => reply.error(Errno::EOPNOTSUPP),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bsize = self.backend.block_size().max(4096);
        let blocks = self.backend.size_bytes() / u64::from(bsize);
        reply.statfs(blocks, 0, 0, 1, 0, bsize, 255, bsize);
    }
}

/// Tells the kernel that the volume file's attributes changed.
#[derive(Debug, Clone)]
pub struct SizeNotifier(Notifier);

impl SizeNotifier {
    /// Drops what the kernel holds of the file's attributes and data (the backend's size
    /// grew), so the next `stat` asks again.
    pub fn size_changed(&self) -> io::Result<()> {
        match self.0.inval_inode(DISK_INO, 0, 0) {
            // The kernel has not looked the file up yet: it has nothing cached.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}

/// A mounted volume file; see the module docs.
pub struct FuseExport {
    mount_dir: PathBuf,
    notifier: Notifier,
    ended: Option<tokio::sync::oneshot::Receiver<()>>,
    unmounter: SessionUnmounter,
    session: Option<JoinHandle<io::Result<()>>>,
    workers: Vec<JoinHandle<()>>,
}

impl FuseExport {
    /// Mounts the file system on `mount_dir` (an existing directory) and starts serving.
    /// As root the mount is made directly; otherwise through `fusermount3`.
    pub fn mount(
        backend: Arc<dyn BlockBackend>,
        mount_dir: &Path,
        config: FuseExportConfig,
    ) -> io::Result<FuseExport> {
        if config.workers == 0 || config.queue_depth == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "workers and queue_depth must be above 0",
            ));
        }
        let (jobs, queue) = sync_channel(config.queue_depth);
        let queue = Arc::new(Mutex::new(queue));
        let workers = (0..config.workers)
            .map(|i| {
                let backend = backend.clone();
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("volume-file-{i}"))
                    .spawn(move || work(backend.as_ref(), &queue))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let mut options = fuser::Config::default();
        options.mount_options = vec![
            MountOption::FSName(config.fs_name.clone()),
            MountOption::Subtype("blockvol".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        options.acl = SessionACL::Owner;
        let fs = ExportFs {
            backend,
            jobs,
            config,
            // SAFETY: getuid/getgid cannot fail and touch no memory.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            created: SystemTime::now(),
        };
        // On failure `fs` (and with it the queue's sender) is dropped: the workers exit.
        let mut session = fuser::Session::new(fs, mount_dir, &options)?;
        let notifier = session.notifier();
        let unmounter = session.unmount_callable();
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let session = std::thread::Builder::new()
            .name("volume-file-fuse".into())
            .spawn(move || {
                let result = session.run();
                let _ = ended_tx.send(());
                result
            })?;
        Ok(FuseExport {
            mount_dir: mount_dir.to_path_buf(),
            notifier,
            ended: Some(ended),
            unmounter,
            session: Some(session),
            workers,
        })
    }

    /// The volume file.
    pub fn file(&self) -> PathBuf {
        self.mount_dir.join(DISK_FILE)
    }

    /// A handle that tells the kernel when the backend's size changed.
    pub fn size_notifier(&self) -> SizeNotifier {
        SizeNotifier(self.notifier.clone())
    }

    /// Resolves once the file system stopped serving (unmounted from outside, or by
    /// [`FuseExport::unmount`]). Only the first call gets the receiver.
    pub fn take_ended(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.ended.take()
    }

    /// Whether the file system is still served (it ends when unmounted from outside).
    pub fn is_serving(&self) -> bool {
        self.session.as_ref().is_some_and(|s| !s.is_finished())
    }

    /// Unmounts and waits for the request threads to finish. While the file is still in
    /// use (a loop device on it) the mount is only detached lazily and this returns at
    /// once: the session then lives until the last user lets go, or the process exits.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.unmounter.unmount() {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::warn!(mount = %self.mount_dir.display(), "volume file still in use; detaching the mount lazily");
                let c = std::ffi::CString::new(self.mount_dir.as_os_str().as_encoded_bytes())
                    .map_err(io::Error::other)?;
                // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }
            Err(e) => Err(e),
            Ok(()) => {
                self.join();
                Ok(())
            }
        }
    }

    /// Waits until the file system is unmounted from outside and its requests are done.
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(s) = self.session.take() {
            match s.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "volume file: FUSE session ended"),
                Err(_) => tracing::error!("volume file: FUSE session thread panicked"),
            }
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
