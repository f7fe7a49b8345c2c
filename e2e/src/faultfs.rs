//! A fault-injecting passthrough filesystem (FUSE, served by threads of the test
//! process): every file operation goes to a backing directory, except that fsync and
//! fdatasync, or writes, can be switched at runtime to fail with EIO. A node agent's
//! data directory mounted on it meets disk errors without device-mapper.
//!
//! Guarantees: while no fault is switched on, it behaves like the backing directory
//! (data, sizes, renames, directory listings). A failed fsync or write changes nothing
//! in the backing directory. Dropping the handle unmounts it; stop every process using
//! it first, or its next access fails with ENOTCONN.
//!
//! Written data is passed straight to the backing file, so the data of a write whose
//! fsync later fails stays readable here; the fail-stop behaviour after a failed fsync
//! (the kernel may have dropped those pages) is the engine's to provide.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

use crate::faults::{FaultError, Result};

/// Attributes are not cached by the kernel: sizes change behind its back only through
/// this filesystem, but a zero TTL keeps the passthrough exact at little cost.
const TTL: Duration = Duration::ZERO;
/// Request threads of one mount.
const FUSE_THREADS: usize = 2;

/// The runtime switches and counters of one mount, shared with the test.
#[derive(Debug, Default)]
pub struct FaultSwitch {
    fail_fsync: AtomicBool,
    fail_writes: AtomicBool,
    fsync_failures: AtomicU64,
    write_failures: AtomicU64,
    fsyncs_ok: AtomicU64,
    first_failure: Mutex<Option<SystemTime>>,
}

impl FaultSwitch {
    /// fsync, fdatasync and directory syncs fail with EIO while on.
    pub fn set_fail_fsync(&self, on: bool) {
        self.fail_fsync.store(on, Ordering::SeqCst);
        tracing::info!(on, "fault filesystem: fsync failures switched");
    }

    /// Writes (and fallocate) fail with EIO while on.
    pub fn set_fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
        tracing::info!(on, "fault filesystem: write failures switched");
    }

    pub fn fsync_failures(&self) -> u64 {
        self.fsync_failures.load(Ordering::SeqCst)
    }

    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::SeqCst)
    }

    /// Successful fsync and fdatasync calls on files so far.
    pub fn fsyncs_ok(&self) -> u64 {
        self.fsyncs_ok.load(Ordering::SeqCst)
    }

    /// When the first injected error was returned, if any was (since the last
    /// [`FaultSwitch::forget_first_failure`]).
    pub fn first_failure_at(&self) -> Option<SystemTime> {
        *self.first_failure.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a new observation: `first_failure_at` answers None until the next
    /// injected error (a scenario that fails the same mount again in a later trial).
    pub fn forget_first_failure(&self) {
        *self.first_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn injected(&self, counter: &AtomicU64) -> Errno {
        counter.fetch_add(1, Ordering::SeqCst);
        self.first_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(SystemTime::now);
        Errno::EIO
    }
}

/// A mounted fault filesystem; unmounted on drop.
pub struct FaultFs {
    mountpoint: PathBuf,
    switch: Arc<FaultSwitch>,
    session: Option<BackgroundSession>,
}

impl FaultFs {
    /// Mounts a passthrough of `backing` (which must exist) on `mountpoint` (created if
    /// missing). Needs root or fusermount3.
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<FaultFs> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| FaultError::Io { what, path, source }
        };
        std::fs::create_dir_all(mountpoint).map_err(io("creating the mountpoint", mountpoint))?;
        let backing = std::fs::canonicalize(backing)
            .map_err(io("resolving the backing directory", backing))?;
        let switch = Arc::new(FaultSwitch::default());
        let fs = Passthrough {
            switch: switch.clone(),
            nodes: Mutex::new(Nodes::new(backing.clone())),
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("blockvol-faultfs".into()),
            MountOption::NoAtime,
        ];
        config.n_threads = Some(FUSE_THREADS);
        let session = fuser::spawn_mount(fs, mountpoint, &config)
            .map_err(io("mounting the fault filesystem on", mountpoint))?;
        tracing::info!(backing = %backing.display(), mountpoint = %mountpoint.display(), "fault filesystem mounted");
        Ok(FaultFs {
            mountpoint: mountpoint.to_path_buf(),
            switch,
            session: Some(session),
        })
    }

    pub fn switch(&self) -> &Arc<FaultSwitch> {
        &self.switch
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts now (idempotent).
    pub fn unmount(&mut self) -> Result<()> {
        if let Some(s) = self.session.take() {
            s.umount_and_join().map_err(|source| FaultError::Io {
                what: "unmounting the fault filesystem at",
                path: self.mountpoint.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!(error = %e, "removing the fault filesystem");
        }
    }
}

/// Inode numbers of this mount, each naming a path relative to the backing root.
struct Nodes {
    root: PathBuf,
    path_of: HashMap<u64, PathBuf>,
    ino_of: HashMap<PathBuf, u64>,
    next: u64,
}

impl Nodes {
    fn new(root: PathBuf) -> Nodes {
        let mut n = Nodes {
            root,
            path_of: HashMap::new(),
            ino_of: HashMap::new(),
            next: 2,
        };
        n.path_of.insert(INodeNo::ROOT.0, PathBuf::new());
        n.ino_of.insert(PathBuf::new(), INodeNo::ROOT.0);
        n
    }

    fn rel(&self, ino: INodeNo) -> Option<PathBuf> {
        self.path_of.get(&ino.0).cloned()
    }

    fn full(&self, ino: INodeNo) -> Option<PathBuf> {
        self.rel(ino).map(|r| self.root.join(r))
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Option<(PathBuf, PathBuf)> {
        let rel = self.rel(parent)?.join(name);
        let full = self.root.join(&rel);
        Some((rel, full))
    }

    fn ino(&mut self, rel: &Path) -> u64 {
        if let Some(i) = self.ino_of.get(rel) {
            return *i;
        }
        let i = self.next;
        self.next += 1;
        self.ino_of.insert(rel.to_path_buf(), i);
        self.path_of.insert(i, rel.to_path_buf());
        i
    }

    fn remove(&mut self, rel: &Path) {
        if let Some(i) = self.ino_of.remove(rel) {
            self.path_of.remove(&i);
        }
    }

    /// Moves `from` (and everything under it) to `to`.
    fn rename(&mut self, from: &Path, to: &Path) {
        self.remove(to);
        let moved: Vec<(PathBuf, u64)> = self
            .ino_of
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, i) in moved {
            let rest = p
                .strip_prefix(from)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            let np = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.ino_of.remove(&p);
            self.ino_of.insert(np.clone(), i);
            self.path_of.insert(i, np);
        }
    }
}

struct Passthrough {
    switch: Arc<FaultSwitch>,
    nodes: Mutex<Nodes>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH
    }
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

impl Passthrough {
    /// Removes the entry `name` of `parent` with `remove` (file or directory) and
    /// forgets its inode.
    fn remove_child(
        &self,
        parent: INodeNo,
        name: &OsStr,
        remove: fn(&Path) -> std::io::Result<()>,
        reply: ReplyEmpty,
    ) {
        let Some((rel, full)) = self.nodes().child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        match remove(&full) {
            Ok(()) => {
                self.nodes().remove(&rel);
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn nodes(&self) -> MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file(&self, fh: FileHandle) -> Option<Arc<File>> {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned()
    }

    fn add_file(&self, f: File) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(f));
        FileHandle(fh)
    }

    /// Attributes of the child `name` of `parent`, registering its inode.
    fn entry_of(&self, rel: &Path, full: &Path) -> std::io::Result<FileAttr> {
        let m = std::fs::symlink_metadata(full)?;
        let ino = self.nodes().ino(rel);
        Ok(attr(ino, &m))
    }

    fn open_file(path: &Path, flags: i32, create_mode: Option<u32>) -> std::io::Result<File> {
        let acc = flags & libc::O_ACCMODE;
        let mut o = std::fs::OpenOptions::new();
        o.read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
            .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
            .custom_flags(flags & (libc::O_APPEND | libc::O_TRUNC));
        if acc == libc::O_WRONLY {
            // Reads of the page cache may still come through a write-only handle.
            o.read(true);
        }
        if let Some(mode) = create_mode {
            o.create(true).mode(mode);
            if flags & libc::O_EXCL != 0 {
                o.create_new(true);
            }
        }
        o.open(path)
    }
}

impl Filesystem for Passthrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some((rel, full)) = self.nodes().child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        match self.entry_of(&rel, &full) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let m = match fh.and_then(|fh| self.file(fh)) {
            Some(f) => f.metadata(),
            None => match self.nodes().full(ino) {
                Some(p) => std::fs::symlink_metadata(p),
                None => return reply.error(Errno::ENOENT),
            },
        };
        match m {
            Ok(m) => reply.attr(&TTL, &attr(ino.0, &m)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(path) = self.nodes().full(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let r = (|| -> std::io::Result<std::fs::Metadata> {
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
            if let Some(size) = size {
                if self.switch.fail_writes.load(Ordering::SeqCst) {
                    return Err(std::io::Error::from_raw_os_error(libc::EIO));
                }
                match fh.and_then(|fh| self.file(fh)) {
                    Some(f) => f.set_len(size)?,
                    None => std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(size)?,
                }
            }
            std::fs::symlink_metadata(&path)
        })();
        match r {
            Ok(m) => reply.attr(&TTL, &attr(ino.0, &m)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let Some((rel, full)) = self.nodes().child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        let r = std::fs::DirBuilder::new()
            .mode(mode & !umask)
            .create(&full)
            .and_then(|()| self.entry_of(&rel, &full));
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove_child(parent, name, |p| std::fs::remove_file(p), reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove_child(parent, name, |p| std::fs::remove_dir(p), reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let (from, to) = {
            let n = self.nodes();
            match (n.child(parent, name), n.child(newparent, newname)) {
                (Some(a), Some(b)) => (a, b),
                _ => return reply.error(Errno::ENOENT),
            }
        };
        match std::fs::rename(&from.1, &to.1) {
            Ok(()) => {
                self.nodes().rename(&from.0, &to.0);
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(path) = self.nodes().full(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match Self::open_file(&path, flags.0, None) {
            Ok(f) => reply.opened(self.add_file(f), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some((rel, full)) = self.nodes().child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        let r = Self::open_file(&full, flags, Some(mode & !umask))
            .and_then(|f| Ok((self.entry_of(&rel, &full)?, f)));
        match r {
            Ok((a, f)) => reply.created(
                &TTL,
                &a,
                Generation(0),
                self.add_file(f),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut n = 0;
        while n < buf.len() {
            match f.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(e)),
            }
        }
        reply.data(&buf[..n]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.switch.fail_writes.load(Ordering::SeqCst) {
            return reply.error(self.switch.injected(&self.switch.write_failures));
        }
        let Some(f) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        match f.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

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

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.switch.fail_fsync.load(Ordering::SeqCst) {
            return reply.error(self.switch.injected(&self.switch.fsync_failures));
        }
        let Some(f) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        let r = if datasync {
            f.sync_data()
        } else {
            f.sync_all()
        };
        match r {
            Ok(()) => {
                self.switch.fsyncs_ok.fetch_add(1, Ordering::SeqCst);
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
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
        let Some(rel) = self.nodes().rel(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let full = self.nodes().root.join(&rel);
        let rd = match std::fs::read_dir(&full) {
            Ok(rd) => rd,
            Err(e) => return reply.error(errno(e)),
        };
        let mut entries: Vec<(u64, FileType, std::ffi::OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        for e in rd.flatten() {
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => FileType::Directory,
                Ok(t) if t.is_symlink() => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            let child = self.nodes().ino(&rel.join(e.file_name()));
            entries.push((child, kind, e.file_name()));
        }
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.switch.fail_fsync.load(Ordering::SeqCst) {
            return reply.error(self.switch.injected(&self.switch.fsync_failures));
        }
        let Some(path) = self.nodes().full(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match File::open(path).and_then(|d| d.sync_all()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let root = self.nodes().root.clone();
        let Ok(c) = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()) else {
            return reply.error(Errno::EINVAL);
        };
        // SAFETY: statvfs writes into the zeroed struct; `c` is a valid C string.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return reply.error(errno(std::io::Error::last_os_error()));
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if self.switch.fail_writes.load(Ordering::SeqCst) {
            return reply.error(self.switch.injected(&self.switch.write_failures));
        }
        let Some(f) = self.file(fh) else {
            return reply.error(Errno::EBADF);
        };
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor owned by `f`.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                mode,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if r == 0 {
            reply.ok()
        } else {
            reply.error(errno(std::io::Error::last_os_error()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn passthrough_until_switched_then_eio_then_healed() {
        let d = tempfile::tempdir().unwrap();
        let backing = d.path().join("backing");
        std::fs::create_dir(&backing).unwrap();
        let mnt = d.path().join("mnt");
        let fs = FaultFs::mount(&backing, &mnt).unwrap();
        let sw = fs.switch().clone();

        // Plain passthrough: create, write, fsync, rename, list, read back.
        std::fs::create_dir(mnt.join("vol")).unwrap();
        let tmp = mnt.join("vol/file.creating");
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(b"hello").unwrap();
        f.sync_all().unwrap();
        f.set_len(4096).unwrap();
        drop(f);
        std::fs::rename(&tmp, mnt.join("vol/file")).unwrap();
        let names: Vec<_> = std::fs::read_dir(mnt.join("vol"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("file")]);
        let on_backing = std::fs::read(backing.join("vol/file")).unwrap();
        assert_eq!(&on_backing[..5], b"hello");
        assert_eq!(on_backing.len(), 4096);
        assert!(sw.fsyncs_ok() >= 1);
        assert_eq!(sw.first_failure_at(), None);

        // fsync fails with EIO while switched on; the data already written stays.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(mnt.join("vol/file"))
            .unwrap();
        sw.set_fail_fsync(true);
        f.write_all(b"HELLO").unwrap();
        let e = f.sync_data().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        assert_eq!(sw.fsync_failures(), 1);
        assert!(sw.first_failure_at().is_some());
        sw.set_fail_fsync(false);

        // Writes fail with EIO while switched on and change nothing.
        sw.set_fail_writes(true);
        use std::os::unix::fs::FileExt;
        let e = f.write_at(b"XXXXX", 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        assert_eq!(sw.write_failures(), 1);
        sw.set_fail_writes(false);
        f.sync_all().unwrap();
        let mut got = Vec::new();
        std::fs::File::open(backing.join("vol/file"))
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(&got[..5], b"HELLO");
        drop(f);

        std::fs::remove_file(mnt.join("vol/file")).unwrap();
        std::fs::remove_dir(mnt.join("vol")).unwrap();
        assert!(!backing.join("vol").exists());
        drop(fs);
        assert!(
            std::fs::read_dir(&mnt).unwrap().next().is_none(),
            "unmounted: the mountpoint is an empty directory again"
        );
    }
}
