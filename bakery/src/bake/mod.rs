//! The bake pipeline, after Packer's amazon-chroot builder: an ordered list of steps, one file
//! each, run by the transaction runner ([`crate::txn`]). Every resource a step creates is
//! recorded in the bake's journal, and on any failure or interruption the journal is unwound
//! newest first, so cleanup runs in reverse order, is idempotent, and can be finished by
//! `bakery gc` if this process dies.

mod plan;
mod step_apply_recipe;
mod step_attach_volume;
mod step_create_volume;
mod step_detach;
mod step_install_package;
mod step_list_packages;
mod step_mount_root;
mod step_prepare_commands;
mod step_register_image;
mod step_snapshot;
mod step_write_manifest;
mod step_write_sbom;

pub use plan::{BakePlan, BakeRequest};

use crate::events::Sink;
use crate::provider::{Document, Image, Provider, SnapshotResult};
use crate::txn::{self, Step};
use serde::Serialize;
use snafu::{ResultExt, Snafu};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("{source}"))]
    Plan { source: plan::Error },

    #[snafu(display("another bake with the same key is running and holds {}: {source}", path.display()))]
    Busy { path: PathBuf, source: nix::Error },

    #[snafu(display("{source}"))]
    Run { source: txn::Error },
}

impl Error {
    /// Exit status: 3 for bad input (recipe, package, checksum), 4 for what does not exist,
    /// 5 when the same bake is already running, 130 when interrupted, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Plan { source } => source.exit_code(),
            Error::Busy { .. } => 5,
            Error::Run { source } => source.exit_code(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The one object `bake --output json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BakeOutcome {
    pub image_id: String,
    pub name: String,
    pub snapshot_id: String,
    pub base_image_id: String,
    pub package_sha256: String,
    pub bake_key: String,
    pub changed_blocks: u64,
    pub stored_bytes: u64,
    pub duration_ms: u64,
    pub reused: bool,
}

/// What the steps share: the plan and what earlier steps produced.
pub struct Bake {
    pub state_dir: PathBuf,
    pub plan: BakePlan,
    pub volume_id: Option<String>,
    pub device: Option<PathBuf>,
    pub root: Option<PathBuf>,
    /// The block device of the mounted root filesystem (a partition of `device`).
    pub root_device: Option<PathBuf>,
    /// What commands in the image use on the host.
    pub commands: Option<Commands>,
    pub install: Option<crate::package::InstallReport>,
    /// The Debian packages in the image once the recipe has run.
    pub packages: Vec<crate::dpkg::Package>,
    /// What the bake wrote into the image's /var/lib/bakery/, for the registry too.
    pub documents: BTreeMap<Document, Vec<u8>>,
    /// When the bake began (RFC 3339), for the provenance statement.
    pub started: String,
    pub snapshot: Option<SnapshotResult>,
    pub image: Option<Image>,
}

/// What commands in the image use on the host, for one bake.
pub struct Commands {
    /// apt's directory (see [`crate::chroot::apt`]).
    pub apt_dir: PathBuf,
    /// Where a command's output goes (its tail is shown when it fails).
    pub log: PathBuf,
}

impl Bake {
    fn new(state_dir: PathBuf, plan: BakePlan) -> Bake {
        Bake {
            state_dir,
            plan,
            volume_id: None,
            device: None,
            root: None,
            root_device: None,
            commands: None,
            install: None,
            packages: Vec::new(),
            documents: BTreeMap::new(),
            started: crate::ids::now_rfc3339(),
            snapshot: None,
            image: None,
        }
    }

    /// Writes one of the bake's documents into the image (see [`Document::image_path`]) and
    /// keeps it for the registry.
    fn write_document(&mut self, document: Document, content: Vec<u8>) -> txn::StepResult {
        let root = crate::rootfs::RootDir::open(self.root.as_ref().expect("the mount step ran"))
            .map_err(txn::StepError::input)?;
        root.write_file(document.image_path(), &content, 0o644, 0, 0).map_err(txn::StepError::input)?;
        self.documents.insert(document, content);
        Ok(())
    }

    /// Runs `command` with /bin/sh in the image, with the bake's apt and `BAKERY_APP` and
    /// `BAKERY_VERSION` set; a failure is bad input (exit 3) that shows the command's output.
    fn run_in_image(&self, command: &str, cancel: &AtomicBool) -> txn::StepResult {
        let root = self.root.as_ref().expect("the mount step ran");
        let commands = self.commands.as_ref().expect("the prepare step ran");
        // The image's sources as they are now: an earlier command may have added one. What the
        // host lends was told once, when the directory was prepared.
        let image = crate::rootfs::RootDir::open(root).map_err(txn::StepError::input)?;
        crate::chroot::apt::sync_sources(&commands.apt_dir, Path::new(crate::chroot::apt::HOST_APT), &image)?;
        let env = [("BAKERY_APP", self.plan.app.as_str()), ("BAKERY_VERSION", self.plan.version.as_str())];
        crate::chroot::run(root, command, &env, &commands.apt_dir, &commands.log, cancel).map_err(txn::StepError::input)
    }
}

const STEPS: &[Step<Bake>] = &[
    Step { name: "create volume from the base snapshot", run: step_create_volume::run },
    Step { name: "attach volume", run: step_attach_volume::run },
    Step { name: "mount the root filesystem", run: step_mount_root::run },
    Step { name: "prepare commands in the image", run: step_prepare_commands::run },
    Step { name: "install the package", run: step_install_package::run },
    Step { name: "apply the recipe", run: step_apply_recipe::run },
    Step { name: "write the manifest", run: step_write_manifest::run },
    Step { name: "write the SBOM and provenance", run: step_write_sbom::run },
    Step { name: "unmount and detach", run: step_detach::run },
    Step { name: "snapshot the volume", run: step_snapshot::run },
    Step { name: "register the image", run: step_register_image::run },
];

/// A bake with no package: the steps that lay a recipe's files and commands over a base.
const LAYER_STEPS: &[Step<Bake>] = &[
    Step { name: "create volume from the base snapshot", run: step_create_volume::run },
    Step { name: "attach volume", run: step_attach_volume::run },
    Step { name: "mount the root filesystem", run: step_mount_root::run },
    Step { name: "prepare commands in the image", run: step_prepare_commands::run },
    Step { name: "apply the layer", run: step_apply_recipe::run },
    Step { name: "list the installed packages", run: step_list_packages::run },
    Step { name: "unmount and detach", run: step_detach::run },
    Step { name: "snapshot the volume", run: step_snapshot::run },
    Step { name: "register the image", run: step_register_image::run },
];

/// A layer over a base image: a team's base (see [`crate::base`]).
pub struct LayerRequest<'a> {
    pub parent: Image,
    pub name: &'a str,
    pub description: &'a str,
    /// Files and commands, already rendered.
    pub recipe: crate::recipe::Recipe,
    pub recipe_path: PathBuf,
    /// The layer's cache key.
    pub key: String,
    pub tags: BTreeMap<String, String>,
}

/// Lays `request`'s files and commands over its parent image and registers the result, with
/// the same steps, journal and undo as a bake.
pub fn layer(
    provider: &dyn Provider,
    state_dir: PathBuf,
    request: LayerRequest,
    events: &dyn Sink,
    cancel: &AtomicBool,
) -> Result<(Image, SnapshotResult)> {
    let bake_id = crate::ids::new_id("bake");
    let stamp = crate::ids::now_rfc3339().replace(['-', ':', 'T', 'Z'], "");
    let plan = BakePlan {
        bake_id: bake_id.clone(),
        base: request.parent,
        recipe: request.recipe,
        recipe_path: request.recipe_path,
        package: String::new(),
        package_sha256: String::new(),
        bake_key: request.key,
        app: request.name.to_string(),
        version: String::new(),
        name: format!("{}-{stamp}", request.name),
        description: request.description.to_string(),
        tags: request.tags,
    };
    let what = format!("base layer {}", request.name);
    let mut bake = Bake::new(state_dir.clone(), plan);
    let kept = |bake: &Bake| txn::image_and_snapshot(&bake.image, &bake.snapshot);
    txn::run(&state_dir, &bake_id, &what, provider, cancel, events, &mut bake, LAYER_STEPS, kept).context(RunSnafu)?;
    Ok((bake.image.expect("the register step ran"), bake.snapshot.expect("the snapshot step ran")))
}

/// Bakes an image, or returns the existing one with the same bake key unless `rebake`.
pub fn bake(
    provider: &dyn Provider,
    state_dir: PathBuf,
    request: &BakeRequest,
    events: &dyn Sink,
    cancel: &AtomicBool,
) -> Result<BakeOutcome> {
    let started = Instant::now();
    let plan = plan::resolve(provider, request).context(PlanSnafu)?;

    // Same-key bakes queue behind each other, so the second finds the first one's image.
    let _same_key = plan::lock_bake_key(&state_dir, &plan.bake_key, cancel)?;
    if !request.rebake {
        if let Some(image) = plan::existing_image(provider, &plan).context(PlanSnafu)? {
            tracing::info!(image = %image.id, "an image with this bake key exists; reusing it");
            return Ok(BakeOutcome {
                image_id: image.id,
                name: image.name,
                snapshot_id: image.snapshot_id,
                base_image_id: plan.base.id.clone(),
                package_sha256: plan.package_sha256.clone(),
                bake_key: plan.bake_key.clone(),
                changed_blocks: 0,
                stored_bytes: 0,
                duration_ms: started.elapsed().as_millis() as u64,
                reused: true,
            });
        }
    }

    let mut bake = Bake::new(state_dir.clone(), plan);
    let (id, what) = (bake.plan.bake_id.clone(), format!("bake {}", bake.plan.name));
    let kept = |bake: &Bake| txn::image_and_snapshot(&bake.image, &bake.snapshot);
    txn::run(&state_dir, &id, &what, provider, cancel, events, &mut bake, STEPS, kept).context(RunSnafu)?;
    let image = bake.image.expect("the register step sets the image");
    let snapshot = bake.snapshot.expect("the snapshot step sets the snapshot");
    let plan = bake.plan;
    Ok(BakeOutcome {
        image_id: image.id,
        name: image.name,
        snapshot_id: snapshot.id,
        base_image_id: plan.base.id,
        package_sha256: plan.package_sha256,
        bake_key: plan.bake_key,
        changed_blocks: snapshot.changed_blocks,
        stored_bytes: snapshot.stored_bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        reused: false,
    })
}
