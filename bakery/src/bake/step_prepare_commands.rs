//! Prepares what commands in the image (a `.deb`'s install, the recipe's commands) need from
//! the host: apt's directory for the bake (sources, lists, downloads: never in the image, see
//! [`crate::chroot::apt`]) and the log they write to. Undone by removing both.

use super::Bake;
use crate::chroot::apt;
use crate::journal::Resource;
use crate::txn::{StepResult, Tx};

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let scratch = bake.state_dir.join("tmp");
    std::fs::create_dir_all(&scratch)?;
    let log = scratch.join(format!("{}-command.log", bake.plan.bake_id));
    tx.created(Resource::File { path: log.clone() })?;
    let apt_dir = scratch.join(format!("{}-apt", bake.plan.bake_id));
    tx.created(Resource::Dir { path: apt_dir.clone() })?;
    apt::prepare(&apt_dir, &apt::host_acquire_settings())?;
    bake.commands = Some(super::Commands { apt_dir, log, warned: Default::default() });
    Ok(())
}
