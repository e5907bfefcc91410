//! Takes the volume out of use before it is snapshotted: removes policy-rc.d, unmounts, drops
//! partition nodes and detaches — the undo of the earlier steps, run early, as Packer's
//! StepEarlyCleanup does. Running them again later is harmless.

use super::Bake;
use crate::journal::Resource;
use crate::txn::{StepResult, Tx};
use std::time::Duration;

/// A filesystem that is still alive after its last mount went away.
#[derive(Debug, snafu::Snafu)]
#[snafu(display(
    "the image's filesystem on {device} is still in use after unmounting (something kept it busy and it was \
     detached lazily); a snapshot now could catch it mid-write, so the bake stops"
))]
pub struct StillInUse {
    device: String,
}

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    // Unmount first and check the filesystem is really gone while the device is still ours (a
    // detached device's name may be reused by another bake at once), then detach.
    let device_level = |r: &Resource| matches!(r, Resource::PartitionNodes { .. } | Resource::Attachment { .. });
    tx.journal.unwind_until(tx.provider, device_level)?;
    bake.root = None;
    if let Some(device) = bake.root_device.take() {
        ensure_released(&device)?;
    }
    tx.journal.unwind_until(tx.provider, |r| matches!(r, Resource::Volume { .. }))?;
    bake.device = None;
    Ok(())
}

/// The kernel lists every live ext4 filesystem under /proc/fs/ext4, lazily detached ones too,
/// until the last user lets go: wait a moment for that, and refuse to go on without it.
fn ensure_released(device: &std::path::Path) -> crate::provider::Result<()> {
    let name = device.file_name().unwrap_or_default();
    let entry = std::path::Path::new("/proc/fs/ext4").join(name);
    let released =
        crate::wait::until(Duration::from_secs(2), Duration::from_millis(50), || (!entry.exists()).then_some(()));
    released.ok_or_else(|| StillInUse { device: device.display().to_string() }.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_filesystem_detached_lazily_while_in_use_is_not_released() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
        assert!(Command::new("mkfs.ext4").arg("-q").arg(&image).status().unwrap().success());
        let device = crate::loopdev::attach(&image, false).unwrap();
        let mount_point = dir.path().join("mnt");
        crate::mounts::mount_ext4(&device, &mount_point, false).unwrap();
        let busy = std::fs::File::create(mount_point.join("held-open")).unwrap();
        nix::mount::umount2(&mount_point, nix::mount::MntFlags::MNT_DETACH).unwrap();

        let error = ensure_released(&device).unwrap_err().to_string();
        assert!(error.contains("still in use"), "{error}");
        drop(busy);
        ensure_released(&device).expect("released once the last user lets go");
        crate::loopdev::detach_if_backed_by(&device, &image).unwrap();
    }
}
