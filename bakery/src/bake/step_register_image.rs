//! Registers the image with tags that say exactly what is inside. Undone by deregistering it.

use super::Bake;
use crate::journal::Resource;
use crate::provider::ImageRequest;
use crate::txn::{StepResult, Tx};

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let snapshot = bake.snapshot.as_ref().expect("the snapshot step ran");
    let request = ImageRequest {
        name: bake.plan.name.clone(),
        description: bake.plan.description.clone(),
        snapshot_id: snapshot.id.clone(),
        volume_size: snapshot.volume_size,
        tags: bake.plan.tags.clone(),
        parent: Some(bake.plan.base.clone()),
        manifest: bake.manifest.clone(),
    };
    let image = tx.provider.images().register_image(&request)?;
    tx.created(Resource::Image { id: image.id.clone() })?;
    tracing::info!(image = %image.id, name = %image.name, "registered");
    bake.image = Some(image);
    Ok(())
}
