//! Registers the image with tags that say exactly what is inside. Undone by deregistering it.

use super::Bake;
use crate::journal::Resource;
use crate::provider::{Document, ImageRequest};
use crate::txn::{StepResult, Tx};
use sha2::{Digest, Sha256};

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let snapshot = bake.snapshot.as_ref().expect("the snapshot step ran");
    let mut tags = bake.plan.tags.clone();
    if let Some(sbom) = bake.documents.get(&Document::Sbom) {
        tags.insert(crate::tags::SBOM_SHA256.to_string(), hex::encode(Sha256::digest(sbom)));
    }
    let request = ImageRequest {
        name: bake.plan.name.clone(),
        description: bake.plan.description.clone(),
        snapshot_id: snapshot.id.clone(),
        volume_size: snapshot.volume_size,
        tags,
        parent: Some(bake.plan.base.clone()),
        documents: bake.documents.clone(),
    };
    let image = tx.provider.images().register_image(&request)?;
    tx.created(Resource::Image { id: image.id.clone() })?;
    tracing::info!(image = %image.id, name = %image.name, "registered");
    bake.image = Some(image);
    Ok(())
}
