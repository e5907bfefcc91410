//! Streams the package into the image: checksummed while it streams, every path kept inside the
//! install root. Nothing to undo here: a failure discards the whole volume.

use super::Bake;
use crate::events::Unit;
use crate::package::{self, InstallOptions};
use crate::rootfs::RootDir;
use crate::txn::{StepError, StepResult, Tx};

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let root = RootDir::open(bake.root.as_ref().expect("the mount step ran")).map_err(StepError::input)?;
    let spec = &bake.plan.recipe.package;
    let owner = root.lookup_ids(&spec.owner, &spec.group).map_err(StepError::input)?;
    let options = InstallOptions {
        install_root: spec.install_root.clone(),
        owner,
        strip_components: spec.strip_components,
        max_expanded_bytes: spec.max_expanded_bytes,
        allow_device_nodes: spec.allow_device_nodes,
        allow_external_hardlinks: spec.allow_external_hardlinks,
    };
    let source = package::open_source(&bake.plan.package).map_err(StepError::input)?;
    let total = source.len.unwrap_or(0);
    let progress = tx.progress(Unit::Bytes);
    let report =
        package::install(source, &root, &bake.plan.package_sha256, &options, tx.cancel, &|read| progress(read, total))
            .map_err(StepError::input)?;
    tracing::info!(
        files = report.entries.len(),
        compressed = report.compressed_bytes,
        expanded = report.expanded_bytes,
        "package installed and its sha256 verified"
    );
    bake.install = Some(report);
    Ok(())
}
