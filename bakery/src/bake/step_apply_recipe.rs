//! The recipe's customisations: templated files, commands in a chroot, services to enable or
//! disable. Nothing to undo: a failure discards the whole volume.

use super::Bake;
use crate::chroot;
use crate::rootfs::RootDir;
use crate::txn::{StepError, StepResult, Tx};

pub fn run(bake: &mut Bake, tx: &mut Tx) -> StepResult {
    let mount_point = bake.root.clone().expect("the mount step ran");
    let root = RootDir::open(&mount_point).map_err(StepError::input)?;
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
    if commands.is_empty() {
        return Ok(());
    }
    let scratch = bake.state_dir.join("tmp");
    std::fs::create_dir_all(&scratch)?;
    let log = scratch.join(format!("{}-command.log", bake.plan.bake_id));
    tx.created(crate::journal::Resource::File { path: log.clone() })?;
    let env = [("BAKERY_APP", bake.plan.app.as_str()), ("BAKERY_VERSION", bake.plan.version.as_str())];
    for command in &commands {
        chroot::run(&mount_point, command, &env, &log, tx.cancel).map_err(StepError::input)?;
    }
    Ok(())
}
