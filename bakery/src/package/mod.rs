//! Installs a `.tar.gz` application package into an image, streaming it: the package is never
//! held whole in memory or on disk, so memory use does not grow with package size.
//!
//! A reader thread pulls the raw package in chunks and hashes it, while the calling thread
//! decompresses and unpacks; a bounded channel between them caps memory at a few chunks.
//! Unpacking is our own, not the tar crate's: every entry lands beneath the install root with
//! no symlink followed on the way (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), whatever the image
//! or the package contains. The package's checksum is known only at the end; on a mismatch the
//! caller discards the whole volume, so what was written by then does no harm.

mod extract;
pub mod http;
mod kind;
mod manifest;
mod place;
mod source;

pub use kind::Kind;
pub use manifest::{EntryKind, ManifestEntry};
pub use source::{is_url, open_source, sidecar_sha256, PackageSource};

use crate::rootfs::{self, RootDir};
use nix::errno::Errno;
use snafu::{ensure, OptionExt, ResultExt, Snafu};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("cannot open package {path}: {source}"))]
    OpenFile { path: String, source: io::Error },

    #[snafu(display("cannot download {source}"))]
    Http { source: http::HttpError },

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

    #[snafu(display(
        "package {package} is not a package bakery installs: it {what} (a .tar.gz, .tar.zst, .deb or .war is)"
    ))]
    UnknownKind { package: String, what: String },

    #[snafu(display("package {package} is named as {named} but holds {actual}"))]
    KindMismatch { package: String, named: Kind, actual: Kind },

    #[snafu(display("package {package} is truncated: its {format} stream ends early ({source})"))]
    Truncated { package: String, format: &'static str, source: io::Error },

    #[snafu(display("package {package} has corrupt {format} data: {source}"))]
    Corrupt { package: String, format: &'static str, source: io::Error },

    #[snafu(display("package {package} is not a tar archive: {source}"))]
    NotTar { package: String, source: io::Error },

    #[snafu(display("package {package} has a corrupt tar header after entry '{after}': {source}"))]
    CorruptTar { package: String, after: String, source: io::Error },

    #[snafu(display(
        "package {package} has over {} bytes of tar headers after entry '{after}'",
        extract::HEADER_ALLOWANCE
    ))]
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

    #[snafu(display("package {package} is a Debian package, which this install cannot take"))]
    DebNotHere { package: String },

    #[snafu(display("cannot stage the Debian package at {}: {source}", path.display()))]
    Stage { path: std::path::PathBuf, source: io::Error },

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
    /// The file name a `.war` is placed as in the install root (`APP.war`).
    pub war_name: String,
    /// Where on the host a `.deb` is staged for apt to install in the image; None where the
    /// caller cannot install one.
    pub deb_staging: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub struct InstallReport {
    pub kind: Kind,
    pub package_sha256: String,
    pub compressed_bytes: u64,
    /// Sum of the sizes of the package's entries.
    pub expanded_bytes: u64,
    /// Sorted by path; an entry repeated in the package appears once, as it was last written.
    /// Empty for a `.deb` until it is installed.
    pub entries: Vec<ManifestEntry>,
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

    let (sender, receiver) = mpsc::sync_channel(source::CHANNEL_DEPTH);
    let (consumed, pumped) = thread::scope(|scope| {
        let pump = scope.spawn(move || source::pump(reader, sender, cancel, progress));
        let chunks = source::Chunks { receiver, chunk: Vec::new(), pos: 0, cancel };
        // The consumer owns (and on return drops) the receiving end, which stops a reader
        // blocked on a full channel.
        let consumed = consume(chunks, install_dir, opts, cancel, &package);
        let pumped = pump.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (consumed, pumped)
    });

    // Cancellation surfaces as whatever broke first (often an early end of input), so it is
    // checked before the error itself.
    ensure!(!cancel.load(Ordering::Relaxed), CancelledSnafu);
    // A failed read ends the input early too; its error is the real cause.
    let (package_sha256, compressed_bytes) = pumped.context(ReadSourceSnafu { package: &package })?;
    let (kind, entries, expanded_bytes) = consumed?;
    ensure!(
        package_sha256.eq_ignore_ascii_case(expected_sha256),
        ChecksumMismatchSnafu { expected: expected_sha256.to_ascii_lowercase(), actual: &package_sha256 }
    );
    tracing::debug!(package, entries = entries.len(), compressed_bytes, expanded_bytes, "installed package");
    Ok(InstallReport { kind, package_sha256, compressed_bytes, expanded_bytes, entries })
}

/// Tells the package's kind from its first bytes (and checks it against its name), then
/// unpacks, places or stages it. Returns the kind, the entries installed and their size.
fn consume(
    mut chunks: source::Chunks<'_>,
    install_dir: std::os::fd::OwnedFd,
    opts: &InstallOptions,
    cancel: &AtomicBool,
    package: &str,
) -> Result<(Kind, Vec<ManifestEntry>, u64)> {
    use std::io::BufRead;
    // Only fails when cancelled, which the caller reports.
    let head = chunks.fill_buf().context(ReadSourceSnafu { package })?;
    let Some(kind) = Kind::sniff(head) else {
        return UnknownKindSnafu { package, what: Kind::describe_unknown(head) }.fail();
    };
    if let Some(named) = Kind::from_name(package) {
        ensure!(named == kind, KindMismatchSnafu { package, named, actual: kind });
    }
    match kind {
        Kind::TarGz | Kind::TarZst => {
            let (entries, expanded) = extract::Extractor::new(install_dir, opts, cancel, package).run(chunks, kind)?;
            Ok((kind, entries, expanded))
        }
        Kind::War => {
            let entry = place::war(&install_dir, opts, chunks, cancel)?;
            let size = entry.size;
            Ok((kind, vec![entry], size))
        }
        Kind::Deb => {
            let staged = opts.deb_staging.as_deref().context(DebNotHereSnafu { package })?;
            place::stage_deb(staged, chunks, cancel)?;
            Ok((kind, Vec::new(), 0))
        }
    }
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::source::CHUNK_SIZE;
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use sha2::{Digest, Sha256};
    use std::fs;
    use std::io::BufReader;
    use std::io::{BufRead, Read, Write};
    use std::net::TcpListener;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::{Path, PathBuf};
    use tar::EntryType;
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

        /// Installs `package` saved under `name`, whose suffix says what it is.
        fn install_named(&self, name: &str, package: &[u8], opts: &InstallOptions) -> Result<InstallReport> {
            let path = self.packages.path().join(name);
            fs::write(&path, package).unwrap();
            let source = open_source(path.to_str().unwrap()).unwrap();
            install(source, &self.root, &sha256(package), opts, &AtomicBool::new(false), &|_| {})
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
            war_name: "app.war".to_string(),
            deb_staging: None,
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
        assert!(matches!(err, Error::Truncated { format: "gzip", .. }), "{err}");
        image.assert_contained();
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut header = Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(MTIME);
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn zstd(bytes: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
    }

    #[test]
    fn tar_zst_packages_unpack_frame_after_frame() {
        let image = image();
        let jar = noise(2 * CHUNK_SIZE + 17, 9);
        let tar = tar_of(&[("lib/app.jar", &jar), ("version.txt", b"7\n")]);
        let report = image.install_named("hello.tar.zst", &zstd(&tar), &options()).unwrap();
        assert_eq!(report.kind, Kind::TarZst);
        assert_eq!(fs::read(image.app().join("lib/app.jar")).unwrap(), jar);
        assert_eq!(entry(&report, "/opt/app/lib/app.jar").sha256.as_deref(), Some(sha256(&jar).as_str()));

        // Two frames, as concatenated .zst files hold: the second frame's files are there too.
        let split = tar.len() / 2;
        let two_frames = [zstd(&tar[..split]), zstd(&tar[split..])].concat();
        let report = image.install_named("again.tzst", &two_frames, &options()).unwrap();
        assert_eq!(fs::read_to_string(image.app().join("version.txt")).unwrap(), "7\n");
        assert_eq!(report.entries.len(), 2, "lib/app.jar and version.txt");

        let truncated = zstd(&tar);
        let err = image.install_named("cut.tar.zst", &truncated[..truncated.len() / 2], &options()).unwrap_err();
        assert!(
            matches!(err, Error::Truncated { format: "zstd", .. } | Error::Corrupt { format: "zstd", .. }),
            "{err}"
        );
        image.assert_contained();
    }

    #[test]
    fn a_war_is_placed_whole_as_app_war() {
        let image = image();
        let war = [b"PK\x03\x04".as_slice(), &noise(CHUNK_SIZE + 5, 3)].concat();
        // A symlink where the war goes is refused, never followed.
        fs::create_dir_all(image.app()).unwrap();
        std::os::unix::fs::symlink(image.outside(), image.app().join("app.war")).unwrap();
        let err = image.install_named("hello.war", &war, &options()).unwrap_err();
        assert!(matches!(err, Error::Unpack { .. }), "a symlink is never followed: {err}");
        fs::remove_file(image.app().join("app.war")).unwrap();

        let report = image.install_named("hello.war", &war, &options()).unwrap();
        assert_eq!(report.kind, Kind::War);
        let placed = image.app().join("app.war");
        assert_eq!(fs::read(&placed).unwrap(), war);
        let meta = fs::metadata(&placed).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (1234, 5678, 0o644));
        assert_eq!(report.entries.len(), 1);
        assert_eq!(report.entries[0].path, "/opt/app/app.war");
        assert_eq!(report.entries[0].sha256.as_deref(), Some(sha256(&war).as_str()));
        image.assert_contained();
    }

    #[test]
    fn a_deb_is_staged_for_apt_and_a_name_that_lies_is_refused() {
        let image = image();
        let deb = [b"!<arch>\ndebian-binary   ".as_slice(), &noise(1000, 5)].concat();
        let err = image.install_named("hello_1.0_all.deb", &deb, &options()).unwrap_err();
        assert!(matches!(err, Error::DebNotHere { .. }), "{err}");
        let staged = image.packages.path().join("staged.deb");
        let opts = InstallOptions { deb_staging: Some(staged.clone()), ..options() };
        let report = image.install_named("hello_1.0_all.deb", &deb, &opts).unwrap();
        assert_eq!((report.kind, report.entries.len()), (Kind::Deb, 0));
        assert_eq!(fs::read(&staged).unwrap(), deb);

        let tar = zstd(&tar_of(&[("a", b"a")]));
        let err = image.install_named("hello.tar.gz", &tar, &options()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "package {} is named as a gzip-compressed tar archive (.tar.gz) but holds a zstd-compressed tar archive (.tar.zst)",
                image.packages.path().join("hello.tar.gz").display()
            )
        );
        image.assert_contained();
    }

    #[test]
    fn non_gzip_and_non_tar_packages_are_reported() {
        let image = image();
        let err = image.install(b"just some text", &options()).unwrap_err();
        assert!(matches!(err, Error::UnknownKind { .. }), "{err}");
        assert!(err.to_string().contains("starts with \"just som\""), "{err}");
        let err = image.install(b"", &options()).unwrap_err();
        assert!(err.to_string().contains("it is empty"), "{err}");

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
