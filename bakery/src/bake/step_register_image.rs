//! Registers the image with tags that say exactly what is inside. Undone by deregistering it.

use super::Bake;
use crate::journal::Resource;
use crate::provider::ImageRequest;

pub fn run(bake: &mut Bake) -> crate::provider::Result<()> {
    let snapshot = bake.snapshot.as_ref().expect("the snapshot step ran");
    let request = ImageRequest {
        name: bake.plan.name.clone(),
        description: bake.plan.description.clone(),
        snapshot_id: snapshot.id.clone(),
        tags: bake.plan.tags.clone(),
        parent: Some(bake.plan.base.clone()),
    };
    let image = bake.provider.register_image(&request)?;
    bake.journal.push(Resource::Image { id: image.id.clone() })?;
    tracing::info!(image = %image.id, name = %image.name, "registered");
    bake.image = Some(image);
    Ok(())
}
