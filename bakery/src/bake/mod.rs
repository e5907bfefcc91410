//! The bake pipeline, after Packer's amazon-chroot builder: an ordered list of steps, one file
//! each. Every resource a step creates is recorded in the bake's journal, and on any failure or
//! interruption the journal is unwound newest first, so cleanup runs in reverse order, is
//! idempotent, and can be finished by `bakery gc` if this process dies.

mod plan;
mod step_apply_recipe;
mod step_attach_volume;
mod step_create_volume;
mod step_detach;
mod step_install_package;
mod step_mount_root;
mod step_register_image;
mod step_snapshot;
mod step_write_manifest;

pub use plan::{BakePlan, BakeRequest};

use crate::journal::{Journal, Resource};
use crate::provider::{Image, Provider, SnapshotResult};
use crate::ui::Ui;
use serde::Serialize;
use snafu::{ResultExt, Snafu};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("{source}"))]
    Plan { source: plan::Error },

    #[snafu(display("could not start the bake journal: {source}"))]
    Journal { source: crate::journal::Error },

    #[snafu(display("another bake with the same key is running and holds {}: {source}", path.display()))]
    Busy { path: PathBuf, source: nix::Error },

    #[snafu(display("{step}: {source}"))]
    Step { step: &'static str, source: crate::provider::Error },

    #[snafu(display("interrupted during {step}; everything it created was removed"))]
    Interrupted { step: &'static str },

    #[snafu(display("{source}\ncleanup also failed, `bakery gc` will finish it: {cleanup}"))]
    CleanupFailed { source: Box<Error>, cleanup: crate::journal::Error },
}

impl Error {
    /// Exit status: 3 for bad input (recipe, package, checksum), 4 for what does not exist,
    /// 5 when the same bake is already running, 130 when interrupted, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Plan { source } => source.exit_code(),
            Error::Busy { .. } => 5,
            Error::Interrupted { .. } => 130,
            Error::Step { source, .. } if is_input_error(source.as_ref()) => 3,
            Error::CleanupFailed { source, .. } => source.exit_code(),
            _ => 1,
        }
    }
}

/// Errors caused by what the user handed us rather than by the machine.
fn is_input_error(error: &(dyn std::error::Error + 'static)) -> bool {
    error.is::<crate::package::Error>() || error.is::<crate::chroot::Error>() || error.is::<crate::rootfs::Error>()
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

/// What the steps share: the plan, the journal and what earlier steps produced.
pub struct Bake<'a> {
    pub provider: &'a dyn Provider,
    pub state_dir: PathBuf,
    pub plan: BakePlan,
    pub journal: Journal,
    pub cancel: &'a AtomicBool,
    pub ui: &'a Ui,
    pub volume_id: Option<String>,
    pub device: Option<PathBuf>,
    pub root: Option<PathBuf>,
    /// The block device of the mounted root filesystem (a partition of `device`).
    pub root_device: Option<PathBuf>,
    pub install: Option<crate::package::InstallReport>,
    pub snapshot: Option<SnapshotResult>,
    pub image: Option<Image>,
}

type StepFn = fn(&mut Bake) -> crate::provider::Result<()>;

const STEPS: &[(&str, StepFn)] = &[
    ("create volume from the base snapshot", step_create_volume::run),
    ("attach volume", step_attach_volume::run),
    ("mount the root filesystem", step_mount_root::run),
    ("install the package", step_install_package::run),
    ("apply the recipe", step_apply_recipe::run),
    ("write the manifest", step_write_manifest::run),
    ("unmount and detach", step_detach::run),
    ("snapshot the volume", step_snapshot::run),
    ("register the image", step_register_image::run),
];

/// Bakes an image, or returns the existing one with the same bake key unless `rebake`.
pub fn bake(
    provider: &dyn Provider,
    state_dir: PathBuf,
    request: &BakeRequest,
    ui: &Ui,
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

    let journal = Journal::begin(&state_dir, &plan.bake_id, &format!("bake {}", plan.name), provider.kind())
        .context(JournalSnafu)?;
    let mut bake = Bake {
        provider,
        state_dir,
        plan,
        journal,
        cancel,
        ui,
        volume_id: None,
        device: None,
        root: None,
        root_device: None,
        install: None,
        snapshot: None,
        image: None,
    };
    if let Err(error) = run_steps(&mut bake) {
        let Bake { journal, .. } = bake;
        return Err(match journal.unwind_all(provider) {
            Ok(()) => error,
            Err(cleanup) => Error::CleanupFailed { source: Box::new(error), cleanup },
        });
    }

    // The image and its snapshot outlive the bake; the volume does not.
    let image = bake.image.clone().expect("the register step sets the image");
    let snapshot = bake.snapshot.clone().expect("the snapshot step sets the snapshot");
    let Bake { mut journal, plan, .. } = bake;
    let kept = [Resource::Image { id: image.id.clone() }, Resource::Snapshot { id: snapshot.id.clone() }];
    for resource in &kept {
        journal.keep(resource).context(JournalSnafu)?;
    }
    journal.unwind_all(provider).context(JournalSnafu)?;
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

fn run_steps(bake: &mut Bake) -> Result<()> {
    for (number, (step, run)) in STEPS.iter().enumerate() {
        if bake.cancel.load(Ordering::Relaxed) {
            return InterruptedSnafu { step: *step }.fail();
        }
        bake.ui.step(number + 1, STEPS.len(), step);
        let result = run(bake);
        if bake.cancel.load(Ordering::Relaxed) {
            return InterruptedSnafu { step: *step }.fail();
        }
        result.context(StepSnafu { step: *step })?;
    }
    Ok(())
}
