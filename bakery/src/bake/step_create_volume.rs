//! A fresh volume from the base image's root snapshot; undone by deleting it.

use super::Bake;
use crate::journal::Resource;

pub fn run(bake: &mut Bake) -> crate::provider::Result<()> {
    let id = bake.provider.create_volume(&bake.plan.base.snapshot_id, &bake.plan.bake_id)?;
    bake.journal.push(Resource::Volume { id: id.clone() })?;
    bake.volume_id = Some(id);
    Ok(())
}
