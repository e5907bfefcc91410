//! Writes `/var/lib/bakery/manifest.json` into the image: what was installed, from which
//! package, onto which base, file by file with sha256, and the Debian packages the image
//! holds once the recipe has run, so an instance can say what it runs.

use super::Bake;
use crate::dpkg;
use crate::package::ManifestEntry;
use crate::provider::Document;
use crate::txn::{StepResult, Tx};
use serde::Serialize;

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
    packages: &'a [dpkg::Package],
}

#[derive(Serialize)]
struct PackageInfo<'a> {
    source: &'a str,
    sha256: &'a str,
    compressed_bytes: u64,
    expanded_bytes: u64,
}

pub fn run(bake: &mut Bake, _tx: &mut Tx) -> StepResult {
    bake.packages = dpkg::installed(bake.root.as_ref().expect("the mount step ran"))?;
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
            source: &plan.package_shown(),
            sha256: &install.package_sha256,
            compressed_bytes: install.compressed_bytes,
            expanded_bytes: install.expanded_bytes,
        },
        recipe: serde_json::from_str(&plan.recipe.canonical_json())?,
        files: &install.entries,
        packages: &bake.packages,
    };
    let json = serde_json::to_vec_pretty(&manifest)?;
    bake.write_document(Document::Manifest, json)
}
