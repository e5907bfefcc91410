//! Takes the volume out of use before it is snapshotted: removes policy-rc.d, unmounts, drops
//! partition nodes and detaches — the undo of the earlier steps, run early, as Packer's
//! StepEarlyCleanup does. Running them again later is harmless.

use super::Bake;
use crate::journal::Resource;

pub fn run(bake: &mut Bake) -> crate::provider::Result<()> {
    bake.journal.unwind_until(bake.provider, |r| matches!(r, Resource::Volume { .. }))?;
    bake.root = None;
    bake.device = None;
    Ok(())
}
