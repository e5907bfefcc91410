//! Mounting image filesystems and taking them down again, including when something still
//! holds them busy.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use snafu::{ResultExt, Snafu};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("mounting {} on {} failed: {source}", device.display(), target.display()))]
    Mount { device: PathBuf, target: PathBuf, source: nix::Error },

    #[snafu(display("unmounting {} failed: {source}", target.display()))]
    Unmount { target: PathBuf, source: nix::Error },

    #[snafu(display("creating mount point {}: {source}", target.display()))]
    MountPoint { target: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Mounts an ext4 filesystem; `read_only` for images that must not change.
pub fn mount_ext4(device: &Path, target: &Path, read_only: bool) -> Result<()> {
    fs::create_dir_all(target).context(MountPointSnafu { target })?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(Some(device), target, Some("ext4"), flags, None::<&str>).context(MountSnafu { device, target })
}

/// Mount points at or below `prefix`, deepest first, from this process's mount table.
pub fn mounted_under(prefix: &Path) -> Vec<PathBuf> {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|point| point.starts_with(prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

fn unescape_mountinfo(field: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo octal.
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let octal: String = chars.by_ref().take(3).collect();
            if let Ok(byte) = u8::from_str_radix(&octal, 8) {
                out.push(byte as char);
                continue;
            }
            out.push(c);
            out.push_str(&octal);
        } else {
            out.push(c);
        }
    }
    out
}

/// Unmounts `target` and everything mounted below it; succeeds when nothing is mounted there.
/// A busy mount gets the processes using it killed (the chroot's leftovers), then is retried;
/// a lazy detach is the last resort so that a bake never leaves a mount behind.
pub fn unmount_tree(target: &Path) -> Result<()> {
    for point in mounted_under(target) {
        let mut attempt = 0;
        loop {
            match umount2(&point, MntFlags::empty()) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => break,
                Err(nix::errno::Errno::EBUSY) if attempt < 10 => {
                    attempt += 1;
                    kill_processes_using(&point);
                    std::thread::sleep(Duration::from_millis(100 * attempt));
                }
                Err(nix::errno::Errno::EBUSY) => {
                    tracing::warn!(mount = %point.display(), "still busy; detaching lazily");
                    umount2(&point, MntFlags::MNT_DETACH).context(UnmountSnafu { target: &point })?;
                    break;
                }
                Err(source) => return Err(source).context(UnmountSnafu { target: &point }),
            }
        }
    }
    Ok(())
}

/// Kills processes whose root, working directory or open files are under `path`.
fn kill_processes_using(path: &Path) {
    let Ok(procs) = fs::read_dir("/proc") else { return };
    let me = std::process::id();
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me {
            continue;
        }
        let base = entry.path();
        let links = ["root", "cwd"].into_iter().map(|l| base.join(l));
        let fds = fs::read_dir(base.join("fd")).into_iter().flatten().flatten().map(|e| e.path());
        let uses = links.chain(fds).any(|link| fs::read_link(link).is_ok_and(|t| t.starts_with(path)));
        if uses {
            tracing::warn!(pid, mount = %path.display(), "killing a process that keeps the image busy");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
        }
    }
}
