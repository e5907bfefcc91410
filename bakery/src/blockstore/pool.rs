//! The copy-on-write filesystem that volumes and cached disks live on. A volume is O(1) to
//! create and cheap to snapshot only where the filesystem can reflink (XFS with reflink=1,
//! btrfs); on an ordinary ext4 state directory every bake would copy the base's whole disk.
//!
//! So where the state directory cannot reflink, Bakery makes its own pool once: a sparse file
//! `STATE/cow.xfs` formatted XFS with reflink, loop-mounted on `STATE/cow` (mounted again after
//! a reboot). Undo it with `umount STATE/cow && rm STATE/cow.xfs` once no bake runs. Where it
//! cannot (not root, no `mkfs.xfs`), it says once what a bake will cost and how to fix it.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Size of a new pool file; sparse, so it costs only what is written.
const POOL_SIZE: u64 = 256 << 30;
/// Name of the pool's mount point and (with `.xfs`) of its backing file in the state directory.
pub const POOL_NAME: &str = "cow";

/// Whether files in `dir` can be reflinked.
pub fn reflinks(dir: &Path) -> bool {
    // Names of this probe alone: processes opening the state directory at once must not
    // truncate each other's probe.
    let probe = format!(".reflink-probe-{}-{:x}", std::process::id(), rand::random::<u64>());
    let source = dir.join(&probe);
    let clone = dir.join(format!("{probe}.clone"));
    let probe = (|| {
        // FICLONE reads its source: open it for reading too.
        let source_file =
            fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&source).ok()?;
        // An empty file is not cloned on every filesystem: give it one block.
        std::io::Write::write_all(&mut &source_file, &[1; 4096]).ok()?;
        let clone_file = File::create(&clone).ok()?;
        Some(rustix::fs::ioctl_ficlone(&clone_file, &source_file).is_ok())
    })();
    let _ = fs::remove_file(&source);
    let _ = fs::remove_file(&clone);
    probe.unwrap_or(false)
}

/// The pool's backing file for a state directory.
pub fn pool_file(state_dir: &Path) -> PathBuf {
    state_dir.join(format!("{POOL_NAME}.xfs"))
}

/// The directory volumes and cached disks go in: the state directory itself when it can
/// reflink, else the pool (made or mounted here), else the state directory with a warning.
pub fn cow_dir(state_dir: &Path) -> PathBuf {
    if reflinks(state_dir) {
        return state_dir.to_path_buf();
    }
    let mount_point = state_dir.join(POOL_NAME);
    match ensure_pool(state_dir, &mount_point) {
        Ok(()) => mount_point,
        Err(why) => {
            tracing::warn!(
                "{} cannot reflink and no copy-on-write pool could be set up ({why}): every bake copies its \
                 base's whole disk (seconds per GB). Install xfsprogs and run as root so Bakery makes its own \
                 XFS pool, or put the state directory on XFS (reflink=1) or btrfs.",
                state_dir.display()
            );
            state_dir.to_path_buf()
        }
    }
}

fn ensure_pool(state_dir: &Path, mount_point: &Path) -> Result<(), String> {
    let lock_path = state_dir.join(format!("{POOL_NAME}.lock"));
    let lock_file = File::create(&lock_path).map_err(|e| format!("creating {}: {e}", lock_path.display()))?;
    // Bakes starting at once on a fresh state directory: one sets the pool up, the others wait.
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| format!("locking the pool: {e}"))?;
    fs::create_dir_all(mount_point).map_err(|e| format!("creating {}: {e}", mount_point.display()))?;
    if reflinks(mount_point) {
        return Ok(()); // mounted already
    }
    let file = pool_file(state_dir);
    if !file.exists() {
        let partial = file.with_extension("xfs.partial");
        File::create(&partial)
            .and_then(|f| f.set_len(POOL_SIZE))
            .map_err(|e| format!("creating {}: {e}", partial.display()))?;
        run(Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&partial))?;
        fs::rename(&partial, &file).map_err(|e| format!("naming {}: {e}", file.display()))?;
        tracing::info!(pool = %file.display(), "made an XFS copy-on-write pool for volumes");
    }
    run(Command::new("mount").args(["-o", "loop"]).arg(&file).arg(mount_point))?;
    match reflinks(mount_point) {
        true => Ok(()),
        false => Err(format!("{} is mounted but cannot reflink", mount_point.display())),
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().map_err(|e| format!("running {program}: {e}"))?;
    match output.status.success() {
        true => Ok(()),
        false => Err(format!("{program} failed: {}", String::from_utf8_lossy(&output.stderr).trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_directory_that_cannot_reflink_gets_a_pool_that_can() {
        // /var/tmp is on the host's root filesystem (ext4 on this kind of machine).
        let state = tempfile::tempdir_in("/var/tmp").unwrap();
        assert!(!reflinks(state.path()), "this test needs a state directory without reflink");
        let cow = cow_dir(state.path());
        assert_eq!(cow, state.path().join(POOL_NAME));
        assert!(reflinks(&cow));
        assert_eq!(cow_dir(state.path()), cow, "a second open reuses the mounted pool");
        assert!(Command::new("umount").arg(&cow).status().unwrap().success());
        assert_eq!(cow_dir(state.path()), cow, "an unmounted pool (after a reboot) is mounted again");
        assert!(Command::new("umount").arg(&cow).status().unwrap().success());
    }
}
