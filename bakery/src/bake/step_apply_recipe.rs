//! The recipe's customisations: templated files, commands in a chroot, services to enable or
//! disable. Nothing to undo: a failure discards the whole volume.

use super::Bake;
use crate::rootfs::RootDir;
use crate::txn::{StepError, StepResult, Tx};

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let root = RootDir::open(bake.root.as_ref().expect("the mount step ran")).map_err(StepError::input)?;
    let recipe = &bake.plan.recipe;
    for file in &recipe.files {
        let (uid, gid) = root.lookup_ids(&file.owner, &file.group).map_err(StepError::input)?;
        root.write_file(&file.path, file.content.as_bytes(), file.mode, uid, gid).map_err(StepError::input)?;
    }

    let services = recipe
        .services
        .enable
        .iter()
        .map(|unit| format!("systemctl enable {unit}"))
        .chain(recipe.services.disable.iter().map(|unit| format!("systemctl disable {unit}")));
    let commands: Vec<String> = recipe.commands.iter().cloned().chain(services).collect();
    for command in &commands {
        bake.run_in_image(command, tx.cancel)?;
    }
    Ok(())
}
