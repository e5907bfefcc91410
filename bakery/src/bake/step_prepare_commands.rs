//! Prepares what commands in the image (a `.deb`'s install, the recipe's commands) need from
//! the host: apt's directory for the bake (sources, lists, downloads: never in the image, see
//! [`crate::chroot::apt`]) and the log they write to. Undone by removing both.

use super::Bake;
use crate::chroot::apt;
use crate::journal::Resource;
use crate::rootfs::RootDir;
use crate::txn::{StepError, StepResult, Tx};
use std::path::Path;

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let scratch = bake.state_dir.join("tmp");
    std::fs::create_dir_all(&scratch)?;
    let log = scratch.join(format!("{}-command.log", bake.plan.bake_id));
    tx.created(Resource::File { path: log.clone() })?;
    let apt_dir = scratch.join(format!("{}-apt", bake.plan.bake_id));
    tx.created(Resource::Dir { path: apt_dir.clone() })?;
    apt::prepare(&apt_dir, &apt::host_acquire_settings())?;
    // Told once: each command's sync leaves out the same host sources.
    let image = RootDir::open(bake.root.as_ref().expect("the mount step ran")).map_err(StepError::input)?;
    for line in apt::sync_sources(&apt_dir, Path::new(apt::HOST_APT), &image)? {
        tracing::warn!("{line}");
    }
    bake.commands = Some(super::Commands { apt_dir, log });
    Ok(())
}
