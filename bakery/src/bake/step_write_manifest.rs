//! Writes `/var/lib/bakery/manifest.json` into the image: what was installed, from which
//! package, onto which base, file by file with sha256, so an instance can say what it runs.

use super::Bake;
use crate::package::ManifestEntry;
use crate::rootfs::RootDir;
use crate::txn::{StepError, StepResult, Tx};
use serde::Serialize;

pub const MANIFEST_PATH: &str = "/var/lib/bakery/manifest.json";

#[derive(Serialize)]
struct Manifest<'a> {
    app: &'a str,
    version: &'a str,
    image_name: &'a str,
    bake_id: &'a str,
    bake_key: &'a str,
    baked_at: String,
    bakery_version: &'a str,
    base_image_id: &'a str,
    base_image_name: &'a str,
    package: PackageInfo<'a>,
    recipe: serde_json::Value,
    files: &'a [ManifestEntry],
}

#[derive(Serialize)]
struct PackageInfo<'a> {
    source: &'a str,
    sha256: &'a str,
    compressed_bytes: u64,
    expanded_bytes: u64,
}

pub fn run(bake: &mut Bake, _tx: &mut Tx) -> StepResult {
    let root = RootDir::open(bake.root.as_ref().expect("the mount step ran")).map_err(StepError::input)?;
    let install = bake.install.as_ref().expect("the install step ran");
    let plan = &bake.plan;
    let manifest = Manifest {
        app: &plan.app,
        version: &plan.version,
        image_name: &plan.name,
        bake_id: &plan.bake_id,
        bake_key: &plan.bake_key,
        baked_at: crate::ids::now_rfc3339(),
        bakery_version: env!("CARGO_PKG_VERSION"),
        base_image_id: &plan.base.id,
        base_image_name: &plan.base.name,
        package: PackageInfo {
            source: &plan.package,
            sha256: &install.package_sha256,
            compressed_bytes: install.compressed_bytes,
            expanded_bytes: install.expanded_bytes,
        },
        recipe: serde_json::from_str(&plan.recipe.canonical_json())?,
        files: &install.entries,
    };
    let json = serde_json::to_vec_pretty(&manifest)?;
    root.write_file(MANIFEST_PATH, &json, 0o644, 0, 0).map_err(StepError::input)?;
    bake.manifest = Some(json);
    Ok(())
}
