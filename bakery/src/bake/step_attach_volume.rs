//! Attaches the volume as a block device; undone by detaching it.

use super::Bake;
use crate::journal::Resource;

pub fn run(bake: &mut Bake) -> crate::provider::Result<()> {
    let volume = bake.volume_id.clone().expect("the volume step ran");
    let device = bake.provider.attach_volume(&volume)?;
    bake.journal.push(Resource::Attachment { volume, device: device.clone() })?;
    tracing::info!(device = %device.display(), "attached");
    bake.device = Some(device);
    Ok(())
}
