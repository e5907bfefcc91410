//! Unpacking, our own rather than the tar crate's: every entry lands beneath the install root
//! with no symlink followed on the way (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), whatever the
//! image or the package contains; decompressed bytes are metered against gzip bombs and
//! oversized headers.

use super::manifest::{EntryKind, ManifestEntry};
use super::source::CHUNK_SIZE;
use super::*;
use crate::rootfs;
use flate2::bufread::MultiGzDecoder;
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag, ResolveFlag};
use nix::sys::stat::{self, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, Gid, Uid, UnlinkatFlags};
use ruzstd::decoding::{FrameDecoder, StreamingDecoder};
use sha2::{Digest, Sha256};
use snafu::{ensure, OptionExt, ResultExt};
use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use tar::EntryType;

/// Decompressed bytes allowed between one entry's data and the next entry: padding, headers,
/// GNU long names and pax records. The tar crate buffers long names and pax records whole, so
/// this is what bounds the memory a hostile package can make it use.
pub(super) const HEADER_ALLOWANCE: u64 = 1024 * 1024;
/// Entries are resolved beneath the install root and never through a symlink.
const BENEATH: ResolveFlag =
    ResolveFlag::RESOLVE_BENEATH.union(ResolveFlag::RESOLVE_NO_SYMLINKS).union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

/// Shared between the extractor and the [`Metered`] stream under the tar parser.
#[derive(Default)]
struct Meter {
    /// Decompressed bytes read so far.
    read: Cell<u64>,
    /// Decompressed bytes that may be read in total; moved forward entry by entry.
    limit: Cell<u64>,
    /// Whether a read hit the limit.
    tripped: Cell<bool>,
    /// Whether a read failed below the tar parser: bad gzip data, or the input.
    inner_failed: Cell<bool>,
}

impl Meter {
    fn allow(&self, more: u64) {
        self.limit.set(self.read.get().saturating_add(more));
    }
}

/// The decompressed stream as the tar parser reads it: counted, limited, and with failures of
/// the layers below told apart from tar parse errors.
struct Metered<R> {
    inner: R,
    meter: Rc<Meter>,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.meter.limit.get() - self.meter.read.get();
        if room == 0 && !buf.is_empty() {
            self.meter.tripped.set(true);
            return Err(io::Error::other("decompressed data exceeds its allowance"));
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        match self.inner.read(&mut buf[..want]) {
            Ok(n) => {
                self.meter.read.set(self.meter.read.get() + n as u64);
                Ok(n)
            }
            Err(e) => {
                self.meter.inner_failed.set(true);
                Err(e)
            }
        }
    }
}

/// What makes an entry path unacceptable.
enum PathProblem {
    Absolute,
    DotDot,
}

/// An entry path relative to the install root, after `strip` leading components are dropped
/// (counting `.` as `tar --strip-components` does); `None` if nothing is left.
fn relative(name: &str, strip: usize) -> std::result::Result<Option<String>, PathProblem> {
    if name.starts_with('/') {
        return Err(PathProblem::Absolute);
    }
    let parts: Vec<&str> = name.split('/').filter(|part| !part.is_empty()).collect();
    if parts.contains(&"..") {
        return Err(PathProblem::DotDot);
    }
    let kept: Vec<&str> = parts.into_iter().skip(strip).filter(|part| *part != ".").collect();
    Ok((!kept.is_empty()).then(|| kept.join("/")))
}

/// Reads until `buf` is full or the input ends, for whole-chunk hashing and writing.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

pub(super) fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor a syscall just returned and nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// One package entry on its way into the image.
struct Item {
    /// The name as it appears in the package, for messages.
    name: String,
    /// Path relative to the install root.
    rel: String,
    /// Absolute path in the image.
    path: String,
    mode: u32,
    mtime: TimeSpec,
}

impl Item {
    /// The parent directory relative to the install root, and the final component.
    fn split(&self) -> (&str, &str) {
        self.rel.rsplit_once('/').unwrap_or(("", &self.rel))
    }

    fn manifest(&self, kind: EntryKind, size: u64) -> ManifestEntry {
        ManifestEntry { path: self.path.clone(), kind, size, mode: self.mode, sha256: None, target: None }
    }
}

pub(super) struct Extractor<'a> {
    opts: &'a InstallOptions,
    cancel: &'a AtomicBool,
    package: &'a str,
    install_dir: Rc<OwnedFd>,
    /// The install root's normalized image path without a trailing slash ("" for "/").
    prefix: String,
    meter: Rc<Meter>,
    /// Consecutive entries usually share a directory. Directories are never removed, so a
    /// cached descriptor stays the directory at that path.
    last_dir: Option<(String, Rc<OwnedFd>)>,
    /// Regular files this package has extracted (relative paths): the valid hard link targets.
    files: HashSet<String>,
    manifest: BTreeMap<String, ManifestEntry>,
    /// Directory mtimes, applied at the end since adding entries changes them.
    dir_times: Vec<(String, String, TimeSpec)>,
    expanded: u64,
    /// Name of the entry being or last processed, for messages about what follows it.
    last: Option<String>,
    buf: Vec<u8>,
    /// The compression, for messages about bad data.
    format: &'static str,
}

impl<'a> Extractor<'a> {
    pub(super) fn new(
        install_dir: OwnedFd,
        opts: &'a InstallOptions,
        cancel: &'a AtomicBool,
        package: &'a str,
    ) -> Self {
        Self {
            opts,
            cancel,
            package,
            install_dir: Rc::new(install_dir),
            prefix: opts
                .install_root
                .split('/')
                .filter(|part| !part.is_empty() && *part != ".")
                .map(|part| format!("/{part}"))
                .collect(),
            meter: Rc::default(),
            last_dir: None,
            files: HashSet::new(),
            manifest: BTreeMap::new(),
            dir_times: Vec::new(),
            expanded: 0,
            last: None,
            buf: vec![0; CHUNK_SIZE],
            format: "gzip",
        }
    }

    /// Unpacks every entry of a `.tar.gz` or `.tar.zst`, then drains the input so that the
    /// reader thread hashes all of it. Returns the manifest and the expanded size.
    pub(super) fn run(mut self, input: super::source::Chunks<'_>, kind: Kind) -> Result<(Vec<ManifestEntry>, u64)> {
        let package = self.package;
        let decompressed: Box<dyn Read + '_> = match kind {
            Kind::TarZst => {
                self.format = "zstd";
                let frame = StreamingDecoder::new(input)
                    .map_err(|e| decompression_error(package, "zstd", io::Error::new(io::ErrorKind::InvalidData, e)))?;
                Box::new(ZstdFrames { decoder: Some(frame) })
            }
            // Multi-member, as gzip and tar accept concatenated members (pigz, bgzip).
            _ => Box::new(MultiGzDecoder::new(input)),
        };
        let mut archive = tar::Archive::new(Metered { inner: decompressed, meter: Rc::clone(&self.meter) });
        self.meter.allow(HEADER_ALLOWANCE);
        let entries = archive.entries().map_err(|e| self.stream_error(e))?;
        for entry in entries {
            ensure!(!self.cancel.load(Ordering::Relaxed), CancelledSnafu);
            let entry = entry.map_err(|e| self.stream_error(e))?;
            // The entry's data, its padding, and the headers of the next entry.
            self.meter.allow(entry.size().saturating_add(HEADER_ALLOWANCE));
            self.entry(entry)?;
        }
        ensure!(self.last.is_some(), EmptyArchiveSnafu { package });
        self.restore_dir_times()?;

        // What follows the end-of-archive marker (padding, usually) still counts against the
        // expansion limit, and is read so that the checksum covers the whole package.
        let remaining = self.opts.max_expanded_bytes.saturating_sub(self.expanded);
        self.meter.allow(remaining.saturating_add(HEADER_ALLOWANCE));
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(|e| {
            if self.meter.tripped.get() {
                ExpansionLimitSnafu {
                    entry: "(data after the end of the archive)",
                    limit: self.opts.max_expanded_bytes,
                }
                .build()
            } else {
                decompression_error(package, self.format, e)
            }
        })?;
        Ok((self.manifest.into_values().collect(), self.expanded))
    }

    /// Names what went wrong when reading the decompressed stream failed.
    fn stream_error(&self, e: io::Error) -> Error {
        let package = self.package;
        if self.meter.tripped.get() {
            let after = self.last.clone().unwrap_or_else(|| "(none yet)".to_string());
            OversizedHeadersSnafu { package, after }.build()
        } else if self.meter.inner_failed.get() {
            decompression_error(package, self.format, e)
        } else if let Some(after) = &self.last {
            Error::CorruptTar { package: package.to_string(), after: after.clone(), source: e }
        } else {
            Error::NotTar { package: package.to_string(), source: e }
        }
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let name = String::from_utf8(entry.path_bytes().into_owned()).map_err(|e| {
            let entry = String::from_utf8_lossy(e.as_bytes()).into_owned();
            NonUtf8PathSnafu { entry }.build()
        })?;
        self.last = Some(name.clone());

        // Checked before anything is written, so a bomb fails up front.
        let size = entry.size();
        let limit = self.opts.max_expanded_bytes;
        self.expanded = self
            .expanded
            .checked_add(size)
            .filter(|total| *total <= limit)
            .context(ExpansionLimitSnafu { entry: &name, limit })?;

        let header = entry.header();
        let kind = header.entry_type();
        if kind == EntryType::XGlobalHeader {
            // Archive-wide pax metadata, not a file; the tar crate skips its data.
            return Ok(());
        }
        let rel = match relative(&name, self.opts.strip_components) {
            Ok(Some(rel)) => rel,
            // Stripped away entirely, as tar does with such entries.
            Ok(None) => return Ok(()),
            Err(PathProblem::Absolute) => return AbsolutePathSnafu { entry: name }.fail(),
            Err(PathProblem::DotDot) => return DotDotPathSnafu { entry: name }.fail(),
        };
        let mode = header.mode().context(BadHeaderSnafu { entry: &name })? & 0o777;
        let mtime = header.mtime().context(BadHeaderSnafu { entry: &name })?;
        let item = Item {
            path: format!("{}/{rel}", self.prefix),
            name,
            rel,
            mode,
            mtime: TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0),
        };

        let installed = match kind {
            EntryType::Regular | EntryType::Continuous => self.file(&mut entry, &item, size)?,
            EntryType::Directory => self.directory(&item)?,
            EntryType::Symlink => {
                let target = self.link_target(&entry, &item)?;
                self.symlink(&item, target)?
            }
            EntryType::Link => {
                let target = self.link_target(&entry, &item)?;
                self.hard_link(&item, target)?
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                ensure!(self.opts.allow_device_nodes, DeviceNodeSnafu { entry: &item.name });
                self.device(&item, kind, header)?
            }
            other => {
                let kind = format!("{other:?} ('{}')", char::from(other.as_byte()));
                return UnsupportedEntrySnafu { entry: item.name, kind }.fail();
            }
        };
        self.manifest.insert(item.path, installed);
        Ok(())
    }

    fn link_target<R: Read>(&self, entry: &tar::Entry<'_, R>, item: &Item) -> Result<String> {
        let target = entry.link_name_bytes().unwrap_or_default().into_owned();
        String::from_utf8(target).ok().context(NonUtf8PathSnafu { entry: &item.name })
    }

    fn file<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, item: &Item, size: u64) -> Result<ManifestEntry> {
        let (dir, name) = item.split();
        let parent = self.parent(dir, item)?;
        self.make_way(&parent, name, item)?;
        let fd = fcntl::openat(
            Some(parent.as_raw_fd()),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .context(self.unpack("create", item))?;
        let mut file = File::from(owned(fd));

        let mut hasher = Sha256::new();
        let mut written = 0;
        loop {
            ensure!(!self.cancel.load(Ordering::Relaxed), CancelledSnafu);
            let n = fill(entry, &mut self.buf).map_err(|e| self.stream_error(e))?;
            if n == 0 {
                break;
            }
            hasher.update(&self.buf[..n]);
            file.write_all(&self.buf[..n]).context(WriteDataSnafu { path: &item.path, entry: &item.name })?;
            written += n as u64;
        }
        ensure!(written == size, TruncatedEntrySnafu { entry: &item.name, expected: size, actual: written });
        self.set_attributes(file.as_fd(), item)?;
        stat::futimens(file.as_raw_fd(), &TimeSpec::UTIME_OMIT, &item.mtime)
            .context(self.unpack("set the mtime of", item))?;
        self.files.insert(item.rel.clone());
        Ok(ManifestEntry { sha256: Some(hex::encode(hasher.finalize())), ..item.manifest(EntryKind::File, written) })
    }

    fn directory(&mut self, item: &Item) -> Result<ManifestEntry> {
        let (dir, name) = item.split();
        let parent = self.parent(dir, item)?;
        let parent_fd = Some(parent.as_raw_fd());
        let open = || {
            fcntl::openat(
                parent_fd,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
        };
        match stat::mkdirat(parent_fd, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e).context(self.unpack("create the directory", item)),
        }
        let fd = match open() {
            Ok(fd) => fd,
            // A file or symlink holds the name; as in tar, the directory replaces it.
            Err(Errno::ENOTDIR | Errno::ELOOP) => {
                self.make_way(&parent, name, item)?;
                stat::mkdirat(parent_fd, name, Mode::from_bits_truncate(0o700))
                    .context(self.unpack("create the directory", item))?;
                open().context(self.unpack("open the directory", item))?
            }
            Err(e) => return Err(e).context(self.unpack("open the directory", item)),
        };
        self.set_attributes(owned(fd).as_fd(), item)?;
        self.dir_times.push((item.rel.clone(), item.name.clone(), item.mtime));
        Ok(item.manifest(EntryKind::Dir, 0))
    }

    fn symlink(&mut self, item: &Item, target: String) -> Result<ManifestEntry> {
        let (dir, name) = item.split();
        let parent = self.parent(dir, item)?;
        self.make_way(&parent, name, item)?;
        let parent_fd = Some(parent.as_raw_fd());
        // The target is only text: never resolved here, so it may point anywhere.
        unistd::symlinkat(target.as_str(), parent_fd, name).context(self.unpack("create the symlink", item))?;
        let (uid, gid) = self.opts.owner;
        unistd::fchownat(
            parent_fd,
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .context(self.unpack("set the owner of", item))?;
        stat::utimensat(parent_fd, name, &TimeSpec::UTIME_OMIT, &item.mtime, UtimensatFlags::NoFollowSymlink)
            .context(self.unpack("set the mtime of", item))?;
        Ok(ManifestEntry { target: Some(target), ..item.manifest(EntryKind::Symlink, 0) })
    }

    fn hard_link(&mut self, item: &Item, target: String) -> Result<ManifestEntry> {
        let refuse = |reason| HardLinkTargetSnafu { entry: &item.name, target: &target, reason }.fail();
        let target_rel = match relative(&target, self.opts.strip_components) {
            Ok(Some(rel)) => rel,
            Ok(None) => return refuse("is stripped away by strip_components"),
            Err(PathProblem::Absolute) => return refuse("is an absolute path"),
            Err(PathProblem::DotDot) => return refuse("has a '..' component"),
        };
        if target_rel == item.rel {
            return refuse("is the link itself");
        }
        if !self.files.contains(&target_rel) && !self.opts.allow_external_hardlinks {
            return refuse("is not a regular file extracted earlier from this package");
        }

        // Resolved beneath the install root without symlinks, so even a file the package did
        // not extract (when allowed) is inside the install root.
        let (target_dir, target_name) = target_rel.rsplit_once('/').unwrap_or((".", &target_rel));
        let Ok(target_parent) =
            rootfs::openat2(self.install_dir.as_fd(), target_dir, OFlag::O_PATH | OFlag::O_DIRECTORY, BENEATH)
        else {
            return refuse("is not reachable beneath the install root without following symlinks");
        };
        let is_file = stat::fstatat(Some(target_parent.as_raw_fd()), target_name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits());
        if !is_file {
            return refuse("is not a regular file beneath the install root");
        }

        let (dir, name) = item.split();
        let parent = self.parent(dir, item)?;
        self.make_way(&parent, name, item)?;
        // linkat without AT_SYMLINK_FOLLOW links the name itself, never a symlink's target.
        unistd::linkat(Some(target_parent.as_raw_fd()), target_name, Some(parent.as_raw_fd()), name, AtFlags::empty())
            .context(self.unpack("create the hard link", item))?;
        self.files.insert(item.rel.clone());
        let target = format!("{}/{target_rel}", self.prefix);
        Ok(ManifestEntry { target: Some(target), ..item.manifest(EntryKind::Hardlink, 0) })
    }

    fn device(&mut self, item: &Item, kind: EntryType, header: &tar::Header) -> Result<ManifestEntry> {
        let file_type = match kind {
            EntryType::Char => SFlag::S_IFCHR,
            EntryType::Block => SFlag::S_IFBLK,
            _ => SFlag::S_IFIFO,
        };
        let device = if file_type == SFlag::S_IFIFO {
            0
        } else {
            let major = header.device_major().context(BadHeaderSnafu { entry: &item.name })?;
            let minor = header.device_minor().context(BadHeaderSnafu { entry: &item.name })?;
            stat::makedev(major.unwrap_or(0).into(), minor.unwrap_or(0).into())
        };

        let (dir, name) = item.split();
        let parent = self.parent(dir, item)?;
        self.make_way(&parent, name, item)?;
        let parent_fd = Some(parent.as_raw_fd());
        stat::mknodat(parent_fd, name, file_type, Mode::from_bits_truncate(0o600), device)
            .context(self.unpack("create the device node", item))?;
        let (uid, gid) = self.opts.owner;
        unistd::fchownat(
            parent_fd,
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .context(self.unpack("set the owner of", item))?;
        // Opening a device to fchmod it could have side effects; the name is the node just
        // made (Linux cannot chmod a symlink itself anyway).
        stat::fchmodat(parent_fd, name, Mode::from_bits_truncate(item.mode), FchmodatFlags::FollowSymlink)
            .context(self.unpack("set the mode of", item))?;
        stat::utimensat(parent_fd, name, &TimeSpec::UTIME_OMIT, &item.mtime, UtimensatFlags::NoFollowSymlink)
            .context(self.unpack("set the mtime of", item))?;
        Ok(item.manifest(EntryKind::Device, 0))
    }

    /// The directory `dir` (relative to the install root), created as needed, reached without
    /// following any symlink.
    fn parent(&mut self, dir: &str, item: &Item) -> Result<Rc<OwnedFd>> {
        if dir.is_empty() {
            return Ok(Rc::clone(&self.install_dir));
        }
        if let Some((cached, fd)) = &self.last_dir {
            if cached == dir {
                return Ok(Rc::clone(fd));
            }
        }
        let fd = match rootfs::openat2(self.install_dir.as_fd(), dir, OFlag::O_PATH | OFlag::O_DIRECTORY, BENEATH) {
            Ok(fd) => fd,
            // Walk it to create what is missing or to name what is in the way.
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => self.walk(dir, item)?,
            Err(e) => return Err(e).context(self.unpack_dir("open the directory", dir, item)),
        };
        let fd = Rc::new(fd);
        self.last_dir = Some((dir.to_string(), Rc::clone(&fd)));
        Ok(fd)
    }

    fn walk(&self, dir: &str, item: &Item) -> Result<OwnedFd> {
        let (uid, gid) = self.opts.owner;
        let mut current: Option<OwnedFd> = None;
        let mut end = 0;
        for part in dir.split('/') {
            end += part.len();
            let prefix = &dir[..end];
            end += 1;
            let at = current.as_ref().map_or(self.install_dir.as_fd(), |fd| fd.as_fd());
            let next = match rootfs::openat2(at, part, OFlag::O_PATH | OFlag::O_DIRECTORY, BENEATH) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => rootfs::create_dir(at, part, 0o755, uid, gid).context(self.unpack_dir(
                    "create the directory",
                    prefix,
                    item,
                ))?,
                Err(Errno::ELOOP) => {
                    let symlink = format!("{}/{prefix}", self.prefix);
                    return SymlinkInPathSnafu { entry: &item.name, symlink }.fail();
                }
                Err(Errno::ENOTDIR) => {
                    let path = format!("{}/{prefix}", self.prefix);
                    return NotADirectorySnafu { entry: &item.name, path }.fail();
                }
                Err(e) => return Err(e).context(self.unpack_dir("open the directory", prefix, item)),
            };
            current = Some(next);
        }
        Ok(current.expect("entry directories have at least one component"))
    }

    /// Removes whatever non-directory holds `name`: as in tar, a later entry replaces an
    /// earlier file or symlink instead of writing through it. Directories are never replaced.
    fn make_way(&mut self, parent: &OwnedFd, name: &str, item: &Item) -> Result<()> {
        match unistd::unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {
                self.files.remove(&item.rel);
                Ok(())
            }
            Err(Errno::EISDIR) => ReplacesDirectorySnafu { entry: &item.name, path: &item.path }.fail(),
            Err(e) => Err(e).context(self.unpack("remove the existing", item)),
        }
    }

    /// Owner, then mode: chown clears setuid/setgid bits (which are stripped anyway).
    fn set_attributes(&self, fd: BorrowedFd<'_>, item: &Item) -> Result<()> {
        let (uid, gid) = self.opts.owner;
        unistd::fchown(fd.as_raw_fd(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .context(self.unpack("set the owner of", item))?;
        stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(item.mode)).context(self.unpack("set the mode of", item))
    }

    fn restore_dir_times(&self) -> Result<()> {
        for (rel, name, mtime) in &self.dir_times {
            let context = |action| UnpackSnafu { action, path: format!("{}/{rel}", self.prefix), entry: name.as_str() };
            let fd = rootfs::openat2(self.install_dir.as_fd(), rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, BENEATH)
                .context(context("open the directory"))?;
            stat::futimens(fd.as_raw_fd(), &TimeSpec::UTIME_OMIT, mtime).context(context("set the mtime of"))?;
        }
        Ok(())
    }

    fn unpack<'b>(&self, action: &'static str, item: &'b Item) -> UnpackSnafu<&'static str, &'b str, &'b str> {
        UnpackSnafu { action, path: item.path.as_str(), entry: item.name.as_str() }
    }

    fn unpack_dir<'b>(
        &self,
        action: &'static str,
        dir: &str,
        item: &'b Item,
    ) -> UnpackSnafu<&'static str, String, &'b str> {
        UnpackSnafu { action, path: format!("{}/{dir}", self.prefix), entry: item.name.as_str() }
    }
}

/// Every frame of a zstd stream in turn: zstd writes one, concatenated `.zst` files hold
/// several. (pzstd's skippable frames are refused as corrupt data.)
struct ZstdFrames<R: BufRead> {
    decoder: Option<StreamingDecoder<R, FrameDecoder>>,
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(decoder) = self.decoder.as_mut() else { return Ok(0) };
            let n = decoder.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // This frame is done; another follows unless the input ends here.
            let (mut source, frame) = self.decoder.take().expect("checked above").into_parts();
            if source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            let next = StreamingDecoder::new_with_decoder(source, frame);
            self.decoder = Some(next.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?);
        }
    }
}

/// A failure of the decompressor (or of the input under it), named.
fn decompression_error(package: &str, format: &'static str, source: io::Error) -> Error {
    let package = package.to_string();
    if source.kind() == io::ErrorKind::UnexpectedEof {
        Error::Truncated { package, format, source }
    } else {
        Error::Corrupt { package, format, source }
    }
}
