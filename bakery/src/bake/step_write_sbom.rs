//! Writes the image's SBOM (CycloneDX) and provenance statement (in-toto, SLSA) into
//! `/var/lib/bakery/`, beside the manifest, for the registry too. Nothing to undo: a failure
//! discards the whole volume.

use super::Bake;
use crate::provider::Document;
use crate::txn::{StepResult, Tx};
use crate::{provenance, sbom};
use sha2::{Digest, Sha256};

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let install = bake.install.as_ref().expect("the install step ran");
    let plan = &bake.plan;
    let now = crate::ids::now_rfc3339();
    let package = plan.package_shown();
    let sbom = sbom::cyclonedx(&sbom::Inputs {
        image_name: &plan.name,
        app: &plan.app,
        version: &plan.version,
        package_source: &package,
        package_sha256: &install.package_sha256,
        files: &install.entries,
        packages: &bake.packages,
        bake_id: &plan.bake_id,
        timestamp: &now,
    });
    let statement = provenance::statement(&provenance::Inputs {
        image_name: &plan.name,
        sbom_sha256: &hex::encode(Sha256::digest(&sbom)),
        app: &plan.app,
        version: &plan.version,
        package: &package,
        package_sha256: &install.package_sha256,
        recipe_path: &plan.recipe_path.to_string_lossy(),
        recipe_sha256: &hex::encode(Sha256::digest(plan.recipe.canonical_json())),
        base_image_id: &plan.base.id,
        base_image_name: &plan.base.name,
        base_snapshot_id: &plan.base.snapshot_id,
        bake_id: &plan.bake_id,
        bake_key: &plan.bake_key,
        provider: tx.provider.kind(),
        tags: &plan.tags,
        started: &bake.started,
        finished: &now,
    });
    bake.write_document(Document::Sbom, sbom)?;
    bake.write_document(Document::Provenance, statement)
}
