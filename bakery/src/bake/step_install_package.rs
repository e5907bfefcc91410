//! Installs the package, whatever kind its first bytes say it is: a `.tar.gz` or `.tar.zst`
//! streamed into the install root, a `.war` placed there whole, or a `.deb` staged on the host
//! and installed by apt in the image (dependencies resolved from the image's and the host's
//! sources, maintainer scripts run with services kept down by policy-rc.d), its files then
//! listed from dpkg. Every kind is SHA-256 checked as it streams. Nothing to undo here: a
//! failure discards the whole volume.

use super::Bake;
use crate::chroot::apt;
use crate::dpkg;
use crate::events::Unit;
use crate::package::{self, InstallOptions, Kind};
use crate::rootfs::RootDir;
use crate::txn::{StepError, StepResult, Tx};
use std::path::Path;
use std::process::Command;

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let root = RootDir::open(bake.root.as_ref().expect("the mount step ran")).map_err(StepError::input)?;
    let apt_dir = bake.commands.as_ref().expect("the prepare step ran").apt_dir.clone();
    let spec = &bake.plan.recipe.package;
    let owner = root.lookup_ids(&spec.owner, &spec.group).map_err(StepError::input)?;
    let staged_name = format!("{}.deb", bake.plan.app);
    let options = InstallOptions {
        install_root: spec.install_root.clone(),
        owner,
        strip_components: spec.strip_components,
        max_expanded_bytes: spec.max_expanded_bytes,
        allow_device_nodes: spec.allow_device_nodes,
        allow_external_hardlinks: spec.allow_external_hardlinks,
        war_name: format!("{}.war", bake.plan.app),
        deb_staging: Some(apt_dir.join(&staged_name)),
    };
    let source = package::open_source(&bake.plan.package).map_err(StepError::input)?;
    let total = source.len.unwrap_or(0);
    let progress = tx.progress(Unit::Bytes);
    let mut report =
        package::install(source, &root, &bake.plan.package_sha256, &options, tx.cancel, &|read| progress(read, total))
            .map_err(StepError::input)?;
    if report.kind == Kind::Deb {
        let staged = apt_dir.join(&staged_name);
        let (name, architecture) = deb_identity(&staged)?;
        let in_image = format!("{}/{staged_name}", apt::MOUNT_POINT);
        bake.run_in_image(&format!("apt-get update -q && apt-get install -y -q {in_image}"), tx.cancel)?;
        report.entries = dpkg::files(&root, &name, &architecture).map_err(StepError::input)?;
        report.expanded_bytes = report.entries.iter().map(|entry| entry.size).sum();
        std::fs::remove_file(&staged)?;
    }
    tracing::info!(
        kind = %report.kind,
        files = report.entries.len(),
        compressed = report.compressed_bytes,
        expanded = report.expanded_bytes,
        "package installed and its sha256 verified"
    );
    bake.install = Some(report);
    Ok(())
}

/// The Debian package's name and architecture, from its control file.
fn deb_identity(deb: &Path) -> Result<(String, String), StepError> {
    let output = Command::new("dpkg-deb")
        .arg("--field")
        .arg(deb)
        .args(["Package", "Architecture"])
        .output()
        .map_err(|e| StepError::from(format!("cannot run dpkg-deb (Debian's dpkg) to read the package: {e}")))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| crate::deb822::field(&text, name);
    match (output.status.success(), field("Package"), field("Architecture")) {
        (true, Some(name), Some(architecture)) => Ok((name, architecture)),
        _ => Err(StepError::input(format!(
            "the Debian package has no readable control file: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))),
    }
}
