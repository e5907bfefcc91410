//! For a layer (a team's base): lists the image's Debian packages, kept next to the image as
//! its manifest (`bakery base show`). Nothing to undo.

use super::Bake;
use crate::dpkg;
use crate::provider::Document;
use crate::txn::{StepResult, Tx};

pub fn run(bake: &mut Bake, _tx: &mut Tx) -> StepResult {
    bake.packages = dpkg::installed(bake.root.as_ref().expect("the mount step ran"))?;
    bake.documents.insert(Document::Manifest, dpkg::list_document(&bake.packages));
    Ok(())
}
