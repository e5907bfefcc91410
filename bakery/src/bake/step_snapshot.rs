//! Snapshots the volume over the base snapshot, storing only the blocks that changed.
//! Undone by deleting the snapshot.

use super::Bake;
use crate::journal::Resource;

pub fn run(bake: &mut Bake) -> crate::provider::Result<()> {
    let volume = bake.volume_id.clone().expect("the volume step ran");
    let bar = bake.ui.bar(0, "snapshot blocks", false);
    let snapshot = bake.provider.snapshot_volume(
        &volume,
        Some(&bake.plan.base.snapshot_id),
        &bake.plan.description,
        bake.cancel,
        &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )?;
    bar.finish_and_clear();
    bake.journal.push(Resource::Snapshot { id: snapshot.id.clone() })?;
    tracing::info!(snapshot = %snapshot.id, changed = snapshot.changed_blocks, stored = snapshot.stored_bytes, "snapshot taken");
    bake.snapshot = Some(snapshot);
    Ok(())
}
