//! Streams the package into the image: checksummed while it streams, every path kept inside the
//! install root. Nothing to undo here: a failure discards the whole volume.

use super::Bake;
use crate::package::{self, InstallOptions};
use crate::rootfs::RootDir;

pub fn run(bake: &mut Bake) -> crate::provider::Result<()> {
    let root = RootDir::open(bake.root.as_ref().expect("the mount step ran"))?;
    let spec = &bake.plan.recipe.package;
    let owner = root.lookup_ids(&spec.owner, &spec.group)?;
    let options = InstallOptions {
        install_root: spec.install_root.clone(),
        owner,
        strip_components: spec.strip_components,
        max_expanded_bytes: spec.max_expanded_bytes,
        allow_device_nodes: spec.allow_device_nodes,
        allow_external_hardlinks: spec.allow_external_hardlinks,
    };
    let source = package::open_source(&bake.plan.package)?;
    let bar = bake.ui.bar(source.len.unwrap_or(0), "package", true);
    let report = package::install(source, &root, &bake.plan.package_sha256, &options, bake.cancel, &|read| {
        bar.set_position(read)
    })?;
    bar.finish_and_clear();
    tracing::info!(
        files = report.entries.len(),
        compressed = report.compressed_bytes,
        expanded = report.expanded_bytes,
        "package installed and its sha256 verified"
    );
    bake.install = Some(report);
    Ok(())
}
