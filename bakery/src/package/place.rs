//! Packages that are not unpacked here but kept whole: a `.war` placed in the install root
//! for Tomcat to deploy, and a `.deb` staged on the host for apt to install in the image.

use super::manifest::{EntryKind, ManifestEntry};
use super::source::CHUNK_SIZE;
use super::{CancelledSnafu, InstallOptions, Result, StageSnafu, UnpackSnafu, WriteDataSnafu};
use nix::fcntl::{self, OFlag};
use nix::sys::stat::{self, Mode};
use nix::unistd::{self, Gid, Uid};
use sha2::{Digest, Sha256};
use snafu::{ensure, ResultExt};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Copies `input` to `output` in chunks until it ends or `cancel` is set; returns the bytes
/// written and their SHA-256.
fn copy(mut input: impl Read, output: &mut File, cancel: &AtomicBool, path: &str) -> Result<(u64, String)> {
    let mut buf = vec![0; CHUNK_SIZE];
    let mut hasher = Sha256::new();
    let mut written = 0;
    loop {
        ensure!(!cancel.load(Ordering::Relaxed), CancelledSnafu);
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // The reader thread's own error (or cancellation) is the one the caller reports.
            Err(_) => break,
        };
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n]).context(WriteDataSnafu { path, entry: path })?;
        written += n as u64;
    }
    Ok((written, hex::encode(hasher.finalize())))
}

/// Places the web archive as `install_root/<war_name>`, owned by the package's owner, replacing
/// a file of that name; a symlink there is refused, never followed.
pub(super) fn war(
    install_dir: &OwnedFd,
    opts: &InstallOptions,
    input: impl Read,
    cancel: &AtomicBool,
) -> Result<ManifestEntry> {
    let name = opts.war_name.as_str();
    let path = format!("{}/{name}", opts.install_root.trim_end_matches('/'));
    let unpack = |action| UnpackSnafu { action, path: path.clone(), entry: name };
    let fd = fcntl::openat(
        Some(install_dir.as_raw_fd()),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .context(unpack("create"))?;
    let mut file = File::from(super::extract::owned(fd));
    let (size, sha256) = copy(input, &mut file, cancel, &path)?;
    let (uid, gid) = opts.owner;
    unistd::fchown(file.as_raw_fd(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).context(unpack("chown"))?;
    stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(0o644)).context(unpack("chmod"))?;
    Ok(ManifestEntry { path, kind: EntryKind::File, size, mode: 0o644, sha256: Some(sha256), target: None })
}

/// Writes the Debian package to `staged` on the host.
pub(super) fn stage_deb(staged: &Path, input: impl Read, cancel: &AtomicBool) -> Result<u64> {
    let mut file = File::create(staged).context(StageSnafu { path: staged })?;
    let (size, _) = copy(input, &mut file, cancel, &staged.to_string_lossy())?;
    Ok(size)
}
