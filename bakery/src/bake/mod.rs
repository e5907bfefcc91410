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
mod step_mount_root;
mod step_register_image;
mod step_snapshot;
mod step_write_manifest;

pub use plan::{BakePlan, BakeRequest};

use crate::events::Sink;
use crate::provider::{Image, Provider, SnapshotResult};
use crate::txn::{self, Step};
use serde::Serialize;
use snafu::{ResultExt, Snafu};
use std::path::PathBuf;
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
    pub install: Option<crate::package::InstallReport>,
    /// The manifest written into the image, for the registry too.
    pub manifest: Option<Vec<u8>>,
    pub snapshot: Option<SnapshotResult>,
    pub image: Option<Image>,
}

const STEPS: &[Step<Bake>] = &[
    Step { name: "create volume from the base snapshot", run: step_create_volume::run },
    Step { name: "attach volume", run: step_attach_volume::run },
    Step { name: "mount the root filesystem", run: step_mount_root::run },
    Step { name: "install the package", run: step_install_package::run },
    Step { name: "apply the recipe", run: step_apply_recipe::run },
    Step { name: "write the manifest", run: step_write_manifest::run },
    Step { name: "unmount and detach", run: step_detach::run },
    Step { name: "snapshot the volume", run: step_snapshot::run },
    Step { name: "register the image", run: step_register_image::run },
];

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

    let mut bake = Bake {
        state_dir: state_dir.clone(),
        plan,
        volume_id: None,
        device: None,
        root: None,
        root_device: None,
        install: None,
        manifest: None,
        snapshot: None,
        image: None,
    };
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
