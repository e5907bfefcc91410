//! Snapshots the volume over the base snapshot, storing only the blocks that changed.
//! Undone by deleting the snapshot.

use super::Bake;
use crate::events::Unit;
use crate::journal::Resource;
use crate::txn::{StepResult, Tx};

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let volume = bake.volume_id.clone().expect("the volume step ran");
    let progress = tx.progress(Unit::Blocks);
    let snapshot = tx.provider.volumes().snapshot_volume(
        &volume,
        Some(&bake.plan.base.snapshot_id),
        &bake.plan.description,
        tx.cancel,
        &progress,
    )?;
    tx.created(Resource::Snapshot { id: snapshot.id.clone() })?;
    tracing::info!(snapshot = %snapshot.id, changed = snapshot.changed_blocks, stored = snapshot.stored_bytes, "snapshot taken");
    bake.snapshot = Some(snapshot);
    Ok(())
}
