//! Installs a `.tar.gz` application package into an image, streaming it: the package is never
//! held whole in memory or on disk, so memory use does not grow with package size.
//!
//! A reader thread pulls the raw package in chunks and hashes it, while the calling thread
//! decompresses and unpacks; a bounded channel between them caps memory at a few chunks.
//! Unpacking is our own, not the tar crate's: every entry lands beneath the install root with
//! no symlink followed on the way (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), whatever the image
//! or the package contains. The package's checksum is known only at the end; on a mismatch the
//! caller discards the whole volume, so what was written by then does no harm.

use crate::rootfs::{self, RootDir};
use flate2::bufread::MultiGzDecoder;
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag, ResolveFlag};
use nix::sys::stat::{self, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{self, Gid, Uid, UnlinkatFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use snafu::{ensure, OptionExt, ResultExt, Snafu};
use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread;
use std::time::Duration;
use tar::EntryType;

/// Unit of reading, hashing and writing: large enough for throughput, small enough that the
/// few chunks in flight stay well under the memory budget.
const CHUNK_SIZE: usize = 256 * 1024;
/// Chunks queued between the reader thread and the extractor.
const CHANNEL_DEPTH: usize = 4;
/// Decompressed bytes allowed between one entry's data and the next entry: padding, headers,
/// GNU long names and pax records. The tar crate buffers long names and pax records whole, so
/// this is what bounds the memory a hostile package can make it use.
const HEADER_ALLOWANCE: u64 = 1024 * 1024;
/// A checksum file holds one digest and a name; anything bigger is not one.
const SIDECAR_LIMIT: u64 = 64 * 1024;
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Per read, so a stalled server fails the bake instead of hanging it.
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Entries are resolved beneath the install root and never through a symlink.
const BENEATH: ResolveFlag =
    ResolveFlag::RESOLVE_BENEATH.union(ResolveFlag::RESOLVE_NO_SYMLINKS).union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("cannot open package {path}: {source}"))]
    OpenFile { path: String, source: io::Error },

    #[snafu(display("cannot download {url}: {source}"))]
    Http { url: String, source: Box<ureq::Error> },

    #[snafu(display("cannot read checksum file {path}: {source}"))]
    ReadSidecar { path: String, source: io::Error },

    #[snafu(display("checksum file {path} does not start with a 64-digit hex SHA-256"))]
    BadSidecar { path: String },

    #[snafu(display("expected package SHA-256 '{expected}' is not 64 hex digits"))]
    BadExpectedChecksum { expected: String },

    #[snafu(display("cannot open install root {path}: {source}"))]
    InstallRoot { path: String, source: rootfs::Error },

    #[snafu(display("reading package {package} failed: {source}"))]
    ReadSource { package: String, source: io::Error },

    #[snafu(display("package {package} is not gzip-compressed (it lacks the gzip magic number)"))]
    NotGzip { package: String },

    #[snafu(display("package {package} is truncated: its gzip stream ends early ({source})"))]
    TruncatedGzip { package: String, source: io::Error },

    #[snafu(display("package {package} has corrupt gzip data: {source}"))]
    CorruptGzip { package: String, source: io::Error },

    #[snafu(display("package {package} is not a tar archive: {source}"))]
    NotTar { package: String, source: io::Error },

    #[snafu(display("package {package} has a corrupt tar header after entry '{after}': {source}"))]
    CorruptTar { package: String, after: String, source: io::Error },

    #[snafu(display("package {package} has over {HEADER_ALLOWANCE} bytes of tar headers after entry '{after}'"))]
    OversizedHeaders { package: String, after: String },

    #[snafu(display("package {package} contains no entries"))]
    EmptyArchive { package: String },

    #[snafu(display("entry '{entry}' has an unreadable header field: {source}"))]
    BadHeader { entry: String, source: io::Error },

    #[snafu(display("entry '{entry}' is truncated: {actual} of its {expected} bytes are present"))]
    TruncatedEntry { entry: String, expected: u64, actual: u64 },

    #[snafu(display("entry '{entry}' has a name or link target that is not UTF-8"))]
    NonUtf8Path { entry: String },

    #[snafu(display("entry '{entry}' has an absolute path; package paths must be relative"))]
    AbsolutePath { entry: String },

    #[snafu(display("entry '{entry}' has a '..' component"))]
    DotDotPath { entry: String },

    #[snafu(display("entry '{entry}' lies beneath {symlink}, a symlink, which is never followed"))]
    SymlinkInPath { entry: String, symlink: String },

    #[snafu(display("entry '{entry}' lies beneath {path}, which is not a directory"))]
    NotADirectory { entry: String, path: String },

    #[snafu(display("entry '{entry}' would replace the directory {path}"))]
    ReplacesDirectory { entry: String, path: String },

    #[snafu(display("entry '{entry}' is a hard link to '{target}', which {reason}"))]
    HardLinkTarget { entry: String, target: String, reason: &'static str },

    #[snafu(display("entry '{entry}' is a device node or FIFO, which this package may not create"))]
    DeviceNode { entry: String },

    #[snafu(display("entry '{entry}' has unsupported type {kind}"))]
    UnsupportedEntry { entry: String, kind: String },

    #[snafu(display("package expands past the limit of {limit} bytes at entry '{entry}'"))]
    ExpansionLimit { entry: String, limit: u64 },

    #[snafu(display("cannot {action} {path} for entry '{entry}': {source}"))]
    Unpack { action: &'static str, path: String, entry: String, source: Errno },

    #[snafu(display("cannot write {path} for entry '{entry}': {source}"))]
    WriteData { path: String, entry: String, source: io::Error },

    #[snafu(display("package SHA-256 is {actual}, expected {expected}"))]
    ChecksumMismatch { expected: String, actual: String },

    #[snafu(display("package installation was cancelled"))]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where and how a package is installed.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Absolute path inside the image, e.g. `/var/lib/tomcat10/webapps`.
    pub install_root: String,
    /// uid and gid that every installed entry (and any directory created for it) is given.
    pub owner: (u32, u32),
    /// Leading path components dropped from entry names, as `tar --strip-components` does.
    pub strip_components: usize,
    /// Bound on the sum of entry sizes, against gzip bombs.
    pub max_expanded_bytes: u64,
    pub allow_device_nodes: bool,
    /// Allow hard links to files under the install root that this package did not extract.
    pub allow_external_hardlinks: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    /// Character or block device, or FIFO.
    Device,
}

/// One installed entry, as it ends up in the image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ManifestEntry {
    /// Absolute path in the image.
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits as installed (setuid, setgid and sticky are always cleared).
    pub mode: u32,
    /// Content digest, for regular files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Link target as stored in the package: a symlink's text, or a hard link's image path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone)]
pub struct InstallReport {
    pub package_sha256: String,
    pub compressed_bytes: u64,
    /// Sum of the sizes of the package's entries.
    pub expanded_bytes: u64,
    /// Sorted by path; an entry repeated in the package appears once, as it was last written.
    pub entries: Vec<ManifestEntry>,
}

/// An opened package, not yet read.
pub struct PackageSource {
    pub reader: Box<dyn Read + Send>,
    /// Size in bytes, when known up front (for progress bars).
    pub len: Option<u64>,
    /// The package's path or URL, for messages.
    pub display: String,
}

/// Opens a package given as a local path or an `http(s)://` URL.
pub fn open_source(spec: &str) -> Result<PackageSource> {
    if is_url(spec) {
        let response = agent().get(spec).call().map_err(Box::new).context(HttpSnafu { url: spec })?;
        let len = response.header("Content-Length").and_then(|len| len.parse().ok());
        return Ok(PackageSource { reader: response.into_reader(), len, display: spec.to_string() });
    }
    let file = File::open(spec).context(OpenFileSnafu { path: spec })?;
    let metadata = file.metadata().context(OpenFileSnafu { path: spec })?;
    Ok(PackageSource {
        reader: Box::new(file),
        len: metadata.is_file().then_some(metadata.len()),
        display: spec.to_string(),
    })
}

/// The digest published beside a package as `<spec>.sha256` (as `sha256sum` writes it), in
/// lowercase; `None` when there is no such file.
pub fn sidecar_sha256(spec: &str) -> Result<Option<String>> {
    let path = format!("{spec}.sha256");
    let reader: Box<dyn Read> = if is_url(spec) {
        match agent().get(&path).call() {
            Ok(response) => response.into_reader(),
            Err(ureq::Error::Status(404, _)) => return Ok(None),
            Err(e) => return Err(Box::new(e)).context(HttpSnafu { url: path }),
        }
    } else {
        match File::open(&path) {
            Ok(file) => Box::new(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context(ReadSidecarSnafu { path }),
        }
    };
    let mut text = String::new();
    reader.take(SIDECAR_LIMIT).read_to_string(&mut text).context(ReadSidecarSnafu { path: &path })?;
    let digest =
        text.split_whitespace().next().filter(|token| is_sha256(token)).context(BadSidecarSnafu { path: &path })?;
    Ok(Some(digest.to_ascii_lowercase()))
}

/// Streams the package from `source` into `root` under `opts.install_root`, verifying that the
/// whole package hashes to `expected_sha256`. `progress` is called with the compressed bytes
/// read so far; setting `cancel` stops the install with [`Error::Cancelled`].
pub fn install(
    source: PackageSource,
    root: &RootDir,
    expected_sha256: &str,
    opts: &InstallOptions,
    cancel: &AtomicBool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<InstallReport> {
    ensure!(is_sha256(expected_sha256), BadExpectedChecksumSnafu { expected: expected_sha256 });
    let (uid, gid) = opts.owner;
    let install_dir = root
        .open_dir(&opts.install_root, Some((0o755, uid, gid)))
        .context(InstallRootSnafu { path: &opts.install_root })?;
    let package = source.display;
    let reader = source.reader;

    let (sender, receiver) = mpsc::sync_channel(CHANNEL_DEPTH);
    let (extracted, pumped) = thread::scope(|scope| {
        let pump = scope.spawn(move || pump(reader, sender, cancel, progress));
        let chunks = Chunks { receiver, chunk: Vec::new(), pos: 0, cancel };
        // The extractor owns (and on return drops) the receiving end, which stops a reader
        // blocked on a full channel.
        let extracted = Extractor::new(install_dir, opts, cancel, &package).run(chunks);
        let pumped = pump.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (extracted, pumped)
    });

    // Cancellation surfaces as whatever broke first (often an early end of input), so it is
    // checked before the error itself.
    ensure!(!cancel.load(Ordering::Relaxed), CancelledSnafu);
    // A failed read ends the input early too; its error is the real cause.
    let (package_sha256, compressed_bytes) = pumped.context(ReadSourceSnafu { package: &package })?;
    let (entries, expanded_bytes) = extracted?;
    ensure!(
        package_sha256.eq_ignore_ascii_case(expected_sha256),
        ChecksumMismatchSnafu { expected: expected_sha256.to_ascii_lowercase(), actual: &package_sha256 }
    );
    tracing::debug!(package, entries = entries.len(), compressed_bytes, expanded_bytes, "installed package");
    Ok(InstallReport { package_sha256, compressed_bytes, expanded_bytes, entries })
}

fn is_url(spec: &str) -> bool {
    spec.starts_with("http://") || spec.starts_with("https://")
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(HTTP_CONNECT_TIMEOUT).timeout_read(HTTP_READ_TIMEOUT).build()
}

/// The reader thread: reads the raw package in chunks, hashing and counting it, until the end
/// of input, cancellation, or the extractor hanging up. Returns the digest and byte count.
fn pump(
    mut reader: Box<dyn Read + Send>,
    sender: SyncSender<Vec<u8>>,
    cancel: &AtomicBool,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut total = 0;
    while !cancel.load(Ordering::Relaxed) {
        // Whole chunks even from a network stream that returns a few KiB per read.
        let mut chunk = Vec::with_capacity(CHUNK_SIZE);
        (&mut reader).take(CHUNK_SIZE as u64).read_to_end(&mut chunk)?;
        if chunk.is_empty() {
            break;
        }
        hasher.update(&chunk);
        total += chunk.len() as u64;
        progress(total);
        if sender.send(chunk).is_err() {
            // The extractor stopped; its error is the one to report.
            break;
        }
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// The extractor's view of the reader thread's chunks: a buffered reader that ends when the
/// reader thread does, and fails once `cancel` is set.
struct Chunks<'a> {
    receiver: Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    cancel: &'a AtomicBool,
}

impl BufRead for Chunks<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.chunk.len() {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(io::Error::other("cancelled"));
            }
            match self.receiver.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                // The reader thread is done: end of input.
                Err(_) => break,
            }
        }
        Ok(&self.chunk[self.pos..])
    }

    fn consume(&mut self, amount: usize) {
        self.pos += amount;
    }
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

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

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
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

struct Extractor<'a> {
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
}

impl<'a> Extractor<'a> {
    fn new(install_dir: OwnedFd, opts: &'a InstallOptions, cancel: &'a AtomicBool, package: &'a str) -> Self {
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
        }
    }

    /// Unpacks every entry, then drains the input so that the reader thread hashes all of it.
    /// Returns the manifest and the expanded size.
    fn run(mut self, mut input: Chunks<'_>) -> Result<(Vec<ManifestEntry>, u64)> {
        let package = self.package;
        // Only fails when cancelled, which the caller reports.
        let head = input.fill_buf().context(ReadSourceSnafu { package })?;
        ensure!(head.starts_with(&[0x1f, 0x8b]), NotGzipSnafu { package });

        // Multi-member, as gzip and tar accept concatenated members (pigz, bgzip).
        let mut archive =
            tar::Archive::new(Metered { inner: MultiGzDecoder::new(input), meter: Rc::clone(&self.meter) });
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
                gzip_error(package, e)
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
            gzip_error(package, e)
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

fn gzip_error(package: &str, source: io::Error) -> Error {
    let package = package.to_string();
    if source.kind() == io::ErrorKind::UnexpectedEof {
        Error::TruncatedGzip { package, source }
    } else {
        Error::CorruptGzip { package, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::fs;
    use std::io::BufReader;
    use std::net::TcpListener;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::{Path, PathBuf};
    use tar::Header;

    const MTIME: u64 = 1_600_000_000;

    /// An image root inside a parent directory (so that anything written outside the root
    /// shows up there), and a separate directory for packages.
    struct Image {
        parent: tempfile::TempDir,
        root_path: PathBuf,
        root: RootDir,
        packages: tempfile::TempDir,
    }

    fn image() -> Image {
        let parent = tempfile::tempdir().unwrap();
        let root_path = parent.path().join("root");
        fs::create_dir(&root_path).unwrap();
        let root = RootDir::open(&root_path).unwrap();
        Image { parent, root_path, root, packages: tempfile::tempdir().unwrap() }
    }

    impl Image {
        fn install(&self, package: &[u8], opts: &InstallOptions) -> Result<InstallReport> {
            self.install_with(package, &sha256(package), opts, &AtomicBool::new(false), &|_| {})
        }

        fn install_with(
            &self,
            package: &[u8],
            expected: &str,
            opts: &InstallOptions,
            cancel: &AtomicBool,
            progress: &(dyn Fn(u64) + Sync),
        ) -> Result<InstallReport> {
            let path = self.packages.path().join("package.tar.gz");
            fs::write(&path, package).unwrap();
            let source = open_source(path.to_str().unwrap()).unwrap();
            install(source, &self.root, expected, opts, cancel, progress)
        }

        fn app(&self) -> PathBuf {
            self.root_path.join("opt/app")
        }

        /// Nothing but the root in its parent, and `outside` (a decoy) untouched.
        fn assert_contained(&self) {
            let names: Vec<_> = fs::read_dir(self.parent.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(names, ["root"], "something was written outside the image root");
        }

        /// An absolute host path outside the root that evil entries aim at.
        fn outside(&self) -> String {
            self.parent.path().join("outside").to_str().unwrap().to_string()
        }
    }

    fn options() -> InstallOptions {
        InstallOptions {
            install_root: "/opt/app".to_string(),
            owner: (1234, 5678),
            strip_components: 0,
            max_expanded_bytes: 1 << 30,
            allow_device_nodes: false,
            allow_external_hardlinks: false,
        }
    }

    fn sha256(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// Deterministic incompressible-ish bytes.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// Builds a .tar.gz with headers written by hand, so that evil names get through as-is.
    struct Package(tar::Builder<GzEncoder<Vec<u8>>>);

    impl Package {
        fn new() -> Self {
            Self(tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast())))
        }

        fn raw(mut self, kind: EntryType, name: &str, link: &str, mode: u32, data: &[u8]) -> Self {
            let mut header = Header::new_gnu();
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            header.set_mode(mode);
            header.set_mtime(MTIME);
            header.set_cksum();
            self.0.append(&header, data).unwrap();
            self
        }

        fn file(self, name: &str, data: &[u8]) -> Self {
            self.raw(EntryType::Regular, name, "", 0o644, data)
        }

        fn dir(self, name: &str) -> Self {
            self.raw(EntryType::Directory, name, "", 0o755, b"")
        }

        fn symlink(self, name: &str, target: &str) -> Self {
            self.raw(EntryType::Symlink, name, target, 0o777, b"")
        }

        fn hard_link(self, name: &str, target: &str) -> Self {
            self.raw(EntryType::Link, name, target, 0o644, b"")
        }

        fn finish(self) -> Vec<u8> {
            self.0.into_inner().unwrap().finish().unwrap()
        }
    }

    fn entry<'a>(report: &'a InstallReport, path: &str) -> &'a ManifestEntry {
        report.entries.iter().find(|e| e.path == path).unwrap_or_else(|| panic!("no {path}"))
    }

    #[test]
    fn installs_files_dirs_and_links_with_owner_mode_and_manifest() {
        let image = image();
        let jar = noise(3 * CHUNK_SIZE + 123, 1);
        let long_name = format!("./pkg/{}/deep.txt", "d".repeat(120));
        let mut package = Package::new()
            .dir("./pkg/")
            .raw(EntryType::Directory, "./pkg/bin/", "", 0o750, b"")
            .raw(EntryType::Regular, "./pkg/bin/run.sh", "", 0o4755, b"#!/bin/sh\n")
            .file("./pkg/lib/app.jar", &jar)
            .symlink("./pkg/current", "lib/app.jar")
            .hard_link("./pkg/lib/same.jar", "./pkg/lib/app.jar")
            .file("./pkg/twice", b"first")
            .file("./pkg/twice", b"second");
        // A name too long for the header: the tar crate adds a GNU long-name entry.
        let mut header = Header::new_gnu();
        header.set_size(4);
        header.set_mode(0o600);
        header.set_mtime(MTIME);
        package.0.append_data(&mut header, &long_name, &b"deep"[..]).unwrap();
        let package = package.finish();

        let opts = InstallOptions { strip_components: 2, ..options() };
        let seen = std::sync::Mutex::new(Vec::new());
        let report = image
            .install_with(&package, &sha256(&package).to_uppercase(), &opts, &AtomicBool::new(false), &|n| {
                seen.lock().unwrap().push(n)
            })
            .unwrap();

        assert_eq!(report.package_sha256, sha256(&package));
        assert_eq!(report.compressed_bytes, package.len() as u64);
        assert_eq!(seen.lock().unwrap().last(), Some(&(package.len() as u64)));
        assert_eq!(report.expanded_bytes, (10 + jar.len() + 5 + 6 + 4) as u64);
        let paths: Vec<&str> = report.entries.iter().map(|e| e.path.as_str()).collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
        let deep = format!("/opt/app/{}/deep.txt", "d".repeat(120));
        assert_eq!(
            sorted,
            [
                "/opt/app/bin",
                "/opt/app/bin/run.sh",
                "/opt/app/current",
                deep.as_str(),
                "/opt/app/lib/app.jar",
                "/opt/app/lib/same.jar",
                "/opt/app/twice",
            ]
        );

        let app = image.app();
        let jar_entry = entry(&report, "/opt/app/lib/app.jar");
        assert_eq!(jar_entry.kind, EntryKind::File);
        assert_eq!(jar_entry.sha256.as_deref(), Some(sha256(&jar).as_str()));
        assert_eq!(jar_entry.size, jar.len() as u64);
        assert_eq!(fs::read(app.join("lib/app.jar")).unwrap(), jar);
        let twice = entry(&report, "/opt/app/twice");
        assert_eq!(twice.sha256.as_deref(), Some(sha256(b"second").as_str()));
        assert_eq!(fs::read(app.join("twice")).unwrap(), b"second");
        assert_eq!(fs::read(app.join(&deep[9..])).unwrap(), b"deep");

        let run = fs::metadata(app.join("bin/run.sh")).unwrap();
        assert_eq!(run.mode() & 0o7777, 0o755, "setuid must be stripped");
        assert_eq!(entry(&report, "/opt/app/bin/run.sh").mode, 0o755);
        assert_eq!(run.mtime(), MTIME as i64);
        let bin = fs::metadata(app.join("bin")).unwrap();
        assert_eq!((bin.mode() & 0o7777, bin.mtime()), (0o750, MTIME as i64));

        let link = entry(&report, "/opt/app/current");
        assert_eq!((link.kind, link.target.as_deref()), (EntryKind::Symlink, Some("lib/app.jar")));
        assert_eq!(fs::read_link(app.join("current")).unwrap(), Path::new("lib/app.jar"));
        let hard = entry(&report, "/opt/app/lib/same.jar");
        assert_eq!((hard.kind, hard.target.as_deref()), (EntryKind::Hardlink, Some("/opt/app/lib/app.jar")));
        assert_eq!(
            fs::metadata(app.join("lib/same.jar")).unwrap().ino(),
            fs::metadata(app.join("lib/app.jar")).unwrap().ino()
        );

        // Everything, including directories made implicitly and the install root, is owned
        // by the owner.
        for path in ["", "bin", "bin/run.sh", "lib", "lib/app.jar", "current", "twice", &deep[9..]] {
            let meta = fs::symlink_metadata(app.join(path)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "{path}");
        }
        assert_eq!(fs::metadata(app.join("lib")).unwrap().mode() & 0o7777, 0o755);

        let json = serde_json::to_value(link).unwrap();
        assert_eq!(json["kind"], "symlink");
        assert!(json.get("sha256").is_none());
        image.assert_contained();
    }

    #[test]
    fn later_entries_replace_symlinks_instead_of_writing_through_them() {
        let image = image();
        let outside = image.outside();
        let package = Package::new()
            .symlink("conf", &outside)
            .file("conf", b"mine")
            .symlink("dir", &outside)
            .dir("dir/")
            .finish();
        let report = image.install(&package, &options()).unwrap();
        assert_eq!(fs::read(image.app().join("conf")).unwrap(), b"mine");
        assert!(fs::symlink_metadata(image.app().join("dir")).unwrap().is_dir());
        assert_eq!(entry(&report, "/opt/app/conf").kind, EntryKind::File);
        image.assert_contained();
    }

    #[test]
    fn wrong_checksum_is_reported_with_both_digests() {
        let image = image();
        let package = Package::new().file("a", b"a").finish();
        let wrong = "0".repeat(64);
        let err = image.install_with(&package, &wrong, &options(), &AtomicBool::new(false), &|_| {}).unwrap_err();
        match err {
            Error::ChecksumMismatch { expected, actual } => {
                assert_eq!((expected, actual), (wrong, sha256(&package)));
            }
            other => panic!("{other}"),
        }
        let err = image.install_with(&package, "abc", &options(), &AtomicBool::new(false), &|_| {}).unwrap_err();
        assert!(matches!(err, Error::BadExpectedChecksum { .. }), "{err}");
        image.assert_contained();
    }

    #[test]
    fn truncated_gzip_is_reported() {
        let image = image();
        let package = Package::new().file("a", &noise(100_000, 2)).finish();
        let err = image.install(&package[..package.len() / 2], &options()).unwrap_err();
        assert!(matches!(err, Error::TruncatedGzip { .. }), "{err}");
        image.assert_contained();
    }

    #[test]
    fn non_gzip_and_non_tar_packages_are_reported() {
        let image = image();
        let err = image.install(b"just some text", &options()).unwrap_err();
        assert!(matches!(err, Error::NotGzip { .. }), "{err}");
        let err = image.install(b"", &options()).unwrap_err();
        assert!(matches!(err, Error::NotGzip { .. }), "{err}");

        let mut text = GzEncoder::new(Vec::new(), Compression::fast());
        text.write_all(&b"lorem ipsum dolor sit amet ".repeat(100)).unwrap();
        let err = image.install(&text.finish().unwrap(), &options()).unwrap_err();
        assert!(matches!(err, Error::NotTar { .. }), "{err}");

        let err = image.install(&Package::new().finish(), &options()).unwrap_err();
        assert!(matches!(err, Error::EmptyArchive { .. }), "{err}");
        image.assert_contained();
    }

    #[test]
    fn corrupt_and_truncated_tar_data_is_reported() {
        let image = image();
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o644);
        header.set_mtime(MTIME);
        tar.append_data(&mut header, "ok", &b"abc"[..]).unwrap();
        let mut bytes = tar.into_inner().unwrap();
        let gzip = |bytes: &[u8]| {
            let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
            encoder.write_all(bytes).unwrap();
            encoder.finish().unwrap()
        };

        // Garbage where the next header (or the end-of-archive blocks) should be.
        let mut garbage = bytes[..1024].to_vec();
        garbage.extend_from_slice(&[b'x'; 512]);
        let err = image.install(&gzip(&garbage), &options()).unwrap_err();
        assert!(matches!(&err, Error::CorruptTar { after, .. } if after == "ok"), "{err}");

        // A valid gzip stream of a tar that stops inside an entry's data.
        let mut header = Header::new_gnu();
        header.set_size(10_000);
        header.set_mode(0o644);
        header.set_mtime(MTIME);
        let mut tar = tar::Builder::new(Vec::new());
        tar.append_data(&mut header, "big", &vec![7u8; 10_000][..]).unwrap();
        bytes = tar.into_inner().unwrap();
        let err = image.install(&gzip(&bytes[..3000]), &options()).unwrap_err();
        assert!(matches!(err, Error::TruncatedEntry { expected: 10_000, actual: 2488, .. }), "{err}");
        image.assert_contained();
    }

    #[test]
    fn dot_dot_and_absolute_entries_are_refused() {
        let image = image();
        for name in ["../escape", "a/../../escape", "ok/.."] {
            let package = Package::new().file(name, b"x").finish();
            let err = image.install(&package, &options()).unwrap_err();
            assert!(matches!(err, Error::DotDotPath { .. }), "{name}: {err}");
        }
        let absolute = format!("{}/abs", image.outside());
        for name in ["/etc/bakery-absolute-test", absolute.as_str()] {
            let package = Package::new().file(name, b"x").finish();
            let err = image.install(&package, &options()).unwrap_err();
            assert!(matches!(err, Error::AbsolutePath { .. }), "{name}: {err}");
        }
        assert!(!Path::new("/etc/bakery-absolute-test").exists());
        image.assert_contained();
    }

    #[test]
    fn entries_through_symlinks_are_refused() {
        let image = image();
        let outside = image.outside();
        let cases = [
            Package::new().dir("app/").symlink("app/link", &outside).file("app/link/pwned", b"x"),
            Package::new().symlink("up", "../../../../../../..").file("up/pwned", b"x"),
            Package::new().symlink("etc", "/etc").dir("etc/cron.d/"),
        ];
        for (package, symlink) in cases.into_iter().zip(["/opt/app/app/link", "/opt/app/up", "/opt/app/etc"]) {
            let err = image.install(&package.finish(), &options()).unwrap_err();
            assert!(matches!(&err, Error::SymlinkInPath { symlink: s, .. } if s == symlink), "{err}");
        }

        // A symlink already in the image under the install root is not followed either.
        std::os::unix::fs::symlink(&outside, image.app().join("webapps")).unwrap();
        let package = Package::new().file("webapps/ROOT.war", b"x").finish();
        let err = image.install(&package, &options()).unwrap_err();
        assert!(matches!(err, Error::SymlinkInPath { .. }), "{err}");
        assert!(!Path::new("/etc/cron.d/pwned").exists());
        image.assert_contained();
    }

    #[test]
    fn entries_under_files_and_files_over_directories_are_refused() {
        let image = image();
        let package = Package::new().file("a", b"x").file("a/b", b"y").finish();
        let err = image.install(&package, &options()).unwrap_err();
        assert!(matches!(&err, Error::NotADirectory { path, .. } if path == "/opt/app/a"), "{err}");
        let package = Package::new().file("d/f", b"x").file("d", b"y").finish();
        let err = image.install(&package, &options()).unwrap_err();
        assert!(matches!(err, Error::ReplacesDirectory { .. }), "{err}");
        image.assert_contained();
    }

    #[test]
    fn hard_links_must_target_files_from_the_package() {
        let image = image();
        for target in ["/etc/passwd", "../../../etc/passwd", "not-extracted", "dir", "self"] {
            let package = Package::new().dir("dir/").hard_link("self", target).finish();
            let err = image.install(&package, &options()).unwrap_err();
            assert!(matches!(err, Error::HardLinkTarget { .. }), "{target}: {err}");
        }
        // Allowed to reach files already in the image, but only beneath the install root and
        // not through symlinks.
        fs::write(image.app().join("existing"), b"e").unwrap();
        std::os::unix::fs::symlink("/etc", image.app().join("etc")).unwrap();
        let opts = InstallOptions { allow_external_hardlinks: true, ..options() };
        let package = Package::new().hard_link("copy", "existing").finish();
        image.install(&package, &opts).unwrap();
        assert_eq!(fs::read(image.app().join("copy")).unwrap(), b"e");
        for target in ["etc/passwd", "/etc/passwd"] {
            let package = Package::new().hard_link("passwd", target).finish();
            let err = image.install(&package, &opts).unwrap_err();
            assert!(matches!(err, Error::HardLinkTarget { .. }), "{target}: {err}");
        }
        image.assert_contained();
    }

    #[test]
    fn device_nodes_need_permission() {
        let image = image();
        let mut package = Package::new();
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Char);
        header.set_device_major(1).unwrap();
        header.set_device_minor(3).unwrap();
        header.set_size(0);
        header.set_mode(0o666);
        package.0.append_data(&mut header, "null", io::empty()).unwrap();
        let err = image.install(&package.finish(), &options()).unwrap_err();
        assert!(matches!(err, Error::DeviceNode { .. }), "{err}");
        assert!(!image.app().join("null").exists());

        let package = Package::new().raw(EntryType::Fifo, "pipe", "", 0o640, b"").finish();
        let err = image.install(&package, &options()).unwrap_err();
        assert!(matches!(err, Error::DeviceNode { .. }), "{err}");
        let opts = InstallOptions { allow_device_nodes: true, ..options() };
        let report = image.install(&package, &opts).unwrap();
        assert_eq!(report.entries[0].kind, EntryKind::Device);
        let meta = fs::symlink_metadata(image.app().join("pipe")).unwrap();
        assert!(meta.file_type().is_fifo());
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o640, 1234));
        image.assert_contained();
    }

    #[test]
    fn unsupported_entry_types_are_refused() {
        let image = image();
        let package = Package::new().raw(EntryType::new(b'V'), "label", "", 0o644, b"").finish();
        let err = image.install(&package, &options()).unwrap_err();
        assert!(matches!(err, Error::UnsupportedEntry { .. }), "{err}");
        image.assert_contained();
    }

    #[test]
    fn expansion_past_the_limit_fails_before_writing() {
        let image = image();
        let mut package = Package::new().file("small", b"fine");
        let mut header = Header::new_gnu();
        header.set_size(50 << 20);
        header.set_mode(0o644);
        package.0.append_data(&mut header, "zeros", io::repeat(0).take(50 << 20)).unwrap();
        let package = package.finish();
        assert!(package.len() < 1 << 20);

        let opts = InstallOptions { max_expanded_bytes: 10 << 20, ..options() };
        let err = image.install(&package, &opts).unwrap_err();
        assert!(
            matches!(&err, Error::ExpansionLimit { entry, limit } if entry == "zeros" && *limit == 10 << 20),
            "{err}"
        );
        assert!(!image.app().join("zeros").exists());
        image.assert_contained();
    }

    #[test]
    fn oversized_extension_headers_are_refused() {
        let image = image();
        let package = Package::new()
            .file("first", b"x")
            .raw(EntryType::GNULongName, "././@LongLink", "", 0o644, &vec![b'n'; 2 << 20])
            .file("short", b"y")
            .finish();
        let err = image.install(&package, &options()).unwrap_err();
        assert!(matches!(&err, Error::OversizedHeaders { after, .. } if after == "first"), "{err}");
        image.assert_contained();
    }

    #[test]
    fn cancellation_stops_the_install() {
        let image = image();
        let package = Package::new().file("a", &noise(4 << 20, 3)).finish();
        let err =
            image.install_with(&package, &sha256(&package), &options(), &AtomicBool::new(true), &|_| {}).unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err}");

        // Cancelled mid-stream, from the progress callback.
        let cancel = AtomicBool::new(false);
        let err = image
            .install_with(&package, &sha256(&package), &options(), &cancel, &|_| cancel.store(true, Ordering::Relaxed))
            .unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err}");
        image.assert_contained();
    }

    /// Serves `routes` over HTTP on 127.0.0.1 for `requests` requests; 404 for other paths.
    fn serve(routes: Vec<(&'static str, Vec<u8>)>, requests: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        thread::spawn(move || {
            for stream in listener.incoming().take(requests) {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                let path = request.split_whitespace().nth(1).unwrap_or_default();
                let (status, body) = match routes.iter().find(|(route, _)| *route == path) {
                    Some((_, body)) => ("200 OK", body.as_slice()),
                    None => ("404 Not Found", &b""[..]),
                };
                write!(stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                    .unwrap();
                stream.write_all(body).unwrap();
            }
        });
        base
    }

    #[test]
    fn installs_from_http_with_a_sidecar_checksum() {
        let image = image();
        let package = Package::new().file("index.html", &noise(600_000, 4)).finish();
        let sidecar = format!("{}  app.tar.gz\n", sha256(&package).to_uppercase());
        let base = serve(vec![("/app.tar.gz", package.clone()), ("/app.tar.gz.sha256", sidecar.into_bytes())], 4);
        let url = format!("{base}/app.tar.gz");
        let expected = sidecar_sha256(&url).unwrap().unwrap();
        assert_eq!(expected, sha256(&package));
        let source = open_source(&url).unwrap();
        assert_eq!(source.len, Some(package.len() as u64));
        let report = install(source, &image.root, &expected, &options(), &AtomicBool::new(false), &|_| {}).unwrap();
        assert_eq!(report.compressed_bytes, package.len() as u64);
        assert!(image.app().join("index.html").exists());

        assert_eq!(sidecar_sha256(&format!("{base}/other.tar.gz")).unwrap(), None);
        let err = open_source(&format!("{base}/missing.tar.gz")).err().unwrap();
        assert!(matches!(err, Error::Http { .. }), "{err}");
        image.assert_contained();
    }

    #[test]
    fn sidecar_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let package = dir.path().join("app.tar.gz");
        let spec = package.to_str().unwrap();
        assert_eq!(sidecar_sha256(spec).unwrap(), None);
        fs::write(dir.path().join("app.tar.gz.sha256"), format!("{}\n", "AB".repeat(32))).unwrap();
        assert_eq!(sidecar_sha256(spec).unwrap(), Some("ab".repeat(32)));
        fs::write(dir.path().join("app.tar.gz.sha256"), "not-a-digest app.tar.gz\n").unwrap();
        let err = sidecar_sha256(spec).unwrap_err();
        assert!(matches!(err, Error::BadSidecar { .. }), "{err}");
        let err = open_source(spec).err().unwrap();
        assert!(matches!(err, Error::OpenFile { .. }), "{err}");
    }
}
