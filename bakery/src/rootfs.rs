//! File operations inside an image root: a machine image's filesystem mounted on the host.
//!
//! Paths are resolved the way the image itself would resolve them, with `openat2(2)` and
//! `RESOLVE_IN_ROOT`, so the image's own symlinks (`/var/run -> /run`, absolute links, `..`
//! chains) land inside the image root and can never reach the host. Requires Linux 5.6+.

use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{self, Mode, SFlag};
use nix::unistd::{self, Gid, Uid};
use snafu::{ensure, OptionExt, ResultExt, Snafu};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// `/etc/passwd` and `/etc/group` larger than this are not account databases.
const ID_FILE_LIMIT: u64 = 16 * 1024 * 1024;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("cannot open image root {}: {source}", root.display()))]
    OpenRoot { root: PathBuf, source: Errno },

    #[snafu(display("path '{path}' in the image is unusable: {reason}"))]
    BadPath { path: String, reason: &'static str },

    #[snafu(display("cannot open directory {path} in image {}: {source}", root.display()))]
    OpenDir { path: String, root: PathBuf, source: Errno },

    #[snafu(display("cannot create directory {path} in image {}: {source}", root.display()))]
    CreateDir { path: String, root: PathBuf, source: Errno },

    #[snafu(display(
        "cannot create directory {path} in image {}: it is a symlink to '{target}', which does not exist",
        root.display()
    ))]
    DanglingSymlink { path: String, target: String, root: PathBuf },

    #[snafu(display(
        "refusing to write {path} in image {}: it is a symlink to '{target}'",
        root.display()
    ))]
    FinalSymlink { path: String, target: String, root: PathBuf },

    #[snafu(display("refusing to write {path} in image {}: it is not a regular file", root.display()))]
    NotRegularFile { path: String, root: PathBuf },

    #[snafu(display("cannot write {path} in image {}: {source}", root.display()))]
    WriteFile { path: String, root: PathBuf, source: std::io::Error },

    #[snafu(display("cannot {action} {path} in image {}: {source}", root.display()))]
    FileOp { action: &'static str, path: String, root: PathBuf, source: Errno },

    #[snafu(display("cannot read {file} in image {}: {source}", root.display()))]
    ReadIds { file: &'static str, root: PathBuf, source: std::io::Error },

    #[snafu(display("user '{user}' is not in {file} of image {}", root.display()))]
    UnknownUser { user: String, file: &'static str, root: PathBuf },

    #[snafu(display("group '{group}' is not in {file} of image {}", root.display()))]
    UnknownGroup { group: String, file: &'static str, root: PathBuf },

    #[snafu(display("entry for '{name}' in {file} of image {} has no numeric id", root.display()))]
    BadIdEntry { name: String, file: &'static str, root: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;

/// An image root, held open so that later path changes on the host cannot redirect it.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
    host_path: PathBuf,
}

impl RootDir {
    pub fn open(host_path: &Path) -> Result<Self> {
        let fd = fcntl::open(host_path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .context(OpenRootSnafu { root: host_path })?;
        Ok(Self {
            // SAFETY: open just returned this descriptor and nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            host_path: host_path.to_path_buf(),
        })
    }

    pub fn host_path(&self) -> &Path {
        &self.host_path
    }

    /// Opens the directory at `path` (absolute, as the image sees it). With `create` as
    /// `(mode, uid, gid)`, missing components are created with that mode and owner.
    pub fn open_dir(&self, path: &str, create: Option<(u32, u32, u32)>) -> Result<OwnedFd> {
        let parts = components(path)?;
        let missing = match self.resolve_dir(&join(&parts)) {
            Ok(fd) => return Ok(fd),
            Err(e) => e,
        };
        let (Errno::ENOENT, Some((mode, uid, gid))) = (missing, create) else {
            return Err(missing).context(OpenDirSnafu { path, root: &self.host_path });
        };

        // Walk down from the root: each prefix is resolved afresh in the root, so a symlink
        // anywhere on the way is followed as the image would follow it, and each missing
        // component is created inside wherever its parent really is.
        let mut dir = self.resolve_dir(".").context(OpenDirSnafu { path: "/", root: &self.host_path })?;
        for (i, name) in parts.iter().enumerate() {
            let prefix = join(&parts[..=i]);
            let shown = format!("/{prefix}");
            dir = match self.resolve_dir(&prefix) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => match create_dir(dir.as_fd(), name, mode, uid, gid) {
                    Ok(fd) => fd,
                    Err(Errno::EEXIST) => {
                        // The name exists yet does not resolve: a symlink to nowhere.
                        let target = fcntl::readlinkat(Some(dir.as_raw_fd()), *name)
                            .context(OpenDirSnafu { path: &shown, root: &self.host_path })?;
                        return DanglingSymlinkSnafu {
                            path: shown,
                            target: target.to_string_lossy(),
                            root: &self.host_path,
                        }
                        .fail();
                    }
                    Err(e) => return Err(e).context(CreateDirSnafu { path: shown, root: &self.host_path }),
                },
                Err(e) => return Err(e).context(OpenDirSnafu { path: shown, root: &self.host_path }),
            };
        }
        Ok(dir)
    }

    /// Replaces (or creates) the regular file at `path` with `content`, atomically: a reader
    /// sees the old file or the new one. Missing parents are created root-owned, mode 0755.
    /// An existing symlink at `path` is an error rather than something to write through.
    pub fn write_file(&self, path: &str, content: &[u8], mode: u32, uid: u32, gid: u32) -> Result<()> {
        let parts = components(path)?;
        let (name, parents) = parts.split_last().context(BadPathSnafu { path, reason: "it names no file" })?;
        let dir = self.open_dir(&format!("/{}", parents.join("/")), Some((0o755, 0, 0)))?;
        let dir_fd = Some(dir.as_raw_fd());
        let root = &self.host_path;

        match stat::fstatat(dir_fd, *name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if file_type(st.st_mode) == SFlag::S_IFLNK => {
                let target =
                    fcntl::readlinkat(dir_fd, *name).context(FileOpSnafu { action: "read the symlink", path, root })?;
                return FinalSymlinkSnafu { path, target: target.to_string_lossy(), root }.fail();
            }
            Ok(st) => ensure!(file_type(st.st_mode) == SFlag::S_IFREG, NotRegularFileSnafu { path, root }),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(e).context(FileOpSnafu { action: "inspect", path, root }),
        }

        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let temp = format!(".{name}.bakery-{}-{}", std::process::id(), SEQUENCE.fetch_add(1, Ordering::Relaxed));
        let fd = fcntl::openat(
            dir_fd,
            temp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .context(FileOpSnafu { action: "create a temporary file for", path, root })?;
        // SAFETY: openat just returned this descriptor and nothing else owns it.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let result = (|| {
            file.write_all(content).context(WriteFileSnafu { path, root })?;
            // Owner before mode: chown clears setuid/setgid bits.
            unistd::fchown(file.as_raw_fd(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .context(FileOpSnafu { action: "set the owner of", path, root })?;
            stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode & 0o7777)).context(FileOpSnafu {
                action: "set the mode of",
                path,
                root,
            })?;
            // No fsync: the volume is unmounted (and so flushed) before it is snapshotted.
            fcntl::renameat(dir_fd, temp.as_str(), dir_fd, *name).context(FileOpSnafu {
                action: "rename the temporary file over",
                path,
                root,
            })
        })();
        if result.is_err() {
            let _ = unistd::unlinkat(dir_fd, temp.as_str(), unistd::UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    /// Resolves `user` and `group` to ids through the image's `/etc/passwd` and `/etc/group`
    /// (never the host's). Numeric strings are taken as ids without a lookup.
    pub fn lookup_ids(&self, user: &str, group: &str) -> Result<(u32, u32)> {
        let root = &self.host_path;
        let uid = match user.parse() {
            Ok(uid) => uid,
            Err(_) => {
                self.lookup_name("/etc/passwd", user)?.context(UnknownUserSnafu { user, file: "/etc/passwd", root })?
            }
        };
        let gid = match group.parse() {
            Ok(gid) => gid,
            Err(_) => {
                self.lookup_name("/etc/group", group)?.context(UnknownGroupSnafu { group, file: "/etc/group", root })?
            }
        };
        Ok((uid, gid))
    }

    /// The id in the third field of `name`'s line in a passwd-format file of the image.
    fn lookup_name(&self, file: &'static str, name: &str) -> Result<Option<u32>> {
        let root = &self.host_path;
        let fd = openat2(
            self.fd.as_fd(),
            file.trim_start_matches('/'),
            OFlag::O_RDONLY,
            ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
        .map_err(std::io::Error::from)
        .context(ReadIdsSnafu { file, root })?;
        let mut text = String::new();
        File::from(fd).take(ID_FILE_LIMIT).read_to_string(&mut text).context(ReadIdsSnafu { file, root })?;
        let Some(line) = text.lines().find(|line| line.split(':').next() == Some(name)) else {
            return Ok(None);
        };
        let id = line.split(':').nth(2).and_then(|id| id.parse().ok()).context(BadIdEntrySnafu { name, file, root })?;
        Ok(Some(id))
    }

    /// Opens `path` as the image sees it: symlinks on the way resolve inside the root. With
    /// `O_PATH | O_NOFOLLOW`, a symlink at the end is opened itself.
    pub fn open_in_root(&self, path: &str, flags: OFlag) -> nix::Result<OwnedFd> {
        let relative = match path.trim_start_matches('/') {
            "" => ".",
            relative => relative,
        };
        openat2(self.fd.as_fd(), relative, flags, ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    }

    /// Opens a directory (relative to the root, `.` for the root itself) as the image sees it.
    fn resolve_dir(&self, relative: &str) -> nix::Result<OwnedFd> {
        openat2(
            self.fd.as_fd(),
            relative,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
    }
}

/// `openat2(2)` returning an owned descriptor, always close-on-exec.
pub(crate) fn openat2(dir: BorrowedFd<'_>, path: &str, flags: OFlag, resolve: ResolveFlag) -> nix::Result<OwnedFd> {
    let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(resolve);
    // EAGAIN means a concurrent rename made the kernel unsure that `..` stayed inside; the
    // kernel asks callers to retry. Bounded, as the cause is outside our control.
    let mut attempts = 0;
    let fd = loop {
        match fcntl::openat2(dir.as_raw_fd(), path, how) {
            Err(Errno::EAGAIN) if attempts < 16 => attempts += 1,
            other => break other?,
        }
    };
    // SAFETY: openat2 just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates directory `name` in `parent` with exactly `mode` and the given owner (the umask
/// would otherwise trim the mode), returning it open.
pub(crate) fn create_dir(parent: BorrowedFd<'_>, name: &str, mode: u32, uid: u32, gid: u32) -> nix::Result<OwnedFd> {
    stat::mkdirat(Some(parent.as_raw_fd()), name, Mode::from_bits_truncate(0o700))?;
    let fd = fcntl::openat(
        Some(parent.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    unistd::fchown(fd.as_raw_fd(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode & 0o7777))?;
    Ok(fd)
}

/// The components of an absolute image path. `..` is refused: paths come from recipes, and
/// a lexical `..` is always a mistake there.
fn components(path: &str) -> Result<Vec<&str>> {
    ensure!(path.starts_with('/'), BadPathSnafu { path, reason: "it is not absolute" });
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    ensure!(!parts.contains(&".."), BadPathSnafu { path, reason: "it has a '..' component" });
    Ok(parts)
}

/// Components joined into a path relative to the root (`.` for the root itself).
fn join(parts: &[&str]) -> String {
    if parts.is_empty() {
        ".".to_string()
    } else {
        parts.join("/")
    }
}

fn file_type(mode: libc::mode_t) -> SFlag {
    SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    /// An image root inside a parent directory, so escapes show up as extra parent entries.
    fn image() -> (tempfile::TempDir, PathBuf, RootDir) {
        let parent = tempfile::tempdir().unwrap();
        let root_path = parent.path().join("root");
        fs::create_dir(&root_path).unwrap();
        // Traps a naive host-side join would follow out of the image.
        symlink("/", root_path.join("evil")).unwrap();
        symlink("../../../../../..", root_path.join("up")).unwrap();
        symlink(parent.path(), root_path.join("parent")).unwrap();
        fs::create_dir(root_path.join("run")).unwrap();
        fs::create_dir(root_path.join("var")).unwrap();
        symlink("/run", root_path.join("var/run")).unwrap();
        let root = RootDir::open(&root_path).unwrap();
        (parent, root_path, root)
    }

    fn assert_contained(parent: &tempfile::TempDir) {
        let names: Vec<_> =
            fs::read_dir(parent.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, ["root"], "something was written outside the image root");
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let (parent, root_path, root) = image();
        root.open_dir("/evil/srv/a", Some((0o750, 12, 34))).unwrap();
        let made = fs::metadata(root_path.join("srv/a")).unwrap();
        assert_eq!((made.mode() & 0o7777, made.uid(), made.gid()), (0o750, 12, 34));

        root.write_file("/up/conf", b"one", 0o644, 0, 0).unwrap();
        assert_eq!(fs::read(root_path.join("conf")).unwrap(), b"one");
        // An absolute link to the host's parent directory means nothing inside the image.
        let err = root.write_file("/parent/escaped", b"two", 0o644, 0, 0).unwrap_err();
        assert!(matches!(err, Error::DanglingSymlink { .. }), "{err}");
        root.write_file("/var/run/app/pid", b"3", 0o600, 5, 6).unwrap();
        let pid = fs::metadata(root_path.join("run/app/pid")).unwrap();
        assert_eq!((pid.mode() & 0o7777, pid.uid(), pid.gid()), (0o600, 5, 6));
        assert_contained(&parent);
    }

    #[test]
    fn self_referencing_absolute_symlink_is_an_error_not_an_escape() {
        let (parent, root_path, root) = image();
        // On the host this would be the host's /etc; inside the image it points at itself.
        symlink("/etc", root_path.join("etc")).unwrap();
        let before = fs::read("/etc/passwd").unwrap();
        let err = root.write_file("/etc/passwd", b"pwned", 0o644, 0, 0).unwrap_err();
        assert!(matches!(err, Error::OpenDir { source: Errno::ELOOP, .. }), "{err}");
        assert_eq!(fs::read("/etc/passwd").unwrap(), before);
        assert_contained(&parent);
    }

    #[test]
    fn write_file_replaces_files_but_never_writes_through_symlinks() {
        let (parent, root_path, root) = image();
        fs::write(root_path.join("old"), b"old").unwrap();
        root.write_file("/old", b"new", 0o640, 7, 8).unwrap();
        let meta = fs::metadata(root_path.join("old")).unwrap();
        assert_eq!(fs::read(root_path.join("old")).unwrap(), b"new");
        assert_eq!((meta.mode() & 0o7777, meta.uid(), meta.gid()), (0o640, 7, 8));

        symlink(parent.path().join("target"), root_path.join("link")).unwrap();
        let err = root.write_file("/link", b"x", 0o644, 0, 0).unwrap_err();
        assert!(matches!(err, Error::FinalSymlink { .. }), "{err}");
        let err = root.write_file("/run", b"x", 0o644, 0, 0).unwrap_err();
        assert!(matches!(err, Error::NotRegularFile { .. }), "{err}");

        // Only the files themselves: no temporary files left behind.
        let mut names: Vec<_> =
            fs::read_dir(&root_path).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["evil", "link", "old", "parent", "run", "up", "var"]);
        assert_contained(&parent);
    }

    #[test]
    fn dangling_symlinks_and_bad_paths_are_reported() {
        let (parent, root_path, root) = image();
        symlink("/nowhere", root_path.join("opt")).unwrap();
        let err = root.open_dir("/opt/app", Some((0o755, 0, 0))).unwrap_err();
        assert!(matches!(&err, Error::DanglingSymlink { path, .. } if path == "/opt"), "{err}");
        let err = root.open_dir("/missing", None).unwrap_err();
        assert!(matches!(err, Error::OpenDir { source: Errno::ENOENT, .. }), "{err}");
        let err = root.open_dir("relative", None).unwrap_err();
        assert!(matches!(err, Error::BadPath { .. }), "{err}");
        let err = root.write_file("/a/../b", b"", 0o644, 0, 0).unwrap_err();
        assert!(matches!(err, Error::BadPath { .. }), "{err}");
        assert!(!root_path.join("nowhere").exists());
        assert_contained(&parent);
    }

    #[test]
    fn ids_come_from_the_image() {
        let (_parent, root_path, root) = image();
        fs::create_dir(root_path.join("etc")).unwrap();
        fs::write(
            root_path.join("etc/passwd"),
            "tomcat:x:991:992:Tomcat:/var/lib/tomcat:/sbin/nologin\nbroken:x:oops:1::/:\n",
        )
        .unwrap();
        fs::write(root_path.join("etc/group"), "tomcat:x:992:\n").unwrap();
        fs::set_permissions(root_path.join("etc/group"), fs::Permissions::from_mode(0o644)).unwrap();

        assert_eq!(root.lookup_ids("tomcat", "tomcat").unwrap(), (991, 992));
        assert_eq!(root.lookup_ids("0", "42").unwrap(), (0, 42));
        // The host surely has root; the image does not.
        let err = root.lookup_ids("root", "tomcat").unwrap_err();
        assert!(matches!(&err, Error::UnknownUser { user, .. } if user == "root"), "{err}");
        assert!(err.to_string().contains("/etc/passwd"), "{err}");
        let err = root.lookup_ids("tomcat", "wheel").unwrap_err();
        assert!(matches!(err, Error::UnknownGroup { .. }), "{err}");
        let err = root.lookup_ids("broken", "tomcat").unwrap_err();
        assert!(matches!(err, Error::BadIdEntry { .. }), "{err}");
    }
}
