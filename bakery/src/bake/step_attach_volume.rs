//! Attaches the volume as a block device; undone by detaching it.

use super::Bake;
use crate::journal::Resource;
use crate::txn::{StepResult, Tx};

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let volume = bake.volume_id.clone().expect("the volume step ran");
    let device = tx.provider.volumes().attach_volume(&volume)?;
    tx.created(Resource::Attachment { volume, device: device.clone() })?;
    tracing::info!(device = %device.display(), "attached");
    bake.device = Some(device);
    Ok(())
}
