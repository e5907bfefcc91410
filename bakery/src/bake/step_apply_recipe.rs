//! The recipe's customisations: templated files, commands in a chroot, services to enable or
//! disable. Nothing to undo: a failure discards the whole volume.

use super::Bake;
use crate::chroot;
use crate::rootfs::RootDir;

pub fn run(bake: &mut Bake) -> crate::provider::Result<()> {
    let mount_point = bake.root.clone().expect("the mount step ran");
    let root = RootDir::open(&mount_point)?;
    let recipe = &bake.plan.recipe;
    for file in &recipe.files {
        let (uid, gid) = root.lookup_ids(&file.owner, &file.group)?;
        root.write_file(&file.path, file.content.as_bytes(), file.mode, uid, gid)?;
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
    let log = bake.state_dir.join("tmp").join(format!("{}-command.log", bake.plan.bake_id));
    bake.journal.push(crate::journal::Resource::File { path: log.clone() })?;
    let env = [("BAKERY_APP", bake.plan.app.as_str()), ("BAKERY_VERSION", bake.plan.version.as_str())];
    for command in &commands {
        chroot::run(&mount_point, command, &env, &log, bake.cancel)?;
    }
    Ok(())
}
