//! A fresh volume from the base image's root snapshot; undone by deleting it.

use super::Bake;
use crate::journal::Resource;
use crate::txn::{StepResult, Tx};

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let id = tx.provider.volumes().create_volume(&bake.plan.base.snapshot_id, &bake.plan.bake_id)?;
    tx.created(Resource::Volume { id: id.clone() })?;
    bake.volume_id = Some(id);
    Ok(())
}
