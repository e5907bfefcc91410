//! Finds the root partition from the GPT, mounts it, and keeps services from starting while the
//! package and recipe are installed. Undone by removing policy-rc.d, unmounting and dropping the
//! partition nodes, in that order.

use super::Bake;
use crate::journal::Resource;
use crate::txn::{StepError, StepResult, Tx};
use crate::{gpt, loopdev, mounts, rootfs::RootDir};

/// Debian's maintainer scripts ask policy-rc.d before starting a service; 101 means "no".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const DENY_ALL: &[u8] = b"#!/bin/sh\n# Written by bakery while baking: no service starts in the chroot.\nexit 101\n";

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let device = bake.device.clone().expect("the attach step ran");
    let root_partition = gpt::root_partition(&device)?;
    let (node, added) = loopdev::ensure_partition_node(&device, root_partition.number)?;
    if added {
        tx.created(Resource::PartitionNodes { device: device.clone() })?;
    }
    let mount_point = bake.state_dir.join("mnt").join(&bake.plan.bake_id);
    tx.created(Resource::Mount { path: mount_point.clone() })?;
    mounts::mount_ext4(&node, &mount_point, false)?;
    bake.root = Some(mount_point.clone());
    bake.root_device = Some(node);

    // An image that ships its own policy keeps it; ours is removed before the snapshot.
    let policy = mount_point.join(POLICY_RC_D.trim_start_matches('/'));
    if policy.symlink_metadata().is_err() {
        tx.created(Resource::File { path: policy })?;
        let root = RootDir::open(&mount_point).map_err(StepError::input)?;
        root.write_file(POLICY_RC_D, DENY_ALL, 0o755, 0, 0).map_err(StepError::input)?;
    }
    Ok(())
}
